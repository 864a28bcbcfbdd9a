//! Reads `guest.img` for the VMM. Every check that can fail names the member and
//! what is wrong with it; nothing in the file can make this panic, and a file
//! over the size limits is refused before it is read.

use std::fs;
use std::io::{self, Read};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use sha2::{Digest, Sha256};

use super::cpio;
use super::kernel::{kernel_kind, KernelKind};
use super::manifest::{Manifest, ManifestError, MAX_MANIFEST_BYTES};

/// Largest kernel accepted (an uncompressed debug vmlinux is well under this).
pub const MAX_KERNEL_BYTES: u64 = 256 << 20;
/// Largest initramfs accepted; the VMM also checks it against guest memory.
pub const MAX_INITRAMFS_BYTES: u64 = 2 << 30;

/// Why an image is invalid. The VMM maps every variant to exit code 126.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("cannot read image {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("image {origin} is not a valid tar archive: {detail}")]
    NotTar { origin: String, detail: String },
    #[error("image {origin} is truncated: member {member} has {got} of its {want} bytes")]
    Truncated {
        origin: String,
        member: String,
        got: u64,
        want: u64,
    },
    #[error("image {origin} is truncated: it ends without the tar end-of-archive blocks")]
    NoEnd { origin: String },
    #[error("image {origin} has no member {member}")]
    MissingMember { origin: String, member: String },
    #[error("image {origin} has member {member} twice")]
    DuplicateMember { origin: String, member: String },
    #[error("image {origin} has an unexpected member {member} ({why})")]
    UnexpectedMember {
        origin: String,
        member: String,
        why: String,
    },
    #[error("image {origin}: member {member} is {size} bytes, over the {limit}-byte limit")]
    TooLarge {
        origin: String,
        member: String,
        size: u64,
        limit: u64,
    },
    #[error("image {origin}: {source}")]
    Manifest {
        origin: String,
        source: ManifestError,
    },
    #[error("image {origin}: kernel member {member} is {why}")]
    BadKernel {
        origin: String,
        member: String,
        why: String,
    },
    #[error("image {origin}: initramfs member {member} is invalid: {why}")]
    BadInitramfs {
        origin: String,
        member: String,
        why: String,
    },
}

/// One member as `image inspect` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberInfo {
    pub name: String,
    pub size: u64,
    pub sha256: String,
}

/// A validated image, held in memory as the file's bytes; the members are
/// slices of them (no copies), and the file's digest is computed on first use so
/// that the VMM can take it off the boot path.
#[derive(Debug)]
pub struct GuestImage {
    pub manifest: Manifest,
    pub kernel_kind: KernelKind,
    data: Vec<u8>,
    manifest_at: Range<usize>,
    kernel_at: Range<usize>,
    initramfs_at: Range<usize>,
    sha256: OnceLock<String>,
}

/// The largest file worth reading: every member at its limit, plus tar overhead.
const MAX_IMAGE_BYTES: u64 =
    MAX_MANIFEST_BYTES + MAX_KERNEL_BYTES + MAX_INITRAMFS_BYTES + (1 << 20);

impl GuestImage {
    /// Opens and validates `path`.
    pub fn open(path: &Path) -> Result<GuestImage, ImageError> {
        let io_err = |e| ImageError::Io {
            path: path.to_path_buf(),
            source: e,
        };
        let mut file = fs::File::open(path).map_err(io_err)?;
        let meta = file.metadata().map_err(io_err)?;
        if meta.is_dir() {
            return Err(io_err(io::Error::other("it is a directory")));
        }
        // A device or a FIFO reports no size and never ends (`/dev/zero`).
        if !meta.is_file() {
            return Err(io_err(io::Error::other(
                "not a regular file (a device, a FIFO or a socket)",
            )));
        }
        let origin = path.display().to_string();
        if meta.len() > MAX_IMAGE_BYTES {
            return Err(ImageError::TooLarge {
                origin,
                member: "(the whole image)".into(),
                size: meta.len(),
                limit: MAX_IMAGE_BYTES,
            });
        }
        let mut data = Vec::with_capacity(meta.len() as usize);
        // Bounded even if the file grows while it is read.
        (&mut file)
            .take(MAX_IMAGE_BYTES + 1)
            .read_to_end(&mut data)
            .map_err(io_err)?;
        if data.len() as u64 > MAX_IMAGE_BYTES {
            return Err(ImageError::TooLarge {
                origin,
                member: "(the whole image)".into(),
                size: data.len() as u64,
                limit: MAX_IMAGE_BYTES,
            });
        }
        Self::from_bytes(data, &origin)
    }

    /// Reads an image from any byte stream; `origin` names it in errors.
    pub fn read_from<R: Read>(reader: R, origin: &str) -> Result<GuestImage, ImageError> {
        let mut data = Vec::new();
        reader
            .take(MAX_IMAGE_BYTES + 1)
            .read_to_end(&mut data)
            .map_err(|e| ImageError::NotTar {
                origin: origin.to_string(),
                detail: e.to_string(),
            })?;
        if data.len() as u64 > MAX_IMAGE_BYTES {
            return Err(ImageError::TooLarge {
                origin: origin.to_string(),
                member: "(the whole image)".into(),
                size: data.len() as u64,
                limit: MAX_IMAGE_BYTES,
            });
        }
        Self::from_bytes(data, origin)
    }

    /// Validates an image held in memory.
    pub fn from_bytes(data: Vec<u8>, origin: &str) -> Result<GuestImage, ImageError> {
        let origin = origin.to_string();
        let not_tar = |e: io::Error| ImageError::NotTar {
            origin: origin.clone(),
            detail: e.to_string(),
        };
        // Members by name, as byte ranges of `data`. The manifest says which names
        // the kernel and initramfs use, so every member is located before deciding.
        let mut members: Vec<(String, Range<usize>)> = Vec::new();
        // Where the last member's padded data ends; two zero blocks must follow,
        // or the file was cut exactly between members.
        let mut data_end = 0u64;
        let mut archive = tar::Archive::new(io::Cursor::new(&data[..]));
        // With a seekable reader the tar crate skips member data without copying it.
        for entry in archive.entries_with_seek().map_err(not_tar)? {
            let entry = entry.map_err(not_tar)?;
            let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
            let ty = entry.header().entry_type();
            if !matches!(ty, tar::EntryType::Regular | tar::EntryType::Continuous) {
                return Err(ImageError::UnexpectedMember {
                    origin,
                    member: name,
                    why: format!("a tar entry of type {ty:?}, not a regular file"),
                });
            }
            if members.iter().any(|(n, _)| *n == name) {
                return Err(ImageError::DuplicateMember {
                    origin,
                    member: name,
                });
            }
            let want = entry.size();
            let start = entry.raw_file_position();
            let end = start.saturating_add(want);
            if end > data.len() as u64 {
                return Err(ImageError::Truncated {
                    origin,
                    member: name,
                    got: (data.len() as u64).saturating_sub(start),
                    want,
                });
            }
            data_end = end.div_ceil(512).saturating_mul(512);
            members.push((name, start as usize..end as usize));
        }
        if (data.len() as u64) < data_end.saturating_add(1024) {
            return Err(ImageError::NoEnd { origin });
        }

        let take = |members: &mut Vec<(String, Range<usize>)>, name: &str| {
            members
                .iter()
                .position(|(n, _)| n == name)
                .map(|i| members.swap_remove(i).1)
                .ok_or_else(|| ImageError::MissingMember {
                    origin: origin.clone(),
                    member: name.to_string(),
                })
        };
        let manifest_at = take(&mut members, "manifest.json")?;
        let manifest =
            Manifest::from_json(&data[manifest_at.clone()]).map_err(|e| ImageError::Manifest {
                origin: origin.clone(),
                source: e,
            })?;
        let kernel_at = take(&mut members, &manifest.kernel)?;
        let initramfs_at = take(&mut members, &manifest.initramfs)?;
        if let Some((name, _)) = members.first() {
            return Err(ImageError::UnexpectedMember {
                origin,
                member: name.clone(),
                why: "the manifest does not name it".into(),
            });
        }
        let size_check = |member: &str, size: usize, limit: u64| {
            if size as u64 > limit {
                Err(ImageError::TooLarge {
                    origin: origin.clone(),
                    member: member.to_string(),
                    size: size as u64,
                    limit,
                })
            } else {
                Ok(())
            }
        };
        size_check(&manifest.kernel, kernel_at.len(), MAX_KERNEL_BYTES)?;
        size_check(&manifest.initramfs, initramfs_at.len(), MAX_INITRAMFS_BYTES)?;
        let kernel_kind =
            kernel_kind(&data[kernel_at.clone()]).map_err(|why| ImageError::BadKernel {
                origin: origin.clone(),
                member: manifest.kernel.clone(),
                why,
            })?;
        check_initramfs(&data[initramfs_at.clone()]).map_err(|why| ImageError::BadInitramfs {
            origin: origin.clone(),
            member: manifest.initramfs.clone(),
            why,
        })?;
        Ok(GuestImage {
            manifest,
            kernel_kind,
            data,
            manifest_at,
            kernel_at,
            initramfs_at,
            sha256: OnceLock::new(),
        })
    }

    /// The kernel member (ELF vmlinux or bzImage, see [`GuestImage::kernel_kind`]).
    pub fn kernel(&self) -> &[u8] {
        &self.data[self.kernel_at.clone()]
    }

    /// The initramfs member.
    pub fn initramfs(&self) -> &[u8] {
        &self.data[self.initramfs_at.clone()]
    }

    /// The manifest exactly as stored.
    pub fn manifest_bytes(&self) -> &[u8] {
        &self.data[self.manifest_at.clone()]
    }

    /// SHA-256 (hex) of the whole image file, as the audit `open` record wants it.
    /// Computed once, on first use (about 10 ms per 20 MB); safe to call from
    /// another thread while the VM boots.
    pub fn sha256(&self) -> &str {
        self.sha256
            .get_or_init(|| hex::encode(Sha256::digest(&self.data)))
    }

    /// Name, size and SHA-256 of each member, in image order.
    pub fn members(&self) -> Vec<MemberInfo> {
        let info = |name: &str, data: &[u8]| MemberInfo {
            name: name.to_string(),
            size: data.len() as u64,
            sha256: hex::encode(Sha256::digest(data)),
        };
        vec![
            info("manifest.json", self.manifest_bytes()),
            info(&self.manifest.kernel, self.kernel()),
            info(&self.manifest.initramfs, self.initramfs()),
        ]
    }

    /// The initramfs entries, when it is an uncompressed newc archive.
    pub fn initramfs_entries(&self) -> Option<Vec<cpio::Entry>> {
        cpio::parse(self.initramfs(), false).ok()
    }
}

/// Compressed initramfs formats the kernel can unpack (with the matching CONFIG_RD_*).
const COMPRESSED_MAGICS: [(&[u8], &str); 6] = [
    (b"\x1f\x8b", "gzip"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"BZh", "bzip2"),
    (b"\x02\x21\x4c\x18", "lz4"),
    (b"\x89LZO", "lzo"),
];

/// An uncompressed newc archive must parse to its trailer; a compressed one is
/// recognised by its magic and left to the kernel.
fn check_initramfs(b: &[u8]) -> Result<(), String> {
    if b.is_empty() {
        return Err("it is empty".into());
    }
    if b.starts_with(b"0707") {
        return cpio::parse(b, false).map(|_| ()).map_err(|e| e.to_string());
    }
    if COMPRESSED_MAGICS.iter().any(|(m, _)| b.starts_with(m)) {
        return Ok(());
    }
    Err("neither a newc cpio archive nor a compressed one".into())
}
