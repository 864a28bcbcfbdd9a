//! Shared by the guest binaries: the wire constants they speak to the VMM.

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
