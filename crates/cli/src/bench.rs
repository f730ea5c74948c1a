//! `vmcp bench`: cold start, exec and ping latency, and idle memory of QEMU VMs.
//!
//! What is measured (host wall clock unless noted):
//! - **kernel → userspace**: QEMU spawn until QEMU exits, booting the same kernel and
//!   initramfs with `rdinit=/bin/true`: the first userspace program exits at once, the kernel
//!   panics ("attempted to kill init") and, with `panic=-1 -no-reboot`, QEMU exits. This is the
//!   time the kernel needs to reach its first userspace instruction, plus QEMU start and a
//!   few milliseconds of panic path; the baseline the agent-ready time is compared with.
//! - **cold start → agent ready**: `Vm::start` (spawn, QMP handshake) until the agent's hello.
//! - **guest clock at hello**: the guest's `CLOCK_BOOTTIME` in the hello (guest view of the
//!   same; under TCG the guest clock is only roughly right).
//! - **exec `true`** round trip on one running VM, and **ping** round trip.
//! - **idle RSS**: QEMU's `VmRSS` one second after the agent became ready.
//! - snapshot figures (checkpoint, restore, `vmcp run -- true` from the snapshot, PSS) and the
//!   warm-pool figures (pool acquire, `vmcp run -- true` with a `vmcp daemon`:
//!   bench_daemon.rs) of the same run.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use vmcp_vm::agent::ExecSpec;
use vmcp_vm::qemu::{QemuBackend, QemuVm};
use vmcp_vm::{Accel, Arch, BackendKind, Vm, VmConfig, VmError};

/// Arguments of `vmcp bench`.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Cold boots to time (at least 10 for the report's percentiles to mean something).
    #[arg(long, default_value_t = 10, value_name = "N")]
    pub runs: usize,
    /// Round trips of `true` and of ping on one VM.
    #[arg(long, default_value_t = 200, value_name = "N")]
    pub iterations: usize,
    /// QEMU accelerator (probed when absent).
    #[arg(long, value_parser = crate::run::parse_accel)]
    pub accel: Option<Accel>,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256, value_name = "MIB")]
    pub memory: u32,
    /// Kernel to boot instead of the built image's (needs --initrd).
    #[arg(long, value_name = "FILE", requires = "initrd")]
    pub kernel: Option<std::path::PathBuf>,
    /// Initramfs to boot instead of the built image's (needs --kernel).
    #[arg(long, value_name = "FILE", requires = "kernel")]
    pub initrd: Option<std::path::PathBuf>,
    /// Guest architecture (default: the host's; another one runs under TCG).
    #[arg(long, value_parser = parse_arch)]
    pub arch: Option<Arch>,
    /// VMs kept idle at once to compare the memory (PSS) of cold-booted and restored VMs
    /// (QEMU on Linux; 0 skips it).
    #[arg(long, default_value_t = 10, value_name = "N")]
    pub pss_vms: usize,
    /// Backend to measure (default: the selector's choice). QEMU gets the detailed report;
    /// others are measured through the lifecycle traits, with restore → agent ready where
    /// they can snapshot (see bench_backend.rs).
    #[arg(long, value_name = "NAME", value_parser = crate::run::parse_backend)]
    pub backend: Option<BackendKind>,
    /// Measure `--share` instead: a 100 MB tree of 5,000 files made visible in the guest and
    /// a 100 MB file read there, against `cp -r` on the host (bench_share.rs); `--runs` runs.
    #[arg(long)]
    pub share: bool,
    /// Measure sandboxes through `vmcp mcp serve` instead: `tools/call run` of `true` against
    /// `vmcp run -- true`, alternating, `--runs` rounds (bench_mcp.rs).
    #[arg(long, conflicts_with = "share")]
    pub mcp: bool,
    /// Measure an allow-listed guest's network instead: a `--mb` MB download and new
    /// connections over the agent channel and through a card, against the host, and the
    /// start of a networked `vmcp run`, alternating, `--runs` rounds (bench_net.rs).
    #[arg(long, conflicts_with_all = ["share", "mcp"])]
    pub net: bool,
    /// Size of the `--net` download in MB.
    #[arg(long, default_value_t = 100, value_name = "MB", requires = "net")]
    pub mb: usize,
}

fn parse_arch(s: &str) -> Result<Arch, String> {
    s.parse::<Arch>().map_err(|e| e.to_string())
}

/// Sorted samples with percentile helpers.
#[derive(Debug, Clone, PartialEq)]
pub struct Samples(Vec<Duration>);

impl Samples {
    /// Sorts `v`.
    pub fn new(mut v: Vec<Duration>) -> Self {
        v.sort();
        Samples(v)
    }
    /// The `p`-th percentile (nearest rank), `p` in 0..=100.
    pub fn pct(&self, p: f64) -> Duration {
        if self.0.is_empty() {
            return Duration::ZERO;
        }
        let rank = ((p / 100.0) * self.0.len() as f64).ceil() as usize;
        self.0[rank.clamp(1, self.0.len()) - 1]
    }
    /// Smallest sample.
    pub fn min(&self) -> Duration {
        self.0.first().copied().unwrap_or_default()
    }
    /// Number of samples.
    pub fn len(&self) -> usize {
        self.0.len()
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn us(d: Duration) -> String {
    format!("{:.0} µs", d.as_secs_f64() * 1e6)
}

/// Runs `vmcp bench`.
pub async fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    if args.runs == 0 || args.iterations == 0 {
        anyhow::bail!("--runs and --iterations must be at least 1");
    }
    let arch = args.arch.unwrap_or_else(Arch::host);
    let (kernel, initrd) = match (&args.kernel, &args.initrd) {
        (Some(k), Some(i)) => (k.clone(), i.clone()),
        _ => crate::run::ensure_image(arch).await?,
    };
    let mut config = VmConfig::new(kernel, initrd);
    config.arch = arch;
    config.memory_mib = args.memory;
    config.backend = args.backend;
    config.accel = args.accel;
    if args.share {
        crate::bench_share::run(&config, args.runs).await?;
        return Ok(ExitCode::SUCCESS);
    }
    if args.net {
        crate::bench_net::run(args.runs, args.mb)?;
        return Ok(ExitCode::SUCCESS);
    }
    if args.mcp {
        let image = match (&args.kernel, &args.initrd) {
            (Some(k), Some(i)) => vec![
                "--kernel".to_owned(),
                k.display().to_string(),
                "--initrd".to_owned(),
                i.display().to_string(),
            ],
            _ => Vec::new(),
        };
        crate::bench_mcp::run(args.runs, args.memory, image).await?;
        return Ok(ExitCode::SUCCESS);
    }
    let selection = crate::run::select(&mut config).await?;
    for n in &selection.notices {
        eprintln!("vmcp: notice: {n}");
    }
    let name = selection.backend.name();
    if name != BackendKind::Qemu.as_str() {
        eprintln!(
            "vmcp bench: backend {name}, {} runs, {} iterations, {} MiB",
            args.runs, args.iterations, args.memory
        );
        let dir = tempfile::tempdir()?;
        let report = crate::bench_backend::measure(
            selection.backend.as_ref(),
            &config,
            args.runs,
            args.iterations,
            dir.path(),
        )
        .await?;
        print!("{}", crate::bench_backend::render(&report));
        return Ok(ExitCode::SUCCESS);
    }
    let backend = QemuBackend::new();
    eprintln!(
        "vmcp bench: {} runs, {} iterations, {}, {} MiB",
        args.runs,
        args.iterations,
        selection.describe(),
        args.memory
    );

    // Interleave the two boots so host drift hits both alike.
    let mut to_userspace = Vec::with_capacity(args.runs);
    let mut ready = Vec::with_capacity(args.runs);
    let mut guest_ready = Vec::with_capacity(args.runs);
    for i in 0..args.runs {
        to_userspace.push(kernel_to_userspace(&backend, &config).await?);
        let (vm, wall, guest) = boot(&backend, &config).await?;
        ready.push(wall);
        guest_ready.push(guest);
        drop(vm);
        eprintln!(
            "  run {}: kernel→userspace {}, agent ready {}",
            i + 1,
            ms(to_userspace[i]),
            ms(wall)
        );
    }
    let to_userspace = Samples::new(to_userspace);
    let ready = Samples::new(ready);
    let guest_ready = Samples::new(guest_ready);

    let (mut vm, _, _) = boot(&backend, &config).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss = vm.rss_kib();
    let agent = vm.agent()?;
    // The first exec pages busybox in and warms TCG's translation cache; report it apart.
    let t = Instant::now();
    agent
        .exec(ExecSpec::new(["true"]))
        .await?
        .wait_with_output()
        .await?;
    let first_exec = t.elapsed();
    let mut exec = Vec::with_capacity(args.iterations);
    for _ in 0..args.iterations {
        let t = Instant::now();
        let out = agent
            .exec(ExecSpec::new(["true"]))
            .await?
            .wait_with_output()
            .await?;
        exec.push(t.elapsed());
        anyhow::ensure!(
            out.status == vmcp_guest_proto::ExitStatus::Code(0),
            "`true` failed in the guest: {:?}",
            out.status
        );
    }
    let mut ping = Vec::with_capacity(args.iterations);
    for _ in 0..args.iterations {
        ping.push(agent.ping().await?);
    }
    drop(agent);
    vm.shutdown(Duration::from_secs(5)).await?;
    let exec = Samples::new(exec);
    let ping = Samples::new(ping);

    let snap = snapshot_figures(&backend, &config, &args).await?;
    let pool = crate::bench_daemon::measure(&config, args.runs)?;

    let ratio = ready.pct(50.0).as_secs_f64() / to_userspace.pct(50.0).as_secs_f64().max(1e-9);
    println!("| metric | p50 | min / p99 |");
    println!("|---|---|---|");
    println!(
        "| kernel → first userspace (QEMU spawn → exit with rdinit=/bin/true), {} runs | {} | min {} |",
        to_userspace.len(),
        ms(to_userspace.pct(50.0)),
        ms(to_userspace.min())
    );
    println!(
        "| cold start → agent ready, {} runs | {} | min {} |",
        ready.len(),
        ms(ready.pct(50.0)),
        ms(ready.min())
    );
    println!(
        "| guest CLOCK_BOOTTIME at agent hello | {} | min {} |",
        ms(guest_ready.pct(50.0)),
        ms(guest_ready.min())
    );
    println!("| first exec `true` after boot | {} | |", ms(first_exec));
    println!(
        "| exec `true` round trip, {} iterations | {} | p99 {} |",
        exec.len(),
        ms(exec.pct(50.0)),
        ms(exec.pct(99.0))
    );
    println!(
        "| ping round trip, {} iterations | {} | p99 {} |",
        ping.len(),
        us(ping.pct(50.0)),
        us(ping.pct(99.0))
    );
    match rss {
        Some(kib) => println!(
            "| QEMU RSS, idle VM ({} MiB guest) | {:.0} MiB | |",
            args.memory,
            kib as f64 / 1024.0
        ),
        None => println!("| QEMU RSS, idle VM | unknown on this OS | |"),
    }
    snap.print(&ready);
    match &pool {
        Some(p) => p.print(),
        None => println!("| warm pool (`vmcp daemon`) | not available on this platform | |"),
    }
    println!("agent ready / kernel→userspace (p50): {ratio:.2}× (target ≤ 1.5×)");
    Ok(ExitCode::SUCCESS)
}

/// Snapshot figures of one run, printed beside the cold ones.
struct SnapshotFigures {
    checkpoint: Samples,
    fork: Samples,
    fork_n: (usize, Duration),
    rewind: Samples,
    restored_checkpoint: Duration,
    restore: Samples,
    restore_exec: Samples,
    run_true: Samples,
    pss: Option<(u64, u64, usize)>,
}

impl SnapshotFigures {
    fn print(&self, cold: &Samples) {
        println!(
            "| checkpoint of a running VM (pause, device state, copy of the memory file, resume), {} runs | {} | min {} |",
            self.checkpoint.len(),
            ms(self.checkpoint.pct(50.0)),
            ms(self.checkpoint.min())
        );
        println!(
            "| fork(1) of that checkpoint → the new VM's agent ready (re-keyed), {} runs | {} | min {} |",
            self.fork.len(),
            ms(self.fork.pct(50.0)),
            ms(self.fork.min())
        );
        println!(
            "| fork({}) → all ready, per fork | {} | total {} |",
            self.fork_n.0,
            ms(self.fork_n.1 / u32::try_from(self.fork_n.0.max(1)).unwrap_or(1)),
            ms(self.fork_n.1)
        );
        println!(
            "| rewind to that checkpoint → agent ready, {} runs | {} | min {} |",
            self.rewind.len(),
            ms(self.rewind.pct(50.0)),
            ms(self.rewind.min())
        );
        println!(
            "| checkpoint of a forked (restored) VM: RAM into the state file | {} | |",
            ms(self.restored_checkpoint)
        );
        println!(
            "| restore → agent ready (re-keyed), {} runs | {} | min {} |",
            self.restore.len(),
            ms(self.restore.pct(50.0)),
            ms(self.restore.min())
        );
        println!(
            "| restore → first exec `true` done, {} runs | {} | min {} |",
            self.restore_exec.len(),
            ms(self.restore_exec.pct(50.0)),
            ms(self.restore_exec.min())
        );
        println!(
            "| `vmcp run -- true` end to end from the snapshot, {} runs | {} | min {} |",
            self.run_true.len(),
            ms(self.run_true.pct(50.0)),
            ms(self.run_true.min())
        );
        if let Some((cold_kib, restored_kib, n)) = self.pss {
            println!(
                "| PSS of {n} idle VMs: cold-booted / restored | {:.0} MiB / {:.0} MiB | |",
                cold_kib as f64 / 1024.0,
                restored_kib as f64 / 1024.0
            );
            println!(
                "restored / cold PSS: {:.2}× (target ≤ 0.40×)",
                restored_kib as f64 / (cold_kib as f64).max(1.0)
            );
        }
        let ratio = self.restore.pct(50.0).as_secs_f64() / cold.pct(50.0).as_secs_f64().max(1e-9);
        println!("restore / cold start → agent ready (p50): {ratio:.3}× (target ≤ 0.06×)");
    }
}

/// Saves a running VM (the checkpoint figure), restores it `runs` times, times `vmcp run --
/// true` against the automatic snapshot, and compares the memory of idle VMs.
async fn snapshot_figures(
    backend: &QemuBackend,
    config: &VmConfig,
    args: &BenchArgs,
) -> anyhow::Result<SnapshotFigures> {
    let dir = tempfile::tempdir()?;
    let snap = dir.path().join("snap");
    let mut vm = backend.create_qemu(config.clone()).await?;
    vm.set_memory_file(vm.runtime_dir().join("memory"));
    vm.start().await?;
    vm.wait_ready(Duration::from_secs(60)).await?;
    // As `vmcp run` does before it saves its automatic snapshot.
    crate::snapshots::quiesce(&vm).await?;
    vm.save_snapshot(&snap).await?;
    let ready = Duration::from_secs(60);
    let mut checkpoint = Vec::with_capacity(args.runs);
    for _ in 0..args.runs {
        let t = Instant::now();
        let cp = vm.checkpoint().await?;
        checkpoint.push(t.elapsed());
        drop(cp);
    }
    let cp = vm.checkpoint().await?;
    let mut fork = Vec::with_capacity(args.runs);
    for _ in 0..args.runs {
        let t = Instant::now();
        let forks = vm.fork_into(&cp, 1, ready).await?;
        fork.push(t.elapsed());
        drop(forks);
    }
    // fork(n) with n = --runs, 2 to 4.
    let n = args.runs.clamp(2, 4);
    let t = Instant::now();
    let mut forks = vm.fork_into(&cp, n, ready).await?;
    let fork_n = (n, t.elapsed());
    let t = Instant::now();
    let fork_cp = forks[0].checkpoint().await?;
    let restored_checkpoint = t.elapsed();
    drop((fork_cp, forks));
    let mut rewind = Vec::with_capacity(args.runs);
    for _ in 0..args.runs {
        let t = Instant::now();
        vm.rewind(&cp, ready).await?;
        rewind.push(t.elapsed());
    }
    eprintln!(
        "  checkpoint p50 {}, fork(1) p50 {}, fork({n}) {}, rewind p50 {}",
        ms(Samples::new(checkpoint.clone()).pct(50.0)),
        ms(Samples::new(fork.clone()).pct(50.0)),
        ms(fork_n.1),
        ms(Samples::new(rewind.clone()).pct(50.0))
    );
    drop(cp);
    vm.kill().await?;
    drop(vm);

    let mut restore = Vec::with_capacity(args.runs);
    let mut restore_exec = Vec::with_capacity(args.runs);
    for i in 0..args.runs {
        let t = Instant::now();
        let mut vm = backend.create_qemu(config.clone()).await?;
        vm.restore_snapshot(&snap).await?;
        vm.wait_ready(Duration::from_secs(60)).await?;
        restore.push(t.elapsed());
        vm.agent()?
            .exec(ExecSpec::new(["true"]))
            .await?
            .wait_with_output()
            .await?;
        restore_exec.push(t.elapsed());
        vm.kill().await?;
        eprintln!(
            "  restore {}: agent ready {}, first exec done {}",
            i + 1,
            ms(restore[i]),
            ms(restore_exec[i])
        );
    }

    // `vmcp run -- true` as a user runs it; the first call may build the snapshot.
    let exe = std::env::current_exe()?;
    let run_true = || {
        let mut c = std::process::Command::new(&exe);
        c.arg("run")
            .arg("--memory")
            .arg(config.memory_mib.to_string())
            .arg("--kernel")
            .arg(&config.kernel)
            .arg("--initrd")
            .arg(&config.initrd);
        if let Some(a) = config.accel {
            c.arg("--accel").arg(a.to_string());
        }
        c.args(["--", "true"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        let t = Instant::now();
        let st = c.status();
        (st, t.elapsed())
    };
    let (st, _) = run_true();
    anyhow::ensure!(st?.success(), "`vmcp run -- true` failed");
    let mut runs = Vec::with_capacity(args.runs);
    for _ in 0..args.runs {
        let (st, took) = run_true();
        anyhow::ensure!(st?.success(), "`vmcp run -- true` failed");
        runs.push(took);
    }

    let pss = if args.pss_vms > 0 && pss_kib(std::process::id()).is_some() {
        Some(pss_compare(backend, config, &snap, args.pss_vms).await?)
    } else {
        None
    };
    Ok(SnapshotFigures {
        checkpoint: Samples::new(checkpoint),
        fork: Samples::new(fork),
        fork_n,
        rewind: Samples::new(rewind),
        restored_checkpoint,
        restore: Samples::new(restore),
        restore_exec: Samples::new(restore_exec),
        run_true: Samples::new(runs),
        pss,
    })
}

/// Sum of the PSS of `n` idle cold-booted VMs, then of `n` idle restored ones.
async fn pss_compare(
    backend: &QemuBackend,
    config: &VmConfig,
    snap: &std::path::Path,
    n: usize,
) -> anyhow::Result<(u64, u64, usize)> {
    let mut sums = [0u64; 2];
    for (k, restored) in [false, true].into_iter().enumerate() {
        let mut vms = Vec::with_capacity(n);
        for _ in 0..n {
            let mut vm = backend.create_qemu(config.clone()).await?;
            if restored {
                vm.restore_snapshot(snap).await?;
            } else {
                vm.start().await?;
            }
            vm.wait_ready(Duration::from_secs(60)).await?;
            vms.push(vm);
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        sums[k] = vms.iter().filter_map(|vm| vm.pid().and_then(pss_kib)).sum();
        eprintln!(
            "  {n} idle {} VMs: PSS {:.0} MiB",
            if restored { "restored" } else { "cold-booted" },
            sums[k] as f64 / 1024.0
        );
    }
    Ok((sums[0], sums[1], n))
}

/// Proportional set size of process `pid` in KiB (Linux `/proc/<pid>/smaps_rollup`).
fn pss_kib(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    text.lines().find_map(|l| {
        l.strip_prefix("Pss:")?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()
    })
}

/// Creates, starts and waits for a VM; returns it with the host and guest ready times.
async fn boot(
    backend: &QemuBackend,
    config: &VmConfig,
) -> anyhow::Result<(QemuVm, Duration, Duration)> {
    let mut vm = backend.create_qemu(config.clone()).await?;
    let t = Instant::now();
    vm.start().await?;
    let info = vm.wait_ready(Duration::from_secs(60)).await?;
    Ok((vm, t.elapsed(), info.guest_boot))
}

/// QEMU spawn → exit for the same kernel and initramfs with `rdinit=/bin/true`.
async fn kernel_to_userspace(backend: &QemuBackend, config: &VmConfig) -> anyhow::Result<Duration> {
    let mut c = config.clone();
    c.cmdline_extra.push("rdinit=/bin/true".into());
    let mut vm = backend.create_qemu(c).await?;
    let t = Instant::now();
    vm.start().await?;
    match vm.wait_ready(Duration::from_secs(60)).await {
        Err(VmError::EarlyExit { .. }) => Ok(t.elapsed()),
        Err(e) => Err(anyhow::Error::new(e).context("the rdinit=/bin/true boot did not end")),
        Ok(_) => anyhow::bail!("the rdinit=/bin/true boot unexpectedly started the agent"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let s = Samples::new((1..=100).rev().map(Duration::from_millis).collect());
        assert_eq!(s.pct(50.0), Duration::from_millis(50));
        assert_eq!(s.pct(99.0), Duration::from_millis(99));
        assert_eq!(s.pct(100.0), Duration::from_millis(100));
        assert_eq!(s.pct(0.0), Duration::from_millis(1));
        assert_eq!(s.min(), Duration::from_millis(1));
        let one = Samples::new(vec![Duration::from_millis(7)]);
        assert_eq!(one.pct(50.0), Duration::from_millis(7));
        assert_eq!(one.pct(99.0), Duration::from_millis(7));
        assert_eq!(Samples::new(vec![]).pct(50.0), Duration::ZERO);
        assert_eq!(ms(Duration::from_micros(1500)), "1.5 ms");
        assert_eq!(us(Duration::from_micros(190)), "190 µs");
    }
}
