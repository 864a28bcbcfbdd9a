//! Asking the model for one JSON answer, with a bounded repair loop: an answer that
//! is not JSON, has the wrong shape or fails the step's own check goes back to the
//! model with the reason, at most `max_repairs` times.

use serde::de::DeserializeOwned;

use crate::answer;
use crate::llm::{ChatRequest, Completer, LlmError, Message};

/// A checked answer and how many tries it took.
#[derive(Debug)]
pub struct Asked<T> {
    pub value: T,
    pub tries: u32,
    /// What was wrong with each rejected answer, in order.
    pub rejected: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error(transparent)]
    Llm(#[from] LlmError),
    #[error("no acceptable answer after {tries} tries; the last was rejected because: {last}")]
    GaveUp {
        step: String,
        tries: u32,
        last: String,
        rejected: Vec<String>,
    },
}

pub fn ask_json<T: DeserializeOwned>(
    llm: &mut dyn Completer,
    step: &str,
    system: String,
    messages: Vec<Message>,
    max_repairs: u32,
    mut check: impl FnMut(&T) -> Result<(), String>,
) -> Result<Asked<T>, StepError> {
    let mut req = ChatRequest {
        system,
        messages,
        schema: crate::schemas::for_step(step),
    };
    let mut rejected = Vec::new();
    for n in 0..=max_repairs {
        let text = llm.complete(step, &req)?;
        let why = match answer::parse::<T>(&text) {
            Ok(v) => match check(&v) {
                Ok(()) => {
                    return Ok(Asked {
                        value: v,
                        tries: n + 1,
                        rejected,
                    })
                }
                Err(why) => why,
            },
            Err(why) => why,
        };
        rejected.push(why.clone());
        req.messages.push(Message::assistant(text));
        req.messages.push(Message::user(format!(
            "Your answer was rejected:\n\n{why}\n\nAnswer again with the whole corrected JSON object, and nothing else."
        )));
    }
    Err(StepError::GaveUp {
        step: step.to_string(),
        tries: max_repairs + 1,
        last: rejected.last().cloned().unwrap_or_default(),
        rejected,
    })
}
