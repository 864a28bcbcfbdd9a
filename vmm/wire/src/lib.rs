//! What the guest and the VMM must agree on, written once. Both `ironvmm-guest`
//! and the VMM crates depend on this crate, and it depends on nothing, so a
//! constant can never drift between the two sides of the vsock.

/// The status port: a 32-bit PIO register written with `outl`.
pub const STATUS_PORT: u16 = 0x501;
/// "BOOT": ironinit started.
pub const STATUS_BOOT: u32 = 0x424F_4F54;
/// "AGST": the agent was started.
pub const STATUS_AGENT_STARTED: u32 = 0x4147_5354;
/// `STATUS_EXIT | status`: the agent exited with `status` (0–255).
pub const STATUS_EXIT: u32 = 0x4558_0000;
/// `value & STATUS_EXIT_MASK == STATUS_EXIT` for exactly the 256 exit values.
pub const STATUS_EXIT_MASK: u32 = 0xFFFF_FF00;

/// The host's vsock CID.
pub const HOST_CID: u32 = 2;
/// The guest's vsock CID unless configured otherwise.
pub const DEFAULT_GUEST_CID: u32 = 3;
/// The host port of tool calls (MCP over JSON lines).
pub const TOOLS_PORT: u32 = 1;
/// The host port of network egress (CONNECT or HTTP request heads).
pub const NET_PORT: u32 = 2;

/// Where the image builder puts the manifest copy that ironinit reads.
pub const MANIFEST_PATH: &str = "/etc/ironvmm/manifest.json";

/// The largest frame (one JSON-RPC line) by default, newline excluded.
pub const DEFAULT_MAX_FRAME: usize = 1 << 20;

/// MCP protocol revisions the gate speaks, oldest first; the last is the newest.
pub const PROTOCOL_VERSIONS: &[&str] = &["2025-06-18", "2025-11-25"];
/// The newest MCP revision (what a client that asks for none, or an unknown one, gets).
pub const PROTOCOL_VERSION: &str = PROTOCOL_VERSIONS[PROTOCOL_VERSIONS.len() - 1];

/// JSON-RPC 2.0 error codes used on port 1.
pub mod rpc_code {
    pub const PARSE_ERROR: i64 = -32700;
    pub const INVALID_REQUEST: i64 = -32600;
    pub const METHOD_NOT_FOUND: i64 = -32601;
    pub const INVALID_PARAMS: i64 = -32602;
}

/// Exit codes of `ironvmm boot` (docs/exit-codes.md): the agent's own status passes
/// through, ironvmm's own conditions take 124 and up (as `timeout` and `docker run`).
pub mod exit {
    /// `--timeout` expired.
    pub const TIMEOUT: u8 = 124;
    /// ironvmm could not run or had to stop (no KVM, bad flags, I/O, audit log failure).
    pub const VMM_ERROR: u8 = 125;
    /// The image is invalid, or the guest kernel could not be loaded.
    pub const BAD_IMAGE: u8 = 126;
    /// The policy is invalid.
    pub const BAD_POLICY: u8 = 127;
    /// The guest crashed: panic, triple fault, reset or halt before an exit status.
    pub const GUEST_CRASH: u8 = 128;
    /// Stopped by Ctrl-C.
    pub const INTERRUPTED: u8 = 130;
}

/// Exit codes of `iron call` in the guest.
pub mod iron_exit {
    pub const OK: u8 = 0;
    /// A result whose `structuredContent.decision` is `deny`.
    pub const DENIED: u8 = 3;
    /// A tool error (`isError`) or a protocol error (and bad usage).
    pub const TOOL_ERROR: u8 = 4;
    /// The gate could not be reached.
    pub const UNREACHABLE: u8 = 5;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_words_spell_their_names() {
        assert_eq!(&STATUS_BOOT.to_be_bytes(), b"BOOT");
        assert_eq!(&STATUS_AGENT_STARTED.to_be_bytes(), b"AGST");
        assert_eq!(&STATUS_EXIT.to_be_bytes()[..2], b"EX");
        assert_eq!((STATUS_EXIT | 255) & STATUS_EXIT_MASK, STATUS_EXIT);
        assert_ne!((STATUS_EXIT | 256) & STATUS_EXIT_MASK, STATUS_EXIT);
    }

    #[test]
    fn newest_protocol_is_last() {
        assert_eq!(PROTOCOL_VERSION, "2025-11-25");
        assert!(PROTOCOL_VERSIONS.windows(2).all(|w| w[0] < w[1]));
    }
}

/// Guest-supplied text made safe for a terminal, written once for every human-facing
/// output on both sides (audit show and stats, image inspect, console summaries).
pub mod text {
    use std::borrow::Cow;
    use std::fmt::Write;

    /// Longest field the tables print before cutting it (visibly).
    pub const MAX_FIELD: usize = 200;

    fn needs_escape(c: char) -> bool {
        c.is_control()
            || c == '\\'
            // Bidirectional overrides and isolates reorder what follows them on screen.
            || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{200e}' | '\u{200f}')
    }

    /// `s` with every control character (C0, DEL, C1), bidi control and backslash
    /// escaped (`\n`, `\r`, `\t`, `\\`, `\x1b`, `\u{202e}`), and cut after
    /// `max_chars` characters with `…[+N chars]`, so a guest string can neither
    /// forge a row, move the cursor, retitle the terminal, nor flood the screen.
    pub fn escape(s: &str, max_chars: usize) -> Cow<'_, str> {
        let long = s.chars().nth(max_chars).is_some();
        if !long && !s.chars().any(needs_escape) {
            return Cow::Borrowed(s);
        }
        let mut out = String::with_capacity(s.len().min(max_chars * 4) + 16);
        for c in s.chars().take(max_chars) {
            match c {
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\\' => out.push_str("\\\\"),
                c if needs_escape(c) && (c as u32) < 0x100 => {
                    let _ = write!(out, "\\x{:02x}", c as u32);
                }
                c if needs_escape(c) => {
                    let _ = write!(out, "\\u{{{:x}}}", c as u32);
                }
                c => out.push(c),
            }
        }
        if long {
            let rest = s.chars().count() - max_chars;
            let _ = write!(out, "…[+{rest} chars]");
        }
        Cow::Owned(out)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn controls_are_escaped_and_long_text_cut() {
            assert_eq!(escape("fs.read", 10), "fs.read");
            assert_eq!(
                escape("a\nallow\r\x1b]0;x\x07\x1b[2J\\\u{202e}\u{9b}", 100),
                "a\\nallow\\r\\x1b]0;x\\x07\\x1b[2J\\\\\\u{202e}\\x9b"
            );
            let long = "é".repeat(70_000);
            let e = escape(&long, 5);
            assert_eq!(e, "ééééé…[+69995 chars]");
        }
    }
}
