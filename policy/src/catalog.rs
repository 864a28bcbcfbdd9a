//! The tool catalog: which tools exist, their argument schemas, and which arguments
//! are paths, URLs, hosts or email addresses (their roles drive normalisation).
//!
//! File format (`--catalog FILE`, and exactly what `ironvmm tools --json` prints):
//! ```json
//! {"tools": [
//!   {"name": "fs.read",
//!    "description": "Read a file of the workspace",
//!    "inputSchema": {"type": "object", "properties": {"path": {"type": "string"}},
//!                    "required": ["path"], "additionalProperties": false},
//!    "roles": {"path": "path"}}
//! ]}
//! ```
//! `roles` maps a top-level argument name to one of `path`, `url`, `host`, `email`.
//! An argument that is an array of such values has the role applied to each element.
