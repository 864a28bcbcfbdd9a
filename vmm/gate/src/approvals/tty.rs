//! The terminal approver: the question on the owner's terminal, answered with one
//! key (`y` allow once, `n` deny once, `a` allow always, `d` deny always).
//!
//! Guest console output shares the terminal and is attacker-controlled, so the
//! prompt must be one the guest cannot imitate or answer:
//! - while a question is up, the console is held: guest output is kept back (and
//!   shown after the answer), and keys go to the approver, never to the guest;
//! - every prompt carries this run's mark, a random word printed when the VM starts
//!   and never given to the guest: a prompt without it is not ironvmm's;
//! - what the call carries (arguments, reasons) is shown with every control and
//!   bidirectional-override character escaped, so it cannot redraw the prompt.

use std::io::Write;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::Duration;

use serde_json::Value;

use super::event::AskView;
use super::hub::{AnswerError, ApprovalHub, Reply};
use super::learn::Scope;

/// Guest output kept back while a question is up; past it, output is dropped
/// (and the drop reported), so a chatty guest cannot grow memory.
const MAX_HELD: usize = 256 * 1024;

/// The owner's terminal, shared by the guest console and the approver.
pub struct TerminalShare {
    state: Mutex<Share>,
    mark: String,
    /// Called with true when a question goes up (before the prompt is shown) and
    /// false when it is answered: the terminal's mode, and discarding keys typed
    /// before the question (they must never answer it).
    on_hold: Option<Box<dyn Fn(bool) + Send + Sync>>,
}

struct Share {
    out: Box<dyn Write + Send>,
    held: bool,
    kept: Vec<u8>,
    dropped: usize,
    keys: Option<Sender<u8>>,
}

impl TerminalShare {
    /// `out` is the terminal; `mark` this run's mark (see `random_mark`).
    pub fn new(out: Box<dyn Write + Send>, mark: String) -> Arc<TerminalShare> {
        Self::with_hook(out, mark, None)
    }

    /// As `new`, with a hook run when a question goes up (true) and down (false).
    pub fn with_hook(
        out: Box<dyn Write + Send>,
        mark: String,
        on_hold: Option<Box<dyn Fn(bool) + Send + Sync>>,
    ) -> Arc<TerminalShare> {
        Arc::new(TerminalShare {
            state: Mutex::new(Share {
                out,
                held: false,
                kept: Vec::new(),
                dropped: 0,
                keys: None,
            }),
            mark,
            on_hold,
        })
    }

    pub fn mark(&self) -> &str {
        &self.mark
    }

    fn lock(&self) -> MutexGuard<'_, Share> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Guest console output (already filtered): shown now, or kept back while a
    /// question is up.
    pub fn guest_output(&self, bytes: &[u8]) {
        let mut s = self.lock();
        if s.held {
            let room = MAX_HELD.saturating_sub(s.kept.len());
            let take = room.min(bytes.len());
            s.kept.extend_from_slice(&bytes[..take]);
            s.dropped += bytes.len() - take;
        } else {
            let _ = s.out.write_all(bytes);
            let _ = s.out.flush();
        }
    }

    /// Keys typed on the terminal. While a question is up they go to the
    /// approver and nothing is returned; otherwise they are returned, for the guest.
    pub fn keys<'a>(&self, bytes: &'a [u8]) -> &'a [u8] {
        let s = self.lock();
        match (&s.keys, s.held) {
            (Some(tx), true) => {
                for b in bytes {
                    let _ = tx.send(*b);
                }
                &[]
            }
            _ => bytes,
        }
    }

    /// Is a question up (the console held)?
    pub fn is_held(&self) -> bool {
        self.lock().held
    }

    fn hold(&self, keys: Sender<u8>) {
        if let Some(h) = &self.on_hold {
            h(true);
        }
        let mut s = self.lock();
        s.held = true;
        s.keys = Some(keys);
    }

    fn say(&self, text: &str) {
        let mut s = self.lock();
        let _ = s.out.write_all(text.as_bytes());
        let _ = s.out.flush();
    }

    fn release(&self) {
        if let Some(h) = &self.on_hold {
            h(false);
        }
        let mut s = self.lock();
        s.held = false;
        s.keys = None;
        let kept = std::mem::take(&mut s.kept);
        let dropped = std::mem::take(&mut s.dropped);
        if !kept.is_empty() || dropped > 0 {
            let _ = s
                .out
                .write_all(b"[ironvmm: guest output kept back during the question]\r\n");
            let _ = s.out.write_all(&kept);
            if dropped > 0 {
                let m = format!("\r\n[ironvmm: {dropped} more bytes of guest output dropped]\r\n");
                let _ = s.out.write_all(m.as_bytes());
            }
        }
        let _ = s.out.flush();
    }
}

/// The guest console's way to the terminal: a writer that goes through the share
/// (held back while a question is up).
pub struct GuestConsole(pub Arc<TerminalShare>);

impl Write for GuestConsole {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.guest_output(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A random mark for this run (never given to the guest).
pub fn random_mark() -> String {
    let mut b = [0u8; 4];
    let ok = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .is_ok();
    if !ok {
        // Not secret without urandom, but still unknown to a guest that started later.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        b = (t as u32 ^ std::process::id()).to_le_bytes();
    }
    const WORDS: [&str; 16] = [
        "amber", "birch", "cobalt", "delta", "ember", "fjord", "granite", "harbor", "indigo",
        "juniper", "kestrel", "lagoon", "meadow", "nickel", "orchid", "pewter",
    ];
    format!(
        "{}-{}-{:02}",
        WORDS[(b[0] & 15) as usize],
        WORDS[(b[1] & 15) as usize],
        u16::from_le_bytes([b[2], b[3]]) % 100
    )
}

/// Escapes what could drive or fool a terminal: control characters (C0, DEL,
/// C1) and bidirectional overrides.
pub fn escape_for_terminal(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        let bidi = matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
        if c.is_control() || bidi {
            o.push_str(&format!("\\u{{{:x}}}", c as u32));
        } else {
            o.push(c);
        }
    }
    o
}

/// Longest string value shown, and most lines of arguments.
const MAX_SHOWN_STRING: usize = 300;
const MAX_ARG_LINES: usize = 30;

fn shorten(v: &Value) -> Value {
    match v {
        Value::String(s) if s.chars().count() > MAX_SHOWN_STRING => {
            let head: String = s.chars().take(MAX_SHOWN_STRING).collect();
            Value::String(format!("{head}… ({} characters)", s.chars().count()))
        }
        Value::Array(a) => Value::Array(a.iter().map(shorten).collect()),
        Value::Object(m) => Value::Object(m.iter().map(|(k, v)| (k.clone(), shorten(v))).collect()),
        o => o.clone(),
    }
}

/// The prompt for question `a`.
pub fn render(a: &AskView, mark: &str) -> String {
    let pretty = serde_json::to_string_pretty(&shorten(&a.args)).unwrap_or_default();
    // JSON escapes C0 controls in strings already; C1 and bidi need it here.
    let mut lines: Vec<String> = pretty.lines().map(escape_for_terminal).collect();
    let cut = lines.len().saturating_sub(MAX_ARG_LINES);
    if cut > 0 {
        lines.truncate(MAX_ARG_LINES);
    }
    let mut o = String::new();
    let bar = "\x1b[7m";
    let off = "\x1b[0m";
    o.push_str(&format!(
        "\r\n{bar} ironvmm asks [{mark}] {off} VM {}  question {}\r\n",
        escape_for_terminal(&a.vm),
        a.id
    ));
    o.push_str(&format!("  tool:    {}\r\n", escape_for_terminal(&a.tool)));
    for (i, l) in lines.iter().enumerate() {
        let label = if i == 0 { "  args:    " } else { "           " };
        o.push_str(&format!("{label}{l}\r\n"));
    }
    if cut > 0 {
        o.push_str(&format!("           … {cut} more lines\r\n"));
    }
    let rule = a
        .rule
        .map_or("the default".to_string(), |l| format!("line {l}"));
    o.push_str(&format!(
        "  rule:    {rule}: {}\r\n",
        escape_for_terminal(&a.reason)
    ));
    let others = a.pending.saturating_sub(1);
    o.push_str(&format!(
        "  waiting: {} s (denied in {} s)   other asks pending: {others}   parked calls: {}\r\n",
        a.waited_ms / 1000,
        a.timeout_in_ms / 1000,
        a.calls
    ));
    o.push_str(&format!(
        "{bar} [{mark}] {off} y allow once · n deny once · a allow always · d deny always > "
    ));
    o
}

/// Starts the terminal approver on `hub`. Keys reach it through `share.keys`.
pub fn spawn(hub: ApprovalHub, share: Arc<TerminalShare>) {
    let _ = thread::Builder::new()
        .name("approvals-tty".into())
        .spawn(move || run(hub, share));
}

fn run(hub: ApprovalHub, share: Arc<TerminalShare>) {
    if !super::confine_thread("approvals-tty") {
        return;
    }
    loop {
        // No subscription: a busy decision feed must never cut the approver off.
        if !hub.wait_pending(Duration::from_secs(1)) {
            continue;
        }
        let Some(q) = hub.pending().into_iter().next() else {
            continue;
        };
        let (tx, rx) = mpsc::channel();
        share.hold(tx);
        share.say(&render(&q, share.mark()));
        // Whatever happens while asking, the console must not stay held.
        let said = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            ask_one(&hub, &share, &q, &rx)
        }))
        .unwrap_or_else(|_| "the terminal approver failed on this question".into());
        share.say(&format!("{said}\r\n"));
        share.release();
    }
}

/// Waits for a key and answers `q`; returns the line that says what happened.
fn ask_one(hub: &ApprovalHub, share: &TerminalShare, q: &AskView, keys: &Receiver<u8>) -> String {
    loop {
        let key = match next_key(hub, q.id, keys) {
            Ok(k) => k,
            Err(gone) => return gone,
        };
        let (allow, learn) = match key {
            b'y' | b'Y' => (true, false),
            b'n' | b'N' => (false, false),
            b'a' | b'A' => (true, true),
            b'd' | b'D' => (false, true),
            _ => continue,
        };
        share.say(&format!("{}\r\n", key as char));
        let scope = if learn {
            share.say(&scope_menu(q));
            let k = match next_key(hub, q.id, keys) {
                Ok(k) => k,
                Err(gone) => return gone,
            };
            match k {
                b'e' | b'E' => Some(Scope::Exact),
                b'v' | b'V' => Some(Scope::Value),
                b't' | b'T' => Some(Scope::Tool),
                _ => {
                    share.say("cancelled\r\n");
                    share.say(&render(q, share.mark()));
                    continue;
                }
            }
        } else {
            None
        };
        let mut reply = Reply {
            allow,
            learn: scope,
            confirm: false,
            channel: "tty".into(),
            who: Some("terminal".into()),
        };
        loop {
            match hub.answer(q.id, reply.clone()) {
                Ok(d) => {
                    let learned = d
                        .learned
                        .map(|l| format!("; learned `{}` in {}", l.rule, l.file))
                        .unwrap_or_default();
                    return format!("[{}] {} {}{learned}", share.mark(), d.decision, d.tool);
                }
                Err(AnswerError::NeedsConfirmation(c)) => {
                    let mut m = format!(
                        "the rule `{}` would change these scenarios:\r\n",
                        escape_for_terminal(&c.rule)
                    );
                    for x in &c.conflicts {
                        m.push_str(&format!("  {}\r\n", escape_for_terminal(&x.to_string())));
                    }
                    m.push_str("keep it anyway? y keeps it, any other key cancels > ");
                    share.say(&m);
                    match next_key(hub, q.id, keys) {
                        Ok(b'y') | Ok(b'Y') => {
                            share.say("y\r\n");
                            reply.confirm = true;
                        }
                        Ok(_) => {
                            share.say("not kept\r\n");
                            share.say(&render(q, share.mark()));
                            break;
                        }
                        Err(gone) => return gone,
                    }
                }
                Err(e) => {
                    share.say(&format!(
                        "cannot: {}\r\n",
                        escape_for_terminal(&e.to_string())
                    ));
                    if matches!(e, AnswerError::NoSuchAsk(_)) {
                        return "the question was answered elsewhere".into();
                    }
                    share.say(&render(q, share.mark()));
                    break;
                }
            }
        }
    }
}

fn scope_menu(q: &AskView) -> String {
    format!(
        "always, for: e this exact call · v the value that matters (recipient, host or folder) · t every {} call · other key cancels > ",
        escape_for_terminal(&q.tool)
    )
}

/// The next key; `Err` with a message when the question went away meanwhile
/// (answered elsewhere, timed out).
fn next_key(hub: &ApprovalHub, id: u64, keys: &Receiver<u8>) -> Result<u8, String> {
    loop {
        match keys.recv_timeout(Duration::from_millis(500)) {
            Ok(k) => return Ok(k),
            Err(RecvTimeoutError::Timeout) => {
                if !hub.pending().iter().any(|a| a.id == id) {
                    return Err("\r\nthe question was answered elsewhere, or timed out".into());
                }
            }
            Err(RecvTimeoutError::Disconnected) => return Err("\r\nno terminal".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_controls_and_bidi() {
        assert_eq!(
            escape_for_terminal("a\u{1b}[2Jb\u{9b}c\u{202e}d\u{7f}"),
            "a\\u{1b}[2Jb\\u{9b}c\\u{202e}d\\u{7f}"
        );
    }

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn held_console_keeps_guest_output_and_takes_keys() {
        let buf = Buf::default();
        let share = TerminalShare::new(Box::new(buf.clone()), "m".into());
        share.guest_output(b"before\n");
        assert_eq!(share.keys(b"x"), b"x");
        let (tx, rx) = mpsc::channel();
        share.hold(tx);
        share.guest_output(b"FAKE PROMPT y/n? ");
        assert_eq!(share.keys(b"y"), b"", "keys go to the approver while held");
        assert_eq!(rx.try_recv().unwrap(), b'y');
        let shown = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert!(!shown.contains("FAKE"), "held output is not shown: {shown}");
        share.release();
        let shown = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert!(shown.ends_with("FAKE PROMPT y/n? "), "{shown}");
        assert_eq!(share.keys(b"z"), b"z");
        // a flood while held is bounded
        let (tx, _rx) = mpsc::channel();
        share.hold(tx);
        for _ in 0..100 {
            share.guest_output(&[b'x'; 10_000]);
        }
        assert!(share.lock().kept.len() <= MAX_HELD);
        share.release();
        assert!(String::from_utf8_lossy(&buf.0.lock().unwrap())
            .contains("bytes of guest output dropped"));
    }

    #[test]
    fn a_key_answers_the_prompt_and_guest_output_waits() {
        use crate::approvals::{HubConfig, Mode};
        use crate::gate::approver::{Approver, AskRequest};
        let buf = Buf::default();
        let share = TerminalShare::new(Box::new(buf.clone()), "pewter-amber-12".into());
        let hub = ApprovalHub::new(HubConfig::new("vm", Mode::Tty));
        spawn(hub.clone(), Arc::clone(&share));
        let (tx, rx) = mpsc::channel();
        hub.ask(
            AskRequest {
                ask_seq: 1,
                conn: "c".into(),
                rpc_id: serde_json::json!(1),
                tool: "fs.write".into(),
                args: serde_json::json!({"path": "/workspace/x", "content": "a\u{1b}]0;t\u{7}"}),
                rule: Some(2),
                reason: "ask me".into(),
            },
            Box::new(move |a| {
                let _ = tx.send(a);
            }),
        );
        let shown = || String::from_utf8_lossy(&buf.0.lock().unwrap()).into_owned();
        let t0 = std::time::Instant::now();
        while !shown().contains("d deny always >") {
            assert!(t0.elapsed() < Duration::from_secs(20), "{}", shown());
            thread::sleep(Duration::from_millis(20));
        }
        let s = shown();
        assert!(
            s.contains("ironvmm asks [pewter-amber-12]") && s.contains("line 2: ask me"),
            "{s}"
        );
        assert!(
            s.contains("\\u001b]0;t\\u0007") && !s.contains('\u{7}'),
            "escaped: {s}"
        );
        assert!(
            s.contains("\"path\": \"/workspace/x\",\r\n"),
            "one argument a line: {s}"
        );
        share.guest_output(b"GUEST SAYS y\n");
        assert!(!shown().contains("GUEST SAYS"), "held while asking");
        assert_eq!(share.keys(b"x"), b"", "keys go to the approver");
        assert!(rx.try_recv().is_err(), "x is not an answer");
        assert_eq!(share.keys(b"n"), b"");
        let a = rx.recv_timeout(Duration::from_secs(20)).unwrap();
        assert!(!a.allow);
        assert_eq!(
            (a.answerer.channel.as_str(), a.answerer.by),
            ("tty", crate::gate::DecidedBy::User)
        );
        while !shown().contains("GUEST SAYS") {
            assert!(t0.elapsed() < Duration::from_secs(20), "{}", shown());
            thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(share.keys(b"y"), b"y", "no question: keys go to the guest");
    }

    #[test]
    fn marks_differ() {
        let marks: std::collections::HashSet<String> = (0..20).map(|_| random_mark()).collect();
        assert!(marks.len() > 10);
    }
}
