//! `vmcp image ...`.

use std::process::ExitCode;

/// `vmcp image` subcommands.
#[derive(clap::Subcommand)]
pub enum ImageCommand {
    /// Build the guest image into the cache directory.
    Build {},
}

/// Runs a `vmcp image` subcommand.
pub async fn run(_cmd: ImageCommand) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`vmcp image` is not available in this build yet")
}
