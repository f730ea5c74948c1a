//! Prerequisites of the tests that boot real VMs through the `vmcp` binary.
//!
//! Every such test starts with `if !vm::ready(VMCP) { return; }`: without QEMU or a guest image
//! it prints `SKIPPED: <reason>` (loudly, past the harness's capture) and returns; with
//! `VMCP_REQUIRE_VM=1` (CI) a missing prerequisite fails the test instead of skipping it.

use std::process::Command;
use std::sync::{Mutex, MutexGuard, PoisonError};

/// Whether CI demands that VM tests run (`VMCP_REQUIRE_VM=1`).
pub fn required() -> bool {
    std::env::var_os("VMCP_REQUIRE_VM").is_some_and(|v| v == "1")
}

/// Reports a missing prerequisite and returns `false` (so `return skip(..)` reads naturally);
/// panics instead under `VMCP_REQUIRE_VM=1`.
#[allow(clippy::panic)]
pub fn skip(reason: &str) -> bool {
    if required() {
        panic!("VMCP_REQUIRE_VM=1 but the VM prerequisites are missing: {reason}");
    }
    crate::skipped!("SKIPPED: {reason}");
    false
}

/// One VM at a time within a test binary (the host has few cores and TCG is slow); a test that
/// panicked while holding it does not poison the others.
pub fn lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(PoisonError::into_inner)
}

/// `--kernel K --initrd I` when the environment names boot inputs explicitly
/// (`VMCP_TEST_KERNEL`, `VMCP_TEST_INITRD`), else nothing (the built image is used).
pub fn image_args() -> Vec<String> {
    match (
        std::env::var("VMCP_TEST_KERNEL"),
        std::env::var("VMCP_TEST_INITRD"),
    ) {
        (Ok(k), Ok(i)) => vec!["--kernel".into(), k, "--initrd".into(), i],
        _ => Vec::new(),
    }
}

/// Whether `vmcp` (the binary at `vmcp`) can boot VMs here, asked through `vmcp doctor`;
/// prints why not (or fails under `VMCP_REQUIRE_VM=1`).
pub fn ready(vmcp: &str) -> bool {
    let doctor = match Command::new(vmcp).arg("doctor").output() {
        Ok(out) => out,
        Err(e) => return skip(&format!("cannot run `{vmcp} doctor`: {e}")),
    };
    let text = String::from_utf8_lossy(&doctor.stdout);
    if !doctor.status.success() {
        return skip(&format!("`vmcp doctor` says no VMs can run here:\n{text}"));
    }
    if image_args().is_empty() && !text.contains("[ok] image") {
        return skip(
            "no guest image: run `vmcp image build` (or set VMCP_TEST_KERNEL/VMCP_TEST_INITRD)",
        );
    }
    true
}

/// [`ready`], then a host tool the test needs on `PATH` (e.g. `mkfs.ext4`, `mmdebstrap`).
pub fn ready_with_tools(vmcp: &str, tools: &[&str]) -> bool {
    if !ready(vmcp) {
        return false;
    }
    for tool in tools {
        if !on_path(tool) {
            return skip(&format!(
                "{tool} not installed (scripts/install-deps installs it)"
            ));
        }
    }
    true
}

fn on_path(tool: &str) -> bool {
    let dirs = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&dirs)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .any(|d| d.join(tool).is_file())
}

#[cfg(test)]
mod tests {
    #[test]
    fn image_args_come_in_pairs() {
        let args = super::image_args();
        assert!(args.is_empty() || args.len() == 4, "{args:?}");
    }

    #[test]
    fn a_missing_binary_is_a_skip_not_a_panic() {
        if super::required() {
            return;
        }
        assert!(!super::ready("/nonexistent/vmcp"));
    }

    #[test]
    fn lock_survives_a_poisoning_panic() {
        let r = std::thread::spawn(|| {
            let _g = super::lock();
            std::panic::panic_any("poison");
        })
        .join();
        assert!(r.is_err());
        drop(super::lock());
    }

    #[test]
    fn sh_is_on_path() {
        assert!(super::on_path("sh"));
        assert!(!super::on_path("no-such-tool-vmcp"));
    }
}
