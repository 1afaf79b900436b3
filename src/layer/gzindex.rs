//! Gzip span index: random access into a plain gzip layer (the "zran"
//! technique SOCI's zTOC also uses).
//!
//! Deflate has no seek points, but the decoder's whole state at a block
//! boundary is (compressed position, bit within that byte, the last 32 KiB
//! of output). [`IndexingDecoder`] records such a [`Checkpoint`] about every
//! [`SPAN`] bytes of output while a layer streams the first time;
//! [`SpanDecoder`] resumes from one, so content evicted later comes back by
//! one HTTP Range from the checkpoint before it, never the whole layer.
//!
//! Contracts:
//! - Checkpoints are taken only at deflate block boundaries inside a gzip
//!   member (never in the header or trailer), so resuming needs only the
//!   bit offset and the window; multi-member gzip (as pigz and some
//!   registries' tools write) is followed across members.
//! - Nothing here is trusted for content: a resumed stream is not checked
//!   against the member's CRC; callers verify what they extract against the
//!   object id the digest-verified layer index recorded.
//! - Windows are kept zstd-compressed, so the index costs well under 1% of
//!   the uncompressed layer (about 32 KiB raw per 4 MiB span before that).

use std::io::{self, Read};

use libz_rs_sys as z;
use serde::{Deserialize, Serialize};

/// Uncompressed bytes between checkpoints.
pub const SPAN: u64 = 4 << 20;
/// Deflate's window: what a resumed decoder must be primed with.
const WINDOW: usize = 32 << 10;
/// Compressed bytes read from the source at a time.
const IN_BUF: usize = 64 << 10;
/// windowBits for a gzip header + deflate stream.
const GZIP_BITS: i32 = 16 + 15;
/// windowBits for raw deflate.
const RAW_BITS: i32 = -15;

/// Where decoding can resume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Offset in the compressed blob of the first byte not fully consumed.
    pub compressed: u64,
    /// Bits of the byte before `compressed` still to be decoded (0–7).
    pub bits: u8,
    /// Offset in the uncompressed stream.
    pub uncompressed: u64,
    /// The last (up to) 32 KiB of output before this point, zstd-compressed.
    pub window: Vec<u8>,
}

impl Checkpoint {
    /// The first blob byte a resumed decoder needs.
    pub fn fetch_from(&self) -> u64 {
        self.compressed - u64::from(self.bits != 0)
    }
}

/// Every checkpoint of a layer, in stream order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpanIndex {
    /// Sorted by `uncompressed` (and `compressed`).
    pub checkpoints: Vec<Checkpoint>,
}

impl SpanIndex {
    /// The last checkpoint at or before uncompressed offset `offset`; `None`
    /// means "from the start of the blob".
    pub fn locate(&self, offset: u64) -> Option<&Checkpoint> {
        let i = self
            .checkpoints
            .partition_point(|c| c.uncompressed <= offset);
        i.checked_sub(1).map(|i| &self.checkpoints[i])
    }

    /// Bytes the index takes (windows plus fixed fields), for reporting.
    pub fn size(&self) -> u64 {
        self.checkpoints
            .iter()
            .map(|c| c.window.len() as u64 + 17)
            .sum()
    }
}

fn zerr(what: &str, rc: i32, strm: &z::z_stream) -> io::Error {
    let msg = if strm.msg.is_null() {
        String::new()
    } else {
        // SAFETY: zlib sets `msg` to a static NUL-terminated string.
        unsafe { std::ffi::CStr::from_ptr(strm.msg) }
            .to_string_lossy()
            .into_owned()
    };
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("gzip: {what} failed ({rc}) {msg}"),
    )
}

/// An owned inflate stream. Boxed: zlib's state points back at it.
struct Inflater {
    strm: Box<z::z_stream>,
}

// SAFETY: the stream and its state are owned by this value alone.
unsafe impl Send for Inflater {}

impl Inflater {
    fn new(window_bits: i32) -> io::Result<Inflater> {
        let mut strm = Box::new(z::z_stream::default());
        // SAFETY: `strm` is a valid, default-initialised stream with
        // allocators set; the version/size pair is the library's own.
        let rc = unsafe {
            z::inflateInit2_(
                &mut *strm,
                window_bits,
                z::zlibVersion(),
                std::mem::size_of::<z::z_stream>() as i32,
            )
        };
        if rc != z::Z_OK {
            return Err(zerr("inflateInit2", rc, &strm));
        }
        Ok(Inflater { strm })
    }

    fn reset(&mut self, window_bits: i32) -> io::Result<()> {
        // SAFETY: the stream was initialised by `new`.
        let rc = unsafe { z::inflateReset2(&mut *self.strm, window_bits) };
        if rc != z::Z_OK {
            return Err(zerr("inflateReset2", rc, &self.strm));
        }
        Ok(())
    }

    /// Primes a raw stream with the bits of a partial byte and the window.
    fn prime(&mut self, bits: u8, byte: u8, window: &[u8]) -> io::Result<()> {
        if bits != 0 {
            // SAFETY: initialised stream; bits in 1..=7.
            let rc = unsafe {
                z::inflatePrime(&mut *self.strm, bits as i32, (byte >> (8 - bits)) as i32)
            };
            if rc != z::Z_OK {
                return Err(zerr("inflatePrime", rc, &self.strm));
            }
        }
        if !window.is_empty() {
            // SAFETY: `window` is a valid slice for its length.
            let rc = unsafe {
                z::inflateSetDictionary(&mut *self.strm, window.as_ptr(), window.len() as u32)
            };
            if rc != z::Z_OK {
                return Err(zerr("inflateSetDictionary", rc, &self.strm));
            }
        }
        Ok(())
    }

    /// Inflates from `input` into `out` with `flush`; returns (consumed,
    /// produced, return code).
    fn inflate(&mut self, input: &[u8], out: &mut [u8], flush: i32) -> (usize, usize, i32) {
        let s = &mut *self.strm;
        s.next_in = input.as_ptr();
        s.avail_in = input.len().min(u32::MAX as usize) as u32;
        s.next_out = out.as_mut_ptr();
        s.avail_out = out.len().min(u32::MAX as usize) as u32;
        let (ai, ao) = (s.avail_in, s.avail_out);
        // SAFETY: next_in/next_out point into live slices of the given
        // lengths for the duration of the call.
        let rc = unsafe { z::inflate(s, flush) };
        let consumed = (ai - s.avail_in) as usize;
        let produced = (ao - s.avail_out) as usize;
        s.next_in = std::ptr::null();
        s.next_out = std::ptr::null_mut();
        s.avail_in = 0;
        s.avail_out = 0;
        (consumed, produced, rc)
    }

    /// Bit 7: at a block boundary; bit 6: that was the last block; bits
    /// 0–2: unused bits in the last byte consumed.
    fn data_type(&self) -> i32 {
        self.strm.data_type
    }

    /// The current window (the last up to 32 KiB of output of this member).
    fn window(&self) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; WINDOW];
        let mut len: u32 = 0;
        // SAFETY: `buf` has room for the 32 KiB maximum window.
        let rc = unsafe { z::inflateGetDictionary(&*self.strm, buf.as_mut_ptr(), &mut len) };
        if rc != z::Z_OK {
            return Err(zerr("inflateGetDictionary", rc, &self.strm));
        }
        buf.truncate(len as usize);
        Ok(buf)
    }
}

impl Drop for Inflater {
    fn drop(&mut self) {
        // SAFETY: initialised by `new`, ended exactly once.
        unsafe {
            z::inflateEnd(&mut *self.strm);
        }
    }
}

/// Where a decoder is in the (multi-member) gzip stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Inside a member (gzip mode: header, deflate and trailer).
    Member,
    /// Inside a member resumed in raw mode: after its deflate data the
    /// 8-byte trailer is still to be skipped by hand.
    RawMember,
    /// Skipping this many trailer bytes.
    Trailer(u8),
    /// Between members: the next byte starts a member or the stream ends.
    Between,
    /// Done.
    End,
}

/// The shared machinery of both decoders: compressed input buffering and
/// member transitions.
struct Core<R> {
    src: R,
    z: Inflater,
    buf: Box<[u8]>,
    pos: usize,
    len: usize,
    /// Blob offset of `buf[0]`.
    buf_at: u64,
    /// Uncompressed bytes produced.
    out: u64,
    phase: Phase,
    src_eof: bool,
}

impl<R: Read> Core<R> {
    /// A core reading `src`, whose first byte is blob offset `at` and
    /// uncompressed offset `out`.
    fn new(src: R, z: Inflater, at: u64, out: u64, phase: Phase) -> Core<R> {
        Core {
            src,
            z,
            buf: vec![0u8; IN_BUF].into_boxed_slice(),
            pos: 0,
            len: 0,
            buf_at: at,
            out,
            phase,
            src_eof: false,
        }
    }

    /// Blob offset of the next unconsumed byte.
    fn consumed(&self) -> u64 {
        self.buf_at + self.pos as u64
    }

    fn fill(&mut self) -> io::Result<()> {
        if self.pos < self.len || self.src_eof {
            return Ok(());
        }
        self.buf_at += self.len as u64;
        self.pos = 0;
        self.len = 0;
        loop {
            match self.src.read(&mut self.buf) {
                Ok(0) => {
                    self.src_eof = true;
                    return Ok(());
                }
                Ok(n) => {
                    self.len = n;
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Decodes into `out`. With `flush` = `Z_BLOCK`, inflate stops at the
    /// next block boundary inside a member and `on_block` runs there with
    /// the core (to take a checkpoint); with `Z_NO_FLUSH` it runs on
    /// across blocks (~12% faster: no return per block), and `on_block`
    /// runs only if a call happens to end on a boundary.
    fn read_with(
        &mut self,
        out: &mut [u8],
        flush: i32,
        mut on_block: impl FnMut(&mut Core<R>) -> io::Result<()>,
    ) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        loop {
            match self.phase {
                Phase::End => return Ok(0),
                Phase::Trailer(0) => self.phase = Phase::Between,
                Phase::Trailer(n) => {
                    self.fill()?;
                    if self.pos == self.len {
                        return Err(truncated());
                    }
                    let k = (n as usize).min(self.len - self.pos);
                    self.pos += k;
                    self.phase = Phase::Trailer(n - k as u8);
                }
                Phase::Between => {
                    self.fill()?;
                    if self.pos == self.len {
                        self.phase = Phase::End;
                        return Ok(0);
                    }
                    self.z.reset(GZIP_BITS)?;
                    self.phase = Phase::Member;
                }
                Phase::Member | Phase::RawMember => {
                    self.fill()?;
                    let input = &self.buf[self.pos..self.len];
                    let at_eof = input.is_empty();
                    let (c, p, rc) = self.z.inflate(input, out, flush);
                    self.pos += c;
                    self.out += p as u64;
                    match rc {
                        z::Z_STREAM_END => {
                            self.phase = if self.phase == Phase::RawMember {
                                Phase::Trailer(8)
                            } else {
                                Phase::Between
                            };
                        }
                        z::Z_OK => {
                            let dt = self.z.data_type();
                            if dt & 128 != 0 && dt & 64 == 0 {
                                on_block(self)?;
                            }
                        }
                        z::Z_BUF_ERROR if at_eof && self.src_eof => return Err(truncated()),
                        z::Z_BUF_ERROR => {}
                        rc => return Err(zerr("inflate", rc, &self.z.strm)),
                    }
                    if p > 0 {
                        return Ok(p);
                    }
                    if at_eof && self.src_eof && c == 0 && rc != z::Z_STREAM_END {
                        return Err(truncated());
                    }
                }
            }
        }
    }
}

fn truncated() -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, "gzip stream truncated")
}

/// Decodes a whole (multi-member) gzip stream from its first byte and
/// records a checkpoint about every [`SPAN`] output bytes.
pub struct IndexingDecoder<R> {
    core: Core<R>,
    span: u64,
    last: u64,
    checkpoints: Vec<Checkpoint>,
    /// Told of each checkpoint as it is taken (early reads resume from
    /// them while the layer still streams).
    sink: Option<CheckpointSink>,
}

/// Receives checkpoints as an [`IndexingDecoder`] takes them.
pub type CheckpointSink = Box<dyn FnMut(&Checkpoint) + Send>;

impl<R: Read> IndexingDecoder<R> {
    /// A decoder over the compressed bytes of `src`.
    pub fn new(src: R) -> io::Result<IndexingDecoder<R>> {
        Self::with_span(src, SPAN)
    }

    /// Same with a chosen span (tests use small ones).
    pub fn with_span(src: R, span: u64) -> io::Result<IndexingDecoder<R>> {
        Ok(IndexingDecoder {
            core: Core::new(src, Inflater::new(GZIP_BITS)?, 0, 0, Phase::Member),
            span,
            last: 0,
            checkpoints: Vec::new(),
            sink: None,
        })
    }

    /// Also hands each checkpoint to `sink` when it is taken.
    pub fn with_sink(mut self, sink: CheckpointSink) -> IndexingDecoder<R> {
        self.sink = Some(sink);
        self
    }

    /// The checkpoints recorded so far.
    pub fn into_index(self) -> SpanIndex {
        SpanIndex {
            checkpoints: self.checkpoints,
        }
    }
}

impl<R: Read> Read for IndexingDecoder<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let (span, last, cps, sink) = (
            self.span,
            &mut self.last,
            &mut self.checkpoints,
            &mut self.sink,
        );
        // Stop at block boundaries only once a span is due (decoding no
        // further than that before), so the checkpoint is still taken at
        // the first boundary after it.
        let due = *last + span;
        let (flush, out) = if self.core.out >= due {
            (z::Z_BLOCK, out)
        } else {
            let room = (due - self.core.out).min(out.len() as u64) as usize;
            (z::Z_NO_FLUSH, &mut out[..room])
        };
        self.core.read_with(out, flush, |core| {
            if core.out >= *last + span {
                let window = core.z.window()?;
                let window = zstd::bulk::compress(&window, 3)?;
                cps.push(Checkpoint {
                    compressed: core.consumed(),
                    bits: (core.z.data_type() & 7) as u8,
                    uncompressed: core.out,
                    window,
                });
                if let (Some(sink), Some(cp)) = (sink.as_mut(), cps.last()) {
                    sink(cp);
                }
                *last = core.out;
            }
            Ok(())
        })
    }
}

/// Decodes from a checkpoint: `src` yields the blob from
/// [`Checkpoint::fetch_from`] (or from byte 0 without a checkpoint).
pub struct SpanDecoder<R> {
    core: Core<R>,
}

impl<R: Read> SpanDecoder<R> {
    /// Resumes at `cp` (or starts at the blob's beginning for `None`).
    pub fn new(mut src: R, cp: Option<&Checkpoint>) -> io::Result<SpanDecoder<R>> {
        let Some(cp) = cp else {
            return Ok(SpanDecoder {
                core: Core::new(src, Inflater::new(GZIP_BITS)?, 0, 0, Phase::Member),
            });
        };
        let mut z = Inflater::new(RAW_BITS)?;
        let window = zstd::bulk::decompress(&cp.window, WINDOW)?;
        let mut first = [0u8; 1];
        if cp.bits != 0 {
            src.read_exact(&mut first)?;
        }
        z.prime(cp.bits, first[0], &window)?;
        Ok(SpanDecoder {
            core: Core::new(src, z, cp.compressed, cp.uncompressed, Phase::RawMember),
        })
    }

    /// Uncompressed offset of the next byte `read` returns.
    pub fn position(&self) -> u64 {
        self.core.out
    }
}

impl<R: Read> Read for SpanDecoder<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        self.core.read_with(out, z::Z_NO_FLUSH, |_| Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::{Compression, write::GzEncoder};
    use std::io::Write;

    /// Compressible but not trivially so: many distinct lines.
    fn sample(n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n);
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        while v.len() < n {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            v.extend_from_slice(format!("line {} value {:x}\n", v.len(), x % 100_000).as_bytes());
        }
        v.truncate(n);
        v
    }

    fn gz(parts: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for p in parts {
            let mut e = GzEncoder::new(Vec::new(), Compression::new(6));
            e.write_all(p).unwrap();
            out.extend(e.finish().unwrap());
        }
        out
    }

    fn index(blob: &[u8], span: u64) -> (Vec<u8>, SpanIndex) {
        let mut d = IndexingDecoder::with_span(blob, span).unwrap();
        let mut out = Vec::new();
        d.read_to_end(&mut out).unwrap();
        (out, d.into_index())
    }

    #[test]
    fn decodes_and_resumes_at_every_checkpoint() {
        let data = sample(3 << 20);
        let blob = gz(&[&data]);
        let (out, idx) = index(&blob, 256 << 10);
        assert_eq!(out, data);
        assert!(idx.checkpoints.len() >= 8, "{}", idx.checkpoints.len());
        for cp in &idx.checkpoints {
            let from = cp.fetch_from() as usize;
            let mut d = SpanDecoder::new(&blob[from..], Some(cp)).unwrap();
            assert_eq!(d.position(), cp.uncompressed);
            let mut got = vec![0u8; 100_000.min(data.len() - cp.uncompressed as usize)];
            d.read_exact(&mut got).unwrap();
            let at = cp.uncompressed as usize;
            assert_eq!(got, &data[at..at + got.len()]);
        }
        // Locate picks the last checkpoint at or before an offset.
        let mid = idx.checkpoints[3].uncompressed + 5;
        assert_eq!(idx.locate(mid), Some(&idx.checkpoints[3]));
        assert_eq!(idx.locate(0), None);
    }

    #[test]
    fn follows_members_from_a_checkpoint_and_from_the_start() {
        let (a, b) = (sample(1 << 20), sample(700_000));
        let blob = gz(&[&a, &b, b"tail"]);
        let (out, idx) = index(&blob, 128 << 10);
        let mut all = a.clone();
        all.extend(&b);
        all.extend(b"tail");
        assert_eq!(out, all);
        // Resume in the first member and read across into the later ones.
        let cp = idx.locate(500_000).unwrap();
        let mut d = SpanDecoder::new(&blob[cp.fetch_from() as usize..], Some(cp)).unwrap();
        let mut rest = Vec::new();
        d.read_to_end(&mut rest).unwrap();
        assert_eq!(rest, &all[cp.uncompressed as usize..]);
        let mut d = SpanDecoder::new(&blob[..], None).unwrap();
        let mut whole = Vec::new();
        d.read_to_end(&mut whole).unwrap();
        assert_eq!(whole, all);
    }

    #[test]
    fn truncated_and_corrupt_streams_are_errors() {
        let data = sample(500_000);
        let blob = gz(&[&data]);
        let mut d = IndexingDecoder::new(&blob[..blob.len() / 2]).unwrap();
        assert!(d.read_to_end(&mut Vec::new()).is_err());
        let mut bad = blob.clone();
        bad[20] ^= 0xff;
        bad[21] ^= 0x55;
        let mut d = IndexingDecoder::new(&bad[..]).unwrap();
        let mut out = Vec::new();
        assert!(d.read_to_end(&mut out).is_err() || out != data);
    }

    #[test]
    fn index_is_small() {
        let data = sample(16 << 20);
        let blob = gz(&[&data]);
        let (_, idx) = index(&blob, SPAN);
        assert_eq!(idx.checkpoints.len(), 3);
        assert!(idx.size() < (data.len() / 100) as u64, "{}", idx.size());
    }
}
