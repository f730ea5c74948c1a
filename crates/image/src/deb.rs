//! Reading files out of Debian packages, in Rust (no `dpkg`, `ar` or `tar` binaries), so the
//! image builds on any host OS.
//!
//! A `.deb` is an `ar` archive whose `data.tar.{xz,zst}` member holds the files. The packages
//! read here are verified against pinned sha256 sums before they are opened, so this module
//! only has to be correct, not hardened; the parsing itself is done by the `ar`, `tar`,
//! `lzma-rs` and `ruzstd` crates.

use std::collections::BTreeMap;
use std::io::{self, Read};
use std::path::Path;

/// A regular file taken from a package.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DebFile {
    /// Permission bits.
    pub mode: u32,
    /// Contents.
    pub data: Vec<u8>,
}

/// Errors reading a package.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DebError {
    /// The file could not be read.
    #[error("cannot read {0}")]
    Io(String, #[source] io::Error),
    /// No `data.tar.*` member.
    #[error("{0} has no data.tar member: not a Debian package?")]
    NoData(String),
    /// The data member uses a compression this build does not read.
    #[error("{path}: unsupported data member {member} (supported: data.tar, .xz, .zst)")]
    Compression {
        /// Package.
        path: String,
        /// Member name.
        member: String,
    },
    /// Decompression failed.
    #[error("{0}: corrupt compressed data: {1}")]
    Decompress(String, String),
}

/// Decompresses a whole xz stream.
pub fn unxz(data: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    lzma_rs::xz_decompress(&mut io::BufReader::new(data), &mut out).map_err(|e| e.to_string())?;
    Ok(out)
}

/// Decompresses a whole zstd stream.
pub fn unzstd(data: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let mut dec = ruzstd::decoding::StreamingDecoder::new(data).map_err(|e| e.to_string())?;
    dec.read_to_end(&mut out).map_err(|e| e.to_string())?;
    Ok(out)
}

/// Normalises a tar member path: `./boot/x` → `boot/x`.
fn normalise(path: &str) -> &str {
    path.trim_start_matches("./").trim_start_matches('/')
}

/// Extracts the regular files for which `wanted(path)` is true from the package at `deb`.
/// Paths are relative, without a leading `./` (`boot/vmlinuz-...`).
pub fn extract(
    deb: &Path,
    wanted: &dyn Fn(&str) -> bool,
) -> Result<BTreeMap<String, DebFile>, DebError> {
    let name = deb.display().to_string();
    let io_err = |e| DebError::Io(name.clone(), e);
    let file = std::fs::File::open(deb).map_err(io_err)?;
    let mut archive = ar::Archive::new(io::BufReader::new(file));
    while let Some(member) = archive.next_entry() {
        let mut member = member.map_err(io_err)?;
        let id = String::from_utf8_lossy(member.header().identifier()).to_string();
        if !id.starts_with("data.tar") {
            continue;
        }
        let mut raw = Vec::new();
        member.read_to_end(&mut raw).map_err(io_err)?;
        let tar_bytes = match id.as_str() {
            "data.tar" => raw,
            "data.tar.xz" => unxz(&raw).map_err(|e| DebError::Decompress(name.clone(), e))?,
            "data.tar.zst" => unzstd(&raw).map_err(|e| DebError::Decompress(name.clone(), e))?,
            _ => {
                return Err(DebError::Compression {
                    path: name,
                    member: id,
                })
            }
        };
        return read_tar(&tar_bytes, wanted).map_err(io_err);
    }
    Err(DebError::NoData(name))
}

fn read_tar(bytes: &[u8], wanted: &dyn Fn(&str) -> bool) -> io::Result<BTreeMap<String, DebFile>> {
    let mut out = BTreeMap::new();
    let mut archive = tar::Archive::new(bytes);
    for entry in archive.entries()? {
        let mut entry = entry?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let path = entry.path()?.to_string_lossy().to_string();
        let path = normalise(&path).to_string();
        if !wanted(&path) {
            continue;
        }
        let mode = entry.header().mode()?;
        let mut data = Vec::new();
        entry.read_to_end(&mut data)?;
        out.insert(path, DebFile { mode, data });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a minimal `.deb`: an ar archive with debian-binary and data.tar.
    fn fake_deb(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut tar_bytes = Vec::new();
        {
            let mut b = tar::Builder::new(&mut tar_bytes);
            for (path, data) in files {
                let mut h = tar::Header::new_gnu();
                h.set_size(data.len() as u64);
                h.set_mode(0o755);
                h.set_entry_type(tar::EntryType::Regular);
                h.set_cksum();
                b.append_data(&mut h, format!("./{path}"), *data).unwrap();
            }
            b.finish().unwrap();
        }
        let mut out = Vec::new();
        {
            let mut a = ar::Builder::new(&mut out);
            let v = b"2.0\n";
            a.append(
                &ar::Header::new(b"debian-binary".to_vec(), v.len() as u64),
                &v[..],
            )
            .unwrap();
            a.append(
                &ar::Header::new(b"data.tar".to_vec(), tar_bytes.len() as u64),
                &tar_bytes[..],
            )
            .unwrap();
        }
        out
    }

    #[test]
    fn extracts_wanted_files_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.deb");
        std::fs::write(
            &path,
            fake_deb(&[("bin/busybox", b"BB"), ("usr/share/doc/x", b"doc")]),
        )
        .unwrap();
        let files = extract(&path, &|p| p.starts_with("bin/")).unwrap();
        assert_eq!(files.len(), 1);
        assert_eq!(
            files["bin/busybox"],
            DebFile {
                mode: 0o755,
                data: b"BB".to_vec()
            }
        );
    }

    #[test]
    fn not_a_deb_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.deb");
        std::fs::write(&path, b"!<arch>\n").unwrap();
        assert!(matches!(
            extract(&path, &|_| true),
            Err(DebError::NoData(_))
        ));
        std::fs::write(&path, b"garbage").unwrap();
        assert!(extract(&path, &|_| true).is_err());
        let missing = dir.path().join("missing.deb");
        let err = extract(&missing, &|_| true).unwrap_err();
        assert!(err.to_string().contains("missing.deb"));
    }

    #[test]
    fn xz_and_zstd_decode() {
        // "hello\n" compressed with `xz` and `zstd` (fixed bytes, made once on Linux).
        let xz = [
            0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00, 0x00, 0x04, 0xe6, 0xd6, 0xb4, 0x46, 0x02, 0x00,
            0x21, 0x01, 0x16, 0x00, 0x00, 0x00, 0x74, 0x2f, 0xe5, 0xa3, 0x01, 0x00, 0x05, 0x68,
            0x65, 0x6c, 0x6c, 0x6f, 0x0a, 0x00, 0x00, 0x00, 0xa5, 0x60, 0x97, 0xf1, 0x94, 0xf6,
            0xfd, 0xe0, 0x00, 0x01, 0x1e, 0x06, 0xc1, 0x2f, 0xa4, 0x1d, 0x1f, 0xb6, 0xf3, 0x7d,
            0x01, 0x00, 0x00, 0x00, 0x00, 0x04, 0x59, 0x5a,
        ];
        let zst = [
            0x28, 0xb5, 0x2f, 0xfd, 0x04, 0x58, 0x31, 0x00, 0x00, 0x68, 0x65, 0x6c, 0x6c, 0x6f,
            0x0a, 0x53, 0x88, 0xbd, 0x91,
        ];
        assert_eq!(unxz(&xz).unwrap(), b"hello\n");
        assert_eq!(unzstd(&zst).unwrap(), b"hello\n");
        assert!(unxz(b"nope").is_err());
        assert!(unzstd(b"nope").is_err());
    }
}
