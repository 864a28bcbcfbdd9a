//! The common path of a decision allocates nothing: a counting allocator watches
//! `decide_ref` on calls whose values are already canonical.

use ironvmm_policy::{Call, Catalog, Policy, Verdict};
use serde_json::json;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

struct Counting;
static ALLOCS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every method forwards to the system allocator with the caller's own
// arguments, so `Counting` keeps all of `System`'s guarantees.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller upholds `alloc`'s contract for `l`.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: `p` came from this allocator (i.e. `System`) with layout `l`.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: `p` came from `System` with layout `l`; the caller checks `n`.
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static A: Counting = Counting;

#[test]
fn common_decisions_do_not_allocate() {
    let catalog = Catalog::from_json(include_str!("../../examples/catalog.json")).unwrap();
    let src = "list contacts = [\"alice@example.com\", \"bob@example.org\"]\n\
               list news = [\"apnews.com\", \"*.bbc.co.uk\"]\n\
               deny fs.* when path matches \"*.pem\" or path regex \".*/\\\\.env\"\n\
               allow fs.read when path under \"/workspace\" and not path under \"/workspace/secret\"\n\
               allow mail.send when all to in @contacts and not exists cc and len(body) <= 10KB\n\
               ask mail.send \"not a contact\"\n\
               allow net.connect when host in @news and port == 443\n\
               allow mail.read\n";
    let mut p = Policy::from_source(src, "p.rules", None, Some(&catalog))
        .unwrap()
        .policy;
    p.add_protected_path("/workspace/.ironvmm");
    let calls = [
        (
            Call::new("fs.read", json!({"path": "/workspace/src/main.rs"})),
            Verdict::Allow,
        ),
        (
            Call::new("fs.read", json!({"path": "/workspace/secret/k"})),
            Verdict::Deny,
        ),
        (
            Call::new("fs.read", json!({"path": "/workspace/a.pem"})),
            Verdict::Deny,
        ),
        (
            Call::new(
                "mail.send",
                json!({"to": ["alice@example.com"], "subject": "s", "body": "b"}),
            ),
            Verdict::Allow,
        ),
        (
            Call::new(
                "mail.send",
                json!({"to": ["eve@evil.com"], "subject": "s", "body": "b"}),
            ),
            Verdict::Ask,
        ),
        (
            Call::new("net.connect", json!({"host": "www.bbc.co.uk", "port": 443})),
            Verdict::Allow,
        ),
        (
            Call::new("net.connect", json!({"host": "evil.com", "port": 443})),
            Verdict::Deny,
        ),
        (Call::new("mail.read", json!({"id": "1"})), Verdict::Allow),
    ];
    for (c, want) in &calls {
        assert_eq!(p.decide_ref(c).verdict, *want, "{c:?}");
    }
    for (c, want) in &calls {
        let before = ALLOCS.load(Ordering::Relaxed);
        let d = p.decide_ref(c);
        let after = ALLOCS.load(Ordering::Relaxed);
        assert_eq!(d.verdict, *want);
        assert_eq!(
            after - before,
            0,
            "{} allocation(s) deciding {c:?}",
            after - before
        );
    }
}
