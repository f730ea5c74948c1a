//! `vmcp doctor`.

use std::process::ExitCode;

/// Arguments of `vmcp doctor`.
#[derive(clap::Args)]
pub struct DoctorArgs {}

/// Runs `vmcp doctor`.
pub async fn run(_args: DoctorArgs) -> anyhow::Result<ExitCode> {
    if cfg!(windows) {
        // Windows section (engineer "windows"): WHP, QEMU and the accelerator `vmcp run` uses.
        let report = vmcp_vm::windows::doctor_report().await;
        println!("{report}");
        return Ok(if report.can_run() {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        });
    }
    anyhow::bail!("`vmcp doctor` is not available in this build yet")
}
