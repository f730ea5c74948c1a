//! `vmcp doctor`: which backends and accelerators work here, and why the others do not.
//!
//! Exit status 0 when at least one backend can run VMs, 1 otherwise.

use std::process::ExitCode;

use vmcp_vm::select::{self, Check};
use vmcp_vm::Arch;

/// Arguments of `vmcp doctor`.
#[derive(clap::Args, Debug)]
pub struct DoctorArgs {}

/// Runs `vmcp doctor`.
pub async fn run(_args: DoctorArgs) -> anyhow::Result<ExitCode> {
    if cfg!(windows) {
        // Windows section (engineer "windows"): WHP, QEMU and the accelerator `vmcp run` uses.
        let mut report = vmcp_vm::windows::doctor_report().await;
        let image = image_check(Arch::host());
        report.add_check(vmcp_vm::windows::doctor::Check {
            label: "guest image",
            ok: image.ok,
            fix: (!image.ok).then(|| {
                "run `vmcp image build` (on Windows it needs the pinned .debs and the agent: \
                 see docs/windows.md)"
                    .to_string()
            }),
            detail: image.detail,
        });
        println!("{report}");
        return Ok(if report.can_run() {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        });
    }
    let mut report = select::doctor().await;
    report.checks.push(image_check(Arch::host()));
    print!("{}", report.render());
    if report.can_run_vms {
        println!("vmcp can run VMs here");
        Ok(ExitCode::SUCCESS)
    } else {
        println!("vmcp cannot run VMs here: fix a line marked `no` above");
        Ok(ExitCode::from(1))
    }
}

/// Whether the guest image is built.
fn image_check(arch: Arch) -> Check {
    match crate::run::find_image(arch) {
        Ok(Some(paths)) => Check::new("image", true, format!("built: {}", paths.0.display())),
        Ok(None) => Check::new(
            "image",
            false,
            "not built yet: run `vmcp image build` (or let `vmcp run` build it on first use)",
        ),
        Err(e) => Check::new("image", false, format!("{e:#}")),
    }
}
