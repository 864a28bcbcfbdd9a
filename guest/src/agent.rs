//! ironinit's view of the manifest: what to run, with which environment, where.
//! The VMM has validated the manifest already; this re-checks only what ironinit
//! relies on, so a bad copy fails with a message rather than a panic.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::proxy::PROXY_URL;

/// The agent's command line, environment and working directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentSpec {
    pub cmd: Vec<String>,
    /// The complete environment, defaults included, sorted by name.
    pub env: BTreeMap<String, String>,
    pub cwd: String,
    /// The manifest's `proxy`: ironinit starts `iron proxy` before the agent.
    pub proxy: bool,
}

/// PATH as busybox's applet links are laid out.
pub const DEFAULT_PATH: &str = "/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Parses the manifest copy. `term` is ironinit's own `TERM` (the kernel passes
/// `TERM=linux`); the manifest's `agent.env` overrides every default.
pub fn parse_agent(manifest: &[u8], term: Option<&str>) -> Result<AgentSpec, String> {
    let v: Value =
        serde_json::from_slice(manifest).map_err(|e| format!("manifest is not JSON: {e}"))?;
    if v.get("format").and_then(Value::as_u64) != Some(1) {
        return Err("manifest \"format\" is not 1".into());
    }
    let agent = v
        .get("agent")
        .and_then(Value::as_object)
        .ok_or("manifest has no \"agent\" object")?;
    let cmd = agent
        .get("cmd")
        .and_then(Value::as_array)
        .ok_or("manifest has no \"agent.cmd\" list")?;
    let cmd: Vec<String> = cmd
        .iter()
        .map(|a| a.as_str().map(str::to_string))
        .collect::<Option<_>>()
        .ok_or("\"agent.cmd\" holds a value that is not a string")?;
    if cmd.is_empty() || cmd[0].is_empty() {
        return Err("\"agent.cmd\" is empty".into());
    }
    if cmd.iter().any(|a| a.contains('\0')) {
        return Err("\"agent.cmd\" contains a NUL byte".into());
    }
    let proxy = match v.get("proxy") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(other) => return Err(format!("\"proxy\" is not true or false: {other}")),
    };
    let mut env = BTreeMap::new();
    if proxy {
        // Both spellings: curl reads the lower-case ones, many tools the upper.
        for k in ["HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"] {
            env.insert(k.to_string(), PROXY_URL.to_string());
        }
    }
    env.insert("PATH".to_string(), DEFAULT_PATH.to_string());
    env.insert("HOME".to_string(), "/root".to_string());
    env.insert("TERM".to_string(), term.unwrap_or("linux").to_string());
    match agent.get("env") {
        None | Some(Value::Null) => {}
        Some(Value::Object(m)) => {
            for (k, val) in m {
                let val = val
                    .as_str()
                    .ok_or_else(|| format!("\"agent.env.{k}\" is not a string"))?;
                if k.is_empty() || k.contains('=') || k.contains('\0') || val.contains('\0') {
                    return Err(format!("\"agent.env\" has an invalid entry {k:?}"));
                }
                env.insert(k.clone(), val.to_string());
            }
        }
        Some(_) => return Err("\"agent.env\" is not an object".into()),
    }
    let cwd = match agent.get("cwd") {
        None | Some(Value::Null) => "/".to_string(),
        Some(Value::String(s)) if s.starts_with('/') && !s.contains('\0') => s.clone(),
        Some(other) => return Err(format!("\"agent.cwd\" is not an absolute path: {other}")),
    };
    Ok(AgentSpec {
        cmd,
        env,
        cwd,
        proxy,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_overrides() {
        let m = br#"{"format":1,"kernel":"vmlinux","initramfs":"initramfs.cpio",
            "agent":{"cmd":["sh","-c","echo hi"],"env":{"PATH":"/bin","K":"V"},"cwd":"/work"}}"#;
        let a = parse_agent(m, Some("vt100")).unwrap();
        assert_eq!(a.cmd, ["sh", "-c", "echo hi"]);
        assert_eq!(a.env["PATH"], "/bin");
        assert_eq!(a.env["K"], "V");
        assert_eq!(a.env["TERM"], "vt100");
        assert_eq!(a.env["HOME"], "/root");
        assert_eq!(a.cwd, "/work");
    }

    #[test]
    fn missing_env_and_cwd_default() {
        let m = br#"{"format":1,"agent":{"cmd":["true"]}}"#;
        let a = parse_agent(m, None).unwrap();
        assert_eq!(a.cwd, "/");
        assert_eq!(a.env["PATH"], DEFAULT_PATH);
        assert_eq!(a.env["TERM"], "linux");
    }

    #[test]
    fn the_proxy_sets_the_proxy_variables_unless_agent_env_does() {
        let m = br#"{"format":1,"agent":{"cmd":["true"],"env":{"https_proxy":"x"}},"proxy":true}"#;
        let a = parse_agent(m, None).unwrap();
        assert!(a.proxy);
        assert_eq!(a.env["HTTP_PROXY"], PROXY_URL);
        assert_eq!(a.env["http_proxy"], PROXY_URL);
        assert_eq!(a.env["https_proxy"], "x");
        let a = parse_agent(br#"{"format":1,"agent":{"cmd":["true"]}}"#, None).unwrap();
        assert!(!a.proxy && !a.env.contains_key("HTTP_PROXY"));
    }

    #[test]
    fn bad_manifests_name_the_problem() {
        let cases: [(&[u8], &str); 7] = [
            (
                br#"{"format":1,"agent":{"cmd":["x"]},"proxy":"yes"}"#,
                "proxy",
            ),
            (b"not json", "not JSON"),
            (br#"{"format":2,"agent":{"cmd":["x"]}}"#, "format"),
            (br#"{"format":1}"#, "no \"agent\""),
            (br#"{"format":1,"agent":{"cmd":[]}}"#, "empty"),
            (br#"{"format":1,"agent":{"cmd":["x",1]}}"#, "not a string"),
            (
                br#"{"format":1,"agent":{"cmd":["x"],"cwd":"rel"}}"#,
                "absolute",
            ),
        ];
        for (m, want) in cases {
            let e = parse_agent(m, None).unwrap_err();
            assert!(e.contains(want), "{e:?} should mention {want:?}");
        }
    }
}
