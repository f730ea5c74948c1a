//! `vmcp bench --net`: an allow-listed guest's network, over the agent channel (the default)
//! and through a card (`--net-via card`), against the host, in one run.
//!
//! A loopback HTTP server in this process serves a `--mb` MB body and a 2-byte one. For each
//! of `--runs` rounds, alternately (so a load change on the host hits every side alike):
//! - **host**: this process downloads the big body (wall clock);
//! - **channel** and **card**: `vmcp run --net allow=127.0.0.1:PORT [--net-via card]`
//!   (this executable) runs a script in the guest that downloads the big body (to
//!   `/dev/null`: a pipe to a counter would share the guest's one vCPU) and then makes
//!   20 small requests, each a new `wget` and connection, timed with the guest's
//!   `/proc/uptime` (so the VM's start is not in these figures); and the whole `vmcp run ...
//!   -- true`, spawn to exit, times the start of a networked VM.
//!
//! The guest sees the server as `127.0.0.1:PORT` through the proxy (`NO_PROXY` cleared: the
//! guest's own loopback is excluded by default).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::bench::Samples;

/// Small requests per round in the guest.
const SMALL_REQUESTS: u32 = 20;

/// Serves `GET /big` (`big` bytes) and anything else as a 2-byte body, one request per
/// connection, on a detached thread; returns the port.
fn serve(big: usize) -> anyhow::Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("cannot listen on 127.0.0.1")?;
    let port = l.local_addr()?.port();
    std::thread::spawn(move || {
        let chunk = std::sync::Arc::new(vec![b'x'; 64 * 1024]);
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let chunk = std::sync::Arc::clone(&chunk);
            std::thread::spawn(move || {
                let mut head = [0u8; 2048];
                let n = s.read(&mut head).unwrap_or(0);
                let is_big = head[..n].windows(5).any(|w| w == b"/big ");
                let len = if is_big { big } else { 2 };
                let _ = write!(
                    s,
                    "HTTP/1.0 200 OK\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"
                );
                let mut left = len;
                while left > 0 {
                    let n = left.min(chunk.len());
                    if s.write_all(&chunk[..n]).is_err() {
                        return;
                    }
                    left -= n;
                }
            });
        }
    });
    Ok(port)
}

/// The host's own download of the big body.
fn host_download(port: u16, big: usize) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.write_all(b"GET /big HTTP/1.0\r\n\r\n")?;
    let mut got = 0usize;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        got += n;
    }
    anyhow::ensure!(got > big, "the host download was short: {got} bytes");
    Ok(t.elapsed())
}

/// `vmcp run` with the allow-list and `extra` flags; returns its stdout and wall time.
fn vmcp_run(
    exe: &std::path::Path,
    port: u16,
    extra: &[&str],
    script: &str,
) -> anyhow::Result<(String, Duration)> {
    let t = Instant::now();
    let out = Command::new(exe)
        .args(["run", "--net", &format!("allow=127.0.0.1:{port}")])
        .args(extra)
        .args(["--", "sh", "-c", script])
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .context("cannot start `vmcp run`")?;
    let took = t.elapsed();
    anyhow::ensure!(
        out.status.success(),
        "`vmcp run --net allow=... {}` failed ({}): {}",
        extra.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok((String::from_utf8_lossy(&out.stdout).into_owned(), took))
}

/// The guest's timings: (download of the big body, all small requests).
fn guest_times(stdout: &str, big: usize) -> anyhow::Result<(Duration, Duration)> {
    let mut it = stdout.split_whitespace();
    let mut next = |what: &str| -> anyhow::Result<f64> {
        it.next()
            .and_then(|v| v.parse::<f64>().ok())
            .with_context(|| format!("no {what} in the guest's output {stdout:?}"))
    };
    // wget fails on a body shorter than its Content-Length; the script then reports 0.
    let bytes = next("byte count")?;
    anyhow::ensure!(bytes != 0.0, "the download in the guest failed (wget)");
    anyhow::ensure!(
        bytes as usize == big,
        "the guest downloaded {bytes} bytes, not {big}"
    );
    let (t0, t1, t2) = (next("start")?, next("download end")?, next("end")?);
    Ok((
        Duration::from_secs_f64((t1 - t0).max(0.0)),
        Duration::from_secs_f64((t2 - t1).max(0.0)),
    ))
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

/// Runs the network benchmark.
pub fn run(runs: usize, mb: usize) -> anyhow::Result<()> {
    anyhow::ensure!(mb > 0, "--mb must be at least 1");
    let exe = std::env::current_exe().context("cannot find the vmcp executable")?;
    let big = mb * 1_000_000;
    let port = serve(big)?;
    let script = format!(
        "export NO_PROXY= no_proxy=; u() {{ cut -d' ' -f1 /proc/uptime; }}; s=$(u); \
         n=0; wget -q -O /dev/null http://127.0.0.1:{port}/big && n={big}; e=$(u); \
         i=0; while [ $i -lt {SMALL_REQUESTS} ]; do wget -q -O /dev/null http://127.0.0.1:{port}/small; i=$((i+1)); done; \
         f=$(u); echo $n $s $e $f"
    );
    let paths: [(&str, &[&str]); 2] = [("channel", &[]), ("card", &["--net-via", "card"])];
    eprintln!("vmcp: bench --net: warming up (the first start may build the snapshot)");
    for (_, extra) in paths {
        vmcp_run(&exe, port, extra, "true")?;
    }
    let mut host = Vec::new();
    let mut download = [Vec::new(), Vec::new()];
    let mut small = [Vec::new(), Vec::new()];
    let mut start = [Vec::new(), Vec::new()];
    for round in 1..=runs {
        host.push(host_download(port, big)?);
        for (i, (_, extra)) in paths.iter().enumerate() {
            let (out, _) = vmcp_run(&exe, port, extra, &script)?;
            let (d, s) = guest_times(&out, big)?;
            download[i].push(d);
            small[i].push(s / SMALL_REQUESTS);
            let (_, took) = vmcp_run(&exe, port, extra, "true")?;
            start[i].push(took);
        }
        eprintln!("vmcp: bench --net: round {round} of {runs}");
    }
    let p50 = |v: &Vec<Duration>| Samples::new(v.clone()).pct(50.0);
    let h = p50(&host);
    println!(
        "{mb} MB download and {SMALL_REQUESTS} new connections from a guest, {runs} rounds, p50:"
    );
    println!("  host (this process)        {}", secs(h));
    for (i, (name, _)) in paths.iter().enumerate() {
        let d = p50(&download[i]);
        println!(
            "  {name:<8} download         {} ({:.1} MB/s; {:.3}x the host)",
            secs(d),
            mb as f64 / d.as_secs_f64().max(1e-9),
            h.as_secs_f64() / d.as_secs_f64().max(1e-9)
        );
        println!(
            "  {name:<8} new connection   {:.1} ms each (a new wget in the guest included)",
            p50(&small[i]).as_secs_f64() * 1e3
        );
        println!(
            "  {name:<8} `vmcp run ... -- true`  {:.0} ms",
            p50(&start[i]).as_secs_f64() * 1e3
        );
    }
    let ratio = p50(&download[1]).as_secs_f64() / p50(&download[0]).as_secs_f64().max(1e-9);
    println!("  channel / card download rate: {ratio:.2}x");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guest_report_is_parsed_and_checked() {
        let (d, s) = guest_times("5000000 1.00 3.50 4.50\n", 5_000_000).unwrap();
        assert_eq!(d, Duration::from_millis(2500));
        assert_eq!(s, Duration::from_secs(1));
        let short = guest_times("12 1.00 3.50 4.50", 5_000_000).unwrap_err();
        assert!(short.to_string().contains("downloaded 12 bytes"), "{short}");
        let failed = guest_times("0 1.00 3.50 4.50", 5_000_000).unwrap_err();
        assert!(failed.to_string().contains("failed"), "{failed}");
        let garbled = guest_times("5000000 x", 5_000_000).unwrap_err();
        assert!(garbled.to_string().contains("no start"), "{garbled}");
    }

    #[test]
    fn the_server_serves_both_bodies() {
        let port = serve(300_000).unwrap();
        assert!(host_download(port, 300_000).is_ok());
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.write_all(b"GET /small HTTP/1.0\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        assert!(out.ends_with("\r\n\r\nxx"), "{out}");
    }
}
