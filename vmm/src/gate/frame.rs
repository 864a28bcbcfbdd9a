//! Newline-delimited framing with a hard size limit. A partial frame is buffered only
//! up to the limit, so a guest that never sends '\n' cannot grow host memory.

/// Default largest frame, newline excluded (architecture.md: 1 MiB).
pub const DEFAULT_MAX_FRAME: usize = 1 << 20;

/// A frame (or the unterminated start of one) is longer than the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameTooLong {
    pub limit: usize,
}

/// Splits a byte stream into frames.
#[derive(Debug)]
pub struct Framer {
    pending: Vec<u8>,
    max: usize,
}

impl Framer {
    pub fn new(max: usize) -> Self {
        Framer {
            pending: Vec::new(),
            max,
        }
    }

    /// Bytes held for an unfinished frame.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// Feeds bytes; calls `on_frame` with each complete frame (without its newline or
    /// a trailing '\r'; blank lines are skipped). Frames before an over-long one are
    /// still delivered; after an error the framer must not be fed again.
    pub fn push(
        &mut self,
        mut data: &[u8],
        mut on_frame: impl FnMut(&[u8]),
    ) -> Result<(), FrameTooLong> {
        let too_long = FrameTooLong { limit: self.max };
        while let Some(nl) = memchr(b'\n', data) {
            let (head, rest) = (&data[..nl], &data[nl + 1..]);
            data = rest;
            if self.pending.is_empty() {
                // Hot path: a whole frame in one chunk is handed out without copying.
                if head.len() > self.max {
                    return Err(too_long);
                }
                deliver(head, &mut on_frame);
            } else {
                if self.pending.len() + head.len() > self.max {
                    return Err(too_long);
                }
                let mut frame = std::mem::take(&mut self.pending);
                frame.extend_from_slice(head);
                deliver(&frame, &mut on_frame);
                frame.clear();
                self.pending = frame; // keep the allocation for the next partial frame
            }
        }
        if self.pending.len() + data.len() > self.max {
            return Err(too_long);
        }
        self.pending.extend_from_slice(data);
        Ok(())
    }
}

fn deliver(frame: &[u8], on_frame: &mut impl FnMut(&[u8])) {
    let frame = frame.strip_suffix(b"\r").unwrap_or(frame);
    if frame.iter().all(|b| b.is_ascii_whitespace()) {
        return;
    }
    on_frame(frame);
}

fn memchr(needle: u8, hay: &[u8]) -> Option<usize> {
    hay.iter().position(|&b| b == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(f: &mut Framer, data: &[u8]) -> (Vec<Vec<u8>>, Result<(), FrameTooLong>) {
        let mut out = Vec::new();
        let r = f.push(data, |fr| out.push(fr.to_vec()));
        (out, r)
    }

    #[test]
    fn splits_and_reassembles() {
        let mut f = Framer::new(16);
        let (v, r) = collect(&mut f, b"ab\ncd\r\n\n  \nef");
        assert_eq!(v, vec![b"ab".to_vec(), b"cd".to_vec()]);
        assert!(r.is_ok());
        assert_eq!(f.pending_len(), 2);
        let (v, _) = collect(&mut f, b"gh\n");
        assert_eq!(v, vec![b"efgh".to_vec()]);
        assert_eq!(f.pending_len(), 0);
    }

    #[test]
    fn limit_is_inclusive_and_bounds_buffering() {
        let mut f = Framer::new(4);
        let (v, r) = collect(&mut f, b"abcd\n");
        assert_eq!((v.len(), r), (1, Ok(())));
        let (_, r) = collect(&mut f, b"abcde\n");
        assert_eq!(r, Err(FrameTooLong { limit: 4 }));

        // No newline at all: refused as soon as the buffer would pass the limit.
        let mut f = Framer::new(4);
        assert!(collect(&mut f, b"abc").1.is_ok());
        assert!(collect(&mut f, b"de").1.is_err());
        assert!(f.pending_len() <= 4);
    }

    #[test]
    fn frames_before_an_overlong_one_are_delivered() {
        let mut f = Framer::new(3);
        let (v, r) = collect(&mut f, b"ok\ntoolong\n");
        assert_eq!(v, vec![b"ok".to_vec()]);
        assert!(r.is_err());
    }
}
