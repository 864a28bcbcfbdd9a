//! Fuzz target: a whole guest.img (tar with manifest.json, kernel, initramfs) read
//! from bytes, as `boot`, `run` and `image inspect` read it, and its initramfs listed.
#![no_main]

use ironvmm::image::GuestImage;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(img) = GuestImage::from_bytes(data.to_vec(), "fuzz.img") else {
        return;
    };
    let _ = img.members();
    let _ = img.initramfs_entries();
    assert_eq!(img.sha256().len(), 64);
});
