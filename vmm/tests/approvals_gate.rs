//! `ironvmm gate` with approvers, end to end: an asked call parks while a thousand
//! others flow and the control socket answers it; a learned rule takes effect in
//! the middle of the run; CI paths (answers file, non-interactive, nobody to ask)
//! resolve at once.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

#[path = "../gate/tests/common/smtp.rs"]
mod smtp;

const POLICY: &str = "version 1
allow fs.read when path under \"/workspace\"
ask   fs.write when path under \"/workspace\" \"writes need a yes\"
default deny
";

struct Fixture {
    dir: tempfile::TempDir,
    /// Each gate run writes its own audit log (a log is one chain).
    runs: std::cell::Cell<u32>,
    run: PathBuf,
    ws: PathBuf,
    sock: PathBuf,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let ws = dir.path().join("ws");
    std::fs::create_dir(&ws).unwrap();
    std::fs::create_dir(ws.join("out")).unwrap();
    std::fs::create_dir(ws.join("ci")).unwrap();
    std::fs::write(ws.join("in.txt"), "hello").unwrap();
    std::fs::write(dir.path().join("p.rules"), POLICY).unwrap();
    let run = dir.path().join("run");
    std::fs::create_dir(&run).unwrap();
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(run.join("ironvmm"))
        .unwrap();
    let sock = dir.path().join("gate.sock");
    Fixture {
        dir,
        runs: std::cell::Cell::new(0),
        run,
        ws,
        sock,
    }
}

impl Fixture {
    fn gate(&self, transport: &[&str], extra: &[&str]) -> Command {
        self.runs.set(self.runs.get() + 1);
        let mut c = Command::new(env!("CARGO_BIN_EXE_ironvmm"));
        c.arg("gate")
            .arg("--policy")
            .arg(self.dir.path().join("p.rules"))
            .arg("--workspace")
            .arg(&self.ws)
            .arg("--audit")
            .arg(self.audit_path())
            .args(["--audit-sync", "batch"])
            .args(transport)
            .args(extra)
            .env("XDG_RUNTIME_DIR", &self.run)
            .stdin(Stdio::null());
        c
    }
    fn approvals(&self, args: &[&str]) -> Vec<Value> {
        approvals(&self.run, args)
    }
    fn audit_path(&self) -> PathBuf {
        self.dir
            .path()
            .join(format!("audit-{}.jsonl", self.runs.get()))
    }
    fn audit(&self) -> Vec<Value> {
        std::fs::read_to_string(self.audit_path())
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

struct Gate(Child);

impl Drop for Gate {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Client {
    w: UnixStream,
    r: BufReader<UnixStream>,
    next: u64,
}

impl Client {
    fn connect(path: &Path) -> Client {
        let deadline = Instant::now() + Duration::from_secs(60);
        let s = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) => {
                    assert!(Instant::now() < deadline, "gate socket: {e}");
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        };
        let mut c = Client {
            w: s.try_clone().unwrap(),
            r: BufReader::new(s),
            next: 1,
        };
        let init = json!({"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}});
        c.send("initialize", init);
        c.recv();
        c
    }
    fn send(&mut self, method: &str, params: Value) -> u64 {
        let id = self.next;
        self.next += 1;
        let m = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
        self.w.write_all(format!("{m}\n").as_bytes()).unwrap();
        id
    }
    fn call(&mut self, tool: &str, args: Value) -> u64 {
        self.send("tools/call", json!({"name": tool, "arguments": args}))
    }
    fn recv(&mut self) -> Value {
        let mut l = String::new();
        self.r.read_line(&mut l).unwrap();
        serde_json::from_str(&l).unwrap_or_else(|e| panic!("{e}: {l}"))
    }
}

/// `ironvmm approvals ARGS --json` against the gates under the runtime dir `run`.
fn approvals(run: &Path, args: &[&str]) -> Vec<Value> {
    let o = Command::new(env!("CARGO_BIN_EXE_ironvmm"))
        .arg("approvals")
        .args(args)
        .arg("--json")
        .env("XDG_RUNTIME_DIR", run)
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn pending(f: &Fixture, n: usize) -> Vec<Value> {
    pending_at(&f.run, n)
}

/// Waits (60 s at most) until exactly `n` asks are pending; returns them.
fn pending_at(run: &Path, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let asks: Vec<Value> = approvals(run, &["list"])
            .into_iter()
            .filter(|v| v["event"] == "ask")
            .collect();
        if asks.len() == n {
            return asks;
        }
        assert!(Instant::now() < deadline, "waiting for {n} asks: {asks:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_parked_call_waits_while_a_thousand_flow_and_the_socket_answers_it() {
    let f = fixture();
    let sock = f.sock.to_str().unwrap().to_string();
    let _g = Gate(
        f.gate(&["--listen", &sock], &["--approver", "socket"])
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut asker = Client::connect(&f.sock);
    let asked = asker.call(
        "fs.write",
        json!({"path": "/workspace/out/a.txt", "content": "one"}),
    );
    let asks = pending(&f, 1);
    assert_eq!(asks[0]["args"]["path"], "/workspace/out/a.txt");
    // The same connection and others keep flowing.
    let mut other = Client::connect(&f.sock);
    for _ in 0..1000 {
        let id = other.call("fs.read", json!({"path": "/workspace/in.txt"}));
        let r = other.recv();
        assert_eq!(
            (r["id"].as_u64(), &r["result"]["isError"]),
            (Some(id), &json!(false)),
            "{r}"
        );
    }
    let id = asker.call("fs.read", json!({"path": "/workspace/in.txt"}));
    let r = asker.recv();
    assert_eq!(
        r["id"].as_u64(),
        Some(id),
        "a read on the asking connection overtakes the parked write"
    );
    assert!(!f.ws.join("out/a.txt").exists());
    assert_eq!(pending(&f, 1).len(), 1, "still parked");

    let r = f.approvals(&["allow", &asks[0]["id"].to_string()]);
    assert_eq!(r.last().unwrap()["event"], "decided", "{r:?}");
    let r = asker.recv();
    assert_eq!(
        (r["id"].as_u64(), &r["result"]["isError"]),
        (Some(asked), &json!(false)),
        "{r}"
    );
    assert_eq!(
        std::fs::read_to_string(f.ws.join("out/a.txt")).unwrap(),
        "one"
    );

    // Learned mid-run: allow always for this folder; the next write there flows.
    let second = asker.call(
        "fs.write",
        json!({"path": "/workspace/out/b.txt", "content": "two"}),
    );
    let asks = pending(&f, 1);
    let r = f.approvals(&["allow", &asks[0]["id"].to_string(), "--learn", "value"]);
    assert_eq!(
        r.last().unwrap()["learned"]["rule"],
        "allow fs.write when args.path under \"/workspace/out\"",
        "{r:?}"
    );
    assert_eq!(asker.recv()["id"].as_u64(), Some(second));
    let third = asker.call(
        "fs.write",
        json!({"path": "/workspace/out/c.txt", "content": "3"}),
    );
    let r = asker.recv();
    assert_eq!(
        (r["id"].as_u64(), &r["result"]["isError"]),
        (Some(third), &json!(false)),
        "{r}"
    );
    let learned = std::fs::read_to_string(f.dir.path().join("p.rules.learned")).unwrap();
    assert!(learned.contains(", refines line 3\n"), "{learned}");

    // The audit log: ask, answer (user, socket), learn, and a decision by the learned rule.
    let recs = f.audit();
    let answer = recs
        .iter()
        .find(|r| r["kind"] == "decision" && r["decided_by"] == "user")
        .expect("the answer record");
    assert_eq!(answer["channel"], "socket");
    assert!(recs
        .iter()
        .any(|r| r["kind"] == "learn" && r["scope"] == "value"));
    assert!(recs.iter().any(|r| r["kind"] == "decision"
        && r["decided_by"] == "learned"
        && r["args"]["path"] == "/workspace/out/c.txt"));
}

/// One call over `--stdio`; returns the reply of the tools/call.
fn stdio_call(f: &Fixture, extra: &[&str]) -> Value {
    let mut c = f
        .gate(&["--stdio"], extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}});
    let call = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "fs.write", "arguments": {"path": "/workspace/ci/x.txt", "content": "x"}}});
    let mut stdin = c.stdin.take().unwrap();
    writeln!(stdin, "{init}\n{call}").unwrap();
    let mut r = BufReader::new(c.stdout.take().unwrap());
    let mut reply = Value::Null;
    for _ in 0..2 {
        let mut l = String::new();
        r.read_line(&mut l).unwrap();
        let v: Value = serde_json::from_str(&l).unwrap();
        if v["id"] == 2 {
            reply = v;
        }
    }
    drop(stdin);
    let _ = c.wait();
    reply
}

#[test]
fn in_ci_every_ask_resolves_at_once() {
    let f = fixture();
    // nobody to ask
    let r = stdio_call(&f, &[]);
    let s = &r["result"]["structuredContent"];
    assert_eq!(
        (s["decision"].as_str(), s["decided_by"].as_str()),
        (Some("deny"), Some("non-interactive")),
        "{r}"
    );
    assert!(
        s["reason"]
            .as_str()
            .unwrap()
            .contains("no approver can answer"),
        "{r}"
    );
    // --non-interactive
    let r = stdio_call(&f, &["--non-interactive"]);
    assert!(
        r["result"]["structuredContent"]["reason"]
            .as_str()
            .unwrap()
            .contains("--non-interactive"),
        "{r}"
    );
    // an answers file
    let answers = f.dir.path().join("ci.answers");
    std::fs::write(
        &answers,
        "allow fs.write when path under \"/workspace/ci\"\n",
    )
    .unwrap();
    let r = stdio_call(&f, &["--answers", answers.to_str().unwrap()]);
    assert_eq!(r["result"]["isError"], false, "{r}");
    assert_eq!(std::fs::read_to_string(f.ws.join("ci/x.txt")).unwrap(), "x");
    let recs = f.audit();
    assert!(
        recs.iter().any(|r| r["decided_by"] == "answers"),
        "{recs:?}"
    );
    // an answers file with an ask rule is refused, naming the line
    std::fs::write(&answers, "allow fs.read\nask fs.write\n").unwrap();
    let o = f
        .gate(&["--stdio"], &["--answers", answers.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(125));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("ci.answers:2") && err.contains("only `allow` and `deny`"),
        "{err}"
    );
}

/// Copies a directory tree (the example's Maildir) into `to`.
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let t = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &t);
        } else {
            std::fs::copy(e.path(), &t).unwrap();
        }
    }
}

/// The reply to the call `id`, reading past nothing else (each client has one call
/// in flight at a time here, but a parked call may be overtaken).
fn reply_to(c: &mut Client, id: u64) -> Value {
    let r = c.recv();
    assert_eq!(r["id"].as_u64(), Some(id), "{r}");
    r
}

/// Issue #11's "done when", with the real mail service under the example inbox
/// policy (examples/inbox/p.rules: contacts allowed, anyone else asked): a send to a
/// stranger parks alone while a send to a contact, reads and a denied purge on
/// other connections complete and are audited; allowed, the parked send really
/// reaches the SMTP server; a second stranger, denied, never does.
#[test]
fn under_the_inbox_policy_a_send_to_a_stranger_parks_alone_and_is_answered() {
    let d = tempfile::tempdir().unwrap();
    let Some(srv) = smtp::smtp_server(d.path()) else {
        return;
    };
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/inbox");
    for f in ["p.rules", "contacts.txt"] {
        std::fs::copy(example.join(f), d.path().join(f)).unwrap();
    }
    copy_tree(&example.join("Maildir"), &d.path().join("Maildir"));
    std::fs::write(
        d.path().join("ironvmm.toml"),
        format!(
            "[mail]\nbackend = \"maildir\"\nmaildir = \"Maildir\"\nfrom = \"Ada <ada@example.org>\"\n\
             [mail.smtp]\nhost = \"127.0.0.1\"\nport = {}\nsecurity = \"plain\"\ntimeout_secs = 30\n",
            srv.port
        ),
    )
    .unwrap();
    let run = d.path().join("run");
    std::fs::DirBuilder::new()
        .mode(0o700)
        .recursive(true)
        .create(run.join("ironvmm"))
        .unwrap();
    let sock = d.path().join("gate.sock");
    let audit = d.path().join("audit.jsonl");
    let _g = Gate(
        Command::new(env!("CARGO_BIN_EXE_ironvmm"))
            .arg("gate")
            .arg("--policy")
            .arg(d.path().join("p.rules"))
            .arg("--config")
            .arg(d.path().join("ironvmm.toml"))
            .arg("--audit")
            .arg(&audit)
            .arg("--listen")
            .arg(&sock)
            .args(["--approver", "socket"])
            .env("XDG_RUNTIME_DIR", &run)
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let send = |to: &str, subject: &str| json!({"to": [to], "subject": subject, "body": "Are you free on Friday?"});

    // A stranger: the example's `ask mail.send` line parks it.
    let mut asker = Client::connect(&sock);
    let parked = asker.call(
        "mail.send",
        send("mallory@example.net", "To a stranger, asked"),
    );
    let asks = pending_at(&run, 1);
    assert_eq!(asks[0]["tool"], "mail.send", "{asks:?}");
    assert_eq!(asks[0]["args"]["to"], json!(["mallory@example.net"]));

    // Meanwhile, on other connections and on the asking one, everything else flows.
    let mut other = Client::connect(&sock);
    let mut reader = Client::connect(&sock);
    let to_alice = other.call("mail.send", send("alice@example.com", "To a contact"));
    let listed = reader.call("mail.list", json!({"folder": "INBOX"}));
    let r = reply_to(&mut reader, listed);
    let first = r["result"]["structuredContent"]["messages"][0]["id"].clone();
    assert!(first.is_string(), "{r}");
    let read = reader.call("mail.read", json!({"id": first}));
    assert_eq!(reply_to(&mut reader, read)["result"]["isError"], false);
    let purge = reader.call("mail.purge", json!({"id": first}));
    let r = reply_to(&mut reader, purge);
    assert_eq!(r["result"]["structuredContent"]["decision"], "deny", "{r}");
    let r = reply_to(&mut other, to_alice);
    assert_eq!(r["result"]["isError"], false, "{r}");
    let search = asker.call("mail.search", json!({"query": "lunch"}));
    assert_eq!(reply_to(&mut asker, search)["result"]["isError"], false);
    let got = smtp::received(&srv.inbox);
    assert_eq!(got.len(), 1, "only the contact's mail is out: {got:?}");
    assert!(got[0].contains("To: alice@example.com"), "{}", got[0]);
    assert_eq!(pending_at(&run, 1)[0]["id"], asks[0]["id"], "still parked");

    // The owner allows it from another shell: it is really delivered.
    let r = approvals(&run, &["allow", &asks[0]["id"].to_string()]);
    assert_eq!(r.last().unwrap()["event"], "decided", "{r:?}");
    let r = reply_to(&mut asker, parked);
    assert_eq!(r["result"]["isError"], false, "{r}");
    assert_eq!(r["result"]["structuredContent"]["sent"], true, "{r}");
    let got = smtp::received(&srv.inbox);
    assert_eq!(got.len(), 2, "{got:?}");
    assert!(got.iter().any(|m| m.contains("To: mallory@example.net")));

    // Another stranger, denied: the agent is told, the server never hears of it.
    let second = other.call("mail.send", send("eve@example.net", "Denied"));
    let asks = pending_at(&run, 1);
    assert_eq!(asks[0]["args"]["to"], json!(["eve@example.net"]));
    let r = approvals(&run, &["deny", &asks[0]["id"].to_string()]);
    assert_eq!(r.last().unwrap()["event"], "decided", "{r:?}");
    let r = reply_to(&mut other, second);
    assert_eq!(r["result"]["structuredContent"]["decision"], "deny", "{r}");
    assert_eq!(smtp::received(&srv.inbox).len(), 2);

    // The audit log holds every step: the contact's send allowed by its rule and
    // served, the purge denied, each ask parked and then answered by the owner.
    let recs: Vec<Value> = std::fs::read_to_string(&audit)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let decision = |to: &str, d: &str| {
        recs.iter()
            .find(|r| {
                r["kind"] == "decision" && r["args"]["to"] == json!([to]) && r["decision"] == d
            })
            .unwrap_or_else(|| panic!("no {d} decision for {to}: {recs:?}"))
    };
    let alice = decision("alice@example.com", "allow");
    assert_eq!(alice["decided_by"], "rule", "{alice}");
    assert!(recs.iter().any(|r| r["kind"] == "outcome"
        && r["decision_seq"] == alice["seq"]
        && r["status"] == "ok"));
    assert!(recs
        .iter()
        .any(|r| r["kind"] == "decision" && r["tool"] == "mail.purge" && r["decision"] == "deny"));
    for (to, answer) in [
        ("mallory@example.net", "allow"),
        ("eve@example.net", "deny"),
    ] {
        let ask = decision(to, "ask");
        let a = decision(to, answer);
        assert_eq!(
            (&a["asked"], &a["ask_seq"], &a["decided_by"], &a["channel"]),
            (&json!(true), &ask["seq"], &json!("user"), &json!("socket")),
            "{a}"
        );
    }
    let served = decision("mallory@example.net", "allow");
    assert!(recs.iter().any(|r| r["kind"] == "outcome"
        && r["decision_seq"] == served["seq"]
        && r["status"] == "ok"));
}
