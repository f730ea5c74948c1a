//! The `vmcp-agent` binary outside a VM: it refuses to act as init and says why.
#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

#[test]
fn refuses_to_run_outside_the_guest() {
    let out = Command::new(env!("CARGO_BIN_EXE_vmcp-agent"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("vmcp-agent"), "{err}");
    assert!(err.lines().count() == 1, "{err}");
}

#[test]
fn prints_its_version() {
    let out = Command::new(env!("CARGO_BIN_EXE_vmcp-agent"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(out.status.success());
    let s = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        s.trim(),
        format!("vmcp-agent {}", env!("CARGO_PKG_VERSION"))
    );
}
