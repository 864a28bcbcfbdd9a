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
//!   (`/llm/<provider>/…`) is decided as; that route is served by the proxy, so a
//!   tool call carrying `path` and no `messages` is refused here.

use std::io::Read;
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
    endpoint: url::Url,
    /// `Bearer <key>`, read from the environment at start; Err: why there is none.
    authorization: Result<Option<String>, String>,
    key: Option<String>,
    agent: ureq::Agent,
    timeout: Duration,
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
        let agent = ureq::AgentBuilder::new()
            .redirects(0)
            .timeout(timeout)
            .resolver(GuardedResolver(AddressGuard::new(allowed)))
            .user_agent(concat!("ironvmm/", env!("CARGO_PKG_VERSION")))
            .build();
        Ok(Provider {
            name: p.name.clone(),
            endpoint,
            authorization: key.clone().map(|k| k.map(|k| format!("Bearer {k}"))),
            key: key.ok().flatten(),
            agent,
            timeout,
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
            .timeout(p.timeout)
            .set("Content-Type", "application/json");
        if let Some(a) = authorization {
            req = req.set("Authorization", a);
        }
        let sent = Value::Object(body).to_string();
        let (status, text) = match req.send_string(&sent) {
            Ok(r) => (r.status(), read_capped(r)?),
            Err(ureq::Error::Status(code, r)) => (code, read_capped(r)?),
            Err(ureq::Error::Transport(t)) => {
                let why = t.to_string();
                let kind = if why.contains("ssrf guard") {
                    "blocked_address"
                } else {
                    "transport"
                };
                // The step was taken: a model that cannot be reached still costs a turn.
                self.record(p, model, None, 0.0, t0, Some(&why));
                return Err(ToolError::new(kind, format!("provider {}: {why}", p.name)));
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

/// Reads at most `MAX_RESPONSE` bytes of a response body as text.
fn read_capped(r: ureq::Response) -> Result<String, ToolError> {
    let mut buf = Vec::new();
    r.into_reader()
        .take(MAX_RESPONSE as u64 + 1)
        .read_to_end(&mut buf)
        .map_err(|e| ToolError::new("transport", format!("reading the response: {e}")))?;
    if buf.len() > MAX_RESPONSE {
        return Err(ToolError::new(
            "too_large",
            format!("the provider's response is over {MAX_RESPONSE} bytes"),
        ));
    }
    Ok(String::from_utf8_lossy(&buf).into_owned())
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
        let u = &response["usage"];
        match (u["prompt_tokens"].as_u64(), u["completion_tokens"].as_u64()) {
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
                timeout_secs: 5,
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
