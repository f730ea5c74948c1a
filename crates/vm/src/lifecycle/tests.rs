//! The lifecycle over the fault-injecting fake machine: every state transition and every
//! injected fault, with no hypervisor.

use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::fake::{responder_guest, FakeBackend, Faults};
use crate::{Backend, ErrorClass, Probe};

fn config() -> (tempfile::TempDir, VmConfig) {
    let d = tempfile::tempdir().unwrap();
    let k = d.path().join("k");
    let i = d.path().join("i");
    std::fs::write(&k, b"").unwrap();
    std::fs::write(&i, b"").unwrap();
    (d, VmConfig::new(k, i))
}

const T: Duration = Duration::from_secs(5);

fn faults(set: impl FnOnce(&mut Faults)) -> FakeBackend {
    let mut f = Faults::default();
    set(&mut f);
    FakeBackend::responder(f)
}

#[tokio::test]
async fn lifecycle_happy_path() {
    let (_d, cfg) = config();
    let b = FakeBackend::responder(Faults::default());
    assert_eq!(b.name(), "fake");
    assert!(matches!(b.probe().await, Probe::Usable { .. }));
    let mut vm = b.create(cfg).await.unwrap();
    let dir = vm.runtime_dir().to_path_buf();
    assert!(dir.is_dir());
    assert_eq!(vm.state(), VmState::Created);
    assert!(vm.agent().is_err());
    vm.start().await.unwrap();
    assert_eq!(vm.state(), VmState::Starting);
    assert!(matches!(
        vm.start().await,
        Err(VmError::InvalidState { .. })
    ));
    let info = vm.wait_ready(T).await.unwrap();
    assert_eq!(info.agent_version, "fake");
    assert_eq!(vm.state(), VmState::Running);
    let agent = vm.agent().unwrap();
    agent.ping().await.unwrap();
    agent.write_file("/f", b"data", 0o600).await.unwrap();
    assert_eq!(agent.read_file("/f").await.unwrap(), b"data");
    assert_eq!(vm.id().len(), 12);
    assert!(vm.capabilities().snapshot && vm.capabilities().pause);
    assert_eq!(vm.shutdown(T).await.unwrap(), ShutdownOutcome::Graceful);
    assert_eq!(vm.state(), VmState::Stopped);
    assert!(agent.ping().await.is_err());
    assert_eq!(
        vm.shutdown(T).await.unwrap(),
        ShutdownOutcome::AlreadyStopped
    );
    drop(vm);
    assert!(!dir.exists(), "runtime dir must be removed on drop");
}

#[tokio::test]
async fn faults_unusable_and_start_failure() {
    let (_d, cfg) = config();
    let b = faults(|f| {
        f.unusable = true;
        f.start_fails = true;
    });
    assert!(matches!(b.probe().await, Probe::Unusable { .. }));
    let mut vm = b.create(cfg).await.unwrap();
    let err = vm.start().await.unwrap_err();
    assert!(err.to_string().contains("start failed"), "{err}");
    assert_eq!(err.class(), ErrorClass::Hypervisor);
    assert_eq!(vm.state(), VmState::Stopped);
    assert!(matches!(
        vm.start().await,
        Err(VmError::InvalidState { op: "start", .. })
    ));
}

#[tokio::test]
async fn exit_during_launch_is_an_early_exit_with_the_console() {
    let (_d, cfg) = config();
    let b = faults(|f| f.exits_at_launch = true);
    let mut vm = b.create(cfg).await.unwrap();
    let err = vm.start().await.unwrap_err();
    match &err {
        VmError::EarlyExit {
            status,
            console_tail,
        } => {
            assert!(status.contains("exit code 1"), "{status}");
            assert!(
                console_tail.contains("fake console: launch"),
                "{console_tail}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(err.is_guest_fault());
    assert_eq!(vm.state(), VmState::Stopped);
}

#[tokio::test]
async fn never_ready_times_out_and_stops() {
    let (_d, cfg) = config();
    let b = faults(|f| f.never_ready = true);
    let mut vm = b.create(cfg).await.unwrap();
    vm.start().await.unwrap();
    let err = vm.wait_ready(Duration::from_millis(50)).await.unwrap_err();
    assert!(matches!(err, VmError::ReadyTimeout { .. }), "{err}");
    assert_eq!(vm.state(), VmState::Stopped);
    assert_eq!(b.calls(), ["launch", "kill"]);
    assert!(vm.wait_ready(T).await.is_err());
}

#[tokio::test]
async fn guest_that_dies_while_booting_is_an_early_exit_not_a_timeout() {
    let (_d, cfg) = config();
    let b = faults(|f| f.exits_before_ready = true);
    let mut vm = b.create(cfg).await.unwrap();
    vm.start().await.unwrap();
    let t = std::time::Instant::now();
    let err = vm.wait_ready(Duration::from_secs(30)).await.unwrap_err();
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "raced, not timed out"
    );
    match &err {
        VmError::EarlyExit { console_tail, .. } => {
            assert!(console_tail.contains("guest exited"), "{console_tail}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(vm.state(), VmState::Stopped);
}

#[tokio::test]
async fn ignored_poweroff_falls_back_to_kill() {
    let (_d, cfg) = config();
    let b = faults(|f| f.ignore_poweroff = true);
    let mut vm = b.create(cfg).await.unwrap();
    vm.start().await.unwrap();
    vm.wait_ready(T).await.unwrap();
    vm.agent().unwrap().ping().await.unwrap();
    let outcome = vm.shutdown(Duration::from_millis(100)).await.unwrap();
    assert_eq!(outcome, ShutdownOutcome::Killed);
    assert_eq!(vm.state(), VmState::Stopped);
    assert_eq!(b.calls().last(), Some(&"kill"));
}

#[tokio::test]
async fn shutdown_before_ready_kills_without_waiting() {
    let (_d, cfg) = config();
    let b = faults(|f| f.never_ready = true);
    let mut vm = b.create(cfg).await.unwrap();
    vm.start().await.unwrap();
    let t = std::time::Instant::now();
    assert_eq!(
        vm.shutdown(Duration::from_secs(30)).await.unwrap(),
        ShutdownOutcome::Killed
    );
    assert!(t.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn kill_failure_is_reported_and_kill_and_invalid_config() {
    let (_d, cfg) = config();
    let b = faults(|f| f.kill_fails = true);
    let mut vm = b.create(cfg.clone()).await.unwrap();
    vm.start().await.unwrap();
    let e = vm.kill().await.unwrap_err();
    assert!(e.to_string().contains("kill failed"), "{e}");

    let b = FakeBackend::responder(Faults::default());
    let mut vm = b.create(cfg.clone()).await.unwrap();
    vm.kill().await.unwrap();
    assert_eq!(vm.state(), VmState::Stopped);
    assert!(b.calls().is_empty(), "nothing to kill before start");
    let mut vm = b.create(cfg.clone()).await.unwrap();
    vm.start().await.unwrap();
    vm.kill().await.unwrap();
    assert_eq!(vm.state(), VmState::Stopped);
    assert_eq!(
        vm.shutdown(T).await.unwrap(),
        ShutdownOutcome::AlreadyStopped
    );

    let mut bad = cfg;
    bad.cpus = 0;
    let e = b.create(bad).await.err().unwrap();
    assert!(matches!(e, VmError::Config(_)));
    assert!(e.is_config());
}

#[tokio::test]
async fn wrong_token_guest_is_rejected() {
    let (_d, cfg) = config();
    let b = FakeBackend::new(
        Arc::new(|s, _token| Box::pin(responder_guest(s, "impostor".into()))),
        Faults::default(),
    );
    let mut vm = b.create(cfg).await.unwrap();
    vm.start().await.unwrap();
    let err = vm.wait_ready(T).await.unwrap_err();
    assert!(matches!(
        err,
        VmError::Agent(crate::agent::AgentError::BadToken)
    ));
    assert_eq!(vm.state(), VmState::Stopped);
}

#[tokio::test]
async fn pause_resume_and_their_faults() {
    let (_d, cfg) = config();
    let b = FakeBackend::responder(Faults::default());
    let mut vm = b.create(cfg.clone()).await.unwrap();
    assert!(matches!(
        vm.pause().await,
        Err(VmError::InvalidState { op: "pause", .. })
    ));
    vm.start().await.unwrap();
    vm.wait_ready(T).await.unwrap();
    assert!(vm.resume().await.is_err(), "resume of a running VM");
    vm.pause().await.unwrap();
    assert_eq!(vm.state(), VmState::Paused);
    assert!(vm.agent().is_err(), "no agent while paused");
    assert!(vm.pause().await.is_err(), "pause of a paused VM");
    vm.resume().await.unwrap();
    assert_eq!(vm.state(), VmState::Running);

    for which in [0, 1] {
        let b = faults(|f| {
            f.pause_fails = which == 0;
            f.resume_fails = which == 1;
        });
        let mut vm = b.create(cfg.clone()).await.unwrap();
        vm.start().await.unwrap();
        vm.wait_ready(T).await.unwrap();
        if which == 0 {
            assert!(vm.pause().await.is_err());
            assert_eq!(
                vm.state(),
                VmState::Running,
                "a failed pause changes nothing"
            );
        } else {
            vm.pause().await.unwrap();
            assert!(vm.resume().await.is_err());
            assert_eq!(
                vm.state(),
                VmState::Paused,
                "a failed resume changes nothing"
            );
        }
    }
}

#[tokio::test]
async fn snapshot_save_and_restore_to_ready_with_the_saved_token() {
    let (d, cfg) = config();
    let snap = d.path().join("vm.state");
    let b = FakeBackend::responder(Faults::default());
    let mut vm = b.create(cfg.clone()).await.unwrap();
    assert!(matches!(
        vm.save_snapshot(&snap).await,
        Err(VmError::InvalidState { .. })
    ));
    vm.start().await.unwrap();
    vm.wait_ready(T).await.unwrap();
    vm.save_snapshot(&snap).await.unwrap();
    assert_eq!(vm.state(), VmState::Running, "left running");
    assert_eq!(b.calls(), ["launch", "pause", "save_state", "resume"]);
    vm.agent().unwrap().ping().await.unwrap();
    let manifest = SnapshotManifest::read(&snap).unwrap();
    assert_eq!(manifest.backend, "fake");
    assert_eq!(manifest.token.len(), 32);
    vm.pause().await.unwrap();
    vm.save_snapshot(&snap).await.unwrap();
    assert_eq!(vm.state(), VmState::Paused, "left paused");
    drop(vm);

    let mut restored = b.create(cfg.clone()).await.unwrap();
    restored.restore_snapshot(&snap).await.unwrap();
    assert_eq!(restored.state(), VmState::Starting);
    // The fake guest says hello with the token it was given (the manifest's); the lifecycle
    // accepts that hello only as the start of the re-key, and the agent then presents the
    // restored VM's own token.
    restored.wait_ready(T).await.unwrap();
    let agent = restored.agent().unwrap();
    assert_ne!(agent.hello().token, manifest.token, "re-keyed");
    assert_eq!(agent.hello().token.len(), 32);
    agent.ping().await.unwrap();
    drop(agent);
    assert!(matches!(
        restored.restore_snapshot(&snap).await,
        Err(VmError::InvalidState { .. })
    ));
    assert_eq!(
        restored.shutdown(T).await.unwrap(),
        ShutdownOutcome::Graceful
    );
}

#[tokio::test]
async fn snapshot_faults() {
    let (d, cfg) = config();
    let snap = d.path().join("s.state");
    // No snapshot support: refused before any machine call.
    let b = faults(|f| f.no_snapshot = true);
    let mut vm = b.create(cfg.clone()).await.unwrap();
    assert!(matches!(
        vm.restore_snapshot(&snap).await,
        Err(VmError::Unsupported(_))
    ));
    assert_eq!(vm.state(), VmState::Created);
    vm.start().await.unwrap();
    vm.wait_ready(T).await.unwrap();
    assert!(vm.save_snapshot(&snap).await.is_err());
    assert_eq!(b.calls(), ["launch"]);

    // A failed save resumes the VM and writes no manifest.
    let b = faults(|f| f.save_fails = true);
    let mut vm = b.create(cfg.clone()).await.unwrap();
    vm.start().await.unwrap();
    vm.wait_ready(T).await.unwrap();
    assert!(vm.save_snapshot(&snap).await.is_err());
    assert_eq!(b.calls(), ["launch", "pause", "save_state", "resume"]);
    assert!(!SnapshotManifest::path(&snap).exists());
    assert_eq!(vm.state(), VmState::Running);

    // A failed load leaves nothing running.
    let good = FakeBackend::responder(Faults::default());
    let mut vm = good.create(cfg.clone()).await.unwrap();
    vm.start().await.unwrap();
    vm.wait_ready(T).await.unwrap();
    vm.save_snapshot(&snap).await.unwrap();
    let b = faults(|f| f.load_fails = true);
    let mut vm = b.create(cfg.clone()).await.unwrap();
    let e = vm.restore_snapshot(&snap).await.unwrap_err();
    assert!(e.to_string().contains("load failed"), "{e}");
    assert_eq!(vm.state(), VmState::Stopped);
    assert_eq!(b.calls(), ["load_state", "kill"]);
}

#[tokio::test]
async fn restore_refuses_missing_bad_or_foreign_manifests() {
    let (d, cfg) = config();
    let snap = d.path().join("m.state");
    std::fs::write(&snap, b"fake-state").unwrap();
    let b = FakeBackend::responder(Faults::default());
    let mut vm = b.create(cfg.clone()).await.unwrap();
    let chain = |e: &VmError| vmcp_test_support::error_chain(e);

    let e = vm.restore_snapshot(&snap).await.unwrap_err();
    assert!(chain(&e).contains("m.state.vmcp"), "{}", chain(&e));
    assert!(e.is_config());

    let manifest_path = SnapshotManifest::path(&snap);
    std::fs::write(&manifest_path, b"{not json").unwrap();
    let e = vm.restore_snapshot(&snap).await.unwrap_err();
    assert!(chain(&e).contains("cannot parse"), "{}", chain(&e));

    let write =
        |m: &SnapshotManifest| std::fs::write(&manifest_path, serde_json::to_vec(m).unwrap());
    let ok = SnapshotManifest::new("fake", cfg.arch, cfg.cpus, cfg.memory_mib, "00ff");
    let other_arch = match cfg.arch {
        Arch::X86_64 => Arch::Aarch64,
        Arch::Aarch64 => Arch::X86_64,
    };
    for (bad, want) in [
        (
            SnapshotManifest::new("qemu", cfg.arch, cfg.cpus, cfg.memory_mib, "00ff"),
            "state of the qemu backend",
        ),
        (
            SnapshotManifest::new("fake", other_arch, cfg.cpus, cfg.memory_mib, "00ff"),
            "guest",
        ),
        (
            SnapshotManifest::new("fake", cfg.arch, cfg.cpus, cfg.memory_mib + 1, "00ff"),
            "MiB",
        ),
        (
            SnapshotManifest::new(
                "fake",
                cfg.arch,
                cfg.cpus,
                cfg.memory_mib,
                "00 ff rdinit=/x",
            ),
            "hex",
        ),
    ] {
        write(&bad).unwrap();
        let e = vm.restore_snapshot(&snap).await.unwrap_err();
        assert!(chain(&e).contains(want), "{}", chain(&e));
        assert_eq!(
            vm.state(),
            VmState::Created,
            "a refused manifest changes nothing"
        );
    }
    let mut huge = serde_json::to_vec(&ok).unwrap();
    huge.extend(std::iter::repeat_n(b' ', 70 * 1024));
    std::fs::write(&manifest_path, huge).unwrap();
    let e = vm.restore_snapshot(&snap).await.unwrap_err();
    assert!(chain(&e).contains("larger than"), "{}", chain(&e));

    write(&ok).unwrap();
    vm.restore_snapshot(&snap).await.unwrap();
    vm.wait_ready(T).await.unwrap();
}

#[tokio::test]
async fn a_restored_guest_that_keeps_the_snapshots_token_is_refused() {
    let (d, cfg) = config();
    let snap = d.path().join("vm.state");
    let b = FakeBackend::responder(Faults::default());
    let mut vm = b.create(cfg.clone()).await.unwrap();
    vm.start().await.unwrap();
    vm.wait_ready(T).await.unwrap();
    vm.save_snapshot(&snap).await.unwrap();
    drop(vm);
    // This guest answers the re-key with a hello carrying the old token again.
    let stubborn = FakeBackend::new(
        Arc::new(|mut s, token| {
            Box::pin(async move {
                use vmcp_guest_proto::{read_msg_async, write_msg_async, GuestMsg, Hello};
                let hello = GuestMsg::Hello(Hello {
                    protocol_version: vmcp_guest_proto::PROTOCOL_VERSION,
                    agent_version: "stubborn".into(),
                    capabilities: vmcp_guest_proto::Capabilities(0),
                    token,
                    boot_ns: 0,
                });
                let mut buf = Vec::new();
                let _ = write_msg_async(&mut s, &hello).await;
                while let Ok(Some(_)) =
                    read_msg_async::<vmcp_guest_proto::HostMsg, _>(&mut s, &mut buf).await
                {
                    let _ = write_msg_async(&mut s, &hello).await;
                }
            })
        }),
        Faults::default(),
    );
    let mut restored = stubborn.create(cfg).await.unwrap();
    restored.restore_snapshot(&snap).await.unwrap();
    let e = restored.wait_ready(T).await.unwrap_err();
    assert!(
        matches!(e, VmError::Agent(crate::agent::AgentError::BadToken)),
        "{e:?}"
    );
    assert_eq!(restored.state(), VmState::Stopped);
}
