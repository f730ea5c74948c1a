//! The host side of TCP tunnels ([`HostMsg::TcpAccept`], [`HostMsg::TcpConnect`]): one
//! connection of guest loopback becomes a local [`DuplexStream`] whose bytes travel over the
//! agent channel, within the connection's windows in both directions. This is how a guest
//! without a network card reaches the VM's egress proxy, and how the host reaches a port a
//! guest process serves.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use vmcp_guest_proto::{credit_cost, Capabilities, GuestMsg, HostMsg, RequestId, CHUNK_SIZE};

use super::{describe, failed, AgentClient, AgentError, Answers, StdinWindow};

/// Bytes buffered in the local pipe of one tunnel, per direction.
const PIPE_BYTES: usize = 2 * CHUNK_SIZE;

/// Forgets a tunnel request whose future was dropped before the guest answered, so the
/// agent stops waiting for a client on its behalf.
struct Pending {
    client: AgentClient,
    id: RequestId,
    armed: bool,
}

impl Drop for Pending {
    fn drop(&mut self) {
        if self.armed {
            self.client.discard(self.id);
        }
    }
}

/// An accept request the guest agent has received: its listener is up (when made by
/// [`AgentClient::tcp_listen`]) and the next client goes to this request. Dropping it
/// withdraws the request.
pub struct PendingAccept {
    client: AgentClient,
    answers: Answers,
    window: Arc<StdinWindow>,
    /// An answer that arrived while checking the listener.
    early: Option<GuestMsg>,
    guard: Pending,
}

impl std::fmt::Debug for PendingAccept {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingAccept")
            .field("id", &self.answers.id)
            .finish_non_exhaustive()
    }
}

impl PendingAccept {
    /// Waits for the client (as long as it takes) and returns its connection as a local
    /// stream.
    pub async fn connected(mut self) -> Result<DuplexStream, AgentError> {
        let answer = match self.early.take() {
            Some(msg) => Some(msg),
            None => self.answers.recv(&self.client).await,
        };
        self.client
            .tunnel_answer(answer, self.answers, self.window, self.guard)
    }
}

impl AgentClient {
    /// Waits for the next TCP connection a guest process makes to `127.0.0.1:port` in the
    /// guest and returns it as a local stream (see [`AgentClient::tcp_accept_request`]).
    /// Waits as long as it takes (no answer timeout); dropping the future withdraws the
    /// request (a client that arrives while the withdrawal is on its way is closed: it sees
    /// its connection end, never a hang).
    pub async fn tcp_accept(&self, port: u16) -> Result<DuplexStream, AgentError> {
        self.tcp_accept_request(port).await?.connected().await
    }

    /// Sends an accept request for guest `127.0.0.1:port` and returns once it is sent. The
    /// first request for a port makes the agent listen there; connections made while no
    /// request waits stay in the guest kernel's backlog. Needs the agent's
    /// [`Capabilities::TCP`].
    pub async fn tcp_accept_request(&self, port: u16) -> Result<PendingAccept, AgentError> {
        let (answers, window, guard) = self.send_tunnel_request(port, true).await?;
        Ok(PendingAccept {
            client: self.clone(),
            answers,
            window,
            early: None,
            guard,
        })
    }

    /// [`AgentClient::tcp_accept_request`], returning only once the agent listens on the
    /// port (a round trip later), so that a guest process started after this finds the
    /// listener; fails if the agent cannot listen there.
    pub async fn tcp_listen(&self, port: u16) -> Result<PendingAccept, AgentError> {
        let mut pending = self.tcp_accept_request(port).await?;
        // The agent handles requests in order: once the ping is answered, the accept was
        // handled, and a failure to listen is already queued for it.
        self.ping().await?;
        if let Ok(msg) = pending.answers.rx.try_recv() {
            pending
                .answers
                .queued
                .fetch_sub(super::queue_cost(&msg), Ordering::AcqRel);
            match msg {
                GuestMsg::Failed { kind, message, .. } => return Err(failed(kind, &message)),
                other => pending.early = Some(other),
            }
        }
        Ok(pending)
    }

    /// Connects to `127.0.0.1:port` in the guest and returns the connection as a local
    /// stream; fails if nothing listens there. Needs the agent's [`Capabilities::TCP`].
    pub async fn tcp_connect(&self, port: u16) -> Result<DuplexStream, AgentError> {
        let (mut answers, window, guard) = self.send_tunnel_request(port, false).await?;
        let after = self.shared.limits.answer_timeout;
        let answer = tokio::time::timeout(after, answers.recv(self))
            .await
            .map_err(|_| AgentError::NoAnswer {
                what: "a TCP connect",
                after,
            })?;
        self.tunnel_answer(answer, answers, window, guard)
    }

    async fn send_tunnel_request(
        &self,
        port: u16,
        accept: bool,
    ) -> Result<(Answers, Arc<StdinWindow>, Pending), AgentError> {
        if !self.hello().capabilities.has(Capabilities::TCP) {
            return Err(AgentError::Invalid(
                "this guest agent cannot tunnel TCP connections: rebuild the image with \
                 `vmcp image build --force`"
                    .into(),
            ));
        }
        let (answers, window) = self.register(true)?;
        let id = answers.id;
        let window = window.ok_or_else(|| AgentError::Invalid("no tunnel window".into()))?;
        let guard = Pending {
            client: self.clone(),
            id,
            armed: true,
        };
        let req = if accept {
            HostMsg::TcpAccept { id, port }
        } else {
            HostMsg::TcpConnect { id, port }
        };
        self.send(&req).await?;
        Ok((answers, window, guard))
    }

    /// The guest's answer to a tunnel request: a connection (its pump started) or the error.
    fn tunnel_answer(
        &self,
        answer: Option<GuestMsg>,
        answers: Answers,
        window: Arc<StdinWindow>,
        mut guard: Pending,
    ) -> Result<DuplexStream, AgentError> {
        match answer {
            Some(GuestMsg::Connected { .. }) => {}
            Some(GuestMsg::Failed { kind, message, .. }) => return Err(failed(kind, &message)),
            Some(other) => return Err(AgentError::Unexpected(describe(&other))),
            None => return Err(self.shared.closed_error()),
        }
        guard.armed = false;
        let (near, far) = tokio::io::duplex(PIPE_BYTES);
        tokio::spawn(pump(self.clone(), answers, window, far));
        Ok(near)
    }
}

/// Moves bytes between the local pipe and the channel until both directions ended.
async fn pump(
    client: AgentClient,
    mut answers: Answers,
    window: Arc<StdinWindow>,
    far: DuplexStream,
) {
    let id = answers.id;
    let (mut from_local, mut to_local) = tokio::io::split(far);
    // Guest to local: true when the guest ended its side cleanly.
    let inbound = async {
        loop {
            match answers.recv(&client).await {
                Some(GuestMsg::TcpData { data, .. }) => {
                    if to_local.write_all(&data).await.is_err() {
                        // The local side is gone: nobody reads the rest.
                        return false;
                    }
                }
                Some(GuestMsg::TcpEof { .. }) => {
                    let _ = to_local.shutdown().await;
                    return true;
                }
                Some(GuestMsg::Failed { kind, message, .. }) => {
                    tracing::debug!(id, error = %failed(kind, &message), "tunnelled connection failed in the guest");
                    let _ = to_local.shutdown().await;
                    return false;
                }
                Some(other) => {
                    tracing::debug!(id, msg = %describe(&other), "unexpected message on a tunnel");
                    let _ = to_local.shutdown().await;
                    return false;
                }
                None => {
                    let _ = to_local.shutdown().await;
                    return false;
                }
            }
        }
    };
    // Local to guest, within the connection's window: true when the local side ended
    // cleanly and the guest was told.
    let outbound = async {
        let mut buf = vec![0u8; CHUNK_SIZE];
        loop {
            let n = match from_local.read(&mut buf).await {
                Ok(0) | Err(_) => {
                    return client.send(&HostMsg::TcpEof { id }).await.is_ok();
                }
                Ok(n) => n,
            };
            let cost = credit_cost(n);
            match window.permits.acquire_many(cost).await {
                Ok(p) => p.forget(),
                // The connection ended on the guest side or the channel closed.
                Err(_) => return false,
            }
            window
                .outstanding
                .fetch_add(u64::from(cost), Ordering::AcqRel);
            let data = buf[..n].to_vec();
            if client.send(&HostMsg::TcpData { id, data }).await.is_err() {
                return false;
            }
        }
    };
    let (clean_in, clean_out) = tokio::join!(inbound, outbound);
    if clean_in && clean_out {
        client.unregister(id);
    } else {
        // Tells the guest to close its socket at once (and forgets the id here).
        client.discard(id);
    }
}

#[cfg(test)]
#[cfg(unix)]
mod tests;
