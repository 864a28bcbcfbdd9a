//! Newline-delimited framing with hard limits. Input is buffered only up to
//! `max_buffered` bytes and an unfinished frame only up to `max_frame`, so a peer
//! that never sends '\n', or sends faster than it reads replies, cannot grow host
//! memory without bound.

/// Default largest frame, newline excluded (docs/gate.md "Frames": 1 MiB).
pub use ironvmm_wire::DEFAULT_MAX_FRAME;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// A frame, or the unterminated start of one, is longer than the limit.
    TooLong { limit: usize },
    /// More unprocessed input than the buffer limit (frames waiting behind replies
    /// the peer does not read).
    Backlog { limit: usize },
}

/// Splits a byte stream into frames; frames are taken out one at a time.
#[derive(Debug)]
pub struct Framer {
    buf: Vec<u8>,
    /// Start of the first unprocessed byte in `buf`.
    start: usize,
    /// Bytes of `buf[start..]` already known to hold no '\n'.
    scanned: usize,
    max_frame: usize,
    max_buffered: usize,
}

impl Framer {
    /// `max_buffered` is raised to at least `max_frame`.
    pub fn new(max_frame: usize, max_buffered: usize) -> Self {
        Framer {
            buf: Vec::new(),
            start: 0,
            scanned: 0,
            max_frame,
            max_buffered: max_buffered.max(max_frame),
        }
    }

    /// Unprocessed bytes held (complete frames waiting, plus an unfinished one).
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// How many more bytes `feed` accepts now.
    pub fn room(&self) -> usize {
        self.max_buffered - self.buffered()
    }

    /// Adds input. Fails when it would pass `max_buffered`.
    pub fn feed(&mut self, data: &[u8]) -> Result<(), FrameError> {
        if self.buffered() + data.len() > self.max_buffered {
            return Err(FrameError::Backlog {
                limit: self.max_buffered,
            });
        }
        if self.start > 0 && self.start >= self.buf.len() / 2 {
            // Compact so consumed bytes do not pile up at the front.
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(data);
        Ok(())
    }

    /// The next complete frame (without its newline or a trailing '\r'; blank lines
    /// are skipped), `None` when only an unfinished frame (or nothing) is left, or an
    /// error when the frame or the unfinished tail is over `max_frame`.
    pub fn next_frame(&mut self) -> Option<Result<&[u8], FrameError>> {
        let too_long = FrameError::TooLong {
            limit: self.max_frame,
        };
        loop {
            let len = self.buf.len() - self.start;
            let from = self.start + self.scanned;
            let Some(nl) = self.buf[from..].iter().position(|&b| b == b'\n') else {
                self.scanned = len;
                if len > self.max_frame {
                    return Some(Err(too_long));
                }
                if len == 0 {
                    self.buf.clear();
                    self.start = 0;
                    self.scanned = 0;
                }
                return None;
            };
            let (begin, mut end) = (self.start, from + nl);
            self.start = end + 1;
            self.scanned = 0;
            if end - begin > self.max_frame {
                return Some(Err(too_long));
            }
            if end > begin && self.buf[end - 1] == b'\r' {
                end -= 1;
            }
            if self.buf[begin..end].iter().all(|b| b.is_ascii_whitespace()) {
                continue;
            }
            return Some(Ok(&self.buf[begin..end]));
        }
    }

    /// Whether a complete frame is waiting.
    pub fn has_frame(&self) -> bool {
        self.buf[self.start + self.scanned..].contains(&b'\n')
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(f: &mut Framer) -> (Vec<Vec<u8>>, Option<FrameError>) {
        let mut out = Vec::new();
        while let Some(r) = f.next_frame() {
            match r {
                Ok(fr) => out.push(fr.to_vec()),
                Err(e) => return (out, Some(e)),
            }
        }
        (out, None)
    }

    #[test]
    fn splits_and_reassembles() {
        let mut f = Framer::new(16, 64);
        f.feed(b"ab\ncd\r\n\n  \nef").unwrap();
        let (v, e) = drain(&mut f);
        assert_eq!(v, vec![b"ab".to_vec(), b"cd".to_vec()]);
        assert_eq!(e, None);
        assert_eq!(f.buffered(), 2);
        f.feed(b"gh\n").unwrap();
        assert!(f.has_frame());
        let (v, _) = drain(&mut f);
        assert_eq!(v, vec![b"efgh".to_vec()]);
        assert_eq!(f.buffered(), 0);
        assert!(!f.has_frame());
    }

    #[test]
    fn limit_is_inclusive_and_bounds_buffering() {
        let mut f = Framer::new(4, 64);
        f.feed(b"abcd\nabcde\n").unwrap();
        let (v, e) = drain(&mut f);
        assert_eq!(v.len(), 1);
        assert_eq!(e, Some(FrameError::TooLong { limit: 4 }));

        // No newline at all: refused as soon as the tail passes the limit.
        let mut f = Framer::new(4, 64);
        f.feed(b"abc").unwrap();
        assert_eq!(drain(&mut f).1, None);
        f.feed(b"de").unwrap();
        assert_eq!(drain(&mut f).1, Some(FrameError::TooLong { limit: 4 }));
    }

    #[test]
    fn backlog_is_bounded() {
        let mut f = Framer::new(4, 10);
        f.feed(b"a\nb\nc\nd\n").unwrap();
        assert_eq!(f.feed(b"e\nf\n"), Err(FrameError::Backlog { limit: 10 }));
        // Taking frames out makes room again.
        f.next_frame().unwrap().unwrap();
        f.next_frame().unwrap().unwrap();
        f.feed(b"e\nf\n").unwrap();
        assert_eq!(drain(&mut f).0.len(), 4);
    }

    #[test]
    fn byte_at_a_time() {
        let mut f = Framer::new(100, 200);
        let mut got = Vec::new();
        for &b in b"one\ntwo\nthree\n" {
            f.feed(&[b]).unwrap();
            got.extend(drain(&mut f).0);
        }
        assert_eq!(
            got,
            vec![b"one".to_vec(), b"two".to_vec(), b"three".to_vec()]
        );
    }
}
