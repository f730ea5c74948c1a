//! `vmcp-mcp-bench`: tools/call throughput and latency of the vmcp MCP client, speaking the
//! candidate protocol of the MCP client anchor (`shared/bench/mcp-client-anchor/README.md`).
//!
//!   vmcp-mcp-bench --url URL [--mode legacy|2026-07-28|auto] [--n N] [--secs S] [--conc C[,C...]]
//!   vmcp-mcp-bench [--stdio] [same options] -- SERVER_CMD ARGS...
//!
//! One session is set up (not timed), 100 warm-up calls are made, then for each C one phase
//! of N calls (or S seconds) runs with C calls in flight on that session, on a current-thread
//! tokio runtime. Prints one JSON line per phase: conc, calls, errors, secs, rate, p50_ms,
//! p99_ms.

use std::process::ExitCode;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vmcp_mcp::http::{HttpConfig, ReqwestClient, ReqwestOptions, StreamableHttpTransport};
use vmcp_mcp::stdio::{StdioConfig, StdioTransport};
use vmcp_mcp::{Client, ClientConfig, Lifecycle, Transport};

struct Opts {
    url: Option<String>,
    cmd: Vec<String>,
    mode: Lifecycle,
    mode_name: String,
    n: usize,
    secs: f64,
    concs: Vec<usize>,
    warmup: usize,
    message: String,
}

fn parse() -> Result<Opts, String> {
    let mut o = Opts {
        url: None,
        cmd: Vec::new(),
        mode: Lifecycle::Initialize,
        mode_name: "legacy".into(),
        n: 2000,
        secs: 20.0,
        concs: vec![1],
        warmup: 100,
        message: "hello".into(),
    };
    let mut stdio = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--" => {
                o.cmd = args.by_ref().collect();
                break;
            }
            "--stdio" => stdio = true,
            "--url" | "--mode" | "--n" | "--secs" | "--conc" | "--warmup" | "--message" => {
                let v = args.next().ok_or_else(|| format!("{a} needs a value"))?;
                let bad = |_| format!("bad value for {a}: {v:?}");
                match a.as_str() {
                    "--url" => o.url = Some(v.clone()),
                    "--mode" => {
                        o.mode = match v.as_str() {
                            "legacy" => Lifecycle::Initialize,
                            "2026-07-28" | "2026" => Lifecycle::Discover,
                            "auto" => Lifecycle::Auto,
                            _ => {
                                return Err(format!(
                                    "unknown --mode {v:?} (legacy, 2026-07-28, auto)"
                                ))
                            }
                        };
                        o.mode_name = v.clone();
                    }
                    "--n" => o.n = v.parse().map_err(bad)?,
                    "--secs" => {
                        o.secs = v
                            .parse()
                            .map_err(|_| format!("bad value for --secs: {v:?}"))?
                    }
                    "--conc" => {
                        o.concs = v
                            .split(',')
                            .map(|c| c.parse::<usize>().map(|c| c.max(1)))
                            .collect::<Result<_, _>>()
                            .map_err(bad)?
                    }
                    "--warmup" => o.warmup = v.parse().map_err(bad)?,
                    _ => o.message = v.clone(),
                }
            }
            _ => return Err(format!("unknown argument {a:?}")),
        }
    }
    match (&o.url, o.cmd.is_empty()) {
        (Some(_), true) if !stdio => Ok(o),
        (None, false) => Ok(o),
        _ => Err("need either --url URL or [--stdio] -- SERVER_CMD ARGS...".into()),
    }
}

struct Phase {
    conc: usize,
    calls: usize,
    errors: usize,
    secs: f64,
    p50: f64,
    p99: f64,
}

async fn call_once<T: Transport>(c: &Client<T>, args: &Value, message: &str) -> bool {
    match c.call_tool("echo", Some(args)).await {
        Ok(r) => {
            !r.is_error()
                && r.content
                    .first()
                    .and_then(|b| b.as_text())
                    .is_some_and(|t| t.contains(message))
        }
        Err(e) => {
            eprintln!("call failed: {e}");
            false
        }
    }
}

async fn phase<T: Transport>(c: &Client<T>, o: &Opts, args: &Rc<Value>, conc: usize) -> Phase {
    let issued = Rc::new(AtomicUsize::new(0));
    let errors = Rc::new(AtomicUsize::new(0));
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs_f64(o.secs);
    let mut tasks = Vec::new();
    let local = tokio::task::LocalSet::new();
    for _ in 0..conc {
        let (c, args, issued, errors) = (c.clone(), args.clone(), issued.clone(), errors.clone());
        let (n, message) = (o.n, o.message.clone());
        tasks.push(local.spawn_local(async move {
            let mut mine = Vec::with_capacity(n);
            while Instant::now() < deadline && issued.fetch_add(1, Ordering::Relaxed) < n {
                let s = Instant::now();
                if !call_once(&c, &args, &message).await {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
                mine.push(s.elapsed());
            }
            mine
        }));
    }
    let mut lat = local
        .run_until(async move {
            let mut all = Vec::new();
            for t in tasks {
                if let Ok(mine) = t.await {
                    all.extend(mine);
                }
            }
            all
        })
        .await;
    let secs = t0.elapsed().as_secs_f64();
    lat.sort();
    let pct = |q: f64| {
        lat.get(((lat.len() as f64 * q) as usize).min(lat.len().saturating_sub(1)))
            .map(|d| d.as_secs_f64() * 1e3)
            .unwrap_or(f64::NAN)
    };
    Phase {
        conc,
        calls: lat.len(),
        errors: errors.load(Ordering::Relaxed),
        secs,
        p50: pct(0.5),
        p99: pct(0.99),
    }
}

async fn drive<T: Transport>(c: Client<T>, o: &Opts) -> Result<Vec<Phase>, String> {
    let args = Rc::new(json!({ "message": o.message }));
    for _ in 0..o.warmup {
        if !call_once(&c, &args, &o.message).await {
            return Err("a warm-up call did not echo the message".into());
        }
    }
    let mut out = Vec::new();
    for &conc in &o.concs {
        out.push(phase(&c, o, &args, conc).await);
    }
    c.close().await;
    Ok(out)
}

async fn run(o: &Opts) -> Result<Vec<Phase>, String> {
    let config = ClientConfig::default()
        .with_lifecycle(o.mode)
        .with_request_timeout(Some(Duration::from_secs(30)));
    if let Some(url) = &o.url {
        let http = ReqwestClient::new(&ReqwestOptions::default().with_proxy_from_env(false))
            .map_err(|e| e.to_string())?;
        let t = StreamableHttpTransport::new(http, HttpConfig::new([url.clone()]))
            .map_err(|e| e.to_string())?;
        let c = Client::connect(t, config)
            .await
            .map_err(|e| e.to_string())?;
        drive(c, o).await
    } else {
        let t = StdioTransport::spawn(&StdioConfig::new(&o.cmd[0], &o.cmd[1..]))
            .map_err(|e| e.to_string())?;
        let c = Client::connect(t, config)
            .await
            .map_err(|e| e.to_string())?;
        drive(c, o).await
    }
}

fn main() -> ExitCode {
    let o = match parse() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("vmcp-mcp-bench: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("vmcp-mcp-bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(&o)) {
        Ok(phases) => {
            let r3 = |x: f64| (x * 1000.0).round() / 1000.0;
            for p in phases {
                println!(
                    "{}",
                    json!({"client": "vmcp", "mode": o.mode_name,
                           "transport": if o.url.is_some() { "http" } else { "stdio" },
                           "conc": p.conc, "calls": p.calls, "errors": p.errors, "secs": r3(p.secs),
                           "rate": (p.calls as f64 / p.secs * 10.0).round() / 10.0,
                           "p50_ms": r3(p.p50), "p99_ms": r3(p.p99)})
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("vmcp-mcp-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
