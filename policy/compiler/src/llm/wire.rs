//! The two chat APIs on the wire: how a request is written and an answer read.

use serde_json::{json, Value};

use super::{ChatRequest, Role};
use crate::config::{LlmConfig, ProviderKind, StructuredOutput};

/// The name of the one tool an Anthropic model is made to call with its answer.
pub const ANSWER_TOOL: &str = "answer";

/// Headers (besides content-type) and the JSON body of one request.
pub struct WireRequest {
    pub url: String,
    pub headers: Vec<(&'static str, String)>,
    pub body: String,
}

pub fn build(cfg: &LlmConfig, req: &ChatRequest) -> WireRequest {
    let messages: Vec<Value> = req
        .messages
        .iter()
        .map(|m| json!({"role": role_name(m.role), "content": m.content}))
        .collect();
    let mut headers = Vec::new();
    let body = match cfg.provider {
        ProviderKind::OpenAi => {
            let mut all = vec![json!({"role": "system", "content": req.system})];
            all.extend(messages);
            let mut b = json!({"model": cfg.model, "messages": all, "max_tokens": cfg.max_tokens, "stream": false});
            if let Some(t) = cfg.temperature {
                b["temperature"] = json!(t);
                // Where the server supports it, a fixed seed makes sampling repeatable too.
                b["seed"] = json!(0);
            }
            if let Some(schema) = &req.schema {
                match cfg.structured {
                    StructuredOutput::JsonSchema => {
                        b["response_format"] = json!({"type": "json_schema", "json_schema":
                            {"name": "ironvmm_answer", "schema": schema, "strict": false}});
                    }
                    StructuredOutput::JsonObject => {
                        b["response_format"] = json!({"type": "json_object", "schema": schema});
                    }
                    StructuredOutput::Format => b["format"] = schema.clone(),
                    StructuredOutput::None => {}
                }
            }
            if let Some(k) = &cfg.api_key {
                headers.push(("authorization", format!("Bearer {}", k.expose())));
            }
            b
        }
        ProviderKind::Anthropic => {
            let mut b = json!({"model": cfg.model, "system": req.system, "messages": messages, "max_tokens": cfg.max_tokens});
            if let Some(t) = cfg.temperature {
                b["temperature"] = json!(t);
            }
            if let (Some(schema), false) = (&req.schema, cfg.structured == StructuredOutput::None) {
                b["tools"] = json!([{"name": ANSWER_TOOL,
                    "description": "Give your whole answer as this tool's input.",
                    "input_schema": schema}]);
                b["tool_choice"] = json!({"type": "tool", "name": ANSWER_TOOL});
            }
            headers.push(("anthropic-version", "2023-06-01".to_string()));
            if let Some(k) = &cfg.api_key {
                headers.push(("x-api-key", k.expose().to_string()));
            }
            b
        }
    };
    WireRequest {
        url: cfg.endpoint(),
        headers,
        body: body.to_string(),
    }
}

fn role_name(r: Role) -> &'static str {
    match r {
        Role::User => "user",
        Role::Assistant => "assistant",
    }
}

/// The answer's text, or why the body is not an answer of this API.
pub fn parse(provider: ProviderKind, body: &str) -> Result<String, String> {
    let v: Value =
        serde_json::from_str(body).map_err(|e| format!("the response body is not JSON ({e})"))?;
    // Some servers send `"error": null` beside a normal answer.
    if let Some(err) = v.get("error").filter(|e| !e.is_null()) {
        let msg = err
            .get("message")
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| err.to_string());
        return Err(format!("the provider answered with an error: {msg}"));
    }
    match provider {
        ProviderKind::OpenAi => {
            let keys = || match v.as_object() {
                Some(o) => o.keys().cloned().collect::<Vec<_>>().join(", "),
                None => "none: it is not an object".into(),
            };
            let choice = match v.get("choices") {
                None => {
                    return Err(format!(
                        "the chat-completions response has no `choices` (its keys: {}); is the base URL an \
                         OpenAI-compatible /v1 endpoint?",
                        keys()
                    ))
                }
                Some(c) => c
                    .get(0)
                    .ok_or("the chat-completions response has an empty `choices` array")?,
            };
            if choice.get("finish_reason").and_then(Value::as_str) == Some("length") {
                return Err("the answer was cut off at max_tokens (finish_reason \"length\"); raise [llm] max_tokens".into());
            }
            choice
                .get("message")
                .and_then(|m| m.get("content"))
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| "choices[0].message.content is missing or not a string".into())
        }
        ProviderKind::Anthropic => {
            if v.get("stop_reason").and_then(Value::as_str) == Some("max_tokens") {
                return Err("the answer was cut off at max_tokens (stop_reason \"max_tokens\"); raise [llm] max_tokens".into());
            }
            let blocks = v
                .get("content")
                .and_then(Value::as_array)
                .ok_or("no content array in the Messages response")?;
            // An answer given as the answer tool's input is the JSON itself.
            if let Some(input) = blocks
                .iter()
                .find(|b| {
                    b.get("type").and_then(Value::as_str) == Some("tool_use")
                        && b.get("name").and_then(Value::as_str) == Some(ANSWER_TOOL)
                })
                .and_then(|b| b.get("input"))
            {
                return Ok(input.to_string());
            }
            let text: String = blocks
                .iter()
                .filter(|b| b.get("type").and_then(Value::as_str) == Some("text"))
                .filter_map(|b| b.get("text").and_then(Value::as_str))
                .collect();
            if text.is_empty() {
                return Err("the Messages response has no text block".into());
            }
            Ok(text)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{LlmSettings, Secret};
    use crate::llm::Message;

    fn cfg(p: &str) -> LlmConfig {
        LlmSettings {
            provider: Some(p.into()),
            model: Some("m".into()),
            api_key: Some(Secret::new("k1")),
            ..Default::default()
        }
        .resolve(&|_| None)
        .unwrap()
    }

    fn req() -> ChatRequest {
        ChatRequest {
            system: "sys".into(),
            messages: vec![Message::user("hi")],
            schema: Some(json!({"type": "object"})),
        }
    }

    #[test]
    fn openai_shape() {
        let w = build(&cfg("openai"), &req());
        let b: Value = serde_json::from_str(&w.body).unwrap();
        assert_eq!(b["messages"][0]["role"], "system");
        assert_eq!(b["messages"][1]["content"], "hi");
        assert_eq!(b["temperature"], 0.0);
        assert_eq!(w.headers, vec![("authorization", "Bearer k1".to_string())]);
        assert_eq!(b["response_format"]["type"], "json_schema");
        assert_eq!(
            b["response_format"]["json_schema"]["schema"]["type"],
            "object"
        );
        let mut c = cfg("openai");
        c.structured = StructuredOutput::JsonObject;
        let b: Value = serde_json::from_str(&build(&c, &req()).body).unwrap();
        assert_eq!(
            b["response_format"],
            json!({"type": "json_object", "schema": {"type": "object"}})
        );
        c.structured = StructuredOutput::Format;
        let b: Value = serde_json::from_str(&build(&c, &req()).body).unwrap();
        assert_eq!(b["format"], json!({"type": "object"}));
        assert!(b.get("response_format").is_none());
        c.structured = StructuredOutput::None;
        let b: Value = serde_json::from_str(&build(&c, &req()).body).unwrap();
        assert!(b.get("format").is_none() && b.get("response_format").is_none());
        let ans = r#"{"choices":[{"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}]}"#;
        assert_eq!(parse(ProviderKind::OpenAi, ans).unwrap(), "ok");
        assert!(parse(
            ProviderKind::OpenAi,
            r#"{"choices":[{"message":{},"finish_reason":"length"}]}"#
        )
        .unwrap_err()
        .contains("max_tokens"));
    }

    #[test]
    fn an_answer_without_choices_is_named_as_such() {
        let e = parse(
            ProviderKind::OpenAi,
            r#"{"error":null,"object":"list","data":[]}"#,
        )
        .unwrap_err();
        assert!(
            e.contains("has no `choices` (its keys: error, object, data)"),
            "{e}"
        );
        assert!(!e.contains("null"), "{e}");
        let e = parse(
            ProviderKind::OpenAi,
            r#"{"error":{"message":"model not found","type":"invalid_request_error"}}"#,
        )
        .unwrap_err();
        assert_eq!(e, "the provider answered with an error: model not found");
        assert!(parse(ProviderKind::OpenAi, r#"{"choices":[]}"#)
            .unwrap_err()
            .contains("empty `choices`"));
    }

    #[test]
    fn anthropic_shape() {
        let w = build(&cfg("anthropic"), &req());
        let b: Value = serde_json::from_str(&w.body).unwrap();
        assert_eq!(b["system"], "sys");
        assert_eq!(b["messages"][0]["role"], "user");
        assert!(w.headers.contains(&("x-api-key", "k1".to_string())));
        assert_eq!(b["tools"][0]["input_schema"]["type"], "object");
        assert_eq!(b["tool_choice"]["name"], ANSWER_TOOL);
        let tool = r#"{"content":[{"type":"tool_use","id":"t1","name":"answer","input":{"rules":[]}}],"stop_reason":"tool_use"}"#;
        assert_eq!(
            parse(ProviderKind::Anthropic, tool).unwrap(),
            r#"{"rules":[]}"#
        );
        let ans = r#"{"content":[{"type":"text","text":"a"},{"type":"text","text":"b"}],"stop_reason":"end_turn"}"#;
        assert_eq!(parse(ProviderKind::Anthropic, ans).unwrap(), "ab");
        assert!(parse(ProviderKind::Anthropic, "<html>")
            .unwrap_err()
            .contains("not JSON"));
        assert!(parse(
            ProviderKind::Anthropic,
            r#"{"error":{"type":"overloaded"}}"#
        )
        .unwrap_err()
        .contains("overloaded"));
    }
}
