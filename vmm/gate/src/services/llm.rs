//! The `llm.chat` tool: one model turn, performed by the host with the owner's key.
//!
//! - The guest sends an OpenAI-style chat request (`model`, `messages`, `tools`…);
//!   the policy decides it like any call (rules on `model`, a `limit` per run).
//! - The host posts it to the provider's `base_url` + `/chat/completions` with
//!   `ureq`, adding the key it read from the environment at start. The key is in
//!   no argument, so neither the guest nor the audit log ever holds it; a response
//!   that echoes it has it replaced before the guest sees it.
//! - The SSRF guard judges the provider's resolved addresses like `http.fetch`'s:
//!   a loopback provider (a test server, Ollama) needs `allow_loopback = true`.
//! - The run's budget (`[llm.budget]`: tokens, steps, wall time, cost) is spent
//!   here and written to the audit log after every call (`kind: "llm"`). Once it
//!   is spent, the gate denies `llm.chat` (`decided_by: limit`, see
//!   `gate::budget::LlmBudgeted`).
//! - `{provider, model, path}` is also the shape the guest proxy's model route
//!   (`/llm/<provider>/…`) is decided as. The proxy (`net::model`) sends its
//!   requests through `send_route` here, with the same keys and budget; a tool call
//!   carrying `path` and no `messages` is refused.

use std::io::{self, Read};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

use super::http::GuardedResolver;
use super::ssrf::{AddressGuard, Cidr};
use super::{Service, ToolError, ToolSpec};
use crate::audit::AuditLog;
use crate::config::{LlmBudgetConfig, LlmProviderConfig, LlmServiceConfig};

/// Most bytes of a provider's response read (the rest is refused, not truncated).
pub const MAX_RESPONSE: usize = 640 * 1024;
/// The reply cap: the response plus the usage and budget figures.
pub const REPLY_CAP: usize = 700 * 1024;

/// Below this many tokens left, a call's answer is held to what is left.
const SMALL_REMAINDER: u64 = 4096;

/// Fields of the guest's request passed on to the provider, besides `model` and
/// `messages`. Anything else is refused by the schema.
const PASSED: [&str; 8] = [
    "tools",
    "tool_choice",
    "temperature",
    "top_p",
    "stop",
    "seed",
    "response_format",
    "parallel_tool_calls",
];

pub fn tool_specs() -> Vec<ToolSpec> {
    vec![ToolSpec {
        name: "llm.chat",
        description: "One chat completion (OpenAI style, with tools) from a model provider, made by the host with the owner's key",
        input_schema: json!({"type": "object",
            "properties": {
                "provider": {"type": "string", "maxLength": 64},
                "model": {"type": "string", "maxLength": 256},
                "path": {"type": "string", "maxLength": 4096},
                "messages": {"type": "array", "maxItems": 4096, "items": {"type": "object", "additionalProperties": true}},
                "tools": {"type": "array", "maxItems": 512,
                          "items": {"type": "object", "additionalProperties": true}},
                "tool_choice": {},
                "max_tokens": {"type": "integer", "minimum": 1},
                "temperature": {"type": "number", "minimum": 0, "maximum": 2},
                "top_p": {"type": "number", "minimum": 0, "maximum": 1},
                "stop": {"type": "array", "maxItems": 16, "items": {"type": "string"}},
                "seed": {"type": "integer"},
                "response_format": {"type": "object", "additionalProperties": true},
                "parallel_tool_calls": {"type": "boolean"}},
            "additionalProperties": false}),
        roles: &[],
        aliases: &[],
        reply_cap: REPLY_CAP,
    }]
}

/// What has been spent of the run's budget.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Spent {
    pub tokens: u64,
    pub steps: u64,
    pub cost_usd: f64,
}

/// The run's budget on `llm.chat`, shared by the service (which spends it) and the
/// gate's decider (which denies once it is gone).
#[derive(Debug)]
pub struct LlmBudget {
    limits: LlmBudgetConfig,
    started: Instant,
    spent: Mutex<Spent>,
}

impl LlmBudget {
    pub fn new(limits: LlmBudgetConfig) -> Arc<LlmBudget> {
        Arc::new(LlmBudget {
            limits,
            started: Instant::now(),
            spent: Mutex::new(Spent::default()),
        })
    }

    pub fn limits(&self) -> &LlmBudgetConfig {
        &self.limits
    }

    /// When `wall_secs` runs out, if it is set: no call runs past it.
    fn wall_end(&self) -> Option<Instant> {
        self.limits
            .wall_secs
            .and_then(|s| self.started.checked_add(Duration::from_secs(s)))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Spent> {
        self.spent.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn spent(&self) -> Spent {
        *self.lock()
    }

    /// Why no further model call may be made, naming the budget; None while some is left.
    pub fn exhausted(&self) -> Option<String> {
        Self::why(&self.limits, &self.lock(), self.started.elapsed())
    }

    fn why(l: &LlmBudgetConfig, s: &Spent, elapsed: Duration) -> Option<String> {
        if let Some(max) = l.steps.filter(|m| s.steps >= *m) {
            return Some(format!(
                "llm budget spent: steps {} of {max} ([llm.budget] steps)",
                s.steps
            ));
        }
        if let Some(max) = l.tokens.filter(|m| s.tokens >= *m) {
            return Some(format!(
                "llm budget spent: tokens {} of {max} ([llm.budget] tokens)",
                s.tokens
            ));
        }
        if let Some(max) = l.cost_usd.filter(|m| s.cost_usd >= *m) {
            return Some(format!(
                "llm budget spent: cost ${:.4} of ${max} ([llm.budget] cost_usd)",
                s.cost_usd
            ));
        }
        if let Some(max) = l.wall_secs.filter(|m| elapsed.as_secs() >= *m) {
            return Some(format!(
                "llm budget spent: wall time {} s of {max} s ([llm.budget] wall_secs)",
                elapsed.as_secs()
            ));
        }
        None
    }

    /// Takes one step, unless the budget is gone (checked and counted under one
    /// lock, so calls racing each other cannot both take the last step).
    pub fn begin_step(&self) -> Result<(), String> {
        let mut s = self.lock();
        if let Some(why) = Self::why(&self.limits, &s, self.started.elapsed()) {
            return Err(why);
        }
        s.steps += 1;
        Ok(())
    }

    /// Adds a call's tokens and cost; returns the totals.
    pub fn spend(&self, tokens: u64, cost_usd: f64) -> Spent {
        let mut s = self.lock();
        s.tokens = s.tokens.saturating_add(tokens);
        s.cost_usd += cost_usd;
        *s
    }

    /// Tokens left, when tokens are limited.
    pub fn tokens_left(&self) -> Option<u64> {
        let s = self.lock();
        self.limits.tokens.map(|m| m.saturating_sub(s.tokens))
    }

    /// Spent and limits, as the guest and the audit log see them.
    pub fn report(&self) -> Value {
        let s = self.spent();
        json!({
            "spent": {"tokens": s.tokens, "steps": s.steps, "cost_usd": s.cost_usd,
                      "wall_ms": self.started.elapsed().as_millis() as u64},
            "limits": {"tokens": self.limits.tokens, "steps": self.limits.steps,
                       "cost_usd": self.limits.cost_usd, "wall_secs": self.limits.wall_secs},
        })
    }
}

/// One provider as the service uses it.
struct Provider {
    name: String,
    /// `base_url` without its trailing `/`: the model route appends the guest's path.
    base: String,
    endpoint: url::Url,
    /// `Bearer <key>`, read from the environment at start; Err: why there is none.
    authorization: Result<Option<String>, String>,
    key: Option<String>,
    /// Each phase's timeout (set on `agent`), named in its errors.
    timeout: Duration,
    agent: ureq::Agent,
    /// The most one call may take in all.
    max: Duration,
    price_in: f64,
    price_out: f64,
}

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum LlmSetupError {
    #[error("llm.providers[{index}] ({name}): {message}")]
    Invalid {
        index: usize,
        name: String,
        message: String,
    },
}

pub struct LlmService {
    providers: Vec<Provider>,
    budget: Arc<LlmBudget>,
    audit: Option<Arc<AuditLog>>,
}

impl LlmService {
    /// Reads the keys from the environment now. Every served call is written to
    /// `audit` with its usage and the budget's totals.
    pub fn new(
        c: &LlmServiceConfig,
        budget: Arc<LlmBudget>,
        audit: Option<Arc<AuditLog>>,
    ) -> Result<LlmService, LlmSetupError> {
        let providers = c
            .providers
            .iter()
            .enumerate()
            .map(|(i, p)| Self::provider(i, p))
            .collect::<Result<_, _>>()?;
        Ok(LlmService {
            providers,
            budget,
            audit,
        })
    }

    fn provider(index: usize, p: &LlmProviderConfig) -> Result<Provider, LlmSetupError> {
        let invalid = |message: String| LlmSetupError::Invalid {
            index,
            name: p.name.clone(),
            message,
        };
        // A key that is not set is named when the provider is called (the example
        // configuration lists providers the owner may not use), never sent without.
        let key = match &p.api_key_env {
            Some(env) => match std::env::var(env) {
                Ok(k) if !k.is_empty() && !k.contains(['\r', '\n', '\0']) => Ok(Some(k)),
                Ok(_) => Err(format!(
                    "the key in {env} on the host is empty or has a line break"
                )),
                Err(_) => Err(format!(
                    "the environment variable {env} is not set on the host"
                )),
            },
            None => Ok(None),
        };
        let base = p.base_url.trim_end_matches('/');
        let endpoint = url::Url::parse(&format!("{base}/chat/completions"))
            .map_err(|e| invalid(format!("base_url: {e}")))?;
        let allowed: Vec<Cidr> = if p.allow_loopback {
            vec![
                "127.0.0.0/8".parse().map_err(invalid)?,
                "::1/128".parse().map_err(invalid)?,
            ]
        } else {
            Vec::new()
        };
        let timeout = Duration::from_secs(p.timeout_secs.max(1));
        // Per phase, not `.timeout()`: ureq's whole-request deadline would also cut
        // a stream that is still moving. The whole call is bounded by `Bounded`.
        let agent = ureq::AgentBuilder::new()
            .redirects(0)
            .timeout_connect(timeout)
            .timeout_read(timeout)
            .timeout_write(timeout)
            .resolver(GuardedResolver(AddressGuard::new(allowed)))
            .user_agent(concat!("ironvmm/", env!("CARGO_PKG_VERSION")))
            .build();
        Ok(Provider {
            name: p.name.clone(),
            base: base.to_string(),
            endpoint,
            authorization: key.clone().map(|k| k.map(|k| format!("Bearer {k}"))),
            key: key.ok().flatten(),
            timeout,
            agent,
            max: Duration::from_secs(p.max_secs.max(1)),
            price_in: p.input_usd_per_mtok.unwrap_or(0.0),
            price_out: p.output_usd_per_mtok.unwrap_or(0.0),
        })
    }

    pub fn budget(&self) -> &Arc<LlmBudget> {
        &self.budget
    }

    fn chat(&self, args: &Value) -> Result<Value, ToolError> {
        if args.get("path").is_some() && args.get("messages").is_none() {
            return Err(ToolError::new(
                "bad_request",
                "path is the guest proxy's model route (http://127.0.0.1:3128/llm/...); a tool call gives model and messages",
            ));
        }
        let p = match args.get("provider").and_then(Value::as_str) {
            Some(name) => self.providers.iter().find(|p| p.name == name),
            None => self.providers.first(),
        }
        .ok_or_else(|| {
            let names: Vec<&str> = self.providers.iter().map(|p| p.name.as_str()).collect();
            ToolError::new(
                "unknown_provider",
                format!(
                    "no provider {:?} in ironvmm.toml [[llm.providers]] (configured: {names:?})",
                    args.get("provider").and_then(Value::as_str).unwrap_or("")
                ),
            )
        })?;
        let model = args
            .get("model")
            .and_then(Value::as_str)
            .filter(|m| !m.is_empty())
            .ok_or_else(|| ToolError::new("bad_request", "model: a model name is required"))?;
        let messages = args
            .get("messages")
            .filter(|m| m.as_array().is_some_and(|a| !a.is_empty()))
            .ok_or_else(|| {
                ToolError::new("bad_request", "messages: at least one message is required")
            })?;

        let mut body = Map::new();
        body.insert("model".into(), model.into());
        body.insert("messages".into(), messages.clone());
        for k in PASSED {
            if let Some(v) = args.get(k) {
                body.insert(k.into(), v.clone());
            }
        }
        // One call cannot spend far past the token budget: its answer is held to what
        // is left (asked for or not, once little is left: models refuse a max_tokens
        // above their own limit, so a large remainder is not sent).
        let asked = args.get("max_tokens").and_then(Value::as_u64);
        let max_tokens = match (asked, self.budget.tokens_left()) {
            (Some(a), Some(left)) => Some(a.min(left.max(1))),
            (None, Some(left)) if left < SMALL_REMAINDER => Some(left.max(1)),
            (a, _) => a,
        };
        if let Some(m) = max_tokens {
            body.insert("max_tokens".into(), m.into());
        }
        body.insert("stream".into(), false.into());

        let authorization = p
            .authorization
            .as_ref()
            .map_err(|why| ToolError::new("missing_key", format!("provider {}: {why}", p.name)))?;
        self.budget
            .begin_step()
            .map_err(|why| ToolError::new("budget_spent", why))?;
        let t0 = Instant::now();
        let mut req = p
            .agent
            .request_url("POST", &p.endpoint)
            .set("Content-Type", "application/json");
        if let Some(a) = authorization {
            req = req.set("Authorization", a);
        }
        let sent = Value::Object(body).to_string();
        let (status, r) = match req.send_string(&sent) {
            Ok(r) => (r.status(), r),
            Err(ureq::Error::Status(code, r)) => (code, r),
            Err(ureq::Error::Transport(t)) => {
                let why = self.transport_why(p, &t);
                let kind = if why.contains("ssrf guard") {
                    "blocked_address"
                } else if timed_out(&t) {
                    "timeout"
                } else {
                    "transport"
                };
                // The step was taken: a model that cannot be reached still costs a turn.
                self.record(p, model, None, 0.0, t0, Some(&why));
                return Err(ToolError::new(kind, format!("provider {}: {why}", p.name)));
            }
        };
        let text = match read_capped(self.bounded(p, t0, r.into_reader())) {
            Ok(text) => text,
            Err(e) => {
                self.record(p, model, None, 0.0, t0, Some(&e.message));
                return Err(e);
            }
        };
        // A provider that echoes the key (in an error, say) must not hand it to the guest.
        let text = match &p.key {
            Some(k) if text.contains(k.as_str()) => text.replace(k.as_str(), "[redacted]"),
            _ => text,
        };
        let response: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        let usage = Usage::of(&response, sent.len());
        let cost = (usage.prompt as f64 * p.price_in + usage.completion as f64 * p.price_out) / 1e6;
        self.budget.spend(usage.total(), cost);
        let failed = (!(200..300).contains(&status)).then(|| format!("HTTP {status}"));
        self.record(p, model, Some(&usage), cost, t0, failed.as_deref());
        if let Some(f) = failed {
            let detail = match &response {
                Value::String(s) => crate::audit::redact::bound(s, 2048).into_owned(),
                v => crate::audit::redact::bound(&v.to_string(), 2048).into_owned(),
            };
            return Err(ToolError::new(
                "provider_error",
                format!("provider {} answered {f}: {detail}", p.name),
            ));
        }
        if !response.is_object() {
            return Err(ToolError::new(
                "provider_error",
                format!(
                    "provider {} answered with something not a JSON object",
                    p.name
                ),
            ));
        }
        Ok(json!({
            "provider": p.name,
            "model": model,
            "response": response,
            "usage": usage.to_json(),
            "budget": self.budget.report(),
        }))
    }

    /// `body` bounded as every provider body is read: each read by the provider's
    /// `timeout_secs` (the socket's), the whole call by its `max_secs` and the end
    /// of `[llm.budget] wall_secs`, whichever comes first.
    fn bounded<R: Read>(&self, p: &Provider, t0: Instant, body: R) -> Bounded<R> {
        let mut deadline = t0 + p.max;
        let mut overall = format!(
            "the call ran past its {} s ([[llm.providers]] max_secs)",
            p.max.as_secs()
        );
        if let Some(end) = self.budget.wall_end().filter(|end| *end < deadline) {
            deadline = end;
            overall = "the call ran past the run's [llm.budget] wall_secs".into();
        }
        Bounded {
            inner: body,
            deadline,
            overall,
            gap: format!(
                "no data from the provider for {} s ([[llm.providers]] timeout_secs)",
                p.timeout.as_secs()
            ),
        }
    }

    /// A transport error as said to the guest and the audit log: a timeout names
    /// the setting that set it.
    fn transport_why(&self, p: &Provider, t: &ureq::Transport) -> String {
        if timed_out(t) {
            format!(
                "{t}: no answer within {} s ([[llm.providers]] timeout_secs)",
                p.timeout.as_secs()
            )
        } else {
            t.to_string()
        }
    }

    /// The audit record of one model call: what it used and what the run has spent.
    fn record(
        &self,
        p: &Provider,
        model: &str,
        usage: Option<&Usage>,
        cost: f64,
        t0: Instant,
        error: Option<&str>,
    ) {
        let Some(log) = &self.audit else { return };
        let mut m = Map::new();
        m.insert("provider".into(), p.name.clone().into());
        m.insert(
            "model".into(),
            crate::audit::redact::bound(model, 256).into_owned().into(),
        );
        m.insert("usage".into(), usage.map_or(Value::Null, Usage::to_json));
        m.insert("cost_usd".into(), cost.into());
        m.insert("ms".into(), (t0.elapsed().as_millis() as u64).into());
        m.insert("error".into(), error.map_or(Value::Null, Value::from));
        m.insert("budget".into(), self.budget.report());
        // A failed write is remembered by the log, and the next call is denied for it.
        let _ = log.note("llm", m);
    }
}

/// Whether ureq gave up waiting (connecting, sending, or for the response head).
fn timed_out(t: &ureq::Transport) -> bool {
    std::error::Error::source(t)
        .and_then(|e| e.downcast_ref::<io::Error>())
        .is_some_and(is_timeout)
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
    )
}

/// A provider's response body under the call's bounds: a read that waited past the
/// provider's `timeout_secs` (the socket's read timeout, so a stream may run as
/// long as it keeps moving), or one begun past the overall deadline, is a
/// `TimedOut` error naming the setting.
struct Bounded<R> {
    inner: R,
    deadline: Instant,
    /// Said when the overall deadline has passed.
    overall: String,
    /// Said when one read waited too long.
    gap: String,
}

impl<R: Read> Read for Bounded<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // Checked before each read, so the overall bound may be passed by at most
        // one read's timeout.
        if Instant::now() >= self.deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                self.overall.clone(),
            ));
        }
        match self.inner.read(buf) {
            Err(e) if is_timeout(&e) => {
                Err(io::Error::new(io::ErrorKind::TimedOut, self.gap.clone()))
            }
            r => r,
        }
    }
}

/// Reads at most `MAX_RESPONSE` bytes of a response body as text.
fn read_capped(r: impl Read) -> Result<String, ToolError> {
    let mut buf = Vec::new();
    r.take(MAX_RESPONSE as u64 + 1)
        .read_to_end(&mut buf)
        .map_err(|e| {
            let kind = if is_timeout(&e) {
                "timeout"
            } else {
                "transport"
            };
            ToolError::new(kind, format!("reading the response: {e}"))
        })?;
    if buf.len() > MAX_RESPONSE {
        return Err(ToolError::new(
            "too_large",
            format!("the provider's response is over {MAX_RESPONSE} bytes"),
        ));
    }
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// The tokens a response (or one streamed event) reports: OpenAI's
/// `prompt_tokens`/`completion_tokens`, or Anthropic's `input_tokens`/`output_tokens`
/// (in `usage`, or in `message.usage` of a stream's `message_start`).
fn reported(v: &Value) -> (Option<u64>, Option<u64>) {
    let u = if v["usage"].is_object() {
        &v["usage"]
    } else {
        &v["message"]["usage"]
    };
    (
        u["prompt_tokens"].as_u64().or(u["input_tokens"].as_u64()),
        u["completion_tokens"]
            .as_u64()
            .or(u["output_tokens"].as_u64()),
    )
}

/// Tokens of one call: the provider's `usage`, or an estimate (4 bytes a token)
/// when it gives none, so that a silent provider still spends the budget.
struct Usage {
    prompt: u64,
    completion: u64,
    estimated: bool,
}

impl Usage {
    fn of(response: &Value, sent_bytes: usize) -> Usage {
        match reported(response) {
            (Some(prompt), Some(completion)) => Usage {
                prompt,
                completion,
                estimated: false,
            },
            _ => Usage {
                prompt: (sent_bytes as u64).div_ceil(4),
                completion: (response["choices"].to_string().len() as u64).div_ceil(4),
                estimated: true,
            },
        }
    }

    fn total(&self) -> u64 {
        self.prompt.saturating_add(self.completion)
    }

    fn to_json(&self) -> Value {
        json!({"prompt_tokens": self.prompt, "completion_tokens": self.completion,
               "total_tokens": self.total(), "estimated": self.estimated})
    }
}

/// Guest headers never sent on by the model route: its credentials (a dummy key,
/// replaced by the host's), and what the host's own request frames itself.
const ROUTE_DROPPED: [&str; 7] = [
    "authorization",
    "x-api-key",
    "proxy-authorization",
    "host",
    "content-length",
    "transfer-encoding",
    "accept-encoding",
];

/// One request of the guest proxy's model route (`/llm/<provider>/<rest>`), decided
/// and about to be sent on by the host.
pub struct RouteRequest<'a> {
    pub provider: &'a str,
    /// The body's `model`, for the audit record ("" when it names none).
    pub model: &'a str,
    pub method: &'a str,
    /// What follows `/llm/<provider>` in the guest's target (`/chat/completions`).
    pub rest: &'a str,
    /// The guest's end-to-end headers.
    pub headers: &'a [(String, String)],
    pub body: &'a [u8],
}

/// The provider's answer, its body still to be read (it may be a stream).
pub struct RouteResponse {
    pub status: u16,
    pub reason: String,
    /// End-to-end headers as ureq gives them (decompression already undone).
    pub headers: Vec<(String, String)>,
    pub body: Box<dyn Read + Send>,
}

/// Why the model route could not send a request on.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("no provider {0:?} in ironvmm.toml [[llm.providers]] (configured: {1:?})")]
    UnknownProvider(String, Vec<String>),
    #[error("{0:?} is not a path under the provider's base_url")]
    BadPath(String),
    #[error("provider {0}: {1}")]
    MissingKey(String, String),
    #[error("{0}")]
    Budget(String),
    #[error("provider {0}: {1}")]
    Blocked(String, String),
    #[error("provider {0}: {1}")]
    Transport(String, String),
}

impl RouteError {
    /// The status the guest is answered with.
    pub fn status(&self) -> (u16, &'static str) {
        match self {
            RouteError::UnknownProvider(..) => (404, "Not Found"),
            RouteError::BadPath(_) => (400, "Bad Request"),
            RouteError::Budget(_) | RouteError::Blocked(..) => (403, "Forbidden"),
            RouteError::MissingKey(..) | RouteError::Transport(..) => (502, "Bad Gateway"),
        }
    }
}

impl LlmService {
    /// Sends one model-route request to its provider with the host's key in place
    /// of whatever credentials the guest sent (`x-api-key` when the guest used that
    /// header, as Anthropic's clients do; `Authorization: Bearer` otherwise). Takes
    /// a step of the budget. The caller relays the response and then calls
    /// `account_route`.
    pub fn send_route(&self, r: &RouteRequest) -> Result<RouteResponse, RouteError> {
        let p = self
            .providers
            .iter()
            .find(|p| p.name == r.provider)
            .ok_or_else(|| {
                RouteError::UnknownProvider(
                    r.provider.to_string(),
                    self.providers.iter().map(|p| p.name.clone()).collect(),
                )
            })?;
        let url = route_url(&p.base, r.rest)?;
        let key = match &p.authorization {
            Ok(_) => p.key.as_deref(),
            Err(why) => return Err(RouteError::MissingKey(p.name.clone(), why.clone())),
        };
        self.budget.begin_step().map_err(RouteError::Budget)?;
        let t0 = Instant::now();
        let mut req = p
            .agent
            .request_url(r.method, &url)
            // A stream must pass through as it comes, not wait in a decompressor.
            .set("Accept-Encoding", "identity");
        let mut x_api_key = false;
        for (name, value) in r.headers {
            let lower = name.to_ascii_lowercase();
            if lower == "x-api-key" {
                x_api_key = true;
            }
            if !ROUTE_DROPPED.contains(&lower.as_str()) {
                req = req.set(name, value);
            }
        }
        if let Some(k) = key {
            req = if x_api_key {
                req.set("x-api-key", k)
            } else {
                req.set("Authorization", &format!("Bearer {k}"))
            };
        }
        let resp = match req.send_bytes(r.body) {
            Ok(resp) | Err(ureq::Error::Status(_, resp)) => resp,
            Err(ureq::Error::Transport(t)) => {
                let why = self.transport_why(p, &t);
                // The step was taken: a model that cannot be reached still costs a turn.
                self.record(p, r.model, None, 0.0, t0, Some(&why));
                return Err(if why.contains("ssrf guard") {
                    RouteError::Blocked(p.name.clone(), why)
                } else {
                    RouteError::Transport(p.name.clone(), why)
                });
            }
        };
        let headers = resp
            .headers_names()
            .into_iter()
            .flat_map(|n| {
                resp.all(&n)
                    .into_iter()
                    .map(|v| (n.clone(), v.to_string()))
                    .collect::<Vec<_>>()
            })
            .collect();
        Ok(RouteResponse {
            status: resp.status(),
            reason: resp.status_text().to_string(),
            headers,
            body: Box::new(self.bounded(p, t0, resp.into_reader())),
        })
    }

    /// Spends what one model-route exchange used and writes its `llm` audit record.
    pub fn account_route(
        &self,
        provider: &str,
        model: &str,
        meter: UsageMeter,
        t0: Instant,
        error: Option<&str>,
    ) {
        let Some(p) = self.providers.iter().find(|p| p.name == provider) else {
            return;
        };
        let usage = meter.usage();
        let cost = (usage.prompt as f64 * p.price_in + usage.completion as f64 * p.price_out) / 1e6;
        self.budget.spend(usage.total(), cost);
        self.record(p, model, Some(&usage), cost, t0, error);
    }

    /// A redactor of `provider`'s key, for what the provider sends back.
    pub fn redactor(&self, provider: &str) -> Redactor {
        Redactor {
            key: self
                .providers
                .iter()
                .find(|p| p.name == provider)
                .and_then(|p| p.key.clone())
                .map(String::into_bytes),
            held: Vec::new(),
        }
    }
}

/// `base` + `rest`, refused unless it stays under `base` (no `..` out of it, no
/// other host).
fn route_url(base: &str, rest: &str) -> Result<url::Url, RouteError> {
    let bad = || RouteError::BadPath(rest.chars().take(200).collect());
    if !(rest.is_empty() || rest.starts_with('/') || rest.starts_with('?'))
        || rest.contains(['\\', '#'])
        || rest.chars().any(char::is_control)
    {
        return Err(bad());
    }
    let base_url = url::Url::parse(base).map_err(|_| bad())?;
    let url = url::Url::parse(&format!("{base}{rest}")).map_err(|_| bad())?;
    let under = url.origin() == base_url.origin()
        && (url.path() == base_url.path()
            || url
                .path()
                .starts_with(&format!("{}/", base_url.path().trim_end_matches('/'))));
    if !under {
        return Err(bad());
    }
    Ok(url)
}

/// Holds back nothing but what could be the start of the key, so a stream passes
/// through as it comes and the key never does, even split across reads.
pub struct Redactor {
    key: Option<Vec<u8>>,
    held: Vec<u8>,
}

impl Redactor {
    /// What of `data` (after what was held) may be sent now.
    pub fn push(&mut self, data: &[u8]) -> Vec<u8> {
        let Some(key) = &self.key else {
            return data.to_vec();
        };
        self.held.extend_from_slice(data);
        let mut out = Vec::with_capacity(self.held.len());
        let mut i = 0;
        while i < self.held.len() {
            if self.held[i..].starts_with(key) {
                out.extend_from_slice(b"[redacted]");
                i += key.len();
            } else if key.starts_with(&self.held[i..]) {
                // The rest may be the key's beginning: wait for more.
                break;
            } else {
                out.push(self.held[i]);
                i += 1;
            }
        }
        self.held.drain(..i);
        out
    }

    /// What is left at the end (a prefix of the key, never the key).
    pub fn finish(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.held)
    }
}

/// Reads the usage a response reports as it passes: each `data:` event of a
/// stream (`text/event-stream`), or the whole JSON body otherwise (up to
/// `MAX_RESPONSE`). With none reported, the tokens are estimated from the bytes,
/// so a silent provider still spends the budget.
pub struct UsageMeter {
    sse: bool,
    sent: usize,
    received: u64,
    buf: Vec<u8>,
    overflow: bool,
    prompt: Option<u64>,
    completion: Option<u64>,
}

/// Longest SSE line looked into for usage (longer ones pass through unread).
const MAX_EVENT_LINE: usize = 256 * 1024;

impl UsageMeter {
    /// `content_type` of the response; `sent` the request's body bytes.
    pub fn new(content_type: Option<&str>, sent: usize) -> UsageMeter {
        UsageMeter {
            sse: content_type.is_some_and(|c| {
                c.trim_start()
                    .to_ascii_lowercase()
                    .starts_with("text/event-stream")
            }),
            sent,
            received: 0,
            buf: Vec::new(),
            overflow: false,
            prompt: None,
            completion: None,
        }
    }

    pub fn feed(&mut self, data: &[u8]) {
        self.received += data.len() as u64;
        if !self.sse {
            if self.overflow || self.buf.len() + data.len() > MAX_RESPONSE {
                // Too large to read for usage: the estimate stands.
                self.overflow = true;
                self.buf = Vec::new();
            } else {
                self.buf.extend_from_slice(data);
            }
            return;
        }
        for &b in data {
            if b == b'\n' {
                let line = std::mem::take(&mut self.buf);
                self.event_line(&line);
            } else if self.buf.len() < MAX_EVENT_LINE {
                self.buf.push(b);
            }
        }
    }

    fn event_line(&mut self, line: &[u8]) {
        let Some(data) = line.strip_prefix(b"data:") else {
            return;
        };
        if let Ok(v) = serde_json::from_slice::<Value>(data.trim_ascii()) {
            self.note(&v);
        }
    }

    /// Streams report usage in pieces (Anthropic's input in the first event, the
    /// output so far in later ones): the largest of each counts.
    fn note(&mut self, v: &Value) {
        let (p, c) = reported(v);
        self.prompt = self.prompt.max(p);
        self.completion = self.completion.max(c);
    }

    fn usage(mut self) -> Usage {
        if !self.sse && !self.buf.is_empty() {
            if let Ok(v) = serde_json::from_slice::<Value>(&self.buf) {
                self.note(&v);
            }
        } else if self.sse && !self.buf.is_empty() {
            let line = std::mem::take(&mut self.buf);
            self.event_line(&line);
        }
        match (self.prompt, self.completion) {
            (Some(prompt), Some(completion)) => Usage {
                prompt,
                completion,
                estimated: false,
            },
            _ => Usage {
                prompt: (self.sent as u64).div_ceil(4),
                completion: self.received.div_ceil(4),
                estimated: true,
            },
        }
    }
}

impl Service for Arc<LlmService> {
    fn tools(&self) -> Vec<ToolSpec> {
        tool_specs()
    }

    fn call(&self, tool: &str, args: &Value) -> Result<Value, ToolError> {
        LlmService::call(self, tool, args)
    }
}

impl Service for LlmService {
    fn tools(&self) -> Vec<ToolSpec> {
        tool_specs()
    }

    fn call(&self, tool: &str, args: &Value) -> Result<Value, ToolError> {
        match tool {
            "llm.chat" => self.chat(args),
            _ => Err(ToolError::new(
                "unknown_tool",
                format!("the llm service has no tool {tool:?}"),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_names_what_is_spent() {
        let b = LlmBudget::new(LlmBudgetConfig {
            tokens: Some(100),
            steps: Some(2),
            ..Default::default()
        });
        assert!(b.exhausted().is_none());
        b.begin_step().unwrap();
        b.spend(60, 0.0);
        assert_eq!(b.tokens_left(), Some(40));
        b.begin_step().unwrap();
        let why = b.begin_step().unwrap_err();
        assert!(why.contains("steps 2 of 2"), "{why}");
        let b = LlmBudget::new(LlmBudgetConfig {
            tokens: Some(100),
            ..Default::default()
        });
        b.spend(150, 0.0);
        assert!(b.exhausted().unwrap().contains("tokens 150 of 100"));
        let b = LlmBudget::new(LlmBudgetConfig {
            cost_usd: Some(0.01),
            ..Default::default()
        });
        b.spend(10, 0.02);
        assert!(b.exhausted().unwrap().contains("cost_usd"));
        let b = LlmBudget::new(LlmBudgetConfig {
            wall_secs: Some(0),
            ..Default::default()
        });
        assert!(b.exhausted().unwrap().contains("wall_secs"));
    }

    #[test]
    fn the_key_is_redacted_even_split_across_reads() {
        let mut r = Redactor {
            key: Some(b"sk-secret".to_vec()),
            held: Vec::new(),
        };
        let mut out = r.push(b"data: sk-se");
        // Nothing but what may begin the key is held back.
        assert_eq!(out, b"data: ");
        out.extend(r.push(b"cret!\n\n"));
        out.extend(r.push(b"sk-s"));
        out.extend(r.finish());
        assert_eq!(out, b"data: [redacted]!\n\nsk-s");
        assert_eq!(r.push(b"event\n"), b"event\n");
    }

    #[test]
    fn route_paths_stay_under_the_base_url() {
        let base = "https://api.example/v1";
        assert_eq!(
            route_url(base, "/chat/completions?x=1").unwrap().as_str(),
            "https://api.example/v1/chat/completions?x=1"
        );
        for bad in [
            "/../admin",
            "/%2e%2e/admin",
            "@evil.example/",
            "\\x",
            "/a/../../b",
        ] {
            assert!(route_url(base, bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn streamed_usage_is_read_from_its_events() {
        let mut m = UsageMeter::new(Some("text/event-stream; charset=utf-8"), 40);
        m.feed(b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":25,\"output_tokens\":1}}}\n\n");
        m.feed(b"data: {\"type\":\"message_delta\",\"usage\":{\"output_");
        m.feed(b"tokens\":15}}\n\n");
        let u = m.usage();
        assert_eq!((u.prompt, u.completion, u.estimated), (25, 15, false));
        let mut m = UsageMeter::new(Some("text/event-stream"), 40);
        m.feed(b"data: {\"choices\":[]}\n\n");
        let u = m.usage();
        assert!(u.estimated && u.prompt == 10);
    }

    #[test]
    fn usage_is_estimated_when_the_provider_gives_none() {
        let u = Usage::of(&json!({"choices": []}), 400);
        assert!(u.estimated && u.prompt == 100);
        let u = Usage::of(
            &json!({"usage": {"prompt_tokens": 7, "completion_tokens": 3}}),
            400,
        );
        assert_eq!((u.total(), u.estimated), (10, false));
    }

    fn service(base_url: &str, allow_loopback: bool, key_env: Option<&str>) -> LlmService {
        let c = LlmServiceConfig {
            providers: vec![LlmProviderConfig {
                name: "p".into(),
                base_url: base_url.into(),
                api_key_env: key_env.map(str::to_string),
                allow_loopback,
                timeout_secs: 1,
                max_secs: 1800,
                input_usd_per_mtok: None,
                output_usd_per_mtok: None,
            }],
            budget: LlmBudgetConfig::default(),
        };
        LlmService::new(&c, LlmBudget::new(c.budget.clone()), None).unwrap()
    }

    fn chat_args() -> Value {
        json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    }

    #[test]
    fn loopback_needs_allow_loopback() {
        // A listener that would answer, so only the guard can stop the call.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("https://127.0.0.1:{}/v1", l.local_addr().unwrap().port());
        let e = service(&url, false, None)
            .call("llm.chat", &chat_args())
            .unwrap_err();
        assert_eq!(e.kind, "blocked_address", "{}", e.message);
        assert!(e.message.contains("loopback"), "{}", e.message);
    }

    /// A provider on loopback whose JSON answer comes in pieces `gap` apart,
    /// `pieces` of them (the last one never, when `stall`).
    fn trickling(pieces: usize, gap: Duration, stall: bool) -> String {
        use std::io::{BufRead, BufReader, Write};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let Ok((s, _)) = l.accept() else { return };
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut len = 0;
            loop {
                let mut h = String::new();
                if r.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                    break;
                }
                if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap();
                }
            }
            let _ = r.read_exact(&mut vec![0; len]);
            let body = format!("{{\"choices\":[],\"pad\":\"{}\"}}", "x".repeat(pieces));
            let mut out = s;
            let _ = write!(
                out,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
                body.len()
            );
            let (head, last) = body.split_at(body.len() - 2);
            for c in head.as_bytes().chunks(head.len().div_ceil(pieces)) {
                let _ = out.write_all(c).and_then(|_| out.flush());
                std::thread::sleep(gap);
            }
            if stall {
                std::thread::sleep(Duration::from_secs(60));
            }
            let _ = out.write_all(last.as_bytes());
        });
        format!("http://127.0.0.1:{port}/v1")
    }

    #[test]
    fn an_answer_slower_than_the_timeout_arrives_while_it_keeps_moving() {
        // 15 pieces 100 ms apart: 1.5 s in all against a 1 s timeout.
        let s = service(
            &trickling(15, Duration::from_millis(100), false),
            true,
            None,
        );
        let r = s.call("llm.chat", &chat_args()).unwrap();
        assert_eq!(r["response"]["pad"], "x".repeat(15));
        // A provider that stops sending is a timeout naming the setting.
        let s = service(&trickling(2, Duration::from_millis(10), true), true, None);
        let e = s.call("llm.chat", &chat_args()).unwrap_err();
        assert_eq!(e.kind, "timeout", "{}", e.message);
        assert!(e.message.contains("timeout_secs"), "{}", e.message);
        assert_eq!(s.budget().spent().steps, 1);
    }

    #[test]
    fn bad_requests_are_named() {
        let s = service(
            "https://api.example.invalid/v1",
            false,
            Some("IRONVMM_TEST_UNSET_KEY_7f3a"),
        );
        let e = s.call("llm.chat", &chat_args()).unwrap_err();
        assert_eq!(e.kind, "missing_key");
        assert!(
            e.message.contains("IRONVMM_TEST_UNSET_KEY_7f3a"),
            "{}",
            e.message
        );
        let e = s
            .call(
                "llm.chat",
                &json!({"provider": "q", "model": "m", "messages": []}),
            )
            .unwrap_err();
        assert_eq!(e.kind, "unknown_provider");
        let e = s
            .call(
                "llm.chat",
                &json!({"provider": "p", "model": "m", "path": "/v1/x"}),
            )
            .unwrap_err();
        assert!(e.message.contains("model route"), "{}", e.message);
        let e = s
            .call("llm.chat", &json!({"model": "m", "messages": []}))
            .unwrap_err();
        assert!(e.message.starts_with("messages"), "{}", e.message);
        // Nothing was sent, so no step was spent.
        assert_eq!(s.budget().spent().steps, 0);
    }
}
