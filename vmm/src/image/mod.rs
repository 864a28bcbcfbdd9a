//! `guest.img`: a plain tar with `manifest.json`, the kernel and `initramfs.cpio`
//! (docs/image.md). This module reads and validates images for the VMM
//! ([`GuestImage::open`]), builds them (`ironvmm image build`), and packs the
//! `--copy-in` snapshot that the VMM appends to the initramfs.
//!
//! - `manifest` the strict manifest.json format
//! - `cpio`     newc writer and parser
//! - `tree`     guest file tree → cpio
//! - `kernel`   header checks: vmlinux/bzImage, static ELF
//! - `reader`   tar → [`GuestImage`], with errors naming what is wrong
//! - `writer`   tar writer
//! - `rootfs`   `--rootfs DIR|TAR` → tree, strict about hostile archives
//! - `build`    the initramfs layout and guest binaries for `image build`
//! - `copy_in`  the appended `--copy-in` archive

pub mod build;
pub mod copy_in;
pub mod cpio;
pub mod kernel;
pub mod manifest;
pub mod reader;
pub mod rootfs;
pub mod tree;
pub mod writer;

use std::path::{Path, PathBuf};

pub use copy_in::{copy_in_cpio, CopyIn};
pub use kernel::KernelKind;
pub use manifest::{Agent, Manifest, ManifestError};
pub use reader::{GuestImage, ImageError, MemberInfo};
pub use writer::write_image;

/// Where ironinit finds its copy of the manifest inside the initramfs.
pub use ironvmm_wire::MANIFEST_PATH as GUEST_MANIFEST_PATH;
/// Where `--copy-in` puts its snapshot unless told otherwise.
pub const DEFAULT_COPY_IN_PATH: &str = "/work";

/// Why an image (or a `--copy-in` archive) could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
}

impl BuildError {
    pub fn io(path: &Path, source: std::io::Error) -> BuildError {
        BuildError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// `SOURCE_DATE_EPOCH` if set (reproducible builds), otherwise 0.
pub fn build_mtime() -> u32 {
    std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .unwrap_or(0)
}
