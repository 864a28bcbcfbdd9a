//! Calls run beside the transport: a slow call holds nobody else, replies come back
//! out of order, the in-flight bounds hold, asks park without a thread, overruns are
//! answered, and concurrent decisions share fsyncs. Every frame, not only a call, is
//! parsed and answered on a worker: the transport's thread only frames bytes.
//!
//! The slow service is test-only (defined here): `test.probe` with `{"hold": true}`
//! blocks until the test opens its latch, or 5 s at most; with `{"until_open": true}`
//! until the latch opens (120 s at most, so a failing test cannot hang CI). Tests
//! wait on conditions, never on wall-clock limits, except one generous latency
//! comparison.

mod gate_common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use gate_common::*;
use ironvmm::audit::SyncMode;
use ironvmm::gate::approver::{Answer, AnswerSink, Answerer, Approver, AskRequest};
use ironvmm::gate::{Connection, DecidedBy, GateLimits};
use ironvmm::services::{Lane, Service, ToolError, ToolSpec};
use serde_json::{json, Value};

/// Holds `test.probe {"hold": true}` calls until opened (5 s at most).
#[derive(Clone, Default)]
struct Latch(Arc<(Mutex<(bool, usize)>, Condvar)>);

impl Latch {
    fn hold(&self, most: Duration) {
        let (m, cv) = &*self.0;
        let mut st = m.lock().unwrap();
        st.1 += 1;
        cv.notify_all();
        let deadline = Instant::now() + most;
        while !st.0 && Instant::now() < deadline {
            st = cv.wait_timeout(st, Duration::from_millis(100)).unwrap().0;
        }
    }

    /// Waits until `n` calls are held in the service.
    fn wait_held(&self, n: usize) {
        let (m, cv) = &*self.0;
        let mut st = m.lock().unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while st.1 < n {
            assert!(
                Instant::now() < deadline,
                "{} of {n} calls reached the service",
                st.1
            );
            st = cv.wait_timeout(st, Duration::from_millis(100)).unwrap().0;
        }
    }

    fn open(&self) {
        let (m, cv) = &*self.0;
        m.lock().unwrap().0 = true;
        cv.notify_all();
    }
}

/// The probe, in the lane the test puts it in.
struct Held(Latch, Lane);

impl Service for Held {
    fn lane(&self) -> Lane {
        self.1
    }

    fn tools(&self) -> Vec<ToolSpec> {
        vec![ToolSpec {
            name: "test.probe",
            description: "waits for the test's latch when asked to hold",
            input_schema: json!({"type": "object", "properties": {
                "hold": {"type": "boolean"}, "until_open": {"type": "boolean"}}}),
            roles: &[],
            aliases: &[],
            reply_cap: ironvmm::services::DEFAULT_REPLY_CAP,
        }]
    }
    fn call(&self, _: &str, args: &Value) -> Result<Value, ToolError> {
        if args["hold"] == true {
            self.0.hold(Duration::from_secs(5));
        }
        if args["until_open"] == true {
            self.0.hold(Duration::from_secs(120));
        }
        Ok(json!({"held": args["hold"] == true || args["until_open"] == true}))
    }
}

/// A gate whose probe runs in the local lane, with the fs calls: a held probe holds
/// a worker that local calls could use.
fn fixture(mode: SyncMode, limits: GateLimits, latch: &Latch) -> Fixture {
    fixture_in(Lane::Local, mode, limits, latch)
}

fn fixture_in(lane: Lane, mode: SyncMode, limits: GateLimits, latch: &Latch) -> Fixture {
    let l = latch.clone();
    Fixture::with(mode, limits, move |s| s.add(Box::new(Held(l, lane))))
}

fn line(id: u64, tool: &str, args: Value) -> Vec<u8> {
    let mut f = call_frame(id, tool, args);
    f.push(b'\n');
    f
}

/// Waits for replies on `c` until one with each of `ids` is in `out`.
fn wait_for(c: &mut Connection, out: &mut Vec<u8>, ids: &[u64]) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        c.poll(out).unwrap();
        let got: Vec<u64> = replies(out)
            .iter()
            .filter_map(|r| r["id"].as_u64())
            .collect();
        if ids.iter().all(|i| got.contains(i)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "replies {ids:?} never came: {got:?}"
        );
        c.wait_ready(Duration::from_millis(200));
    }
}

/// 1,000 fs.stat calls over 4 connections, each on its own thread, one call at a
/// time per connection; returns every round trip.
fn thousand_calls(fx: &Fixture) -> Vec<Duration> {
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let mut c = fx.conn(&format!("fast{t}"));
            std::thread::spawn(move || {
                let mut lat = Vec::new();
                for i in 0..250u64 {
                    let t0 = Instant::now();
                    let r = roundtrip(
                        &mut c,
                        &call_frame(i, "fs.stat", json!({"path": "/workspace/hello.txt"})),
                    );
                    lat.push(t0.elapsed());
                    assert_eq!(r[0]["result"]["isError"], false, "{}", r[0]);
                }
                lat
            })
        })
        .collect();
    threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect()
}

fn p99(mut v: Vec<Duration>) -> Duration {
    v.sort_unstable();
    v[v.len() * 99 / 100]
}

#[test]
fn a_slow_call_holds_no_other_connection() {
    let latch = Latch::default();
    let fx = fixture(SyncMode::Batch, GateLimits::default(), &latch);
    let base = p99(thousand_calls(&fx));

    let mut slow = fx.conn("slow");
    let mut out = Vec::new();
    slow.on_data(&line(1, "test.probe", json!({"hold": true})), &mut out)
        .unwrap();
    latch.wait_held(1);
    let with_slow = thousand_calls(&fx);
    // The order that matters: all 1,000 finished while the slow call still runs.
    slow.poll(&mut out).unwrap();
    assert!(out.is_empty(), "the slow call is still running");
    assert_eq!(slow.in_flight(), 1);
    latch.open();
    wait_for(&mut slow, &mut out, &[1]);
    assert_eq!(
        replies(&out)[0]["result"]["structuredContent"]["held"],
        true
    );

    // Generous, for a loaded 2-core machine: 2x the p99 without the slow call,
    // plus 100 ms of scheduling noise.
    let with = p99(with_slow);
    eprintln!("p99 of 1,000 calls: {base:?} alone, {with:?} beside a held call");
    assert!(
        with <= base * 2 + Duration::from_millis(100),
        "p99 {with:?} with a slow call vs {base:?} without"
    );
}

#[test]
fn outside_calls_holding_every_outside_worker_leave_local_calls_free() {
    let latch = Latch::default();
    let limits = GateLimits {
        workers: 2,
        call_timeout: Duration::from_secs(300),
        ..GateLimits::default()
    };
    let fx = fixture_in(Lane::Outside, SyncMode::Batch, limits, &latch);
    // Twice as many outside calls as outside workers: two run, two queue.
    let mut slow = fx.conn("slow");
    let mut slow_out = Vec::new();
    let mut frames = Vec::new();
    for i in 0..4 {
        frames.extend(line(i, "test.probe", json!({"until_open": true})));
    }
    slow.on_data(&frames, &mut slow_out).unwrap();
    latch.wait_held(2);

    // Local calls and cheap methods are all answered meanwhile, on the two local
    // workers.
    let mut c = fx.conn("local");
    let mut out = Vec::new();
    let mut frames = Vec::new();
    for i in 0..50 {
        frames.extend(line(i, "fs.stat", json!({"path": "/workspace/hello.txt"})));
    }
    frames.extend(br#"{"jsonrpc":"2.0","id":50,"method":"ping"}"#);
    frames.push(b'\n');
    c.on_data(&frames, &mut out).unwrap();
    wait_for(&mut c, &mut out, &(0..=50).collect::<Vec<_>>());
    for r in replies(&out).iter().filter(|r| r["id"] != 50) {
        assert_eq!(r["result"]["isError"], false, "{r}");
    }
    slow.poll(&mut slow_out).unwrap();
    assert!(slow_out.is_empty(), "the outside calls are still held");
    assert_eq!(slow.in_flight(), 4);
    assert_eq!(fx.gate.stuck_workers(), 0);

    latch.open();
    wait_for(&mut slow, &mut slow_out, &[0, 1, 2, 3]);
    for r in replies(&slow_out) {
        assert_eq!(r["result"]["structuredContent"]["held"], true, "{r}");
    }
    // Each outside call was decided (on a local worker) and served once.
    assert_eq!(
        fx.records()
            .iter()
            .filter(|r| r["kind"] == "outcome" && r["status"] == "ok")
            .count(),
        54
    );
}

#[test]
fn replies_on_one_connection_come_back_out_of_order() {
    let latch = Latch::default();
    let fx = fixture(SyncMode::Batch, GateLimits::default(), &latch);
    let mut c = fx.conn("c1");
    let mut out = Vec::new();
    let mut frames = line(1, "test.probe", json!({"hold": true}));
    frames.extend(line(2, "fs.stat", json!({"path": "/workspace/hello.txt"})));
    frames.extend(br#"{"jsonrpc":"2.0","id":3,"method":"ping"}"#);
    frames.push(b'\n');
    c.on_data(&frames, &mut out).unwrap();
    latch.wait_held(1);
    wait_for(&mut c, &mut out, &[2, 3]);
    latch.open();
    wait_for(&mut c, &mut out, &[1]);
    let ids: Vec<u64> = replies(&out)
        .iter()
        .map(|r| r["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids.len(), 3);
    assert_eq!(ids[2], 1, "the held call answered last: {ids:?}");
}

#[test]
fn in_flight_bounds_per_connection_and_per_vm() {
    let latch = Latch::default();
    let limits = GateLimits {
        max_inflight_per_conn: 8,
        max_inflight: 20,
        workers: 32,
        ..GateLimits::default()
    };
    let fx = fixture(SyncMode::Batch, limits, &latch);
    let mut conns: Vec<Connection> = (0..3).map(|i| fx.conn(&format!("c{i}"))).collect();
    let mut outs = vec![Vec::new(); 3];
    for (n, c) in conns.iter_mut().enumerate() {
        let mut frames = Vec::new();
        for i in 0..30 {
            frames.extend(line(i, "test.probe", json!({"hold": true})));
        }
        c.on_data(&frames, &mut outs[n]).unwrap();
    }
    latch.wait_held(20);
    assert_eq!(conns[0].in_flight(), 8, "per-connection bound");
    assert_eq!(conns[1].in_flight(), 8);
    assert_eq!(conns[2].in_flight(), 4, "the VM's bound took the rest");
    assert_eq!(fx.gate.in_flight(), 20);
    for c in &conns {
        assert_eq!(
            c.input_room(),
            0,
            "frames wait: the transport stops reading"
        );
    }
    latch.open();
    for (n, c) in conns.iter_mut().enumerate() {
        wait_for(c, &mut outs[n], &(0..30).collect::<Vec<_>>());
    }
    assert_eq!(fx.gate.in_flight(), 0);
    assert_eq!(
        fx.records()
            .iter()
            .filter(|r| r["kind"] == "outcome")
            .count(),
        90
    );
}

/// Answers asks only when the test says so, from the test's thread.
#[derive(Default)]
struct LaterApprover(Mutex<Vec<(AskRequest, AnswerSink)>>);

impl Approver for LaterApprover {
    fn ask(&self, req: AskRequest, done: AnswerSink) {
        self.0.lock().unwrap().push((req, done));
    }
}

#[test]
fn asks_park_without_a_thread_and_are_served_on_the_answer() {
    let latch = Latch::default();
    let limits = GateLimits {
        workers: 2,
        ..GateLimits::default()
    };
    let fx = fixture(SyncMode::Always, limits, &latch);
    let approver = Arc::new(LaterApprover::default());
    fx.gate.set_approver(approver.clone());
    let mut c = fx.conn("asker");
    let mut out = Vec::new();
    let mut frames = Vec::new();
    // Under /workspace/ask, where the fixture's policy asks before a delete.
    std::fs::create_dir(fx.workspace.join("ask")).unwrap();
    for i in 0..40u64 {
        std::fs::write(fx.workspace.join(format!("ask/{i}")), "x").unwrap();
        frames.extend(line(
            i,
            "fs.delete",
            json!({"path": format!("/workspace/ask/{i}")}),
        ));
    }
    c.on_data(&frames, &mut out).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while fx.gate.parked() < 40 {
        assert!(Instant::now() < deadline, "{} parked", fx.gate.parked());
        std::thread::sleep(Duration::from_millis(10));
    }
    // 40 asks wait and the two workers are free: another call is served.
    let mut other = fx.conn("other");
    let r = roundtrip(
        &mut other,
        &call_frame(100, "fs.stat", json!({"path": "/workspace/hello.txt"})),
    );
    assert_eq!(r[0]["result"]["isError"], false);

    let asks = std::mem::take(&mut *approver.0.lock().unwrap());
    assert_eq!(asks.len(), 40);
    for (req, done) in asks {
        let n = req.rpc_id.as_u64().unwrap();
        done(Answer {
            allow: n % 2 == 0,
            answerer: Answerer {
                by: DecidedBy::User,
                channel: "test".into(),
                who: Some("tester".into()),
            },
            reason: if n % 2 == 0 { "ok" } else { "no" }.into(),
        });
    }
    wait_for(&mut c, &mut out, &(0..40).collect::<Vec<_>>());
    for r in replies(&out) {
        let n = r["id"].as_u64().unwrap();
        let denied = r["result"]["structuredContent"]["decision"] == "deny";
        assert_eq!(denied, n % 2 == 1, "{r}");
        assert_eq!(fx.workspace.join(format!("ask/{n}")).exists(), denied);
    }
    let recs = fx.records();
    let answer = recs
        .iter()
        .find(|r| r["kind"] == "decision" && r["rpc_id"] == 4 && r["decision"] == "allow")
        .unwrap();
    let ask = recs.iter().find(|r| r["seq"] == answer["ask_seq"]).unwrap();
    assert_eq!(
        (ask["decision"].as_str(), ask["rpc_id"].as_u64()),
        (Some("ask"), Some(4))
    );
    assert_eq!(answer["asked"], true);
    assert_eq!(answer["decided_by"], "user");
    assert_eq!(answer["channel"], "test");
    assert_eq!(answer["who"], "tester");
    // The service ran on the answer's record (which is before it in the log).
    let served = recs
        .iter()
        .position(|r| r["kind"] == "outcome" && r["decision_seq"] == answer["seq"]);
    assert!(served.unwrap() as u64 > answer["seq"].as_u64().unwrap());
}

#[test]
fn an_overrun_is_answered_with_a_tool_error_and_audited() {
    let latch = Latch::default();
    let limits = GateLimits {
        workers: 1,
        call_timeout: Duration::from_millis(100),
        ..GateLimits::default()
    };
    let fx = fixture(SyncMode::Batch, limits, &latch);
    let mut c = fx.conn("c1");
    let r = roundtrip(&mut c, &call_frame(1, "test.probe", json!({"hold": true})));
    let res = &r[0]["result"];
    assert_eq!(res["isError"], true);
    assert_eq!(res["structuredContent"]["error"]["kind"], "timeout");
    assert_eq!(fx.gate.stuck_workers(), 1);
    // The only worker is stuck; a spare serves the next call.
    let r = roundtrip(
        &mut c,
        &call_frame(2, "fs.stat", json!({"path": "hello.txt"})),
    );
    assert_eq!(r[0]["result"]["isError"], false);
    let outcome = fx
        .records()
        .into_iter()
        .find(|r| r["kind"] == "outcome" && r["status"] == "error")
        .expect("the overrun's outcome");
    assert!(outcome["total_us"].as_u64().unwrap() >= 100_000);
    latch.open();
    let deadline = Instant::now() + Duration::from_secs(60);
    while fx.gate.stuck_workers() > 0 {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(fx.gate.shutdown(), 0, "every thread joined");
}

#[test]
fn concurrent_decisions_share_fsyncs() {
    let latch = Latch::default();
    let fx = fixture(SyncMode::Always, GateLimits::default(), &latch);
    let before = fx.gate.audit().syncs();
    let done = Arc::new(AtomicUsize::new(0));
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let mut c = fx.conn(&format!("c{t}"));
            let done = Arc::clone(&done);
            std::thread::spawn(move || {
                let mut frames = Vec::new();
                for i in 0..50 {
                    frames.extend(line(i, "fs.stat", json!({"path": "hello.txt"})));
                }
                let mut out = Vec::new();
                c.on_data(&frames, &mut out).unwrap();
                wait_for(&mut c, &mut out, &(0..50).collect::<Vec<_>>());
                done.fetch_add(replies(&out).len(), Ordering::SeqCst);
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(done.load(Ordering::SeqCst), 400);
    let syncs = fx.gate.audit().syncs() - before;
    eprintln!("{syncs} fsyncs for 400 decisions on 8 connections");
    assert!(
        syncs < 400,
        "{syncs} fsyncs for 400 decisions: no group commit"
    );
}

/// Counts a connection's wakes; the test waits for the next one.
#[derive(Clone, Default)]
struct Wakes(Arc<(Mutex<usize>, Condvar)>);

impl Wakes {
    fn wake(&self) -> ironvmm::gate::inflight::Wake {
        let w = self.clone();
        Arc::new(move || {
            let (m, cv) = &*w.0;
            *m.lock().unwrap() += 1;
            cv.notify_all();
        })
    }

    fn count(&self) -> usize {
        *self.0 .0.lock().unwrap()
    }

    /// Waits until there were more than `n` wakes.
    fn wait_past(&self, n: usize) {
        let (m, cv) = &*self.0;
        let mut st = m.lock().unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while *st <= n {
            assert!(Instant::now() < deadline, "no wake after {n}");
            st = cv.wait_timeout(st, Duration::from_millis(100)).unwrap().0;
        }
    }
}

/// A gate with one worker, held by a call on another connection until the latch
/// opens: whatever a connection's `on_data` hands over cannot be parsed until then.
fn one_held_worker(latch: &Latch, limits: GateLimits) -> (Fixture, Connection) {
    let limits = GateLimits {
        workers: 1,
        call_timeout: Duration::from_secs(300),
        ..limits
    };
    let fx = fixture(SyncMode::Batch, limits, latch);
    let mut holder = fx.conn("holder");
    let mut out = Vec::new();
    holder
        .on_data(
            &line(1, "test.probe", json!({"until_open": true})),
            &mut out,
        )
        .unwrap();
    latch.wait_held(1);
    (fx, holder)
}

#[test]
fn a_reply_never_comes_from_on_data_only_through_poll_after_the_wake() {
    let latch = Latch::default();
    let fx = fixture(SyncMode::Batch, GateLimits::default(), &latch);
    let wakes = Wakes::default();
    let mut c = Connection::new(Arc::clone(&fx.gate), "w".into(), wakes.wake());
    for frame in [
        &br#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#[..],
        br#"{"jsonrpc":"2.0","id":2,"method":"nope"}"#,
        b"{not json",
    ] {
        let mut data = frame.to_vec();
        data.push(b'\n');
        let before = wakes.count();
        let mut out = Vec::new();
        c.on_data(&data, &mut out).unwrap();
        assert!(
            out.is_empty(),
            "a reply from on_data: {}",
            String::from_utf8_lossy(&out)
        );
        wakes.wait_past(before);
        c.poll(&mut out).unwrap();
        let r = replies(&out);
        assert_eq!(r.len(), 1, "{r:?}");
        assert!(r[0].get("result").is_some() || r[0].get("error").is_some());
        assert_eq!(c.in_flight(), 0);
    }
}

#[test]
fn large_and_deep_frames_are_parsed_off_the_calling_thread() {
    let latch = Latch::default();
    let (fx, mut holder) = one_held_worker(&latch, GateLimits::default());
    let mut c = fx.conn("c1");
    // Just under the 1 MiB frame limit, and nested far past the depth limit.
    let pad = "a".repeat((1 << 20) - 200);
    let big = format!(r#"{{"jsonrpc":"2.0","id":1,"method":"ping","params":{{"x":"{pad}"}}}}"#);
    let deep = format!(
        r#"{{"jsonrpc":"2.0","id":2,"method":"ping","params":{{"x":{}{}}}}}"#,
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    let mut out = Vec::new();
    for frame in [big, deep] {
        let mut data = frame.into_bytes();
        data.push(b'\n');
        let mut at = 0;
        while at < data.len() {
            let n = c.input_room().min(data.len() - at);
            assert!(n > 0, "no room for a frame while the worker is held");
            c.on_data(&data[at..at + n], &mut out).unwrap();
            at += n;
        }
    }
    // on_data returned while the only worker is held: neither frame was parsed (nor
    // answered) on this thread. Both hold their slots, waiting for a worker.
    assert!(out.is_empty());
    assert_eq!(c.in_flight(), 2);
    assert!(!c.wait_ready(Duration::ZERO), "a reply without a worker");
    assert_eq!(c.pending_bytes(), 0, "both frames left the framer");
    latch.open();
    wait_for(&mut c, &mut out, &[1]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while replies(&out).len() < 2 {
        assert!(
            Instant::now() < deadline,
            "the deep frame was never answered"
        );
        c.wait_ready(Duration::from_millis(200));
        c.poll(&mut out).unwrap();
    }
    let r = replies(&out);
    let ping = r.iter().find(|v| v["id"] == 1).unwrap();
    assert_eq!(ping["result"], json!({}));
    let deep = r.iter().find(|v| v["id"].is_null()).unwrap();
    assert_eq!(deep["error"]["code"], -32600, "{deep}");
    assert!(deep["error"]["message"].as_str().unwrap().contains("64"));
    wait_for(&mut holder, &mut Vec::new(), &[1]);
    assert_eq!(fx.gate.in_flight(), 0);
}

#[test]
fn notifications_and_client_responses_give_their_slot_back() {
    let latch = Latch::default();
    let (fx, mut holder) = one_held_worker(&latch, GateLimits::default());
    let wakes = Wakes::default();
    let mut c = Connection::new(Arc::clone(&fx.gate), "n".into(), wakes.wake());
    let mut out = Vec::new();
    let frames = concat!(
        r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#,
        "\n",
        r#"{"jsonrpc":"2.0","method":"tools/call","params":{"name":"fs.stat","arguments":{"path":"hello.txt"}}}"#,
        "\n",
        r#"{"jsonrpc":"2.0","id":7,"result":{}}"#,
        "\n",
        r#"{"jsonrpc":"2.0","id":null,"error":{"code":-32700,"message":"x"}}"#,
        "\n",
    );
    c.on_data(frames.as_bytes(), &mut out).unwrap();
    // Each took a slot before it was handed over, like any frame.
    assert_eq!(c.in_flight(), 4);
    assert_eq!(fx.gate.in_flight(), 5, "the holder's call and these four");
    assert!(c.has_pending_output());
    latch.open();
    wait_for(&mut holder, &mut Vec::new(), &[1]);
    // Released without a reply, and the connection is woken for it: a transport
    // waiting for the last frame in flight (a half-closed peer) learns it is done.
    // (The count is read before the slots: a release in between is then a wake
    // still to come, never one missed.)
    loop {
        let before = wakes.count();
        if c.in_flight() == 0 {
            break;
        }
        wakes.wait_past(before);
    }
    assert!(wakes.count() >= 1);
    c.poll(&mut out).unwrap();
    assert!(out.is_empty(), "{}", String::from_utf8_lossy(&out));
    assert!(!c.has_pending_output());
    assert_eq!(fx.gate.in_flight(), 0);
    assert!(
        fx.records().iter().all(|r| r["conn"] != "n"),
        "nothing of these four was decided"
    );
}

#[test]
fn cheap_frames_count_against_the_bounds_too() {
    let latch = Latch::default();
    let limits = GateLimits {
        max_inflight_per_conn: 4,
        max_inflight: 7,
        ..GateLimits::default()
    };
    let (fx, mut holder) = one_held_worker(&latch, limits);
    let mut conns: Vec<Connection> = (0..2).map(|i| fx.conn(&format!("c{i}"))).collect();
    let mut outs = vec![Vec::new(); 2];
    for (n, c) in conns.iter_mut().enumerate() {
        let mut frames = Vec::new();
        for i in 0..10 {
            frames.extend(format!(r#"{{"jsonrpc":"2.0","id":{i},"method":"ping"}}"#).bytes());
            frames.push(b'\n');
        }
        c.on_data(&frames, &mut outs[n]).unwrap();
        assert!(outs[n].is_empty());
    }
    // The holder's call, then 4 pings of the first connection (its own bound), then
    // 2 of the second (the VM's bound of 7).
    assert_eq!(conns[0].in_flight(), 4, "per-connection bound");
    assert_eq!(conns[1].in_flight(), 2, "the VM's bound took the rest");
    assert_eq!(fx.gate.in_flight(), 7);
    for c in &conns {
        assert_eq!(
            c.input_room(),
            0,
            "frames wait: the transport stops reading"
        );
        assert!(c.pending_bytes() > 0);
    }
    latch.open();
    wait_for(&mut holder, &mut Vec::new(), &[1]);
    for (n, c) in conns.iter_mut().enumerate() {
        wait_for(c, &mut outs[n], &(0..10).collect::<Vec<_>>());
        assert_eq!(replies(&outs[n]).len(), 10);
    }
    assert_eq!(fx.gate.in_flight(), 0);
}

#[test]
fn a_reset_waits_for_the_frames_before_it() {
    let latch = Latch::default();
    let limits = GateLimits::with_max_frame(1024);
    let (fx, mut holder) = one_held_worker(&latch, limits);
    let mut c = fx.conn("c1");
    let mut data = br#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#.to_vec();
    data.push(b'\n');
    data.extend(std::iter::repeat_n(b' ', 2000));
    data.push(b'\n');
    let mut out = Vec::new();
    // The ping is with a worker (held): the reset waits for its reply.
    c.on_data(&data, &mut out).unwrap();
    assert!(out.is_empty());
    assert_eq!(c.input_room(), 0, "no input is taken after the bad frame");
    assert_eq!(c.pending_bytes(), 0, "what followed it is dropped");
    assert!(c.has_pending_output());
    c.poll(&mut out).unwrap();
    assert!(out.is_empty());
    latch.open();
    let err = settle(&mut c, &mut out).unwrap_err();
    assert_eq!(
        err,
        ironvmm::gate::ConnectionError::FrameTooLong { limit: 1024 }
    );
    let r = replies(&out);
    assert_eq!(r.len(), 2, "the ping's reply, then the error: {r:?}");
    assert_eq!(r[0]["result"], json!({}));
    assert_eq!(r[1]["error"]["code"], -32600);
    assert_eq!(
        c.poll(&mut out),
        Err(ironvmm::gate::ConnectionError::Closed)
    );
    wait_for(&mut holder, &mut Vec::new(), &[1]);
}
