//! `vmcp image ...` from the command line, without building anything.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::{Command, Stdio};

fn vmcp() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vmcp"))
}

#[test]
fn path_of_an_unbuilt_image_says_what_to_run() {
    let cache = tempfile::tempdir().unwrap();
    let agent = cache.path().join("agent");
    // A static x86-64 ELF header is all the agent check needs.
    let mut elf = vec![0u8; 64];
    elf[..4].copy_from_slice(b"\x7fELF");
    elf[4] = 2;
    elf[5] = 1;
    elf[18..20].copy_from_slice(&62u16.to_le_bytes());
    std::fs::write(&agent, elf).unwrap();
    let out = vmcp()
        .args(["image", "path", "--arch", "x86_64", "--cache-dir"])
        .arg(cache.path())
        .arg("--agent")
        .arg(&agent)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("vmcp image build"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn bad_arch_and_bad_agent_are_one_line_errors() {
    let out = vmcp()
        .args(["image", "build", "--arch", "riscv64"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&out.stderr).contains("riscv64"));

    let cache = tempfile::tempdir().unwrap();
    let out = vmcp()
        .args(["image", "build", "--arch", "x86_64", "--cache-dir"])
        .arg(cache.path())
        .arg("--agent")
        .arg(cache.path().join("missing-agent"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("missing-agent") && err.lines().count() == 1,
        "{err}"
    );
    // Nothing was created but the cache directory itself.
    assert_eq!(std::fs::read_dir(cache.path()).unwrap().count(), 0);
}

#[test]
fn prune_of_an_empty_cache_removes_nothing() {
    let cache = tempfile::tempdir().unwrap();
    let out = vmcp()
        .args(["image", "prune", "--cache-dir"])
        .arg(cache.path())
        .stdout(Stdio::piped())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout.is_empty());
}
