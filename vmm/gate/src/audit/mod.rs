//! The audit log: one JSON object per line, chained by HMAC-SHA256 under a per-VM
//! key, written before a call is served. See docs/audit.md for the record format
//! and the guarantees.
//!
//! - `log`    the writer (sequence numbers, chain, fsync policy, fail-closed state)
//! - `redact` what of a call's arguments is written
//! - `verify` chain and sequence checks (`ironvmm audit verify`)
//! - `read`   loading a log for `audit show` and `audit stats`

mod key;
pub mod log;
pub mod read;
pub mod redact;
pub mod verify;

pub use key::{default_key_path, AuditKey, KeyError};
pub use log::{
    AnswerRef, AuditError, AuditLog, DecisionRecord, FailureHook, LearnRecord, OutcomeStatus,
    SyncMode,
};

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// `--audit-budget` unless given: 1 GiB of log per VM.
pub const DEFAULT_AUDIT_BUDGET: u64 = 1 << 30;

/// `prev` of the first record.
pub const ZERO_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Every line ends with this member followed by 64 hex digits and `"}`.
pub(crate) const HASH_MEMBER: &str = ",\"hash\":\"";
/// Length of the `,"hash":"<64 hex>"}` tail of a line.
pub(crate) const HASH_TAIL_LEN: usize = HASH_MEMBER.len() + 64 + 2;

/// The hash of a record: HMAC-SHA256 under the VM's audit key over the line's bytes
/// with the trailing `hash` member removed, i.e. over `{"seq":…,…,"prev":"…"}`.
/// Keyed, so that whoever can write the file but not read the key (the guest, when
/// the log lies in its workspace) cannot rebuild a chain that verifies.
pub(crate) fn record_hash(key: &AuditKey, body_without_hash: &[u8]) -> String {
    // HMAC takes a key of any length: new_from_slice cannot fail here.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key.bytes())
        .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
    mac.update(body_without_hash);
    hex::encode(mac.finalize().into_bytes())
}

/// RFC 3339 in UTC with nanoseconds, e.g. `2026-11-25T07:10:36.123456789Z`.
pub fn rfc3339_ns(secs: i64, nanos: i64) -> String {
    let total = i128::from(secs) * 1_000_000_000 + i128::from(nanos);
    match time::OffsetDateTime::from_unix_timestamp_nanos(total) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:09}Z",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second(),
            t.nanosecond()
        ),
        Err(_) => "1970-01-01T00:00:00.000000000Z".to_string(),
    }
}

/// Now, as `rfc3339_ns`.
pub fn now_rfc3339() -> String {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    rfc3339_ns(d.as_secs() as i64, i64::from(d.subsec_nanos()))
}

/// The documented default location of a VM's log:
/// `$XDG_STATE_HOME/ironvmm/audit/<vm>.jsonl`, else `~/.local/state/ironvmm/audit/<vm>.jsonl`.
pub fn default_path(vm: &str) -> Option<std::path::PathBuf> {
    let base = match std::env::var_os("XDG_STATE_HOME").filter(|v| !v.is_empty()) {
        Some(d) => std::path::PathBuf::from(d),
        None => std::path::PathBuf::from(std::env::var_os("HOME")?).join(".local/state"),
    };
    Some(base.join("ironvmm/audit").join(format!("{vm}.jsonl")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_format_has_nanoseconds() {
        assert_eq!(rfc3339_ns(0, 5), "1970-01-01T00:00:00.000000005Z");
        assert_eq!(
            rfc3339_ns(1_764_054_636, 123_456_789),
            "2025-11-25T07:10:36.123456789Z"
        );
    }
}
