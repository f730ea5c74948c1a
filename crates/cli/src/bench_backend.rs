//! `vmcp bench` on backends other than QEMU (which `bench.rs` measures in more detail): the
//! lifecycle measured through the backend-neutral traits. This is how the
//! Virtualization.framework backend is benchmarked on a Mac; nothing here is macOS-specific.
//!
//! What is measured (host wall clock):
//! - **spawn → agent ready**: `Backend::create` + `Vm::start` until the agent's hello.
//! - **exec `true`** (when the agent can exec) and **ping** round trips on one running VM.
//! - **restore → agent ready**, when the VM has the `snapshot` capability: one VM is booted
//!   and saved with `Vm::save_snapshot`; each run creates a VM from the same config,
//!   `Vm::restore_snapshot`s it and waits for the reconnecting agent's hello.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use vmcp_guest_proto::Capabilities;
use vmcp_vm::agent::ExecSpec;
use vmcp_vm::{Backend, Probe, Vm, VmConfig};

use crate::bench::Samples;

const READY: Duration = Duration::from_secs(60);

/// What [`measure`] found.
#[derive(Debug, Clone)]
pub struct Report {
    /// Backend name.
    pub backend: &'static str,
    /// Spawn → agent ready.
    pub ready: Samples,
    /// Exec `true` round trips (empty when the agent cannot exec).
    pub exec: Samples,
    /// Ping round trips.
    pub ping: Samples,
    /// Restore → agent ready, or why it was not measured.
    pub restore: Result<Samples, String>,
}

async fn boot(backend: &dyn Backend, config: &VmConfig) -> anyhow::Result<(Box<dyn Vm>, Duration)> {
    let t = Instant::now();
    let mut vm = backend.create(config.clone()).await?;
    vm.start().await?;
    vm.wait_ready(READY).await?;
    Ok((vm, t.elapsed()))
}

/// Runs the measurements on `backend` (which must be usable).
pub async fn measure(
    backend: &dyn Backend,
    config: &VmConfig,
    runs: usize,
    iterations: usize,
    snapshot_dir: &Path,
) -> anyhow::Result<Report> {
    if let Probe::Unusable { reason } = backend.probe().await {
        anyhow::bail!("backend {} cannot run VMs here: {reason}", backend.name());
    }
    let mut ready = Vec::with_capacity(runs);
    for i in 0..runs {
        let (mut vm, took) = boot(backend, config).await?;
        vm.kill().await?;
        eprintln!(
            "  run {}: spawn → agent ready {:.1} ms",
            i + 1,
            took.as_secs_f64() * 1e3
        );
        ready.push(took);
    }

    let (mut vm, _) = boot(backend, config).await?;
    let agent = vm.agent()?;
    let mut exec = Vec::new();
    if agent.hello().capabilities.has(Capabilities::EXEC) {
        for _ in 0..iterations {
            let t = Instant::now();
            agent
                .exec(ExecSpec::new(["true"]))
                .await?
                .wait_with_output()
                .await?;
            exec.push(t.elapsed());
        }
    }
    let mut ping = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        ping.push(agent.ping().await?);
    }
    drop(agent);

    let restore = if vm.capabilities().snapshot {
        let snap = snapshot_dir.join("bench.vmstate");
        vm.save_snapshot(&snap)
            .await
            .context("cannot save the snapshot to restore from")?;
        vm.kill().await?;
        let mut restored = Vec::with_capacity(runs);
        for i in 0..runs {
            let t = Instant::now();
            let mut vm = backend.create(config.clone()).await?;
            vm.restore_snapshot(&snap).await?;
            vm.wait_ready(READY).await?;
            let took = t.elapsed();
            vm.kill().await?;
            eprintln!(
                "  restore {}: → agent ready {:.1} ms",
                i + 1,
                took.as_secs_f64() * 1e3
            );
            restored.push(took);
        }
        Ok(Samples::new(restored))
    } else {
        vm.kill().await?;
        Err(format!(
            "backend {} has no snapshot capability here",
            backend.name()
        ))
    };
    Ok(Report {
        backend: backend.name(),
        ready: Samples::new(ready),
        exec: Samples::new(exec),
        ping: Samples::new(ping),
        restore,
    })
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

/// The report as a Markdown table (the format of BENCHMARKS.md).
pub fn render(r: &Report) -> String {
    let mut out = String::from("| metric | p50 | min / p99 |\n|---|---|---|\n");
    out.push_str(&format!(
        "| {}: spawn → agent ready, {} runs | {} | min {} |\n",
        r.backend,
        r.ready.len(),
        ms(r.ready.pct(50.0)),
        ms(r.ready.min())
    ));
    match &r.restore {
        Ok(s) => out.push_str(&format!(
            "| {}: restore → agent ready, {} runs | {} | min {} |\n",
            r.backend,
            s.len(),
            ms(s.pct(50.0)),
            ms(s.min())
        )),
        Err(why) => out.push_str(&format!(
            "| {}: restore → agent ready | not measured: {why} | |\n",
            r.backend
        )),
    }
    if r.exec.len() > 0 {
        out.push_str(&format!(
            "| {}: exec `true` round trip, {} iterations | {} | p99 {} |\n",
            r.backend,
            r.exec.len(),
            ms(r.exec.pct(50.0)),
            ms(r.exec.pct(99.0))
        ));
    }
    out.push_str(&format!(
        "| {}: ping round trip, {} iterations | {} | p99 {} |\n",
        r.backend,
        r.ping.len(),
        ms(r.ping.pct(50.0)),
        ms(r.ping.pct(99.0))
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmcp_vm::fake::{FakeBackend, Faults};

    fn config(dir: &Path) -> VmConfig {
        let k = dir.join("k");
        let i = dir.join("i");
        std::fs::write(&k, b"k").unwrap();
        std::fs::write(&i, b"i").unwrap();
        VmConfig::new(k, i)
    }

    #[tokio::test]
    async fn measures_through_the_traits() {
        let dir = tempfile::tempdir().unwrap();
        let backend = FakeBackend::responder(Faults::default());
        let r = measure(&backend, &config(dir.path()), 3, 5, dir.path())
            .await
            .unwrap();
        assert_eq!(r.ready.len(), 3);
        assert_eq!(r.ping.len(), 5);
        let text = render(&r);
        assert!(text.contains("fake: spawn → agent ready, 3 runs"), "{text}");
        assert!(text.contains("ping round trip, 5 iterations"), "{text}");
        // The fake saves and restores state: restore → ready is measured through the traits.
        assert!(
            text.contains("fake: restore → agent ready, 3 runs"),
            "{text}"
        );
        let mut faults = Faults::default();
        faults.no_snapshot = true;
        let r = measure(
            &FakeBackend::responder(faults),
            &config(dir.path()),
            1,
            1,
            dir.path(),
        )
        .await
        .unwrap();
        assert!(
            render(&r).contains(
                "restore → agent ready | not measured: backend fake has no snapshot capability"
            ),
            "{}",
            render(&r)
        );
    }

    #[tokio::test]
    async fn unusable_backend_and_unknown_name_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let mut faults = Faults::default();
        faults.unusable = true;
        let backend = FakeBackend::responder(faults);
        let e = measure(&backend, &config(dir.path()), 1, 1, dir.path())
            .await
            .unwrap_err();
        assert!(e.to_string().contains("cannot run VMs here"), "{e}");
    }

    #[test]
    fn render_with_restore_and_exec() {
        let r = Report {
            backend: "vz",
            ready: Samples::new(vec![Duration::from_millis(150)]),
            exec: Samples::new(vec![Duration::from_millis(2)]),
            ping: Samples::new(vec![Duration::from_micros(100)]),
            restore: Ok(Samples::new(vec![Duration::from_millis(80)])),
        };
        let t = render(&r);
        assert!(
            t.contains("| vz: restore → agent ready, 1 runs | 80.0 ms | min 80.0 ms |"),
            "{t}"
        );
        assert!(
            t.contains("| vz: exec `true` round trip, 1 iterations | 2.0 ms |"),
            "{t}"
        );
    }
}
