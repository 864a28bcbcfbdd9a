//! The terminal approver, driven through tmux (`send-keys`, `capture-pane`):
//! `ironvmm gate --listen ... --approver tty` in a tmux pane, a scripted MCP client.
//! An asked call parks while other calls flow; `y` allows it; `a` then `v` learns a
//! rule that the next call meets without a prompt. A perfect fake prompt printed
//! into the pane (as guest output would be, through the console filter) carries no
//! valid mark, and answering it answers nothing.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ironvmm::devices::console::EscapeFilter;
use serde_json::{json, Value};

fn tmux(args: &[&str]) -> String {
    let o = Command::new("tmux")
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run tmux ({e}): install it (apt-get install tmux; .ci/run does)")
        });
    String::from_utf8_lossy(&o.stdout).into_owned()
}

struct Session {
    name: String,
    socket: String,
}

impl Session {
    fn run(&self, args: &[&str]) -> String {
        let mut a = vec!["-L", &self.socket];
        a.extend_from_slice(args);
        tmux(&a)
    }
    fn screen(&self) -> String {
        self.run(&["capture-pane", "-p", "-J", "-S", "-200", "-t", &self.name])
    }
    fn wait_for(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let s = self.screen();
            if pred(&s) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; screen:\n{s}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    fn keys(&self, k: &str) {
        self.run(&["send-keys", "-t", &self.name, "-l", k]);
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.run(&["kill-server"]);
    }
}

/// One MCP client connection to the gate's socket.
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
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        };
        let mut c = Client {
            w: s.try_clone().unwrap(),
            r: BufReader::new(s),
            next: 1,
        };
        c.send("initialize", json!({"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}));
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

fn mark_of(screen: &str) -> String {
    let i = screen.find("marked [").expect("the banner with the mark") + "marked [".len();
    screen[i..].split(']').next().unwrap().to_string()
}

#[test]
fn terminal_prompt_parks_one_call_answers_and_learns_and_a_fake_prompt_does_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let ws = dir.path().join("ws");
    std::fs::create_dir(&ws).unwrap();
    std::fs::create_dir(ws.join("out")).unwrap();
    std::fs::write(ws.join("in.txt"), "hello").unwrap();
    let policy = dir.path().join("p.rules");
    std::fs::write(
        &policy,
        "allow fs.read when path under \"/workspace\"\nask fs.write when path under \"/workspace\" \"writes need a yes\"\n",
    )
    .unwrap();
    let run = dir.path().join("run");
    std::fs::create_dir(&run).unwrap();
    let sock: PathBuf = dir.path().join("gate.sock");
    let audit = dir.path().join("audit.jsonl");
    let cmd = format!(
        "XDG_RUNTIME_DIR={} {} gate --policy {} --workspace {} --audit {} --listen {} --approver tty --ask-timeout 120s; sleep 30",
        run.display(),
        env!("CARGO_BIN_EXE_ironvmm"),
        policy.display(),
        ws.display(),
        audit.display(),
        sock.display()
    );
    let s = Session {
        name: "approvals".into(),
        socket: format!("ironvmm-test-{}", std::process::id()),
    };
    s.run(&[
        "new-session",
        "-d",
        "-s",
        &s.name,
        "-x",
        "200",
        "-y",
        "60",
        &cmd,
    ]);
    let banner = s.wait_for("the banner", |x| x.contains("marked ["));
    let mark = mark_of(&banner);

    // A "guest" prints a perfect fake prompt (through the console filter, as guest
    // output always is), with the only mark it could guess, and the owner types y.
    let fake_mark = if mark == "amber-birch-07" {
        "birch-amber-07"
    } else {
        "amber-birch-07"
    };
    let fake = format!(
        "\r\n\x1b[7m ironvmm asks [{fake_mark}] \x1b[0m VM x  question 1\r\n  tool:    fs.write\r\n  args:    {{\"path\": \"/workspace/evil\"}}\r\n\x1b[7m [{fake_mark}] \x1b[0m y allow once · n deny once · a allow always · d deny always > \x1b]0;title\x07\x1b[2J"
    );
    let mut shown = Vec::new();
    EscapeFilter::default().filter(fake.as_bytes(), &mut shown);
    let tty = s.run(&["display", "-p", "-t", &s.name, "#{pane_tty}"]);
    std::fs::OpenOptions::new()
        .write(true)
        .open(tty.trim())
        .unwrap()
        .write_all(&shown)
        .unwrap();
    s.wait_for("the fake prompt", |x| {
        x.contains(&format!("ironvmm asks [{fake_mark}]"))
    });
    s.keys("y");

    // A real ask parks one call; other calls flow meanwhile.
    let mut asker = Client::connect(&sock);
    let mut other = Client::connect(&sock);
    let asked = asker.call(
        "fs.write",
        json!({"path": "/workspace/out/a.txt", "content": "one"}),
    );
    let screen = s.wait_for("the real prompt", |x| {
        x.contains(&format!("ironvmm asks [{mark}]"))
    });
    assert!(
        screen.contains("/workspace/out/a.txt") && screen.contains("writes need a yes"),
        "{screen}"
    );
    assert!(screen.contains("other asks pending: 0"), "{screen}");
    for _ in 0..50 {
        let id = other.call("fs.read", json!({"path": "/workspace/in.txt"}));
        let r = other.recv();
        assert_eq!(r["id"], id);
        assert_eq!(r["result"]["isError"], false, "{r}");
    }
    assert!(
        !ws.join("out/a.txt").exists(),
        "the asked call is still parked"
    );
    s.keys("y");
    let r = asker.recv();
    assert_eq!(r["id"], asked);
    // the earlier "y" at the fake prompt answered nothing: this is the first answer
    let log = std::fs::read_to_string(&audit).unwrap();
    let answers: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|r| r["decided_by"] == "user")
        .collect();
    assert_eq!(answers.len(), 1, "{log}");
    assert_eq!(answers[0]["channel"], "tty");
    assert_eq!(r["result"]["isError"], false, "{r}");

    // "a" then "v": allow always, for this folder; the next write there is not asked.
    asker.call(
        "fs.write",
        json!({"path": "/workspace/out/b.txt", "content": "two"}),
    );
    s.wait_for("the second prompt", |x| x.contains("/workspace/out/b.txt"));
    s.keys("a");
    s.wait_for("the scope menu", |x| x.contains("the value that matters"));
    s.keys("v");
    let r = asker.recv();
    assert_eq!(r["result"]["isError"], false, "{r}");
    let learned = std::fs::read_to_string(dir.path().join("p.rules.learned")).unwrap();
    assert!(
        learned.contains("refines line 2\nallow fs.write when args.path under \"/workspace/out\""),
        "{learned}"
    );
    let id = asker.call(
        "fs.write",
        json!({"path": "/workspace/out/c.txt", "content": "three"}),
    );
    let r = asker.recv();
    assert_eq!(
        (r["id"].as_u64(), &r["result"]["isError"]),
        (Some(id), &json!(false)),
        "{r}"
    );
    assert_eq!(
        std::fs::read_to_string(ws.join("out/c.txt")).unwrap(),
        "three"
    );
    let screen = s.screen();
    assert!(
        !screen.contains("/workspace/out/c.txt"),
        "not asked again:\n{screen}"
    );
}
