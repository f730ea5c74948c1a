//! The one stand-in for `qemu-system-*` in vmcp's tests: the QEMU backend's lifecycle tests on
//! Linux (`src/qemu/tests.rs`) and its Windows launch layer under wine
//! (`tests/windows_launch.rs`, run by `scripts/test.d/40-windows.sh`).
//!
//! It does what QEMU does on the host side and nothing else. Each `-chardev socket,id=..` is
//! either an inherited descriptor (`fd=N`, Linux) or a loopback address it connects to
//! (`host=..,port=..`, Windows). On QMP it greets and answers `qmp_capabilities`,
//! `query-status` (running, or paused after `stop` until `cont`) and `quit`; on the console it
//! writes a few lines; on the agent channel it sends the guest hello with the token from
//! `-append` (`vmcp.token=`) or from the fw_cfg file (`-fw_cfg name=opt/vmcp/token,file=`,
//! read as QEMU does), answers pings and exits on a poweroff request. Closed channels do
//! not make it exit (like QEMU), so a test can tell who stopped it.
//!
//! The word `fake=<mode>` on the kernel command line (`-append`) picks the behaviour:
//! - `agent` (default): as above;
//! - `exit`: print an error on stderr and exit 1 at once;
//! - `hang`: answer QMP, print console lines, never say hello;
//! - `stubborn`: like `agent`, but ignore poweroff;
//! - `badtoken`: like `agent`, but present a wrong token.
//!
//! If `VMCP_FAKE_QEMU_HEARTBEAT` names a file, it rewrites it every 50 ms while alive, so a
//! test can tell whether the process still runs.

use std::collections::HashMap;
use std::io;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use vmcp_guest_proto::{
    read_msg_async, write_msg_async, Capabilities, GuestMsg, Hello, HostMsg, PROTOCOL_VERSION,
};

const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 0, "major": 10}, "package": "fake"}, "capabilities": []}}"#;

/// A connected channel to vmcp.
trait Channel: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Channel for T {}

/// Inherited descriptors exist only on Unix.
#[cfg(unix)]
mod inherited {
    use std::os::fd::FromRawFd;

    /// The channel QEMU would get as `-chardev socket,fd=N`.
    pub fn channel(fd: i32) -> std::io::Result<Box<dyn super::Channel>> {
        // SAFETY: vmcp made this descriptor a socketpair end for exactly this chardev and let
        // this process inherit it; nothing else in this process owns or closes it.
        let std = unsafe { std::os::unix::net::UnixStream::from_raw_fd(fd) };
        std.set_nonblocking(true)?;
        Ok(Box::new(tokio::net::UnixStream::from_std(std)?))
    }
}

#[cfg(not(unix))]
mod inherited {
    /// No descriptors are inherited here (Windows passes loopback addresses).
    pub fn channel(fd: i32) -> std::io::Result<Box<dyn super::Channel>> {
        Err(std::io::Error::other(format!(
            "-chardev fd={fd}: inherited descriptors exist only on Unix"
        )))
    }
}

/// The `-chardev socket,...` options by id.
fn chardevs(args: &[String]) -> HashMap<String, HashMap<String, String>> {
    let mut out = HashMap::new();
    for pair in args.windows(2).filter(|p| p[0] == "-chardev") {
        let opts: HashMap<String, String> = pair[1]
            .split(',')
            .skip(1)
            .filter_map(|part| part.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        if let Some(id) = opts.get("id") {
            out.insert(id.clone(), opts);
        }
    }
    out
}

async fn connect(
    devs: &HashMap<String, HashMap<String, String>>,
    id: &str,
) -> io::Result<Box<dyn Channel>> {
    let opts = devs
        .get(id)
        .ok_or_else(|| io::Error::other(format!("no -chardev socket with id={id}")))?;
    if let Some(fd) = opts.get("fd") {
        let fd = fd
            .parse()
            .map_err(|_| io::Error::other(format!("bad fd={fd}")))?;
        return inherited::channel(fd);
    }
    match (opts.get("host"), opts.get("port")) {
        (Some(host), Some(port)) => Ok(Box::new(
            tokio::net::TcpStream::connect(format!("{host}:{port}")).await?,
        )),
        _ => Err(io::Error::other(format!(
            "-chardev id={id} has neither fd= nor host=/port="
        ))),
    }
}

/// The `key=value` words of `-append`.
fn kernel_args(args: &[String]) -> HashMap<String, String> {
    let Some(i) = args.iter().position(|a| a == "-append") else {
        return HashMap::new();
    };
    args.get(i + 1)
        .map(|line| {
            line.split_whitespace()
                .filter_map(|w| w.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        })
        .unwrap_or_default()
}

async fn qmp(stream: Box<dyn Channel>) -> io::Result<()> {
    let (r, mut w) = tokio::io::split(stream);
    w.write_all(format!("{GREETING}\r\n").as_bytes()).await?;
    let mut lines = BufReader::new(r).lines();
    let mut status = "running";
    while let Some(line) = lines.next_line().await? {
        let reply = if line.contains("\"query-status\"") {
            format!(
                r#"{{"return": {{"status": "{status}", "running": {}}}}}"#,
                status == "running"
            )
        } else {
            if line.contains("\"stop\"") {
                status = "paused";
            } else if line.contains("\"cont\"") {
                status = "running";
            }
            r#"{"return": {}}"#.to_string()
        };
        w.write_all(format!("{reply}\r\n").as_bytes()).await?;
        if line.contains("\"quit\"") {
            std::process::exit(0);
        }
    }
    Ok(())
}

async fn agent(
    stream: Box<dyn Channel>,
    token: String,
    mode: String,
    console: Arc<Mutex<Vec<u8>>>,
) -> io::Result<()> {
    let (mut r, mut w) = tokio::io::split(stream);
    let hello = GuestMsg::Hello(Hello {
        protocol_version: PROTOCOL_VERSION,
        agent_version: "fake-qemu".into(),
        capabilities: Capabilities(Capabilities::POWEROFF),
        token: if mode == "badtoken" {
            "wrong".into()
        } else {
            token
        },
        boot_ns: 1_500_000_000,
    });
    write_msg_async(&mut w, &hello)
        .await
        .map_err(io::Error::other)?;
    let mut buf = Vec::new();
    while let Some(msg) = read_msg_async::<HostMsg, _>(&mut r, &mut buf)
        .await
        .map_err(io::Error::other)?
    {
        match msg {
            HostMsg::Ping { id } => write_msg_async(&mut w, &GuestMsg::Pong { id })
                .await
                .map_err(io::Error::other)?,
            HostMsg::Poweroff { .. } if mode == "stubborn" => {}
            HostMsg::Poweroff { id } => {
                write_msg_async(&mut w, &GuestMsg::Done { id })
                    .await
                    .map_err(io::Error::other)?;
                w.flush().await?;
                if let Ok(mut c) = console.lock() {
                    c.extend_from_slice(b"fake console: power off\r\n");
                }
                // Let the console line go out before the process ends.
                tokio::time::sleep(Duration::from_millis(50)).await;
                std::process::exit(0);
            }
            other => eprintln!("fake-qemu: ignoring {other:?}"),
        }
    }
    Ok(())
}

/// Writes whatever is queued for the console, until the channel closes.
async fn console(mut stream: Box<dyn Channel>, queue: Arc<Mutex<Vec<u8>>>) {
    loop {
        let pending = queue
            .lock()
            .map(|mut q| std::mem::take(&mut *q))
            .unwrap_or_default();
        if !pending.is_empty() && stream.write_all(&pending).await.is_err() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn run() -> io::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let words = kernel_args(&args);
    let mode = words.get("fake").cloned().unwrap_or_else(|| "agent".into());
    if mode == "exit" {
        eprintln!("qemu-system-x86_64: fake failure for the test");
        std::process::exit(1);
    }
    let devs = chardevs(&args);
    let fw_cfg_file = args
        .iter()
        .filter_map(|a| a.strip_prefix("name=opt/vmcp/token,file="))
        .next_back()
        .map(str::to_owned);
    let token = match (words.get("vmcp.token"), fw_cfg_file) {
        (Some(t), _) => t.clone(),
        (None, Some(file)) => std::fs::read_to_string(&file)?,
        (None, None) => {
            return Err(io::Error::other(
                "no vmcp.token= in -append and no fw_cfg opt/vmcp/token",
            ))
        }
    };
    let qmp_stream = connect(&devs, "qmp").await?;
    let console_stream = connect(&devs, "console").await?;
    let agent_stream = connect(&devs, "agent").await?;
    if let Some(path) = std::env::var_os("VMCP_FAKE_QEMU_HEARTBEAT") {
        tokio::spawn(async move {
            let mut n = 0u64;
            loop {
                n += 1;
                let _ = std::fs::write(&path, n.to_string());
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
    }
    let queue = Arc::new(Mutex::new(
        format!("fake console: booting\r\nfake console: mode {mode}\r\n").into_bytes(),
    ));
    tokio::spawn(console(console_stream, Arc::clone(&queue)));
    tokio::spawn(async move {
        if let Err(e) = qmp(qmp_stream).await {
            eprintln!("fake-qemu: QMP: {e}");
        }
    });
    if mode != "hang" {
        if let Err(e) = agent(agent_stream, token, mode, queue).await {
            eprintln!("fake-qemu: agent channel: {e}");
        }
    } else {
        // Keep the agent channel open and silent.
        let _keep = agent_stream;
        std::future::pending::<()>().await;
    }
    // Like QEMU, a closed channel does not end the process: only `quit`, a poweroff request
    // or being killed does.
    std::future::pending::<()>().await;
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fake-qemu: {e}");
            ExitCode::from(1)
        }
    }
}
