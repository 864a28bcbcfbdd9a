//! A real SMTP server on loopback for the mail tests: Python's aiosmtpd delivering
//! into a Maildir. Shared by the gate's mail tests and the ironvmm CLI tests (which
//! include this file by path), so the one way to start it lives once.
#![allow(dead_code)]

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// aiosmtpd listening on 127.0.0.1:`port`, delivering into the Maildir `inbox`.
pub struct SmtpServer {
    child: Child,
    pub port: u16,
    pub inbox: PathBuf,
}

impl Drop for SmtpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Prints a skip reason straight to stderr, past the test harness's capture.
pub fn skip(why: &str) {
    let _ = writeln!(std::io::stderr(), "SKIPPED: {why}");
}

/// Starts aiosmtpd under `dir`; None (and a printed reason) without it.
pub fn smtp_server(dir: &Path) -> Option<SmtpServer> {
    start(dir, None)
}

/// As `smtp_server`, requiring STARTTLS with the certificate and key files `tls`.
pub fn smtp_server_starttls(dir: &Path, tls: (&Path, &Path)) -> Option<SmtpServer> {
    start(dir, Some(tls))
}

fn start(dir: &Path, tls: Option<(&Path, &Path)>) -> Option<SmtpServer> {
    // The first Python that has aiosmtpd: pip's (PATH) or Debian's python3-aiosmtpd.
    let python = ["python3", "/usr/bin/python3"].into_iter().find(|py| {
        Command::new(py)
            .args(["-c", "import aiosmtpd"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    let Some(python) = python else {
        skip("python3 with aiosmtpd is not installed (apt-get install python3-aiosmtpd, or pip install aiosmtpd)");
        return None;
    };
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let inbox = dir.join("smtp-received");
    let mut cmd = Command::new(python);
    cmd.args(["-m", "aiosmtpd", "-n", "-l"])
        .arg(format!("127.0.0.1:{port}"));
    if let Some((cert, key)) = tls {
        // A client that refuses the certificate is expected there: no traceback.
        cmd.arg("--tlscert")
            .arg(cert)
            .arg("--tlskey")
            .arg(key)
            .stderr(Stdio::null());
    }
    let child = cmd
        .args(["-c", "aiosmtpd.handlers.Mailbox"])
        .arg(&inbox)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let server = SmtpServer { child, port, inbox };
    for _ in 0..300 {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Some(server);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("aiosmtpd did not listen on port {port} within 30 s");
}

/// The messages the server has delivered so far, as text.
pub fn received(inbox: &Path) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(inbox.join("new")) else {
        return Vec::new();
    };
    rd.flatten()
        .map(|e| std::fs::read_to_string(e.path()).unwrap())
        .collect()
}
