//! `image build --rootfs DIR|TAR`: a user's root file system as a [`Tree`].
//! A directory is read like `--add DIR:/`; a tar (plain or gzip) is read entry by
//! entry with strict rules, because an archive from elsewhere may be hostile:
//! no absolute or `..` paths, no device nodes or FIFOs, hard links only to files
//! earlier in the same archive, and a size cap checked while unpacking (so a
//! gzip bomb stops at the cap, not when memory runs out).

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use tar::EntryType;

use super::tree::Tree;
use super::BuildError;

/// What each tar entry costs beyond its data: its header block.
const ENTRY_OVERHEAD: u64 = 512;

/// Reads the root file system at `src`: a directory, a `.tar` or a gzip'd tar
/// (told apart by content, not by name). `max_bytes` bounds the unpacked size.
pub fn rootfs_tree(src: &Path, max_bytes: u64) -> Result<Tree, BuildError> {
    let meta = std::fs::metadata(src).map_err(|e| BuildError::io(src, e))?;
    let mut tree = Tree::new();
    if meta.is_dir() {
        // The root itself may be a symlink to the folder (the tree keeps links as links).
        let real = std::fs::canonicalize(src).map_err(|e| BuildError::io(src, e))?;
        tree.add_host(&real, "/")?;
        return Ok(tree);
    }
    if !meta.is_file() {
        return Err(invalid(
            src,
            "is neither a directory nor a tar archive".into(),
        ));
    }
    let mut f = BufReader::new(File::open(src).map_err(|e| BuildError::io(src, e))?);
    let mut magic = [0u8; 2];
    let n = f.read(&mut magic).map_err(|e| BuildError::io(src, e))?;
    let f = std::io::Cursor::new(magic[..n].to_vec()).chain(f);
    if magic[..n] == [0x1f, 0x8b] {
        read_tar(flate2::read::GzDecoder::new(f), src, max_bytes, &mut tree)?;
    } else {
        read_tar(f, src, max_bytes, &mut tree)?;
    }
    Ok(tree)
}

fn invalid(src: &Path, why: String) -> BuildError {
    BuildError::Invalid(format!("--rootfs {}: {why}", src.display()))
}

/// A tar entry name as an absolute guest path; `None` for the root itself.
fn guest_path(raw: &[u8]) -> Result<Option<String>, String> {
    let name = std::str::from_utf8(raw).map_err(|_| "its name is not UTF-8".to_string())?;
    if name.starts_with('/') {
        return Err("its path is absolute (only paths relative to the root are taken)".into());
    }
    let mut parts = Vec::new();
    for c in name.split('/') {
        match c {
            "" | "." => {}
            ".." => return Err("its path contains \"..\" (it would escape the root)".into()),
            c if c.contains('\0') => return Err("its name contains NUL".into()),
            c => parts.push(c),
        }
    }
    Ok((!parts.is_empty()).then(|| format!("/{}", parts.join("/"))))
}

fn read_tar<R: Read>(r: R, src: &Path, max_bytes: u64, tree: &mut Tree) -> Result<(), BuildError> {
    let mut ar = tar::Archive::new(r);
    let io = |e| BuildError::io(src, e);
    let mut used: u64 = 0;
    // Regular files seen so far, so a hard link can only name one of them.
    let mut files: HashMap<String, u32> = HashMap::new();
    for entry in ar.entries().map_err(io)? {
        let mut entry = entry.map_err(|e| invalid(src, format!("reading the archive: {e}")))?;
        // A pax global header (git archive writes one) is metadata, not a file.
        if entry.header().entry_type() == EntryType::XGlobalHeader {
            continue;
        }
        let raw = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw).into_owned();
        let bad = |why: String| invalid(src, format!("entry {shown:?}: {why}"));
        let path = guest_path(&raw).map_err(bad)?;
        let perm = entry.header().mode().map_err(|e| bad(e.to_string()))? & 0o7777;
        used = used.saturating_add(ENTRY_OVERHEAD + raw.len() as u64);
        let kind = entry.header().entry_type();
        let Some(path) = path else {
            if kind.is_dir() {
                continue;
            }
            return Err(bad("the root must be a directory".into()));
        };
        let over = || {
            bad(format!(
                "the archive unpacks to more than {} MiB, the most this image may hold \
                 (half of --mem); raise --mem or make the root file system smaller",
                max_bytes >> 20
            ))
        };
        if used > max_bytes {
            return Err(over());
        }
        let added = match kind {
            EntryType::Directory => tree.add_dir(&path, perm),
            EntryType::Regular | EntryType::Continuous => {
                let left = max_bytes - used;
                let mut data = Vec::new();
                (&mut entry)
                    .take(left + 1)
                    .read_to_end(&mut data)
                    .map_err(|e| bad(format!("reading its data: {e}")))?;
                used += data.len() as u64;
                if used > max_bytes {
                    return Err(over());
                }
                files.insert(path.clone(), perm);
                tree.add_bytes(&path, perm, data)
            }
            EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| bad("a symlink without a target".into()))?;
                let target = std::str::from_utf8(&target)
                    .map_err(|_| bad("its symlink target is not UTF-8".into()))?
                    .to_string();
                if target.is_empty() || target.contains('\0') {
                    return Err(bad("its symlink target is empty or contains NUL".into()));
                }
                used += target.len() as u64;
                tree.add_symlink(&path, &target)
            }
            EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| bad("a hard link without a target".into()))?;
                let tshown = String::from_utf8_lossy(&target).into_owned();
                let tpath = guest_path(&target)
                    .map_err(|why| bad(format!("hard link target {tshown:?}: {why}")))?
                    .filter(|t| files.contains_key(t))
                    .ok_or_else(|| {
                        bad(format!(
                            "hard link to {tshown:?}, which is not a file earlier in the archive"
                        ))
                    })?;
                // The cpio gets its own copy of the bytes, so it counts again.
                let data = tree
                    .file_bytes(&tpath)
                    .ok_or_else(|| {
                        bad(format!(
                            "hard link to {tshown:?}, which is no longer a file in the archive"
                        ))
                    })?
                    .to_vec();
                used += data.len() as u64;
                if used > max_bytes {
                    return Err(over());
                }
                files.insert(path.clone(), perm);
                tree.add_bytes(&path, files[&tpath], data)
            }
            EntryType::Char | EntryType::Block => {
                return Err(bad(
                    "is a device node; an image gets only files, directories and links \
                     (the guest kernel provides /dev)"
                        .into(),
                ))
            }
            EntryType::Fifo => {
                return Err(bad(
                    "is a FIFO; an image gets only files, directories and links".into(),
                ))
            }
            other => {
                return Err(bad(format!(
                    "has the unsupported tar type {other:?}; an image gets only files, \
                     directories and links"
                )))
            }
        };
        added.map_err(|e| bad(e.to_string()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::guest_path;

    #[test]
    fn entry_names() {
        assert_eq!(guest_path(b"./a/b").unwrap().as_deref(), Some("/a/b"));
        assert_eq!(guest_path(b"a//b/").unwrap().as_deref(), Some("/a/b"));
        assert_eq!(guest_path(b"./").unwrap(), None);
        assert!(guest_path(b"/etc/passwd").unwrap_err().contains("absolute"));
        assert!(guest_path(b"a/../../x").unwrap_err().contains(".."));
        assert!(guest_path(b"\xff").unwrap_err().contains("UTF-8"));
    }
}
