//! A real SMTP server on loopback for tests: Python's aiosmtpd, delivering into a
//! Maildir. Shared by the mail tests and the inbox story (`#[path]` include).
#![allow(dead_code)]

use std::fs;
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::Duration;

fn skip(why: &str) {
    let _ = writeln!(std::io::stderr(), "SKIPPED: {why}");
}

/// aiosmtpd delivering into a Maildir; None (and a printed reason) without it.
pub struct SmtpServer {
    child: Child,
    pub port: u16,
    /// The Maildir the server delivers into.
    pub inbox: PathBuf,
}

impl Drop for SmtpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn smtp_server(dir: &Path) -> Option<SmtpServer> {
    // The first Python that has aiosmtpd: pip's (PATH) or Debian's python3-aiosmtpd.
    let python = ["python3", "/usr/bin/python3"].into_iter().find(|py| {
        Command::new(py)
            .args(["-c", "import aiosmtpd"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    let Some(python) = python else {
        // Straight to stderr, past the test harness's capture, so the skip shows.
        skip("python3 with aiosmtpd is not installed (apt-get install python3-aiosmtpd, or pip install aiosmtpd)");
        return None;
    };
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let inbox = dir.join("smtp-received");
    let child = Command::new(python)
        .args(["-m", "aiosmtpd", "-n", "-l"])
        .arg(format!("127.0.0.1:{port}"))
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
        thread::sleep(Duration::from_millis(100));
    }
    panic!("aiosmtpd did not listen on port {port} within 30 s");
}

/// The messages the server received, as text.
pub fn received(inbox: &Path) -> Vec<String> {
    let Ok(rd) = fs::read_dir(inbox.join("new")) else {
        return Vec::new();
    };
    rd.flatten()
        .map(|e| fs::read_to_string(e.path()).unwrap())
        .collect()
}
