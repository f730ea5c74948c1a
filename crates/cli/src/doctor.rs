//! `vmcp doctor`: the backend selector explaining itself. Every backend compiled for this OS
//! contributes its checks, the guest image is checked, and the last line says what `vmcp run`
//! would use or why it cannot start a VM.
//!
//! Exit status 0 when `vmcp run` can start VMs here, 1 otherwise.

use std::process::ExitCode;

use vmcp_vm::select::{self, Check, Section};
use vmcp_vm::Arch;

/// Arguments of `vmcp doctor`.
#[derive(clap::Args, Debug)]
pub struct DoctorArgs {}

/// Runs `vmcp doctor`.
pub async fn run(_args: DoctorArgs) -> anyhow::Result<ExitCode> {
    let mut report = select::doctor().await;
    report.push_section(Section::new("guest image", vec![image_check(Arch::host())]));
    println!("{report}");
    Ok(if report.can_run_vms() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Whether the guest image is built.
fn image_check(arch: Arch) -> Check {
    match crate::run::find_image(arch) {
        Ok(Some(paths)) => Check::new("image", true, format!("built: {}", paths.0.display())),
        Ok(None) => Check::new("image", false, "not built yet").with_fix(
            "run `vmcp image build` (or let `vmcp run` build it on first use; on Windows it \
             needs the pinned .debs and the agent: see docs/windows.md)",
        ),
        Err(e) => Check::new("image", false, format!("{e:#}")),
    }
}
