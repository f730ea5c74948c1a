//! Load balancing over several endpoints of one logical MCP server.
//!
//! # Model
//! A [`Balancer`] holds a fixed list of endpoints (any `E`: a URL, a client handle...) and,
//! for each, two independent verdicts:
//! - **Active health** from periodic probes ([`Balancer::record_probe`], driven by
//!   [`Balancer::probe_all`] or [`spawn_health_checks`]): an endpoint turns unhealthy after
//!   `unhealthy_threshold` consecutive failed probes and healthy again after
//!   `healthy_threshold` consecutive good ones. The probe is a caller-supplied async function
//!   (an MCP `ping`, an HTTP request...) raced against `timeout`. Endpoints start healthy, so
//!   the first requests need not wait for a probe.
//! - **Passive ejection** from real traffic: after `eject_after` consecutive failures
//!   ([`Balancer::report_failure`]) the endpoint is ejected for `eject_cooldown`. When the
//!   cooldown ends it is re-admitted on probation: its failure streak is kept, so the next
//!   failure ejects it again at once, and a success clears it. `healthy_threshold` consecutive
//!   good probes re-admit an ejected endpoint before its cooldown ends.
//!
//! An endpoint is *available* when it is actively healthy and not ejected. [`Balancer::pick`]
//! returns the next available endpoint in round-robin order; when none is available it fails
//! with [`BalanceError::AllDown`], which lists each endpoint and why it is out.
//!
//! # Sessions and stateless requests
//! Stateless requests call [`Balancer::pick`] for every request, which spreads them. A
//! session-based connection calls `pick` once, keeps the [`EndpointId`] for the session's
//! lifetime, and when that endpoint dies (connection refused, session lost) calls
//! [`Balancer::fail_over`], which ejects it at once and picks another for a new session.
//!
//! # What counts as a failure
//! The caller decides; the intended rule is that transport-level failures (connection
//! refused or reset, timeouts, HTTP 5xx, TLS handshake failures) are failures, while a JSON-RPC
//! error or a tool error is a success: the endpoint answered.
//!
//! # Limits
//! No weights, no least-connections, no outlier detection across endpoints; the list is fixed
//! at construction. All state sits behind one mutex held for microseconds; time is passed in
//! (`now`), so every decision is deterministic and tested with a fake clock.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use crate::retry::Clock;

/// The index of an endpoint in the balancer's list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointId(pub usize);

impl fmt::Display for EndpointId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// Active health checking.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct HealthCheckConfig {
    /// Time between probe rounds (default 10 s).
    pub interval: Duration,
    /// Time limit of one probe (default 2 s).
    pub timeout: Duration,
    /// Consecutive good probes that make an endpoint healthy again (default 2).
    pub healthy_threshold: u32,
    /// Consecutive failed probes that make an endpoint unhealthy (default 3).
    pub unhealthy_threshold: u32,
}

impl Default for HealthCheckConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(10),
            timeout: Duration::from_secs(2),
            healthy_threshold: 2,
            unhealthy_threshold: 3,
        }
    }
}

impl HealthCheckConfig {
    /// Sets interval and timeout.
    pub fn with_timing(mut self, interval: Duration, timeout: Duration) -> Self {
        self.interval = interval;
        self.timeout = timeout;
        self
    }

    /// Sets the thresholds (each at least 1).
    pub fn with_thresholds(mut self, healthy: u32, unhealthy: u32) -> Self {
        self.healthy_threshold = healthy.max(1);
        self.unhealthy_threshold = unhealthy.max(1);
        self
    }
}

/// Balancer settings.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct BalancerConfig {
    /// Active health checks.
    pub health_check: HealthCheckConfig,
    /// Consecutive request failures that eject an endpoint (default 3).
    pub eject_after: u32,
    /// How long an ejected endpoint stays out (default 30 s).
    pub eject_cooldown: Duration,
}

impl Default for BalancerConfig {
    fn default() -> Self {
        Self {
            health_check: HealthCheckConfig::default(),
            eject_after: 3,
            eject_cooldown: Duration::from_secs(30),
        }
    }
}

impl BalancerConfig {
    /// Sets the health check settings.
    pub fn with_health_check(mut self, hc: HealthCheckConfig) -> Self {
        self.health_check = hc;
        self
    }

    /// Sets passive ejection: after `failures` consecutive failures, out for `cooldown`.
    pub fn with_ejection(mut self, failures: u32, cooldown: Duration) -> Self {
        self.eject_after = failures.max(1);
        self.eject_cooldown = cooldown;
        self
    }
}

/// Errors of the balancer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BalanceError {
    /// Constructed with an empty list.
    #[error("no endpoints given")]
    NoEndpoints,
    /// No endpoint is available.
    #[error("all {count} endpoints are unavailable: {details}")]
    AllDown {
        /// Number of endpoints.
        count: usize,
        /// Each endpoint and why it is out.
        details: String,
    },
}

/// One endpoint's state as seen from outside.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum EndpointState {
    /// Takes traffic.
    Available,
    /// Takes traffic again after a cooldown, but one more failure ejects it.
    Probation,
    /// Passively ejected until the cooldown ends.
    Ejected {
        /// Time left.
        remaining: Duration,
    },
    /// Failing active health checks.
    Unhealthy,
}

/// A snapshot of one endpoint for display.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct EndpointStatus {
    /// Its id.
    pub id: EndpointId,
    /// Its state.
    pub state: EndpointState,
    /// Consecutive request failures.
    pub failure_streak: u32,
    /// The last failure's description.
    pub last_error: Option<String>,
    /// How often it was picked.
    pub picks: u64,
}

#[derive(Debug, Clone, Default)]
struct Slot {
    unhealthy: bool,
    probe_ok_streak: u32,
    probe_fail_streak: u32,
    fail_streak: u32,
    ejected_until: Option<Instant>,
    last_error: Option<String>,
    picks: u64,
}

#[derive(Debug)]
struct State {
    next: usize,
    slots: Vec<Slot>,
}

/// Round-robin over the available endpoints of one logical server. Share it with `Arc`.
#[derive(Debug)]
pub struct Balancer<E> {
    endpoints: Vec<E>,
    config: BalancerConfig,
    state: Mutex<State>,
}

impl<E: Clone + fmt::Display> Balancer<E> {
    /// A balancer over `endpoints` (at least one), all initially available.
    pub fn new(endpoints: Vec<E>, config: BalancerConfig) -> Result<Self, BalanceError> {
        if endpoints.is_empty() {
            return Err(BalanceError::NoEndpoints);
        }
        let slots = vec![Slot::default(); endpoints.len()];
        Ok(Self {
            endpoints,
            config,
            state: Mutex::new(State { next: 0, slots }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The settings.
    pub fn config(&self) -> &BalancerConfig {
        &self.config
    }

    /// Number of endpoints.
    pub fn len(&self) -> usize {
        self.endpoints.len()
    }

    /// Always false: a balancer has at least one endpoint.
    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }

    /// The endpoints, indexed by [`EndpointId`].
    pub fn endpoints(&self) -> &[E] {
        &self.endpoints
    }

    /// The endpoint with this id, if it exists.
    pub fn endpoint(&self, id: EndpointId) -> Option<&E> {
        self.endpoints.get(id.0)
    }

    /// The next available endpoint in round-robin order.
    pub fn pick(&self, now: Instant) -> Result<(EndpointId, E), BalanceError> {
        self.pick_excluding(now, &[])
    }

    /// Whether [`Self::pick_excluding`] would find an endpoint, without picking one (no
    /// round-robin step, no pick counted).
    pub fn any_available(&self, now: Instant, exclude: &[EndpointId]) -> bool {
        let st = self.lock();
        st.slots
            .iter()
            .enumerate()
            .any(|(i, s)| !exclude.contains(&EndpointId(i)) && available(s, now))
    }

    /// Like [`Self::pick`], skipping the endpoints in `exclude`.
    pub fn pick_excluding(
        &self,
        now: Instant,
        exclude: &[EndpointId],
    ) -> Result<(EndpointId, E), BalanceError> {
        let mut st = self.lock();
        let n = st.slots.len();
        for step in 0..n {
            let i = (st.next + step) % n;
            if exclude.contains(&EndpointId(i)) || !available(&st.slots[i], now) {
                continue;
            }
            st.next = (i + 1) % n;
            st.slots[i].picks += 1;
            return Ok((EndpointId(i), self.endpoints[i].clone()));
        }
        Err(self.all_down(&st, now, exclude))
    }

    fn all_down(&self, st: &State, now: Instant, exclude: &[EndpointId]) -> BalanceError {
        let details = st
            .slots
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let why = if exclude.contains(&EndpointId(i)) && available(s, now) {
                    "just failed".to_owned()
                } else if s.unhealthy {
                    "failing health checks".to_owned()
                } else if let Some(until) = s.ejected_until.filter(|u| *u > now) {
                    format!(
                        "ejected for {} s more after {} failures",
                        until.saturating_duration_since(now).as_secs_f64().ceil(),
                        s.fail_streak
                    )
                } else {
                    "unavailable".to_owned()
                };
                match &s.last_error {
                    Some(e) => format!("{} ({why}; last error: {e})", self.endpoints[i]),
                    None => format!("{} ({why})", self.endpoints[i]),
                }
            })
            .collect::<Vec<_>>()
            .join(", ");
        BalanceError::AllDown {
            count: st.slots.len(),
            details,
        }
    }

    /// A request on `id` succeeded (the endpoint answered, even with an application error).
    pub fn report_success(&self, id: EndpointId) {
        let mut st = self.lock();
        if let Some(s) = st.slots.get_mut(id.0) {
            s.fail_streak = 0;
            s.ejected_until = None;
        }
    }

    /// A request on `id` failed at the transport level; ejects it after `eject_after` in a row.
    pub fn report_failure(&self, id: EndpointId, now: Instant, reason: &str) {
        let cfg = &self.config;
        let mut st = self.lock();
        if let Some(s) = st.slots.get_mut(id.0) {
            s.fail_streak = s.fail_streak.saturating_add(1);
            s.last_error = Some(reason.to_owned());
            if s.fail_streak >= cfg.eject_after && !ejected(s, now) {
                s.ejected_until = Some(now + cfg.eject_cooldown);
                s.probe_ok_streak = 0;
                tracing::info!(
                    "endpoint {} ejected for {:?} after {} failures: {reason}",
                    self.endpoints[id.0],
                    cfg.eject_cooldown,
                    s.fail_streak
                );
            }
        }
    }

    /// The endpoint of a session died: eject it now and pick another one for a new session.
    pub fn fail_over(
        &self,
        dead: EndpointId,
        now: Instant,
        reason: &str,
    ) -> Result<(EndpointId, E), BalanceError> {
        {
            let cfg = &self.config;
            let mut st = self.lock();
            if let Some(s) = st.slots.get_mut(dead.0) {
                s.fail_streak = s.fail_streak.max(cfg.eject_after);
                s.last_error = Some(reason.to_owned());
                s.ejected_until = Some(now + cfg.eject_cooldown);
                s.probe_ok_streak = 0;
            }
        }
        self.pick_excluding(now, &[dead])
    }

    /// Records the result of an active probe of `id`.
    pub fn record_probe(&self, id: EndpointId, result: Result<(), String>) {
        let hc = &self.config.health_check;
        let mut st = self.lock();
        let Some(s) = st.slots.get_mut(id.0) else {
            return;
        };
        match result {
            Ok(()) => {
                s.probe_fail_streak = 0;
                s.probe_ok_streak = s.probe_ok_streak.saturating_add(1);
                if s.probe_ok_streak >= hc.healthy_threshold {
                    if s.unhealthy || s.ejected_until.is_some() {
                        tracing::info!(
                            "endpoint {} passes health checks again",
                            self.endpoints[id.0]
                        );
                    }
                    s.unhealthy = false;
                    s.ejected_until = None;
                    s.fail_streak = 0;
                }
            }
            Err(e) => {
                s.probe_ok_streak = 0;
                s.probe_fail_streak = s.probe_fail_streak.saturating_add(1);
                if s.probe_fail_streak >= hc.unhealthy_threshold && !s.unhealthy {
                    tracing::info!("endpoint {} fails health checks: {e}", self.endpoints[id.0]);
                    s.unhealthy = true;
                }
                s.last_error = Some(e);
            }
        }
    }

    /// Every endpoint's state at `now`.
    pub fn status(&self, now: Instant) -> Vec<EndpointStatus> {
        let st = self.lock();
        let eject_after = self.config.eject_after;
        st.slots
            .iter()
            .enumerate()
            .map(|(i, s)| EndpointStatus {
                id: EndpointId(i),
                state: if s.unhealthy {
                    EndpointState::Unhealthy
                } else if let Some(until) = s.ejected_until.filter(|u| *u > now) {
                    EndpointState::Ejected {
                        remaining: until.saturating_duration_since(now),
                    }
                } else if s.fail_streak >= eject_after {
                    EndpointState::Probation
                } else {
                    EndpointState::Available
                },
                failure_streak: s.fail_streak,
                last_error: s.last_error.clone(),
                picks: s.picks,
            })
            .collect()
    }

    /// Probes every endpoint once, concurrently, each under the configured timeout, and
    /// records the results. `probe` gets the endpoint and returns `Err(reason)` on failure.
    pub async fn probe_all<P, Fut>(&self, clock: &dyn Clock, probe: &P)
    where
        P: Fn(E) -> Fut,
        Fut: Future<Output = Result<(), String>>,
    {
        let timeout = self.config.health_check.timeout;
        let probes: Vec<_> = self
            .endpoints
            .iter()
            .map(|e| {
                let fut = probe(e.clone());
                Box::pin(async move {
                    tokio::select! {
                        biased;
                        r = fut => r,
                        () = clock.sleep(timeout) => Err(format!("health check timed out after {timeout:?}")),
                    }
                })
            })
            .collect();
        for (i, result) in join_all(probes).await.into_iter().enumerate() {
            self.record_probe(EndpointId(i), result);
        }
    }
}

fn ejected(s: &Slot, now: Instant) -> bool {
    s.ejected_until.is_some_and(|u| u > now)
}

fn available(s: &Slot, now: Instant) -> bool {
    !s.unhealthy && !ejected(s, now)
}

/// Polls all futures to completion; results in input order.
async fn join_all<F: Future + Unpin>(futures: Vec<F>) -> Vec<F::Output> {
    let mut slots: Vec<(F, Option<F::Output>)> = futures.into_iter().map(|f| (f, None)).collect();
    std::future::poll_fn(|cx: &mut Context<'_>| {
        let mut pending = false;
        for (fut, out) in slots.iter_mut() {
            if out.is_none() {
                match Pin::new(fut).poll(cx) {
                    Poll::Ready(v) => *out = Some(v),
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    slots.into_iter().filter_map(|(_, out)| out).collect()
}

/// A running health-check task; dropping it stops the checks.
#[derive(Debug)]
pub struct HealthChecks {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for HealthChecks {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Spawns a task (on the current tokio runtime) that probes every endpoint of `balancer` each
/// `interval`, starting at once. The task stops when the returned handle is dropped.
pub fn spawn_health_checks<E, P, Fut>(
    balancer: Arc<Balancer<E>>,
    clock: Arc<dyn Clock>,
    probe: P,
) -> HealthChecks
where
    E: Clone + fmt::Display + Send + Sync + 'static,
    P: Fn(E) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    let task = tokio::spawn(async move {
        let interval = balancer.config.health_check.interval;
        loop {
            balancer.probe_all(clock.as_ref(), &probe).await;
            clock.sleep(interval).await;
        }
    });
    HealthChecks { task }
}

#[cfg(test)]
mod tests;
