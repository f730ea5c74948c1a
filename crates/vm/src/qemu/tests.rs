//! Lifecycle tests of the QEMU backend against the stand-in for QEMU (`examples/fake_qemu.rs`,
//! the same one the Windows launch tests use); real boots are in `tests/`.

use super::*;
use crate::agent::AgentError;
use crate::{ShutdownOutcome, VmState};
use std::time::Instant;

/// The stand-in, built beside this test binary: `cargo test -p vmcp-vm` builds the crate's
/// examples before it runs tests. A `--lib`-only run has not built it: then these tests are
/// skipped loudly (and fail under `VMCP_REQUIRE_VM=1`); a stale one from an older build makes
/// them fail, never pass.
fn fake_qemu() -> Option<PathBuf> {
    // Coverage runs build tests only: CI builds the stand-in separately and names it here.
    if let Some(path) = std::env::var_os("VMCP_FAKE_QEMU").map(PathBuf::from) {
        if path.is_file() {
            return Some(path);
        }
    }
    let exe = std::env::current_exe().ok()?;
    // target/<profile>/deps/<test binary> -> target/<profile>/examples/fake_qemu
    let path = exe
        .parent()?
        .parent()?
        .join("examples")
        .join(format!("fake_qemu{}", std::env::consts::EXE_SUFFIX));
    if path.is_file() {
        return Some(path);
    }
    let why = format!(
        "the QEMU stand-in {} is not built: run `cargo test -p vmcp-vm` (not only --lib) or `cargo build -p vmcp-vm --example fake_qemu`",
        path.display()
    );
    assert!(
        std::env::var_os("VMCP_REQUIRE_VM").is_none_or(|v| v != "1"),
        "VMCP_REQUIRE_VM=1: {why}"
    );
    vmcp_test_support::skipped!("SKIPPED: {why}");
    None
}

struct Fixture {
    _files: tempfile::TempDir,
    backend: QemuBackend,
    config: VmConfig,
}

fn fixture(mode: &str) -> Option<Fixture> {
    let stand_in = fake_qemu()?;
    let files = tempfile::tempdir().ok()?;
    let k = files.path().join("kernel");
    let i = files.path().join("initrd");
    std::fs::write(&k, b"k").ok()?;
    std::fs::write(&i, b"i").ok()?;
    let mut config = VmConfig::new(k, i);
    config.cmdline_extra = vec![format!("fake={mode}")];
    config.accel = Some(crate::Accel::Tcg);
    let backend = QemuBackend::with_options(QemuOptions {
        qemu_binary: Some(stand_in),
        qmp_timeout: Duration::from_secs(10),
        // The stand-in ignores the sandbox flags; keep the privilege drop off so it can run
        // from a target directory under /root.
        drop_privileges: false,
        ..QemuOptions::default()
    });
    Some(Fixture {
        _files: files,
        backend,
        config,
    })
}

fn alive(pid: u32) -> bool {
    // A zombie still has /proc/<pid>; we only call this after reaping.
    Path::new(&format!("/proc/{pid}")).exists()
}

#[tokio::test]
async fn full_lifecycle_against_the_stand_in() {
    let Some(f) = fixture("agent") else { return };
    let mut vm = f.backend.create_qemu(f.config).await.unwrap();
    assert_eq!(vm.state(), VmState::Created);
    assert!(vm.agent().is_err());
    let dir = vm.runtime_dir().to_path_buf();
    assert!(dir.join(vmcp_host_process::OWNER_FILE).is_file());
    vm.start().await.unwrap();
    assert_eq!(vm.state(), VmState::Starting);
    let pid = vm.pid().unwrap();
    assert!(vm.rss_kib().is_some());
    assert!(matches!(
        vm.start().await.unwrap_err(),
        VmError::InvalidState { op: "start", .. }
    ));
    let info = vm.wait_ready(Duration::from_secs(10)).await.unwrap();
    assert_eq!(info.agent_version, "fake-qemu");
    assert_eq!(info.guest_boot, Duration::from_millis(1500));
    assert_eq!(vm.state(), VmState::Running);
    vm.agent().unwrap().ping().await.unwrap();
    assert!(vm.capabilities().pause);
    assert!(vm.resume().await.is_err(), "resume of a running VM");
    vm.pause().await.unwrap();
    assert_eq!(vm.state(), VmState::Paused);
    assert!(vm.pause().await.is_err(), "pause of a paused VM");
    vm.resume().await.unwrap();
    assert_eq!(vm.state(), VmState::Running);
    // Waiting again is a state error, not a hang.
    assert!(vm.wait_ready(Duration::from_secs(1)).await.is_err());
    let argv: Vec<String> = vm
        .command_line()
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    // The token reaches the guest through fw_cfg, never through QEMU's command line (which
    // every local user can read in /proc).
    assert!(!argv.iter().any(|a| a.contains("vmcp.token=")), "{argv:?}");
    assert!(argv.iter().any(|a| a.contains("vmcp.token_fw_cfg=1")));
    assert!(argv
        .iter()
        .any(|a| a.starts_with("name=opt/vmcp/token,file=/dev/fd/")));
    assert_eq!(
        vm.shutdown(Duration::from_secs(10)).await.unwrap(),
        ShutdownOutcome::Graceful
    );
    assert_eq!(vm.state(), VmState::Stopped);
    assert!(!alive(pid));
    assert_eq!(
        vm.shutdown(Duration::from_secs(1)).await.unwrap(),
        ShutdownOutcome::AlreadyStopped
    );
    // The console went to the log file and the tail.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let log = std::fs::read_to_string(vm.console_log()).unwrap();
    assert!(log.contains("fake console: booting"), "{log}");
    drop(vm);
    assert!(!dir.exists(), "runtime dir must be removed on drop");
}

#[tokio::test]
async fn ignored_poweroff_ends_in_kill() {
    let Some(f) = fixture("stubborn") else { return };
    let mut vm = f.backend.create_qemu(f.config).await.unwrap();
    vm.start().await.unwrap();
    vm.wait_ready(Duration::from_secs(10)).await.unwrap();
    let pid = vm.pid().unwrap();
    let t = Instant::now();
    assert_eq!(
        vm.shutdown(Duration::from_millis(500)).await.unwrap(),
        ShutdownOutcome::Killed
    );
    assert!(t.elapsed() < Duration::from_secs(5));
    assert!(!alive(pid));
    assert_eq!(vm.state(), VmState::Stopped);
}

#[tokio::test]
async fn early_exit_reports_qemu_stderr() {
    let Some(f) = fixture("exit") else { return };
    let mut vm = f.backend.create_qemu(f.config).await.unwrap();
    let e = vm.start().await.unwrap_err();
    let s = e.to_string();
    assert!(matches!(e, VmError::EarlyExit { .. }), "{s}");
    assert!(s.contains("fake failure for the test"), "{s}");
    assert_eq!(vm.state(), VmState::Stopped);
}

#[tokio::test]
async fn ready_timeout_quotes_the_console_and_drop_kills() {
    let Some(f) = fixture("hang") else { return };
    let mut vm = f.backend.create_qemu(f.config).await.unwrap();
    vm.start().await.unwrap();
    let pid = vm.pid().unwrap();
    let e = vm.wait_ready(Duration::from_millis(700)).await.unwrap_err();
    let s = e.to_string();
    assert!(matches!(e, VmError::ReadyTimeout { .. }), "{s}");
    assert!(s.contains("fake console: mode hang"), "{s}");
    assert!(vm.console_tail().contains("booting"));
    let dir = vm.runtime_dir().to_path_buf();
    drop(vm);
    assert!(!alive(pid), "QEMU must not outlive a dropped VM");
    assert!(!dir.exists());
}

#[tokio::test]
async fn kill_stops_at_once() {
    let Some(f) = fixture("hang") else { return };
    let mut vm = f.backend.create_qemu(f.config).await.unwrap();
    vm.start().await.unwrap();
    let pid = vm.pid().unwrap();
    vm.kill().await.unwrap();
    assert!(!alive(pid));
    assert_eq!(vm.state(), VmState::Stopped);
    assert!(vm.pid().is_none());
    vm.kill().await.unwrap();
}

#[tokio::test]
async fn shutdown_before_ready_kills_without_waiting() {
    let Some(f) = fixture("hang") else { return };
    let mut vm = f.backend.create_qemu(f.config).await.unwrap();
    vm.start().await.unwrap();
    let pid = vm.pid().unwrap();
    let t = Instant::now();
    assert_eq!(
        vm.shutdown(Duration::from_secs(30)).await.unwrap(),
        ShutdownOutcome::Killed
    );
    assert!(t.elapsed() < Duration::from_secs(5));
    assert!(!alive(pid));
}

#[tokio::test]
async fn wrong_token_is_refused() {
    let Some(f) = fixture("badtoken") else { return };
    let mut vm = f.backend.create_qemu(f.config).await.unwrap();
    vm.start().await.unwrap();
    let e = vm.wait_ready(Duration::from_secs(10)).await.unwrap_err();
    assert!(matches!(e, VmError::Agent(AgentError::BadToken)), "{e}");
}

#[tokio::test]
async fn qemu_that_never_answers_qmp_is_killed() {
    let Some(mut f) = fixture("agent") else {
        return;
    };
    f.backend.options.qemu_binary = Some("/bin/sleep".into());
    f.backend.options.qmp_timeout = Duration::from_millis(300);
    // `sleep` ignores all those arguments... and fails on them: either way start must fail
    // cleanly and leave no process.
    let mut vm = f.backend.create_qemu(f.config).await.unwrap();
    let e = vm.start().await.unwrap_err();
    assert!(
        matches!(e, VmError::EarlyExit { .. } | VmError::Qmp { .. }),
        "{e}"
    );
    assert!(vm.pid().is_none());
}

#[tokio::test]
async fn bad_inputs_fail_before_anything_runs() {
    let Some(f) = fixture("agent") else { return };
    let mut c = f.config.clone();
    c.kernel = "/nonexistent/kernel".into();
    let e = f.backend.create_qemu(c).await.unwrap_err();
    let chain = vmcp_test_support::error_chain(&e);
    assert!(
        chain.contains("kernel") && chain.contains("/nonexistent/kernel"),
        "{chain}"
    );
    let mut c = f.config.clone();
    c.accel = Some(crate::Accel::Hvf);
    let e = f.backend.create_qemu(c).await.unwrap_err();
    let chain = vmcp_test_support::error_chain(&e);
    assert!(chain.contains("hvf") && chain.contains("macOS"), "{chain}");
    let b = QemuBackend::with_options(QemuOptions {
        qemu_binary: None,
        ..QemuOptions::default()
    });
    assert_eq!(b.name(), "qemu");
}

#[tokio::test]
async fn stale_dirs_of_dead_owners_are_swept_on_create() {
    let Some(f) = fixture("agent") else { return };
    let vm = f.backend.create_qemu(f.config.clone()).await.unwrap();
    let base = vm.runtime_dir().parent().unwrap().to_path_buf();
    drop(vm);
    let stale_dir = base.join("vmcp-stale-test-dir");
    std::fs::create_dir_all(&stale_dir).unwrap();
    // pid 1's start time is never u64::MAX: an owner that is gone.
    std::fs::write(
        stale_dir.join(vmcp_host_process::OWNER_FILE),
        vmcp_host_process::owner_line(1, u64::MAX),
    )
    .unwrap();
    let vm = f.backend.create_qemu(f.config).await.unwrap();
    assert!(!stale_dir.exists());
    drop(vm);
}

#[tokio::test]
async fn probe_reports_something() {
    match QemuBackend::new().probe().await {
        Probe::Usable { detail } => assert!(detail.contains("accel"), "{detail}"),
        Probe::Unusable { reason } => assert!(!reason.is_empty()),
    }
    let facts = QemuBackend::new().host_facts();
    assert_eq!(facts.os, HostOs::Linux);
    let c = QemuBackend::new()
        .choose_accel(Arch::host(), Some(crate::Accel::Tcg))
        .unwrap();
    assert_eq!(c.accel, crate::Accel::Tcg);
}

#[test]
fn log_refuses_symlinks_and_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("target");
    std::fs::write(&target, b"precious\n").unwrap();
    let link = dir.path().join("console.log");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let e = console::LogFile::open(&link).unwrap_err();
    assert!(e.to_string().contains("symbolic link"), "{e}");
    let fresh = dir.path().join("fresh.log");
    console::LogFile::open(&fresh).unwrap();
    let mode = std::fs::metadata(&fresh).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    assert!(console::LogFile::open(Path::new("/nonexistent/dir/console.log")).is_err());
}

fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::symlink_metadata(p).map_or(0, |m| m.permissions().mode() & 0o7777)
}

/// Runs `argv` as the unprivileged uid/gid 65534 (another local user); true if it succeeded.
fn as_other_user(argv: &[&std::ffi::OsStr]) -> bool {
    use std::os::unix::process::CommandExt;
    std::process::Command::new(argv[0])
        .args(&argv[1..])
        .uid(65534)
        .gid(65534)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[tokio::test]
async fn runtime_dir_and_console_log_are_private_to_vmcp_user() {
    let Some(f) = fixture("agent") else { return };
    let mut vm = f.backend.create_qemu(f.config).await.unwrap();
    vm.start().await.unwrap();
    let dir = vm.runtime_dir().to_path_buf();
    let log = dir.join("console.log");
    assert_eq!(mode(&dir), 0o700, "{}", dir.display());
    assert_eq!(mode(&log), 0o600);
    assert_eq!(mode(&dir.join(vmcp_host_process::OWNER_FILE)), 0o600);
    if !vmcp_host_process::is_root() {
        vmcp_test_support::skipped!("SKIPPED: reading as another local user needs root");
        return;
    }
    assert!(
        !as_other_user(&["cat".as_ref(), log.as_os_str()]),
        "another user read the console log"
    );
    assert!(
        !as_other_user(&["ls".as_ref(), dir.as_os_str()]),
        "another user listed the runtime dir"
    );
    // The check itself works: the same user reads a world-readable file.
    assert!(as_other_user(&["cat".as_ref(), "/etc/hostname".as_ref()]));
}

#[tokio::test]
async fn console_log_symlink_planted_by_another_user_is_refused() {
    if !vmcp_host_process::is_root() {
        vmcp_test_support::skipped!("SKIPPED: planting a file as another local user needs root");
        return;
    }
    let Some(mut f) = fixture("agent") else {
        return;
    };
    // A directory of another user (not sticky, so the kernel's protected_symlinks does not
    // step in), where that user plants console.log -> a file of vmcp's user.
    let base = tempfile::tempdir_in("/tmp").unwrap();
    let theirs = base.path().join("theirs");
    std::fs::create_dir(&theirs).unwrap();
    std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
    std::fs::set_permissions(
        base.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let target = base.path().join("precious");
    std::fs::write(&target, b"precious\n").unwrap();
    let link = theirs.join("console.log");
    assert!(as_other_user(&[
        "ln".as_ref(),
        "-s".as_ref(),
        target.as_os_str(),
        link.as_os_str()
    ]));
    f.config.console_log = Some(link.clone());
    let mut vm = f.backend.create_qemu(f.config.clone()).await.unwrap();
    let e = vm.start().await.unwrap_err();
    let chain = vmcp_test_support::error_chain(&e);
    assert!(chain.contains("symbolic link"), "{chain}");
    assert_ne!(vm.state(), VmState::Running);
    assert_eq!(std::fs::read(&target).unwrap(), b"precious\n");
    // A regular file planted there by that user is refused too (vmcp would append to it).
    std::fs::remove_file(&link).unwrap();
    assert!(as_other_user(&["touch".as_ref(), link.as_os_str()]));
    drop(vm);
    let mut vm = f.backend.create_qemu(f.config).await.unwrap();
    let chain = vmcp_test_support::error_chain(&vm.start().await.unwrap_err());
    assert!(chain.contains("belongs to uid 65534"), "{chain}");
}

/// Whether something accepts connections on `addr`, waiting up to 2 s for it to go away.
async fn still_listening(addr: std::net::SocketAddr) -> bool {
    for _ in 0..40 {
        if tokio::net::TcpStream::connect(addr).await.is_err() {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    true
}

#[tokio::test]
async fn the_egress_proxy_lives_and_dies_with_qemu() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    for (mode, how) in [("agent", "shutdown"), ("hang", "kill")] {
        let Some(mut f) = fixture(mode) else { return };
        f.config.net.mode = crate::NetMode::Allow("api.example.com:443".parse().unwrap());
        f.config.net.card = true;
        let mut vm = f.backend.create_qemu(f.config).await.unwrap();
        assert!(vm.egress_proxy_addr().is_none(), "a proxy before start");
        vm.start().await.unwrap();
        let addr = vm.egress_proxy_addr().expect("no proxy while QEMU runs");
        let line = vm
            .command_line()
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ");
        assert!(
            line.contains("restrict=on,guestfwd=tcp:10.0.2.100:3128-cmd:"),
            "{line}"
        );
        assert!(
            line.contains(&format!("'__egress-pipe' '{addr}'")),
            "{line}"
        );
        assert!(line.contains("vmcp.proxy=10.0.2.100:3128"), "{line}");
        // It enforces the VM's policy.
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"CONNECT 169.254.169.254:80 HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).await.unwrap();
        assert!(resp.starts_with("HTTP/1.1 403"), "{resp}");
        assert!(resp.contains("no rule allows 169.254.169.254:80"), "{resp}");
        match how {
            "shutdown" => {
                vm.wait_ready(Duration::from_secs(10)).await.unwrap();
                vm.shutdown(Duration::from_secs(10)).await.unwrap();
            }
            _ => vm.kill().await.unwrap(),
        }
        assert!(
            vm.egress_proxy_addr().is_none(),
            "{how}: proxy still recorded"
        );
        assert!(
            !still_listening(addr).await,
            "{how}: the proxy outlived QEMU"
        );
    }
}

#[test]
fn an_allow_list_goes_over_the_agent_channel_on_windows_only() {
    let allow = || crate::net::NetConfig {
        mode: crate::NetMode::Allow("api.example.com:443".parse().unwrap()),
        card: true,
        ..crate::net::NetConfig::default()
    };
    let mut n = allow();
    super::adapt_net_to_host(&mut n, HostOs::Linux);
    assert!(n.card && n.has_device());
    let mut n = allow();
    super::adapt_net_to_host(&mut n, HostOs::Windows);
    assert!(!n.card && !n.has_device());
    assert_eq!(
        n.kernel_proxy(),
        None,
        "over the channel the proxy is set per exec"
    );
    let mut nat = crate::net::NetConfig {
        mode: crate::NetMode::Nat,
        ..crate::net::NetConfig::default()
    };
    super::adapt_net_to_host(&mut nat, HostOs::Windows);
    assert!(nat.has_device());
}

/// Over the agent channel QEMU gets no network card and no proxy of its own (the lifecycle
/// runs the proxy on the agent's listener); the guest is pointed at its own loopback.
#[tokio::test]
async fn an_allow_list_over_the_channel_gives_qemu_no_card() {
    let Some(mut f) = fixture("hang") else { return };
    f.config.net.mode = crate::NetMode::Allow("api.example.com:443".parse().unwrap());
    let mut vm = f.backend.create_qemu(f.config).await.unwrap();
    vm.start().await.unwrap();
    assert!(
        vm.egress_proxy_addr().is_none(),
        "a card proxy in channel mode"
    );
    let line = vm
        .command_line()
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ");
    assert!(!line.contains("-netdev"), "{line}");
    assert!(
        line.contains("spawn=deny") && !line.contains("spawn=allow"),
        "QEMU may spawn without a forward helper: {line}"
    );
    assert!(!line.contains("vmcp.proxy="), "{line}");
    assert!(!line.contains("vmcp.net="), "{line}");
    vm.kill().await.unwrap();
}
