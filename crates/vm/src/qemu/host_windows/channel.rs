//! Host channels over loopback TCP, for hosts without socketpairs that QEMU can inherit
//! (Windows).
//!
//! vmcp binds `127.0.0.1:<ephemeral>` *before* it starts QEMU, and QEMU's chardev connects to
//! it as a client (`-chardev socket,host=127.0.0.1,port=N`). A [`PendingTcpStream`] is the
//! host end: a byte stream that accepts its one connection the first time it is read or
//! written, then closes the listener. So the QEMU backend's code, written for connected
//! socketpairs, works unchanged: QMP, console and agent channel are each one such stream.
//!
//! Security: the port is reachable only from this machine (loopback; non-loopback peers are
//! refused), but any local process could connect first. The agent channel is therefore
//! authenticated: the guest sends the per-VM random token (on the kernel command line) in
//! its hello and [`crate::agent::AgentClient::connect`] drops a peer with a wrong token
//! ([`crate::agent::AgentError::BadToken`]). An impostor that wins the race can therefore
//! make the VM fail to start (denial of service), but can neither drive the guest nor read
//! its output. QMP and console carry no secret (the token is not sent over QMP; the console
//! shows the guest's boot log). Tying each connection to QEMU's process id
//! (`GetExtendedTcpTable`) would close the race; it is future work.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

enum State {
    /// Bound, not yet registered with the runtime (binding needs no runtime).
    Bound(std::net::TcpListener),
    Accepting(TcpListener),
    Ready(TcpStream),
    Failed(io::ErrorKind, String),
}

/// The host end of a loopback TCP channel: accepts one loopback connection on first use.
pub struct PendingTcpStream {
    addr: SocketAddr,
    state: State,
}

impl std::fmt::Debug for PendingTcpStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match &self.state {
            State::Bound(_) | State::Accepting(_) => "accepting",
            State::Ready(_) => "connected",
            State::Failed(..) => "failed",
        };
        f.debug_struct("PendingTcpStream")
            .field("addr", &self.addr)
            .field("state", &state)
            .finish()
    }
}

impl PendingTcpStream {
    /// Binds `127.0.0.1:0`. Needs no async runtime; the first read or write must happen inside
    /// one.
    pub fn listen() -> io::Result<PendingTcpStream> {
        let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        Ok(PendingTcpStream {
            addr,
            state: State::Bound(listener),
        })
    }

    /// The address QEMU must connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Whether the connection has been accepted.
    pub fn is_connected(&self) -> bool {
        matches!(self.state, State::Ready(_))
    }

    fn poll_connected(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<&mut TcpStream>> {
        loop {
            let next = match &mut self.state {
                State::Ready(_) | State::Failed(..) => break,
                State::Bound(std_listener) => {
                    match std_listener.try_clone().and_then(TcpListener::from_std) {
                        Ok(listener) => State::Accepting(listener),
                        Err(e) => State::Failed(e.kind(), e.to_string()),
                    }
                }
                State::Accepting(listener) => match ready!(listener.poll_accept(cx)) {
                    Ok((stream, peer)) if peer.ip().is_loopback() => {
                        let _ = stream.set_nodelay(true);
                        // The listener is dropped here: nobody else can connect afterwards.
                        State::Ready(stream)
                    }
                    Ok((_, peer)) => {
                        tracing::warn!(%peer, addr = %self.addr, "refused a non-loopback connection");
                        continue;
                    }
                    Err(e) => State::Failed(e.kind(), e.to_string()),
                },
            };
            self.state = next;
        }
        match &mut self.state {
            State::Ready(stream) => Poll::Ready(Ok(stream)),
            State::Failed(kind, message) => {
                Poll::Ready(Err(io::Error::new(*kind, message.clone())))
            }
            State::Bound(_) | State::Accepting(_) => Poll::Pending,
        }
    }
}

impl AsyncRead for PendingTcpStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let stream = ready!(self.get_mut().poll_connected(cx))?;
        Pin::new(stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for PendingTcpStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let stream = ready!(self.get_mut().poll_connected(cx))?;
        Pin::new(stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().state {
            State::Ready(stream) => Pin::new(stream).poll_flush(cx),
            // Nothing was written yet, so there is nothing to flush.
            State::Bound(_) | State::Accepting(_) | State::Failed(..) => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().state {
            State::Ready(stream) => Pin::new(stream).poll_shutdown(cx),
            // Never connected: shutting down must not wait for a peer.
            State::Bound(_) | State::Accepting(_) | State::Failed(..) => Poll::Ready(Ok(())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use vmcp_guest_proto::{write_msg_async, Capabilities, GuestMsg, Hello, PROTOCOL_VERSION};

    use crate::agent::{AgentClient, AgentError};

    fn hello(token: &str) -> GuestMsg {
        GuestMsg::Hello(Hello {
            protocol_version: PROTOCOL_VERSION,
            agent_version: "test".into(),
            capabilities: Capabilities::default(),
            token: token.into(),
            boot_ns: 1,
        })
    }

    /// A guest that connects like QEMU's chardev and sends a hello.
    async fn guest(addr: SocketAddr, token: &str) -> TcpStream {
        let mut s = TcpStream::connect(addr).await.unwrap();
        write_msg_async(&mut s, &hello(token)).await.unwrap();
        s
    }

    const TOKEN: &str = "3f9c0a51d2b8e7f4a0b1c2d3e4f50617";

    #[tokio::test]
    async fn wrong_token_is_rejected_over_tcp() {
        let host = PendingTcpStream::listen().unwrap();
        assert!(host.addr().ip().is_loopback() && host.addr().port() != 0);
        let g = tokio::spawn(guest(host.addr(), "guessed-token"));
        let e = AgentClient::connect(host, TOKEN, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(e, AgentError::BadToken), "{e:?}");
        drop(g.await.unwrap());
    }

    #[tokio::test]
    async fn right_token_connects_over_tcp() {
        let host = PendingTcpStream::listen().unwrap();
        let g = tokio::spawn(guest(host.addr(), TOKEN));
        let client = AgentClient::connect(host, TOKEN, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(client.hello().token, TOKEN);
        drop(g.await.unwrap());
    }

    #[tokio::test]
    async fn one_connection_then_the_port_is_closed() {
        let mut host = PendingTcpStream::listen().unwrap();
        let addr = host.addr();
        assert!(!host.is_connected());
        // Before anything connects, flush and shutdown do not wait.
        host.flush().await.unwrap();
        let mut peer = TcpStream::connect(addr).await.unwrap();
        peer.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        host.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
        assert!(host.is_connected());
        host.write_all(b"pong").await.unwrap();
        host.flush().await.unwrap();
        peer.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"pong");
        // The listener is gone: a second connection is refused.
        assert!(TcpStream::connect(addr).await.is_err());
        host.shutdown().await.unwrap();
        assert_eq!(peer.read(&mut buf).await.unwrap(), 0);
        assert!(format!("{host:?}").contains("connected"));
    }

    #[tokio::test]
    async fn unused_stream_shuts_down_at_once() {
        let mut host = PendingTcpStream::listen().unwrap();
        assert!(format!("{host:?}").contains("accepting"));
        tokio::time::timeout(Duration::from_secs(1), host.shutdown())
            .await
            .unwrap()
            .unwrap();
        // A read waits for a peer; with none it is still pending after a while.
        let mut b = [0u8; 1];
        assert!(
            tokio::time::timeout(Duration::from_millis(100), host.read(&mut b))
                .await
                .is_err()
        );
    }
}
