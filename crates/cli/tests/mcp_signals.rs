//! `vmcp mcp --stdio` killed or interrupted while its server runs: the server and everything it
//! started (here a shell's background job) must go with vmcp, for SIGTERM and SIGINT (vmcp's
//! handler tears down) and SIGKILL (the owned-process layer's watchdog). Linux only.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const VMCP: &str = env!("CARGO_BIN_EXE_vmcp");

fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s
            .rfind(')')
            .and_then(|i| s[i + 1..].split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

#[test]
fn stdio_server_and_its_background_jobs_die_with_vmcp() {
    if !cfg!(target_os = "linux") {
        vmcp_test_support::skipped!(
            "SKIPPED: process cleanup after a signal is checked on Linux only"
        );
        return;
    }
    for (signal, code) in [("TERM", Some(143)), ("INT", Some(130)), ("KILL", None)] {
        let dir = tempfile::tempdir().unwrap();
        let pids = dir.path().join("pids");
        let p = pids.display();
        // The server never answers: it records its pid and its background job's, then sleeps.
        let script = format!(
            "echo $$ > {p}.tmp; sleep 1000 & echo $! >> {p}.tmp; mv {p}.tmp {p}; exec sleep 1000"
        );
        let vmcp = Command::new(VMCP)
            .args([
                "mcp",
                "list-tools",
                "--timeout",
                "600",
                "--stdio",
                "--",
                "sh",
                "-c",
                &script,
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let until = Instant::now() + Duration::from_secs(20);
        while !pids.exists() {
            assert!(Instant::now() < until, "the server never started");
            std::thread::sleep(Duration::from_millis(20));
        }
        let pids: Vec<u32> = std::fs::read_to_string(&pids)
            .unwrap()
            .split_whitespace()
            .map(|p| p.parse().unwrap())
            .collect();
        assert_eq!(pids.len(), 2);
        assert!(pids.iter().all(|p| alive(*p)));
        // Let vmcp reach its wait for the server's answer (its signal handler is set by then).
        std::thread::sleep(Duration::from_millis(300));
        let killed = Command::new("kill")
            .args([format!("-{signal}"), vmcp.id().to_string()])
            .status()
            .unwrap();
        assert!(killed.success());
        let out = vmcp.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        match code {
            Some(c) => {
                assert_eq!(out.status.code(), Some(c), "SIG{signal}: {stderr}");
                assert!(stderr.contains(&format!("got SIG{signal}")), "{stderr}");
            }
            None => assert_eq!(out.status.code(), None),
        }
        let until = Instant::now() + Duration::from_secs(10);
        while pids.iter().any(|p| alive(*p)) {
            assert!(
                Instant::now() < until,
                "after SIG{signal} of vmcp, still running: {:?}",
                pids.iter().filter(|p| alive(**p)).collect::<Vec<_>>()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
