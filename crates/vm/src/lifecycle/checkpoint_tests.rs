//! Checkpoint, rewind and fork over the fault-injecting fake machine, whose guest keeps its
//! files in a memory that save and load carry (see `fake.rs`).

use std::time::Duration;

use super::*;
use crate::fake::{FakeBackend, FakeVm, Faults};
use crate::ErrorClass;

const T: Duration = Duration::from_secs(5);

fn config() -> (tempfile::TempDir, VmConfig) {
    let d = tempfile::tempdir().unwrap();
    let k = d.path().join("k");
    let i = d.path().join("i");
    std::fs::write(&k, b"").unwrap();
    std::fs::write(&i, b"").unwrap();
    (d, VmConfig::new(k, i))
}

async fn running(b: &FakeBackend, cfg: &VmConfig) -> FakeVm {
    let mut vm = b.create_fake(cfg.clone()).unwrap();
    vm.start().await.unwrap();
    vm.wait_ready(T).await.unwrap();
    vm
}

fn backend(set: impl FnOnce(&mut Faults)) -> FakeBackend {
    let mut f = Faults::default();
    set(&mut f);
    FakeBackend::responder(f)
}

async fn read(vm: &dyn Vm, path: &str) -> Option<Vec<u8>> {
    vm.agent().unwrap().read_file(path).await.ok()
}

fn checkpoint_dirs(vm: &dyn Vm) -> usize {
    std::fs::read_dir(vm.runtime_dir())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("checkpoint-"))
        .count()
}

#[tokio::test]
async fn files_before_the_checkpoint_survive_rewind_and_fork_files_after_do_not() {
    let (_d, cfg) = config();
    let b = backend(|_| {});
    let mut vm = running(&b, &cfg).await;
    let agent = vm.agent().unwrap();
    agent.write_file("/a", b"before", 0o600).await.unwrap();
    let cp = vm.checkpoint().await.unwrap();
    assert_eq!(vm.state(), VmState::Running, "the source runs on");
    assert!(cp.dir().starts_with(vm.runtime_dir()));
    assert!(cp.id().starts_with(vm.id()) && cp.vm_id() == vm.id());
    assert!(cp.disk_bytes() > 0);
    agent.write_file("/b", b"after", 0o600).await.unwrap();
    let source_token = agent.hello().token.clone();

    let forks = vm.fork(&cp, 2, T).await.unwrap();
    assert_eq!(forks.len(), 2);
    let mut seen = std::collections::HashSet::new();
    for f in &forks {
        assert_eq!(f.state(), VmState::Running);
        assert_eq!(read(f.as_ref(), "/a").await.unwrap(), b"before");
        assert_eq!(
            read(f.as_ref(), "/b").await,
            None,
            "written after the checkpoint"
        );
        assert_ne!(f.id(), vm.id());
        assert_ne!(f.runtime_dir(), vm.runtime_dir());
        let host = read(f.as_ref(), "/etc/hostname").await.unwrap();
        assert_eq!(host, format!("vmcp-{}", f.id()).into_bytes());
        let token = f.agent().unwrap().hello().token.clone();
        assert_ne!(token, source_token);
        assert!(seen.insert(token), "each fork has its own token");
        let seed = read(f.as_ref(), "/dev/urandom").await.unwrap();
        assert!(
            seen.insert(format!("{seed:?}")),
            "each fork has its own entropy"
        );
    }
    // The source is untouched by the fork.
    assert_eq!(read(&vm, "/b").await.unwrap(), b"after");

    let info = vm.rewind(&cp, T).await.unwrap();
    assert_eq!(info.agent_version, "fake");
    assert_eq!(vm.state(), VmState::Running);
    assert!(
        agent.ping().await.is_err(),
        "sessions of the replaced machine end"
    );
    let new_agent = vm.agent().unwrap();
    assert_ne!(new_agent.hello().token, source_token, "re-keyed");
    assert_eq!(read(&vm, "/a").await.unwrap(), b"before");
    assert_eq!(read(&vm, "/b").await, None);
    assert_eq!(
        read(&vm, "/etc/hostname").await.unwrap(),
        format!("vmcp-{}", vm.id()).into_bytes(),
        "a rewound VM keeps its name"
    );
    // A rewound VM can be checkpointed and rewound again, also to the first checkpoint.
    new_agent.write_file("/c", b"c", 0o600).await.unwrap();
    let cp2 = vm.checkpoint().await.unwrap();
    assert_ne!(cp2.id(), cp.id());
    vm.rewind(&cp, T).await.unwrap();
    assert_eq!(read(&vm, "/c").await, None);
    vm.rewind(&cp2, T).await.unwrap();
    assert_eq!(read(&vm, "/c").await.unwrap(), b"c");

    // Dropping the handle removes its files; dropping the VM first is fine too.
    let dir = cp.dir().to_path_buf();
    drop(cp);
    assert!(!dir.exists());
    let rt = vm.runtime_dir().to_path_buf();
    drop(vm);
    assert!(!rt.exists());
    drop(cp2);
    let fork_dirs: Vec<_> = forks
        .iter()
        .map(|f| f.runtime_dir().to_path_buf())
        .collect();
    drop(forks);
    assert!(fork_dirs.iter().all(|d| !d.exists()), "forks clean up");
}

#[tokio::test]
async fn a_failed_save_leaves_the_vm_running_and_no_files() {
    let (_d, cfg) = config();
    let b = backend(|f| f.save_fails = true);
    let mut vm = running(&b, &cfg).await;
    let e = vm.checkpoint().await.unwrap_err();
    assert!(e.to_string().contains("save failed"), "{e}");
    assert_eq!(vm.state(), VmState::Running);
    vm.agent().unwrap().ping().await.unwrap();
    assert_eq!(
        checkpoint_dirs(&vm),
        0,
        "the half-written checkpoint is removed"
    );
    assert_eq!(b.calls(), ["launch", "pause", "save_state", "resume"]);
}

#[tokio::test]
async fn a_vm_that_does_not_resume_after_a_checkpoint_is_stopped() {
    let (_d, cfg) = config();
    let b = backend(|f| f.resume_fails = true);
    let mut vm = running(&b, &cfg).await;
    let e = vm.checkpoint().await.unwrap_err();
    assert!(e.to_string().contains("resume failed"), "{e}");
    assert_eq!(vm.state(), VmState::Stopped, "cleanly dead, not frozen");
    assert_eq!(checkpoint_dirs(&vm), 0);
    // A paused VM is checkpointed without a resume and stays paused.
    let b = backend(|_| {});
    let mut vm = running(&b, &cfg).await;
    vm.pause().await.unwrap();
    let _cp = vm.checkpoint().await.unwrap();
    assert_eq!(vm.state(), VmState::Paused);
    assert_eq!(b.calls(), ["launch", "pause", "save_state"]);
}

#[tokio::test]
async fn failed_loads_leave_the_vm_as_it_was_and_no_forks() {
    let (_d, cfg) = config();
    let b = backend(|f| f.load_fails = true);
    let mut vm = running(&b, &cfg).await;
    let agent = vm.agent().unwrap();
    agent.write_file("/a", b"1", 0o600).await.unwrap();
    let cp = vm.checkpoint().await.unwrap();
    agent.write_file("/b", b"2", 0o600).await.unwrap();
    let e = vm.rewind(&cp, T).await.unwrap_err();
    assert!(e.to_string().contains("load failed"), "{e}");
    assert_eq!(vm.state(), VmState::Running);
    assert_eq!(read(&vm, "/b").await.unwrap(), b"2", "still the VM it was");
    agent.ping().await.unwrap();
    let Err(e) = vm.fork(&cp, 3, T).await else {
        panic!("forked")
    };
    assert!(e.to_string().contains("load failed"), "{e}");
    let calls = b.calls();
    let loads = calls.iter().filter(|c| **c == "load_state").count();
    let kills = calls.iter().filter(|c| **c == "kill").count();
    assert_eq!(loads, 4, "{calls:?}");
    assert_eq!(kills, loads, "every failed machine was stopped: {calls:?}");
    assert!(cp.dir().exists(), "the checkpoint outlives failed uses");
}

#[tokio::test]
async fn bounds_states_and_foreign_checkpoints_are_refused_with_reasons() {
    let (_d, cfg) = config();
    let b = backend(|_| {});
    let mut vm = b.create_fake(cfg.clone()).unwrap();
    assert!(matches!(
        vm.checkpoint().await,
        Err(VmError::InvalidState {
            op: "checkpoint",
            ..
        })
    ));
    vm.start().await.unwrap();
    vm.wait_ready(T).await.unwrap();
    let mut held: Vec<Checkpoint> = Vec::new();
    for _ in 0..MAX_CHECKPOINTS {
        held.push(vm.checkpoint().await.unwrap());
    }
    let e = vm.checkpoint().await.unwrap_err();
    assert_eq!(e.class(), ErrorClass::Usage);
    assert!(e.to_string().contains("drop one"), "{e}");
    assert_eq!(checkpoint_dirs(&vm), MAX_CHECKPOINTS);
    let clone = held.pop().unwrap();
    let again = clone.clone();
    drop(clone);
    assert!(vm.checkpoint().await.is_err(), "a clone still holds it");
    drop(again);
    held.push(vm.checkpoint().await.unwrap());
    assert_eq!(checkpoint_dirs(&vm), MAX_CHECKPOINTS);

    for n in [0, MAX_FORKS + 1] {
        let Err(e) = vm.fork(&held[0], n, T).await else {
            panic!("forked into {n}")
        };
        assert!(e.to_string().contains(&format!("1 to {MAX_FORKS}")), "{e}");
    }
    let mut other = running(&b, &cfg).await;
    let e = other.rewind(&held[0], T).await.unwrap_err();
    assert!(e.to_string().contains("taken of VM"), "{e}");
    assert!(other.fork(&held[0], 1, T).await.is_err());
    other.kill().await.unwrap();
    assert!(matches!(
        other.rewind(&held[0], T).await,
        Err(VmError::InvalidState { op: "rewind", .. })
    ));

    let nosnap = backend(|f| f.no_snapshot = true);
    let mut vm = running(&nosnap, &cfg).await;
    assert!(matches!(
        vm.checkpoint().await,
        Err(VmError::Unsupported(_))
    ));
}
