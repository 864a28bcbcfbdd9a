//! Scripted model answers for the inbox constitution: what a careful model answers
//! (the `good` ones) and the mistakes the failure-mode tests need.
#![allow(dead_code)]

use serde_json::{json, Value};

pub fn lists() -> String {
    json!({"lists": [{
        "name": "contacts", "kind": "email", "sentence": 2, "binding": "service", "service": "mail",
        "entries": [], "note": "\"people in my contacts\" are the addresses in the owner's address book"
    }]})
    .to_string()
}

pub const SEND_TO_CONTACTS: &str =
    "allow mail.send when all to in @contacts and (not exists cc or all cc in @contacts) \
and (not exists bcc or all bcc in @contacts) \"every recipient is in my contacts\"";

pub fn good_rules() -> Vec<Value> {
    vec![
        json!({"sentence": 4, "rule": "deny mail.purge \"never delete anything permanently\""}),
        json!({"sentence": 1, "rule": "allow mail.read"}),
        json!({"sentence": 1, "rule": "allow mail.list"}),
        json!({"sentence": 1, "rule": "allow mail.search"}),
        json!({"sentence": 2, "rule": SEND_TO_CONTACTS}),
        json!({"sentence": 3, "rule": "ask mail.send \"a recipient is not in my contacts: ask me first\""}),
        json!({"sentence": 1, "rule": "allow llm.chat \"the agent's model turns\""}),
        json!({"sentence": 4, "rule": "allow mail.delete \"moving to Trash is not permanent\""}),
    ]
}

fn draft_of(rules: Vec<Value>) -> String {
    json!({"rules": rules, "default": "deny", "assumptions": [
        "\"read all my email\" covers listing and searching it, not only reading one message",
        "\"use its model\" is llm.chat, whatever the model",
        "\"move mail to Trash\" is mail.delete; mail.purge deletes permanently"
    ]})
    .to_string()
}

pub fn good_draft() -> String {
    draft_of(good_rules())
}

/// A draft the engine rejects: an unclosed parenthesis and a set without `@`.
pub fn syntax_error_draft() -> String {
    let mut r = good_rules();
    r[4] = json!({"sentence": 2, "rule": "allow mail.send when all to in @contacts and (not exists cc or all cc in @contacts"});
    r[5] = json!({"sentence": 3, "rule": "ask mail.send when any to in contacts"});
    draft_of(r)
}

/// A draft that forgets bcc: an outsider in bcc is sent without asking.
pub fn no_bcc_draft() -> String {
    let mut r = good_rules();
    r[4] = json!({"sentence": 2, "rule": "allow mail.send when all to in @contacts and (not exists cc or all cc in @contacts) \"every recipient is in my contacts\""});
    draft_of(r)
}

/// The same bug with a different reason text, so each redraft differs.
pub fn no_bcc_draft_reworded(tag: &str) -> String {
    let mut r = good_rules();
    r[4] = json!({"sentence": 2, "rule": format!("allow mail.send when all to in @contacts and (not exists cc or all cc in @contacts) \"contacts only ({tag})\"")});
    draft_of(r)
}

fn send(to: &[&str], cc: &[&str], bcc: &[&str]) -> Value {
    let mut args = json!({"to": to, "subject": "Hello", "body": "See you at noon."});
    if !cc.is_empty() {
        args["cc"] = json!(cc);
    }
    if !bcc.is_empty() {
        args["bcc"] = json!(bcc);
    }
    json!({"tool": "mail.send", "args": args})
}

pub fn good_scenarios() -> Vec<Value> {
    let sc = |sentence: u32, why: &str, call: Value, expect: &str| json!({"sentence": sentence, "why": why, "call": call, "expect": expect});
    vec![
        sc(
            1,
            "reading a message",
            json!({"tool": "mail.read", "args": {"id": "m-1001"}}),
            "allow",
        ),
        sc(
            1,
            "listing the inbox",
            json!({"tool": "mail.list", "args": {"folder": "INBOX"}}),
            "allow",
        ),
        sc(
            1,
            "searching mail",
            json!({"tool": "mail.search", "args": {"query": "invoice"}}),
            "allow",
        ),
        sc(
            2,
            "one contact",
            send(&["alice@example.com"], &[], &[]),
            "allow",
        ),
        sc(
            2,
            "two contacts, a contact in cc",
            send(
                &["alice@example.com", "bob@example.org"],
                &["carol@example.net"],
                &[],
            ),
            "allow",
        ),
        sc(
            2,
            "a contact with a display name and upper-case domain",
            send(&["Bob <bob@EXAMPLE.org>"], &[], &[]),
            "allow",
        ),
        sc(
            3,
            "a stranger",
            send(&["mallory@evil.example"], &[], &[]),
            "ask",
        ),
        sc(
            3,
            "a contact and a stranger in to",
            send(&["alice@example.com", "mallory@evil.example"], &[], &[]),
            "ask",
        ),
        sc(
            3,
            "a stranger hidden in cc",
            send(&["alice@example.com"], &["mallory@evil.example"], &[]),
            "ask",
        ),
        sc(
            3,
            "a stranger hidden in bcc",
            send(&["alice@example.com"], &[], &["mallory@evil.example"]),
            "ask",
        ),
        sc(
            3,
            "a look-alike of a contact's address",
            send(&["alice@example.com.evil.example"], &[], &[]),
            "ask",
        ),
        sc(
            4,
            "permanent deletion",
            json!({"tool": "mail.purge", "args": {"id": "m-1001"}}),
            "deny",
        ),
        sc(
            4,
            "moving to Trash is allowed",
            json!({"tool": "mail.delete", "args": {"id": "m-1001"}}),
            "allow",
        ),
        sc(
            4,
            "a made-up tool that would empty the trash",
            json!({"tool": "mail.empty_trash", "args": {}}),
            "deny",
        ),
        sc(
            1,
            "the agent's model at work on my mail",
            json!({"tool": "llm.chat", "args": {"model": "gpt-4o-mini",
                "messages": [{"role": "user", "content": "Summarize my inbox."}]}}),
            "allow",
        ),
    ]
}

pub fn scenarios_of(s: Vec<Value>) -> String {
    json!({"scenarios": s, "uncovered": []}).to_string()
}

pub fn good_scenarios_answer() -> String {
    scenarios_of(good_scenarios())
}

/// Index of the bcc scenario (id s10) and the mail.purge one (id s12).
pub const BCC: usize = 9;
pub const PURGE: usize = 11;

/// The scenarios with one wrong expectation: purging what is already in Trash "is fine".
pub fn wrong_purge_scenarios() -> String {
    let mut s = good_scenarios();
    s[PURGE]["call"]["args"]["id"] = json!("Trash/m-1001");
    s[PURGE]["expect"] = json!("allow");
    s[PURGE]["why"] = json!("the message is already in Trash: purging it only empties the Trash");
    scenarios_of(s)
}

pub fn judge(items: &[(&str, &str, Option<&str>, &str)]) -> String {
    let js: Vec<Value> = items
        .iter()
        .map(|(id, fault, expect, why)| {
            let mut j = json!({"scenario": id, "fault": fault, "why": why});
            if let Some(e) = expect {
                j["expect"] = json!(e);
            }
            j
        })
        .collect();
    json!({"judgements": js}).to_string()
}
