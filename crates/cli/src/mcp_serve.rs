//! `vmcp mcp serve`: vmcp as an MCP server whose tools create and drive sandboxes (micro-VMs).
//!
//! stdio by default (the client starts `vmcp mcp serve`), or Streamable HTTP with `--http
//! ADDR`. The protocol side is `vmcp-mcp-server`, the tools are `vmcp-sandbox`; this module
//! only wires them to the built guest image and the backend `vmcp_vm::select` picks, and to the signals: on
//! SIGINT/SIGTERM, at the end of stdin, or when the HTTP server stops, every sandbox VM is
//! killed before vmcp exits. If vmcp itself is SIGKILLed, QEMU dies with it (parent-death
//! signal) and the next vmcp start sweeps the runtime directories left behind.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use vmcp_mcp_server::http::{HttpConfig, HttpServer};
use vmcp_mcp_server::{Server, ServerConfig};
use vmcp_sandbox::manager::{
    Booted, FactoryError, Limits, Manager, SandboxError, VmFactory, VmSpec,
};
use vmcp_sandbox::tools::SandboxTools;
use vmcp_vm::{Accel, Arch, Vm, VmConfig};

use crate::run::signal;
use crate::snapshots::{self, AutoStart};

/// The Streamable HTTP endpoint flags of `vmcp mcp serve` and `vmcp mcp wrap`.
#[derive(clap::Args, Debug, Clone)]
pub struct HttpArgs {
    /// Serve Streamable HTTP on this address (e.g. 127.0.0.1:8080) instead of stdio.
    #[arg(long, value_name = "ADDR")]
    pub http: Option<SocketAddr>,
    /// File holding the bearer token HTTP clients must send (required off loopback).
    #[arg(long, value_name = "FILE", requires = "http")]
    pub token_file: Option<PathBuf>,
    /// Host name accepted in Host/Origin besides localhost and the bound IP (repeatable).
    #[arg(long, value_name = "HOST", requires = "http")]
    pub allowed_host: Vec<String>,
    /// Origin accepted besides those of allowed hosts, e.g. https://app.example (repeatable).
    #[arg(long, value_name = "ORIGIN", requires = "http")]
    pub allowed_origin: Vec<String>,
}

/// Arguments of `vmcp mcp serve`.
#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub listen: HttpArgs,
    /// Sandboxes alive at once.
    #[arg(long, value_name = "N", default_value_t = 4)]
    pub max_sandboxes: usize,
    /// Total guest memory of live sandboxes, MiB.
    #[arg(long, value_name = "MIB", default_value_t = 2048)]
    pub memory_budget: u64,
    /// Bytes of stdout (and of stderr) one exec returns.
    #[arg(long, value_name = "BYTES", default_value_t = 1 << 20)]
    pub max_output: usize,
    /// Seconds a sandbox outlives the end of its client session (for reconnects).
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    pub session_grace: u64,
    /// Default idle timeout of a sandbox, seconds.
    #[arg(long, value_name = "SECS", default_value_t = 600)]
    pub idle_timeout: u64,
    /// The widest allow list a client may give `sandbox_create`'s `network`
    /// (HOST[:PORT],...: names, *.suffix, IP addresses, CIDR ranges, as in `vmcp run --net
    /// allow=`); every rule a client asks for must lie within one of these. Default: clients
    /// get no network.
    #[arg(long, value_name = "RULES", value_parser = parse_ceiling)]
    pub net_allow: Option<vmcp_egress::Policy>,
    /// Let clients ask for unrestricted outbound NAT (`network: "nat"`).
    #[arg(long)]
    pub net_nat: bool,
    /// How a sandbox's allow-list reaches it: channel (the default: over the guest agent's
    /// channel with no network card, so a networked sandbox starts from the snapshot and can
    /// be checkpointed and forked) or card (a restricted network card, about twice the bulk
    /// throughput under TCG; QEMU on Linux and macOS only).
    #[arg(long, value_name = "channel|card", value_parser = crate::run::parse_net_via)]
    pub net_via: Option<bool>,
    /// QEMU accelerator: kvm or tcg (Linux), whpx or tcg (Windows); probed when absent.
    #[arg(long, value_parser = crate::run::parse_accel)]
    pub accel: Option<Accel>,
    /// Kernel to boot instead of the built image's (needs --initrd).
    #[arg(long, value_name = "FILE", requires = "initrd")]
    pub kernel: Option<PathBuf>,
    /// Initramfs to boot instead of the built image's (needs --kernel).
    #[arg(long, value_name = "FILE", requires = "kernel")]
    pub initrd: Option<PathBuf>,
    /// Approval of what crosses from the sandboxes to the host, and of tool calls named by
    /// `tool`/`command` rules.
    #[command(flatten)]
    pub approval: crate::approvals::ApprovalArgs,
}

/// Starts the guest image with the backend and accelerator the selector chose at start:
/// restored from the automatic snapshot `vmcp run` uses (built on first use) when the VM
/// fits one, else booted cold with a notice in the tool result.
struct SelectedFactory {
    backend: Box<dyn vmcp_vm::Backend>,
    template: VmConfig,
    /// `--net-via card`.
    card: bool,
    approvals: Option<Arc<crate::approvals::Approvals>>,
}

impl SelectedFactory {
    fn config(&self, spec: &VmSpec) -> VmConfig {
        let mut config = self.template.clone();
        config.cpus = spec.cpus;
        config.memory_mib = spec.memory_mib;
        config.net = vmcp_vm::NetConfig::default();
        config.net.mode = spec.net.clone();
        config.net.card = self.card;
        if let (Some(a), vmcp_vm::NetMode::Allow(_)) = (&self.approvals, &config.net.mode) {
            config.net.gate = Some(a.egress_gate(&format!("sandbox ({} MiB)", spec.memory_mib)));
        }
        config
    }
}

#[async_trait]
impl VmFactory for SelectedFactory {
    async fn create(&self, spec: VmSpec) -> Result<Box<dyn Vm>, FactoryError> {
        Ok(self.backend.create(self.config(&spec)).await?)
    }

    async fn boot(
        &self,
        spec: VmSpec,
        timeout: Duration,
        progress: &(dyn for<'s> Fn(&'s str) + Send + Sync),
    ) -> Result<Booted, SandboxError> {
        let config = self.config(&spec);
        config.validate().map_err(SandboxError::Boot)?;
        let mut notices = Vec::new();
        match snapshots::cold_reason(&config, self.backend.name()) {
            None => match snapshots::auto_start(&config, timeout, progress).await {
                Ok(AutoStart::Restored(vm) | AutoStart::Built(vm)) => return Ok(Booted::new(vm)),
                Ok(AutoStart::Cold(None)) => {
                    notices
                        .push("booted cold: no snapshot store or QEMU binary for snapshots".into());
                }
                Ok(AutoStart::Cold(Some(why))) => notices.push(format!("booted cold: {why}")),
                Err(e) => notices.push(format!(
                    "booted cold: the snapshot lookup failed: {}",
                    e.chain()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(": ")
                )),
            },
            Some(why) => notices.push(format!("booted cold: {why}")),
        }
        progress("booting the VM cold");
        let mut vm = self
            .backend
            .create(config)
            .await
            .map_err(|e| SandboxError::Create(Box::new(e)))?;
        vm.start().await.map_err(SandboxError::Boot)?;
        vm.wait_ready(timeout).await.map_err(SandboxError::Boot)?;
        let mut booted = Booted::new(vm);
        booted.notices = notices;
        Ok(booted)
    }
}

fn parse_ceiling(s: &str) -> Result<vmcp_egress::Policy, String> {
    let p: vmcp_egress::Policy = s
        .parse()
        .map_err(|e: vmcp_egress::RuleError| format!("bad --net-allow list: {e}"))?;
    Ok(p.with_host_addrs(vmcp_egress::host_addrs()))
}

/// The sandbox manager and server for `args` (shared with `vmcp mcp wrap`'s VM flags later).
pub async fn build(args: &ServeArgs) -> anyhow::Result<(Manager, Server)> {
    let (kernel, initrd) = match (&args.kernel, &args.initrd) {
        (Some(k), Some(i)) => (k.clone(), i.clone()),
        _ => crate::run::ensure_image(Arch::host()).await?,
    };
    let mut template = VmConfig::new(kernel, initrd);
    template.accel = args.accel;
    let selection = crate::run::select(&mut template).await?;
    for notice in &selection.notices {
        eprintln!("vmcp: notice: {notice}");
    }
    let mut limits = Limits::default();
    limits.max_sandboxes = args.max_sandboxes;
    limits.memory_budget_mib = args.memory_budget;
    limits.max_output = args.max_output.max(1);
    limits.session_grace = Duration::from_secs(args.session_grace);
    limits.default_idle = Duration::from_secs(args.idle_timeout.max(1));
    limits.net_ceiling = args.net_allow.clone();
    limits.allow_nat = args.net_nat;
    let approvals =
        crate::approvals::Approvals::start(&args.approval, crate::approvals::Frontend::Mcp)
            .await?
            .map(Arc::new);
    let factory = Arc::new(SelectedFactory {
        backend: selection.backend,
        template,
        card: args.net_via.unwrap_or(false),
        approvals: approvals.clone(),
    });
    let manager = Manager::new(factory, limits);
    let tools: Arc<dyn vmcp_mcp_server::ToolSet> = match approvals {
        Some(a) => Arc::new(crate::gated_tools::GatedTools::new(
            Arc::new(SandboxTools::new(manager.clone())),
            a,
        )),
        None => Arc::new(SandboxTools::new(manager.clone())),
    };
    let server = Server::from_arc(
        tools,
        ServerConfig::default().with_instructions(
            "Each sandbox is a disposable Linux micro-VM (busybox userland, no network unless \
             sandbox_create's `network` asks for one the server permits). \
             Create one with sandbox_create, run commands with sandbox_exec, and destroy it \
             with sandbox_destroy when done; `run` does all three for a single command.",
        ),
    )?;
    Ok((manager, server))
}

/// Our stdin as an async reader fed by a plain thread (a read blocked in tokio's blocking
/// pool would keep the runtime from shutting down on SIGTERM).
fn stdin_pipe() -> tokio::io::DuplexStream {
    use tokio::io::AsyncWriteExt;
    let (mut w, r) = tokio::io::duplex(64 << 10);
    let mut rx = crate::run::stdin_reader();
    tokio::spawn(async move {
        while let Some(chunk) = rx.recv().await {
            if w.write_all(&chunk).await.is_err() {
                return;
            }
        }
    });
    r
}

impl HttpArgs {
    /// The endpoint settings for `--http ADDR` (`None` without it): the token file read and
    /// checked, the extra hosts and origins.
    pub(crate) fn config(&self) -> anyhow::Result<Option<HttpConfig>> {
        self.http
            .map(|addr| {
                http_config(
                    addr,
                    self.token_file.as_deref(),
                    &self.allowed_host,
                    &self.allowed_origin,
                )
            })
            .transpose()
    }
}

fn http_config(
    addr: SocketAddr,
    token_file: Option<&std::path::Path>,
    allowed_hosts: &[String],
    allowed_origins: &[String],
) -> anyhow::Result<HttpConfig> {
    let token = match token_file {
        Some(path) => {
            let t = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the token file {}", path.display()))?;
            let t = t.trim().to_owned();
            if t.is_empty() {
                anyhow::bail!("the token file {} is empty", path.display());
            }
            Some(t)
        }
        None => None,
    };
    let mut config = HttpConfig::new(addr);
    config.token = token;
    config.allowed_hosts = allowed_hosts.to_vec();
    config.allowed_origins = allowed_origins.to_vec();
    Ok(config)
}

/// Runs `vmcp mcp serve`.
pub async fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    // Check the address before booting anything.
    let http = match args.listen.config()? {
        Some(config) => Some(HttpServer::bind(config).await?),
        None => None,
    };
    let (manager, server) = build(&args).await?;
    let code = match http {
        Some(http) => {
            if let Some(addr) = http.local_addr() {
                eprintln!("vmcp: MCP server listening on http://{addr}/mcp");
            }
            let (tx, rx) = tokio::sync::oneshot::channel();
            let serving = http.serve(server, async move {
                let _ = rx.await;
            });
            tokio::pin!(serving);
            tokio::select! {
                () = &mut serving => ExitCode::SUCCESS,
                sig = signal::termination() => {
                    let _ = tx.send(());
                    let _ = tokio::time::timeout(Duration::from_secs(5), &mut serving).await;
                    eprintln!("vmcp: got {}, destroyed every sandbox", sig.name);
                    ExitCode::from(128 + sig.number)
                }
            }
        }
        None => {
            let limits = vmcp_mcp_server::stdio::StdioLimits::default();
            let served =
                vmcp_mcp_server::stdio::serve(&server, stdin_pipe(), tokio::io::stdout(), &limits);
            tokio::select! {
                r = served => {
                    r.context("the MCP session failed")?;
                    ExitCode::SUCCESS
                }
                sig = signal::termination() => {
                    eprintln!("vmcp: got {}, destroyed every sandbox", sig.name);
                    ExitCode::from(128 + sig.number)
                }
            }
        }
    };
    manager.shutdown_all().await;
    Ok(code)
}
