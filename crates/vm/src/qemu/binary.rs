//! Finding `qemu-system-<arch>` and reading its version.
//!
//! `$VMCP_QEMU` names the binary explicitly; otherwise each `PATH` entry is searched.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::Arch;

/// Environment variable naming the QEMU binary to use.
pub const QEMU_ENV: &str = "VMCP_QEMU";

/// Why no QEMU binary was found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FindError {
    /// `$VMCP_QEMU` points at nothing runnable.
    #[error("${QEMU_ENV}={0} is not an executable file: fix or unset it")]
    BadOverride(PathBuf),
    /// Not in `PATH`.
    #[error("{name} was not found in PATH: install QEMU (Debian/Ubuntu: apt-get install {package}) or set ${QEMU_ENV}")]
    NotFound {
        /// Binary name looked for.
        name: String,
        /// Package that provides it on Debian/Ubuntu.
        package: &'static str,
    },
    /// Not in `PATH` nor in `%ProgramFiles%\\qemu` (Windows).
    #[error("{name} was not found in PATH or in %ProgramFiles%\\qemu: install QEMU for Windows from {url} or set ${QEMU_ENV}", url = crate::qemu::host_windows::qemu_args::QEMU_DOWNLOAD_URL)]
    NotFoundWindows {
        /// Binary name looked for.
        name: String,
    },
}

/// The binary name for `arch` (with the host's executable suffix).
pub fn binary_name(arch: Arch) -> String {
    format!(
        "qemu-system-{}{}",
        arch.as_str(),
        std::env::consts::EXE_SUFFIX
    )
}

fn debian_package(arch: Arch) -> &'static str {
    match arch {
        Arch::X86_64 => "qemu-system-x86",
        Arch::Aarch64 => "qemu-system-arm",
    }
}

/// Finds the QEMU binary for `arch` given the values of `$VMCP_QEMU` and `$PATH`, using
/// `is_exe` to test candidates. Pure apart from `is_exe`.
pub fn find_with(
    arch: Arch,
    override_var: Option<&OsStr>,
    path_var: Option<&OsStr>,
    is_exe: impl Fn(&Path) -> bool,
) -> Result<PathBuf, FindError> {
    if let Some(o) = override_var.filter(|o| !o.is_empty()) {
        let p = PathBuf::from(o);
        // A bare name in the override is looked up in PATH too.
        if p.components().count() == 1 {
            if let Some(found) = search_path(&p.to_string_lossy(), path_var, &is_exe) {
                return Ok(found);
            }
        }
        return if is_exe(&p) {
            Ok(p)
        } else {
            Err(FindError::BadOverride(p))
        };
    }
    let name = binary_name(arch);
    search_path(&name, path_var, &is_exe).ok_or(FindError::NotFound {
        name,
        package: debian_package(arch),
    })
}

fn search_path(
    name: &str,
    path_var: Option<&OsStr>,
    is_exe: &impl Fn(&Path) -> bool,
) -> Option<PathBuf> {
    std::env::split_paths(path_var?)
        .filter(|d| !d.as_os_str().is_empty())
        .map(|d| d.join(name))
        .find(|p| is_exe(p))
}

/// Finds the QEMU binary for `arch` on this host.
pub fn find(arch: Arch) -> Result<PathBuf, FindError> {
    let found = find_with(
        arch,
        std::env::var_os(QEMU_ENV).as_deref(),
        std::env::var_os("PATH").as_deref(),
        is_executable_file,
    );
    match found {
        // Windows: the QEMU installer does not add itself to PATH; try its default folder.
        Err(FindError::NotFound { name, .. }) if cfg!(windows) => {
            crate::qemu::host_windows::qemu_args::find_qemu(
                arch,
                None,
                std::env::var_os("ProgramFiles").as_deref(),
                is_executable_file,
            )
            .ok_or(FindError::NotFoundWindows { name })
        }
        other => other,
    }
}

fn is_executable_file(p: &Path) -> bool {
    match std::fs::metadata(p) {
        Ok(m) if m.is_file() => is_exec_mode(&m),
        _ => false,
    }
}

#[cfg(unix)]
fn is_exec_mode(m: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::PermissionsExt;
    m.permissions().mode() & 0o111 != 0
}

#[cfg(not(unix))]
fn is_exec_mode(_m: &std::fs::Metadata) -> bool {
    true
}

/// Extracts `10.0.2` from `QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2)`.
pub fn parse_version(output: &str) -> Option<String> {
    let line = output.lines().next()?;
    let rest = line.split("version").nth(1)?.trim();
    let v: String = rest
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    (!v.is_empty()).then_some(v)
}

/// Runs `qemu --version` (bounded by `timeout`) and returns the version.
pub async fn version(binary: &Path, timeout: Duration) -> Result<String, String> {
    let mut cmd = tokio::process::Command::new(binary);
    cmd.arg("--version")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(timeout, cmd.output())
        .await
        .map_err(|_| {
            format!(
                "`{} --version` did not answer in {timeout:?}",
                binary.display()
            )
        })?
        .map_err(|e| format!("cannot run {}: {e}", binary.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    parse_version(&text).ok_or_else(|| {
        format!(
            "`{} --version` printed no version: {:?}",
            binary.display(),
            text.lines().next().unwrap_or("")
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_first_in_path() {
        let path = std::env::join_paths(["/a", "", "/b", "/c"]).unwrap();
        let found = find_with(Arch::X86_64, None, Some(&path), |p| {
            p.starts_with("/b") || p.starts_with("/c")
        })
        .unwrap();
        assert_eq!(found, Path::new("/b").join(binary_name(Arch::X86_64)));
    }

    #[test]
    fn missing_names_the_package() {
        let path = std::env::join_paths(["/a"]).unwrap();
        let e = find_with(Arch::Aarch64, None, Some(&path), |_| false).unwrap_err();
        let s = e.to_string();
        assert!(
            s.contains("qemu-system-aarch64") && s.contains("qemu-system-arm"),
            "{s}"
        );
        assert!(s.contains(QEMU_ENV));
        let e = find_with(Arch::X86_64, None, None, |_| true).unwrap_err();
        assert!(matches!(e, FindError::NotFound { .. }));
    }

    #[test]
    fn override_wins_and_is_checked() {
        let path = std::env::join_paths(["/bin"]).unwrap();
        let p = find_with(
            Arch::X86_64,
            Some(OsStr::new("/opt/q/qemu")),
            Some(&path),
            |p| p == Path::new("/opt/q/qemu"),
        )
        .unwrap();
        assert_eq!(p, Path::new("/opt/q/qemu"));
        let e = find_with(Arch::X86_64, Some(OsStr::new("/nope")), Some(&path), |_| {
            false
        })
        .unwrap_err();
        assert_eq!(e, FindError::BadOverride("/nope".into()));
        // A bare name is looked up in PATH.
        let p = find_with(Arch::X86_64, Some(OsStr::new("myqemu")), Some(&path), |p| {
            p == Path::new("/bin/myqemu")
        })
        .unwrap();
        assert_eq!(p, Path::new("/bin/myqemu"));
        // An empty override is ignored.
        assert!(find_with(Arch::X86_64, Some(OsStr::new("")), Some(&path), |_| true).is_ok());
    }

    #[test]
    fn version_parsing() {
        assert_eq!(
            parse_version("QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2)\nCopyright")
                .unwrap(),
            "10.0.2"
        );
        assert_eq!(
            parse_version("QEMU emulator version 7.2.0\n").unwrap(),
            "7.2.0"
        );
        assert_eq!(parse_version("garbage"), None);
        assert_eq!(parse_version(""), None);
        assert_eq!(parse_version("version x"), None);
    }

    #[tokio::test]
    async fn version_of_a_non_qemu_binary_is_an_error() {
        let e = version(Path::new("/nonexistent/qemu"), Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(e.contains("cannot run"), "{e}");
        if Path::new("/bin/true").exists() {
            let e = version(Path::new("/bin/true"), Duration::from_secs(5))
                .await
                .unwrap_err();
            assert!(e.contains("no version"), "{e}");
        }
    }
}
