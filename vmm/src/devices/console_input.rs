//! The console's other direction: the user's keystrokes into the guest's serial
//! port, and a periodic flush so prompts without a newline still show.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use super::bus::{lock, SerialDevice};
use crate::approvals::tty::TerminalShare;

/// The terminal state to restore at exit, when stdin was a terminal.
static SAVED_TERMIOS: Mutex<Option<libc::termios>> = Mutex::new(None);

/// Puts a terminal stdin into character mode without echo. Signals stay on, so
/// Ctrl-C still reaches ironvmm (there is no escape key).
pub fn enter_char_mode() {
    // SAFETY: plain termios calls on fd 0 with a zeroed, then kernel-filled struct.
    unsafe {
        if libc::isatty(0) != 1 {
            return;
        }
        let mut t: libc::termios = std::mem::zeroed();
        if libc::tcgetattr(0, &mut t) != 0 {
            return;
        }
        *SAVED_TERMIOS.lock().unwrap_or_else(|p| p.into_inner()) = Some(t);
        t.c_lflag &= !(libc::ICANON | libc::ECHO);
        t.c_cc[libc::VMIN] = 1;
        t.c_cc[libc::VTIME] = 0;
        libc::tcsetattr(0, libc::TCSANOW, &t);
    }
}

/// Restores the terminal as it was; safe to call more than once.
pub fn restore_terminal() {
    if let Some(t) = SAVED_TERMIOS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
    {
        // SAFETY: restoring a termios we read from the same fd.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &t) };
    }
}

/// The console thread, stopped and joined with `stop` (within one 20 ms round).
pub struct ConsoleThread {
    stop: Arc<AtomicBool>,
    handle: Option<thread::JoinHandle<()>>,
}

impl ConsoleThread {
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Starts the thread that feeds stdin (when `forward_stdin`) into the serial port
/// and flushes console output every 20 ms. With a terminal approver (`share`), keys
/// typed while it asks go to it, never to the guest.
pub fn spawn(
    serial: Arc<Mutex<SerialDevice>>,
    forward_stdin: bool,
    share: Option<Arc<TerminalShare>>,
) -> ConsoleThread {
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = Arc::clone(&stop);
    let handle = thread::Builder::new()
        .name("console".into())
        .spawn(move || {
            // Guest console output passes through here: confined before it does.
            if let Err(e) = ironvmm_seccomp::install(ironvmm_seccomp::ThreadRole::Device) {
                eprintln!("ironvmm: console thread not started: {e}");
                return;
            }
            let mut pending: Vec<u8> = Vec::new();
            let mut stdin_open = forward_stdin;
            let mut buf = [0u8; 256];
            while !stopped.load(Ordering::Relaxed) {
                // Keys typed before a question goes up must never answer it: they
                // are discarded when it goes up (the approver's hook), and a read
                // that began before it goes to the guest.
                let held = share.as_ref().is_some_and(|s| s.is_held());
                // While a question is up keys are read even if the guest does not
                // take its input: a guest must not be able to block the answer.
                if stdin_open && (pending.is_empty() || held) {
                    let mut pfd = libc::pollfd {
                        fd: 0,
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd.
                    let n = unsafe { libc::poll(&mut pfd, 1, 20) };
                    if n > 0 {
                        // SAFETY: reading into a live buffer of the given length.
                        let r = unsafe { libc::read(0, buf.as_mut_ptr().cast(), buf.len()) };
                        if r <= 0 {
                            stdin_open = false;
                        } else {
                            let keys = &buf[..r as usize];
                            let keys = match &share {
                                Some(s) if held => s.keys(keys),
                                _ => keys,
                            };
                            pending.extend_from_slice(keys);
                        }
                    }
                } else {
                    thread::sleep(Duration::from_millis(20));
                }
                let mut s = lock(&serial);
                if !pending.is_empty() {
                    // The UART FIFO is small: what does not fit waits for the next round.
                    if let Ok(n) = s.enqueue_raw_bytes(&pending) {
                        pending.drain(..n);
                    }
                }
                if s.writer().has_pending() {
                    let _ = s.writer_mut().flush_console();
                }
            }
        })
        .ok();
    ConsoleThread { stop, handle }
}
