use super::*;

fn config() -> (tempfile::TempDir, VmConfig) {
    let d = tempfile::tempdir().unwrap();
    let k = d.path().join("k");
    let i = d.path().join("i");
    std::fs::write(&k, b"").unwrap();
    std::fs::write(&i, b"").unwrap();
    (d, VmConfig::new(k, i))
}

const T: Duration = Duration::from_secs(5);

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
    assert!(!vm.capabilities().snapshot);
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
    let b = FakeBackend::responder(Faults {
        unusable: true,
        start_fails: true,
        ..Faults::default()
    });
    assert!(matches!(b.probe().await, Probe::Unusable { .. }));
    let mut vm = b.create(cfg).await.unwrap();
    let err = vm.start().await.unwrap_err();
    assert!(err.to_string().contains("start failed"));
    assert_eq!(vm.state(), VmState::Stopped);
}

#[tokio::test]
async fn never_ready_times_out_and_stops() {
    let (_d, cfg) = config();
    let b = FakeBackend::responder(Faults {
        never_ready: true,
        ..Faults::default()
    });
    let mut vm = b.create(cfg).await.unwrap();
    vm.start().await.unwrap();
    let err = vm.wait_ready(Duration::from_millis(50)).await.unwrap_err();
    assert!(matches!(err, VmError::ReadyTimeout { .. }), "{err}");
    assert_eq!(vm.state(), VmState::Stopped);
    assert!(vm.wait_ready(T).await.is_err());
}

#[tokio::test]
async fn ignored_poweroff_falls_back_to_kill() {
    let (_d, cfg) = config();
    let b = FakeBackend::responder(Faults {
        ignore_poweroff: true,
        ..Faults::default()
    });
    let mut vm = b.create(cfg).await.unwrap();
    vm.start().await.unwrap();
    vm.wait_ready(T).await.unwrap();
    vm.agent().unwrap().ping().await.unwrap();
    let outcome = vm.shutdown(Duration::from_millis(100)).await.unwrap();
    assert_eq!(outcome, ShutdownOutcome::Killed);
    assert_eq!(vm.state(), VmState::Stopped);
}

#[tokio::test]
async fn kill_and_invalid_config() {
    let (_d, cfg) = config();
    let b = FakeBackend::responder(Faults::default());
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
    assert!(matches!(b.create(bad).await, Err(VmError::Config(_))));
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
