//! `vmcp run`: one program in a fresh micro-VM, with the exit status of the program.
//!
//! Flow: find (or build) the guest image, let the selector pick backend and accelerator (a
//! notice on stderr when it falls back to something slower), boot, exec, pump stdin/stdout/stderr, power off. The VM lives
//! inside one future; Ctrl-C, SIGTERM and `--timeout` drop that future, and dropping the VM
//! kills QEMU and removes its runtime directory, so no path leaves anything behind.
//!
//! Exit status (the docker convention): the program's own code; 128+N when it was killed by
//! signal N; 124 on `--timeout`; 125 when vmcp itself failed; 126 when the program cannot be
//! executed; 127 when it does not exist; 130/143 when vmcp got SIGINT/SIGTERM.
//!
//! Stdin is forwarded when it is not a terminal (pipes, files, `/dev/null`) or with
//! `--interactive`; from a terminal without `-i` the program reads an empty stdin, as with
//! `docker run` without `-i`. There is no pseudo-terminal in the guest.

#[cfg(unix)]
#[path = "run/signal_unix.rs"]
pub(crate) mod signal;
#[cfg(not(unix))]
#[path = "run/signal_other.rs"]
pub(crate) mod signal;

use std::io::{IsTerminal, Read};

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use tokio::io::AsyncWriteExt;
use vmcp_guest_proto::{ExitStatus, FailureKind};
use vmcp_vm::agent::{AgentClient, AgentError, ExecSpec, ProcessEvent};
use vmcp_vm::{Accel, Arch, BackendKind, DiskConfig, NetMode, PortForward, VmConfig};

use crate::EXIT_VMCP_FAILED;

/// Exit status when `--timeout` expired.
pub const EXIT_TIMEOUT: u8 = 124;
/// The program exists but cannot be executed.
pub const EXIT_NOT_EXECUTABLE: u8 = 126;
/// The program does not exist in the guest.
pub const EXIT_NOT_FOUND: u8 = 127;

/// How long the guest may take to boot.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the guest may take to power off before it is killed.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// Arguments of `vmcp run`.
#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Virtual CPUs.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub cpus: u32,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256, value_name = "MIB")]
    pub memory: u32,
    /// Raw disk image (ext4) to attach as the guest's root filesystem.
    #[arg(long, value_name = "IMG")]
    pub rootfs: Option<PathBuf>,
    /// Attach the root filesystem read-write (default: read-only).
    #[arg(long, requires = "rootfs")]
    pub rootfs_rw: bool,
    /// Root filesystem image (a name or key from `vmcp image list`, or an ext4 file), shared
    /// read-only; the VM writes to its own layer, discarded at the end.
    #[arg(long, value_name = "NAME|PATH", conflicts_with = "rootfs")]
    pub image: Option<String>,
    /// Keep the VM's writable layer in this new file (ext4; the changes are under /upper).
    #[arg(long, value_name = "PATH", requires = "image")]
    pub keep_changes: Option<PathBuf>,
    /// When the program ends, print the files it created (A), modified (M) and deleted (D).
    #[arg(long, requires = "image")]
    pub diff: bool,
    /// Share a host directory: HOST_DIR:GUEST_DIR[:ro|:rw] (repeatable; default ro). The
    /// guest gets a copy; with :rw its changes are copied back into HOST_DIR when the
    /// program ends (under a --policy that asks, only what was approved).
    #[arg(long, value_name = "HOST:GUEST[:ro|:rw]", value_parser = parse_share)]
    pub share: Vec<ShareArg>,
    /// Environment variable for the program (repeatable).
    #[arg(long = "env", short = 'e', value_name = "K=V", value_parser = parse_env)]
    pub env: Vec<(String, String)>,
    /// Working directory in the guest.
    #[arg(long, short = 'w', value_name = "DIR")]
    pub workdir: Option<String>,
    /// Destroy the VM and exit 124 when the program runs longer (seconds, decimals allowed).
    #[arg(long, value_name = "SECS", value_parser = parse_secs)]
    pub timeout: Option<Duration>,
    /// Backend: qemu (Linux, Windows) or vz (macOS); the host's best when absent.
    #[arg(long, value_parser = parse_backend)]
    pub backend: Option<BackendKind>,
    /// QEMU accelerator: kvm or tcg (Linux), whpx or tcg (Windows); probed when absent.
    #[arg(long, value_parser = parse_accel)]
    pub accel: Option<Accel>,
    /// Guest network: none (no network card), allow=HOST[:PORT],... (only through vmcp's
    /// egress proxy; names, *.suffix, IP addresses, CIDR ranges), or nat (unrestricted).
    #[arg(long, value_name = "MODE", default_value = "none", value_parser = parse_net)]
    pub net: NetMode,
    /// Publish a guest TCP port on the host: HOST_PORT:GUEST_PORT (on 127.0.0.1) or
    /// ADDRESS:HOST_PORT:GUEST_PORT (repeatable).
    #[arg(long, value_name = "[ADDR:]HOST_PORT:GUEST_PORT", value_parser = parse_publish)]
    pub publish: Vec<PortForward>,
    /// How an allow-list and published ports reach the guest: channel (the default: over the
    /// guest agent's channel, no network card at all) or card (a restricted network card,
    /// about twice the bulk throughput under TCG; QEMU on Linux and macOS only).
    #[arg(long, value_name = "channel|card", value_parser = crate::run::parse_net_via)]
    pub net_via: Option<bool>,
    /// Forward stdin even when it is a terminal.
    #[arg(long, short = 'i')]
    pub interactive: bool,
    /// Kernel to boot instead of the built image's (needs --initrd).
    #[arg(long, value_name = "FILE", requires = "initrd")]
    pub kernel: Option<PathBuf>,
    /// Initramfs to boot instead of the built image's (needs --kernel).
    #[arg(long, value_name = "FILE", requires = "kernel")]
    pub initrd: Option<PathBuf>,
    /// Also write the guest console to this file.
    #[arg(long, value_name = "FILE")]
    pub console_log: Option<PathBuf>,
    /// Boot cold instead of restoring the matching snapshot.
    #[arg(long, conflicts_with = "snapshot")]
    pub cold: bool,
    /// Restore this snapshot (`vmcp snapshot create --name NAME`); an error if it does not
    /// fit the VM or cannot be restored. Default: the matching automatic snapshot.
    #[arg(long, value_name = "NAME")]
    pub snapshot: Option<String>,
    /// Start a VM here even when a `vmcp daemon` has a ready one for these flags.
    #[arg(long)]
    pub no_daemon: bool,
    /// Approval of what crosses from the VM to the host.
    #[command(flatten)]
    pub approval: crate::approvals::ApprovalArgs,
    /// The program and its arguments (after `--`).
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "PROGRAM"
    )]
    pub command: Vec<String>,
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() && !k.contains('\0') && !v.contains('\0') => {
            Ok((k.to_string(), v.to_string()))
        }
        _ => Err(format!("expected K=V with a non-empty name, got {s:?}")),
    }
}

/// A `--share` value.
#[derive(Debug, Clone)]
pub struct ShareArg {
    pub(crate) host: PathBuf,
    pub(crate) guest: String,
    pub(crate) writable: bool,
}

pub(crate) fn parse_share(s: &str) -> Result<ShareArg, String> {
    let (rest, writable) = if let Some(r) = s.strip_suffix(":rw") {
        (r, true)
    } else if let Some(r) = s.strip_suffix(":ro") {
        (r, false)
    } else {
        (s, false)
    };
    match rest.rsplit_once(':') {
        Some((host, guest)) if !host.is_empty() && guest.starts_with('/') => Ok(ShareArg {
            host: PathBuf::from(host),
            guest: guest.to_string(),
            writable,
        }),
        _ => Err(format!(
            "expected HOST_DIR:GUEST_DIR[:ro|:rw] with an absolute GUEST_DIR, got {s:?}"
        )),
    }
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .parse()
        .map_err(|_| format!("expected seconds such as 30 or 0.5, got {s:?}"))?;
    if !(secs.is_finite() && secs > 0.0 && secs < 1.0e9) {
        return Err(format!(
            "the timeout must be a positive number of seconds, got {s:?}"
        ));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Parses `--net`.
pub fn parse_net(s: &str) -> Result<NetMode, String> {
    s.parse::<NetMode>().map_err(|e| {
        let mut msg = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(cause) = src {
            msg.push_str(&format!(": {cause}"));
            src = cause.source();
        }
        msg
    })
}

/// Parses `--publish`.
pub fn parse_publish(s: &str) -> Result<PortForward, String> {
    s.parse::<PortForward>().map_err(|e| e.to_string())
}

/// Parses `--net-via`: whether the network goes on a card (else over the agent channel).
pub fn parse_net_via(s: &str) -> Result<bool, String> {
    match s {
        "card" => Ok(true),
        "channel" => Ok(false),
        _ => Err(format!("expected channel or card, not {s:?}")),
    }
}

/// Parses `--accel`.
pub fn parse_accel(s: &str) -> Result<Accel, String> {
    s.parse::<Accel>().map_err(|e| e.to_string())
}

/// Parses `--backend`.
pub fn parse_backend(s: &str) -> Result<BackendKind, String> {
    s.parse::<BackendKind>().map_err(|e| e.to_string())
}

/// Kernel and initrd to boot.
struct BootFiles {
    kernel: PathBuf,
    initrd: PathBuf,
}

/// The backend and accelerator for `config` (the selector's choice, written into `config`),
/// and the notices to print once the VM is created.
pub async fn select(config: &mut VmConfig) -> anyhow::Result<vmcp_vm::select::Selection> {
    let selection = vmcp_vm::select::select(config).await?;
    config.accel = selection.accel;
    Ok(selection)
}

/// The built image for `arch` (kernel, initrd), if there is one; never builds.
pub fn find_image(arch: Arch) -> anyhow::Result<Option<(PathBuf, PathBuf)>> {
    let opts = vmcp_image::BuildOptions::new(arch.into());
    Ok(vmcp_image::find_image(&opts)
        .context("cannot look up the guest image")?
        .map(|p| (p.kernel, p.initrd)))
}

/// The built image for `arch`, building it on first use (with progress on stderr).
pub async fn ensure_image(arch: Arch) -> anyhow::Result<(PathBuf, PathBuf)> {
    if let Some(found) = find_image(arch)? {
        return Ok(found);
    }
    let arch: vmcp_image::Arch = arch.into();
    eprintln!("vmcp: the guest image is not built yet; building it now (one time)");
    let paths = tokio::task::spawn_blocking(move || {
        vmcp_image::ensure_image(arch, &|line: &str| eprintln!("vmcp: image: {line}"))
    })
    .await
    .context("the image build task failed")?
    .context("cannot build the guest image (try `vmcp image build` for details)")?;
    Ok((paths.kernel, paths.initrd))
}

async fn boot_files(args: &RunArgs) -> anyhow::Result<BootFiles> {
    if let (Some(kernel), Some(initrd)) = (&args.kernel, &args.initrd) {
        return Ok(BootFiles {
            kernel: kernel.clone(),
            initrd: initrd.clone(),
        });
    }
    let (kernel, initrd) = ensure_image(Arch::host()).await?;
    Ok(BootFiles { kernel, initrd })
}

/// Runs `vmcp run`.
pub async fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let forward_stdin = args.interactive || !std::io::stdin().is_terminal();
    tokio::select! {
        r = run_in_vm(args, forward_stdin) => r,
        sig = signal::termination() => {
            // Dropping `run_in_vm` dropped the VM: QEMU is killed and reaped, its directory
            // removed.
            eprintln!("vmcp: got {}, destroyed the VM", sig.name);
            Ok(ExitCode::from(128 + sig.number))
        }
    }
}

/// An image attached to this run: what the VM config needs, the run defaults, and the
/// writable layer's file (removed at the end unless kept).
pub(crate) struct AttachedImage {
    pub(crate) config: vmcp_vm::ImageConfig,
    pub(crate) env: Vec<(String, String)>,
    pub(crate) workdir: Option<String>,
    /// The per-VM writable layer's directory: removed on drop, and (owner file) swept by the
    /// next vmcp if this one is killed.
    _scratch_dir: Option<vmcp_host_process::RuntimeDir>,
}

pub(crate) fn attach_image(
    what: &str,
    keep: Option<&std::path::Path>,
) -> anyhow::Result<AttachedImage> {
    let cache = vmcp_image::default_cache_dir()?;
    let (path, id, info) = match vmcp_image::rootfs::find(&cache, what) {
        Ok(img) => (img.disk, img.info.key.clone(), Some(img.info)),
        Err(_) if std::path::Path::new(what).is_file() => {
            let path = std::fs::canonicalize(what)
                .with_context(|| format!("cannot resolve the image path {what}"))?;
            // An image file copied out of the cache keeps its metadata next to it.
            let info = path
                .parent()
                .and_then(|d| vmcp_image::rootfs::load(d).ok())
                .filter(|i| i.disk == path)
                .map(|i| i.info);
            let id = format!("path:{}", path.display());
            (path, id, info)
        }
        Err(e) => return Err(anyhow::Error::new(e).context(format!("cannot use --image {what}"))),
    };
    let (scratch, dir) = match keep {
        Some(p) => (p.to_path_buf(), None),
        None => {
            let dir = vmcp_host_process::RuntimeDir::create_in(&std::env::temp_dir(), "layer")
                .context("cannot create a directory for the writable layer")?;
            (dir.path().join("layer.ext4"), Some(dir))
        }
    };
    crate::image_cmd::import::make_scratch(&scratch)
        .with_context(|| format!("cannot create the writable layer {}", scratch.display()))?;
    let mut config = vmcp_vm::ImageConfig::new(path, id, scratch);
    let (mut env, mut workdir) = (Vec::new(), None);
    if let Some(info) = info {
        config.user = info.uid_gid;
        env = info
            .env
            .iter()
            .filter_map(|kv| kv.split_once('='))
            .filter(|(k, _)| !k.is_empty())
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        workdir = info.workdir;
    }
    Ok(AttachedImage {
        config,
        env,
        workdir,
        _scratch_dir: dir,
    })
}

/// The ext4 copies of the `--share` directories, in a temporary directory.
pub(crate) struct Shares {
    pub(crate) configs: Vec<vmcp_vm::ShareConfig>,
    hosts: Vec<PathBuf>,
    dir: Option<tempfile::TempDir>,
}

pub(crate) fn make_shares(args: &[ShareArg]) -> anyhow::Result<Shares> {
    let mut shares = Shares {
        configs: Vec::new(),
        hosts: Vec::new(),
        dir: None,
    };
    if args.is_empty() {
        return Ok(shares);
    }
    let dir = tempfile::Builder::new()
        .prefix("vmcp-shares-")
        .tempdir()
        .context("cannot create a directory for the shares")?;
    for (i, s) in args.iter().enumerate() {
        let host = std::fs::canonicalize(&s.host)
            .with_context(|| format!("cannot share {}", s.host.display()))?;
        if !host.is_dir() {
            anyhow::bail!("cannot share {}: not a directory", host.display());
        }
        let disk = dir.path().join(format!("share-{i}.ext4"));
        crate::image_cmd::import::make_share_disk(&host, &disk)
            .with_context(|| format!("cannot copy {} for the guest", host.display()))?;
        shares
            .configs
            .push(vmcp_vm::ShareConfig::new(disk, s.guest.clone(), s.writable));
        shares.hosts.push(host);
    }
    shares.dir = Some(dir);
    Ok(shares)
}

/// Largest change set copied back from one writable share.
const MAX_SHARE_CHANGES: u64 = 8 << 30;

/// Copies the changes of every writable share back into its host directory; under an
/// approval policy, only what the policy and a person let through (a line per share on
/// stderr says what happened).
pub(crate) async fn copy_back(
    agent: &AgentClient,
    shares: &Shares,
    approvals: Option<&crate::approvals::Approvals>,
    program: &str,
) -> anyhow::Result<()> {
    let Some(dir) = &shares.dir else {
        return Ok(());
    };
    for (i, (cfg, host)) in shares.configs.iter().zip(&shares.hosts).enumerate() {
        if !cfg.writable {
            continue;
        }
        let tar_path = dir.path().join(format!("changes-{i}.tar"));
        let mut file = std::fs::File::create(&tar_path)
            .with_context(|| format!("cannot create {}", tar_path.display()))?;
        let index = u32::try_from(i).unwrap_or(u32::MAX);
        let bytes = agent
            .export_share(index, MAX_SHARE_CHANGES, &mut file)
            .await
            .with_context(|| {
                format!(
                    "cannot get the changes of {} from the guest",
                    cfg.guest_path
                )
            })?;
        drop(file);
        let apply = |host: &std::path::Path, tar: &std::path::Path| {
            crate::image_cmd::import::apply_share_changes(host, tar)
                .with_context(|| format!("cannot copy the changes back into {}", host.display()))
        };
        match approvals {
            None => {
                let (host2, tar2) = (host.clone(), tar_path.clone());
                tokio::task::spawn_blocking(move || apply(&host2, &tar2))
                    .await
                    .context("the copy-back task failed")??;
                tracing::info!(share = %host.display(), bytes, "copied share changes back");
            }
            Some(a) => {
                let cmd = a.command_name();
                let origin = crate::share_gate::Origin {
                    sandbox: format!("{cmd} {program} (pid {})", std::process::id()),
                    context: Some(format!("{cmd} {program}, share {}", cfg.guest_path)),
                    // `vmcp mcp wrap` without the page: denied at once, saying nobody can be
                    // asked (its stdin carries MCP, not a person's answer).
                    askers: a.fallback_askers(),
                };
                let report = crate::share_gate::settle(a, host, &tar_path, origin, apply).await?;
                eprintln!("vmcp: {}", report.summary());
            }
        }
        let _ = std::fs::remove_file(&tar_path);
    }
    Ok(())
}

async fn run_in_vm(args: RunArgs, forward_stdin: bool) -> anyhow::Result<ExitCode> {
    // A running `vmcp daemon` with a ready VM for these flags is the fastest start.
    if let Some(code) = crate::daemon_cmd::try_run(&args, forward_stdin).await? {
        return Ok(code);
    }
    let files = boot_files(&args).await?;
    vmcp_vm::timing::mark("run: guest image found");
    let approvals =
        crate::approvals::Approvals::start(&args.approval, crate::approvals::Frontend::Terminal)
            .await?;
    let shares = make_shares(&args.share)?;
    let image = match &args.image {
        Some(what) => Some(attach_image(what, args.keep_changes.as_deref())?),
        None => None,
    };
    let mut config = VmConfig::new(files.kernel, files.initrd);
    config.cpus = args.cpus;
    config.memory_mib = args.memory;
    config.rootfs = args.rootfs.clone().map(|path| DiskConfig {
        path,
        read_only: !args.rootfs_rw,
    });
    config.image = image.as_ref().map(|i| i.config.clone());
    config.shares = shares.configs.clone();
    config.console_log = args.console_log.clone();
    config.net.mode = args.net.clone();
    config.net.publish = args.publish.clone();
    config.net.card = args.net_via.unwrap_or(false);
    if let (Some(a), NetMode::Allow(_)) = (&approvals, &config.net.mode) {
        let program = args.command.first().cloned().unwrap_or_default();
        config.net.gate =
            Some(a.egress_gate(&format!("vmcp run {program} (pid {})", std::process::id())));
    }
    if let Some(w) = config.net.warning() {
        eprintln!("vmcp: {w}");
    }
    config.backend = args.backend;
    config.accel = args.accel;
    let selection = select(&mut config).await?;
    vmcp_vm::timing::mark("run: backend selected");
    let from_snapshot = snapshot_start(&args, &config, selection.backend.name()).await?;
    let disposable = from_snapshot.is_some();
    let mut vm = match from_snapshot {
        Some(vm) => vm,
        None => {
            let mut vm = selection.backend.create(config).await?;
            vmcp_vm::timing::mark("run: VM created (cold)");
            // After validation, so a bad input gets exactly one line.
            for notice in &selection.notices {
                eprintln!("vmcp: notice: {notice}");
            }
            vm.start().await?;
            vm.wait_ready(READY_TIMEOUT).await?;
            vmcp_vm::timing::mark("run: agent ready (cold boot)");
            vm
        }
    };
    let agent = vm.agent()?;
    // The image's Env and WorkingDir are defaults; -e and -w win.
    let mut env = image.as_ref().map(|i| i.env.clone()).unwrap_or_default();
    env.extend(args.env.iter().cloned());
    let spec = ExecSpec {
        argv: args.command.clone(),
        env,
        cwd: args
            .workdir
            .clone()
            .or_else(|| image.as_ref().and_then(|i| i.workdir.clone())),
        stdin: forward_stdin,
    };
    let program = args.command.first().cloned().unwrap_or_default();
    tracing::debug!(program, "running the program");
    let code = match args.timeout {
        Some(t) => match tokio::time::timeout(t, exec(&agent, spec, &program)).await {
            Ok(r) => r?,
            Err(_) => {
                drop(vm);
                eprintln!(
                    "vmcp: {program} still ran after the {}s timeout; destroyed the VM",
                    t.as_secs_f64()
                );
                return Ok(ExitCode::from(EXIT_TIMEOUT));
            }
        },
        None => exec(&agent, spec, &program).await?,
    };
    if args.diff {
        print_changes(&agent).await;
    }
    vmcp_vm::timing::mark("run: program exited");
    let copied = copy_back(&agent, &shares, approvals.as_ref(), &program).await;
    drop(agent);
    tracing::debug!("program done; stopping the VM");
    if disposable {
        // Nothing of a snapshot VM outlives it (its root disk, if any, is read-only), so a
        // guest power-off would only cost time.
        if let Err(e) = vm.kill().await {
            tracing::warn!(error = %e, "VM kill failed");
        }
    } else if let Err(e) = vm.shutdown(SHUTDOWN_TIMEOUT).await {
        tracing::warn!(error = %e, "VM shutdown failed; it was killed");
    }
    vmcp_vm::timing::mark("run: VM stopped");
    copied?;
    if let Some(p) = &args.keep_changes {
        eprintln!(
            "vmcp: kept the writable layer in {} (ext4; the changes are under /upper)",
            p.display()
        );
    }
    Ok(ExitCode::from(code))
}

/// `--diff`: the change list on stderr, one `A|M|D <path>` line each.
async fn print_changes(agent: &AgentClient) {
    match agent.list_changes().await {
        Ok(c) => {
            eprintln!("vmcp: {} changes in the writable layer:", c.changes.len());
            for ch in &c.changes {
                let k = match ch.kind {
                    vmcp_vm::agent::ChangeKind::Added => 'A',
                    vmcp_vm::agent::ChangeKind::Modified => 'M',
                    vmcp_vm::agent::ChangeKind::Deleted => 'D',
                    _ => '?',
                };
                eprintln!("{k} {}", ch.path);
            }
            if c.truncated {
                eprintln!("vmcp: the change list was cut at the guest's size limit");
            }
        }
        Err(e) => eprintln!("vmcp: cannot list the changes: {e}"),
    }
}

/// A VM restored from a snapshot, or `None` for a cold boot: with `--snapshot NAME` that
/// snapshot (errors are errors); else the automatic snapshot matching this VM, built on
/// first use; a broken one is removed and the VM boots cold, with a notice. Only QEMU VMs
/// without a writable root disk use snapshots (a restored guest's view of a disk that
/// changed since would be wrong).
async fn snapshot_start(
    args: &RunArgs,
    config: &VmConfig,
    backend: &str,
) -> anyhow::Result<Option<Box<dyn vmcp_vm::Vm>>> {
    use crate::snapshots;
    // A bad configuration is reported as such, not as a snapshot problem.
    config.validate()?;
    let cold_reason = snapshots::cold_reason(config, backend);
    if args.cold || (cold_reason.is_some() && args.snapshot.is_none()) {
        return Ok(None);
    }
    if let Some(why) = cold_reason {
        anyhow::bail!(
            "--snapshot cannot be used here: {why} (snapshots need the QEMU backend on Linux, no --rootfs-rw, --image, --share or --net/--publish)"
        );
    }
    if let Some(name) = &args.snapshot {
        let record = vmcp_vm::qemu::binary::find(config.arch)
            .map_err(anyhow::Error::new)
            .and_then(|bin| snapshots::Record::for_config(config, &bin))?;
        let store = snapshots::store_dir()?;
        let stored = snapshots::find(&store, name)?
            .ok_or_else(|| anyhow::anyhow!("no snapshot {name:?} (see `vmcp snapshot list`)"))?;
        return snapshots::restore(&stored, config, &record, READY_TIMEOUT)
            .await
            .map(Some);
    }
    let notice = |s: &str| eprintln!("vmcp: notice: {s}");
    Ok(
        match snapshots::auto_start(config, READY_TIMEOUT, &notice).await? {
            snapshots::AutoStart::Restored(vm) | snapshots::AutoStart::Built(vm) => Some(vm),
            snapshots::AutoStart::Cold(why) => {
                if let Some(why) = why {
                    notice(&why);
                }
                None
            }
        },
    )
}

/// Runs the program and streams its I/O; returns vmcp's exit status.
pub(crate) async fn exec(agent: &AgentClient, spec: ExecSpec, program: &str) -> anyhow::Result<u8> {
    let forward_stdin = spec.stdin;
    let started = agent.exec(spec).await;
    vmcp_vm::timing::mark("run: exec request answered");
    let mut process = match started {
        Ok(p) => p,
        Err(AgentError::Failed { kind, message }) => {
            let code = match kind {
                FailureKind::NotFound => EXIT_NOT_FOUND,
                FailureKind::PermissionDenied => EXIT_NOT_EXECUTABLE,
                _ => EXIT_VMCP_FAILED,
            };
            eprintln!("vmcp: cannot run {program} in the guest: {message}");
            return Ok(code);
        }
        Err(e) => return Err(anyhow::Error::new(e).context(format!("cannot run {program}"))),
    };
    let stdin_task = forward_stdin.then(|| {
        let ctl = process.control().clone();
        let mut rx = stdin_reader();
        tokio::spawn(async move {
            while let Some(chunk) = rx.recv().await {
                if ctl.write_stdin(&chunk).await.is_err() {
                    return;
                }
            }
            let _ = ctl.close_stdin().await;
        })
    });
    let mut stdout = tokio::io::stdout();
    let mut stderr = tokio::io::stderr();
    let status = loop {
        match process.next_event().await {
            Ok(Some(ProcessEvent::Stdout(d))) => {
                // A closed stdout (e.g. `| head`) must not stop the program's other stream.
                let _ = stdout.write_all(&d).await;
                let _ = stdout.flush().await;
            }
            Ok(Some(ProcessEvent::Stderr(d))) => {
                let _ = stderr.write_all(&d).await;
                let _ = stderr.flush().await;
            }
            Ok(Some(ProcessEvent::Exited(s))) => break s,
            Ok(None) => anyhow::bail!("the guest agent ended {program} without an exit status"),
            Err(e) => return Err(anyhow::Error::new(e).context(format!("lost {program}"))),
        }
    };
    if let Some(t) = stdin_task {
        t.abort();
    }
    Ok(exit_code(status))
}

/// Maps a guest exit status to vmcp's exit status.
pub fn exit_code(status: ExitStatus) -> u8 {
    match status {
        ExitStatus::Code(c) => u8::try_from(c).unwrap_or(EXIT_VMCP_FAILED),
        ExitStatus::Signal(n) => u8::try_from(128 + n.clamp(0, 127)).unwrap_or(255),
    }
}

/// Reads our stdin on a plain thread (not tokio's blocking pool, which would keep the
/// runtime from shutting down while a read blocks) and hands chunks over; the channel
/// closes at end of input.
pub(crate) fn stdin_reader() -> tokio::sync::mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let spawned = std::thread::Builder::new()
        .name("vmcp-stdin".into())
        .spawn(move || {
            let mut stdin = std::io::stdin().lock();
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if tx.blocking_send(buf[..n].to_vec()).is_err() {
                            return;
                        }
                    }
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot read stdin; the program gets an empty stdin");
    }
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_docker() {
        assert_eq!(exit_code(ExitStatus::Code(0)), 0);
        assert_eq!(exit_code(ExitStatus::Code(3)), 3);
        assert_eq!(exit_code(ExitStatus::Code(255)), 255);
        assert_eq!(exit_code(ExitStatus::Code(-1)), EXIT_VMCP_FAILED);
        assert_eq!(exit_code(ExitStatus::Signal(9)), 137);
        assert_eq!(exit_code(ExitStatus::Signal(15)), 143);
        assert_eq!(exit_code(ExitStatus::Signal(500)), 255);
    }

    #[test]
    fn flag_parsers() {
        assert_eq!(parse_env("A=b=c").unwrap(), ("A".into(), "b=c".into()));
        assert_eq!(parse_env("A=").unwrap(), ("A".into(), String::new()));
        assert!(parse_env("=x").unwrap_err().contains("K=V"));
        assert!(parse_env("noequals").is_err());
        assert_eq!(parse_secs("0.5").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_secs("30").unwrap(), Duration::from_secs(30));
        for bad in ["0", "-1", "nan", "inf", "x", "1e30", "1e9", "-0", "1e-400"] {
            assert!(parse_secs(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_accel("tcg").unwrap(), Accel::Tcg);
        assert!(parse_accel("xen").unwrap_err().contains("kvm or tcg"));
        assert_eq!(parse_backend("qemu").unwrap(), BackendKind::Qemu);
        assert!(parse_backend("xen").unwrap_err().contains("qemu"));
    }
}
