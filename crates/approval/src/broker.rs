//! The broker: holds crossings waiting for a person, asks, and resolves each one exactly once.
//!
//! [`Broker::submit`] is what an integration calls when something would cross: it registers a
//! [`PendingApproval`], starts every [`Asker`] (the broker's own plus the submission's, e.g. the
//! MCP session's elicitation) on it, and resolves with the first [`Decision`] that arrives —
//! from an asker, from [`Broker::decide`] (the web page, the JSON API) — or with
//! [`Decision::TimedOut`] after the timeout. It never hangs past the timeout, and a submission
//! whose future is dropped is withdrawn (recorded as denied, `by: "withdrawn"`).
//!
//! Any number of sandboxes may submit concurrently; at most `max_pending` items wait at once and
//! a submission beyond that is denied at once (nothing is queued without bound). Decided items
//! move to a bounded history. Every decision, including timeouts and refusals, is appended to
//! the [`AuditLog`] before the submitter sees it; if the log cannot be written, an approval is
//! turned into a denial (nothing crosses unrecorded).
//!
//! UIs follow changes with [`Broker::subscribe`] (a generation counter that moves on every
//! change) and read [`Broker::snapshot`].

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use tokio::sync::{oneshot, watch};

use crate::audit::{AuditLog, AuditRecord};
use crate::crossing::{Crossing, Decision, PendingApproval};

/// Longest `by`, `reason` and `context` kept, in characters (longer text is cut, escaped).
pub const MAX_TEXT: usize = 1024;

/// Broker settings.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct BrokerConfig {
    /// How long a crossing waits for a decision before it is denied.
    pub timeout: Duration,
    /// Most crossings waiting at once; more are denied immediately.
    pub max_pending: usize,
    /// Decided items kept for [`Broker::history`].
    pub history_len: usize,
    /// Where decisions are recorded (none: not recorded).
    pub audit: Option<Arc<AuditLog>>,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            timeout: Duration::from_secs(300),
            max_pending: 64,
            history_len: 200,
            audit: None,
        }
    }
}

impl BrokerConfig {
    /// Sets the timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sets the most crossings waiting at once.
    pub fn with_max_pending(mut self, n: usize) -> Self {
        self.max_pending = n;
        self
    }

    /// Sets the audit log.
    pub fn with_audit(mut self, audit: Arc<AuditLog>) -> Self {
        self.audit = Some(audit);
        self
    }
}

/// Something that asks a person (a terminal prompt, an MCP elicitation, ...).
///
/// `ask` is started when a crossing is submitted and dropped (cancelled) as soon as the crossing
/// is decided another way. Returning `None` means "this asker cannot answer" (no TTY, the client
/// declined to show the form): the crossing keeps waiting for other askers, the page or the
/// timeout. `Some(decision)` decides it, unless something else was faster.
#[async_trait::async_trait]
pub trait Asker: Send + Sync {
    /// A short name recorded as `by` in the audit log (`terminal`, `elicitation`).
    fn name(&self) -> &str;

    /// Asks about `pending`.
    async fn ask(&self, pending: &PendingApproval) -> Option<Decision>;
}

/// Extra settings of one submission.
#[derive(Default, Clone)]
#[non_exhaustive]
pub struct SubmitOptions {
    /// What caused the crossing (a tool name, a command line), shown to people and logged.
    pub context: Option<String>,
    /// Askers for this submission only (e.g. the elicitation of the MCP session that caused it),
    /// started besides the broker's own.
    pub askers: Vec<Arc<dyn Asker>>,
    /// This submission's timeout instead of the broker's.
    pub timeout: Option<Duration>,
}

impl SubmitOptions {
    /// Sets the context.
    pub fn with_context(mut self, context: impl Into<String>) -> Self {
        self.context = Some(context.into());
        self
    }

    /// Adds an asker.
    pub fn with_asker(mut self, asker: Arc<dyn Asker>) -> Self {
        self.askers.push(asker);
        self
    }

    /// Sets the timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }
}

/// A decided crossing.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct HistoryEntry {
    /// The crossing as it was pending.
    pub item: PendingApproval,
    /// The decision.
    pub decision: Decision,
    /// Who decided.
    pub by: String,
    /// When.
    #[serde(serialize_with = "rfc3339_serde::serialize")]
    pub decided_at: SystemTime,
}

/// The broker's state at one generation.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct Snapshot {
    /// Moves on every change.
    pub generation: u64,
    /// Waiting, oldest first.
    pub pending: Vec<PendingApproval>,
    /// Decided, newest first.
    pub history: Vec<HistoryEntry>,
}

/// A decision that could not be applied.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum BrokerError {
    /// No such pending item (never was, or already decided).
    #[error("no pending approval {0:?} (already decided or never existed)")]
    NotPending(String),
    /// The decision does not fit the item.
    #[error("{0}")]
    Invalid(String),
}

struct Entry {
    item: PendingApproval,
    tx: oneshot::Sender<(Decision, String)>,
    submitted: Instant,
}

#[derive(Default)]
struct State {
    pending: BTreeMap<u64, Entry>,
    history: VecDeque<HistoryEntry>,
}

struct Inner {
    config: BrokerConfig,
    askers: Mutex<Vec<Arc<dyn Asker>>>,
    state: Mutex<State>,
    generation: watch::Sender<u64>,
    prefix: String,
    next: AtomicU64,
}

/// Holds pending approvals; cheap to clone (shared).
#[derive(Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // State stays consistent across a panic elsewhere: every mutation is a single step.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn clip(s: &str) -> String {
    vmcp_sanitize::sanitize(s, MAX_TEXT)
}

/// Removes a pending item if the submission is dropped before it is decided.
struct Withdraw<'a> {
    broker: &'a Broker,
    seq: u64,
    armed: bool,
}

impl Drop for Withdraw<'_> {
    fn drop(&mut self) {
        if self.armed {
            let _ = self.broker.finish(
                self.seq,
                Decision::deny("the request was withdrawn before a decision"),
                "withdrawn",
            );
        }
    }
}

impl Broker {
    /// A broker with `config` and no askers.
    pub fn new(config: BrokerConfig) -> Self {
        let (generation, _) = watch::channel(0);
        Broker {
            inner: Arc::new(Inner {
                config,
                askers: Mutex::new(Vec::new()),
                state: Mutex::new(State::default()),
                generation,
                prefix: format!("{:08x}", rand::random::<u32>()),
                next: AtomicU64::new(1),
            }),
        }
    }

    /// The default timeout.
    pub fn timeout(&self) -> Duration {
        self.inner.config.timeout
    }

    /// Adds an asker started for every submission.
    pub fn add_asker(&self, asker: Arc<dyn Asker>) {
        lock(&self.inner.askers).push(asker);
    }

    /// Submits a crossing and waits for its decision (see the module docs).
    pub async fn submit(&self, crossing: Crossing) -> Decision {
        self.submit_with(crossing, SubmitOptions::default()).await
    }

    /// [`Broker::submit`] with a context, extra askers or another timeout.
    pub async fn submit_with(&self, crossing: Crossing, opts: SubmitOptions) -> Decision {
        let timeout = opts.timeout.unwrap_or(self.inner.config.timeout);
        let seq = self.inner.next.fetch_add(1, Ordering::Relaxed);
        let now = SystemTime::now();
        let changes_hash = crossing.changes().map(|c| c.hash()).unwrap_or_default();
        let item = PendingApproval {
            id: format!("{}-{seq}", self.inner.prefix),
            crossing,
            context: opts.context.as_deref().map(clip),
            created_at: now,
            expires_at: now + timeout,
            changes_hash,
        };
        let (tx, mut rx) = oneshot::channel();
        {
            let mut st = lock(&self.inner.state);
            if st.pending.len() >= self.inner.config.max_pending {
                drop(st);
                let d = Decision::deny(format!(
                    "too many approvals are waiting ({}); decide some first",
                    self.inner.config.max_pending
                ));
                return self.record(item, d, "broker", Instant::now());
            }
            st.pending.insert(
                seq,
                Entry {
                    item: item.clone(),
                    tx,
                    submitted: Instant::now(),
                },
            );
        }
        self.bump();
        let mut guard = Withdraw {
            broker: self,
            seq,
            armed: true,
        };

        let mut askers: Vec<Arc<dyn Asker>> = lock(&self.inner.askers).clone();
        askers.extend(opts.askers);
        let tasks: Vec<_> = askers
            .into_iter()
            .map(|asker| {
                let broker = self.clone();
                let item = item.clone();
                tokio::spawn(async move {
                    if let Some(d) = asker.ask(&item).await {
                        if let Err(e) = broker.decide(&item.id, d, asker.name()) {
                            tracing::debug!("asker {} answered too late: {e}", asker.name());
                        }
                    }
                })
            })
            .collect();

        let outcome = match tokio::time::timeout(timeout, &mut rx).await {
            Ok(Ok((d, _by))) => d,
            // The sender is only dropped by `finish`, which sends first.
            Ok(Err(_)) => Decision::deny("the approval broker stopped"),
            Err(_) => match self.finish(seq, Decision::TimedOut, "timeout") {
                Ok(d) => d,
                // Decided in the same instant: the decision is in the channel.
                Err(_) => match rx.try_recv() {
                    Ok((d, _)) => d,
                    Err(_) => Decision::TimedOut,
                },
            },
        };
        guard.armed = false;
        for t in tasks {
            t.abort();
        }
        outcome
    }

    /// Decides a pending item by its id. `by` names who decided (`page`, `api`, an asker).
    /// [`Decision::TimedOut`] cannot be given; [`Decision::ApprovedFiles`] must name only files
    /// of the item's change list (an empty set is a denial).
    pub fn decide(&self, id: &str, decision: Decision, by: &str) -> Result<(), BrokerError> {
        let seq = {
            let st = lock(&self.inner.state);
            let Some((seq, entry)) = st.pending.iter().find(|(_, e)| e.item.id == id) else {
                return Err(BrokerError::NotPending(clip(id)));
            };
            let decision = &decision;
            match decision {
                Decision::TimedOut => {
                    return Err(BrokerError::Invalid(
                        "a timeout is not a decision one can give".into(),
                    ))
                }
                Decision::ApprovedFiles { files } => {
                    let Some(changes) = entry.item.crossing.changes() else {
                        return Err(BrokerError::Invalid(
                            "only a change list can be approved file by file".into(),
                        ));
                    };
                    let listed: BTreeSet<&str> = changes.paths().collect();
                    if let Some(bad) = files.iter().find(|f| !listed.contains(f.as_str())) {
                        return Err(BrokerError::Invalid(format!(
                            "{} is not in the change list",
                            clip(bad)
                        )));
                    }
                }
                Decision::Approved | Decision::Denied { .. } => {}
            }
            *seq
        };
        let decision = match decision {
            Decision::ApprovedFiles { files } if files.is_empty() => {
                Decision::deny("no files were approved")
            }
            Decision::Denied { reason } => Decision::Denied {
                reason: clip(&reason),
            },
            d => d,
        };
        self.finish(seq, decision, by).map(|_| ())
    }

    /// Removes item `seq`, records the decision and wakes its submitter; the decision as
    /// recorded (an approval the audit log could not record becomes a denial).
    fn finish(&self, seq: u64, decision: Decision, by: &str) -> Result<Decision, BrokerError> {
        let entry = lock(&self.inner.state)
            .pending
            .remove(&seq)
            .ok_or_else(|| BrokerError::NotPending(seq.to_string()))?;
        let d = self.record(entry.item, decision, by, entry.submitted);
        let _ = entry.tx.send((d.clone(), by.to_owned()));
        Ok(d)
    }

    /// Audits, adds to the history, bumps the generation; returns the effective decision.
    fn record(
        &self,
        item: PendingApproval,
        decision: Decision,
        by: &str,
        since: Instant,
    ) -> Decision {
        let by = clip(by);
        let now = SystemTime::now();
        let mut decision = decision;
        if let Some(audit) = &self.inner.config.audit {
            let rec = audit_record(&item, &decision, &by, now, since.elapsed());
            if let Err(e) = audit.append(&rec) {
                tracing::error!("{e}: {}", e_source(&e));
                if decision.is_approved() {
                    decision = Decision::deny("the audit log could not be written");
                    let rec = audit_record(&item, &decision, &by, now, since.elapsed());
                    let _ = audit.append(&rec);
                }
            }
        }
        {
            let mut st = lock(&self.inner.state);
            st.history.push_front(HistoryEntry {
                item,
                decision: decision.clone(),
                by,
                decided_at: now,
            });
            st.history.truncate(self.inner.config.history_len);
        }
        self.bump();
        decision
    }

    fn bump(&self) {
        self.inner.generation.send_modify(|g| *g += 1);
    }

    /// The waiting items, oldest first.
    pub fn pending(&self) -> Vec<PendingApproval> {
        lock(&self.inner.state)
            .pending
            .values()
            .map(|e| e.item.clone())
            .collect()
    }

    /// One waiting item.
    pub fn get(&self, id: &str) -> Option<PendingApproval> {
        lock(&self.inner.state)
            .pending
            .values()
            .find(|e| e.item.id == id)
            .map(|e| e.item.clone())
    }

    /// Decided items, newest first.
    pub fn history(&self) -> Vec<HistoryEntry> {
        lock(&self.inner.state).history.iter().cloned().collect()
    }

    /// Pending items, history and the generation they belong to.
    pub fn snapshot(&self) -> Snapshot {
        let st = lock(&self.inner.state);
        Snapshot {
            generation: *self.inner.generation.borrow(),
            pending: st.pending.values().map(|e| e.item.clone()).collect(),
            history: st.history.iter().cloned().collect(),
        }
    }

    /// A receiver whose value (the generation) changes whenever items arrive or are decided.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.generation.subscribe()
    }
}

fn e_source(e: &dyn std::error::Error) -> String {
    e.source().map(|s| s.to_string()).unwrap_or_default()
}

fn audit_record(
    item: &PendingApproval,
    decision: &Decision,
    by: &str,
    now: SystemTime,
    waited: Duration,
) -> AuditRecord {
    let (host_dir, changes, host, port) = match &item.crossing {
        Crossing::ShareChanges {
            host_dir, changes, ..
        } => (
            Some(host_dir.to_string_lossy().into_owned()),
            Some(changes.entries.len() + changes.omitted),
            None,
            None,
        ),
        Crossing::Egress { host, port, .. } => (None, None, Some(host.clone()), Some(*port)),
        // The tool and command are in the submission's context.
        Crossing::ToolCall { .. } => (None, None, None, None),
    };
    AuditRecord {
        ts: crate::time::rfc3339(now),
        id: item.id.clone(),
        kind: item.crossing.kind().to_owned(),
        sandbox: item.crossing.sandbox().to_owned(),
        context: item.context.clone(),
        host_dir,
        changes_hash: changes.map(|_| item.changes_hash.clone()),
        changes,
        host,
        port,
        decision: decision.as_str().to_owned(),
        approved_files: match decision {
            Decision::ApprovedFiles { files } => Some(files.iter().cloned().collect()),
            _ => None,
        },
        files_dropped: false,
        reason: match decision {
            Decision::Denied { reason } => Some(reason.clone()),
            _ => None,
        },
        by: by.to_owned(),
        waited_ms: waited.as_millis() as u64,
    }
}

/// Serialises a `SystemTime` as an RFC 3339 string.
pub(crate) mod rfc3339_serde {
    use std::time::SystemTime;

    pub(crate) fn serialize<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&crate::time::rfc3339(*t))
    }
}

#[cfg(test)]
mod tests;
