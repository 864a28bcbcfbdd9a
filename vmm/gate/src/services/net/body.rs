//! Message bodies: where one ends (RFC 9112 6), and copying it across with framing
//! the host writes itself. A chunked body is decoded and encoded again, so the
//! receiver sees only chunk lines the host made: a sender and a receiver that read
//! the framing differently (request smuggling) never meet.

use std::io::{self, BufRead, Read, Write};

use super::head::Headers;

/// Most bytes of a chunk-size line, and of all trailer lines together.
const MAX_CHUNK_LINE: usize = 4096;
const MAX_TRAILERS: usize = 16 * 1024;
/// Bytes copied per read.
const COPY_BUF: usize = 16 * 1024;

/// How a body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body.
    Empty,
    Length(u64),
    Chunked,
    /// Until the sender closes (responses only).
    UntilClose,
}

/// Why a body could not be framed or copied.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("Content-Length and Transfer-Encoding together")]
    Ambiguous,
    #[error("Content-Length {0:?} is not one number")]
    BadLength(String),
    #[error("Transfer-Encoding {0:?}: only chunked is supported")]
    BadCoding(String),
    #[error("bad chunk: {0}")]
    BadChunk(&'static str),
    #[error("the body ended early")]
    Truncated,
    /// Reading the sender failed (a timeout, a reset).
    #[error("{0}")]
    Read(io::Error),
    /// Writing to the receiver failed.
    #[error("{0}")]
    Write(io::Error),
    /// The `on_data` hook refused more bytes (a budget).
    #[error("{0}")]
    Refused(String),
}

/// `Content-Length` values, which must all agree.
fn content_length(h: &Headers) -> Result<Option<u64>, BodyError> {
    let mut found: Option<u64> = None;
    for v in h.all("content-length") {
        for part in v.split(',') {
            let part = part.trim();
            let n = (!part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()))
                .then(|| part.parse::<u64>().ok())
                .flatten()
                .ok_or_else(|| BodyError::BadLength(v.to_string()))?;
            if found.is_some_and(|f| f != n) {
                return Err(BodyError::BadLength(v.to_string()));
            }
            found = Some(n);
        }
    }
    Ok(found)
}

/// The framing of a request body.
pub fn request_framing(h: &Headers) -> Result<Framing, BodyError> {
    let te: Vec<&str> = h.all("transfer-encoding").collect();
    let cl = content_length(h)?;
    if !te.is_empty() {
        if cl.is_some() {
            return Err(BodyError::Ambiguous);
        }
        let joined = te.join(",");
        if te.len() != 1 || !joined.trim().eq_ignore_ascii_case("chunked") {
            return Err(BodyError::BadCoding(joined));
        }
        return Ok(Framing::Chunked);
    }
    Ok(match cl {
        Some(0) | None => Framing::Empty,
        Some(n) => Framing::Length(n),
    })
}

/// The framing of a response body to a request of `method`.
pub fn response_framing(method: &str, status: u16, h: &Headers) -> Result<Framing, BodyError> {
    if method.eq_ignore_ascii_case("HEAD") || status < 200 || status == 204 || status == 304 {
        return Ok(Framing::Empty);
    }
    let te: Vec<&str> = h.all("transfer-encoding").collect();
    if !te.is_empty() {
        let last = te
            .join(",")
            .rsplit(',')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase();
        // A final coding other than chunked: the body runs until the close.
        return Ok(if last == "chunked" {
            Framing::Chunked
        } else {
            Framing::UntilClose
        });
    }
    Ok(match content_length(h)? {
        Some(0) => Framing::Empty,
        Some(n) => Framing::Length(n),
        None => Framing::UntilClose,
    })
}

/// How the copy is written: `Chunked` encodes, `Raw` writes the data as is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encode {
    Chunked,
    Raw,
}

/// Copies one body from `src` to `dst`, decoding `framing` and writing `encode`.
/// `on_data` sees each piece of data before it is written and may refuse it.
/// Returns the data bytes copied.
pub fn copy_body<R: BufRead, W: Write>(
    framing: Framing,
    encode: Encode,
    src: &mut R,
    dst: &mut W,
    on_data: impl FnMut(usize) -> Result<(), String>,
) -> Result<u64, BodyError> {
    let mut c = Copier {
        buf: vec![0u8; COPY_BUF],
        encode,
        on_data,
        total: 0,
    };
    match framing {
        Framing::Empty => {}
        Framing::Length(n) => c.exact(n, src, dst)?,
        Framing::UntilClose => while c.some(src, dst)? {},
        Framing::Chunked => loop {
            let size = chunk_size(src)?;
            if size == 0 {
                skip_trailers(src)?;
                break;
            }
            c.exact(size, src, dst)?;
            let mut crlf = [0u8; 2];
            src.read_exact(&mut crlf).map_err(|e| match e.kind() {
                io::ErrorKind::UnexpectedEof => BodyError::Truncated,
                _ => BodyError::Read(e),
            })?;
            if &crlf != b"\r\n" {
                return Err(BodyError::BadChunk("no CRLF after the chunk data"));
            }
        },
    }
    if encode == Encode::Chunked {
        dst.write_all(b"0\r\n\r\n").map_err(BodyError::Write)?;
    }
    dst.flush().map_err(BodyError::Write)?;
    Ok(c.total)
}

struct Copier<F> {
    buf: Vec<u8>,
    encode: Encode,
    on_data: F,
    total: u64,
}

impl<F: FnMut(usize) -> Result<(), String>> Copier<F> {
    /// Copies what one read gives; false at the end of `src`.
    fn some<R: Read, W: Write>(&mut self, src: &mut R, dst: &mut W) -> Result<bool, BodyError> {
        let got = src.read(&mut self.buf).map_err(BodyError::Read)?;
        if got == 0 {
            return Ok(false);
        }
        self.piece(got, dst)?;
        Ok(true)
    }

    /// Copies exactly `n` bytes.
    fn exact<R: Read, W: Write>(
        &mut self,
        n: u64,
        src: &mut R,
        dst: &mut W,
    ) -> Result<(), BodyError> {
        let mut left = n;
        while left > 0 {
            let want = left.min(self.buf.len() as u64) as usize;
            let got = src.read(&mut self.buf[..want]).map_err(BodyError::Read)?;
            if got == 0 {
                return Err(BodyError::Truncated);
            }
            self.piece(got, dst)?;
            left -= got as u64;
        }
        Ok(())
    }

    fn piece<W: Write>(&mut self, len: usize, dst: &mut W) -> Result<(), BodyError> {
        (self.on_data)(len).map_err(BodyError::Refused)?;
        let data = &self.buf[..len];
        if self.encode == Encode::Chunked {
            write!(dst, "{len:x}\r\n").map_err(BodyError::Write)?;
        }
        dst.write_all(data).map_err(BodyError::Write)?;
        if self.encode == Encode::Chunked {
            dst.write_all(b"\r\n").map_err(BodyError::Write)?;
        }
        self.total += len as u64;
        Ok(())
    }
}

/// Reads a line of at most `max` bytes, without its line end.
fn line<R: BufRead>(src: &mut R, max: usize) -> Result<Vec<u8>, BodyError> {
    let mut l = Vec::new();
    <&mut R as Read>::take(src, max as u64 + 1)
        .read_until(b'\n', &mut l)
        .map_err(BodyError::Read)?;
    if l.len() > max {
        return Err(BodyError::BadChunk("a chunk line over 4 KiB"));
    }
    if !l.ends_with(b"\n") {
        return Err(BodyError::Truncated);
    }
    l.pop();
    if l.last() == Some(&b'\r') {
        l.pop();
    }
    Ok(l)
}

/// `HEX[;ext]`: the size of the next chunk (extensions are dropped).
fn chunk_size<R: BufRead>(src: &mut R) -> Result<u64, BodyError> {
    let l = line(src, MAX_CHUNK_LINE)?;
    let size = l.split(|&b| b == b';').next().unwrap_or_default();
    let size = std::str::from_utf8(size)
        .ok()
        .map(|s| s.trim_end_matches([' ', '\t']))
        .filter(|s| !s.is_empty() && s.len() <= 16 && s.bytes().all(|b| b.is_ascii_hexdigit()))
        .and_then(|s| u64::from_str_radix(s, 16).ok())
        .ok_or(BodyError::BadChunk("the size is not hex"))?;
    if l.iter().any(|&b| b < 0x20 && b != b'\t') {
        return Err(BodyError::BadChunk("a control character in the size line"));
    }
    Ok(size)
}

/// Trailer fields after the last chunk are read and dropped.
fn skip_trailers<R: BufRead>(src: &mut R) -> Result<(), BodyError> {
    let mut seen = 0;
    loop {
        let l = line(src, MAX_CHUNK_LINE)?;
        if l.is_empty() {
            return Ok(());
        }
        seen += l.len();
        if seen > MAX_TRAILERS {
            return Err(BodyError::BadChunk("trailers over 16 KiB"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::net::head::Header;

    fn h(pairs: &[(&str, &str)]) -> Headers {
        Headers(
            pairs
                .iter()
                .map(|(n, v)| Header {
                    name: n.to_string(),
                    value: v.to_string(),
                })
                .collect(),
        )
    }

    fn copy(framing: Framing, encode: Encode, input: &[u8]) -> Result<(Vec<u8>, u64), BodyError> {
        let mut out = Vec::new();
        let n = copy_body(framing, encode, &mut &input[..], &mut out, |_| Ok(()))?;
        Ok((out, n))
    }

    #[test]
    fn framing_of_requests_refuses_ambiguity() {
        assert_eq!(request_framing(&h(&[])).unwrap(), Framing::Empty);
        assert_eq!(
            request_framing(&h(&[("Content-Length", "5")])).unwrap(),
            Framing::Length(5)
        );
        assert_eq!(
            request_framing(&h(&[("Content-Length", "5"), ("content-length", "5")])).unwrap(),
            Framing::Length(5)
        );
        assert_eq!(
            request_framing(&h(&[("Transfer-Encoding", "Chunked")])).unwrap(),
            Framing::Chunked
        );
        for bad in [
            h(&[("Content-Length", "5"), ("Content-Length", "6")]),
            h(&[("Content-Length", "+5")]),
            h(&[("Content-Length", "5"), ("Transfer-Encoding", "chunked")]),
            h(&[("Transfer-Encoding", "gzip, chunked")]),
            h(&[
                ("Transfer-Encoding", "chunked"),
                ("Transfer-Encoding", "chunked"),
            ]),
        ] {
            assert!(request_framing(&bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            response_framing("GET", 200, &h(&[])).unwrap(),
            Framing::UntilClose
        );
        assert_eq!(
            response_framing("HEAD", 200, &h(&[("Content-Length", "9")])).unwrap(),
            Framing::Empty
        );
    }

    #[test]
    fn chunked_bodies_are_decoded_and_encoded_again() {
        let input = b"3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nX-T: 1\r\n\r\nNEXT";
        let (out, n) = copy(Framing::Chunked, Encode::Raw, input).unwrap();
        assert_eq!((out.as_slice(), n), (&b"abcde"[..], 5));
        let (out, _) = copy(Framing::Chunked, Encode::Chunked, input).unwrap();
        assert_eq!(out, b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n");
        let (out, _) = copy(Framing::Length(4), Encode::Raw, b"abcdef").unwrap();
        assert_eq!(out, b"abcd");
        for bad in [
            &b"zz\r\nab\r\n0\r\n\r\n"[..],
            b"2\r\nabXX0\r\n\r\n",
            b"5\r\nab",
            b"ffffffffffffffffff\r\n",
        ] {
            assert!(copy(Framing::Chunked, Encode::Raw, bad).is_err());
        }
        assert!(matches!(
            copy(Framing::Length(10), Encode::Raw, b"abc"),
            Err(BodyError::Truncated)
        ));
    }
}
