//! What is sent to a model: a system prompt and the conversation so far. Its own
//! module because both the client (`llm`) and the answer cache (`cache`, which keys
//! requests) need it, and neither should need the other for it.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    User,
    Assistant,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub role: Role,
    pub content: String,
}

impl Message {
    pub fn user(s: impl Into<String>) -> Self {
        Self {
            role: Role::User,
            content: s.into(),
        }
    }
    pub fn assistant(s: impl Into<String>) -> Self {
        Self {
            role: Role::Assistant,
            content: s.into(),
        }
    }
}

/// One chat request: a system prompt and the conversation so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatRequest {
    pub system: String,
    pub messages: Vec<Message>,
    /// The JSON Schema the answer must follow, where the provider can enforce it.
    /// Not part of the cache key: it is fixed by the step, and every prompt change
    /// bumps the prompt version.
    pub schema: Option<serde_json::Value>,
}
