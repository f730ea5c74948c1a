//! A stand-in for `qemu-system-x86_64` that exercises vmcp's Windows launch layer without QEMU
//! (used by `tests/windows_launch.rs`, run under wine by `scripts/test.d/40-windows.sh`).
//!
//! It does what QEMU does on the host side and nothing else: connects each
//! `-chardev socket,id=..,host=..,port=..` as a client, greets on QMP and answers
//! `qmp_capabilities`, `query-status` (running) and `quit`, writes a console line, and on the
//! agent channel sends the guest hello with the token from `-append` (`vmcp.token=`), answers
//! pings and exits on a poweroff request. Closed channels do not make it exit. If `VMCP_FAKE_QEMU_HEARTBEAT` names a file, it
//! rewrites it every 50 ms while alive, so a test can tell whether the process still runs.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use vmcp_guest_proto::{
    read_msg_async, write_msg_async, Capabilities, GuestMsg, Hello, HostMsg, PROTOCOL_VERSION,
};

const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 0, "major": 10}, "package": "fake"}, "capabilities": []}}"#;

fn chardevs(args: &[String]) -> HashMap<String, SocketAddr> {
    let mut out = HashMap::new();
    for pair in args.windows(2).filter(|p| p[0] == "-chardev") {
        let mut kv = HashMap::new();
        for part in pair[1].split(',').skip(1) {
            if let Some((k, v)) = part.split_once('=') {
                kv.insert(k, v);
            }
        }
        if let (Some(id), Some(host), Some(port)) = (kv.get("id"), kv.get("host"), kv.get("port")) {
            if let Ok(addr) = format!("{host}:{port}").parse() {
                out.insert(id.to_string(), addr);
            }
        }
    }
    out
}

fn token(args: &[String]) -> Option<String> {
    let i = args.iter().position(|a| a == "-append")?;
    args.get(i + 1)?
        .split_whitespace()
        .find_map(|w| w.strip_prefix("vmcp.token="))
        .map(str::to_string)
}

async fn qmp(stream: TcpStream) -> io::Result<()> {
    let (r, mut w) = stream.into_split();
    w.write_all(format!("{GREETING}\n").as_bytes()).await?;
    let mut lines = BufReader::new(r).lines();
    while let Some(line) = lines.next_line().await? {
        let reply = if line.contains("query-status") {
            r#"{"return": {"status": "running", "running": true}}"#
        } else {
            r#"{"return": {}}"#
        };
        w.write_all(format!("{reply}\n").as_bytes()).await?;
        if line.contains("\"quit\"") {
            std::process::exit(0);
        }
    }
    Ok(())
}

async fn agent(stream: TcpStream, token: String) -> io::Result<()> {
    let (mut r, mut w) = stream.into_split();
    let hello = GuestMsg::Hello(Hello {
        protocol_version: PROTOCOL_VERSION,
        agent_version: "fake-qemu".into(),
        capabilities: Capabilities(Capabilities::POWEROFF),
        token,
        boot_ns: 1,
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
            HostMsg::Poweroff { id } => {
                write_msg_async(&mut w, &GuestMsg::Done { id })
                    .await
                    .map_err(io::Error::other)?;
                w.flush().await?;
                std::process::exit(0);
            }
            other => eprintln!("fake-qemu: ignoring {other:?}"),
        }
    }
    Ok(())
}

async fn run() -> io::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let devs = chardevs(&args);
    let addr = |id: &str| {
        devs.get(id)
            .copied()
            .ok_or_else(|| io::Error::other(format!("no -chardev socket with id={id}")))
    };
    let token = token(&args).ok_or_else(|| io::Error::other("no vmcp.token= in -append"))?;
    let qmp_stream = TcpStream::connect(addr("qmp")?).await?;
    let mut console = TcpStream::connect(addr("console")?).await?;
    let agent_stream = TcpStream::connect(addr("agent")?).await?;
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
    console.write_all(b"fake-qemu: console up\n").await?;
    tokio::select! {
        r = qmp(qmp_stream) => r?,
        r = agent(agent_stream, token) => r?,
    }
    // Like QEMU, a closed channel does not end the process: only `quit`, a poweroff request
    // or being killed does. (So a test can tell who stopped it.)
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
