//! The approval hub without a gate: every answer path, dedup, timeout, breaker,
//! and learned rules (written, in force at once, checked against scenarios).

use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver};
use std::sync::Arc;
use std::time::Duration;

use ironvmm_gate::approvals::answers::AnswersFile;
use ironvmm_gate::approvals::breaker::BreakerConfig;
use ironvmm_gate::approvals::event::Event;
use ironvmm_gate::approvals::{
    AnswerError, ApprovalHub, HubConfig, Learner, LivePolicy, Mode, Reply, Scope,
};
use ironvmm_gate::audit::{AuditLog, SyncMode};
use ironvmm_gate::gate::approver::{Answer, Approver, AskRequest};
use ironvmm_gate::gate::{DecidedBy, Decider};
use ironvmm_gate::services::builtin_catalog;
use ironvmm_policy::Verdict;
use serde_json::{json, Map, Value};

const WAIT: Duration = Duration::from_secs(20);

fn req(seq: u64, tool: &str, args: Value, rule: Option<u32>) -> AskRequest {
    AskRequest {
        ask_seq: seq,
        conn: "test".into(),
        rpc_id: json!(seq),
        tool: tool.into(),
        args,
        rule,
        reason: "ask me".into(),
    }
}

/// Asks and returns where the answer will arrive.
fn ask(hub: &ApprovalHub, r: AskRequest) -> Receiver<Answer> {
    let (tx, rx) = mpsc::channel();
    hub.ask(
        r,
        Box::new(move |a| {
            let _ = tx.send(a);
        }),
    );
    rx
}

fn reply(allow: bool, learn: Option<Scope>, confirm: bool) -> Reply {
    Reply {
        allow,
        learn,
        confirm,
        channel: "socket".into(),
        who: Some("test".into()),
    }
}

#[test]
fn identical_asks_are_one_question_answered_together() {
    let hub = ApprovalHub::new(HubConfig::new("vm1", Mode::Socket));
    let (_, events) = hub.subscribe();
    let a = ask(
        &hub,
        req(
            1,
            "fs.write",
            json!({"path": "/w/a", "content": "x"}),
            Some(3),
        ),
    );
    let b = ask(
        &hub,
        req(
            2,
            "fs.write",
            json!({"content": "x", "path": "/w/a"}),
            Some(3),
        ),
    );
    let c = ask(
        &hub,
        req(
            3,
            "fs.write",
            json!({"path": "/w/b", "content": "x"}),
            Some(3),
        ),
    );
    let p = hub.pending();
    assert_eq!(p.len(), 2, "{p:?}");
    assert_eq!((p[0].calls, p[0].seq, p[0].pending), (2, 1, 2));
    assert!(a.try_recv().is_err(), "parked until answered");
    let d = hub.answer(p[0].id, reply(true, None, false)).unwrap();
    assert_eq!((d.decision, d.decided_by, d.calls), ("allow", "user", 2));
    for rx in [&a, &b] {
        let ans = rx.recv_timeout(WAIT).unwrap();
        assert!(ans.allow);
        assert_eq!(ans.answerer.by, DecidedBy::User);
        assert_eq!(ans.answerer.channel, "socket");
    }
    assert!(c.try_recv().is_err(), "the other question is still pending");
    assert!(matches!(
        hub.answer(p[0].id, reply(false, None, false)),
        Err(AnswerError::NoSuchAsk(_))
    ));
    // events: ask, ask, decided
    let kinds: Vec<&str> = events
        .try_iter()
        .map(|e| match &*e {
            Event::Ask(_) => "ask",
            Event::Decided(_) => "decided",
            Event::Decision(_) => "decision",
        })
        .collect();
    assert_eq!(kinds, ["ask", "ask", "decided"]);
}

#[test]
fn timeout_denies_and_one_thread_serves_all_timers() {
    let threads = || std::fs::read_dir("/proc/self/task").unwrap().count();
    let mut cfg = HubConfig::new("vm1", Mode::Socket);
    cfg.ask_timeout = Duration::from_millis(300);
    let hub = ApprovalHub::new(cfg);
    let before = threads();
    let rxs: Vec<_> = (0..200)
        .map(|i| {
            ask(
                &hub,
                req(i, "fs.read", json!({"path": format!("/w/{i}")}), Some(1)),
            )
        })
        .collect();
    assert!(threads() <= before + 1, "no thread per ask");
    for rx in rxs {
        let a = rx.recv_timeout(WAIT).unwrap();
        assert!(!a.allow);
        assert_eq!(a.answerer.by, DecidedBy::Timeout);
        assert!(a.reason.contains("--ask-timeout"), "{}", a.reason);
    }
    assert!(hub.pending().is_empty());
}

#[test]
fn closing_the_hub_denies_what_is_pending() {
    let hub = ApprovalHub::new(HubConfig::new("vm1", Mode::Socket));
    let a = ask(&hub, req(1, "fs.read", json!({"path": "/w/a"}), Some(1)));
    assert_eq!(hub.close("the run ended"), 1);
    let d = a.recv_timeout(WAIT).unwrap();
    assert_eq!(
        (d.allow, d.answerer.by, d.reason.as_str()),
        (false, DecidedBy::Timeout, "the run ended")
    );
    assert!(hub.pending().is_empty());
}

#[test]
fn breaker_denies_a_loop_without_asking() {
    let mut cfg = HubConfig::new("vm1", Mode::Socket);
    cfg.breaker = BreakerConfig {
        max: 2,
        window: Duration::from_secs(600),
    };
    let hub = ApprovalHub::new(cfg);
    let args = json!({"path": "/w/loop"});
    let _a = ask(&hub, req(1, "fs.read", args.clone(), Some(1)));
    let _b = ask(&hub, req(2, "fs.read", args.clone(), Some(1)));
    let c = ask(&hub, req(3, "fs.read", args, Some(1)));
    let d = c.recv_timeout(WAIT).unwrap();
    assert!(!d.allow);
    assert_eq!(d.answerer.by, DecidedBy::Breaker);
    assert!(d.reason.contains("circuit breaker"), "{}", d.reason);
    assert_eq!(hub.pending().len(), 1);
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn answers_file_non_interactive_and_nobody() {
    let d = tempfile::tempdir().unwrap();
    let ans = write(
        d.path(),
        "ci.answers",
        "allow fs.write when path under \"/workspace/ok\"\ndeny fs.write when path under \"/workspace/no\" \"not in CI\"\n",
    );
    let cat = builtin_catalog().unwrap();
    let mut cfg = HubConfig::new("vm1", Mode::Deny);
    cfg.answers = Some(AnswersFile::load(&ans, Some(&cat)).unwrap());
    let hub = ApprovalHub::new(cfg);
    let w = |p: &str| json!({"path": p, "content": "c"});
    let a = ask(&hub, req(1, "fs.write", w("/workspace/ok/x"), Some(2)))
        .recv_timeout(WAIT)
        .unwrap();
    assert!(a.allow);
    assert_eq!(a.answerer.by, DecidedBy::Answers);
    assert_eq!(
        a.answerer.who.as_deref(),
        Some(&*format!("{}:1", ans.display()))
    );
    let a = ask(&hub, req(2, "fs.write", w("/workspace/no/x"), Some(2)))
        .recv_timeout(WAIT)
        .unwrap();
    assert!(!a.allow);
    assert_eq!(
        (a.answerer.by, a.reason.as_str()),
        (DecidedBy::Answers, "not in CI")
    );
    // not in the file, nobody to ask: denied at once, saying why
    let a = ask(&hub, req(3, "fs.write", w("/workspace/x"), Some(2)))
        .recv_timeout(WAIT)
        .unwrap();
    assert!(!a.allow);
    assert_eq!(a.answerer.by, DecidedBy::NonInteractive);
    assert!(
        a.reason.contains("no approver can answer") && a.reason.contains("no rule of --answers"),
        "{}",
        a.reason
    );

    let mut cfg = HubConfig::new("vm1", Mode::Tty);
    cfg.non_interactive = true;
    let hub = ApprovalHub::new(cfg);
    let a = ask(&hub, req(1, "fs.write", w("/workspace/x"), Some(2)))
        .recv_timeout(WAIT)
        .unwrap();
    assert_eq!((a.allow, a.answerer.by), (false, DecidedBy::NonInteractive));
    assert!(a.reason.contains("--non-interactive"));
    assert!(hub.pending().is_empty());
}

const POLICY: &str = "version 1
allow fs.read when path under \"/workspace\"
deny  fs.write when path under \"/workspace/etc\" \"never etc\"
ask   fs.write when path under \"/workspace\" \"writes need a yes\"
default deny
";

struct Learning {
    _dir: tempfile::TempDir,
    policy: PathBuf,
    audit: PathBuf,
    live: Arc<LivePolicy>,
    hub: ApprovalHub,
}

fn learning(scenarios: Option<&str>) -> Learning {
    let dir = tempfile::tempdir().unwrap();
    let policy = write(dir.path(), "p.rules", POLICY);
    if let Some(s) = scenarios {
        write(dir.path(), "p.scenarios.jsonl", s);
    }
    let audit = dir.path().join("audit.jsonl");
    let log = Arc::new(AuditLog::create(&audit, "vm1", SyncMode::Always, Map::new()).unwrap());
    let (live, _) = LivePolicy::load(&policy, Some(builtin_catalog().unwrap())).unwrap();
    let mut cfg = HubConfig::new("vm1", Mode::Socket);
    cfg.learner = Some(Learner::new(Arc::clone(&live), Some(log)));
    Learning {
        _dir: dir,
        policy,
        audit,
        live: Arc::clone(&live),
        hub: ApprovalHub::new(cfg),
    }
}

fn decide(live: &Arc<LivePolicy>, tool: &str, args: Value) -> (Verdict, DecidedBy) {
    let d = ironvmm_gate::approvals::live::LiveDecider(Arc::clone(live));
    let r = d.decide(tool, &args);
    (r.verdict, r.by)
}

#[test]
fn allow_always_writes_a_rule_in_force_at_once() {
    let l = learning(None);
    let call = json!({"path": "/workspace/out/a.txt", "content": "hi"});
    assert_eq!(decide(&l.live, "fs.write", call.clone()).0, Verdict::Ask);
    let rx = ask(&l.hub, req(7, "fs.write", call.clone(), Some(4)));
    // another pending question in the same folder is settled by the new rule too
    let other = ask(
        &l.hub,
        req(
            8,
            "fs.write",
            json!({"path": "/workspace/out/b.txt", "content": "x"}),
            Some(4),
        ),
    );
    let id = l.hub.pending()[0].id;
    let d = l
        .hub
        .answer(id, reply(true, Some(Scope::Value), false))
        .unwrap();
    let learned = d.learned.unwrap();
    assert_eq!(
        learned.rule,
        "allow fs.write when args.path under \"/workspace/out\""
    );
    assert!(rx.recv_timeout(WAIT).unwrap().allow);
    let o = other.recv_timeout(WAIT).unwrap();
    assert_eq!((o.allow, o.answerer.by), (true, DecidedBy::Learned));

    let text = std::fs::read_to_string(l.policy.with_extension("rules.learned")).unwrap();
    assert_eq!(
        text,
        "# seq 7, refines line 4\nallow fs.write when args.path under \"/workspace/out\"\n"
    );
    // in force for the running VM: the next write there is not asked
    assert_eq!(
        decide(
            &l.live,
            "fs.write",
            json!({"path": "/workspace/out/c", "content": "z"})
        ),
        (Verdict::Allow, DecidedBy::Learned)
    );
    // elsewhere it still asks, and a deny rule before the ask still wins
    assert_eq!(
        decide(
            &l.live,
            "fs.write",
            json!({"path": "/workspace/x", "content": "z"})
        )
        .0,
        Verdict::Ask
    );
    // the audit log has the learn record
    let log = std::fs::read_to_string(&l.audit).unwrap();
    let rec: Value = log
        .lines()
        .map(|x| serde_json::from_str::<Value>(x).unwrap())
        .find(|r| r["kind"] == "learn")
        .unwrap();
    assert_eq!(rec["ask_seq"], 7);
    assert_eq!(rec["refines"], 4);
    assert_eq!(rec["scope"], "value");
    assert_eq!(rec["channel"], "socket");
}

#[test]
fn a_learned_rule_never_overrides_a_deny() {
    let l = learning(None);
    let rx = ask(
        &l.hub,
        req(
            3,
            "fs.write",
            json!({"path": "/workspace/a", "content": "x"}),
            Some(4),
        ),
    );
    let id = l.hub.pending()[0].id;
    l.hub
        .answer(id, reply(true, Some(Scope::Tool), false))
        .unwrap();
    assert!(rx.recv_timeout(WAIT).unwrap().allow);
    assert_eq!(
        decide(
            &l.live,
            "fs.write",
            json!({"path": "/workspace/etc/passwd", "content": "x"})
        ),
        (Verdict::Deny, DecidedBy::Rule)
    );
    assert_eq!(
        decide(
            &l.live,
            "fs.write",
            json!({"path": "/workspace/b", "content": "x"})
        ),
        (Verdict::Allow, DecidedBy::Learned)
    );
}

#[test]
fn a_rule_that_changes_a_scenario_is_kept_only_on_confirmation() {
    let scen = "{\"call\":{\"tool\":\"fs.write\",\"args\":{\"path\":\"/workspace/out/x\",\"content\":\"a\"}},\"expect\":\"ask\"}\n\
                {\"call\":{\"tool\":\"fs.write\",\"args\":{\"path\":\"/workspace/private/k\",\"content\":\"a\"}},\"expect\":\"ask\",\"note\":\"private files need a yes\"}\n\
                {\"call\":{\"tool\":\"fs.read\",\"args\":{\"path\":\"/workspace/r\"}},\"expect\":\"allow\"}\n";
    let l = learning(Some(scen));
    let rx = ask(
        &l.hub,
        req(
            5,
            "fs.write",
            json!({"path": "/workspace/a.txt", "content": "x"}),
            Some(4),
        ),
    );
    let id = l.hub.pending()[0].id;
    let learned = l.policy.with_extension("rules.learned");
    let e = l
        .hub
        .answer(id, reply(true, Some(Scope::Tool), false))
        .unwrap_err();
    let AnswerError::NeedsConfirmation(c) = e else {
        panic!("expected a confirmation, got {e}")
    };
    assert_eq!(c.rule, "allow fs.write");
    let lines: Vec<usize> = c.conflicts.iter().map(|x| x.line).collect();
    assert_eq!(lines, [1, 2]);
    assert_eq!(
        (c.conflicts[1].before, c.conflicts[1].after),
        (Verdict::Ask, Verdict::Allow)
    );
    assert_eq!(
        c.conflicts[1].note.as_deref(),
        Some("private files need a yes")
    );
    assert!(!learned.exists(), "nothing written without confirmation");
    assert!(rx.try_recv().is_err(), "and the question is still pending");
    assert_eq!(
        decide(
            &l.live,
            "fs.write",
            json!({"path": "/workspace/q", "content": "x"})
        )
        .0,
        Verdict::Ask
    );
    // a narrower rule that changes no scenario goes through without confirmation
    let d = l
        .hub
        .answer(id, reply(true, Some(Scope::Exact), false))
        .unwrap();
    assert!(d
        .learned
        .unwrap()
        .rule
        .contains("args.path == \"/workspace/a.txt\""));
    assert!(rx.recv_timeout(WAIT).unwrap().allow);
    // and with confirmation the wide rule is kept
    let rx = ask(
        &l.hub,
        req(
            9,
            "fs.write",
            json!({"path": "/workspace/b.txt", "content": "x"}),
            Some(4),
        ),
    );
    let id = l.hub.pending()[0].id;
    l.hub
        .answer(id, reply(true, Some(Scope::Tool), true))
        .unwrap();
    assert!(rx.recv_timeout(WAIT).unwrap().allow);
    let text = std::fs::read_to_string(&learned).unwrap();
    assert!(
        text.contains("# seq 9, refines line 4\nallow fs.write\n"),
        "{text}"
    );
}

#[test]
fn learning_from_a_default_ask_is_refused_clearly() {
    let l = learning(None);
    let _rx = ask(
        &l.hub,
        req(
            5,
            "fs.write",
            json!({"path": "/workspace/a", "content": "x"}),
            None,
        ),
    );
    let id = l.hub.pending()[0].id;
    let e = l
        .hub
        .answer(id, reply(true, Some(Scope::Tool), false))
        .unwrap_err();
    assert!(e.to_string().contains("no rule to refine"), "{e}");
    assert_eq!(l.hub.pending().len(), 1);
}

/// The seed policy: "for anyone else, ask me first". Learning "always allow this
/// recipient" changes no scenario; learning "always allow mail.send" would allow
/// the scenarios that say strangers must be asked, and is refused without
/// confirmation. The scenarios use `at` (limit windows) and notes.
#[test]
fn seed_inbox_policy_learns_a_recipient_and_refuses_the_whole_tool() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    let dir = tempfile::tempdir().unwrap();
    for (from, to) in [
        ("policies/inbox.rules", "p.rules"),
        ("policies/contacts.txt", "contacts.txt"),
        ("policies/inbox.scenarios.jsonl", "p.scenarios.jsonl"),
    ] {
        std::fs::copy(root.join(from), dir.path().join(to)).unwrap();
    }
    let catalog = ironvmm_policy::Catalog::from_json(
        &std::fs::read_to_string(root.join("catalog.json")).unwrap(),
    )
    .unwrap();
    let policy = dir.path().join("p.rules");
    let (live, _) = LivePolicy::load(&policy, Some(catalog)).unwrap();
    let mut cfg = HubConfig::new("inbox", Mode::Socket);
    cfg.learner = Some(Learner::new(Arc::clone(&live), None));
    let hub = ApprovalHub::new(cfg);
    let send = json!({"to": ["dave@gmail.com"], "subject": "hi", "body": "x"});
    let (v, _) = decide(&live, "mail.send", send.clone());
    assert_eq!(v, Verdict::Ask, "a non-contact is asked");

    let rx = ask(&hub, req(30, "mail.send", send.clone(), Some(15)));
    let id = hub.pending()[0].id;
    let AnswerError::NeedsConfirmation(c) = hub
        .answer(id, reply(true, Some(Scope::Tool), false))
        .unwrap_err()
    else {
        panic!("the whole tool must need confirmation")
    };
    assert!(
        c.conflicts
            .iter()
            .any(|x| x.note.as_deref() == Some("one outsider") && x.after == Verdict::Allow),
        "{:?}",
        c.conflicts
    );
    let d = hub
        .answer(id, reply(true, Some(Scope::Value), false))
        .unwrap();
    assert_eq!(
        d.learned.unwrap().rule,
        "allow mail.send when all args.to in [\"dave@gmail.com\"]"
    );
    assert!(rx.recv_timeout(WAIT).unwrap().allow);
    // the next send to dave goes through without asking; a stranger is still asked
    assert_eq!(
        decide(
            &live,
            "mail.send",
            json!({"to": ["dave@gmail.com"], "subject": "again", "body": "y"})
        ),
        (Verdict::Allow, DecidedBy::Learned)
    );
    assert_eq!(
        decide(
            &live,
            "mail.send",
            json!({"to": ["eve@gmail.com"], "subject": "hi", "body": "x"})
        )
        .0,
        Verdict::Ask
    );
}
