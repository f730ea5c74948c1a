//! Gathers [`WindowsFacts`] on a Windows host: the OS layer for the Windows version and the
//! Hypervisor Platform, then QEMU itself (`--version`, `-accel help`, and a start with
//! `-accel whpx,kernel-irqchip=off` and no machine).
//!
//! Running QEMU needs no `unsafe` and works the same everywhere, so the QEMU probes are tested
//! on Linux against the real `qemu-system-x86_64` (TCG works, WHPX is rejected) and against
//! fake executables. Every probe has a timeout and its child is killed when the probe ends
//! (`kill_on_drop`), so a hung QEMU cannot hang `vmcp doctor`.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncWriteExt;

use crate::config::{Accel, Arch};
use crate::qemu::host_windows::facts::{QemuFacts, WindowsFacts};
use crate::qemu::host_windows::qemu_args::{
    accel_probe_args, find_qemu, qemu_candidates, ACCEL_PROBE_STDIN,
};
use crate::qemu::host_windows::sys;

/// How long one QEMU probe may take.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// The environment variables the QEMU search reads.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostEnv {
    /// `PATH`.
    pub path: Option<OsString>,
    /// `ProgramFiles`.
    pub program_files: Option<OsString>,
}

impl HostEnv {
    /// This process's environment.
    pub fn current() -> HostEnv {
        HostEnv {
            path: std::env::var_os("PATH"),
            program_files: std::env::var_os("ProgramFiles"),
        }
    }
}

/// A QEMU probe that did not work.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProbeError {
    /// QEMU could not be started.
    #[error("cannot run {program}: {source}")]
    Spawn {
        /// The executable.
        program: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// QEMU did not finish in time (it was killed).
    #[error("{program} did not finish within {timeout:?}")]
    Timeout {
        /// The executable.
        program: PathBuf,
        /// The limit.
        timeout: Duration,
    },
    /// QEMU exited with a failure.
    #[error("{message} ({status})")]
    Failed {
        /// Exit status.
        status: String,
        /// Last line QEMU wrote to stderr.
        message: String,
    },
    /// QEMU's output was not what was expected.
    #[error("unexpected output {0:?}")]
    Unparsable(String),
}

async fn run_qemu(
    program: &Path,
    args: &[String],
    stdin: Option<&[u8]>,
    timeout: Duration,
) -> Result<std::process::Output, ProbeError> {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|source| ProbeError::Spawn {
        program: program.to_path_buf(),
        source,
    })?;
    if let (Some(data), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // QEMU may exit before reading (bad option): a broken pipe here is not the error to
        // report, the exit status is.
        let _ = pipe.write_all(data).await;
        drop(pipe);
    }
    let out = tokio::time::timeout(timeout, child.wait_with_output())
        .await
        .map_err(|_| ProbeError::Timeout {
            program: program.to_path_buf(),
            timeout,
        })?
        .map_err(|source| ProbeError::Spawn {
            program: program.to_path_buf(),
            source,
        })?;
    if out.status.success() {
        Ok(out)
    } else {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let message = stderr
            .lines()
            .rev()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .unwrap_or("no error message")
            .to_string();
        Err(ProbeError::Failed {
            status: out.status.to_string(),
            message,
        })
    }
}

/// The version number in `qemu-system-* --version` output (`10.0.2`).
pub fn parse_qemu_version(output: &str) -> Option<String> {
    output
        .lines()
        .find_map(|l| l.trim().strip_prefix("QEMU emulator version "))
        .and_then(|rest| rest.split_whitespace().next())
        .map(str::to_string)
}

/// The accelerator names in `qemu-system-* -accel help` output.
pub fn parse_accel_help(output: &str) -> Vec<String> {
    output
        .lines()
        .skip_while(|l| !l.contains("Accelerators supported"))
        .skip(1)
        .map(str::trim)
        .filter(|l| {
            !l.is_empty()
                && l.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        })
        .map(str::to_string)
        .collect()
}

/// `qemu --version`.
pub async fn qemu_version(qemu: &Path, timeout: Duration) -> Result<String, ProbeError> {
    let out = run_qemu(qemu, &["--version".to_string()], None, timeout).await?;
    let text = String::from_utf8_lossy(&out.stdout);
    parse_qemu_version(&text).ok_or_else(|| ProbeError::Unparsable(text.into_owned()))
}

/// `qemu -accel help`.
pub async fn qemu_accels(qemu: &Path, timeout: Duration) -> Result<Vec<String>, ProbeError> {
    let args = ["-accel".to_string(), "help".to_string()];
    let out = run_qemu(qemu, &args, None, timeout).await?;
    let text = String::from_utf8_lossy(&out.stdout);
    let list = parse_accel_help(&text);
    if list.is_empty() {
        return Err(ProbeError::Unparsable(text.into_owned()));
    }
    Ok(list)
}

/// The accelerators `qemu -accel help` lists, or why they could not be read (QEMU did not
/// run, or did not answer within `timeout`: it is killed then). Blocking, for synchronous
/// callers (the backend's host facts); everything else uses the async probes.
pub fn qemu_accels_blocking(qemu: &Path, timeout: Duration) -> Result<Vec<String>, String> {
    let mut child = std::process::Command::new(qemu)
        .args(["-accel", "help"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", qemu.display()))?;
    let deadline = std::time::Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "{} did not finish within {timeout:?}",
                    qemu.display()
                ));
            }
        }
    }
    let mut out = String::new();
    if let Some(stdout) = child.stdout.as_mut() {
        std::io::Read::read_to_string(stdout, &mut out).map_err(|e| e.to_string())?;
    }
    let list = parse_accel_help(&out);
    if list.is_empty() {
        return Err(ProbeError::Unparsable(out).to_string());
    }
    Ok(list)
}

/// Starts QEMU with `accel` and no machine, then quits it over QMP: `Ok` when the accelerator
/// initialised.
pub async fn try_accel(qemu: &Path, accel: Accel, timeout: Duration) -> Result<(), ProbeError> {
    run_qemu(
        qemu,
        &accel_probe_args(accel),
        Some(ACCEL_PROBE_STDIN),
        timeout,
    )
    .await
    .map(|_| ())
}

/// Everything `vmcp doctor` and the accelerator choice need, for QEMU of `arch`.
pub async fn gather(env: &HostEnv, arch: Arch) -> WindowsFacts {
    let whp = sys::whp_status();
    let qemu = match find_qemu(
        arch,
        env.path.as_deref(),
        env.program_files.as_deref(),
        Path::is_file,
    ) {
        None => QemuFacts::NotFound {
            searched: qemu_candidates(arch, env.path.as_deref(), env.program_files.as_deref()),
        },
        Some(path) => {
            let version = qemu_version(&path, PROBE_TIMEOUT)
                .await
                .map_err(|e| e.to_string());
            let accels = qemu_accels(&path, PROBE_TIMEOUT)
                .await
                .map_err(|e| e.to_string());
            let has_whpx = matches!(&accels, Ok(l) if l.iter().any(|a| a == "whpx"));
            let whpx_trial = if whp.usable() && has_whpx {
                Some(
                    try_accel(&path, Accel::Whpx, PROBE_TIMEOUT)
                        .await
                        .map_err(|e| e.to_string()),
                )
            } else {
                None
            };
            QemuFacts::Found {
                path,
                version,
                accels,
                whpx_trial,
            }
        }
    };
    WindowsFacts {
        version: sys::windows_version(),
        whp,
        qemu,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_version_and_accels() {
        let v = "QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2)\nCopyright (c) 2003-2025\n";
        assert_eq!(parse_qemu_version(v).as_deref(), Some("10.0.2"));
        assert_eq!(
            parse_qemu_version("QEMU emulator version 9.2.0\r\n").as_deref(),
            Some("9.2.0")
        );
        assert_eq!(parse_qemu_version("qemu 1"), None);
        let a = "Accelerators supported in QEMU binary:\r\ntcg\r\nwhpx\r\n\r\n";
        assert_eq!(parse_accel_help(a), ["tcg", "whpx"]);
        assert!(parse_accel_help("tcg\nkvm\n").is_empty());
    }

    proptest::proptest! {
        #[test]
        fn parsers_never_panic_and_return_clean_tokens(out in ".{0,400}") {
            if let Some(v) = parse_qemu_version(&out) {
                proptest::prop_assert!(!v.is_empty() && !v.contains(char::is_whitespace));
            }
            for a in parse_accel_help(&out) {
                proptest::prop_assert!(!a.is_empty());
                proptest::prop_assert!(a.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'));
            }
        }
    }

    fn host_qemu() -> Option<PathBuf> {
        let found = std::env::var_os("PATH").and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("qemu-system-x86_64"))
                .find(|p| p.is_file())
        });
        if found.is_none() {
            vmcp_test_support::skipped!("SKIPPED: qemu-system-x86_64 is not on PATH");
        }
        found
    }

    #[tokio::test]
    async fn probes_real_qemu() {
        let Some(q) = host_qemu() else { return };
        let v = qemu_version(&q, PROBE_TIMEOUT).await.unwrap();
        assert!(v.chars().next().unwrap().is_ascii_digit(), "{v}");
        let accels = qemu_accels(&q, PROBE_TIMEOUT).await.unwrap();
        assert!(accels.iter().any(|a| a == "tcg"), "{accels:?}");
        try_accel(&q, Accel::Tcg, PROBE_TIMEOUT).await.unwrap();
        // A Linux QEMU has no WHPX: the probe must fail with QEMU's own reason.
        let e = try_accel(&q, Accel::Whpx, PROBE_TIMEOUT).await.unwrap_err();
        assert!(matches!(e, ProbeError::Failed { .. }), "{e:?}");
        assert!(e.to_string().contains("whpx"), "{e}");
    }

    #[test]
    fn blocking_accel_list() {
        let e = qemu_accels_blocking(Path::new("/nonexistent/qemu"), PROBE_TIMEOUT).unwrap_err();
        assert!(e.contains("cannot run /nonexistent/qemu"), "{e}");
        let Some(q) = host_qemu() else { return };
        let list = qemu_accels_blocking(&q, PROBE_TIMEOUT).unwrap();
        assert!(list.iter().any(|a| a == "tcg"), "{list:?}");
        assert!(!list.iter().any(|a| a == "whpx"), "{list:?}");
    }

    #[tokio::test]
    async fn missing_program_is_a_spawn_error() {
        let e = qemu_version(
            Path::new("/nonexistent/qemu-system-x86_64.exe"),
            PROBE_TIMEOUT,
        )
        .await
        .unwrap_err();
        assert!(matches!(e, ProbeError::Spawn { .. }));
        assert!(e.to_string().contains("/nonexistent/qemu"), "{e}");
    }

    #[cfg(unix)]
    mod unix {
        use super::*;
        #[test]
        fn blocking_accel_list_times_out_and_kills() {
            let d = tempfile::tempdir().unwrap();
            let q = fake_qemu(d.path(), "exec sleep 30");
            let t = std::time::Instant::now();
            let e = qemu_accels_blocking(&q, Duration::from_millis(200)).unwrap_err();
            assert!(e.contains("did not finish"), "{e}");
            assert!(t.elapsed() < Duration::from_secs(5));
            let q = fake_qemu(d.path(), "echo garbage");
            let e = qemu_accels_blocking(&q, PROBE_TIMEOUT).unwrap_err();
            assert!(e.contains("unexpected output"), "{e}");
        }

        fn fake_qemu(dir: &Path, script: &str) -> PathBuf {
            use std::os::unix::fs::PermissionsExt;
            let p = dir.join("qemu-system-x86_64.exe");
            std::fs::write(&p, format!("#!/bin/sh\n{script}\n")).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
            p
        }

        #[tokio::test]
        async fn hung_qemu_is_killed_at_the_timeout() {
            let d = tempfile::tempdir().unwrap();
            let q = fake_qemu(d.path(), "exec sleep 30");
            let t = std::time::Instant::now();
            let e = qemu_version(&q, Duration::from_millis(300))
                .await
                .unwrap_err();
            assert!(matches!(e, ProbeError::Timeout { .. }), "{e:?}");
            assert!(t.elapsed() < Duration::from_secs(5));
            let e = qemu_accels(&fake_qemu(d.path(), "echo nonsense"), PROBE_TIMEOUT)
                .await
                .unwrap_err();
            assert!(matches!(e, ProbeError::Unparsable(_)), "{e:?}");
            let e = try_accel(
                &fake_qemu(d.path(), "cat >/dev/null; echo 'whpx: boom' >&2; exit 1"),
                Accel::Whpx,
                PROBE_TIMEOUT,
            )
            .await
            .unwrap_err();
            assert!(e.to_string().starts_with("whpx: boom ("), "{e}");
        }

        #[tokio::test]
        async fn gather_finds_qemu_on_a_windows_style_path() {
            let d = tempfile::tempdir().unwrap();
            fake_qemu(
                d.path(),
                r#"case "$1" in
    --version) echo 'QEMU emulator version 10.1.0 (v10.1.0-12)';;
    -accel) printf 'Accelerators supported in QEMU binary:\ntcg\nwhpx\n';;
    *) exit 1;;
    esac"#,
            );
            let env = HostEnv {
                path: Some(format!("/nonexistent;\"{}\"", d.path().display()).into()),
                program_files: None,
            };
            let facts = gather(&env, Arch::X86_64).await;
            match &facts.qemu {
                QemuFacts::Found {
                    path,
                    version,
                    accels,
                    whpx_trial,
                } => {
                    assert!(path.starts_with(d.path()));
                    assert_eq!(version.as_deref(), Ok("10.1.0"));
                    assert_eq!(accels.as_ref().unwrap(), &["tcg", "whpx"]);
                    // Not on Windows: WHP is absent, so the WHPX start is not tried.
                    assert_eq!(whpx_trial, &None);
                }
                other => panic!("{other:?}"),
            }
            assert!(!facts.whp.usable());
            let none = gather(
                &HostEnv {
                    path: Some("/nonexistent".into()),
                    program_files: Some("/nonexistent-pf".into()),
                },
                Arch::X86_64,
            )
            .await;
            match none.qemu {
                QemuFacts::NotFound { searched } => assert_eq!(searched.len(), 2),
                other => panic!("{other:?}"),
            }
            assert!(HostEnv::current().path.is_some());
        }
    }
}
