//! `vmcp image rootfs --packages python3 --pip mcp==2.3.0 --npm semver@7.6.3`, then in that
//! image: `python3 -c 'print(1+1)'`, the npm package's command, and `vmcp mcp wrap` running
//! the Python SDK's stdio MCP server in a VM, listed and called from the host over stdio and
//! over Streamable HTTP. One test, because the build takes minutes (mmdebstrap downloads and
//! unpacks the packages, pip and npm fetch theirs; about 5 minutes on the loaded host) and
//! every step reuses the image: it stays in the cache as `vmcp-test-mcp`, so later runs are
//! cache hits. Skipped loudly without QEMU, a guest image, mmdebstrap, e2fsprogs, pip or npm;
//! `VMCP_REQUIRE_VM=1` turns the skips into failures.
#![cfg(unix)]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

use vmcp_test_support::vm;

const VMCP: &str = env!("CARGO_BIN_EXE_vmcp");

fn ready() -> bool {
    // pip3 and npm fetch the --pip/--npm packages (scripts/install-deps installs them).
    vm::ready_with_tools(VMCP, &["mmdebstrap", "mkfs.ext4", "pip3", "npm"])
}

/// The image's packages: Debian's python3, the Python MCP SDK, a small npm package with a
/// command. Pinned like scripts/install.d/40-mcp-interop.sh pins the host's copy.
const BUILD: [&str; 8] = [
    "--packages",
    "python3",
    "--pip",
    "mcp==2.3.0",
    "--npm",
    "semver@7.6.3",
    "--name",
    "vmcp-test-mcp",
];

/// A stdio MCP server on the Python SDK: `add`, and `kernel` (where it runs).
const PY_SERVER: &str = r#"
import platform
from mcp.server.mcpserver import MCPServer

server = MCPServer("vmcp-wrap-py")

@server.tool()
def add(a: int, b: int) -> int:
    """Adds two integers."""
    return a + b

@server.tool()
def kernel() -> str:
    """The kernel release this server runs on."""
    return platform.release()

server.run()
"#;

#[test]
fn python_and_npm_packages_and_a_wrapped_python_mcp_server() {
    if !ready() {
        return;
    }
    let build = Command::new(VMCP)
        .args(["image", "rootfs"])
        .args(BUILD)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&build.stderr);
    assert!(build.status.success(), "{err}");
    let line = String::from_utf8_lossy(&build.stdout).into_owned();
    let mut fields = line.split('\t');
    let names = fields.next().unwrap_or_default();
    assert!(names.split(',').any(|n| n == "vmcp-test-mcp"), "{line}");
    assert!(
        fields.next().unwrap_or_default().starts_with("deb-"),
        "{line}"
    );
    // The same inputs again: a cache hit.
    let again = Command::new(VMCP)
        .args(["image", "rootfs"])
        .args(&BUILD[..6])
        .output()
        .unwrap();
    let again_err = String::from_utf8_lossy(&again.stderr);
    assert!(again_err.contains("already built"), "{again_err}");
    assert_eq!(
        String::from_utf8_lossy(&again.stdout).split('\t').nth(1),
        line.split('\t').nth(1)
    );
    // An unpinned language package is refused before anything is built.
    let unpinned = Command::new(VMCP)
        .args(["image", "rootfs", "--packages", "python3", "--pip", "mcp"])
        .output()
        .unwrap();
    assert!(!unpinned.status.success());
    let e = String::from_utf8_lossy(&unpinned.stderr);
    assert!(
        e.contains("not pinned") && e.contains("NAME==VERSION"),
        "{e}"
    );
    let run = Command::new(VMCP)
        .args([
            "run",
            "--timeout",
            "300",
            "--image",
            "vmcp-test-mcp",
            "--",
            "sh",
            "-c",
            "python3 -c 'print(1+1)' && semver -i minor 1.2.3",
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&run.stdout),
        "2\n1.3.0\n",
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert_eq!(run.status.code(), Some(0));
    wrap_over_stdio();
    wrap_over_http();
}

fn host_kernel() -> String {
    let out = Command::new("uname").arg("-r").output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Lists and calls the server's tools; its `kernel` must not be the host's.
async fn exercise<T: vmcp_mcp::Transport>(c: &vmcp_mcp::Client<T>) {
    let tools = c.list_tools().await.unwrap();
    let mut names: Vec<&str> = tools.iter().map(|t| t.name.as_str()).collect();
    names.sort_unstable();
    assert_eq!(names, ["add", "kernel"]);
    let r = c
        .call_tool("add", Some(&serde_json::json!({"a": 2, "b": 3})))
        .await
        .unwrap();
    assert_eq!(r.content[0].as_text().unwrap(), "5");
    let r = c.call_tool("kernel", None).await.unwrap();
    let guest = r.content[0].as_text().unwrap().to_owned();
    assert!(!guest.is_empty());
    assert_ne!(guest, host_kernel(), "the server ran on the host?");
}

fn client_config() -> vmcp_mcp::ClientConfig {
    // Python importing the SDK under TCG on a loaded host takes a while.
    vmcp_mcp::ClientConfig::default()
        .with_lifecycle(vmcp_mcp::Lifecycle::Initialize)
        .with_request_timeout(Some(std::time::Duration::from_secs(600)))
}

fn wrap_over_stdio() {
    use vmcp_mcp::stdio::{StderrMode, StdioConfig, StdioTransport};
    let runtime = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let cfg = StdioConfig::new(
            VMCP,
            [
                "mcp",
                "wrap",
                "--image",
                "vmcp-test-mcp",
                "--",
                "python3",
                "-c",
                PY_SERVER,
            ],
        )
        .with_env("XDG_RUNTIME_DIR", runtime.path())
        .with_stderr(StderrMode::Null);
        let mut cfg = cfg;
        // Python exiting and the guest powering off take seconds under TCG.
        cfg.shutdown_grace = std::time::Duration::from_secs(120);
        let t = StdioTransport::spawn(&cfg).unwrap();
        let c = vmcp_mcp::Client::connect(t, client_config()).await.unwrap();
        assert_eq!(
            c.server_info().server_info.as_ref().unwrap().name,
            "vmcp-wrap-py"
        );
        exercise(&c).await;
        c.close().await;
    });
    let left: Vec<_> = std::fs::read_dir(runtime.path()).unwrap().collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

fn wrap_over_http() {
    use std::io::BufRead;
    use vmcp_mcp::http::{HttpConfig, ReqwestClient, ReqwestOptions, StreamableHttpTransport};
    let runtime = tempfile::tempdir().unwrap();
    let mut child = Command::new(VMCP)
        .args([
            "mcp",
            "wrap",
            "--http",
            "127.0.0.1:0",
            "--image",
            "vmcp-test-mcp",
            "--",
            "python3",
            "-c",
            PY_SERVER,
        ])
        .env("XDG_RUNTIME_DIR", runtime.path())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let url = loop {
        let line = lines
            .next()
            .expect("wrap --http ended before listening")
            .unwrap();
        if let Some(rest) = line.strip_prefix("vmcp: MCP relay listening on ") {
            break rest.trim().to_owned();
        }
    };
    // Keep draining its stderr (the server's log) so it never blocks.
    std::thread::spawn(move || for _ in lines {});
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let http = ReqwestClient::new(&ReqwestOptions::default()).unwrap();
        let t = StreamableHttpTransport::new(http, HttpConfig::new([url.clone()])).unwrap();
        let c = vmcp_mcp::Client::connect(t, client_config()).await.unwrap();
        assert_eq!(
            c.server_info().server_info.as_ref().unwrap().name,
            "vmcp-wrap-py"
        );
        exercise(&c).await;
        // Ending the session (DELETE) destroys its VM.
        c.close().await;
    });
    // SIGTERM stops the relay; nothing is left behind.
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(128 + 15), "{status:?}");
    let left: Vec<_> = std::fs::read_dir(runtime.path()).unwrap().collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}
