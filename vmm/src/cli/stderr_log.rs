//! Where the `log` records of ironvmm's own crates go: one line each on stderr, in
//! the CLI's voice (`ironvmm: warning: ...`). Without a logger installed, `log`
//! drops every record, and with them the devices' and the gate's warnings (a worker
//! that panicked, an MCP server restarting, a guest poking the vsock's config).
//!
//! Hand-written rather than `env_logger`: a record may come from any thread,
//! including the device and vCPU threads under their seccomp filters, and this one
//! only ever formats into memory and makes one `write(2)` to fd 2 (and a `futex`
//! when stderr's lock is contended), which every thread's filter allows
//! (docs/seccomp.md). One write per record also keeps lines
//! from different threads whole.

use std::io::Write;

use log::{Level, LevelFilter, Log, Metadata, Record};

/// The environment variable that sets the level.
pub const LEVEL_VAR: &str = "IRONVMM_LOG";

/// The level when `IRONVMM_LOG` is unset.
const DEFAULT: LevelFilter = LevelFilter::Warn;

struct StderrLog;

static LOGGER: StderrLog = StderrLog;

impl Log for StderrLog {
    fn enabled(&self, m: &Metadata) -> bool {
        m.level() <= log::max_level()
    }

    fn log(&self, r: &Record) {
        if self.enabled(r.metadata()) {
            let line = format_line(r.level(), r.args());
            // Nothing to do if stderr is gone; the record is lost either way.
            let _ = std::io::stderr().write_all(line.as_bytes());
        }
    }

    fn flush(&self) {}
}

fn format_line(level: Level, msg: &std::fmt::Arguments) -> String {
    let word = match level {
        Level::Error => "error",
        Level::Warn => "warning",
        Level::Info => "info",
        Level::Debug => "debug",
        Level::Trace => "trace",
    };
    format!("ironvmm: {word}: {msg}\n")
}

/// Why `IRONVMM_LOG` was not used.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("{LEVEL_VAR}={0:?} is not a level (off, error, warn, info, debug or trace); using warn")]
pub struct BadLevel(String);

/// The level `value` (of `IRONVMM_LOG`, if set) names.
pub fn parse_level(value: Option<&str>) -> Result<LevelFilter, BadLevel> {
    match value.map(str::trim) {
        None | Some("") => Ok(DEFAULT),
        Some(v) => v.parse().map_err(|_| BadLevel(v.to_string())),
    }
}

/// Installs the logger at the level `IRONVMM_LOG` sets. Called once, first thing in
/// `main`; a second call (a test harness that already has one) leaves it be.
pub fn install() {
    let value = std::env::var(LEVEL_VAR).ok();
    let level = parse_level(value.as_deref()).unwrap_or_else(|e| {
        eprintln!("ironvmm: warning: {e}");
        DEFAULT
    });
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(level);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_parse_and_default_to_warn() {
        assert_eq!(parse_level(None), Ok(LevelFilter::Warn));
        assert_eq!(parse_level(Some("")), Ok(LevelFilter::Warn));
        assert_eq!(parse_level(Some("debug")), Ok(LevelFilter::Debug));
        assert_eq!(parse_level(Some("OFF")), Ok(LevelFilter::Off));
        let e = parse_level(Some("loud")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "IRONVMM_LOG=\"loud\" is not a level (off, error, warn, info, debug or trace); using warn"
        );
    }

    #[test]
    fn a_record_is_one_line_in_the_cli_voice() {
        assert_eq!(
            format_line(Level::Warn, &format_args!("vsock: queue {} unusable", 1)),
            "ironvmm: warning: vsock: queue 1 unusable\n"
        );
        assert_eq!(
            format_line(Level::Error, &format_args!("x")),
            "ironvmm: error: x\n"
        );
    }
}
