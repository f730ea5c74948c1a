//! Real QEMU boots of the guest image (TCG here). One test binary; the tests take a global
//! lock so only one VM boots at a time (each boot costs a CPU core for ~2 s). Behaviour that
//! is not about the lifecycle shares one VM (`exec_behaviour`).
//!
//! Prerequisites: `qemu-system-<arch>` and a built image (`vmcp image build`). Without them
//! each test prints `SKIPPED: <reason>`; with `VMCP_REQUIRE_VM=1` (set in CI) it fails instead.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use common::{boot, prerequisites, vm_lock, READY_TIMEOUT};
#[cfg(unix)]
use std::os::unix::fs::symlink;
#[cfg(windows)]
use std::os::windows::fs::symlink_file as symlink;
use vmcp_guest_proto::ExitStatus;
use vmcp_vm::agent::{AgentError, ExecSpec, ProcessEvent};
use vmcp_vm::qemu::{QemuBackend, QemuVm};
use vmcp_vm::{ShutdownOutcome, Vm, VmError, VmState};

fn proc_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_behaviour() {
    let Some(img) = prerequisites() else { return };
    let _lock = vm_lock().await;
    let (mut vm, info) = boot(&img, QemuBackend::new()).await;
    assert!(info.protocol_version >= 1);
    assert!(info.ready_after > Duration::ZERO);
    let agent = vm.agent().unwrap();
    let rtt = agent.ping().await.unwrap();
    assert!(rtt < Duration::from_secs(1), "{rtt:?}");

    // Separate streams and exit code.
    let out = agent
        .exec(ExecSpec::new([
            "sh",
            "-c",
            "uname -r; echo to-stderr >&2; exit 3",
        ]))
        .await
        .unwrap()
        .wait_with_output()
        .await
        .unwrap();
    assert_eq!(out.status, ExitStatus::Code(3));
    assert_eq!(String::from_utf8_lossy(&out.stderr), "to-stderr\n");
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with(&img.kernel_release),
        "stdout {:?}, release {}",
        String::from_utf8_lossy(&out.stdout),
        img.kernel_release
    );

    // Environment and working directory.
    let mut spec = ExecSpec::new(["sh", "-c", "echo \"$GREETING\"; pwd"]);
    spec.env = vec![("GREETING".into(), "hello vm".into())];
    spec.cwd = Some("/tmp".into());
    let out = agent
        .exec(spec)
        .await
        .unwrap()
        .wait_with_output()
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello vm\n/tmp\n");
    assert_eq!(out.status, ExitStatus::Code(0));

    // Stdin streamed in, EOF closes it.
    let mut spec = ExecSpec::new(["sh", "-c", "tr a-z A-Z; echo done"]);
    spec.stdin = true;
    let mut p = agent.exec(spec).await.unwrap();
    let ctl = p.control().clone();
    let big: Vec<u8> = b"abc\n".repeat(50_000);
    let writer = tokio::spawn(async move {
        ctl.write_stdin(&big).await.unwrap();
        ctl.close_stdin().await.unwrap();
    });
    let mut stdout = Vec::new();
    loop {
        match p.next_event().await.unwrap() {
            Some(ProcessEvent::Stdout(d)) => stdout.extend_from_slice(&d),
            Some(ProcessEvent::Stderr(d)) => panic!("stderr: {}", String::from_utf8_lossy(&d)),
            Some(ProcessEvent::Exited(s)) => {
                assert_eq!(s, ExitStatus::Code(0));
                break;
            }
            None => break,
        }
    }
    writer.await.unwrap();
    let mut want = b"ABC\n".repeat(50_000);
    want.extend_from_slice(b"done\n");
    assert_eq!(stdout.len(), want.len());
    assert!(stdout == want);

    // Missing and non-executable programs are classified.
    match agent.exec(ExecSpec::new(["/no/such/program"])).await {
        Err(AgentError::Failed { kind, .. }) => {
            assert_eq!(kind, vmcp_guest_proto::FailureKind::NotFound)
        }
        other => panic!("expected NotFound, got {other:?}"),
    }
    agent
        .write_file("/tmp/notexec", b"data", 0o644)
        .await
        .unwrap();
    match agent.exec(ExecSpec::new(["/tmp/notexec"])).await {
        Err(AgentError::Failed { kind, .. }) => {
            assert_eq!(kind, vmcp_guest_proto::FailureKind::PermissionDenied)
        }
        other => panic!("expected PermissionDenied, got {other:?}"),
    }

    // Signals: a killed process reports the signal.
    let p = agent.exec(ExecSpec::new(["sleep", "100"])).await.unwrap();
    p.control().signal(9).await.unwrap();
    let out = p.wait_with_output().await.unwrap();
    assert_eq!(out.status, ExitStatus::Signal(9));

    // Concurrent execs on one channel.
    let t = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..8 {
        let a = agent.clone();
        tasks.push(tokio::spawn(async move {
            let cmd = format!("sleep 0.5; echo {i}; echo e{i} >&2; exit {i}");
            a.exec(ExecSpec::new(["sh", "-c", cmd.as_str()]))
                .await
                .unwrap()
                .wait_with_output()
                .await
                .unwrap()
        }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        let out = t.await.unwrap();
        assert_eq!(out.stdout, format!("{i}\n").into_bytes());
        assert_eq!(out.stderr, format!("e{i}\n").into_bytes());
        assert_eq!(out.status, ExitStatus::Code(i as i32));
    }
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "8 × 0.5 s sleeps ran one after another: {:?}",
        t.elapsed()
    );

    // File round trip, larger than one chunk, binary content.
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    agent.write_file("/tmp/blob", &data, 0o600).await.unwrap();
    assert_eq!(agent.read_file("/tmp/blob").await.unwrap(), data);
    let out = agent
        .exec(ExecSpec::new([
            "sh",
            "-c",
            "wc -c < /tmp/blob; stat -c %a /tmp/blob",
        ]))
        .await
        .unwrap()
        .wait_with_output()
        .await
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .collect::<Vec<_>>(),
        ["300000", "600"]
    );
    assert!(agent.read_file("/no/such/file").await.is_err());

    // No network device unless asked.
    let out = agent
        .exec(ExecSpec::new(["sh", "-c", "ls /sys/class/net"]))
        .await
        .unwrap()
        .wait_with_output()
        .await
        .unwrap();
    let nics: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter(|n| *n != "lo")
        .map(str::to_string)
        .collect();
    assert!(nics.is_empty(), "unexpected network devices {nics:?}");

    // Pause freezes the guest (a ping gets no answer), resume lets it answer again.
    vm.pause().await.unwrap();
    assert_eq!(vm.state(), VmState::Paused);
    assert!(
        tokio::time::timeout(Duration::from_millis(500), agent.ping())
            .await
            .is_err(),
        "a paused guest answered"
    );
    vm.resume().await.unwrap();
    agent.ping().await.unwrap();

    let pid = vm.pid().unwrap();
    assert_eq!(
        vm.shutdown(Duration::from_secs(20)).await.unwrap(),
        ShutdownOutcome::Graceful
    );
    assert!(!proc_alive(pid));
}

/// Defence in depth, as promised in docs/qemu.md: QEMU runs under its seccomp filter, and as an
/// unprivileged user when the tests run as root (as in CI).
#[cfg(target_os = "linux")]
fn assert_sandboxed(pid: u32) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.split_whitespace().collect::<Vec<_>>())
            .unwrap_or_default()
    };
    assert_eq!(
        field("Seccomp:"),
        ["2"],
        "QEMU is not under a seccomp filter"
    );
    assert_eq!(
        field("NoNewPrivs:"),
        ["1"],
        "QEMU can still gain privileges"
    );
    let me = std::fs::read_to_string("/proc/self/status").unwrap();
    if me.lines().any(|l| l.starts_with("Uid:\t0\t")) {
        let uid = field("Uid:");
        assert!(
            uid.iter().all(|u| *u != "0"),
            "QEMU runs as root although vmcp is root: Uid {uid:?}"
        );
    }
}

#[cfg(not(target_os = "linux"))]
fn assert_sandboxed(_pid: u32) {}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_then_drop_cleans_up() {
    let Some(img) = prerequisites() else { return };
    let _lock = vm_lock().await;
    let (mut vm, _) = boot(&img, QemuBackend::new()).await;
    let pid = vm.pid().unwrap();
    assert_sandboxed(pid);
    let dir = vm.runtime_dir().to_path_buf();
    let agent = vm.agent().unwrap();
    let t = Instant::now();
    assert_eq!(
        vm.shutdown(Duration::from_secs(20)).await.unwrap(),
        ShutdownOutcome::Graceful
    );
    eprintln!("graceful shutdown took {:?}", t.elapsed());
    assert_eq!(vm.state(), VmState::Stopped);
    assert!(!proc_alive(pid));
    // The old session notices the channel is gone.
    assert!(matches!(agent.ping().await, Err(AgentError::Closed)));
    assert!(vm.agent().is_err());
    assert!(dir.exists());
    drop(vm);
    assert!(!dir.exists(), "runtime dir left behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_and_drop_leave_nothing_running() {
    let Some(img) = prerequisites() else { return };
    let _lock = vm_lock().await;
    let (mut vm, _) = boot(&img, QemuBackend::new()).await;
    let pid = vm.pid().unwrap();
    let agent = vm.agent().unwrap();
    let p = agent.exec(ExecSpec::new(["sleep", "100"])).await.unwrap();
    vm.kill().await.unwrap();
    assert!(!proc_alive(pid));
    assert_eq!(vm.state(), VmState::Stopped);
    // A process waiting on the dead VM fails instead of hanging.
    let r = tokio::time::timeout(Duration::from_secs(5), p.wait_with_output()).await;
    assert!(matches!(r, Ok(Err(AgentError::Closed))), "{r:?}");

    // Dropping a running VM (no shutdown) kills and reaps QEMU and removes its directory.
    let (vm, _) = boot(&img, QemuBackend::new()).await;
    let pid = vm.pid().unwrap();
    let dir = vm.runtime_dir().to_path_buf();
    drop(vm);
    assert!(!proc_alive(pid), "QEMU {pid} outlived its dropped handle");
    assert!(!dir.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boot_failures_are_reported_with_the_console() {
    let Some(img) = prerequisites() else { return };
    let _lock = vm_lock().await;
    // Too short a ready timeout: the error quotes the console, and the VM is still killable.
    let backend = QemuBackend::new();
    let mut vm = backend.create_qemu(img.config()).await.unwrap();
    vm.start().await.unwrap();
    let e = vm.wait_ready(Duration::from_millis(50)).await.unwrap_err();
    assert!(matches!(e, VmError::ReadyTimeout { .. }), "{e}");
    vm.kill().await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    // A kernel QEMU cannot load: QEMU's own message comes back from start().
    // (qemu-system-aarch64 loads any file as a raw image and jumps into it, so on arm64 there
    // is no load error to report; the ready timeout above covers a guest that never answers.)
    if common::test_arch() == vmcp_vm::Arch::Aarch64 {
        vmcp_test_support::skipped!("SKIPPED (sub-case): unloadable kernel; qemu-system-aarch64 boots any file as a raw image");
    } else {
        let bad = dir.path().join("bad-kernel");
        std::fs::write(&bad, vec![0u8; 4096]).unwrap();
        let mut c = img.config();
        c.kernel = bad;
        let mut vm = backend.create_qemu(c).await.unwrap();
        let e = match vm.start().await {
            Err(e) => e,
            Ok(()) => vm.wait_ready(READY_TIMEOUT).await.unwrap_err(),
        };
        let text = e.to_string();
        assert!(matches!(e, VmError::EarlyExit { .. }), "{text}");
        assert!(vm.pid().is_none());
    }

    // A kernel panic (no init can run): the console tail shows it.
    let mut c = img.config();
    let empty = dir.path().join("empty.cpio");
    std::fs::write(&empty, b"").unwrap();
    c.initrd = empty;
    let mut vm = backend.create_qemu(c).await.unwrap();
    vm.start().await.unwrap();
    let e = vm.wait_ready(READY_TIMEOUT).await.unwrap_err();
    let text = e.to_string();
    assert!(matches!(e, VmError::EarlyExit { .. }), "{text}");
    assert!(text.to_lowercase().contains("panic"), "{text}");
}

/// Resident memory of this process in KiB (Linux `/proc`), `None` elsewhere.
fn own_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// A guest writing without pause to a library consumer that stops reading for 15 s: the
/// flow-control window stops the guest process, this process's memory stays flat, and the
/// output flows again when the consumer reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_consumer_keeps_host_memory_flat() {
    let Some(img) = prerequisites() else { return };
    let Some(before) = own_rss_kib() else {
        vmcp_test_support::skipped!("SKIPPED: needs /proc/self/status to measure memory");
        return;
    };
    let _lock = vm_lock().await;
    let (mut vm, _) = boot(&img, QemuBackend::new()).await;
    let agent = vm.agent().unwrap();
    let mut p = agent
        .exec(ExecSpec::new(["head", "-c", "2000000000", "/dev/zero"]))
        .await
        .unwrap();
    // Take the first event, then stall for 15 s while sampling memory.
    assert!(matches!(
        p.next_event().await.unwrap(),
        Some(ProcessEvent::Stdout(_))
    ));
    let mut peak = 0;
    for _ in 0..15 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        peak = peak.max(own_rss_kib().unwrap());
    }
    assert!(
        peak < 64 * 1024,
        "RSS {peak} KiB (before the VM: {before} KiB)"
    );
    assert!(
        peak < before + 16 * 1024,
        "RSS grew from {before} to {peak} KiB while the consumer stalled"
    );
    // Reading again: output flows (well beyond one window).
    let mut got = 0usize;
    while got < 32 * 1024 * 1024 {
        match p.next_event().await.unwrap() {
            Some(ProcessEvent::Stdout(d)) => got += d.len(),
            other => panic!("{other:?}"),
        }
    }
    p.control().signal(9).await.unwrap();
    let out = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match p.next_event().await.unwrap() {
                Some(ProcessEvent::Exited(s)) => break s,
                Some(_) => {}
                None => panic!("no exit"),
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(out, ExitStatus::Signal(9));
    // The agent still answers after all that.
    agent.ping().await.unwrap();
    vm.shutdown(Duration::from_secs(20)).await.unwrap();
}

/// More stdin than the guest has memory, into a process that does not read it: the agent
/// holds one window, the host's writer waits, and the guest stays alive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_stdin_does_not_exhaust_guest_memory() {
    let Some(img) = prerequisites() else { return };
    let _lock = vm_lock().await;
    let backend = QemuBackend::new();
    let mut config = img.config();
    config.memory_mib = 128;
    let mut vm = backend.create_qemu(config).await.unwrap();
    vm.start().await.unwrap();
    vm.wait_ready(READY_TIMEOUT).await.unwrap();
    let agent = vm.agent().unwrap();
    let mut spec = ExecSpec::new(["sh", "-c", "sleep 6; head -c 1000000 | wc -c"]);
    spec.stdin = true;
    let p = agent.exec(spec).await.unwrap();
    let ctl = p.control().clone();
    let writer = tokio::spawn(async move {
        let chunk = vec![b'z'; 1 << 20];
        let mut sent = 0usize;
        // 300 MB, far more than the guest's 128 MiB.
        while sent < 300 << 20 {
            if ctl.write_stdin(&chunk).await.is_err() {
                break;
            }
            sent += chunk.len();
        }
        sent
    });
    let out = tokio::time::timeout(Duration::from_secs(60), p.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(out.status, ExitStatus::Code(0));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1000000");
    // The writer got an error (the process ended) long before 300 MB.
    let sent = writer.await.unwrap();
    assert!(sent < 300 << 20, "{sent}");
    agent.ping().await.unwrap();
    vm.shutdown(Duration::from_secs(20)).await.unwrap();
}

/// A small ext4 image holding a static busybox and a marker file, or `None` (printed SKIPPED)
/// when the host lacks `mkfs.ext4` or a static busybox.
fn make_rootfs(dir: &std::path::Path) -> Option<std::path::PathBuf> {
    // `VMCP_TEST_BUSYBOX`: a static busybox for the guest architecture (needed when it is not
    // the host's, e.g. VMCP_TEST_ARCH=aarch64 on x86_64).
    let busybox: std::path::PathBuf = match std::env::var_os("VMCP_TEST_BUSYBOX") {
        Some(p) => p.into(),
        None if common::test_arch() != vmcp_vm::Arch::host() => return None,
        None => ["/bin/busybox", "/usr/bin/busybox"]
            .into_iter()
            .map(std::path::PathBuf::from)
            .find(|p| p.is_file())?,
    };
    let tree = dir.join("tree");
    std::fs::create_dir_all(tree.join("bin")).unwrap();
    for d in ["tmp", "dev", "proc", "sys", "run"] {
        std::fs::create_dir_all(tree.join(d)).unwrap();
    }
    std::fs::copy(&busybox, tree.join("bin/busybox")).unwrap();
    for applet in ["sh", "cat", "echo", "touch", "sync"] {
        symlink("busybox", tree.join("bin").join(applet)).unwrap();
    }
    std::fs::write(tree.join("marker"), b"from the rootfs\n").unwrap();
    let img = dir.join("rootfs.ext4");
    let ok = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&tree)
        .arg(&img)
        .arg("16M")
        .env("PATH", "/usr/sbin:/sbin:/usr/bin:/bin")
        .status()
        .is_ok_and(|s| s.success());
    ok.then_some(img)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rootfs_read_only_and_read_write() {
    let Some(img) = prerequisites() else { return };
    let _lock = vm_lock().await;
    let dir = tempfile::tempdir().unwrap();
    let Some(disk) = make_rootfs(dir.path()) else {
        vmcp_test_support::skipped!(
            "SKIPPED: needs mkfs.ext4 and a static busybox for the guest (VMCP_TEST_BUSYBOX)"
        );
        return;
    };
    let run = |vm: &QemuVm, cmd: &'static str| {
        let agent = vm.agent().unwrap();
        async move {
            agent
                .exec(ExecSpec::new(["sh", "-c", cmd]))
                .await
                .unwrap()
                .wait_with_output()
                .await
                .unwrap()
        }
    };
    let boot_with = |read_only: bool| {
        let mut c = img.config();
        c.rootfs = Some(vmcp_vm::DiskConfig {
            path: disk.clone(),
            read_only,
        });
        c
    };
    // Read-only: the marker is there, writes fail.
    let backend = QemuBackend::new();
    let mut vm = backend.create_qemu(boot_with(true)).await.unwrap();
    vm.start().await.unwrap();
    vm.wait_ready(READY_TIMEOUT).await.unwrap();
    let out = run(&vm, "cat /marker; echo x > /new 2>/dev/null && echo wrote").await;
    assert_eq!(String::from_utf8_lossy(&out.stdout), "from the rootfs\n");
    vm.shutdown(Duration::from_secs(20)).await.unwrap();
    drop(vm);

    // Read-write: a write survives a graceful shutdown and the next boot.
    let mut vm = backend.create_qemu(boot_with(false)).await.unwrap();
    vm.start().await.unwrap();
    vm.wait_ready(READY_TIMEOUT).await.unwrap();
    let out = run(&vm, "echo persisted > /new && echo ok").await;
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ok\n", "{out:?}");
    assert_eq!(
        vm.shutdown(Duration::from_secs(20)).await.unwrap(),
        ShutdownOutcome::Graceful
    );
    drop(vm);
    // Booted read-only: the agent remounted the rootfs read-only before powering off, so the
    // filesystem is clean and needs no journal replay (which a read-only device cannot do).
    let mut vm = backend.create_qemu(boot_with(true)).await.unwrap();
    vm.start().await.unwrap();
    vm.wait_ready(READY_TIMEOUT).await.unwrap();
    let out = run(&vm, "cat /new").await;
    assert_eq!(String::from_utf8_lossy(&out.stdout), "persisted\n");
    vm.shutdown(Duration::from_secs(20)).await.unwrap();
}
