//! A loopback HTTP server for tests that need "a host on the network" without leaving the
//! machine (egress policy tests: what the guest may and may not reach).

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Starts a server on `127.0.0.1` that answers every request with `body` (HTTP/1.0, one
/// request per connection) and counts the connections it accepted; returns its port and that
/// count. It runs on a detached thread until the test process ends.
#[allow(clippy::expect_used)] // a test that cannot bind loopback cannot run at all
pub fn http_server(body: &'static str) -> (u16, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    let port = l
        .local_addr()
        .expect("a bound socket has an address")
        .port();
    let hits = Arc::new(AtomicUsize::new(0));
    let h = Arc::clone(&hits);
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            h.fetch_add(1, Ordering::SeqCst);
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let resp = format!(
                "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(resp.as_bytes());
        }
    });
    (port, hits)
}

/// A port on `127.0.0.1` that nothing listens on right now (bound, read and released; a
/// test that hands it to a server of its own may, rarely, race another process for it).
#[allow(clippy::expect_used)] // a test that cannot bind loopback cannot run at all
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a loopback port")
        .port()
}

#[cfg(test)]
mod tests {
    #[test]
    fn answers_and_counts() {
        use std::io::{Read, Write};
        let (port, hits) = super::http_server("hello");
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        assert!(out.ends_with("\r\n\r\nhello"), "{out}");
        assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 1);
    }
}
