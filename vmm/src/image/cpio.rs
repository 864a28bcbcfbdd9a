//! The cpio "newc" format the kernel unpacks into its initramfs: a writer and a
//! bounds-checked parser (used to validate images and by the tests).
//!
//! Each entry is a 110-byte ASCII header, the NUL-terminated name padded to 4
//! bytes, then the data padded to 4 bytes; `TRAILER!!!` ends the archive.

use std::io::{self, Write};

pub const MAGIC: &[u8; 6] = b"070701";
/// The same format with a checksum field; the kernel reads both.
pub const MAGIC_CRC: &[u8; 6] = b"070702";
pub const HEADER_LEN: usize = 110;
pub const TRAILER: &str = "TRAILER!!!";
/// Archives are padded to this, like GNU cpio does, so they concatenate cleanly.
pub const BLOCK: usize = 512;

pub const S_IFMT: u32 = 0o170000;
pub const S_IFDIR: u32 = 0o040000;
pub const S_IFREG: u32 = 0o100000;
pub const S_IFLNK: u32 = 0o120000;
pub const S_IFCHR: u32 = 0o020000;

/// What one entry is, with what its type needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File(Vec<u8>),
    Symlink(Vec<u8>),
    CharDev { major: u32, minor: u32 },
}

/// Writes entries in the order given; the caller puts directories first.
pub struct Writer<W: Write> {
    out: W,
    written: u64,
    next_ino: u32,
}

impl<W: Write> Writer<W> {
    pub fn new(out: W) -> Self {
        Writer {
            out,
            written: 0,
            next_ino: 1,
        }
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.written
    }

    pub fn is_empty(&self) -> bool {
        self.written == 0
    }

    /// `name` is relative to the archive root, without a leading `/`.
    /// `perm` holds the permission bits; the type bits come from `kind`.
    pub fn entry(&mut self, name: &[u8], perm: u32, mtime: u32, kind: &Kind) -> io::Result<()> {
        let (ty, data, nlink, rdev): (u32, &[u8], u32, (u32, u32)) = match kind {
            Kind::Dir => (S_IFDIR, &[], 2, (0, 0)),
            Kind::File(d) => (S_IFREG, d, 1, (0, 0)),
            Kind::Symlink(t) => (S_IFLNK, t, 1, (0, 0)),
            Kind::CharDev { major, minor } => (S_IFCHR, &[], 1, (*major, *minor)),
        };
        let ino = self.next_ino;
        self.next_ino += 1;
        self.raw(name, ty | (perm & 0o7777), nlink, data, rdev, ino, mtime)
    }

    /// Writes the trailer and pads to [`BLOCK`]; returns the writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.raw(TRAILER.as_bytes(), 0, 1, &[], (0, 0), 0, 0)?;
        let pad = (BLOCK - (self.written % BLOCK as u64) as usize) % BLOCK;
        self.put(&vec![0u8; pad])?;
        self.out.flush()?;
        Ok(self.out)
    }

    #[allow(clippy::too_many_arguments)]
    fn raw(
        &mut self,
        name: &[u8],
        mode: u32,
        nlink: u32,
        data: &[u8],
        rdev: (u32, u32),
        ino: u32,
        mtime: u32,
    ) -> io::Result<()> {
        if name.is_empty() || name.contains(&0) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "cpio: invalid entry name {:?}",
                    String::from_utf8_lossy(name)
                ),
            ));
        }
        let size = u32::try_from(data.len()).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "cpio: {} is {} bytes; newc holds at most 4 GiB per file",
                    String::from_utf8_lossy(name),
                    data.len()
                ),
            )
        })?;
        let namesize = name.len() as u32 + 1;
        let header = format!(
            "070701{ino:08X}{mode:08X}{uid:08X}{gid:08X}{nlink:08X}{mtime:08X}{size:08X}\
             {dmaj:08X}{dmin:08X}{rmaj:08X}{rmin:08X}{namesize:08X}{check:08X}",
            uid = 0,
            gid = 0,
            dmaj = 0,
            dmin = 0,
            rmaj = rdev.0,
            rmin = rdev.1,
            check = 0,
        );
        debug_assert_eq!(header.len(), HEADER_LEN);
        self.put(header.as_bytes())?;
        self.put(name)?;
        self.put(&[0])?;
        self.pad4()?;
        self.put(data)?;
        self.pad4()
    }

    fn put(&mut self, b: &[u8]) -> io::Result<()> {
        self.out.write_all(b)?;
        self.written += b.len() as u64;
        Ok(())
    }

    fn pad4(&mut self) -> io::Result<()> {
        let pad = (4 - (self.written % 4) as usize) % 4;
        self.put(&[0u8; 3][..pad])
    }
}

/// One entry read back from an archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: Vec<u8>,
    pub mode: u32,
    pub ino: u32,
    pub nlink: u32,
    pub mtime: u32,
    pub rdev_major: u32,
    pub rdev_minor: u32,
    /// Data size from the header (also when `data` was not kept).
    pub size: u32,
    /// Byte offset of the header in the buffer.
    pub offset: usize,
    pub data: Vec<u8>,
}

impl Entry {
    pub fn name_str(&self) -> String {
        String::from_utf8_lossy(&self.name).into_owned()
    }
}

/// What is wrong with an archive, and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("cpio: truncated at byte {0}")]
    Truncated(usize),
    #[error("cpio: bad magic at byte {0} (not a newc archive)")]
    BadMagic(usize),
    #[error("cpio: bad header field {field} at byte {offset}")]
    BadField { field: &'static str, offset: usize },
    #[error("cpio: entry at byte {0} has a name that is not NUL-terminated")]
    BadName(usize),
    #[error("cpio: no TRAILER!!! entry")]
    NoTrailer,
    #[error("cpio: non-zero bytes after the trailer at byte {0}")]
    TrailingGarbage(usize),
}

const FIELDS: [&str; 13] = [
    "ino",
    "mode",
    "uid",
    "gid",
    "nlink",
    "mtime",
    "filesize",
    "devmajor",
    "devminor",
    "rdevmajor",
    "rdevminor",
    "namesize",
    "check",
];

/// Parses a whole archive up to its trailer. Only zero padding may follow it.
/// `keep_data` false skips copying file contents (for validation).
pub fn parse(buf: &[u8], keep_data: bool) -> Result<Vec<Entry>, ParseError> {
    let mut entries = Vec::new();
    let mut pos = 0usize;
    loop {
        let start = pos;
        let header = buf
            .get(pos..pos + HEADER_LEN)
            .ok_or(ParseError::Truncated(buf.len()))?;
        if &header[..6] != MAGIC && &header[..6] != MAGIC_CRC {
            return Err(ParseError::BadMagic(pos));
        }
        let mut f = [0u32; 13];
        for (i, v) in f.iter_mut().enumerate() {
            let hex = &header[6 + 8 * i..14 + 8 * i];
            *v = std::str::from_utf8(hex)
                .ok()
                .and_then(|s| u32::from_str_radix(s, 16).ok())
                .ok_or(ParseError::BadField {
                    field: FIELDS[i],
                    offset: start,
                })?;
        }
        let [ino, mode, _uid, _gid, nlink, mtime, size, _, _, rmaj, rmin, namesize, _] = f;
        pos += HEADER_LEN;
        let namesize = namesize as usize;
        let name = buf
            .get(pos..pos + namesize)
            .ok_or(ParseError::Truncated(buf.len()))?;
        if namesize == 0 || name[namesize - 1] != 0 || name[..namesize - 1].contains(&0) {
            return Err(ParseError::BadName(start));
        }
        let name = name[..namesize - 1].to_vec();
        pos = align4(pos + namesize);
        let size_u32 = size;
        let size = size as usize;
        let data = buf
            .get(pos..pos + size)
            .ok_or(ParseError::Truncated(buf.len()))?;
        let data = if keep_data { data.to_vec() } else { Vec::new() };
        pos = align4(pos + size);
        if name == TRAILER.as_bytes() {
            let rest = buf.get(pos.min(buf.len())..).unwrap_or(&[]);
            if let Some(i) = rest.iter().position(|&b| b != 0) {
                return Err(ParseError::TrailingGarbage(pos + i));
            }
            return Ok(entries);
        }
        entries.push(Entry {
            name,
            mode,
            ino,
            nlink,
            mtime,
            rdev_major: rmaj,
            rdev_minor: rmin,
            size: size_u32,
            offset: start,
            data,
        });
        if pos >= buf.len() {
            return Err(ParseError::NoTrailer);
        }
    }
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_is_110_bytes_and_aligned() {
        let mut w = Writer::new(Vec::new());
        w.entry(b"a", 0o644, 0, &Kind::File(b"xyz".to_vec()))
            .unwrap();
        let out = w.finish().unwrap();
        assert_eq!(&out[..6], MAGIC);
        // header + "a\0" = 112, data 3 -> padded to 116, then the trailer.
        assert_eq!(&out[116..122], MAGIC);
        assert_eq!(out.len() % BLOCK, 0);
    }
}
