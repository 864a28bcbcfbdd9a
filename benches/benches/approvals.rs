//! `cargo bench --bench approvals`: what approvals cost on the paths that matter.
//!
//! - a decision through the live policy (the gate's decider: read lock, owned
//!   reason) against the bare engine, on the seed inbox policy;
//! - an ask parked in the hub and answered (ask → event → answer → sink);
//! - a rule learned: candidate, scenario check (the seed inbox scenarios), atomic
//!   write and reload.

use std::hint::black_box;
use std::path::Path;
use std::sync::{mpsc, Arc};
use std::time::Instant;

use ironvmm::approvals::live::LiveDecider;
use ironvmm::approvals::{ApprovalHub, HubConfig, Learner, LivePolicy, Mode, Reply, Scope};
use ironvmm::gate::approver::{Approver, AskRequest};
use ironvmm::gate::Decider;
use ironvmm_benches::{median, workspace_root};
use ironvmm_policy::{Catalog, Policy};
use serde_json::json;

fn per_op(n: u32, mut f: impl FnMut(u32)) -> f64 {
    let t0 = Instant::now();
    for i in 0..n {
        f(i);
    }
    t0.elapsed().as_nanos() as f64 / f64::from(n)
}

fn main() {
    let ex = workspace_root().join("examples");
    let dir = std::env::temp_dir().join(format!("ironvmm-bench-approvals-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for (from, to) in [
        ("policies/inbox.rules", "p.rules"),
        ("policies/contacts.txt", "contacts.txt"),
        ("policies/inbox.scenarios.jsonl", "p.scenarios.jsonl"),
    ] {
        std::fs::copy(ex.join(from), dir.join(to)).unwrap();
    }
    let cat =
        || Catalog::from_json(&std::fs::read_to_string(ex.join("catalog.json")).unwrap()).unwrap();
    let policy = dir.join("p.rules");
    let bare = Policy::load(&policy, Some(&cat())).unwrap().policy;
    let (live, _) = LivePolicy::load(&policy, Some(cat())).unwrap();
    let decider = LiveDecider(Arc::clone(&live));
    let calls = [
        ("mail.read", json!({"id": "m1"})),
        (
            "mail.send",
            json!({"to": ["dave@gmail.com"], "subject": "hi", "body": "x"}),
        ),
        ("fs.read", json!({"path": "/workspace/notes/a.txt"})),
        ("net.connect", json!({"host": "apnews.com", "port": 443})),
    ];
    let (mut b, mut l) = (Vec::new(), Vec::new());
    for _ in 0..9 {
        b.push(per_op(200_000, |i| {
            let (t, a) = &calls[i as usize % calls.len()];
            black_box(bare.decide_parts(t, a).verdict);
        }));
        l.push(per_op(200_000, |i| {
            let (t, a) = &calls[i as usize % calls.len()];
            black_box(decider.decide(t, a).verdict);
        }));
    }
    let (b, l) = (median(&mut b).unwrap(), median(&mut l).unwrap());
    println!("decision, bare engine:   {b:.0} ns (median of 9 x 200,000)");
    println!(
        "decision, live policy:   {l:.0} ns (+{:.0} ns: read lock, owned reason)",
        l - b
    );

    let hub = ApprovalHub::new(HubConfig::new("bench", Mode::Socket));
    let mut rt = Vec::new();
    for round in 0..9u64 {
        rt.push(per_op(20_000, |i| {
            let (tx, rx) = mpsc::channel();
            let seq = round * 100_000 + u64::from(i);
            hub.ask(
                AskRequest {
                    ask_seq: seq,
                    conn: "c".into(),
                    rpc_id: json!(seq),
                    tool: "mail.send".into(),
                    args: json!({"to": [format!("u{seq}@x.y")]}),
                    rule: Some(15),
                    reason: "ask".into(),
                },
                Box::new(move |a| {
                    let _ = tx.send(a);
                }),
            );
            let id = hub.pending()[0].id;
            let reply = Reply {
                allow: true,
                learn: None,
                confirm: false,
                channel: "bench".into(),
                who: None,
            };
            hub.answer(id, reply).unwrap();
            black_box(rx.recv().unwrap());
        }));
    }
    println!(
        "ask parked and answered: {:.1} us (median of 9 x 20,000)",
        median(&mut rt).unwrap() / 1000.0
    );

    let mut cfg = HubConfig::new("bench", Mode::Socket);
    cfg.learner = Some(Learner::new(Arc::clone(&live), None));
    let hub = ApprovalHub::new(cfg);
    let mut learn = Vec::new();
    for i in 0..20u64 {
        let (tx, rx) = mpsc::channel();
        hub.ask(
            AskRequest {
                ask_seq: i,
                conn: "c".into(),
                rpc_id: json!(i),
                tool: "mail.send".into(),
                args: json!({"to": [format!("friend{i}@gmail.com")], "subject": "s", "body": "b"}),
                rule: Some(15),
                reason: "ask".into(),
            },
            Box::new(move |a| {
                let _ = tx.send(a);
            }),
        );
        let id = hub.pending()[0].id;
        let t0 = Instant::now();
        let reply = Reply {
            allow: true,
            learn: Some(Scope::Value),
            confirm: false,
            channel: "bench".into(),
            who: None,
        };
        hub.answer(id, reply).unwrap();
        learn.push(t0.elapsed().as_secs_f64() * 1000.0);
        black_box(rx.recv().unwrap());
    }
    let n = std::fs::read_to_string(dir.join("p.rules.learned"))
        .unwrap()
        .lines()
        .count()
        / 2;
    println!(
        "rule learned (check {} scenarios, write, reload): {:.1} ms median, {n} rules at the end",
        std::fs::read_to_string(dir.join("p.scenarios.jsonl"))
            .unwrap()
            .lines()
            .count(),
        median(&mut learn).unwrap()
    );
    let _ = std::fs::remove_dir_all(Path::new(&dir));
}
