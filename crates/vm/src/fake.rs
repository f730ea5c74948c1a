//! An in-process [`Machine`] for tests of the lifecycle and of code above the traits (the CLI,
//! the MCP server, pools), injecting a fault at every step. No hypervisor: the "guest" is an
//! async function given one end of an in-memory channel; it must speak the guest protocol
//! (send a hello with the token it is given, then answer requests), and the VM "exits" when
//! that function returns. [`responder_guest`] is a small one that answers pings, file requests
//! and poweroff, and runs no processes.
//!
//! Guests made with [`FakeBackend::with_ram`] (the responder is one) keep their files in a
//! [`GuestRam`] that stands for the guest's memory: `save_state` writes it into the state file
//! and `load_state` gives the restored guest a copy, so checkpoint, rewind and fork can be
//! tested for what they keep. A re-key writes the new hostname to `/etc/hostname` and the
//! first 16 entropy bytes to `/dev/urandom` in that memory.
//!
//! Compiled for this crate's tests and, for other crates' tests, with the `test-support`
//! feature; never part of a normal build.

use std::collections::HashMap;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use tokio::io::{duplex, DuplexStream};
use tokio::task::JoinHandle;
use vmcp_guest_proto::{
    read_msg_async, write_msg_async, Capabilities, FailureKind, GuestMsg, Hello, HostMsg,
    PROTOCOL_VERSION,
};

use crate::agent::AgentStream;
use crate::lifecycle::{AgentConnect, Exit, LaunchError, Lifecycle, Machine};
use crate::{Backend, Probe, Vm, VmCapabilities, VmConfig, VmError};

const NAME: &str = "fake";

/// The guest side of a fake VM: gets its channel end and the expected token.
pub type GuestFn =
    Arc<dyn Fn(DuplexStream, String) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// The memory of a fake guest: its files by path.
pub type GuestRam = Arc<Mutex<HashMap<String, Vec<u8>>>>;

/// A guest with memory that survives save and load ([`FakeBackend::with_ram`]).
pub type RamGuestFn = Arc<
    dyn Fn(DuplexStream, String, GuestRam) -> Pin<Box<dyn Future<Output = ()> + Send>>
        + Send
        + Sync,
>;

#[derive(Clone)]
enum Guest {
    Plain(GuestFn),
    WithRam(RamGuestFn),
}

/// First bytes of a fake state file; the guest's memory (JSON) follows, if any.
const STATE_MAGIC: &[u8] = b"fake-state";

/// Faults the fake backend injects, one per step of the lifecycle.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Faults {
    /// `probe` reports the backend unusable.
    pub unusable: bool,
    /// `launch` fails (the hypervisor cannot be started).
    pub start_fails: bool,
    /// The hypervisor exits while launching.
    pub exits_at_launch: bool,
    /// The guest never says hello.
    pub never_ready: bool,
    /// The guest exits before it says hello (a kernel panic while booting).
    pub exits_before_ready: bool,
    /// The guest ignores poweroff requests (shutdown must fall back to kill).
    pub ignore_poweroff: bool,
    /// `pause` fails.
    pub pause_fails: bool,
    /// `resume` fails.
    pub resume_fails: bool,
    /// The machine cannot save or load state at all.
    pub no_snapshot: bool,
    /// `save_state` fails after writing half of the state file.
    pub save_fails: bool,
    /// `load_state` fails.
    pub load_fails: bool,
    /// `kill` fails.
    pub kill_fails: bool,
}

/// The machine calls a fake backend's VMs made, in order (`"launch"`, `"pause"`, ...).
pub type Calls = Arc<Mutex<Vec<&'static str>>>;

/// A backend whose VMs are tasks in this process.
#[derive(Clone)]
pub struct FakeBackend {
    guest: Guest,
    faults: Faults,
    calls: Calls,
}

/// One fake VM: the lifecycle over a [`FakeMachine`].
pub type FakeVm = Lifecycle<FakeMachine>;

impl FakeBackend {
    /// A fake backend running `guest` in each VM, with `faults`.
    pub fn new(guest: GuestFn, faults: Faults) -> Self {
        FakeBackend {
            guest: Guest::Plain(guest),
            faults,
            calls: Calls::default(),
        }
    }

    /// A fake backend running `guest` with its [`GuestRam`] in each VM, with `faults`.
    pub fn with_ram(guest: RamGuestFn, faults: Faults) -> Self {
        FakeBackend {
            guest: Guest::WithRam(guest),
            faults,
            calls: Calls::default(),
        }
    }

    /// A fake backend whose guests are [`responder_guest_in`]s.
    pub fn responder(faults: Faults) -> Self {
        Self::with_ram(
            Arc::new(|s, token, ram| Box::pin(responder_guest_in(s, token, ram))),
            faults,
        )
    }

    /// The machine calls of every VM of this backend so far.
    pub fn calls(&self) -> Vec<&'static str> {
        lock(&self.calls).clone()
    }

    /// [`Backend::create`] with the concrete type.
    pub fn create_fake(&self, config: VmConfig) -> Result<FakeVm, VmError> {
        Lifecycle::prepare(&config, |_| {
            Ok(FakeMachine {
                guest: self.guest.clone(),
                faults: self.faults,
                calls: Arc::clone(&self.calls),
                console: Vec::new(),
                channel: None,
                task: None,
                ram: GuestRam::default(),
            })
        })
    }
}

#[async_trait]
impl Backend for FakeBackend {
    fn name(&self) -> &'static str {
        NAME
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
        Ok(Box::new(self.create_fake(config)?))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn injected(what: &str) -> VmError {
    VmError::Hypervisor {
        backend: NAME,
        what: format!("fault injected: {what}"),
    }
}

/// The fake's [`Machine`]: the guest is a task, its "console" a list of lines.
pub struct FakeMachine {
    guest: Guest,
    faults: Faults,
    calls: Calls,
    console: Vec<String>,
    channel: Option<DuplexStream>,
    task: Option<JoinHandle<()>>,
    ram: GuestRam,
}

impl FakeMachine {
    fn call(&mut self, name: &'static str) {
        lock(&self.calls).push(name);
        self.console.push(format!("fake console: {name}"));
    }

    /// Starts the guest task with `token`.
    fn run_guest(&mut self, token: &str) {
        let (host, guest) = duplex(1 << 20);
        let token = token.to_string();
        let ram = Arc::clone(&self.ram);
        let kind = self.guest.clone();
        let run = move |s: DuplexStream, token: String| match kind {
            Guest::Plain(g) => g(s, token),
            Guest::WithRam(g) => g(s, token, ram),
        };
        self.task = Some(if self.faults.exits_before_ready {
            tokio::spawn(async move { drop(guest) })
        } else if self.faults.never_ready {
            // Keep the guest end open and silent.
            tokio::spawn(async move {
                let _keep = guest;
                std::future::pending::<()>().await
            })
        } else if self.faults.ignore_poweroff {
            let (proxy_end, guest_end) = duplex(1 << 20);
            let guest_task = tokio::spawn(run(guest_end, token));
            tokio::spawn(drop_poweroff(guest, proxy_end, guest_task))
        } else {
            tokio::spawn(run(guest, token))
        });
        self.channel = Some(host);
    }

    fn stop_now(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
        self.channel = None;
    }
}

#[async_trait]
impl Machine for FakeMachine {
    fn backend(&self) -> &'static str {
        NAME
    }

    fn capabilities(&self) -> VmCapabilities {
        VmCapabilities {
            snapshot: !self.faults.no_snapshot,
            pause: true,
            vsock: false,
        }
    }

    fn console_tail(&self, lines: usize) -> String {
        self.console[self.console.len().saturating_sub(lines)..].join("\n")
    }

    fn is_down(&self) -> bool {
        self.task.as_ref().is_some_and(JoinHandle::is_finished)
    }

    async fn launch(&mut self, token: &str) -> Result<(), LaunchError> {
        self.call("launch");
        if self.faults.start_fails {
            return Err(injected("start failed").into());
        }
        if self.faults.exits_at_launch {
            return Err(LaunchError::Exited(Exit::new(
                "fault injected: exit code 1",
            )));
        }
        self.run_guest(token);
        Ok(())
    }

    fn agent_stream(&mut self) -> AgentConnect {
        let channel = self.channel.take();
        Box::pin(async move {
            channel
                .map(|c| Box::new(c) as Box<dyn AgentStream>)
                .ok_or_else(|| injected("no agent channel"))
        })
    }

    async fn wait_exit(&mut self) -> Exit {
        if let Some(task) = self.task.as_mut() {
            let _ = task.await;
            self.task = None;
            self.console.push("fake console: guest exited".into());
        }
        Exit::new("the fake guest returned")
    }

    async fn kill(&mut self) -> Result<(), VmError> {
        self.call("kill");
        if self.faults.kill_fails {
            return Err(injected("kill failed"));
        }
        self.stop_now();
        Ok(())
    }

    async fn pause(&mut self) -> Result<(), VmError> {
        self.call("pause");
        if self.faults.pause_fails {
            return Err(injected("pause failed"));
        }
        Ok(())
    }

    async fn resume(&mut self) -> Result<(), VmError> {
        self.call("resume");
        if self.faults.resume_fails {
            return Err(injected("resume failed"));
        }
        Ok(())
    }

    fn snapshot_support(&self) -> Result<(), VmError> {
        if self.faults.no_snapshot {
            return Err(VmError::Unsupported("save or restore a VM snapshot"));
        }
        Ok(())
    }

    async fn save_state(&mut self, path: &Path) -> Result<(), VmError> {
        self.call("save_state");
        let mut state = STATE_MAGIC.to_vec();
        let memory = serde_json::to_vec(&*lock(&self.ram)).map_err(|e| injected(&e.to_string()))?;
        state.extend_from_slice(&memory);
        let write = |bytes: &[u8]| {
            std::fs::write(path, bytes).map_err(|source| VmError::Host {
                what: format!("write {}", path.display()),
                source,
            })
        };
        if self.faults.save_fails {
            write(&state[..state.len() / 2])?;
            return Err(injected("save failed"));
        }
        write(&state)
    }

    async fn load_state(&mut self, path: &Path, token: &str) -> Result<(), LaunchError> {
        self.call("load_state");
        if self.faults.load_fails {
            return Err(injected("load failed").into());
        }
        match std::fs::read(path) {
            Ok(state) if state.starts_with(STATE_MAGIC) => {
                let memory = match &state[STATE_MAGIC.len()..] {
                    [] => HashMap::new(),
                    json => serde_json::from_slice(json)
                        .map_err(|e| injected(&format!("the state file is truncated: {e}")))?,
                };
                // A new guest memory: the restored guest's writes are its own.
                self.ram = Arc::new(Mutex::new(memory));
            }
            Ok(_) => return Err(injected("the state file is not a fake state").into()),
            Err(source) => {
                return Err(VmError::Host {
                    what: format!("read {}", path.display()),
                    source,
                }
                .into())
            }
        }
        // The restored guest reconnects with the token it was saved with.
        self.run_guest(token);
        Ok(())
    }

    fn sibling(&self, _prepared: crate::lifecycle::Prepared<'_>) -> Result<Self, VmError> {
        lock(&self.calls).push("sibling");
        Ok(FakeMachine {
            guest: self.guest.clone(),
            faults: self.faults,
            calls: Arc::clone(&self.calls),
            console: Vec::new(),
            channel: None,
            task: None,
            ram: GuestRam::default(),
        })
    }
}

impl Drop for FakeMachine {
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
/// takes a new identity on a re-key (answering with a hello that carries the new token), and
/// powers off on request. Exec requests fail with "not found".
pub async fn responder_guest(s: DuplexStream, token: String) {
    responder_guest_in(s, token, GuestRam::default()).await;
}

/// [`responder_guest`] with its files in `ram` (see the module docs).
pub async fn responder_guest_in(mut s: DuplexStream, token: String, ram: GuestRam) {
    let hello = |token: String| {
        GuestMsg::Hello(Hello {
            protocol_version: PROTOCOL_VERSION,
            agent_version: "fake".into(),
            capabilities: Capabilities(
                Capabilities::FILES | Capabilities::POWEROFF | Capabilities::REKEY,
            ),
            token,
            boot_ns: 0,
        })
    };
    if write_msg_async(&mut s, &hello(token)).await.is_err() {
        return;
    }
    let mut buf = Vec::new();
    while let Ok(Some(msg)) = read_msg_async::<HostMsg, _>(&mut s, &mut buf).await {
        if let HostMsg::Poweroff { id } = msg {
            let _ = write_msg_async(&mut s, &GuestMsg::Done { id }).await;
            return;
        }
        let Some(answer) = respond(&ram, msg, hello) else {
            continue;
        };
        if write_msg_async(&mut s, &answer).await.is_err() {
            return;
        }
    }
}

/// The responder's answer to `msg` (not poweroff), `None` for messages it ignores.
fn respond(ram: &GuestRam, msg: HostMsg, hello: impl Fn(String) -> GuestMsg) -> Option<GuestMsg> {
    let mut files = lock(ram);
    {
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
            HostMsg::Rekey(r) => {
                files.insert("/etc/hostname".into(), r.hostname.into_bytes());
                let seed = r.entropy[..r.entropy.len().min(16)].to_vec();
                files.insert("/dev/urandom".into(), seed);
                hello(r.token)
            }
            _ => return None,
        };
        Some(answer)
    }
}
