//! manifest.json: round trip, strictness (unknown or duplicate keys, wrong
//! format), defaults and range checks, each error naming the key.

use ironvmm::image::{Manifest, ManifestError};

const GOOD: &str = r#"{"format": 1, "kernel": "vmlinux", "initramfs": "initramfs.cpio",
 "cmdline": "quiet", "mem_mib": 256, "cpus": 2,
 "agent": {"cmd": ["sh", "-c", "echo hi"], "env": {"K": "V"}, "cwd": "/work"},
 "proxy": false}"#;

fn err(json: &str) -> String {
    Manifest::from_json(json.as_bytes())
        .unwrap_err()
        .to_string()
}

#[test]
fn the_interfaces_example_parses() {
    let m = Manifest::from_json(GOOD.as_bytes()).unwrap();
    assert_eq!(m.mem_mib, 256);
    assert_eq!(m.cpus, 2);
    assert_eq!(m.agent.cmd, ["sh", "-c", "echo hi"]);
    assert_eq!(m.agent.env["K"], "V");
    assert_eq!(m.agent.cwd, "/work");
    assert_eq!(m.cmdline, "quiet");
}

#[test]
fn round_trip_is_identity() {
    let m = Manifest::from_json(GOOD.as_bytes()).unwrap();
    let again = Manifest::from_json(m.to_json_pretty().as_bytes()).unwrap();
    assert_eq!(m, again);
}

#[test]
fn defaults_for_optional_keys() {
    let m = Manifest::from_json(
        br#"{"format":1,"kernel":"vmlinux","initramfs":"initramfs.cpio","agent":{"cmd":["true"]}}"#,
    )
    .unwrap();
    assert_eq!((m.mem_mib, m.cpus, m.proxy), (128, 1, false));
    assert_eq!(m.agent.cwd, "/");
    assert!(m.agent.env.is_empty());
    assert_eq!(m.cmdline, "");
}

#[test]
fn unknown_keys_are_errors_at_every_level() {
    let top = GOOD.replace("\"proxy\": false", "\"proxy\": false, \"extra\": 1");
    assert!(err(&top).contains("unknown field `extra`"), "{}", err(&top));
    let inner = GOOD.replace("\"cwd\": \"/work\"", "\"cwd\": \"/work\", \"user\": \"x\"");
    assert!(
        err(&inner).contains("unknown field `user`"),
        "{}",
        err(&inner)
    );
}

#[test]
fn format_other_than_1_is_invalid() {
    for f in ["2", "0", "\"1\"", "1.5", "null"] {
        let j = GOOD.replace("\"format\": 1", &format!("\"format\": {f}"));
        let e = Manifest::from_json(j.as_bytes()).unwrap_err();
        assert!(matches!(e, ManifestError::WrongFormat(_)), "{f}: {e}");
    }
    // A future format with new keys reports the format, not the keys.
    let future = GOOD.replace("\"format\": 1", "\"format\": 2, \"new_key\": true");
    assert!(err(&future).contains("format 2"));
    let none = GOOD.replace("\"format\": 1,", "");
    assert!(matches!(
        Manifest::from_json(none.as_bytes()),
        Err(ManifestError::NoFormat)
    ));
}

#[test]
fn duplicate_keys_are_errors() {
    let dup = GOOD.replace("\"cpus\": 2", "\"cpus\": 2, \"cpus\": 3");
    assert!(
        err(&dup).contains("duplicate field `cpus`"),
        "{}",
        err(&dup)
    );
    let dup_env = GOOD.replace("{\"K\": \"V\"}", "{\"K\": \"V\", \"K\": \"W\"}");
    assert!(
        err(&dup_env).contains("duplicate variable \"K\""),
        "{}",
        err(&dup_env)
    );
}

#[test]
fn values_are_range_checked() {
    let cases = [
        ("\"cpus\": 2", "\"cpus\": 0", "cpus"),
        ("\"cpus\": 2", "\"cpus\": 9", "cpus"),
        ("\"mem_mib\": 256", "\"mem_mib\": 1", "mem_mib"),
        (
            "\"kernel\": \"vmlinux\"",
            "\"kernel\": \"../vmlinux\"",
            "kernel",
        ),
        (
            "\"kernel\": \"vmlinux\"",
            "\"kernel\": \"manifest.json\"",
            "kernel",
        ),
        (
            "\"kernel\": \"vmlinux\"",
            "\"kernel\": \"initramfs.cpio\"",
            "same member",
        ),
        ("[\"sh\", \"-c\", \"echo hi\"]", "[]", "agent.cmd"),
        ("\"cwd\": \"/work\"", "\"cwd\": \"work\"", "agent.cwd"),
        ("{\"K\": \"V\"}", "{\"A=B\": \"V\"}", "agent.env"),
        (
            "\"cmdline\": \"quiet\"",
            "\"cmdline\": \"a\\nb\"",
            "cmdline",
        ),
        ("\"cpus\": 2", "\"cpus\": -1", "cpus"),
        ("\"proxy\": false", "\"proxy\": \"no\"", "proxy"),
    ];
    for (from, to, want) in cases {
        let j = GOOD.replace(from, to);
        assert_ne!(j, GOOD, "case {to} did not apply");
        let e = err(&j);
        assert!(e.contains(want), "{to}: {e:?} should mention {want:?}");
    }
}

#[test]
fn not_json_or_not_an_object() {
    assert!(matches!(
        Manifest::from_json(b"{\"format\":"),
        Err(ManifestError::Json(_))
    ));
    assert!(err("[1]").contains("not a JSON object"));
    let big = vec![b' '; (1 << 20) + 1];
    assert!(Manifest::from_json(&big)
        .unwrap_err()
        .to_string()
        .contains("limit"));
}
