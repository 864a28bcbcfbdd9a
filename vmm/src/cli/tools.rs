//! `ironvmm tools [--json] [--config FILE]`: the catalog of the services compiled
//! into ironvmm, plus, with `--config`, the tools of its `[[mcp]]` servers (started
//! to list them, then stopped). Each tool is shown with its reply cap: the most
//! bytes of structured result one call may return.

use std::path::{Path, PathBuf};

use crate::config::Config;
use crate::exit;
use crate::services::mcp_servers::{McpService, ServerSpec};
use crate::services::{builtin_catalog_json, builtin_specs, Service};

#[derive(clap::Args, Debug)]
pub struct ToolsArgs {
    /// Print the catalog in the `--catalog` file format of the policy CLI.
    #[arg(long)]
    json: bool,
    /// `ironvmm.toml`: also list the tools of its `[[mcp]]` servers.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

pub fn run(args: ToolsArgs) -> u8 {
    let servers = match args.config.as_deref().map(start_servers).transpose() {
        Ok(s) => s.unwrap_or_default(),
        Err(e) => {
            eprintln!("ironvmm: {e}");
            return exit::VMM_ERROR;
        }
    };
    let text = if args.json {
        let mut s = serde_json::to_string_pretty(&catalog_json(&servers)).unwrap_or_default();
        s.push('\n');
        s
    } else {
        let mut specs = builtin_specs();
        specs.extend(servers.iter().flat_map(McpService::tools));
        let width = specs.iter().map(|s| s.name.len()).max().unwrap_or(0);
        let mut s = String::new();
        for spec in &specs {
            s.push_str(&format!(
                "{:<width$}  {:>9}  {}\n",
                spec.name,
                size(spec.reply_cap),
                spec.description
            ));
        }
        s
    };
    super::output::write_all(text.as_bytes());
    0
}

/// Starts the `[[mcp]]` servers of the ironvmm.toml at `path` (to list their tools;
/// they stop when dropped).
pub fn start_servers(path: &Path) -> Result<Vec<McpService>, String> {
    let cfg = Config::load(path).map_err(|e| e.to_string())?;
    cfg.mcp
        .iter()
        .map(|m| McpService::start(&ServerSpec::from(m)).map_err(|e| e.to_string()))
        .collect()
}

/// The builtin catalog plus the tools of `servers`, in the `--catalog` file format.
pub fn catalog_json(servers: &[McpService]) -> serde_json::Value {
    let mut catalog = builtin_catalog_json();
    if let Some(tools) = catalog["tools"].as_array_mut() {
        tools.extend(servers.iter().flat_map(McpService::catalog_entries));
    }
    catalog
}

/// A reply cap for people: whole KiB or MiB when it is one, else bytes.
fn size(bytes: usize) -> String {
    match bytes {
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{} MiB", b >> 20),
        b if b >= 1 << 10 && b % (1 << 10) == 0 => format!("{} KiB", b >> 10),
        b => format!("{b} B"),
    }
}
