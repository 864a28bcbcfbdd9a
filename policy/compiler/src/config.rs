//! Where the compiler's settings come from: `ironvmm.toml` (`[llm]`, `[lists]`,
//! `[compile]`), then the environment, then command-line flags, each overriding the
//! one before. Only the settings the compiler needs are read; other tables and keys
//! of `ironvmm.toml` belong to other parts of ironvmm and are ignored.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Environment variables the compiler reads (documented in docs/policy-compiler.md).
pub const ENV_PROVIDER: &str = "IRONVMM_LLM_PROVIDER";
pub const ENV_BASE_URL: &str = "IRONVMM_LLM_BASE_URL";
pub const ENV_MODEL: &str = "IRONVMM_LLM_MODEL";
pub const ENV_API_KEY: &str = "IRONVMM_LLM_API_KEY";
pub const ENV_TIMEOUT_SECS: &str = "IRONVMM_LLM_TIMEOUT_SECS";
pub const ENV_OPENAI_KEY: &str = "OPENAI_API_KEY";
pub const ENV_ANTHROPIC_KEY: &str = "ANTHROPIC_API_KEY";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not valid TOML for ironvmm: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{what}: {message}")]
    Invalid { what: String, message: String },
    #[error(
        "no model is configured: set {ENV_MODEL}, `model` in the [llm] table of ironvmm.toml, or --model"
    )]
    NoModel,
}

/// The two wire APIs the compiler speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderKind {
    /// `POST {base_url}/chat/completions`: OpenAI, Ollama, vLLM, llama.cpp server, LiteLLM.
    OpenAi,
    /// `POST {base_url}/v1/messages`: Anthropic's Messages API.
    Anthropic,
}

impl ProviderKind {
    pub fn parse(s: &str) -> Result<Self, ConfigError> {
        match s.trim().to_ascii_lowercase().as_str() {
            "openai" | "openai-compatible" | "ollama" | "vllm" | "llamacpp" | "llama.cpp"
            | "litellm" => Ok(Self::OpenAi),
            "anthropic" => Ok(Self::Anthropic),
            other => Err(ConfigError::Invalid {
                what: "llm provider".into(),
                message: format!(
                    "unknown provider {other:?}: expected \"openai\" (any OpenAI-compatible server) or \"anthropic\""
                ),
            }),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::OpenAi => "openai",
            Self::Anthropic => "anthropic",
        }
    }

    fn default_base_url(self) -> &'static str {
        match self {
            Self::OpenAi => "https://api.openai.com/v1",
            Self::Anthropic => "https://api.anthropic.com",
        }
    }

    fn default_key_env(self) -> &'static str {
        match self {
            Self::OpenAi => ENV_OPENAI_KEY,
            Self::Anthropic => ENV_ANTHROPIC_KEY,
        }
    }
}

/// An API key. Its `Debug` and `Display` never show it, so it cannot leak into a
/// log or an error message by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// How the answer's JSON Schema is sent to an OpenAI-compatible server
/// (`structured_output` in [llm]). Anthropic always gets it as a tool's input schema
/// unless this is `none`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StructuredOutput {
    /// `response_format: {"type": "json_schema", ...}`: OpenAI, vLLM, llama.cpp's
    /// llama-server, Ollama >= 0.5, LiteLLM.
    JsonSchema,
    /// `response_format: {"type": "json_object", "schema": ...}`: llama-cpp-python's
    /// server, which turns the schema into a grammar.
    JsonObject,
    /// A top-level `format` holding the schema, as Ollama's own API names it.
    Format,
    /// Nothing: the prompt alone asks for JSON.
    None,
}

impl StructuredOutput {
    pub fn parse(s: &str) -> Result<Self, ConfigError> {
        Ok(match s.trim() {
            "json_schema" => Self::JsonSchema,
            "json_object" => Self::JsonObject,
            "format" => Self::Format,
            "none" => Self::None,
            other => {
                return Err(ConfigError::Invalid {
                    what: "llm structured_output".into(),
                    message: format!(
                    "{other:?}: expected \"json_schema\", \"json_object\", \"format\" or \"none\""
                ),
                })
            }
        })
    }
}

/// Everything needed to talk to one model.
#[derive(Debug, Clone)]
pub struct LlmConfig {
    pub provider: ProviderKind,
    pub base_url: String,
    pub model: String,
    pub api_key: Option<Secret>,
    /// Bound on one whole HTTP exchange (connect, send, wait, read).
    pub timeout: Duration,
    pub connect_timeout: Duration,
    /// Retries after the first attempt, for 429, 5xx and transport errors.
    pub max_retries: u32,
    pub retry_base: Duration,
    pub retry_max: Duration,
    pub max_tokens: u32,
    /// `None` sends no temperature (for models that reject one).
    pub temperature: Option<f64>,
    pub structured: StructuredOutput,
}

impl LlmConfig {
    /// The endpoint URL of this provider's chat API.
    pub fn endpoint(&self) -> String {
        let base = self.base_url.trim_end_matches('/');
        match self.provider {
            ProviderKind::OpenAi => format!("{base}/chat/completions"),
            ProviderKind::Anthropic if base.ends_with("/v1") => format!("{base}/messages"),
            ProviderKind::Anthropic => format!("{base}/v1/messages"),
        }
    }

    /// `provider:model`, as recorded in the p.rules header and the cache key.
    pub fn model_id(&self) -> String {
        format!("{}:{}", self.provider.name(), self.model)
    }
}

/// `[llm]` of ironvmm.toml, and the same settings from the environment or flags.
/// Every field is optional so that layers can be merged.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct LlmSettings {
    pub provider: Option<String>,
    pub base_url: Option<String>,
    pub model: Option<String>,
    /// Name of the environment variable that holds the key. The key itself is never
    /// read from the file, so ironvmm.toml can be committed.
    pub api_key_env: Option<String>,
    pub timeout_secs: Option<u64>,
    /// Finer than `timeout_secs`, which it overrides (tests use it).
    pub timeout_ms: Option<u64>,
    pub connect_timeout_secs: Option<u64>,
    pub max_retries: Option<u32>,
    pub retry_base_ms: Option<u64>,
    pub retry_max_ms: Option<u64>,
    pub max_tokens: Option<u32>,
    pub temperature: Option<f64>,
    /// `false` for models that reject a temperature.
    pub send_temperature: Option<bool>,
    /// `json_schema` (default), `json_object`, `format` or `none`.
    pub structured_output: Option<String>,
    #[serde(skip)]
    pub api_key: Option<Secret>,
}

macro_rules! take_later {
    ($a:ident, $b:ident, $($f:ident),*) => { $( if $b.$f.is_some() { $a.$f = $b.$f; } )* };
}

impl LlmSettings {
    /// `later` wins wherever it sets a value.
    pub fn overlay(mut self, later: LlmSettings) -> LlmSettings {
        take_later!(
            self,
            later,
            provider,
            base_url,
            model,
            api_key_env,
            timeout_secs,
            timeout_ms,
            connect_timeout_secs,
            max_retries,
            retry_base_ms,
            retry_max_ms,
            max_tokens,
            temperature,
            send_temperature,
            structured_output,
            api_key
        );
        self
    }

    /// The settings the environment gives (the key is looked up in `resolve`).
    pub fn from_env(env: &dyn Fn(&str) -> Option<String>) -> Result<LlmSettings, ConfigError> {
        let timeout_secs = match env(ENV_TIMEOUT_SECS) {
            Some(v) => Some(v.trim().parse::<u64>().map_err(|_| ConfigError::Invalid {
                what: ENV_TIMEOUT_SECS.into(),
                message: format!("{v:?} is not a whole number of seconds"),
            })?),
            None => None,
        };
        Ok(LlmSettings {
            provider: env(ENV_PROVIDER),
            base_url: env(ENV_BASE_URL),
            model: env(ENV_MODEL),
            timeout_secs,
            api_key: env(ENV_API_KEY).filter(|k| !k.is_empty()).map(Secret::new),
            ..Default::default()
        })
    }

    /// Fills defaults and finds the key: an explicit key, else the variable named by
    /// `api_key_env`, else OPENAI_API_KEY / ANTHROPIC_API_KEY by provider. A missing
    /// key is not an error: local servers (Ollama) need none.
    pub fn resolve(self, env: &dyn Fn(&str) -> Option<String>) -> Result<LlmConfig, ConfigError> {
        let provider = match &self.provider {
            Some(p) => ProviderKind::parse(p)?,
            None => ProviderKind::OpenAi,
        };
        let model = self
            .model
            .filter(|m| !m.trim().is_empty())
            .ok_or(ConfigError::NoModel)?;
        let base_url = self
            .base_url
            .unwrap_or_else(|| provider.default_base_url().to_string());
        if !(base_url.starts_with("http://") || base_url.starts_with("https://")) {
            return Err(ConfigError::Invalid {
                what: "llm base_url".into(),
                message: format!("{base_url:?} is not an http:// or https:// URL"),
            });
        }
        let api_key = match self.api_key {
            Some(k) => Some(k),
            None => {
                let var = self
                    .api_key_env
                    .unwrap_or_else(|| provider.default_key_env().to_string());
                env(&var).filter(|k| !k.is_empty()).map(Secret::new)
            }
        };
        let temperature = if self.send_temperature == Some(false) {
            None
        } else {
            Some(self.temperature.unwrap_or(0.0))
        };
        let timeout = match self.timeout_ms {
            Some(ms) => Duration::from_millis(ms.clamp(10, 3_600_000)),
            None => Duration::from_secs(self.timeout_secs.unwrap_or(180).clamp(1, 3600)),
        };
        let connect_timeout =
            Duration::from_secs(self.connect_timeout_secs.unwrap_or(10).clamp(1, 600));
        let structured = match &self.structured_output {
            Some(s) => StructuredOutput::parse(s)?,
            None => StructuredOutput::JsonSchema,
        };
        Ok(LlmConfig {
            provider,
            base_url,
            model,
            api_key,
            timeout,
            connect_timeout,
            max_retries: self.max_retries.unwrap_or(4).min(10),
            retry_base: Duration::from_millis(self.retry_base_ms.unwrap_or(500)),
            retry_max: Duration::from_millis(self.retry_max_ms.unwrap_or(30_000)),
            max_tokens: self.max_tokens.unwrap_or(4096).clamp(64, 200_000),
            temperature,
            structured,
        })
    }
}

/// `[compile]` of ironvmm.toml: bounds of the repair loops and the cache folder.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct CompileSettings {
    /// The catalog file, when `--catalog` is not given.
    pub catalog: Option<PathBuf>,
    pub max_repairs: Option<u32>,
    pub max_rounds: Option<u32>,
    pub cache_dir: Option<PathBuf>,
}

/// The parts of ironvmm.toml the compiler reads.
#[derive(Debug, Clone, Default)]
pub struct FileConfig {
    pub llm: LlmSettings,
    pub compile: CompileSettings,
    /// `[lists]`: list name → file, for lists bound to a service (`contacts`).
    /// Relative paths are resolved against the configuration file's folder.
    pub lists: BTreeMap<String, PathBuf>,
}

impl FileConfig {
    pub fn load(path: &Path) -> Result<FileConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::parse(&text, path, base)
    }

    pub fn parse(text: &str, path: &Path, base: &Path) -> Result<FileConfig, ConfigError> {
        let perr = |message: String| ConfigError::Parse {
            path: path.to_path_buf(),
            message,
        };
        let table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| perr(e.to_string()))?;
        let mut cfg = FileConfig::default();
        if let Some(v) = table.get("llm") {
            if v.get("api_key").is_some() {
                return Err(perr(
                    "[llm] api_key: keys are not read from files; put the key in an environment \
                     variable and name it with api_key_env"
                        .into(),
                ));
            }
            check_keys(v, "llm", LLM_KEYS, &perr)?;
            cfg.llm = v
                .clone()
                .try_into()
                .map_err(|e: toml::de::Error| perr(format!("[llm]: {e}")))?;
        }
        if let Some(v) = table.get("compile") {
            check_keys(v, "compile", COMPILE_KEYS, &perr)?;
            cfg.compile = v
                .clone()
                .try_into()
                .map_err(|e: toml::de::Error| perr(format!("[compile]: {e}")))?;
            if let Some(d) = &cfg.compile.cache_dir {
                cfg.compile.cache_dir = Some(base.join(d));
            }
            if let Some(d) = &cfg.compile.catalog {
                cfg.compile.catalog = Some(base.join(d));
            }
        }
        if let Some(v) = table.get("lists") {
            let lists: BTreeMap<String, PathBuf> = v
                .clone()
                .try_into()
                .map_err(|e: toml::de::Error| perr(format!("[lists]: {e}")))?;
            cfg.lists = lists.into_iter().map(|(k, p)| (k, base.join(p))).collect();
        }
        Ok(cfg)
    }
}

/// The keys of `[llm]` and `[compile]`: anything else there is a typo.
const LLM_KEYS: &[&str] = &[
    "provider",
    "base_url",
    "model",
    "api_key_env",
    "timeout_secs",
    "timeout_ms",
    "connect_timeout_secs",
    "max_retries",
    "retry_base_ms",
    "retry_max_ms",
    "max_tokens",
    "temperature",
    "send_temperature",
    "structured_output",
    // The llm.chat service's tables (the gate's configuration reads them).
    "providers",
    "budget",
];
const COMPILE_KEYS: &[&str] = &["catalog", "max_repairs", "max_rounds", "cache_dir"];

/// Levenshtein distance, for "did you mean".
pub fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

/// The known word nearest to `word`, if it is near enough to be a typo of it.
pub fn nearest<'a>(word: &str, known: &[&'a str]) -> Option<&'a str> {
    known
        .iter()
        .map(|k| (edit_distance(word, k), *k))
        .filter(|(d, k)| *d <= (k.len() / 3).max(2) || k.starts_with(word) || word.starts_with(k))
        .min()
        .map(|(_, k)| k)
}

fn check_keys(
    table: &toml::Value,
    name: &str,
    known: &[&str],
    perr: &dyn Fn(String) -> ConfigError,
) -> Result<(), ConfigError> {
    let Some(t) = table.as_table() else {
        return Err(perr(format!("[{name}] must be a table")));
    };
    for k in t.keys() {
        if !known.contains(&k.as_str()) {
            let hint = match nearest(k, known) {
                Some(n) => format!("did you mean `{n}`?"),
                None => format!("the keys of [{name}] are {}", known.join(", ")),
            };
            return Err(perr(format!("[{name}]: unknown key `{k}`: {hint}")));
        }
    }
    Ok(())
}

/// Reads the process environment; tests pass their own function instead.
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn file_then_env_then_flags() {
        let f = FileConfig::parse(
            "[llm]\nprovider = \"anthropic\"\nmodel = \"m-file\"\nmax_retries = 2\n\
             [lists]\ncontacts = \"contacts.txt\"\n[services.mail]\nx = 1\n",
            Path::new("ironvmm.toml"),
            Path::new("/etc/iv"),
        )
        .unwrap();
        assert_eq!(f.lists["contacts"], PathBuf::from("/etc/iv/contacts.txt"));
        let env = env_of(&[(ENV_MODEL, "m-env"), (ENV_ANTHROPIC_KEY, "sk-ant")]);
        let s = f.llm.overlay(LlmSettings::from_env(&env).unwrap());
        let cfg = s.clone().resolve(&env).unwrap();
        assert_eq!(cfg.provider, ProviderKind::Anthropic);
        assert_eq!(cfg.model, "m-env");
        assert_eq!(cfg.max_retries, 2);
        assert_eq!(cfg.api_key.as_ref().unwrap().expose(), "sk-ant");
        assert_eq!(cfg.endpoint(), "https://api.anthropic.com/v1/messages");
        assert_eq!(cfg.temperature, Some(0.0));
        let flags = LlmSettings {
            model: Some("m-flag".into()),
            ..Default::default()
        };
        assert_eq!(s.overlay(flags).resolve(&env).unwrap().model, "m-flag");
    }

    #[test]
    fn an_unknown_key_is_an_error_that_suggests_the_nearest() {
        let e = FileConfig::parse(
            "[llm]\nmodel = \"m\"\nmax_token = 5\n",
            Path::new("ironvmm.toml"),
            Path::new("."),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("ironvmm.toml: not valid TOML for ironvmm: [llm]: unknown key `max_token`: did you mean `max_tokens`?"),
            "{e}"
        );
        let e = FileConfig::parse(
            "[compile]\ncache = \"x\"\n",
            Path::new("i.toml"),
            Path::new("."),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("did you mean `cache_dir`?"), "{e}");
        let e = FileConfig::parse("[llm]\nzzzzzzzz = 1\n", Path::new("i.toml"), Path::new("."))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("the keys of [llm] are provider, base_url"),
            "{e}"
        );
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }

    #[test]
    fn keys_never_come_from_the_file_and_never_print() {
        let e = FileConfig::parse(
            "[llm]\napi_key = \"sk\"\n",
            Path::new("x.toml"),
            Path::new("."),
        )
        .unwrap_err();
        assert!(e.to_string().contains("api_key_env"), "{e}");
        let s = Secret::new("sk-very-secret");
        assert!(!format!("{s:?}").contains("very"));
    }

    #[test]
    fn missing_model_and_bad_provider_are_named() {
        let env = env_of(&[]);
        assert!(matches!(
            LlmSettings::default().resolve(&env),
            Err(ConfigError::NoModel)
        ));
        let e = LlmSettings {
            provider: Some("gemini".into()),
            model: Some("m".into()),
            ..Default::default()
        }
        .resolve(&env)
        .unwrap_err();
        assert!(e.to_string().contains("gemini"));
    }

    #[test]
    fn openai_compatible_endpoint_and_no_temperature() {
        let env = env_of(&[
            (ENV_BASE_URL, "http://127.0.0.1:11434/v1/"),
            (ENV_MODEL, "qwen"),
        ]);
        let s = LlmSettings::from_env(&env).unwrap().overlay(LlmSettings {
            send_temperature: Some(false),
            ..Default::default()
        });
        let c = s.resolve(&env).unwrap();
        assert_eq!(c.endpoint(), "http://127.0.0.1:11434/v1/chat/completions");
        assert_eq!(c.temperature, None);
        assert!(c.api_key.is_none());
        assert_eq!(c.model_id(), "openai:qwen");
    }
}
