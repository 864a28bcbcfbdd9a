//! The gate's worker pool: the threads that parse frames and run what blocks (the
//! audit fsync, file I/O, network services), so the vsock device thread never does.
//!
//! - A fixed number of workers take jobs from one queue. The queue holds at most one
//!   job per frame in flight (its bytes, not yet parsed), so the gate's in-flight
//!   bounds bound it too.
//! - A job may put part of its work under a deadline (`Pool::deadline`). When the
//!   deadline passes first, the watchdog thread runs the job's `on_timeout` (the
//!   gate answers the call with a tool error and audits it). A thread cannot be
//!   killed, so the worker stays stuck in the service; the pool starts a spare in
//!   its place so the other calls go on. At most `max_stuck` spares exist: past
//!   that, stuck workers are not replaced and the pool runs with fewer threads.
//! - `shutdown` stops taking jobs, lets the queue drain, and joins every thread. A
//!   worker still stuck then is waited for up to `STUCK_GRACE`, then left behind
//!   (it ends with the process) and reported.

use std::collections::{BinaryHeap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long `shutdown` waits for workers stuck past their deadline.
pub const STUCK_GRACE: Duration = Duration::from_secs(2);

/// Sizes of the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolConfig {
    /// Its threads' names: `{worker}-N`, and the watchdog's (Linux keeps 15 bytes).
    pub worker: &'static str,
    pub watchdog: &'static str,
    /// Workers running jobs.
    pub workers: usize,
    /// Spare workers started in place of stuck ones, at most.
    pub max_stuck: usize,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            worker: "gate-worker",
            watchdog: "gate-watchdog",
            workers: 16,
            max_stuck: 16,
        }
    }
}

type Job = Box<dyn FnOnce() + Send + 'static>;
type OnTimeout = Box<dyn FnOnce() + Send + 'static>;

/// Why a job was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    #[error("the gate's worker pool is shut down")]
    ShutDown,
    #[error("cannot start a worker thread")]
    Spawn,
}

#[derive(Default)]
struct State {
    jobs: VecDeque<Job>,
    /// Worker threads alive (running, idle or stuck).
    live: usize,
    /// Workers past a deadline, still inside their job.
    stuck: usize,
    stopping: bool,
    handles: Vec<JoinHandle<()>>,
    timers: BinaryHeap<Timer>,
    next_worker: u64,
}

/// A deadline waiting in the watchdog's heap (earliest first).
struct Timer {
    at: Instant,
    ticket: Arc<Ticket>,
}

impl PartialEq for Timer {
    fn eq(&self, o: &Self) -> bool {
        self.at == o.at
    }
}
impl Eq for Timer {}
impl PartialOrd for Timer {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Timer {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        o.at.cmp(&self.at)
    }
}

const RUNNING: u8 = 0;
const DONE: u8 = 1;
const TIMED_OUT: u8 = 2;

/// Work under a deadline: either it finishes first (`DONE`) or the watchdog does
/// (`TIMED_OUT`); exactly one side acts on the call.
struct Ticket {
    state: AtomicU8,
    on_timeout: Mutex<Option<OnTimeout>>,
}

struct Inner {
    cfg: PoolConfig,
    state: Mutex<State>,
    /// Workers wait here for jobs.
    work: Condvar,
    /// The watchdog waits here for the next deadline.
    timers: Condvar,
    /// `shutdown` waits here for threads to end.
    ended: Condvar,
    /// `State::stopping`, readable without the lock.
    stopping: AtomicBool,
}

/// The pool. Cheap to clone; `shutdown` ends it for every clone.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

/// A deadline over part of a job. `finish` says whether the work finished first.
pub struct Deadline {
    ticket: Arc<Ticket>,
    inner: Arc<Inner>,
    settled: bool,
}

impl Deadline {
    /// True when the work finished before its deadline: the caller answers the call.
    /// False when the watchdog already answered it.
    pub fn finish(mut self) -> bool {
        self.settle()
    }

    fn settle(&mut self) -> bool {
        self.settled = true;
        let won = self
            .ticket
            .state
            .compare_exchange(RUNNING, DONE, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if won {
            // Drop the timeout reply's captures now rather than at the deadline.
            drop(lock(&self.ticket.on_timeout).take());
            // A shutdown waits for the watchdog, which waits for running deadlines.
            if self.inner.stopping.load(Ordering::Acquire) {
                self.inner.timers.notify_one();
            }
        } else {
            STUCK_HERE.with(|s| s.set(true));
        }
        won
    }
}

impl Drop for Deadline {
    /// A deadline dropped unfinished (its job unwound) counts as finished, so the
    /// stuck count stays right.
    fn drop(&mut self) {
        if !self.settled {
            self.settle();
        }
    }
}

thread_local! {
    /// Set on a worker whose job overran a deadline: it was counted as stuck.
    static STUCK_HERE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Pool {
    /// Starts `cfg.workers` workers (at least one) and the watchdog.
    pub fn new(cfg: PoolConfig) -> Result<Pool, PoolError> {
        let cfg = PoolConfig {
            workers: cfg.workers.max(1),
            ..cfg
        };
        let pool = Pool {
            inner: Arc::new(Inner {
                cfg,
                state: Mutex::new(State::default()),
                work: Condvar::new(),
                timers: Condvar::new(),
                ended: Condvar::new(),
                stopping: AtomicBool::new(false),
            }),
        };
        {
            let mut st = lock(&pool.inner.state);
            for _ in 0..cfg.workers {
                pool.spawn_worker(&mut st)?;
            }
            let inner = Arc::clone(&pool.inner);
            let h = std::thread::Builder::new()
                .name(cfg.watchdog.into())
                .spawn(move || {
                    confine();
                    watchdog(&inner)
                })
                .map_err(|_| PoolError::Spawn)?;
            st.handles.push(h);
            st.live += 1;
        }
        Ok(pool)
    }

    pub fn config(&self) -> PoolConfig {
        self.inner.cfg
    }

    /// Queues a job. A job that panics is logged; its worker goes on.
    pub fn submit(&self, job: impl FnOnce() + Send + 'static) -> Result<(), PoolError> {
        let mut st = lock(&self.inner.state);
        if st.stopping {
            return Err(PoolError::ShutDown);
        }
        st.jobs.push_back(Box::new(job));
        drop(st);
        self.inner.work.notify_one();
        Ok(())
    }

    /// Puts the work that follows under a deadline `after` from now. If it passes
    /// first, `on_timeout` runs on the watchdog thread and `Deadline::finish` says
    /// false. Call only from a job on this pool (the worker is then counted stuck).
    pub fn deadline(
        &self,
        after: Duration,
        on_timeout: impl FnOnce() + Send + 'static,
    ) -> Deadline {
        let ticket = Arc::new(Ticket {
            state: AtomicU8::new(RUNNING),
            on_timeout: Mutex::new(Some(Box::new(on_timeout))),
        });
        let at = Instant::now()
            .checked_add(after)
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(365 * 86_400));
        let mut st = lock(&self.inner.state);
        // The watchdog only needs waking when this is its new earliest deadline.
        let earliest = st.timers.peek().is_none_or(|t| at < t.at);
        st.timers.push(Timer {
            at,
            ticket: Arc::clone(&ticket),
        });
        drop(st);
        if earliest {
            self.inner.timers.notify_one();
        }
        Deadline {
            ticket,
            inner: Arc::clone(&self.inner),
            settled: false,
        }
    }

    /// Workers stuck past a deadline right now.
    pub fn stuck(&self) -> usize {
        lock(&self.inner.state).stuck
    }

    /// Threads alive (workers, spares, stuck ones and the watchdog).
    pub fn threads(&self) -> usize {
        lock(&self.inner.state).live
    }

    /// Stops taking jobs; the threads end once the queue is empty. Does not wait
    /// (safe from any thread, a worker included).
    pub fn stop(&self) {
        let mut st = lock(&self.inner.state);
        st.stopping = true;
        self.inner.stopping.store(true, Ordering::Release);
        drop(st);
        self.inner.work.notify_all();
        self.inner.timers.notify_all();
    }

    /// Stops taking jobs, runs those queued, and joins every thread (stuck workers
    /// for up to `STUCK_GRACE`). Returns how many stuck threads were left behind.
    pub fn shutdown(&self) -> usize {
        let mut st = lock(&self.inner.state);
        st.stopping = true;
        self.inner.stopping.store(true, Ordering::Release);
        self.inner.work.notify_all();
        self.inner.timers.notify_all();
        let grace_end = Instant::now() + STUCK_GRACE;
        // Everyone but the stuck ones ends once the queue is empty.
        while st.live > st.stuck || (st.stuck > 0 && Instant::now() < grace_end) {
            let wait = if st.live > st.stuck {
                Duration::from_millis(100)
            } else {
                grace_end.saturating_duration_since(Instant::now())
            };
            st = self
                .inner
                .ended
                .wait_timeout(st, wait)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        let left = st.live;
        let handles = std::mem::take(&mut st.handles);
        drop(st);
        for h in handles {
            if h.is_finished() {
                let _ = h.join();
            }
        }
        if left > 0 {
            log::warn!("gate: {left} worker thread(s) still stuck in a service at shutdown");
        }
        left
    }

    fn spawn_worker(&self, st: &mut State) -> Result<(), PoolError> {
        st.next_worker += 1;
        let inner = Arc::clone(&self.inner);
        let h = std::thread::Builder::new()
            .name(format!("{}-{}", self.inner.cfg.worker, st.next_worker))
            .spawn(move || {
                confine();
                worker(&inner)
            })
            .map_err(|_| PoolError::Spawn)?;
        st.handles.push(h);
        st.live += 1;
        Ok(())
    }
}

/// A pool thread confines itself before it runs a call (a no-op unless the VMM
/// turned seccomp on). One that cannot must not run calls unconfined, and a pool
/// short of a worker would hang calls: the process ends. (`ironvmm_seccomp::preflight`
/// has already checked that the filter compiles and the kernel takes it.)
fn confine() {
    if let Err(e) = ironvmm_seccomp::install(ironvmm_seccomp::ThreadRole::Worker) {
        eprintln!("ironvmm: {e}");
        std::process::abort();
    }
}

fn worker(inner: &Arc<Inner>) {
    let mut st = lock(&inner.state);
    loop {
        if let Some(job) = st.jobs.pop_front() {
            drop(st);
            STUCK_HERE.with(|s| s.set(false));
            // A panicking job must not take its worker (and the pool's count) with it.
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)).is_err() {
                log::error!("gate: a job panicked on a worker");
            }
            st = lock(&inner.state);
            if STUCK_HERE.with(|s| s.replace(false)) {
                // Back from overrunning: if a spare took this worker's place, one
                // of the two is now extra.
                st.stuck -= 1;
                if st.live - 1 > inner.cfg.workers + st.stuck {
                    break;
                }
            }
            continue;
        }
        if st.stopping {
            break;
        }
        st = inner.work.wait(st).unwrap_or_else(|e| e.into_inner());
    }
    st.live -= 1;
    drop(st);
    inner.ended.notify_all();
}

fn watchdog(inner: &Arc<Inner>) {
    let mut st = lock(&inner.state);
    loop {
        if st.stopping {
            st.timers
                .retain(|t| t.ticket.state.load(Ordering::Acquire) == RUNNING);
            if st.timers.is_empty() {
                break;
            }
        }
        let now = Instant::now();
        let mut due = Vec::new();
        while st.timers.peek().is_some_and(|t| t.at <= now) {
            if let Some(t) = st.timers.pop() {
                due.push(t.ticket);
            }
        }
        let mut fired = Vec::new();
        for ticket in due {
            let lost = ticket
                .state
                .compare_exchange(RUNNING, TIMED_OUT, Ordering::AcqRel, Ordering::Acquire)
                .is_ok();
            if !lost {
                continue; // finished in time
            }
            st.stuck += 1;
            // A spare takes the stuck worker's place, up to max_stuck of them.
            let spares = (st.live - 1).saturating_sub(inner.cfg.workers);
            if !st.stopping && spares < inner.cfg.max_stuck {
                let pool = Pool {
                    inner: Arc::clone(inner),
                };
                if pool.spawn_worker(&mut st).is_err() {
                    log::warn!("gate: cannot start a spare worker for a stuck call");
                }
            }
            if let Some(f) = lock(&ticket.on_timeout).take() {
                fired.push(f);
            }
        }
        if !fired.is_empty() {
            drop(st);
            for f in fired {
                f();
            }
            st = lock(&inner.state);
            continue;
        }
        // Finished tickets stay in the heap until their time; drop them early when
        // the heap is the only thing holding them, so it cannot grow with old ones.
        if st.timers.len() > 64 {
            st.timers
                .retain(|t| t.ticket.state.load(Ordering::Acquire) == RUNNING);
        }
        st = match st.timers.peek().map(|t| t.at) {
            Some(at) => {
                let wait = at.saturating_duration_since(Instant::now());
                inner
                    .timers
                    .wait_timeout(st, wait)
                    .unwrap_or_else(|e| e.into_inner())
                    .0
            }
            None if st.stopping => break,
            None => inner.timers.wait(st).unwrap_or_else(|e| e.into_inner()),
        };
    }
    st.live -= 1;
    drop(st);
    inner.ended.notify_all();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::mpsc;

    #[test]
    fn runs_jobs_and_joins_on_shutdown() {
        let pool = Pool::new(PoolConfig {
            workers: 3,
            max_stuck: 1,
            ..PoolConfig::default()
        })
        .unwrap();
        let n = Arc::new(AtomicUsize::new(0));
        for _ in 0..100 {
            let n = Arc::clone(&n);
            pool.submit(move || {
                n.fetch_add(1, Ordering::SeqCst);
            })
            .unwrap();
        }
        assert_eq!(pool.shutdown(), 0);
        assert_eq!(
            n.load(Ordering::SeqCst),
            100,
            "queued jobs run before shutdown ends"
        );
        assert_eq!(pool.threads(), 0);
        assert_eq!(pool.submit(|| {}), Err(PoolError::ShutDown));
    }

    #[test]
    fn an_overrun_is_answered_by_the_watchdog_and_a_spare_takes_over() {
        let pool = Pool::new(PoolConfig {
            workers: 1,
            max_stuck: 1,
            ..PoolConfig::default()
        })
        .unwrap();
        let (tx, rx) = mpsc::channel();
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let p = pool.clone();
        let tx1 = tx.clone();
        pool.submit(move || {
            let t = tx1.clone();
            let d = p.deadline(Duration::from_millis(10), move || {
                t.send("timeout").unwrap();
            });
            release_rx.recv().unwrap(); // a service that hangs until released
            tx1.send(if d.finish() { "finished" } else { "late" })
                .unwrap();
        })
        .unwrap();
        assert_eq!(rx.recv().unwrap(), "timeout");
        // The only worker is stuck; the spare serves the next job.
        let tx2 = tx.clone();
        pool.submit(move || tx2.send("other").unwrap()).unwrap();
        assert_eq!(rx.recv().unwrap(), "other");
        assert_eq!(pool.stuck(), 1);
        release_tx.send(()).unwrap();
        assert_eq!(
            rx.recv().unwrap(),
            "late",
            "the overrun's own result is dropped"
        );
        assert_eq!(pool.shutdown(), 0);
    }

    #[test]
    fn stuck_threads_are_bounded() {
        let pool = Pool::new(PoolConfig {
            workers: 1,
            max_stuck: 2,
            ..PoolConfig::default()
        })
        .unwrap();
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let release_rx = Arc::new(Mutex::new(release_rx));
        let (tx, rx) = mpsc::channel();
        for _ in 0..5 {
            let (p, r, tx) = (pool.clone(), Arc::clone(&release_rx), tx.clone());
            pool.submit(move || {
                let d = p.deadline(Duration::from_millis(5), move || tx.send(()).unwrap());
                let _ = lock(&r).recv();
                d.finish();
            })
            .unwrap();
        }
        // Three jobs get a thread (1 worker + 2 spares) and time out; the other two wait.
        for _ in 0..3 {
            rx.recv().unwrap();
        }
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(pool.stuck(), 3);
        assert_eq!(
            pool.threads(),
            1 + 3,
            "the watchdog and three workers, no more"
        );
        for _ in 0..5 {
            release_tx.send(()).unwrap();
        }
        assert_eq!(pool.shutdown(), 0);
    }
}
