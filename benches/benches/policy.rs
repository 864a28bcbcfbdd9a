//! `cargo bench --bench policy`: decision latency of the p.rules engine against
//! Cedar on the same policies and the same calls, and the time to load a policy.
//!
//! Policies of 10, 100 and 1,000 rules over 50 tools, written twice: in p.rules
//! and in Cedar (only conditions Cedar can express: tool plus argument tests, no
//! regexes, no limits). The call mix is fixed by a seeded generator: paths in and
//! out of the workspace, hosts and ports, recipient lists, modes and sizes. Each
//! engine gets the call already parsed (a `Call`, a Cedar `Request`): what is timed
//! is the decision alone. The figure is the median over calls of the mean of 32
//! back-to-back decisions of the same call (fewer for Cedar on big policies).

use cedar_policy::{Authorizer, Context, Entities, EntityUid, PolicySet, Request};
use ironvmm_benches::{median, percentile, ratio_line};
use ironvmm_policy::{Call, Policy, Verdict};
use serde_json::{json, Value};
use std::hint::black_box;
use std::time::Instant;

const TOOLS: usize = 50;
const CALLS: usize = 2000;
const REPS: u32 = 32;
const ROUNDS: usize = 5;

fn tool(t: usize) -> String {
    format!("svc{}.tool{}", t / 5, t % 5)
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// The same policy in p.rules and in Cedar. Rule i is about tool i % 50; the
/// tool's index picks the kind of condition, so each tool has one argument shape.
fn policies(n: usize) -> (String, String) {
    let mut rules = String::from("version 1\n");
    let mut cedar = String::new();
    for i in 0..n {
        let t = tool(i % TOOLS);
        let act = format!("principal, action == Action::\"{t}\", resource");
        match (i % TOOLS) % 5 {
            0 => {
                rules.push_str(&format!("allow {t} when path under \"/workspace/d{i}\"\n"));
                cedar.push_str(&format!(
                    "permit({act}) when {{ context has path && (context.path == \"/workspace/d{i}\" || context.path like \"/workspace/d{i}/*\") }};\n"
                ));
            }
            1 => {
                rules.push_str(&format!("allow {t} when host in [\"h{i}.example.com\", \"*.cdn{i}.net\"] and port == 443\n"));
                cedar.push_str(&format!(
                    "permit({act}) when {{ context has host && context has port && ([\"h{i}.example.com\"].contains(context.host) || context.host like \"*.cdn{i}.net\") && context.port == 443 }};\n"
                ));
            }
            2 => {
                rules.push_str(&format!("ask {t} when all to in [\"u{i}@example.com\", \"v{i}@example.com\"] and not exists cc\n"));
                cedar.push_str(&format!(
                    "permit({act}) when {{ context has to && [\"u{i}@example.com\", \"v{i}@example.com\"].containsAll(context.to) && !(context has cc) }};\n"
                ));
            }
            3 => {
                rules.push_str(&format!("deny {t} when mode == \"w{i}\"\n"));
                cedar.push_str(&format!(
                    "forbid({act}) when {{ context has mode && context.mode == \"w{i}\" }};\n"
                ));
            }
            _ => {
                rules.push_str(&format!(
                    "allow {t} when size <= {} and kind == \"file\"\n",
                    (i + 1) * 100
                ));
                cedar.push_str(&format!(
                    "permit({act}) when {{ context has size && context has kind && context.size <= {} && context.kind == \"file\" }};\n",
                    (i + 1) * 100
                ));
            }
        }
    }
    rules.push_str("default deny\n");
    (rules, cedar)
}

/// A call for a tool that has rules: half of them meet some rule's condition.
fn call(rng: &mut Rng, n: usize) -> (String, Value) {
    let t = rng.below(TOOLS.min(n));
    let i = t + TOOLS * rng.below(n.div_ceil(TOOLS)); // a rule of this tool (or past the end)
    let hit = rng.below(2) == 0;
    let args = match t % 5 {
        0 => json!({"path": match (hit, rng.below(10)) {
            (true, _) => format!("/workspace/d{i}/src/main.rs"),
            (false, 0) => format!("/workspace/d{i}/../../etc/passwd"),
            (false, _) => format!("/workspace/other{i}/x.rs"),
        }}),
        1 => {
            json!({"host": if hit { format!("www.cdn{i}.net") } else { "evil.example.org".to_string() }, "port": 443})
        }
        2 => {
            if hit {
                json!({"to": [format!("u{i}@example.com")]})
            } else {
                json!({"to": [format!("u{i}@example.com"), "eve@evil.com"], "cc": ["x@y.z"]})
            }
        }
        3 => json!({"mode": if hit { format!("w{i}") } else { "r".to_string() }}),
        _ => json!({"size": if hit { 50 } else { 10_000_000 }, "kind": "file"}),
    };
    (tool(t), args)
}

fn time_per_decision(reps: u32, mut f: impl FnMut()) -> f64 {
    let t0 = Instant::now();
    for _ in 0..reps {
        f();
    }
    t0.elapsed().as_nanos() as f64 / f64::from(reps)
}

fn main() {
    // `cargo bench` passes `--bench`; any other argument filters nothing here.
    println!(
        "policy decision benchmark ({} calls x {ROUNDS} rounds, {REPS} decisions per sample)",
        CALLS
    );
    let mut load_1000 = None;
    // POLICY_BENCH_SIZES=100 (comma-separated) runs only those sizes.
    let sizes: Vec<usize> = std::env::var("POLICY_BENCH_SIZES")
        .ok()
        .map(|v| v.split(',').filter_map(|s| s.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![10, 100, 1000]);
    for &n in &sizes {
        // Cedar evaluates every policy on every call: fewer repetitions keep the
        // 1,000-rule run short (each sample is still a mean over >= 1 ms of work).
        let cedar_reps = (REPS * 10 / n as u32).clamp(1, REPS);
        let (rules, cedar_src) = policies(n);
        let policy = Policy::from_source(&rules, "bench.rules", None, None)
            .expect("bench policy loads")
            .policy;
        let cedar: PolicySet = cedar_src.parse().expect("cedar policy parses");
        let mut rng = Rng(42);
        let calls: Vec<(Call, Request)> = (0..CALLS)
            .map(|_| {
                let (t, args) = call(&mut rng, n);
                let req = Request::new(
                    r#"User::"agent""#.parse::<EntityUid>().unwrap(),
                    format!("Action::\"{t}\"").parse::<EntityUid>().unwrap(),
                    format!("Tool::\"{t}\"").parse::<EntityUid>().unwrap(),
                    Context::from_json_value(args.clone(), None).unwrap(),
                    None,
                )
                .unwrap();
                (Call::new(t, args), req)
            })
            .collect();
        let auth = Authorizer::new();
        let entities = Entities::empty();
        // Both engines decide every call once; the mix must exercise every verdict.
        let mut counts = [0usize; 3];
        let mut cedar_allows = 0;
        for (c, r) in &calls {
            match policy.decide_ref(c).verdict {
                Verdict::Allow => counts[0] += 1,
                Verdict::Deny => counts[1] += 1,
                Verdict::Ask => counts[2] += 1,
            }
            if auth.is_authorized(r, &cedar, &entities).decision() == cedar_policy::Decision::Allow
            {
                cedar_allows += 1;
            }
        }
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            for (c, r) in &calls {
                ours.push(time_per_decision(REPS, || {
                    black_box(policy.decide_ref(black_box(c)));
                }));
                theirs.push(time_per_decision(cedar_reps, || {
                    black_box(auth.is_authorized(black_box(r), &cedar, &entities));
                }));
            }
        }
        if std::env::var_os("POLICY_BENCH_BY_KIND").is_some() {
            // Per kind of call (the tool's index mod 5), ironvmm only.
            for kind in 0..5 {
                let mut k: Vec<f64> = ours
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| {
                        let t = &calls[i % CALLS].0.tool;
                        let idx: usize = t[3..t.find('.').unwrap()].parse::<usize>().unwrap() * 5
                            + t[t.len() - 1..].parse::<usize>().unwrap();
                        idx % 5 == kind
                    })
                    .map(|(_, v)| *v)
                    .collect();
                println!(
                    "  kind {kind}: median {:.0} ns over {} samples",
                    median(&mut k).unwrap_or(0.0),
                    k.len()
                );
            }
        }
        let (mo, mt) = (median(&mut ours).unwrap(), median(&mut theirs).unwrap());
        let (po, pt) = (
            percentile(&mut ours, 99.0).unwrap(),
            percentile(&mut theirs, 99.0).unwrap(),
        );
        println!(
            "{n:>5} rules: ironvmm median {mo:.0} ns (p99 {po:.0}), cedar median {mt:.0} ns (p99 {pt:.0}); cedar/ironvmm = {:.1}x  [mix: {} allow, {} deny, {} ask; cedar allows {}]",
            mt / mo,
            counts[0],
            counts[1],
            counts[2],
            cedar_allows
        );
        println!(
            "  {}",
            ratio_line(
                &format!("median decision, {n} rules"),
                "ns",
                mo,
                "cedar",
                mt
            )
        );
        if n == 100 {
            println!(
                "  target <= 200 ns median at 100 rules: {}",
                if mo <= 200.0 { "met" } else { "NOT met" }
            );
        }
        println!(
            "  target >= 10x faster than cedar: {}",
            if mt / mo >= 10.0 { "met" } else { "NOT met" }
        );
        if n == 1000 {
            let mut loads = Vec::new();
            let mut cedar_loads = Vec::new();
            for _ in 0..20 {
                let t0 = Instant::now();
                black_box(
                    Policy::from_source(black_box(&rules), "bench.rules", None, None).unwrap(),
                );
                loads.push(t0.elapsed().as_secs_f64() * 1e3);
                let t0 = Instant::now();
                black_box(black_box(&cedar_src).parse::<PolicySet>().unwrap());
                cedar_loads.push(t0.elapsed().as_secs_f64() * 1e3);
            }
            load_1000 = Some((
                median(&mut loads).unwrap(),
                median(&mut cedar_loads).unwrap(),
            ));
        }
    }
    if let Some((ms, cedar_ms)) = load_1000 {
        println!("parse + check + compile, 1000 rules: median {ms:.2} ms (cedar parse: {cedar_ms:.2} ms)");
        println!(
            "  target <= 10 ms: {}",
            if ms <= 10.0 { "met" } else { "NOT met" }
        );
    }
}
