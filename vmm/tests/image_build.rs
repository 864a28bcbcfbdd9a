//! `ironvmm image build|inspect` end to end with stand-in binaries, and the
//! `--copy-in` archive.

use std::path::{Path, PathBuf};
use std::process::Command;

use ironvmm::image::cpio;
use ironvmm::image::{copy_in_cpio, CopyIn, GuestImage};

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

/// The same with a PT_INTERP program header: a dynamically linked program.
fn fake_dynamic_elf() -> Vec<u8> {
    let mut b = fake_static_elf(3);
    b[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
    b[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
    b[56..58].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
    b[64..68].copy_from_slice(&3u32.to_le_bytes()); // PT_INTERP
    b
}

struct Dir(PathBuf);
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn scratch(name: &str) -> Dir {
    let d = std::env::temp_dir().join(format!("image_build_{}_{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    Dir(d)
}

/// Fake guest binaries, busybox and kernel in `d`.
fn setup(d: &Path) {
    std::fs::create_dir_all(d.join("bin")).unwrap();
    std::fs::write(d.join("bin/ironinit"), fake_static_elf(3)).unwrap();
    std::fs::write(d.join("bin/iron"), fake_static_elf(2)).unwrap();
    std::fs::write(d.join("busybox"), fake_static_elf(2)).unwrap();
    std::fs::write(d.join("vmlinux"), fake_static_elf(2)).unwrap();
    std::fs::create_dir_all(d.join("app/lib")).unwrap();
    std::fs::write(d.join("app/run.sh"), "#!/bin/sh\necho hi\n").unwrap();
    std::fs::write(d.join("app/lib/data.txt"), "data").unwrap();
}

fn ironvmm(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ironvmm"))
        .args(args)
        .env_remove("IRONVMM_GUEST_BIN")
        .output()
        .unwrap()
}

fn build_args<'a>(d: &'a Path, extra: &[&'a str]) -> Vec<String> {
    let mut v: Vec<String> = vec![
        "image".into(),
        "build".into(),
        "--kernel".into(),
        d.join("vmlinux").display().to_string(),
        "--guest-bin".into(),
        d.join("bin").display().to_string(),
        "--busybox".into(),
        d.join("busybox").display().to_string(),
        "-o".into(),
        d.join("guest.img").display().to_string(),
    ];
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn run_build(d: &Path, extra: &[&str]) -> std::process::Output {
    let args = build_args(d, extra);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    ironvmm(&refs)
}

#[test]
fn build_then_inspect() {
    let d = scratch("ok");
    setup(&d.0);
    let add = format!("{}:/app", d.0.join("app").display());
    let out = run_build(
        &d.0,
        &[
            "--add",
            &add,
            "--cmd",
            "/app/run.sh",
            "--env",
            "A=1",
            "--cwd",
            "/app",
            "--mem",
            "256M",
            "--cpus",
            "2",
            "--cmdline",
            "quiet",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let img = GuestImage::open(&d.0.join("guest.img")).unwrap();
    let m = &img.manifest;
    assert_eq!(m.agent.cmd, ["sh", "-c", "/app/run.sh"]);
    assert_eq!(m.agent.env["A"], "1");
    assert_eq!((m.mem_mib, m.cpus, m.cmdline.as_str()), (256, 2, "quiet"));
    let entries = cpio::parse(img.initramfs(), true).unwrap();
    let get = |n: &str| entries.iter().find(|e| e.name_str() == n);
    assert_eq!(get("init").unwrap().data, fake_static_elf(3));
    assert_eq!(get("init").unwrap().mode & 0o777, 0o755);
    assert_eq!(get("bin/iron").unwrap().data, fake_static_elf(2));
    assert!(get("bin/busybox").is_some());
    assert_eq!(
        get("dev/console").unwrap().mode & cpio::S_IFMT,
        cpio::S_IFCHR
    );
    assert_eq!(get("app/lib/data.txt").unwrap().data, b"data");
    // The manifest copy that ironinit reads is the image's manifest.
    let copy = &get("etc/ironvmm/manifest.json").unwrap().data;
    assert_eq!(copy, img.manifest_bytes());

    let out = ironvmm(&["image", "inspect", d.0.join("guest.img").to_str().unwrap()]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("initramfs.cpio"), "{text}");
    assert!(text.contains(&img.members()[2].sha256), "{text}");
    assert!(text.contains("\"mem_mib\": 256"), "{text}");

    let out = ironvmm(&[
        "image",
        "inspect",
        "--json",
        d.0.join("guest.img").to_str().unwrap(),
    ]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["members"][1]["name"], "vmlinux");
    assert_eq!(v["sha256"], img.sha256());
}

#[test]
fn the_same_inputs_give_the_same_image() {
    let d = scratch("repro");
    setup(&d.0);
    assert!(run_build(&d.0, &["--cmd", "true"]).status.success());
    let a = std::fs::read(d.0.join("guest.img")).unwrap();
    assert!(run_build(&d.0, &["--cmd", "true"]).status.success());
    assert_eq!(a, std::fs::read(d.0.join("guest.img")).unwrap());
}

#[test]
fn clear_errors() {
    let d = scratch("errors");
    setup(&d.0);
    let err = |extra: &[&str]| {
        let out = run_build(&d.0, extra);
        assert_eq!(out.status.code(), Some(125), "{extra:?}");
        assert!(
            !d.0.join("guest.img").exists(),
            "no image after a failed build"
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let init = format!("{}:/init", d.0.join("app/run.sh").display());
    assert!(err(&["--cmd", "x", "--add", &init]).contains("cannot replace /init"));
    assert!(err(&["--cmd", "x", "--add", "nocolon"]).contains("SRC:DST"));
    assert!(err(&["--cmd", "x", "--cpus", "9"]).contains("cpus"));
    assert!(err(&["--cmd", "x", "--mem", "12Q"]).contains("unit"));
    assert!(err(&["--cmd", "x", "--env", "NOEQUALS"]).contains("K=V"));
    let missing = format!("{}:/x", d.0.join("nope").display());
    assert!(err(&["--cmd", "x", "--add", &missing]).contains("nope"));

    // A FIFO is refused by its type, alone or inside an added folder; it is never
    // opened (an open would wait for a writer and hang the build).
    let fifo_dir = d.0.join("withfifo");
    std::fs::create_dir(&fifo_dir).unwrap();
    let fifo = fifo_dir.join("pipe");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    let want = format!(
        "{}: is a FIFO; only files, directories and symlinks can go into an image",
        fifo.display()
    );
    for src in [&fifo, &fifo_dir] {
        let add = format!("{}:/p", src.display());
        let e = err(&["--cmd", "x", "--add", &add]);
        assert!(e.contains(&want), "{e}");
    }
    std::fs::remove_dir_all(&fifo_dir).unwrap();

    std::fs::write(d.0.join("vmlinux"), b"not a kernel").unwrap();
    assert!(err(&["--cmd", "x"]).contains("neither an ELF vmlinux nor a bzImage"));
    std::fs::write(d.0.join("vmlinux"), fake_static_elf(2)).unwrap();

    std::fs::write(d.0.join("busybox"), fake_dynamic_elf()).unwrap();
    let e = err(&["--cmd", "x"]);
    assert!(
        e.contains("dynamically linked") && e.contains("busybox-static"),
        "{e}"
    );
    std::fs::write(d.0.join("busybox"), fake_static_elf(2)).unwrap();

    std::fs::remove_file(d.0.join("bin/iron")).unwrap();
    let e = err(&["--cmd", "x"]);
    assert!(
        e.contains("scripts/build-guest.sh") && e.contains("--guest-bin"),
        "{e}"
    );
}

#[test]
fn inspect_of_a_bad_image_exits_126() {
    let d = scratch("inspect");
    std::fs::write(d.0.join("bad.img"), b"garbage").unwrap();
    let out = ironvmm(&["image", "inspect", d.0.join("bad.img").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(126));
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad.img"));
}

#[test]
fn copy_in_defaults_and_cap() {
    let d = scratch("copyin");
    setup(&d.0);
    let dir = d.0.join("app").display().to_string();
    let file = d.0.join("app/run.sh").display().to_string();
    assert_eq!(CopyIn::parse(&dir).unwrap().dst, "/work");
    assert_eq!(CopyIn::parse(&file).unwrap().dst, "/work/run.sh");
    assert_eq!(CopyIn::parse(&format!("{dir}:/data")).unwrap().dst, "/data");
    assert!(CopyIn::parse(&format!("{dir}:/a/../b")).is_err());

    let items = [
        CopyIn::parse(&dir).unwrap(),
        CopyIn::parse(&format!("{file}:/opt/run")).unwrap(),
    ];
    let archive = copy_in_cpio(&items, 1 << 20).unwrap();
    assert_eq!(
        archive.len() % cpio::BLOCK,
        0,
        "appendable to another archive"
    );
    let names: Vec<String> = cpio::parse(&archive, false)
        .unwrap()
        .iter()
        .map(|e| e.name_str())
        .collect();
    assert_eq!(
        names,
        [
            "opt",
            "opt/run",
            "work",
            "work/lib",
            "work/lib/data.txt",
            "work/run.sh"
        ]
    );
    let e = copy_in_cpio(&items, 1000).unwrap_err().to_string();
    assert!(e.contains("half of --mem"), "{e}");
}
