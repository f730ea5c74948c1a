//! `vmcp daemon` where it is not available yet (macOS, Windows): the pool needs QEMU
//! snapshots and Unix-socket descriptor passing, which are Linux-only so far.

use std::process::ExitCode;

use super::DaemonArgs;
use crate::run::RunArgs;

/// Refuses with the reason.
pub async fn run(_args: DaemonArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("vmcp daemon runs on Linux only so far (QEMU snapshots and descriptor passing)")
}

/// There is never a daemon here: `vmcp run` starts its own VM.
pub async fn try_run(_args: &RunArgs, _forward_stdin: bool) -> anyhow::Result<Option<ExitCode>> {
    Ok(None)
}

/// For `vmcp bench`: there is no daemon here.
pub fn pool_counts(_socket: &std::path::Path) -> Option<(u32, u32, u64)> {
    None
}

/// For `vmcp bench`: there is no daemon here.
pub fn time_acquire(
    _socket: &std::path::Path,
    _memory_mib: u32,
    _kernel: &std::path::Path,
    _initrd: &std::path::Path,
    _accel: Option<vmcp_vm::Accel>,
) -> anyhow::Result<Option<std::time::Duration>> {
    Ok(None)
}
