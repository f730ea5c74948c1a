//! Writable shares under an approval policy: the guest's result waits in a private staging
//! directory until it is approved; only then does it reach HOST.
//!
//! Flow ([`settle`]), after the agent exported a share's changes as a tar:
//! 1. [`stage`]: a private copy of HOST with the guest's tar applied by the hostile-archive
//!    rules (per-OS module).
//! 2. `vmcp_approval::ChangeSet::between(HOST, staging)`: files created, modified, deleted,
//!    with sizes and small text diffs; symlinks and special files are listed as refused.
//! 3. The policy's `path` rules per file (the host path): `deny` files are discarded, `allow`
//!    files pass, `ask` files go to the broker as one pending approval (approve all, some
//!    files, deny, or time out: denied).
//! 4. `ChangeSet::apply` writes the passed files into HOST one at a time (temporary file in the
//!    same directory, then rename), refusing paths that would leave HOST.
//!
//! When every listed file is allowed, the guest's tar is applied to HOST as without a policy
//! (symlinks and directory modes included): `allow` keeps today's behaviour. Dropping the
//! staging directory discards whatever was not applied.

#[cfg(unix)]
#[path = "share_gate/fs_unix.rs"]
mod fs;
#[cfg(not(unix))]
#[path = "share_gate/fs_other.rs"]
mod fs;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use vmcp_approval::{Action, Asker, ChangeLimits, ChangeSet, Crossing, Subject, SubmitOptions};

use crate::approvals::Approvals;

pub use fs::stage;

/// Why a share's changes could not be staged.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StageError {
    /// The guest's archive was refused.
    #[cfg(unix)]
    #[error("the guest's changes were refused")]
    Archive(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// Reading or writing a tree failed.
    #[cfg(unix)]
    #[error("cannot copy {0}")]
    Io(String, #[source] std::io::Error),
    /// The tree has something we do not accept.
    #[error("{0}")]
    Refused(String),
}

/// What became of one share's changes.
#[derive(Debug, Default)]
pub struct ShareReport {
    /// The host directory.
    pub host: PathBuf,
    /// Files written into (or deleted from) HOST.
    pub applied: Vec<String>,
    /// Files not applied, with the reason (denied by a rule or a person, timed out, unsafe).
    pub discarded: Vec<(String, String)>,
    /// The decision about the asked part, as a sentence (`approved`, `denied: ...`,
    /// `not approved within 120 s; denied`), when a person was asked.
    pub decision: Option<String>,
}

impl ShareReport {
    /// One line for the user or the agent.
    pub fn summary(&self) -> String {
        let mut s = format!("changes to {}: ", self.host.display());
        if self.applied.is_empty() && self.discarded.is_empty() {
            s.push_str("none");
            return s;
        }
        if let Some(d) = &self.decision {
            s.push_str(d);
            s.push_str("; ");
        }
        s.push_str(&format!("{} applied", self.applied.len()));
        if !self.applied.is_empty() {
            s.push_str(&format!(" ({})", list(&self.applied)));
        }
        if !self.discarded.is_empty() {
            let names: Vec<String> = self
                .discarded
                .iter()
                .map(|(p, why)| format!("{p}: {why}"))
                .collect();
            s.push_str(&format!(
                ", {} discarded ({})",
                self.discarded.len(),
                list(&names)
            ));
        }
        s
    }
}

fn list(items: &[String]) -> String {
    const SHOWN: usize = 8;
    let mut v: Vec<&str> = items.iter().take(SHOWN).map(String::as_str).collect();
    let more = items.len().saturating_sub(SHOWN);
    let tail = format!("and {more} more");
    if more > 0 {
        v.push(&tail);
    }
    v.join(", ")
}

/// What caused a share's changes: the sandbox's name and, for MCP, the tool call.
#[derive(Clone, Default)]
pub struct Origin {
    /// The sandbox (VM) name.
    pub sandbox: String,
    /// What ran (a command line or a tool call), shown to people and logged.
    pub context: Option<String>,
    /// Askers for this submission (the MCP client's elicitation).
    pub askers: Vec<Arc<dyn Asker>>,
}

impl std::fmt::Debug for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Origin")
            .field("sandbox", &self.sandbox)
            .field("context", &self.context)
            .field(
                "askers",
                &self.askers.iter().map(|a| a.name()).collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// Decides about and applies the guest's change tar `tar` for HOST directory `host` (see the
/// module docs). `legacy_apply` applies the tar to HOST directly (today's copy-back), used
/// when everything is allowed.
pub async fn settle(
    approvals: &Approvals,
    host: &Path,
    tar: &Path,
    origin: Origin,
    legacy_apply: impl FnOnce(&Path, &Path) -> anyhow::Result<()> + Send + 'static,
) -> anyhow::Result<ShareReport> {
    let staging = tempfile::Builder::new()
        .prefix("vmcp-staging-")
        .tempdir()
        .context("cannot create a staging directory for the share's changes")?;
    let (host2, tar2, stage_dir) = (
        host.to_path_buf(),
        tar.to_path_buf(),
        staging.path().to_path_buf(),
    );
    let (set, notes) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let notes = stage(&host2, &tar2, &stage_dir)?;
        let set = ChangeSet::between(&host2, &stage_dir, &ChangeLimits::default())?;
        Ok((set, notes))
    })
    .await
    .context("the staging task failed")?
    .with_context(|| format!("cannot stage the changes to {}", host.display()))?;
    for n in notes {
        tracing::info!(share = %host.display(), "{n}");
    }
    let mut report = ShareReport {
        host: host.to_path_buf(),
        ..ShareReport::default()
    };
    if set.is_empty() {
        return Ok(report);
    }
    // The policy per file.
    let mut pass: BTreeSet<String> = BTreeSet::new();
    let mut ask: BTreeSet<String> = BTreeSet::new();
    for e in &set.entries {
        let subject = Subject::path(host.join(&e.path).display().to_string());
        match approvals.decide(&subject) {
            (Action::Allow, _) => {
                pass.insert(e.path.clone());
            }
            (Action::Deny, why) => report
                .discarded
                .push((e.path.clone(), format!("denied by {why}"))),
            _ => {
                ask.insert(e.path.clone());
            }
        }
    }
    if set.omitted > 0 {
        report.discarded.push((
            format!("{} more", set.omitted),
            "over the change-list limit".into(),
        ));
    }
    for r in &set.refused {
        report.discarded.push((r.path.clone(), r.reason.clone()));
    }
    if ask.is_empty() && report.discarded.is_empty() {
        // Everything allowed: today's copy-back, symlinks and modes included.
        let (h, t) = (host.to_path_buf(), tar.to_path_buf());
        tokio::task::spawn_blocking(move || legacy_apply(&h, &t))
            .await
            .context("the copy-back task failed")??;
        report.applied = set.paths().map(str::to_owned).collect();
        return Ok(report);
    }
    if !ask.is_empty() {
        let mut asked = set.clone();
        asked.entries.retain(|e| ask.contains(&e.path));
        let mut opts = SubmitOptions::default();
        if let Some(c) = &origin.context {
            opts = opts.with_context(c.clone());
        }
        for a in origin.askers {
            opts = opts.with_asker(a);
        }
        let decision = approvals
            .broker()
            .submit_with(
                Crossing::ShareChanges {
                    sandbox: origin.sandbox.clone(),
                    host_dir: host.to_path_buf(),
                    changes: asked,
                },
                opts,
            )
            .await;
        let sentence = decision.message(approvals.broker().timeout());
        for p in &ask {
            if decision.approves_file(p) {
                pass.insert(p.clone());
            } else {
                report.discarded.push((p.clone(), sentence.clone()));
            }
        }
        report.decision = Some(sentence);
    }
    if !pass.is_empty() {
        let (h, s) = (host.to_path_buf(), staging.path().to_path_buf());
        let applied = tokio::task::spawn_blocking(move || set.apply(&h, &s, Some(&pass)))
            .await
            .context("the copy-back task failed")?
            .with_context(|| format!("cannot apply the changes to {}", host.display()))?;
        report.applied = applied.applied;
        for r in applied.refused {
            report.discarded.push((r.path, r.reason));
        }
    }
    report.discarded.sort();
    Ok(report)
}

#[cfg(all(test, unix))]
#[path = "share_gate/tests.rs"]
mod tests;
