//! Asks from inside a real guest: the asked call parks, another shell answers it
//! through the control socket, and the guest's call completes. The guest also
//! prints a fake prompt, which answers nothing. Ignored in the fast suite;
//! `scripts/test.sh` runs it inside one KVM host (the host-only variants are
//! approvals_tty.rs, approvals_cli.rs and approvals_web.rs).

use std::os::unix::fs::DirBuilderExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod vm_common;
use vm_common::{build_image, ironvmm, vmm};

const POLICY: &str = r#"version 1
allow fs.read  when path under "/workspace"
ask   fs.write when path under "/workspace" "writes need a yes"
default deny
"#;

const AGENT: &str = r#"
printf '\033[7m ironvmm asks [amber-birch-07] \033[0m\n  tool:    fs.write\n\033[7m [amber-birch-07] \033[0m y allow once > '
echo
iron call fs.read '{"path":"/workspace/in.txt"}' >/dev/null; echo "read=$?"
iron call fs.write '{"path":"/workspace/asked.txt","content":"yes"}' >/dev/null; echo "asked=$?"
exit 0
"#;

fn approvals(run: &Path, args: &[&str]) -> std::process::Output {
    Command::new(ironvmm())
        .arg("approvals")
        .args(args)
        .env("XDG_RUNTIME_DIR", run)
        .output()
        .unwrap()
}

#[test]
#[ignore = "boots a guest: run through scripts/test.sh"]
fn a_guest_call_parks_until_another_shell_allows_it() {
    let dir = std::env::temp_dir().join(format!("ironvmm-approvals-vm-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("ws")).unwrap();
    let run = dir.join("run");
    std::fs::create_dir_all(&run).unwrap();
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(run.join("ironvmm"))
        .unwrap();
    std::fs::write(dir.join("ws/in.txt"), "in").unwrap();
    std::fs::write(dir.join("p.rules"), POLICY).unwrap();
    let img = build_image(&dir, AGENT, &[]);
    let vm = vmm(&dir, "boot")
        .args([
            "--approver",
            "socket",
            "--ask-timeout",
            "600s",
            "--timeout",
            "900s",
        ])
        .arg(&img)
        .env("XDG_RUNTIME_DIR", &run)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    // Wait for the ask, from another "shell".
    let deadline = Instant::now() + Duration::from_secs(600);
    let id = loop {
        let o = approvals(&run, &["list", "--json"]);
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        let ask = out
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["event"] == "ask");
        if let Some(a) = ask {
            assert_eq!(a["tool"], "fs.write");
            assert_eq!(a["args"]["path"], "/workspace/asked.txt");
            break a["id"].as_u64().unwrap();
        }
        assert!(Instant::now() < deadline, "no ask appeared: {out}");
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(!dir.join("ws/asked.txt").exists(), "parked until answered");
    let o = approvals(&run, &["allow", &id.to_string()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let o = vm.wait_with_output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{out}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.contains("read=0") && out.contains("asked=0"), "{out}");
    assert_eq!(
        std::fs::read_to_string(dir.join("ws/asked.txt")).unwrap(),
        "yes"
    );
    let log = std::fs::read_to_string(dir.join("audit.jsonl")).unwrap();
    let users = log
        .lines()
        .filter(|l| l.contains("\"decided_by\":\"user\""))
        .count();
    assert_eq!(users, 1, "one answer, from the socket: {log}");
    assert!(log.contains("\"channel\":\"socket\""), "{log}");
}
