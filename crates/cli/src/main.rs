//! `vmcp`: run commands and MCP servers in disposable micro-VMs; reach remote MCP servers.
//!
//! A thin binary: each subcommand lives in its own module and calls the library crates.

mod approvals;
mod bench;
mod bench_backend;
mod bench_daemon;
mod bench_mcp;
mod bench_net;
mod bench_share;
mod daemon_cmd;
mod doctor;
mod gated_tools;
mod image_cmd;
mod mcp_cmd;
mod mcp_serve;
mod mcp_wrap;
mod run;
mod share_gate;
mod snapshot_cmd;
mod snapshots;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Exit code for vmcp's own failures (the docker convention).
pub const EXIT_VMCP_FAILED: u8 = 125;

#[derive(Parser)]
#[command(
    name = "vmcp",
    version,
    about = "Run tools and MCP servers inside disposable micro-VMs"
)]
struct Cli {
    /// More log output (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a program inside a fresh micro-VM.
    Run(run::RunArgs),
    /// Show which backends and accelerators work here, and why others do not.
    Doctor(doctor::DoctorArgs),
    /// Manage the guest image.
    #[command(subcommand)]
    Image(image_cmd::ImageCommand),
    /// Measure VM start, exec and ping latency.
    Bench(bench::BenchArgs),
    /// Make, list and remove VM snapshots (what `vmcp run` restores from).
    #[command(subcommand)]
    Snapshot(snapshot_cmd::SnapshotCommand),
    /// Talk to MCP servers.
    #[command(subcommand)]
    Mcp(mcp_cmd::McpCommand),
    /// Keep restored, ready VMs for `vmcp run` (foreground; `vmcp daemon status` reports).
    Daemon(daemon_cmd::DaemonArgs),
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Prints an error with its whole chain on one line: `vmcp: a: b: c`.
pub fn print_error(err: &anyhow::Error) {
    let mut line = String::from("vmcp: ");
    for (i, cause) in err.chain().enumerate() {
        if i > 0 {
            line.push_str(": ");
        }
        line.push_str(&cause.to_string());
    }
    eprintln!("{line}");
}

fn main() -> ExitCode {
    // QEMU starts `vmcp __egress-pipe ADDR` once per guest connection to the egress proxy;
    // that hidden mode skips argument parsing, logging and the runtime to start fast.
    vmcp_vm::timing::begin();
    let mut raw = std::env::args();
    if raw.nth(1).as_deref() == Some(vmcp_egress::pipe::ARG) {
        return vmcp_egress::pipe::main(&raw.next().unwrap_or_default());
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // Usage errors are vmcp's own failures (125, as `docker run` does); --help and
            // --version print to stdout and succeed.
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(EXIT_VMCP_FAILED)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    init_logging(cli.verbose);
    vmcp_vm::timing::mark("cli: arguments parsed, logging set up");
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("vmcp: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_VMCP_FAILED);
        }
    };
    vmcp_vm::timing::mark("cli: async runtime built");
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Run(args) => run::run(args).await,
            Command::Doctor(args) => doctor::run(args).await,
            Command::Image(cmd) => image_cmd::run(cmd).await,
            Command::Bench(args) => bench::run(args).await,
            Command::Snapshot(cmd) => snapshot_cmd::run(cmd).await,
            Command::Mcp(cmd) => mcp_cmd::run(cmd).await,
            Command::Daemon(args) => daemon_cmd::run(args).await,
        }
    });
    drop(runtime);
    vmcp_vm::timing::mark("cli: async runtime shut down");
    match result {
        Ok(code) => code,
        Err(err) => {
            print_error(&err);
            ExitCode::from(EXIT_VMCP_FAILED)
        }
    }
}
