//! The approval flags of `vmcp run`, `vmcp mcp serve` and `vmcp mcp wrap`, and what they set
//! up: the policy, the broker (with its audit log and timeout), the approval page, and the
//! gates that hold what would cross from a VM to the host (docs/approval.md).
//!
//! - Without `--policy` and `--approval-ui` nothing is gated: today's behaviour.
//! - `--approval-ui` without `--policy` gates everything (`default = "ask"`).
//! - Askers: the page when `--approval-ui` is given; otherwise, in `vmcp run`, the terminal
//!   when stdin is one (else every question is denied unasked); in `mcp serve`/`wrap`, MCP
//!   elicitation when the client supports it (added per call), else denied with the reason.
//! - Unanswered questions are denied after `--approval-timeout`; every decision is appended to
//!   the audit log (`--audit-log`, default `approvals.jsonl` in vmcp's state directory).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use vmcp_approval::{
    Action, Asker, AuditLog, Broker, BrokerConfig, Crossing, Decision, PendingApproval, Policy,
    Subject,
};

/// The approval flags.
#[derive(clap::Args, Debug, Clone)]
pub struct ApprovalArgs {
    /// Approval policy (TOML: `default` and `[[rule]]` tables matching tool, command, path,
    /// host; first match wins; see docs/approval.md). Without it nothing is gated.
    #[arg(long, value_name = "FILE")]
    pub policy: Option<PathBuf>,
    /// Serve the approval page and its JSON API on this loopback address (e.g.
    /// 127.0.0.1:8470; port 0 picks one); its URL with a token is printed at start.
    #[arg(long, value_name = "ADDR")]
    pub approval_ui: Option<SocketAddr>,
    /// Deny what nobody approved within this many seconds.
    #[arg(long, value_name = "SECS", default_value = "120", value_parser = parse_timeout)]
    pub approval_timeout: Duration,
    /// Append every decision to this JSON-lines file (default: approvals.jsonl in vmcp's
    /// state directory).
    #[arg(long, value_name = "FILE")]
    pub audit_log: Option<PathBuf>,
}

fn parse_timeout(s: &str) -> Result<Duration, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v <= 86_400.0 => Ok(Duration::from_secs_f64(v)),
        _ => Err(format!(
            "expected seconds between 0 and 86400 (such as 120 or 0.5), got {s:?}"
        )),
    }
}

/// Where the audit log goes by default: `$VMCP_STATE_DIR`, else `$XDG_STATE_HOME/vmcp`, else
/// `~/.local/state/vmcp` (`%LOCALAPPDATA%\vmcp` on Windows).
fn default_audit_path() -> anyhow::Result<PathBuf> {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    let dir = var("VMCP_STATE_DIR")
        .or_else(|| var("XDG_STATE_HOME").map(|d| d.join("vmcp")))
        .or_else(|| var("LOCALAPPDATA").map(|d| d.join("vmcp")))
        .or_else(|| var("HOME").map(|d| d.join(".local/state/vmcp")))
        .context("cannot find a state directory for the audit log; pass --audit-log FILE")?;
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir.join("approvals.jsonl"))
}

/// An always-denying asker with a reason (nobody can be asked).
struct NobodyToAsk(String);

#[async_trait::async_trait]
impl Asker for NobodyToAsk {
    fn name(&self) -> &str {
        "nobody"
    }
    async fn ask(&self, _pending: &PendingApproval) -> Option<Decision> {
        Some(Decision::deny(self.0.clone()))
    }
}

/// The approval machinery of one vmcp process.
pub struct Approvals {
    policy: Arc<Policy>,
    broker: Broker,
    ui: Option<vmcp_approval::ui::ApprovalUi>,
    frontend: Frontend,
}

impl std::fmt::Debug for Approvals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Approvals")
            .field("ui", &self.ui.as_ref().map(|u| u.local_addr()))
            .finish_non_exhaustive()
    }
}

/// Where a vmcp process can ask a person.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frontend {
    /// `vmcp run`: the terminal (when stdin is one).
    Terminal,
    /// `vmcp mcp serve`/`wrap`: stdin/stdout carry MCP; elicitation is added per call.
    Mcp,
}

impl Approvals {
    /// Sets up what `args` ask for; `None` when nothing is gated. A bad policy file is an
    /// error naming the line and the reason.
    pub async fn start(args: &ApprovalArgs, frontend: Frontend) -> anyhow::Result<Option<Self>> {
        let policy = match (&args.policy, &args.approval_ui) {
            (None, None) => return Ok(None),
            (Some(p), _) => Policy::load(p)
                .with_context(|| format!("cannot use the approval policy {}", p.display()))?,
            (None, Some(_)) => Policy::with_default(Action::Ask),
        };
        let audit_path = match &args.audit_log {
            Some(p) => p.clone(),
            None => default_audit_path()?,
        };
        let audit = AuditLog::open(&audit_path)
            .with_context(|| format!("cannot open the audit log {}", audit_path.display()))?;
        tracing::info!(audit_log = %audit_path.display(), "approval decisions are logged");
        let broker = Broker::new(
            BrokerConfig::default()
                .with_timeout(args.approval_timeout)
                .with_audit(Arc::new(audit)),
        );
        let ui = match args.approval_ui {
            Some(addr) => {
                let ui = vmcp_approval::ui::ApprovalUi::start(addr, broker.clone())
                    .await
                    .context("cannot start the approval page")?;
                eprintln!("vmcp: approval page: {}", ui.url());
                Some(ui)
            }
            None => None,
        };
        if ui.is_none() && frontend == Frontend::Terminal {
            // Asks when stdin is a terminal, denies unasked otherwise.
            let terminal = vmcp_approval::TerminalAsker::stdio();
            broker.add_asker(Arc::new(terminal));
        }
        Ok(Some(Approvals {
            policy: Arc::new(policy),
            broker,
            ui,
            frontend,
        }))
    }

    /// The policy.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The broker.
    pub fn broker(&self) -> &Broker {
        &self.broker
    }

    /// Whether a person can be asked without per-call askers (the page or the terminal).
    pub fn has_ui(&self) -> bool {
        self.ui.is_some()
    }

    /// Extra askers for one submission from an MCP call: the client's elicitation when it
    /// has one; when nobody at all can be asked, an immediate denial saying so.
    pub fn mcp_askers(&self, elicit: Option<Arc<dyn Asker>>) -> Vec<Arc<dyn Asker>> {
        match (elicit, self.has_ui()) {
            (Some(a), _) => vec![a],
            (None, true) => Vec::new(),
            (None, false) => vec![Arc::new(NobodyToAsk(
                "nobody to ask: the MCP client does not support elicitation and vmcp runs \
                 without --approval-ui"
                    .into(),
            ))],
        }
    }

    /// Askers for crossings that no MCP call caused (egress): when nobody at all can be
    /// asked (an MCP server without the page), an immediate denial saying so.
    pub(crate) fn fallback_askers(&self) -> Vec<Arc<dyn Asker>> {
        if self.frontend == Frontend::Mcp && !self.has_ui() {
            vec![Arc::new(NobodyToAsk(
                "nobody to ask: vmcp runs as an MCP server without --approval-ui".into(),
            ))]
        } else {
            Vec::new()
        }
    }

    /// The command a crossing comes from, for the pending approval's description.
    pub(crate) fn command_name(&self) -> &'static str {
        match self.frontend {
            Frontend::Terminal => "vmcp run",
            Frontend::Mcp => "vmcp mcp wrap",
        }
    }

    /// The policy's word on a subject, with the rule that said it.
    pub fn decide(&self, subject: &Subject) -> (Action, String) {
        let rule = self.policy.matching_rule(subject);
        let action = rule.map_or(self.policy.default, |r| r.action);
        let why = rule.map_or_else(
            || format!("the policy's default ({action})"),
            vmcp_approval::Rule::describe,
        );
        (action, why)
    }

    /// An egress gate for the VM named `sandbox`.
    pub fn egress_gate(&self, sandbox: &str) -> vmcp_vm::EgressGate {
        vmcp_vm::EgressGate {
            gate: Arc::new(EgressGate {
                policy: self.policy.clone(),
                broker: self.broker.clone(),
                sandbox: sandbox.to_string(),
                askers: self.fallback_askers(),
            }),
            // A little longer than the broker's own timeout, so the broker's decision
            // (timed out) is what the guest sees.
            wait: self.broker.timeout() + Duration::from_secs(2),
        }
    }
}

/// Egress to hosts off the allow list: the policy's `host` rules, then the broker.
struct EgressGate {
    policy: Arc<Policy>,
    broker: Broker,
    sandbox: String,
    askers: Vec<Arc<dyn Asker>>,
}

impl vmcp_egress::Gate for EgressGate {
    fn decide(
        &self,
        target: &vmcp_egress::Target,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send + 'static>>
    {
        // Names as they are, addresses without brackets (what a `host` glob is written as).
        let host = match &target.host {
            vmcp_egress::Host::Ip(a) => a.to_string(),
            other => other.to_string(),
        };
        let port = target.port;
        let subject = Subject::host(host.clone());
        let rule = self.policy.matching_rule(&subject);
        let action = rule.map_or(self.policy.default, |r| r.action);
        let why = rule.map_or_else(
            || "the policy's default".to_string(),
            vmcp_approval::Rule::describe,
        );
        let broker = self.broker.clone();
        let sandbox = self.sandbox.clone();
        let mut opts = vmcp_approval::SubmitOptions::default();
        for a in &self.askers {
            opts = opts.with_asker(a.clone());
        }
        Box::pin(async move {
            match action {
                Action::Allow => Ok(()),
                Action::Deny => Err(format!("denied by {why}")),
                _ => {
                    let d = broker
                        .submit_with(
                            Crossing::Egress {
                                sandbox,
                                host,
                                port,
                            },
                            opts,
                        )
                        .await;
                    if d.is_approved() {
                        Ok(())
                    } else {
                        Err(d.message(broker.timeout()))
                    }
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_parse() {
        assert_eq!(parse_timeout("0.5").unwrap(), Duration::from_millis(500));
        for bad in ["0", "-1", "nan", "1e9", "x"] {
            assert!(parse_timeout(bad).is_err(), "{bad}");
        }
    }
}
