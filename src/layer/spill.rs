//! The spill: a gzip layer's compressed bytes, kept in an unlinked file
//! under the cache's `tmp/` while the layer is read in two passes
//! ([`crate::rootfs::early`]).
//!
//! Why: the first pass only lists the layer (so every name is settled as
//! soon as the stream ends), and must not wait for contents to be hashed
//! and stored. The bytes it has passed stay here, so the second pass (which
//! stores the contents) can follow it, and a reader's file can be extracted
//! on demand from the checkpoint before it.
//!
//! Contracts:
//! - **One appender, any number of readers.** [`Spill::append`] writes the
//!   bytes and only then publishes the new length; readers use positioned
//!   reads and never see a byte that is not written.
//! - **A tail reader ([`Spill::tail`]) waits** for bytes not written yet,
//!   ends where the appender [`Spill::finish`]ed, and fails if the
//!   appender failed. A [`Finish`] guard finishes a spill as failed if its
//!   appender returns early or panics, so no reader waits forever.
//! - The file is unlinked from the start: it goes when the last handle
//!   does, also after a crash.
//! - **A full disk** calls the spill's `on_full` (the content store evicts
//!   objects) and retries the append at the same offset; the append fails
//!   only when no room could be made.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Condvar, Mutex};

/// Makes room on a full disk for `n` more bytes; false if it could not.
type OnFull = Box<dyn Fn(u64) -> bool + Send + Sync>;

/// A growing spill file.
pub struct Spill {
    file: Arc<File>,
    state: Mutex<State>,
    grown: Condvar,
    on_full: Option<OnFull>,
}

struct State {
    len: u64,
    /// `Some(true)`: complete; `Some(false)`: the appender failed.
    done: Option<bool>,
}

impl Spill {
    /// A spill over the (empty, unlinked) `file`.
    pub fn new(file: File) -> Spill {
        Spill {
            file: Arc::new(file),
            state: Mutex::new(State { len: 0, done: None }),
            grown: Condvar::new(),
            on_full: None,
        }
    }

    /// What to call when the disk is full (see the module contracts).
    pub fn on_full(mut self, f: impl Fn(u64) -> bool + Send + Sync + 'static) -> Spill {
        self.on_full = Some(Box::new(f));
        self
    }

    /// The file, for positioned reads of bytes already appended.
    pub fn file(&self) -> &Arc<File> {
        &self.file
    }

    /// Appends `buf` and publishes it to readers.
    pub fn append(&self, buf: &[u8]) -> io::Result<()> {
        // One appender: the length only it changes is where it writes.
        let at = self.state.lock().unwrap().len;
        crate::cas::when_full(
            || self.on_full.as_ref().is_some_and(|f| f(buf.len() as u64)),
            || self.file.write_all_at(buf, at),
        )?;
        self.state.lock().unwrap().len += buf.len() as u64;
        self.grown.notify_all();
        Ok(())
    }

    /// No more bytes will come: the appender read its stream to the end
    /// (`ok`) or failed.
    pub fn finish(&self, ok: bool) {
        let mut g = self.state.lock().unwrap();
        if g.done.is_none() {
            g.done = Some(ok);
        }
        drop(g);
        self.grown.notify_all();
    }

    /// Reads the spill from `pos`, waiting for the appender (see the module
    /// contracts).
    pub fn tail(self: &Arc<Self>, pos: u64) -> Tail {
        Tail {
            spill: self.clone(),
            pos,
        }
    }
}

/// Finishes a spill as failed when dropped unfinished.
pub struct Finish<'a>(pub &'a Spill);

impl Drop for Finish<'_> {
    fn drop(&mut self) {
        self.0.finish(false);
    }
}

/// A reader that follows a spill as it grows ([`Spill::tail`]).
pub struct Tail {
    spill: Arc<Spill>,
    pos: u64,
}

impl Read for Tail {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            let mut g = self.spill.state.lock().unwrap();
            while g.len <= self.pos && g.done.is_none() {
                g = self.spill.grown.wait(g).unwrap();
            }
            let (len, done) = (g.len, g.done);
            drop(g);
            if len > self.pos {
                let want = buf.len().min((len - self.pos) as usize);
                let n = self.spill.file.read_at(&mut buf[..want], self.pos)?;
                if n == 0 {
                    continue;
                }
                self.pos += n as u64;
                return Ok(n);
            }
            return match done {
                Some(true) => Ok(0),
                _ => Err(io::Error::other("the first pass over the layer failed")),
            };
        }
    }
}

/// Copies everything read from `inner` into `spill` before returning it.
pub struct Tee<'a, R> {
    /// The stream being read.
    pub inner: R,
    /// Where its bytes go.
    pub spill: &'a Spill,
}

/// A spill write that failed under a reader: the cache's fault, not the
/// layer's ([`crate::layer::stream`] tells them apart).
#[derive(Debug)]
pub struct SpillError(pub io::Error);

impl std::fmt::Display for SpillError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "spill file: {}", self.0)
    }
}

impl std::error::Error for SpillError {}

impl<R: Read> Read for Tee<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.spill
            .append(&buf[..n])
            .map_err(|e| io::Error::other(SpillError(e)))?;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spill() -> Arc<Spill> {
        let d = tempfile::tempdir().unwrap();
        Arc::new(Spill::new(tempfile::tempfile_in(d.path()).unwrap()))
    }

    #[test]
    fn a_tail_reader_follows_the_appender_to_its_end() {
        let s = spill();
        let mut t = s.tail(0);
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            t.read_to_end(&mut got).map(|_| got)
        });
        for i in 0..50u8 {
            s.append(&[i; 1000]).unwrap();
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
        s.finish(true);
        let got = reader.join().unwrap().unwrap();
        assert_eq!(got.len(), 50_000);
        assert!(
            got.chunks(1000)
                .enumerate()
                .all(|(i, c)| c.iter().all(|&b| b == i as u8))
        );
    }

    #[test]
    fn a_failed_or_abandoned_appender_fails_its_readers() {
        let s = spill();
        s.append(b"abc").unwrap();
        let mut t = s.tail(1);
        {
            let _guard = Finish(&s);
        }
        let mut buf = [0u8; 8];
        assert_eq!(t.read(&mut buf).unwrap(), 2, "written bytes still read");
        assert!(t.read(&mut buf).is_err(), "then the failure, not EOF");
    }
}
