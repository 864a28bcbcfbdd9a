//! The IMAP backend of the mail service: a remote account over TLS.
//!
//! One logged-in session is kept and reused (behind a lock: IMAP is one command
//! stream), and opened again once if it has broken. Message ids are
//! `FOLDER/UIDVALIDITY.UID`, so an id never names another message after the server
//! renumbered a folder: a stale id is `not_found`. TLS is rustls with the web PKI
//! roots, plus the owner's own CA file when configured.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

use super::{check_folder, MailStore, MAX_MESSAGE};
use crate::config::{ImapConfig, Security};
use crate::services::ToolError;

/// What the session runs over: TLS, or plain TCP to a loopback server.
enum Stream {
    Tls(Box<StreamOwned<ClientConnection, TcpStream>>),
    Plain(TcpStream),
}

impl Read for Stream {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Tls(s) => s.read(b),
            Stream::Plain(s) => s.read(b),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Tls(s) => s.write(b),
            Stream::Plain(s) => s.write(b),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Stream::Tls(s) => s.flush(),
            Stream::Plain(s) => s.flush(),
        }
    }
}

type Session = imap::Session<Stream>;

pub struct ImapStore {
    host: String,
    port: u16,
    security: Security,
    username: String,
    password: String,
    timeout: Duration,
    tls: Arc<ClientConfig>,
    session: Mutex<Option<Session>>,
}

fn err(kind: &'static str, m: impl std::fmt::Display) -> ToolError {
    ToolError::new(kind, m.to_string())
}

impl ImapStore {
    /// Reads the password from the environment and checks the TLS settings; the
    /// first connection is made by the first call.
    pub fn new(c: &ImapConfig) -> Result<ImapStore, String> {
        let password = std::env::var(&c.password_env).map_err(|_| {
            format!(
                "mail.imap.password_env: the environment variable {} is not set",
                c.password_env
            )
        })?;
        if c.security == Security::Plain && !super::is_loopback_name(&c.host) {
            return Err(format!(
                "mail.imap: security \"plain\" is only for a server on loopback, not {}",
                c.host
            ));
        }
        let mut roots = RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Some(ca) = &c.ca_file {
            let certs = CertificateDer::pem_file_iter(ca)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("mail.imap.ca_file {}: {e}", ca.display()))?;
            if certs.is_empty() {
                return Err(format!(
                    "mail.imap.ca_file {}: no certificate",
                    ca.display()
                ));
            }
            for cert in certs {
                roots
                    .add(cert)
                    .map_err(|e| format!("mail.imap.ca_file {}: {e}", ca.display()))?;
            }
        }
        let tls =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .map_err(|e| format!("mail.imap: TLS: {e}"))?
                .with_root_certificates(roots)
                .with_no_client_auth();
        let port = c.port.unwrap_or(match c.security {
            Security::Tls => 993,
            Security::Starttls | Security::Plain => 143,
        });
        Ok(ImapStore {
            host: c.host.clone(),
            port,
            security: c.security,
            username: c.username.clone(),
            password,
            timeout: Duration::from_secs(c.timeout_secs.max(1)),
            tls: Arc::new(tls),
            session: Mutex::new(None),
        })
    }

    fn connect(&self) -> Result<Session, ToolError> {
        let addr = (self.host.as_str(), self.port)
            .to_socket_addrs()
            .map_err(|e| err("imap", format!("{}: {e}", self.host)))?
            .next()
            .ok_or_else(|| err("imap", format!("{}: no address", self.host)))?;
        let tcp = TcpStream::connect_timeout(&addr, self.timeout)
            .map_err(|e| err("imap", format!("{}:{}: {e}", self.host, self.port)))?;
        tcp.set_read_timeout(Some(self.timeout)).ok();
        tcp.set_write_timeout(Some(self.timeout)).ok();
        let wrap = |tcp: TcpStream| -> Result<Stream, ToolError> {
            let name = ServerName::try_from(self.host.clone())
                .map_err(|e| err("imap", format!("{}: {e}", self.host)))?;
            let conn = ClientConnection::new(Arc::clone(&self.tls), name)
                .map_err(|e| err("imap", format!("TLS: {e}")))?;
            Ok(Stream::Tls(Box::new(StreamOwned::new(conn, tcp))))
        };
        let client = match self.security {
            Security::Tls => {
                let mut c = imap::Client::new(wrap(tcp)?);
                c.read_greeting().map_err(|e| err("imap", e))?;
                c
            }
            Security::Plain => {
                let mut c = imap::Client::new(Stream::Plain(tcp));
                c.read_greeting().map_err(|e| err("imap", e))?;
                c
            }
            Security::Starttls => {
                // The greeting and STARTTLS in clear; nothing else is sent before TLS.
                let mut r = BufReader::new(tcp.try_clone().map_err(|e| err("imap", e))?);
                let mut line = String::new();
                r.read_line(&mut line).map_err(|e| err("imap", e))?;
                (&tcp)
                    .write_all(b"s0 STARTTLS\r\n")
                    .map_err(|e| err("imap", e))?;
                loop {
                    line.clear();
                    if r.read_line(&mut line).map_err(|e| err("imap", e))? == 0 {
                        return Err(err("imap", "the server closed the connection"));
                    }
                    if line.starts_with("s0 ") {
                        break;
                    }
                }
                if !line.starts_with("s0 OK") {
                    return Err(err("imap", format!("STARTTLS refused: {}", line.trim())));
                }
                imap::Client::new(wrap(tcp)?)
            }
        };
        client
            .login(&self.username, &self.password)
            .map_err(|(e, _)| err("imap", format!("login as {}: {e}", self.username)))
    }

    /// Runs `f` on the session, opening it if needed, and once more on a fresh
    /// session if the connection broke.
    fn with<R>(&self, f: impl Fn(&mut Session) -> Result<R, ToolError>) -> Result<R, ToolError> {
        let mut guard = self.session.lock().unwrap_or_else(|p| p.into_inner());
        for attempt in 0..2 {
            if guard.is_none() {
                *guard = Some(self.connect()?);
            }
            let s = guard.as_mut().expect("session just opened");
            match f(s) {
                Err(e) if e.kind == "imap_io" && attempt == 0 => *guard = None,
                r => return r,
            }
        }
        Err(err("imap", "the connection broke twice"))
    }
}

fn imap_err(e: imap::Error) -> ToolError {
    match e {
        imap::Error::Io(e) => err("imap_io", e),
        imap::Error::ConnectionLost => err("imap_io", "connection lost"),
        imap::Error::No(n) => err("imap", format!("the server said NO: {}", n.information)),
        imap::Error::Bad(b) => err("imap", format!("the server said BAD: {}", b.information)),
        e => err("imap", e),
    }
}

/// `FOLDER/VALIDITY.UID` → its parts.
fn parse_id(id: &str) -> Result<(&str, u32, u32), ToolError> {
    let bad = || err("invalid_id", format!("{id:?} is not a message id"));
    let (folder, rest) = id.rsplit_once('/').ok_or_else(bad)?;
    check_folder(folder)?;
    let (v, u) = rest.split_once('.').ok_or_else(bad)?;
    let v = v.parse().map_err(|_| bad())?;
    let u = u.parse().map_err(|_| bad())?;
    Ok((folder, v, u))
}

/// Selects the folder of `id` and checks its UIDVALIDITY; returns the UID.
fn select_for(s: &mut Session, id: &str) -> Result<u32, ToolError> {
    let (folder, validity, uid) = parse_id(id)?;
    let mb = s.select(folder).map_err(imap_err)?;
    if mb.uid_validity != Some(validity) {
        return Err(err(
            "not_found",
            format!("no message {id:?} (the folder was renumbered)"),
        ));
    }
    Ok(uid)
}

fn fetch_one(s: &mut Session, id: &str, items: &str) -> Result<imap::types::Fetches, ToolError> {
    let uid = select_for(s, id)?;
    let f = s.uid_fetch(uid.to_string(), items).map_err(imap_err)?;
    if f.iter().all(|m| m.uid != Some(uid)) {
        return Err(err("not_found", format!("no message {id:?}")));
    }
    Ok(f)
}

/// The Maildir-style letters of IMAP system flags.
fn flag_letters(flags: &[imap::types::Flag]) -> String {
    use imap::types::Flag;
    let mut out: Vec<char> = flags
        .iter()
        .filter_map(|f| match f {
            Flag::Draft => Some('D'),
            Flag::Flagged => Some('F'),
            Flag::Answered => Some('R'),
            Flag::Seen => Some('S'),
            Flag::Deleted => Some('T'),
            _ => None,
        })
        .collect();
    out.sort_unstable();
    out.into_iter().collect()
}

/// Creates `folder` unless it exists.
fn ensure_folder(s: &mut Session, folder: &str) -> Result<(), ToolError> {
    check_folder(folder)?;
    if folder.eq_ignore_ascii_case("INBOX") {
        return Ok(());
    }
    let exists = s
        .list(None, Some(folder))
        .map_err(imap_err)?
        .iter()
        .any(|n| n.name() == folder);
    if !exists {
        s.create(folder).map_err(imap_err)?;
    }
    Ok(())
}

/// The `[COPYUID validity src dst]` code of a MOVE/COPY response, as a new id.
fn copyuid(resp: &[u8], folder: &str) -> Option<String> {
    let text = String::from_utf8_lossy(resp);
    let at = text.find("[COPYUID ")?;
    let mut parts = text[at + 9..].split([' ', ']']);
    let validity = parts.next()?;
    let _src = parts.next()?;
    let dst = parts.next()?;
    Some(format!("{folder}/{validity}.{dst}"))
}

impl MailStore for ImapStore {
    fn ids(&self, folder: &str) -> Result<Vec<String>, ToolError> {
        check_folder(folder)?;
        self.with(|s| {
            let mb = s.examine(folder).map_err(imap_err)?;
            let v = mb.uid_validity.unwrap_or(0);
            let mut uids: Vec<u32> = s.uid_search("ALL").map_err(imap_err)?.into_iter().collect();
            uids.sort_unstable_by(|a, b| b.cmp(a));
            Ok(uids
                .into_iter()
                .map(|u| format!("{folder}/{v}.{u}"))
                .collect())
        })
    }

    fn head(&self, id: &str) -> Result<Vec<u8>, ToolError> {
        self.with(|s| {
            let f = fetch_one(s, id, "BODY.PEEK[HEADER]")?;
            Ok(f.iter()
                .find_map(|m| m.header())
                .unwrap_or_default()
                .to_vec())
        })
    }

    fn raw(&self, id: &str) -> Result<Vec<u8>, ToolError> {
        self.with(|s| {
            let f = fetch_one(s, id, "RFC822.SIZE")?;
            let size = f.iter().find_map(|m| m.size).unwrap_or(0);
            if u64::from(size) > MAX_MESSAGE {
                return Err(err(
                    "too_large",
                    format!("{id}: {size} bytes, over the {MAX_MESSAGE}-byte limit"),
                ));
            }
            let f = fetch_one(s, id, "BODY.PEEK[]")?;
            Ok(f.iter().find_map(|m| m.body()).unwrap_or_default().to_vec())
        })
    }

    fn flags(&self, id: &str) -> Result<String, ToolError> {
        self.with(|s| {
            let f = fetch_one(s, id, "FLAGS")?;
            Ok(f.iter()
                .next()
                .map(|m| flag_letters(m.flags()))
                .unwrap_or_default())
        })
    }

    fn file(&self, folder: &str, raw: &[u8]) -> Result<String, ToolError> {
        self.with(|s| {
            ensure_folder(s, folder)?;
            let a = s
                .append(folder, raw)
                .flag(imap::types::Flag::Seen)
                .finish()
                .map_err(imap_err)?;
            let uid = a.uids.as_ref().and_then(|u| u.first()).map(|m| match m {
                imap_proto::UidSetMember::Uid(u) => *u,
                imap_proto::UidSetMember::UidRange(r) => *r.start(),
            });
            Ok(match (a.uid_validity, uid) {
                (Some(v), Some(u)) => format!("{folder}/{v}.{u}"),
                _ => format!("{folder}/?"),
            })
        })
    }

    fn move_to(&self, id: &str, folder: &str) -> Result<String, ToolError> {
        self.with(|s| {
            ensure_folder(s, folder)?;
            let uid = select_for(s, id)?;
            // MOVE (RFC 6851) answers with COPYUID (RFC 4315): the new id.
            let resp = s
                .run_command_and_read_response(format!("UID MOVE {uid} \"{folder}\""))
                .map_err(imap_err)?;
            Ok(copyuid(&resp, folder).unwrap_or_else(|| format!("{folder}/?")))
        })
    }

    fn purge(&self, id: &str) -> Result<(), ToolError> {
        self.with(|s| {
            let uid = select_for(s, id)?;
            s.uid_store(uid.to_string(), "+FLAGS.SILENT (\\Deleted)")
                .map_err(imap_err)?;
            s.uid_expunge(uid.to_string()).map_err(imap_err)?;
            Ok(())
        })
    }

    fn search(&self, folder: &str, query: &str) -> Result<Option<Vec<String>>, ToolError> {
        check_folder(folder)?;
        if query.contains(['"', '\\', '\r', '\n', '\0']) {
            return Err(err(
                "invalid_field",
                "query: quotes, backslashes and line breaks are not allowed over IMAP",
            ));
        }
        self.with(|s| {
            let mb = s.examine(folder).map_err(imap_err)?;
            let v = mb.uid_validity.unwrap_or(0);
            let mut uids: Vec<u32> = s
                .uid_search(format!("TEXT \"{query}\""))
                .map_err(imap_err)?
                .into_iter()
                .collect();
            uids.sort_unstable_by(|a, b| b.cmp(a));
            Ok(Some(
                uids.into_iter()
                    .map(|u| format!("{folder}/{v}.{u}"))
                    .collect(),
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked() {
        assert_eq!(parse_id("INBOX/7.42").unwrap(), ("INBOX", 7, 42));
        for bad in ["INBOX/42", "INBOX/a.b", "../x/1.2", "x", "A\"B/1.2"] {
            assert!(parse_id(bad).is_err(), "{bad}");
        }
        assert_eq!(
            copyuid(b"* OK [COPYUID 1796 5 9] Moved\r\nA1 OK done\r\n", "Trash").unwrap(),
            "Trash/1796.9"
        );
    }
}
