//! `vmcp mcp wrap` with a real VM (TCG here): a stdio MCP server written in sh runs in the
//! guest; our client lists and calls its tool through the relay; closing the session leaves
//! nothing behind. Without QEMU or a built image it prints `SKIPPED: <reason>`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

use vmcp_mcp::stdio::{StderrMode, StdioConfig, StdioTransport};
use vmcp_mcp::{Client, ClientConfig, Lifecycle};

use vmcp_test_support::vm;

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
