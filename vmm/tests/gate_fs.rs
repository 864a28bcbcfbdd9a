//! The fs service end to end through the gate: every tool, ranges, encodings, limits,
//! the trash, and protected files. The policy (gate_common::FS_POLICY, through the
//! real engine) allows every fs tool inside /workspace, so what is refused here is
//! refused by the service, or by the engine's schema where the catalog says so.

mod gate_common;

use base64::Engine as _;
use gate_common::*;
use serde_json::{json, Value};

fn call(fx: &Fixture, tool: &str, args: Value) -> Value {
    let mut c = fx.conn("fs");
    let r = roundtrip(&mut c, &call_frame(1, tool, args));
    r[0]["result"].clone()
}

fn ok(fx: &Fixture, tool: &str, args: Value) -> Value {
    let r = call(fx, tool, args.clone());
    assert_eq!(r["isError"], false, "{tool} {args}: {r}");
    r["structuredContent"].clone()
}

fn tool_err(fx: &Fixture, tool: &str, args: Value) -> String {
    let r = call(fx, tool, args.clone());
    assert_eq!(r["isError"], true, "{tool} {args}: {r}");
    r["structuredContent"]["error"]["kind"]
        .as_str()
        .unwrap_or_else(|| panic!("{tool} {args}: not a tool error: {r}"))
        .to_string()
}

#[test]
fn write_read_ranges_and_encodings() {
    let fx = Fixture::fs();
    assert_eq!(
        ok(
            &fx,
            "fs.write",
            json!({"path": "a.txt", "content": "héllo world"})
        )["written"],
        12
    );
    let r = ok(
        &fx,
        "fs.read",
        json!({"path": "/workspace/a.txt", "offset": 7, "length": 3}),
    );
    assert_eq!(
        r,
        json!({"content": "wor", "encoding": "utf8", "size": 12, "eof": false})
    );
    // A range that ends inside "é" stops before it; the next range starts there.
    let r = ok(&fx, "fs.read", json!({"path": "a.txt", "length": 2}));
    assert_eq!(
        (r["content"].as_str(), r["eof"].as_bool()),
        (Some("h"), Some(false))
    );
    // Past the end: empty and eof.
    let r = ok(&fx, "fs.read", json!({"path": "a.txt", "offset": 100}));
    assert_eq!(
        (r["content"].as_str(), r["eof"].as_bool()),
        (Some(""), Some(true))
    );
    // Overwrite at an offset, then append.
    ok(
        &fx,
        "fs.write",
        json!({"path": "a.txt", "content": "WO", "offset": 7}),
    );
    ok(
        &fx,
        "fs.write",
        json!({"path": "a.txt", "content": "!", "append": true}),
    );
    assert_eq!(
        std::fs::read_to_string(fx.workspace.join("a.txt")).unwrap(),
        "héllo WOrld!"
    );
    assert_eq!(
        tool_err(
            &fx,
            "fs.write",
            json!({"path": "a.txt", "content": "x", "offset": 1, "append": true})
        ),
        "invalid_arguments"
    );
    // A plain write replaces the whole file.
    ok(
        &fx,
        "fs.write",
        json!({"path": "a.txt", "content": "short"}),
    );
    assert_eq!(
        std::fs::read_to_string(fx.workspace.join("a.txt")).unwrap(),
        "short"
    );
}

#[test]
fn binary_content_round_trips_as_base64() {
    let fx = Fixture::fs();
    let bytes: Vec<u8> = (0..=255u8).collect();
    let b64 = base64::engine::general_purpose::STANDARD.encode(&bytes);
    ok(
        &fx,
        "fs.write",
        json!({"path": "bin", "content": b64, "encoding": "base64"}),
    );
    assert_eq!(std::fs::read(fx.workspace.join("bin")).unwrap(), bytes);
    assert_eq!(tool_err(&fx, "fs.read", json!({"path": "bin"})), "not_utf8");
    let r = ok(&fx, "fs.read", json!({"path": "bin", "encoding": "base64"}));
    assert_eq!(r["content"], b64);
    assert_eq!(r["encoding"], "base64");
    assert_eq!(
        tool_err(
            &fx,
            "fs.write",
            json!({"path": "x", "content": "!!", "encoding": "base64"})
        ),
        "invalid_arguments"
    );
}

#[test]
fn sizes_are_limited_to_512_kib() {
    let fx = Fixture::fs();
    let big = "a".repeat(512 * 1024);
    ok(&fx, "fs.write", json!({"path": "big", "content": big}));
    ok(
        &fx,
        "fs.write",
        json!({"path": "big", "content": "b", "append": true}),
    );
    assert_eq!(
        tool_err(
            &fx,
            "fs.write",
            json!({"path": "big2", "content": big.clone() + "a"})
        ),
        "too_large"
    );
    let r = ok(&fx, "fs.read", json!({"path": "big"}));
    assert_eq!(r["content"].as_str().unwrap().len(), 512 * 1024);
    assert_eq!(
        (r["size"].as_u64(), r["eof"].as_bool()),
        (Some(512 * 1024 + 1), Some(false))
    );
    let r = ok(&fx, "fs.read", json!({"path": "big", "offset": 512 * 1024}));
    assert_eq!(
        (r["content"].as_str(), r["eof"].as_bool()),
        (Some("b"), Some(true))
    );
    // A length over the limit is refused by the catalog's schema, before the
    // service; the service refuses it on its own too.
    let mut c = fx.conn("t");
    let over = json!({"path": "big", "length": 512 * 1024 + 1});
    let r = roundtrip(&mut c, &call_frame(1, "fs.read", over.clone()));
    let d = denial(&r[0]);
    assert_eq!(d["decided_by"], "invariant", "{d}");
    assert!(d["reason"].as_str().unwrap().contains("`length`"), "{d}");
    let fs = ironvmm::services::fs::FsService::open(&fx.workspace).unwrap();
    use ironvmm::services::Service;
    assert_eq!(fs.call("fs.read", &over).unwrap_err().kind, "too_large");
}

#[test]
fn list_stat_mkdir_move() {
    let fx = Fixture::fs();
    ok(&fx, "fs.mkdir", json!({"path": "d/e/f"}));
    ok(&fx, "fs.mkdir", json!({"path": "d/e/f"})); // already there: fine
    ok(
        &fx,
        "fs.write",
        json!({"path": "d/e/f/x.txt", "content": "12345"}),
    );
    ok(
        &fx,
        "fs.write",
        json!({"path": "n/m/y.txt", "content": "", "create_dirs": true}),
    );
    assert_eq!(
        tool_err(&fx, "fs.write", json!({"path": "q/z.txt", "content": ""})),
        "not_found"
    );
    let l = ok(&fx, "fs.list", json!({"path": "/workspace"}));
    let names: Vec<&str> = l["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["d", "hello.txt", "n"]);
    assert_eq!(
        l["entries"][1],
        json!({"name": "hello.txt", "kind": "file", "size": 12})
    );
    assert_eq!(l["entries"][0]["kind"], "dir");
    let s = ok(&fx, "fs.stat", json!({"path": "d/e/f/x.txt"}));
    assert_eq!(
        (s["kind"].as_str(), s["size"].as_u64()),
        (Some("file"), Some(5))
    );
    assert!(s["modified"].as_str().unwrap().ends_with('Z'));
    assert_eq!(
        tool_err(&fx, "fs.list", json!({"path": "hello.txt"})),
        "not_a_directory"
    );
    assert_eq!(
        tool_err(&fx, "fs.mkdir", json!({"path": "hello.txt"})),
        "not_a_directory"
    );

    ok(
        &fx,
        "fs.move",
        json!({"from": "d/e/f/x.txt", "to": "/workspace/moved.txt"}),
    );
    assert_eq!(
        std::fs::read_to_string(fx.workspace.join("moved.txt")).unwrap(),
        "12345"
    );
    // Never replaces.
    assert_eq!(
        tool_err(
            &fx,
            "fs.move",
            json!({"from": "moved.txt", "to": "hello.txt"})
        ),
        "exists"
    );
    assert_eq!(
        tool_err(&fx, "fs.move", json!({"from": "/workspace", "to": "x"})),
        "invalid_path"
    );
    assert_eq!(
        tool_err(&fx, "fs.stat", json!({"path": "nope"})),
        "not_found"
    );
}

#[test]
fn delete_moves_into_the_trash_beside_the_workspace() {
    let fx = Fixture::fs();
    ok(
        &fx,
        "fs.write",
        json!({"path": "gone.txt", "content": "keep me"}),
    );
    ok(&fx, "fs.delete", json!({"path": "gone.txt"}));
    assert!(!fx.workspace.join("gone.txt").exists());
    let trash = fx.dir.path().join("ws.ironvmm-trash");
    let entries: Vec<_> = std::fs::read_dir(&trash)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(entries.len(), 1);
    assert!(entries[0]
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .ends_with("-gone.txt"));
    assert_eq!(std::fs::read_to_string(&entries[0]).unwrap(), "keep me");
    // Same name again: a second, distinct trash entry.
    ok(
        &fx,
        "fs.write",
        json!({"path": "gone.txt", "content": "v2"}),
    );
    ok(&fx, "fs.delete", json!({"path": "gone.txt"}));
    assert_eq!(std::fs::read_dir(&trash).unwrap().count(), 2);
    ok(&fx, "fs.mkdir", json!({"path": "dir/sub"}));
    ok(&fx, "fs.delete", json!({"path": "dir"}));
    assert_eq!(
        tool_err(&fx, "fs.delete", json!({"path": "/workspace"})),
        "invalid_path"
    );
    assert_eq!(
        tool_err(&fx, "fs.delete", json!({"path": "missing"})),
        "not_found"
    );
    // The trash is outside the workspace: the guest cannot reach it, neither past
    // the policy nor past the service's own normalisation.
    let mut c = fx.conn("t");
    let r = roundtrip(
        &mut c,
        &call_frame(1, "fs.list", json!({"path": "../ws.ironvmm-trash"})),
    );
    assert_eq!(denial(&r[0])["decided_by"], "default");
    let fs = ironvmm::services::fs::FsService::open(&fx.workspace).unwrap();
    use ironvmm::services::Service;
    let e = fs
        .call("fs.list", &json!({"path": "../ws.ironvmm-trash"}))
        .unwrap_err();
    assert_eq!(e.kind, "outside_root");
}

#[test]
fn symlinked_directories_cannot_lead_writes_out() {
    let fx = Fixture::fs();
    let outside = fx.dir.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, fx.workspace.join("out")).unwrap();
    assert_eq!(
        tool_err(&fx, "fs.write", json!({"path": "out/x", "content": "x"})),
        "outside_root"
    );
    assert_eq!(
        tool_err(&fx, "fs.mkdir", json!({"path": "out/sub"})),
        "outside_root"
    );
    assert_eq!(
        tool_err(
            &fx,
            "fs.write",
            json!({"path": "out/a/b", "content": "", "create_dirs": true})
        ),
        "outside_root"
    );
    assert_eq!(
        tool_err(&fx, "fs.move", json!({"from": "hello.txt", "to": "out/h"})),
        "outside_root"
    );
    assert_eq!(
        tool_err(&fx, "fs.list", json!({"path": "out"})),
        "outside_root"
    );
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
    // Deleting the link moves the link itself, not its target.
    ok(&fx, "fs.delete", json!({"path": "out"}));
    assert!(outside.exists());
}

#[test]
fn protected_files_are_refused_by_identity() {
    let dir = tempfile::tempdir().unwrap();
    let ws = dir.path().join("ws");
    std::fs::create_dir(&ws).unwrap();
    std::fs::write(ws.join("p.rules"), "default deny\n").unwrap();
    std::fs::hard_link(ws.join("p.rules"), ws.join("alias")).unwrap();
    let mut fs = ironvmm::services::fs::FsService::open(&ws).unwrap();
    fs.protect(&ws.join("p.rules"));
    use ironvmm::services::Service;
    for (tool, args) in [
        ("fs.read", json!({"path": "p.rules"})),
        ("fs.read", json!({"path": "alias"})),
        (
            "fs.write",
            json!({"path": "p.rules", "content": "default allow"}),
        ),
        ("fs.move", json!({"from": "p.rules", "to": "x"})),
        ("fs.delete", json!({"path": "alias"})),
    ] {
        assert_eq!(
            fs.call(tool, &args).unwrap_err().kind,
            "protected",
            "{tool} {args}"
        );
    }
    assert_eq!(
        std::fs::read_to_string(ws.join("p.rules")).unwrap(),
        "default deny\n"
    );
}

/// Issue 10, item 3: one fs.list of names made of control characters (escaped twice,
/// JSON inside a text block) made a 33 MB reply. Now every reply is bounded: fs.list
/// pages, and a reply past the cap is a tool error.
#[test]
fn replies_are_bounded_and_list_pages() {
    let fx = Fixture::new();
    let d = fx.workspace.join("many");
    std::fs::create_dir(&d).unwrap();
    for i in 0..2500 {
        let name = format!("{i:05}{}", "\x01".repeat(245));
        std::fs::write(d.join(name), "").unwrap();
    }
    let mut c = fx.conn("big");
    let mut seen = 0;
    let mut offset = 0u64;
    loop {
        let args = json!({"path": "many", "offset": offset, "limit": 400});
        let mut data = call_frame(1, "fs.list", args);
        data.push(b'\n');
        let mut out = Vec::new();
        c.on_data(&data, &mut out).unwrap();
        settle(&mut c, &mut out).unwrap();
        assert!(
            out.len() <= ironvmm::gate::MAX_REPLY + 1,
            "reply of {} bytes",
            out.len()
        );
        let r = &replies(&out)[0]["result"];
        assert_eq!(r["isError"], false, "{r}");
        let s = &r["structuredContent"];
        assert_eq!(s["total"], 2500);
        seen += s["entries"].as_array().unwrap().len();
        match s["next_offset"].as_u64() {
            Some(n) => offset = n,
            None => break,
        }
    }
    assert_eq!(seen, 2500);

    // A 512 KiB read of control characters escapes past the cap: a tool error, small.
    std::fs::write(fx.workspace.join("ctl"), "\x01".repeat(512 * 1024)).unwrap();
    let mut data = call_frame(2, "fs.read", json!({"path": "ctl"}));
    data.push(b'\n');
    let mut out = Vec::new();
    c.on_data(&data, &mut out).unwrap();
    settle(&mut c, &mut out).unwrap();
    assert!(out.len() < 4096, "{}", out.len());
    let r = &replies(&out)[0]["result"];
    assert_eq!(
        r["structuredContent"]["error"]["kind"], "reply_too_large",
        "{r}"
    );
}

/// Issue 10, item 10: a write at offset 2^43 made an 8 TiB sparse file; mkdir and move
/// built a tree 4,000 folders deep. Both are bounded now, and so is what one VM writes.
#[test]
fn write_offsets_total_bytes_and_depth_are_bounded() {
    use ironvmm::services::fs::{FsService, MAX_DEPTH};
    use ironvmm::services::Service;
    let dir = tempfile::tempdir().unwrap();
    let mut fs = FsService::open(dir.path()).unwrap();
    fs.set_max_write_bytes(10);
    let e = fs
        .call(
            "fs.write",
            &json!({"path": "sparse", "content": "x", "offset": 1u64 << 43}),
        )
        .unwrap_err();
    assert_eq!(e.kind, "too_large", "{e:?}");
    assert!(std::fs::metadata(dir.path().join("sparse")).is_err());
    fs.call("fs.write", &json!({"path": "a", "content": "12345678"}))
        .unwrap();
    let e = fs
        .call("fs.write", &json!({"path": "b", "content": "123"}))
        .unwrap_err();
    assert_eq!(e.kind, "write_limit", "{e:?}");

    let deep = |n: usize| {
        (0..n)
            .map(|i| format!("d{i}"))
            .collect::<Vec<_>>()
            .join("/")
    };
    fs.call("fs.mkdir", &json!({"path": deep(MAX_DEPTH)}))
        .unwrap();
    let e = fs
        .call("fs.mkdir", &json!({"path": deep(MAX_DEPTH + 1)}))
        .unwrap_err();
    assert_eq!(e.kind, "too_deep");
    // A 40-deep tree moved under a 40-deep folder would be 80 deep.
    fs.call("fs.mkdir", &json!({"path": format!("t/{}", deep(39))}))
        .unwrap();
    fs.call("fs.mkdir", &json!({"path": format!("u/{}", deep(39))}))
        .unwrap();
    let to = format!("u/{}/t", deep(39));
    let e = fs
        .call("fs.move", &json!({"from": "t", "to": to}))
        .unwrap_err();
    assert_eq!(e.kind, "too_deep", "{e:?}");
    fs.call("fs.move", &json!({"from": "t", "to": "u/t"}))
        .unwrap();
}

/// Issue 10, item 3: the worst case for the VMM's memory: every connection open, each
/// sent requests whose replies are as large as allowed, none read. Each connection
/// holds at most `max_output` + one reply of output and `max_buffered` of input, and
/// the VM at most `max_inflight` replies of at most MAX_REPLY (docs/gate.md "Memory").
#[test]
fn memory_is_bounded_when_no_connection_reads() {
    use ironvmm::gate::MAX_REPLY;
    use std::time::Duration;
    let fx = Fixture::new();
    let d = fx.workspace.join("many");
    std::fs::create_dir(&d).unwrap();
    for i in 0..600 {
        std::fs::write(d.join(format!("{i:04}{}", "\x01".repeat(240))), "").unwrap();
    }
    let limits = fx.gate.limits();
    let bound = limits.max_output + MAX_REPLY + 1;
    let mut line = call_frame(1, "fs.list", json!({"path": "many"}));
    line.push(b'\n');
    let burst: Vec<u8> = line
        .iter()
        .copied()
        .cycle()
        .take(line.len() * 200)
        .collect();
    let mut conns: Vec<_> = (0..8)
        .map(|n| (fx.conn(&format!("c{n}")), Vec::new()))
        .collect();
    for _ in 0..20 {
        for (c, out) in conns.iter_mut() {
            // The transport feeds only what the connection has room for, and never
            // sends `out` to the guest.
            let room = c.input_room().min(burst.len());
            if room > 0 {
                c.on_data(&burst[..room], out).unwrap();
            }
            c.wait_ready(Duration::from_millis(20));
            c.poll(out).unwrap();
            assert!(out.len() <= bound, "out {} > {bound}", out.len());
            assert!(c.pending_bytes() <= limits.max_buffered.max(limits.max_frame));
            assert!(c.in_flight() <= limits.max_inflight_per_conn);
        }
        let held: usize = conns.iter().map(|(c, _)| c.in_flight()).sum();
        assert!(held <= limits.max_inflight, "{held} calls held in the VM");
    }
}
