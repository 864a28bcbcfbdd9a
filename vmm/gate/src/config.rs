//! `ironvmm.toml` (`--config`): what the services of a gate are configured with.
//!
//! The file is checked against the known keys before anything is read, so a typo
//! is an error that names the key and suggests the nearest known one, instead of a
//! setting silently ignored. `[lists]`, `[compile]` and the top of `[llm]` belong to
//! the policy compiler, which reads and checks them itself. `[[llm.providers]]` and
//! `[llm.budget]` configure the `llm.chat` service and are checked here.
//! Secrets never appear in the file: it names the environment variables that hold
//! them (`value_env`, `password_env`), so it can be committed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::services::ssrf::Cidr;

/// Largest configuration file read.
const MAX_CONFIG: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: larger than 1 MiB")]
    TooLarge { path: PathBuf },
    #[error("{path}: not valid TOML: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("{path}: unknown key `{key}`{}", suggestion.as_ref().map(|s| format!(" (did you mean `{s}`?)")).unwrap_or_default())]
    UnknownKey {
        path: PathBuf,
        key: String,
        suggestion: Option<String>,
    },
    #[error("{path}: `{key}` must be a {expected}")]
    NotATable {
        path: PathBuf,
        key: String,
        expected: &'static str,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// The whole file. Every table is optional.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub workspace: Option<WorkspaceConfig>,
    #[serde(default)]
    pub mail: Option<MailConfig>,
    #[serde(default)]
    pub http: HttpConfig,
    #[serde(default)]
    pub net: NetConfig,
    #[serde(default)]
    pub mcp: Vec<McpServerConfig>,
    // The compiler's tables: known here, read by the compiler.
    #[serde(default)]
    pub llm: Option<toml::Table>,
    #[serde(default)]
    pub lists: Option<toml::Table>,
    #[serde(default)]
    pub compile: Option<toml::Table>,
    /// `[[llm.providers]]` and `[llm.budget]`: the `llm.chat` service.
    #[serde(skip)]
    pub llm_service: LlmServiceConfig,
    /// The file it was loaded from (None: no `--config`).
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkspaceConfig {
    /// The host folder served as /workspace (`--workspace` wins over it).
    pub dir: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MailBackend {
    Maildir,
    Imap,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MailConfig {
    pub backend: MailBackend,
    /// The Maildir++ root (INBOX is the root, other folders `.Name`).
    pub maildir: Option<PathBuf>,
    /// The sender of `mail.send`, e.g. `"Ada <ada@example.org>"`.
    pub from: String,
    #[serde(default = "default_sent")]
    pub sent_folder: String,
    #[serde(default = "default_trash")]
    pub trash_folder: String,
    /// Most bytes of body text one `mail.read` returns.
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
    pub smtp: Option<SmtpConfig>,
    pub imap: Option<ImapConfig>,
}

fn default_sent() -> String {
    "Sent".into()
}
fn default_trash() -> String {
    "Trash".into()
}
fn default_max_body() -> usize {
    256 * 1024
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Security {
    /// TLS from the first byte (port 465 / 993).
    Tls,
    /// Plain, then STARTTLS, which is required (port 587).
    Starttls,
    /// No TLS at all: only for a server on loopback (tests, a local relay).
    Plain,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmtpConfig {
    pub host: String,
    pub port: Option<u16>,
    #[serde(default = "default_starttls")]
    pub security: Security,
    pub username: Option<String>,
    /// The environment variable holding the password.
    pub password_env: Option<String>,
    #[serde(default = "default_mail_timeout")]
    pub timeout_secs: u64,
    /// A PEM file of CA certificates trusted besides the web PKI (a private server).
    pub ca_file: Option<PathBuf>,
}

fn default_starttls() -> Security {
    Security::Starttls
}
fn default_tls() -> Security {
    Security::Tls
}
fn default_mail_timeout() -> u64 {
    30
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImapConfig {
    pub host: String,
    pub port: Option<u16>,
    #[serde(default = "default_tls")]
    pub security: Security,
    pub username: String,
    pub password_env: String,
    #[serde(default = "default_mail_timeout")]
    pub timeout_secs: u64,
    /// A PEM file of CA certificates trusted besides the web PKI (a private server).
    pub ca_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    #[serde(default = "default_http_timeout")]
    pub timeout_secs: u64,
    #[serde(default = "default_max_response")]
    pub max_response_bytes: usize,
    #[serde(default = "default_max_redirects")]
    pub max_redirects: u32,
    /// Address ranges the SSRF guard lets through (e.g. `["127.0.0.1/32"]`).
    #[serde(default)]
    pub allow_addresses: Vec<String>,
    #[serde(default)]
    pub secret: Vec<HttpSecret>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            timeout_secs: default_http_timeout(),
            max_response_bytes: default_max_response(),
            max_redirects: default_max_redirects(),
            allow_addresses: Vec::new(),
            secret: Vec::new(),
        }
    }
}

fn default_http_timeout() -> u64 {
    30
}
fn default_max_response() -> usize {
    512 * 1024
}
fn default_max_redirects() -> u32 {
    5
}

/// A header the host adds to requests for one host; the guest never sees it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSecret {
    pub host: String,
    pub header: String,
    /// The environment variable holding the value.
    pub value_env: String,
    /// Put before the value, e.g. `"Bearer "`.
    #[serde(default)]
    pub prefix: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// Address ranges the SSRF guard lets through for `net.*`.
    #[serde(default)]
    pub allow_addresses: Vec<String>,
    /// Seconds without a byte either way that end an exchange or a tunnel.
    #[serde(default = "default_net_timeout")]
    pub timeout_secs: u64,
    /// Guest connections to the proxy port served at once.
    #[serde(default = "default_net_connections")]
    pub max_connections: usize,
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig {
            allow_addresses: Vec::new(),
            timeout_secs: default_net_timeout(),
            max_connections: default_net_connections(),
        }
    }
}

fn default_net_timeout() -> u64 {
    60
}
fn default_net_connections() -> usize {
    32
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct McpServerConfig {
    pub name: String,
    pub command: String,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub timeout_secs: Option<u64>,
    /// `"tool.argument" = "path"`: roles of the server's arguments.
    #[serde(default)]
    pub roles: BTreeMap<String, String>,
}

/// The `llm.chat` service: the providers the host calls, and the run's budget.
#[derive(Debug, Clone, Default)]
pub struct LlmServiceConfig {
    pub providers: Vec<LlmProviderConfig>,
    pub budget: LlmBudgetConfig,
}

/// One OpenAI-compatible endpoint (`POST {base_url}/chat/completions`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlmProviderConfig {
    /// What `llm.chat`'s `provider` names (the first provider is the default).
    pub name: String,
    /// e.g. `https://api.openai.com/v1`; plain http only for an allowed loopback host.
    pub base_url: String,
    /// The environment variable holding the key; none: no Authorization header.
    pub api_key_env: Option<String>,
    /// Lets the SSRF guard through to loopback (a test server, Ollama).
    #[serde(default)]
    pub allow_loopback: bool,
    /// Bounds each phase, not the whole call: connecting, sending, the wait for the
    /// response head and each gap between body reads (a long stream is not cut).
    #[serde(default = "default_llm_timeout")]
    pub timeout_secs: u64,
    /// The most one call may take in all, a stream included (checked between
    /// reads), so a provider trickling bytes cannot hold a worker forever.
    #[serde(default = "default_llm_max")]
    pub max_secs: u64,
    /// Prices in US dollars per million tokens, for the cost budget.
    pub input_usd_per_mtok: Option<f64>,
    pub output_usd_per_mtok: Option<f64>,
}

fn default_llm_timeout() -> u64 {
    120
}

fn default_llm_max() -> u64 {
    1800
}

/// Limits of one run (one VM, one `ironvmm gate`) on `llm.chat`; none is set by default.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlmBudgetConfig {
    /// Tokens, prompt and completion together, over all calls.
    pub tokens: Option<u64>,
    /// Model calls.
    pub steps: Option<u64>,
    /// Seconds since the gate started, after which no model call is made.
    pub wall_secs: Option<u64>,
    /// US dollars, from the providers' prices.
    pub cost_usd: Option<f64>,
}

/// The shape of the file, for the key check.
enum Shape {
    Value,
    /// Checked by whoever reads it.
    Opaque,
    Table(&'static [(&'static str, Shape)]),
    TableArray(&'static [(&'static str, Shape)]),
}

const SMTP: &[(&str, Shape)] = &[
    ("host", Shape::Value),
    ("port", Shape::Value),
    ("security", Shape::Value),
    ("username", Shape::Value),
    ("password_env", Shape::Value),
    ("timeout_secs", Shape::Value),
    ("ca_file", Shape::Value),
];
const IMAP: &[(&str, Shape)] = &[
    ("host", Shape::Value),
    ("port", Shape::Value),
    ("security", Shape::Value),
    ("username", Shape::Value),
    ("password_env", Shape::Value),
    ("timeout_secs", Shape::Value),
    ("ca_file", Shape::Value),
];
const MAIL: &[(&str, Shape)] = &[
    ("backend", Shape::Value),
    ("maildir", Shape::Value),
    ("from", Shape::Value),
    ("sent_folder", Shape::Value),
    ("trash_folder", Shape::Value),
    ("max_body_bytes", Shape::Value),
    ("smtp", Shape::Table(SMTP)),
    ("imap", Shape::Table(IMAP)),
];
const SECRET: &[(&str, Shape)] = &[
    ("host", Shape::Value),
    ("header", Shape::Value),
    ("value_env", Shape::Value),
    ("prefix", Shape::Value),
];
const HTTP: &[(&str, Shape)] = &[
    ("timeout_secs", Shape::Value),
    ("max_response_bytes", Shape::Value),
    ("max_redirects", Shape::Value),
    ("allow_addresses", Shape::Value),
    ("secret", Shape::TableArray(SECRET)),
];
const MCP: &[(&str, Shape)] = &[
    ("name", Shape::Value),
    ("command", Shape::Value),
    ("args", Shape::Value),
    ("env", Shape::Opaque),
    ("timeout_secs", Shape::Value),
    ("roles", Shape::Opaque),
];
const NET: &[(&str, Shape)] = &[
    ("allow_addresses", Shape::Value),
    ("timeout_secs", Shape::Value),
    ("max_connections", Shape::Value),
];
const LLM_PROVIDER: &[(&str, Shape)] = &[
    ("name", Shape::Value),
    ("base_url", Shape::Value),
    ("api_key_env", Shape::Value),
    ("allow_loopback", Shape::Value),
    ("timeout_secs", Shape::Value),
    ("max_secs", Shape::Value),
    ("input_usd_per_mtok", Shape::Value),
    ("output_usd_per_mtok", Shape::Value),
];
const LLM_BUDGET: &[(&str, Shape)] = &[
    ("tokens", Shape::Value),
    ("steps", Shape::Value),
    ("wall_secs", Shape::Value),
    ("cost_usd", Shape::Value),
];
const TOP: &[(&str, Shape)] = &[
    ("workspace", Shape::Table(&[("dir", Shape::Value)])),
    ("mail", Shape::Table(MAIL)),
    ("http", Shape::Table(HTTP)),
    ("net", Shape::Table(NET)),
    ("mcp", Shape::TableArray(MCP)),
    ("llm", Shape::Opaque),
    ("lists", Shape::Opaque),
    ("compile", Shape::Opaque),
];

/// The file name looked for beside the policy when no `--config` is given.
pub const BESIDE_POLICY: &str = "ironvmm.toml";

/// The configuration file a `boot`, `run` or `gate` uses, and whether it was found
/// beside the policy rather than named by `--config`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chosen {
    pub path: PathBuf,
    pub beside_policy: bool,
}

/// `--config` when given; otherwise the `ironvmm.toml` in the policy file's own
/// folder, if there is one. A policy folder is one unit (the rules, the lists they
/// name, the services that serve them): whoever can write the policy's folder
/// already decides everything the configuration could, so this widens no trust.
pub fn choose(explicit: Option<&Path>, policy: &Path) -> Option<Chosen> {
    if let Some(p) = explicit {
        return Some(Chosen {
            path: p.to_path_buf(),
            beside_policy: false,
        });
    }
    let dir = match policy.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let path = dir.join(BESIDE_POLICY);
    path.is_file().then_some(Chosen {
        path,
        beside_policy: true,
    })
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let read = |source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(read)?;
        if meta.len() > MAX_CONFIG {
            return Err(ConfigError::TooLarge {
                path: path.to_path_buf(),
            });
        }
        let text = std::fs::read_to_string(path).map_err(read)?;
        let mut cfg = Config::parse(&text, path)?;
        cfg.source = Some(path.to_path_buf());
        // Relative paths in the file are relative to the file.
        let base = path.parent().unwrap_or(Path::new("."));
        let rebase = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        if let Some(ws) = cfg.workspace.as_mut() {
            rebase(&mut ws.dir);
        }
        if let Some(m) = cfg.mail.as_mut() {
            m.maildir.as_mut().map(rebase);
            if let Some(ca) = m.imap.as_mut().and_then(|i| i.ca_file.as_mut()) {
                rebase(ca);
            }
            if let Some(ca) = m.smtp.as_mut().and_then(|s| s.ca_file.as_mut()) {
                rebase(ca);
            }
        }
        Ok(cfg)
    }

    /// Parses and checks the text; `path` only names the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let table: toml::Table = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: path.to_path_buf(),
            message: e.message().to_string(),
        })?;
        check_keys(&table, TOP, "", path)?;
        let llm_service = llm_service(table.get("llm"), path)?;
        let mut cfg: Config =
            toml::Value::Table(table)
                .try_into()
                .map_err(|e: toml::de::Error| ConfigError::Invalid {
                    path: path.to_path_buf(),
                    message: e.message().to_string(),
                })?;
        cfg.llm_service = llm_service;
        cfg.validate(path)?;
        Ok(cfg)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let bad = |message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        if let Some(m) = &self.mail {
            match m.backend {
                MailBackend::Maildir if m.maildir.is_none() => {
                    return Err(bad("mail: backend \"maildir\" needs `maildir`".into()))
                }
                MailBackend::Imap if m.imap.is_none() => {
                    return Err(bad(
                        "mail: backend \"imap\" needs a [mail.imap] table".into()
                    ))
                }
                _ => {}
            }
            for (k, f) in [
                ("sent_folder", &m.sent_folder),
                ("trash_folder", &m.trash_folder),
            ] {
                crate::services::mail::check_folder(f)
                    .map_err(|e| bad(format!("mail.{k}: {}", e.message)))?;
            }
        }
        for (k, list) in [
            ("http.allow_addresses", &self.http.allow_addresses),
            ("net.allow_addresses", &self.net.allow_addresses),
        ] {
            for a in list {
                a.parse::<Cidr>().map_err(|e| bad(format!("{k}: {e}")))?;
            }
        }
        for (i, s) in self.http.secret.iter().enumerate() {
            if s.host.is_empty() || s.header.is_empty() || s.value_env.is_empty() {
                return Err(bad(format!(
                    "http.secret[{i}]: host, header and value_env must not be empty"
                )));
            }
        }
        self.validate_llm().map_err(bad)?;
        let mut names = std::collections::BTreeSet::new();
        for (i, m) in self.mcp.iter().enumerate() {
            if !m
                .name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
                || m.name.is_empty()
            {
                return Err(bad(format!(
                    "mcp[{i}].name `{}`: expected lowercase [a-z0-9_-]",
                    m.name
                )));
            }
            if !names.insert(&m.name) {
                return Err(bad(format!("mcp[{i}].name `{}` is used twice", m.name)));
            }
        }
        Ok(())
    }

    fn validate_llm(&self) -> Result<(), String> {
        let l = &self.llm_service;
        let mut names = std::collections::BTreeSet::new();
        for (i, p) in l.providers.iter().enumerate() {
            let at = format!("llm.providers[{i}]");
            if p.name.is_empty()
                || !p
                    .name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
            {
                return Err(format!(
                    "{at}.name `{}`: expected lowercase [a-z0-9_-]",
                    p.name
                ));
            }
            if !names.insert(&p.name) {
                return Err(format!("{at}.name `{}` is used twice", p.name));
            }
            let u = url::Url::parse(&p.base_url)
                .map_err(|e| format!("{at}.base_url `{}`: {e}", p.base_url))?;
            let host = u.host_str().unwrap_or_default();
            let loopback_host = matches!(host, "localhost" | "[::1]")
                || host
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback());
            match u.scheme() {
                "https" => {}
                // The key must not cross a network in the clear.
                "http" if loopback_host && p.allow_loopback => {}
                "http" => {
                    return Err(format!(
                        "{at}.base_url `{}`: plain http only to a loopback host with allow_loopback = true",
                        p.base_url
                    ))
                }
                s => return Err(format!("{at}.base_url: scheme `{s}` is not http(s)")),
            }
            if let Some(env) = &p.api_key_env {
                if env.is_empty() {
                    return Err(format!("{at}.api_key_env must not be empty"));
                }
            }
            for (k, v) in [
                ("input_usd_per_mtok", p.input_usd_per_mtok),
                ("output_usd_per_mtok", p.output_usd_per_mtok),
            ] {
                if v.is_some_and(|v| !v.is_finite() || v < 0.0) {
                    return Err(format!("{at}.{k} must be a price of 0 or more"));
                }
            }
            if l.budget.cost_usd.is_some()
                && (p.input_usd_per_mtok.is_none() || p.output_usd_per_mtok.is_none())
            {
                return Err(format!(
                    "llm.budget.cost_usd needs input_usd_per_mtok and output_usd_per_mtok on {at} (`{}`)",
                    p.name
                ));
            }
        }
        if l.budget.cost_usd.is_some_and(|c| !c.is_finite() || c < 0.0) {
            return Err("llm.budget.cost_usd must be 0 or more".into());
        }
        Ok(())
    }

    /// The SSRF guard's allowed ranges for `http` (checked by `parse`).
    pub fn http_allowed(&self) -> Vec<Cidr> {
        self.http
            .allow_addresses
            .iter()
            .filter_map(|a| a.parse().ok())
            .collect()
    }
}

/// `[[llm.providers]]` and `[llm.budget]` out of the compiler's `[llm]` table.
fn llm_service(llm: Option<&toml::Value>, path: &Path) -> Result<LlmServiceConfig, ConfigError> {
    let mut out = LlmServiceConfig::default();
    let Some(llm) = llm.and_then(toml::Value::as_table) else {
        return Ok(out);
    };
    let invalid = |key: &str, e: toml::de::Error| ConfigError::Invalid {
        path: path.to_path_buf(),
        message: format!("{key}: {}", e.message()),
    };
    let mut only = toml::Table::new();
    for k in ["providers", "budget"] {
        if let Some(v) = llm.get(k) {
            only.insert(k.into(), v.clone());
        }
    }
    check_keys(
        &only,
        &[
            ("providers", Shape::TableArray(LLM_PROVIDER)),
            ("budget", Shape::Table(LLM_BUDGET)),
        ],
        "llm",
        path,
    )?;
    if let Some(v) = only.remove("providers") {
        out.providers = v.try_into().map_err(|e| invalid("llm.providers", e))?;
    }
    if let Some(v) = only.remove("budget") {
        out.budget = v.try_into().map_err(|e| invalid("llm.budget", e))?;
    }
    Ok(out)
}

fn check_keys(
    table: &toml::Table,
    shape: &'static [(&'static str, Shape)],
    prefix: &str,
    path: &Path,
) -> Result<(), ConfigError> {
    for (k, v) in table {
        let full = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        let Some((_, s)) = shape.iter().find(|(n, _)| n == k) else {
            let suggestion = shape
                .iter()
                .map(|(n, _)| (strsim::jaro_winkler(n, k), *n))
                .filter(|(score, _)| *score > 0.7)
                .max_by(|a, b| a.0.total_cmp(&b.0))
                .map(|(_, n)| {
                    if prefix.is_empty() {
                        n.to_string()
                    } else {
                        format!("{prefix}.{n}")
                    }
                });
            return Err(ConfigError::UnknownKey {
                path: path.to_path_buf(),
                key: full,
                suggestion,
            });
        };
        let not = |expected| ConfigError::NotATable {
            path: path.to_path_buf(),
            key: full.clone(),
            expected,
        };
        match s {
            Shape::Value | Shape::Opaque => {}
            Shape::Table(inner) => {
                let t = v.as_table().ok_or_else(|| not("table"))?;
                check_keys(t, inner, &full, path)?;
            }
            Shape::TableArray(inner) => {
                let a = v
                    .as_array()
                    .ok_or_else(|| not("array of tables ([[...]])"))?;
                for (i, item) in a.iter().enumerate() {
                    let t = item
                        .as_table()
                        .ok_or_else(|| not("array of tables ([[...]])"))?;
                    check_keys(t, inner, &format!("{full}[{i}]"), path)?;
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_configuration_beside_the_policy_is_used_unless_one_is_named() {
        let d = tempfile::tempdir().unwrap();
        let policy = d.path().join("p.rules");
        assert_eq!(choose(None, &policy), None);
        std::fs::write(d.path().join(BESIDE_POLICY), "").unwrap();
        let found = choose(None, &policy).unwrap();
        assert_eq!(found.path, d.path().join("ironvmm.toml"));
        assert!(found.beside_policy);
        let named = choose(Some(Path::new("other.toml")), &policy).unwrap();
        assert_eq!(named.path, Path::new("other.toml"));
        assert!(!named.beside_policy);
        // A bare file name: the folder is the current one.
        assert_eq!(
            choose(None, Path::new("p.rules")).map(|c| c.beside_policy),
            Path::new("ironvmm.toml").is_file().then_some(true)
        );
    }

    fn err(text: &str) -> String {
        Config::parse(text, Path::new("t.toml"))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn unknown_keys_are_named_with_the_nearest_known_one() {
        assert_eq!(
            err("[htpp]\n"),
            "t.toml: unknown key `htpp` (did you mean `http`?)"
        );
        assert_eq!(
            err("[[http.secret]]\nhots = \"a\"\n"),
            "t.toml: unknown key `http.secret[0].hots` (did you mean `http.secret[0].host`?)"
        );
        assert_eq!(
            err("[mail.smtp]\nhost='x'\npasword_env='P'\n"),
            "t.toml: unknown key `mail.smtp.pasword_env` (did you mean `mail.smtp.password_env`?)"
        );
        assert_eq!(err("zzzzzz = 1\n"), "t.toml: unknown key `zzzzzz`");
    }

    #[test]
    fn bad_values_are_named() {
        let e = err("[http]\nallow_addresses = [\"127.0.0.1/40\"]\n");
        assert!(
            e.contains("http.allow_addresses") && e.contains("prefix"),
            "{e}"
        );
        let e = err("[mail]\nbackend = \"maildir\"\nfrom = \"a@b\"\n");
        assert!(e.contains("needs `maildir`"), "{e}");
        let e = err("[mail]\nbackend = \"pop3\"\nfrom = \"a@b\"\n");
        assert!(e.contains("pop3"), "{e}");
        let e = err("http = 3\n");
        assert!(e.contains("`http` must be a table"), "{e}");
        let e = err("[mail]\nbackend='maildir'\nmaildir='m'\nfrom='a@b'\ntrash_folder='../x'\n");
        assert!(e.contains("mail.trash_folder"), "{e}");
    }

    #[test]
    fn compiler_tables_are_known_and_left_to_the_compiler() {
        let c = Config::parse(
            "[llm]\nmodel = \"m\"\nanything = 1\n[lists]\nx = [\"a\"]\n[compile]\ny = 2\n",
            Path::new("t.toml"),
        )
        .unwrap();
        assert!(c.llm.is_some() && c.mail.is_none());
        assert_eq!(c.http.max_redirects, 5);
    }

    #[test]
    fn llm_providers_and_budget_are_checked() {
        let ok = "[llm]\nmodel = \"m\"\n[[llm.providers]]\nname = \"local\"\nbase_url = \"http://127.0.0.1:9/v1\"\nallow_loopback = true\n[llm.budget]\nsteps = 3\ntokens = 100\n";
        let c = Config::parse(ok, Path::new("t.toml")).unwrap();
        assert_eq!(c.llm_service.providers[0].name, "local");
        assert_eq!(c.llm_service.budget.steps, Some(3));
        let e =
            err("[[llm.providers]]\nname = \"a\"\nbase_url = \"https://x\"\napi_keyenv = \"K\"\n");
        assert!(
            e.contains("llm.providers[0].api_keyenv") && e.contains("llm.providers[0].api_key_env"),
            "{e}"
        );
        let e = err("[llm.budget]\nstep = 3\n");
        assert!(e.contains("did you mean `llm.budget.steps`"), "{e}");
        let e = err("[[llm.providers]]\nname = \"a\"\nbase_url = \"http://127.0.0.1:9/v1\"\n");
        assert!(e.contains("allow_loopback"), "{e}");
        let e = err("[[llm.providers]]\nname = \"a\"\nbase_url = \"http://api.example.com/v1\"\nallow_loopback = true\n");
        assert!(e.contains("plain http only"), "{e}");
        let e = err("[[llm.providers]]\nname = \"a\"\nbase_url = \"https://x/v1\"\n[llm.budget]\ncost_usd = 1.0\n");
        assert!(e.contains("needs input_usd_per_mtok"), "{e}");
    }

    #[test]
    fn the_example_file_loads() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/ironvmm.toml");
        let c = Config::load(&p).unwrap_or_else(|e| panic!("{e}"));
        let m = c.mail.as_ref().unwrap();
        assert_eq!(m.backend, MailBackend::Maildir);
        assert!(
            m.maildir.as_ref().unwrap().is_absolute()
                || m.maildir.as_ref().unwrap().starts_with(p.parent().unwrap())
        );
        assert_eq!(c.http.secret[0].host, "api.github.com");
        assert!(!c.http_allowed().is_empty());
        assert!(c.llm.is_some());
        assert_eq!((c.net.timeout_secs, c.net.max_connections), (60, 32));
    }

    #[test]
    fn ca_files_are_relative_to_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ironvmm.toml");
        std::fs::write(
            &p,
            "[mail]\nbackend = \"imap\"\nfrom = \"a@b.example\"\n\
             [mail.imap]\nhost = \"imap.example\"\nusername = \"a\"\npassword_env = \"P\"\nca_file = \"ca.pem\"\n\
             [mail.smtp]\nhost = \"smtp.example\"\nca_file = \"certs/ca.pem\"\n",
        )
        .unwrap();
        let c = Config::load(&p).unwrap_or_else(|e| panic!("{e}"));
        let m = c.mail.unwrap();
        assert_eq!(m.imap.unwrap().ca_file.unwrap(), dir.path().join("ca.pem"));
        assert_eq!(
            m.smtp.unwrap().ca_file.unwrap(),
            dir.path().join("certs/ca.pem")
        );
    }

    #[test]
    fn net_keys_are_checked() {
        let e = Config::parse(
            "[net]
timeout = 3
",
            Path::new("t.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("unknown key `net.timeout`"), "{e}");
        let c = Config::parse("", Path::new("t.toml")).unwrap();
        assert_eq!(c.net.timeout_secs, 60);
    }
}
