//! `vmcp bench --share`: how fast a host directory becomes visible in the guest, and how fast
//! the guest reads it, against `cp -r` on the host.
//!
//! The share mechanism (docs/images.md) copies the directory into an ext4 file with
//! `mkfs.ext4 -d` and attaches it read-only; what makes a tree visible is that copy plus a
//! mount during boot. Measured, per run, on a fresh temporary tree:
//! - **`cp -r`** of the tree on the host (the reference the issue asks for);
//! - **copy into ext4** (`mkfs.ext4 -d`) of the same tree;
//! - **boot → agent ready** with the share attached, and the guest's file count of it
//!   (checked: every file is there);
//! - **read of one 100 MiB file** in the guest (`cat FILE > /dev/null`, the round trip of
//!   `true` subtracted), as MB/s.
//!
//! The page cache is not dropped: the host reads the tree from cache in both copies alike.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use vmcp_vm::agent::ExecSpec;
use vmcp_vm::{ShareConfig, VmConfig};

use crate::bench::Samples;

/// Files in the tree.
const FILES: usize = 5000;
/// Bytes per file (5000 × 20 KiB ≈ 100 MiB).
const FILE_BYTES: usize = 20 * 1024;
/// The single large file.
const BIG_BYTES: usize = 100 * 1024 * 1024;

fn fill(buf: &mut [u8], seed: u64) {
    // xorshift: incompressible enough, no dependency.
    let mut x = seed | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
}

fn make_tree(root: &Path) -> anyhow::Result<()> {
    let mut buf = vec![0u8; FILE_BYTES];
    for i in 0..FILES {
        let dir = root.join(format!("d{:02}", i % 50));
        std::fs::create_dir_all(&dir)?;
        fill(&mut buf, i as u64 + 1);
        std::fs::write(dir.join(format!("f{i:04}")), &buf)?;
    }
    Ok(())
}

fn make_big(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut f = std::io::BufWriter::new(std::fs::File::create(dir.join("big"))?);
    let mut buf = vec![0u8; 1 << 20];
    for i in 0..(BIG_BYTES >> 20) {
        fill(&mut buf, i as u64 + 7);
        f.write_all(&buf)?;
    }
    f.flush()?;
    Ok(())
}

async fn exec_time(
    agent: &vmcp_vm::agent::AgentClient,
    script: &str,
) -> anyhow::Result<(Duration, String)> {
    let t = Instant::now();
    let out = agent
        .exec(ExecSpec::new(["sh", "-c", script]))
        .await?
        .wait_with_output()
        .await?;
    let took = t.elapsed();
    anyhow::ensure!(
        out.status == vmcp_guest_proto::ExitStatus::Code(0),
        "`{script}` failed in the guest: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((
        took,
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
    ))
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1e3)
}

/// Runs the share benchmark `runs` times with `base` (kernel, initrd, accel) and prints a
/// Markdown table.
pub async fn run(base: &VmConfig, runs: usize) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let tree = dir.path().join("tree");
    make_tree(&tree)?;
    let big = dir.path().join("bigdir");
    make_big(&big)?;
    let (mut cp, mut copy, mut ready, mut read) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..runs {
        let dst = dir.path().join(format!("cp-{i}"));
        let t = Instant::now();
        let st = std::process::Command::new("cp")
            .arg("-r")
            .arg(&tree)
            .arg(&dst)
            .status()?;
        anyhow::ensure!(st.success(), "cp -r failed");
        cp.push(t.elapsed());
        std::fs::remove_dir_all(&dst)?;

        let disk = dir.path().join(format!("tree-{i}.ext4"));
        let t = Instant::now();
        crate::image_cmd::import::make_share_disk(&tree, &disk)?;
        copy.push(t.elapsed());
        let big_disk = dir.path().join(format!("big-{i}.ext4"));
        crate::image_cmd::import::make_share_disk(&big, &big_disk)?;

        let mut config = base.clone();
        config.shares = vec![
            ShareConfig::new(&disk, "/mnt/tree", false),
            ShareConfig::new(&big_disk, "/mnt/big", false),
        ];
        let selection = crate::run::select(&mut config).await?;
        let mut vm = selection.backend.create(config).await?;
        let t = Instant::now();
        vm.start().await?;
        vm.wait_ready(Duration::from_secs(120)).await?;
        ready.push(t.elapsed());
        let agent = vm.agent()?;
        let (_, count) = exec_time(&agent, "find /mnt/tree -type f | wc -l").await?;
        anyhow::ensure!(
            count == FILES.to_string(),
            "the guest sees {count} files, not {FILES}"
        );
        let (base_rt, _) = exec_time(&agent, "true").await?;
        let (took, _) = exec_time(&agent, "cat /mnt/big/big > /dev/null").await?;
        read.push(took.saturating_sub(base_rt));
        drop(agent);
        let _ = vm.shutdown(Duration::from_secs(5)).await;
        std::fs::remove_file(&disk)?;
        std::fs::remove_file(&big_disk)?;
        eprintln!(
            "  run {}: cp -r {}, copy into ext4 {}, boot → ready {}, read 100 MiB {}",
            i + 1,
            ms(cp[i]),
            ms(copy[i]),
            ms(ready[i]),
            ms(read[i])
        );
    }
    let (cp, copy, ready, read) = (
        Samples::new(cp),
        Samples::new(copy),
        Samples::new(ready),
        Samples::new(read),
    );
    let mbps = |d: Duration| BIG_BYTES as f64 / 1e6 / d.as_secs_f64().max(1e-9);
    println!(
        "| share: {FILES} files, {} MB; one {} MB file ({runs} runs) | p50 | min |",
        FILES * FILE_BYTES / 1_000_000,
        BIG_BYTES / 1_000_000
    );
    println!("|---|---|---|");
    println!(
        "| `cp -r` of the tree on the host | {} | {} |",
        ms(cp.pct(50.0)),
        ms(cp.min())
    );
    println!(
        "| copy of the tree into ext4 (`mkfs.ext4 -d`) | {} | {} |",
        ms(copy.pct(50.0)),
        ms(copy.min())
    );
    println!(
        "| ratio copy / `cp -r` | {:.2}× | |",
        copy.pct(50.0).as_secs_f64() / cp.pct(50.0).as_secs_f64().max(1e-9)
    );
    println!(
        "| boot → agent ready with both shares attached | {} | {} |",
        ms(ready.pct(50.0)),
        ms(ready.min())
    );
    println!(
        "| guest read of the 100 MB file (`cat > /dev/null`) | {:.0} MB/s | best {:.0} MB/s |",
        mbps(read.pct(50.0)),
        mbps(read.min())
    );
    Ok(())
}
