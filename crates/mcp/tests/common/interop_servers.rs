//! The official reference MCP servers, as installed by scripts/install.d/40-mcp-interop.sh:
//! where they are, how to start them over stdio or Streamable HTTP on loopback, and the
//! loud-skip rule (`SKIPPED: ...` on stderr, or a failure when `VMCP_REQUIRE_INTEROP=1`).
#![allow(dead_code)]

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

/// Where the install step put the servers.
pub fn prefix() -> PathBuf {
    std::env::var_os("VMCP_INTEROP_PREFIX")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/vmcp-interop"))
}

/// Skips loudly, or fails when the CI asked for interop tests.
pub fn skip(reason: &str) {
    if std::env::var("VMCP_REQUIRE_INTEROP").as_deref() == Ok("1") {
        panic!("VMCP_REQUIRE_INTEROP=1 but {reason}; run scripts/install-deps");
    }
    vmcp_test_support::skipped!(
        "SKIPPED: {reason} (run scripts/install-deps, or set VMCP_INTEROP_PREFIX)"
    );
}

/// `crates/mcp/tests/interop`, from the mcp crate's tests or another crate's.
fn test_dir() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let own = here.join("tests/interop");
    // Other crates may have a tests/interop of their own (clients): look for our servers.
    if own.join("py_server.py").is_file() {
        own
    } else {
        here.join("../mcp/tests/interop")
    }
}

/// Which reference server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sdk {
    /// `@modelcontextprotocol/server-everything` (TypeScript SDK).
    TypeScript,
    /// `tests/interop/py_server.py` on the Python SDK.
    Python,
}

/// How the HTTP server keeps state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpMode {
    /// Session-based Streamable HTTP.
    Sessions,
    /// Without sessions (Python SDK's stateless mode).
    Stateless,
}

/// A command line (program + args) to start a server over stdio; `Err(reason)` if absent.
pub fn stdio_command(sdk: Sdk) -> Result<(PathBuf, Vec<String>), String> {
    match sdk {
        Sdk::TypeScript => {
            let entry = ts_entry()?;
            Ok((node()?, vec![entry.display().to_string(), "stdio".into()]))
        }
        Sdk::Python => Ok((
            python()?,
            vec![
                test_dir().join("py_server.py").display().to_string(),
                "stdio".into(),
            ],
        )),
    }
}

fn node() -> Result<PathBuf, String> {
    which("node").ok_or_else(|| "node is not installed".to_owned())
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn ts_entry() -> Result<PathBuf, String> {
    let entry =
        prefix().join("ts/node_modules/@modelcontextprotocol/server-everything/dist/index.js");
    if entry.is_file() {
        Ok(entry)
    } else {
        Err(format!(
            "the TypeScript reference server is not installed ({} missing)",
            entry.display()
        ))
    }
}

fn python() -> Result<PathBuf, String> {
    let py = prefix().join("py/bin/python");
    if py.is_file() {
        Ok(py)
    } else {
        Err(format!(
            "the Python MCP SDK is not installed ({} missing)",
            py.display()
        ))
    }
}

/// A reference server running over Streamable HTTP on 127.0.0.1; killed on drop.
pub struct HttpServer {
    pub url: String,
    pub addr: SocketAddr,
    child: tokio::process::Child,
}

impl HttpServer {
    /// Starts `sdk`'s server and waits (up to 30 s) until it accepts connections. The port is
    /// chosen free, then released for the server to take: if another process got it in
    /// between, the server exits and a new port is tried.
    pub async fn start(sdk: Sdk, mode: HttpMode) -> Result<Self, String> {
        let mut last = String::new();
        for _ in 0..3 {
            match Self::start_on(sdk, mode, vmcp_test_support::free_port()).await {
                Ok(s) => return Ok(s),
                Err(e) if e.contains("exited early") => last = e,
                Err(e) => return Err(e),
            }
        }
        Err(last)
    }

    async fn start_on(sdk: Sdk, mode: HttpMode, port: u16) -> Result<Self, String> {
        let mut cmd = match sdk {
            Sdk::TypeScript => {
                assert_eq!(
                    mode,
                    HttpMode::Sessions,
                    "server-everything has sessions only"
                );
                let mut c = tokio::process::Command::new(node()?);
                c.arg("--import")
                    .arg(test_dir().join("loopback.mjs"))
                    .arg(ts_entry()?)
                    .arg("streamableHttp")
                    .env("PORT", port.to_string());
                c
            }
            Sdk::Python => {
                let mut c = tokio::process::Command::new(python()?);
                c.arg(test_dir().join("py_server.py"))
                    .arg(match mode {
                        HttpMode::Sessions => "http",
                        HttpMode::Stateless => "stateless",
                    })
                    .arg(port.to_string());
                c
            }
        };
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {sdk:?} server: {e}"))?;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let start = Instant::now();
        loop {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("{sdk:?} server exited early: {status}"));
            }
            if start.elapsed() > Duration::from_secs(30) {
                return Err(format!(
                    "{sdk:?} server did not listen on {addr} within 30 s"
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Self {
            url: format!("http://{addr}/mcp"),
            addr,
            child,
        })
    }

    /// Kills the server now (to test a backend dying).
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }
}
