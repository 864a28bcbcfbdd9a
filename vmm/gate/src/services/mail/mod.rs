//! The `mail` service: the owner's mailbox, read and written only through decided
//! calls.
//!
//! Reading goes through a [`MailStore`] backend (a local Maildir today) and returns
//! parsed messages (headers, a text body, attachment names and sizes), each with its
//! sender, so that policies and the agent can tell where content came from. Sending
//! builds an RFC 5322 message with `lettre`, sends it over SMTP, and files a copy in
//! the Sent folder. Header fields given by the guest never carry CR, LF or NUL: a
//! field with one is refused, not cleaned, so no call can add a header.

use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lettre::message::header::ContentType;
use lettre::message::{Mailbox, Mailboxes};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::{SmtpTransport, Transport};
use mail_parser::{MessageParser, MimeHeaders};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use serde_json::{json, Value};

pub mod imap;

use super::{Service, ToolError, ToolSpec, DEFAULT_REPLY_CAP};
use crate::config::{MailConfig, Security, SmtpConfig};

/// Largest message file read whole (`mail.read`, `mail.search`).
pub const MAX_MESSAGE: u64 = 32 << 20;
/// Bytes of a message read to list its headers.
const HEADER_PREFIX: usize = 64 * 1024;
/// Most messages one `mail.list` or `mail.search` returns.
pub const MAX_PAGE: u64 = 200;
/// Most messages one `mail.search` looks at (newest first).
pub const MAX_SCANNED: usize = 5000;
/// Most recipients of one `mail.send`, all fields together.
pub const MAX_RECIPIENTS: usize = 100;
/// Largest body of one `mail.send`.
pub const MAX_SEND_BODY: usize = 512 * 1024;

pub fn tool_specs() -> Vec<ToolSpec> {
    let obj = |props: Value, required: &[&str]| {
        json!({"type": "object", "properties": props, "required": required,
               "additionalProperties": false})
    };
    let folder = json!({"type": "string", "maxLength": 128,
                        "description": "INBOX, Sent, Trash, or another folder"});
    let id = json!({"type": "string", "maxLength": 512,
                    "description": "a message id from mail.list or mail.search"});
    let addrs = json!({"type": "array", "maxItems": MAX_RECIPIENTS,
                       "items": {"type": "string", "maxLength": 320}});
    let mut to = addrs.clone();
    to["minItems"] = 1.into();
    vec![
        ToolSpec {
            name: "mail.list",
            description: "List messages of a folder, newest first: sender, subject, date, id",
            input_schema: obj(
                json!({"folder": folder, "limit": {"type": "integer", "minimum": 1, "maximum": MAX_PAGE},
                       "offset": {"type": "integer", "minimum": 0}}),
                &[],
            ),
            roles: &[],
            aliases: &[],
            reply_cap: DEFAULT_REPLY_CAP,
        },
        ToolSpec {
            name: "mail.read",
            description: "Read one message: headers, text body, attachment names and sizes",
            input_schema: obj(json!({"id": id}), &["id"]),
            roles: &[],
            aliases: &[],
            reply_cap: DEFAULT_REPLY_CAP,
        },
        ToolSpec {
            name: "mail.search",
            description:
                "Find messages whose sender, recipients, subject or text contain the query",
            input_schema: obj(
                json!({"query": {"type": "string", "minLength": 1, "maxLength": 256},
                       "folder": folder,
                       "limit": {"type": "integer", "minimum": 1, "maximum": MAX_PAGE}}),
                &["query"],
            ),
            roles: &[],
            aliases: &[],
            reply_cap: DEFAULT_REPLY_CAP,
        },
        ToolSpec {
            name: "mail.send",
            description: "Send a plain-text message over SMTP and file a copy in Sent",
            input_schema: obj(
                json!({"to": to, "cc": addrs, "bcc": addrs,
                       "subject": {"type": "string", "maxLength": 998},
                       "body": {"type": "string", "maxLength": MAX_SEND_BODY},
                       "in_reply_to": {"type": "string", "maxLength": 998}}),
                &["to", "subject", "body"],
            ),
            roles: &[("to", "email"), ("cc", "email"), ("bcc", "email")],
            aliases: &[],
            reply_cap: DEFAULT_REPLY_CAP,
        },
        ToolSpec {
            name: "mail.move",
            description: "Move a message to another folder (created if missing)",
            input_schema: obj(json!({"id": id, "folder": folder}), &["id", "folder"]),
            roles: &[],
            aliases: &[],
            reply_cap: DEFAULT_REPLY_CAP,
        },
        ToolSpec {
            name: "mail.delete",
            description: "Move a message to Trash (it can be restored)",
            input_schema: obj(json!({"id": id}), &["id"]),
            roles: &[],
            aliases: &[],
            reply_cap: DEFAULT_REPLY_CAP,
        },
        ToolSpec {
            name: "mail.purge",
            description: "Delete a message permanently",
            input_schema: obj(json!({"id": id}), &["id"]),
            roles: &[],
            aliases: &[],
            reply_cap: DEFAULT_REPLY_CAP,
        },
    ]
}

/// A folder name as the guest gives it: `INBOX` or a Maildir++ folder name.
/// Refuses anything that could name a path outside the mailbox.
pub fn check_folder(name: &str) -> Result<(), ToolError> {
    let bad = |why: &str| {
        Err(ToolError::new(
            "invalid_folder",
            format!("folder {name:?}: {why}"),
        ))
    };
    if name.is_empty() || name.len() > 128 {
        return bad("must be 1 to 128 characters");
    }
    if !name
        .chars()
        .all(|c| c.is_alphanumeric() || matches!(c, ' ' | '_' | '-' | '.'))
    {
        return bad("only letters, digits, space, '_', '-' and '.' are allowed");
    }
    if name.starts_with('.') || name.ends_with('.') || name.contains("..") {
        return bad("'.' separates subfolders and cannot start, end or repeat");
    }
    Ok(())
}

/// Where mail is read, moved and filed. One implementation per backend.
pub trait MailStore: Send + Sync {
    /// Ids of a folder's messages, newest first.
    fn ids(&self, folder: &str) -> Result<Vec<String>, ToolError>;
    /// The message's header section (possibly followed by some of the body).
    fn head(&self, id: &str) -> Result<Vec<u8>, ToolError>;
    /// The whole raw message, at most `MAX_MESSAGE` bytes (else `too_large`).
    fn raw(&self, id: &str) -> Result<Vec<u8>, ToolError>;
    /// Flags of a message (`S` seen, `R` replied, `F` flagged, ...).
    fn flags(&self, id: &str) -> Result<String, ToolError>;
    /// Files a message in `folder` (seen); returns its id.
    fn file(&self, folder: &str, raw: &[u8]) -> Result<String, ToolError>;
    /// Moves a message; returns its new id.
    fn move_to(&self, id: &str, folder: &str) -> Result<String, ToolError>;
    /// Removes a message for good.
    fn purge(&self, id: &str) -> Result<(), ToolError>;
    /// Ids of the messages matching `query`, newest first, when the backend can
    /// search itself (IMAP SEARCH); `None`: the service scans the messages.
    fn search(&self, _folder: &str, _query: &str) -> Result<Option<Vec<String>>, ToolError> {
        Ok(None)
    }
}

fn io_err(what: &str, e: io::Error) -> ToolError {
    let kind = match e.kind() {
        io::ErrorKind::NotFound => "not_found",
        _ => "io",
    };
    ToolError::new(kind, format!("{what}: {e}"))
}

/// A Maildir++ mailbox: INBOX is the root's cur/new/tmp, folder `X` is `.X/`.
pub struct Maildir {
    root: PathBuf,
    counter: AtomicU64,
}

impl Maildir {
    pub fn open(root: &Path) -> Result<Maildir, String> {
        for sub in ["cur", "new", "tmp"] {
            if !root.join(sub).is_dir() {
                return Err(format!(
                    "{}: not a Maildir (no {sub}/ folder)",
                    root.display()
                ));
            }
        }
        Ok(Maildir {
            root: root.to_path_buf(),
            counter: AtomicU64::new(0),
        })
    }

    fn folder_dir(&self, folder: &str) -> Result<PathBuf, ToolError> {
        check_folder(folder)?;
        Ok(if folder.eq_ignore_ascii_case("INBOX") {
            self.root.clone()
        } else {
            self.root.join(format!(".{folder}"))
        })
    }

    fn ensure_folder(&self, folder: &str) -> Result<PathBuf, ToolError> {
        let dir = self.folder_dir(folder)?;
        for sub in ["cur", "new", "tmp"] {
            fs::create_dir_all(dir.join(sub)).map_err(|e| io_err(folder, e))?;
        }
        if dir != self.root {
            let marker = dir.join("maildirfolder");
            if !marker.exists() {
                fs::write(&marker, b"").map_err(|e| io_err(folder, e))?;
            }
        }
        Ok(dir)
    }

    /// `FOLDER/UNIQUE` → the message's file.
    fn locate(&self, id: &str) -> Result<(String, PathBuf), ToolError> {
        let bad = || ToolError::new("invalid_id", format!("{id:?} is not a message id"));
        let (folder, unique) = id.rsplit_once('/').ok_or_else(bad)?;
        if unique.is_empty()
            || unique.starts_with('.')
            || unique.contains(['/', ':', '\0'])
            || unique.len() > 255
        {
            return Err(bad());
        }
        let dir = self.folder_dir(folder)?;
        for sub in ["cur", "new"] {
            let d = dir.join(sub);
            let direct = d.join(unique);
            if direct.is_file() {
                return Ok((folder.to_string(), direct));
            }
            let prefix = format!("{unique}:");
            if let Ok(rd) = fs::read_dir(&d) {
                for e in rd.flatten() {
                    if e.file_name()
                        .to_str()
                        .is_some_and(|n| n.starts_with(&prefix))
                    {
                        return Ok((folder.to_string(), e.path()));
                    }
                }
            }
        }
        Err(ToolError::new("not_found", format!("no message {id:?}")))
    }

    fn read_file(&self, id: &str, limit: Option<usize>) -> Result<Vec<u8>, ToolError> {
        let (_, path) = self.locate(id)?;
        let f = fs::File::open(&path).map_err(|e| io_err(id, e))?;
        let size = f.metadata().map_err(|e| io_err(id, e))?.len();
        let cap = match limit {
            Some(l) => l as u64,
            None if size > MAX_MESSAGE => {
                return Err(ToolError::new(
                    "too_large",
                    format!("{id}: {size} bytes, over the {MAX_MESSAGE}-byte limit"),
                ))
            }
            None => MAX_MESSAGE,
        };
        let mut buf = Vec::with_capacity(size.min(cap) as usize);
        f.take(cap)
            .read_to_end(&mut buf)
            .map_err(|e| io_err(id, e))?;
        Ok(buf)
    }

    fn unique_name(&self) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let host = fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().replace(['/', ':'], "_"))
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "ironvmm".into());
        format!(
            "{}.M{}P{}Q{}.{}",
            now.as_secs(),
            now.subsec_micros(),
            std::process::id(),
            n,
            host
        )
    }
}

fn unique_of(file_name: &str) -> &str {
    file_name.split(':').next().unwrap_or(file_name)
}

impl MailStore for Maildir {
    fn ids(&self, folder: &str) -> Result<Vec<String>, ToolError> {
        let dir = self.folder_dir(folder)?;
        if !dir.join("cur").is_dir() {
            return Err(ToolError::new("not_found", format!("no folder {folder:?}")));
        }
        let mut found: Vec<(SystemTime, String)> = Vec::new();
        for sub in ["new", "cur"] {
            let rd = fs::read_dir(dir.join(sub)).map_err(|e| io_err(folder, e))?;
            for e in rd.flatten() {
                let Some(name) = e.file_name().to_str().map(str::to_string) else {
                    continue;
                };
                if name.starts_with('.') {
                    continue;
                }
                let meta = match e.metadata() {
                    Ok(m) if m.is_file() => m,
                    _ => continue,
                };
                let t = meta.modified().unwrap_or(UNIX_EPOCH);
                found.push((t, format!("{folder}/{}", unique_of(&name))));
            }
        }
        found.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| b.1.cmp(&a.1)));
        Ok(found.into_iter().map(|(_, id)| id).collect())
    }

    fn head(&self, id: &str) -> Result<Vec<u8>, ToolError> {
        self.read_file(id, Some(HEADER_PREFIX))
    }

    fn raw(&self, id: &str) -> Result<Vec<u8>, ToolError> {
        self.read_file(id, None)
    }

    fn flags(&self, id: &str) -> Result<String, ToolError> {
        let (_, path) = self.locate(id)?;
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        Ok(name
            .split_once(":2,")
            .map(|(_, f)| f.to_string())
            .unwrap_or_default())
    }

    fn file(&self, folder: &str, raw: &[u8]) -> Result<String, ToolError> {
        let dir = self.ensure_folder(folder)?;
        let unique = self.unique_name();
        let tmp = dir.join("tmp").join(&unique);
        fs::write(&tmp, raw).map_err(|e| io_err(folder, e))?;
        let dest = dir.join("cur").join(format!("{unique}:2,S"));
        fs::rename(&tmp, &dest).map_err(|e| io_err(folder, e))?;
        Ok(format!("{folder}/{unique}"))
    }

    fn move_to(&self, id: &str, folder: &str) -> Result<String, ToolError> {
        let (_, path) = self.locate(id)?;
        let dir = self.ensure_folder(folder)?;
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        // A message from new/ has been seen by now: it goes to cur/ with its info.
        let name = if name.contains(":2,") {
            name
        } else {
            format!("{name}:2,")
        };
        let dest = dir.join("cur").join(&name);
        if dest.exists() {
            return Err(ToolError::new(
                "exists",
                format!("{folder} already holds {}", unique_of(&name)),
            ));
        }
        fs::rename(&path, &dest).map_err(|e| io_err(id, e))?;
        Ok(format!("{folder}/{}", unique_of(&name)))
    }

    fn purge(&self, id: &str) -> Result<(), ToolError> {
        let (_, path) = self.locate(id)?;
        fs::remove_file(&path).map_err(|e| io_err(id, e))
    }
}

/// Where `mail.send` hands messages over.
pub struct Smtp {
    transport: SmtpTransport,
}

impl Smtp {
    pub fn new(c: &SmtpConfig) -> Result<Smtp, String> {
        let creds = match (&c.username, &c.password_env) {
            (Some(u), Some(env)) => {
                let p = std::env::var(env).map_err(|_| {
                    format!("mail.smtp.password_env: the environment variable {env} is not set")
                })?;
                Some(Credentials::new(u.clone(), p))
            }
            (None, None) => None,
            _ => return Err("mail.smtp: give both username and password_env, or neither".into()),
        };
        // The web PKI roots, plus the CAs of `ca_file` (a private server).
        let extra: Vec<Vec<u8>> = match &c.ca_file {
            Some(ca) => {
                let certs = CertificateDer::pem_file_iter(ca)
                    .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| format!("mail.smtp.ca_file {}: {e}", ca.display()))?;
                if certs.is_empty() {
                    return Err(format!(
                        "mail.smtp.ca_file {}: no certificate",
                        ca.display()
                    ));
                }
                certs.iter().map(|c| c.to_vec()).collect()
            }
            None => Vec::new(),
        };
        let tls = || {
            let mut b = TlsParameters::builder(c.host.clone());
            for der in &extra {
                let cert = Certificate::from_der(der.clone())
                    .map_err(|e| format!("mail.smtp.ca_file: {e}"))?;
                b = b.add_root_certificate(cert);
            }
            b.build()
                .map_err(|e| format!("mail.smtp: TLS for {}: {e}", c.host))
        };
        let (tls, port) = match c.security {
            Security::Tls => (Tls::Wrapper(tls()?), 465),
            Security::Starttls => (Tls::Required(tls()?), 587),
            Security::Plain => {
                if !is_loopback_name(&c.host) {
                    return Err(format!(
                        "mail.smtp: security \"plain\" is only for a server on loopback, not {}",
                        c.host
                    ));
                }
                (Tls::None, 25)
            }
        };
        let mut b = SmtpTransport::builder_dangerous(c.host.clone())
            .port(c.port.unwrap_or(port))
            .tls(tls)
            .timeout(Some(Duration::from_secs(c.timeout_secs)));
        if let Some(creds) = creds {
            b = b.credentials(creds);
        }
        Ok(Smtp {
            transport: b.build(),
        })
    }
}

fn is_loopback_name(host: &str) -> bool {
    host == "localhost"
        || host
            .trim_matches(['[', ']'])
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The mail service.
pub struct MailService {
    store: Box<dyn MailStore>,
    smtp: Option<Smtp>,
    from: Mailbox,
    sent: String,
    trash: String,
    max_body: usize,
}

impl MailService {
    /// Builds the service from `[mail]`; the error names the setting at fault.
    pub fn from_config(c: &MailConfig) -> Result<MailService, String> {
        let store: Box<dyn MailStore> = match c.backend {
            crate::config::MailBackend::Maildir => {
                let dir = c
                    .maildir
                    .as_deref()
                    .ok_or("mail: backend maildir needs `maildir`")?;
                Box::new(Maildir::open(dir).map_err(|e| format!("mail.maildir: {e}"))?)
            }
            crate::config::MailBackend::Imap => {
                let c = c
                    .imap
                    .as_ref()
                    .ok_or("mail: backend imap needs a [mail.imap] table")?;
                Box::new(imap::ImapStore::new(c)?)
            }
        };
        let smtp = c.smtp.as_ref().map(Smtp::new).transpose()?;
        Self::new(
            store,
            smtp,
            &c.from,
            &c.sent_folder,
            &c.trash_folder,
            c.max_body_bytes,
        )
    }

    pub fn new(
        store: Box<dyn MailStore>,
        smtp: Option<Smtp>,
        from: &str,
        sent: &str,
        trash: &str,
        max_body: usize,
    ) -> Result<MailService, String> {
        let from: Mailbox = from
            .parse()
            .map_err(|e| format!("mail.from {from:?}: not an address: {e}"))?;
        Ok(MailService {
            store,
            smtp,
            from,
            sent: sent.to_string(),
            trash: trash.to_string(),
            max_body,
        })
    }

    fn summary(&self, id: &str) -> Result<Value, ToolError> {
        let raw = self.store.head(id)?;
        let flags = self.store.flags(id).unwrap_or_default();
        let parser = MessageParser::default();
        let mut v = match parser.parse_headers(&raw) {
            Some(m) => headers_json(&m),
            None => json!({"from": Value::Null, "subject": Value::Null}),
        };
        v["id"] = id.into();
        v["flags"] = flags.clone().into();
        v["unread"] = (!flags.contains('S')).into();
        Ok(v)
    }

    fn list(&self, args: &Value) -> Result<Value, ToolError> {
        let folder = args["folder"].as_str().unwrap_or("INBOX");
        let limit = args["limit"].as_u64().unwrap_or(20).clamp(1, MAX_PAGE) as usize;
        let offset = args["offset"].as_u64().unwrap_or(0) as usize;
        let ids = self.store.ids(folder)?;
        let page: Result<Vec<Value>, _> = ids
            .iter()
            .skip(offset)
            .take(limit)
            .map(|id| self.summary(id))
            .collect();
        Ok(json!({"folder": folder, "total": ids.len(), "offset": offset, "messages": page?}))
    }

    fn read(&self, args: &Value) -> Result<Value, ToolError> {
        let id = str_arg(args, "id")?;
        let raw = self.store.raw(id)?;
        let msg = MessageParser::default()
            .parse(&raw)
            .ok_or_else(|| ToolError::new("unparsable", format!("{id}: not a mail message")))?;
        let mut v = headers_json(&msg);
        v["id"] = id.into();
        let text = msg
            .body_text(0)
            .or_else(|| msg.body_html(0))
            .map(|t| t.into_owned())
            .unwrap_or_default();
        let (text, truncated) = cut(text, self.max_body);
        v["body"] = text.into();
        v["body_truncated"] = truncated.into();
        let attachments: Vec<Value> = msg
            .attachments()
            .map(|p| {
                let ct = p.content_type().map(|c| match c.subtype() {
                    Some(s) => format!("{}/{}", c.ctype(), s),
                    None => c.ctype().to_string(),
                });
                json!({"name": p.attachment_name(), "size": p.len(), "content_type": ct})
            })
            .collect();
        v["attachments"] = attachments.into();
        v["flags"] = self.store.flags(id).unwrap_or_default().into();
        Ok(v)
    }

    fn search(&self, args: &Value) -> Result<Value, ToolError> {
        let query = str_arg(args, "query")?.to_lowercase();
        let folder = args["folder"].as_str().unwrap_or("INBOX");
        let limit = args["limit"].as_u64().unwrap_or(20).clamp(1, MAX_PAGE) as usize;
        if let Some(ids) = self.store.search(folder, str_arg(args, "query")?)? {
            let found: Result<Vec<Value>, _> =
                ids.iter().take(limit).map(|id| self.summary(id)).collect();
            return Ok(
                json!({"folder": folder, "query": args["query"], "scanned": ids.len(),
                             "complete": true, "messages": found?}),
            );
        }
        let ids = self.store.ids(folder)?;
        let parser = MessageParser::default();
        let mut found = Vec::new();
        let scanned = ids.len().min(MAX_SCANNED);
        for id in ids.iter().take(MAX_SCANNED) {
            let Ok(raw) = self.store.raw(id) else {
                continue;
            };
            let Some(msg) = parser.parse(&raw) else {
                continue;
            };
            let h = headers_json(&msg);
            let hay = [&h["from"], &h["to"], &h["cc"], &h["subject"]]
                .iter()
                .map(|v| v.to_string())
                .chain(msg.body_text(0).map(|t| t.into_owned()))
                .collect::<Vec<_>>()
                .join("\n")
                .to_lowercase();
            if hay.contains(&query) {
                found.push(self.summary(id)?);
                if found.len() >= limit {
                    break;
                }
            }
        }
        Ok(
            json!({"folder": folder, "query": args["query"], "scanned": scanned,
                  "complete": ids.len() <= MAX_SCANNED, "messages": found}),
        )
    }

    fn send(&self, args: &Value) -> Result<Value, ToolError> {
        let smtp = self.smtp.as_ref().ok_or_else(|| {
            ToolError::new("not_configured", "no [mail.smtp] server is configured")
        })?;
        let subject = str_arg(args, "subject")?;
        let body = str_arg(args, "body")?;
        no_line_breaks("subject", subject)?;
        if body.contains('\0') {
            return Err(ToolError::new("invalid_field", "body contains a NUL byte"));
        }
        let mut b = lettre::Message::builder()
            .from(self.from.clone())
            .subject(subject)
            .date_now()
            .message_id(None);
        let mut n = 0;
        let mut recipients = Vec::new();
        for field in ["to", "cc", "bcc"] {
            let list = addresses(args, field)?;
            n += list.len();
            for m in list {
                recipients.push(m.email.to_string());
                b = match field {
                    "to" => b.to(m),
                    "cc" => b.cc(m),
                    _ => b.bcc(m),
                };
            }
        }
        if addresses(args, "to")?.is_empty() {
            return Err(ToolError::new(
                "invalid_field",
                "to: at least one recipient",
            ));
        }
        if n > MAX_RECIPIENTS {
            return Err(ToolError::new(
                "invalid_field",
                format!("{n} recipients, over {MAX_RECIPIENTS}"),
            ));
        }
        if let Some(r) = args.get("in_reply_to") {
            let r = r.as_str().unwrap_or_default();
            no_line_breaks("in_reply_to", r)?;
            if !(r.starts_with('<') && r.ends_with('>') && r.contains('@')) || r.contains(' ') {
                return Err(ToolError::new(
                    "invalid_field",
                    "in_reply_to: expected a message id like <id@host>",
                ));
            }
            b = b.in_reply_to(r.to_string()).references(r.to_string());
        }
        let msg = b
            .header(ContentType::TEXT_PLAIN)
            .body(body.to_string())
            .map_err(|e| ToolError::new("invalid_message", e.to_string()))?;
        let message_id = msg
            .headers()
            .get_raw("Message-ID")
            .map(str::to_string)
            .unwrap_or_default();
        smtp.transport.send(&msg).map_err(|e| {
            ToolError::new("smtp", format!("the SMTP server refused or failed: {e}"))
        })?;
        // The copy is filed after the send: a message in Sent was sent.
        let filed = self.store.file(&self.sent, &msg.formatted());
        Ok(json!({
            "sent": true,
            "message_id": message_id,
            "recipients": recipients,
            "filed": filed.as_ref().ok(),
            "filed_error": filed.err().map(|e| e.message),
        }))
    }

    fn move_msg(&self, args: &Value) -> Result<Value, ToolError> {
        let id = str_arg(args, "id")?;
        let folder = str_arg(args, "folder")?;
        let new = self.store.move_to(id, folder)?;
        Ok(json!({"moved": id, "id": new}))
    }

    fn delete(&self, args: &Value) -> Result<Value, ToolError> {
        let id = str_arg(args, "id")?;
        let new = self.store.move_to(id, &self.trash)?;
        Ok(json!({"deleted": id, "id": new, "folder": self.trash}))
    }

    fn purge(&self, args: &Value) -> Result<Value, ToolError> {
        let id = str_arg(args, "id")?;
        self.store.purge(id)?;
        Ok(json!({"purged": id}))
    }
}

impl Service for MailService {
    fn tools(&self) -> Vec<ToolSpec> {
        tool_specs()
    }

    fn call(&self, tool: &str, args: &Value) -> Result<Value, ToolError> {
        match tool {
            "mail.list" => self.list(args),
            "mail.read" => self.read(args),
            "mail.search" => self.search(args),
            "mail.send" => self.send(args),
            "mail.move" => self.move_msg(args),
            "mail.delete" => self.delete(args),
            "mail.purge" => self.purge(args),
            _ => Err(ToolError::new("unknown_tool", tool.to_string())),
        }
    }
}

fn str_arg<'a>(args: &'a Value, name: &str) -> Result<&'a str, ToolError> {
    args[name]
        .as_str()
        .ok_or_else(|| ToolError::new("invalid_field", format!("{name}: expected a string")))
}

/// Refuses CR, LF and NUL: each could end a header and start another.
fn no_line_breaks(field: &str, v: &str) -> Result<(), ToolError> {
    if v.contains(['\r', '\n', '\0']) {
        return Err(ToolError::new(
            "header_injection",
            format!("{field}: line breaks and NUL are not allowed in a header field"),
        ));
    }
    Ok(())
}

fn addresses(args: &Value, field: &str) -> Result<Vec<Mailbox>, ToolError> {
    let Some(list) = args.get(field) else {
        return Ok(Vec::new());
    };
    let list = list
        .as_array()
        .ok_or_else(|| ToolError::new("invalid_field", format!("{field}: expected an array")))?;
    let mut out = Vec::new();
    for (i, a) in list.iter().enumerate() {
        let a = a.as_str().ok_or_else(|| {
            ToolError::new("invalid_field", format!("{field}[{i}]: expected a string"))
        })?;
        no_line_breaks(&format!("{field}[{i}]"), a)?;
        // One address per entry: "a@x, b@y" in one string would pass a policy that
        // checked it as one address.
        let parsed: Mailboxes = a
            .parse()
            .map_err(|e| ToolError::new("invalid_address", format!("{field}[{i}] {a:?}: {e}")))?;
        let mut it = parsed.into_iter();
        match (it.next(), it.next()) {
            (Some(m), None) => out.push(m),
            _ => {
                return Err(ToolError::new(
                    "invalid_address",
                    format!("{field}[{i}] {a:?}: exactly one address per entry"),
                ))
            }
        }
    }
    Ok(out)
}

fn addr_list(a: Option<&mail_parser::Address>) -> Value {
    let Some(a) = a else {
        return Value::Array(Vec::new());
    };
    a.iter()
        .map(|x| match (x.name(), x.address()) {
            (Some(n), Some(e)) => json!({"name": n, "email": e}),
            (None, Some(e)) => json!({"email": e}),
            (n, None) => json!({"name": n}),
        })
        .collect()
}

fn headers_json(m: &mail_parser::Message) -> Value {
    let from = addr_list(m.from());
    json!({
        // The sender, always present (null when the message has none), so the
        // agent and policies can tell where the content came from.
        "from": from.get(0).cloned().unwrap_or(Value::Null),
        "to": addr_list(m.to()),
        "cc": addr_list(m.cc()),
        "subject": m.subject(),
        "date": m.date().map(|d| d.to_rfc3339()),
        "message_id": m.message_id(),
        "in_reply_to": m.in_reply_to().as_text(),
    })
}

/// Cuts text to at most `max` bytes at a character boundary.
fn cut(mut s: String, max: usize) -> (String, bool) {
    if s.len() <= max {
        return (s, false);
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
    (s, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folder_names_cannot_leave_the_mailbox() {
        for bad in [
            "", "..", "../x", "a/b", ".Sent", "x.", "a..b", "a\0b", "a\nb",
        ] {
            assert!(check_folder(bad).is_err(), "{bad:?} accepted");
        }
        for ok in ["INBOX", "Sent", "Archive.2024", "Lists-rust", "My Folder"] {
            assert!(check_folder(ok).is_ok(), "{ok:?} refused");
        }
    }

    #[test]
    fn ids_cannot_name_other_files() {
        let dir = tempfile::tempdir().unwrap();
        for s in ["cur", "new", "tmp"] {
            fs::create_dir(dir.path().join(s)).unwrap();
        }
        let md = Maildir::open(dir.path()).unwrap();
        for bad in [
            "x",
            "INBOX/",
            "INBOX/..",
            "INBOX/../../etc/passwd",
            "../INBOX/x",
            "INBOX/.x",
            "INBOX/a:2,S",
        ] {
            let e = md.raw(bad).unwrap_err();
            assert!(
                matches!(e.kind, "invalid_id" | "invalid_folder"),
                "{bad}: {e:?}"
            );
        }
    }
}
