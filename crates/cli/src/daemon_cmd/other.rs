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
