//! What would cross from a VM to the host, a crossing waiting for a person, and the decision.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::change::ChangeSet;

/// An effect that would cross from a sandbox to the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Crossing {
    /// Changes a sandbox made to its copy of a shared host directory.
    ShareChanges {
        /// The sandbox (VM) that made them, as the caller names it.
        sandbox: String,
        /// The host directory they would be written to.
        host_dir: PathBuf,
        /// What changed.
        changes: ChangeSet,
    },
    /// A network connection to a host that is not on the allow-list.
    Egress {
        /// The sandbox (VM) that wants to connect.
        sandbox: String,
        /// Host name or address.
        host: String,
        /// Port.
        port: u16,
    },
    /// An MCP tool call that a `tool`/`command` rule says to ask about, before it runs.
    ToolCall {
        /// The MCP session or sandbox it comes from.
        sandbox: String,
        /// The tool's name.
        tool: String,
        /// The command line it would run, when it runs one.
        command: Option<String>,
    },
}

impl Crossing {
    /// The sandbox the crossing comes from.
    pub fn sandbox(&self) -> &str {
        match self {
            Crossing::ShareChanges { sandbox, .. }
            | Crossing::Egress { sandbox, .. }
            | Crossing::ToolCall { sandbox, .. } => sandbox,
        }
    }

    /// `share_changes`, `egress` or `tool_call`.
    pub fn kind(&self) -> &'static str {
        match self {
            Crossing::ShareChanges { .. } => "share_changes",
            Crossing::Egress { .. } => "egress",
            Crossing::ToolCall { .. } => "tool_call",
        }
    }

    /// The change list, for a [`Crossing::ShareChanges`].
    pub fn changes(&self) -> Option<&ChangeSet> {
        match self {
            Crossing::ShareChanges { changes, .. } => Some(changes),
            Crossing::Egress { .. } | Crossing::ToolCall { .. } => None,
        }
    }

    /// One printable line: `sandbox vm-1 wants to write 3 changes to /home/me/src` or
    /// `sandbox vm-1 wants to connect to example.com:443`.
    pub fn headline(&self) -> String {
        use vmcp_sanitize::sanitize;
        match self {
            Crossing::ShareChanges {
                sandbox,
                host_dir,
                changes,
            } => {
                let n = changes.entries.len() + changes.omitted;
                format!(
                    "sandbox {} wants to write {n} change{} to {}",
                    sanitize(sandbox, 128),
                    if n == 1 { "" } else { "s" },
                    sanitize(&host_dir.to_string_lossy(), 512)
                )
            }
            Crossing::Egress {
                sandbox,
                host,
                port,
            } => format!(
                "sandbox {} wants to connect to {}:{port}",
                sanitize(sandbox, 128),
                sanitize(host, 256)
            ),
            Crossing::ToolCall {
                sandbox,
                tool,
                command,
            } => match command {
                Some(c) => format!(
                    "{} wants to call {} to run: {}",
                    sanitize(sandbox, 128),
                    sanitize(tool, 128),
                    sanitize(c, 512)
                ),
                None => format!(
                    "{} wants to call {}",
                    sanitize(sandbox, 128),
                    sanitize(tool, 128)
                ),
            },
        }
    }
}

/// A crossing waiting for a decision, as askers and the UI see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct PendingApproval {
    /// Unique within a broker's life, unguessable across lives (`a1f3…-7`).
    pub id: String,
    /// What would cross.
    pub crossing: Crossing,
    /// What caused it, when the caller said (a tool name, a command line); shown to people.
    pub context: Option<String>,
    /// When it was submitted.
    #[serde(serialize_with = "crate::broker::rfc3339_serde::serialize")]
    pub created_at: SystemTime,
    /// When it will be denied if nobody decides.
    #[serde(serialize_with = "crate::broker::rfc3339_serde::serialize")]
    pub expires_at: SystemTime,
    /// The change list's [`ChangeSet::hash`] (empty for egress).
    pub changes_hash: String,
}

/// How a crossing was decided.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "decision", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Decision {
    /// Everything may cross.
    Approved,
    /// Only these files of a change list may cross; the rest is discarded.
    ApprovedFiles {
        /// The approved paths (as in [`crate::FileChange::path`]).
        files: BTreeSet<String>,
    },
    /// Nothing crosses.
    Denied {
        /// Why, shown to the agent.
        reason: String,
    },
    /// Nobody decided in time: nothing crosses.
    TimedOut,
}

impl Decision {
    /// A denial with `reason`.
    pub fn deny(reason: impl Into<String>) -> Self {
        Decision::Denied {
            reason: reason.into(),
        }
    }

    /// Whether anything at all may cross.
    pub fn is_approved(&self) -> bool {
        match self {
            Decision::Approved => true,
            Decision::ApprovedFiles { files } => !files.is_empty(),
            Decision::Denied { .. } | Decision::TimedOut => false,
        }
    }

    /// Whether the file `path` of a change list may cross.
    pub fn approves_file(&self, path: &str) -> bool {
        match self {
            Decision::Approved => true,
            Decision::ApprovedFiles { files } => files.contains(path),
            Decision::Denied { .. } | Decision::TimedOut => false,
        }
    }

    /// The files to pass to [`ChangeSet::apply`]: `None` for all, `Some(set)` for a subset
    /// (empty when nothing is approved).
    pub fn file_selection(&self) -> Option<BTreeSet<String>> {
        match self {
            Decision::Approved => None,
            Decision::ApprovedFiles { files } => Some(files.clone()),
            Decision::Denied { .. } | Decision::TimedOut => Some(BTreeSet::new()),
        }
    }

    /// `approved`, `approved_files`, `denied` or `timed_out`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Decision::Approved => "approved",
            Decision::ApprovedFiles { .. } => "approved_files",
            Decision::Denied { .. } => "denied",
            Decision::TimedOut => "timed_out",
        }
    }

    /// A sentence for the agent's tool result, e.g. `denied by a person: not now` or
    /// `not approved within 120 s; denied`.
    pub fn message(&self, timeout: std::time::Duration) -> String {
        match self {
            Decision::Approved => "approved".into(),
            Decision::ApprovedFiles { files } => format!(
                "partly approved: {} file{} applied, the rest discarded",
                files.len(),
                if files.len() == 1 { "" } else { "s" }
            ),
            Decision::Denied { reason } if reason.is_empty() => "denied".into(),
            Decision::Denied { reason } => format!("denied: {reason}"),
            Decision::TimedOut => format!("not approved within {} s; denied", timeout.as_secs()),
        }
    }
}
