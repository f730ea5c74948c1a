//! `vmcp snapshot create|list|rm|prune`: the snapshot store (see `snapshots.rs`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use vmcp_vm::{Accel, Arch, DiskConfig, VmConfig};

use crate::snapshots::{self, Record};

/// How long the VM to snapshot may take to boot.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// `vmcp snapshot` subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum SnapshotCommand {
    /// Boot a VM, wait for its agent, flush its file systems and save it. Without --name
    /// it becomes the snapshot `vmcp run` restores for the same flags.
    Create(CreateArgs),
    /// List the snapshots, with what they were made for and whether they still fit.
    List,
    /// Remove snapshots by name.
    Rm {
        /// Names (see `vmcp snapshot list`).
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Remove snapshots that no longer fit this vmcp, image or QEMU, and leftovers of
    /// interrupted builds.
    Prune,
}

/// Arguments of `vmcp snapshot create`.
#[derive(clap::Args, Debug)]
pub struct CreateArgs {
    /// Name (default: the automatic name `vmcp run` looks for).
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// Virtual CPUs.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub cpus: u32,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256, value_name = "MIB")]
    pub memory: u32,
    /// Raw disk image (ext4) attached read-only as the guest's root filesystem.
    #[arg(long, value_name = "IMG")]
    pub rootfs: Option<PathBuf>,
    /// QEMU accelerator (probed when absent).
    #[arg(long, value_parser = crate::run::parse_accel)]
    pub accel: Option<Accel>,
    /// Kernel to boot instead of the built image's (needs --initrd).
    #[arg(long, value_name = "FILE", requires = "initrd")]
    pub kernel: Option<PathBuf>,
    /// Initramfs to boot instead of the built image's (needs --kernel).
    #[arg(long, value_name = "FILE", requires = "kernel")]
    pub initrd: Option<PathBuf>,
}

/// Runs `vmcp snapshot ...`.
pub async fn run(cmd: SnapshotCommand) -> anyhow::Result<ExitCode> {
    let store = snapshots::store_dir()?;
    match cmd {
        SnapshotCommand::Create(args) => create(&store, args).await,
        SnapshotCommand::List => {
            let all = snapshots::list(&store)?;
            if all.is_empty() {
                println!("no snapshots in {}", store.display());
            }
            for s in all {
                let what = match &s.record {
                    Ok(r) => format!(
                        "{} {} vCPU {} MiB, accel {}, vmcp {}{}",
                        r.arch,
                        r.cpus,
                        r.memory_mib,
                        r.accel,
                        r.vmcp_version,
                        if fits_current_files(r) {
                            ""
                        } else {
                            " (stale: image or QEMU changed)"
                        }
                    ),
                    Err(e) => format!("unusable: {e}"),
                };
                println!(
                    "{:<24} {:>8.1} MiB  {what}",
                    s.name,
                    s.disk_bytes() as f64 / (1 << 20) as f64
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        SnapshotCommand::Rm { names } => {
            for name in names {
                match snapshots::find(&store, &name)? {
                    Some(s) => snapshots::remove(&s.dir)?,
                    None => anyhow::bail!("no snapshot {name:?} (see `vmcp snapshot list`)"),
                }
                println!("removed {name}");
            }
            Ok(ExitCode::SUCCESS)
        }
        SnapshotCommand::Prune => {
            let swept = snapshots::sweep_builds(&store, Duration::from_secs(3600));
            let mut removed = 0;
            for s in snapshots::list(&store)? {
                let keep = s.record.as_ref().is_ok_and(fits_current_files);
                if !keep {
                    snapshots::remove(&s.dir)?;
                    println!("removed {}", s.name);
                    removed += 1;
                }
            }
            println!("pruned {removed} snapshots and {swept} unfinished builds");
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Whether the files a snapshot was made from are still the same, and vmcp too.
fn fits_current_files(r: &Record) -> bool {
    let same = |f: &snapshots::FileId| {
        snapshots::FileId::of(std::path::Path::new(&f.path)).is_ok_and(|now| now == *f)
    };
    r.vmcp_version == env!("CARGO_PKG_VERSION")
        && same(&r.kernel)
        && same(&r.initrd)
        && same(&r.hypervisor)
        && r.rootfs.as_ref().is_none_or(same)
}

async fn create(store: &std::path::Path, args: CreateArgs) -> anyhow::Result<ExitCode> {
    let (kernel, initrd) = match (args.kernel, args.initrd) {
        (Some(k), Some(i)) => (k, i),
        _ => crate::run::ensure_image(Arch::host()).await?,
    };
    let mut config = VmConfig::new(kernel, initrd);
    config.cpus = args.cpus;
    config.memory_mib = args.memory;
    config.rootfs = args.rootfs.map(|path| DiskConfig {
        path,
        read_only: true,
    });
    config.backend = Some(vmcp_vm::BackendKind::Qemu);
    config.accel = args.accel;
    let selection = crate::run::select(&mut config).await?;
    for notice in &selection.notices {
        eprintln!("vmcp: notice: {notice}");
    }
    let bin = vmcp_vm::qemu::binary::find(config.arch)?;
    let record = Record::for_config(&config, &bin)?;
    let name = args.name.unwrap_or_else(|| record.auto_name());
    snapshots::check_name(&name)?;
    let t = std::time::Instant::now();
    let mut vm = snapshots::create(store, &name, &config, &record, READY_TIMEOUT).await?;
    let _ = vm.kill().await;
    println!(
        "created snapshot {name} in {:.1} s ({})",
        t.elapsed().as_secs_f64(),
        store.join(&name).display()
    );
    Ok(ExitCode::SUCCESS)
}
