//! `vmcp-egress-bench`: what the egress proxy costs, measured against the same transfer without
//! it, in one run, on loopback.
//!
//!   vmcp-egress-bench [--mb 100] [--rounds 3] [--connects 200] [--pipe PATH_TO_VMCP]
//!
//! A local HTTP server serves `--mb` MiB. Each round downloads it directly, through the proxy
//! as plain HTTP, and through a CONNECT tunnel (best of `--rounds` each). Then `--connects`
//! times: a direct TCP connect + one small request, and the same through CONNECT (the extra
//! round trip, policy check and upstream connect), and, with `--pipe`, through
//! `vmcp __egress-pipe` as QEMU starts it for each guest connection. Prints one JSON line per
//! measurement.

use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use vmcp_egress::{Limits, Policy, Proxy};

struct Opts {
    mb: usize,
    rounds: usize,
    connects: usize,
    pipe: Option<String>,
}

fn parse() -> Result<Opts, String> {
    let mut o = Opts {
        mb: 100,
        rounds: 3,
        connects: 200,
        pipe: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--mb" => o.mb = val()?.parse().map_err(|_| "bad --mb")?,
            "--rounds" => o.rounds = val()?.parse().map_err(|_| "bad --rounds")?,
            "--connects" => o.connects = val()?.parse().map_err(|_| "bad --connects")?,
            "--pipe" => o.pipe = Some(val()?),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if o.mb == 0 || o.rounds == 0 || o.connects == 0 {
        return Err("--mb, --rounds and --connects must be at least 1".into());
    }
    Ok(o)
}

async fn serve(listener: TcpListener, size: usize) {
    let chunk = vec![b'x'; 256 * 1024];
    loop {
        let Ok((mut s, _)) = listener.accept().await else {
            continue;
        };
        let chunk = chunk.clone();
        tokio::spawn(async move {
            let mut head = Vec::new();
            let mut b = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                match s.read(&mut b).await {
                    Ok(1) => head.push(b[0]),
                    _ => return,
                }
            }
            let small = head.starts_with(b"GET /small");
            let len = if small { 2 } else { size };
            let h =
                format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n");
            if s.write_all(h.as_bytes()).await.is_err() {
                return;
            }
            let mut left = len;
            while left > 0 {
                let n = left.min(chunk.len());
                if s.write_all(&chunk[..n]).await.is_err() {
                    return;
                }
                left -= n;
            }
        });
    }
}

/// Sends `req`, reads the response to the end; returns body bytes.
async fn fetch<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, req: &str) -> std::io::Result<usize> {
    s.write_all(req.as_bytes()).await?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0usize;
    let mut head_done = false;
    let mut head = Vec::new();
    loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            return Ok(total);
        }
        if head_done {
            total += n;
        } else {
            head.extend_from_slice(&buf[..n]);
            if let Some(p) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                head_done = true;
                total += head.len() - p - 4;
            }
        }
    }
}

async fn read_head<S: AsyncRead + Unpin>(s: &mut S) -> std::io::Result<String> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut b).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        head.push(b[0]);
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

async fn tunnel(proxy: &str, target: &str) -> std::io::Result<TcpStream> {
    let mut s = TcpStream::connect(proxy).await?;
    s.set_nodelay(true)?;
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await?;
    let head = read_head(&mut s).await?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(std::io::Error::other(head));
    }
    Ok(s)
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

async fn bench(o: Opts) -> Result<(), String> {
    let e = |x: std::io::Error| x.to_string();
    let server = TcpListener::bind("127.0.0.1:0").await.map_err(e)?;
    let srv = server.local_addr().map_err(e)?;
    let size = o.mb * 1024 * 1024;
    tokio::spawn(serve(server, size));
    let policy: Policy = srv
        .to_string()
        .parse()
        .map_err(|x: vmcp_egress::RuleError| x.to_string())?;
    let pl = TcpListener::bind("127.0.0.1:0").await.map_err(e)?;
    let proxy = pl.local_addr().map_err(e)?.to_string();
    let _handle = Proxy::new(policy, Limits::default()).spawn(pl);
    let get_big = format!("GET /big HTTP/1.1\r\nHost: {srv}\r\n\r\n");
    let get_big_abs =
        format!("GET http://{srv}/big HTTP/1.1\r\nHost: {srv}\r\nConnection: close\r\n\r\n");
    let (mut direct, mut plain, mut connect) = (f64::MAX, f64::MAX, f64::MAX);
    for _ in 0..o.rounds {
        let t = Instant::now();
        let mut s = TcpStream::connect(srv).await.map_err(e)?;
        let n = fetch(&mut s, &get_big).await.map_err(e)?;
        direct = direct.min(t.elapsed().as_secs_f64());
        if n != size {
            return Err(format!("direct download got {n} of {size} bytes"));
        }
        let t = Instant::now();
        let mut s = TcpStream::connect(&proxy).await.map_err(e)?;
        let n = fetch(&mut s, &get_big_abs).await.map_err(e)?;
        plain = plain.min(t.elapsed().as_secs_f64());
        if n != size {
            return Err(format!("proxied download got {n} of {size} bytes"));
        }
        let t = Instant::now();
        let mut s = tunnel(&proxy, &srv.to_string()).await.map_err(e)?;
        let n = fetch(&mut s, &get_big).await.map_err(e)?;
        connect = connect.min(t.elapsed().as_secs_f64());
        if n != size {
            return Err(format!("tunnelled download got {n} of {size} bytes"));
        }
    }
    let mbps = |s: f64| (size as f64 / (1024.0 * 1024.0)) / s;
    println!(
        "{{\"bench\":\"download\",\"mib\":{},\"direct_mib_s\":{:.0},\"proxy_http_mib_s\":{:.0},\"proxy_connect_mib_s\":{:.0},\"ratio_http\":{:.2},\"ratio_connect\":{:.2}}}",
        o.mb,
        mbps(direct),
        mbps(plain),
        mbps(connect),
        direct / plain,
        direct / connect
    );
    let small = format!("GET /small HTTP/1.1\r\nHost: {srv}\r\n\r\n");
    let (mut d, mut c, mut p) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..o.connects {
        let t = Instant::now();
        let mut s = TcpStream::connect(srv).await.map_err(e)?;
        fetch(&mut s, &small).await.map_err(e)?;
        d.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        let mut s = tunnel(&proxy, &srv.to_string()).await.map_err(e)?;
        fetch(&mut s, &small).await.map_err(e)?;
        c.push(t.elapsed().as_secs_f64() * 1e3);
        if let Some(pipe) = &o.pipe {
            let t = Instant::now();
            let mut child = tokio::process::Command::new(pipe)
                .args([vmcp_egress::pipe::ARG, &proxy])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .map_err(e)?;
            let (Some(mut w), Some(mut r)) = (child.stdin.take(), child.stdout.take()) else {
                return Err("no pipe stdio".into());
            };
            w.write_all(format!("CONNECT {srv} HTTP/1.1\r\nHost: {srv}\r\n\r\n").as_bytes())
                .await
                .map_err(e)?;
            read_head(&mut r).await.map_err(e)?;
            w.write_all(small.as_bytes()).await.map_err(e)?;
            let mut rest = Vec::new();
            r.read_to_end(&mut rest).await.map_err(e)?;
            p.push(t.elapsed().as_secs_f64() * 1e3);
            drop(w);
            let _ = tokio::time::timeout(Duration::from_secs(2), child.wait()).await;
        }
    }
    let line = |name: &str, v: &mut Vec<f64>, base: &mut Vec<f64>| {
        let (p50, p90) = (pct(v, 0.5), pct(v, 0.9));
        let b50 = pct(base, 0.5);
        println!(
            "{{\"bench\":\"connect_and_small_request\",\"path\":\"{name}\",\"n\":{},\"p50_ms\":{p50:.3},\"p90_ms\":{p90:.3},\"added_p50_ms\":{:.3}}}",
            v.len(),
            p50 - b50
        );
    };
    let mut base = d.clone();
    line("direct", &mut d, &mut base);
    line("proxy_connect", &mut c, &mut base);
    if !p.is_empty() {
        line("egress_pipe_then_proxy_connect", &mut p, &mut base);
    }
    Ok(())
}

fn main() -> ExitCode {
    let opts = match parse() {
        Ok(o) => o,
        Err(m) => {
            eprintln!("vmcp-egress-bench: {m}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("vmcp-egress-bench: {err}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(bench(opts)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(m) => {
            eprintln!("vmcp-egress-bench: {m}");
            ExitCode::FAILURE
        }
    }
}
