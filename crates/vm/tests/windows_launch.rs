//! The QEMU backend's Windows launch layer end to end, with `examples/fake_qemu.rs` standing in
//! for QEMU: spawn into the kill-on-close job, loopback-TCP channels (QMP, console, agent),
//! the token handshake, graceful shutdown, and kill + runtime-folder removal on drop.
//!
//! Runs on Windows (and under wine: `scripts/test.d/40-windows.sh` sets `VMCP_TEST_FAKE_QEMU`
//! to the fake's `.exe`). Elsewhere it prints `SKIPPED` and returns: other hosts use their own
//! launch layers, tested in `tests/qemu_vm.rs`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use vmcp_vm::qemu::{QemuBackend, QemuOptions};
use vmcp_vm::{Accel, ShutdownOutcome, Vm, VmConfig, VmState};

fn fake_qemu() -> Option<PathBuf> {
    if std::env::consts::OS != "windows" {
        vmcp_test_support::skipped!(
            "SKIPPED: the Windows launch layer is only compiled on Windows"
        );
        return None;
    }
    match std::env::var_os("VMCP_TEST_FAKE_QEMU") {
        Some(p) => Some(PathBuf::from(p)),
        None => {
            vmcp_test_support::skipped!(
                "SKIPPED: set VMCP_TEST_FAKE_QEMU to the built examples/fake_qemu.exe"
            );
            None
        }
    }
}

async fn still_beating(path: &Path) -> bool {
    let before = std::fs::read_to_string(path).unwrap_or_default();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let after = std::fs::read_to_string(path).unwrap_or_default();
    before != after
}

#[tokio::test]
async fn windows_launch_with_a_fake_qemu() {
    let Some(fake) = fake_qemu() else { return };
    let dir = tempfile::Builder::new()
        .prefix("vmcp win, test")
        .tempdir()
        .unwrap();
    let kernel = dir.path().join("vmlinuz");
    let initrd = dir.path().join("initrd.cpio");
    std::fs::write(&kernel, b"k").unwrap();
    std::fs::write(&initrd, b"i").unwrap();
    let heartbeat = dir.path().join("heartbeat");
    std::env::set_var("VMCP_FAKE_QEMU_HEARTBEAT", &heartbeat);

    let mut options = QemuOptions::default();
    options.qemu_binary = Some(fake);
    let backend = QemuBackend::with_options(options);
    let mut config = VmConfig::new(&kernel, &initrd);
    config.accel = Some(Accel::Tcg);

    // 1. Start, handshake, ping, graceful shutdown.
    let mut vm = backend.create_qemu(config.clone()).await.unwrap();
    let runtime = vm.runtime_dir().to_path_buf();
    vm.start().await.unwrap();
    let argv: Vec<String> = vm
        .command_line()
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    assert!(
        argv.iter()
            .any(|a| a.starts_with("socket,id=agent,host=127.0.0.1,port=")),
        "{argv:?}"
    );
    let info = vm.wait_ready(Duration::from_secs(20)).await.unwrap();
    assert_eq!(info.agent_version, "fake-qemu");
    assert_eq!(vm.state(), VmState::Running);
    vm.agent().unwrap().ping().await.unwrap();
    assert!(still_beating(&heartbeat).await);
    assert_eq!(
        vm.shutdown(Duration::from_secs(10)).await.unwrap(),
        ShutdownOutcome::Graceful
    );
    drop(vm);
    assert!(
        !runtime.exists(),
        "runtime folder {} left behind",
        runtime.display()
    );
    assert!(!still_beating(&heartbeat).await);

    // 2. A running VM that is dropped: its QEMU dies and the folder goes.
    let mut vm = backend.create_qemu(config).await.unwrap();
    let runtime = vm.runtime_dir().to_path_buf();
    vm.start().await.unwrap();
    vm.wait_ready(Duration::from_secs(20)).await.unwrap();
    assert!(still_beating(&heartbeat).await);
    drop(vm);
    assert!(
        !runtime.exists(),
        "runtime folder {} left behind",
        runtime.display()
    );
    assert!(
        !still_beating(&heartbeat).await,
        "QEMU outlived its dropped VM"
    );
}

/// Child half of [`qemu_dies_when_vmcp_is_killed`]: starts a VM and waits to be killed.
#[tokio::test]
#[ignore = "helper: qemu_dies_when_vmcp_is_killed runs it in a child process"]
async fn child_holding_a_vm() {
    if std::env::var_os("VMCP_TEST_LAUNCH_CHILD").is_none() {
        vmcp_test_support::skipped!(
            "SKIPPED: helper of qemu_dies_when_vmcp_is_killed; runs only as its child"
        );
        return;
    }
    let Some(fake) = fake_qemu() else { return };
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("vmlinuz");
    let initrd = dir.path().join("initrd.cpio");
    std::fs::write(&kernel, b"k").unwrap();
    std::fs::write(&initrd, b"i").unwrap();
    let mut options = QemuOptions::default();
    options.qemu_binary = Some(fake);
    let mut config = VmConfig::new(&kernel, &initrd);
    config.accel = Some(Accel::Tcg);
    let mut vm = QemuBackend::with_options(options)
        .create_qemu(config)
        .await
        .unwrap();
    vm.start().await.unwrap();
    vm.wait_ready(Duration::from_secs(20)).await.unwrap();
    println!("vm-ready");
    tokio::time::sleep(Duration::from_secs(60)).await;
}

#[tokio::test]
async fn qemu_dies_when_vmcp_is_killed() {
    let Some(fake) = fake_qemu() else { return };
    let dir = tempfile::tempdir().unwrap();
    let heartbeat = dir.path().join("heartbeat");
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_holding_a_vm", "--nocapture", "--ignored"])
        .env("VMCP_TEST_LAUNCH_CHILD", "1")
        .env("VMCP_TEST_FAKE_QEMU", &fake)
        .env("VMCP_FAKE_QEMU_HEARTBEAT", &heartbeat)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let until = std::time::Instant::now() + Duration::from_secs(30);
    while !still_beating(&heartbeat).await {
        assert!(
            std::time::Instant::now() < until,
            "the child never started its VM"
        );
    }
    // TerminateProcess: no destructor runs in the child; only the kernel closing the job
    // handle can stop its QEMU.
    child.kill().unwrap();
    child.wait().unwrap();
    let until = std::time::Instant::now() + Duration::from_secs(10);
    while still_beating(&heartbeat).await {
        assert!(
            std::time::Instant::now() < until,
            "QEMU outlived the killed vmcp process"
        );
    }
}
