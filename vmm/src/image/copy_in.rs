//! `--copy-in SRC[:GUESTPATH]`: a snapshot of host files packed as a second newc
//! archive, which the VMM appends to the image's initramfs. The kernel unpacks
//! both, so the files appear in the guest's RAM-backed root at boot.

use std::path::PathBuf;

use super::tree::Tree;
use super::{BuildError, DEFAULT_COPY_IN_PATH};

/// One `--copy-in` argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyIn {
    pub src: PathBuf,
    /// Absolute guest path. A directory's contents land in it; a file lands at it.
    pub dst: String,
}

impl CopyIn {
    /// Parses `SRC[:GUESTPATH]`. The split is at the last `:` followed by `/`, so
    /// host paths containing `:` still work when no guest path is given.
    /// Without GUESTPATH a directory goes to `/work` and a file to `/work/NAME`.
    pub fn parse(arg: &str) -> Result<CopyIn, BuildError> {
        let (src, dst) = match arg.rsplit_once(':') {
            Some((s, d)) if d.starts_with('/') && !s.is_empty() => (s, Some(d)),
            _ => (arg, None),
        };
        if src.is_empty() {
            return Err(BuildError::Invalid(format!(
                "--copy-in {arg:?}: no source path"
            )));
        }
        let src = PathBuf::from(src);
        let dst = match dst {
            Some(d) => d.to_string(),
            None if src.is_dir() => DEFAULT_COPY_IN_PATH.to_string(),
            None => {
                let name = src.file_name().ok_or_else(|| {
                    BuildError::Invalid(format!("--copy-in {arg:?}: source has no file name"))
                })?;
                format!("{DEFAULT_COPY_IN_PATH}/{}", name.to_string_lossy())
            }
        };
        super::tree::guest_key(&dst)?;
        Ok(CopyIn { src, dst })
    }
}

/// Packs the snapshot. Fails, before reading any file, when the archive would
/// exceed `max_bytes` (the VMM passes half of guest memory).
pub fn copy_in_cpio(items: &[CopyIn], max_bytes: u64) -> Result<Vec<u8>, BuildError> {
    let mut tree = Tree::new();
    for item in items {
        tree.add_host(&item.src, &item.dst)?;
    }
    check_size(&tree, max_bytes, items)?;
    let out = tree.to_cpio(None)?;
    if out.len() as u64 > max_bytes {
        return Err(too_big(out.len() as u64, max_bytes, items));
    }
    Ok(out)
}

fn check_size(tree: &Tree, max_bytes: u64, items: &[CopyIn]) -> Result<(), BuildError> {
    let est = tree.estimated_cpio_bytes();
    if est > max_bytes {
        return Err(too_big(est, max_bytes, items));
    }
    Ok(())
}

fn too_big(size: u64, max: u64, items: &[CopyIn]) -> BuildError {
    let srcs: Vec<_> = items.iter().map(|i| i.src.display().to_string()).collect();
    BuildError::Invalid(format!(
        "--copy-in {} needs {} MiB of guest RAM, over the {} MiB allowed (half of --mem); \
         raise --mem or copy in less",
        srcs.join(", "),
        size.div_ceil(1 << 20),
        max >> 20
    ))
}
