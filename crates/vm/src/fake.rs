//! An in-process backend for tests of code that drives the lifecycle traits (the CLI, the MCP
//! server, pools), with fault injection. No hypervisor: the "guest" is an async function given
//! one end of an in-memory channel; it must speak the guest protocol (send a hello with the
//! token it is given, then answer requests). [`responder_guest`] is a small one that answers
//! pings, file requests and poweroff, and runs no processes.

use std::collections::HashMap;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::io::{duplex, DuplexStream};
use tokio::task::JoinHandle;
use vmcp_guest_proto::{
    read_msg_async, write_msg_async, Capabilities, FailureKind, GuestMsg, Hello, HostMsg,
    PROTOCOL_VERSION,
};

use crate::agent::AgentClient;
use crate::{
    new_vm_id, AgentInfo, Backend, Probe, RuntimeDir, ShutdownOutcome, Vm, VmCapabilities,
    VmConfig, VmError, VmState,
};

/// The guest side of a fake VM: gets its channel end and the expected token.
pub type GuestFn =
    Arc<dyn Fn(DuplexStream, String) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// Faults the fake backend injects.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Faults {
    /// `probe` reports the backend unusable.
    pub unusable: bool,
    /// `start` fails.
    pub start_fails: bool,
    /// The guest never says hello.
    pub never_ready: bool,
    /// The guest ignores poweroff requests (shutdown must fall back to kill).
    pub ignore_poweroff: bool,
}

/// A backend whose VMs are tasks in this process.
#[derive(Clone)]
pub struct FakeBackend {
    guest: GuestFn,
    faults: Faults,
}

impl FakeBackend {
    /// A fake backend running `guest` in each VM, with `faults`.
    pub fn new(guest: GuestFn, faults: Faults) -> Self {
        FakeBackend { guest, faults }
    }

    /// A fake backend whose guests are [`responder_guest`]s.
    pub fn responder(faults: Faults) -> Self {
        Self::new(
            Arc::new(|s, token| Box::pin(responder_guest(s, token))),
            faults,
        )
    }
}

#[async_trait]
impl Backend for FakeBackend {
    fn name(&self) -> &'static str {
        "fake"
    }

    async fn probe(&self) -> Probe {
        if self.faults.unusable {
            Probe::Unusable {
                reason: "fault injected: backend unusable".into(),
            }
        } else {
            Probe::Usable {
                detail: "in-process fake".into(),
            }
        }
    }

    async fn create(&self, config: VmConfig) -> Result<Box<dyn Vm>, VmError> {
        config.validate()?;
        let id = new_vm_id();
        let dir = RuntimeDir::create(&id)?;
        Ok(Box::new(FakeVm {
            id,
            dir,
            guest: self.guest.clone(),
            faults: self.faults,
            state: VmState::Created,
            token: format!("{:016x}", rand::random::<u64>()),
            channel: None,
            task: None,
            agent: None,
            started: None,
        }))
    }
}

struct FakeVm {
    id: String,
    dir: RuntimeDir,
    guest: GuestFn,
    faults: Faults,
    state: VmState,
    token: String,
    channel: Option<DuplexStream>,
    task: Option<JoinHandle<()>>,
    agent: Option<AgentClient>,
    started: Option<Instant>,
}

impl FakeVm {
    fn stop_now(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
        self.agent = None;
        self.channel = None;
        self.state = VmState::Stopped;
    }
}

#[async_trait]
impl Vm for FakeVm {
    fn id(&self) -> &str {
        &self.id
    }
    fn state(&self) -> VmState {
        self.state
    }
    fn capabilities(&self) -> VmCapabilities {
        VmCapabilities::default()
    }
    fn runtime_dir(&self) -> &Path {
        self.dir.path()
    }

    async fn start(&mut self) -> Result<(), VmError> {
        if self.state != VmState::Created {
            return Err(VmError::InvalidState {
                op: "start",
                state: self.state,
            });
        }
        if self.faults.start_fails {
            self.state = VmState::Stopped;
            return Err(VmError::Backend {
                backend: "fake",
                message: "fault injected: start failed".into(),
            });
        }
        let (host, guest) = duplex(1 << 20);
        if self.faults.never_ready {
            // Keep the guest end open and silent.
            self.task = Some(tokio::spawn(async move {
                let _keep = guest;
                std::future::pending::<()>().await
            }));
        } else if self.faults.ignore_poweroff {
            let (proxy_end, guest_end) = duplex(1 << 20);
            let guest_task = tokio::spawn((self.guest)(guest_end, self.token.clone()));
            self.task = Some(tokio::spawn(drop_poweroff(guest, proxy_end, guest_task)));
        } else {
            self.task = Some(tokio::spawn((self.guest)(guest, self.token.clone())));
        }
        self.channel = Some(host);
        self.started = Some(Instant::now());
        self.state = VmState::Starting;
        Ok(())
    }

    async fn wait_ready(&mut self, timeout: Duration) -> Result<AgentInfo, VmError> {
        let Some(channel) = self.channel.take() else {
            return Err(VmError::InvalidState {
                op: "wait for",
                state: self.state,
            });
        };
        let agent = match AgentClient::connect(channel, &self.token, timeout).await {
            Ok(a) => a,
            Err(crate::agent::AgentError::HelloTimeout(_)) => {
                self.stop_now();
                return Err(VmError::ReadyTimeout {
                    timeout,
                    console_tail: String::new(),
                });
            }
            Err(e) => {
                self.stop_now();
                return Err(e.into());
            }
        };
        let info = agent.info(self.started.map(|s| s.elapsed()).unwrap_or_default());
        self.agent = Some(agent);
        self.state = VmState::Running;
        Ok(info)
    }

    fn agent(&self) -> Result<AgentClient, VmError> {
        self.agent.clone().ok_or(VmError::InvalidState {
            op: "talk to the agent of",
            state: self.state,
        })
    }

    async fn shutdown(&mut self, timeout: Duration) -> Result<ShutdownOutcome, VmError> {
        let Some(agent) = self.agent.clone() else {
            let was_running = self.task.is_some();
            self.stop_now();
            return Ok(if was_running {
                ShutdownOutcome::Killed
            } else {
                ShutdownOutcome::AlreadyStopped
            });
        };
        self.state = VmState::Stopping;
        let graceful = tokio::time::timeout(timeout, async {
            // An error here means the channel is already gone: the guest is down either way.
            let _ = agent.poweroff().await;
            if let Some(task) = self.task.as_mut() {
                let _ = task.await;
            }
        })
        .await
        .is_ok();
        self.task = None;
        self.stop_now();
        Ok(if graceful {
            ShutdownOutcome::Graceful
        } else {
            ShutdownOutcome::Killed
        })
    }

    async fn kill(&mut self) -> Result<(), VmError> {
        self.stop_now();
        Ok(())
    }
}

impl Drop for FakeVm {
    fn drop(&mut self) {
        self.stop_now();
    }
}

/// Sits between the host end (`outer`) and a guest (`inner`), forwarding everything except
/// poweroff requests.
async fn drop_poweroff(outer: DuplexStream, inner: DuplexStream, guest: JoinHandle<()>) {
    let (mut outer_r, mut outer_w) = tokio::io::split(outer);
    let (mut inner_r, mut inner_w) = tokio::io::split(inner);
    let up = async {
        let _ = tokio::io::copy(&mut inner_r, &mut outer_w).await;
    };
    let down = async {
        let mut buf = Vec::new();
        while let Ok(Some(msg)) = read_msg_async::<HostMsg, _>(&mut outer_r, &mut buf).await {
            if matches!(msg, HostMsg::Poweroff { .. }) {
                continue;
            }
            if write_msg_async(&mut inner_w, &msg).await.is_err() {
                break;
            }
        }
    };
    tokio::join!(up, down);
    guest.abort();
}

/// A guest that says hello with `token`, then answers pings, writes and reads files in memory,
/// and powers off on request. Exec requests fail with "not found".
pub async fn responder_guest(mut s: DuplexStream, token: String) {
    let hello = GuestMsg::Hello(Hello {
        protocol_version: PROTOCOL_VERSION,
        agent_version: "fake".into(),
        capabilities: Capabilities(Capabilities::FILES | Capabilities::POWEROFF),
        token,
        boot_ns: 0,
    });
    if write_msg_async(&mut s, &hello).await.is_err() {
        return;
    }
    let mut files: HashMap<String, Vec<u8>> = HashMap::new();
    let mut buf = Vec::new();
    while let Ok(Some(msg)) = read_msg_async::<HostMsg, _>(&mut s, &mut buf).await {
        let answer = match msg {
            HostMsg::Ping { id } => GuestMsg::Pong { id },
            HostMsg::WriteFile {
                id,
                path,
                offset,
                data,
                ..
            } => {
                let f = files.entry(path).or_default();
                f.truncate(offset.try_into().unwrap_or(usize::MAX));
                f.extend_from_slice(&data);
                GuestMsg::Done { id }
            }
            HostMsg::ReadFile { id, path } => match files.get(&path) {
                Some(data) => GuestMsg::FileData {
                    id,
                    data: data.clone(),
                    eof: true,
                },
                None => GuestMsg::Failed {
                    id,
                    kind: FailureKind::NotFound,
                    message: format!("{path}: no such file"),
                },
            },
            HostMsg::Exec(req) => GuestMsg::Failed {
                id: req.id,
                kind: FailureKind::NotFound,
                message: "the fake guest runs no processes".into(),
            },
            HostMsg::Poweroff { id } => {
                let _ = write_msg_async(&mut s, &GuestMsg::Done { id }).await;
                return;
            }
            _ => continue,
        };
        if write_msg_async(&mut s, &answer).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests;
