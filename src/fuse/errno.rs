//! The one place where errors become errno values (DESIGN.md section 5).

use fuser::Errno;

use crate::model::FsError;
use crate::registry::RegistryError;

/// The errno users see for `e`.
pub fn errno(e: &FsError) -> Errno {
    match e {
        FsError::NotFound => Errno::ENOENT,
        FsError::Registry(r) => match r {
            RegistryError::NotFound { .. } => Errno::ENOENT,
            RegistryError::Denied { .. } | RegistryError::Blocked { .. } => Errno::EACCES,
            RegistryError::Unavailable { .. }
            | RegistryError::DigestMismatch { .. }
            | RegistryError::Malformed { .. } => Errno::EIO,
        },
        FsError::BadImage { .. } => Errno::EIO,
        FsError::ReadOnly => Errno::EROFS,
        FsError::NotDir => Errno::ENOTDIR,
        FsError::IsDir => Errno::EISDIR,
        FsError::Stale(_) => Errno::ESTALE,
        FsError::Io { no_space: true, .. } => Errno::ENOSPC,
        FsError::Io { .. } => Errno::EIO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn design_table() {
        let r = |e: RegistryError| errno(&FsError::Registry(e));
        let s = || "r".to_string();
        assert_eq!(
            r(RegistryError::NotFound {
                registry: s(),
                what: s()
            }),
            Errno::ENOENT
        );
        assert_eq!(
            r(RegistryError::Denied {
                registry: s(),
                what: s(),
                auth_source: s(),
                anonymous: false,
                token_auth: false
            }),
            Errno::EACCES
        );
        assert_eq!(
            r(RegistryError::Unavailable {
                registry: s(),
                what: s(),
                reason: s()
            }),
            Errno::EIO
        );
        assert_eq!(
            r(RegistryError::DigestMismatch {
                registry: s(),
                what: s(),
                expected: s(),
                actual: s()
            }),
            Errno::EIO
        );
        assert_eq!(errno(&FsError::ReadOnly), Errno::EROFS);
        assert_eq!(
            errno(&FsError::Io {
                reason: s(),
                no_space: true
            }),
            Errno::ENOSPC
        );
    }
}
