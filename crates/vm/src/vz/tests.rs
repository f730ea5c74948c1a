//! Lifecycle tests of the VZ backend against the fault-injecting fake framework.

use std::time::Duration;

use super::fake::{arm64_files, FakeFramework, Faults, LIMITS};
use super::plan::cmdline_value;
use super::vm::VzBackend;
use crate::config::{Arch, VmConfig};
use crate::error::VmError;
use crate::{Backend, Probe, ShutdownOutcome, Vm, VmState};

const READY: Duration = Duration::from_secs(5);

struct Setup {
    _dir: tempfile::TempDir,
    backend: VzBackend<FakeFramework>,
    config: VmConfig,
}

fn setup(faults: Faults) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let (k, i) = arm64_files(dir.path());
    let mut config = VmConfig::new(k, i);
    config.arch = Arch::Aarch64;
    config.memory_mib = 256;
    Setup {
        _dir: dir,
        backend: VzBackend::new(FakeFramework::new(faults), Arch::Aarch64),
        config,
    }
}

fn calls(s: &Setup) -> Vec<String> {
    s.backend.framework().calls.lock().unwrap().clone()
}

#[tokio::test]
async fn boot_ping_graceful_shutdown_and_cleanup() {
    let s = setup(Faults::default());
    let mut vm = s.backend.create_vz(s.config.clone()).unwrap();
    assert_eq!(vm.state(), VmState::Created);
    let caps = vm.capabilities();
    assert!(caps.pause && caps.vsock && caps.snapshot);
    let dir = vm.runtime_dir().to_path_buf();
    assert!(dir.is_dir());
    assert!(vm.agent().is_err(), "no agent before ready");

    vm.start().await.unwrap();
    assert_eq!(vm.state(), VmState::Starting);
    let info = vm.wait_ready(READY).await.unwrap();
    assert_eq!(vm.state(), VmState::Running);
    assert_eq!(info.agent_version, "fake-vz-agent");
    assert_eq!(info.guest_boot, Duration::from_millis(42));
    assert!(info.ready_after < READY);
    // The fake agent answered with the token it found on its kernel command line.
    assert!(cmdline_value(&vm.plan().cmdline, "vmcp.token").is_some_and(|t| t.len() == 32));
    assert_eq!(
        cmdline_value(&vm.plan().cmdline, "vmcp.channel"),
        Some("vsock:7000")
    );
    vm.agent().unwrap().ping().await.unwrap();

    let out = vm.shutdown(Duration::from_secs(5)).await.unwrap();
    assert_eq!(out, ShutdownOutcome::Graceful);
    assert_eq!(vm.state(), VmState::Stopped);
    assert_eq!(calls(&s), ["build", "start"], "agent poweroff sufficed");
    assert_eq!(
        vm.shutdown(Duration::from_secs(1)).await.unwrap(),
        ShutdownOutcome::AlreadyStopped
    );
    drop(vm);
    assert!(!dir.exists(), "runtime dir removed on drop");
}

#[tokio::test]
async fn through_the_backend_trait() {
    let s = setup(Faults::default());
    assert_eq!(s.backend.name(), "vz");
    match s.backend.probe().await {
        Probe::Usable { detail } => {
            assert!(
                detail.contains("1-4 vCPUs") && detail.contains("128-8192 MiB"),
                "{detail}"
            );
            assert!(detail.contains("snapshots"), "{detail}");
        }
        other => panic!("{other:?}"),
    }
    let mut vm: Box<dyn Vm> = s.backend.create(s.config.clone()).await.unwrap();
    vm.start().await.unwrap();
    vm.wait_ready(READY).await.unwrap();
    assert_eq!(vm.id().len(), 12);
    vm.kill().await.unwrap();
    assert_eq!(vm.state(), VmState::Stopped);
    assert!(calls(&s).contains(&"stop".to_string()));
}

#[tokio::test]
async fn probe_reports_unavailable_and_no_snapshots() {
    let s = setup(Faults {
        unavailable: true,
        ..Faults::default()
    });
    match s.backend.probe().await {
        Probe::Unusable { reason } => {
            assert!(reason.contains("no other backend"), "{reason}");
            assert!(
                !reason.contains("hvf"),
                "QEMU cannot launch on macOS: {reason}"
            );
        }
        other => panic!("{other:?}"),
    }
    let e = s.backend.create_vz(s.config.clone()).err().unwrap();
    assert!(
        matches!(e, VmError::Unavailable { backend: "vz", .. }),
        "{e:?}"
    );

    let s = setup(Faults {
        no_save_restore: true,
        ..Faults::default()
    });
    match s.backend.probe().await {
        Probe::Usable { detail } => assert!(
            detail.contains("no snapshots: saving VM state needs macOS 14"),
            "{detail}"
        ),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn start_failure_is_reported_and_leaves_vm_stopped() {
    let s = setup(Faults {
        start_fails: true,
        ..Faults::default()
    });
    let mut vm = s.backend.create_vz(s.config.clone()).unwrap();
    let e = vm.start().await.unwrap_err();
    assert_eq!(
        vmcp_test_support::error_chain(&e),
        "the vz backend failed: Virtualization.framework could not start the VM: Internal Virtualization error. (The virtual machine failed to start.)"
    );
    assert_eq!(e.class(), crate::ErrorClass::Hypervisor);
    assert_eq!(vm.state(), VmState::Stopped);
    assert!(matches!(
        vm.start().await,
        Err(VmError::InvalidState { op: "start", .. })
    ));
    assert_eq!(
        vm.shutdown(Duration::from_secs(1)).await.unwrap(),
        ShutdownOutcome::AlreadyStopped
    );
}

#[tokio::test]
async fn missing_entitlement_is_a_clear_unavailable_error() {
    let s = setup(Faults {
        no_entitlement: true,
        ..Faults::default()
    });
    let mut vm = s.backend.create_vz(s.config.clone()).unwrap();
    let e = vm.start().await.unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(e, VmError::Unavailable { backend: "vz", .. }),
        "{e:?}"
    );
    assert!(
        msg.contains("com.apple.security.virtualization") && msg.contains("codesign.sh"),
        "{msg}"
    );
}

#[tokio::test]
async fn stop_timeout_falls_back_to_kill() {
    let s = setup(Faults {
        guest_hangs_on_stop: true,
        ..Faults::default()
    });
    let mut vm = s.backend.create_vz(s.config.clone()).unwrap();
    vm.start().await.unwrap();
    vm.wait_ready(READY).await.unwrap();
    let t = std::time::Instant::now();
    let out = vm.shutdown(Duration::from_millis(200)).await.unwrap();
    assert_eq!(out, ShutdownOutcome::Killed);
    assert!(t.elapsed() >= Duration::from_millis(200));
    assert!(t.elapsed() < Duration::from_secs(3));
    assert_eq!(vm.state(), VmState::Stopped);
    assert_eq!(calls(&s).last().map(String::as_str), Some("stop"));
}

#[tokio::test]
async fn without_agent_request_stop_is_used() {
    // Started but never ready: the graceful path is the framework's requestStop.
    let s = setup(Faults {
        no_agent: true,
        ..Faults::default()
    });
    let mut vm = s.backend.create_vz(s.config.clone()).unwrap();
    vm.start().await.unwrap();
    let out = vm.shutdown(Duration::from_secs(2)).await.unwrap();
    assert_eq!(out, ShutdownOutcome::Graceful);
    assert_eq!(calls(&s), ["build", "start", "request_stop"]);
}

#[tokio::test]
async fn ready_timeout_quotes_the_console() {
    let s = setup(Faults {
        no_agent: true,
        ..Faults::default()
    });
    let mut vm = s.backend.create_vz(s.config.clone()).unwrap();
    vm.start().await.unwrap();
    let e = vm.wait_ready(Duration::from_millis(100)).await.unwrap_err();
    match &e {
        VmError::ReadyTimeout { console_tail, .. } => {
            assert!(
                console_tail.contains("fake kernel booting"),
                "{console_tail}"
            )
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn framework_error_state_is_an_early_exit() {
    let s = setup(Faults {
        crash_after_start: true,
        no_agent: true,
        ..Faults::default()
    });
    let mut vm = s.backend.create_vz(s.config.clone()).unwrap();
    vm.start().await.unwrap();
    let e = vm.wait_ready(READY).await.unwrap_err();
    assert!(
        matches!(&e, VmError::EarlyExit { status, .. } if status.contains("Error")),
        "{e:?}"
    );
    assert_eq!(vm.state(), VmState::Stopped);
}

#[tokio::test]
async fn wrong_token_is_refused() {
    let s = setup(Faults {
        wrong_token: true,
        ..Faults::default()
    });
    let mut vm = s.backend.create_vz(s.config.clone()).unwrap();
    vm.start().await.unwrap();
    let e = vm.wait_ready(READY).await.unwrap_err();
    assert!(
        matches!(e, VmError::Agent(crate::agent::AgentError::BadToken)),
        "{e:?}"
    );
}

#[tokio::test]
async fn guest_powering_itself_off_is_seen() {
    let s = setup(Faults::default());
    let mut vm = s.backend.create_vz(s.config.clone()).unwrap();
    vm.start().await.unwrap();
    vm.wait_ready(READY).await.unwrap();
    vm.framework_machine().unwrap().guest_powers_off();
    assert_eq!(vm.state(), VmState::Stopped);
    assert!(vm.agent().is_err());
    assert_eq!(
        vm.shutdown(Duration::from_secs(1)).await.unwrap(),
        ShutdownOutcome::AlreadyStopped
    );
}

#[tokio::test]
async fn pause_resume_and_invalid_transitions() {
    let s = setup(Faults::default());
    let mut vm = s.backend.create_vz(s.config.clone()).unwrap();
    assert!(matches!(
        vm.wait_ready(READY).await,
        Err(VmError::InvalidState { .. })
    ));
    assert!(matches!(
        vm.pause().await,
        Err(VmError::InvalidState { .. })
    ));
    vm.start().await.unwrap();
    vm.wait_ready(READY).await.unwrap();
    assert!(matches!(
        vm.resume().await,
        Err(VmError::InvalidState { .. })
    ));
    vm.pause().await.unwrap();
    assert_eq!(vm.state(), VmState::Paused);
    assert!(vm.agent().is_err(), "no agent while paused");
    vm.resume().await.unwrap();
    assert_eq!(vm.state(), VmState::Running);
    vm.agent().unwrap().ping().await.unwrap();
    vm.kill().await.unwrap();
}

#[tokio::test]
async fn snapshot_save_and_restore_to_ready() {
    let s = setup(Faults::default());
    let snaps = tempfile::tempdir().unwrap();
    let snap = snaps.path().join("vm.state");

    let mut vm = s.backend.create_vz(s.config.clone()).unwrap();
    assert!(matches!(
        vm.save_snapshot(&snap).await,
        Err(VmError::InvalidState { .. })
    ));
    vm.start().await.unwrap();
    vm.wait_ready(READY).await.unwrap();
    vm.save_snapshot(&snap).await.unwrap();
    assert_eq!(vm.state(), VmState::Running, "left running");
    vm.agent().unwrap().ping().await.unwrap();
    assert!(snaps.path().join("vm.state.vmcp").is_file());
    let token = cmdline_value(&vm.plan().cmdline, "vmcp.token")
        .unwrap()
        .to_string();
    vm.kill().await.unwrap();

    let mut restored = s.backend.create_vz(s.config.clone()).unwrap();
    restored.restore_snapshot(&snap).await.unwrap();
    assert_eq!(restored.state(), VmState::Starting);
    let info = restored.wait_ready(READY).await.unwrap();
    assert_eq!(info.agent_version, "fake-vz-agent");
    assert_eq!(
        cmdline_value(&restored.plan().cmdline, "vmcp.token"),
        Some(token.as_str()),
        "restored VM uses the snapshot's token"
    );
    restored.agent().unwrap().ping().await.unwrap();
    assert!(matches!(
        restored.restore_snapshot(&snap).await,
        Err(VmError::InvalidState { .. })
    ));
    assert_eq!(
        restored.shutdown(READY).await.unwrap(),
        ShutdownOutcome::Graceful
    );
}

#[tokio::test]
async fn snapshot_from_paused_vm_stays_paused() {
    let s = setup(Faults::default());
    let snaps = tempfile::tempdir().unwrap();
    let snap = snaps.path().join("p.state");
    let mut vm = s.backend.create_vz(s.config.clone()).unwrap();
    vm.start().await.unwrap();
    vm.wait_ready(READY).await.unwrap();
    vm.pause().await.unwrap();
    vm.save_snapshot(&snap).await.unwrap();
    assert_eq!(vm.state(), VmState::Paused);
    let c = calls(&s);
    assert_eq!(&c[c.len() - 2..], ["pause", "save"]);
}

#[tokio::test]
async fn restore_on_an_os_without_it_is_refused() {
    let s = setup(Faults {
        no_save_restore: true,
        ..Faults::default()
    });
    let snap = s._dir.path().join("x.state");
    let mut vm = s.backend.create_vz(s.config.clone()).unwrap();
    assert!(!vm.capabilities().snapshot);
    let e = vm.restore_snapshot(&snap).await.unwrap_err();
    let chain = vmcp_test_support::error_chain(&e);
    assert!(chain.contains("needs macOS 14"), "{chain}");
    assert_eq!(e.class(), crate::ErrorClass::Usage);
    assert_eq!(vm.state(), VmState::Created);
    vm.start().await.unwrap();
    vm.wait_ready(READY).await.unwrap();
    let e = vm.save_snapshot(&snap).await.unwrap_err();
    let chain = vmcp_test_support::error_chain(&e);
    assert!(
        chain.contains("saving or restoring a VM snapshot is not available here"),
        "{chain}"
    );
    assert_eq!(calls(&s), ["build", "start"], "no framework call was tried");
}

#[tokio::test]
async fn restore_needs_the_manifest_and_matching_arch() {
    use crate::lifecycle::SnapshotManifest;
    let s = setup(Faults::default());
    let snap = s._dir.path().join("nomanifest.state");
    std::fs::write(&snap, b"whatever").unwrap();
    let mut vm = s.backend.create_vz(s.config.clone()).unwrap();
    let e = vm.restore_snapshot(&snap).await.unwrap_err();
    let chain = vmcp_test_support::error_chain(&e);
    assert!(chain.contains("nomanifest.state.vmcp"), "{chain}");

    let manifest = |arch| SnapshotManifest::new("vz", arch, 1, 256, "abc");
    manifest(Arch::X86_64).write(&snap).unwrap();
    let e = vm.restore_snapshot(&snap).await.unwrap_err();
    let chain = vmcp_test_support::error_chain(&e);
    assert!(chain.contains("holds an x86_64 guest"), "{chain}");

    // A state file that does not match the configuration: the framework refuses it.
    manifest(Arch::Aarch64).write(&snap).unwrap();
    let e = vm.restore_snapshot(&snap).await.unwrap_err();
    let chain = vmcp_test_support::error_chain(&e);
    assert!(chain.contains("does not match"), "{chain}");
}

#[tokio::test]
async fn drop_stops_a_running_vm() {
    let s = setup(Faults::default());
    let mut vm = s.backend.create_vz(s.config.clone()).unwrap();
    vm.start().await.unwrap();
    vm.wait_ready(READY).await.unwrap();
    drop(vm);
    assert_eq!(calls(&s).last().map(String::as_str), Some("stop_detached"));
}

#[tokio::test]
async fn config_outside_limits_or_arch_rejected_at_create() {
    let s = setup(Faults::default());
    let mut c = s.config.clone();
    c.cpus = LIMITS.max_cpus + 1;
    let e = s.backend.create_vz(c).err().unwrap();
    assert!(format!("{e}: {}", std::error::Error::source(&e).unwrap()).contains("use 1 to 4"));

    let mut c = s.config.clone();
    c.arch = Arch::X86_64;
    let e = s.backend.create_vz(c).err().unwrap();
    let chain = format!("{}", std::error::Error::source(&e).unwrap());
    assert!(chain.contains("only aarch64 guests"), "{chain}");

    let mut c = s.config.clone();
    std::fs::write(&c.kernel, [0x1f, 0x8b, 8, 0]).unwrap();
    c.cpus = 1;
    let e = s.backend.create_vz(c).err().unwrap();
    let chain = format!("{}", std::error::Error::source(&e).unwrap());
    assert!(chain.contains("gzip-compressed"), "{chain}");

    let mut c = s.config.clone();
    c.kernel = "/nonexistent/Image".into();
    assert!(s.backend.create_vz(c).is_err());
}

#[cfg(unix)]
mod channel_net;
