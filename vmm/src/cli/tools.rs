//! `ironvmm tools [--json]`: the catalog of the services compiled into ironvmm.

use crate::services::{builtin_catalog_json, builtin_specs};

#[derive(clap::Args, Debug)]
pub struct ToolsArgs {
    /// Print the catalog in the `--catalog` file format of the policy CLI.
    #[arg(long)]
    json: bool,
}

pub fn run(args: ToolsArgs) -> u8 {
    let text = if args.json {
        let mut s = serde_json::to_string_pretty(&builtin_catalog_json()).unwrap_or_default();
        s.push('\n');
        s
    } else {
        let specs = builtin_specs();
        let width = specs.iter().map(|s| s.name.len()).max().unwrap_or(0);
        let mut s = String::new();
        for spec in &specs {
            s.push_str(&format!("{:<width$}  {}\n", spec.name, spec.description));
        }
        s
    };
    super::output::write_all(text.as_bytes());
    0
}
