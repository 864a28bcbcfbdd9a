//! The JSON Schema of each step's answer, sent where the provider can constrain
//! its output to it (OpenAI `response_format`, llama.cpp and Ollama grammars or
//! `format`, an Anthropic tool's input schema), so that small local models stay
//! parseable. The compiler still checks every answer itself: a schema narrows what
//! a model can say, it is not trusted to have done so.

use serde_json::{json, Value};

fn verdict() -> Value {
    json!({"type": "string", "enum": ["allow", "ask", "deny"]})
}

fn call() -> Value {
    json!({"type": "object", "properties": {"tool": {"type": "string"}, "args": {"type": "object"}},
           "required": ["tool", "args"]})
}

fn scenario() -> Value {
    json!({"type": "object", "properties": {
        "sentence": {"type": "integer", "minimum": 0},
        "why": {"type": "string"},
        "call": call(),
        "expect": verdict()
    }, "required": ["sentence", "call", "expect"]})
}

/// The schema of the answer of `step`, if the step answers JSON.
pub fn for_step(step: &str) -> Option<Value> {
    let s = match step {
        "lists" => json!({"type": "object", "properties": {"lists": {"type": "array", "items": {
            "type": "object", "properties": {
                "name": {"type": "string", "pattern": "^[a-z][a-z0-9_]*$"},
                "kind": {"type": "string", "enum": ["email", "host", "path", "string"]},
                "sentence": {"type": "integer", "minimum": 1},
                "binding": {"type": "string", "enum": ["service", "owner"]},
                "service": {"type": ["string", "null"]},
                "entries": {"type": "array", "items": {"type": "string"}},
                "note": {"type": "string"}
            }, "required": ["name", "kind", "sentence", "binding"]}}},
            "required": ["lists"]}),
        "draft" | "repair" => json!({"type": "object", "properties": {
            "rules": {"type": "array", "items": {"type": "object", "properties": {
                "sentence": {"type": "integer", "minimum": 0},
                "rule": {"type": "string"}}, "required": ["sentence", "rule"]}},
            "default": verdict(),
            "default_sentence": {"type": "integer", "minimum": 1},
            "assumptions": {"type": "array", "items": {"type": "string"}}
        }, "required": ["rules", "default"]}),
        "scenarios" => json!({"type": "object", "properties": {
            "scenarios": {"type": "array", "items": scenario()},
            "uncovered": {"type": "array", "items": {"type": "object", "properties": {
                "sentence": {"type": "integer", "minimum": 1}, "why": {"type": "string"}},
                "required": ["sentence", "why"]}}
        }, "required": ["scenarios"]}),
        "recheck" => {
            json!({"type": "object", "properties": {"sentences": {"type": "array", "items": {
            "type": "object", "properties": {
                "sentence": {"type": "integer", "minimum": 1},
                "states_policy": {"type": "boolean"},
                "why": {"type": "string"},
                "scenarios": {"type": "array", "items": scenario()}
            }, "required": ["sentence", "states_policy", "why"]}}},
            "required": ["sentences"]})
        }
        "judge" => {
            json!({"type": "object", "properties": {"judgements": {"type": "array", "items": {
            "type": "object", "properties": {
                "scenario": {"type": "string"},
                "fault": {"type": "string", "enum": ["rule", "scenario"]},
                "why": {"type": "string"},
                "expect": verdict(),
                "call": call()
            }, "required": ["scenario", "fault", "why"]}}},
            "required": ["judgements"]})
        }
        "annotate" => json!({"type": "object", "properties": {"tools": {"type": "array", "items": {
            "type": "object", "properties": {
                "tool": {"type": "string"},
                "roles": {"type": "object", "additionalProperties": {"type": "object", "properties": {
                    "role": {"type": "string", "enum": ["path", "tree", "url", "host", "email"]},
                    "why": {"type": "string"}}, "required": ["role"]}}
            }, "required": ["tool", "roles"]}}},
            "required": ["tools"]}),
        "refine" => json!({"type": "object", "properties": {
            "constitution": {"type": "string"},
            "changes": {"type": "array", "items": {"type": "object", "properties": {
                "why": {"type": "string"}, "evidence": {"type": "string"}}}}
        }, "required": ["constitution"]}),
        _ => return None,
    };
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_step_that_answers_json_has_a_schema() {
        for step in [
            "lists",
            "draft",
            "repair",
            "scenarios",
            "recheck",
            "judge",
            "refine",
            "annotate",
        ] {
            let s = for_step(step).unwrap();
            assert_eq!(s["type"], "object", "{step}");
            assert!(
                s["required"].as_array().is_some_and(|r| !r.is_empty()),
                "{step}"
            );
        }
        assert!(for_step("nope").is_none());
    }
}
