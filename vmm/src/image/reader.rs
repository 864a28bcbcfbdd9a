//! Reads `guest.img` for the VMM. Every check that can fail names the member and
//! what is wrong with it; nothing in the file can make this panic or allocate
//! more than the per-member limits.

use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

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

/// A validated image, held in memory.
#[derive(Debug, Clone)]
pub struct GuestImage {
    pub manifest: Manifest,
    /// The manifest exactly as stored (for the audit's image record).
    pub manifest_bytes: Vec<u8>,
    pub kernel: Vec<u8>,
    pub kernel_kind: KernelKind,
    pub initramfs: Vec<u8>,
    /// SHA-256 (hex) of the whole image file, as the audit `open` record wants it.
    pub sha256: String,
}

/// Hashes everything that passes through, so the image is read only once.
struct HashingReader<R> {
    inner: R,
    hash: Sha256,
    total: u64,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        self.total += n as u64;
        Ok(n)
    }
}

impl GuestImage {
    /// Opens and validates `path`.
    pub fn open(path: &Path) -> Result<GuestImage, ImageError> {
        let file = fs::File::open(path).map_err(|e| ImageError::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
        if file.metadata().map(|m| m.is_dir()).unwrap_or(false) {
            return Err(ImageError::Io {
                path: path.to_path_buf(),
                source: io::Error::other("it is a directory"),
            });
        }
        Self::read_from(
            io::BufReader::with_capacity(1 << 16, file),
            &path.display().to_string(),
        )
    }

    /// Reads an image from any byte stream; `origin` names it in errors.
    pub fn read_from<R: Read>(reader: R, origin: &str) -> Result<GuestImage, ImageError> {
        let origin = origin.to_string();
        let not_tar = |e: io::Error| ImageError::NotTar {
            origin: origin.clone(),
            detail: e.to_string(),
        };
        let mut archive = tar::Archive::new(HashingReader {
            inner: reader,
            hash: Sha256::new(),
            total: 0,
        });
        // Where the last member's padded data ends; two zero blocks must follow,
        // or the file was cut exactly between members.
        let mut data_end = 0u64;
        // Members by name; the manifest says which names the kernel and initramfs use,
        // so every regular member is read (up to the largest limit) before deciding.
        let mut members: Vec<(String, Vec<u8>)> = Vec::new();
        for entry in archive.entries().map_err(not_tar)? {
            let mut entry = entry.map_err(not_tar)?;
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
            data_end = entry
                .raw_file_position()
                .saturating_add(want)
                .div_ceil(512)
                .saturating_mul(512);
            let limit = if name == "manifest.json" {
                MAX_MANIFEST_BYTES
            } else {
                MAX_INITRAMFS_BYTES.max(MAX_KERNEL_BYTES)
            };
            if want > limit {
                return Err(ImageError::TooLarge {
                    origin,
                    member: name,
                    size: want,
                    limit,
                });
            }
            let mut data = Vec::with_capacity(want.min(64 << 20) as usize);
            entry
                .by_ref()
                .take(want)
                .read_to_end(&mut data)
                .map_err(not_tar)?;
            if (data.len() as u64) < want {
                return Err(ImageError::Truncated {
                    origin,
                    member: name,
                    got: data.len() as u64,
                    want,
                });
            }
            members.push((name, data));
        }
        // Hash what follows the end-of-archive blocks too: the digest is of the file.
        let mut rest = archive.into_inner();
        io::copy(&mut rest, &mut io::sink()).map_err(not_tar)?;
        if rest.total < data_end.saturating_add(1024) {
            return Err(ImageError::NoEnd { origin });
        }
        let sha256 = hex::encode(rest.hash.finalize());

        let take = |members: &mut Vec<(String, Vec<u8>)>, name: &str| {
            members
                .iter()
                .position(|(n, _)| n == name)
                .map(|i| members.swap_remove(i).1)
                .ok_or_else(|| ImageError::MissingMember {
                    origin: origin.clone(),
                    member: name.to_string(),
                })
        };
        let manifest_bytes = take(&mut members, "manifest.json")?;
        let manifest = Manifest::from_json(&manifest_bytes).map_err(|e| ImageError::Manifest {
            origin: origin.clone(),
            source: e,
        })?;
        let kernel = take(&mut members, &manifest.kernel)?;
        let initramfs = take(&mut members, &manifest.initramfs)?;
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
        size_check(&manifest.kernel, kernel.len(), MAX_KERNEL_BYTES)?;
        size_check(&manifest.initramfs, initramfs.len(), MAX_INITRAMFS_BYTES)?;
        let kernel_kind = kernel_kind(&kernel).map_err(|why| ImageError::BadKernel {
            origin: origin.clone(),
            member: manifest.kernel.clone(),
            why,
        })?;
        check_initramfs(&initramfs).map_err(|why| ImageError::BadInitramfs {
            origin: origin.clone(),
            member: manifest.initramfs.clone(),
            why,
        })?;
        Ok(GuestImage {
            manifest,
            manifest_bytes,
            kernel,
            kernel_kind,
            initramfs,
            sha256,
        })
    }

    /// Name, size and SHA-256 of each member, in image order.
    pub fn members(&self) -> Vec<MemberInfo> {
        let info = |name: &str, data: &[u8]| MemberInfo {
            name: name.to_string(),
            size: data.len() as u64,
            sha256: hex::encode(Sha256::digest(data)),
        };
        vec![
            info("manifest.json", &self.manifest_bytes),
            info(&self.manifest.kernel, &self.kernel),
            info(&self.manifest.initramfs, &self.initramfs),
        ]
    }

    /// The initramfs entries, when it is an uncompressed newc archive.
    pub fn initramfs_entries(&self) -> Option<Vec<cpio::Entry>> {
        cpio::parse(&self.initramfs, false).ok()
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
