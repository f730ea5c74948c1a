//! `vmcp mcp wrap` with a real VM (TCG here): a stdio MCP server written in sh runs in the
//! guest; our client lists and calls its tool through the relay; closing the session leaves
//! nothing behind. Without QEMU or a built image it prints `SKIPPED: <reason>`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

use vmcp_mcp::stdio::{StderrMode, StdioConfig, StdioTransport};
use vmcp_mcp::{Client, ClientConfig, Lifecycle};

use vmcp_test_support::{http_server, vm};

const VMCP: &str = env!("CARGO_BIN_EXE_vmcp");
const SERVER: &str = include_str!("data/sh_mcp_server.sh");

#[test]
fn a_stdio_server_in_the_guest_is_listed_and_called_through_wrap() {
    if !vm::ready(VMCP) {
        return;
    }
    let runtime = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let cfg = StdioConfig::new(VMCP, ["mcp", "wrap", "--", "sh", "-c", SERVER])
            .with_env("XDG_RUNTIME_DIR", runtime.path())
            .with_stderr(StderrMode::Null);
        let t = StdioTransport::spawn(&cfg).unwrap();
        let c = Client::connect(
            t,
            ClientConfig::default().with_lifecycle(Lifecycle::Initialize),
        )
        .await
        .unwrap();
        assert_eq!(
            c.server_info().server_info.as_ref().unwrap().name,
            "sh-server"
        );
        let tools = c.list_tools().await.unwrap();
        assert_eq!(tools[0].name, "uname");
        let r = c.call_tool("uname", None).await.unwrap();
        let text = r.content[0].as_text().unwrap().to_owned();
        assert!(
            text.starts_with(|ch: char| ch.is_ascii_digit()) && text.contains("amd64")
                || text.contains("arm64"),
            "{text}"
        );
        c.ping().await.unwrap();
        // Closing stdin ends the server; wrap powers the VM off and exits.
        c.close().await;
    });
    let left: Vec<_> = std::fs::read_dir(runtime.path()).unwrap().collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn a_missing_server_program_is_a_clear_error() {
    if !vm::ready(VMCP) {
        return;
    }
    let runtime = tempfile::tempdir().unwrap();
    let out = Command::new(VMCP)
        .args(["mcp", "wrap", "--", "/no/such/server"])
        .env("XDG_RUNTIME_DIR", runtime.path())
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(127));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot start the MCP server /no/such/server in the guest"),
        "{err}"
    );
    assert!(std::fs::read_dir(runtime.path()).unwrap().next().is_none());
}

#[test]
fn wrap_takes_the_network_flags_of_run() {
    if !vm::ready(VMCP) {
        return;
    }
    let (allowed, allowed_hits) = http_server("allowed-body");
    let (other, other_hits) = http_server("other-body");
    let runtime = tempfile::tempdir().unwrap();
    // The "server" just prints what it can reach (the relay passes its stdout through). The
    // guest's NO_PROXY excludes 127.0.0.1 (the guest itself); clearing it sends these
    // requests for the host's 127.0.0.1 through the egress proxy.
    let script = format!(
        "export NO_PROXY= no_proxy=
         echo \"A:$(wget -q -O - http://127.0.0.1:{allowed}/)\"
         wget -q -O - http://127.0.0.1:{other}/ >/dev/null 2>&1; echo \"B:$?\""
    );
    let out = Command::new(VMCP)
        .args([
            "mcp",
            "wrap",
            "--net",
            &format!("allow=127.0.0.1:{allowed}"),
        ])
        .args(["--", "sh", "-c", &script])
        .env("XDG_RUNTIME_DIR", runtime.path())
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stdout.contains("A:allowed-body"), "{stdout}\n{stderr}");
    assert!(
        stdout.lines().any(|l| l.starts_with("B:") && l != "B:0"),
        "{stdout}"
    );
    assert!(
        stderr.contains(&format!("no rule allows 127.0.0.1:{other}")),
        "{stderr}"
    );
    assert_eq!(allowed_hits.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(other_hits.load(std::sync::atomic::Ordering::SeqCst), 0);
    // A bad value is refused before anything boots.
    let out = Command::new(VMCP)
        .args(["mcp", "wrap", "--publish", "0:80", "--", "true"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad --publish \"0:80\""), "{err}");
    assert!(std::fs::read_dir(runtime.path()).unwrap().next().is_none());
}

/// A `:rw` share's copy-back goes through the approval policy: under `ask` with nobody to
/// ask (no `--approval-ui`; wrap's stdin carries MCP, not a person's answer) nothing reaches
/// the host directory; without a policy the change comes back as with `vmcp run`.
#[test]
fn wrap_share_changes_wait_for_approval() {
    if !vm::ready_with_tools(VMCP, &["mkfs.ext4"]) {
        return;
    }
    let runtime = tempfile::tempdir().unwrap();
    let host = tempfile::tempdir().unwrap();
    let policy = runtime.path().join("policy.toml");
    std::fs::write(&policy, "default = \"ask\"\n").unwrap();
    let audit = runtime.path().join("audit.jsonl");
    let wrap = |gated: bool| {
        let mut c = Command::new(VMCP);
        c.args(["mcp", "wrap", "--share"])
            .arg(format!("{}:/mnt/work:rw", host.path().display()));
        if gated {
            c.arg("--policy")
                .arg(&policy)
                .arg("--audit-log")
                .arg(&audit);
        }
        c.args([
            "--",
            "sh",
            "-c",
            "echo new > /mnt/work/made-in-guest; cat >/dev/null",
        ])
        .env("XDG_RUNTIME_DIR", runtime.path())
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap()
    };
    let out = wrap(true);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !host.path().join("made-in-guest").exists(),
        "a gated change reached the host\n{stderr}"
    );
    assert!(stderr.contains("nobody to ask"), "{stderr}");
    let log = std::fs::read_to_string(&audit).unwrap();
    assert!(
        log.contains("made-in-guest") || log.contains("denied"),
        "{log}"
    );
    let out = wrap(false);
    assert_eq!(
        std::fs::read_to_string(host.path().join("made-in-guest")).unwrap_or_default(),
        "new\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
