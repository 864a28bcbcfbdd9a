//! The Linux calls the fs service needs to stay beneath its root, through rustix:
//! openat2 with RESOLVE_BENEATH, and the *at family on directory fds. No unsafe here.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};

use rustix::fs::{AtFlags, Mode, OFlags, RenameFlags, ResolveFlags};

/// `struct stat` as rustix gives it.
pub type Stat = rustix::fs::Stat;

fn err(e: rustix::io::Errno) -> io::Error {
    io::Error::from_raw_os_error(e.raw_os_error())
}

/// Opens `path` relative to `dir`; the kernel refuses any resolution, `..` or symlink
/// (final component included) that would leave `dir`, and any /proc magic link.
pub fn open_beneath(dir: BorrowedFd, path: &CStr, flags: i32, mode: u32) -> io::Result<OwnedFd> {
    let flags = OFlags::from_bits_retain(flags as u32) | OFlags::CLOEXEC;
    let creating = flags.intersects(OFlags::CREATE | OFlags::TMPFILE);
    let mode = if creating {
        Mode::from_bits_truncate(mode)
    } else {
        Mode::empty()
    };
    let resolve = ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS;
    let mut tries = 0;
    loop {
        match rustix::fs::openat2(dir, path, flags, mode, resolve) {
            Ok(fd) => return Ok(fd),
            Err(rustix::io::Errno::INTR) => continue,
            // EAGAIN: a concurrent rename raced the beneath-check; the kernel asks to retry.
            Err(rustix::io::Errno::AGAIN) if tries < 8 => tries += 1,
            Err(e) => return Err(err(e)),
        }
    }
}

pub fn fstat(fd: BorrowedFd) -> io::Result<Stat> {
    rustix::fs::fstat(fd).map_err(err)
}

/// lstat of `name` inside `dir` (no symlink following; `name` is one component).
pub fn fstatat_nofollow(dir: BorrowedFd, name: &CStr) -> io::Result<Stat> {
    rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW).map_err(err)
}

/// mkdir of one component `name` inside `dir` (never follows a symlink there).
pub fn mkdirat(dir: BorrowedFd, name: &CStr, mode: u32) -> io::Result<()> {
    rustix::fs::mkdirat(dir, name, Mode::from_bits_truncate(mode)).map_err(err)
}

/// Renames one entry to another, refusing to replace an existing target.
pub fn rename_noreplace(
    from_dir: BorrowedFd,
    from: &CStr,
    to_dir: BorrowedFd,
    to: &CStr,
) -> io::Result<()> {
    rustix::fs::renameat_with(from_dir, from, to_dir, to, RenameFlags::NOREPLACE).map_err(err)
}

pub fn pread(fd: BorrowedFd, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match rustix::io::pread(fd, &mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(err(e)),
        }
    }
    Ok(done)
}

/// Writes all of `buf` at `offset`, or at the end when `offset` is None (O_APPEND fds).
pub fn write_all_at(fd: BorrowedFd, buf: &[u8], offset: Option<u64>) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &buf[done..];
        let r = match offset {
            Some(o) => rustix::io::pwrite(fd, rest, o + done as u64),
            None => rustix::io::write(fd, rest),
        };
        match r {
            Ok(n) => done += n,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(err(e)),
        }
    }
    Ok(())
}

/// unlink of one component `name` inside `dir` (a file or symlink, never a folder).
pub fn unlinkat_file(dir: BorrowedFd, name: &CStr) -> io::Result<()> {
    rustix::fs::unlinkat(dir, name, AtFlags::empty()).map_err(err)
}

pub fn fsync(fd: BorrowedFd) -> io::Result<()> {
    rustix::fs::fsync(fd).map_err(err)
}

pub fn ftruncate(fd: BorrowedFd, len: u64) -> io::Result<()> {
    rustix::fs::ftruncate(fd, len).map_err(err)
}

/// Names in a directory (without `.` and `..`), at most `max`; the bool says whether
/// more were left out. Takes an fd opened O_RDONLY|O_DIRECTORY.
pub fn read_dir_names(dir: OwnedFd, max: usize) -> io::Result<(Vec<CString>, bool)> {
    let d = rustix::fs::Dir::new(dir).map_err(err)?;
    let mut names = Vec::new();
    for entry in d {
        let entry = entry.map_err(err)?;
        let b = entry.file_name().to_bytes();
        if b == b"." || b == b".." {
            continue;
        }
        if names.len() == max {
            return Ok((names, true));
        }
        names.push(entry.file_name().to_owned());
    }
    Ok((names, false))
}
