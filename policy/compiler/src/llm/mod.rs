//! Talking to a model: requests, the two wire APIs, retries, the cache and the log.

pub mod transport;
pub mod wire;

use serde_json::json;

use crate::cache::Cache;
use crate::config::LlmConfig;
use crate::exchange_log::ExchangeLog;

pub use crate::chat::{ChatRequest, Message, Role};

#[derive(Debug, thiserror::Error)]
pub enum LlmError {
    #[error("{url}: HTTP {status}: {body}")]
    Http {
        url: String,
        status: u16,
        body: String,
    },
    #[error("{url}: gave up after {attempts} attempt(s); last: {last}")]
    GaveUp {
        url: String,
        attempts: u32,
        last: String,
    },
    #[error("{url}: not a usable answer: {why}")]
    BadResponse { url: String, why: String },
    #[error(
        "--offline: no cached answer for step '{step}' (cache key {key}); run once without --offline \
         to fill the cache in {cache_dir}"
    )]
    Offline {
        step: String,
        key: String,
        cache_dir: String,
    },
    #[error("the LLM cache or exchange log: {0}")]
    Io(#[from] std::io::Error),
}

/// Anything that answers a chat request for a named step. The pipeline only sees
/// this, so it does not care whether an answer came from the cache or the network.
pub trait Completer {
    fn complete(&mut self, step: &str, req: &ChatRequest) -> Result<String, LlmError>;
    /// `provider:model`, recorded in artifacts.
    fn model_id(&self) -> String;
}

/// Counts of one run, for the report and for tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    pub cache_hits: u32,
    /// Exchanges that went to the network (each may have had several attempts).
    pub exchanges: u32,
    pub http_attempts: u32,
}

/// The real client: cache first, then (unless offline) the provider.
pub struct Llm {
    cfg: LlmConfig,
    prompt_version: String,
    cache: Cache,
    log: ExchangeLog,
    offline: bool,
    agent: ureq::Agent,
    pub stats: Stats,
}

impl Llm {
    pub fn new(
        cfg: LlmConfig,
        prompt_version: &str,
        cache: Cache,
        log: ExchangeLog,
        offline: bool,
    ) -> Self {
        let agent = transport::agent(&cfg);
        Self {
            cfg,
            prompt_version: prompt_version.to_string(),
            cache,
            log,
            offline,
            agent,
            stats: Stats::default(),
        }
    }

    pub fn config(&self) -> &LlmConfig {
        &self.cfg
    }

    pub fn log_path(&self) -> &std::path::Path {
        self.log.path()
    }

    /// Continues logging in another file (`None`: stop logging).
    pub fn set_log(&mut self, log: Option<ExchangeLog>) {
        self.log = log.unwrap_or_else(ExchangeLog::disabled);
    }
}

impl Completer for Llm {
    fn model_id(&self) -> String {
        self.cfg.model_id()
    }

    fn complete(&mut self, step: &str, req: &ChatRequest) -> Result<String, LlmError> {
        let key = Cache::key(&self.cfg, &self.prompt_version, req);
        let messages: Vec<_> = req
            .messages
            .iter()
            .map(|m| json!({"role": if m.role == Role::User {"user"} else {"assistant"}, "content": m.content}))
            .collect();
        if let Some(answer) = self.cache.get(&key) {
            self.stats.cache_hits += 1;
            self.log.record(&json!({
                "step": step, "cache": "hit", "key": key, "model": self.cfg.model_id(),
                "messages": messages, "answer": answer,
            }))?;
            return Ok(answer);
        }
        if self.offline {
            self.log
                .record(&json!({"step": step, "cache": "miss", "key": key, "offline": true}))?;
            return Err(LlmError::Offline {
                step: step.to_string(),
                key,
                cache_dir: self.cache.dir().display().to_string(),
            });
        }
        let w = wire::build(&self.cfg, req);
        let mut attempts = Vec::new();
        self.stats.exchanges += 1;
        let result = transport::post(&self.agent, &self.cfg, &w, &mut attempts).and_then(|body| {
            wire::parse(self.cfg.provider, &body).map_err(|why| LlmError::BadResponse {
                url: w.url.clone(),
                why,
            })
        });
        self.stats.http_attempts += attempts.len() as u32;
        self.log.record(&json!({
            "step": step, "cache": "miss", "key": key, "model": self.cfg.model_id(),
            "url": w.url, "system": req.system, "messages": messages, "attempts": attempts,
            "answer": result.as_ref().ok(),
            "error": result.as_ref().err().map(|e| e.to_string()),
        }))?;
        let answer = result?;
        self.cache.put(&key, step, &self.cfg.model_id(), &answer)?;
        Ok(answer)
    }
}
