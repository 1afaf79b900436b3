//! zstd:chunked: a zstd tar whose files start new zstd frames, with the
//! TOC ("manifest", zstd-compressed JSON) in a skippable frame near the end
//! and a footer skippable frame (magic `GnUlInUx`). The manifest is pinned
//! by the layer annotation [`CHECKSUM_ANNOTATIONS`] (sha256 of the
//! compressed manifest) and located by [`POSITION_ANNOTATIONS`]
//! (`offset:length:uncompressed-length:type`).

use super::{MAX_TOC, SeekError};

/// Annotations holding the sha256 of the compressed manifest (the
/// stargz-snapshotter name, then the containers/storage one).
pub const CHECKSUM_ANNOTATIONS: [&str; 2] = [
    "io.containers.zstd-chunked.manifest-checksum",
    "io.github.containers.zstd-chunked.manifest-checksum",
];
/// Annotations holding the manifest position.
pub const POSITION_ANNOTATIONS: [&str; 2] = [
    "io.containers.zstd-chunked.manifest-position",
    "io.github.containers.zstd-chunked.manifest-position",
];
/// The footer: an 8-byte skippable frame header and 40 bytes of payload.
pub const FOOTER_SIZE: u64 = 48;
/// Magic at the end of the footer.
pub const FOOTER_MAGIC: &[u8; 8] = b"GnUlInUx";
/// The only manifest type (`CRFS`, a JSON TOC).
pub const MANIFEST_TYPE_CRFS: u64 = 1;
/// Bytes of a skippable frame header (magic, length).
pub const SKIPPABLE_HEADER: u64 = 8;

/// Where the manifest is: (offset, compressed length, uncompressed length).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    /// Offset of the compressed manifest in the blob.
    pub offset: u64,
    /// Compressed length.
    pub length: u64,
    /// Uncompressed length.
    pub uncompressed: u64,
}

impl Position {
    fn checked(self, blob_size: u64, typ: u64) -> Result<Position, SeekError> {
        let bad = |m: String| Err(SeekError::Footer(m));
        if typ != MANIFEST_TYPE_CRFS {
            return bad(format!("manifest type {typ} is not supported"));
        }
        if self.offset < SKIPPABLE_HEADER
            || self.length == 0
            || self
                .offset
                .checked_add(self.length)
                .is_none_or(|e| e > blob_size)
        {
            return bad(format!(
                "manifest {}+{} lies outside the {blob_size}-byte blob",
                self.offset, self.length
            ));
        }
        if self.length > MAX_TOC || self.uncompressed > MAX_TOC {
            return bad(format!(
                "manifest of {} bytes is too large",
                self.uncompressed
            ));
        }
        Ok(self)
    }
}

/// Parses the position annotation `offset:length:uncompressed:type`.
pub fn parse_position(s: &str, blob_size: u64) -> Result<Position, SeekError> {
    let n: Vec<u64> = s
        .split(':')
        .map(|p| p.parse::<u64>())
        .collect::<Result<_, _>>()
        .map_err(|_| SeekError::Footer(format!("bad manifest position {s:?}")))?;
    let [offset, length, uncompressed, typ] = n[..] else {
        return Err(SeekError::Footer(format!("bad manifest position {s:?}")));
    };
    Position {
        offset,
        length,
        uncompressed,
    }
    .checked(blob_size, typ)
}

/// The manifest position from the footer (the blob's last
/// [`FOOTER_SIZE`] bytes), for layers without the annotation.
pub fn parse_footer(tail: &[u8], blob_size: u64) -> Result<Position, SeekError> {
    let bad = || SeekError::Footer("no zstd:chunked footer at the end of the layer".into());
    if (tail.len() as u64) < FOOTER_SIZE {
        return Err(bad());
    }
    let f = &tail[tail.len() - FOOTER_SIZE as usize..];
    let u = |i: usize| u64::from_le_bytes(f[i..i + 8].try_into().expect("8 bytes"));
    let magic = u32::from_le_bytes(f[..4].try_into().expect("4 bytes"));
    if magic != 0x184D2A50 || &f[40..48] != FOOTER_MAGIC {
        return Err(bad());
    }
    Position {
        offset: u(8),
        length: u(16),
        uncompressed: u(24),
    }
    .checked(blob_size, u(32))
}

/// What pins a manifest: the sha256 of its compressed bytes (the
/// manifest-checksum annotation) or, failing that, of its JSON (the
/// stargz TOC digest annotation, which converters also set).
#[derive(Debug, Clone, Copy)]
pub enum Pin<'a> {
    /// `sha256:<hex>` of the compressed manifest.
    Compressed(&'a str),
    /// `sha256:<hex>` of the manifest JSON.
    Json(&'a str),
}

/// The manifest JSON from its compressed bytes, checked against `pin`.
pub fn read_manifest(compressed: &[u8], pos: Position, pin: Pin<'_>) -> Result<Vec<u8>, SeekError> {
    let mismatch = |expected: &str, actual: String| SeekError::TocDigest {
        expected: expected.to_string(),
        actual,
    };
    if let Pin::Compressed(expected) = pin {
        let actual = super::digest_of(compressed);
        if actual != expected {
            return Err(mismatch(expected, actual));
        }
    }
    let json = zstd::bulk::decompress(compressed, pos.uncompressed as usize);
    let json = match (json, pin) {
        (Ok(j), _) => j,
        // Unverified bytes that do not even decompress: a mismatch.
        (Err(_), Pin::Json(expected)) => {
            return Err(mismatch(expected, super::digest_of(compressed)));
        }
        (Err(e), Pin::Compressed(_)) => return Err(SeekError::Toc(format!("manifest: {e}"))),
    };
    if let Pin::Json(expected) = pin {
        let actual = super::digest_of(&json);
        if actual != expected {
            return Err(mismatch(expected, actual));
        }
    }
    if json.len() as u64 != pos.uncompressed {
        return Err(SeekError::Toc(format!(
            "manifest is {} bytes, the position says {}",
            json.len(),
            pos.uncompressed
        )));
    }
    Ok(json)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions() {
        let p = parse_position("5000983:597:1820:1", 5001628).unwrap();
        assert_eq!((p.offset, p.length, p.uncompressed), (5000983, 597, 1820));
        assert!(parse_position("5000983:597:1820:2", 5001628).is_err());
        assert!(parse_position("5000983:99999:1820:1", 5001628).is_err());
        assert!(parse_position("1:2:3", 5001628).is_err());
        assert!(parse_position("-1:2:3:1", 5001628).is_err());
    }

    #[test]
    fn footer() {
        let mut f = vec![0x50, 0x2a, 0x4d, 0x18, 40, 0, 0, 0];
        for v in [5000983u64, 597, 1820, 1] {
            f.extend_from_slice(&v.to_le_bytes());
        }
        f.extend_from_slice(FOOTER_MAGIC);
        let p = parse_footer(&f, 5001628).unwrap();
        assert_eq!(p.offset, 5000983);
        f[47] = b'y';
        assert!(parse_footer(&f, 5001628).is_err());
    }
}
