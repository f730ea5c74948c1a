//! Stdio transport against a tiny Python MCP server (tests/common/stdio_server.py): both
//! lifecycles, protocol detection (including a server that ignores unknown requests), server
//! requests, a banner line on stdout, and the child (and its children) dying with the client.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::time::Duration;

use serde_json::json;
use vmcp_mcp::stdio::{StderrMode, StdioConfig, StdioTransport};
use vmcp_mcp::{Client, ClientConfig, ClientError, Era, Lifecycle};

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/common/stdio_server.py")
}

fn python() -> Option<&'static str> {
    ["python3", "python"].into_iter().find(|p| {
        std::process::Command::new(p)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

async fn connect(mode: &str, config: ClientConfig) -> Option<Client<StdioTransport>> {
    let Some(py) = python() else {
        vmcp_test_support::skipped!("SKIPPED: no python3 to run the stdio test server");
        return None;
    };
    let cfg =
        StdioConfig::new(py, [script().into_os_string(), mode.into()]).with_stderr(StderrMode::Log);
    let t = StdioTransport::spawn(&cfg).unwrap();
    Some(Client::connect(t, config).await.unwrap())
}

#[tokio::test]
async fn legacy_server_detected_and_used() {
    let Some(c) = connect("legacy", ClientConfig::default()).await else {
        return;
    };
    assert_eq!(c.era(), Era::Legacy);
    assert_eq!(c.server_info().protocol_version, "2025-06-18");
    assert_eq!(c.list_tools().await.unwrap()[0].name, "echo");
    let r = c
        .call_tool("echo", Some(&json!({"message":"hello"})))
        .await
        .unwrap();
    assert_eq!(r.content[0].as_text(), Some("hello"));
    c.close().await;
}

#[tokio::test]
async fn modern_server_detected_and_used() {
    let Some(c) = connect("modern", ClientConfig::default()).await else {
        return;
    };
    assert_eq!(c.era(), Era::Modern);
    let r = c
        .call_tool("echo", Some(&json!({"message":"m"})))
        .await
        .unwrap();
    assert_eq!(r.content[0].as_text(), Some("m"));
    c.close().await;
}

#[tokio::test]
async fn silent_legacy_server_falls_back_after_the_probe_timeout() {
    let mut cfg = ClientConfig::default();
    cfg.probe_timeout = Duration::from_millis(300);
    let Some(c) = connect("silent", cfg).await else {
        return;
    };
    assert_eq!(c.era(), Era::Legacy);
    assert!(c
        .ping()
        .await
        .is_err_and(|e| matches!(e, ClientError::Rpc { .. })));
}

#[tokio::test]
async fn slow_modern_server_is_discovered_again_after_refusing_initialize() {
    // It answers discover only after the probe gave up, then refuses initialize with -32022
    // (the Python SDK's behaviour once a connection serves 2026-07-28).
    let mut cfg = ClientConfig::default();
    cfg.probe_timeout = Duration::from_millis(300);
    let Some(c) = connect("slow-modern", cfg).await else {
        return;
    };
    assert_eq!(c.era(), Era::Modern);
    let r = c
        .call_tool("echo", Some(&json!({"message":"late"})))
        .await
        .unwrap();
    assert_eq!(r.content[0].as_text(), Some("late"));
}

#[tokio::test]
async fn server_ping_is_answered_and_errors_are_reported() {
    let Some(c) = connect(
        "legacy",
        ClientConfig::default().with_lifecycle(Lifecycle::Initialize),
    )
    .await
    else {
        return;
    };
    let r = c.call_tool("ping-me", None).await.unwrap();
    assert_eq!(r.content[0].as_text(), Some("pong={}"));
    let err = c.call_tool("nope", None).await.unwrap_err();
    assert!(
        matches!(err, ClientError::Rpc { ref error, .. } if error.code == -32602),
        "{err}"
    );
}

#[tokio::test]
async fn server_exit_fails_pending_calls() {
    let Some(c) = connect("legacy", ClientConfig::default()).await else {
        return;
    };
    let err = c.call_tool("exit", None).await.unwrap_err();
    assert!(matches!(err, ClientError::Closed { .. }), "{err}");
}

#[tokio::test]
async fn spawn_failure_names_the_program() {
    let err = StdioTransport::spawn(&StdioConfig::new(
        "/nonexistent/mcp-server",
        Vec::<String>::new(),
    ))
    .err()
    .unwrap();
    assert!(err.to_string().contains("/nonexistent/mcp-server"));
}

fn alive(pid: i32) -> bool {
    // /proc/<pid>/stat state Z (zombie) counts as dead.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.split_whitespace().nth(2).is_none_or(|st| st != "Z"))
        .unwrap_or(false)
}

#[tokio::test]
async fn child_and_its_children_die_when_the_client_is_dropped() {
    if !cfg!(target_os = "linux") {
        vmcp_test_support::skipped!("SKIPPED: process-group cleanup is checked on Linux only");
        return;
    }
    let Some(py) = python() else {
        vmcp_test_support::skipped!("SKIPPED: no python3 to run the stdio test server");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("pids");
    let cfg = StdioConfig::new(
        py,
        [
            script().into_os_string(),
            "legacy".into(),
            pidfile.clone().into_os_string(),
        ],
    );
    let t = StdioTransport::spawn(&cfg).unwrap();
    let c = Client::connect(t, ClientConfig::default()).await.unwrap();
    let pids: Vec<i32> = std::fs::read_to_string(&pidfile)
        .unwrap()
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert!(pids.iter().all(|p| alive(*p)));
    drop(c);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while pids.iter().any(|p| alive(*p)) && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        pids.iter().all(|p| !alive(*p)),
        "server and its child are gone"
    );
}

/// Starts the test server (recording its pid and its child's in `pidfile`) from a thread that
/// ends right after: the server must outlive that thread.
fn spawn_from_a_short_lived_thread(
    py: &'static str,
    pidfile: &std::path::Path,
    handle: tokio::runtime::Handle,
) -> StdioTransport {
    let cfg = StdioConfig::new(
        py,
        [
            script().into_os_string(),
            "legacy".into(),
            pidfile.to_path_buf().into_os_string(),
        ],
    );
    std::thread::spawn(move || {
        let _g = handle.enter();
        StdioTransport::spawn(&cfg).unwrap()
    })
    .join()
    .unwrap()
}

async fn read_pids(pidfile: &std::path::Path) -> Vec<i32> {
    for _ in 0..200 {
        if let Ok(text) = std::fs::read_to_string(pidfile) {
            if text.ends_with('\n') {
                return text
                    .split_whitespace()
                    .map(|p| p.parse().unwrap())
                    .collect();
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the server wrote no pid file");
}

#[tokio::test]
async fn server_survives_the_exit_of_the_thread_that_spawned_it() {
    let Some(py) = python() else {
        vmcp_test_support::skipped!("SKIPPED: no python3 to run the stdio test server");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("pids");
    let t = spawn_from_a_short_lived_thread(py, &pidfile, tokio::runtime::Handle::current());
    let pids = read_pids(&pidfile).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        pids.iter().all(|p| alive(*p)),
        "the server died with its spawning thread"
    );
    let c = Client::connect(t, ClientConfig::default()).await.unwrap();
    assert!(!c.list_tools().await.unwrap().is_empty());
    c.close().await;
}

/// Not a test on its own: the "vmcp" that [`server_and_its_children_die_with_vmcp`] kills.
#[test]
#[ignore = "helper process of server_and_its_children_die_with_vmcp"]
fn vmcp_helper() {
    let (Some(pidfile), Some(py)) = (std::env::var_os("VMCP_STDIO_HELPER"), python()) else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let pidfile = PathBuf::from(pidfile);
    let t = spawn_from_a_short_lived_thread(py, &pidfile, rt.handle().clone());
    let c = rt
        .block_on(Client::connect(t, ClientConfig::default()))
        .unwrap();
    rt.block_on(c.list_tools()).unwrap();
    println!("ready");
    std::thread::sleep(Duration::from_secs(1000));
}

#[tokio::test]
async fn server_and_its_children_die_with_vmcp() {
    if !cfg!(target_os = "linux") {
        vmcp_test_support::skipped!("SKIPPED: dying with a killed owner is checked on Linux only");
        return;
    }
    if python().is_none() {
        vmcp_test_support::skipped!("SKIPPED: no python3 to run the stdio test server");
        return;
    }
    for signal in ["KILL", "TERM"] {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pids");
        let mut vmcp = tokio::process::Command::new(std::env::current_exe().unwrap())
            .args(["--ignored", "--exact", "vmcp_helper", "--nocapture"])
            .env("VMCP_STDIO_HELPER", &pidfile)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut out = tokio::io::BufReader::new(vmcp.stdout.take().unwrap());
        let mut line = String::new();
        while !line.contains("ready") {
            line.clear();
            let n = tokio::io::AsyncBufReadExt::read_line(&mut out, &mut line)
                .await
                .unwrap();
            assert!(n > 0, "the helper ended before it was ready");
        }
        let pids = read_pids(&pidfile).await;
        assert!(pids.iter().all(|p| alive(*p)));
        let killed = std::process::Command::new("kill")
            .args([format!("-{signal}"), vmcp.id().unwrap().to_string()])
            .status()
            .unwrap();
        assert!(killed.success());
        vmcp.wait().await.unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while pids.iter().any(|p| alive(*p)) && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            pids.iter().all(|p| !alive(*p)),
            "after SIG{signal} of vmcp, still running: {pids:?}"
        );
    }
}
