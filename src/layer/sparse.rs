//! GNU sparse files in PAX form, as GNU tar writes them with `--sparse
//! --format=posix`: the tar entry holds only the file's data regions, one
//! after another, and a map says where each lies in the file; the holes
//! between them read as zeros. `umoci unpack` (Go's `archive/tar`)
//! expands them, so a layer holding one must show the expanded file.
//!
//! Three versions exist, told apart by PAX records:
//!
//! - 0.0: `GNU.sparse.offset` / `GNU.sparse.numbytes` pairs, repeated;
//! - 0.1: `GNU.sparse.map` = `offset,length,offset,length,…`;
//! - 1.0 (GNU tar's default): `GNU.sparse.major=1`, `minor=0`; the map is
//!   at the start of the entry's data, in 512-byte blocks of decimal
//!   numbers, one per line: the count of regions, then offset and length
//!   of each.
//!
//! The file's name is `GNU.sparse.name` (the header holds
//! `GNUSparseFile.<pid>/<name>`) and its size `GNU.sparse.size` (0.x) or
//! `GNU.sparse.realsize` (1.0).
//!
//! Contract (**checked map**): regions are in order, do not overlap and lie
//! within the file, the entry holds exactly the map and the regions' bytes,
//! a map has at most [`MAX_REGIONS`] regions and a layer's maps at most
//! [`MAX_LAYER_REGIONS`] together; anything else is refused
//! ([`SparseError`]) rather than guessed at, as Go's reader refuses it. The
//! old GNU sparse type `S` is not this: umoci refuses it (see
//! [`super::stream`]).

use std::io::{self, Read};

use serde::{Deserialize, Serialize};

/// The most regions a map may have: 16 bytes each in memory and in the
/// layer's index. A file with more holes than this is refused.
pub const MAX_REGIONS: usize = 1 << 20;

/// The most regions all sparse files of one layer may have together
/// (64 MiB of maps): a layer of many files each at [`MAX_REGIONS`] would
/// otherwise hold the daemon's memory ransom. Past it the layer is refused.
pub const MAX_LAYER_REGIONS: usize = 1 << 22;

/// Why a sparse file's records or map were refused.
#[derive(Debug, thiserror::Error)]
#[error("sparse file: {0}")]
pub struct SparseError(String);

fn bad(what: impl Into<String>) -> SparseError {
    SparseError(what.into())
}

/// Where a sparse file's data lies, once known.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SparseMap {
    /// Bytes of map blocks at the start of the entry's data (version 1.0;
    /// 0 for 0.x, whose map is in PAX records).
    pub map_len: u64,
    /// `(offset, length)` of each data region in the file, in order.
    pub regions: Vec<(u64, u64)>,
}

impl SparseMap {
    /// Bytes of data the entry holds after its map.
    pub fn data_len(&self) -> u64 {
        self.regions.iter().map(|r| r.1).sum()
    }

    /// Bytes the entry takes in the tar stream (map and data).
    pub fn extent(&self) -> u64 {
        self.map_len + self.data_len()
    }

    /// The map of a version 1.0 entry, read from the start of its data
    /// (whole 512-byte blocks, as many as the map needs).
    fn read_1x0(r: &mut dyn Read) -> Result<SparseMap, SparseError> {
        let mut lines = MapLines {
            r,
            block: [0; 512],
            at: 512,
            blocks: 0,
        };
        let n = lines.number()?;
        if n > MAX_REGIONS as u64 {
            return Err(bad(format!("{n} regions (at most {MAX_REGIONS})")));
        }
        let mut regions = Vec::with_capacity(n as usize);
        for _ in 0..n {
            regions.push((lines.number()?, lines.number()?));
        }
        Ok(SparseMap {
            map_len: lines.blocks * 512,
            regions,
        })
    }

    /// Checks the map against the file's `size` (see the module contract).
    fn check(&self, size: u64) -> Result<(), SparseError> {
        let mut end = 0u64;
        for &(off, len) in &self.regions {
            let e = off
                .checked_add(len)
                .ok_or_else(|| bad("a region's end overflows"))?;
            if off < end || e > size {
                return Err(bad(format!(
                    "region {off}+{len} overlaps the one before or lies past the size {size}"
                )));
            }
            end = e;
        }
        Ok(())
    }
}

/// Decimal lines of a 1.0 map, read block by block.
struct MapLines<'a> {
    r: &'a mut dyn Read,
    block: [u8; 512],
    at: usize,
    blocks: u64,
}

impl MapLines<'_> {
    fn number(&mut self) -> Result<u64, SparseError> {
        let mut v: u64 = 0;
        let mut digits = 0;
        loop {
            if self.at == 512 {
                self.r
                    .read_exact(&mut self.block)
                    .map_err(|e| bad(format!("map cut short: {e}")))?;
                self.at = 0;
                self.blocks += 1;
            }
            let c = self.block[self.at];
            self.at += 1;
            match c {
                b'\n' if digits > 0 => return Ok(v),
                b'0'..=b'9' if digits < 20 => {
                    v = v
                        .checked_mul(10)
                        .and_then(|v| v.checked_add((c - b'0') as u64))
                        .ok_or_else(|| bad("a number in the map overflows"))?;
                    digits += 1;
                }
                _ => return Err(bad(format!("byte {c:#04x} in the map"))),
            }
        }
    }
}

/// The `GNU.sparse.*` PAX records of one entry, gathered as they come.
#[derive(Debug, Default)]
pub struct Records {
    seen: bool,
    major: Option<Vec<u8>>,
    minor: Option<Vec<u8>>,
    name: Option<Vec<u8>>,
    size: Option<u64>,
    map: Option<Vec<u8>>,
    numblocks: Option<u64>,
    pairs: Vec<u64>,
    bad: Option<String>,
}

/// What an entry with `GNU.sparse.*` records is.
#[derive(Debug)]
pub struct Sparse {
    /// The file's name (`GNU.sparse.name`), if given.
    pub name: Option<Vec<u8>>,
    /// The file's size.
    pub size: u64,
    /// The map, or `None` for version 1.0, whose map is read from the data
    /// ([`Sparse::resolve`]).
    map: Option<SparseMap>,
}

impl Records {
    /// Takes a PAX record if it is a `GNU.sparse.*` one (others are
    /// left alone).
    pub fn take(&mut self, key: &[u8], val: &[u8]) {
        let Some(k) = key.strip_prefix(b"GNU.sparse.") else {
            return;
        };
        self.seen = true;
        let num = |v: &[u8]| {
            std::str::from_utf8(v)
                .ok()
                .and_then(|s| s.parse::<u64>().ok())
        };
        let num_or_bad = |v: &[u8], bad: &mut Option<String>| {
            let n = num(v);
            if n.is_none() {
                *bad = Some(format!(
                    "GNU.sparse.{} = {:?} is not a number",
                    String::from_utf8_lossy(k),
                    String::from_utf8_lossy(v)
                ));
            }
            n
        };
        match k {
            b"major" => self.major = Some(val.to_vec()),
            b"minor" => self.minor = Some(val.to_vec()),
            b"name" => self.name = Some(val.to_vec()),
            b"size" | b"realsize" => self.size = num_or_bad(val, &mut self.bad),
            b"map" => self.map = Some(val.to_vec()),
            b"numblocks" => self.numblocks = num_or_bad(val, &mut self.bad),
            // 0.0: offset, then numbytes, repeated.
            b"offset" | b"numbytes" => {
                let want_offset = self.pairs.len().is_multiple_of(2);
                if want_offset != (k == b"offset") {
                    self.bad = Some("GNU.sparse.offset and numbytes out of turn".into());
                } else if self.pairs.len() >= 2 * MAX_REGIONS {
                    self.bad = Some(format!("more than {MAX_REGIONS} regions"));
                } else if let Some(n) = num_or_bad(val, &mut self.bad) {
                    self.pairs.push(n);
                }
            }
            _ => {}
        }
    }

    /// `None` if no `GNU.sparse.*` record was seen; else what the records
    /// say, or why they cannot be used.
    pub fn finish(self) -> Option<Result<Sparse, SparseError>> {
        self.seen.then(|| self.sparse())
    }

    fn sparse(self) -> Result<Sparse, SparseError> {
        if let Some(b) = self.bad {
            return Err(bad(b));
        }
        let size = self
            .size
            .ok_or_else(|| bad("no GNU.sparse.size or GNU.sparse.realsize"))?;
        let v1 = match (self.major.as_deref(), self.minor.as_deref()) {
            (Some(b"1"), Some(b"0")) => true,
            (Some(b"0"), Some(b"0" | b"1")) | (None, None) => false,
            (major, minor) => {
                return Err(bad(format!(
                    "unknown version {}.{}",
                    String::from_utf8_lossy(major.unwrap_or(b"?")),
                    String::from_utf8_lossy(minor.unwrap_or(b"?"))
                )));
            }
        };
        let map = if v1 {
            None
        } else {
            let nums: Vec<u64> = match &self.map {
                Some(_) if !self.pairs.is_empty() => {
                    return Err(bad("both GNU.sparse.map and GNU.sparse.offset"));
                }
                Some(m) if m.is_empty() => Vec::new(),
                Some(m) => {
                    let n = m.iter().filter(|&&c| c == b',').count() + 1;
                    if n > 2 * MAX_REGIONS {
                        return Err(bad(format!("more than {MAX_REGIONS} regions")));
                    }
                    m.split(|&c| c == b',')
                        .map(|v| {
                            std::str::from_utf8(v)
                                .ok()
                                .and_then(|s| s.parse::<u64>().ok())
                                .ok_or_else(|| bad("GNU.sparse.map holds a non-number"))
                        })
                        .collect::<Result<_, _>>()?
                }
                None => self.pairs,
            };
            if !nums.len().is_multiple_of(2) {
                return Err(bad("an offset without its length"));
            }
            let regions: Vec<(u64, u64)> = nums.chunks(2).map(|p| (p[0], p[1])).collect();
            // Required, as Go's reader requires it.
            if self.numblocks != Some(regions.len() as u64) {
                return Err(bad(format!(
                    "GNU.sparse.numblocks is {}, the map has {} regions",
                    self.numblocks.map_or("missing".into(), |n| n.to_string()),
                    regions.len()
                )));
            }
            Some(SparseMap {
                map_len: 0,
                regions,
            })
        };
        Ok(Sparse {
            name: self.name,
            size,
            map,
        })
    }
}

impl Sparse {
    /// The map, reading it from the start of the entry's data `r` for
    /// version 1.0, checked against the file's size and against
    /// `stored`, the bytes the entry holds.
    pub fn resolve(self, r: &mut dyn Read, stored: u64) -> Result<SparseMap, SparseError> {
        let map = match self.map {
            Some(m) => m,
            None => SparseMap::read_1x0(r)?,
        };
        map.check(self.size)?;
        if map.extent() != stored {
            return Err(bad(format!(
                "the entry holds {stored} bytes, its map {}",
                map.extent()
            )));
        }
        Ok(map)
    }
}

/// A sparse file's content: the data regions read from `inner` (the
/// entry's data after its map), zeros between them, `size` bytes in all.
/// `inner` ending early is an error (`UnexpectedEof`).
pub struct Expand<'m, R> {
    inner: R,
    regions: &'m [(u64, u64)],
    size: u64,
    pos: u64,
}

impl<'m, R: Read> Expand<'m, R> {
    /// The `size` bytes of the file whose regions `map` places.
    pub fn new(inner: R, map: &'m SparseMap, size: u64) -> Expand<'m, R> {
        Expand {
            inner,
            regions: &map.regions,
            size,
            pos: 0,
        }
    }
}

impl<R: Read> Read for Expand<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while let Some(&(off, len)) = self.regions.first() {
            if self.pos < off + len {
                break;
            }
            self.regions = &self.regions[1..];
        }
        if self.pos >= self.size || buf.is_empty() {
            return Ok(0);
        }
        match self.regions.first() {
            Some(&(off, len)) if self.pos >= off => {
                let want = (off + len - self.pos).min(buf.len() as u64) as usize;
                let n = self.inner.read(&mut buf[..want])?;
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "sparse file: data ends inside a region",
                    ));
                }
                self.pos += n as u64;
                Ok(n)
            }
            next => {
                let hole_end = next.map_or(self.size, |r| r.0);
                let n = (hole_end - self.pos).min(buf.len() as u64) as usize;
                buf[..n].fill(0);
                self.pos += n as u64;
                Ok(n)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records(pairs: &[(&str, &str)]) -> Records {
        let mut r = Records::default();
        for (k, v) in pairs {
            r.take(k.as_bytes(), v.as_bytes());
        }
        r
    }

    fn expand(map: &SparseMap, data: &[u8], size: u64) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        Expand::new(data, map, size).read_to_end(&mut out)?;
        Ok(out)
    }

    #[test]
    fn expands_regions_and_holes() {
        let map = SparseMap {
            map_len: 0,
            regions: vec![(2, 3), (7, 1), (10, 0)],
        };
        assert_eq!(expand(&map, b"abcd", 10).unwrap(), b"\0\0abc\0\0d\0\0");
        // data that ends early is an error, never zeros in its place
        let e = expand(&map, b"ab", 10).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        // no regions: all holes
        let none = SparseMap {
            map_len: 0,
            regions: vec![],
        };
        assert_eq!(expand(&none, b"", 3).unwrap(), b"\0\0\0");
    }

    #[test]
    fn reads_the_three_versions() {
        let v00 = records(&[
            ("GNU.sparse.size", "10"),
            ("GNU.sparse.numblocks", "2"),
            ("GNU.sparse.offset", "2"),
            ("GNU.sparse.numbytes", "3"),
            ("GNU.sparse.offset", "7"),
            ("GNU.sparse.numbytes", "1"),
        ]);
        let v01 = records(&[
            ("GNU.sparse.size", "10"),
            ("GNU.sparse.numblocks", "2"),
            ("GNU.sparse.name", "a/b"),
            ("GNU.sparse.map", "2,3,7,1"),
        ]);
        let v10 = records(&[
            ("GNU.sparse.major", "1"),
            ("GNU.sparse.minor", "0"),
            ("GNU.sparse.name", "a/b"),
            ("GNU.sparse.realsize", "10"),
        ]);
        let want = vec![(2, 3), (7, 1)];
        for r in [v00, v01] {
            let s = r.finish().unwrap().unwrap();
            let m = s.resolve(&mut io::empty(), 4).unwrap();
            assert_eq!((m.map_len, &m.regions), (0, &want));
        }
        let s = v10.finish().unwrap().unwrap();
        assert_eq!(s.name.as_deref(), Some(&b"a/b"[..]));
        let mut data = b"2\n2\n3\n7\n1\n".to_vec();
        data.resize(512, 0);
        data.extend_from_slice(b"abcd");
        let mut r = &data[..];
        let m = s.resolve(&mut r, 516).unwrap();
        assert_eq!((m.map_len, &m.regions), (512, &want));
        assert_eq!(r, b"abcd", "the map's blocks are consumed, the data is not");
        assert!(Records::default().finish().is_none());
    }

    #[test]
    fn refuses_bad_maps() {
        let v01 = |map: &str, size: &str, n: &str| {
            records(&[
                ("GNU.sparse.size", size),
                ("GNU.sparse.numblocks", n),
                ("GNU.sparse.map", map),
            ])
            .finish()
            .unwrap()
            .and_then(|s| s.resolve(&mut io::empty(), 4))
        };
        assert!(v01("2,3,7,1", "10", "2").is_ok());
        assert!(v01("2,3,4,1", "10", "2").is_err(), "overlap");
        assert!(v01("7,1,2,3", "10", "2").is_err(), "out of order");
        assert!(v01("2,3,9,2", "10", "2").is_err(), "past the size");
        assert!(v01("2,3,7,1", "10", "3").is_err(), "numblocks");
        assert!(v01("2,3,7", "10", "2").is_err(), "odd");
        assert!(v01("2,3,x,1", "10", "2").is_err(), "not a number");
        assert!(v01("2,4,7,1", "10", "2").is_err(), "holds 4 bytes, map 5");
        assert!(
            v01("18446744073709551615,1", "10", "1").is_err(),
            "overflow"
        );
        assert!(
            records(&[("GNU.sparse.major", "2"), ("GNU.sparse.minor", "0")])
                .finish()
                .unwrap()
                .is_err(),
            "unknown version"
        );
        assert!(
            records(&[("GNU.sparse.name", "x")])
                .finish()
                .unwrap()
                .is_err(),
            "no size"
        );
        let v10 = |map: &[u8]| {
            let mut data = map.to_vec();
            data.resize(data.len().div_ceil(512).max(1) * 512, 0);
            records(&[
                ("GNU.sparse.major", "1"),
                ("GNU.sparse.minor", "0"),
                ("GNU.sparse.realsize", "10"),
            ])
            .finish()
            .unwrap()
            .and_then(|s| s.resolve(&mut &data[..], data.len() as u64))
        };
        assert!(v10(b"0\n").is_ok());
        assert!(v10(b"1\n2\n").is_err(), "cut short");
        assert!(v10(b"1\n2\n-3\n").is_err(), "not a number");
        assert!(v10(b"99999999\n").is_err(), "too many regions");
        assert!(v10(b"\n").is_err(), "empty line");
    }

    /// Hostile 1.0 maps (random digits and newlines, random sizes) are
    /// refused or give a map whose expansion is exactly the file's size;
    /// never a panic.
    #[test]
    fn random_maps_never_panic_and_expand_to_the_size() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut accepted = 0;
        for _ in 0..20_000 {
            let size = next() % 4096;
            let mut map = Vec::new();
            for _ in 0..next() % 24 {
                map.push(match next() % 4 {
                    0 => b'\n',
                    _ => b'0' + (next() % 10) as u8,
                });
            }
            map.resize(512, 0);
            map.extend((0..next() % 600).map(|i| i as u8));
            let s = records(&[
                ("GNU.sparse.major", "1"),
                ("GNU.sparse.minor", "0"),
                ("GNU.sparse.realsize", &size.to_string()),
            ])
            .finish()
            .unwrap()
            .unwrap();
            let stored = map.len() as u64;
            let mut r = &map[..];
            if let Ok(m) = s.resolve(&mut r, stored) {
                accepted += 1;
                assert_eq!(expand(&m, r, size).unwrap().len() as u64, size);
            }
        }
        assert!(
            accepted > 0,
            "no random map was valid: the test shows nothing"
        );
    }
}
