//! The audit log writer.
//!
//! Each record is written with one `write` to an O_APPEND file under a mutex that
//! also owns the sequence number and the chain head. fsync happens outside that
//! mutex, and one fsync covers every record written before it (group commit), so
//! concurrent connections share fsyncs instead of queueing behind each other.
//!
//! Fail closed: the first write or fsync error is remembered for good; every later
//! append is refused, and the gate denies every call and reports the condition.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ironvmm_policy::{DecidedBy, Verdict};
use serde_json::{Map, Value};

use super::redact::{bound, redact};
use super::{default_key_path, now_rfc3339, record_hash, AuditKey, KeyError, ZERO_HASH};

/// `detail` of the outcome of an allowed call whose decision record could not be
/// synced (`always` mode): the call was denied and never served.
pub const NOT_DURABLE: &str = "not served: the decision record could not be synced";

/// Longest guest-chosen name (tool, string rpc_id) written as is; longer ones keep a
/// prefix, their length and their SHA-256.
pub const MAX_LOGGED_NAME: usize = 256;
/// Longest `reason` written as is (an invariant's reason can quote the guest).
pub const MAX_LOGGED_REASON: usize = 2048;

/// Room kept in the audit budget for the close record.
pub const CLOSE_RESERVE: u64 = 4096;

/// Longest a record may wait for its fsync in `batch` mode.
pub const BATCH_INTERVAL: Duration = Duration::from_millis(10);

/// `--audit-sync`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMode {
    /// fsync before every service call (the default).
    Always,
    /// Write before every call; fsync at most every 10 ms and at close.
    Batch,
}

impl std::str::FromStr for SyncMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "always" => Ok(SyncMode::Always),
            "batch" => Ok(SyncMode::Batch),
            _ => Err(format!("expected always or batch, not {s:?}")),
        }
    }
}

impl SyncMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SyncMode::Always => "always",
            SyncMode::Batch => "batch",
        }
    }
}

/// Why the log could not be created, or can no longer be written. Each message
/// names the file and the cause.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit log {}: cannot create its folder: {source}", path.display())]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file could not be created; an existing file is never reused (one log is
    /// one hash chain from seq 0).
    #[error("audit log {}: {source}{}", path.display(), if source.kind() == std::io::ErrorKind::AlreadyExists { " (a log is one hash chain: give a new file)" } else { "" })]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Key(#[from] KeyError),
    #[error("audit log {}: cannot start its flusher: {source}", path.display())]
    Flusher {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A write, fsync or encoding failed. The log remembers the first failure for
    /// good and answers every later append with it (the gate then denies every call).
    #[error("{0}")]
    Failed(String),
    /// The `--audit-budget` is spent; only `close` may still be written.
    #[error("{0}")]
    Exhausted(String),
    #[error("audit log {}: already closed", .0.display())]
    Closed(PathBuf),
}

/// A `learn` record: which answer became which rule.
#[derive(Debug, Clone, Copy)]
pub struct LearnRecord<'a> {
    /// The `seq` of the asked call's decision record.
    pub ask_seq: u64,
    /// `allow` or `deny`.
    pub decision: &'a str,
    /// `exact`, `value` or `tool`.
    pub scope: &'a str,
    pub rule: &'a str,
    /// The line of the `ask` rule it refines.
    pub refines: u32,
    /// The learned-rules file it was written to.
    pub file: &'a str,
    pub channel: &'a str,
    pub who: Option<&'a str>,
    /// Scenarios whose decision the owner agreed to change.
    pub confirmed_conflicts: usize,
}

/// What a `decision` record holds (docs/audit.md "Records").
pub struct DecisionRecord<'a> {
    pub conn: &'a str,
    pub rpc_id: &'a Value,
    pub tool: &'a str,
    /// The arguments as decided; the log redacts them.
    pub args: &'a Value,
    /// `allow` or `deny`; `ask` for the record written when an asked call is parked.
    pub decision: Verdict,
    /// This record is the answer to an ask (and names it in `ask`).
    pub asked: bool,
    /// The answer to an ask: the `seq` of its `ask` record, the channel it came
    /// through and who gave it.
    pub answer: Option<AnswerRef<'a>>,
    pub rule: Option<u32>,
    pub decided_by: DecidedBy,
    pub reason: &'a str,
    pub policy_ns: u64,
}

/// Where the answer to an ask came from (a `decision` record's `ask_seq`, `channel`, `who`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AnswerRef<'a> {
    pub ask_seq: u64,
    pub channel: &'a str,
    pub who: Option<&'a str>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutcomeStatus {
    Ok,
    ToolError,
    Error,
}

impl OutcomeStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            OutcomeStatus::Ok => "ok",
            OutcomeStatus::ToolError => "tool_error",
            OutcomeStatus::Error => "error",
        }
    }
}

#[derive(Default)]
struct Counts {
    allow: u64,
    deny: u64,
    ask: u64,
    ok: u64,
    tool_error: u64,
    error: u64,
}

struct State {
    file: File,
    /// Bytes written so far (the audit budget counts them).
    bytes: u64,
    next_seq: u64,
    prev: String,
    counts: Counts,
    closed: bool,
    line: Vec<u8>,
}

struct Shared {
    path: PathBuf,
    vm: String,
    /// Keys the chain (see `record_hash`).
    key: AuditKey,
    mode: SyncMode,
    state: Mutex<State>,
    /// A second handle on the same file, so fsync needs no `state` lock.
    sync_file: File,
    /// Records written so far (seq of the next one).
    written: AtomicU64,
    /// Records known durable.
    synced: Mutex<u64>,
    failed: OnceLock<String>,
    /// Told once, from the thread that hit it, when the log fails (the VMM stops the VM).
    on_failure: OnceLock<FailureHook>,
    /// fsyncs done, for tests and the bench (group commit shares them).
    syncs: AtomicU64,
    /// Most bytes the log may hold (`--audit-budget`); the close record may always
    /// be written.
    budget: AtomicU64,
    /// Why records are refused once the budget is spent: the VM stops, cleanly.
    exhausted: OnceLock<String>,
    dirty: Mutex<bool>,
    dirty_cv: Condvar,
    stop: AtomicBool,
}

/// Called with the reason when the log fails or its budget is spent.
pub type FailureHook = Box<dyn Fn(&str) + Send + Sync>;

/// One VM's audit log. `Send + Sync`; share it through `Arc`.
pub struct AuditLog {
    shared: Arc<Shared>,
    flusher: Mutex<Option<JoinHandle<()>>>,
}

impl AuditLog {
    /// Creates `path` with a new key beside it (`<path>.key`): see `create_keyed`.
    pub fn create(
        path: &Path,
        vm: &str,
        mode: SyncMode,
        open: Map<String, Value>,
    ) -> Result<AuditLog, AuditError> {
        Self::create_keyed(path, &default_key_path(path), vm, mode, open)
    }

    /// Creates `path` (never reuses an existing file: one log is one chain from seq 0),
    /// with parent folders, mode 0600, keyed by `key_path` (created when missing,
    /// reused when it exists: a log run again at the same path, or several logs
    /// sharing one key), and writes and syncs the `open` record.
    pub fn create_keyed(
        path: &Path,
        key_path: &Path,
        vm: &str,
        mode: SyncMode,
        open: Map<String, Value>,
    ) -> Result<AuditLog, AuditError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| AuditError::CreateDir {
                path: path.to_owned(),
                source,
            })?;
        }
        let file = OpenOptions::new()
            .append(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|source| AuditError::Create {
                path: path.to_owned(),
                source,
            })?;
        let key = match AuditKey::open_or_create(key_path) {
            Ok(k) => k,
            Err(e) => {
                // The log is still empty: leave no keyless log behind.
                let _ = std::fs::remove_file(path);
                return Err(AuditError::Key(e));
            }
        };
        Self::from_file(file, path, key, vm, mode, open)
    }

    /// Starts a log on an already opened, empty, append-mode file.
    pub fn from_file(
        file: File,
        path: &Path,
        key: AuditKey,
        vm: &str,
        mode: SyncMode,
        open: Map<String, Value>,
    ) -> Result<AuditLog, AuditError> {
        let sync_file = file.try_clone().map_err(|source| AuditError::Create {
            path: path.to_owned(),
            source,
        })?;
        let shared = Arc::new(Shared {
            path: path.to_owned(),
            vm: vm.to_owned(),
            key,
            mode,
            state: Mutex::new(State {
                file,
                bytes: 0,
                next_seq: 0,
                prev: ZERO_HASH.to_string(),
                counts: Counts::default(),
                closed: false,
                line: Vec::with_capacity(1024),
            }),
            sync_file,
            written: AtomicU64::new(0),
            synced: Mutex::new(0),
            failed: OnceLock::new(),
            on_failure: OnceLock::new(),
            syncs: AtomicU64::new(0),
            budget: AtomicU64::new(u64::MAX),
            exhausted: OnceLock::new(),
            dirty: Mutex::new(false),
            dirty_cv: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        shared.append("open", |m| m.extend(open), |_| {})?;
        shared.sync_through(1)?;
        let flusher = (mode == SyncMode::Batch).then(|| {
            let s = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("audit-flush".into())
                .spawn(move || {
                    if let Err(e) = ironvmm_seccomp::install(ironvmm_seccomp::ThreadRole::Worker) {
                        // Fail closed: a log that cannot be flushed refuses every call.
                        let _ = s.fail(e.to_string());
                        return;
                    }
                    s.flush_loop()
                })
                .map_err(|source| AuditError::Flusher {
                    path: path.to_owned(),
                    source,
                })
        });
        let flusher = flusher.transpose()?;
        Ok(AuditLog {
            shared,
            flusher: Mutex::new(flusher),
        })
    }

    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    pub fn vm(&self) -> &str {
        &self.shared.vm
    }

    pub fn mode(&self) -> SyncMode {
        self.shared.mode
    }

    /// Why the log stopped accepting records, once it has.
    pub fn failure(&self) -> Option<&str> {
        self.shared.failed.get().map(String::as_str)
    }

    /// Sets what happens when the log fails or its budget is spent (the VM must
    /// stop): an event, not a condition anyone polls. Called at once if that has
    /// already happened. Only the first hook set counts.
    pub fn on_failure(&self, hook: FailureHook) {
        if self.shared.on_failure.set(hook).is_err() {
            return;
        }
        let why = self.shared.failed.get().or(self.shared.exhausted.get());
        if let (Some(f), Some(h)) = (why, self.shared.on_failure.get()) {
            h(f);
        }
    }

    /// fsyncs done so far. Under concurrency one fsync covers many records.
    pub fn syncs(&self) -> u64 {
        self.shared.syncs.load(Ordering::Relaxed)
    }

    /// Caps the log's size: a decision or outcome record that would take it past
    /// `bytes - CLOSE_RESERVE` is refused, and `exhausted` says why. The close record
    /// is always written, so a VM stopped for it still ends its log properly.
    pub fn set_budget(&self, bytes: u64) {
        self.shared.budget.store(bytes, Ordering::Relaxed);
    }

    /// Why records are refused because the audit budget is spent, once it is.
    pub fn exhausted(&self) -> Option<&str> {
        self.shared.exhausted.get().map(String::as_str)
    }

    /// Bytes written to the log so far.
    pub fn bytes(&self) -> u64 {
        self.shared.lock().bytes
    }

    /// The hash of the last record written.
    pub fn head(&self) -> String {
        self.shared.lock().prev.clone()
    }

    /// Writes a decision record; returns its seq once it is as durable as the sync
    /// mode promises (always: fsynced; batch: written).
    pub fn decision(&self, d: &DecisionRecord) -> Result<u64, AuditError> {
        // Redaction copies the arguments: done before taking the log's lock.
        let args = redact(d.args);
        let fill = |m: &mut Map<String, Value>| {
            m.insert("conn".into(), bound(d.conn, MAX_LOGGED_NAME).into());
            let rpc_id = match d.rpc_id {
                Value::String(s) => Value::from(bound(s, MAX_LOGGED_NAME)),
                v => v.clone(),
            };
            m.insert("rpc_id".into(), rpc_id);
            m.insert("tool".into(), bound(d.tool, MAX_LOGGED_NAME).into());
            m.insert("args".into(), args);
            m.insert("decision".into(), d.decision.as_str().into());
            if d.asked {
                m.insert("asked".into(), true.into());
            }
            if let Some(a) = &d.answer {
                m.insert("ask_seq".into(), a.ask_seq.into());
                m.insert("channel".into(), a.channel.into());
                m.insert("who".into(), a.who.map_or(Value::Null, Value::from));
            }
            m.insert("rule".into(), d.rule.map_or(Value::Null, Value::from));
            m.insert("decided_by".into(), d.decided_by.as_str().into());
            m.insert("reason".into(), bound(d.reason, MAX_LOGGED_REASON).into());
            m.insert("policy_ns".into(), d.policy_ns.into());
        };
        let seq = self.shared.append("decision", fill, |c| match d.decision {
            Verdict::Allow => c.allow += 1,
            Verdict::Ask => c.ask += 1,
            Verdict::Deny => c.deny += 1,
        })?;
        if let Err(e) = self.shared.made_durable(seq) {
            // The record says `allow`, but the call is denied now: the log says so
            // right after it, as far as the file still takes writes.
            if d.decision == Verdict::Allow {
                let fill = |m: &mut Map<String, Value>| {
                    m.insert("decision_seq".into(), seq.into());
                    m.insert("status".into(), OutcomeStatus::Error.as_str().into());
                    m.insert("detail".into(), NOT_DURABLE.into());
                    m.insert("bytes".into(), 0.into());
                    m.insert("total_us".into(), 0.into());
                };
                let _ = self
                    .shared
                    .append_with("outcome", true, fill, |c| c.error += 1);
            }
            return Err(e);
        }
        Ok(seq)
    }

    /// Writes the outcome of a served call (not synced on its own: the next decision
    /// record's fsync, the batch flusher or `close` covers it).
    pub fn outcome(
        &self,
        decision_seq: u64,
        status: OutcomeStatus,
        bytes: u64,
        total_us: u64,
    ) -> Result<(), AuditError> {
        let fill = |m: &mut Map<String, Value>| {
            m.insert("decision_seq".into(), decision_seq.into());
            m.insert("status".into(), status.as_str().into());
            m.insert("bytes".into(), bytes.into());
            m.insert("total_us".into(), total_us.into());
        };
        self.shared.append("outcome", fill, |c| match status {
            OutcomeStatus::Ok => c.ok += 1,
            OutcomeStatus::ToolError => c.tool_error += 1,
            OutcomeStatus::Error => c.error += 1,
        })?;
        if self.shared.mode == SyncMode::Batch {
            self.shared.mark_dirty();
        }
        Ok(())
    }

    /// Writes the outcome of a network exchange (a proxied request, a tunnel):
    /// `bytes` both ways together, `sent` by the guest, `received` by it, and why
    /// it ended when that was not normal. Not synced on its own, like `outcome`.
    pub fn outcome_net(
        &self,
        decision_seq: u64,
        status: OutcomeStatus,
        sent: u64,
        received: u64,
        total_us: u64,
        detail: Option<&str>,
    ) -> Result<(), AuditError> {
        let fill = |m: &mut Map<String, Value>| {
            m.insert("decision_seq".into(), decision_seq.into());
            m.insert("status".into(), status.as_str().into());
            m.insert("bytes".into(), sent.saturating_add(received).into());
            m.insert("sent".into(), sent.into());
            m.insert("received".into(), received.into());
            m.insert("total_us".into(), total_us.into());
            if let Some(d) = detail {
                m.insert("detail".into(), bound(d, MAX_LOGGED_REASON).into());
            }
        };
        self.shared.append("outcome", fill, |c| match status {
            OutcomeStatus::Ok => c.ok += 1,
            OutcomeStatus::ToolError => c.tool_error += 1,
            OutcomeStatus::Error => c.error += 1,
        })?;
        if self.shared.mode == SyncMode::Batch {
            self.shared.mark_dirty();
        }
        Ok(())
    }

    /// Writes a `learn` record: an answer kept as a rule (synced like a decision:
    /// the rule is in force from now on).
    pub fn learn(&self, l: &LearnRecord) -> Result<u64, AuditError> {
        let fill = |m: &mut Map<String, Value>| {
            m.insert("ask_seq".into(), l.ask_seq.into());
            m.insert("decision".into(), l.decision.into());
            m.insert("scope".into(), l.scope.into());
            m.insert("rule".into(), l.rule.into());
            m.insert("refines".into(), l.refines.into());
            m.insert("file".into(), l.file.into());
            m.insert("channel".into(), l.channel.into());
            m.insert("who".into(), l.who.map_or(Value::Null, Value::from));
            m.insert("confirmed_conflicts".into(), l.confirmed_conflicts.into());
        };
        let seq = self.shared.append("learn", fill, |_| {})?;
        self.shared.made_durable(seq)?;
        Ok(seq)
    }

    /// Writes a record of a service's own `kind` (`llm`: a model call's usage and
    /// the budget spent), not synced on its own, like an outcome.
    pub fn note(&self, kind: &'static str, fields: Map<String, Value>) -> Result<u64, AuditError> {
        let seq = self.shared.append(kind, |m| m.extend(fields), |_| {})?;
        if self.shared.mode == SyncMode::Batch {
            self.shared.mark_dirty();
        }
        Ok(seq)
    }

    /// Writes the `close` record with the counts and the exit status, syncs, and
    /// stops the flusher. Returns the final hash (for `--head` and the run report).
    /// A second call returns the same hash without writing.
    pub fn close(&self, exit: Option<i32>) -> Result<String, AuditError> {
        let result = (|| {
            {
                let st = self.shared.lock();
                if st.closed {
                    return Ok(st.prev.clone());
                }
            }
            let exit = exit.map_or(Value::Null, Value::from);
            let seq =
                self.shared
                    .append("close", |m| drop(m.insert("exit".into(), exit)), |_| {})?;
            self.shared.sync_through(seq + 1)?;
            Ok(self.head())
        })();
        self.stop_flusher();
        result
    }

    fn stop_flusher(&self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.mark_dirty();
        let handle = self
            .flusher
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(h) = handle {
            let _ = h.join();
        }
    }
}

impl Drop for AuditLog {
    fn drop(&mut self) {
        self.stop_flusher();
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves State consistent enough to read.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn fail(&self, what: String) -> AuditError {
        let first = self.failed.set(what).is_ok();
        let why = self.failed.get().cloned().unwrap_or_default();
        if first {
            if let Some(h) = self.on_failure.get() {
                h(&why);
            }
        }
        AuditError::Failed(why)
    }

    /// Appends one record of `kind`; `fill` adds the kind's own fields.
    fn append(
        &self,
        kind: &str,
        fill: impl FnOnce(&mut Map<String, Value>),
        tally: impl FnOnce(&mut Counts),
    ) -> Result<u64, AuditError> {
        self.append_with(kind, false, fill, tally)
    }

    /// `force`: written even after a failure (best effort), for the one record that
    /// says what the failure did to a call.
    fn append_with(
        &self,
        kind: &str,
        force: bool,
        fill: impl FnOnce(&mut Map<String, Value>),
        tally: impl FnOnce(&mut Counts),
    ) -> Result<u64, AuditError> {
        if let Some(f) = self.failed.get().filter(|_| !force) {
            return Err(AuditError::Failed(f.clone()));
        }
        if kind != "close" {
            if let Some(f) = self.exhausted.get() {
                return Err(AuditError::Exhausted(f.clone()));
            }
        }
        let mut st = self.lock();
        if st.closed {
            return Err(AuditError::Closed(self.path.clone()));
        }
        let seq = st.next_seq;
        let mut m = Map::new();
        m.insert("seq".into(), seq.into());
        m.insert("time".into(), now_rfc3339().into());
        m.insert("vm".into(), self.vm.as_str().into());
        m.insert("kind".into(), kind.into());
        if kind == "close" {
            let c = &st.counts;
            m.insert(
                "counts".into(),
                serde_json::json!({"allow": c.allow, "deny": c.deny, "ask": c.ask,
                                   "ok": c.ok, "tool_error": c.tool_error, "error": c.error}),
            );
        }
        fill(&mut m);
        m.insert("prev".into(), st.prev.as_str().into());
        let mut line = std::mem::take(&mut st.line);
        line.clear();
        if let Err(e) = serde_json::to_writer(&mut line, &m) {
            st.line = line;
            return Err(self.fail(format!(
                "audit log {}: cannot encode: {e}",
                self.path.display()
            )));
        }
        let hash = record_hash(&self.key, &line);
        line.pop(); // the closing brace; the hash member goes before it
        line.extend_from_slice(super::HASH_MEMBER.as_bytes());
        line.extend_from_slice(hash.as_bytes());
        line.extend_from_slice(b"\"}\n");
        let budget = self.budget.load(Ordering::Relaxed);
        let over = st.bytes + line.len() as u64 > budget.saturating_sub(CLOSE_RESERVE);
        if kind != "close" && over {
            st.line = line;
            let first = self
                .exhausted
                .set(format!(
                    "audit log {}: the audit budget of {budget} bytes is spent (--audit-budget)",
                    self.path.display()
                ))
                .is_ok();
            if let (true, Some(h), Some(why)) = (first, self.on_failure.get(), self.exhausted.get())
            {
                h(why);
            }
            return Err(AuditError::Exhausted(
                self.exhausted.get().cloned().unwrap_or_default(),
            ));
        }
        let res = st.file.write_all(&line);
        let len = line.len() as u64;
        st.line = line;
        if let Err(e) = res {
            return Err(self.fail(format!(
                "audit log {}: write of seq {seq} failed: {e}",
                self.path.display()
            )));
        }
        st.prev = hash;
        st.bytes += len;
        st.next_seq = seq + 1;
        tally(&mut st.counts);
        if kind == "close" {
            st.closed = true;
        }
        self.written.store(seq + 1, Ordering::Release);
        Ok(seq)
    }

    /// Makes record `seq` as durable as the mode promises.
    fn made_durable(&self, seq: u64) -> Result<(), AuditError> {
        match self.mode {
            SyncMode::Always => self.sync_through(seq + 1),
            SyncMode::Batch => {
                self.mark_dirty();
                Ok(())
            }
        }
    }

    /// Ensures the first `count` records are on disk. One fsync covers all records
    /// written before it started, so waiters behind it usually find nothing to do.
    fn sync_through(&self, count: u64) -> Result<(), AuditError> {
        let mut synced = self.synced.lock().unwrap_or_else(|e| e.into_inner());
        if *synced >= count {
            return Ok(());
        }
        if let Some(f) = self.failed.get() {
            return Err(AuditError::Failed(f.clone()));
        }
        let target = self.written.load(Ordering::Acquire);
        self.syncs.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.sync_file.sync_data() {
            return Err(self.fail(format!(
                "audit log {}: fsync failed: {e}",
                self.path.display()
            )));
        }
        *synced = target;
        Ok(())
    }

    fn mark_dirty(&self) {
        let mut d = self.dirty.lock().unwrap_or_else(|e| e.into_inner());
        if !*d {
            *d = true;
            self.dirty_cv.notify_one();
        }
    }

    /// Batch mode: after a record is written, fsync within BATCH_INTERVAL.
    fn flush_loop(&self) {
        let mut last = Instant::now();
        loop {
            {
                let mut d = self.dirty.lock().unwrap_or_else(|e| e.into_inner());
                while !*d && !self.stop.load(Ordering::SeqCst) {
                    d = self.dirty_cv.wait(d).unwrap_or_else(|e| e.into_inner());
                }
                *d = false;
            }
            if self.stop.load(Ordering::SeqCst) {
                let _ = self.sync_through(self.written.load(Ordering::Acquire));
                return;
            }
            let due = last + BATCH_INTERVAL;
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            let _ = self.sync_through(self.written.load(Ordering::Acquire));
            last = Instant::now();
        }
    }
}
