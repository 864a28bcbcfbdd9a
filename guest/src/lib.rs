//! Shared by the guest binaries: the wire constants they speak to the VMM, and
//! the logic of `ironinit` and `iron` that can be tested on the host.
//!
//! - `agent`   ironinit's view of the manifest: argv, environment, working directory
//! - `status`  status-port values and how a wait status becomes an exit status
//! - `conn`    connecting to the gate: AF_VSOCK, or a Unix socket for host tests
//! - `rpc`     the JSON-lines MCP client and `iron call`'s exit codes
//! - `stats`   latency statistics for `iron bench`

pub mod agent;
pub mod conn;
pub mod rpc;
pub mod stats;
pub mod status;

/// The status port (interfaces.md): a 32-bit PIO register written with `outl`.
pub const STATUS_PORT: u16 = 0x501;
/// "BOOT": ironinit started.
pub const STATUS_BOOT: u32 = 0x424F_4F54;
/// "AGST": the agent was started.
pub const STATUS_AGENT_STARTED: u32 = 0x4147_5354;
/// `STATUS_EXIT | status`: the agent exited with `status` (0–255).
pub const STATUS_EXIT: u32 = 0x4558_0000;
/// The host's vsock CID, and the gate's port for tool calls.
pub const HOST_CID: u32 = 2;
pub const TOOLS_PORT: u32 = 1;
pub const NET_PORT: u32 = 2;

/// Where the image builder puts the manifest copy that ironinit reads.
/// vmm/src/image/mod.rs (`GUEST_MANIFEST_PATH`) holds the same path.
pub const MANIFEST_PATH: &str = "/etc/ironvmm/manifest.json";
/// The MCP protocol version spoken on port 1.
pub const PROTOCOL_VERSION: &str = "2025-06-18";
/// Environment variable that overrides where `iron` connects.
pub const GATE_ENV: &str = "IRON_GATE";
