//! Building a gate from its settings: policy, services, audit log. Shared by
//! `ironvmm gate` and the VMM (`boot`/`run`), so both get the same checks.

use std::path::PathBuf;
use std::sync::Arc;

use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use super::followup::{GateDecide, SharedDecider};
use super::{Decider, Gate, GateLimits};
use crate::audit::{self, AuditLog, SyncMode};
use crate::config::Config;
use crate::services::fs::{FsService, GUEST_ROOT};
use crate::services::http::HttpService;
use crate::services::mail::MailService;
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
    pub audit_sync: SyncMode,
    pub limits: GateLimits,
    /// The VM id written in every audit record.
    pub vm: String,
    /// SHA-256 of the guest image, for the `open` record (None without a VM).
    pub image_sha256: Option<String>,
    /// How ironvmm was started, for the `open` record.
    pub flags: Value,
}

/// A gate ready to serve.
pub struct OpenedGate {
    pub gate: Arc<Gate>,
    pub audit: Arc<AuditLog>,
    pub audit_path: PathBuf,
    /// Policy warnings, already formatted (empty when none).
    pub warnings: String,
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
/// with its `open` record (exit 125 on failure), and protects the log and the policy
/// from the guest in the policy (by path, also as /workspace/...) and in the fs
/// service (by file identity).
pub fn open_gate(cfg: &GateConfig) -> Result<OpenedGate, SetupError> {
    let policy_text = std::fs::read(&cfg.policy)
        .map_err(|e| fail(exit::BAD_POLICY, format!("{}: {e}", cfg.policy.display())))?;
    let workspace = cfg
        .workspace
        .clone()
        .or_else(|| cfg.config.workspace.as_ref().map(|w| w.dir.clone()));
    if !cfg.config.mcp.is_empty() {
        return Err(fail(
            exit::VMM_ERROR,
            "[[mcp]] servers are not served by this build yet: remove them from the configuration",
        ));
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
    let mut protected = vec![audit_path.clone(), cfg.policy.clone()];
    protected.extend(cfg.config.source.clone());
    // The same files as the guest would name them, when they lie in the workspace.
    if let Some(ws) = workspace.as_ref().and_then(|w| w.canonicalize().ok()) {
        for p in protected.clone() {
            let abs = p
                .parent()
                .and_then(|d| d.canonicalize().ok())
                .zip(p.file_name())
                .map(|(d, n)| d.join(n));
            if let Some(rel) = abs.as_ref().and_then(|a| a.strip_prefix(&ws).ok()) {
                protected.push(PathBuf::from(GUEST_ROOT).join(rel));
            }
        }
    }
    let (decider, warnings) = super::policy::load(&cfg.policy, &protected)?;
    let decider: Arc<dyn Decider> = Arc::from(decider);

    let mut open = Map::new();
    open.insert("ironvmm".into(), env!("CARGO_PKG_VERSION").into());
    open.insert("policy".into(), cfg.policy.display().to_string().into());
    open.insert(
        "policy_sha256".into(),
        hex::encode(Sha256::digest(&policy_text)).into(),
    );
    open.insert(
        "image_sha256".into(),
        cfg.image_sha256.clone().map_or(Value::Null, Value::from),
    );
    open.insert("flags".into(), cfg.flags.clone());
    let log = AuditLog::create(&audit_path, &cfg.vm, cfg.audit_sync, open)
        .map_err(|e| fail(exit::VMM_ERROR, e.to_string()))?;
    let log = Arc::new(log);

    let mut services = Services::new();
    if let Some(mut svc) = fs {
        svc.protect(&audit_path);
        svc.protect(&cfg.policy);
        if let Some(c) = &cfg.config.source {
            svc.protect(c);
        }
        services.add(Box::new(svc));
    }
    if let Some(m) = mail {
        services.add(Box::new(m));
    }
    let hops = Arc::new(GateDecide::new(Arc::clone(&decider), Arc::clone(&log)));
    let http =
        HttpService::new(&cfg.config.http, Some(hops)).map_err(|e| fail(exit::VMM_ERROR, e))?;
    services.add(Box::new(http));
    let gate = Arc::new(Gate::new(
        Box::new(SharedDecider(decider)),
        services,
        Arc::clone(&log),
        cfg.limits,
    ));
    Ok(OpenedGate {
        gate,
        audit: log,
        audit_path,
        warnings,
    })
}

/// The `flags` of the open record for `ironvmm gate`.
pub fn gate_flags(transport: &str, cfg: &GateConfig) -> Value {
    json!({
        "mode": format!("gate {transport}"),
        "workspace": cfg.workspace.as_ref().map(|p| p.display().to_string()),
        "config": cfg.config.source.as_ref().map(|p| p.display().to_string()),
        "audit_sync": cfg.audit_sync.as_str(),
        "max_frame": cfg.limits.max_frame,
    })
}
