//! Fuzz target: `manifest.json` of a guest image. Whatever the bytes, parsing and
//! validation return a value or an error naming what is wrong; an accepted
//! manifest writes back to JSON that parses to the same manifest.
#![no_main]

use ironvmm::image::Manifest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(m) = Manifest::from_json(data) else {
        return;
    };
    let _ = m.validate();
    let again = Manifest::from_json(m.to_json_pretty().as_bytes())
        .expect("a manifest written by ironvmm parses back");
    assert_eq!(again, m);
});
