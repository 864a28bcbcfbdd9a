//! The `fs` service: a host directory served to the guest as `/workspace`.
//!
//! Containment is the kernel's job, not a string check: every path is opened with
//! openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS) relative to a descriptor of the
//! root, so `..` and symlinks (the final component included) cannot leave it, even
//! when the tree changes underneath. Paths are first normalised lexically exactly as
//! the policy normalises them, so the service acts on the path that was decided.
//! `fs.delete` never removes anything: it renames into a trash folder beside the root.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use base64::Engine as _;
use serde_json::{json, Map, Value};

use ironvmm_policy::norm;

use super::sys;
use super::{Lane, Service, ToolError, ToolSpec, DEFAULT_REPLY_CAP};

/// Where the root appears to the guest and to the policy: the engine's own constant.
pub const GUEST_ROOT: &str = norm::WORKSPACE;
/// Most bytes one `fs.read` or `fs.write` moves (docs/protocol.md), so frames stay < 1 MiB.
pub const MAX_IO: usize = 512 * 1024;
/// Most entries one `fs.list` returns (its `limit`, and the default); the reply
/// gives `next_offset` when more follow.
pub const MAX_LIST: usize = 1_000;
/// Most names of one directory `fs.list` reads and sorts; past it the listing says
/// `truncated` (the rest cannot be paged to).
pub const MAX_LIST_SCAN: usize = 100_000;
/// Largest file `fs.write` makes: an offset past it would make a sparse file of
/// terabytes (the write itself is at most `MAX_IO`).
pub const MAX_FILE_SIZE: u64 = 4 << 30;
/// Most components below /workspace a path may have: a deeper tree (built with
/// mkdir and move) would give host paths longer than PATH_MAX.
pub const MAX_DEPTH: usize = 64;
/// `--max-write-bytes` unless given: what `fs.write` may write per VM, all calls together.
pub const DEFAULT_MAX_WRITE_BYTES: u64 = 16 << 30;

/// The catalog entries of the fs tools.
pub fn tool_specs() -> Vec<ToolSpec> {
    // 4096: PATH_MAX; longer paths could never be opened anyway.
    let path = json!({"type": "string", "maxLength": 4096,
                      "description": "absolute under /workspace, or relative to it"});
    let obj = |props: Value, required: &[&str]| {
        json!({"type": "object", "properties": props, "required": required,
               "additionalProperties": false})
    };
    let enc = json!({"type": "string", "enum": ["utf8", "base64"]});
    vec![
        ToolSpec {
            name: "fs.read",
            description: "Read a file of the workspace, at most 512 KiB per call (use offset/length for more)",
            input_schema: obj(
                json!({"path": path, "offset": {"type": "integer", "minimum": 0},
                       "length": {"type": "integer", "minimum": 0, "maximum": MAX_IO},
                       "encoding": enc}),
                &["path"],
            ),
            roles: &[("path", "path")],
            aliases: &[],
            reply_cap: DEFAULT_REPLY_CAP,
        },
        ToolSpec {
            name: "fs.write",
            description: "Write a file of the workspace (replace, write at offset, or append), at most 512 KiB per call",
            input_schema: obj(
                json!({"path": path, "content": {"type": "string"}, "encoding": enc,
                       "offset": {"type": "integer", "minimum": 0},
                       "append": {"type": "boolean"}, "create_dirs": {"type": "boolean"}}),
                &["path", "content"],
            ),
            roles: &[("path", "path")],
            aliases: &[],
            reply_cap: DEFAULT_REPLY_CAP,
        },
        ToolSpec {
            name: "fs.list",
            description: "List a directory of the workspace, sorted by name, at most 1000 entries per call (page with offset)",
            input_schema: obj(
                json!({"path": path, "offset": {"type": "integer", "minimum": 0},
                       "limit": {"type": "integer", "minimum": 1, "maximum": MAX_LIST}}),
                &["path"],
            ),
            roles: &[("path", "path")],
            aliases: &[],
            reply_cap: DEFAULT_REPLY_CAP,
        },
        ToolSpec {
            name: "fs.stat",
            description: "Kind, size and modification time of a workspace path",
            input_schema: obj(json!({"path": path}), &["path"]),
            roles: &[("path", "path")],
            aliases: &[],
            reply_cap: DEFAULT_REPLY_CAP,
        },
        ToolSpec {
            name: "fs.mkdir",
            description: "Create a directory of the workspace, and its missing parents",
            input_schema: obj(json!({"path": path}), &["path"]),
            roles: &[("path", "path")],
            aliases: &[],
            reply_cap: DEFAULT_REPLY_CAP,
        },
        ToolSpec {
            name: "fs.move",
            description: "Move or rename a workspace path; never replaces an existing target",
            input_schema: obj(json!({"from": path, "to": path}), &["from", "to"]),
            // `tree`: a move acts on everything below the path, so a deny under a
            // folder also refuses moving any ancestor of it (policy/src/catalog.rs).
            roles: &[("from", "tree"), ("to", "tree")],
            // `path` in a condition means both ends, so a move is decided like a
            // read of one path and a write of the other.
            aliases: &[("path", &["from", "to"])],
            reply_cap: DEFAULT_REPLY_CAP,
        },
        ToolSpec {
            name: "fs.delete",
            description: "Move a workspace path to the trash folder beside the workspace (nothing is removed for good)",
            input_schema: obj(json!({"path": path}), &["path"]),
            roles: &[("path", "tree")],
            aliases: &[],
            reply_cap: DEFAULT_REPLY_CAP,
        },
    ]
}

/// A path after lexical normalisation: relative to the root, `""` for the root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestPath {
    rel: String,
}

impl GuestPath {
    /// Normalises with the policy engine's own normaliser (`ironvmm_policy::norm::path`),
    /// so the service acts on exactly the path that was decided: relative paths are
    /// taken against /workspace, `.`/`..`/`//` resolved lexically; NUL or climbing
    /// above `/` fails, and so does a path outside /workspace.
    pub fn parse(path: &str) -> Result<GuestPath, ToolError> {
        if path.contains('\0') {
            return Err(ToolError::new("invalid_path", "path contains a NUL byte"));
        }
        if path.is_empty() {
            return Err(ToolError::new("invalid_path", "path is empty"));
        }
        let Some(abs) = norm::path(path) else {
            return Err(ToolError::new(
                "invalid_path",
                format!("{path:?} climbs above /"),
            ));
        };
        if !norm::path_under(&abs, GUEST_ROOT) {
            return Err(ToolError::new(
                "outside_root",
                format!("{path:?} is not under {GUEST_ROOT}"),
            ));
        }
        let rel = abs[GUEST_ROOT.len()..].trim_start_matches('/');
        Ok(GuestPath {
            rel: rel.to_string(),
        })
    }

    pub fn is_root(&self) -> bool {
        self.rel.is_empty()
    }

    /// Components below /workspace.
    pub fn depth(&self) -> usize {
        if self.rel.is_empty() {
            0
        } else {
            self.rel.split('/').count()
        }
    }

    /// What the guest calls it (never the host path).
    pub fn display(&self) -> String {
        if self.rel.is_empty() {
            GUEST_ROOT.to_string()
        } else {
            format!("{GUEST_ROOT}/{}", self.rel)
        }
    }

    fn c_rel(&self) -> CString {
        // parse() refused NUL, so this cannot fail.
        CString::new(if self.rel.is_empty() { "." } else { &self.rel }).unwrap_or_default()
    }

    /// (parent, last component); None for the root.
    fn split(&self) -> Option<(GuestPath, CString)> {
        let (parent, name) = match self.rel.rsplit_once('/') {
            Some((p, n)) => (p.to_string(), n),
            None if !self.rel.is_empty() => (String::new(), self.rel.as_str()),
            None => return None,
        };
        Some((GuestPath { rel: parent }, CString::new(name).ok()?))
    }
}

/// The fs service over one host directory.
pub struct FsService {
    root: OwnedFd,
    trash_path: Option<PathBuf>,
    trash: Mutex<Option<OwnedFd>>,
    trash_seq: AtomicU64,
    /// (dev, inode) of files the guest may never read, write, move or delete
    /// through this service: the audit log and its key, the policy and its lists.
    protected: Vec<(u64, u64)>,
    /// (dev, inode) of every folder that holds a protected file: moving or deleting
    /// one would swap the file out from under its path.
    holders: Vec<(u64, u64)>,
    /// Bytes `fs.write` has written in this VM, and the most it may.
    written: AtomicU64,
    max_write_bytes: u64,
}

impl FsService {
    /// Opens `dir` as the root. Fails when the directory cannot be opened or the
    /// kernel lacks openat2 (Linux < 5.6): without it there is no safe containment.
    pub fn open(dir: &Path) -> io::Result<FsService> {
        let dir = dir
            .canonicalize()
            .map_err(|e| io::Error::new(e.kind(), format!("workspace {}: {e}", dir.display())))?;
        let root: OwnedFd = std::fs::File::open(&dir)
            .map_err(|e| io::Error::new(e.kind(), format!("workspace {}: {e}", dir.display())))?
            .into();
        let probe = sys::open_beneath(root.as_fd(), c".", libc::O_PATH | libc::O_DIRECTORY, 0)
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("openat2 is required to contain the workspace (Linux >= 5.6): {e}"),
                )
            })?;
        drop(probe);
        let trash_path = trash_path_for(&dir);
        Ok(FsService {
            root,
            trash_path,
            trash: Mutex::new(None),
            trash_seq: AtomicU64::new(0),
            protected: Vec::new(),
            holders: Vec::new(),
            written: AtomicU64::new(0),
            max_write_bytes: DEFAULT_MAX_WRITE_BYTES,
        })
    }

    /// `--jail`: readies the service for running as `uid`/`gid` (no supplementary
    /// groups) with the host's paths gone. Refuses a workspace that user cannot
    /// read and search; opens the trash folder now (it is reached by path), made
    /// theirs when created here. Returns warnings (a workspace they cannot write).
    pub fn ready_for_user(&mut self, uid: u32, gid: u32) -> Result<Vec<String>, String> {
        use std::os::unix::fs::MetadataExt;
        let mut warnings = Vec::new();
        let st = sys::fstat(self.root.as_fd()).map_err(|e| format!("workspace: {e}"))?;
        let (read, write) = user_access(st.st_uid, st.st_gid, st.st_mode, uid, gid);
        let who = format!(
            "the jail user {uid}:{gid} (the workspace is {}:{}, mode {:o})",
            st.st_uid,
            st.st_gid,
            st.st_mode & 0o7777
        );
        if !read {
            return Err(format!(
                "{who} cannot read the workspace: chown it to that user, or give --jail-user its owner"
            ));
        }
        if !write {
            warnings.push(format!(
                "{who} cannot write the workspace: fs.write, fs.mkdir, fs.move and fs.delete will fail"
            ));
        }
        let Some(path) = self.trash_path.clone() else {
            return Ok(warnings);
        };
        let created = std::fs::create_dir(&path).is_ok();
        let ready = (|| -> io::Result<OwnedFd> {
            if created {
                std::os::unix::fs::chown(&path, Some(uid), Some(gid))?;
            }
            let f = std::fs::File::open(&path)?;
            let m = f.metadata()?;
            if !user_access(m.uid(), m.gid(), m.mode(), uid, gid).1 {
                return Err(io::Error::other(format!(
                    "{uid}:{gid} cannot write it (owner {}:{}, mode {:o})",
                    m.uid(),
                    m.gid(),
                    m.mode() & 0o7777
                )));
            }
            Ok(f.into())
        })();
        match ready {
            Ok(fd) => *self.trash.lock().unwrap_or_else(|e| e.into_inner()) = Some(fd),
            Err(e) => warnings.push(format!(
                "the trash folder {}: {e}; fs.delete will fail",
                path.display()
            )),
        }
        Ok(warnings)
    }

    /// The most bytes `fs.write` may write in this VM, all calls together.
    pub fn set_max_write_bytes(&mut self, bytes: u64) {
        self.max_write_bytes = bytes;
    }

    /// Takes `n` bytes from the VM's write allowance, or refuses the write.
    fn charge_write(&self, n: u64) -> Result<(), ToolError> {
        let before = self.written.fetch_add(n, Ordering::Relaxed);
        if before.saturating_add(n) > self.max_write_bytes {
            self.written.fetch_sub(n, Ordering::Relaxed);
            return Err(ToolError::new(
                "write_limit",
                format!(
                    "this VM may write at most {} bytes in all (--max-write-bytes); {before} are written",
                    self.max_write_bytes
                ),
            ));
        }
        Ok(())
    }

    /// Refuses access to this host file (by identity, so a hard link or another
    /// spelling of the path is refused too), and moving or deleting any folder that
    /// holds it. A missing file is skipped; the folders that exist are still held.
    pub fn protect(&mut self, path: &Path) {
        use std::os::unix::fs::MetadataExt;
        if let Ok(m) = std::fs::metadata(path) {
            self.protected.push((m.dev(), m.ino()));
        }
        let abs = path.canonicalize().ok().or_else(|| {
            let parent = path.parent()?.canonicalize().ok()?;
            Some(parent.join(path.file_name()?))
        });
        for dir in abs.iter().flat_map(|a| a.ancestors().skip(1)) {
            if let Ok(m) = std::fs::metadata(dir) {
                if !self.holders.contains(&(m.dev(), m.ino())) {
                    self.holders.push((m.dev(), m.ino()));
                }
            }
        }
    }

    fn check_protected(&self, p: &GuestPath, st: &sys::Stat) -> Result<(), ToolError> {
        if self.protected.contains(&identity(st)) {
            return Err(ToolError::new(
                "protected",
                format!("{} is protected (the audit log or the policy)", p.display()),
            ));
        }
        Ok(())
    }

    /// For a move or a delete: the entry itself, or a folder holding a protected file.
    fn check_tree_protected(&self, p: &GuestPath, st: &sys::Stat) -> Result<(), ToolError> {
        self.check_protected(p, st)?;
        if self.holders.contains(&identity(st)) {
            return Err(ToolError::new(
                "protected",
                format!(
                    "{} holds a protected file (the audit log or the policy)",
                    p.display()
                ),
            ));
        }
        Ok(())
    }

    /// The host folder that `fs.delete` moves entries into.
    pub fn trash_path(&self) -> Option<&Path> {
        self.trash_path.as_deref()
    }

    fn open_at(&self, p: &GuestPath, flags: i32, mode: u32) -> Result<OwnedFd, ToolError> {
        sys::open_beneath(self.root.as_fd(), &p.c_rel(), flags, mode).map_err(|e| io_error(p, e))
    }

    fn open_dir_path(&self, p: &GuestPath) -> Result<OwnedFd, ToolError> {
        self.open_at(p, libc::O_PATH | libc::O_DIRECTORY, 0)
    }

    fn read(&self, args: &Value) -> Result<Value, ToolError> {
        let a = Args::new(args, &["path", "offset", "length", "encoding"])?;
        let p = GuestPath::parse(a.str("path")?)?;
        let offset = a.opt_u64("offset")?.unwrap_or(0);
        let length = a.opt_u64("length")?.unwrap_or(MAX_IO as u64);
        if length > MAX_IO as u64 {
            return Err(ToolError::new(
                "too_large",
                format!("length {length} is over the limit of {MAX_IO} bytes per read"),
            ));
        }
        let base64 = a.base64_encoding()?;
        let fd = self.open_at(&p, libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOCTTY, 0)?;
        let st = sys::fstat(fd.as_fd()).map_err(|e| io_error(&p, e))?;
        require_regular(&p, &st)?;
        self.check_protected(&p, &st)?;
        let size = st.st_size.max(0) as u64;
        let want = length.min(size.saturating_sub(offset)) as usize;
        let mut buf = vec![0u8; want];
        let n = sys::pread(fd.as_fd(), &mut buf, offset).map_err(|e| io_error(&p, e))?;
        buf.truncate(n);
        let (content, got) = if base64 {
            (base64::engine::general_purpose::STANDARD.encode(&buf), n)
        } else {
            match String::from_utf8(buf) {
                Ok(s) => (s, n),
                Err(e) => {
                    let u = e.utf8_error();
                    let more_follows = offset + (n as u64) < size;
                    // A range that ends inside a character: return up to it, the next
                    // range starts there.
                    if u.error_len().is_none() && more_follows && u.valid_up_to() > 0 {
                        let mut bytes = e.into_bytes();
                        bytes.truncate(u.valid_up_to());
                        let k = bytes.len();
                        (String::from_utf8(bytes).unwrap_or_default(), k)
                    } else {
                        return Err(ToolError::new(
                            "not_utf8",
                            format!(
                                "{} is not UTF-8 at byte {}; read it with encoding \"base64\"",
                                p.display(),
                                offset + u.valid_up_to() as u64
                            ),
                        ));
                    }
                }
            }
        };
        Ok(json!({
            "content": content,
            "encoding": if base64 { "base64" } else { "utf8" },
            "size": size,
            "eof": offset + got as u64 >= size,
        }))
    }

    fn write(&self, args: &Value) -> Result<Value, ToolError> {
        let a = Args::new(
            args,
            &[
                "path",
                "content",
                "encoding",
                "offset",
                "append",
                "create_dirs",
            ],
        )?;
        let p = GuestPath::parse(a.str("path")?)?;
        let content = a.str("content")?;
        let bytes: std::borrow::Cow<[u8]> = if a.base64_encoding()? {
            base64::engine::general_purpose::STANDARD
                .decode(content)
                .map_err(|e| ToolError::new("invalid_arguments", format!("content: {e}")))?
                .into()
        } else {
            content.as_bytes().into()
        };
        if bytes.len() > MAX_IO {
            return Err(ToolError::new(
                "too_large",
                format!(
                    "content is {} bytes; at most {MAX_IO} per write (write in ranges)",
                    bytes.len()
                ),
            ));
        }
        let offset = a.opt_u64("offset")?;
        let append = a.opt_bool("append")?.unwrap_or(false);
        if append && offset.is_some() {
            return Err(ToolError::new(
                "invalid_arguments",
                "give either offset or append, not both",
            ));
        }
        check_depth(&p)?;
        let end = offset.unwrap_or(0).saturating_add(bytes.len() as u64);
        if end > MAX_FILE_SIZE {
            return Err(too_big(&p));
        }
        if a.opt_bool("create_dirs")?.unwrap_or(false) {
            if let Some((parent, _)) = p.split() {
                self.mkdir_p(&parent)?;
            }
        }
        let mut flags = libc::O_WRONLY | libc::O_CREAT | libc::O_NONBLOCK | libc::O_NOCTTY;
        if append {
            flags |= libc::O_APPEND;
        }
        let fd = self.open_at(&p, flags, 0o644)?;
        let st = sys::fstat(fd.as_fd()).map_err(|e| io_error(&p, e))?;
        require_regular(&p, &st)?;
        self.check_protected(&p, &st)?;
        if append && (st.st_size.max(0) as u64).saturating_add(bytes.len() as u64) > MAX_FILE_SIZE {
            return Err(too_big(&p));
        }
        self.charge_write(bytes.len() as u64)?;
        // Truncate only after the regular-file check, never through O_TRUNC.
        if !append && offset.is_none() {
            sys::ftruncate(fd.as_fd(), 0).map_err(|e| io_error(&p, e))?;
        }
        let at = if append {
            None
        } else {
            Some(offset.unwrap_or(0))
        };
        sys::write_all_at(fd.as_fd(), &bytes, at).map_err(|e| io_error(&p, e))?;
        Ok(json!({ "written": bytes.len() }))
    }

    fn list(&self, args: &Value) -> Result<Value, ToolError> {
        let a = Args::new(args, &["path", "offset", "limit"])?;
        let p = GuestPath::parse(a.str("path")?)?;
        let offset = a.opt_u64("offset")?.unwrap_or(0);
        let limit = a.opt_u64("limit")?.unwrap_or(MAX_LIST as u64);
        if limit == 0 || limit > MAX_LIST as u64 {
            return Err(ToolError::new(
                "invalid_arguments",
                format!("limit must be from 1 to {MAX_LIST}"),
            ));
        }
        let fd = self.open_at(&p, libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
        let stat_dir = fd.try_clone().map_err(|e| io_error(&p, e))?;
        let (mut names, truncated) =
            sys::read_dir_names(fd, MAX_LIST_SCAN).map_err(|e| io_error(&p, e))?;
        names.sort();
        let total = names.len();
        let from = (offset.min(total as u64)) as usize;
        let to = from.saturating_add(limit as usize).min(total);
        let mut entries = Vec::with_capacity(to - from);
        for name in &names[from..to] {
            // An entry removed since readdir is simply skipped.
            let Ok(st) = sys::fstatat_nofollow(stat_dir.as_fd(), name) else {
                continue;
            };
            entries.push(json!({
                "name": name.to_string_lossy(),
                "kind": kind_of(&st),
                "size": st.st_size.max(0),
            }));
        }
        let mut out = Map::new();
        out.insert("entries".into(), Value::Array(entries));
        out.insert("total".into(), total.into());
        if to < total {
            out.insert("next_offset".into(), to.into());
        }
        if truncated {
            out.insert("truncated".into(), Value::Bool(true));
        }
        Ok(Value::Object(out))
    }

    fn stat(&self, args: &Value) -> Result<Value, ToolError> {
        let a = Args::new(args, &["path"])?;
        let p = GuestPath::parse(a.str("path")?)?;
        let fd = self.open_at(&p, libc::O_PATH, 0)?;
        let st = sys::fstat(fd.as_fd()).map_err(|e| io_error(&p, e))?;
        Ok(json!({
            "kind": kind_of(&st),
            "size": st.st_size.max(0),
            "modified": crate::audit::rfc3339_ns(st.st_mtime as i64, st.st_mtime_nsec as i64),
        }))
    }

    fn mkdir(&self, args: &Value) -> Result<Value, ToolError> {
        let a = Args::new(args, &["path"])?;
        let p = GuestPath::parse(a.str("path")?)?;
        self.mkdir_p(&p)?;
        Ok(json!({}))
    }

    /// Creates `p` and its missing parents, each one beneath the root.
    fn mkdir_p(&self, p: &GuestPath) -> Result<(), ToolError> {
        check_depth(p)?;
        let mut prefix = GuestPath { rel: String::new() };
        for comp in p.rel.split('/').filter(|c| !c.is_empty()) {
            let parent = self.open_dir_path(&prefix)?;
            let name = CString::new(comp).unwrap_or_default();
            match sys::mkdirat(parent.as_fd(), &name, 0o755) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
                Err(e) => return Err(io_error(&prefix, e)),
            }
            if !prefix.rel.is_empty() {
                prefix.rel.push('/');
            }
            prefix.rel.push_str(comp);
        }
        // An existing non-directory (or a symlink leading out) shows up here.
        self.open_dir_path(p).map(drop)
    }

    fn parent_of(&self, p: &GuestPath) -> Result<(OwnedFd, CString), ToolError> {
        let (parent, name) = p.split().ok_or_else(|| {
            ToolError::new(
                "invalid_path",
                format!("{GUEST_ROOT} itself cannot be moved or deleted"),
            )
        })?;
        Ok((self.open_dir_path(&parent)?, name))
    }

    fn move_(&self, args: &Value) -> Result<Value, ToolError> {
        let a = Args::new(args, &["from", "to"])?;
        let from = GuestPath::parse(a.str("from")?)?;
        let to = GuestPath::parse(a.str("to")?)?;
        let (from_dir, from_name) = self.parent_of(&from)?;
        let (to_dir, to_name) = self.parent_of(&to)?;
        let st =
            sys::fstatat_nofollow(from_dir.as_fd(), &from_name).map_err(|e| io_error(&from, e))?;
        self.check_tree_protected(&from, &st)?;
        // A folder moved deeper takes its whole tree down with it.
        if to.depth() > from.depth() {
            let room = MAX_DEPTH.saturating_sub(to.depth());
            let inner = if kind_of(&st) == "dir" {
                let fd = self.open_at(&from, libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
                tree_height(fd, room + 1).map_err(|e| io_error(&from, e))?
            } else {
                0
            };
            if to.depth() + inner > MAX_DEPTH {
                return Err(ToolError::new(
                    "too_deep",
                    format!(
                        "moving {} to {} would make paths deeper than {MAX_DEPTH} folders",
                        from.display(),
                        to.display()
                    ),
                ));
            }
        }
        sys::rename_noreplace(from_dir.as_fd(), &from_name, to_dir.as_fd(), &to_name).map_err(
            |e| match e.raw_os_error() {
                Some(libc::EEXIST) => {
                    ToolError::new("exists", format!("{} already exists", to.display()))
                }
                _ => io_error(&from, e),
            },
        )?;
        Ok(json!({}))
    }

    fn delete(&self, args: &Value) -> Result<Value, ToolError> {
        let a = Args::new(args, &["path"])?;
        let p = GuestPath::parse(a.str("path")?)?;
        let (dir, name) = self.parent_of(&p)?;
        // Make sure it exists before the trash folder is created for it.
        let st = sys::fstatat_nofollow(dir.as_fd(), &name).map_err(|e| io_error(&p, e))?;
        self.check_tree_protected(&p, &st)?;
        let mut trash = self.trash.lock().unwrap_or_else(|e| e.into_inner());
        if trash.is_none() {
            *trash = Some(self.open_trash()?);
        }
        let trash_fd = trash.as_ref().map(|t| t.as_fd()).ok_or_else(no_trash)?;
        let target = self.trash_name(&name);
        match sys::rename_noreplace(dir.as_fd(), &name, trash_fd, &target) {
            Ok(()) => {}
            // Under --jail the workspace and the trash are two bind mounts, and a rename
            // cannot cross mounts even on one filesystem: copy, sync, then unlink.
            Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
                copy_to_trash(dir.as_fd(), &name, &st, trash_fd, &target, &p)?
            }
            Err(e) => return Err(io_error(&p, e)),
        }
        Ok(json!({}))
    }

    fn open_trash(&self) -> Result<OwnedFd, ToolError> {
        let path = self.trash_path.as_ref().ok_or_else(no_trash)?;
        match std::fs::create_dir(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(ToolError::new(
                    "trash_unavailable",
                    format!("cannot create the trash folder: {e}"),
                ))
            }
        }
        let f = std::fs::File::open(path).map_err(|e| {
            ToolError::new(
                "trash_unavailable",
                format!("cannot open the trash folder: {e}"),
            )
        })?;
        Ok(f.into())
    }

    /// `<ns since epoch>-<seq>-<name>`: unique, sortable by deletion time.
    fn trash_name(&self, name: &CStr) -> CString {
        let ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let seq = self.trash_seq.fetch_add(1, Ordering::Relaxed);
        let base = name.to_bytes();
        let base = &base[..base.len().min(200)]; // stay under NAME_MAX with the prefix
        let mut out = format!("{ns}-{seq}-").into_bytes();
        out.extend_from_slice(base);
        CString::new(out).unwrap_or_default()
    }
}

fn too_big(p: &GuestPath) -> ToolError {
    ToolError::new(
        "too_large",
        format!(
            "{} would grow past {MAX_FILE_SIZE} bytes, the largest file fs.write makes",
            p.display()
        ),
    )
}

fn check_depth(p: &GuestPath) -> Result<(), ToolError> {
    if p.depth() > MAX_DEPTH {
        return Err(ToolError::new(
            "too_deep",
            format!("{} is deeper than {MAX_DEPTH} folders", p.display()),
        ));
    }
    Ok(())
}

/// How many levels of folders lie below `dir` (0: none), counting no further than
/// `limit`: enough to tell whether a move would pass MAX_DEPTH.
fn tree_height(dir: OwnedFd, limit: usize) -> io::Result<usize> {
    if limit == 0 {
        return Ok(0);
    }
    let probe = dir.try_clone()?;
    let (names, _) = sys::read_dir_names(dir, MAX_LIST_SCAN)?;
    let mut best = 0;
    for name in &names {
        let Ok(st) = sys::fstatat_nofollow(probe.as_fd(), name) else {
            continue;
        };
        if kind_of(&st) != "dir" {
            continue;
        }
        let sub = sys::open_beneath(probe.as_fd(), name, libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
        best = best.max(1 + tree_height(sub, limit - 1)?);
        if best >= limit {
            break;
        }
    }
    Ok(best)
}

/// The trash folder of the workspace `dir` (resolved): `<dir>.ironvmm-trash`
/// beside it; None for `/`.
pub fn trash_path_for(dir: &Path) -> Option<PathBuf> {
    let (parent, name) = (dir.parent()?, dir.file_name()?);
    let mut name = name.to_os_string();
    name.push(".ironvmm-trash");
    Some(parent.join(name))
}

/// (read and search, write) for `uid`/`gid`, with no supplementary groups and no
/// capabilities, by the permission bits of a file of owner `st_uid`:`st_gid`.
pub fn user_access(st_uid: u32, st_gid: u32, mode: u32, uid: u32, gid: u32) -> (bool, bool) {
    let bits = if st_uid == uid {
        mode >> 6
    } else if st_gid == gid {
        mode >> 3
    } else {
        mode
    } & 0o7;
    (bits & 0o5 == 0o5, bits & 0o2 != 0)
}

fn no_trash() -> ToolError {
    ToolError::new(
        "trash_unavailable",
        "the workspace has no parent folder for a trash folder",
    )
}

impl Service for FsService {
    fn tools(&self) -> Vec<ToolSpec> {
        tool_specs()
    }

    fn lane(&self) -> Lane {
        Lane::Local
    }

    fn call(&self, tool: &str, args: &Value) -> Result<Value, ToolError> {
        match tool {
            "fs.read" => self.read(args),
            "fs.write" => self.write(args),
            "fs.list" => self.list(args),
            "fs.stat" => self.stat(args),
            "fs.mkdir" => self.mkdir(args),
            "fs.move" => self.move_(args),
            "fs.delete" => self.delete(args),
            _ => Err(ToolError::new(
                "unknown_tool",
                format!("fs has no tool {tool:?}"),
            )),
        }
    }
}

/// (device, inode): what a file is, whatever its name.
fn identity(st: &sys::Stat) -> (u64, u64) {
    // x86_64 (the only target): both fields are u64.
    (st.st_dev, st.st_ino)
}

fn kind_of(st: &sys::Stat) -> &'static str {
    match st.st_mode & libc::S_IFMT {
        libc::S_IFREG => "file",
        libc::S_IFDIR => "dir",
        libc::S_IFLNK => "symlink",
        _ => "other",
    }
}

fn require_regular(p: &GuestPath, st: &sys::Stat) -> Result<(), ToolError> {
    match kind_of(st) {
        "file" => Ok(()),
        "dir" => Err(ToolError::new(
            "is_directory",
            format!("{} is a directory", p.display()),
        )),
        _ => Err(ToolError::new(
            "not_regular",
            format!("{} is not a regular file", p.display()),
        )),
    }
}

/// Turns an errno into a tool error that names the guest path, never the host path.
/// `fs.delete` where the trash is on another mount: the file is copied into the trash
/// and synced before it is unlinked, and unlinked only if it is still the file that
/// was copied, unchanged; otherwise the copy is removed and the call fails. Folders
/// and symlinks are refused: nothing is deleted that is not safely in the trash.
fn copy_to_trash(
    dir: BorrowedFd,
    name: &CStr,
    st: &sys::Stat,
    trash: BorrowedFd,
    target: &CStr,
    p: &GuestPath,
) -> Result<(), ToolError> {
    let unavailable = |what: String| ToolError::new("trash_unavailable", what);
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(unavailable(format!(
            "{}: the trash is on another mount (--jail), and only a file can be copied there",
            p.display()
        )));
    }
    let src = sys::open_beneath(dir, name, libc::O_RDONLY | libc::O_NOFOLLOW, 0)
        .map_err(|e| io_error(p, e))?;
    let before = sys::fstat(src.as_fd()).map_err(|e| io_error(p, e))?;
    let dst = sys::open_beneath(
        trash,
        target,
        libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
        before.st_mode & 0o777,
    )
    .map_err(|e| unavailable(format!("cannot create the copy in the trash: {e}")))?;
    let copied = (|| -> io::Result<bool> {
        let mut buf = vec![0u8; 64 * 1024];
        let mut off = 0u64;
        loop {
            let n = sys::pread(src.as_fd(), &mut buf, off)?;
            if n == 0 {
                break;
            }
            sys::write_all_at(dst.as_fd(), &buf[..n], Some(off))?;
            off += n as u64;
        }
        sys::fsync(dst.as_fd())?;
        let after = sys::fstat(src.as_fd())?;
        let now = sys::fstatat_nofollow(dir, name)?;
        let same = |a: &sys::Stat| {
            (
                a.st_dev,
                a.st_ino,
                a.st_size,
                a.st_mtime,
                a.st_mtime_nsec,
                a.st_ctime,
                a.st_ctime_nsec,
            )
        };
        Ok(same(&after) == same(&before)
            && same(&now) == same(&before)
            && off == before.st_size as u64)
    })();
    let fail = |what: String| {
        let _ = sys::unlinkat_file(trash, target);
        Err(unavailable(what))
    };
    match copied {
        Ok(true) => sys::unlinkat_file(dir, name).map_err(|e| io_error(p, e)),
        Ok(false) => fail(format!(
            "{} changed while it was copied to the trash; it was left where it is",
            p.display()
        )),
        Err(e) => fail(format!("copying {} to the trash: {e}", p.display())),
    }
}

fn io_error(p: &GuestPath, e: io::Error) -> ToolError {
    let path = p.display();
    let (kind, what) = match e.raw_os_error() {
        Some(libc::ENOENT) => ("not_found", "no such file or directory".to_string()),
        Some(libc::EXDEV) => (
            "outside_root",
            format!("resolves outside {GUEST_ROOT} (through a symlink or ..)"),
        ),
        Some(libc::ELOOP) => (
            "outside_root",
            "too many symlinks, or a /proc magic link".to_string(),
        ),
        Some(libc::ENOTDIR) => ("not_a_directory", "not a directory".to_string()),
        Some(libc::EISDIR) => ("is_directory", "is a directory".to_string()),
        Some(libc::EEXIST) => ("exists", "already exists".to_string()),
        Some(libc::ENOTEMPTY) => ("not_empty", "directory not empty".to_string()),
        Some(libc::EACCES | libc::EPERM) => ("permission_denied", "permission denied".to_string()),
        Some(libc::ENOSPC | libc::EDQUOT) => ("no_space", "no space left".to_string()),
        Some(libc::EINVAL) => ("invalid", "invalid operation".to_string()),
        _ => ("io", e.to_string()),
    };
    ToolError::new(kind, format!("{path}: {what}"))
}

/// Argument access that checks keys and types; the policy's schema check usually
/// refused bad arguments already, this keeps the service safe without a catalog.
struct Args<'a> {
    obj: &'a Map<String, Value>,
}

impl<'a> Args<'a> {
    fn new(v: &'a Value, allowed: &[&str]) -> Result<Self, ToolError> {
        let obj = v
            .as_object()
            .ok_or_else(|| ToolError::new("invalid_arguments", "arguments must be an object"))?;
        if let Some(k) = obj.keys().find(|k| !allowed.contains(&k.as_str())) {
            return Err(ToolError::new(
                "invalid_arguments",
                format!("unknown argument {k:?}"),
            ));
        }
        Ok(Args { obj })
    }

    fn str(&self, key: &str) -> Result<&'a str, ToolError> {
        match self.obj.get(key) {
            Some(Value::String(s)) => Ok(s),
            Some(_) => Err(bad_type(key, "a string")),
            None => Err(ToolError::new(
                "invalid_arguments",
                format!("missing argument {key:?}"),
            )),
        }
    }

    fn opt_u64(&self, key: &str) -> Result<Option<u64>, ToolError> {
        match self.obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| bad_type(key, "a non-negative integer")),
        }
    }

    fn opt_bool(&self, key: &str) -> Result<Option<bool>, ToolError> {
        match self.obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(bad_type(key, "a boolean")),
        }
    }

    /// true for base64, false for utf8 (the default).
    fn base64_encoding(&self) -> Result<bool, ToolError> {
        match self.obj.get("encoding") {
            None | Some(Value::Null) => Ok(false),
            Some(Value::String(s)) if s == "utf8" => Ok(false),
            Some(Value::String(s)) if s == "base64" => Ok(true),
            Some(_) => Err(bad_type("encoding", "\"utf8\" or \"base64\"")),
        }
    }
}

fn bad_type(key: &str, want: &str) -> ToolError {
    ToolError::new(
        "invalid_arguments",
        format!("argument {key:?} must be {want}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_jail_user_gets_only_the_permission_bits() {
        assert_eq!(user_access(5, 5, 0o700, 5, 9), (true, true));
        assert_eq!(user_access(0, 0, 0o700, 5, 5), (false, false));
        assert_eq!(user_access(0, 5, 0o750, 7, 5), (true, false));
        assert_eq!(user_access(0, 0, 0o777, 7, 7), (true, true));
        // The owner's bits apply to the owner even when others have more.
        assert_eq!(user_access(5, 5, 0o077, 5, 5), (false, false));
        // Read without search is not enough for a folder.
        assert_eq!(user_access(0, 0, 0o744, 7, 7), (false, false));
    }

    #[test]
    fn paths_normalise_like_the_policy() {
        let rel = |s: &str| GuestPath::parse(s).map(|p| p.rel);
        assert_eq!(rel("/workspace").unwrap(), "");
        assert_eq!(rel("/workspace/a//b/./c").unwrap(), "a/b/c");
        assert_eq!(rel("a/../b").unwrap(), "b");
        assert_eq!(rel("/workspace/../workspace/x").unwrap(), "x");
        assert_eq!(rel("/etc/passwd").unwrap_err().kind, "outside_root");
        assert_eq!(rel("/workspace/../etc").unwrap_err().kind, "outside_root");
        assert_eq!(rel("../x").unwrap_err().kind, "outside_root");
        assert_eq!(rel("/..").unwrap_err().kind, "invalid_path");
        assert_eq!(rel("/workspacex/a").unwrap_err().kind, "outside_root");
        assert_eq!(rel("a\0b").unwrap_err().kind, "invalid_path");
    }

    use proptest::prelude::*;

    fn spelling() -> impl Strategy<Value = String> {
        let comp = prop::sample::select(vec![
            "a",
            "b",
            "..",
            ".",
            "",
            "workspace",
            "c d",
            "é",
            ".git",
        ]);
        (any::<bool>(), prop::collection::vec(comp, 0..8)).prop_map(|(abs, cs)| {
            let body = cs.join("/");
            if abs {
                format!("/workspace/{body}")
            } else {
                body
            }
        })
    }

    proptest! {
        /// The path the engine decided is the path the service opened: a file
        /// written under any spelling lands at the host path of the engine's
        /// normalised form, and the service refuses exactly what lies outside it.
        #[test]
        fn the_service_opens_the_decided_path(s in spelling()) {
            let decided = norm::path(&s).map(|c| c.into_owned());
            let parsed = GuestPath::parse(&s);
            match (&decided, &parsed) {
                (Some(d), Ok(g)) => prop_assert_eq!(d, &g.display()),
                (Some(d), Err(e)) => prop_assert!(
                    !norm::path_under(d, GUEST_ROOT) || s.is_empty(),
                    "{} refused: {:?}", d, e
                ),
                (None, Ok(g)) => prop_assert!(false, "{} accepted as {}", s, g.display()),
                (None, Err(_)) => {}
            }
            if let (Some(d), Ok(g)) = (&decided, &parsed) {
                if g.is_root() {
                    return Ok(());
                }
                let dir = tempfile::tempdir().unwrap();
                let fs = FsService::open(dir.path()).unwrap();
                let r = fs.call(
                    "fs.write",
                    &json!({"path": s, "content": "x", "create_dirs": true}),
                );
                let host = dir.path().join(&d[GUEST_ROOT.len() + 1..]);
                if r.is_ok() {
                    prop_assert_eq!(std::fs::read_to_string(&host).unwrap(), "x");
                }
            }
        }
    }
}
