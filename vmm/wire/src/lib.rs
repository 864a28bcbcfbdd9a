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

/// Exit codes of `ironvmm boot` and `ironvmm run`: the agent's own status passes
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
    pub const OK: i32 = 0;
    /// A result whose `structuredContent.decision` is `deny`.
    pub const DENIED: i32 = 3;
    /// A tool error (`isError`) or a protocol error.
    pub const TOOL_ERROR: i32 = 4;
    /// The gate could not be reached.
    pub const UNREACHABLE: i32 = 5;
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
