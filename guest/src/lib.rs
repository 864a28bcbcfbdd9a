//! Shared by the guest binaries: the wire constants they speak to the VMM, and
//! the logic of `ironinit` and `iron` that can be tested on the host.
//!
//! - `agent`   ironinit's view of the manifest: argv, environment, working directory
//! - `agent_loop` `iron agent`: the model through `llm.chat`, tool calls through the gate
//! - `status`  status-port values and how a wait status becomes an exit status
//! - `conn`    connecting to the gate: AF_VSOCK, or a Unix socket for host tests
//! - `rpc`     the JSON-lines MCP client and `iron call`'s exit codes
//! - `proxy`   `iron proxy`: TCP connections relayed to the host's port 2
//! - `stats`   latency statistics for `iron bench`

pub mod agent;
pub mod agent_loop;
pub mod conn;
pub mod proxy;
pub mod rpc;
pub mod stats;
pub mod status;

pub use ironvmm_wire::{
    HOST_CID, MANIFEST_PATH, NET_PORT, PROTOCOL_VERSION, STATUS_AGENT_STARTED, STATUS_BOOT,
    STATUS_EXIT, STATUS_PORT, TOOLS_PORT,
};
/// Environment variable that overrides where `iron` connects.
pub const GATE_ENV: &str = "IRON_GATE";
