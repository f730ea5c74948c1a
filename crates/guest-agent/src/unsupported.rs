//! Entry point on systems other than Linux: the agent only runs inside a Linux guest.

use std::process::ExitCode;

/// Prints that this binary only runs as `/init` of a Linux guest and fails.
pub fn main() -> ExitCode {
    eprintln!("vmcp-agent only runs as /init inside a Linux vmcp guest; nothing to do here");
    ExitCode::FAILURE
}
