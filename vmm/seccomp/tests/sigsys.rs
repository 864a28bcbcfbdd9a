//! A forbidden syscall kills the process with SIGSYS; allowed ones still work.
//! Each case runs in a child process (this test binary, re-run on one test with
//! IRONVMM_SECCOMP_CHILD set), because a filter cannot be removed once installed.

use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Output};

use ironvmm_seccomp::{install_with, Setting, ThreadRole};

const CHILD: &str = "IRONVMM_SECCOMP_CHILD";

/// Runs `case` in a child: this binary, only the `child` test, with the env var.
fn in_child(case: &str) -> Output {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child", "--nocapture", "--test-threads=1"])
        .env(CHILD, case)
        .output()
        .unwrap()
}

fn killed_by_sigsys(o: &Output) -> bool {
    o.status.signal() == Some(libc::SIGSYS)
}

/// The child side. Without the env var (a normal test run) it does nothing.
#[test]
fn child() {
    let Ok(case) = std::env::var(CHILD) else {
        return;
    };
    let role_setting = |role, s| install_with(role, s).expect("install");
    // SAFETY: plain syscalls on values made here; the process ends in `_exit`
    // right after, with no Rust state to unwind.
    unsafe {
        match case.as_str() {
            "vcpu-socket" => {
                role_setting(ThreadRole::Vcpu, Setting::On);
                libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
            }
            "vcpu-write" => {
                role_setting(ThreadRole::Vcpu, Setting::On);
                let msg = b"still alive\n";
                libc::write(1, msg.as_ptr().cast(), msg.len());
                let v = vec![7u8; 1 << 20]; // allocation still works
                libc::_exit(i32::from(v[12345]));
            }
            "vcpu-open" => {
                role_setting(ThreadRole::Vcpu, Setting::On);
                libc::open(c"/etc/hostname".as_ptr(), libc::O_RDONLY);
            }
            "vcpu-ioctl-not-kvm-run" => {
                role_setting(ThreadRole::Vcpu, Setting::On);
                let mut t: libc::termios = std::mem::zeroed();
                libc::ioctl(0, libc::TCGETS, &mut t);
            }
            "worker-exec" => {
                role_setting(ThreadRole::Worker, Setting::On);
                let argv = [c"/bin/true".as_ptr(), std::ptr::null()];
                libc::execv(c"/bin/true".as_ptr(), argv.as_ptr());
            }
            "worker-raw-socket" => {
                role_setting(ThreadRole::Worker, Setting::On);
                libc::socket(libc::AF_NETLINK, libc::SOCK_RAW, 0);
            }
            "worker-inet-socket" => {
                // The http and mail services: a TCP socket, made non-blocking as
                // std's connect_timeout does.
                role_setting(ThreadRole::Worker, Setting::On);
                let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
                let mut on: libc::c_int = 1;
                let r = libc::ioctl(fd, libc::FIONBIO, &mut on);
                libc::_exit(if fd >= 0 && r == 0 { 6 } else { 1 });
            }
            "main-inet-socket" => {
                role_setting(ThreadRole::Main, Setting::On);
                libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
            }
            "main-exec" => {
                role_setting(ThreadRole::Main, Setting::On);
                let argv = [c"/bin/true".as_ptr(), std::ptr::null()];
                libc::execv(c"/bin/true".as_ptr(), argv.as_ptr());
            }
            "device-socket" => {
                role_setting(ThreadRole::Device, Setting::On);
                libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
            }
            "control-socket" => {
                role_setting(ThreadRole::Control, Setting::On);
                libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
            }
            "main-kick" => {
                libc::signal(libc::SIGRTMIN(), libc::SIG_IGN);
                role_setting(ThreadRole::Main, Setting::On);
                let r = libc::syscall(
                    libc::SYS_tgkill,
                    libc::getpid(),
                    libc::gettid(),
                    libc::SIGRTMIN(),
                );
                libc::_exit(if r == 0 { 5 } else { 1 });
            }
            "main-other-signal" => {
                libc::signal(libc::SIGUSR1, libc::SIG_IGN);
                role_setting(ThreadRole::Main, Setting::On);
                libc::syscall(
                    libc::SYS_tgkill,
                    libc::getpid(),
                    libc::gettid(),
                    libc::SIGUSR1,
                );
            }
            "log-socket" => {
                role_setting(ThreadRole::Vcpu, Setting::Log);
                let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
                libc::_exit(if fd >= 0 { 42 } else { 1 });
            }
            "jail-drop" => {
                // `--jail`: a confined thread repeats the drop glibc broadcasts.
                ironvmm_seccomp::allow_credential_drop(65534, 65534);
                let (tx, rx) = std::sync::mpsc::channel::<()>();
                let (tid_tx, tid_rx) = std::sync::mpsc::channel::<i32>();
                std::thread::spawn(move || {
                    install_with(ThreadRole::Worker, Setting::On).expect("install");
                    let _ = tid_tx.send(libc::gettid());
                    let _ = rx.recv();
                });
                let tid = tid_rx.recv().unwrap_or(0);
                let ok = libc::setgroups(0, std::ptr::null()) == 0
                    && libc::setresgid(65534, 65534, 65534) == 0
                    && libc::setresuid(65534, 65534, 65534) == 0;
                // The confined thread's own credentials, as the kernel has them.
                let status = std::fs::read_to_string(format!("/proc/self/task/{tid}/status"))
                    .unwrap_or_default();
                let theirs = status.lines().any(|l| {
                    l.split_whitespace().collect::<Vec<_>>()
                        == ["Uid:", "65534", "65534", "65534", "65534"]
                });
                let _ = tx.send(());
                libc::_exit(if ok && theirs { 8 } else { 1 });
            }
            "jail-drop-other-uid" => {
                // Only the jail's values pass: any other uid is still forbidden.
                ironvmm_seccomp::allow_credential_drop(65534, 65534);
                role_setting(ThreadRole::Worker, Setting::On);
                libc::syscall(libc::SYS_setresuid, 1000, 1000, 1000);
            }
            other => panic!("unknown case {other}"),
        }
        // Reached only if the forbidden call was let through.
        libc::_exit(99);
    }
}

#[test]
fn forbidden_syscalls_kill_the_process() {
    for case in [
        "vcpu-socket",
        "vcpu-open",
        "vcpu-ioctl-not-kvm-run",
        "worker-exec",
        "worker-raw-socket",
        "main-exec",
        "device-socket",
        "control-socket",
        "main-other-signal",
        "main-inet-socket",
        "jail-drop-other-uid",
    ] {
        let o = in_child(case);
        assert!(
            killed_by_sigsys(&o),
            "{case}: {:?}\n{}",
            o.status,
            String::from_utf8_lossy(&o.stdout)
        );
    }
}

#[test]
fn allowed_syscalls_still_work() {
    let o = in_child("vcpu-write");
    assert_eq!(o.status.code(), Some(7), "{:?}", o.status);
    assert!(String::from_utf8_lossy(&o.stdout).contains("still alive"));
    let o = in_child("worker-inet-socket");
    assert_eq!(o.status.code(), Some(6), "{:?}", o.status);
}

#[test]
fn main_may_kick_its_threads_with_the_kick_signal_only() {
    let o = in_child("main-kick");
    assert_eq!(o.status.code(), Some(5), "{:?}", o.status);
}

#[test]
fn log_mode_lets_the_call_through() {
    let o = in_child("log-socket");
    assert_eq!(o.status.code(), Some(42), "{:?}", o.status);
}

/// `--jail` drops the uid of every thread (glibc repeats the call in each), the
/// confined ones included: their filters let exactly the jail's values through.
#[test]
fn a_confined_thread_follows_the_jails_credential_drop() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: dropping to another uid needs root (CI runs as root)");
        return;
    }
    let o = in_child("jail-drop");
    assert_eq!(
        o.status.code(),
        Some(8),
        "{:?}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
}
