//! The warm pool: a number of ready VMs per profile, refilled in the background within a
//! memory budget; each VM is handed out once and destroyed after use.
//!
//! The pool is generic over a [`Source`] that makes (restores) and destroys VMs, so its
//! logic is tested with a fake source (`pool/tests.rs`); the daemon's source restores QEMU
//! snapshots (`vmcp-cli`).
//!
//! Invariants:
//! - **Once**: [`Pool::take`] moves a VM out of its queue into a [`Lease`]; a lease cannot be
//!   cloned and destroys its VM when it ends ([`Lease::destroy`] or drop). Nothing puts a VM
//!   back into a queue.
//! - **Budget**: every VM the pool holds counts against `budget_mib` with its guest memory,
//!   from the moment its restore starts until it is destroyed: ready, being restored, and
//!   handed out alike. A restore starts only if it fits.
//! - **Refill**: at most `max_parallel_fills` restores run at once (restores are CPU-bound);
//!   while VMs of a profile are handed out and at least half of its pool is ready, its refill
//!   waits until they are given back, so a restore does not compete with the clients for CPU
//!   (an emptier pool refills at once); a failed restore is retried after a back-off that doubles up to [`MAX_BACKOFF`], and
//!   the error is kept for the status report.
//! - **Shutdown**: [`Pool::shutdown`] stops refilling and destroys every ready VM; VMs that
//!   are being restored are destroyed when their restore ends; handed-out VMs by their leases.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::Notify;

use crate::proto::{clip, ProfileStatus, MAX_TEXT_BYTES};

/// Longest wait before a failed restore is tried again.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// First wait after a failed restore.
const FIRST_BACKOFF: Duration = Duration::from_millis(500);

/// Makes and destroys the pool's VMs.
#[async_trait]
pub trait Source: Send + Sync + 'static {
    /// A ready VM.
    type Vm: Send + 'static;
    /// Brings up one ready VM of `profile` (restored, agent answering).
    async fn make(&self, profile: &ProfileSpec) -> Result<Self::Vm, String>;
    /// Destroys a VM (after use, or unused at shutdown). Default: drop it (a dropped VM must
    /// stop everything it started).
    async fn destroy(&self, vm: Self::Vm) {
        drop(vm);
    }
}

/// One kind of VM the pool keeps ready.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ProfileSpec {
    /// Its name (the daemon uses the automatic snapshot's name, which `vmcp run` computes
    /// from its VM flags too).
    pub name: String,
    /// vCPUs per VM (reported).
    pub cpus: u32,
    /// Guest memory per VM, MiB (counted against the budget).
    pub memory_mib: u32,
    /// Ready VMs to keep.
    pub target: usize,
}

impl ProfileSpec {
    /// A profile called `name` keeping `target` VMs of `cpus` and `memory_mib` ready.
    pub fn new(name: impl Into<String>, cpus: u32, memory_mib: u32, target: usize) -> Self {
        ProfileSpec {
            name: name.into(),
            cpus,
            memory_mib,
            target,
        }
    }
}

/// Why [`Pool::take`] had no VM.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NoVm {
    /// No profile of that name.
    #[error("no pool for profile {0}")]
    UnknownProfile(String),
    /// The profile's pool is empty now (being refilled).
    #[error("the pool of profile {0} is empty")]
    Empty(String),
    /// The pool is shutting down.
    #[error("the daemon is shutting down")]
    ShuttingDown,
}

struct Slot<V> {
    spec: ProfileSpec,
    ready: VecDeque<V>,
    filling: usize,
    leased: usize,
    handed_out: u64,
    failures: u64,
    last_error: Option<String>,
    retry_at: Option<Instant>,
    backoff: Duration,
}

impl<V> Slot<V> {
    fn held(&self) -> u64 {
        (self.ready.len() + self.filling + self.leased) as u64 * u64::from(self.spec.memory_mib)
    }
}

struct State<V> {
    slots: Vec<Slot<V>>,
    fills: usize,
}

impl<V> State<V> {
    fn used_mib(&self) -> u64 {
        self.slots.iter().map(Slot::held).sum()
    }
}

/// The pool. Share it as `Arc<Pool<S>>`; [`Pool::run`] refills it.
pub struct Pool<S: Source> {
    source: Arc<S>,
    state: Mutex<State<S::Vm>>,
    changed: Notify,
    budget_mib: u64,
    max_parallel_fills: usize,
    stopping: AtomicBool,
}

impl<S: Source> std::fmt::Debug for Pool<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("budget_mib", &self.budget_mib)
            .finish_non_exhaustive()
    }
}

impl<S: Source> Pool<S> {
    /// A pool of `profiles` over `source`, holding at most `budget_mib` MiB of guest memory,
    /// restoring at most `max_parallel_fills` (at least 1) VMs at once. Nothing is restored
    /// before [`Pool::run`].
    pub fn new(
        source: Arc<S>,
        profiles: Vec<ProfileSpec>,
        budget_mib: u64,
        max_parallel_fills: usize,
    ) -> Arc<Self> {
        let slots = profiles
            .into_iter()
            .map(|spec| Slot {
                spec,
                ready: VecDeque::new(),
                filling: 0,
                leased: 0,
                handed_out: 0,
                failures: 0,
                last_error: None,
                retry_at: None,
                backoff: FIRST_BACKOFF,
            })
            .collect();
        Arc::new(Pool {
            source,
            state: Mutex::new(State { slots, fills: 0 }),
            changed: Notify::new(),
            budget_mib,
            max_parallel_fills: max_parallel_fills.max(1),
            stopping: AtomicBool::new(false),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State<S::Vm>> {
        // No code panics while holding this lock; a poisoned lock still has consistent data.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The source.
    pub fn source(&self) -> &Arc<S> {
        &self.source
    }

    /// The memory budget, MiB.
    pub fn budget_mib(&self) -> u64 {
        self.budget_mib
    }

    /// Guest memory of every VM held now, MiB.
    pub fn used_mib(&self) -> u64 {
        self.lock().used_mib()
    }

    /// Takes a ready VM of profile `name`; it is never handed out again.
    pub fn take(self: &Arc<Self>, name: &str) -> Result<Lease<S>, NoVm> {
        if self.stopping.load(Ordering::Acquire) {
            return Err(NoVm::ShuttingDown);
        }
        let mut st = self.lock();
        let (index, slot) = st
            .slots
            .iter_mut()
            .enumerate()
            .find(|(_, s)| s.spec.name == name)
            .ok_or_else(|| NoVm::UnknownProfile(name.to_string()))?;
        let vm = slot
            .ready
            .pop_front()
            .ok_or_else(|| NoVm::Empty(name.to_string()))?;
        slot.leased += 1;
        slot.handed_out += 1;
        drop(st);
        self.changed.notify_one();
        Ok(Lease {
            vm: Some(vm),
            pool: Arc::clone(self),
            slot: index,
        })
    }

    /// One status entry per profile.
    pub fn status(&self) -> Vec<ProfileStatus> {
        let st = self.lock();
        st.slots
            .iter()
            .map(|s| ProfileStatus {
                name: s.spec.name.clone(),
                cpus: s.spec.cpus,
                memory_mib: s.spec.memory_mib,
                target: u32::try_from(s.spec.target).unwrap_or(u32::MAX),
                ready: u32::try_from(s.ready.len()).unwrap_or(u32::MAX),
                filling: u32::try_from(s.filling).unwrap_or(u32::MAX),
                leased: u32::try_from(s.leased).unwrap_or(u32::MAX),
                handed_out: s.handed_out,
                failures: s.failures,
                last_error: s.last_error.clone(),
            })
            .collect()
    }

    /// The profiles' names.
    pub fn profiles(&self) -> Vec<String> {
        self.lock()
            .slots
            .iter()
            .map(|s| s.spec.name.clone())
            .collect()
    }

    /// Refills the pool until [`Pool::shutdown`]; restores run as tasks of the current
    /// runtime.
    pub async fn run(self: Arc<Self>) {
        loop {
            if self.stopping.load(Ordering::Acquire) {
                return;
            }
            let (starts, next_retry) = self.plan_fills();
            for index in starts {
                let pool = Arc::clone(&self);
                tokio::spawn(async move { pool.fill(index).await });
            }
            match next_retry {
                Some(at) => {
                    let at = tokio::time::Instant::from_std(at);
                    tokio::select! {
                        () = self.changed.notified() => {}
                        () = tokio::time::sleep_until(at) => {}
                    }
                }
                None => self.changed.notified().await,
            }
        }
    }

    /// Which slots get a restore now (reserving their memory), and when the next back-off ends.
    fn plan_fills(&self) -> (Vec<usize>, Option<Instant>) {
        let now = Instant::now();
        let mut st = self.lock();
        let mut used = st.used_mib();
        let mut fills = st.fills;
        let mut starts = Vec::new();
        let mut next_retry: Option<Instant> = None;
        for (index, slot) in st.slots.iter_mut().enumerate() {
            if let Some(at) = slot.retry_at {
                if at > now {
                    next_retry = Some(next_retry.map_or(at, |n| n.min(at)));
                    continue;
                }
                slot.retry_at = None;
            }
            // While clients use VMs of this profile and at least half of it is ready, the
            // refill waits: a restore would compete with those clients for CPU.
            if slot.leased > 0 && slot.ready.len() * 2 >= slot.spec.target {
                continue;
            }
            let mem = u64::from(slot.spec.memory_mib);
            while slot.ready.len() + slot.filling < slot.spec.target
                && fills < self.max_parallel_fills
                && used + mem <= self.budget_mib
            {
                slot.filling += 1;
                fills += 1;
                used += mem;
                starts.push(index);
            }
        }
        st.fills = fills;
        (starts, next_retry)
    }

    async fn fill(self: Arc<Self>, index: usize) {
        let spec = {
            let st = self.lock();
            match st.slots.get(index) {
                Some(s) => s.spec.clone(),
                None => return,
            }
        };
        let made = self.source.make(&spec).await;
        let leftover = {
            let mut st = self.lock();
            st.fills = st.fills.saturating_sub(1);
            let stopping = self.stopping.load(Ordering::Acquire);
            let Some(slot) = st.slots.get_mut(index) else {
                return;
            };
            slot.filling = slot.filling.saturating_sub(1);
            match made {
                Ok(vm) if stopping => Some(vm),
                Ok(vm) => {
                    slot.ready.push_back(vm);
                    slot.backoff = FIRST_BACKOFF;
                    None
                }
                Err(e) => {
                    tracing::warn!(profile = %spec.name, error = %e, "restore for the pool failed");
                    slot.failures += 1;
                    slot.last_error = Some(clip(&e, MAX_TEXT_BYTES));
                    slot.retry_at = Some(Instant::now() + slot.backoff);
                    slot.backoff = (slot.backoff * 2).min(MAX_BACKOFF);
                    None
                }
            }
        };
        if let Some(vm) = leftover {
            self.source.destroy(vm).await;
        }
        self.changed.notify_one();
    }

    /// Stops refilling and destroys every ready VM. Restores still running destroy their VM
    /// when they end; handed-out VMs are destroyed by their leases.
    pub async fn shutdown(&self) {
        self.stopping.store(true, Ordering::Release);
        self.changed.notify_one();
        let drained: Vec<S::Vm> = {
            let mut st = self.lock();
            st.slots
                .iter_mut()
                .flat_map(|s| s.ready.drain(..).collect::<Vec<_>>())
                .collect()
        };
        for vm in drained {
            self.source.destroy(vm).await;
        }
    }

    /// VMs being restored now, over all profiles.
    pub fn filling(&self) -> usize {
        self.lock().fills
    }

    fn release(&self, index: usize) {
        if let Some(slot) = self.lock().slots.get_mut(index) {
            slot.leased = slot.leased.saturating_sub(1);
        }
        self.changed.notify_one();
    }
}

/// A VM handed out by [`Pool::take`]; destroys it when it ends. Its memory counts against
/// the budget until then.
pub struct Lease<S: Source> {
    vm: Option<S::Vm>,
    pool: Arc<Pool<S>>,
    slot: usize,
}

impl<S: Source> std::fmt::Debug for Lease<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("slot", &self.slot)
            .finish_non_exhaustive()
    }
}

impl<S: Source> Lease<S> {
    /// The VM.
    pub fn vm(&mut self) -> Option<&mut S::Vm> {
        self.vm.as_mut()
    }

    /// Destroys the VM and gives its memory back to the budget.
    pub async fn destroy(mut self) {
        if let Some(vm) = self.vm.take() {
            self.pool.source.destroy(vm).await;
        }
        self.pool.release(self.slot);
    }
}

impl<S: Source> Drop for Lease<S> {
    fn drop(&mut self) {
        let Some(vm) = self.vm.take() else {
            return;
        };
        let pool = Arc::clone(&self.pool);
        let slot = self.slot;
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                // If the runtime shuts down first, the task is dropped and with it the VM.
                rt.spawn(async move {
                    pool.source.destroy(vm).await;
                    pool.release(slot);
                });
            }
            Err(_) => {
                drop(vm);
                pool.release(slot);
            }
        }
    }
}

#[cfg(test)]
mod tests;
