//! One POST with bounded retries: 429, 5xx and transport errors (refused, reset,
//! timed out) are retried with exponential backoff; anything else fails at once.

use std::io::Read;
use std::thread::sleep;
use std::time::{Duration, Instant};

use super::wire::WireRequest;
use super::LlmError;
use crate::config::LlmConfig;

/// Longest answer body read; a bigger one is an error, not an allocation.
pub const MAX_BODY: u64 = 8 << 20;

/// What happened on one attempt, for the exchange log.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Attempt {
    pub status: Option<u16>,
    pub error: Option<String>,
    pub ms: u64,
}

pub fn agent(cfg: &LlmConfig) -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout_connect(cfg.connect_timeout)
        .timeout(cfg.timeout)
        .redirects(0)
        .build()
}

pub fn post(
    agent: &ureq::Agent,
    cfg: &LlmConfig,
    w: &WireRequest,
    attempts: &mut Vec<Attempt>,
) -> Result<String, LlmError> {
    let tries = cfg.max_retries + 1;
    for n in 0..tries {
        let t0 = Instant::now();
        let mut req = agent.post(&w.url).set("content-type", "application/json");
        for (k, v) in &w.headers {
            req = req.set(k, v);
        }
        let (retry, wait_hint, why) = match req.send_string(&w.body) {
            Ok(resp) => {
                let status = resp.status();
                let body = read_body(resp);
                attempts.push(Attempt {
                    status: Some(status),
                    error: body.as_ref().err().cloned(),
                    ms: t0.elapsed().as_millis() as u64,
                });
                match body {
                    Ok(b) => return Ok(b),
                    // A body cut off by the deadline is a timeout like any other.
                    Err(e) => {
                        let mut e = tidy(&e);
                        if e.contains("timed out") {
                            e.push_str(&timeout_hint(cfg));
                        }
                        (true, None, e)
                    }
                }
            }
            Err(ureq::Error::Status(code, resp)) => {
                let hint = resp
                    .header("retry-after")
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(Duration::from_secs);
                let excerpt = read_body(resp).map(|b| excerpt(&b)).unwrap_or_else(|e| e);
                attempts.push(Attempt {
                    status: Some(code),
                    error: Some(excerpt.clone()),
                    ms: t0.elapsed().as_millis() as u64,
                });
                if code == 429 || (500..=599).contains(&code) {
                    (true, hint, format!("HTTP {code}: {excerpt}"))
                } else {
                    return Err(LlmError::Http {
                        url: w.url.clone(),
                        status: code,
                        body: excerpt,
                    });
                }
            }
            Err(ureq::Error::Transport(t)) => {
                let full = tidy(&t.to_string());
                let mut msg = full
                    .strip_prefix(&format!("{}: ", w.url))
                    .unwrap_or(&full)
                    .to_string();
                if msg.contains("timed out") {
                    msg.push_str(&timeout_hint(cfg));
                }
                attempts.push(Attempt {
                    status: None,
                    error: Some(msg.clone()),
                    ms: t0.elapsed().as_millis() as u64,
                });
                (true, None, msg)
            }
        };
        if !retry || n + 1 == tries {
            return Err(LlmError::GaveUp {
                url: w.url.clone(),
                attempts: n + 1,
                last: why,
            });
        }
        sleep(backoff(cfg, n, wait_hint));
    }
    unreachable!("the loop returns on its last try")
}

fn timeout_hint(cfg: &LlmConfig) -> String {
    format!(
        " (after {:.1}s: raise [llm] timeout_secs for a slow local model)",
        cfg.timeout.as_secs_f64()
    )
}

/// A transport error in one line: ureq nests its error kind inside the I/O error it
/// wraps, which reads "Network Error: Network Error: ..."; each repeated part is
/// said once.
pub fn tidy(msg: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for p in msg.split(": ") {
        if !parts.contains(&p) {
            parts.push(p);
        }
    }
    parts.join(": ")
}

/// `retry_base * 2^n`, or the server's Retry-After, never above `retry_max`.
pub fn backoff(cfg: &LlmConfig, n: u32, hint: Option<Duration>) -> Duration {
    let exp = cfg.retry_base.saturating_mul(1u32 << n.min(16));
    hint.unwrap_or(exp).min(cfg.retry_max)
}

fn read_body(resp: ureq::Response) -> Result<String, String> {
    let mut buf = Vec::new();
    resp.into_reader()
        .take(MAX_BODY + 1)
        .read_to_end(&mut buf)
        .map_err(|e| format!("reading the response body: {e}"))?;
    if buf.len() as u64 > MAX_BODY {
        return Err(format!("the response body is over {MAX_BODY} bytes"));
    }
    String::from_utf8(buf).map_err(|_| "the response body is not UTF-8".to_string())
}

fn excerpt(s: &str) -> String {
    let t: String = s.chars().take(300).collect();
    if t.len() < s.len() {
        format!("{t}…")
    } else {
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::LlmSettings;

    #[test]
    fn repeated_error_parts_are_said_once() {
        assert_eq!(
            tidy("http://x/v1: Network Error: Network Error: timed out reading response"),
            "http://x/v1: Network Error: timed out reading response"
        );
        assert_eq!(
            tidy("reading the response body: Network Error: Network Error: timed out"),
            "reading the response body: Network Error: timed out"
        );
    }

    #[test]
    fn backoff_doubles_honours_retry_after_and_is_capped() {
        let cfg = LlmSettings {
            model: Some("m".into()),
            retry_base_ms: Some(100),
            retry_max_ms: Some(1000),
            ..Default::default()
        }
        .resolve(&|_| None)
        .unwrap();
        assert_eq!(backoff(&cfg, 0, None), Duration::from_millis(100));
        assert_eq!(backoff(&cfg, 2, None), Duration::from_millis(400));
        assert_eq!(backoff(&cfg, 9, None), Duration::from_millis(1000));
        assert_eq!(
            backoff(&cfg, 0, Some(Duration::from_secs(60))),
            Duration::from_millis(1000)
        );
    }
}
