//! Other platforms: the child is killed by tokio's `kill_on_drop`; no process group handling.

use tokio::process::Command;

/// Nothing to prepare.
pub(super) fn prepare(_cmd: &mut Command) {}

/// Nothing beyond killing the child itself.
pub(super) fn kill_group(_pid: u32) {}
