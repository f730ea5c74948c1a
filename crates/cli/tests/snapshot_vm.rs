//! `vmcp snapshot` and the snapshot path of `vmcp run`, as a user runs them (real VMs, TCG
//! here): create, restore by name and automatically, and refusal of mismatched, corrupt and
//! truncated snapshots (exit 125 by name; a notice and a cold boot for the automatic one),
//! with nothing left behind. Each test uses its own snapshot store (`VMCP_SNAPSHOT_DIR`) and
//! runtime directory.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use vmcp_test_support::vm;

const VMCP: &str = env!("CARGO_BIN_EXE_vmcp");

struct Env {
    store: tempfile::TempDir,
    runtime: tempfile::TempDir,
}

impl Env {
    fn new() -> Env {
        Env {
            store: tempfile::tempdir().unwrap(),
            runtime: tempfile::tempdir().unwrap(),
        }
    }

    fn vmcp(&self, args: &[&str]) -> Output {
        Command::new(VMCP)
            .env("VMCP_SNAPSHOT_DIR", self.store.path())
            .env("XDG_RUNTIME_DIR", self.runtime.path())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    fn snapshot(&self, name: &str) -> PathBuf {
        self.store.path().join(name)
    }

    fn assert_clean(&self) {
        let left: Vec<PathBuf> = std::fs::read_dir(self.runtime.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert!(left.is_empty(), "left behind: {left:?}");
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn corrupt(state: &Path, truncate: bool) {
    let mut bytes = std::fs::read(state).unwrap();
    if truncate {
        bytes.truncate(bytes.len() / 2);
    } else {
        for b in bytes.iter_mut().skip(100).step_by(53) {
            *b = b.wrapping_add(77);
        }
    }
    std::fs::write(state, bytes).unwrap();
}

#[test]
fn named_snapshots_restore_and_bad_ones_fail_with_125() {
    if !vm::ready(VMCP) {
        return;
    }
    let env = Env::new();
    let out = env.vmcp(&["snapshot", "create", "--name", "t1"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = env.vmcp(&["snapshot", "list"]);
    assert!(text(&out.stdout).contains("t1"), "{}", text(&out.stdout));

    let out = env.vmcp(&["run", "--snapshot", "t1", "--", "hostname"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).starts_with("vmcp-"),
        "{}",
        text(&out.stdout)
    );

    // Another memory size: refused, saying what differs.
    let out = env.vmcp(&["run", "--snapshot", "t1", "--memory", "512", "--", "true"]);
    assert_eq!(out.status.code(), Some(125));
    let err = text(&out.stderr);
    assert!(
        err.contains("memory: snapshot 256 MiB, this VM 512 MiB"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");

    for truncate in [false, true] {
        let out = env.vmcp(&["snapshot", "create", "--name", "t2"]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        corrupt(&env.snapshot("t2").join("vm").join("state"), truncate);
        let out = env.vmcp(&["run", "--snapshot", "t2", "--", "true"]);
        assert_eq!(out.status.code(), Some(125), "{}", text(&out.stderr));
        let err = text(&out.stderr);
        assert!(err.contains("cannot restore snapshot t2"), "{err}");
        env.assert_clean();
    }
    // A foreign record.
    std::fs::write(env.snapshot("t2").join("record.json"), b"[1,2,3]").unwrap();
    let out = env.vmcp(&["run", "--snapshot", "t2", "--", "true"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(
        text(&out.stderr).contains("unusable"),
        "{}",
        text(&out.stderr)
    );

    let out = env.vmcp(&["snapshot", "rm", "t1"]);
    assert!(out.status.success());
    let out = env.vmcp(&["snapshot", "prune"]);
    assert!(
        text(&out.stdout).contains("removed t2"),
        "{}",
        text(&out.stdout)
    );
    let out = env.vmcp(&["run", "--snapshot", "t1", "--", "true"]);
    assert_eq!(out.status.code(), Some(125));
    env.assert_clean();
}

#[test]
fn run_builds_then_restores_the_automatic_snapshot_and_falls_back_when_it_breaks() {
    if !vm::ready(VMCP) {
        return;
    }
    let env = Env::new();
    let first = env.vmcp(&["run", "--", "cat", "/proc/sys/kernel/random/uuid"]);
    assert!(first.status.success(), "{}", text(&first.stderr));
    assert!(
        text(&first.stderr).contains("building snapshot auto-"),
        "{}",
        text(&first.stderr)
    );
    let auto: Vec<PathBuf> = std::fs::read_dir(env.store.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(auto.len(), 1, "{auto:?}");
    let second = env.vmcp(&["run", "--", "cat", "/proc/sys/kernel/random/uuid"]);
    assert!(second.status.success(), "{}", text(&second.stderr));
    assert!(
        !text(&second.stderr).contains("building"),
        "{}",
        text(&second.stderr)
    );
    let third = env.vmcp(&["run", "--", "cat", "/proc/sys/kernel/random/uuid"]);
    assert_ne!(
        text(&second.stdout),
        text(&third.stdout),
        "restores share RNG state"
    );

    corrupt(&auto[0].join("vm").join("state"), false);
    let out = env.vmcp(&["run", "--", "echo", "still works"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "still works\n");
    let err = text(&out.stderr);
    assert!(
        err.contains("notice:") && err.contains("booting cold"),
        "{err}"
    );
    assert!(!auto[0].exists(), "the broken snapshot is removed");

    let out = env.vmcp(&["run", "--cold", "--", "true"]);
    assert!(out.status.success());
    env.assert_clean();
}
