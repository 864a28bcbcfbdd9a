//! The per-VM audit key: 32 random bytes that key the log's HMAC chain.
//!
//! It lives in its own file (64 hex digits, mode 0600), by default `<log>.key`
//! beside the log; an existing private key file is reused. The gate refuses a key inside the workspace (gate/setup.rs), and
//! the fs service refuses it by identity: the guest can neither read it nor replace it.

use std::fmt;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Bytes of key material.
pub const KEY_LEN: usize = 32;

/// A key file is 64 hex digits and a newline; anything much bigger is not one.
const MAX_KEY_FILE: u64 = 1024;

#[derive(Clone, PartialEq, Eq)]
pub struct AuditKey([u8; KEY_LEN]);

impl fmt::Debug for AuditKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AuditKey([redacted])")
    }
}

/// Why a key could not be made, written or read; the message names the file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("audit key {path}: {message}")]
    Io { path: String, message: String },
    #[error("audit key {path}: not an audit key ({why})")]
    Invalid { path: String, why: String },
    #[error("no random bytes for an audit key: {0}")]
    Random(String),
}

/// `<log>.key`: where the key of a log is kept unless told otherwise.
pub fn default_key_path(log: &Path) -> PathBuf {
    let mut name = log.as_os_str().to_os_string();
    name.push(".key");
    PathBuf::from(name)
}

impl AuditKey {
    /// A fresh key from the kernel's random source.
    pub fn generate() -> Result<AuditKey, KeyError> {
        let mut k = [0u8; KEY_LEN];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut k))
            .map_err(|e| KeyError::Random(e.to_string()))?;
        Ok(AuditKey(k))
    }

    /// A key from known bytes (tests, and tools that keep keys elsewhere).
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> AuditKey {
        AuditKey(bytes)
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        &self.0
    }

    /// Generates a key and writes it to a new file `path` (mode 0600; an existing
    /// file is never reused: one key belongs to one log).
    pub fn create_file(path: &Path) -> Result<AuditKey, KeyError> {
        let key = AuditKey::generate()?;
        let io = |e: std::io::Error| KeyError::Io {
            path: path.display().to_string(),
            message: e.to_string(),
        };
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(io)?;
        let mut text = hex::encode(key.0);
        text.push('\n');
        f.write_all(text.as_bytes()).map_err(io)?;
        f.sync_all().map_err(io)?;
        Ok(key)
    }

    /// The key in `path`, created when the file does not exist yet. An existing key
    /// must be private to its owner (no group or other permission bits): whoever can
    /// read it can forge the log.
    pub fn open_or_create(path: &Path) -> Result<AuditKey, KeyError> {
        use std::os::unix::fs::PermissionsExt;
        match AuditKey::create_file(path) {
            Err(KeyError::Io { .. }) if path.exists() => {
                let mode = std::fs::metadata(path)
                    .map(|m| m.permissions().mode())
                    .unwrap_or(0o777);
                if mode & 0o077 != 0 {
                    return Err(KeyError::Invalid {
                        path: path.display().to_string(),
                        why: format!("mode {:o}: others may read it (chmod 600)", mode & 0o777),
                    });
                }
                AuditKey::load(path)
            }
            r => r,
        }
    }

    /// Reads a key file written by `create_file`.
    pub fn load(path: &Path) -> Result<AuditKey, KeyError> {
        let p = path.display().to_string();
        let io = |e: std::io::Error| KeyError::Io {
            path: p.clone(),
            message: e.to_string(),
        };
        let f = std::fs::File::open(path).map_err(io)?;
        let mut text = String::new();
        f.take(MAX_KEY_FILE)
            .read_to_string(&mut text)
            .map_err(|e| KeyError::Invalid {
                path: p.clone(),
                why: e.to_string(),
            })?;
        let hexs = text.trim_end_matches('\n');
        let mut k = [0u8; KEY_LEN];
        hex::decode_to_slice(hexs, &mut k).map_err(|_| KeyError::Invalid {
            path: p.clone(),
            why: format!("expected {} hex digits", KEY_LEN * 2),
        })?;
        Ok(AuditKey(k))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_junk() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.key");
        let k = AuditKey::create_file(&p).unwrap();
        assert_eq!(AuditKey::load(&p).unwrap(), k);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&p).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(
            AuditKey::create_file(&p).is_err(),
            "create_file never overwrites"
        );
        assert_eq!(AuditKey::open_or_create(&p).unwrap(), k, "reused");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            AuditKey::open_or_create(&p),
            Err(KeyError::Invalid { .. })
        ));
        std::fs::write(&p, "not hex\n").unwrap();
        assert!(matches!(AuditKey::load(&p), Err(KeyError::Invalid { .. })));
        assert!(format!("{k:?}").contains("redacted"));
    }
}
