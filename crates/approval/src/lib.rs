//! The approval cliff: what a tool does inside its VM is free; what crosses to the host waits
//! for a person.
//!
//! This crate is the core of that line and its human interfaces, with no dependency on the CLI:
//!
//! - [`Policy`]: a TOML file (`default` plus `[[rule]]` tables matching `tool`, `command`,
//!   `path`, `host` globs, first match wins) that says whether a crossing is allowed, asked
//!   about or denied ([`Action`]).
//! - [`ChangeSet`]: the files a sandbox created, modified or deleted in its copy of a shared
//!   host directory, with sizes and short unified diffs, bounded, and a stable hash for the
//!   audit log; [`ChangeSet::apply`] copies an approved subset back, one file at a time
//!   atomically, refusing anything that would leave the host directory.
//! - [`Broker`]: holds [`PendingApproval`]s from any number of sandboxes, asks people through
//!   pluggable [`Asker`]s (the terminal, MCP elicitation, the web page), resolves each with a
//!   [`Decision`] or a timeout (denied), and writes every decision to the [`AuditLog`].
//! - [`TerminalAsker`]: a readable change list on the terminal, then y/n.
//! - [`ui::ApprovalUi`]: the local approval page and its JSON API (loopback only, token in the URL,
//!   `Host`/`Origin` checked).
//!
//! Platforms: everything here is portable Rust; the audit log's 0600 mode is applied on Unix.
//!
//! ```
//! use vmcp_approval::{Action, Policy, Subject};
//! let policy = Policy::from_toml_str(r#"
//!     default = "ask"
//!     [[rule]]
//!     action = "allow"
//!     host = "*.pypi.org"
//!     [[rule]]
//!     action = "deny"
//!     path = "**/.git/**"
//! "#).unwrap();
//! assert_eq!(policy.decide(&Subject::host("files.pypi.org")), Action::Allow);
//! assert_eq!(policy.decide(&Subject::path("/src/.git/config")), Action::Deny);
//! assert_eq!(policy.decide(&Subject::path("/src/main.rs")), Action::Ask);
//! ```

pub mod audit;
pub mod broker;
pub mod change;
pub mod crossing;
mod diff;
mod glob;
pub mod policy;
pub mod terminal;
mod time;
pub mod ui;

pub use audit::{AuditError, AuditLog, AuditRecord};
pub use broker::{Asker, Broker, BrokerConfig, BrokerError, HistoryEntry, Snapshot, SubmitOptions};
pub use change::{
    ApplyError, ApplyReport, ChangeError, ChangeKind, ChangeLimits, ChangeSet, Diff, FileChange,
    Refused,
};
pub use crossing::{Crossing, Decision, PendingApproval};
pub use policy::{Action, Policy, PolicyError, Rule, Subject};
pub use terminal::TerminalAsker;

/// Entry points for the fuzz targets in `fuzz/` (not a stable API).
#[doc(hidden)]
pub mod fuzzing {
    /// The unified diff of `old` → `new` cut at `max_bytes`: `(text, truncated)`.
    pub fn unified(old: &str, new: &str, max_bytes: usize) -> (String, bool) {
        crate::diff::unified(old, new, max_bytes)
    }

    /// Whether `pattern` (a policy glob) matches `text`; `None` when the pattern is invalid.
    pub fn glob_matches(pattern: &str, text: &str) -> Option<bool> {
        crate::glob::Glob::new(pattern)
            .ok()
            .map(|g| g.matches(text))
    }
}
