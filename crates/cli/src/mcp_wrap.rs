//! `vmcp mcp wrap [--http ADDR] [--image NAME] [--share ...] -- CMD ARGS...`: a stdio MCP
//! server isolated in a micro-VM.
//!
//! Boots a VM (with `--image` and `--share` as `vmcp run` has them), starts `CMD ARGS` in it
//! with its stdin and stdout connected to the relay, and passes MCP messages through:
//! - stdio (default): bytes both ways as they come, unparsed and unchanged
//!   (newline-delimited JSON-RPC needs no re-framing), so any client configuration that
//!   launches `CMD ARGS` can launch `vmcp mcp wrap -- CMD ARGS` instead. One VM: the client
//!   session is this process. vmcp exits with the server's status.
//! - `--http ADDR`: Streamable HTTP on the host (the front of `vmcp mcp serve --http`:
//!   loopback by default, `Host`/`Origin` checks, `--token-file` required off loopback);
//!   every client session gets its own VM, booted at its `initialize` and destroyed when the
//!   session ends (`vmcp_mcp_server::http::relay`).
//!
//! The server's stderr goes to ours. Ending a server: when its input ends (stdin closed, or
//! the HTTP session ended), its stdin is closed and it gets [`EXIT_GRACE`] to exit, then
//! SIGTERM and another [`EXIT_GRACE`], then the VM is destroyed; a `:rw` share's changes are
//! copied back when the server exited by itself or after its stdin closed. SIGINT/SIGTERM
//! destroy every VM at once.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use vmcp_guest_proto::FailureKind;
use vmcp_mcp_server::http::relay::{BoxFuture, Pipe, Upstream};
use vmcp_vm::agent::{AgentError, ExecSpec, ProcessEvent};
use vmcp_vm::{Accel, Arch, NetMode, PortForward, Vm, VmConfig};

use crate::run::{exit_code, signal, ShareArg, EXIT_NOT_EXECUTABLE, EXIT_NOT_FOUND};

/// How long the server gets to exit after its stdin closed, and again after SIGTERM.
pub const EXIT_GRACE: Duration = Duration::from_secs(3);
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Arguments of `vmcp mcp wrap`.
#[derive(clap::Args, Debug, Clone)]
pub struct WrapArgs {
    /// Virtual CPUs.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub cpus: u32,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256, value_name = "MIB")]
    pub memory: u32,
    /// Root filesystem image (a name or key from `vmcp image list`, or an ext4 file), shared
    /// read-only; each VM writes to its own layer, discarded at the end.
    #[arg(long, value_name = "NAME|PATH")]
    pub image: Option<String>,
    /// Share a host directory: HOST_DIR:GUEST_DIR[:ro|:rw] (repeatable; default ro), as in
    /// `vmcp run`. Each VM gets its own copy; with :rw its changes are copied back when its
    /// server ends.
    #[arg(long, value_name = "HOST:GUEST[:ro|:rw]", value_parser = crate::run::parse_share)]
    pub share: Vec<ShareArg>,
    /// Environment variable for the server (repeatable).
    #[arg(long = "env", short = 'e', value_name = "K=V", value_parser = parse_env)]
    pub env: Vec<(String, String)>,
    /// Working directory in the guest.
    #[arg(long, short = 'w', value_name = "DIR")]
    pub workdir: Option<String>,
    /// Guest network: none (no network card), allow=HOST[:PORT],... (only through vmcp's
    /// egress proxy; names, *.suffix, IP addresses, CIDR ranges), or nat (unrestricted).
    #[arg(long, value_name = "MODE", default_value = "none", value_parser = crate::run::parse_net)]
    pub net: NetMode,
    /// Publish a guest TCP port on the host: HOST_PORT:GUEST_PORT (on 127.0.0.1) or
    /// ADDRESS:HOST_PORT:GUEST_PORT (repeatable), e.g. for a server that also serves HTTP.
    #[arg(long, value_name = "[ADDR:]HOST_PORT:GUEST_PORT", value_parser = crate::run::parse_publish)]
    pub publish: Vec<PortForward>,
    /// How an allow-list and published ports reach the guest: channel (the default: over the
    /// guest agent's channel, no network card at all) or card (a restricted network card,
    /// about twice the bulk throughput under TCG; QEMU on Linux and macOS only).
    #[arg(long, value_name = "channel|card", value_parser = crate::run::parse_net_via)]
    pub net_via: Option<bool>,
    #[command(flatten)]
    pub listen: crate::mcp_serve::HttpArgs,
    /// HTTP client sessions alive at once (one VM each).
    #[arg(long, value_name = "N", default_value_t = 4, requires = "http")]
    pub max_sessions: usize,
    /// QEMU accelerator: kvm or tcg (Linux), whpx or tcg (Windows); probed when absent.
    #[arg(long, value_parser = crate::run::parse_accel)]
    pub accel: Option<Accel>,
    /// Kernel to boot instead of the built image's (needs --initrd).
    #[arg(long, value_name = "FILE", requires = "initrd")]
    pub kernel: Option<PathBuf>,
    /// Initramfs to boot instead of the built image's (needs --kernel).
    #[arg(long, value_name = "FILE", requires = "kernel")]
    pub initrd: Option<PathBuf>,
    /// Approval of what crosses from the VM to the host (here: egress off the --net allow
    /// list, asked on the approval page; without it such connections are denied).
    #[command(flatten)]
    pub approval: crate::approvals::ApprovalArgs,
    /// The stdio MCP server and its arguments (after `--`).
    #[arg(required = true, last = true, value_name = "CMD")]
    pub command: Vec<String>,
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() && !k.contains('\0') && !v.contains('\0') => {
            Ok((k.to_string(), v.to_string()))
        }
        _ => Err(format!("expected K=V with a non-empty name, got {s:?}")),
    }
}

/// Runs `vmcp mcp wrap`.
pub async fn run(args: WrapArgs) -> anyhow::Result<ExitCode> {
    if args.listen.http.is_some() {
        return serve_http(args).await;
    }
    tokio::select! {
        r = wrap_stdio(args) => r,
        sig = signal::termination() => {
            eprintln!("vmcp: got {}, destroyed the VM", sig.name);
            Ok(ExitCode::from(128 + sig.number))
        }
    }
}

/// A booted VM running the server, with what must live as long as it.
struct Guest {
    vm: Box<dyn Vm>,
    process: vmcp_vm::agent::Process,
    agent: vmcp_vm::agent::AgentClient,
    shares: crate::run::Shares,
    _image: Option<crate::run::AttachedImage>,
    /// The page and broker the egress gate and the `:rw` shares' copy-back ask, alive as long
    /// as the VM.
    approvals: Option<crate::approvals::Approvals>,
}

/// How starting the server failed: a VM problem, or the program (exit code as `vmcp run`).
enum StartError {
    Vm(anyhow::Error),
    Program(String, u8),
}

impl StartError {
    fn text(&self) -> String {
        match self {
            StartError::Vm(e) => format!("{e:#}"),
            StartError::Program(m, _) => m.clone(),
        }
    }
}

/// Boots a VM for `args` and starts the server in it.
async fn start(args: &WrapArgs) -> Result<Guest, StartError> {
    let vm_err = StartError::Vm;
    let (kernel, initrd) = match (&args.kernel, &args.initrd) {
        (Some(k), Some(i)) => (k.clone(), i.clone()),
        _ => crate::run::ensure_image(Arch::host())
            .await
            .map_err(vm_err)?,
    };
    let shares = crate::run::make_shares(&args.share).map_err(vm_err)?;
    let image = match &args.image {
        Some(what) => Some(crate::run::attach_image(what, None).map_err(vm_err)?),
        None => None,
    };
    let mut config = VmConfig::new(kernel, initrd);
    config.cpus = args.cpus;
    config.memory_mib = args.memory;
    config.accel = args.accel;
    config.image = image.as_ref().map(|i| i.config.clone());
    config.shares = shares.configs.clone();
    config.net.mode = args.net.clone();
    config.net.publish = args.publish.clone();
    config.net.card = args.net_via.unwrap_or(false);
    // Kept alive for the VM's life (the page and the broker the egress gate asks).
    let approvals =
        crate::approvals::Approvals::start(&args.approval, crate::approvals::Frontend::Mcp)
            .await
            .map_err(vm_err)?;
    if let (Some(a), NetMode::Allow(_)) = (&approvals, &config.net.mode) {
        let program = args.command.first().cloned().unwrap_or_default();
        config.net.gate = Some(a.egress_gate(&format!(
            "vmcp mcp wrap {program} (pid {})",
            std::process::id()
        )));
    }
    if let Some(w) = config.net.warning() {
        eprintln!("vmcp: {w}");
    }
    let selection = crate::run::select(&mut config).await.map_err(vm_err)?;
    let mut vm = selection
        .backend
        .create(config)
        .await
        .map_err(|e| vm_err(e.into()))?;
    for notice in &selection.notices {
        eprintln!("vmcp: notice: {notice}");
    }
    vm.start().await.map_err(|e| vm_err(e.into()))?;
    vm.wait_ready(READY_TIMEOUT)
        .await
        .map_err(|e| vm_err(e.into()))?;
    let agent = vm.agent().map_err(|e| vm_err(e.into()))?;
    let program = args.command.first().cloned().unwrap_or_default();
    // The image's Env and WorkingDir are defaults; -e and -w win.
    let mut env = image.as_ref().map(|i| i.env.clone()).unwrap_or_default();
    env.extend(args.env.iter().cloned());
    let spec = ExecSpec {
        argv: args.command.clone(),
        env,
        cwd: args
            .workdir
            .clone()
            .or_else(|| image.as_ref().and_then(|i| i.workdir.clone())),
        stdin: true,
    };
    let process = match agent.exec(spec).await {
        Ok(p) => p,
        Err(AgentError::Failed { kind, message }) => {
            return Err(StartError::Program(
                format!("cannot start the MCP server {program} in the guest: {message}"),
                match kind {
                    FailureKind::NotFound => EXIT_NOT_FOUND,
                    FailureKind::PermissionDenied => EXIT_NOT_EXECUTABLE,
                    _ => crate::EXIT_VMCP_FAILED,
                },
            ))
        }
        Err(e) => {
            return Err(vm_err(
                anyhow::Error::new(e).context(format!("cannot start {program}")),
            ))
        }
    };
    Ok(Guest {
        vm,
        process,
        agent,
        shares,
        _image: image,
        approvals,
    })
}

/// Relays between `input`/`output` and the server until it ends (see the module docs), then
/// copies back `:rw` shares and stops the VM. Returns the server's exit code, if it exited.
async fn relay(
    mut g: Guest,
    program: &str,
    mut input: mpsc::Receiver<Bytes>,
    output: mpsc::Sender<Bytes>,
) -> anyhow::Result<Option<u8>> {
    let ctl = g.process.control().clone();
    let (eof_tx, mut eof_rx) = tokio::sync::oneshot::channel::<()>();
    let pump_in = tokio::spawn(async move {
        while let Some(chunk) = input.recv().await {
            if ctl.write_stdin(&chunk).await.is_err() {
                return;
            }
        }
        let _ = ctl.close_stdin().await;
        let _ = eof_tx.send(());
    });
    let mut stderr = tokio::io::stderr();
    // After the input ended: first deadline closes, then SIGTERM, then give up.
    let mut deadline: Option<(tokio::time::Instant, bool)> = None;
    let mut graceful = false;
    let status = loop {
        let sleep = async {
            match deadline {
                Some((at, _)) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            ev = g.process.next_event() => match ev {
                Ok(Some(ProcessEvent::Stdout(d))) => {
                    if output.send(Bytes::from(d)).await.is_err() {
                        // The client is gone.
                        break None;
                    }
                }
                Ok(Some(ProcessEvent::Stderr(d))) => {
                    let _ = stderr.write_all(&d).await;
                    let _ = stderr.flush().await;
                }
                Ok(Some(ProcessEvent::Exited(s))) => {
                    graceful = true;
                    break Some(s);
                }
                Ok(None) => break None,
                Err(e) => {
                    pump_in.abort();
                    return Err(anyhow::Error::new(e).context(format!("lost the MCP server {program}")));
                }
            },
            // The input ended (or the server's stdin is gone): the grace period starts.
            _ = &mut eof_rx, if deadline.is_none() => {
                deadline = Some((tokio::time::Instant::now() + EXIT_GRACE, false));
            }
            () = sleep => match deadline {
                Some((_, false)) => {
                    tracing::info!("{program} did not exit after its stdin closed; sending SIGTERM");
                    let _ = g.process.control().signal(15).await;
                    deadline = Some((tokio::time::Instant::now() + EXIT_GRACE, true));
                }
                _ => {
                    tracing::info!("{program} ignored SIGTERM; destroying the VM");
                    break None;
                }
            },
        }
    };
    pump_in.abort();
    drop(output);
    let copied = if graceful {
        crate::run::copy_back(&g.agent, &g.shares, g.approvals.as_ref(), program).await
    } else {
        Ok(())
    };
    drop(g.agent);
    match status {
        Some(_) => {
            if let Err(e) = g.vm.shutdown(Duration::from_secs(5)).await {
                tracing::warn!(error = %e, "VM shutdown failed; it was killed");
            }
        }
        None => g.vm.kill().await.context("cannot stop the VM")?,
    }
    copied?;
    Ok(status.map(exit_code))
}

async fn wrap_stdio(args: WrapArgs) -> anyhow::Result<ExitCode> {
    let program = args.command.first().cloned().unwrap_or_default();
    let guest = match start(&args).await {
        Ok(g) => g,
        Err(StartError::Program(msg, code)) => {
            eprintln!("vmcp: {msg}");
            return Ok(ExitCode::from(code));
        }
        Err(StartError::Vm(e)) => return Err(e),
    };
    let (in_tx, in_rx) = mpsc::channel::<Bytes>(4);
    tokio::spawn(async move {
        let mut rx = crate::run::stdin_reader();
        while let Some(chunk) = rx.recv().await {
            if in_tx.send(Bytes::from(chunk)).await.is_err() {
                return;
            }
        }
    });
    let (out_tx, mut out_rx) = mpsc::channel::<Bytes>(4);
    let writer = tokio::spawn(async move {
        let mut stdout = tokio::io::stdout();
        while let Some(d) = out_rx.recv().await {
            if stdout.write_all(&d).await.is_err() || stdout.flush().await.is_err() {
                return;
            }
        }
    });
    let code = relay(guest, &program, in_rx, out_tx).await?;
    let _ = writer.await;
    Ok(ExitCode::from(code.unwrap_or(0)))
}

/// Boots one VM per HTTP client session.
struct VmUpstream {
    args: Arc<WrapArgs>,
    /// The relay task of every live VM, aborted (VM destroyed) on SIGINT/SIGTERM.
    tasks: Arc<Mutex<tokio::task::JoinSet<()>>>,
}

impl Upstream for VmUpstream {
    fn open(&self) -> BoxFuture<Result<Pipe, String>> {
        let args = self.args.clone();
        let tasks = self.tasks.clone();
        Box::pin(async move {
            let program = args.command.first().cloned().unwrap_or_default();
            let guest = start(&args).await.map_err(|e| {
                let text = e.text();
                eprintln!("vmcp: {text}");
                text
            })?;
            let (in_tx, in_rx) = mpsc::channel::<Bytes>(16);
            let (out_tx, out_rx) = mpsc::channel::<Bytes>(16);
            tasks
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .spawn(async move {
                    match relay(guest, &program, in_rx, out_tx).await {
                        Ok(code) => tracing::info!(?code, "session's MCP server ended"),
                        Err(e) => eprintln!("vmcp: {e:#}"),
                    }
                });
            Ok(Pipe {
                input: in_tx,
                output: out_rx,
            })
        })
    }
}

async fn serve_http(args: WrapArgs) -> anyhow::Result<ExitCode> {
    let Some(mut config) = args.listen.config()? else {
        anyhow::bail!("--http needs an address");
    };
    config.max_sessions = args.max_sessions.max(1);
    let http = vmcp_mcp_server::http::HttpServer::bind(config).await?;
    if let Some(addr) = http.local_addr() {
        eprintln!("vmcp: MCP relay listening on http://{addr}/mcp");
    }
    let tasks = Arc::new(Mutex::new(tokio::task::JoinSet::new()));
    let upstream = Arc::new(VmUpstream {
        args: Arc::new(args),
        tasks: tasks.clone(),
    });
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let serving = http.relay(upstream, async move {
        let _ = rx.await;
    });
    tokio::pin!(serving);
    let sig = tokio::select! {
        () = &mut serving => None,
        sig = signal::termination() => Some(sig),
    };
    let _ = tx.send(());
    let _ = tokio::time::timeout(Duration::from_secs(5), &mut serving).await;
    let mut set = std::mem::take(&mut *tasks.lock().unwrap_or_else(PoisonError::into_inner));
    // Dropping a relay task drops its VM, which kills it.
    set.abort_all();
    while set.join_next().await.is_some() {}
    match sig {
        Some(sig) => {
            eprintln!("vmcp: got {}, destroyed every VM", sig.name);
            Ok(ExitCode::from(128 + sig.number))
        }
        None => Ok(ExitCode::SUCCESS),
    }
}
