//! Checkpoint, rewind and fork of a real QEMU VM (TCG here), on one booted VM: a file written
//! before the checkpoint is in every VM that continues from it, a file written after is not;
//! forks are new VMs (id, token, hostname, RNG); a restored VM (a fork) can be checkpointed and
//! rewound too (its RAM goes into the state file); nothing is left running at the end.
//!
//! Prerequisites as in `qemu_vm.rs` (`SKIPPED:` without QEMU or an image).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;

use common::{prerequisites, sh, vm_lock, READY_TIMEOUT};
use vmcp_vm::qemu::snapshot::RAM_IN_STATE_FILE;
use vmcp_vm::qemu::QemuBackend;
use vmcp_vm::{Vm, VmState};

const FILES: &str = "for f in a b c d; do test -e /root/$f && echo -n $f; done; echo";

fn proc_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_rewind_and_fork_of_a_running_vm() {
    let Some(img) = prerequisites() else { return };
    let _lock = vm_lock().await;
    let mut vm = QemuBackend::new().create_qemu(img.config()).await.unwrap();
    vm.set_memory_file(vm.runtime_dir().join("memory"));
    vm.start().await.unwrap();
    vm.wait_ready(READY_TIMEOUT).await.unwrap();
    let agent = vm.agent().unwrap();
    sh(&agent, "echo A > /root/a").await;
    let cp = vm.checkpoint().await.unwrap();
    assert_eq!(vm.state(), VmState::Running);
    sh(&agent, "echo B > /root/b").await;
    assert_eq!(sh(&agent, FILES).await, "ab\n", "the source runs on");
    let source_token = agent.hello().token.clone();
    let mut pids = vec![vm.pid().unwrap()];

    // Fork: two new VMs with the checkpoint's files and their own identity.
    let mut forks = vm.fork_into(&cp, 2, READY_TIMEOUT).await.unwrap();
    let mut random = Vec::new();
    for f in &forks {
        pids.push(f.pid().unwrap());
        let a = f.agent().unwrap();
        assert_eq!(sh(&a, FILES).await, "a\n");
        assert_eq!(sh(&a, "hostname").await.trim(), format!("vmcp-{}", f.id()));
        assert_ne!(f.id(), vm.id());
        assert_ne!(a.hello().token, source_token);
        random.push(sh(&a, "head -c 32 /dev/urandom | od -An -tx1").await);
    }
    assert_ne!(random[0], random[1], "two forks gave the same random bytes");
    assert_ne!(
        forks[0].agent().unwrap().hello().token,
        forks[1].agent().unwrap().hello().token
    );

    // A fork is a restored VM: it can be checkpointed (RAM in the state file) and rewound.
    let fork = &mut forks[0];
    let fa = fork.agent().unwrap();
    sh(&fa, "echo C > /root/c").await;
    let fcp = fork.checkpoint().await.unwrap();
    assert!(fcp.state_path().join(RAM_IN_STATE_FILE).exists());
    sh(&fa, "echo D > /root/d").await;
    fork.rewind(&fcp, READY_TIMEOUT).await.unwrap();
    pids.push(fork.pid().unwrap());
    let fa = fork.agent().unwrap();
    assert_eq!(sh(&fa, FILES).await, "ac\n");
    assert_eq!(
        sh(&fa, "hostname").await.trim(),
        format!("vmcp-{}", fork.id())
    );

    // Rewind the source: B is gone, A stays, the name stays, the token changes.
    vm.rewind(&cp, READY_TIMEOUT).await.unwrap();
    pids.push(vm.pid().unwrap());
    assert!(!proc_alive(pids[0]), "the replaced QEMU is gone");
    assert!(agent.ping().await.is_err(), "the old session ended");
    let agent = vm.agent().unwrap();
    assert_ne!(agent.hello().token, source_token);
    assert_eq!(sh(&agent, FILES).await, "a\n");
    assert_eq!(
        sh(&agent, "hostname").await.trim(),
        format!("vmcp-{}", vm.id())
    );

    let dirs = [cp.dir().to_path_buf(), fcp.dir().to_path_buf()];
    drop((agent, fa, cp, fcp));
    assert!(dirs.iter().all(|d| !d.exists()), "checkpoint files removed");
    drop(forks);
    drop(vm);
    for pid in pids {
        assert!(!proc_alive(pid), "QEMU {pid} left running");
    }
}

/// An allow-list over the agent channel needs no network card, so such a VM can be
/// checkpointed and forked: each fork gets its own egress proxy (its own counters), and the
/// guest agent drops the source's tunnel requests when it takes the fork's identity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allow_list_over_the_agent_channel_survives_checkpoint_fork_and_rewind() {
    let Some(img) = prerequisites() else { return };
    let _lock = vm_lock().await;
    let (port, hits) = vmcp_test_support::http_server("through-the-channel");
    let mut config = img.config();
    config.net.mode = format!("allow=127.0.0.1:{port}").parse().unwrap();
    let mut vm = QemuBackend::new().create_qemu(config).await.unwrap();
    vm.set_memory_file(vm.runtime_dir().join("memory"));
    vm.start().await.unwrap();
    vm.wait_ready(READY_TIMEOUT).await.unwrap();
    let fetch = format!("export NO_PROXY= no_proxy=; wget -q -O - http://127.0.0.1:{port}/");
    let agent = vm.agent().unwrap();
    assert_eq!(sh(&agent, "ls /sys/class/net").await, "lo\n");
    assert_eq!(sh(&agent, &fetch).await, "through-the-channel");
    let cp = vm.checkpoint().await.unwrap();

    let forks = vm.fork_into(&cp, 1, READY_TIMEOUT).await.unwrap();
    let fa = forks[0].agent().unwrap();
    assert_eq!(sh(&fa, &fetch).await, "through-the-channel");
    assert_eq!(forks[0].egress_stats().unwrap().allowed(), 1);
    // The source's proxy still serves the source.
    assert_eq!(sh(&agent, &fetch).await, "through-the-channel");
    assert_eq!(vm.egress_stats().unwrap().allowed(), 2);

    vm.rewind(&cp, READY_TIMEOUT).await.unwrap();
    let agent = vm.agent().unwrap();
    assert_eq!(sh(&agent, &fetch).await, "through-the-channel");
    assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 4);
}
