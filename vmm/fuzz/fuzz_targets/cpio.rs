//! Fuzz target: the newc cpio reader (`image inspect`, the image builder's check of
//! an initramfs). Any bytes: entries or an error, never a panic or a huge allocation.
#![no_main]

use ironvmm::image::cpio;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for keep in [false, true] {
        if let Ok(entries) = cpio::parse(data, keep) {
            for e in &entries {
                let _ = e.name_str();
            }
        }
    }
});
