//! Every LLM exchange of a run, one JSON object per line, in a file next to the
//! artifacts: the step, whether it came from the cache, each HTTP attempt, the
//! request's messages and the answer. Headers are never logged, and any occurrence of
//! the API key in text is masked, so the log can be shared.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::config::Secret;

pub struct ExchangeLog {
    path: PathBuf,
    out: Option<BufWriter<File>>,
    secret: Option<Secret>,
}

impl ExchangeLog {
    /// Starts a fresh log for this run (an earlier run's log is replaced).
    pub fn create(path: &Path, secret: Option<Secret>) -> std::io::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        Ok(Self {
            path: path.to_path_buf(),
            out: Some(BufWriter::new(File::create(path)?)),
            secret,
        })
    }

    /// A log that records nothing (library users who do not want a file).
    pub fn disabled() -> Self {
        Self {
            path: PathBuf::new(),
            out: None,
            secret: None,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn record(&mut self, entry: &Value) -> std::io::Result<()> {
        let Some(out) = self.out.as_mut() else {
            return Ok(());
        };
        let mut line = entry.to_string();
        if let Some(s) = &self.secret {
            if !s.expose().is_empty() {
                line = line.replace(s.expose(), "<redacted>");
            }
        }
        out.write_all(line.as_bytes())?;
        out.write_all(b"\n")?;
        out.flush()
    }
}
