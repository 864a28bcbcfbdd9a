//! OpenClaw (npm `openclaw` 2026.9.6 on Node.js 26.10.0) playing the inbox story
//! against the real gate, on the host: the same wiring as in a guest, without
//! booting one. `openclaw agent exec` runs one agent turn with
//! examples/openclaw/openclaw.json5: its tools are `iron mcp` (over $IRON_GATE,
//! a Unix socket, instead of the vsock) and its model is the guest proxy's model
//! route (`iron proxy --to unix:` into `ironvmm gate --net-listen`), with a dummy
//! key. The host sends each model request on to the scripted model
//! (examples/inbox/scripted-model.py) with the real key.
//!
//! Asserted on the Maildir, the mail the SMTP server received, the audit log, the
//! model server's log, and everything OpenClaw holds (environment, config, home,
//! temporary files, output): the real key is in none of it.
//!
//! Needs the OpenClaw cache that scripts/openclaw-image.sh --install-only makes
//! ($IRONVMM_OPENCLAW, default ~/.cache/ironvmm/openclaw-2026.9.6), and python3
//! with aiosmtpd. Without them the test prints SKIPPED, and fails instead when
//! IRONVMM_REQUIRE_OPENCLAW=1.

#[path = "../gate/tests/common/smtp.rs"]
mod smtp;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;
mod vm_common;
use common::{
    assert_verifies, copy_dir, iron, iron_proxy, message_ids, net_gate, root, scripted_model,
    Killed,
};
use vm_common::loopback_up;

const VERSION: &str = "2026.9.6";
/// The key the host holds; OpenClaw's side never gets it.
const KEY: &str = "sk-openclaw-story-7d2e9b41c0a5f8e3d6b9a2c4e1f07a3b";
const KEY_ENV: &str = "INBOX_MODEL_KEY";
const STRANGER: &str = "archive@phish.example.net";

/// The cache holding `node/bin/node` and `app/node_modules/openclaw`, or `None`
/// after saying why.
fn openclaw_cache() -> Option<PathBuf> {
    let dir = std::env::var_os("IRONVMM_OPENCLAW")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .map(|h| PathBuf::from(h).join(format!(".cache/ironvmm/openclaw-{VERSION}")))
        });
    let ok = dir.as_ref().is_some_and(|d| {
        d.join("node/bin/node").is_file()
            && d.join("app/node_modules/openclaw/openclaw.mjs").is_file()
    });
    if ok {
        return dir;
    }
    let why = format!(
        "SKIPPED openclaw_agent: no OpenClaw {VERSION} cache at {} \
         (scripts/openclaw-image.sh --install-only, or set IRONVMM_OPENCLAW)",
        dir.map(|d| d.display().to_string()).unwrap_or_default()
    );
    if std::env::var("IRONVMM_REQUIRE_OPENCLAW").as_deref() == Ok("1") {
        panic!("{why}, and IRONVMM_REQUIRE_OPENCLAW=1");
    }
    let _ = writeln!(std::io::stderr(), "{why}");
    None
}

/// Every regular file under `dir`, however deep.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(t) = e.file_type() else { continue };
            if t.is_dir() {
                stack.push(e.path());
            } else if t.is_file() {
                out.push(e.path());
            }
        }
    }
    out
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// `/proc/PID/environ` once the process runs node (the read can come up empty
/// while the exec settles).
fn environ_of(pid: u32) -> Vec<u8> {
    let t = Instant::now();
    loop {
        let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let env = fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        if (contains(&cmdline, "openclaw.mjs") && contains(&env, "HOME="))
            || t.elapsed() > Duration::from_secs(10)
        {
            return env;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The host side of a run: the example's files in a scratch folder, the SMTP
/// server, and the scripted model (holding the real key it expects from the host).
struct Servers {
    smtp: smtp::SmtpServer,
    model: Killed,
}

/// Copies the example into `d` and starts the servers; writes `d/ironvmm.toml`
/// pointed at them. None when aiosmtpd is missing (the skip is printed).
fn servers(d: &Path) -> Option<Servers> {
    let smtp = smtp::smtp_server(d)?;
    let inbox = root().join("examples/inbox");
    for f in ["contacts.txt", "contacts.vcf", "scripted-model.py"] {
        fs::copy(inbox.join(f), d.join(f)).unwrap();
    }
    fs::copy(inbox.join("p.rules"), d.join("p.rules")).unwrap();
    copy_dir(&inbox.join("Maildir"), &d.join("Maildir"));
    let (model, model_port) = scripted_model(d, KEY_ENV, KEY, &[]);
    let toml = fs::read_to_string(inbox.join("ironvmm.toml")).unwrap();
    assert!(toml.contains("tokens = 200000"));
    // OpenClaw sends its whole system prompt and 45 tool schemas every turn
    // (about 110 KB): its 7 turns come close to the example's 200,000 tokens.
    let toml = toml
        .replace("tokens = 200000", "tokens = 2000000")
        .replace("port = 2525", &format!("port = {}", smtp.port))
        .replace("127.0.0.1:8399", &format!("127.0.0.1:{model_port}"));
    fs::write(d.join("ironvmm.toml"), toml).unwrap();
    Some(Servers { smtp, model })
}

/// What a run left: OpenClaw's output, the audit log, the model's log, the mail.
struct Outcome {
    ok: bool,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    audit_text: String,
    audit: Vec<Value>,
    model_log: Vec<Value>,
    received: Vec<String>,
    maildir: PathBuf,
}

impl Outcome {
    /// Stops the servers (the gate has ended) and reads what they left in `d`.
    fn collect(d: &Path, servers: Servers, ok: bool, stdout: Vec<u8>, stderr: Vec<u8>) -> Outcome {
        drop(servers.model);
        let received = smtp::received(&servers.smtp.inbox);
        drop(servers.smtp);
        let audit_path = d.join("audit.jsonl");
        let audit_text = fs::read_to_string(&audit_path).unwrap_or_default();
        assert_verifies(&audit_path, &[]);
        Outcome {
            ok,
            audit: audit_text
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect(),
            audit_text,
            model_log: fs::read_to_string(d.join("model.log"))
                .unwrap_or_default()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect(),
            received,
            maildir: d.join("Maildir"),
            stdout,
            stderr,
        }
    }

    fn decisions(&self, tool: &str) -> Vec<&Value> {
        self.audit
            .iter()
            .filter(|r| r["kind"] == "decision" && r["tool"] == tool)
            .collect()
    }

    fn context(&self) -> String {
        format!(
            "{}\n{}\n{}",
            String::from_utf8_lossy(&self.stdout),
            String::from_utf8_lossy(&self.stderr),
            self.audit_text
        )
    }

    /// OpenClaw's `--json` envelope, also among a console's other lines.
    fn envelope(&self) -> Value {
        let out = String::from_utf8_lossy(&self.stdout);
        let at = out
            .find("{\n  \"ok\"")
            .or_else(|| out.find("{\r\n  \"ok\""))
            .unwrap_or_else(|| panic!("no OpenClaw envelope in:\n{}", self.context()));
        serde_json::Deserializer::from_str(&out[at..])
            .into_iter::<Value>()
            .next()
            .unwrap()
            .unwrap_or_else(|e| panic!("the envelope: {e}\n{}", self.context()))
    }
}

/// The story, as the audit log, the Maildir, the SMTP server and the model saw it.
fn check_story(o: &Outcome) {
    let context = o.context();
    // One agent turn, completed: the model's summary is OpenClaw's answer.
    assert!(o.ok, "openclaw failed:\n{context}");
    let envelope = o.envelope();
    assert_eq!(envelope["ok"], true, "{context}");
    assert_eq!(envelope["provider"], "ironvmm");
    assert!(
        envelope["final"]
            .as_str()
            .unwrap_or_default()
            .starts_with("Summary: replied to Alice"),
        "{context}"
    );

    // ironvmm's tools, as OpenClaw names them; mail.purge, which the policy
    // never allows, was not offered at all.
    let offered: Vec<&str> = o
        .model_log
        .iter()
        .find(|r| r["tools"].as_array().is_some_and(|t| !t.is_empty()))
        .expect("a request with tools")["tools"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .filter(|t| t.starts_with("ironvmm__"))
        .collect();
    for t in [
        "ironvmm__mail-list",
        "ironvmm__mail-read",
        "ironvmm__mail-send",
        "ironvmm__mail-delete",
    ] {
        assert!(offered.contains(&t), "{t} not offered: {offered:?}");
    }
    assert!(!offered.iter().any(|t| t.contains("purge")), "{offered:?}");
    // llm.chat, which the policy allows, is filtered out by the config.
    assert!(!offered.iter().any(|t| t.contains("llm")), "{offered:?}");

    // Reading is allowed: every message was read.
    let reads = o.decisions("mail.read");
    assert_eq!(reads.len(), 4, "{context}");
    assert!(reads.iter().all(|r| r["decision"] == "allow"));

    // The reply to a contact was sent, and only that: the stranger got nothing.
    let sends = o.decisions("mail.send");
    let allowed: Vec<_> = sends.iter().filter(|r| r["decision"] == "allow").collect();
    assert_eq!(allowed.len(), 1, "{sends:?}");
    assert_eq!(allowed[0]["args"]["to"][0], "alice@example.com");
    assert_eq!(o.received.len(), 1, "{:?}", o.received);
    assert!(o.received[0].contains("alice@example.com"));
    assert!(o.received[0].contains("Friday at noon works"));
    assert!(!o.received.iter().any(|m| m.contains(STRANGER)));

    // The forward asked (rule 27: not a contact), and with no approver it was denied.
    let decided: Vec<_> = sends
        .iter()
        .filter(|r| r["args"]["to"][0] == STRANGER)
        .map(|r| {
            (
                r["decision"].as_str().unwrap(),
                r["decided_by"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(decided, [("ask", "rule"), ("deny", "non-interactive")]);

    // The purge never reached the gate: OpenClaw had no such tool to call.
    assert!(o.decisions("mail.purge").is_empty());
    assert!(
        o.model_log
            .iter()
            .any(|r| r["last_tool_result"] == "Tool mail_purge not found"),
        "{:?}",
        o.model_log
    );

    // The delete went to Trash, and nothing is lost.
    let delete = o.decisions("mail.delete");
    assert_eq!(delete.len(), 1, "{context}");
    assert_eq!(delete[0]["decision"], "allow");
    let trash: Vec<String> = files_under(&o.maildir.join(".Trash/cur"))
        .iter()
        .map(|p| fs::read_to_string(p).unwrap())
        .collect();
    assert_eq!(trash.len(), 1);
    assert!(trash[0].contains("phish-1@phish.example.net"));
    let before = message_ids(&root().join("examples/inbox/Maildir"));
    let after = message_ids(&o.maildir);
    assert_eq!(before.len(), 4);
    assert!(
        before.is_subset(&after),
        "lost: {:?}",
        before.difference(&after)
    );
    assert_eq!(files_under(&o.maildir.join(".Sent/cur")).len(), 1);

    // Every model request went through the proxy's route, decided as llm.chat.
    let chats = o.decisions("llm.chat");
    assert!(chats.len() >= 6, "{context}");
    assert!(chats.iter().all(|r| r["decision"] == "allow"
        && r["args"]["provider"] == "scripted"
        && r["args"]["model"] == "scripted-inbox-agent"
        && r["args"]["path"] == "/chat/completions"));
    let spends = o.audit.iter().filter(|r| r["kind"] == "llm").count();
    assert_eq!(spends, chats.len());

    // The model got the real key on every request (the host put it there), and
    // the key is neither in what OpenClaw printed nor in the audit log.
    assert_eq!(o.model_log.len(), chats.len(), "{:?}", o.model_log);
    assert!(
        o.model_log
            .iter()
            .all(|r| r["auth_ok"] == true && r["stream"] == true),
        "{:?}",
        o.model_log
    );
    for (what, bytes) in [
        ("openclaw's stdout", o.stdout.as_slice()),
        ("openclaw's stderr", o.stderr.as_slice()),
        ("the audit log", o.audit_text.as_bytes()),
    ] {
        assert!(!contains(bytes, KEY), "the key is in {what}");
    }
}

/// Runs `cmd` to its end (at most `limit`), its output read as it comes.
fn run(mut cmd: Command, limit: Duration, on_start: impl FnOnce(u32)) -> (bool, Vec<u8>, Vec<u8>) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    on_start(child.id());
    let (mut out, mut err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let out_t = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = std::io::Read::read_to_end(&mut out, &mut b);
        b
    });
    let err_t = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = std::io::Read::read_to_end(&mut err, &mut b);
        b
    });
    let t = Instant::now();
    while child.try_wait().unwrap().is_none() && t.elapsed() < limit {
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let ok = child.wait().unwrap().success();
    (ok, out_t.join().unwrap(), err_t.join().unwrap())
}

#[test]
fn openclaw_falls_for_the_injection_and_the_policy_holds() {
    let Some(cache) = openclaw_cache() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let Some(servers) = servers(d) else {
        return;
    };
    let iron = iron();

    // The gate: tools on one socket, the guest proxy's port 2 on another.
    let (sock, net_sock) = (d.join("gate.sock"), d.join("net.sock"));
    let mut gate = net_gate(d, KEY_ENV, KEY);

    // The guest's proxy relay, on a loopback port of its own.
    let (_proxy, proxy_port) = iron_proxy(&iron, &net_sock, &[KEY_ENV]);

    // The guest's OpenClaw configuration, pointed at this run's proxy and gate.
    let example = root().join("examples/openclaw");
    let config = fs::read_to_string(example.join("openclaw.json5")).unwrap();
    assert!(config.contains("http://127.0.0.1:3128/llm/scripted"));
    assert!(config.contains(r#"command: "/bin/iron", args: ["mcp"],"#));
    let config = config
        .replace("127.0.0.1:3128", &format!("127.0.0.1:{proxy_port}"))
        .replace(
            r#"command: "/bin/iron", args: ["mcp"],"#,
            &format!(
                r#"command: {:?}, args: ["mcp"], env: {{ IRON_GATE: "unix:{}" }},"#,
                iron.display().to_string(),
                sock.display()
            ),
        );
    let oc = d.join("openclaw");
    for sub in ["home", "tmp", "work"] {
        fs::create_dir_all(oc.join(sub)).unwrap();
    }
    fs::write(oc.join("openclaw.json5"), &config).unwrap();

    // OpenClaw with nothing of the host's environment, as agent.sh runs it in a guest.
    let mut cmd = Command::new(cache.join("node/bin/node"));
    cmd.arg(cache.join("app/node_modules/openclaw/openclaw.mjs"))
        .args(["agent", "exec", "--config"])
        .arg(oc.join("openclaw.json5"))
        .arg("--cwd")
        .arg(oc.join("work"))
        .args(["--code-mode", "direct", "--json", "--timeout", "300"])
        .arg("--message-file")
        .arg(example.join("task.md"))
        .env_clear()
        .env(
            "PATH",
            format!("{}:/usr/bin:/bin", cache.join("node/bin").display()),
        )
        .env("HOME", oc.join("home"))
        .env("TMPDIR", oc.join("tmp"));
    // Its environment as the kernel has it, read while it runs.
    let mut environ = Vec::new();
    let (ok, stdout, stderr) = run(cmd, Duration::from_secs(420), |pid| {
        environ = environ_of(pid)
    });

    // SIGTERM: the gate writes its close record.
    // SAFETY: kill(2) on our own child's pid, which has not been waited for yet.
    unsafe { libc::kill(gate.0.id() as i32, libc::SIGTERM) };
    let _ = gate.0.wait();
    let o = Outcome::collect(d, servers, ok, stdout, stderr);
    check_story(&o);

    // OpenClaw never had the key: not in its environment, config, home or
    // temporary files.
    assert!(!environ.is_empty(), "/proc/PID/environ was not read");
    assert!(
        !contains(&environ, KEY),
        "the key is in openclaw's environment"
    );
    let checked = files_under(&oc)
        .iter()
        .inspect(|f| {
            let bytes = fs::read(f).unwrap_or_default();
            assert!(!contains(&bytes, KEY), "the key is in {}", f.display());
        })
        .count();
    assert!(checked >= 2, "openclaw left no files to check");
}

/// The image scripts/openclaw-image.sh built: `$IRONVMM_OPENCLAW_IMAGE`, else its
/// default path.
fn openclaw_image() -> PathBuf {
    let p = std::env::var_os("IRONVMM_OPENCLAW_IMAGE")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target/openclaw/guest-openclaw.img"));
    assert!(
        p.is_file(),
        "{} is missing: build it with scripts/openclaw-image.sh --kernel K -o {} \
         (or set IRONVMM_OPENCLAW_IMAGE)",
        p.display(),
        p.display()
    );
    p
}

#[test]
#[ignore = "boots a 3 GB OpenClaw guest: run through scripts/kvm-host/cargo-test.sh after scripts/openclaw-image.sh"]
fn openclaw_in_a_guest_meets_the_policy_and_never_holds_the_key() {
    let img = openclaw_image();
    loopback_up();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let servers = servers(d).expect("python3 with aiosmtpd");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ironvmm"));
    cmd.arg("boot")
        .arg("--policy")
        .arg(d.join("p.rules"))
        .arg("--config")
        .arg(d.join("ironvmm.toml"))
        .arg("--audit")
        .arg(d.join("audit.jsonl"))
        .args(["--timeout", "2100s"])
        .arg(&img)
        .env(KEY_ENV, KEY)
        .env("XDG_RUNTIME_DIR", d);
    let t = Instant::now();
    let (ok, stdout, stderr) = run(cmd, Duration::from_secs(2200), |_| {});
    let _ = writeln!(std::io::stderr(), "openclaw guest: {:?}", t.elapsed());
    let o = Outcome::collect(d, servers, ok, stdout, stderr);
    // The console is the guest's: the key is not in it (check_story), nor was it
    // ever in the guest's image or environment, which the host never gave it.
    check_story(&o);
    assert!(!contains(&fs::read(&img).unwrap(), KEY));
    // The timeline of a passing run (docs/agents/openclaw.md), seen with --nocapture:
    // the console and the audit log, both checked above to hold no key.
    eprintln!("--- console, then the audit log\n{}", o.context());
}
