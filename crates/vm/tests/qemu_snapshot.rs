//! Snapshots of real QEMU VMs (TCG here): save one booted VM, restore it twice, and check
//! that each restore is a new VM with the old one's files; broken snapshot files are refused
//! with an error and leave no QEMU behind.
//!
//! Prerequisites as in `qemu_vm.rs` (`SKIPPED:` without QEMU or an image).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{prerequisites, vm_lock, Image, READY_TIMEOUT};
use vmcp_guest_proto::ExitStatus;
use vmcp_vm::agent::{AgentClient, ExecSpec};
use vmcp_vm::qemu::snapshot::{MEMORY_FILE, STATE_FILE};
use vmcp_vm::qemu::{QemuBackend, QemuVm};
use vmcp_vm::{Vm, VmError, VmState};

async fn sh(agent: &AgentClient, script: &str) -> String {
    let out = agent
        .exec(ExecSpec::new(["sh", "-c", script]))
        .await
        .unwrap()
        .wait_with_output()
        .await
        .unwrap();
    assert_eq!(
        out.status,
        ExitStatus::Code(0),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Boots a VM with its memory in `<dir>/memory`, leaves a file behind, and saves it.
async fn make_snapshot(img: &Image, dir: &Path) {
    let mut vm = QemuBackend::new().create_qemu(img.config()).await.unwrap();
    vm.set_memory_file(dir.join(MEMORY_FILE)).unwrap();
    vm.start().await.unwrap();
    vm.wait_ready(READY_TIMEOUT).await.unwrap();
    let agent = vm.agent().unwrap();
    agent
        .write_file("/root/before.txt", b"written before the snapshot", 0o644)
        .await
        .unwrap();
    drop(agent);
    let pid = vm.pid().unwrap();
    vm.save_snapshot(dir).await.unwrap();
    assert_eq!(vm.state(), VmState::Stopped);
    assert!(!proc_alive(pid), "the saved VM's QEMU must be gone");
    assert!(dir.join(STATE_FILE).metadata().unwrap().len() > 1000);
}

fn proc_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

async fn restore(img: &Image, dir: &Path) -> QemuVm {
    let mut vm = QemuBackend::new().create_qemu(img.config()).await.unwrap();
    vm.restore_snapshot(dir).await.unwrap();
    vm.wait_ready(READY_TIMEOUT).await.unwrap();
    assert!(vm.is_restored());
    vm
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_restore_is_a_new_vm_with_the_snapshots_files() {
    let Some(img) = prerequisites() else { return };
    let _lock = vm_lock().await;
    let dir = tempfile::tempdir().unwrap();
    make_snapshot(&img, dir.path()).await;

    let a = restore(&img, dir.path()).await;
    let b = restore(&img, dir.path()).await;
    assert_ne!(a.id(), b.id());
    assert_ne!(a.runtime_dir(), b.runtime_dir());
    let (qa, qb) = (a.agent().unwrap(), b.agent().unwrap());
    let mut random = Vec::new();
    for (vm, agent) in [(&a, &qa), (&b, &qb)] {
        // Files written before the snapshot are there; exec works.
        assert_eq!(
            sh(agent, "cat /root/before.txt").await,
            "written before the snapshot"
        );
        // The wall clock is the host's, not the snapshot's.
        let guest: u64 = sh(agent, "date +%s").await.trim().parse().unwrap();
        let host = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert!(guest.abs_diff(host) <= 5, "guest {guest}, host {host}");
        // Its own hostname.
        assert_eq!(
            sh(agent, "hostname").await.trim(),
            format!("vmcp-{}", vm.id())
        );
        // The kernel RNG was reseeded with the host's entropy: /dev/urandom (the same CRNG
        // that getrandom() reads) and the kernel's own UUIDs.
        random.push(
            sh(
                agent,
                "head -c 32 /dev/urandom | od -An -tx1; cat /proc/sys/kernel/random/uuid",
            )
            .await,
        );
        // The QEMU of a restore shares the snapshot's memory file instead of copying it.
        let maps = std::fs::read_to_string(format!("/proc/{}/maps", vm.pid().unwrap()))
            .unwrap_or_default();
        assert!(maps.contains(MEMORY_FILE), "memory file not mapped");
    }
    assert_ne!(
        random[0], random[1],
        "two restores gave the same random bytes"
    );
    drop((qa, qb));
    let pids = [a.pid().unwrap(), b.pid().unwrap()];
    drop(a);
    drop(b);
    for pid in pids {
        assert!(!proc_alive(pid));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_snapshots_are_refused_and_leave_no_qemu() {
    let Some(img) = prerequisites() else { return };
    let _lock = vm_lock().await;
    let good = tempfile::tempdir().unwrap();
    make_snapshot(&img, good.path()).await;
    let state = std::fs::read(good.path().join(STATE_FILE)).unwrap();

    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("truncated", state[..state.len() / 3].to_vec()),
        ("corrupt", {
            let mut s = state.clone();
            for b in s.iter_mut().skip(64).step_by(97) {
                *b ^= 0x5a;
            }
            s
        }),
        ("foreign", b"#!/bin/sh\necho not a snapshot\n".to_vec()),
        ("empty", Vec::new()),
    ];
    for (what, bytes) in cases {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(STATE_FILE), &bytes).unwrap();
        std::fs::hard_link(good.path().join(MEMORY_FILE), dir.path().join(MEMORY_FILE)).unwrap();
        let mut vm = QemuBackend::new().create_qemu(img.config()).await.unwrap();
        let started = std::time::Instant::now();
        let res = vm.restore_snapshot(dir.path()).await;
        let res = match res {
            Ok(()) => vm.wait_ready(READY_TIMEOUT).await.map(drop),
            Err(e) => Err(e),
        };
        let e = res.expect_err(what);
        eprintln!("{what}: {}", vmcp_test_support::error_chain(&e));
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{what}: took {:?}",
            started.elapsed()
        );
        assert!(
            matches!(
                e,
                VmError::SnapshotRestore(_)
                    | VmError::EarlyExit { .. }
                    | VmError::ReadyTimeout { .. }
            ),
            "{what}: {e:?}"
        );
        assert!(vm.pid().is_none_or(|p| !proc_alive(p)), "{what}: QEMU left");
    }

    // A VM of another memory size is refused before QEMU starts.
    let mut config = img.config();
    config.memory_mib = 512;
    let mut vm = QemuBackend::new().create_qemu(config).await.unwrap();
    let e = vm.restore_snapshot(good.path()).await.unwrap_err();
    let text = vmcp_test_support::error_chain(&e);
    assert!(text.contains("512 MiB"), "{text}");
    assert!(vm.pid().is_none());
}
