//! Live sandboxes: creation within limits, ownership by client sessions, idle/lifetime/grace
//! reaping, background processes, and teardown.
//!
//! Every sandbox is a VM from the [`VmFactory`] plus its agent session. The manager holds
//! them in one map; removing a sandbox from the map and dropping it kills its VM (the `Vm`
//! implementations kill on drop), so [`Manager::shutdown_all`] and dropping the manager both
//! leave nothing running. A reaper task (every [`Limits::reap_every`]) ends sandboxes that
//! were idle longer than their idle timeout, lived longer than their lifetime, or whose
//! session ended more than [`Limits::session_grace`] ago without another session using them.
//!
//! Ownership: a sandbox belongs to the session that created it (stateless 2026-07-28 calls
//! have none: such sandboxes end by timeout or `sandbox_destroy` only). Its id (96 random
//! bits) is the capability: a call from another session that names it takes it over, which
//! is how a client that reconnects (new session) keeps its sandboxes within the grace period.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use tokio::sync::Notify;
use vmcp_guest_proto::ExitStatus;
use vmcp_mcp_server::tool::SessionKey;
use vmcp_vm::agent::{AgentClient, Process, ProcessControl, ProcessEvent};
use vmcp_vm::{Checkpoint, NetMode, Vm};

use crate::output::{Polled, ProcLog, Stream};

/// The error type of a [`VmFactory`].
pub type FactoryError = Box<dyn std::error::Error + Send + Sync>;

/// Size and network of a sandbox VM.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct VmSpec {
    /// Virtual CPUs.
    pub cpus: u32,
    /// Memory in MiB.
    pub memory_mib: u32,
    /// Guest network (none by default).
    pub net: NetMode,
}

impl VmSpec {
    /// A spec without network.
    pub fn new(cpus: u32, memory_mib: u32) -> Self {
        VmSpec {
            cpus,
            memory_mib,
            net: NetMode::None,
        }
    }

    /// The same spec with this network.
    pub fn with_net(mut self, net: NetMode) -> Self {
        self.net = net;
        self
    }
}

/// A started VM whose agent answered, and how it came up.
#[non_exhaustive]
pub struct Booted {
    /// The VM.
    pub vm: Box<dyn Vm>,
    /// What the client should know about this start (e.g. why it booted cold instead of
    /// restoring a snapshot); returned in the tool result.
    pub notices: Vec<String>,
}

impl Booted {
    /// A VM with no notices.
    pub fn new(vm: Box<dyn Vm>) -> Self {
        Booted {
            vm,
            notices: Vec::new(),
        }
    }
}

impl std::fmt::Debug for Booted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Booted")
            .field("vm", &self.vm.id())
            .field("notices", &self.notices)
            .finish_non_exhaustive()
    }
}

/// Makes the VMs of sandboxes. The CLI's factory restores the built guest image from a
/// snapshot when it can (else boots it) on the selected backend; tests use the vm crate's
/// fake backend.
#[async_trait]
pub trait VmFactory: Send + Sync + 'static {
    /// A new VM of this spec, not started.
    async fn create(&self, spec: VmSpec) -> Result<Box<dyn Vm>, FactoryError>;

    /// A VM of this spec whose agent is ready within `timeout`; `progress` hears about slow
    /// steps (an image or snapshot build). The default creates, starts and waits; a factory
    /// that restores snapshots replaces it.
    async fn boot(
        &self,
        spec: VmSpec,
        timeout: Duration,
        progress: &(dyn for<'s> Fn(&'s str) + Send + Sync),
    ) -> Result<Booted, SandboxError> {
        let _ = progress;
        let mut vm = self.create(spec).await.map_err(SandboxError::Create)?;
        vm.start().await.map_err(SandboxError::Boot)?;
        vm.wait_ready(timeout).await.map_err(SandboxError::Boot)?;
        Ok(Booted::new(vm))
    }
}

/// Limits of the sandbox server. Every one is enforced with an error that names it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Limits {
    /// Sandboxes alive at once (including those of `run` calls).
    pub max_sandboxes: usize,
    /// Sum of the memory of live sandboxes, MiB.
    pub memory_budget_mib: u64,
    /// Largest vCPU count of one sandbox.
    pub max_cpus: u32,
    /// Largest memory of one sandbox, MiB.
    pub max_memory_mib: u32,
    /// Bytes of stdout, and separately of stderr, one `sandbox_exec`/`run` returns.
    pub max_output: usize,
    /// Bytes of output one background process keeps for polling (oldest dropped beyond).
    pub process_buffer: usize,
    /// Background processes per sandbox (finished ones are forgotten first when full).
    pub max_processes: usize,
    /// Largest file read or written in one call.
    pub max_file: usize,
    /// Idle timeout when `sandbox_create` gives none.
    pub default_idle: Duration,
    /// Lifetime when `sandbox_create` gives none.
    pub default_lifetime: Duration,
    /// Largest idle timeout or lifetime a client may ask for.
    pub max_lifetime: Duration,
    /// How long a sandbox outlives the end of its session (for reconnects).
    pub session_grace: Duration,
    /// `sandbox_exec` timeout when the call gives none.
    pub default_exec_timeout: Duration,
    /// How long a VM may take to boot.
    pub boot_timeout: Duration,
    /// How often the reaper looks.
    pub reap_every: Duration,
    /// The widest allow list a client may ask for (`network: "allow=..."`): every rule it
    /// gives must be covered by one of these ([`vmcp_egress::Policy::covers`]). `None`: no
    /// allow-listed network at all.
    pub net_ceiling: Option<vmcp_egress::Policy>,
    /// Whether a client may ask for unrestricted NAT (`network: "nat"`).
    pub allow_nat: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_sandboxes: 4,
            memory_budget_mib: 2048,
            max_cpus: 4,
            max_memory_mib: 2048,
            max_output: 1 << 20,
            process_buffer: 1 << 20,
            max_processes: 16,
            max_file: 8 << 20,
            default_idle: Duration::from_secs(10 * 60),
            default_lifetime: Duration::from_secs(60 * 60),
            max_lifetime: Duration::from_secs(24 * 60 * 60),
            session_grace: Duration::from_secs(60),
            default_exec_timeout: Duration::from_secs(60),
            boot_timeout: Duration::from_secs(60),
            reap_every: Duration::from_secs(1),
            net_ceiling: None,
            allow_nat: false,
        }
    }
}

/// Errors of the manager; each says what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SandboxError {
    /// The sandbox count limit.
    #[error(
        "too many sandboxes: {live} of {max} are alive; destroy one with sandbox_destroy first"
    )]
    TooMany {
        /// Live (and booting) sandboxes.
        live: usize,
        /// The limit.
        max: usize,
    },
    /// The memory budget.
    #[error("the memory budget is used up: {used} of {budget} MiB are taken and {asked} MiB were asked for; destroy a sandbox or ask for less memory")]
    Memory {
        /// MiB in use.
        used: u64,
        /// The budget.
        budget: u64,
        /// MiB asked for.
        asked: u64,
    },
    /// No such sandbox.
    #[error("no sandbox {0:?} (it may have been destroyed or timed out; sandbox_list shows the live ones)")]
    NotFound(String),
    /// No such process.
    #[error("no process {0:?} in this sandbox (sandbox_exec_start returns the id)")]
    NoProcess(String),
    /// The process limit.
    #[error(
        "too many background processes in this sandbox ({0}); wait for one to end or signal it"
    )]
    TooManyProcesses(usize),
    /// Creating the VM failed.
    #[error("cannot create the VM")]
    Create(#[source] FactoryError),
    /// Booting failed.
    #[error("the VM did not boot")]
    Boot(#[source] vmcp_vm::VmError),
    /// Booting failed in the factory (a snapshot or image step).
    #[error("the VM did not boot")]
    Start(#[source] FactoryError),
    /// Booting was cancelled.
    #[error("cancelled while the VM booted")]
    Cancelled,
    /// Talking to the guest failed.
    #[error("the guest agent failed")]
    Agent(#[from] vmcp_vm::agent::AgentError),
    /// No such checkpoint.
    #[error("no checkpoint {0:?} (checkpoints end with their sandbox; sandbox_checkpoint returns the id)")]
    NoCheckpoint(String),
    /// A checkpoint named with another sandbox.
    #[error("checkpoint {checkpoint:?} belongs to sandbox {owner:?}, not {asked:?}: rewind the sandbox it was taken of, or fork it")]
    ForeignCheckpoint {
        /// The checkpoint.
        checkpoint: String,
        /// Its sandbox.
        owner: String,
        /// The sandbox named.
        asked: String,
    },
    /// A fork count out of range.
    #[error("cannot fork into {asked} sandboxes: ask for 1 to {max}")]
    ForkCount {
        /// Asked for.
        asked: usize,
        /// Most per call.
        max: usize,
    },
    /// The VM could not be checkpointed, rewound or forked.
    #[error("cannot {op} the sandbox's VM")]
    Snapshot {
        /// `checkpoint`, `rewind` or `fork`.
        op: &'static str,
        /// Cause.
        #[source]
        source: vmcp_vm::VmError,
    },
}

/// Where a background process's output goes, and its end.
pub(crate) struct Proc {
    pub id: String,
    pub pid: u32,
    pub argv: Vec<String>,
    pub control: ProcessControl,
    log: Mutex<(ProcLog, Option<Result<ExitStatus, String>>)>,
    changed: Notify,
}

/// What `sandbox_exec_poll` reports.
#[derive(Debug, Clone)]
pub struct PollResult {
    /// The output window.
    pub output: Polled,
    /// How the process ended, once all its output was read: `Ok(status)` or the failure.
    pub ended: Option<Result<ExitStatus, String>>,
}

impl Proc {
    fn lock(&self) -> std::sync::MutexGuard<'_, (ProcLog, Option<Result<ExitStatus, String>>)> {
        self.log.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn finished(&self) -> bool {
        self.lock().1.is_some()
    }

    /// Output from `cursor`, waiting up to `wait` for some when there is none yet.
    pub(crate) async fn poll(&self, cursor: u64, max: usize, wait: Duration) -> PollResult {
        let deadline = Instant::now() + wait;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let g = self.lock();
                let output = g.0.read(cursor, max);
                let has_news = output.next > cursor.min(g.0.end())
                    || output.missed > 0
                    || g.1.is_some()
                    || Instant::now() >= deadline;
                if has_news {
                    let ended = if output.next >= g.0.end() {
                        g.1.clone()
                    } else {
                        None
                    };
                    return PollResult { output, ended };
                }
            }
            if tokio::time::timeout_at(deadline.into(), notified)
                .await
                .is_err()
            {
                let g = self.lock();
                let output = g.0.read(cursor, max);
                let ended = if output.next >= g.0.end() {
                    g.1.clone()
                } else {
                    None
                };
                return PollResult { output, ended };
            }
        }
    }
}

struct Owner {
    session: SessionKey,
    orphaned_at: Option<Instant>,
}

/// One live sandbox.
pub struct Sandbox {
    id: String,
    spec: VmSpec,
    created: SystemTime,
    created_at: Instant,
    idle_timeout: Duration,
    lifetime: Duration,
    /// Replaced when the sandbox is rewound (a new VM machine, a new token).
    agent: Mutex<AgentClient>,
    vm: tokio::sync::Mutex<Option<Box<dyn Vm>>>,
    last_used: Mutex<Instant>,
    busy: AtomicUsize,
    owner: Mutex<Owner>,
    procs: Mutex<HashMap<String, Arc<Proc>>>,
    next_proc: AtomicU64,
    process_buffer: usize,
    max_processes: usize,
    boot: Duration,
    notices: Vec<String>,
    egress: Mutex<Option<Arc<vmcp_egress::Stats>>>,
    /// Egress refusals already reported (a count of `egress.denied()`).
    egress_reported: AtomicU64,
}

impl std::fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox").field("id", &self.id).finish()
    }
}

/// Keeps a sandbox from being idle-reaped while a call uses it.
pub struct InUse(Arc<Sandbox>);

impl std::ops::Deref for InUse {
    type Target = Sandbox;
    fn deref(&self) -> &Sandbox {
        &self.0
    }
}

impl Drop for InUse {
    fn drop(&mut self) {
        *self
            .0
            .last_used
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Instant::now();
        self.0.busy.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A summary for `sandbox_list`.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SandboxInfo {
    /// Id.
    pub id: String,
    /// vCPUs.
    pub cpus: u32,
    /// Memory, MiB.
    pub memory_mib: u32,
    /// Seconds since it was created.
    pub age_secs: u64,
    /// Seconds since a call last used it.
    pub idle_secs: u64,
    /// Its idle timeout.
    pub idle_timeout_secs: u64,
    /// Seconds until its lifetime ends.
    pub expires_in_secs: u64,
    /// Background processes it keeps, and how many still run.
    pub processes: usize,
    /// Of those, running.
    pub running: usize,
    /// Creation time, seconds since the Unix epoch.
    pub created_unix: u64,
}

impl Sandbox {
    /// Its id.
    pub fn id(&self) -> &str {
        &self.id
    }
    /// The agent session (a new one after a rewind).
    pub fn agent(&self) -> AgentClient {
        self.agent
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
    /// Its size and network.
    pub fn spec(&self) -> &VmSpec {
        &self.spec
    }
    /// What the client should know about how it started.
    pub fn notices(&self) -> &[String] {
        &self.notices
    }

    /// Refusals of the egress proxy after refusal number `mark` (0: all), one line each (at
    /// most [`vmcp_egress::proxy::RECENT_DENIALS`], plus a line counting older ones that were
    /// not kept), and the number of the last one.
    pub fn egress_denials_since(&self, mark: u64) -> (Vec<String>, u64) {
        let Some(stats) = self.egress() else {
            return (Vec::new(), mark);
        };
        let mut new: Vec<vmcp_egress::DenialRecord> = stats
            .recent_denials()
            .into_iter()
            .filter(|d| d.seq > mark)
            .collect();
        new.sort_by_key(|d| d.seq);
        let last = new.last().map_or(mark, |d| d.seq);
        let mut lines = Vec::with_capacity(new.len() + 1);
        let lost = (last - mark).saturating_sub(new.len() as u64);
        if lost > 0 {
            lines.push(format!(
                "{lost} earlier connections were refused by the egress policy (not kept)"
            ));
        }
        lines.extend(new.iter().map(denial_line));
        (lines, last)
    }

    /// The number of egress refusals so far (0 without an egress proxy).
    pub fn egress_mark(&self) -> u64 {
        self.egress().map_or(0, |s| s.denied())
    }

    /// Whether its VM has an egress proxy (allow-listed network).
    pub fn has_egress(&self) -> bool {
        self.egress().is_some()
    }

    fn egress(&self) -> Option<Arc<vmcp_egress::Stats>> {
        self.egress
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Refusals no earlier call reported, now marked reported.
    pub fn take_egress_denials(&self) -> Vec<String> {
        if self.egress().is_none() {
            return Vec::new();
        }
        let mark = self.egress_reported.load(Ordering::Acquire);
        let (lines, last) = self.egress_denials_since(mark);
        // Concurrent calls: whoever advances the mark reports these lines.
        match self
            .egress_reported
            .compare_exchange(mark, last, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => lines,
            Err(_) => Vec::new(),
        }
    }
    /// How long boot took.
    pub fn boot_time(&self) -> Duration {
        self.boot
    }

    fn info(&self, now: Instant) -> SandboxInfo {
        let procs = self.procs.lock().unwrap_or_else(PoisonError::into_inner);
        let last = *self
            .last_used
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        SandboxInfo {
            id: self.id.clone(),
            cpus: self.spec.cpus,
            memory_mib: self.spec.memory_mib,
            age_secs: now.duration_since(self.created_at).as_secs(),
            idle_secs: now.duration_since(last).as_secs(),
            idle_timeout_secs: self.idle_timeout.as_secs(),
            expires_in_secs: self
                .lifetime
                .saturating_sub(now.duration_since(self.created_at))
                .as_secs(),
            processes: procs.len(),
            running: procs.values().filter(|p| !p.finished()).count(),
            created_unix: self
                .created
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        }
    }

    /// Why the reaper should end it now, if it should.
    fn expired(&self, now: Instant, grace: Duration) -> Option<String> {
        if now.duration_since(self.created_at) >= self.lifetime {
            return Some(format!(
                "its lifetime of {}s ended",
                self.lifetime.as_secs()
            ));
        }
        if self.busy.load(Ordering::Acquire) == 0 {
            let last = *self
                .last_used
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if now.duration_since(last) >= self.idle_timeout {
                return Some(format!("idle for {}s", self.idle_timeout.as_secs()));
            }
        }
        let owner = self.owner.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(at) = owner.orphaned_at {
            if now.duration_since(at) >= grace {
                return Some(format!("its client session ended {}s ago", grace.as_secs()));
            }
        }
        None
    }

    /// Starts a background process and the task that collects its output.
    pub(crate) fn add_process(
        &self,
        process: Process,
        argv: Vec<String>,
    ) -> Result<Arc<Proc>, SandboxError> {
        let mut procs = self.procs.lock().unwrap_or_else(PoisonError::into_inner);
        if procs.len() >= self.max_processes {
            // Forget the oldest finished process to make room.
            let oldest = procs
                .values()
                .filter(|p| p.finished())
                .min_by_key(|p| p.id[1..].parse::<u64>().unwrap_or(0))
                .map(|p| p.id.clone());
            match oldest {
                Some(id) => {
                    procs.remove(&id);
                }
                None => return Err(SandboxError::TooManyProcesses(self.max_processes)),
            }
        }
        let id = format!("p{}", self.next_proc.fetch_add(1, Ordering::Relaxed) + 1);
        let proc = Arc::new(Proc {
            id: id.clone(),
            pid: process.pid(),
            argv,
            control: process.control().clone(),
            log: Mutex::new((ProcLog::new(self.process_buffer), None)),
            changed: Notify::new(),
        });
        procs.insert(id, proc.clone());
        let weak = Arc::downgrade(&proc);
        tokio::spawn(pump(process, weak));
        Ok(proc)
    }

    /// A background process by id.
    pub(crate) fn process(&self, id: &str) -> Result<Arc<Proc>, SandboxError> {
        self.procs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(id)
            .cloned()
            .ok_or_else(|| SandboxError::NoProcess(id.to_owned()))
    }

    async fn kill(&self) {
        if let Some(mut vm) = self.vm.lock().await.take() {
            if let Err(e) = vm.kill().await {
                tracing::warn!(sandbox = %self.id, error = %e, "killing the VM failed; dropping it");
            }
        }
    }
}

/// `connection to HOST:PORT refused by egress policy (check): reason`.
fn denial_line(d: &vmcp_egress::DenialRecord) -> String {
    let what = d.target.as_deref().unwrap_or("(no valid host)");
    let method = if d.method == "CONNECT" {
        String::new()
    } else {
        format!(" ({} request)", d.method)
    };
    format!(
        "connection to {what}{method} refused by egress policy ({}): {}",
        d.check, d.reason
    )
}

async fn pump(mut process: Process, proc: Weak<Proc>) {
    loop {
        let ev = process.next_event().await;
        let Some(p) = proc.upgrade() else { return };
        let done = {
            let mut g = p.lock();
            match ev {
                Ok(Some(ProcessEvent::Stdout(d))) => {
                    g.0.push(Stream::Stdout, &d);
                    false
                }
                Ok(Some(ProcessEvent::Stderr(d))) => {
                    g.0.push(Stream::Stderr, &d);
                    false
                }
                Ok(Some(ProcessEvent::Exited(s))) => {
                    g.1 = Some(Ok(s));
                    true
                }
                Ok(None) => {
                    g.1 = Some(Err(
                        "the guest agent ended the process without an exit status".into(),
                    ));
                    true
                }
                Err(e) => {
                    g.1 = Some(Err(format!("lost the process: {e}")));
                    true
                }
            }
        };
        p.changed.notify_waiters();
        if done {
            return;
        }
    }
}

#[derive(Default)]
struct Reserved {
    count: usize,
    mem: u64,
}

struct Inner {
    factory: Arc<dyn VmFactory>,
    limits: Limits,
    sandboxes: Mutex<HashMap<String, Arc<Sandbox>>>,
    reserved: Mutex<Reserved>,
    /// Checkpoints by id, with the sandbox they were taken of.
    checkpoints: Mutex<HashMap<String, (String, Checkpoint)>>,
}

impl Inner {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Sandbox>>> {
        self.sandboxes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// A slot in the limits, held while a sandbox boots and released if it never comes up.
struct Reservation<'a> {
    inner: &'a Inner,
    mem: u64,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        let mut r = self
            .inner
            .reserved
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        r.count -= 1;
        r.mem -= self.mem;
    }
}

/// What `sandbox_create` asks for.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct CreateRequest {
    /// Size.
    pub spec: VmSpec,
    /// Idle timeout (None: the default).
    pub idle_timeout: Option<Duration>,
    /// Lifetime (None: the default).
    pub lifetime: Option<Duration>,
}

impl CreateRequest {
    /// A request for a VM of `spec` with default timeouts.
    pub fn new(spec: VmSpec) -> Self {
        CreateRequest {
            spec,
            idle_timeout: None,
            lifetime: None,
        }
    }
}

/// The sandboxes of one server.
#[derive(Clone)]
pub struct Manager {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Manager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manager")
            .field("live", &self.inner.map().len())
            .finish()
    }
}

impl Manager {
    /// A manager making VMs with `factory`; starts the reaper (needs a tokio runtime).
    pub fn new(factory: Arc<dyn VmFactory>, limits: Limits) -> Manager {
        let inner = Arc::new(Inner {
            factory,
            limits,
            sandboxes: Mutex::new(HashMap::new()),
            reserved: Mutex::new(Reserved::default()),
            checkpoints: Mutex::new(HashMap::new()),
        });
        let weak = Arc::downgrade(&inner);
        let every = inner.limits.reap_every.max(Duration::from_millis(10));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { return };
                Manager { inner }.reap().await;
            }
        });
        Manager { inner }
    }

    /// The limits.
    pub fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    /// Memory (MiB) held by live and booting sandboxes, and their count.
    pub fn usage(&self) -> (usize, u64) {
        let r = self
            .inner
            .reserved
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        (r.count, r.mem)
    }

    fn reserve(&self, mem: u64) -> Result<Reservation<'_>, SandboxError> {
        let l = &self.inner.limits;
        let mut r = self
            .inner
            .reserved
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if r.count >= l.max_sandboxes {
            return Err(SandboxError::TooMany {
                live: r.count,
                max: l.max_sandboxes,
            });
        }
        if r.mem + mem > l.memory_budget_mib {
            return Err(SandboxError::Memory {
                used: r.mem,
                budget: l.memory_budget_mib,
                asked: mem,
            });
        }
        r.count += 1;
        r.mem += mem;
        Ok(Reservation {
            inner: &self.inner,
            mem,
        })
    }

    /// Boots a sandbox for `session`; `progress` hears about the boot; `cancel` stops it.
    pub async fn create(
        &self,
        req: CreateRequest,
        session: SessionKey,
        progress: &(dyn for<'s> Fn(&'s str) + Send + Sync),
        cancel: impl std::future::Future<Output = ()>,
    ) -> Result<Arc<Sandbox>, SandboxError> {
        let mem = u64::from(req.spec.memory_mib);
        let reservation = self.reserve(mem)?;
        let l = &self.inner.limits;
        let started = Instant::now();
        progress(&format!(
            "starting a VM ({} vCPU, {} MiB, network {})",
            req.spec.cpus, req.spec.memory_mib, req.spec.net
        ));
        let boot = async {
            let booted = self
                .inner
                .factory
                .boot(req.spec.clone(), l.boot_timeout, progress)
                .await?;
            let agent = booted.vm.agent().map_err(SandboxError::Boot)?;
            Ok::<_, SandboxError>((booted, agent))
        };
        let (booted, agent) = tokio::select! {
            r = boot => r?,
            () = cancel => return Err(SandboxError::Cancelled),
        };
        let boot = started.elapsed();
        progress(&format!("VM ready after {} ms", boot.as_millis()));
        let id = format!("sb-{:024x}", rand::random::<u128>() >> 32);
        let now = Instant::now();
        let Booted { vm, notices } = booted;
        // The counters and recent refusals of the VM's egress proxy (allow-list network).
        let egress = vm.egress_stats();
        let sandbox = Arc::new(Sandbox {
            id: id.clone(),
            spec: req.spec,
            created: SystemTime::now(),
            created_at: now,
            idle_timeout: req.idle_timeout.unwrap_or(l.default_idle),
            lifetime: req.lifetime.unwrap_or(l.default_lifetime),
            agent: Mutex::new(agent),
            vm: tokio::sync::Mutex::new(Some(vm)),
            last_used: Mutex::new(now),
            busy: AtomicUsize::new(0),
            owner: Mutex::new(Owner {
                session,
                orphaned_at: None,
            }),
            procs: Mutex::new(HashMap::new()),
            next_proc: AtomicU64::new(0),
            process_buffer: l.process_buffer,
            max_processes: l.max_processes,
            boot,
            notices,
            egress: Mutex::new(egress),
            egress_reported: AtomicU64::new(0),
        });
        // The reservation now belongs to the live sandbox; it is released in `remove`.
        std::mem::forget(reservation);
        self.inner.map().insert(id, sandbox.clone());
        Ok(sandbox)
    }

    /// The sandbox `id`, marked in use by `session` until the returned guard drops.
    pub fn get(&self, id: &str, session: &SessionKey) -> Result<InUse, SandboxError> {
        let sb = self
            .inner
            .map()
            .get(id)
            .cloned()
            .ok_or_else(|| SandboxError::NotFound(id.to_owned()))?;
        sb.busy.fetch_add(1, Ordering::AcqRel);
        {
            let mut owner = sb.owner.lock().unwrap_or_else(PoisonError::into_inner);
            if owner.session.is_some() && session.is_some() && owner.session != *session {
                tracing::info!(sandbox = %id, "sandbox taken over by another session");
                owner.session = session.clone();
            }
            owner.orphaned_at = None;
        }
        Ok(InUse(sb))
    }

    /// Live sandboxes.
    pub fn list(&self) -> Vec<SandboxInfo> {
        let now = Instant::now();
        let mut v: Vec<SandboxInfo> = self.inner.map().values().map(|s| s.info(now)).collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    /// Destroys sandbox `id` (its VM is killed). False when there was none.
    pub async fn destroy(&self, id: &str) -> bool {
        let sb = self.inner.map().remove(id);
        match sb {
            Some(sb) => {
                self.release(&sb);
                self.forget_checkpoints(Some(id));
                sb.kill().await;
                true
            }
            None => false,
        }
    }

    /// Destroys sandbox `id` without waiting for its VM to die: it leaves the map and the
    /// limits at once, and a task kills the VM (dropping it kills it too, should the runtime
    /// end first). False when there was none.
    pub fn destroy_soon(&self, id: &str) -> bool {
        let Some(sb) = self.inner.map().remove(id) else {
            return false;
        };
        self.release(&sb);
        match tokio::runtime::Handle::try_current() {
            Ok(h) => {
                h.spawn(async move { sb.kill().await });
            }
            // No runtime: dropping the last reference kills the VM.
            Err(_) => drop(sb),
        }
        true
    }

    fn release(&self, sb: &Sandbox) {
        let mut r = self
            .inner
            .reserved
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        r.count = r.count.saturating_sub(1);
        r.mem = r.mem.saturating_sub(u64::from(sb.spec.memory_mib));
    }

    /// The session ended: its sandboxes end after the grace period unless another session
    /// takes them over.
    pub fn session_ended(&self, session: &Arc<str>) {
        let now = Instant::now();
        for sb in self.inner.map().values() {
            let mut owner = sb.owner.lock().unwrap_or_else(PoisonError::into_inner);
            if owner.session.as_deref() == Some(&**session) {
                owner.orphaned_at = Some(now);
            }
        }
    }

    async fn reap(&self) {
        let now = Instant::now();
        let grace = self.inner.limits.session_grace;
        let doomed: Vec<(String, String)> = self
            .inner
            .map()
            .values()
            .filter_map(|s| s.expired(now, grace).map(|why| (s.id.clone(), why)))
            .collect();
        for (id, why) in doomed {
            tracing::info!(sandbox = %id, "ending sandbox: {why}");
            self.destroy(&id).await;
        }
    }

    /// Kills every sandbox (server shutdown).
    pub async fn shutdown_all(&self) {
        let all: Vec<Arc<Sandbox>> = self.inner.map().drain().map(|(_, s)| s).collect();
        self.forget_checkpoints(None);
        for sb in &all {
            self.release(sb);
        }
        for sb in all {
            sb.kill().await;
        }
    }
}

/// Where `sandbox_fork` starts from.
#[derive(Debug, Clone, Copy)]
pub enum ForkFrom<'a> {
    /// A sandbox as it is now (a checkpoint taken for the fork and dropped after it).
    Sandbox(&'a str),
    /// A checkpoint id from [`Manager::checkpoint`].
    Checkpoint(&'a str),
}

fn checkpoint_id() -> String {
    format!("ck-{:024x}", rand::random::<u128>() >> 32)
}

impl Manager {
    /// Most sandboxes one fork call makes: the VM layer's bound, and the sandbox limit.
    pub fn max_fork(&self) -> usize {
        vmcp_vm::lifecycle::MAX_FORKS.min(self.inner.limits.max_sandboxes)
    }

    fn checkpoints(&self) -> std::sync::MutexGuard<'_, HashMap<String, (String, Checkpoint)>> {
        self.inner
            .checkpoints
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Drops the checkpoints of sandbox `id` (all with `None`); their files go with them.
    fn forget_checkpoints(&self, id: Option<&str>) {
        self.checkpoints()
            .retain(|_, (owner, _)| id.is_some_and(|id| owner != id));
    }

    fn held(&self, checkpoint: &str) -> Result<(String, Checkpoint), SandboxError> {
        self.checkpoints()
            .get(checkpoint)
            .cloned()
            .ok_or_else(|| SandboxError::NoCheckpoint(checkpoint.to_owned()))
    }

    /// Checkpoints sandbox `sb` (its VM pauses only while its state is written); returns
    /// the checkpoint's id. At most [`vmcp_vm::lifecycle::MAX_CHECKPOINTS`] per sandbox.
    pub async fn checkpoint(&self, sb: &Sandbox) -> Result<String, SandboxError> {
        let mut vm = sb.vm.lock().await;
        let vm = vm
            .as_mut()
            .ok_or_else(|| SandboxError::NotFound(sb.id.clone()))?;
        let checkpoint = vm
            .checkpoint()
            .await
            .map_err(|source| SandboxError::Snapshot {
                op: "checkpoint",
                source,
            })?;
        let id = checkpoint_id();
        self.checkpoints()
            .insert(id.clone(), (sb.id.clone(), checkpoint));
        Ok(id)
    }

    /// Brings sandbox `sb` back to `checkpoint` (taken of it): files written since are gone,
    /// and so are its background processes (they ran in the replaced VM). On failure the
    /// sandbox is as it was.
    pub async fn rewind(&self, sb: &Sandbox, checkpoint: &str) -> Result<(), SandboxError> {
        let (owner, held) = self.held(checkpoint)?;
        if owner != sb.id {
            return Err(SandboxError::ForeignCheckpoint {
                checkpoint: checkpoint.to_owned(),
                owner,
                asked: sb.id.clone(),
            });
        }
        let mut vm = sb.vm.lock().await;
        let vm = vm
            .as_mut()
            .ok_or_else(|| SandboxError::NotFound(sb.id.clone()))?;
        let snap = |source| SandboxError::Snapshot {
            op: "rewind",
            source,
        };
        vm.rewind(&held, self.inner.limits.boot_timeout)
            .await
            .map_err(snap)?;
        // The rewound VM has a new egress proxy (over the agent channel): its refusals count
        // from zero.
        if let Some(stats) = vm.egress_stats() {
            *sb.egress.lock().unwrap_or_else(PoisonError::into_inner) = Some(stats);
            sb.egress_reported.store(0, Ordering::Release);
        }
        let agent = vm.agent().map_err(snap)?;
        *sb.agent.lock().unwrap_or_else(PoisonError::into_inner) = agent;
        sb.procs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
        Ok(())
    }

    /// `n` new sandboxes continuing from `from`, owned by `session`, each counted against
    /// the sandbox and memory limits like a created one (all or nothing). They inherit the
    /// source's size, idle timeout and lifetime.
    pub async fn fork(
        &self,
        from: ForkFrom<'_>,
        n: usize,
        session: SessionKey,
    ) -> Result<Vec<Arc<Sandbox>>, SandboxError> {
        let max = self.max_fork();
        if n == 0 || n > max {
            return Err(SandboxError::ForkCount { asked: n, max });
        }
        let (source, held) = match from {
            ForkFrom::Sandbox(id) => (self.get(id, &session)?, None),
            ForkFrom::Checkpoint(c) => {
                let (owner, held) = self.held(c)?;
                (self.get(&owner, &session)?, Some(held))
            }
        };
        let mem = u64::from(source.spec.memory_mib);
        let mut reservations = Vec::with_capacity(n);
        for _ in 0..n {
            reservations.push(self.reserve(mem)?);
        }
        let started = Instant::now();
        let vms = {
            let mut vm = source.vm.lock().await;
            let vm = vm
                .as_mut()
                .ok_or_else(|| SandboxError::NotFound(source.id.clone()))?;
            let snap = |source| SandboxError::Snapshot { op: "fork", source };
            // Forking a sandbox as it is: a checkpoint for this fork only.
            let checkpoint = match held {
                Some(c) => c,
                None => vm.checkpoint().await.map_err(snap)?,
            };
            vm.fork(&checkpoint, n, self.inner.limits.boot_timeout)
                .await
                .map_err(snap)?
        };
        let boot = started.elapsed();
        let mut out = Vec::with_capacity(n);
        for vm in vms {
            let agent = vm
                .agent()
                .map_err(|source| SandboxError::Snapshot { op: "fork", source })?;
            out.push((vm, agent));
        }
        let now = Instant::now();
        let l = &self.inner.limits;
        let mut forks = Vec::with_capacity(n);
        for ((vm, agent), reservation) in out.into_iter().zip(reservations) {
            let vm_egress = vm.egress_stats();
            let id = format!("sb-{:024x}", rand::random::<u128>() >> 32);
            let sandbox = Arc::new(Sandbox {
                id: id.clone(),
                spec: source.spec.clone(),
                created: SystemTime::now(),
                created_at: now,
                idle_timeout: source.idle_timeout,
                lifetime: source.lifetime,
                agent: Mutex::new(agent),
                vm: tokio::sync::Mutex::new(Some(vm)),
                last_used: Mutex::new(now),
                busy: AtomicUsize::new(0),
                owner: Mutex::new(Owner {
                    session: session.clone(),
                    orphaned_at: None,
                }),
                procs: Mutex::new(HashMap::new()),
                next_proc: AtomicU64::new(0),
                process_buffer: l.process_buffer,
                max_processes: l.max_processes,
                boot,
                notices: Vec::new(),
                // A fork of a VM with an allow-list over the agent channel has its own proxy.
                egress: Mutex::new(vm_egress),
                egress_reported: AtomicU64::new(0),
            });
            // The reservation now belongs to the live sandbox; it is released in `remove`.
            std::mem::forget(reservation);
            self.inner.map().insert(id, sandbox.clone());
            forks.push(sandbox);
        }
        Ok(forks)
    }
}
