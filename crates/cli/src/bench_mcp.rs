//! `vmcp bench --mcp`: the cost of a sandbox reached through `vmcp mcp serve`, against the
//! same work done by `vmcp run`, in one run.
//!
//! vmcp starts `vmcp mcp serve` (this executable, stdio, our MCP client) once and then, for
//! each of `--runs` rounds, alternately (so a load change on the host hits both sides alike):
//! - **`vmcp run -- true`**: the whole process, spawn to exit (wall clock);
//! - **`tools/call run {"argv":["true"]}`**: from the call to its result, on the running server;
//! - **`tools/call sandbox_exec true`** on one live sandbox, and **`tools/call sandbox_list`**
//!   (no VM: the server's own per-call cost).
//!
//! One warm-up of each comes first (it may build the automatic snapshot). The result of each
//! `run` call says how it started (`notices` is empty for a snapshot restore) and how long the
//! exec itself took (`duration_ms`), which splits the call into start + exec + the rest.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{json, Value};
use vmcp_mcp::stdio::{StderrMode, StdioConfig, StdioTransport};
use vmcp_mcp::{Client, ClientConfig, Lifecycle};

use crate::bench::Samples;

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

async fn call(
    c: &Client<StdioTransport>,
    tool: &str,
    args: Value,
) -> anyhow::Result<(Duration, Value)> {
    let t = Instant::now();
    let r = c
        .call_tool(tool, Some(&args))
        .await
        .with_context(|| format!("tools/call {tool} failed"))?;
    let took = t.elapsed();
    anyhow::ensure!(!r.is_error(), "{tool} returned an error: {:?}", r.content);
    Ok((took, r.structured_content.unwrap_or(Value::Null)))
}

fn vmcp_run(exe: &std::path::Path, memory: u32, image: &[String]) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let status = Command::new(exe)
        .args(["run", "--memory", &memory.to_string()])
        .args(image)
        .args(["--", "true"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .context("cannot start `vmcp run`")?;
    let took = t.elapsed();
    anyhow::ensure!(status.success(), "`vmcp run -- true` failed: {status}");
    Ok(took)
}

/// Runs the MCP benchmark; `image` are `--kernel K --initrd I` when given.
pub async fn run(runs: usize, memory: u32, image: Vec<String>) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("cannot find the vmcp executable")?;
    let mut serve = vec!["mcp".to_owned(), "serve".to_owned()];
    serve.extend(image.iter().cloned());
    let cfg = StdioConfig::new(&exe, serve).with_stderr(StderrMode::Null);
    let t = StdioTransport::spawn(&cfg).context("cannot start `vmcp mcp serve`")?;
    let c = Client::connect(
        t,
        ClientConfig::default().with_lifecycle(Lifecycle::Initialize),
    )
    .await
    .context("cannot initialize the MCP session with `vmcp mcp serve`")?;
    let run_args = json!({"argv": ["true"], "memory_mib": memory});
    eprintln!("vmcp: bench --mcp: warming up (the first start may build the snapshot)");
    let (_, warm) = call(&c, "run", run_args.clone()).await?;
    vmcp_run(&exe, memory, &image)?;
    let (_, created) = call(&c, "sandbox_create", json!({"memory_mib": memory})).await?;
    let id = created["sandbox_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let (mut cli, mut mcp, mut mcp_exec, mut exec, mut list) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut cold = 0;
    for i in 0..runs {
        eprintln!("vmcp: bench --mcp: round {}/{runs}", i + 1);
        cli.push(vmcp_run(&exe, memory, &image)?);
        let (took, r) = call(&c, "run", run_args.clone()).await?;
        mcp.push(took);
        mcp_exec.push(Duration::from_millis(
            r["duration_ms"].as_u64().unwrap_or(0),
        ));
        if r["notices"].as_array().is_some_and(|n| !n.is_empty()) {
            cold += 1;
        }
        exec.push(
            call(
                &c,
                "sandbox_exec",
                json!({"sandbox_id": id, "argv": ["true"]}),
            )
            .await?
            .0,
        );
        for _ in 0..10 {
            list.push(call(&c, "sandbox_list", json!({})).await?.0);
        }
    }
    let _ = call(&c, "sandbox_destroy", json!({"sandbox_id": id})).await;
    c.close().await;
    let (cli, mcp, mcp_exec, exec, list) = (
        Samples::new(cli),
        Samples::new(mcp),
        Samples::new(mcp_exec),
        Samples::new(exec),
        Samples::new(list),
    );
    println!(
        "vmcp bench --mcp ({runs} rounds, alternating; warm-up run notices: {})",
        warm["notices"]
    );
    println!("| | p50 | min | p90 |");
    println!("|---|--:|--:|--:|");
    for (name, s) in [
        ("`vmcp run -- true` (whole process)", &cli),
        ("`tools/call run` true (call to result)", &mcp),
        ("  of which the exec of `true` (duration_ms)", &mcp_exec),
        ("`tools/call sandbox_exec` true (live sandbox)", &exec),
        ("`tools/call sandbox_list` (no VM)", &list),
    ] {
        println!(
            "| {name} | {} | {} | {} |",
            ms(s.pct(50.0)),
            ms(s.min()),
            ms(s.pct(90.0))
        );
    }
    println!(
        "run over MCP / vmcp run, p50: {:.2}x (target <= 1.2x); {} of {runs} MCP runs booted cold",
        mcp.pct(50.0).as_secs_f64() / cli.pct(50.0).as_secs_f64().max(1e-9),
        cold
    );
    Ok(())
}
