//! Thin, safe wrappers over the Linux calls the fs service needs to stay beneath its
//! root: openat2 with RESOLVE_BENEATH, and the *at family on directory fds.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

// From linux/openat2.h; the libc crate does not export them for every target.
const RESOLVE_NO_MAGICLINKS: u64 = 0x02;
const RESOLVE_BENEATH: u64 = 0x08;
const RENAME_NOREPLACE: libc::c_uint = 1;

#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

/// Opens `path` relative to `dir`; the kernel refuses any resolution, `..` or symlink
/// (final component included) that would leave `dir`, and any /proc magic link.
pub fn open_beneath(dir: BorrowedFd, path: &CStr, flags: i32, mode: u32) -> io::Result<OwnedFd> {
    let creating = flags & (libc::O_CREAT | libc::O_TMPFILE) != 0;
    let how = OpenHow {
        flags: (flags | libc::O_CLOEXEC) as u64,
        mode: if creating { mode as u64 } else { 0 },
        resolve: RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS,
    };
    let mut tries = 0;
    loop {
        // SAFETY: `path` is NUL-terminated, `how` is a valid open_how of the size given;
        // the kernel only reads both.
        let r = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                dir.as_raw_fd(),
                path.as_ptr(),
                &how as *const OpenHow,
                std::mem::size_of::<OpenHow>(),
            )
        };
        if r >= 0 {
            // SAFETY: the kernel returned a new descriptor that nothing else owns.
            return Ok(unsafe { OwnedFd::from_raw_fd(r as i32) });
        }
        let e = io::Error::last_os_error();
        // EAGAIN: a concurrent rename raced the beneath-check; the kernel asks to retry.
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EAGAIN) if tries < 8 => tries += 1,
            _ => return Err(e),
        }
    }
}

pub fn fstat(fd: BorrowedFd) -> io::Result<libc::stat> {
    // SAFETY: `stat` is plain data, for which all zeroes is a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is a live descriptor and `st` a writable out-buffer fstat fills.
    cvt(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) })?;
    Ok(st)
}

/// lstat of `name` inside `dir` (no symlink following; `name` is one component).
pub fn fstatat_nofollow(dir: BorrowedFd, name: &CStr) -> io::Result<libc::stat> {
    // SAFETY: `stat` is plain data, for which all zeroes is a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `dir` is a live descriptor, `name` is NUL-terminated, and `st` is a
    // writable out-buffer fstatat fills.
    cvt(unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            name.as_ptr(),
            &mut st,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    Ok(st)
}

/// mkdir of one component `name` inside `dir` (never follows a symlink there).
pub fn mkdirat(dir: BorrowedFd, name: &CStr, mode: u32) -> io::Result<()> {
    // SAFETY: `name` is NUL-terminated; the call does not retain it.
    cvt(unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), mode) }).map(|_| ())
}

/// Renames one entry to another, refusing to replace an existing target.
pub fn rename_noreplace(
    from_dir: BorrowedFd,
    from: &CStr,
    to_dir: BorrowedFd,
    to: &CStr,
) -> io::Result<()> {
    // SAFETY: both names are NUL-terminated and only read by the kernel.
    let r = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            from_dir.as_raw_fd(),
            from.as_ptr(),
            to_dir.as_raw_fd(),
            to.as_ptr(),
            RENAME_NOREPLACE,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

pub fn pread(fd: BorrowedFd, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: the pointer and length describe the unfilled tail of `buf`.
        let r = unsafe {
            libc::pread(
                fd.as_raw_fd(),
                buf[done..].as_mut_ptr().cast(),
                buf.len() - done,
                (offset + done as u64) as libc::off_t,
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            break;
        }
        done += r as usize;
    }
    Ok(done)
}

/// Writes all of `buf` at `offset`, or at the end when `offset` is None (O_APPEND fds).
pub fn write_all_at(fd: BorrowedFd, buf: &[u8], offset: Option<u64>) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &buf[done..];
        // SAFETY: the pointer and length describe the unwritten tail of `buf`.
        let r = unsafe {
            match offset {
                Some(o) => libc::pwrite(
                    fd.as_raw_fd(),
                    rest.as_ptr().cast(),
                    rest.len(),
                    (o + done as u64) as libc::off_t,
                ),
                None => libc::write(fd.as_raw_fd(), rest.as_ptr().cast(), rest.len()),
            }
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        done += r as usize;
    }
    Ok(())
}

pub fn ftruncate(fd: BorrowedFd, len: u64) -> io::Result<()> {
    // SAFETY: plain syscall on a descriptor we own.
    cvt(unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) }).map(|_| ())
}

/// Names in a directory (without `.` and `..`), at most `max`; the bool says whether
/// more were left out. Takes an fd opened O_RDONLY|O_DIRECTORY.
pub fn read_dir_names(dir: OwnedFd, max: usize) -> io::Result<(Vec<CString>, bool)> {
    use std::os::fd::IntoRawFd;
    let raw = dir.into_raw_fd();
    // SAFETY: fdopendir takes ownership of `raw` on success; on failure we close it.
    let dp = unsafe { libc::fdopendir(raw) };
    if dp.is_null() {
        let e = io::Error::last_os_error();
        // SAFETY: fdopendir failed, so `raw` is still ours to close.
        unsafe { libc::close(raw) };
        return Err(e);
    }
    let mut names = Vec::new();
    loop {
        // SAFETY: errno is thread-local; clearing it tells end-of-dir from an error.
        unsafe { *libc::__errno_location() = 0 };
        // SAFETY: `dp` is a valid DIR* until closedir below.
        let ent = unsafe { libc::readdir64(dp) };
        if ent.is_null() {
            let e = io::Error::last_os_error();
            // SAFETY: closes the DIR* (and its fd) exactly once.
            unsafe { libc::closedir(dp) };
            if e.raw_os_error().unwrap_or(0) != 0 {
                return Err(e);
            }
            return Ok((names, false));
        }
        // SAFETY: d_name is a NUL-terminated array inside the returned dirent.
        let name = unsafe { CStr::from_ptr((*ent).d_name.as_ptr()) };
        let b = name.to_bytes();
        if b == b"." || b == b".." {
            continue;
        }
        if names.len() == max {
            // SAFETY: closes the DIR* (and its fd) exactly once.
            unsafe { libc::closedir(dp) };
            return Ok((names, true));
        }
        names.push(name.to_owned());
    }
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}
