//! The pool over real lifecycle VMs of the vm crate's fault-injecting fake backend, the way
//! the daemon uses it: each VM is restored from one saved checkpoint and re-keyed (so each has
//! its own hostname), restores that fail are retried, every handed-out VM is used once and
//! stopped after use, and nothing runs after shutdown.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use vmcp_pool::{Pool, ProfileSpec, Source};
use vmcp_vm::fake::{FakeBackend, FakeVm, Faults};
use vmcp_vm::{Vm, VmConfig, VmState};

const READY: Duration = Duration::from_secs(5);

struct FakeVmSource {
    ok: FakeBackend,
    broken: FakeBackend,
    config: VmConfig,
    snapshot: PathBuf,
    attempts: AtomicUsize,
    /// Every VM destroyed, with its state after the destroy.
    destroyed: Mutex<Vec<(String, VmState)>>,
}

#[async_trait]
impl Source for FakeVmSource {
    type Vm = FakeVm;

    async fn make(&self, _p: &ProfileSpec) -> Result<FakeVm, String> {
        // Every third restore hits a machine whose state load fails.
        let n = self.attempts.fetch_add(1, Ordering::SeqCst);
        let backend = if n % 3 == 2 { &self.broken } else { &self.ok };
        let mut vm = backend
            .create_fake(self.config.clone())
            .map_err(|e| e.to_string())?;
        vm.restore_snapshot(&self.snapshot)
            .await
            .map_err(|e| e.to_string())?;
        vm.wait_ready(READY).await.map_err(|e| e.to_string())?;
        Ok(vm)
    }

    async fn destroy(&self, mut vm: FakeVm) {
        vm.kill().await.unwrap();
        let id = vm.id().to_string();
        self.destroyed.lock().unwrap().push((id, vm.state()));
    }
}

async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn restored_fake_vms_are_each_used_once_and_stopped() {
    let files = tempfile::tempdir().unwrap();
    std::fs::write(files.path().join("kernel"), b"k").unwrap();
    std::fs::write(files.path().join("initrd"), b"i").unwrap();
    let config = VmConfig::new(files.path().join("kernel"), files.path().join("initrd"));
    // The "snapshot": a booted fake VM saved once.
    let ok = FakeBackend::responder(Faults::default());
    let mut base = ok.create_fake(config.clone()).unwrap();
    base.start().await.unwrap();
    base.wait_ready(READY).await.unwrap();
    let snapshot = files.path().join("snap");
    base.save_snapshot(&snapshot).await.unwrap();
    base.kill().await.unwrap();
    let mut faults = Faults::default();
    faults.load_fails = true;
    let source = Arc::new(FakeVmSource {
        ok,
        broken: FakeBackend::responder(faults),
        config,
        snapshot,
        attempts: AtomicUsize::new(0),
        destroyed: Mutex::new(Vec::new()),
    });
    let pool = Pool::new(
        Arc::clone(&source),
        vec![ProfileSpec::new("fake", 1, 256, 2)],
        4096,
        1,
    );
    let run = tokio::spawn(Arc::clone(&pool).run());

    let mut hostnames = HashSet::new();
    let mut ids = HashSet::new();
    for _ in 0..6 {
        until("a ready VM", || pool.status()[0].ready > 0).await;
        let mut lease = pool.take("fake").unwrap();
        let vm = lease.vm().unwrap();
        assert_eq!(vm.state(), VmState::Running);
        assert!(ids.insert(vm.id().to_string()), "a VM was handed out twice");
        // The re-key gave every restore its own hostname.
        let agent = vm.agent().unwrap();
        let host = agent.read_file("/etc/hostname").await.unwrap();
        assert!(hostnames.insert(host), "two restores share a hostname");
        agent.ping().await.unwrap();
        drop(agent);
        lease.destroy().await;
    }
    let status = pool.status()[0].clone();
    assert!(status.failures >= 2, "{status:?}");
    assert!(
        status
            .last_error
            .as_deref()
            .unwrap()
            .contains("fault injected"),
        "{status:?}"
    );
    assert_eq!(status.handed_out, 6);

    pool.shutdown().await;
    run.await.unwrap();
    until("restores in flight ended", || pool.filling() == 0).await;
    let destroyed = source.destroyed.lock().unwrap().clone();
    // The 6 used VMs and the ones still ready at shutdown; every one stopped.
    assert!(destroyed.len() >= 6, "{destroyed:?}");
    assert!(destroyed.iter().all(|(_, s)| *s == VmState::Stopped));
    let handed_and_destroyed = destroyed.iter().filter(|(id, _)| ids.contains(id)).count();
    assert_eq!(handed_and_destroyed, 6);
}
