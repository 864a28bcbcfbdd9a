//! `ironvmm image build --rootfs DIR|TAR` with stand-in binaries: the rootfs files
//! land in the initramfs next to ironinit, iron and the manifest, and hostile
//! archive entries are refused with an error naming the entry.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output};

use ironvmm::image::cpio;
use ironvmm::image::GuestImage;

/// A minimal static x86-64 ELF (no program headers, so no interpreter).
fn fake_static_elf(e_type: u16) -> Vec<u8> {
    let mut b = vec![0u8; 256];
    b[..4].copy_from_slice(b"\x7fELF");
    b[4] = 2;
    b[5] = 1;
    b[6] = 1;
    b[16..18].copy_from_slice(&e_type.to_le_bytes());
    b[18..20].copy_from_slice(&62u16.to_le_bytes());
    b
}

/// Fake guest binaries, busybox and kernel in `d`, and a small rootfs in d/root.
fn setup(d: &Path) {
    std::fs::create_dir_all(d.join("bin")).unwrap();
    std::fs::write(d.join("bin/ironinit"), fake_static_elf(3)).unwrap();
    std::fs::write(d.join("bin/iron"), fake_static_elf(2)).unwrap();
    std::fs::write(d.join("busybox"), fake_static_elf(2)).unwrap();
    std::fs::write(d.join("vmlinux"), fake_static_elf(2)).unwrap();
    let r = d.join("root");
    std::fs::create_dir_all(r.join("opt/agent")).unwrap();
    std::fs::create_dir_all(r.join("lib64")).unwrap();
    std::fs::write(r.join("opt/agent/agent.js"), "console.log(1)\n").unwrap();
    std::fs::write(r.join("lib64/ld-linux-x86-64.so.2"), "ld").unwrap();
    std::os::unix::fs::symlink("/opt/agent/agent.js", r.join("opt/latest.js")).unwrap();
}

fn build(d: &Path, rootfs: &Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ironvmm"))
        .args(["image", "build", "--kernel"])
        .arg(d.join("vmlinux"))
        .arg("--guest-bin")
        .arg(d.join("bin"))
        .arg("--busybox")
        .arg(d.join("busybox"))
        .arg("--rootfs")
        .arg(rootfs)
        .arg("-o")
        .arg(d.join("guest.img"))
        .args(["--cmd", "node /opt/agent/agent.js"])
        .args(extra)
        .env_remove("IRONVMM_GUEST_BIN")
        .output()
        .unwrap()
}

fn entries(d: &Path) -> (GuestImage, Vec<cpio::Entry>) {
    let img = GuestImage::open(&d.join("guest.img")).unwrap();
    let e = cpio::parse(img.initramfs(), true).unwrap();
    (img, e)
}

fn check_image(d: &Path) {
    let (img, entries) = entries(d);
    let get = |n: &str| {
        entries
            .iter()
            .find(|e| e.name_str() == n)
            .unwrap_or_else(|| panic!("{n} is not in the initramfs"))
    };
    assert_eq!(get("opt/agent/agent.js").data, b"console.log(1)\n");
    assert_eq!(get("lib64/ld-linux-x86-64.so.2").data, b"ld");
    let link = get("opt/latest.js");
    assert_eq!(link.mode & cpio::S_IFMT, cpio::S_IFLNK);
    assert_eq!(link.data, b"/opt/agent/agent.js");
    assert_eq!(get("init").data, fake_static_elf(3));
    assert_eq!(get("bin/iron").data, fake_static_elf(2));
    assert!(entries.iter().any(|e| e.name_str() == "bin/busybox"));
    assert_eq!(&get("etc/ironvmm/manifest.json").data, img.manifest_bytes());
    assert_eq!(img.manifest.agent.cmd[2], "node /opt/agent/agent.js");
}

fn ok(out: &Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The exit status and stderr of a build that must fail, and no image left behind.
fn refused(d: &Path, rootfs: &Path) -> String {
    let _ = std::fs::remove_file(d.join("guest.img"));
    let out = build(d, rootfs, &[]);
    assert_eq!(out.status.code(), Some(125));
    assert!(
        !d.join("guest.img").exists(),
        "no image after a failed build"
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn from_a_directory() {
    let d = tempfile::tempdir().unwrap();
    setup(d.path());
    ok(&build(d.path(), &d.path().join("root"), &[]));
    check_image(d.path());
}

/// Tars d/root with the tar crate, as `tar -C root -cf x .` would.
fn tar_of_root(d: &Path) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    b.follow_symlinks(false);
    b.append_dir_all(".", d.join("root")).unwrap();
    // A hard link to a file earlier in the archive is a copy of it.
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Link);
    h.set_size(0);
    h.set_mode(0o644);
    b.append_link(&mut h, "opt/agent/copy.js", "opt/agent/agent.js")
        .unwrap();
    b.into_inner().unwrap()
}

#[test]
fn from_a_tar_and_a_tar_gz() {
    let d = tempfile::tempdir().unwrap();
    setup(d.path());
    let tar = tar_of_root(d.path());
    let plain = d.path().join("root.tar");
    std::fs::write(&plain, &tar).unwrap();
    ok(&build(d.path(), &plain, &[]));
    check_image(d.path());
    let (_, e) = entries(d.path());
    let copy = e.iter().find(|e| e.name_str() == "opt/agent/copy.js");
    assert_eq!(copy.unwrap().data, b"console.log(1)\n");

    // Told apart by content: a gzip'd tar under any name.
    let gz = d.path().join("rootfs.img");
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(&tar).unwrap();
    std::fs::write(&gz, enc.finish().unwrap()).unwrap();
    ok(&build(d.path(), &gz, &[]));
    check_image(d.path());
}

/// One raw tar entry, written without the tar crate's path checks (which would
/// refuse the hostile names these tests need).
fn raw_entry(name: &str, kind: tar::EntryType, link: &str, data: &[u8]) -> Vec<u8> {
    let mut h = tar::Header::new_old();
    h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
    h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
    h.set_entry_type(kind);
    h.set_mode(0o644);
    h.set_size(data.len() as u64);
    h.set_cksum();
    let mut out = h.as_bytes().to_vec();
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
    out
}

fn archive(d: &Path, name: &str, entries: &[Vec<u8>]) -> std::path::PathBuf {
    let mut bytes: Vec<u8> = entries.concat();
    bytes.extend_from_slice(&[0u8; 1024]);
    let p = d.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

#[test]
fn a_pax_global_header_and_a_symlinked_root_folder_are_fine() {
    let d = tempfile::tempdir().unwrap();
    setup(d.path());
    let p = archive(
        d.path(),
        "git-archive.tar",
        &[
            raw_entry(
                "pax_global_header",
                tar::EntryType::XGlobalHeader,
                "",
                b"52 comment=0123456789012345678901234567890123456789\n",
            ),
            raw_entry("srv/", tar::EntryType::Directory, "", b""),
            raw_entry("srv/a.txt", tar::EntryType::Regular, "", b"a"),
        ],
    );
    ok(&build(d.path(), &p, &[]));
    let (_, e) = entries(d.path());
    assert!(e.iter().any(|e| e.name_str() == "srv/a.txt"));
    assert!(!e.iter().any(|e| e.name_str().contains("pax")));

    std::os::unix::fs::symlink(d.path().join("root"), d.path().join("root-link")).unwrap();
    ok(&build(d.path(), &d.path().join("root-link"), &[]));
    check_image(d.path());
}

#[test]
fn hostile_archives_are_refused_by_entry() {
    use tar::EntryType::{Block, Char, Directory, Fifo, Link, Regular, Symlink};
    let d = tempfile::tempdir().unwrap();
    setup(d.path());
    let dp = d.path();
    let file = |n: &str| raw_entry(n, Regular, "", b"x");
    let cases: Vec<(Vec<Vec<u8>>, &str, &str)> = vec![
        (
            vec![file("../../etc/cron.d/x")],
            "../../etc/cron.d/x",
            "escape",
        ),
        (vec![file("ok/../../x")], "ok/../../x", "escape"),
        (vec![file("/etc/shadow")], "/etc/shadow", "absolute"),
        (
            vec![raw_entry("dev/sda", Block, "", b"")],
            "dev/sda",
            "device node",
        ),
        (
            vec![raw_entry("dev/mem", Char, "", b"")],
            "dev/mem",
            "device node",
        ),
        (vec![raw_entry("p", Fifo, "", b"")], "p", "FIFO"),
        (
            vec![raw_entry("passwd", Link, "/etc/passwd", b"")],
            "passwd",
            "absolute",
        ),
        (
            vec![raw_entry("passwd", Link, "etc/passwd", b"")],
            "passwd",
            "not a file earlier in the archive",
        ),
        (vec![raw_entry("x", Link, "../outside", b"")], "x", "escape"),
        (
            vec![raw_entry("x", Link, "later", b""), file("later")],
            "x",
            "not a file earlier in the archive",
        ),
        // A file through a symlinked folder would land outside that folder.
        (
            vec![raw_entry("etc", Symlink, "/tmp", b""), file("etc/x")],
            "etc/x",
            "not a directory",
        ),
        (vec![file("init")], "init", "cannot replace /init"),
        (
            vec![raw_entry("bin", Directory, "", b""), file("bin/iron")],
            "bin/iron",
            "cannot replace /bin/iron",
        ),
    ];
    for (i, (entries, entry, why)) in cases.iter().enumerate() {
        let p = archive(dp, &format!("bad{i}.tar"), entries);
        let e = refused(dp, &p);
        assert!(
            e.contains(entry) && e.contains(why) && e.contains(&format!("bad{i}.tar")),
            "case {i}: want {entry:?} and {why:?} in: {e}"
        );
    }
}

#[test]
fn an_oversize_archive_is_refused_while_unpacking() {
    let d = tempfile::tempdir().unwrap();
    setup(d.path());
    // 64 MiB of zeros gzip to ~64 KiB; a 32M guest may hold 16 MiB. The cap
    // stops the unpacking at the entry that crosses it.
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut h = tar::Header::new_gnu();
    h.set_size(64 << 20);
    h.set_mode(0o644);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_path("big.bin").unwrap();
    h.set_cksum();
    enc.write_all(h.as_bytes()).unwrap();
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..64 {
        enc.write_all(&zeros).unwrap();
    }
    enc.write_all(&[0u8; 1024]).unwrap();
    let p = d.path().join("bomb.tar.gz");
    std::fs::write(&p, enc.finish().unwrap()).unwrap();
    let _ = std::fs::remove_file(d.path().join("guest.img"));
    let out = build(d.path(), &p, &["--mem", "32M"]);
    assert_eq!(out.status.code(), Some(125));
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains("\"big.bin\"") && e.contains("more than 16 MiB") && e.contains("--mem"),
        "{e}"
    );
}

#[test]
fn a_directory_with_a_device_or_a_missing_path_is_refused() {
    let d = tempfile::tempdir().unwrap();
    setup(d.path());
    let e = refused(d.path(), &d.path().join("nope"));
    assert!(e.contains("nope"), "{e}");
    let fifo = d.path().join("root/pipe");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    let e = refused(d.path(), &d.path().join("root"));
    assert!(e.contains("pipe") && e.contains("FIFO"), "{e}");
}
