//! `vmcp bench`.

use std::process::ExitCode;

/// Arguments of `vmcp bench`.
#[derive(clap::Args)]
pub struct BenchArgs {}

/// Runs `vmcp bench`.
pub async fn run(_args: BenchArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`vmcp bench` is not available in this build yet")
}
