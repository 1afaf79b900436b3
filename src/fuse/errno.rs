//! The one place where errors become errno values (DESIGN.md section 5).

use fuser::Errno;

use crate::model::FsError;
use crate::outbox::OutboxError;
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
            | RegistryError::Malformed { .. }
            | RegistryError::RangeIgnored { .. } => Errno::EIO,
            RegistryError::Rejected { .. } => Errno::EINVAL,
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

/// The errno users see for an outbox failure: staging I/O passes its own
/// errno through (`ENOSPC` for a full disk), the path rules give `EINVAL`
/// (a name that does not belong at that level) or `EPERM` (a file above the
/// tag level), and moves across tag directories `EXDEV`.
pub fn outbox_errno(e: &OutboxError) -> Errno {
    match e {
        OutboxError::Os { errno, .. } => Errno::from_i32(*errno),
        OutboxError::InvalidName { .. } => Errno::EINVAL,
        OutboxError::NotPermitted(_) => Errno::EPERM,
        OutboxError::CrossTag(_) => Errno::EXDEV,
        OutboxError::Stale(_) => Errno::ESTALE,
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
            r(RegistryError::Rejected {
                registry: s(),
                what: s(),
                reason: s()
            }),
            Errno::EINVAL
        );
        assert_eq!(
            outbox_errno(&OutboxError::Os {
                op: "write",
                errno: libc::ENOSPC
            }),
            Errno::ENOSPC
        );
        assert_eq!(
            outbox_errno(&OutboxError::InvalidName {
                name: s(),
                why: "x"
            }),
            Errno::EINVAL
        );
        assert_eq!(outbox_errno(&OutboxError::NotPermitted("x")), Errno::EPERM);
        assert_eq!(outbox_errno(&OutboxError::CrossTag("x")), Errno::EXDEV);
        assert_eq!(
            errno(&FsError::Io {
                reason: s(),
                no_space: true
            }),
            Errno::ENOSPC
        );
    }
}
