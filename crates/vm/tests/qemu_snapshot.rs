//! Snapshots of real QEMU VMs (TCG here): save one booted VM, restore it twice, and check
//! that each restore is a new VM with the old one's files; broken snapshot files are refused
//! with an error and leave no QEMU behind.
//!
//! Prerequisites as in `qemu_vm.rs` (`SKIPPED:` without QEMU or an image).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{prerequisites, sh, vm_lock, Image, READY_TIMEOUT};
use vmcp_vm::lifecycle::SnapshotManifest;
use vmcp_vm::qemu::snapshot::{MEMORY_FILE, STATE_FILE};
use vmcp_vm::qemu::{QemuBackend, QemuVm};
use vmcp_vm::{Vm, VmError, VmState};

/// Boots a VM with its memory in a file, leaves a file behind, saves it into `snap`, and
/// checks that the VM runs on after the save (a checkpoint); a file written after the save
/// must not be in the snapshot.
async fn make_snapshot(img: &Image, snap: &Path) {
    let mut vm = QemuBackend::new().create_qemu(img.config()).await.unwrap();
    vm.set_memory_file(vm.runtime_dir().join("memory"));
    vm.start().await.unwrap();
    vm.wait_ready(READY_TIMEOUT).await.unwrap();
    assert!(vm.capabilities().snapshot);
    let agent = vm.agent().unwrap();
    agent
        .write_file("/root/before.txt", b"written before the snapshot", 0o644)
        .await
        .unwrap();
    vm.save_snapshot(snap).await.unwrap();
    assert_eq!(vm.state(), VmState::Running);
    agent
        .write_file("/root/after.txt", b"written after the snapshot", 0o644)
        .await
        .unwrap();
    assert_eq!(
        sh(&agent, "cat /root/before.txt").await,
        "written before the snapshot"
    );
    drop(agent);
    vm.kill().await.unwrap();
    assert!(snap.join(STATE_FILE).metadata().unwrap().len() > 1000);
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
    let tmp = tempfile::tempdir().unwrap();
    let snap = tmp.path().join("snap");
    make_snapshot(&img, &snap).await;

    let a = restore(&img, &snap).await;
    let b = restore(&img, &snap).await;
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
        assert_eq!(
            sh(agent, "test -e /root/after.txt || echo absent").await,
            "absent\n"
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
    let tmp = tempfile::tempdir().unwrap();
    let good = tmp.path().join("good");
    make_snapshot(&img, &good).await;
    let state = std::fs::read(good.join(STATE_FILE)).unwrap();
    let manifest = SnapshotManifest::path(&good);

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
        let dir = tmp.path().join(what);
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join(STATE_FILE), &bytes).unwrap();
        std::fs::hard_link(good.join(MEMORY_FILE), dir.join(MEMORY_FILE)).unwrap();
        std::fs::copy(&manifest, SnapshotManifest::path(&dir)).unwrap();
        let mut vm = QemuBackend::new().create_qemu(img.config()).await.unwrap();
        let started = std::time::Instant::now();
        let res = vm.restore_snapshot(&dir).await;
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
    let e = vm.restore_snapshot(&good).await.unwrap_err();
    let text = vmcp_test_support::error_chain(&e);
    assert!(text.contains("512 MiB"), "{text}");
    // Without its manifest a snapshot is refused too.
    std::fs::remove_file(&manifest).unwrap();
    let mut vm = QemuBackend::new().create_qemu(img.config()).await.unwrap();
    let e = vm.restore_snapshot(&good).await.unwrap_err();
    assert!(matches!(e, VmError::Snapshot(_)), "{e:?}");
    assert!(vm.pid().is_none());
}
