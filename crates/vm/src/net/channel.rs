//! Networking that travels over the agent channel (unless [`crate::net::NetConfig::card`]):
//! the VM's egress proxy fed by the agent's listener on guest `127.0.0.1:3128`, and
//! published ports whose host connections the agent makes to guest ports. The lifecycle
//! starts it when the agent is ready (and so does `vmcp run` with a VM from the warm pool);
//! everything stops when the handle is dropped.

use std::sync::Arc;

use tokio::io::DuplexStream;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use super::{ChannelNet, PortForward};
use crate::agent::{AgentClient, PendingAccept};
use crate::net;
use crate::VmError;

/// Most connections one published port carries at once (the guest agent's own bound is
/// [`vmcp_guest_agent`]'s `MAX_TUNNEL_CONNECTIONS` for all of them together).
pub const MAX_PUBLISHED_CONNECTIONS: usize = 64;

/// The running channel network of one VM; dropping it stops the proxy and the published
/// ports.
pub struct ChannelNetHandle {
    proxy: Option<vmcp_egress::ProxyHandle>,
    publish: Vec<JoinHandle<()>>,
}

impl Drop for ChannelNetHandle {
    fn drop(&mut self) {
        for t in &self.publish {
            t.abort();
        }
    }
}

impl std::fmt::Debug for ChannelNetHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChannelNetHandle")
            .field("proxy", &self.proxy.is_some())
            .field("published", &self.publish.len())
            .finish()
    }
}

impl ChannelNetHandle {
    /// The proxy's counters (kept readable after the proxy stopped by whoever cloned them).
    pub fn egress_stats(&self) -> Option<Arc<vmcp_egress::Stats>> {
        self.proxy
            .as_ref()
            .map(vmcp_egress::ProxyHandle::shared_stats)
    }
}

/// The guest's listener on `port`, for the egress proxy.
struct AgentListener {
    client: AgentClient,
    port: u16,
    /// The request made before the proxy started (so the guest listens from the start).
    first: Option<PendingAccept>,
}

impl vmcp_egress::Accept for AgentListener {
    type Io = DuplexStream;
    async fn accept(&mut self) -> std::io::Result<DuplexStream> {
        loop {
            if self.client.is_closed() {
                // The VM is going away; the proxy stops when its handle is dropped.
                return std::future::pending().await;
            }
            let pending = match self.first.take() {
                Some(p) => Ok(p),
                None => self.client.tcp_accept_request(self.port).await,
            };
            let connected = match pending {
                Ok(p) => p.connected().await,
                Err(e) => Err(e),
            };
            match connected {
                Ok(conn) => return Ok(conn),
                Err(e) if !self.client.is_closed() => return Err(std::io::Error::other(e)),
                // The channel closed under the request: wait above for the handle's drop.
                Err(_) => {}
            }
        }
    }
}

/// Starts what `net` asks for over `client`'s channel: the agent listens for the proxy
/// before this returns, and every later exec of the session is pointed at it. Fails when a
/// published host port cannot be bound or the agent cannot listen (nothing is left running
/// then).
pub async fn serve_over_channel(
    client: &AgentClient,
    net: ChannelNet,
) -> Result<ChannelNetHandle, VmError> {
    let mut tasks = ChannelNetHandle {
        proxy: None,
        publish: Vec::new(),
    };
    for fwd in net.publish {
        let listener = TcpListener::bind(fwd.host)
            .await
            .map_err(|source| VmError::Host {
                what: format!("listen on {} for --publish {fwd}", fwd.host),
                source,
            })?;
        tasks
            .publish
            .push(tokio::spawn(serve_published(listener, client.clone(), fwd)));
    }
    if let Some((policy, gate)) = net.egress {
        let port = net::TUNNEL_PROXY.port();
        // Listening before the first command runs: a process started right after ready
        // finds the proxy.
        let first = client.tcp_listen(port).await?;
        // Every process finds the proxy; the guest's boot state (and so a snapshot of it)
        // holds no network setting.
        client.set_default_env(vmcp_guest_proto::proxy_env(net::TUNNEL_PROXY));
        let proxy = net::egress_proxy(&policy, gate.as_ref(), net::CHANNEL_PROXY_CONNECTIONS);
        tasks.proxy = Some(proxy.spawn(AgentListener {
            client: client.clone(),
            port,
            first: Some(first),
        }));
    }
    Ok(tasks)
}

/// Carries each connection to `listener` to the guest port of `fwd`.
async fn serve_published(listener: TcpListener, client: AgentClient, fwd: PortForward) {
    let slots = Arc::new(Semaphore::new(MAX_PUBLISHED_CONNECTIONS));
    loop {
        let Ok(permit) = Arc::clone(&slots).acquire_owned().await else {
            return;
        };
        let mut host_side = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::debug!(error = %e, port = %fwd, "accept on a published port failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        if client.is_closed() {
            return;
        }
        let client = client.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match client.tcp_connect(fwd.guest_port).await {
                Ok(mut guest_side) => {
                    let _ = tokio::io::copy_bidirectional(&mut host_side, &mut guest_side).await;
                }
                // The host client sees the connection close; the reason goes to the log.
                Err(e) => {
                    tracing::info!(error = %e, port = %fwd, "a published port's guest side refused")
                }
            }
        });
    }
}
