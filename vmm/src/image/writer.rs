//! Writes `guest.img`: a ustar archive of manifest.json, the kernel and the
//! initramfs, in that order, with fixed owners and times so that the same inputs
//! give the same bytes.

use std::fs;
use std::io::Write;
use std::path::Path;

use super::{BuildError, Manifest};

/// Writes the image to `out` through a temporary file and a rename, so a failed
/// build never leaves a half-written image under the final name.
pub fn write_image(
    out: &Path,
    manifest: &Manifest,
    kernel: &[u8],
    initramfs: &[u8],
    mtime: u32,
) -> Result<(), BuildError> {
    manifest.validate()?;
    let tmp = out.with_extension("img.partial");
    let result = (|| -> Result<(), BuildError> {
        let file = fs::File::create(&tmp).map_err(|e| BuildError::io(&tmp, e))?;
        let mut tar = tar::Builder::new(std::io::BufWriter::new(file));
        let manifest_json = manifest.to_json_pretty() + "\n";
        let members: [(&str, &[u8]); 3] = [
            ("manifest.json", manifest_json.as_bytes()),
            (&manifest.kernel, kernel),
            (&manifest.initramfs, initramfs),
        ];
        for (name, data) in members {
            let mut h = tar::Header::new_ustar();
            h.set_path(name).map_err(|e| BuildError::io(&tmp, e))?;
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(mtime as u64);
            h.set_entry_type(tar::EntryType::Regular);
            h.set_cksum();
            tar.append(&h, data).map_err(|e| BuildError::io(&tmp, e))?;
        }
        let mut w = tar.into_inner().map_err(|e| BuildError::io(&tmp, e))?;
        w.flush().map_err(|e| BuildError::io(&tmp, e))?;
        let file = w
            .into_inner()
            .map_err(|e| BuildError::io(&tmp, e.into_error()))?;
        file.sync_all().map_err(|e| BuildError::io(&tmp, e))?;
        fs::rename(&tmp, out).map_err(|e| BuildError::io(out, e))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}
