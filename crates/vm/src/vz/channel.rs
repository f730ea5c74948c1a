//! A vsock connection from the framework as a tokio byte stream for the agent client.
//!
//! `VZVirtioSocketConnection` hands out a connected stream socket descriptor that it owns; the
//! macOS layer duplicates it and passes the duplicate here, keeping the connection object alive
//! next to the stream. Framing on top is the guest protocol's (`vmcp_guest_proto`), the same as
//! on every other channel.

use std::io;
use std::os::fd::OwnedFd;

/// Wraps a connected stream-socket descriptor (non-blocking from here on).
pub fn stream_from_fd(fd: OwnedFd) -> io::Result<tokio::net::UnixStream> {
    let std = std::os::unix::net::UnixStream::from(fd);
    std.set_nonblocking(true)?;
    tokio::net::UnixStream::from_std(std)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::AgentClient;
    use std::time::Duration;
    use vmcp_guest_proto::{
        read_msg, write_msg, Capabilities, GuestMsg, Hello, HostMsg, PROTOCOL_VERSION,
    };

    /// A blocking guest on the other end of a socketpair, as the real agent would be.
    #[tokio::test]
    async fn agent_protocol_over_a_socket_descriptor() {
        let (host, mut guest) = std::os::unix::net::UnixStream::pair().unwrap();
        let guest_thread = std::thread::spawn(move || {
            write_msg(
                &mut guest,
                &GuestMsg::Hello(Hello {
                    protocol_version: PROTOCOL_VERSION,
                    agent_version: "t".into(),
                    capabilities: Capabilities(Capabilities::EXEC),
                    token: "tok".into(),
                    boot_ns: 1,
                }),
            )
            .unwrap();
            let mut buf = Vec::new();
            let mut pings = 0;
            while let Ok(Some(msg)) = read_msg::<HostMsg, _>(&mut guest, &mut buf) {
                if let HostMsg::Ping { id } = msg {
                    pings += 1;
                    write_msg(&mut guest, &GuestMsg::Pong { id }).unwrap();
                    if pings == 3 {
                        break;
                    }
                }
            }
            pings
        });
        let stream = stream_from_fd(OwnedFd::from(host)).unwrap();
        let client = AgentClient::connect(stream, "tok", Duration::from_secs(5))
            .await
            .unwrap();
        for _ in 0..3 {
            client.ping().await.unwrap();
        }
        assert_eq!(guest_thread.join().unwrap(), 3);
    }
}
