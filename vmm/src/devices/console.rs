//! Where the guest's serial output goes, made safe for a terminal, and the tail of
//! it kept so a crash can be explained in one line.

use std::collections::VecDeque;
use std::io::{self, Write};

/// Keeps what a terminal shows harmlessly: text, newlines, tabs, backspace, and
/// SGR colour sequences. Drops every other escape sequence (cursor moves, title and
/// clipboard OSC strings, device queries that make the terminal answer) and other
/// C0 controls, so a hostile guest cannot drive the user's terminal.
#[derive(Debug, Default)]
pub struct EscapeFilter {
    state: FilterState,
    csi: Vec<u8>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum FilterState {
    #[default]
    Text,
    Escape,
    Csi,
    /// A CSI too long to be a colour: swallowed up to its final byte.
    CsiDrop,
    /// OSC, DCS, SOS, PM, APC: swallowed up to BEL or ST.
    String,
    StringEscape,
}

const CSI_MAX: usize = 32;

impl EscapeFilter {
    pub fn filter(&mut self, input: &[u8], out: &mut Vec<u8>) {
        for &b in input {
            match self.state {
                FilterState::Text => match b {
                    0x1b => self.state = FilterState::Escape,
                    b'\n' | b'\r' | b'\t' | 0x08 => out.push(b),
                    0x00..=0x1f | 0x7f => {}
                    _ => out.push(b),
                },
                FilterState::Escape => {
                    self.state = match b {
                        b'[' => {
                            self.csi.clear();
                            FilterState::Csi
                        }
                        b']' | b'P' | b'X' | b'^' | b'_' => FilterState::String,
                        _ => FilterState::Text,
                    }
                }
                FilterState::Csi => {
                    if (0x40..=0x7e).contains(&b) {
                        if b == b'm' && self.csi.iter().all(|c| c.is_ascii_digit() || *c == b';') {
                            out.extend_from_slice(b"\x1b[");
                            out.extend_from_slice(&self.csi);
                            out.push(b'm');
                        }
                        self.state = FilterState::Text;
                    } else if self.csi.len() < CSI_MAX {
                        self.csi.push(b);
                    } else {
                        self.state = FilterState::CsiDrop;
                    }
                }
                FilterState::CsiDrop => {
                    if (0x40..=0x7e).contains(&b) {
                        self.state = FilterState::Text;
                    }
                }
                FilterState::String => match b {
                    0x07 => self.state = FilterState::Text,
                    0x1b => self.state = FilterState::StringEscape,
                    _ => {}
                },
                FilterState::StringEscape => {
                    self.state = if b == b'\\' {
                        FilterState::Text
                    } else {
                        FilterState::String
                    }
                }
            }
        }
    }
}

const TAIL_BYTES: usize = 4096;

/// The serial port's output: filtered when it is a terminal, buffered so one
/// PIO exit per byte does not become one write(2) per byte, and with a tail.
pub struct ConsoleOut {
    sink: Option<Box<dyn Write + Send>>,
    filter: Option<EscapeFilter>,
    pending: Vec<u8>,
    scratch: Vec<u8>,
    tail: VecDeque<u8>,
}

impl ConsoleOut {
    /// `sink` None discards output (`--console off`); the tail is kept regardless.
    pub fn new(sink: Option<Box<dyn Write + Send>>, filter_escapes: bool) -> Self {
        ConsoleOut {
            sink,
            filter: filter_escapes.then(EscapeFilter::default),
            pending: Vec::with_capacity(4096),
            scratch: Vec::new(),
            tail: VecDeque::with_capacity(TAIL_BYTES),
        }
    }

    /// The last lines the guest printed, lossily decoded.
    pub fn tail(&self) -> String {
        let (a, b) = self.tail.as_slices();
        String::from_utf8_lossy(&[a, b].concat()).into_owned()
    }

    /// The guest panicked if its last words say so; this returns that line.
    pub fn panic_line(&self) -> Option<String> {
        self.tail()
            .lines()
            .find(|l| l.contains("Kernel panic"))
            .map(|l| l.trim().to_string())
    }

    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }
}

impl Write for ConsoleOut {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        for &b in buf {
            if self.tail.len() == TAIL_BYTES {
                self.tail.pop_front();
            }
            self.tail.push_back(b);
        }
        if self.sink.is_none() {
            return Ok(buf.len());
        }
        match &mut self.filter {
            Some(f) => {
                self.scratch.clear();
                f.filter(buf, &mut self.scratch);
                self.pending.extend_from_slice(&self.scratch);
            }
            None => self.pending.extend_from_slice(buf),
        }
        if buf.contains(&b'\n') || self.pending.len() >= 4096 {
            self.flush()?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if let Some(sink) = &mut self.sink {
            if !self.pending.is_empty() {
                // A console that stopped accepting output must not stop the guest.
                let _ = sink.write_all(&self.pending);
                let _ = sink.flush();
            }
        }
        self.pending.clear();
        Ok(())
    }
}

impl ConsoleOut {
    /// Flushes buffered console output (named so it reads clearly at call sites).
    pub fn flush_console(&mut self) -> std::io::Result<()> {
        std::io::Write::flush(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    fn filtered(input: &[u8]) -> Vec<u8> {
        let mut f = EscapeFilter::default();
        let mut out = Vec::new();
        f.filter(input, &mut out);
        out
    }

    #[test]
    fn text_and_colours_pass() {
        assert_eq!(filtered(b"hello\r\n\tworld"), b"hello\r\n\tworld");
        assert_eq!(filtered(b"\x1b[1;31mred\x1b[0m"), b"\x1b[1;31mred\x1b[0m");
        assert_eq!(filtered("héllo ✓".as_bytes()), "héllo ✓".as_bytes());
    }

    #[test]
    fn dangerous_sequences_are_dropped() {
        // window title, clipboard write, cursor move, screen clear, device query, bell
        assert_eq!(filtered(b"a\x1b]0;pwned\x07b"), b"ab");
        assert_eq!(filtered(b"a\x1b]52;c;ZXZpbA==\x1b\\b"), b"ab");
        assert_eq!(filtered(b"a\x1b[2J\x1b[H\x1b[6nb"), b"ab");
        assert_eq!(filtered(b"a\x07\x00\x7fb"), b"ab");
        assert_eq!(filtered(b"a\x1bPq#0;2;0;0;0\x1b\\b"), b"ab");
        // an endless CSI does not grow memory and ends the sequence
        let long: Vec<u8> = b"\x1b["
            .iter()
            .copied()
            .chain(std::iter::repeat_n(b'1', 10_000))
            .chain(b"mz".iter().copied())
            .collect();
        assert_eq!(filtered(&long), b"z");
    }

    #[test]
    fn split_sequences_are_still_filtered() {
        let mut f = EscapeFilter::default();
        let mut out = Vec::new();
        for b in b"x\x1b]0;ti".iter().chain(b"tle\x07y".iter()) {
            f.filter(&[*b], &mut out);
        }
        assert_eq!(out, b"xy");
    }

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn output_is_line_buffered_and_tail_finds_a_panic() {
        let sink = Shared::default();
        let mut c = ConsoleOut::new(Some(Box::new(sink.clone())), false);
        c.write_all(b"abc").unwrap();
        assert!(sink.0.lock().unwrap().is_empty());
        assert!(c.has_pending());
        c.write_all(b"\nKernel panic - not syncing: oops\n")
            .unwrap();
        assert_eq!(&sink.0.lock().unwrap()[..4], b"abc\n");
        assert_eq!(c.panic_line().unwrap(), "Kernel panic - not syncing: oops");
        let mut off = ConsoleOut::new(None, true);
        off.write_all(&vec![b'x'; 10_000]).unwrap();
        assert_eq!(off.tail().len(), TAIL_BYTES);
    }
}
