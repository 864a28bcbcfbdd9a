//! The file tree that becomes an initramfs: guest paths mapped to host files,
//! in-memory bytes, symlinks and device nodes. It creates parent directories,
//! refuses type conflicts, and writes a cpio with every directory before its
//! children (the kernel does not create missing parents while unpacking).

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::cpio::{self, Kind};
use super::BuildError;

/// Where a file's bytes come from.
#[derive(Debug, Clone)]
enum Source {
    Bytes(Vec<u8>),
    Host { path: PathBuf, size: u64 },
}

#[derive(Debug, Clone)]
enum Node {
    Dir,
    File(Source),
    Symlink(Vec<u8>),
    CharDev { major: u32, minor: u32 },
}

/// Path components; the ordering of `Vec` puts a directory before its children.
type Key = Vec<Vec<u8>>;

/// Permission bits, modification time and content of one entry.
#[derive(Debug, Clone)]
struct Item {
    perm: u32,
    mtime: u32,
    node: Node,
}

#[derive(Debug, Default, Clone)]
pub struct Tree {
    nodes: BTreeMap<Key, Item>,
}

/// Splits an absolute guest path into components, refusing `..`.
pub fn guest_key(path: &str) -> Result<Key, BuildError> {
    if !path.starts_with('/') {
        return Err(BuildError::Invalid(format!(
            "guest path {path:?} is not absolute"
        )));
    }
    if path.contains('\0') {
        return Err(BuildError::Invalid(format!(
            "guest path {path:?} contains NUL"
        )));
    }
    let mut key = Vec::new();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                return Err(BuildError::Invalid(format!(
                    "guest path {path:?} contains \"..\""
                )))
            }
            c => key.push(c.as_bytes().to_vec()),
        }
    }
    Ok(key)
}

fn show(key: &[Vec<u8>]) -> String {
    let mut s = String::new();
    for c in key {
        s.push('/');
        s.push_str(&String::from_utf8_lossy(c));
    }
    if s.is_empty() {
        s.push('/');
    }
    s
}

impl Tree {
    pub fn new() -> Tree {
        Tree::default()
    }

    pub fn contains(&self, path: &str) -> bool {
        guest_key(path).is_ok_and(|k| self.nodes.contains_key(&k))
    }

    /// Guest paths of all entries, parents first.
    pub fn paths(&self) -> Vec<String> {
        self.nodes.keys().map(|k| show(k)).collect()
    }

    /// Number of entries, not counting the root.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// An upper bound of the cpio size, to refuse a too-large tree before reading it.
    pub fn estimated_cpio_bytes(&self) -> u64 {
        let mut total = cpio::BLOCK as u64 * 2;
        for (key, item) in &self.nodes {
            let name: usize = key.iter().map(|c| c.len() + 1).sum();
            total += (cpio::HEADER_LEN + name + 8) as u64;
            total += match &item.node {
                Node::File(Source::Bytes(b)) => b.len() as u64 + 3,
                Node::File(Source::Host { size, .. }) => size + 3,
                Node::Symlink(t) => t.len() as u64 + 3,
                _ => 0,
            };
        }
        total
    }

    /// The bytes of an in-memory file at `path` (a tar hard link copies them).
    pub fn file_bytes(&self, path: &str) -> Option<&[u8]> {
        match &self.nodes.get(&guest_key(path).ok()?)?.node {
            Node::File(Source::Bytes(b)) => Some(b),
            _ => None,
        }
    }

    pub fn add_dir(&mut self, path: &str, perm: u32) -> Result<(), BuildError> {
        self.insert(guest_key(path)?, perm, 0, Node::Dir)
    }

    pub fn add_bytes(&mut self, path: &str, perm: u32, data: Vec<u8>) -> Result<(), BuildError> {
        self.insert(guest_key(path)?, perm, 0, Node::File(Source::Bytes(data)))
    }

    pub fn add_symlink(&mut self, path: &str, target: &str) -> Result<(), BuildError> {
        let target = Node::Symlink(target.as_bytes().to_vec());
        self.insert(guest_key(path)?, 0o777, 0, target)
    }

    pub fn add_char_dev(
        &mut self,
        path: &str,
        perm: u32,
        major: u32,
        minor: u32,
    ) -> Result<(), BuildError> {
        self.insert(guest_key(path)?, perm, 0, Node::CharDev { major, minor })
    }

    /// Adds a host file, or a directory with everything beneath it, at `guest`.
    /// Symlinks are kept as symlinks (never followed, so a link cannot pull a host
    /// file into the guest); sockets, FIFOs and devices are refused.
    pub fn add_host(&mut self, host: &Path, guest: &str) -> Result<(), BuildError> {
        let key = guest_key(guest)?;
        self.add_host_at(host, key)
    }

    fn add_host_at(&mut self, host: &Path, key: Key) -> Result<(), BuildError> {
        let io = |e| BuildError::io(host, e);
        let meta = fs::symlink_metadata(host).map_err(io)?;
        let perm = meta.mode() & 0o7777;
        let mtime = meta.mtime().clamp(0, u32::MAX as i64) as u32;
        let ft = meta.file_type();
        if ft.is_dir() {
            self.insert(key.clone(), perm, mtime, Node::Dir)?;
            let mut children: Vec<_> = fs::read_dir(host)
                .map_err(io)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(io)?;
            children.sort_by_key(|e| e.file_name());
            for child in children {
                let mut k = key.clone();
                k.push(child.file_name().as_bytes().to_vec());
                self.add_host_at(&child.path(), k)?;
            }
            Ok(())
        } else if ft.is_file() {
            let src = Source::Host {
                path: host.to_path_buf(),
                size: meta.len(),
            };
            self.insert(key, perm, mtime, Node::File(src))
        } else if ft.is_symlink() {
            let target = fs::read_link(host).map_err(io)?;
            let node = Node::Symlink(target.as_os_str().as_bytes().to_vec());
            self.insert(key, 0o777, mtime, node)
        } else {
            let what = if ft.is_socket() {
                "a socket"
            } else if ft.is_fifo() {
                "a FIFO"
            } else {
                "a device node"
            };
            Err(BuildError::Invalid(format!(
                "{}: is {what}; only files, directories and symlinks can go into an image",
                host.display()
            )))
        }
    }

    /// Adds every entry of `other`, parents first, with the same conflict rules.
    pub fn merge(&mut self, other: Tree) -> Result<(), BuildError> {
        for (key, item) in other.nodes {
            self.insert(key, item.perm, item.mtime, item.node)?;
        }
        Ok(())
    }

    fn insert(&mut self, key: Key, perm: u32, mtime: u32, node: Node) -> Result<(), BuildError> {
        if key.is_empty() {
            return match node {
                Node::Dir => Ok(()),
                _ => Err(BuildError::Invalid(
                    "the guest root \"/\" must be a directory".into(),
                )),
            };
        }
        // Parents: create missing ones, refuse a parent that is not a directory.
        for i in 1..key.len() {
            let parent = key[..i].to_vec();
            match self.nodes.get(&parent).map(|it| &it.node) {
                None => {
                    let dir = Item {
                        perm: 0o755,
                        mtime: 0,
                        node: Node::Dir,
                    };
                    self.nodes.insert(parent, dir);
                }
                Some(Node::Dir) => {}
                Some(_) => {
                    return Err(BuildError::Invalid(format!(
                        "cannot put {} in the image: {} is not a directory",
                        show(&key),
                        show(&parent)
                    )))
                }
            }
        }
        let existing = self.nodes.get_mut(&key);
        match (existing, &node) {
            (Some(it), Node::Dir) if matches!(it.node, Node::Dir) => {
                it.perm = perm;
                it.mtime = mtime;
                Ok(())
            }
            (Some(it), _) if matches!(it.node, Node::Dir) => Err(BuildError::Invalid(format!(
                "cannot put a file at {}: a directory is already there",
                show(&key)
            ))),
            (Some(_), Node::Dir) => Err(BuildError::Invalid(format!(
                "cannot put a directory at {}: a file is already there",
                show(&key)
            ))),
            // A later file replaces an earlier one (e.g. --add over a busybox applet).
            _ => {
                self.nodes.insert(key, Item { perm, mtime, node });
                Ok(())
            }
        }
    }

    /// Writes the tree as one newc archive. `fixed_mtime` gives every entry the
    /// same time (reproducible images); `None` keeps the host files' times.
    pub fn write_cpio<W: Write>(&self, out: W, fixed_mtime: Option<u32>) -> Result<W, BuildError> {
        let mut w = cpio::Writer::new(out);
        let werr = |e| BuildError::Invalid(format!("writing the cpio archive: {e}"));
        for (key, item) in &self.nodes {
            let name = key.join(&b'/');
            let kind = match &item.node {
                Node::Dir => Kind::Dir,
                Node::File(Source::Bytes(b)) => Kind::File(b.clone()),
                Node::File(Source::Host { path, .. }) => {
                    let mut data = Vec::new();
                    fs::File::open(path)
                        .and_then(|f| f.take(u32::MAX as u64 + 1).read_to_end(&mut data))
                        .map_err(|e| BuildError::io(path, e))?;
                    Kind::File(data)
                }
                Node::Symlink(t) => Kind::Symlink(t.clone()),
                Node::CharDev { major, minor } => Kind::CharDev {
                    major: *major,
                    minor: *minor,
                },
            };
            let mtime = fixed_mtime.unwrap_or(item.mtime);
            w.entry(&name, item.perm, mtime, &kind).map_err(werr)?;
        }
        w.finish().map_err(werr)
    }

    /// The cpio archive in memory.
    pub fn to_cpio(&self, fixed_mtime: Option<u32>) -> Result<Vec<u8>, BuildError> {
        self.write_cpio(Vec::new(), fixed_mtime)
    }
}
