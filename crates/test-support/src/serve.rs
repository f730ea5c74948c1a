//! `vmcp mcp serve --http` started as a user starts it, for the CLI's HTTP tests.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// Starts `vmcp mcp serve --http 127.0.0.1:0 EXTRA...` (the binary at `vmcp`) with its own
/// `XDG_RUNTIME_DIR`; returns the child and the endpoint URL it printed. Its later stderr is
/// drained on a thread so the server never blocks on a full pipe.
#[allow(clippy::expect_used, clippy::panic)] // a test helper: failing loudly is the point
pub fn mcp_serve_http(vmcp: &str, runtime: &Path, extra: &[String]) -> (Child, String) {
    let mut child = Command::new(vmcp)
        .args(["mcp", "serve", "--http", "127.0.0.1:0"])
        .args(extra)
        .env("XDG_RUNTIME_DIR", runtime)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start vmcp mcp serve");
    let mut err = BufReader::new(child.stderr.take().expect("stderr is piped"));
    let mut line = String::new();
    let url = loop {
        line.clear();
        let n = err.read_line(&mut line).expect("read vmcp's stderr");
        assert!(n > 0, "vmcp mcp serve exited early");
        if let Some(u) = line.trim().strip_prefix("vmcp: MCP server listening on ") {
            break u.to_owned();
        }
    };
    std::thread::spawn(move || for _ in err.lines() {});
    (child, url)
}
