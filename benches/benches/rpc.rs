//! `cargo bench --bench rpc`: an allowed small call's round trip from inside the
//! guest (p50, p99, calls/s) on 1 and 8 connections, bulk `fs.read` throughput for
//! 16 MiB, and the same calls through the host-only gate (`ironvmm gate --listen`)
//! in the same run, in both audit sync modes: the ratio is the cost of the VM path.
//! Also userspace VM exits, guest notifies and interrupts per call, with and
//! without `VIRTIO_RING_F_EVENT_IDX` (`boot --no-event-idx`), and the CPU per call
//! of the whole software host and of each of ironvmm's threads. The client is the
//! same static `iron` on both paths.
//!
//! Each small workload runs in rounds, and the VM's rounds and the host-only
//! gate's alternate: after each VM round the bench stops the VMM (SIGSTOP), runs
//! the same round against the host-only gate, and lets the VM go on (SIGCONT). The
//! two halves of a ratio thus see the same machine within seconds of each other,
//! and a verdict is the median of the per-round ratios.
//!
//! Where this host has no hardware virtualization, the bench re-runs itself inside
//! the software KVM host (scripts/kvm-host.sh) and says so. Where no KVM host can
//! be had at all, it runs the host-only half and says that the VM half was skipped.
//!
//! `cargo bench --bench rpc -- --host-only` runs only the host-only gate (no VM, no
//! KVM host: quick), `--quick` with a fifth of the small calls, `--host-cpus=N`
//! with N emulated CPUs in the software host (default 1), `--workspace-on-share`
//! with the workspace on the repository's 9p share instead of tmpfs.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use ironvmm_benches::{
    inside_kvm_host, kvm_kind, median, rerun_in_kvm_host, run_ok, vm_skipped_line, workspace_root,
};
use rustix::process::{kill_process, Pid, Signal};
use serde_json::Value;

/// Small calls on one connection (`--quick`: 200); eight connections make four
/// times as many.
fn small_calls() -> usize {
    if std::env::args().any(|a| a == "--quick") {
        200
    } else {
        1000
    }
}
const BULK: &str = r#"{"path":"/workspace/big.bin","length":524288,"encoding":"base64"}"#;
const STAT: &str = r#"{"path":"/workspace"}"#;
/// 16 MiB in 512 KiB reads (the per-call maximum of docs/protocol.md).
const BULK_CALLS: usize = 32;

/// Rounds a small workload is cut into (the bulk read is one round).
const ROUNDS: usize = 5;

/// Rounds of workload `i`.
fn rounds(i: usize) -> usize {
    if i == 2 {
        1
    } else {
        ROUNDS
    }
}

/// Calls in one round of workload `i`. Eight connections get four times one
/// connection's (100 per connection a round): their verdict is a throughput, which
/// a round's start and end, when fewer connections are busy, would otherwise weigh
/// on more (with 25 per connection the rounds' ratios spread twice as wide).
fn calls_per_round(i: usize) -> usize {
    match i {
        0 => small_calls() / ROUNDS,
        1 => 4 * small_calls() / ROUNDS,
        _ => BULK_CALLS,
    }
}

/// The three workloads, as the `iron bench` arguments of one round, with their
/// labels.
fn workloads() -> Vec<(&'static str, String)> {
    vec![
        (
            "fs.stat, 1 connection",
            format!(
                "-n {} -c 1 --tool fs.stat --args '{STAT}'",
                calls_per_round(0)
            ),
        ),
        (
            "fs.stat, 8 connections",
            format!(
                "-n {} -c 8 --tool fs.stat --args '{STAT}'",
                calls_per_round(1)
            ),
        ),
        (
            "fs.read 16 MiB in 512 KiB calls",
            format!("-n {BULK_CALLS} -c 1 --tool fs.read --args '{BULK}'"),
        ),
    ]
}

fn last_json(text: &str, prefix: &str) -> Option<Value> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix(prefix))
        .find_map(|j| serde_json::from_str(j).ok())
}

struct Paths {
    bin: PathBuf,
    iron: PathBuf,
    kernel: PathBuf,
    work: PathBuf,
    /// The workspace both gates serve.
    ws: PathBuf,
}

/// The workspace copied to the temp dir (tmpfs in the software host), as the audit
/// log is: served from the 9p share of the repo, every `fs.stat` would also time a
/// round trip to QEMU's 9p server, which neither path has on a real host.
/// `--workspace-on-share` serves it from the share, as the bench did before
/// 2026-12-02, to compare with those figures.
fn tmpfs_workspace(ws: &Path) -> PathBuf {
    if std::env::args().any(|a| a == "--workspace-on-share") {
        return ws.to_path_buf();
    }
    let to = std::env::temp_dir().join("ironvmm-rpc-ws");
    std::fs::create_dir_all(&to).unwrap();
    for e in std::fs::read_dir(ws).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
    to
}

fn write_policy(work: &Path) -> PathBuf {
    let p = work.join("p.rules");
    std::fs::write(&p, "version 1\nallow fs.stat when path under \"/workspace\"\nallow fs.read when path under \"/workspace\"\ndefault deny\n").unwrap();
    p
}

/// What a VM counted over its whole run (`IRONVMM_EXIT_STATS`).
#[derive(Clone, Copy, Default)]
struct Counts {
    /// Exits that reached userspace (port I/O and MMIO).
    exits: u64,
    /// The port I/O part of `exits`.
    pio: u64,
    /// QueueNotify writes by the guest (through the ioeventfd, no userspace exit).
    notifies: u64,
    /// Interrupts the vsock raised.
    interrupts: u64,
    /// The part of `notifies` on the rx queue.
    rx_notifies: u64,
    /// Kicks moved past a credit update: right, wrong guesses.
    skips: u64,
    skips_wrong: u64,
    /// MMIO writes KVM queued without an exit (InterruptACK).
    queued: u64,
}

/// CPU time of the whole machine, in clock ticks (`/proc/stat`'s first line):
/// where a call's time goes, in the guest or in ironvmm's threads.
#[derive(Clone, Copy, Default)]
struct Cpu {
    /// User time, guest time taken out (ironvmm's threads, iron on the host path).
    user: u64,
    /// Kernel time, interrupts included (KVM, vsock, sockets, the audit log).
    kernel: u64,
    /// Time spent running the guest.
    guest: u64,
    /// Time no thread could run (waiting on the 9p share of the workspace, say).
    idle: u64,
}

impl Cpu {
    fn now() -> Cpu {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let v: Vec<u64> = stat
            .lines()
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .skip(1)
            .map(|x| x.parse().unwrap_or(0))
            .collect();
        let at = |i: usize| v.get(i).copied().unwrap_or(0);
        // user nice system idle iowait irq softirq steal guest guest_nice; user
        // includes guest.
        Cpu {
            user: (at(0) + at(1)).saturating_sub(at(8) + at(9)),
            kernel: at(2) + at(5) + at(6),
            guest: at(8) + at(9),
            idle: at(3) + at(4),
        }
    }

    fn plus(self, more: Cpu) -> Cpu {
        Cpu {
            user: self.user + more.user,
            kernel: self.kernel + more.kernel,
            guest: self.guest + more.guest,
            idle: self.idle + more.idle,
        }
    }

    fn minus(self, base: Cpu) -> Cpu {
        Cpu {
            user: self.user.saturating_sub(base.user),
            kernel: self.kernel.saturating_sub(base.kernel),
            guest: self.guest.saturating_sub(base.guest),
            idle: self.idle.saturating_sub(base.idle),
        }
    }

    /// Milliseconds of each per call.
    fn per_call(self, calls: f64) -> String {
        // /proc/stat counts in USER_HZ, which is 100 on x86 Linux.
        let ms = |t: u64| t as f64 * 10.0 / calls;
        format!(
            "{:.2} ms in the guest, {:.2} ms user, {:.2} ms kernel, {:.2} ms idle",
            ms(self.guest),
            ms(self.user),
            ms(self.kernel),
            ms(self.idle)
        )
    }
}

/// CPU time of one process's threads, by thread name with its number taken off
/// (`gate-worker-3` → `gate-worker`), in clock ticks: which of ironvmm's threads
/// a call's time goes to (`vcpu` holds the guest's time).
#[derive(Clone, Default)]
struct Threads {
    cpu: BTreeMap<String, Cpu>,
    /// Context switches by the same names: voluntary (the thread slept), and
    /// involuntary (it was preempted).
    switches: BTreeMap<String, (u64, u64)>,
}

/// The key of the whole process's time in a `Threads` snapshot.
const PROCESS: &str = "(process)";

/// Fields of a `/proc` `stat` line after the name, numbered as in proc(5).
fn stat_fields(stat: &str) -> Option<impl Fn(usize) -> u64> {
    // `PID (NAME) STATE PPID ...`: the name may hold spaces and parentheses.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // `rest` starts at field 3 (state).
    Some(move |field: usize| f.get(field - 3).copied().unwrap_or(0))
}

/// utime, stime and guest_time of a `stat` line (utime includes the guest's).
fn stat_cpu(at: impl Fn(usize) -> u64) -> Cpu {
    let guest = at(43);
    Cpu {
        user: at(14).saturating_sub(guest),
        kernel: at(15),
        guest,
        idle: 0,
    }
}

impl Threads {
    fn of(pid: u32) -> Threads {
        let mut t = Threads::default();
        let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return t;
        };
        for task in dir.flatten() {
            let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
                continue;
            };
            let name = stat.split_once('(').map_or("", |x| x.1);
            let name = name.rsplit_once(')').map_or("", |x| x.0);
            let name = name
                .trim_end_matches(|c: char| c.is_ascii_digit())
                .trim_end_matches('-')
                .to_string();
            let Some(at) = stat_fields(&stat) else {
                continue;
            };
            let e = t.cpu.entry(name.clone()).or_default();
            *e = e.plus(stat_cpu(at));
            let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
            let count = |key: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(key)?.trim().parse::<u64>().ok())
                    .unwrap_or(0)
            };
            let s = t.switches.entry(name).or_default();
            s.0 += count("voluntary_ctxt_switches:");
            s.1 += count("nonvoluntary_ctxt_switches:");
        }
        // The process's own line counts its ended threads too (the host-only gate's
        // thread per client): kept aside, for `minus` to tell them apart.
        if let Some(at) = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .as_deref()
            .and_then(stat_fields)
        {
            t.cpu.insert(PROCESS.to_string(), stat_cpu(at));
        }
        t
    }

    /// What each thread took since `base`, and the threads that started and ended
    /// in between (`other`): the process's time less its threads'.
    fn minus(&self, base: &Threads) -> Threads {
        let mut cpu: BTreeMap<String, Cpu> = self
            .cpu
            .iter()
            .filter(|(k, _)| *k != PROCESS)
            .map(|(k, v)| {
                (
                    k.clone(),
                    v.minus(base.cpu.get(k).copied().unwrap_or_default()),
                )
            })
            .collect();
        if let (Some(now), Some(then)) = (self.cpu.get(PROCESS), base.cpu.get(PROCESS)) {
            let listed = cpu.values().fold(Cpu::default(), |a, c| a.plus(*c));
            cpu.insert("other".to_string(), now.minus(*then).minus(listed));
        }
        let switches = self
            .switches
            .iter()
            .map(|(k, &(v, i))| {
                let (v0, i0) = base.switches.get(k).copied().unwrap_or_default();
                (k.clone(), (v.saturating_sub(v0), i.saturating_sub(i0)))
            })
            .collect();
        Threads { cpu, switches }
    }

    fn add(&mut self, more: &Threads) {
        for (k, v) in &more.cpu {
            let e = self.cpu.entry(k.clone()).or_default();
            *e = e.plus(*v);
        }
        for (k, (v, i)) in &more.switches {
            let e = self.switches.entry(k.clone()).or_default();
            e.0 += v;
            e.1 += i;
        }
    }

    /// `name user + kernel [+ guest] ms (switches)` per call, the busiest first,
    /// down to 0.01 ms.
    fn per_call(&self, calls: f64) -> String {
        let ms = |t: u64| t as f64 * 10.0 / calls;
        let mut v: Vec<(&String, &Cpu)> = self.cpu.iter().collect();
        v.sort_by_key(|(_, c)| std::cmp::Reverse(c.user + c.kernel + c.guest));
        v.iter()
            .filter(|(_, c)| ms(c.user + c.kernel + c.guest) >= 0.01)
            .map(|(name, c)| {
                let guest = if c.guest > 0 {
                    format!(" + {:.2} guest", ms(c.guest))
                } else {
                    String::new()
                };
                let switches = match self.switches.get(*name) {
                    Some(&(v, i)) => format!(
                        " ({:.2} switches, {:.2} preempted)",
                        (v + i) as f64 / calls,
                        i as f64 / calls
                    ),
                    None => String::new(),
                };
                format!(
                    "{name} {:.2} user + {:.2} kernel{guest}{switches}",
                    ms(c.user),
                    ms(c.kernel)
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl Counts {
    fn minus(self, base: Counts) -> Counts {
        Counts {
            exits: self.exits.saturating_sub(base.exits),
            pio: self.pio.saturating_sub(base.pio),
            notifies: self.notifies.saturating_sub(base.notifies),
            interrupts: self.interrupts.saturating_sub(base.interrupts),
            rx_notifies: self.rx_notifies.saturating_sub(base.rx_notifies),
            skips: self.skips.saturating_sub(base.skips),
            skips_wrong: self.skips_wrong.saturating_sub(base.skips_wrong),
            queued: self.queued.saturating_sub(base.queued),
        }
    }
}

/// What one half of the bench (the VM path or the host-only gate) got: for each
/// workload, each round's `iron bench` summary, and the CPU its rounds took.
struct Half {
    rounds: Vec<Vec<Option<Value>>>,
    cpu: Vec<Cpu>,
    /// KVM's exits by reason over each workload's rounds (`ExitReasons`).
    exits: Vec<ExitCounts>,
    /// The CPU of ironvmm's threads over each workload's rounds (the VMM, or the
    /// host-only gate: not its client).
    threads: Vec<Threads>,
}

impl Half {
    fn new() -> Half {
        Half {
            rounds: vec![Vec::new(); workloads().len()],
            cpu: vec![Cpu::default(); workloads().len()],
            exits: vec![BTreeMap::new(); workloads().len()],
            threads: vec![Threads::default(); workloads().len()],
        }
    }

    fn add(&mut self, workload: usize, summary: Option<Value>, cpu: Cpu, threads: &Threads) {
        if let (Some(r), Some(c)) = (self.rounds.get_mut(workload), self.cpu.get_mut(workload)) {
            r.push(summary);
            *c = c.plus(cpu);
        }
        if let Some(t) = self.threads.get_mut(workload) {
            t.add(threads);
        }
    }
}

/// Every exit KVM takes, by reason, through the `kvm_exit` tracepoint's histogram
/// (tracefs): the userspace exits `IRONVMM_EXIT_STATS` counts are a fraction of
/// them, and in the software host each exit is a world switch TCG emulates. None
/// where the kernel has no tracefs or histogram triggers.
struct ExitReasons {
    trigger: PathBuf,
    hist: PathBuf,
}

impl ExitReasons {
    const TRIGGER: &'static str = "hist:keys=exit_reason:size=256";

    fn start() -> Option<ExitReasons> {
        let root = Path::new("/sys/kernel/tracing");
        if !root.join("events").exists() {
            let _ = Command::new("mount")
                .args(["-t", "tracefs", "nodev"])
                .arg(root)
                .status();
        }
        let dir = root.join("events/kvm/kvm_exit");
        let r = ExitReasons {
            trigger: dir.join("trigger"),
            hist: dir.join("hist"),
        };
        std::fs::write(&r.trigger, Self::TRIGGER).ok()?;
        Some(r)
    }

    /// Exits so far, by reason.
    fn snapshot(&self) -> ExitCounts {
        let text = std::fs::read_to_string(&self.hist).unwrap_or_default();
        text.lines()
            .filter_map(|l| {
                let (key, count) = l.trim().strip_prefix("{ exit_reason:")?.split_once('}')?;
                let count = count.trim().strip_prefix("hitcount:")?.trim();
                Some((key.trim().parse().ok()?, count.parse().ok()?))
            })
            .collect()
    }

    /// The name of an exit reason, AMD's (the software host emulates SVM) or
    /// Intel's.
    fn name(reason: u64) -> String {
        let svm = match reason {
            0x60 => Some("INTR (a host interrupt)"),
            0x64 => Some("VINTR (interrupt window)"),
            0x72 => Some("CPUID"),
            0x78 => Some("HLT"),
            0x7b => Some("IOIO"),
            0x7c => Some("MSR"),
            0x400 => Some("NPF (MMIO: QueueNotify, InterruptStatus/ACK, LAPIC)"),
            _ => None,
        };
        let vmx = match reason {
            1 => Some("EXTERNAL_INTERRUPT"),
            7 => Some("INTERRUPT_WINDOW"),
            10 => Some("CPUID"),
            12 => Some("HLT"),
            30 => Some("IO_INSTRUCTION"),
            31 | 32 => Some("MSR"),
            48 | 49 => Some("EPT (MMIO)"),
            _ => None,
        };
        let vendor = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let amd = vendor.contains("AuthenticAMD");
        match if amd { svm } else { vmx } {
            Some(n) => n.to_string(),
            None => format!("reason {reason:#x}"),
        }
    }
}

impl Drop for ExitReasons {
    fn drop(&mut self) {
        let _ = std::fs::write(&self.trigger, format!("!{}", Self::TRIGGER));
    }
}

/// KVM's exits so far, by exit reason.
type ExitCounts = BTreeMap<u64, u64>;

/// What `after` counted beyond `before`, added to `into`.
fn add_delta(into: &mut ExitCounts, before: &ExitCounts, after: &ExitCounts) {
    for (k, v) in after {
        *into.entry(*k).or_default() += v.saturating_sub(before.get(k).copied().unwrap_or(0));
    }
}

/// `ironvmm SUBCOMMAND` with the gate's settings that both halves must share, so
/// that a ratio compares the paths and nothing else: policy, workspace, audit log
/// and its sync mode.
fn gate_command(p: &Paths, subcommand: &str, audit: &Path, sync: &str) -> Command {
    let mut cmd = Command::new(&p.bin);
    cmd.arg(subcommand)
        .arg("--policy")
        .arg(write_policy(&p.work))
        .arg("--workspace")
        .arg(&p.ws)
        .arg("--audit")
        .arg(audit)
        .args(["--audit-sync", sync]);
    cmd
}

/// `"{workload}.{round}"` of a console line.
fn round_of(s: &str) -> Option<(usize, usize)> {
    let (i, r) = s.split_once('.')?;
    Some((i.parse().ok()?, r.parse().ok()?))
}

/// The agent: every round of every workload between a start line `s{i}.{r}` and
/// its result line `w{i}.{r}=JSON`. With `pause`, a second's sleep follows each
/// result: the bench stops the VM in it and runs the host-only round.
fn agent_script(pause: bool) -> String {
    let pause = if pause { "; sleep 1" } else { "" };
    let mut script = String::new();
    for (i, (_, args)) in workloads().iter().enumerate() {
        for r in 0..rounds(i) {
            script.push_str(&format!(
                "echo s{i}.{r}; iron bench {args} | tail -n1 | sed 's/^/w{i}.{r}=/'{pause}\n"
            ));
        }
    }
    script
}

/// Boots a guest whose agent runs `script`; returns what the VM counted and what
/// its rounds got. After each round's result, `between` (if any) runs with the VM
/// stopped, and is told the workload.
fn boot(
    p: &Paths,
    name: &str,
    script: &str,
    sync: &str,
    extra: &[&str],
    mut between: Option<&mut dyn FnMut(usize)>,
    reasons: Option<&ExitReasons>,
) -> (Counts, Half) {
    let agent = p.work.join(format!("{name}.sh"));
    std::fs::write(&agent, script).unwrap();
    let img = p.work.join(format!("{name}.img"));
    run_ok(
        Command::new(&p.bin)
            .args(["image", "build", "--kernel"])
            .arg(&p.kernel)
            .arg("--add")
            .arg(format!("{}:/agent.sh", agent.display()))
            .args(["--cmd", "sh /agent.sh", "--mem", "256M"])
            .arg("-o")
            .arg(&img),
    );
    let audit = std::env::temp_dir().join(format!("ironvmm-rpc-{name}-{sync}.jsonl"));
    let _ = std::fs::remove_file(&audit);
    let mut child = gate_command(p, "boot", &audit, sync)
        .args(["--console", "stdout", "--timeout", "1800s"])
        .args(extra)
        // `--boot-arg=FLAG`: a hidden `boot` flag, to try a variant of the data path
        // (docs/benchmarks.md).
        .args(std::env::args().filter_map(|a| a.strip_prefix("--boot-arg=").map(String::from)))
        .arg(&img)
        .env("IRONVMM_EXIT_STATS", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = Pid::from_child(&child);
    let mut stderr = child.stderr.take().unwrap();
    let err_reader = std::thread::spawn(move || {
        let mut e = String::new();
        let _ = stderr.read_to_string(&mut e);
        e
    });
    // The machine's CPU is sampled at each round's start and result lines, for the
    // CPU its calls took.
    let mut half = Half::new();
    let mut started: Option<((usize, usize), Cpu, ExitCounts, Threads)> = None;
    let vmm = child.id();
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let Ok(line) = line else { break };
        let now = Cpu::now();
        let threads_now = Threads::of(vmm);
        let t = line.trim();
        let exits_now = || reasons.map(|r| r.snapshot()).unwrap_or_default();
        if let Some(at) = t.strip_prefix('s').and_then(round_of) {
            started = Some((at, now, exits_now(), threads_now));
            continue;
        }
        let Some((at, summary)) = t
            .strip_prefix('w')
            .and_then(|x| x.split_once('='))
            .and_then(|(at, j)| Some((round_of(at)?, j)))
        else {
            continue;
        };
        let (cpu, threads) = match &started {
            Some((s, c0, e0, t0)) if *s == at => {
                if let Some(into) = half.exits.get_mut(at.0) {
                    add_delta(into, e0, &exits_now());
                }
                (now.minus(*c0), threads_now.minus(t0))
            }
            _ => (Cpu::default(), Threads::default()),
        };
        half.add(at.0, serde_json::from_str(summary).ok(), cpu, &threads);
        if let Some(between) = between.as_deref_mut() {
            // The stop lands in the guest's sleep after the result line; a stopped
            // VMM takes no CPU from the host-only round.
            if kill_process(pid, Signal::STOP).is_ok() {
                between(at.0);
                let _ = kill_process(pid, Signal::CONT);
            }
        }
    }
    let status = child.wait().unwrap();
    let err = err_reader.join().unwrap_or_default();
    if !status.success() {
        eprintln!("rpc bench: boot of {name} ({sync}) ended with {status}: {err}");
    }
    let counts = last_json(&err, "")
        .filter(|v| v.get("vm_exits").is_some())
        .map(|v| {
            let n = |x: &Value| x.as_u64().unwrap_or(0);
            Counts {
                exits: n(&v["vm_exits"]["pio"]) + n(&v["vm_exits"]["mmio"]),
                pio: n(&v["vm_exits"]["pio"]),
                notifies: n(&v["vsock"]["guest_notifies"]),
                interrupts: n(&v["vsock"]["interrupts"]),
                rx_notifies: n(&v["vsock"]["rx_notifies"]),
                skips: n(&v["vsock"]["credit_skips"]),
                skips_wrong: n(&v["vsock"]["credit_skips_wrong"]),
                queued: n(&v["vm_exits"]["queued_mmio_writes"]),
            }
        })
        .unwrap_or_default();
    (counts, half)
}

/// `ironvmm gate --listen` with the bench's policy, for the host-only rounds; it
/// is killed when dropped.
struct HostGate {
    gate: Child,
    sock: PathBuf,
    iron: PathBuf,
}

impl HostGate {
    fn start(p: &Paths, sync: &str) -> HostGate {
        let sock = std::env::temp_dir().join(format!("ironvmm-rpc-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&sock);
        let audit = std::env::temp_dir().join(format!("ironvmm-rpc-host-{sync}.jsonl"));
        let _ = std::fs::remove_file(&audit);
        let gate = gate_command(p, "gate", &audit, sync)
            .arg("--listen")
            .arg(&sock)
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        for _ in 0..200 {
            if sock.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        HostGate {
            gate,
            sock,
            iron: p.iron.clone(),
        }
    }

    /// One round of workload `i` with the host's `iron`: its summary, the CPU the
    /// round took, and the gate's part of it by thread.
    fn round(&self, i: usize) -> (Option<Value>, Cpu, Threads) {
        let args = &workloads()[i].1;
        let threads0 = Threads::of(self.gate.id());
        let cpu0 = Cpu::now();
        let o = Command::new("sh")
            .arg("-c")
            .arg(format!("{} bench {args}", self.iron.display()))
            .env("IRON_GATE", format!("unix:{}", self.sock.display()))
            .output()
            .ok();
        let cpu = Cpu::now().minus(cpu0);
        let threads = Threads::of(self.gate.id()).minus(&threads0);
        let summary = o.and_then(|o| last_json(&String::from_utf8_lossy(&o.stdout), ""));
        (summary, cpu, threads)
    }
}

impl Drop for HostGate {
    fn drop(&mut self) {
        let _ = self.gate.kill();
        let _ = self.gate.wait();
        let _ = std::fs::remove_file(&self.sock);
    }
}

/// A workload's rounds summed up: the median round's p50 and p99, the calls per
/// second over all rounds, and the calls not answered ok.
struct Pooled {
    p50_us: f64,
    p99_us: f64,
    calls_per_s: f64,
    not_ok: u64,
    elapsed_ms: f64,
}

fn f(x: &Value, k: &str) -> f64 {
    x[k].as_f64().unwrap_or(f64::NAN)
}

fn pooled(rounds: &[&Value]) -> Pooled {
    let med = |k: &str| median(&mut rounds.iter().map(|r| f(r, k)).collect::<Vec<_>>());
    let elapsed_ms: f64 = rounds.iter().map(|r| f(r, "elapsed_ms")).sum();
    let replies: f64 = rounds
        .iter()
        .map(|r| f(r, "calls_per_s") * f(r, "elapsed_ms") / 1000.0)
        .sum();
    Pooled {
        p50_us: med("p50_us").unwrap_or(f64::NAN),
        p99_us: med("p99_us").unwrap_or(f64::NAN),
        calls_per_s: replies / (elapsed_ms / 1000.0),
        not_ok: rounds
            .iter()
            .map(|r| r["calls"].as_u64().unwrap_or(0) - r["ok"].as_u64().unwrap_or(0))
            .sum(),
        elapsed_ms,
    }
}

fn print_host_only(sync: &str, host: &Half) {
    println!("--audit-sync {sync} (host-only gate; p50 and p99: the median round's):");
    for (i, (label, _)) in workloads().iter().enumerate() {
        let done: Vec<&Value> = host.rounds[i].iter().flatten().collect();
        if done.len() < rounds(i) {
            println!(
                "  {label}: incomplete ({} of {} rounds)",
                done.len(),
                rounds(i)
            );
            continue;
        }
        let h = pooled(&done);
        println!(
            "  {label}: p50 {:.0} us p99 {:.0} us {:.0} calls/s",
            h.p50_us, h.p99_us, h.calls_per_s
        );
        let n = calls_in(i) as f64;
        println!("    CPU per call (ms): {}", host.cpu[i].per_call(n));
        println!(
            "    of which the gate's threads: {}",
            host.threads[i].per_call(n)
        );
    }
}

/// `--host-only`: the host-only gate alone, built and run here, no VM.
fn host_only(root: &Path, work: PathBuf) {
    run_ok(Command::new("cargo").current_dir(root).args([
        "build",
        "--release",
        "-p",
        "ironvmm",
        "-p",
        "ironvmm-guest",
    ]));
    let p = Paths {
        bin: root.join("target/release/ironvmm"),
        iron: root.join("target/release/iron"),
        kernel: PathBuf::new(),
        ws: work.join("ws"),
        work,
    };
    println!(
        "rpc bench, host-only gate ({} small calls on 1 connection, {} on 8)",
        calls_in(0),
        calls_in(1)
    );
    for sync in ["batch", "always"] {
        let gate = HostGate::start(&p, sync);
        let mut host = Half::new();
        for i in 0..workloads().len() {
            for _ in 0..rounds(i) {
                let (summary, cpu, threads) = gate.round(i);
                host.add(i, summary, cpu, &threads);
            }
        }
        print_host_only(sync, &host);
    }
}

/// The VM path against the host-only path, per workload, with the targets of the
/// software KVM host: p50 VM/host at most 2 on one connection, VM throughput at
/// least the host-only one on eight. Each target is judged on the median of the
/// per-round ratios, a VM round against the host-only round right after it.
fn compare(sync: &str, vm: &Half, host: &Half) {
    println!("--audit-sync {sync} (p50 and p99: the median round's; calls/s: over all rounds):");
    for (i, (label, _)) in workloads().iter().enumerate() {
        let pairs: Vec<(&Value, &Value)> = vm.rounds[i]
            .iter()
            .zip(&host.rounds[i])
            .filter_map(|(v, h)| Some((v.as_ref()?, h.as_ref()?)))
            .collect();
        if pairs.len() < rounds(i) {
            let n = |h: &Half| h.rounds[i].iter().flatten().count();
            println!(
                "  {label}: incomplete (VM {} and host-only {} of {} rounds)",
                n(vm),
                n(host),
                rounds(i)
            );
            continue;
        }
        let (vs, hs): (Vec<&Value>, Vec<&Value>) = pairs.iter().copied().unzip();
        let (v, h) = (pooled(&vs), pooled(&hs));
        let lost = format!("not ok: VM {}, host {}", v.not_ok, h.not_ok);
        if i == 2 {
            let mib = |x: &Pooled| 16.0 / (x.elapsed_ms / 1000.0);
            println!(
                "  {label}: VM {:.1} MiB/s | host-only {:.1} MiB/s | time VM/host {:.2} ({lost})",
                mib(&v),
                mib(&h),
                v.elapsed_ms / h.elapsed_ms
            );
            continue;
        }
        let key = if i == 0 { "p50_us" } else { "calls_per_s" };
        let mut per_round: Vec<f64> = pairs.iter().map(|(v, h)| f(v, key) / f(h, key)).collect();
        let rounds_list = per_round
            .iter()
            .map(|r| format!("{r:.2}"))
            .collect::<Vec<_>>()
            .join(" ");
        let ratio = median(&mut per_round).unwrap_or(f64::NAN);
        let verdict = if i == 0 {
            format!(
                "p50 VM/host {ratio:.2} (target <= 2: {})",
                met(ratio <= 2.0)
            )
        } else {
            format!(
                "calls/s VM/host {ratio:.2} (target >= 1: {})",
                met(ratio >= 1.0)
            )
        };
        println!(
            "  {label}: VM p50 {:.0} us p99 {:.0} us {:.0} calls/s | host-only p50 {:.0} us p99 {:.0} us {:.0} calls/s | {verdict}, per round {rounds_list} ({lost})",
            v.p50_us, v.p99_us, v.calls_per_s, h.p50_us, h.p99_us, h.calls_per_s,
        );
    }
}

fn met(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "MISSED"
    }
}

/// Calls of workload `i` over all its rounds.
fn calls_in(i: usize) -> usize {
    calls_per_round(i) * rounds(i)
}

fn main() {
    let root = workspace_root();
    let work = root.join("target/bench-rpc");
    let host_only_run = std::env::args().any(|a| a == "--host-only");
    if !inside_kvm_host() {
        std::fs::create_dir_all(work.join("ws")).unwrap();
        let big: Vec<u8> = (0..16u32 << 20)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
            .collect();
        std::fs::write(work.join("ws/big.bin"), big).unwrap();
        if host_only_run {
            println!(
                "{}",
                vm_skipped_line("rpc bench", "--host-only", "Only the host-only half runs.")
            );
            return host_only(&root, work);
        }
        // `--host-cpus=N`: the software host's emulated CPUs (default 1).
        let cpus = std::env::args()
            .find_map(|a| a.strip_prefix("--host-cpus=").map(String::from))
            .unwrap_or_else(|| "1".into());
        let why = rerun_in_kvm_host(&["--mem", "3G", "--cpus", &cpus]);
        println!(
            "{}",
            vm_skipped_line("rpc bench", &why, "Only the host-only half runs.")
        );
        return host_only(&root, work);
    }

    let p = Paths {
        bin: root.join("target/release/ironvmm"),
        iron: root.join("target/x86_64-unknown-linux-gnu/release/iron"),
        // `--guest-kernel=PATH`: another guest kernel (a cached build), to try a
        // kernel configuration against the current one.
        kernel: std::env::args()
            .find_map(|a| a.strip_prefix("--guest-kernel=").map(PathBuf::from))
            .unwrap_or_else(|| {
                PathBuf::from(std::env::var("IRONVMM_KERNEL").expect("IRONVMM_KERNEL"))
            }),
        ws: tmpfs_workspace(&work.join("ws")),
        work,
    };
    let host = kvm_kind();
    println!(
        "rpc bench on {host}; audit log on {}, workspace {}; {} small calls on 1 connection and {} on 8, each in {ROUNDS} rounds, VM and host-only rounds alternating",
        if host.contains("software") {
            "tmpfs"
        } else {
            "the temp dir"
        },
        if p.ws.starts_with(std::env::temp_dir()) {
            "beside it"
        } else {
            "on the repository's share"
        },
        calls_in(0),
        calls_in(1)
    );
    let calls = (0..workloads().len()).map(calls_in).sum::<usize>() as f64;
    // `--sync=MODE`: one sync mode only (trying a variant).
    let only = std::env::args().find_map(|a| a.strip_prefix("--sync=").map(String::from));
    let reasons = ExitReasons::start();
    if reasons.is_none() {
        println!("(no kvm_exit histogram here: KVM's exits by reason are not counted)");
    }
    for sync in ["batch", "always"] {
        if only.as_deref().is_some_and(|o| o != sync) {
            continue;
        }
        let (base, _) = boot(&p, "idle", "exit 0\n", sync, &[], None, None);
        let gate = HostGate::start(&p, sync);
        let mut host = Half::new();
        let (with_idx, vm) = boot(
            &p,
            "bench",
            &agent_script(true),
            sync,
            &[],
            Some(&mut |i| {
                let (summary, cpu, threads) = gate.round(i);
                host.add(i, summary, cpu, &threads);
            }),
            reasons.as_ref(),
        );
        drop(gate);
        compare(sync, &vm, &host);
        // On one emulated CPU, the CPU a call takes bounds the calls per second.
        println!("  CPU per call (the whole software host's, over each workload's rounds):");
        for (i, (label, _)) in workloads().iter().enumerate() {
            let n = calls_in(i) as f64;
            println!(
                "    {label}: VM path {} | host-only {}",
                vm.cpu[i].per_call(n),
                host.cpu[i].per_call(n)
            );
        }
        // The host-only rest (whole machine less the gate) is mostly its client, the
        // counterpart of the guest's time.
        println!("  CPU per call by thread (ms; VMM, host-only gate):");
        for (i, (label, _)) in workloads().iter().enumerate() {
            let n = calls_in(i) as f64;
            println!("    {label}: VM path: {}", vm.threads[i].per_call(n));
            println!(
                "    {label}: host-only gate: {}",
                host.threads[i].per_call(n)
            );
        }
        if reasons.is_some() {
            println!("  KVM's exits per call, by reason (in the kernel too; VM path):");
            for (i, (label, _)) in workloads().iter().enumerate() {
                let n = calls_in(i) as f64;
                let e = &vm.exits[i];
                let mut by: Vec<(&u64, &u64)> = e.iter().collect();
                by.sort_by(|a, b| b.1.cmp(a.1));
                let list = by
                    .iter()
                    .filter(|(_, c)| **c as f64 / n >= 0.01)
                    .map(|(r, c)| format!("{:.2} {}", **c as f64 / n, ExitReasons::name(**r)))
                    .collect::<Vec<_>>()
                    .join(", ");
                let all: u64 = e.values().sum();
                println!("    {label}: {:.2} in all: {list}", all as f64 / n);
            }
        }
        // The same run without EVENT_IDX: every used buffer interrupts the guest
        // (each interrupt costs MMIO exits: InterruptStatus, InterruptACK), and the
        // guest notifies every buffer it posts.
        let (base_no, _) = boot(
            &p,
            "idle",
            "exit 0\n",
            sync,
            &["--no-event-idx"],
            None,
            None,
        );
        let (without, _) = boot(
            &p,
            "bench",
            &agent_script(false),
            sync,
            &["--no-event-idx"],
            None,
            None,
        );
        let per = |c: Counts| {
            format!(
                "{:.2} exits ({:.2} port I/O), {:.2} guest notifies ({:.2} rx), {:.2} interrupts, {:.2} queued ACKs, {:.2} credit kicks skipped ({:.2} wrongly)",
                c.exits as f64 / calls,
                c.pio as f64 / calls,
                c.notifies as f64 / calls,
                c.rx_notifies as f64 / calls,
                c.interrupts as f64 / calls,
                c.queued as f64 / calls,
                c.skips as f64 / calls,
                c.skips_wrong as f64 / calls
            )
        };
        println!(
            "  per call ({calls} calls, the boot's own counts taken off): with EVENT_IDX {} | without {}",
            per(with_idx.minus(base)),
            per(without.minus(base_no))
        );
    }
}
