//! `vmcp image rootfs --packages python3` and `python3 -c 'print(1+1)'` in it: one test,
//! because the build takes minutes (mmdebstrap downloads and unpacks ~30 packages; about 4
//! minutes on the loaded CI host). The image stays in the cache under the name
//! `vmcp-test-python3`, so later runs are cache hits. Skipped loudly without QEMU, a guest
//! image, mmdebstrap or e2fsprogs; `VMCP_REQUIRE_VM=1` turns the skips into failures.
#![cfg(unix)]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

use vmcp_test_support::vm;

const VMCP: &str = env!("CARGO_BIN_EXE_vmcp");

fn ready() -> bool {
    vm::ready_with_tools(VMCP, &["mmdebstrap", "mkfs.ext4"])
}

#[test]
fn python3_runs_in_an_image_built_from_debian_packages() {
    if !ready() {
        return;
    }
    let build = Command::new(VMCP)
        .args([
            "image",
            "rootfs",
            "--packages",
            "python3",
            "--name",
            "vmcp-test-python3",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&build.stderr);
    assert!(build.status.success(), "{err}");
    let line = String::from_utf8_lossy(&build.stdout).into_owned();
    let mut fields = line.split('\t');
    let names = fields.next().unwrap_or_default();
    assert!(names.split(',').any(|n| n == "vmcp-test-python3"), "{line}");
    assert!(
        fields.next().unwrap_or_default().starts_with("deb-"),
        "{line}"
    );
    // The same inputs again: a cache hit.
    let again = Command::new(VMCP)
        .args(["image", "rootfs", "--packages", "python3"])
        .output()
        .unwrap();
    let again_err = String::from_utf8_lossy(&again.stderr);
    assert!(again_err.contains("already built"), "{again_err}");
    assert_eq!(
        String::from_utf8_lossy(&again.stdout).split('\t').nth(1),
        line.split('\t').nth(1)
    );
    let run = Command::new(VMCP)
        .args([
            "run",
            "--timeout",
            "120",
            "--image",
            "vmcp-test-python3",
            "--",
            "python3",
            "-c",
            "print(1+1)",
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&run.stdout),
        "2\n",
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert_eq!(run.status.code(), Some(0));
}
