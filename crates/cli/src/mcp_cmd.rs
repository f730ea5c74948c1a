//! `vmcp mcp ...`.

use std::process::ExitCode;

/// `vmcp mcp` subcommands.
#[derive(clap::Subcommand)]
pub enum McpCommand {
    /// List the tools of an MCP server.
    ListTools {},
}

/// Runs a `vmcp mcp` subcommand.
pub async fn run(_cmd: McpCommand) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`vmcp mcp` is not available in this build yet")
}
