//! eStargz: a gzip tar whose files start new gzip members, ending with a
//! TOC (`stargz.index.json`, a tar entry in its own gzip member) and a
//! 51-byte footer: an empty gzip member whose extra field `SG` carries
//! `%016xSTARGZ`, the TOC's offset. The manifest pins the TOC's JSON by the
//! layer annotation [`TOC_DIGEST_ANNOTATION`].

use std::io::Read;

use super::{MAX_TOC, SeekError};

/// Layer annotation holding the sha256 of the TOC JSON.
pub const TOC_DIGEST_ANNOTATION: &str = "containerd.io/snapshot/stargz/toc.digest";
/// Layer annotation holding the uncompressed size.
pub const UNCOMPRESSED_SIZE_ANNOTATION: &str = "io.containers.estargz.uncompressed-size";
/// Size of the eStargz footer.
pub const FOOTER_SIZE: u64 = 51;
/// Size of the legacy stargz footer (extra field without a subfield header).
pub const LEGACY_FOOTER_SIZE: u64 = 47;
/// Name of the TOC entry.
pub const TOC_NAME: &str = "stargz.index.json";

/// The TOC offset and the footer's size from the last bytes of the blob
/// (at least [`FOOTER_SIZE`] of them, or the legacy 47).
pub fn parse_footer(tail: &[u8]) -> Result<(u64, u64), SeekError> {
    let bad = |m: &str| SeekError::Footer(m.to_string());
    for size in [FOOTER_SIZE, LEGACY_FOOTER_SIZE] {
        if (tail.len() as u64) < size {
            continue;
        }
        let footer = &tail[tail.len() - size as usize..];
        let mut gz = flate2::read::GzDecoder::new(footer);
        let mut rest = Vec::new();
        if gz.read_to_end(&mut rest).is_err() || !rest.is_empty() {
            continue;
        }
        let Some(extra) = gz.header().and_then(|h| h.extra()) else {
            continue;
        };
        let payload = match extra {
            [b'S', b'G', 22, 0, p @ ..] if p.len() == 22 => p,
            p if p.len() == 22 => p,
            _ => continue,
        };
        let Some(hex) = payload.strip_suffix(b"STARGZ") else {
            continue;
        };
        let hex = std::str::from_utf8(hex).map_err(|_| bad("TOC offset is not hex"))?;
        return u64::from_str_radix(hex, 16)
            .map(|off| (off, size))
            .map_err(|_| bad("TOC offset is not hex"));
    }
    Err(bad("no eStargz footer at the end of the layer"))
}

/// The TOC JSON from its gzip member (`toc` runs from the TOC offset to the
/// footer), checked against `expected` (`sha256:<hex>`).
pub fn read_toc(toc: &[u8], expected: &str) -> Result<Vec<u8>, SeekError> {
    let bad = |m: String| SeekError::Footer(format!("TOC member: {m}"));
    let gz = flate2::read::GzDecoder::new(toc).take(MAX_TOC + 4096);
    let mut archive = tar::Archive::new(gz);
    let mut entries = archive.entries().map_err(|e| bad(e.to_string()))?;
    let mut entry = entries
        .next()
        .ok_or_else(|| bad("empty".into()))?
        .map_err(|e| bad(e.to_string()))?;
    let name = entry.path_bytes().into_owned();
    if name != TOC_NAME.as_bytes() {
        return Err(bad(format!(
            "first entry is {:?}, not {TOC_NAME}",
            String::from_utf8_lossy(&name)
        )));
    }
    if entry.size() > MAX_TOC {
        return Err(bad(format!("{} bytes is too large", entry.size())));
    }
    let mut json = Vec::with_capacity(entry.size() as usize);
    entry
        .read_to_end(&mut json)
        .map_err(|e| bad(e.to_string()))?;
    let actual = super::digest_of(&json);
    if actual != expected {
        return Err(SeekError::TocDigest {
            expected: expected.to_string(),
            actual,
        });
    }
    Ok(json)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A footer as containerd's converter writes it (stored empty block).
    fn footer(off: u64) -> Vec<u8> {
        let mut f = vec![
            0x1f, 0x8b, 8, 4, 0, 0, 0, 0, 0, 0xff, 26, 0, b'S', b'G', 22, 0,
        ];
        f.extend_from_slice(format!("{off:016x}STARGZ").as_bytes());
        f.extend_from_slice(&[1, 0, 0, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0]);
        f
    }

    #[test]
    fn footer_round_trip() {
        let f = footer(0x4c5412);
        assert_eq!(f.len() as u64, FOOTER_SIZE);
        assert_eq!(parse_footer(&f).unwrap(), (0x4c5412, 51));
        let mut longer = vec![7u8; 100];
        longer.extend_from_slice(&f);
        assert_eq!(parse_footer(&longer).unwrap(), (0x4c5412, 51));
        assert!(parse_footer(&[0u8; 51]).is_err());
        assert!(parse_footer(b"short").is_err());
    }
}
