//! `vmcp doctor`.

use std::process::ExitCode;

/// Arguments of `vmcp doctor`.
#[derive(clap::Args)]
pub struct DoctorArgs {}

/// Runs `vmcp doctor`.
pub async fn run(_args: DoctorArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`vmcp doctor` is not available in this build yet")
}
