//! `vmcp mcp wrap -- CMD ARGS...`: a stdio MCP server isolated in a micro-VM.
//!
//! Boots a VM, starts `CMD ARGS` in it with its stdin and stdout connected to ours, and
//! relays bytes both ways as they come: MCP messages pass through unparsed and unchanged
//! (newline-delimited JSON-RPC needs no re-framing), so any client configuration that
//! launches `CMD ARGS` can launch `vmcp mcp wrap -- CMD ARGS` instead. The server's stderr goes
//! to ours. One VM per client: the client session is this process.
//!
//! Ending: when the server exits, vmcp powers the VM off and exits with the server's status;
//! when our stdin ends (the client closes the session), the server's stdin is closed and it
//! gets [`EXIT_GRACE`] to exit, then SIGTERM and another [`EXIT_GRACE`], then the VM is
//! destroyed; SIGINT/SIGTERM destroy the VM at once. Streamable HTTP on the host side
//! (`--http`) is not implemented yet.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use tokio::io::AsyncWriteExt;
use vmcp_guest_proto::FailureKind;
use vmcp_vm::agent::{AgentError, ExecSpec, ProcessEvent};
use vmcp_vm::{Accel, Arch, NetMode, PortForward, VmConfig};

use crate::run::{exit_code, signal, EXIT_NOT_EXECUTABLE, EXIT_NOT_FOUND};

/// How long the server gets to exit after its stdin closed, and again after SIGTERM.
pub const EXIT_GRACE: Duration = Duration::from_secs(3);
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Arguments of `vmcp mcp wrap`.
#[derive(clap::Args, Debug)]
pub struct WrapArgs {
    /// Virtual CPUs.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub cpus: u32,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256, value_name = "MIB")]
    pub memory: u32,
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
    /// QEMU accelerator: kvm or tcg (Linux), whpx or tcg (Windows); probed when absent.
    #[arg(long, value_parser = crate::run::parse_accel)]
    pub accel: Option<Accel>,
    /// Kernel to boot instead of the built image's (needs --initrd).
    #[arg(long, value_name = "FILE", requires = "initrd")]
    pub kernel: Option<PathBuf>,
    /// Initramfs to boot instead of the built image's (needs --kernel).
    #[arg(long, value_name = "FILE", requires = "kernel")]
    pub initrd: Option<PathBuf>,
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
    tokio::select! {
        r = wrap(args) => r,
        sig = signal::termination() => {
            eprintln!("vmcp: got {}, destroyed the VM", sig.name);
            Ok(ExitCode::from(128 + sig.number))
        }
    }
}

async fn wrap(args: WrapArgs) -> anyhow::Result<ExitCode> {
    let (kernel, initrd) = match (&args.kernel, &args.initrd) {
        (Some(k), Some(i)) => (k.clone(), i.clone()),
        _ => crate::run::ensure_image(Arch::host()).await?,
    };
    let mut config = VmConfig::new(kernel, initrd);
    config.cpus = args.cpus;
    config.memory_mib = args.memory;
    config.accel = args.accel;
    config.net.mode = args.net.clone();
    config.net.publish = args.publish.clone();
    if let Some(w) = config.net.warning() {
        eprintln!("vmcp: {w}");
    }
    let selection = crate::run::select(&mut config).await?;
    let mut vm = selection.backend.create(config).await?;
    for notice in &selection.notices {
        eprintln!("vmcp: notice: {notice}");
    }
    vm.start().await?;
    vm.wait_ready(READY_TIMEOUT).await?;
    let agent = vm.agent()?;
    let program = args.command.first().cloned().unwrap_or_default();
    let spec = ExecSpec {
        argv: args.command.clone(),
        env: args.env.clone(),
        cwd: args.workdir.clone(),
        stdin: true,
    };
    let mut process = match agent.exec(spec).await {
        Ok(p) => p,
        Err(AgentError::Failed { kind, message }) => {
            eprintln!("vmcp: cannot start the MCP server {program} in the guest: {message}");
            return Ok(ExitCode::from(match kind {
                FailureKind::NotFound => EXIT_NOT_FOUND,
                FailureKind::PermissionDenied => EXIT_NOT_EXECUTABLE,
                _ => crate::EXIT_VMCP_FAILED,
            }));
        }
        Err(e) => return Err(anyhow::Error::new(e).context(format!("cannot start {program}"))),
    };
    let ctl = process.control().clone();
    let (eof_tx, mut eof_rx) = tokio::sync::oneshot::channel::<()>();
    let pump_in = tokio::spawn(async move {
        let mut rx = crate::run::stdin_reader();
        while let Some(chunk) = rx.recv().await {
            if ctl.write_stdin(&chunk).await.is_err() {
                return;
            }
        }
        let _ = ctl.close_stdin().await;
        let _ = eof_tx.send(());
    });
    let mut stdout = tokio::io::stdout();
    let mut stderr = tokio::io::stderr();
    // After our stdin ended: first deadline closes, then SIGTERM, then give up.
    let mut deadline: Option<(tokio::time::Instant, bool)> = None;
    let status = loop {
        let sleep = async {
            match deadline {
                Some((at, _)) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            ev = process.next_event() => match ev {
                Ok(Some(ProcessEvent::Stdout(d))) => {
                    if stdout.write_all(&d).await.is_err() || stdout.flush().await.is_err() {
                        // The client is gone.
                        break None;
                    }
                }
                Ok(Some(ProcessEvent::Stderr(d))) => {
                    let _ = stderr.write_all(&d).await;
                    let _ = stderr.flush().await;
                }
                Ok(Some(ProcessEvent::Exited(s))) => break Some(s),
                Ok(None) => break None,
                Err(e) => return Err(anyhow::Error::new(e).context(format!("lost the MCP server {program}"))),
            },
            // Our stdin ended (or the server's stdin is gone): the grace period starts.
            _ = &mut eof_rx, if deadline.is_none() => {
                deadline = Some((tokio::time::Instant::now() + EXIT_GRACE, false));
            }
            () = sleep => match deadline {
                Some((_, false)) => {
                    tracing::info!("{program} did not exit after its stdin closed; sending SIGTERM");
                    let _ = process.control().signal(15).await;
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
    drop(agent);
    match status {
        Some(s) => {
            if let Err(e) = vm.shutdown(Duration::from_secs(5)).await {
                tracing::warn!(error = %e, "VM shutdown failed; it was killed");
            }
            Ok(ExitCode::from(exit_code(s)))
        }
        None => {
            vm.kill().await.context("cannot stop the VM")?;
            Ok(ExitCode::SUCCESS)
        }
    }
}
