//! Random and hostile byte streams into a Connection: never a panic, memory stays
//! within the limits, and every reply line is JSON-RPC.

mod gate_common;

use gate_common::*;
use ironvmm::gate::GateLimits;
use proptest::prelude::*;

fn fragments() -> impl Strategy<Value = Vec<Vec<u8>>> {
    let piece = prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..64),
        Just(b"\n".to_vec()),
        Just(br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"fs.read","arguments":{"path":"hello.txt"}}}"#.to_vec()),
        Just(br#"{"jsonrpc":"2.0","id":2,"method":"ping"}"#.to_vec()),
        Just(b"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[".to_vec()),
        Just(br#"{"a":1,"a":2}"#.to_vec()),
        Just(b"\xff\xfe\"\\u0000\"".to_vec()),
    ];
    proptest::collection::vec(piece, 1..40)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn any_bytes_are_answered_or_reset_never_a_panic(chunks in fragments()) {
        let limits = GateLimits { max_output: 64 * 1024, ..GateLimits::with_max_frame(512) };
        let fx = Fixture::with(ironvmm::audit::SyncMode::Batch, limits, |_| {});
        let mut c = fx.conn("fuzz");
        let mut out = Vec::new();
        for chunk in chunks {
            out.clear();
            let r = c.on_data(&chunk, &mut out);
            prop_assert!(c.pending_bytes() <= 1024);
            let r = r.and_then(|()| settle(&mut c, &mut out));
            for line in out.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
                let v: serde_json::Value = serde_json::from_slice(line).unwrap();
                prop_assert_eq!(&v["jsonrpc"], "2.0");
                prop_assert!(v.get("result").is_some() != v.get("error").is_some());
            }
            if r.is_err() {
                break;
            }
        }
        c.on_close();
    }
}
