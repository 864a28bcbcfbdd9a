//! GuestImage::open: a good image opens; truncated, corrupt, wrong-version,
//! incomplete and non-kernel images each fail with an error that says so.

use std::path::PathBuf;

use ironvmm::image::cpio::{Kind, Writer};
use ironvmm::image::{write_image, GuestImage, ImageError, KernelKind, Manifest};

/// A minimal ELF64 x86-64 ET_EXEC header: enough for the header checks.
fn fake_vmlinux() -> Vec<u8> {
    let mut b = vec![0u8; 4096];
    b[..4].copy_from_slice(b"\x7fELF");
    b[4] = 2; // 64-bit
    b[5] = 1; // little-endian
    b[6] = 1;
    b[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    b[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86-64
    b
}

fn small_cpio() -> Vec<u8> {
    let mut w = Writer::new(Vec::new());
    w.entry(b"init", 0o755, 0, &Kind::File(b"\x7fELF".to_vec()))
        .unwrap();
    w.finish().unwrap()
}

struct Tmp(PathBuf);
impl Drop for Tmp {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn tmp(name: &str) -> Tmp {
    Tmp(std::env::temp_dir().join(format!("image_reader_{}_{name}", std::process::id())))
}

fn good_image(name: &str) -> Tmp {
    let t = tmp(name);
    let m = Manifest::new(vec!["true".into()]);
    write_image(&t.0, &m, &fake_vmlinux(), &small_cpio(), 0).unwrap();
    t
}

/// A tar with the given members, written with the tar crate.
fn tar_of(name: &str, members: &[(&str, &[u8])]) -> Tmp {
    let t = tmp(name);
    let mut b = tar::Builder::new(std::fs::File::create(&t.0).unwrap());
    for (n, data) in members {
        let mut h = tar::Header::new_ustar();
        h.set_path(n).unwrap();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append(&h, *data).unwrap();
    }
    b.finish().unwrap();
    t
}

fn open_err(t: &Tmp) -> ImageError {
    GuestImage::open(&t.0).unwrap_err()
}

const MANIFEST: &str =
    r#"{"format":1,"kernel":"vmlinux","initramfs":"initramfs.cpio","agent":{"cmd":["true"]}}"#;

#[test]
fn a_good_image_opens() {
    let t = good_image("good");
    let img = GuestImage::open(&t.0).unwrap();
    assert_eq!(img.kernel_kind, KernelKind::Elf);
    assert_eq!(img.kernel(), fake_vmlinux());
    assert_eq!(img.initramfs(), small_cpio());
    assert_eq!(img.manifest.agent.cmd, ["true"]);
    // The digest is of the whole file.
    let file = std::fs::read(&t.0).unwrap();
    use sha2::Digest;
    assert_eq!(img.sha256(), hex::encode(sha2::Sha256::digest(&file)));
    let members = img.members();
    assert_eq!(members[1].name, "vmlinux");
    assert_eq!(members[1].size, 4096);
}

#[test]
fn truncated_images_say_truncated() {
    let t = good_image("trunc");
    let full = std::fs::read(&t.0).unwrap();
    // Cut inside the kernel's data (it starts after two 512-byte headers and the manifest).
    std::fs::write(&t.0, &full[..512 * 3 + 100]).unwrap();
    let e = open_err(&t);
    assert!(
        matches!(&e, ImageError::Truncated { member, .. } if member == "vmlinux")
            || e.to_string().contains("vmlinux"),
        "{e}"
    );
    // Cut inside a header block.
    std::fs::write(&t.0, &full[..100]).unwrap();
    let e = open_err(&t);
    assert!(matches!(e, ImageError::NotTar { .. }), "{e}");
}

#[test]
fn corrupt_headers_are_caught_by_the_checksum() {
    let t = good_image("corrupt");
    let mut b = std::fs::read(&t.0).unwrap();
    b[10] ^= 0x55; // inside the first member's name
    std::fs::write(&t.0, &b).unwrap();
    let e = open_err(&t);
    assert!(matches!(e, ImageError::NotTar { .. }), "{e}");
    assert!(e.to_string().contains("checksum"), "{e}");
}

#[test]
fn random_bytes_are_not_an_image() {
    let t = tmp("random");
    std::fs::write(
        &t.0,
        (0..5000u32).map(|i| (i * 7 + 3) as u8).collect::<Vec<_>>(),
    )
    .unwrap();
    assert!(matches!(open_err(&t), ImageError::NotTar { .. }));
}

#[test]
fn wrong_version_is_reported() {
    let m = MANIFEST.replace("\"format\":1", "\"format\":2");
    let t = tar_of(
        "version",
        &[
            ("manifest.json", m.as_bytes()),
            ("vmlinux", &fake_vmlinux()),
            ("initramfs.cpio", &small_cpio()),
        ],
    );
    let e = open_err(&t);
    assert!(matches!(e, ImageError::Manifest { .. }), "{e}");
    assert!(e.to_string().contains("format 2"), "{e}");
}

#[test]
fn a_non_kernel_file_is_refused() {
    let t = tar_of(
        "notkernel",
        &[
            ("manifest.json", MANIFEST.as_bytes()),
            ("vmlinux", b"#!/bin/sh\necho I am not a kernel\n"),
            ("initramfs.cpio", &small_cpio()),
        ],
    );
    let e = open_err(&t);
    assert!(matches!(e, ImageError::BadKernel { .. }), "{e}");
    assert!(
        e.to_string()
            .contains("neither an ELF vmlinux nor a bzImage"),
        "{e}"
    );

    // An x86-64 ELF that is a program, not a kernel (ET_DYN, like /bin/true).
    let mut pie = fake_vmlinux();
    pie[16] = 3;
    let t = tar_of(
        "pie",
        &[
            ("manifest.json", MANIFEST.as_bytes()),
            ("vmlinux", &pie),
            ("initramfs.cpio", &small_cpio()),
        ],
    );
    assert!(matches!(open_err(&t), ImageError::BadKernel { .. }));
}

#[test]
fn a_bzimage_is_accepted() {
    let mut bz = vec![0u8; 4096];
    bz[0x1fe..0x200].copy_from_slice(&[0x55, 0xaa]);
    bz[0x202..0x206].copy_from_slice(b"HdrS");
    bz[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    let t = tar_of(
        "bz",
        &[
            ("manifest.json", MANIFEST.as_bytes()),
            ("vmlinux", &bz),
            ("initramfs.cpio", &small_cpio()),
        ],
    );
    let img = GuestImage::open(&t.0).unwrap();
    assert_eq!(img.kernel_kind, KernelKind::BzImage { version: 0x020f });
}

#[test]
fn missing_extra_and_duplicate_members() {
    let k = fake_vmlinux();
    let c = small_cpio();
    let t = tar_of(
        "missing",
        &[("manifest.json", MANIFEST.as_bytes()), ("vmlinux", &k)],
    );
    assert!(
        matches!(open_err(&t), ImageError::MissingMember { member, .. } if member == "initramfs.cpio")
    );
    let t = tar_of("nomanifest", &[("vmlinux", &k), ("initramfs.cpio", &c)]);
    assert!(
        matches!(open_err(&t), ImageError::MissingMember { member, .. } if member == "manifest.json")
    );
    let t = tar_of(
        "extra",
        &[
            ("manifest.json", MANIFEST.as_bytes()),
            ("vmlinux", &k),
            ("initramfs.cpio", &c),
            ("README", b"hi"),
        ],
    );
    assert!(
        matches!(open_err(&t), ImageError::UnexpectedMember { member, .. } if member == "README")
    );
    let t = tar_of(
        "dup",
        &[
            ("manifest.json", MANIFEST.as_bytes()),
            ("vmlinux", &k),
            ("vmlinux", &k),
            ("initramfs.cpio", &c),
        ],
    );
    assert!(
        matches!(open_err(&t), ImageError::DuplicateMember { member, .. } if member == "vmlinux")
    );
}

#[test]
fn a_broken_initramfs_is_refused() {
    let mut c = small_cpio();
    c.truncate(120);
    let t = tar_of(
        "badcpio",
        &[
            ("manifest.json", MANIFEST.as_bytes()),
            ("vmlinux", &fake_vmlinux()),
            ("initramfs.cpio", &c),
        ],
    );
    let e = open_err(&t);
    assert!(matches!(e, ImageError::BadInitramfs { .. }), "{e}");
    let t = tar_of(
        "textcpio",
        &[
            ("manifest.json", MANIFEST.as_bytes()),
            ("vmlinux", &fake_vmlinux()),
            ("initramfs.cpio", b"hello"),
        ],
    );
    assert!(matches!(open_err(&t), ImageError::BadInitramfs { .. }));
}

#[test]
fn missing_file_and_directory() {
    let e = GuestImage::open(std::path::Path::new("/nonexistent/guest.img")).unwrap_err();
    assert!(matches!(e, ImageError::Io { .. }));
    assert!(e.to_string().contains("/nonexistent/guest.img"));
    let e = GuestImage::open(&std::env::temp_dir()).unwrap_err();
    assert!(e.to_string().contains("directory"), "{e}");
}

#[test]
fn any_prefix_of_an_image_fails_cleanly() {
    // Never a panic, whatever the cut.
    let t = good_image("prefixes");
    let full = std::fs::read(&t.0).unwrap();
    for cut in (0..full.len()).step_by(97) {
        let r = GuestImage::read_from(&full[..cut], "prefix");
        assert!(r.is_err(), "a {cut}-byte prefix opened");
    }
}
