//! Retry policy for MCP requests: retry only what provably did not take effect, or what is
//! safe to repeat.
//!
//! # Model
//! Two facts decide whether a failed attempt may be repeated:
//! - **What the request is** ([`Safety`]): `ping`, `initialize`, discovery, the `*/list` methods,
//!   `resources/read`, `prompts/get` and `completion/complete` have no side effects, so sending
//!   them twice is harmless ([`Safety::Safe`]). Everything else, `tools/call` above all, may
//!   change the world ([`Safety::Unsafe`]); an unknown method is unsafe.
//! - **How far the attempt got** ([`Failure`]): nothing reached the server (connection refused,
//!   DNS failure, TLS handshake interrupted, reset before the first request byte was written);
//!   the server answered that it did not process the request (HTTP 429, 503, 408, 425); or the
//!   request may have reached the server (timeout or reset after sending began, 502/504 from a
//!   proxy). Certificate rejections and other definite answers are [`Failure::Permanent`].
//!
//! [`classify`] crosses the two: not-sent failures are retried for every request;
//! not-processed answers are retried for safe requests, and for unsafe ones only when the
//! server says so explicitly: HTTP 429 or 503 *with* a `Retry-After` header. A bare 503 may
//! come from a proxy that timed out while the server went on executing (a `tools/call` ran
//! twice that way), and 408/425 say nothing about a retry, so an unsafe request answered so
//! fails with the answer ([`GiveUp::NotInvited`]). May-have-been-sent failures are retried
//! only for safe requests; an unsafe request that may have reached the server fails with
//! [`RetryError::NotRepeatable`], whose message says so ("tools/call may have reached the
//! server; not retried").
//!
//! # Timing
//! Backoff before retry *n* (0-based) is `initial * multiplier^n`, capped at `max_delay`
//! (defaults: 1 s, x2, 32 s, at most 3 retries, so 1, 2, 4 s). Jitter removes up to
//! `jitter` (default 25 %) of each delay, so concurrent clients spread out; with `jitter <= 0.5` and
//! `multiplier >= 2` delays never decrease from one retry to the next while below the cap. A `Retry-After`
//! header (seconds or HTTP-date) raises the delay to at least what the server asked, unless that
//! exceeds `max_retry_after` (default 120 s), in which case the request fails at once with a
//! message naming the wait. Each attempt runs under `attempt_timeout` (if set), and the whole
//! call under `deadline` (if set): an attempt gets at most the time left, and a retry whose
//! delay would end at or past the deadline is not started.
//!
//! # Driver
//! [`retry`] runs an async attempt closure under a policy; it is the one retry loop of the
//! crate (the Streamable HTTP transport runs every POST through it). Time comes from a [`Clock`]
//! ([`TokioClock`] in production, [`ManualClock`] in tests, whose sleeps return at once and
//! advance virtual time), so the 1-32 s delays cost nothing in tests.
//!
//! # Limits
//! The driver cannot know whether bytes left the machine: the caller's error type says so
//! through [`Classify`]. When the driver itself times an attempt out it assumes the worst
//! ([`Phase::MaybeSent`]). Jitter uses `rand`'s thread RNG.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// Whether a request may be sent twice without harm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Safety {
    /// Free of side effects: repeating it cannot do harm.
    Safe,
    /// May have side effects: never repeated once it may have reached the server.
    Unsafe,
}

impl Safety {
    /// The safety of an MCP (JSON-RPC) method. Unknown methods are unsafe.
    pub fn of_method(method: &str) -> Self {
        match method {
            "initialize"
            | "ping"
            | "server/discover"
            | "tools/list"
            | "resources/list"
            | "resources/templates/list"
            | "resources/read"
            | "prompts/list"
            | "prompts/get"
            | "completion/complete"
            | "logging/setLevel"
            | "resources/subscribe"
            | "resources/unsubscribe"
            | "subscriptions/listen"
            | "notifications/cancelled" => Self::Safe,
            _ => Self::Unsafe,
        }
    }
}

/// What is being retried: a name for messages and its safety.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestKind {
    /// Shown in errors, e.g. the JSON-RPC method (`tools/call`) or `GET stream`.
    pub name: String,
    /// Whether it may be repeated.
    pub safety: Safety,
}

impl RequestKind {
    /// The kind of an MCP request with this method name.
    pub fn method(method: &str) -> Self {
        Self {
            name: method.to_owned(),
            safety: Safety::of_method(method),
        }
    }

    /// A request with an explicit safety (e.g. an HTTP DELETE of a session, which is safe).
    pub fn new(name: impl Into<String>, safety: Safety) -> Self {
        Self {
            name: name.into(),
            safety,
        }
    }
}

/// How far an attempt got before it failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Phase {
    /// No byte of the request was written: the server cannot have seen it.
    BeforeSend,
    /// Sending began (or we cannot tell): the server may have acted on it.
    MaybeSent,
}

/// A `Retry-After` value: a delay or a point in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryAfter {
    /// `Retry-After: <seconds>`.
    Delay(Duration),
    /// `Retry-After: <HTTP-date>`.
    At(SystemTime),
}

impl RetryAfter {
    /// Parses a `Retry-After` header value; `None` if it is neither form.
    pub fn parse(value: &str) -> Option<Self> {
        let value = value.trim();
        if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
            // Absurd values saturate; the policy's max_retry_after rejects them anyway.
            let secs = value.parse::<u64>().unwrap_or(u64::MAX);
            return Some(Self::Delay(Duration::from_secs(secs)));
        }
        httpdate::parse_http_date(value).ok().map(Self::At)
    }

    /// The wait this asks for, seen at wall-clock time `now` (a past date means no wait).
    pub fn delay_from(self, now: SystemTime) -> Duration {
        match self {
            Self::Delay(d) => d,
            Self::At(t) => t.duration_since(now).unwrap_or(Duration::ZERO),
        }
    }
}

/// Why an attempt failed, as far as retrying is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Failure {
    /// The request never left: connection refused, DNS failure, no route, TLS handshake
    /// interrupted, reset before the first byte was written, all backends ejected.
    NotSent,
    /// The server answered that it did not process the request: HTTP 429, 503, 408, 425.
    NotProcessed {
        /// The HTTP status.
        status: u16,
        /// Its `Retry-After` header, if any.
        retry_after: Option<RetryAfter>,
    },
    /// A timeout; `phase` says whether the request may have been sent.
    Timeout(Phase),
    /// The connection broke; `phase` says whether the request may have been sent.
    Reset(Phase),
    /// An answer from a proxy or server that may have processed the request (HTTP 502, 504).
    MaybeProcessed {
        /// The HTTP status.
        status: u16,
    },
    /// Retrying cannot help: a definite answer (JSON-RPC error, 4xx, TLS certificate rejected...).
    Permanent,
}

impl Failure {
    /// The failure an HTTP status means for retrying, `None` for success (1xx-3xx).
    pub fn from_status(status: u16, retry_after: Option<RetryAfter>) -> Option<Self> {
        match status {
            100..=399 => None,
            408 | 425 | 429 | 503 => Some(Self::NotProcessed {
                status,
                retry_after,
            }),
            502 | 504 => Some(Self::MaybeProcessed { status }),
            _ => Some(Self::Permanent),
        }
    }

    /// Whether an unsafe request may be sent again after this failure: it never left, or the
    /// server explicitly asked for a retry (HTTP 429 or 503 with `Retry-After`).
    pub fn invites_retry(&self) -> bool {
        match self {
            Self::NotSent => true,
            Self::NotProcessed {
                status,
                retry_after,
            } => matches!(status, 429 | 503) && retry_after.is_some(),
            Self::Timeout(phase) | Self::Reset(phase) => *phase == Phase::BeforeSend,
            Self::MaybeProcessed { .. } | Self::Permanent => false,
        }
    }

    /// Whether the server may have acted on the request.
    pub fn may_have_taken_effect(&self) -> bool {
        match self {
            Self::NotSent | Self::NotProcessed { .. } => false,
            Self::Timeout(phase) | Self::Reset(phase) => *phase == Phase::MaybeSent,
            Self::MaybeProcessed { .. } | Self::Permanent => true,
        }
    }
}

/// Errors that can say how far their attempt got. The transport's error type implements it.
pub trait Classify {
    /// What this error means for retrying.
    fn failure(&self) -> Failure;

    /// True when the retry, if the policy allows one, may start without the backoff delay:
    /// another endpoint can take it, or the server said the request was not processed and
    /// what was wrong has been put right (an expired session). Default: no.
    fn retry_at_once(&self) -> bool {
        false
    }
}

impl Classify for Failure {
    fn failure(&self) -> Failure {
        self.clone()
    }
}

/// Backoff, limits and time budgets.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct RetryPolicy {
    /// Delay before the first retry (default 1 s).
    pub initial_delay: Duration,
    /// Growth factor per retry (default 2).
    pub multiplier: u32,
    /// Largest backoff delay (default 32 s).
    pub max_delay: Duration,
    /// Retries after the first attempt (default 3).
    pub max_retries: u32,
    /// Fraction of each delay that jitter may remove, 0.0..=1.0 (default 0.25).
    pub jitter: f64,
    /// Longest `Retry-After` we are willing to wait (default 120 s).
    pub max_retry_after: Duration,
    /// Time limit of one attempt (default none: the transport's own).
    pub attempt_timeout: Option<Duration>,
    /// Time limit of the whole call including retries (default none).
    pub deadline: Option<Duration>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            initial_delay: Duration::from_secs(1),
            multiplier: 2,
            max_delay: Duration::from_secs(32),
            max_retries: 3,
            jitter: 0.25,
            max_retry_after: Duration::from_secs(120),
            attempt_timeout: None,
            deadline: None,
        }
    }
}

impl RetryPolicy {
    /// The default policy (1 s, x2, 32 s cap, 3 retries, 25 % jitter).
    pub fn new() -> Self {
        Self::default()
    }

    /// A policy that never retries (still applies timeouts and the deadline).
    pub fn no_retries() -> Self {
        Self {
            max_retries: 0,
            ..Self::default()
        }
    }

    /// Sets the number of retries.
    pub fn with_max_retries(mut self, n: u32) -> Self {
        self.max_retries = n;
        self
    }

    /// Sets the first delay, the growth factor and the cap.
    pub fn with_backoff(mut self, initial: Duration, multiplier: u32, max: Duration) -> Self {
        self.initial_delay = initial;
        self.multiplier = multiplier.max(1);
        self.max_delay = max;
        self
    }

    /// Sets the jitter fraction (clamped to 0.0..=1.0).
    pub fn with_jitter(mut self, fraction: f64) -> Self {
        self.jitter = if fraction.is_finite() {
            fraction.clamp(0.0, 1.0)
        } else {
            0.0
        };
        self
    }

    /// Sets the per-attempt time limit.
    pub fn with_attempt_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.attempt_timeout = timeout;
        self
    }

    /// Sets the overall deadline.
    pub fn with_deadline(mut self, deadline: Option<Duration>) -> Self {
        self.deadline = deadline;
        self
    }

    /// Sets the longest acceptable `Retry-After`.
    pub fn with_max_retry_after(mut self, limit: Duration) -> Self {
        self.max_retry_after = limit;
        self
    }

    /// The un-jittered delay before retry `retry` (0-based), capped at `max_delay`.
    pub fn base_delay(&self, retry: u32) -> Duration {
        let factor = u64::from(self.multiplier.max(1));
        let mut delay = self.initial_delay;
        for _ in 0..retry {
            if delay >= self.max_delay {
                break;
            }
            delay = delay.saturating_mul(u32::try_from(factor).unwrap_or(u32::MAX));
        }
        delay.min(self.max_delay)
    }

    /// The jittered delay before retry `retry`; `unit` is a random number in `0.0..1.0`.
    pub fn backoff_delay(&self, retry: u32, unit: f64) -> Duration {
        let base = self.base_delay(retry);
        let unit = if unit.is_finite() {
            unit.clamp(0.0, 1.0)
        } else {
            0.0
        };
        let jitter = if self.jitter.is_finite() {
            self.jitter.clamp(0.0, 1.0)
        } else {
            0.0
        };
        base.mul_f64(1.0 - jitter * unit)
    }
}

/// What to do after a failed attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Decision {
    /// Wait this long, then try again.
    RetryAfter(Duration),
    /// Stop.
    GiveUp(GiveUp),
}

/// Why the driver stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum GiveUp {
    /// The failure is definite; retrying cannot help.
    Permanent,
    /// The request is unsafe and may have reached the server.
    NotRepeatable,
    /// All retries are used up.
    Exhausted {
        /// Attempts made in all.
        attempts: u32,
    },
    /// The next retry would end past the deadline.
    Deadline {
        /// The overall time budget.
        budget: Duration,
    },
    /// The server asked to wait longer than we are willing to.
    RetryAfterTooLong {
        /// What it asked for.
        wait: Duration,
        /// Our limit.
        limit: Duration,
    },
    /// The request is unsafe and the server did not explicitly ask for a retry (a 408, 425,
    /// or a 429/503 without `Retry-After`): the answer goes to the caller.
    NotInvited,
}

/// Decides what follows the failure of attempt number `attempts` (1-based) of `request`.
///
/// `elapsed` is the time since the call started, `now` the wall-clock time (for HTTP-date
/// `Retry-After`), `unit` a random number in `0.0..1.0` for jitter. Pure: same inputs, same answer.
pub fn classify(
    policy: &RetryPolicy,
    request: &RequestKind,
    failure: &Failure,
    attempts: u32,
    elapsed: Duration,
    now: SystemTime,
    unit: f64,
) -> Decision {
    let retry_after = match failure {
        Failure::Permanent => return Decision::GiveUp(GiveUp::Permanent),
        Failure::NotProcessed { retry_after, .. } => *retry_after,
        Failure::NotSent
        | Failure::Timeout(_)
        | Failure::Reset(_)
        | Failure::MaybeProcessed { .. } => None,
    };
    if failure.may_have_taken_effect() && request.safety == Safety::Unsafe {
        return Decision::GiveUp(GiveUp::NotRepeatable);
    }
    if request.safety == Safety::Unsafe && !failure.invites_retry() {
        return Decision::GiveUp(GiveUp::NotInvited);
    }
    if attempts > policy.max_retries {
        return Decision::GiveUp(GiveUp::Exhausted { attempts });
    }
    let mut delay = policy.backoff_delay(attempts.saturating_sub(1), unit);
    if let Some(ra) = retry_after {
        let wait = ra.delay_from(now);
        if wait > policy.max_retry_after {
            return Decision::GiveUp(GiveUp::RetryAfterTooLong {
                wait,
                limit: policy.max_retry_after,
            });
        }
        delay = delay.max(wait);
    }
    if let Some(budget) = policy.deadline {
        if elapsed.saturating_add(delay) >= budget {
            return Decision::GiveUp(GiveUp::Deadline { budget });
        }
    }
    Decision::RetryAfter(delay)
}

/// The error of a call that [`retry`] gave up on. Its message says why; its source is the
/// last attempt's error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RetryError<E: std::error::Error + 'static> {
    /// The failure is definite; the attempt's own error.
    #[error(transparent)]
    Failed(E),
    /// An unsafe request was answered "not processed" without an explicit invitation to
    /// retry (HTTP 429 or 503 with `Retry-After`).
    #[error("{request} was not re-sent: it is not safe to repeat, and the server did not ask for a retry (HTTP 429 or 503 with Retry-After)")]
    NotInvited {
        /// The request's name.
        request: String,
        /// The attempt's error.
        #[source]
        source: E,
    },
    /// An unsafe request failed after it may have reached the server.
    #[error("{request} may have reached the server; not retried")]
    NotRepeatable {
        /// The request's name.
        request: String,
        /// The attempt's error.
        #[source]
        source: E,
    },
    /// Every attempt failed.
    #[error("{request} failed {attempts} times; giving up")]
    Exhausted {
        /// The request's name.
        request: String,
        /// Attempts made.
        attempts: u32,
        /// The last attempt's error.
        #[source]
        source: E,
    },
    /// The overall deadline left no room for another attempt.
    #[error("{request} did not succeed within its {}", secs(*budget))]
    Deadline {
        /// The request's name.
        request: String,
        /// The deadline.
        budget: Duration,
        /// The last attempt's error.
        #[source]
        source: E,
    },
    /// The overall deadline passed during an attempt.
    #[error("{request} did not complete within its {}; the last attempt may have reached the server", secs(*budget))]
    DeadlineDuringAttempt {
        /// The request's name.
        request: String,
        /// The deadline.
        budget: Duration,
    },
    /// An attempt of a safe request ran past its time limit, with no retry left.
    #[error("{request} timed out after {}", secs(*timeout))]
    AttemptTimeout {
        /// The request's name.
        request: String,
        /// The per-attempt limit.
        timeout: Duration,
    },
    /// An unsafe request ran past its per-attempt time limit after it may have been sent.
    #[error("{request} timed out after {} and may have reached the server; not retried", secs(*timeout))]
    AttemptTimeoutNotRepeatable {
        /// The request's name.
        request: String,
        /// The per-attempt limit.
        timeout: Duration,
    },
    /// The server asked us to wait too long.
    #[error("{request}: the server asked to retry in {}, more than the {} limit", secs(*wait), secs(*limit))]
    RetryAfterTooLong {
        /// The request's name.
        request: String,
        /// Requested wait.
        wait: Duration,
        /// Our limit.
        limit: Duration,
        /// The attempt's error.
        #[source]
        source: E,
    },
}

impl<E: std::error::Error + 'static> RetryError<E> {
    /// The last attempt's error, if an attempt finished with one.
    pub fn last_error(&self) -> Option<&E> {
        match self {
            Self::Failed(e)
            | Self::NotInvited { source: e, .. }
            | Self::NotRepeatable { source: e, .. }
            | Self::Exhausted { source: e, .. }
            | Self::Deadline { source: e, .. }
            | Self::RetryAfterTooLong { source: e, .. } => Some(e),
            Self::DeadlineDuringAttempt { .. }
            | Self::AttemptTimeout { .. }
            | Self::AttemptTimeoutNotRepeatable { .. } => None,
        }
    }
}

fn secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s.fract() == 0.0 {
        format!("{s:.0} s")
    } else {
        format!("{s:.3} s")
    }
}

/// A boxed, sendable future.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Time for the retry driver and the balancer's health checks.
pub trait Clock: Send + Sync {
    /// Monotonic now.
    fn now(&self) -> Instant;
    /// Wall-clock now (for HTTP-date `Retry-After`).
    fn system_now(&self) -> SystemTime;
    /// Completes after `d`.
    fn sleep(&self, d: Duration) -> BoxFuture<'_, ()>;
}

/// The real clock (tokio timers).
#[derive(Debug, Clone, Copy, Default)]
pub struct TokioClock;

impl Clock for TokioClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
    fn system_now(&self) -> SystemTime {
        SystemTime::now()
    }
    fn sleep(&self, d: Duration) -> BoxFuture<'_, ()> {
        // Created on first poll, so a sleep made outside a runtime works once awaited in one.
        Box::pin(async move { tokio::time::sleep(d).await })
    }
}

/// A virtual clock for tests: `sleep(d)` returns at once and moves time forward by `d`, and
/// every sleep is recorded. Clones share the same time.
#[derive(Debug, Clone)]
pub struct ManualClock {
    inner: Arc<Mutex<ManualInner>>,
}

#[derive(Debug)]
struct ManualInner {
    start: Instant,
    system_start: SystemTime,
    offset: Duration,
    sleeps: Vec<Duration>,
}

impl Default for ManualClock {
    fn default() -> Self {
        Self::new()
    }
}

impl ManualClock {
    /// A clock at the current real time that only moves when told or slept on.
    pub fn new() -> Self {
        Self {
            inner: Arc::new(Mutex::new(ManualInner {
                start: Instant::now(),
                system_start: SystemTime::now(),
                offset: Duration::ZERO,
                sleeps: Vec::new(),
            })),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ManualInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Moves time forward.
    pub fn advance(&self, d: Duration) {
        let mut inner = self.lock();
        inner.offset = inner.offset.saturating_add(d);
    }

    /// Virtual time passed since creation.
    pub fn elapsed(&self) -> Duration {
        self.lock().offset
    }

    /// Every sleep so far, in order.
    pub fn sleeps(&self) -> Vec<Duration> {
        self.lock().sleeps.clone()
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        let inner = self.lock();
        inner.start + inner.offset
    }
    fn system_now(&self) -> SystemTime {
        let inner = self.lock();
        inner.system_start + inner.offset
    }
    fn sleep(&self, d: Duration) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let mut inner = self.lock();
            inner.offset = inner.offset.saturating_add(d);
            inner.sleeps.push(d);
        })
    }
}

/// What an attempt is told about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attempt {
    /// 1 for the first attempt.
    pub number: u32,
    /// The time this attempt may take (the smaller of the attempt timeout and what is left of
    /// the deadline), if limited. The driver enforces it too.
    pub budget: Option<Duration>,
}

/// Runs `attempt` until it succeeds or the policy says stop.
///
/// Each attempt is raced against its time budget on `clock`; an attempt that runs out of time
/// counts as [`Failure::Timeout`]`(`[`Phase::MaybeSent`]`)`.
pub async fn retry<T, E, F, Fut>(
    policy: &RetryPolicy,
    request: &RequestKind,
    clock: &dyn Clock,
    mut attempt: F,
) -> Result<T, RetryError<E>>
where
    E: std::error::Error + Classify + 'static,
    F: FnMut(Attempt) -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let start = clock.now();
    let mut number = 0u32;
    loop {
        number += 1;
        let elapsed = clock.now().saturating_duration_since(start);
        let left = policy.deadline.map(|d| d.saturating_sub(elapsed));
        let budget = match (policy.attempt_timeout, left) {
            (Some(t), Some(l)) => Some(t.min(l)),
            (t, l) => t.or(l),
        };
        let fut = attempt(Attempt { number, budget });
        let result = match budget {
            None => Some(fut.await),
            Some(b) => {
                tokio::pin!(fut);
                tokio::select! {
                    biased;
                    r = &mut fut => Some(r),
                    () = clock.sleep(b) => None,
                }
            }
        };
        let err = match result {
            Some(Ok(v)) => return Ok(v),
            Some(Err(e)) => e,
            None => {
                // Timed out: assume the request may have reached the server.
                let deadline_hit = match (policy.deadline, left) {
                    (Some(_), Some(l)) => policy.attempt_timeout.is_none_or(|t| l <= t),
                    _ => false,
                };
                let timeout = budget.unwrap_or_default();
                if deadline_hit {
                    return Err(RetryError::DeadlineDuringAttempt {
                        request: request.name.clone(),
                        budget: policy.deadline.unwrap_or_default(),
                    });
                }
                if request.safety == Safety::Unsafe {
                    return Err(RetryError::AttemptTimeoutNotRepeatable {
                        request: request.name.clone(),
                        timeout,
                    });
                }
                let elapsed = clock.now().saturating_duration_since(start);
                match classify(
                    policy,
                    request,
                    &Failure::Timeout(Phase::MaybeSent),
                    number,
                    elapsed,
                    clock.system_now(),
                    rand::random::<f64>(),
                ) {
                    Decision::RetryAfter(d) => {
                        tracing::debug!(
                            "{} attempt {number} timed out; retrying in {d:?}",
                            request.name
                        );
                        clock.sleep(d).await;
                        continue;
                    }
                    Decision::GiveUp(GiveUp::Deadline { budget }) => {
                        return Err(RetryError::DeadlineDuringAttempt {
                            request: request.name.clone(),
                            budget,
                        })
                    }
                    Decision::GiveUp(_) => {
                        return Err(RetryError::AttemptTimeout {
                            request: request.name.clone(),
                            timeout,
                        })
                    }
                }
            }
        };
        let failure = err.failure();
        let elapsed = clock.now().saturating_duration_since(start);
        let decision = classify(
            policy,
            request,
            &failure,
            number,
            elapsed,
            clock.system_now(),
            rand::random::<f64>(),
        );
        let name = request.name.clone();
        match decision {
            Decision::RetryAfter(_) if err.retry_at_once() => {
                tracing::debug!("{name} attempt {number} failed ({err}); retrying at once");
            }
            Decision::RetryAfter(d) => {
                tracing::debug!("{name} attempt {number} failed ({err}); retrying in {d:?}");
                clock.sleep(d).await;
            }
            Decision::GiveUp(GiveUp::Permanent) => return Err(RetryError::Failed(err)),
            Decision::GiveUp(GiveUp::NotInvited) => {
                return Err(RetryError::NotInvited {
                    request: name,
                    source: err,
                })
            }
            Decision::GiveUp(GiveUp::NotRepeatable) => {
                return Err(RetryError::NotRepeatable {
                    request: name,
                    source: err,
                })
            }
            Decision::GiveUp(GiveUp::Exhausted { attempts }) => {
                return Err(if attempts == 1 {
                    RetryError::Failed(err)
                } else {
                    RetryError::Exhausted {
                        request: name,
                        attempts,
                        source: err,
                    }
                })
            }
            Decision::GiveUp(GiveUp::Deadline { budget }) => {
                return Err(RetryError::Deadline {
                    request: name,
                    budget,
                    source: err,
                })
            }
            Decision::GiveUp(GiveUp::RetryAfterTooLong { wait, limit }) => {
                return Err(RetryError::RetryAfterTooLong {
                    request: name,
                    wait,
                    limit,
                    source: err,
                })
            }
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotSent => f.write_str("request not sent"),
            Self::NotProcessed { status, .. } => write!(f, "HTTP {status}: not processed"),
            Self::Timeout(Phase::BeforeSend) => f.write_str("timed out before sending"),
            Self::Timeout(Phase::MaybeSent) => f.write_str("timed out after sending"),
            Self::Reset(Phase::BeforeSend) => f.write_str("connection reset before sending"),
            Self::Reset(Phase::MaybeSent) => f.write_str("connection reset after sending"),
            Self::MaybeProcessed { status } => write!(f, "HTTP {status}"),
            Self::Permanent => f.write_str("permanent failure"),
        }
    }
}

impl std::error::Error for Failure {}

#[cfg(test)]
mod tests;
