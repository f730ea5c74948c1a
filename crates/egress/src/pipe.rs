//! The per-connection forward helper: QEMU's user-mode network starts
//! `vmcp __egress-pipe 127.0.0.1:PORT` for each guest connection to the proxy address, with
//! the connection as stdin and stdout; the helper joins them to the VM's proxy on host
//! loopback and exits when either side closes.
//!
//! Blocking std I/O and two threads: it lives for one connection and should start fast.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::process::ExitCode;
use std::time::Duration;

/// The hidden argument that selects this helper in the `vmcp` binary.
pub const ARG: &str = "__egress-pipe";

fn copy(mut from: impl Read, mut to: impl Write) -> io::Result<u64> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        to.write_all(&buf[..n])?;
        to.flush()?;
        total += n as u64;
    }
}

/// Runs the helper for proxy address `addr` (only loopback addresses are accepted).
pub fn main(addr: &str) -> ExitCode {
    let target: SocketAddr = match addr.parse() {
        Ok(a) if std::net::IpAddr::is_loopback(&SocketAddr::ip(&a)) => a,
        _ => {
            eprintln!("vmcp {ARG}: expected a loopback address:port, got {addr:?}");
            return ExitCode::FAILURE;
        }
    };
    let sock = match TcpStream::connect_timeout(&target, Duration::from_secs(5)) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("vmcp {ARG}: cannot reach the egress proxy at {target}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let _ = sock.set_nodelay(true);
    let Ok(up) = sock.try_clone() else {
        return ExitCode::FAILURE;
    };
    let upload = std::thread::spawn(move || {
        let _ = copy(io::stdin().lock(), &up);
        let _ = up.shutdown(Shutdown::Write);
    });
    let _ = copy(&sock, io::stdout().lock());
    // The proxy closed: nothing more can go anywhere, so do not wait for the guest side.
    drop(upload);
    ExitCode::SUCCESS
}
