//! `ironvmm approvals serve`: the token, CSRF and Host checks over raw HTTP, and a
//! real headless Chromium that sees a pending ask, clicks allow, and so completes
//! the parked call. The Chromium test keeps screenshots in target/tmp/.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::fd::FromRawFd;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use base64::Engine;
use ironvmm_gate::approvals::socket::ControlSocket;
use ironvmm_gate::approvals::{ApprovalHub, HubConfig, Mode};
use ironvmm_gate::gate::approver::{Answer, Approver, AskRequest};
use ironvmm_gate::gate::DecidedBy;
use serde_json::{json, Value};

struct Served {
    _dir: tempfile::TempDir,
    hub: ApprovalHub,
    _sock: ControlSocket,
    serve: Child,
    url: String,
    port: u16,
    token: String,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.serve.kill();
        let _ = self.serve.wait();
    }
}

/// A VM's hub and control socket in a private runtime folder, and
/// `ironvmm approvals serve` over it.
fn served(vm: &str) -> Served {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("ironvmm");
    std::fs::DirBuilder::new().mode(0o700).create(&run).unwrap();
    let hub = ApprovalHub::new(HubConfig::new(vm, Mode::Socket));
    let sock = ControlSocket::start(hub.clone(), &run.join(format!("{vm}.sock"))).unwrap();
    let mut serve = Command::new(env!("CARGO_BIN_EXE_ironvmm"))
        .args(["approvals", "serve", "--listen", "127.0.0.1:0"])
        .env("XDG_RUNTIME_DIR", dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(serve.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line.trim().to_string();
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");
    let port: u16 = url["http://127.0.0.1:".len()..]
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let token = url.split("token=").nth(1).unwrap().to_string();
    assert_eq!(token.len(), 32, "a 128-bit token");
    Served {
        _dir: dir,
        hub,
        _sock: sock,
        serve,
        url,
        port,
        token,
    }
}

fn ask(hub: &ApprovalHub, path: &str) -> mpsc::Receiver<Answer> {
    let (tx, rx) = mpsc::channel();
    hub.ask(
        AskRequest {
            ask_seq: 4,
            conn: "vsock:1".into(),
            rpc_id: json!(1),
            tool: "fs.write".into(),
            args: json!({"path": path, "content": "<img src=x onerror=alert(1)>"}),
            rule: Some(3),
            reason: "writes outside out/ need a yes".into(),
        },
        Box::new(move |a| {
            let _ = tx.send(a);
        }),
    );
    rx
}

/// One raw HTTP exchange; returns (status code, body).
fn http(port: u16, raw: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(raw.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let code = out.split(' ').nth(1).unwrap_or("0").parse().unwrap_or(0);
    let body = out.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (code, body)
}

#[test]
fn requests_without_the_token_or_from_elsewhere_are_refused() {
    let s = served("webvm1");
    let host = format!("127.0.0.1:{}", s.port);
    let t = &s.token;
    // no token, wrong token
    let (c, body) = http(s.port, &format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n"));
    assert_eq!(c, 403);
    assert!(body.contains("token"), "{body}");
    let (c, _) = http(
        s.port,
        &format!("GET /?token=00{} HTTP/1.1\r\nHost: {host}\r\n\r\n", &t[2..]),
    );
    assert_eq!(c, 403);
    let (c, _) = http(
        s.port,
        &format!("GET /api/state HTTP/1.1\r\nHost: {host}\r\n\r\n"),
    );
    assert_eq!(c, 403);
    // the API does not take the token from the URL
    let (c, _) = http(
        s.port,
        &format!("GET /api/state?token={t} HTTP/1.1\r\nHost: {host}\r\n\r\n"),
    );
    assert_eq!(c, 403);
    // with it
    let (c, body) = http(
        s.port,
        &format!("GET /?token={t} HTTP/1.1\r\nHost: {host}\r\n\r\n"),
    );
    assert_eq!(c, 200);
    assert!(body.contains("ironvmm approvals"));
    let (c, _) = http(
        s.port,
        &format!("GET /api/state HTTP/1.1\r\nHost: {host}\r\nX-Ironvmm-Token: {t}\r\n\r\n"),
    );
    assert_eq!(c, 200);
    // DNS rebinding: another Host, even with the token
    let (c, _) = http(
        s.port,
        &format!(
            "GET /?token={t} HTTP/1.1\r\nHost: evil.example:{}\r\n\r\n",
            s.port
        ),
    );
    assert_eq!(c, 403);
    // CSRF: another origin, or a form post (no header, not JSON)
    let rx = ask(&s.hub, "/workspace/a");
    let id = s.hub.pending()[0].id;
    let body = json!({"vm": "webvm1", "id": id, "allow": true}).to_string();
    let post = |extra: &str, ctype: &str| {
        format!(
            "POST /api/answer HTTP/1.1\r\nHost: {host}\r\n{extra}Content-Type: {ctype}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    let (c, _) = http(
        s.port,
        &post(
            &format!("X-Ironvmm-Token: {t}\r\nOrigin: http://evil.example\r\n"),
            "application/json",
        ),
    );
    assert_eq!(c, 403);
    let (c, _) = http(s.port, &post("", "application/x-www-form-urlencoded"));
    assert_eq!(c, 403);
    let (c, _) = http(
        s.port,
        &post(&format!("X-Ironvmm-Token: {t}\r\n"), "text/plain"),
    );
    assert_eq!(c, 415);
    assert!(rx.try_recv().is_err(), "none of those answered the ask");
    // the page's own request answers it (the VM may take a moment to be found)
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (c, reply) = http(
            s.port,
            &post(
                &format!("X-Ironvmm-Token: {t}\r\nOrigin: http://{host}\r\n"),
                "application/json",
            ),
        );
        assert_eq!(c, 200);
        let v: Value = serde_json::from_str(&reply).unwrap();
        if v["event"] == "decided" {
            break;
        }
        assert!(Instant::now() < deadline, "{reply}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let a = rx.recv_timeout(Duration::from_secs(20)).unwrap();
    assert!(a.allow);
    assert_eq!(
        (a.answerer.by, a.answerer.channel.as_str()),
        (DecidedBy::User, "web")
    );
}

/// A tiny Chrome DevTools Protocol client over `--remote-debugging-pipe`.
struct Cdp {
    child: Child,
    w: File,
    r: BufReader<File>,
    next: u64,
}

impl Cdp {
    fn launch(profile: &Path) -> Cdp {
        let mut to_child = [0i32; 2];
        let mut from_child = [0i32; 2];
        // SAFETY: pipe2 fills two fds; they are owned below.
        unsafe {
            assert_eq!(libc::pipe2(to_child.as_mut_ptr(), libc::O_CLOEXEC), 0);
            assert_eq!(libc::pipe2(from_child.as_mut_ptr(), libc::O_CLOEXEC), 0);
        }
        let (cr, cw) = (to_child[0], from_child[1]);
        let mut cmd = Command::new("chromium");
        cmd.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1100,900",
            "--remote-debugging-pipe",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg("about:blank")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        // SAFETY: only dup/dup2 between fork and exec. The pipe ends go to fds 3
        // (commands in) and 4 (replies out), as the pipe protocol wants.
        unsafe {
            cmd.pre_exec(move || {
                let a = libc::fcntl(cr, libc::F_DUPFD, 10);
                let b = libc::fcntl(cw, libc::F_DUPFD, 10);
                if a < 0 || b < 0 || libc::dup2(a, 3) < 0 || libc::dup2(b, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => panic!(
                "cannot start chromium ({e}): install it (apt-get install chromium; .ci/run does)"
            ),
        };
        // SAFETY: closing the child's ends here, and taking ownership of ours.
        let (w, r) = unsafe {
            libc::close(cr);
            libc::close(cw);
            (
                File::from_raw_fd(to_child[1]),
                File::from_raw_fd(from_child[0]),
            )
        };
        Cdp {
            child,
            w,
            r: BufReader::new(r),
            next: 1,
        }
    }

    fn call(&mut self, session: Option<&str>, method: &str, params: Value) -> Value {
        let id = self.next;
        self.next += 1;
        let mut m = json!({"id": id, "method": method, "params": params});
        if let Some(s) = session {
            m["sessionId"] = json!(s);
        }
        let mut bytes = m.to_string().into_bytes();
        bytes.push(0);
        self.w.write_all(&bytes).unwrap();
        loop {
            let mut buf = Vec::new();
            let n = self.r.read_until(0, &mut buf).unwrap();
            assert!(n > 0, "chromium closed the pipe");
            buf.pop();
            let v: Value = serde_json::from_slice(&buf).unwrap();
            if v["id"] == json!(id) {
                assert!(v.get("error").is_none(), "{method}: {v}");
                return v["result"].clone();
            }
        }
    }

    fn eval(&mut self, session: &str, js: &str) -> Value {
        let r = self.call(
            Some(session),
            "Runtime.evaluate",
            json!({"expression": js, "returnByValue": true, "awaitPromise": true}),
        );
        r["result"]["value"].clone()
    }

    fn wait_for(&mut self, session: &str, js: &str, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.eval(session, js) != json!(true) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn screenshot(&mut self, session: &str, to: &Path) {
        let r = self.call(
            Some(session),
            "Page.captureScreenshot",
            json!({"format": "png"}),
        );
        let png = base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().unwrap())
            .unwrap();
        assert!(png.starts_with(b"\x89PNG"));
        std::fs::write(to, png).unwrap();
    }
}

impl Drop for Cdp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn artifact(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

#[test]
fn chromium_sees_the_ask_clicks_allow_and_the_call_completes() {
    if std::env::var_os("IRONVMM_SKIP_BROWSER_TESTS").is_some() {
        eprintln!("IRONVMM_SKIP_BROWSER_TESTS is set: skipping the Chromium test");
        return;
    }
    let s = served("webvm2");
    let rx = ask(&s.hub, "/workspace/report.txt");
    let profile = tempfile::tempdir().unwrap();
    let mut cdp = Cdp::launch(profile.path());
    let target = cdp.call(None, "Target.createTarget", json!({"url": s.url}));
    let tid = target["targetId"].as_str().unwrap().to_string();
    let att = cdp.call(
        None,
        "Target.attachToTarget",
        json!({"targetId": tid, "flatten": true}),
    );
    let session = att["sessionId"].as_str().unwrap().to_string();

    cdp.wait_for(
        &session,
        "!!document.querySelector('.ask[data-tool=\"fs.write\"] [data-action=allow]')",
        "the pending ask on the page",
    );
    // the guest's arguments are shown as text, never as markup
    assert_eq!(
        cdp.eval(&session, "document.querySelectorAll('.ask img').length"),
        json!(0)
    );
    assert_eq!(
        cdp.eval(
            &session,
            "document.querySelector('.ask pre').textContent.includes('/workspace/report.txt')"
        ),
        json!(true)
    );
    cdp.screenshot(&session, &artifact("approvals-web-pending.png"));
    assert!(rx.try_recv().is_err(), "still parked before the click");

    cdp.eval(
        &session,
        "document.querySelector('[data-action=allow]').click(), true",
    );
    let a = rx.recv_timeout(Duration::from_secs(30)).unwrap();
    assert!(a.allow, "{a:?}");
    assert_eq!(
        (a.answerer.by, a.answerer.channel.as_str()),
        (DecidedBy::User, "web")
    );
    cdp.wait_for(
        &session,
        "document.getElementById('feed').textContent.includes('answered: allow fs.write (by user via web)')",
        "the decision in the feed",
    );
    cdp.screenshot(&session, &artifact("approvals-web-answered.png"));
    let _ = cdp.call(None, "Browser.close", json!({}));
}
