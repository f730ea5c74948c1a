//! Getting pinned packages into the download directory and checking their sha256.
//!
//! A package already in the download directory is used after its hash is checked. A missing
//! one is fetched with `apt-get download <name>=<version>` (from whatever mirror the machine's
//! apt sources name) into a temporary directory, checked, then renamed into place, so a
//! half-downloaded or wrong file never sits under the final name. Where `apt-get` is absent
//! the error names the file to put there by hand.

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::manifest::{hex, DebPin};

/// Errors getting a package.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FetchError {
    /// A file could not be read or written.
    #[error("cannot access {0}")]
    Io(String, #[source] io::Error),
    /// The package's hash is not the pinned one.
    #[error("{path} has sha256 {actual}, but {name}={version} is pinned to {expected}; delete the file, or check the apt mirror")]
    Mismatch {
        /// File.
        path: String,
        /// Package.
        name: String,
        /// Version.
        version: String,
        /// Pinned hash.
        expected: String,
        /// Hash found.
        actual: String,
    },
    /// No apt-get to download with.
    #[error("{name}={version} is not in {dir} and apt-get is not available to download it; get {file} (sha256 {sha256}) from a Debian mirror and put it there")]
    NoApt {
        /// Package.
        name: String,
        /// Version.
        version: String,
        /// Download directory.
        dir: String,
        /// File name to use.
        file: String,
        /// Pinned hash.
        sha256: String,
    },
    /// apt-get failed.
    #[error("`apt-get download {name}={version}` failed: {detail}; run `apt-get update` (after `dpkg --add-architecture <arch>` for a foreign architecture; the package is in Debian 12 \"bookworm\", other systems need that suite in their apt sources), or {manual}")]
    Apt {
        /// Package.
        name: String,
        /// Version.
        version: String,
        /// apt's last error line.
        detail: String,
        /// How to provide the file by hand.
        manual: String,
    },
}

/// sha256 of a file, lowercase hex.
pub fn sha256_file(path: &Path) -> io::Result<String> {
    let mut file = File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

/// sha256 of bytes, lowercase hex.
pub fn sha256_bytes(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

fn verify(pin: &DebPin, path: &Path) -> Result<(), FetchError> {
    let actual = sha256_file(path).map_err(|e| FetchError::Io(path.display().to_string(), e))?;
    if actual == pin.sha256 {
        Ok(())
    } else {
        Err(FetchError::Mismatch {
            path: path.display().to_string(),
            name: pin.name.to_string(),
            version: pin.version.to_string(),
            expected: pin.sha256.to_string(),
            actual,
        })
    }
}

/// Path of `pin` in `dir`, downloading it with `apt-get` if absent. The hash is always
/// checked. `progress` receives one line per step.
pub fn ensure_deb(
    pin: &DebPin,
    dir: &Path,
    progress: &dyn Fn(&str),
) -> Result<PathBuf, FetchError> {
    let path = dir.join(pin.file_name());
    if path.exists() {
        progress(&format!("verifying {}", path.display()));
        return verify(pin, &path).map(|()| path);
    }
    std::fs::create_dir_all(dir).map_err(|e| FetchError::Io(dir.display().to_string(), e))?;
    let apt = which("apt-get").ok_or_else(|| FetchError::NoApt {
        name: pin.name.to_string(),
        version: pin.version.to_string(),
        dir: dir.display().to_string(),
        file: pin.file_name(),
        sha256: pin.sha256.to_string(),
    })?;
    progress(&format!(
        "fetching {}={} with apt-get download",
        pin.name, pin.version
    ));
    let tmp = tempfile::Builder::new()
        .prefix(".download-")
        .tempdir_in(dir)
        .map_err(|e| FetchError::Io(dir.display().to_string(), e))?;
    let out = Command::new(apt)
        .args(["download", "-q"])
        // `name:arch=version`: also fetches another architecture's package once dpkg knows
        // that architecture (`dpkg --add-architecture arm64 && apt-get update`).
        .arg(format!("{}:{}={}", pin.name, pin.deb_arch, pin.version))
        .current_dir(tmp.path())
        .output()
        .map_err(|e| FetchError::Io("apt-get".into(), e))?;
    let got = find_deb(tmp.path());
    let Some(got) = got.filter(|_| out.status.success()) else {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let detail = stderr
            .lines()
            .rev()
            .find(|l| l.starts_with("E:"))
            .or_else(|| stderr.lines().last())
            .unwrap_or("no package file was written")
            .trim()
            .to_string();
        return Err(FetchError::Apt {
            name: pin.name.to_string(),
            version: pin.version.to_string(),
            detail,
            manual: format!(
                "put {} (sha256 {}) into {} by hand",
                pin.file_name(),
                pin.sha256,
                dir.display()
            ),
        });
    };
    progress(&format!("verifying sha256 of {}", pin.file_name()));
    verify(pin, &got)?;
    std::fs::rename(&got, &path).map_err(|e| FetchError::Io(path.display().to_string(), e))?;
    Ok(path)
}

fn find_deb(dir: &Path) -> Option<PathBuf> {
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
}

/// Finds `program` in `PATH`.
pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PIN: DebPin = DebPin {
        name: "vmcp-test-pkg",
        version: "1:2.0-1",
        deb_arch: "amd64",
        // sha256 of "abc"
        sha256: "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
    };

    #[test]
    fn present_file_is_verified() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(PIN.file_name());
        std::fs::write(&path, b"abc").unwrap();
        let lines = std::cell::RefCell::new(Vec::new());
        let got = ensure_deb(&PIN, dir.path(), &|l| {
            lines.borrow_mut().push(l.to_string())
        })
        .unwrap();
        assert_eq!(got, path);
        assert!(lines.borrow()[0].starts_with("verifying"));

        std::fs::write(&path, b"abd").unwrap();
        let err = ensure_deb(&PIN, dir.path(), &|_| {})
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("sha256") && err.contains(PIN.sha256) && err.contains("delete"),
            "{err}"
        );
    }

    #[test]
    fn unknown_package_gives_an_apt_error() {
        if which("apt-get").is_none() {
            vmcp_test_support::skipped!("SKIPPED: apt-get is not installed");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let err = ensure_deb(&PIN, dir.path(), &|_| {}).unwrap_err();
        assert!(matches!(err, FetchError::Apt { .. }), "{err}");
        let msg = err.to_string();
        assert!(msg.contains("vmcp-test-pkg=1:2.0-1"), "{msg}");
        assert!(
            msg.contains(&PIN.file_name()) && msg.contains(PIN.sha256),
            "{msg}"
        );
        // Nothing is left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn hashes() {
        assert_eq!(sha256_bytes(b"abc"), PIN.sha256);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"abc").unwrap();
        assert_eq!(sha256_file(&p).unwrap(), PIN.sha256);
    }
}
