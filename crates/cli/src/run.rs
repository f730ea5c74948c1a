//! `vmcp run`.

use std::process::ExitCode;

/// Arguments of `vmcp run`.
#[derive(clap::Args)]
pub struct RunArgs {}

/// Runs `vmcp run`.
pub async fn run(_args: RunArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`vmcp run` is not available in this build yet")
}
