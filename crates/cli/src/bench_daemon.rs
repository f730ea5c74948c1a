//! `vmcp bench`: the warm-pool figures, in the same run as the cold and restore ones.
//!
//! A `vmcp daemon` child keeps 2 VMs of the benchmark's kind (memory, kernel, initrd,
//! accelerator) on a private socket. Before each sample the bench waits until the pool is
//! full again, so every sample takes a warm VM:
//! - **pool acquire**: connect, request, the VM's agent channel received (then given back);
//! - **`vmcp run -- true` with the daemon**: the whole command, as a user runs it (process
//!   start, acquire, re-key, exec, exit).
//!
//! The daemon's handed-out counter must grow by one per sample, so a run that silently fell
//! back to its own VM would fail the benchmark rather than flatter it.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vmcp_vm::VmConfig;

use crate::bench::Samples;

/// Pool size of the benchmark's daemon.
const POOL: u32 = 2;
/// How long the pool may take to fill.
const FILL_TIMEOUT: Duration = Duration::from_secs(180);

/// The pool figures.
pub struct PoolFigures {
    /// Pool acquire.
    pub acquire: Samples,
    /// `vmcp run -- true` through the daemon.
    pub run_true: Samples,
}

impl PoolFigures {
    /// Table rows.
    pub fn print(&self) {
        println!(
            "| pool acquire (connect, request, agent channel received), {} runs | {:.1} ms | min {:.1} ms |",
            self.acquire.len(),
            self.acquire.pct(50.0).as_secs_f64() * 1e3,
            self.acquire.min().as_secs_f64() * 1e3
        );
        println!(
            "| `vmcp run -- true` end to end with a warm `vmcp daemon`, {} runs | {:.1} ms | min {:.1} ms |",
            self.run_true.len(),
            self.run_true.pct(50.0).as_secs_f64() * 1e3,
            self.run_true.min().as_secs_f64() * 1e3
        );
        println!(
            "run -- true with the daemon (p50): {:.1} ms (target ≤ 30 ms)",
            self.run_true.pct(50.0).as_secs_f64() * 1e3
        );
    }
}

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        // SIGKILL: its VMs die with it (watchdog + PR_SET_PDEATHSIG).
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_full(socket: &Path, daemon: &mut Daemon) -> anyhow::Result<u64> {
    let deadline = Instant::now() + FILL_TIMEOUT;
    loop {
        if let Some((ready, target, handed)) = crate::daemon_cmd::pool_counts(socket) {
            if ready >= target {
                return Ok(handed);
            }
        }
        if let Some(st) = daemon.0.try_wait()? {
            anyhow::bail!("the benchmark's vmcp daemon exited ({st})");
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the daemon's pool did not fill within {FILL_TIMEOUT:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Measures `runs` pool acquires and `runs` `vmcp run -- true` through a daemon; `None` where
/// the daemon is not available (not Linux).
pub fn measure(config: &VmConfig, runs: usize) -> anyhow::Result<Option<PoolFigures>> {
    let exe = std::env::current_exe()?;
    let dir = tempfile::tempdir()?;
    let socket = dir.path().join("run").join("daemon.sock");
    let mut profile = format!(
        "memory={},kernel={},initrd={}",
        config.memory_mib,
        config.kernel.display(),
        config.initrd.display()
    );
    if let Some(a) = config.accel {
        profile.push_str(&format!(",accel={a}"));
    }
    let mut daemon = Daemon(
        Command::new(&exe)
            .arg("daemon")
            .arg("--socket")
            .arg(&socket)
            .args(["--pool", &POOL.to_string(), "--memory-budget", "100000"])
            .arg("--profile")
            .arg(&profile)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let deadline = Instant::now() + FILL_TIMEOUT;
    while crate::daemon_cmd::pool_counts(&socket).is_none() {
        if let Some(st) = daemon.0.try_wait()? {
            if !st.success() {
                // `vmcp daemon` refuses on this platform.
                return Ok(None);
            }
        }
        anyhow::ensure!(Instant::now() < deadline, "the daemon did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut acquire = Vec::with_capacity(runs);
    for i in 0..runs {
        let before = wait_full(&socket, &mut daemon)?;
        let took = crate::daemon_cmd::time_acquire(
            &socket,
            config.memory_mib,
            &config.kernel,
            &config.initrd,
            config.accel,
        )?
        .ok_or_else(|| anyhow::anyhow!("the daemon had no VM for the benchmark's profile"))?;
        acquire.push(took);
        let after = wait_full(&socket, &mut daemon)?;
        anyhow::ensure!(after == before + 1, "the acquire did not hand out a VM");
        eprintln!(
            "  pool acquire {}: {:.1} ms",
            i + 1,
            took.as_secs_f64() * 1e3
        );
    }
    let mut run_true = Vec::with_capacity(runs);
    for i in 0..runs {
        let before = wait_full(&socket, &mut daemon)?;
        let mut c = Command::new(&exe);
        c.env("VMCP_DAEMON_SOCKET", &socket)
            .arg("run")
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
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let t = Instant::now();
        let st = c.status()?;
        let took = t.elapsed();
        anyhow::ensure!(st.success(), "`vmcp run -- true` with the daemon failed");
        let after = wait_full(&socket, &mut daemon)?;
        anyhow::ensure!(
            after == before + 1,
            "`vmcp run -- true` did not take its VM from the daemon"
        );
        run_true.push(took);
        eprintln!(
            "  run -- true with the daemon {}: {:.1} ms",
            i + 1,
            took.as_secs_f64() * 1e3
        );
    }
    drop(daemon);
    Ok(Some(PoolFigures {
        acquire: Samples::new(acquire),
        run_true: Samples::new(run_true),
    }))
}
