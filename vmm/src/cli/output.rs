//! A command's standard output, ending quietly when the reader has gone away.

use std::fmt;
use std::io::{self, Write};

/// Writes to stdout (the `out!` and `outln!` macros). See [`failed`].
pub fn write(args: fmt::Arguments) {
    let mut stdout = io::stdout().lock();
    if let Err(e) = stdout.write_fmt(args) {
        failed(e)
    }
}

/// Writes bytes to stdout and flushes them. See [`failed`].
pub fn write_all(bytes: &[u8]) {
    let mut stdout = io::stdout().lock();
    if let Err(e) = stdout.write_all(bytes).and_then(|()| stdout.flush()) {
        failed(e)
    }
}

/// Stdout failed. A broken pipe means the reader (`head`, a pager) has all it wants:
/// exit 0 without a word, as ripgrep does. Anything else (a full disk) is an error.
pub fn failed(e: io::Error) -> ! {
    if e.kind() == io::ErrorKind::BrokenPipe {
        std::process::exit(0);
    }
    eprintln!("ironvmm: writing to stdout: {e}");
    std::process::exit(crate::exit::VMM_ERROR.into())
}
