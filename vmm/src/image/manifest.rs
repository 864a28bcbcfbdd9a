//! `manifest.json`: what the image asks of the VMM and of ironinit (docs/image.md,
//! "manifest.json"). Parsing is strict: unknown keys, duplicate keys and a
//! `format` other than 1 are errors, so an image never means two things.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

/// The only manifest format this ironvmm understands.
pub const FORMAT: u64 = 1;
/// A manifest bigger than this is not a manifest.
pub const MAX_MANIFEST_BYTES: u64 = 1 << 20;
/// `--cpus` range (issue 3: 1 to 8 vCPUs).
pub const MAX_CPUS: u32 = 8;
/// Smallest and largest guest memory accepted, in MiB.
pub const MIN_MEM_MIB: u32 = 16;
pub const MAX_MEM_MIB: u32 = 64 * 1024;
/// The manifest's share of the kernel command line; the VMM adds its own part.
pub const MAX_CMDLINE_BYTES: usize = 1024;
pub const DEFAULT_MEM_MIB: u32 = 128;
pub const DEFAULT_CPUS: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: u64,
    /// Tar member holding the kernel.
    pub kernel: String,
    /// Tar member holding the initramfs.
    pub initramfs: String,
    /// Extra kernel command line arguments, appended after the VMM's own.
    #[serde(default)]
    pub cmdline: String,
    #[serde(default = "default_mem")]
    pub mem_mib: u32,
    #[serde(default = "default_cpus")]
    pub cpus: u32,
    pub agent: Agent,
    /// Whether the guest runs iron's HTTP proxy (network egress on port 2).
    #[serde(default)]
    pub proxy: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Agent {
    /// argv of the agent; `cmd[0]` is looked up in the agent's PATH.
    pub cmd: Vec<String>,
    #[serde(default, deserialize_with = "unique_string_map")]
    pub env: BTreeMap<String, String>,
    #[serde(default = "default_cwd")]
    pub cwd: String,
}

fn default_mem() -> u32 {
    DEFAULT_MEM_MIB
}
fn default_cpus() -> u32 {
    DEFAULT_CPUS
}
fn default_cwd() -> String {
    "/".to_string()
}

/// What is wrong with a manifest; the message names the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest.json is not valid JSON: {0}")]
    Json(String),
    #[error("manifest.json has no \"format\" key")]
    NoFormat,
    #[error("manifest.json has format {0}; this ironvmm reads only format {FORMAT}")]
    WrongFormat(String),
    #[error("manifest.json: {0}")]
    Invalid(String),
}

impl Manifest {
    /// A manifest for `cmd` with every other field at its default.
    pub fn new(cmd: Vec<String>) -> Manifest {
        Manifest {
            format: FORMAT,
            kernel: "vmlinux".into(),
            initramfs: "initramfs.cpio".into(),
            cmdline: String::new(),
            mem_mib: DEFAULT_MEM_MIB,
            cpus: DEFAULT_CPUS,
            agent: Agent {
                cmd,
                env: BTreeMap::new(),
                cwd: default_cwd(),
            },
            proxy: false,
        }
    }

    /// Parses and validates. The format is checked before anything else, so a
    /// newer manifest is reported as such rather than as a list of unknown keys.
    pub fn from_json(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        if bytes.len() as u64 > MAX_MANIFEST_BYTES {
            return Err(ManifestError::Invalid(format!(
                "{} bytes, over the {MAX_MANIFEST_BYTES}-byte limit",
                bytes.len()
            )));
        }
        let value: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| ManifestError::Json(e.to_string()))?;
        let obj = value
            .as_object()
            .ok_or_else(|| ManifestError::Invalid("the top level is not a JSON object".into()))?;
        match obj.get("format") {
            None => return Err(ManifestError::NoFormat),
            Some(f) if f.as_u64() == Some(FORMAT) => {}
            Some(f) => return Err(ManifestError::WrongFormat(f.to_string())),
        }
        // Parse the bytes again rather than the Value: the Value has already
        // merged duplicate keys, the derived deserializer rejects them.
        let de = &mut serde_json::Deserializer::from_slice(bytes);
        let m: Manifest = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            if path == "." {
                ManifestError::Invalid(inner.to_string())
            } else {
                ManifestError::Invalid(format!("\"{path}\": {inner}"))
            }
        })?;
        m.validate()?;
        Ok(m)
    }

    pub fn to_json_pretty(&self) -> String {
        serde_json::to_string_pretty(self).expect("a manifest always serializes")
    }

    /// Checks what the types alone do not.
    pub fn validate(&self) -> Result<(), ManifestError> {
        let bad = |m: String| Err(ManifestError::Invalid(m));
        if self.format != FORMAT {
            return Err(ManifestError::WrongFormat(self.format.to_string()));
        }
        for (key, name) in [("kernel", &self.kernel), ("initramfs", &self.initramfs)] {
            check_member_name(name).map_err(|why| {
                ManifestError::Invalid(format!("\"{key}\": member name {name:?} {why}"))
            })?;
        }
        if self.kernel == self.initramfs {
            return bad("\"kernel\" and \"initramfs\" name the same member".into());
        }
        if self.cmdline.len() > MAX_CMDLINE_BYTES {
            return bad(format!(
                "\"cmdline\" is {} bytes, over the {MAX_CMDLINE_BYTES}-byte limit",
                self.cmdline.len()
            ));
        }
        if self.cmdline.chars().any(|c| c.is_control()) {
            return bad("\"cmdline\" contains a control character".into());
        }
        if !(MIN_MEM_MIB..=MAX_MEM_MIB).contains(&self.mem_mib) {
            return bad(format!(
                "\"mem_mib\" is {}, outside {MIN_MEM_MIB}..={MAX_MEM_MIB}",
                self.mem_mib
            ));
        }
        if !(1..=MAX_CPUS).contains(&self.cpus) {
            return bad(format!("\"cpus\" is {}, outside 1..={MAX_CPUS}", self.cpus));
        }
        let agent = &self.agent;
        if agent.cmd.is_empty() || agent.cmd[0].is_empty() {
            return bad("\"agent.cmd\" is empty".into());
        }
        if let Some(i) = agent.cmd.iter().position(|a| a.contains('\0')) {
            return bad(format!("\"agent.cmd[{i}]\" contains a NUL byte"));
        }
        for (k, v) in &agent.env {
            if k.is_empty() || k.contains('=') || k.contains('\0') {
                return bad(format!("\"agent.env\" has an invalid variable name {k:?}"));
            }
            if v.contains('\0') {
                return bad(format!("\"agent.env.{k}\" contains a NUL byte"));
            }
        }
        if !agent.cwd.starts_with('/') || agent.cwd.contains('\0') {
            return bad(format!(
                "\"agent.cwd\" must be an absolute path, not {:?}",
                agent.cwd
            ));
        }
        Ok(())
    }
}

/// A tar member name the image may use: one plain file name.
fn check_member_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("is empty");
    }
    if name.len() > 100 {
        return Err("is longer than 100 bytes");
    }
    if name.contains('/') || name == "." || name == ".." {
        return Err("is not a plain file name");
    }
    if name.chars().any(|c| c.is_control()) {
        return Err("contains a control character");
    }
    if name == "manifest.json" {
        return Err("is reserved for the manifest");
    }
    Ok(())
}

/// A string-to-string map that rejects duplicate keys (serde's maps keep the last).
fn unique_string_map<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<BTreeMap<String, String>, D::Error> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = BTreeMap<String, String>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("an object of strings")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut out = BTreeMap::new();
            while let Some((k, v)) = map.next_entry::<String, String>()? {
                if out.contains_key(&k) {
                    return Err(serde::de::Error::custom(format_args!(
                        "duplicate variable {k:?} in \"agent.env\""
                    )));
                }
                out.insert(k, v);
            }
            Ok(out)
        }
    }
    d.deserialize_map(V)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let mut m = Manifest::new(vec!["sh".into(), "-c".into(), "echo hi".into()]);
        m.agent.env.insert("K".into(), "V".into());
        m.cmdline = "quiet".into();
        let back = Manifest::from_json(m.to_json_pretty().as_bytes()).unwrap();
        assert_eq!(back, m);
    }
}
