//! A fault-injecting fake of Virtualization.framework for the lifecycle tests.
//!
//! It keeps the framework's state rules (save only while paused, restore only while stopped
//! and ending paused, ...) and plays a tiny guest agent over an in-memory pipe that says hello
//! with the token from the plan's command line, answers ping and powers the VM off.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use tokio::sync::mpsc;
use vmcp_guest_proto::{
    read_msg_async, write_msg_async, Capabilities, GuestMsg, Hello, HostMsg, PROTOCOL_VERSION,
};

use super::framework::{Framework, FwError, FwMachine, FwState, VZ_ERROR_INVALID_CONFIGURATION};
use super::plan::{cmdline_value, VzLimits, VzPlan};
use crate::agent::AgentStream;

pub const LIMITS: VzLimits = VzLimits {
    min_cpus: 1,
    max_cpus: 4,
    min_memory_bytes: 128 << 20,
    max_memory_bytes: 8 << 30,
};

/// Faults to inject.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// `limits()` fails: virtualization unavailable.
    pub unavailable: bool,
    /// The process lacks the entitlement (the framework says so when building).
    pub no_entitlement: bool,
    /// `startWithCompletionHandler:` reports an error.
    pub start_fails: bool,
    /// The guest ignores both the agent's poweroff and `requestStop`.
    pub guest_hangs_on_stop: bool,
    /// The OS has no save/restore (macOS 13).
    pub no_save_restore: bool,
    /// The guest never connects to the agent port.
    pub no_agent: bool,
    /// The framework goes to the error state right after start.
    pub crash_after_start: bool,
    /// The guest presents a token other than the one on its command line.
    pub wrong_token: bool,
    /// Instead of the tiny scripted agent, this starts a real one (the agent's request
    /// server in this process, where the OS has it): given the token and what to call when
    /// the agent powers off, it returns the host end of the channel.
    pub real_agent: Option<AgentSpawner>,
}

/// See [`Faults::real_agent`].
pub type AgentSpawner = fn(&str, Box<dyn FnOnce() + Send>) -> Option<Box<dyn AgentStream>>;

pub type Calls = Arc<Mutex<Vec<String>>>;

pub struct FakeFramework {
    pub faults: Faults,
    pub calls: Calls,
}

impl FakeFramework {
    pub fn new(faults: Faults) -> Self {
        FakeFramework {
            faults,
            calls: Arc::default(),
        }
    }
}

impl Framework for FakeFramework {
    type Machine = FakeMachine;

    fn limits(&self) -> Result<VzLimits, FwError> {
        if self.faults.unavailable {
            return Err(FwError::NotAvailable(
                "isSupported is false: no hardware virtualization".into(),
            ));
        }
        Ok(LIMITS)
    }

    fn save_restore_support(&self) -> Result<(), String> {
        if self.faults.no_save_restore {
            Err("saving VM state needs macOS 14 or later".into())
        } else {
            Ok(())
        }
    }

    fn build(&self, plan: &VzPlan) -> Result<FakeMachine, FwError> {
        self.calls.lock().unwrap().push("build".into());
        if self.faults.no_entitlement {
            return Err(super::framework::classify(
                "create the VM",
                VZ_ERROR_INVALID_CONFIGURATION,
                "Invalid virtual machine configuration.",
                Some(
                    "The process doesn’t have the “com.apple.security.virtualization” entitlement.",
                ),
            ));
        }
        std::fs::write(&plan.console_log, "fake firmware\nfake kernel booting\n").map_err(
            |source| FwError::Host {
                what: "write the console log".into(),
                source,
            },
        )?;
        let (tx, rx) = mpsc::unbounded_channel();
        Ok(FakeMachine {
            inner: Arc::new(Inner {
                state: Mutex::new(FwState::Stopped),
                faults: self.faults.clone(),
                token: cmdline_value(&plan.cmdline, "vmcp.token")
                    .unwrap_or_default()
                    .to_string(),
                conns_tx: tx,
                calls: Arc::clone(&self.calls),
                restored: Mutex::new(false),
            }),
            conns_rx: tokio::sync::Mutex::new(rx),
        })
    }
}

struct Inner {
    state: Mutex<FwState>,
    faults: Faults,
    token: String,
    conns_tx: mpsc::UnboundedSender<Box<dyn AgentStream>>,
    calls: Calls,
    restored: Mutex<bool>,
}

impl Inner {
    fn set(&self, s: FwState) {
        *self.state.lock().unwrap() = s;
    }
    fn get(&self) -> FwState {
        *self.state.lock().unwrap()
    }
    fn call(&self, name: &str) {
        self.calls.lock().unwrap().push(name.into());
    }
    fn expect(&self, op: &'static str, ok: &[FwState]) -> Result<(), FwError> {
        let s = self.get();
        if ok.contains(&s) {
            Ok(())
        } else {
            Err(FwError::Failed {
                op,
                message: format!("invalid state transition from {s:?}"),
            })
        }
    }
}

pub struct FakeMachine {
    inner: Arc<Inner>,
    conns_rx: tokio::sync::Mutex<mpsc::UnboundedReceiver<Box<dyn AgentStream>>>,
}

impl FakeMachine {
    /// The guest powers itself off (e.g. `poweroff` typed in the guest).
    pub fn guest_powers_off(&self) {
        self.inner.set(FwState::Stopped);
    }
}

/// Plays the guest agent: connects, says hello, answers until poweroff.
fn spawn_agent(inner: &Arc<Inner>) {
    if inner.faults.no_agent {
        return;
    }
    if let Some(spawn) = inner.faults.real_agent {
        let stopped = Arc::clone(inner);
        if let Some(host) = spawn(
            &inner.token,
            Box::new(move || stopped.set(FwState::Stopped)),
        ) {
            let _ = inner.conns_tx.send(host);
        }
        return;
    }
    let (host, mut guest) = tokio::io::duplex(64 * 1024);
    if inner.conns_tx.send(Box::new(host)).is_err() {
        return;
    }
    let inner = Arc::clone(inner);
    tokio::spawn(async move {
        let token = if inner.faults.wrong_token {
            "not-the-token".to_string()
        } else {
            inner.token.clone()
        };
        let hello = |token: String| {
            GuestMsg::Hello(Hello {
                protocol_version: PROTOCOL_VERSION,
                agent_version: "fake-vz-agent".into(),
                capabilities: Capabilities(
                    Capabilities::EXEC | Capabilities::POWEROFF | Capabilities::REKEY,
                ),
                token,
                boot_ns: 42_000_000,
            })
        };
        if write_msg_async(&mut guest, &hello(token)).await.is_err() {
            return;
        }
        let mut buf = Vec::new();
        while let Ok(Some(msg)) = read_msg_async::<HostMsg, _>(&mut guest, &mut buf).await {
            let reply = match msg {
                HostMsg::Ping { id } => GuestMsg::Pong { id },
                HostMsg::Poweroff { id } => {
                    let _ = write_msg_async(&mut guest, &GuestMsg::Done { id }).await;
                    if !inner.faults.guest_hangs_on_stop {
                        inner.set(FwState::Stopped);
                    }
                    return;
                }
                // A restored guest takes the new identity the lifecycle gives it.
                HostMsg::Rekey(r) => hello(r.token),
                _ => continue,
            };
            if write_msg_async(&mut guest, &reply).await.is_err() {
                return;
            }
        }
    });
}

#[async_trait]
impl FwMachine for FakeMachine {
    fn state(&self) -> FwState {
        self.inner.get()
    }

    async fn start(&self) -> Result<(), FwError> {
        self.inner.call("start");
        self.inner
            .expect("start the VM", &[FwState::Stopped, FwState::Error])?;
        if self.inner.faults.start_fails {
            return Err(super::framework::classify(
                "start the VM",
                1,
                "Internal Virtualization error.",
                Some("The virtual machine failed to start."),
            ));
        }
        self.inner.set(FwState::Running);
        if self.inner.faults.crash_after_start {
            self.inner.set(FwState::Error);
            return Ok(());
        }
        spawn_agent(&self.inner);
        Ok(())
    }

    fn request_stop(&self) -> Result<(), FwError> {
        self.inner.call("request_stop");
        self.inner.expect("request a stop", &[FwState::Running])?;
        if !self.inner.faults.guest_hangs_on_stop {
            self.inner.set(FwState::Stopped);
        }
        Ok(())
    }

    async fn stop(&self) -> Result<(), FwError> {
        self.inner.call("stop");
        self.inner.expect(
            "stop the VM",
            &[FwState::Running, FwState::Paused, FwState::Error],
        )?;
        self.inner.set(FwState::Stopped);
        Ok(())
    }

    fn stop_detached(&self) {
        self.inner.call("stop_detached");
        self.inner.set(FwState::Stopped);
    }

    async fn pause(&self) -> Result<(), FwError> {
        self.inner.call("pause");
        self.inner.expect("pause the VM", &[FwState::Running])?;
        self.inner.set(FwState::Paused);
        Ok(())
    }

    async fn resume(&self) -> Result<(), FwError> {
        self.inner.call("resume");
        self.inner.expect("resume the VM", &[FwState::Paused])?;
        self.inner.set(FwState::Running);
        // After a restore the framework has reset every vsock connection: the agent
        // connects again.
        if std::mem::take(&mut *self.inner.restored.lock().unwrap()) {
            spawn_agent(&self.inner);
        }
        Ok(())
    }

    async fn save(&self, path: &Path) -> Result<(), FwError> {
        self.inner.call("save");
        self.inner.expect("save the VM state", &[FwState::Paused])?;
        std::fs::write(path, format!("fake-state token={}", self.inner.token)).map_err(|source| {
            FwError::Host {
                what: format!("write {}", path.display()),
                source,
            }
        })
    }

    async fn restore(&self, path: &Path) -> Result<(), FwError> {
        self.inner.call("restore");
        self.inner
            .expect("restore the VM state", &[FwState::Stopped])?;
        let saved = std::fs::read_to_string(path).unwrap_or_default();
        if saved != format!("fake-state token={}", self.inner.token) {
            return Err(FwError::Failed {
                op: "restore the VM state",
                message: "the configuration does not match the saved state".into(),
            });
        }
        self.inner.set(FwState::Paused);
        *self.inner.restored.lock().unwrap() = true;
        Ok(())
    }

    async fn accept(&self) -> Result<Box<dyn AgentStream>, FwError> {
        self.conns_rx
            .lock()
            .await
            .recv()
            .await
            .ok_or_else(|| FwError::Failed {
                op: "accept the agent connection",
                message: "listener closed".into(),
            })
    }
}

/// Writes an arm64 `Image`-looking kernel and an initrd into `dir`.
pub fn arm64_files(dir: &Path) -> (PathBuf, PathBuf) {
    let k = dir.join("Image");
    let i = dir.join("initrd");
    let mut head = vec![0u8; 64];
    head[56..60].copy_from_slice(b"ARM\x64");
    std::fs::write(&k, head).unwrap();
    std::fs::write(&i, b"initrd").unwrap();
    (k, i)
}
