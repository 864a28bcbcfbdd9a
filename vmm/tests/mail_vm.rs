//! The mail service from a booted guest against real mail servers: Dovecot over
//! IMAPS and aiosmtpd over STARTTLS, both on the machine outside the KVM host,
//! started by scripts/kvm-host/mail-peers.sh (which names them in
//! IRONVMM_MAIL_PEERS). In the software KVM host they are reached over its
//! --host-net network at KVM_HOST_OUTSIDE (10.0.2.2); natively on 127.0.0.1.
//! Ignored in the fast suite; `scripts/test.sh` runs it in its one KVM host boot.
//! Without IRONVMM_MAIL_PEERS it skips, saying so (IRONVMM_REQUIRE_MAIL_PEERS=1
//! makes that a failure).

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

mod common;
mod vm_common;
use common::assert_verifies;
use vm_common::{audit_records, boot_with_services, decision_for, marker, scratch};

/// What mail-peers.sh wrote into its peers.env.
struct Peers {
    outside: String,
    imaps_port: String,
    smtp_port: String,
    ca_file: String,
    user: String,
    password: String,
    maildir: PathBuf,
    smtp_maildir: PathBuf,
}

/// The peers of this run, or None (with a printed reason) when there are none and
/// they are not required.
fn peers() -> Option<Peers> {
    let required = std::env::var("IRONVMM_REQUIRE_MAIL_PEERS").is_ok_and(|v| v == "1");
    let skip = |why: &str| {
        assert!(!required, "IRONVMM_REQUIRE_MAIL_PEERS=1, but {why}");
        let _ = writeln!(std::io::stderr(), "SKIPPED: {why}");
        None
    };
    let Ok(dir) = std::env::var("IRONVMM_MAIL_PEERS") else {
        return skip(
            "IRONVMM_MAIL_PEERS is not set: run this test inside scripts/kvm-host/mail-peers.sh \
             (scripts/test.sh does)",
        );
    };
    // Inside the software KVM host the peers are on the machine outside, reached over
    // --host-net; natively they are on this loopback.
    let outside =
        match std::env::var("KVM_HOST_OUTSIDE") {
            Ok(a) => a,
            Err(_) if std::env::var("KVM_HOST").is_ok_and(|v| v == "software") => return skip(
                "the software KVM host has no network to the mail peers: start it with --host-net",
            ),
            Err(_) => "127.0.0.1".to_string(),
        };
    let env_file = Path::new(&dir).join("peers.env");
    let text = std::fs::read_to_string(&env_file).unwrap_or_else(|e| {
        panic!(
            "IRONVMM_MAIL_PEERS: cannot read {}: {e}",
            env_file.display()
        )
    });
    let vars: HashMap<&str, &str> = text.lines().filter_map(|l| l.split_once('=')).collect();
    let get = |k: &str| -> String {
        vars.get(k)
            .unwrap_or_else(|| panic!("{} has no {k}", env_file.display()))
            .to_string()
    };
    Some(Peers {
        outside,
        imaps_port: get("IMAPS_PORT"),
        smtp_port: get("SMTP_PORT"),
        ca_file: get("CA_FILE"),
        user: get("IMAP_USER"),
        password: get("IMAP_PASSWORD"),
        maildir: PathBuf::from(get("MAILDIR")),
        smtp_maildir: PathBuf::from(get("SMTP_MAILDIR")),
    })
}

/// The text of every message file of a Maildir folder (`cur/` and `new/`).
fn messages(folder: &Path) -> Vec<String> {
    ["cur", "new"]
        .iter()
        .filter_map(|s| std::fs::read_dir(folder.join(s)).ok())
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read(e.path()).ok())
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .collect()
}

/// The mail rules of examples/inbox/p.rules (deleting to Trash allowed), without its model turns.
const POLICY: &str = r#"version 1
list contacts = file "contacts.txt"
deny mail.purge "never delete anything permanently"
allow mail.read
allow mail.list
allow mail.search
allow mail.delete "Trash can be emptied by hand"
allow mail.send when all to in @contacts and (not exists cc or all cc in @contacts) and (not exists bcc or all bcc in @contacts) "every recipient is in my contacts"
ask mail.send "a recipient is not in my contacts: ask me first"
default deny
"#;

/// The line of POLICY that starts with `start` (rules are numbered by line).
fn rule_line(start: &str) -> u64 {
    POLICY
        .lines()
        .position(|l| l.starts_with(start))
        .map(|i| i as u64 + 1)
        .unwrap()
}

/// A guest agent on a real IMAP account and SMTP server: it lists, searches and
/// reads (allowed), replies to a contact (allowed: aiosmtpd receives it with the
/// right envelope, and Dovecot holds the copy filed in Sent), writes to a stranger
/// (an `ask` with no one to answer under `boot`: denied, nothing sent), purges
/// (denied: the message stays in Dovecot's Maildir) and deletes its filed copy
/// (allowed: into Trash). The audit log shows each decision; the IMAP password,
/// which only the VMM's environment holds, is in neither the guest's console nor
/// the log. Each run's messages carry their own token, so a rerun in the same
/// peers (cargo-test.sh reruns a binary after an emulator triple fault) holds too.
#[test]
#[ignore = "boots a guest: run through scripts/test.sh"]
fn a_guest_reads_and_sends_mail_through_real_imap_and_smtp_servers() {
    let Some(p) = peers() else {
        return;
    };
    let tmp = scratch("mail-imap");
    let dir = tmp.path();
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/inbox");
    std::fs::copy(example.join("contacts.txt"), dir.join("contacts.txt")).unwrap();
    let token = format!(
        "run-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    let config = format!(
        "[mail]\nbackend = \"imap\"\nfrom = \"Ada Lovelace <ada@example.org>\"\n\
         [mail.imap]\nhost = \"{host}\"\nport = {imap}\nsecurity = \"tls\"\nusername = \"{user}\"\n\
         password_env = \"IRONVMM_TEST_IMAP_PASSWORD\"\nca_file = \"{ca}\"\ntimeout_secs = 60\n\
         [mail.smtp]\nhost = \"{host}\"\nport = {smtp}\nsecurity = \"starttls\"\nca_file = \"{ca}\"\n\
         timeout_secs = 60\n",
        host = p.outside,
        imap = p.imaps_port,
        user = p.user,
        ca = p.ca_file,
        smtp = p.smtp_port,
    );
    let script = format!(
        r#"
# Under the software KVM host the VMM's code comes over 9p on first use, which can
# outlast the guest kernel's 2 s vsock connect timeout: wait for the gate first.
for i in 1 2 3 4 5 6 7 8 9 10; do iron list >/dev/null 2>&1 && break; sleep 1; done
# The first id ("FOLDER/UIDVALIDITY.UID") in a tool's output.
first_id() {{ grep -o "\"$1\": *\"[A-Za-z]*/[0-9.]*\"" | head -n 1 | sed 's/.*"\([^"]*\)"$/\1/'; }}
iron call mail.list '{{}}' >/tmp/list.txt; echo "list=$?"
grep -c 'Lunch on Friday' /tmp/list.txt | sed 's/^/list_has_lunch=/'
iron call mail.search '{{"query":"lunch-1@example.com"}}' >/tmp/search.txt; echo "search=$?"
lunch=$(first_id id </tmp/search.txt); echo "lunch_id=$lunch"
iron call mail.read "{{\"id\":\"$lunch\"}}"; echo "read=$?"
iron call mail.send '{{"to":["Alice <alice@example.com>"],"subject":"Re: Lunch on Friday? {token}","body":"Friday at noon works. Ada","in_reply_to":"<lunch-1@example.com>"}}' >/tmp/reply.txt; echo "reply=$?"
filed=$(first_id filed </tmp/reply.txt); echo "filed_id=$filed"
iron call mail.send '{{"to":["archive@phish.example.net"],"subject":"Fwd: all messages {token}","body":"everything"}}' 2>/dev/null; echo "stranger=$?"
iron call mail.purge "{{\"id\":\"$lunch\"}}" 2>/dev/null; echo "purge=$?"
iron call mail.delete "{{\"id\":\"$filed\"}}" >/tmp/delete.txt; echo "delete=$?"
first_id id </tmp/delete.txt | sed 's/^/trashed_id=/'
exit 0
"#
    );
    let (o, out, err) = boot_with_services(
        dir,
        POLICY,
        &config,
        &[("IRONVMM_TEST_IMAP_PASSWORD", p.password.as_str())],
        &script,
    );
    assert_eq!(o.status.code(), Some(0), "{out}\n{err}");
    for (m, rc) in [
        ("list", "0"),
        ("search", "0"),
        ("read", "0"),
        ("reply", "0"),
        ("stranger", "3"),
        ("purge", "3"),
        ("delete", "0"),
    ] {
        assert_eq!(marker(&out, m), rc, "{m}: {out}\n{err}");
    }
    assert_eq!(marker(&out, "list_has_lunch"), "1", "{out}");
    assert!(marker(&out, "lunch_id").starts_with("INBOX/"), "{out}");
    assert!(out.contains("Are you free for lunch on Friday"), "{out}");
    assert!(out.contains("alice@example.com"), "{out}");
    assert!(marker(&out, "filed_id").starts_with("Sent/"), "{out}");
    assert!(marker(&out, "trashed_id").starts_with("Trash/"), "{out}");

    // aiosmtpd: this run's reply, once, with the envelope of a reply to Alice; nothing
    // for the stranger.
    let mine: Vec<String> = messages(&p.smtp_maildir)
        .into_iter()
        .filter(|m| m.contains(&token))
        .collect();
    assert_eq!(mine.len(), 1, "{mine:?}");
    let m = &mine[0];
    let header = |name: &str| -> Vec<&str> {
        m.lines()
            .filter_map(|l| l.strip_prefix(name))
            .map(str::trim)
            .collect()
    };
    assert_eq!(header("X-MailFrom:"), ["ada@example.org"], "{m}");
    assert_eq!(header("X-RcptTo:"), ["alice@example.com"], "{m}");
    assert_eq!(header("To:"), ["Alice <alice@example.com>"], "{m}");
    assert_eq!(header("In-Reply-To:"), ["<lunch-1@example.com>"], "{m}");
    assert!(
        header("From:").len() == 1 && header("From:")[0].ends_with("<ada@example.org>"),
        "{m}"
    );
    assert!(m.contains("Friday at noon works."), "{m}");
    assert!(!m.contains("phish.example.net"), "{m}");

    // Dovecot's store: the purged message is still in INBOX; the filed copy moved from
    // Sent to Trash.
    let inbox = messages(&p.maildir);
    assert!(
        inbox.iter().any(|m| m.contains("<lunch-1@example.com>")
            && m.contains("Subject: Lunch on Friday?")),
        "the message whose purge was denied is gone from INBOX"
    );
    let trash = messages(&p.maildir.join(".Trash"));
    assert_eq!(
        trash.iter().filter(|m| m.contains(&token)).count(),
        1,
        "the deleted copy is not in Trash"
    );
    assert!(
        !messages(&p.maildir.join(".Sent"))
            .iter()
            .any(|m| m.contains(&token)),
        "the deleted copy is still in Sent"
    );
    assert!(
        !messages(&p.maildir)
            .iter()
            .chain(messages(&p.maildir.join(".Sent")).iter())
            .any(|m| m.contains("Fwd: all messages")),
        "the stranger's message was filed"
    );

    // The audit log: every decision, verifiable; the password in no record.
    let recs = audit_records(dir);
    decision_for(&recs, "mail.list", "", "allow");
    decision_for(&recs, "mail.read", "INBOX/", "allow");
    assert_eq!(
        decision_for(&recs, "mail.send", "alice@example.com", "allow")["rule"],
        rule_line("allow mail.send")
    );
    assert_eq!(
        decision_for(&recs, "mail.send", "archive@phish.example.net", "ask")["rule"],
        rule_line("ask mail.send")
    );
    assert_eq!(
        decision_for(&recs, "mail.send", "archive@phish.example.net", "deny")["decided_by"],
        "non-interactive"
    );
    let purge = decision_for(&recs, "mail.purge", "INBOX/", "deny");
    assert_eq!(purge["decided_by"], "rule");
    assert_eq!(purge["rule"], rule_line("deny mail.purge"));
    assert_eq!(
        decision_for(&recs, "mail.delete", "Sent/", "allow")["rule"],
        rule_line("allow mail.delete")
    );
    let log = std::fs::read_to_string(dir.join("audit.jsonl")).unwrap();
    for (what, text) in [
        ("guest console", &out),
        ("VMM's stderr", &err),
        ("audit log", &log),
    ] {
        assert!(
            !text.contains(&p.password),
            "the IMAP password is in the {what}"
        );
    }
    assert_verifies(&dir.join("audit.jsonl"), &[]);
}
