//! The model route: `/llm/<provider>/<rest>` on the guest's proxy. The request is
//! read whole (bounded), decided as `llm.chat {provider, model, path}`, and sent on
//! by the llm service to the provider's `base_url` + `<rest>` with the host's key in
//! place of the guest's dummy one. The response is relayed as it arrives (a
//! `text/event-stream` passes through event by event), the key redacted from it,
//! and the usage it reports spent from the run's `[llm.budget]`.

use std::io::{BufReader, Read, Write};
use std::time::Instant;

use serde_json::{Map, Value};

use super::body::{self, copy_body, Encode};
use super::head::{is_hop_by_hop, RequestHead};
use super::pipe::PipeReader;
use super::relay::{Next, Relay};
use crate::gate::Call;
use crate::services::llm::{RouteRequest, UsageMeter};

/// Most bytes of a request body the route reads (a long conversation with its
/// tools fits; a body past it is refused, not truncated).
pub const MAX_MODEL_BODY: usize = 8 * 1024 * 1024;

/// As `llm.chat`'s schema has it: the name is written to the audit log.
const MAX_MODEL_NAME: usize = 256;

/// Response headers the host writes itself (the framing to the guest is its own).
const REFRAMED: [&str; 3] = ["content-length", "transfer-encoding", "connection"];

impl Relay {
    pub(super) fn model(
        &self,
        guest: &mut BufReader<PipeReader>,
        head: &RequestHead,
        provider: &str,
        rest: &str,
    ) -> Next {
        let framing = match body::request_framing(&head.headers) {
            Ok(f) => f,
            Err(e) => return self.answer(400, "Bad Request", &e.to_string()),
        };
        // The body is read before the decision (the model is in it): a client
        // waiting for leave to send it gets it now.
        if head.headers.has_token("expect", "100-continue")
            && framing != body::Framing::Empty
            && self
                .writer()
                .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                .is_err()
        {
            return Next::Close;
        }
        let mut req_body = Vec::new();
        let mut total = 0usize;
        let too_large = format!("a model request body is limited to {MAX_MODEL_BODY} bytes");
        let read = copy_body(framing, Encode::Raw, guest, &mut req_body, |n| {
            // Checked before the piece is kept: memory stays bounded.
            total += n;
            if total > MAX_MODEL_BODY {
                return Err(too_large.clone());
            }
            self.charge(n)
        });
        match read {
            Ok(_) => {}
            Err(_) if total > MAX_MODEL_BODY => {
                return self.answer(413, "Content Too Large", &too_large)
            }
            Err(body::BodyError::Refused(why)) => return self.answer(403, "Forbidden", &why),
            Err(e) => return self.answer(400, "Bad Request", &format!("the request body: {e}")),
        }
        let model = serde_json::from_slice::<Value>(&req_body)
            .ok()
            .and_then(|v| v.get("model").and_then(Value::as_str).map(str::to_string));
        if model.as_ref().is_some_and(|m| m.len() > MAX_MODEL_NAME) {
            return self.answer(
                400,
                "Bad Request",
                &format!("the body's \"model\" is over {MAX_MODEL_NAME} bytes"),
            );
        }
        let mut args = Map::new();
        args.insert("provider".into(), provider.into());
        if let Some(m) = &model {
            args.insert("model".into(), m.as_str().into());
        }
        args.insert("path".into(), rest.into());
        let call = Call {
            tool: "llm.chat".into(),
            args: Value::Object(args),
        };
        let what = format!("llm.chat {provider} {}", model.as_deref().unwrap_or("-"));
        let Some(llm) = &self.svc.llm else {
            let why = "the model route: no [[llm.providers]] in ironvmm.toml";
            self.svc.gate.deny_direct(&self.conn, &call, why);
            return self.denied(&what, None, "invariant", why);
        };
        let seq = match self.decide(&call, &what) {
            Ok(seq) => seq,
            Err(next) => return next,
        };
        let t0 = Instant::now();
        let headers: Vec<(String, String)> = head
            .headers
            .0
            .iter()
            .filter(|h| !is_hop_by_hop(&h.name, &head.headers))
            .map(|h| (h.name.clone(), h.value.clone()))
            .collect();
        let sent = req_body.len() as u64;
        let resp = match llm.send_route(&RouteRequest {
            provider,
            model: model.as_deref().unwrap_or_default(),
            method: &head.method,
            rest,
            headers: &headers,
            body: &req_body,
        }) {
            Ok(r) => r,
            Err(e) => {
                let detail = e.to_string();
                self.outcome(seq, t0, 0, 0, Some(detail.clone()));
                let (status, reason) = e.status();
                return self.answer(status, reason, &detail);
            }
        };
        let model = model.unwrap_or_default();
        let content_type = resp
            .headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("content-type"))
            .map(|(_, v)| v.as_str());
        let mut meter = UsageMeter::new(content_type, req_body.len());
        let mut redactor = llm.redactor(provider);
        let bodiless = head.method == "HEAD" || matches!(resp.status, 100..=199 | 204 | 304);
        let mut out = self.writer();
        let mut h = format!("HTTP/1.1 {} {}\r\n", resp.status, resp.reason);
        for (n, v) in &resp.headers {
            let lower = n.to_ascii_lowercase();
            if REFRAMED.contains(&lower.as_str()) || lower == "keep-alive" {
                continue;
            }
            let mut value = redactor.push(v.as_bytes());
            value.extend(redactor.finish());
            h.push_str(&format!("{n}: {}\r\n", String::from_utf8_lossy(&value)));
        }
        if !bodiless {
            h.push_str("Transfer-Encoding: chunked\r\n");
        }
        h.push_str("Connection: close\r\n\r\n");
        let mut received = 0u64;
        let mut failed: Option<String> = None;
        if out
            .write_all(h.as_bytes())
            .and_then(|_| out.flush())
            .is_err()
        {
            failed = Some("writing to the guest: it went away".into());
        }
        let mut reader = resp.body;
        let mut buf = vec![0u8; 16 * 1024];
        while failed.is_none() && !bodiless {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    failed = Some(format!("reading the provider's response: {e}"));
                    break;
                }
            };
            meter.feed(&buf[..n]);
            received += n as u64;
            let piece = redactor.push(&buf[..n]);
            if write_chunk(&mut out, &piece).is_err() {
                failed = Some("writing to the guest: it went away".into());
            }
        }
        if failed.is_none() && !bodiless {
            let tail = redactor.finish();
            if write_chunk(&mut out, &tail)
                .and_then(|_| out.write_all(b"0\r\n\r\n"))
                .and_then(|_| out.flush())
                .is_err()
            {
                failed = Some("writing to the guest: it went away".into());
            }
        }
        let status_failed =
            (!(200..300).contains(&resp.status)).then(|| format!("HTTP {}", resp.status));
        let error = failed.clone().or(status_failed);
        llm.account_route(provider, &model, meter, t0, error.as_deref());
        self.outcome(seq, t0, sent, received, failed);
        Next::Close
    }
}

/// One chunk of the response to the guest (nothing for no data: an empty chunk
/// would end the body).
fn write_chunk(out: &mut impl Write, data: &[u8]) -> std::io::Result<()> {
    if data.is_empty() {
        return Ok(());
    }
    out.write_all(format!("{:x}\r\n", data.len()).as_bytes())?;
    out.write_all(data)?;
    out.write_all(b"\r\n")?;
    // A stream's event reaches the guest now, not when a buffer fills.
    out.flush()
}
