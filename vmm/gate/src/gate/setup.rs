//! Building a gate from its settings: policy, services, audit log. Shared by
//! `ironvmm gate` and the VMM (`boot`), so both get the same checks.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use super::budget::{Budgeted, CallBudget, LlmBudgeted};
use super::followup::GateDecide;
use super::{Decider, Gate, GateLimits};
use crate::approvals::live::LiveDecider;
use crate::approvals::LivePolicy;
use crate::audit::{self, AuditLog, SyncMode};
use crate::config::Config;
use crate::services::fs::{FsService, GUEST_ROOT};
use crate::services::http::HttpService;
use crate::services::llm::{LlmBudget, LlmService};
use crate::services::mail::MailService;
use crate::services::mcp_servers::{McpService, ServerSpec};
use crate::services::net::NetService;
use crate::services::Services;
use ironvmm_wire::exit;

/// Everything a gate is built from.
#[derive(Debug, Clone)]
pub struct GateConfig {
    pub policy: PathBuf,
    /// `--workspace`; without it, `[workspace] dir` of the configuration.
    pub workspace: Option<PathBuf>,
    /// `ironvmm.toml` (`--config`), already loaded; the default configures nothing.
    pub config: Config,
    /// None: `audit::default_path(vm)`.
    pub audit: Option<PathBuf>,
    /// The audit key file; None: `<audit log>.key`. Never inside the workspace.
    pub audit_key: Option<PathBuf>,
    /// Most bytes the audit log may hold (`--audit-budget`).
    pub audit_budget: u64,
    /// Most bytes `fs.write` may write in this VM (`--max-write-bytes`).
    pub max_write_bytes: u64,
    pub audit_sync: SyncMode,
    pub limits: GateLimits,
    /// The VM id written in every audit record.
    pub vm: String,
    /// SHA-256 of the guest image, for the `open` record (None without a VM).
    pub image_sha256: Option<String>,
    /// How ironvmm was started, for the `open` record.
    pub flags: Value,
}

impl GateConfig {
    /// The folder the fs service serves: `--workspace`, else `[workspace] dir`.
    pub fn workspace_dir(&self) -> Option<PathBuf> {
        self.workspace
            .clone()
            .or_else(|| self.config.workspace.as_ref().map(|w| w.dir.clone()))
    }
}

/// A gate ready to serve.
pub struct OpenedGate {
    pub gate: Arc<Gate>,
    pub audit: Arc<AuditLog>,
    pub audit_path: PathBuf,
    /// The running policy: answers learned as rules are put in force through it.
    pub live: Arc<LivePolicy>,
    /// Policy warnings, already formatted (empty when none).
    pub warnings: String,
    /// Network egress (vsock port 2), decided by this gate.
    pub net: Arc<NetService>,
    /// The run's `[llm.budget]`, spent by `llm.chat` and the proxy's model route alike.
    pub llm_budget: Arc<LlmBudget>,
}

/// Why the gate could not be built: the exit code (125 or 127) and the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetupError {
    pub code: u8,
    pub message: String,
}

fn fail(code: u8, message: impl Into<String>) -> SetupError {
    SetupError {
        code,
        message: message.into(),
    }
}

/// Loads the policy (exit 127 if invalid), opens the workspace, creates the audit log
/// and its key with the `open` record (exit 125 on failure), and protects the gate's
/// own files from the guest: in the policy (invariant 3, by path, also as
/// /workspace/... when they lie in the workspace) and in the fs service (by file
/// identity, with every folder that holds one of them).
pub fn open_gate(cfg: &GateConfig) -> Result<OpenedGate, SetupError> {
    open_gate_with(cfg, None)
}

/// `open_gate`, with every call first spending `budget` (`--max-calls`,
/// `--max-egress-bytes`).
pub fn open_gate_with(
    cfg: &GateConfig,
    budget: Option<Arc<CallBudget>>,
) -> Result<OpenedGate, SetupError> {
    prepare_gate(cfg, budget)?.open(cfg.image_sha256.clone())
}

/// A gate whose policy is loaded and whose services are started, but whose audit
/// log does not exist yet: the VMM builds the VM meanwhile and opens the log (with
/// the image's digest, hashed on another thread) before the first vCPU runs.
pub struct PreparedGate {
    cfg: GateConfig,
    budget: Option<Arc<CallBudget>>,
    policy_text: Vec<u8>,
    live: Arc<LivePolicy>,
    warnings: String,
    mcp: Vec<McpService>,
    mail: Option<MailService>,
    fs: Option<FsService>,
    audit_path: PathBuf,
    key_path: PathBuf,
    ws: Option<PathBuf>,
}

/// The first half of [`open_gate_with`]: everything that can refuse the settings
/// (policy, workspace, services, where the log and key go), without the audit log.
pub fn prepare_gate(
    cfg: &GateConfig,
    budget: Option<Arc<CallBudget>>,
) -> Result<PreparedGate, SetupError> {
    let policy_text = std::fs::read(&cfg.policy)
        .map_err(|e| fail(exit::BAD_POLICY, format!("{}: {e}", cfg.policy.display())))?;
    let workspace = cfg.workspace_dir();
    // The owner's MCP servers are started first: the policy is checked against
    // the tools they list.
    let mut mcp = Vec::new();
    for m in &cfg.config.mcp {
        let svc = McpService::start(&ServerSpec::from(m))
            .map_err(|e| fail(exit::VMM_ERROR, e.to_string()))?;
        mcp.push(svc);
    }
    let mail = match &cfg.config.mail {
        Some(m) => Some(MailService::from_config(m).map_err(|e| fail(exit::VMM_ERROR, e))?),
        None => None,
    };
    let fs = match &workspace {
        Some(dir) => Some(FsService::open(dir).map_err(|e| fail(exit::VMM_ERROR, e.to_string()))?),
        None => None,
    };
    let audit_path = match &cfg.audit {
        Some(p) => p.clone(),
        None => audit::default_path(&cfg.vm).ok_or_else(|| {
            fail(
                exit::VMM_ERROR,
                "no audit log location: give --audit, or set XDG_STATE_HOME or HOME",
            )
        })?,
    };
    let key_path = cfg
        .audit_key
        .clone()
        .unwrap_or_else(|| audit::default_key_path(&audit_path));
    let ws = workspace.as_ref().and_then(|w| w.canonicalize().ok());
    if let Some(ws) = &ws {
        // Protection by identity keeps the guest off a key in its workspace, but the
        // key is the one secret of the log: it lives where the guest has no name for it.
        if resolve(&key_path).starts_with(ws) {
            return Err(fail(
                exit::VMM_ERROR,
                format!(
                    "the audit key {} would lie inside the workspace {}: give --audit-key FILE outside it",
                    key_path.display(),
                    ws.display()
                ),
            ));
        }
    }
    let (live, warnings) = super::policy::load_with_tools(
        &cfg.policy,
        mcp.iter().flat_map(McpService::catalog_entries).collect(),
    )
    .map_err(|e| fail(e.exit_code(), e.to_string()))?;
    Ok(PreparedGate {
        cfg: cfg.clone(),
        budget,
        policy_text,
        live,
        warnings,
        mcp,
        mail,
        fs,
        audit_path,
        key_path,
        ws,
    })
}

impl PreparedGate {
    /// The audit log path the gate will write.
    pub fn audit_path(&self) -> &Path {
        &self.audit_path
    }

    /// `--jail`: readies the services for running as `uid`/`gid` once the host's
    /// paths are gone (the fs service: the workspace's permissions, the trash
    /// folder opened now). Returns warnings to print.
    pub fn ready_for_jail(&mut self, uid: u32, gid: u32) -> Result<Vec<String>, SetupError> {
        match &mut self.fs {
            Some(fs) => fs
                .ready_for_user(uid, gid)
                .map_err(|e| fail(exit::VMM_ERROR, format!("--jail: {e}"))),
            None => Ok(Vec::new()),
        }
    }

    /// The second half: creates the audit log and its key with the `open` record
    /// (which names `image_sha256`), protects the gate's files and builds the gate.
    pub fn open(self, image_sha256: Option<String>) -> Result<OpenedGate, SetupError> {
        let PreparedGate {
            cfg,
            budget,
            policy_text,
            live,
            warnings,
            mcp,
            mail,
            fs,
            audit_path,
            key_path,
            ws,
        } = self;
        let cfg = &cfg;
        let mut open = Map::new();
        open.insert("ironvmm".into(), env!("CARGO_PKG_VERSION").into());
        open.insert("policy".into(), cfg.policy.display().to_string().into());
        open.insert(
            "policy_sha256".into(),
            hex::encode(Sha256::digest(&policy_text)).into(),
        );
        open.insert(
            "image_sha256".into(),
            image_sha256.map_or(Value::Null, Value::from),
        );
        open.insert("flags".into(), cfg.flags.clone());
        let log = AuditLog::create_keyed(&audit_path, &key_path, &cfg.vm, cfg.audit_sync, open)
            .map_err(|e| fail(exit::VMM_ERROR, e.to_string()))?;
        log.set_budget(cfg.audit_budget);
        let log = Arc::new(log);

        // Every file the guest must never read, write, move or delete: the policy, its
        // lists, its learned rules (even before they exist, so the guest cannot plant
        // them), the audit log and its key.
        let mut files = vec![
            audit_path.clone(),
            key_path,
            cfg.policy.clone(),
            learned_path(&cfg.policy),
        ];
        files.extend(live.current().files().iter().cloned());
        files.extend(cfg.config.source.clone());
        let mut protected = Vec::new();
        for f in &files {
            protected.push(f.clone());
            // The same file as the guest would name it, when it lies in the workspace.
            if let Some(rel) = ws
                .as_ref()
                .and_then(|ws| resolve(f).strip_prefix(ws).ok().map(PathBuf::from))
            {
                protected.push(PathBuf::from(GUEST_ROOT).join(rel));
            }
        }
        live.protect(&protected)
            .map_err(|d| fail(exit::BAD_POLICY, format!("invalid policy:\n{d}")))?;

        let mut services = Services::new();
        if let Some(mut svc) = fs {
            svc.set_max_write_bytes(cfg.max_write_bytes);
            for f in &files {
                svc.protect(f);
            }
            services.add(Box::new(svc));
        }
        if let Some(m) = mail {
            services.add(Box::new(m));
        }
        // Every decision spends the run's budget (`--max-calls`, `--max-egress-bytes`),
        // the http service's redirect hops included.
        let budget = budget.filter(|b| b.is_limited());
        let net_budget = budget.clone();
        // The model's budget ([llm.budget]) is spent by the llm service and enforced
        // here, as a denial like any other.
        let llm_budget = LlmBudget::new(cfg.config.llm_service.budget.clone());
        let budgeted = |d: Box<dyn Decider>| -> Box<dyn Decider> {
            let d: Box<dyn Decider> = Box::new(LlmBudgeted::new(d, Arc::clone(&llm_budget)));
            match &budget {
                Some(b) => Box::new(Budgeted::new(d, Arc::clone(b))),
                None => d,
            }
        };
        // The http service has each redirect hop decided by the same live policy.
        let decider: Arc<dyn Decider> =
            Arc::from(budgeted(Box::new(LiveDecider(Arc::clone(&live)))));
        let hops = Arc::new(GateDecide::new(decider, Arc::clone(&log)));
        let http =
            HttpService::new(&cfg.config.http, Some(hops)).map_err(|e| fail(exit::VMM_ERROR, e))?;
        services.add(Box::new(http));
        // One service for the tool and the proxy's model route: one set of keys, one budget.
        let mut llm = None;
        if !cfg.config.llm_service.providers.is_empty() {
            let svc = Arc::new(
                LlmService::new(
                    &cfg.config.llm_service,
                    Arc::clone(&llm_budget),
                    Some(Arc::clone(&log)),
                )
                .map_err(|e| fail(exit::VMM_ERROR, e.to_string()))?,
            );
            services.add(Box::new(Arc::clone(&svc)));
            llm = Some(svc);
        }
        for svc in mcp {
            services.add(Box::new(svc));
        }
        let gate = Arc::new(Gate::new(
            budgeted(Box::new(LiveDecider(Arc::clone(&live)))),
            services,
            Arc::clone(&log),
            cfg.limits,
        ));
        let net = NetService::new(Arc::clone(&gate), &cfg.config.net, net_budget, llm)
            .map_err(|e| fail(exit::VMM_ERROR, e))?;
        Ok(OpenedGate {
            gate,
            net,
            llm_budget,
            audit: log,
            audit_path,
            live,
            warnings,
        })
    }
}

/// `p.rules.learned` beside `p.rules`: where learned rules live.
pub fn learned_path(policy: &Path) -> PathBuf {
    let mut name = policy.as_os_str().to_os_string();
    name.push(".learned");
    PathBuf::from(name)
}

/// `path` made absolute with its longest existing prefix resolved (symlinks
/// included), so that a file not created yet still compares with the workspace.
fn resolve(path: &Path) -> PathBuf {
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().unwrap_or_default().join(path)
    };
    let mut rest = Vec::new();
    let mut cur = abs.as_path();
    loop {
        if let Ok(c) = cur.canonicalize() {
            return rest.iter().rev().fold(c, |p, n| p.join(n));
        }
        match (cur.parent(), cur.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_os_string());
                cur = parent;
            }
            _ => return abs,
        }
    }
}

/// The `flags` of the open record for `ironvmm gate`.
pub fn gate_flags(transport: &str, cfg: &GateConfig) -> Value {
    json!({
        "mode": format!("gate {transport}"),
        "workspace": cfg.workspace.as_ref().map(|p| p.display().to_string()),
        "config": cfg.config.source.as_ref().map(|p| p.display().to_string()),
        "audit_sync": cfg.audit_sync.as_str(),
        "max_frame": cfg.limits.max_frame,
        "max_inflight_per_conn": cfg.limits.max_inflight_per_conn,
        "max_inflight": cfg.limits.max_inflight,
        "workers": cfg.limits.workers,
        "call_timeout_ms": cfg.limits.call_timeout.as_millis() as u64,
    })
}
