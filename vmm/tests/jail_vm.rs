//! `ironvmm run --jail DIR` booting a real guest: the VMM jails itself (seccomp on,
//! as `run` has it) before the first vCPU runs, and the guest's calls still reach
//! the workspace through the descriptors opened before. Ignored in the fast suite
//! (it boots a guest); the same jail without a VM is in jail.rs.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::MetadataExt;
use std::process::Stdio;
use std::sync::mpsc;
use std::time::Duration;

const POLICY: &str = r#"version 1
allow fs.read   when path under "/workspace"
allow fs.write  when path under "/workspace/out"
allow fs.mkdir  when path under "/workspace/out"
allow fs.delete when path under "/workspace/out"
default deny
"#;

const NOBODY: u32 = 65534;

mod common;
mod vm_common;
use common::{assert_verifies, chown_tree};
use vm_common::{build_image, marker, run_cmd};

#[test]
#[ignore = "boots a guest: run through scripts/test.sh"]
fn run_jailed_boots_the_guest_and_serves_its_calls() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "--jail needs root");
    let tmp = tempfile::Builder::new()
        .prefix("ironvmm-jail-vm-")
        .tempdir()
        .unwrap();
    let dir = tmp.path();
    let ws = dir.join("ws");
    std::fs::create_dir_all(ws.join("out")).unwrap();
    std::fs::write(ws.join("hello.txt"), "hello from the host\n").unwrap();
    std::fs::write(ws.join("out/old.txt"), "to the trash\n").unwrap();
    chown_tree(&ws, NOBODY, NOBODY);
    let jail = dir.join("jail");
    std::fs::create_dir(&jail).unwrap();
    std::fs::write(dir.join("p.rules"), POLICY).unwrap();
    let script = r#"
iron call fs.read '{"path":"/workspace/hello.txt"}'; echo "c1=$?"
iron call fs.write '{"path":"/workspace/out/from-guest.txt","content":"written by a jailed VMM"}'; echo "c2=$?"
iron call fs.delete '{"path":"/workspace/out/old.txt"}'; echo "c3=$?"
iron call fs.write '{"path":"/workspace/hello.txt","content":"x"}' 2>/dev/null; echo "c4=$?"
sleep 5
"#;
    let img = build_image(dir, script, &[]);

    let mut child = run_cmd(dir)
        .args(["--timeout", "900s"])
        .arg("--jail")
        .arg(&jail)
        .arg(&img)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    let err = BufReader::new(child.stderr.take().unwrap());
    std::thread::spawn(move || {
        for line in err.lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    // Once jailed (before the first vCPU runs): the VMM's identity and view.
    let mut seen = Vec::new();
    while !seen.iter().any(|l: &String| l.contains("jailed in")) {
        match rx.recv_timeout(Duration::from_secs(600)) {
            Ok(l) => seen.push(l),
            Err(_) => panic!("never jailed; stderr:\n{}", seen.join("\n")),
        }
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let mounts = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap_or_default();
    let code = child.wait().unwrap().code();
    seen.extend(rx.iter());
    let stderr = seen.join("\n");
    assert!(
        status
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>()
                == ["Uid:", "65534", "65534", "65534", "65534"]),
        "{status}"
    );
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("CapEff:") && l.ends_with("0000000000000000")),
        "{status}"
    );
    let root = mounts
        .lines()
        .find(|l| l.split_whitespace().nth(4) == Some("/"))
        .unwrap_or_default();
    assert!(root.contains(" - tmpfs ironvmm-jail "), "{mounts}");

    assert_eq!(code, Some(0), "{stderr}");
    let console = std::fs::read_to_string(dir.join("console.log")).unwrap();
    assert_eq!(marker(&console, "c1"), "0", "{console}");
    assert_eq!(marker(&console, "c2"), "0", "{console}");
    assert_eq!(marker(&console, "c3"), "0", "{console}");
    assert_eq!(marker(&console, "c4"), "3", "{console}");
    let written = ws.join("out/from-guest.txt");
    assert_eq!(
        std::fs::read_to_string(&written).unwrap(),
        "written by a jailed VMM"
    );
    assert_eq!(std::fs::metadata(&written).unwrap().uid(), NOBODY);
    assert!(!ws.join("out/old.txt").exists());
    let trash = dir.join("ws.ironvmm-trash");
    assert_eq!(std::fs::read_dir(&trash).unwrap().count(), 1);
    assert_eq!(std::fs::read_dir(&jail).unwrap().count(), 0);

    // The outputs and the log, written through descriptors opened before the jail.
    let r: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("r.json")).unwrap()).unwrap();
    assert_eq!(r["exit"], serde_json::json!({"kind": "agent", "code": 0}));
    assert_eq!(r["calls"]["allow"], 3, "{r}");
    assert_eq!(r["calls"]["deny"], 1, "{r}");
    assert_verifies(
        &dir.join("audit.jsonl"),
        &["--head", r["audit"]["final_hash"].as_str().unwrap()],
    );
    let log = std::fs::read_to_string(dir.join("audit.jsonl")).unwrap();
    let open: serde_json::Value = serde_json::from_str(log.lines().next().unwrap()).unwrap();
    assert_eq!(open["flags"]["jail_user"], "65534:65534", "{open}");
    assert_eq!(open["flags"]["seccomp"], "on", "{open}");
    assert!(std::fs::read_to_string(dir.join("r.xml"))
        .unwrap()
        .contains("<failure "));
    assert!(!std::fs::read_to_string(dir.join("s.md"))
        .unwrap()
        .is_empty());
}
