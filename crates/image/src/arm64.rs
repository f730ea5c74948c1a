//! The arm64 kernel as Virtualization.framework and QEMU's `virt` machine boot it: a plain
//! (uncompressed) Linux arm64 `Image`.
//!
//! Debian's arm64 `vmlinuz` is already such an `Image` (an EFI-stub PE file carrying the
//! arm64 boot header); other kernels ship it gzip-compressed (`Image.gz`). [`plain_image`]
//! accepts both, gunzips the second, and refuses anything without the arm64 header magic
//! (`ARM\x64` at byte 56), so a wrong file fails at build time rather than as a silent boot
//! failure on a Mac.

use std::io::Read;

/// Offset and value of the arm64 `Image` header magic.
const MAGIC_OFFSET: usize = 56;
const MAGIC: &[u8; 4] = b"ARM\x64";
/// Upper bound of a decompressed kernel, against decompression bombs.
const MAX_IMAGE: u64 = 256 << 20;

/// Whether `data` starts with the arm64 `Image` header.
pub fn is_plain_image(data: &[u8]) -> bool {
    data.get(MAGIC_OFFSET..MAGIC_OFFSET + 4) == Some(MAGIC.as_slice())
}

/// The uncompressed arm64 `Image` in `data` (as is, or gunzipped); the error says what the
/// file is instead.
pub fn plain_image(data: &[u8]) -> Result<Vec<u8>, String> {
    if is_plain_image(data) {
        return Ok(data.to_vec());
    }
    if !data.starts_with(&[0x1f, 0x8b]) {
        return Err("not an arm64 Linux Image (no ARM\\x64 magic at byte 56) and not gzip".into());
    }
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(data)
        .take(MAX_IMAGE + 1)
        .read_to_end(&mut out)
        .map_err(|e| format!("gunzip: {e}"))?;
    if out.len() as u64 > MAX_IMAGE {
        return Err(format!("decompresses to more than {MAX_IMAGE} bytes"));
    }
    if !is_plain_image(&out) {
        return Err("gunzipped, but the result is not an arm64 Linux Image".into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn image() -> Vec<u8> {
        let mut v = vec![0u8; 4096];
        v[56..60].copy_from_slice(MAGIC);
        v[100] = 7;
        v
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn plain_image_is_kept() {
        assert_eq!(plain_image(&image()).unwrap(), image());
    }

    #[test]
    fn gzip_image_is_decompressed() {
        let gz = gzip(&image());
        assert!(!is_plain_image(&gz));
        assert_eq!(plain_image(&gz).unwrap(), image());
    }

    #[test]
    fn other_files_are_refused() {
        assert!(plain_image(b"MZ not a kernel")
            .unwrap_err()
            .contains("not an arm64"));
        let e = plain_image(&gzip(b"hello")).unwrap_err();
        assert!(e.contains("not an arm64 Linux Image"), "{e}");
        let e = plain_image(&[0x1f, 0x8b, 0, 0]).unwrap_err();
        assert!(e.contains("gunzip"), "{e}");
    }
}
