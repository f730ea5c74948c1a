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

impl AgentClient {
    /// Waits for the next TCP connection a guest process makes to `127.0.0.1:port` in the
    /// guest and returns it as a local stream. The first call for a port makes the agent
    /// listen there; connections made while no call waits stay in the guest kernel's backlog.
    /// Waits as long as it takes (no answer timeout); dropping the future withdraws the
    /// request. Needs the agent's [`Capabilities::TCP`].
    pub async fn tcp_accept(&self, port: u16) -> Result<DuplexStream, AgentError> {
        self.open_tunnel(HostMsg::TcpAccept { id: 0, port }, "a TCP accept")
            .await
    }

    /// Connects to `127.0.0.1:port` in the guest and returns the connection as a local
    /// stream; fails if nothing listens there. Needs the agent's [`Capabilities::TCP`].
    pub async fn tcp_connect(&self, port: u16) -> Result<DuplexStream, AgentError> {
        self.open_tunnel(HostMsg::TcpConnect { id: 0, port }, "a TCP connect")
            .await
    }

    async fn open_tunnel(
        &self,
        mut req: HostMsg,
        what: &'static str,
    ) -> Result<DuplexStream, AgentError> {
        if !self.hello().capabilities.has(Capabilities::TCP) {
            return Err(AgentError::Invalid(
                "this guest agent cannot tunnel TCP connections: rebuild the image with \
                 `vmcp image build --force`"
                    .into(),
            ));
        }
        let (mut answers, window) = self.register(true)?;
        let id = answers.id;
        let window = window.ok_or_else(|| AgentError::Invalid("no tunnel window".into()))?;
        match &mut req {
            HostMsg::TcpAccept { id: i, .. } | HostMsg::TcpConnect { id: i, .. } => *i = id,
            _ => {
                return Err(AgentError::Invalid(format!(
                    "{what} is not a tunnel request"
                )))
            }
        }
        let mut pending = Pending {
            client: self.clone(),
            id,
            armed: true,
        };
        self.send(&req).await?;
        let answer = match &req {
            // An accept waits for a client for as long as it takes.
            HostMsg::TcpAccept { .. } => answers.recv(self).await,
            _ => {
                let after = self.shared.limits.answer_timeout;
                tokio::time::timeout(after, answers.recv(self))
                    .await
                    .map_err(|_| AgentError::NoAnswer { what, after })?
            }
        };
        match answer {
            Some(GuestMsg::Connected { .. }) => {}
            Some(GuestMsg::Failed { kind, message, .. }) => return Err(failed(kind, &message)),
            Some(other) => return Err(AgentError::Unexpected(describe(&other))),
            None => return Err(self.shared.closed_error()),
        }
        pending.armed = false;
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
mod tests;
