//! The approval hub: the one `Approver` of a VM, and what every channel talks to.
//!
//! An ask goes, in order: the circuit breaker (a loop is denied without asking);
//! the answers file; `--non-interactive`; and, when nobody could answer (no
//! terminal, no control socket approver), an immediate denial that says so. Else it
//! becomes a pending question: identical asks (same tool, same arguments up to key
//! order) share one question and one answer, and one timer thread denies questions
//! left unanswered past `--ask-timeout`. Channels subscribe to the hub's events and
//! answer through `answer`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{Map, Value};

use super::answers::AnswersFile;
use super::breaker::{Breaker, BreakerConfig};
use super::event::{AskView, DecidedView, Event, LearnedView};
use super::key::question_key;
use super::learn::{Candidate, LearnError, Learner, Scope};
use crate::gate::approver::{Answer, AnswerSink, Answerer, Approver, AskRequest};
use crate::gate::DecidedBy;

/// Who can answer questions in this run (`--approver`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Nobody: every ask not settled by the answers file is denied at once.
    Deny,
    /// The terminal (the control socket can answer too).
    Tty,
    /// Clients of the control socket, which may connect at any time.
    Socket,
}

/// How the hub of one VM behaves.
pub struct HubConfig {
    pub vm: String,
    pub mode: Mode,
    pub ask_timeout: Duration,
    pub breaker: BreakerConfig,
    /// `--non-interactive`: every ask the answers file does not settle is denied.
    pub non_interactive: bool,
    pub answers: Option<AnswersFile>,
    /// Turns answers into learned rules; without it `learn` is refused.
    pub learner: Option<Learner>,
}

impl HubConfig {
    /// A hub that waits for channels, with the default timeout and breaker.
    pub fn new(vm: impl Into<String>, mode: Mode) -> HubConfig {
        HubConfig {
            vm: vm.into(),
            mode,
            ask_timeout: DEFAULT_ASK_TIMEOUT,
            breaker: BreakerConfig::default(),
            non_interactive: false,
            answers: None,
            learner: None,
        }
    }
}

pub const DEFAULT_ASK_TIMEOUT: Duration = Duration::from_secs(300);

/// How many events a subscriber may lag behind before it is cut off (a channel
/// that does not read must not grow the hub's memory).
const SUBSCRIBER_BACKLOG: usize = 4096;

/// An owner's answer, from some channel.
#[derive(Debug, Clone)]
pub struct Reply {
    pub allow: bool,
    /// Keep the answer as a rule, of this scope.
    pub learn: Option<Scope>,
    /// Keep the learned rule even if it changes scenarios' decisions.
    pub confirm: bool,
    /// `tty`, `socket`, `web`...
    pub channel: String,
    /// Who, as far as the channel knows (`uid 1000 pid 42`).
    pub who: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum AnswerError {
    #[error("no pending ask with id {0} (answered, timed out, or never asked)")]
    NoSuchAsk(u64),
    #[error("the rule `{}` would change the decision of {} scenario(s); answer again with confirmation to keep it", .0.rule, .0.conflicts.len())]
    NeedsConfirmation(Box<Candidate>),
    #[error("learning is not available in this run (no policy file to learn beside)")]
    NoLearner,
    #[error(transparent)]
    Learn(#[from] LearnError),
}

struct Question {
    req: AskRequest,
    key: String,
    sinks: Vec<AnswerSink>,
    asked_at: Instant,
    deadline: Instant,
}

struct State {
    next_id: u64,
    questions: BTreeMap<u64, Question>,
    by_key: HashMap<String, u64>,
    deadlines: BTreeSet<(Instant, u64)>,
    breaker: Breaker,
    subscribers: Vec<SyncSender<Arc<Event>>>,
}

struct Inner {
    vm: String,
    mode: Mode,
    ask_timeout: Duration,
    non_interactive: bool,
    answers: Option<AnswersFile>,
    learner: Option<Learner>,
    state: Mutex<State>,
    timer: Condvar,
    /// Woken when a question is added (the terminal approver waits on it).
    asked: Condvar,
    /// One learned rule at a time: each is checked against the file it extends.
    learning: Mutex<()>,
}

/// The approver of one VM. Cheap to clone: clones share the same questions.
#[derive(Clone)]
pub struct ApprovalHub {
    inner: Arc<Inner>,
}

impl ApprovalHub {
    /// A hub and its timer thread (which ends when the last clone is dropped).
    pub fn new(cfg: HubConfig) -> ApprovalHub {
        let inner = Arc::new(Inner {
            vm: cfg.vm,
            mode: cfg.mode,
            ask_timeout: cfg.ask_timeout,
            non_interactive: cfg.non_interactive,
            answers: cfg.answers,
            learner: cfg.learner,
            state: Mutex::new(State {
                next_id: 1,
                questions: BTreeMap::new(),
                by_key: HashMap::new(),
                deadlines: BTreeSet::new(),
                breaker: Breaker::new(cfg.breaker),
                subscribers: Vec::new(),
            }),
            timer: Condvar::new(),
            asked: Condvar::new(),
            learning: Mutex::new(()),
        });
        let weak = Arc::downgrade(&inner);
        let _ = thread::Builder::new()
            .name("ask-timer".into())
            .spawn(move || timer_loop(weak));
        ApprovalHub { inner }
    }

    pub fn vm(&self) -> &str {
        &self.inner.vm
    }

    pub fn mode(&self) -> Mode {
        self.inner.mode
    }

    pub fn learner(&self) -> Option<&Learner> {
        self.inner.learner.as_ref()
    }

    pub fn ask_timeout(&self) -> Duration {
        self.inner.ask_timeout
    }

    /// The pending questions, oldest first.
    pub fn pending(&self) -> Vec<AskView> {
        let st = self.inner.lock();
        self.views(&st)
    }

    /// Waits up to `d` for a pending question; true if there is one.
    pub fn wait_pending(&self, d: Duration) -> bool {
        let st = self.inner.lock();
        if !st.questions.is_empty() {
            return true;
        }
        let (st, _) = self
            .inner
            .asked
            .wait_timeout(st, d)
            .unwrap_or_else(|e| e.into_inner());
        !st.questions.is_empty()
    }

    /// The pending questions, and every event from now on. The receiver ends if
    /// it falls more than a few thousand events behind.
    pub fn subscribe(&self) -> (Vec<AskView>, Receiver<Arc<Event>>) {
        let (tx, rx) = mpsc::sync_channel(SUBSCRIBER_BACKLOG);
        let mut st = self.inner.lock();
        st.subscribers.push(tx);
        (self.views(&st), rx)
    }

    /// Whether anyone follows the events (a watcher, the web page).
    pub fn watched(&self) -> bool {
        !self.inner.lock().subscribers.is_empty()
    }

    /// Passes an audit `decision` record to every subscriber (the decision feed).
    pub fn publish_decision(&self, record: Map<String, Value>) {
        let mut st = self.inner.lock();
        broadcast(&mut st, Event::Decision(record));
    }

    fn views(&self, st: &State) -> Vec<AskView> {
        let now = Instant::now();
        st.questions
            .iter()
            .map(|(id, q)| view(&self.inner.vm, *id, q, now, st.questions.len()))
            .collect()
    }

    /// Answers question `id`. With `learn`, the rule is checked first: if it would
    /// change a scenario's decision and `confirm` is not set, nothing is answered
    /// and `NeedsConfirmation` says which scenarios.
    pub fn answer(&self, id: u64, reply: Reply) -> Result<DecidedView, AnswerError> {
        let req = {
            let st = self.inner.lock();
            let q = st.questions.get(&id).ok_or(AnswerError::NoSuchAsk(id))?;
            q.req.clone()
        };
        let answerer = Answerer {
            by: DecidedBy::User,
            channel: reply.channel.clone(),
            who: reply.who.clone(),
        };
        let verb = if reply.allow { "allowed" } else { "denied" };
        let Some(scope) = reply.learn else {
            let reason = format!("{verb} by the owner ({})", reply.channel);
            return self
                .resolve(id, reply.allow, answerer, reason, None)
                .ok_or(AnswerError::NoSuchAsk(id));
        };
        let learner = self.inner.learner.as_ref().ok_or(AnswerError::NoLearner)?;
        let learned = {
            let _one = self
                .inner
                .learning
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if !self.inner.lock().questions.contains_key(&id) {
                return Err(AnswerError::NoSuchAsk(id));
            }
            let cand = learner.candidate(&req, reply.allow, scope)?;
            if !cand.conflicts.is_empty() && !reply.confirm {
                return Err(AnswerError::NeedsConfirmation(Box::new(cand)));
            }
            learner.commit(&cand, &answerer)?
        };
        let reason = format!(
            "{verb} by the owner ({}), and learned: {}",
            reply.channel, learned.rule
        );
        let decided = self.resolve(id, reply.allow, answerer, reason, Some(learned));
        // The new rule may settle other pending questions too.
        self.settle_by_learned(learner);
        decided.ok_or(AnswerError::NoSuchAsk(id))
    }

    /// Denies every pending question (the run is ending: nobody will answer now),
    /// as `timeout`, saying why. Returns how many questions there were.
    pub fn close(&self, why: &str) -> usize {
        let ids: Vec<u64> = self.inner.lock().questions.keys().copied().collect();
        for &id in &ids {
            let answerer = Answerer {
                by: DecidedBy::Timeout,
                channel: "none".into(),
                who: None,
            };
            self.resolve(id, false, answerer, why.to_string(), None);
        }
        ids.len()
    }

    /// Answers every pending question the running policy now decides by a
    /// learned rule.
    fn settle_by_learned(&self, learner: &Learner) {
        let pending: Vec<(u64, String, Value)> = {
            let st = self.inner.lock();
            st.questions
                .iter()
                .map(|(id, q)| (*id, q.req.tool.clone(), q.req.args.clone()))
                .collect()
        };
        for (id, tool, args) in pending {
            if let Some(d) = learner.decide_learned(&tool, &args) {
                let answerer = Answerer {
                    by: DecidedBy::Learned,
                    channel: "learned".into(),
                    who: d.rule.map(|l| format!("learned line {l}")),
                };
                let allow = d.verdict == ironvmm_policy::Verdict::Allow;
                self.resolve(id, allow, answerer, d.reason, None);
            }
        }
    }

    /// Removes question `id` and answers every call parked on it. None if it was
    /// already answered.
    fn resolve(
        &self,
        id: u64,
        allow: bool,
        answerer: Answerer,
        reason: String,
        learned: Option<LearnedView>,
    ) -> Option<DecidedView> {
        let (sinks, decided) = {
            let mut st = self.inner.lock();
            let q = st.questions.remove(&id)?;
            st.by_key.remove(&q.key);
            st.deadlines.remove(&(q.deadline, id));
            let decided = DecidedView {
                id,
                vm: self.inner.vm.clone(),
                tool: q.req.tool.clone(),
                decision: if allow { "allow" } else { "deny" },
                decided_by: answerer.by.as_str(),
                channel: answerer.channel.clone(),
                who: answerer.who.clone(),
                reason: reason.clone(),
                calls: q.sinks.len(),
                learned,
            };
            broadcast(&mut st, Event::Decided(decided.clone()));
            (q.sinks, decided)
        };
        // Sinks run outside the lock: they schedule calls in the gate.
        for sink in sinks {
            sink(Answer {
                allow,
                answerer: answerer.clone(),
                reason: reason.clone(),
            });
        }
        Some(decided)
    }

    fn nobody_reason(&self) -> String {
        let answers = match &self.inner.answers {
            Some(a) => format!(
                "no rule of --answers {} matches this call",
                a.path().display()
            ),
            None => "no --answers file".into(),
        };
        format!("no approver can answer: no terminal approver, no --approver socket, and {answers}")
    }
}

fn view(vm: &str, id: u64, q: &Question, now: Instant, pending: usize) -> AskView {
    AskView {
        id,
        vm: vm.to_string(),
        seq: q.req.ask_seq,
        conn: q.req.conn.clone(),
        rpc_id: q.req.rpc_id.clone(),
        tool: q.req.tool.clone(),
        args: q.req.args.clone(),
        rule: q.req.rule,
        reason: q.req.reason.clone(),
        calls: q.sinks.len(),
        waited_ms: now.saturating_duration_since(q.asked_at).as_millis() as u64,
        timeout_in_ms: q.deadline.saturating_duration_since(now).as_millis() as u64,
        pending,
    }
}

fn broadcast(st: &mut State, e: Event) {
    if st.subscribers.is_empty() {
        return;
    }
    let e = Arc::new(e);
    st.subscribers.retain(|s| {
        !matches!(
            s.try_send(Arc::clone(&e)),
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_))
        )
    });
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn deny_now(done: AnswerSink, by: DecidedBy, channel: &str, who: Option<String>, reason: String) {
    done(Answer {
        allow: false,
        answerer: Answerer {
            by,
            channel: channel.into(),
            who,
        },
        reason,
    });
}

impl Approver for ApprovalHub {
    fn ask(&self, req: AskRequest, done: AnswerSink) {
        let inner = &self.inner;
        let key = question_key(&req.tool, &req.args);
        let now = Instant::now();
        {
            let mut st = inner.lock();
            if st.breaker.trips(&key, now) {
                let b = st.breaker.config();
                drop(st);
                let reason = format!(
                    "the same call was asked more than {} times in {} s: denied without asking (circuit breaker)",
                    b.max,
                    b.window.as_secs()
                );
                return deny_now(done, DecidedBy::Breaker, "breaker", None, reason);
            }
        }
        if let Some(a) = inner.answers.as_ref() {
            if let Some(pre) = a.answer(&req.tool, &req.args) {
                let who = format!("{}:{}", a.path().display(), pre.line);
                return done(Answer {
                    allow: pre.allow,
                    answerer: Answerer {
                        by: DecidedBy::Answers,
                        channel: "answers-file".into(),
                        who: Some(who),
                    },
                    reason: pre.reason,
                });
            }
        }
        if inner.non_interactive {
            let reason = "--non-interactive: asks are denied".to_string();
            return deny_now(done, DecidedBy::NonInteractive, "none", None, reason);
        }
        if inner.mode == Mode::Deny {
            let reason = self.nobody_reason();
            return deny_now(done, DecidedBy::NonInteractive, "none", None, reason);
        }
        let mut st = inner.lock();
        if let Some(id) = st.by_key.get(&key).copied() {
            if let Some(q) = st.questions.get_mut(&id) {
                q.sinks.push(done);
                return;
            }
        }
        let id = st.next_id;
        st.next_id += 1;
        let deadline = now + inner.ask_timeout;
        st.by_key.insert(key.clone(), id);
        st.deadlines.insert((deadline, id));
        let q = Question {
            req,
            key,
            sinks: vec![done],
            asked_at: now,
            deadline,
        };
        let pending = st.questions.len() + 1;
        let v = view(&inner.vm, id, &q, now, pending);
        st.questions.insert(id, q);
        broadcast(&mut st, Event::Ask(v));
        drop(st);
        inner.timer.notify_one();
        inner.asked.notify_all();
    }
}

/// The one timer thread: denies questions whose deadline passed.
fn timer_loop(hub: Weak<Inner>) {
    if !super::confine_thread("ask-timer") {
        return;
    }
    loop {
        let Some(inner) = hub.upgrade() else { return };
        let expired: Vec<u64> = {
            let st = inner.lock();
            let now = Instant::now();
            let next = st.deadlines.iter().next().map(|(t, _)| *t);
            // Wake at the next deadline, or after a second to notice the hub is gone.
            let wait = next
                .map(|t| t.saturating_duration_since(now))
                .unwrap_or(Duration::from_secs(1))
                .min(Duration::from_secs(1));
            let (st, _) = inner
                .timer
                .wait_timeout(st, wait)
                .unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            st.deadlines
                .iter()
                .take_while(|(t, _)| *t <= now)
                .map(|(_, id)| *id)
                .collect()
        };
        let hub_ref = ApprovalHub {
            inner: Arc::clone(&inner),
        };
        for id in expired {
            let secs = inner.ask_timeout.as_secs_f64();
            let reason = format!("nobody answered within {secs} s (--ask-timeout)");
            let answerer = Answerer {
                by: DecidedBy::Timeout,
                channel: "timer".into(),
                who: None,
            };
            hub_ref.resolve(id, false, answerer, reason, None);
        }
        drop(hub_ref);
        drop(inner);
    }
}
