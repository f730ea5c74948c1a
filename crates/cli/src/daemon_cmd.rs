//! `vmcp daemon`: keeps restored, ready VMs per profile (crate `vmcp-pool`) and hands them to
//! `vmcp run` over a private Unix socket; `vmcp daemon status` reports the pools.
//!
//! The pool, the protocol and the socket live in `vmcp-pool`; this module is the glue: flags,
//! the QEMU snapshot source (restore, re-key, take the agent channel), and the client side
//! `vmcp run` calls before anything else (docs/daemon.md).

#[cfg(target_os = "linux")]
#[path = "daemon_cmd/linux.rs"]
mod imp;
#[cfg(not(target_os = "linux"))]
#[path = "daemon_cmd/other.rs"]
mod imp;

use std::path::PathBuf;
use std::process::ExitCode;

pub use imp::{pool_counts, time_acquire, try_run};

/// Arguments of `vmcp daemon`.
#[derive(clap::Args, Debug)]
pub struct DaemonArgs {
    /// Socket path (default: `$VMCP_DAEMON_SOCKET`, else `$XDG_RUNTIME_DIR/vmcp/daemon.sock`,
    /// else `/tmp/vmcpd-<uid>/daemon.sock`).
    #[arg(long, value_name = "PATH", global = true)]
    pub socket: Option<PathBuf>,
    /// Ready VMs to keep per profile (a profile's own `pool=` wins).
    #[arg(long = "pool", value_name = "N", default_value_t = 2)]
    pub pool: usize,
    /// A kind of VM to keep ready, in `vmcp run`'s terms:
    /// `cpus=N,memory=MIB[,rootfs=IMG][,kernel=F,initrd=F][,accel=A][,backend=B][,pool=N]`
    /// (repeatable; default: one profile with `vmcp run`'s defaults, 1 vCPU and 256 MiB).
    #[arg(long = "profile", value_name = "SPEC", value_parser = parse_profile)]
    pub profiles: Vec<ProfileArg>,
    /// Most guest memory the daemon holds at once (ready, being restored and handed-out VMs
    /// together), MiB.
    #[arg(long, value_name = "MIB", default_value_t = 4096)]
    pub memory_budget: u64,
    /// Restores running at once.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub parallel: usize,
    #[command(subcommand)]
    pub command: Option<DaemonCommand>,
}

/// `vmcp daemon` subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum DaemonCommand {
    /// Show the running daemon's pools.
    Status,
}

/// One `--profile`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProfileArg {
    /// vCPUs.
    pub cpus: u32,
    /// Guest memory, MiB.
    pub memory_mib: u32,
    /// Read-only root disk.
    pub rootfs: Option<PathBuf>,
    /// Kernel.
    pub kernel: Option<PathBuf>,
    /// Initramfs.
    pub initrd: Option<PathBuf>,
    /// `--accel`.
    pub accel: Option<String>,
    /// `--backend`.
    pub backend: Option<String>,
    /// Ready VMs to keep.
    pub pool: Option<usize>,
}

impl Default for ProfileArg {
    fn default() -> Self {
        ProfileArg {
            cpus: 1,
            memory_mib: 256,
            rootfs: None,
            kernel: None,
            initrd: None,
            accel: None,
            backend: None,
            pool: None,
        }
    }
}

/// Parses a `--profile` value.
pub fn parse_profile(s: &str) -> Result<ProfileArg, String> {
    let mut p = ProfileArg::default();
    for part in s.split(',').filter(|p| !p.is_empty()) {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| format!("expected KEY=VALUE in --profile, got {part:?}"))?;
        let num = |v: &str| {
            v.parse::<u32>()
                .map_err(|_| format!("--profile {k}= wants a number, got {v:?}"))
        };
        match k {
            "cpus" => p.cpus = num(v)?,
            "memory" => p.memory_mib = num(v)?,
            "pool" => p.pool = Some(num(v)? as usize),
            "rootfs" => p.rootfs = Some(PathBuf::from(v)),
            "kernel" => p.kernel = Some(PathBuf::from(v)),
            "initrd" => p.initrd = Some(PathBuf::from(v)),
            "accel" => {
                crate::run::parse_accel(v)?;
                p.accel = Some(v.to_string());
            }
            "backend" => {
                crate::run::parse_backend(v)?;
                p.backend = Some(v.to_string());
            }
            _ => {
                return Err(format!(
                "unknown --profile key {k:?} (cpus, memory, rootfs, kernel, initrd, accel, backend, pool)"
            ))
            }
        }
    }
    if p.kernel.is_some() != p.initrd.is_some() {
        return Err("--profile needs kernel= and initrd= together".into());
    }
    Ok(p)
}

/// Runs `vmcp daemon` or `vmcp daemon status`.
pub async fn run(args: DaemonArgs) -> anyhow::Result<ExitCode> {
    imp::run(args).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles_parse_and_bad_ones_say_why() {
        let p = parse_profile("cpus=2,memory=512,pool=3,accel=tcg").unwrap();
        assert_eq!((p.cpus, p.memory_mib, p.pool), (2, 512, Some(3)));
        assert_eq!(p.accel.as_deref(), Some("tcg"));
        assert_eq!(parse_profile("").unwrap(), ProfileArg::default());
        assert!(parse_profile("cpus").unwrap_err().contains("KEY=VALUE"));
        assert!(parse_profile("cpus=x").unwrap_err().contains("number"));
        assert!(parse_profile("colour=red").unwrap_err().contains("unknown"));
        assert!(parse_profile("kernel=/k").unwrap_err().contains("together"));
        assert!(parse_profile("accel=xen").is_err());
    }
}
