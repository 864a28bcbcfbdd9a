//! The gate from inside a real guest: every request leaves the VM as a vsock frame,
//! is decided, served and audited. Ignored in the fast suite; `scripts/test.sh`
//! runs them inside one KVM host (the same calls through the host-only gate are in
//! gate_*.rs).

use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::symlink;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;
mod vm_common;
use common::assert_verifies;
use vm_common::{
    audit_records, boot_with_services, build_image, decision_for, ironvmm, loopback_up, marker,
    run_cmd, scratch, vmm,
};

const POLICY: &str = r#"version 1
allow fs.read  when path under "/workspace"
allow fs.write when path under "/workspace/out"
allow fs.list  when path under "/workspace"
allow fs.stat  when path under "/workspace"
allow fs.mkdir when path under "/workspace/out"
default deny
"#;

/// Builds an image running `script` and boots it with the workspace `dir/ws`.
fn run_agent(dir: &Path, script: &str) -> (Output, String, String) {
    run_agent_watching(dir, script, |_, _| {})
}

/// As `run_agent`, calling `watch(line, pid)` on each line of the guest's console as
/// it comes, while the VMM (`pid`) runs.
fn run_agent_watching(
    dir: &Path,
    script: &str,
    watch: impl FnMut(&str, u32),
) -> (Output, String, String) {
    run_agent_with(dir, script, POLICY, &[], &[], watch)
}

/// As `run_agent_watching`, under `policy`, with more `image build` and `boot`
/// arguments.
fn run_agent_with(
    dir: &Path,
    script: &str,
    policy: &str,
    image_args: &[String],
    boot_args: &[String],
    mut watch: impl FnMut(&str, u32),
) -> (Output, String, String) {
    std::fs::write(dir.join("p.rules"), policy).unwrap();
    let img = build_image(dir, script, image_args);
    let mut child = vmm(dir, "boot")
        .args(["--audit-sync", "batch", "--timeout", "1200s"])
        .args(boot_args)
        .arg(&img)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut stderr = child.stderr.take().unwrap();
    let err_reader = std::thread::spawn(move || {
        let mut e = Vec::new();
        let _ = stderr.read_to_end(&mut e);
        e
    });
    let mut stdout = Vec::new();
    let mut lines = BufReader::new(child.stdout.take().unwrap());
    let mut line = Vec::new();
    while lines.read_until(b'\n', &mut line).unwrap_or(0) > 0 {
        watch(String::from_utf8_lossy(&line).trim(), pid);
        stdout.append(&mut line);
    }
    let status = child.wait().unwrap();
    let o = Output {
        status,
        stdout,
        stderr: err_reader.join().unwrap(),
    };
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    (o, out, err)
}

/// CPU time (user + system) of the VMM's vsock device thread so far.
fn vsock_thread_cpu(pid: u32) -> Duration {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let task = task.unwrap().path();
        if std::fs::read_to_string(task.join("comm"))
            .unwrap_or_default()
            .trim()
            != "vsock"
        {
            continue;
        }
        let stat = std::fs::read_to_string(task.join("stat")).unwrap();
        // Fields after the ")" that ends the name: state is 3rd, utime 14th, stime 15th.
        let rest: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
        let ticks: u64 = rest[11].parse::<u64>().unwrap() + rest[12].parse::<u64>().unwrap();
        return Duration::from_millis(ticks * 1000 / hz);
    }
    panic!("no vsock thread in /proc/{pid}/task");
}

/// The VMM's resident memory in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
#[ignore = "boots a guest: run through scripts/test.sh"]
fn workspace_reads_and_writes_follow_the_policy_and_are_audited() {
    let tmp = scratch("rw");
    let dir = tmp.path();
    std::fs::write(dir.join("ws/hello.txt"), "hello from the host\n").unwrap();
    std::fs::write(dir.join("secret.txt"), "host secret\n").unwrap();
    // A symlink inside the workspace pointing outside it: the policy allows the path,
    // the fs service must still refuse to follow it.
    symlink(dir.join("secret.txt"), dir.join("ws/escape")).unwrap();
    let (o, out, err) = run_agent(
        dir,
        r#"
iron call fs.read '{"path":"/workspace/hello.txt"}'; echo "read_ok=$?"
iron call fs.read '{"path":"/etc/passwd"}' 2>/dev/null; echo "read_outside=$?"
iron call fs.read '{"path":"/workspace/../../etc/shadow"}' 2>/dev/null; echo "read_climb=$?"
iron call fs.read '{"path":"/workspace/escape"}' 2>/dev/null; echo "read_symlink=$?"
iron call fs.mkdir '{"path":"/workspace/out"}'; echo "mkdir=$?"
iron call fs.write '{"path":"/workspace/out/result.txt","content":"written by the guest\n"}'; echo "write_ok=$?"
iron call fs.write '{"path":"/workspace/hello.txt","content":"overwrite"}' 2>/dev/null; echo "write_denied=$?"
exit 0
"#,
    );
    assert_eq!(o.status.code(), Some(0), "{out}\n{err}");
    assert!(out.contains("hello from the host"), "{out}");
    assert_eq!(marker(&out, "read_ok"), "0");
    assert_eq!(marker(&out, "read_outside"), "3", "denied → iron exits 3");
    assert_eq!(marker(&out, "read_climb"), "3");
    assert_ne!(
        marker(&out, "read_symlink"),
        "0",
        "a symlink out of the workspace must not be followed"
    );
    assert!(!out.contains("host secret"), "{out}");
    assert_eq!(marker(&out, "mkdir"), "0");
    assert_eq!(marker(&out, "write_ok"), "0");
    assert_eq!(marker(&out, "write_denied"), "3");
    assert_eq!(
        std::fs::read_to_string(dir.join("ws/out/result.txt")).unwrap(),
        "written by the guest\n"
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("ws/hello.txt")).unwrap(),
        "hello from the host\n"
    );

    let recs = audit_records(dir);
    assert_eq!(recs.first().unwrap()["kind"], "open");
    assert_eq!(recs.last().unwrap()["kind"], "close");
    let decisions: Vec<_> = recs.iter().filter(|r| r["kind"] == "decision").collect();
    let find = |path: &str| {
        decisions
            .iter()
            .find(|r| r["args"]["path"] == path)
            .unwrap_or_else(|| panic!("no decision for {path}"))
    };
    assert_eq!(find("/workspace/hello.txt")["decision"], "allow");
    assert_eq!(find("/workspace/hello.txt")["rule"], 2);
    assert_eq!(find("/etc/passwd")["decision"], "deny");
    assert_eq!(find("/etc/passwd")["decided_by"], "default");
    assert_verifies(&dir.join("audit.jsonl"), &[]);

    // Tampering with any decision is detected.
    let text = std::fs::read_to_string(dir.join("audit.jsonl")).unwrap();
    let tampered = text.replacen("\"decision\":\"deny\"", "\"decision\":\"allow\"", 1);
    assert_ne!(text, tampered);
    std::fs::write(dir.join("tampered.jsonl"), tampered).unwrap();
    let v = Command::new(ironvmm())
        .args(["audit", "verify"])
        .arg(dir.join("tampered.jsonl"))
        .output()
        .unwrap();
    assert!(!v.status.success(), "a tampered log verified");
}

#[test]
#[ignore = "boots a guest: run through scripts/test.sh"]
fn ten_thousand_calls_in_a_row_and_a_hundred_connections() {
    let tmp = scratch("many");
    let dir = tmp.path();
    let (o, out, err) = run_agent(
        dir,
        r#"
iron bench -n 10000 -c 1 --tool fs.stat --args '{"path":"/workspace"}' > /tmp/one.json; echo "bench1=$?"
tail -n1 /tmp/one.json | sed 's/^/one_json=/'
iron bench -n 1000 -c 100 --tool fs.stat --args '{"path":"/workspace"}' > /tmp/hundred.json; echo "bench100=$?"
tail -n1 /tmp/hundred.json | sed 's/^/hundred_json=/'
exit 0
"#,
    );
    assert_eq!(o.status.code(), Some(0), "{out}\n{err}");
    assert_eq!(marker(&out, "bench1"), "0", "{out}");
    assert_eq!(marker(&out, "bench100"), "0", "{out}");
    let one: serde_json::Value = serde_json::from_str(marker(&out, "one_json")).unwrap();
    let hundred: serde_json::Value = serde_json::from_str(marker(&out, "hundred_json")).unwrap();
    eprintln!("1 connection: {one}\n100 connections: {hundred}");
    let decisions = audit_records(dir)
        .iter()
        .filter(|r| r["kind"] == "decision" && r["decision"] == "allow")
        .count();
    let outcomes = audit_records(dir)
        .iter()
        .filter(|r| r["kind"] == "outcome" && r["status"] == "ok")
        .count();
    assert_eq!(
        decisions, 11_000,
        "every call decided and audited, none lost"
    );
    assert_eq!(outcomes, 11_000);
    assert_verifies(&dir.join("audit.jsonl"), &[]);
}

#[test]
#[ignore = "boots a guest: run through scripts/test.sh"]
fn hostile_frames_get_errors_and_the_gate_keeps_serving() {
    let tmp = scratch("hostile");
    let dir = tmp.path();
    std::fs::write(dir.join("ws/ok.txt"), "still fine\n").unwrap();
    // While the flood holds: the device thread's CPU time and the VMM's memory. Under
    // emulation on a loaded machine the flood may still be arriving when the guest
    // says it holds, so the device is watched in 1 s windows until one is quiet
    // (the guest sleeps meanwhile); a spinning thread never has a quiet window.
    let mut rss_before: Option<u64> = None;
    let mut held: Option<(Duration, Duration, u64, u64)> = None;
    let watch = |line: &str, pid: u32| match line {
        "flood_holding" => rss_before = Some(rss_kib(pid)),
        "flood_still_holding" => {
            let rss0 = rss_before.expect("flood_holding came first");
            let give_up = Instant::now() + Duration::from_secs(20);
            loop {
                let (t0, cpu0) = (Instant::now(), vsock_thread_cpu(pid));
                std::thread::sleep(Duration::from_secs(1));
                let window = (t0.elapsed(), vsock_thread_cpu(pid) - cpu0);
                held = Some((window.0, window.1, rss0, rss_kib(pid)));
                if window.1 < window.0 / 4 || Instant::now() > give_up {
                    break;
                }
            }
        }
        _ => {}
    };
    let (o, out, err) = run_agent_watching(
        dir,
        r#"
printf 'this is not json\n' | iron send | sed 's/^/malformed=/'
printf '{"jsonrpc":"2.0","id":1,"id":2,"method":"ping"}\n' | iron send | sed 's/^/dupkeys=/'
printf '{"jsonrpc":"2.0","id":1,"method":"p\xff\xfe"}\n' | iron send | sed 's/^/badutf8=/'
printf '[{"jsonrpc":"2.0","id":1,"method":"ping"}]\n' | iron send | sed 's/^/batch=/'
awk 'BEGIN { s = "["; for (i = 0; i < 100; i++) s = s "["; print s }' | iron send | sed 's/^/deep=/'
head -c 4000000 /dev/zero | tr '\0' 'a' | iron send > /tmp/toolong; echo "toolong_rc=$?"
cut -c1-200 /tmp/toolong | sed 's/^/toolong=/'
printf '{"jsonrpc":"2.0","id":7,"method":"pi' | iron send; echo "midframe_rc=$?"
printf '{"jsonrpc":"2.0","id":1,"method":"ping"}\n' | iron send --port 9; echo "otherport_rc=$?"
# A guest that floods requests and never reads its replies: it blocks on its own
# full window; the VMM neither spins nor buffers without bound, and serves others.
yes '{"jsonrpc":"2.0","id":1,"method":"ping"}' | head -n 20000 | iron send --no-read 60 &
flood=$!
sleep 2
echo flood_holding
sleep 5
echo flood_still_holding
# The host watches the device while this sleeps.
sleep 25
iron call fs.read '{"path":"/workspace/ok.txt"}'; echo "after_rc=$?"
kill $flood 2>/dev/null
exit 0
"#,
        watch,
    );
    assert_eq!(o.status.code(), Some(0), "{out}\n{err}");
    // A guest that floods and never reads is held by its credit: the device thread
    // sleeps (a spinning one would use most of the wall time) and nothing piles up.
    let (wall, cpu, rss0, rss1) = held.expect("the flood was watched");
    assert!(
        cpu < wall / 4,
        "the device thread spun: {cpu:?} of CPU in {wall:?}"
    );
    assert!(
        rss1 < rss0 + 32 * 1024,
        "the VMM grew from {rss0} KiB to {rss1} KiB while the flood was held"
    );
    eprintln!("flood held {wall:?}: vsock thread {cpu:?} CPU, RSS {rss0} -> {rss1} KiB");
    let code = |name: &str| -> i64 {
        let v: serde_json::Value = serde_json::from_str(marker(&out, name))
            .unwrap_or_else(|e| panic!("{name}: {e}\n{out}"));
        v["error"]["code"]
            .as_i64()
            .unwrap_or_else(|| panic!("{name}: no error code in {v}"))
    };
    assert_eq!(code("malformed"), -32700);
    assert_eq!(code("dupkeys"), -32700);
    assert_eq!(code("badutf8"), -32700);
    assert_eq!(code("batch"), -32600);
    assert_eq!(code("deep"), -32600);
    assert!(marker(&out, "toolong").contains("-32600"), "{out}");
    // 4 MB is past the 1 MiB limit and the 256 KiB credit window together, so the
    // sender is still writing when the gate resets the connection: iron send prints
    // the answer and reports the broken connection (4).
    assert_eq!(marker(&out, "toolong_rc"), "4", "{out}");
    assert_eq!(
        marker(&out, "midframe_rc"),
        "0",
        "a half frame gets no reply and no crash"
    );
    assert_eq!(
        marker(&out, "otherport_rc"),
        "5",
        "any port but 1 is refused"
    );
    assert!(out.contains("still fine"), "{out}");
    assert_eq!(marker(&out, "after_rc"), "0");
}

/// `iron mcp` in the guest as an MCP client's stdio server: the session the official
/// Python SDK opens (tests/mcp_sdk/client.py against the host-only gate, in
/// gate_mcp_sdk.rs) goes through the bridge and the vsock unchanged, and a denial
/// comes back as a tool result. The guest has no Python, so the SDK's messages are
/// replayed as lines.
#[test]
#[ignore = "boots a guest: run through scripts/test.sh"]
fn iron_mcp_bridges_an_mcp_session_with_denials_as_tool_results() {
    let tmp = scratch("mcp");
    let dir = tmp.path();
    std::fs::write(dir.join("ws/hello.txt"), "hello from the host\n").unwrap();
    let (o, out, err) = run_agent(
        dir,
        r#"
printf '%s\n' \
 '{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"mcp","version":"0"}}}' \
 '{"jsonrpc":"2.0","method":"notifications/initialized"}' \
 '{"jsonrpc":"2.0","id":1,"method":"tools/list"}' \
 '{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"fs.read","arguments":{"path":"/workspace/hello.txt"}}}' \
 '{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"fs.write","arguments":{"path":"/workspace/hello.txt","content":"x"}}}' \
 '{"jsonrpc":"2.0","id":4,"method":"tools/call","params":{"name":"fs.read","arguments":{"path":7}}}' \
 '{"jsonrpc":"2.0","id":5,"method":"tools/call","params":{"name":"no.such_tool","arguments":{}}}' \
 | iron mcp | sed 's/^/mcp=/'
echo "mcp_rc=$?"
exit 0
"#,
    );
    assert_eq!(o.status.code(), Some(0), "{out}\n{err}");
    assert_eq!(marker(&out, "mcp_rc"), "0", "{out}");
    let replies: Vec<serde_json::Value> = out
        .lines()
        .filter_map(|l| l.trim().strip_prefix("mcp="))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let by_id = |id: u64| {
        replies
            .iter()
            .find(|r| r["id"] == id)
            .unwrap_or_else(|| panic!("no reply {id} in:\n{out}"))
    };
    assert_eq!(replies.len(), 6, "{out}");
    assert_eq!(by_id(0)["result"]["protocolVersion"], "2025-11-25");
    assert_eq!(by_id(0)["result"]["serverInfo"]["name"], "ironvmm");
    assert!(by_id(1)["result"]["tools"].as_array().unwrap().len() >= 4);
    let ok = &by_id(2)["result"];
    assert_eq!(ok["isError"], false);
    assert_eq!(ok["structuredContent"]["content"], "hello from the host\n");
    let denied = &by_id(3)["result"];
    assert_eq!(denied["isError"], true);
    assert_eq!(
        denied["structuredContent"],
        serde_json::json!({"decision": "deny", "rule": null, "decided_by": "default", "reason": "no rule matched: default deny"})
    );
    assert_eq!(
        denied["content"][0]["text"],
        "denied (decided by default): no rule matched: default deny"
    );
    let invalid = &by_id(4)["result"];
    assert_eq!(invalid["isError"], true);
    assert_eq!(invalid["structuredContent"]["decided_by"], "invariant");
    assert_eq!(by_id(5)["error"]["code"], -32602);
    assert_eq!(by_id(5)["error"]["message"], "Unknown tool: no.such_tool");
    assert_eq!(
        std::fs::read_to_string(dir.join("ws/hello.txt")).unwrap(),
        "hello from the host\n"
    );
    let decisions = audit_records(dir)
        .into_iter()
        .filter(|r| r["kind"] == "decision")
        .count();
    assert_eq!(
        decisions, 4,
        "every tools/call is audited, the unknown tool too"
    );
}

/// `ironvmm run` end to end: a guest that makes calls unattended, an ask denied
/// as non-interactive, `--max-calls` reached (the VM stops with 125), and the
/// report, JUnit and summary agreeing with the closed, verifiable audit log.
#[test]
#[ignore = "boots a guest: run through scripts/test.sh"]
fn run_reports_denials_and_stops_at_max_calls() {
    let tmp = scratch("run");
    let dir = tmp.path();
    std::fs::create_dir_all(dir.join("ws")).unwrap();
    std::fs::write(dir.join("ws/hello.txt"), "hello\n").unwrap();
    let policy = POLICY.replace(
        "default deny",
        "ask fs.delete \"ask the owner\"\ndefault deny",
    );
    std::fs::write(dir.join("p.rules"), policy).unwrap();
    let script = r#"
iron call fs.read '{"path":"/workspace/hello.txt"}'; echo "c1=$?"
iron call fs.write '{"path":"/workspace/hello.txt","content":"x"}' 2>/dev/null; echo "c2=$?"
iron call fs.delete '{"path":"/workspace/hello.txt"}' 2>/dev/null; echo "c3=$?"
iron call fs.read '{"path":"/workspace/hello.txt"}' 2>/dev/null; echo "c4=$?"
iron call fs.read '{"path":"/workspace/hello.txt"}' 2>/dev/null; echo "c5=$?"
sleep 30
"#;
    let img = build_image(dir, script, &[]);
    let o = run_cmd(dir)
        .args(["--max-calls", "4", "--timeout", "600s"])
        .arg(&img)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(125), "{err}");
    assert!(err.contains("--max-calls 4 reached"), "{err}");
    let console = std::fs::read_to_string(dir.join("console.log")).unwrap();
    assert_eq!(marker(&console, "c1"), "0", "{console}");
    assert_eq!(marker(&console, "c2"), "3", "{console}");
    assert_eq!(marker(&console, "c3"), "3", "{console}");

    let r: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("r.json")).unwrap()).unwrap();
    assert_eq!(r["exit"], serde_json::json!({"kind": "error", "code": 125}));
    let recs = audit_records(dir);
    assert_eq!(recs.last().unwrap()["kind"], "close");
    assert_eq!(r["audit"]["final_hash"], recs.last().unwrap()["hash"]);
    let by: Vec<&str> = r["denied"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["decided_by"].as_str().unwrap())
        .collect();
    assert_eq!(by, ["default", "non-interactive", "limit"], "{r}");
    assert_eq!(r["calls"]["allow"], 2, "{r}");
    assert_verifies(
        &dir.join("audit.jsonl"),
        &["--head", r["audit"]["final_hash"].as_str().unwrap()],
    );
    let junit = std::fs::read_to_string(dir.join("r.xml")).unwrap();
    assert_eq!(junit.matches("<failure ").count(), 3, "{junit}");
    let md = std::fs::read_to_string(dir.join("s.md")).unwrap();
    assert!(md.contains("--max-calls 4 reached"), "{md}");
}

/// Network egress from inside the guest: busybox `wget` through `iron proxy`
/// (which ironinit starts for an image built with `--proxy`) to an HTTP server on
/// this host's loopback. Each request is decided on the host as `net.http`: the
/// allowed page arrives, the denied one is a 403 that never reaches the server.
#[test]
#[ignore = "boots a guest: run through scripts/test.sh"]
fn wget_in_the_guest_goes_through_the_proxy_and_the_policy() {
    use std::io::Write as _;
    use std::sync::{Arc, Mutex};
    let dir = scratch("net");
    loopback_up();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let s = Arc::clone(&seen);
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut r = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            let _ = r.read_line(&mut line);
            loop {
                let mut h = String::new();
                if r.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                    break;
                }
            }
            s.lock().unwrap().push(line.trim_end().to_string());
            let body = "net says hello\n";
            let mut out = stream;
            let _ = write!(
                out,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    std::fs::write(
        dir.path().join("ironvmm.toml"),
        "[net]\nallow_addresses = [\"127.0.0.1/32\"]\n",
    )
    .unwrap();
    // The page is plain HTTP: the bundle --proxy copies in is not used here.
    std::fs::write(dir.path().join("ca.pem"), "").unwrap();
    let policy = "version 1\nallow net.http when url matches \"http://127.0.0.1:*/allowed/*\" \"the test pages\"\ndefault deny\n";
    let script = format!(
        "echo \"proxy=$http_proxy\"\n\
         wget -q -O - http://127.0.0.1:{port}/allowed/page; echo \"allowed-exit=$?\"\n\
         wget -q -O - http://127.0.0.1:{port}/denied/page; echo \"denied-exit=$?\"\n"
    );
    let image_args = [
        "--proxy".to_string(),
        "--ca-bundle".to_string(),
        dir.path().join("ca.pem").display().to_string(),
    ];
    let boot_args = [
        "--config".to_string(),
        dir.path().join("ironvmm.toml").display().to_string(),
    ];
    let (o, out, err) = run_agent_with(
        dir.path(),
        &script,
        policy,
        &image_args,
        &boot_args,
        |_, _| {},
    );
    assert!(o.status.success(), "stdout:\n{out}\nstderr:\n{err}");
    let recs = audit_records(dir.path());
    let log: Vec<String> = recs.iter().skip(1).map(|r| r.to_string()).collect();
    let out = format!("{out}\naudit:\n{}", log.join("\n"));
    assert!(out.contains("proxy=http://127.0.0.1:3128"), "{out}");
    assert!(out.contains("net says hello"), "{out}");
    assert!(out.contains("allowed-exit=0"), "{out}");
    assert!(out.contains("denied-exit=1"), "{out}");
    assert!(out.contains("403"), "{out}");
    assert_eq!(
        *seen.lock().unwrap(),
        ["GET /allowed/page HTTP/1.1".to_string()],
        "the server saw only the allowed request"
    );
    let net: Vec<_> = recs.iter().filter(|r| r["tool"] == "net.http").collect();
    assert_eq!(net.len(), 2, "{net:?}");
    assert_eq!(
        net[0]["args"]["url"],
        format!("http://127.0.0.1:{port}/allowed/page")
    );
    assert_eq!(
        (net[0]["decision"].as_str(), net[0]["rule"].as_u64()),
        (Some("allow"), Some(2))
    );
    assert_eq!(
        net[1]["args"]["url"],
        format!("http://127.0.0.1:{port}/denied/page")
    );
    assert_eq!(net[1]["decision"], "deny");
    let outcome = recs
        .iter()
        .find(|r| r["kind"] == "outcome" && r["decision_seq"] == net[0]["seq"])
        .expect("the allowed request's outcome");
    assert_eq!(outcome["status"], "ok");
}

/// What the SMTP sink received: each message's recipients and data.
type Received = std::sync::Arc<std::sync::Mutex<Vec<(Vec<String>, String)>>>;

/// An SMTP server on the host's loopback, small enough to live here: the software
/// KVM host has no Python for aiosmtpd. It keeps each message's envelope recipients
/// and data.
fn smtp_sink() -> (u16, Received) {
    use std::io::Write;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let store = std::sync::Arc::clone(&got);
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let store = std::sync::Arc::clone(&store);
            std::thread::spawn(move || {
                let mut w = conn.try_clone().unwrap();
                let mut r = BufReader::new(conn);
                let _ = w.write_all(b"220 sink ESMTP\r\n");
                let mut rcpt = Vec::new();
                let mut line = String::new();
                while r.read_line(&mut line).unwrap_or(0) > 0 {
                    let cmd = line.to_ascii_uppercase();
                    let reply: &[u8] = if cmd.starts_with("EHLO") {
                        b"250-sink\r\n250 8BITMIME\r\n"
                    } else if cmd.starts_with("RCPT TO:") {
                        rcpt.push(line[8..].trim().to_string());
                        b"250 OK\r\n"
                    } else if cmd.starts_with("DATA") {
                        let _ = w.write_all(b"354 go on\r\n");
                        let mut data = String::new();
                        let mut l = String::new();
                        while r.read_line(&mut l).unwrap_or(0) > 0 && l != ".\r\n" {
                            data.push_str(&l);
                            l.clear();
                        }
                        store
                            .lock()
                            .unwrap()
                            .push((std::mem::take(&mut rcpt), data));
                        b"250 queued\r\n"
                    } else if cmd.starts_with("QUIT") {
                        let _ = w.write_all(b"221 bye\r\n");
                        break;
                    } else {
                        b"250 OK\r\n"
                    };
                    let _ = w.write_all(reply);
                    line.clear();
                }
            });
        }
    });
    (port, got)
}

/// The mail service from a booted guest, over a host Maildir (the example inbox)
/// and an SMTP server on loopback: the guest lists, reads, archives and sends to a
/// contact; a purge is denied by its rule and a send to a stranger (an `ask`, with
/// no one to answer under `boot`) is denied; the host's Maildir and the SMTP server
/// show exactly the allowed effects, and the audit log every decision.
#[test]
#[ignore = "boots a guest: run through scripts/test.sh"]
fn service_e2e_mail_from_a_guest_over_a_maildir_and_smtp() {
    let tmp = scratch("mail");
    let dir = tmp.path();
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/inbox");
    let md = dir.join("Maildir");
    for sub in ["cur", "new", "tmp"] {
        std::fs::create_dir_all(md.join(sub)).unwrap();
    }
    for f in ["1733000000.M1P1.example:2,S", "1733000100.M2P1.example:2,"] {
        std::fs::copy(example.join("Maildir/cur").join(f), md.join("cur").join(f)).unwrap();
    }
    std::fs::copy(example.join("contacts.txt"), dir.join("contacts.txt")).unwrap();
    let (port, sent) = smtp_sink();
    let config = format!(
        "[mail]\nbackend = \"maildir\"\nmaildir = \"Maildir\"\nfrom = \"Ada <ada@example.org>\"\n\
         [mail.smtp]\nhost = \"127.0.0.1\"\nport = {port}\nsecurity = \"plain\"\ntimeout_secs = 60\n"
    );
    let policy = r#"version 1
list contacts = file "contacts.txt"
allow mail.list
allow mail.read
allow mail.move when folder == "Archive"
deny  mail.purge "never delete anything permanently"
allow mail.send when all to in @contacts and not exists cc and not exists bcc "contacts"
ask   mail.send "a stranger: ask me first"
default deny
"#;
    let (o, out, err) = boot_with_services(
        dir,
        policy,
        &config,
        &[],
        r#"
# Under the software KVM host the VMM's code comes over 9p on first use, which can
# outlast the guest kernel's 2 s vsock connect timeout: wait for the gate first.
for i in 1 2 3 4 5 6 7 8 9 10; do iron list >/dev/null 2>&1 && break; sleep 1; done
iron call mail.list '{}'; echo "list=$?"
iron call mail.read '{"id":"INBOX/1733000000.M1P1.example"}'; echo "read=$?"
iron call mail.move '{"id":"INBOX/1733000100.M2P1.example","folder":"Archive"}'; echo "move=$?"
iron call mail.purge '{"id":"INBOX/1733000000.M1P1.example"}' 2>/dev/null; echo "purge=$?"
iron call mail.send '{"to":["alice@example.com"],"subject":"Sent from the guest","body":"Noon works."}'; echo "send=$?"
iron call mail.send '{"to":["mallory@example.net"],"subject":"Leak","body":"everything"}' 2>/dev/null; echo "stranger=$?"
exit 0
"#,
    );
    assert_eq!(o.status.code(), Some(0), "{out}\n{err}");
    for (m, rc) in [
        ("list", "0"),
        ("read", "0"),
        ("move", "0"),
        ("purge", "3"),
        ("send", "0"),
        ("stranger", "3"),
    ] {
        assert_eq!(marker(&out, m), rc, "{m}: {out}\n{err}");
    }
    assert!(out.contains("Lunch on Friday?"), "{out}");
    assert!(out.contains("Are you free for lunch"), "{out}");
    // The host's mailbox: archived, the purge target still there, a copy in Sent.
    assert!(md.join(".Archive/cur/1733000100.M2P1.example:2,").is_file());
    assert!(md.join("cur/1733000000.M1P1.example:2,S").is_file());
    assert_eq!(md.join(".Sent/cur").read_dir().unwrap().count(), 1);
    // The SMTP server got the contact's message, and only it.
    let sent = sent.lock().unwrap();
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(sent[0].0.len(), 1, "{sent:?}");
    assert!(sent[0].0[0].contains("alice@example.com"), "{sent:?}");
    assert!(
        sent[0].1.contains("Subject: Sent from the guest"),
        "{}",
        sent[0].1
    );
    assert!(sent[0].1.contains("Noon works."), "{}", sent[0].1);

    let recs = audit_records(dir);
    assert_eq!(
        decision_for(&recs, "mail.purge", "1733000000", "deny")["decided_by"],
        "rule"
    );
    assert_eq!(
        decision_for(&recs, "mail.send", "alice@example.com", "allow")["rule"],
        7
    );
    decision_for(&recs, "mail.send", "mallory@example.net", "ask");
    assert_eq!(
        decision_for(&recs, "mail.send", "mallory@example.net", "deny")["decided_by"],
        "non-interactive"
    );
    assert_verifies(&dir.join("audit.jsonl"), &[]);
}

/// http.fetch from a booted guest against an HTTP server on the host's loopback
/// (let through the SSRF guard by the configuration): an allowed page comes back
/// with the host-side secret added on the way out and never seen by the guest; a
/// redirect to a host the policy does not allow is decided again and refused; a
/// fetch of that host is denied outright.
#[test]
#[ignore = "boots a guest: run through scripts/test.sh"]
fn service_e2e_http_from_a_guest_against_a_loopback_server() {
    use std::io::Write;
    let tmp = scratch("http");
    let dir = tmp.path();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let heads = std::sync::Arc::clone(&seen);
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let mut r = BufReader::new(conn.try_clone().unwrap());
            let mut head = String::new();
            let mut l = String::new();
            while r.read_line(&mut l).unwrap_or(0) > 0 && l != "\r\n" {
                head.push_str(&l);
                l.clear();
            }
            let (status, extra, body) = if head.starts_with("GET /hello ") {
                ("200 OK", String::new(), "hello from the host's web\n")
            } else if head.starts_with("GET /elsewhere ") {
                (
                    "302 Found",
                    format!("Location: http://localhost:{port}/hello\r\n"),
                    "",
                )
            } else {
                ("404 Not Found", String::new(), "no\n")
            };
            heads.lock().unwrap().push(head);
            let _ = write!(
                conn,
                "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n{extra}\r\n{body}",
                body.len()
            );
        }
    });
    const SECRET: &str = "host-token-that-never-enters-the-guest";
    let config = "[http]\ntimeout_secs = 60\nallow_addresses = [\"127.0.0.1/32\"]\n\
        [[http.secret]]\nhost = \"127.0.0.1\"\nheader = \"Authorization\"\nprefix = \"Bearer \"\n\
        value_env = \"IRONVMM_TEST_HTTP_TOKEN\"\n";
    let policy = "version 1\nallow http.fetch when host(url) == \"127.0.0.1\"\ndefault deny\n";
    let script = format!(
        r#"
# Under the software KVM host the VMM's code comes over 9p on first use, which can
# outlast the guest kernel's 2 s vsock connect timeout: wait for the gate first.
for i in 1 2 3 4 5 6 7 8 9 10; do iron list >/dev/null 2>&1 && break; sleep 1; done
iron call http.fetch '{{"url":"http://127.0.0.1:{port}/hello"}}'; echo "fetch=$?"
iron call http.fetch '{{"url":"http://127.0.0.1:{port}/elsewhere"}}' 2>&1 | sed 's/^/redirect_out=/'
iron call http.fetch '{{"url":"http://127.0.0.1:{port}/elsewhere"}}' >/dev/null 2>&1; echo "redirect=$?"
iron call http.fetch '{{"url":"http://localhost:{port}/hello"}}' 2>/dev/null; echo "other_host=$?"
env | grep -c host-token | sed 's/^/secret_in_env=/'
exit 0
"#
    );
    let (o, out, err) = boot_with_services(
        dir,
        policy,
        config,
        &[("IRONVMM_TEST_HTTP_TOKEN", SECRET)],
        &script,
    );
    assert_eq!(o.status.code(), Some(0), "{out}\n{err}");
    assert_eq!(marker(&out, "fetch"), "0", "{out}\n{err}");
    assert!(out.contains("hello from the host's web"), "{out}");
    assert_eq!(marker(&out, "redirect"), "4", "a tool error: {out}");
    assert!(
        out.contains(&format!("redirect to http://localhost:{port}/hello denied")),
        "{out}"
    );
    assert_eq!(marker(&out, "other_host"), "3", "{out}");
    assert_eq!(marker(&out, "secret_in_env"), "0");
    assert!(!out.contains(SECRET), "the secret reached the guest: {out}");
    // The server: the secret on the allowed request; never a request to /hello by
    // way of the refused redirect (one /hello, the first fetch's).
    let heads = seen.lock().unwrap();
    let hello: Vec<&String> = heads
        .iter()
        .filter(|h| h.starts_with("GET /hello "))
        .collect();
    assert_eq!(hello.len(), 1, "{heads:?}");
    assert!(
        hello[0].contains(&format!("Bearer {SECRET}")),
        "{}",
        hello[0]
    );
    let recs = audit_records(dir);
    let text = std::fs::read_to_string(dir.join("audit.jsonl")).unwrap();
    assert!(!text.contains(SECRET), "the secret is in the audit log");
    decision_for(&recs, "http.fetch", "/hello", "allow");
    assert!(recs.iter().any(|r| r["kind"] == "decision"
        && r["conn"] == "followup"
        && r["decision"] == "deny"
        && r["args"]["url"]
            .as_str()
            .is_some_and(|u| u.contains("localhost"))));
    assert_eq!(
        decision_for(&recs, "http.fetch", "localhost", "deny")["decided_by"],
        "default"
    );
}

/// An MCP server over stdio in busybox sh (the software KVM host has neither node
/// nor Python): one tool, `read_note(path)`, answered with a fixed text. Every line
/// it receives is appended to the file named by its first argument.
const SH_MCP_SERVER: &str = r#"#!/bin/sh
log=$1
while IFS= read -r line; do
    printf '%s\n' "$line" >>"$log"
    id=$(printf '%s' "$line" | sed -n 's/.*"id":\([0-9][0-9]*\).*/\1/p')
    case "$line" in
    *'"method":"initialize"'*)
        printf '{"jsonrpc":"2.0","id":%s,"result":{"protocolVersion":"2025-06-18","capabilities":{"tools":{}},"serverInfo":{"name":"notes","version":"1"}}}\n' "$id" ;;
    *'"method":"tools/list"'*)
        printf '{"jsonrpc":"2.0","id":%s,"result":{"tools":[{"name":"read_note","description":"Read a note","inputSchema":{"type":"object","properties":{"path":{"type":"string"}},"required":["path"],"additionalProperties":false}}]}}\n' "$id" ;;
    *'"method":"tools/call"'*)
        path=$(printf '%s' "$line" | sed -n 's/.*"path":"\([^"]*\)".*/\1/p')
        printf '{"jsonrpc":"2.0","id":%s,"result":{"content":[{"type":"text","text":"note %s: buy milk"}]}}\n' "$id" "$path" ;;
    *'"id":'*)
        printf '{"jsonrpc":"2.0","id":%s,"result":{}}\n' "$id" ;;
    esac
done
"#;

/// An owner's MCP server ([[mcp]]) from a booted guest: its tool is served as
/// `notes.read_note`, decided by the policy with the configured `path` role (so a
/// `..` climb is normalised and denied), and only allowed calls reach the server.
#[test]
#[ignore = "boots a guest: run through scripts/test.sh"]
fn service_e2e_mcp_server_from_a_guest() {
    let tmp = scratch("mcp-server");
    let dir = tmp.path();
    std::fs::write(dir.join("notes-server.sh"), SH_MCP_SERVER).unwrap();
    let seen = dir.join("server-saw.jsonl");
    let config = format!(
        "[[mcp]]\nname = \"notes\"\ncommand = \"sh\"\nargs = [{:?}, {:?}]\ntimeout_secs = 60\n\
         [mcp.roles]\n\"read_note.path\" = \"path\"\n",
        dir.join("notes-server.sh").display().to_string(),
        seen.display().to_string()
    );
    let policy =
        "version 1\nallow notes.read_note when path under \"/home/ada/notes\"\ndefault deny\n";
    let (o, out, err) = boot_with_services(
        dir,
        policy,
        &config,
        &[],
        r#"
# Under the software KVM host the VMM's code comes over 9p on first use, which can
# outlast the guest kernel's 2 s vsock connect timeout: wait for the gate first.
for i in 1 2 3 4 5 6 7 8 9 10; do iron list >/dev/null 2>&1 && break; sleep 1; done
iron call notes.read_note '{"path":"/home/ada/notes/todo.txt"}'; echo "note=$?"
iron call notes.read_note '{"path":"/home/ada/notes/../../../etc/shadow"}' 2>/dev/null; echo "climb=$?"
iron call notes.read_note '{"path":"/etc/shadow"}' 2>/dev/null; echo "outside=$?"
exit 0
"#,
    );
    assert_eq!(o.status.code(), Some(0), "{out}\n{err}");
    assert_eq!(marker(&out, "note"), "0", "{out}\n{err}");
    assert!(
        out.contains("note /home/ada/notes/todo.txt: buy milk"),
        "{out}"
    );
    assert_eq!(marker(&out, "climb"), "3", "{out}");
    assert_eq!(marker(&out, "outside"), "3", "{out}");
    // The server saw the one allowed call, under its own tool name, and nothing else.
    let saw = std::fs::read_to_string(&seen).unwrap();
    let calls: Vec<&str> = saw.lines().filter(|l| l.contains("tools/call")).collect();
    assert_eq!(calls.len(), 1, "{saw}");
    assert!(
        calls[0].contains("\"name\":\"read_note\"") && calls[0].contains("todo.txt"),
        "{saw}"
    );
    assert!(!saw.contains("shadow"), "{saw}");
    let recs = audit_records(dir);
    decision_for(&recs, "notes.read_note", "todo.txt", "allow");
    assert_eq!(
        decision_for(&recs, "notes.read_note", "/etc/shadow", "deny")["decided_by"],
        "default"
    );
}
