//! `vmcp mcp serve` under an approval policy: `tool`/`command` rules for tool calls, and MCP
//! elicitation as a way to ask the client's user.
//!
//! A tool call is checked against the rules that name a `tool` or `command` (the policy's
//! `default` does not apply to tool calls: what a tool does inside its VM is free; only rules
//! written for tool calls stop them). `deny` answers a tool error naming the rule; `ask` holds
//! the call as a pending approval (the client's elicitation when it has it, the approval page,
//! else denied at once saying nobody can be asked), then runs it or answers a tool error
//! saying it was denied or timed out.

use std::sync::Arc;

use serde_json::{Map, Value};
use vmcp_approval::{Action, Asker, Crossing, Decision, PendingApproval, Subject, SubmitOptions};
use vmcp_mcp_server::elicit::{Answer, Elicitor};
use vmcp_mcp_server::tool::{BoxFuture, CallContext, ToolDef, ToolOutput, ToolSet};

use crate::approvals::Approvals;

/// Longest question text sent to the client.
const MAX_QUESTION: usize = 16 * 1024;

/// Asks through the MCP client's elicitation (form mode): the crossing described as text, a
/// yes/no field.
pub struct ElicitAsker(pub Elicitor);

#[async_trait::async_trait]
impl Asker for ElicitAsker {
    fn name(&self) -> &str {
        "elicitation"
    }

    async fn ask(&self, pending: &PendingApproval) -> Option<Decision> {
        let mut text = vmcp_approval::TerminalAsker::describe(pending, true);
        if text.len() > MAX_QUESTION {
            let mut cut = MAX_QUESTION;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
            text.push_str("\n[... cut; the approval page shows everything]");
        }
        let schema = serde_json::json!({
            "type": "object",
            "properties": {
                "approve": {
                    "type": "boolean",
                    "title": "Approve",
                    "description": "Let this cross from the sandbox to the host",
                    "default": false
                }
            },
            "required": ["approve"]
        });
        match self.0.ask(&text, schema).await {
            Ok(Answer::Accept(content)) => match content.get("approve") {
                Some(Value::Bool(true)) => Some(Decision::Approved),
                _ => Some(Decision::deny("denied in the MCP client")),
            },
            Ok(Answer::Decline) => Some(Decision::deny("declined in the MCP client")),
            Ok(Answer::Cancel) => Some(Decision::deny("dismissed in the MCP client")),
            Ok(_) => None,
            Err(e) => {
                tracing::info!("cannot ask through elicitation: {e}");
                None
            }
        }
    }
}

/// The command line a sandbox tool call would run (`command`, or `argv` joined by spaces).
fn command_of(args: &Map<String, Value>) -> Option<String> {
    match (args.get("command"), args.get("argv")) {
        (Some(Value::String(c)), _) => Some(c.clone()),
        (_, Some(Value::Array(a))) => Some(
            a.iter()
                .map(|v| v.as_str().unwrap_or("?"))
                .collect::<Vec<_>>()
                .join(" "),
        ),
        _ => None,
    }
}

/// A tool set whose calls pass the policy's tool/command rules first.
pub struct GatedTools {
    inner: Arc<dyn ToolSet>,
    approvals: Arc<Approvals>,
}

impl GatedTools {
    /// Gates `inner` with `approvals`.
    pub fn new(inner: Arc<dyn ToolSet>, approvals: Arc<Approvals>) -> Self {
        GatedTools { inner, approvals }
    }
}

impl ToolSet for GatedTools {
    fn tools(&self) -> Vec<ToolDef> {
        self.inner.tools()
    }

    fn call(
        &self,
        name: &str,
        args: Map<String, Value>,
        ctx: CallContext,
    ) -> BoxFuture<ToolOutput> {
        let command = command_of(&args);
        let mut subject = Subject::default().with_tool(name);
        if let Some(c) = &command {
            subject = subject.with_command(c.clone());
        }
        let rule = self.approvals.policy().matching_rule(&subject).cloned();
        let Some(rule) = rule else {
            return self.inner.call(name, args, ctx);
        };
        match rule.action {
            Action::Allow => self.inner.call(name, args, ctx),
            Action::Deny => {
                let msg = format!(
                    "{name} was not run: denied by the approval policy's {}",
                    rule.describe()
                );
                Box::pin(async move { ToolOutput::error(msg) })
            }
            _ => {
                let inner = self.inner.clone();
                let approvals = self.approvals.clone();
                let name = name.to_string();
                Box::pin(async move {
                    let elicit: Option<Arc<dyn Asker>> = ctx
                        .elicit
                        .clone()
                        .map(|e| Arc::new(ElicitAsker(e)) as Arc<dyn Asker>);
                    let mut opts = SubmitOptions::default().with_context(match &command {
                        Some(c) => format!("tool {name}: {c}"),
                        None => format!("tool {name}"),
                    });
                    for a in approvals.mcp_askers(elicit) {
                        opts = opts.with_asker(a);
                    }
                    let session = ctx.session.as_deref().unwrap_or("stateless").to_string();
                    let crossing = Crossing::ToolCall {
                        sandbox: format!("MCP session {session}"),
                        tool: name.clone(),
                        command,
                    };
                    let decision = tokio::select! {
                        d = approvals.broker().submit_with(crossing, opts) => d,
                        () = ctx.cancel.cancelled() => Decision::deny("the call was cancelled"),
                    };
                    if decision.is_approved() {
                        inner.call(&name, args, ctx).await
                    } else {
                        ToolOutput::error(format!(
                            "{name} was not run: {} (asked because of the approval policy's {})",
                            decision.message(approvals.broker().timeout()),
                            rule.describe()
                        ))
                    }
                })
            }
        }
    }

    fn session_ended(&self, session: &Arc<str>) {
        self.inner.session_ended(session);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_of_sandbox_calls() {
        let a = |v: Value| v.as_object().cloned().unwrap();
        assert_eq!(
            command_of(&a(serde_json::json!({"command": "rm -rf /x"}))).as_deref(),
            Some("rm -rf /x")
        );
        assert_eq!(
            command_of(&a(serde_json::json!({"argv": ["git", "push"]}))).as_deref(),
            Some("git push")
        );
        assert_eq!(command_of(&a(serde_json::json!({"id": "x"}))), None);
    }
}
