//! Host channels over loopback TCP, for hosts without Unix sockets or vsock (Windows).
//!
//! vmcp listens on `127.0.0.1:<ephemeral>` *before* it starts QEMU; QEMU's chardev connects to
//! it as a client. Any local process could connect to that port too, so the agent channel is
//! authenticated: the guest sends the per-VM random token (given to it on the kernel command
//! line) in its hello, and [`LoopbackListener::accept_agent`] keeps a connection only when the
//! token matches ([`AgentClient::connect`] checks it in constant time). Connections with a
//! wrong token, garbage, or silence are dropped; handshakes run concurrently, so a peer that
//! connects and says nothing cannot delay the real guest. Only the deadline ends the wait.
//!
//! Limits: QMP carries no token. [`LoopbackListener::accept_one`] takes the first loopback
//! connection; a local process that wins the race could receive vmcp's QMP commands (which
//! carry no secrets) and hold up graceful shutdown, after which vmcp kills QEMU through its
//! process handle anyway. Tying the QMP connection to QEMU's process id is future work.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use crate::agent::{AgentClient, AgentError};

/// Errors of the loopback channels.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChannelError {
    /// Binding the listener failed.
    #[error("cannot listen on 127.0.0.1")]
    Bind(#[source] std::io::Error),
    /// Accepting failed.
    #[error("cannot accept a connection on {addr}")]
    Accept {
        /// Listening address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// No acceptable peer before the deadline.
    #[error("no guest agent connected to {addr} with the right token within {timeout:?} ({rejected} other connection(s) rejected)")]
    Timeout {
        /// Listening address.
        addr: SocketAddr,
        /// The deadline.
        timeout: Duration,
        /// How many connections were dropped.
        rejected: usize,
    },
    /// The right guest connected but the handshake failed for another reason (protocol
    /// version).
    #[error("guest agent handshake failed")]
    Agent(#[source] AgentError),
}

/// A listener on `127.0.0.1` with an ephemeral port.
#[derive(Debug)]
pub struct LoopbackListener {
    listener: TcpListener,
    addr: SocketAddr,
}

impl LoopbackListener {
    /// Binds `127.0.0.1:0`.
    pub async fn bind() -> Result<Self, ChannelError> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .map_err(ChannelError::Bind)?;
        let addr = listener.local_addr().map_err(ChannelError::Bind)?;
        Ok(LoopbackListener { listener, addr })
    }

    /// The address QEMU must connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The first loopback connection within `timeout` (for QMP; see the module docs).
    pub async fn accept_one(&self, timeout: Duration) -> Result<TcpStream, ChannelError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut rejected = 0;
        loop {
            let (stream, peer) = tokio::time::timeout_at(deadline, self.listener.accept())
                .await
                .map_err(|_| ChannelError::Timeout {
                    addr: self.addr,
                    timeout,
                    rejected,
                })?
                .map_err(|source| ChannelError::Accept {
                    addr: self.addr,
                    source,
                })?;
            if peer.ip().is_loopback() {
                let _ = stream.set_nodelay(true);
                return Ok(stream);
            }
            rejected += 1;
        }
    }

    /// Accepts connections until one presents `token` in a valid agent hello, within
    /// `timeout`; returns the connected client. Other connections are dropped.
    pub async fn accept_agent(
        &self,
        token: &str,
        timeout: Duration,
    ) -> Result<AgentClient, ChannelError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut handshakes: JoinSet<Result<AgentClient, AgentError>> = JoinSet::new();
        let mut rejected = 0usize;
        let timed_out = |rejected| ChannelError::Timeout {
            addr: self.addr,
            timeout,
            rejected,
        };
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return Err(timed_out(rejected)),
                accepted = self.listener.accept() => {
                    let (stream, peer) = accepted.map_err(|source| ChannelError::Accept {
                        addr: self.addr,
                        source,
                    })?;
                    if !peer.ip().is_loopback() {
                        rejected += 1;
                        continue;
                    }
                    let _ = stream.set_nodelay(true);
                    let token = token.to_string();
                    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                    handshakes.spawn(async move { AgentClient::connect(stream, &token, left).await });
                }
                Some(done) = handshakes.join_next(), if !handshakes.is_empty() => {
                    match done {
                        Ok(Ok(client)) => return Ok(client),
                        // The token matched, so this is our guest; its protocol is wrong.
                        Ok(Err(e @ AgentError::Version { .. })) => return Err(ChannelError::Agent(e)),
                        Ok(Err(e)) => {
                            tracing::warn!(peer_error = %e, addr = %self.addr, "dropped a connection on the agent channel");
                            rejected += 1;
                        }
                        Err(join) => {
                            tracing::warn!(error = %join, "agent handshake task failed");
                            rejected += 1;
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use vmcp_guest_proto::{write_msg_async, Capabilities, GuestMsg, Hello, PROTOCOL_VERSION};

    fn hello(token: &str, version: u16) -> GuestMsg {
        GuestMsg::Hello(Hello {
            protocol_version: version,
            agent_version: "test".into(),
            capabilities: Capabilities::default(),
            token: token.into(),
            boot_ns: 1,
        })
    }

    async fn guest(addr: SocketAddr, msg: GuestMsg) -> TcpStream {
        let mut s = TcpStream::connect(addr).await.unwrap();
        write_msg_async(&mut s, &msg).await.unwrap();
        s
    }

    const TOKEN: &str = "3f9c0a51d2b8e7f4";

    #[tokio::test]
    async fn wrong_token_is_rejected_by_the_handshake() {
        // The agent client itself, on a TCP loopback pair.
        let l = LoopbackListener::bind().await.unwrap();
        let addr = l.addr();
        assert!(addr.ip().is_loopback() && addr.port() != 0);
        let g = tokio::spawn(guest(addr, hello("not-the-token", PROTOCOL_VERSION)));
        let (s, _) = l.listener.accept().await.unwrap();
        let e = AgentClient::connect(s, TOKEN, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(e, AgentError::BadToken), "{e:?}");
        drop(g.await.unwrap());
    }

    #[tokio::test]
    async fn only_the_right_token_is_kept() {
        let l = LoopbackListener::bind().await.unwrap();
        let addr = l.addr();
        let peers = tokio::spawn(async move {
            // A silent peer, a garbage peer, an impostor, then the real guest.
            let silent = TcpStream::connect(addr).await.unwrap();
            let mut garbage = TcpStream::connect(addr).await.unwrap();
            garbage.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
            let impostor = guest(addr, hello("guess", PROTOCOL_VERSION)).await;
            let real = guest(addr, hello(TOKEN, PROTOCOL_VERSION)).await;
            (silent, garbage, impostor, real)
        });
        let client = l
            .accept_agent(TOKEN, Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(client.hello().token, TOKEN);
        assert_eq!(client.hello().agent_version, "test");
        drop(peers.await.unwrap());
    }

    #[tokio::test]
    async fn impostors_only_means_timeout_with_count() {
        let l = LoopbackListener::bind().await.unwrap();
        let addr = l.addr();
        let peers = tokio::spawn(async move {
            let a = guest(addr, hello("wrong", PROTOCOL_VERSION)).await;
            let b = guest(addr, hello("", PROTOCOL_VERSION)).await;
            (a, b)
        });
        let e = l
            .accept_agent(TOKEN, Duration::from_millis(700))
            .await
            .unwrap_err();
        let text = e.to_string();
        assert!(
            matches!(e, ChannelError::Timeout { rejected: 2, .. }),
            "{text}"
        );
        assert!(
            text.contains("right token") && text.contains("127.0.0.1"),
            "{text}"
        );
        drop(peers.await.unwrap());
    }

    #[tokio::test]
    async fn right_token_wrong_version_is_an_error() {
        let l = LoopbackListener::bind().await.unwrap();
        let g = tokio::spawn(guest(l.addr(), hello(TOKEN, PROTOCOL_VERSION + 1)));
        let e = l
            .accept_agent(TOKEN, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(
            matches!(e, ChannelError::Agent(AgentError::Version { .. })),
            "{e:?}"
        );
        drop(g.await.unwrap());
    }

    #[tokio::test]
    async fn accept_one_for_qmp() {
        let l = LoopbackListener::bind().await.unwrap();
        let e = l.accept_one(Duration::from_millis(100)).await.unwrap_err();
        assert!(matches!(e, ChannelError::Timeout { rejected: 0, .. }));
        let addr = l.addr();
        let c = tokio::spawn(async move { TcpStream::connect(addr).await.unwrap() });
        let s = l.accept_one(Duration::from_secs(5)).await.unwrap();
        assert_eq!(
            s.peer_addr().unwrap(),
            c.await.unwrap().local_addr().unwrap()
        );
    }
}
