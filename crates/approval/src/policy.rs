//! The approval policy: which crossings from a VM to the host are allowed, asked about or denied.
//!
//! ```toml
//! default = "ask"            # allow | ask | deny, when no rule matches (required)
//!
//! [[rule]]
//! action = "allow"
//! host = "*.pypi.org"        # network egress to these names goes through
//!
//! [[rule]]
//! action = "deny"
//! path = "**/.git/**"        # nothing under a .git directory is ever copied back
//!
//! [[rule]]
//! action = "allow"
//! tool = "run"
//! command = "cargo *"        # all keys given must match (AND)
//! ```
//!
//! Rules are tried in file order and the **first rule whose globs all match wins**. A rule needs
//! an `action` and at least one of `tool`, `command`, `path`, `host`. A rule key names a property
//! of the [`Subject`]; when the subject does not have that property (an egress crossing has no
//! `path`) the rule does not match. Globs: `*` (not across `/`), `**` (across `/`), `?`, `\`
//! escapes (see the glob module); `host` is matched ASCII case-insensitively.
//!
//! Unknown keys, a missing `default`, a rule without globs, an empty or over-long glob are
//! refused when the file is loaded, with the line and the reason, so a typo never silently
//! widens what is allowed.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::glob::Glob;

/// Longest glob accepted in a policy file, in bytes.
pub const MAX_GLOB_LEN: usize = 1024;
/// Most rules accepted in one policy file.
pub const MAX_RULES: usize = 10_000;
/// Largest policy file read, in bytes.
pub const MAX_POLICY_BYTES: u64 = 1 << 20;
/// Longest subject field matched, in bytes; a longer field (which only a hostile peer sends)
/// matches no rule, so the `default` applies.
pub const MAX_SUBJECT_LEN: usize = 4096;

/// What happens to a crossing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Crosses without asking.
    Allow,
    /// Held until a person decides (or the timeout denies it).
    Ask,
    /// Refused without asking.
    Deny,
}

impl Action {
    /// `allow`, `ask` or `deny`.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Ask => "ask",
            Action::Deny => "deny",
        }
    }
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a policy is asked about. Every field is optional; a rule matches only if every glob it
/// has matches the corresponding field, and a missing field matches no glob.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Subject {
    /// The MCP tool (or `vmcp` subcommand) that caused the crossing, e.g. `run`.
    pub tool: Option<String>,
    /// The command line the tool ran, joined with spaces.
    pub command: Option<String>,
    /// The host path a change would touch (absolute, `/`-separated).
    pub path: Option<String>,
    /// The network host name or address a connection goes to.
    pub host: Option<String>,
}

impl Subject {
    /// A subject with only a host path.
    pub fn path(path: impl Into<String>) -> Self {
        Subject {
            path: Some(path.into()),
            ..Subject::default()
        }
    }

    /// A subject with only a network host.
    pub fn host(host: impl Into<String>) -> Self {
        Subject {
            host: Some(host.into()),
            ..Subject::default()
        }
    }

    /// Sets the tool.
    pub fn with_tool(mut self, tool: impl Into<String>) -> Self {
        self.tool = Some(tool.into());
        self
    }

    /// Sets the command.
    pub fn with_command(mut self, command: impl Into<String>) -> Self {
        self.command = Some(command.into());
        self
    }

    /// Sets the host path.
    pub fn with_path(mut self, path: impl Into<String>) -> Self {
        self.path = Some(path.into());
        self
    }

    /// Sets the network host.
    pub fn with_host(mut self, host: impl Into<String>) -> Self {
        self.host = Some(host.into());
        self
    }
}

/// One `[[rule]]` of a policy, compiled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// What the rule decides.
    pub action: Action,
    tool: Option<Glob>,
    command: Option<Glob>,
    path: Option<Glob>,
    host: Option<Glob>,
    /// 1-based line of the `[[rule]]` header in the file, for messages.
    pub line: usize,
}

impl Rule {
    /// Whether every glob of this rule matches `s`.
    pub fn matches(&self, s: &Subject) -> bool {
        fn one(g: &Option<Glob>, v: &Option<String>, fold: bool) -> bool {
            let Some(g) = g else { return true };
            let Some(v) = v else { return false };
            if v.len() > MAX_SUBJECT_LEN {
                return false;
            }
            if fold {
                g.matches(&v.to_ascii_lowercase())
            } else {
                g.matches(v)
            }
        }
        one(&self.tool, &s.tool, false)
            && one(&self.command, &s.command, false)
            && one(&self.path, &s.path, false)
            && one(&self.host, &s.host, true)
    }

    /// The rule written back as a short human-readable description, e.g.
    /// `rule at line 7 (deny path "**/.git/**")`.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        for (k, g) in [
            ("tool", &self.tool),
            ("command", &self.command),
            ("path", &self.path),
            ("host", &self.host),
        ] {
            if let Some(g) = g {
                parts.push(format!("{k} {:?}", g.as_str()));
            }
        }
        format!(
            "rule at line {} ({} {})",
            self.line,
            self.action,
            parts.join(" ")
        )
    }
}

/// A loaded policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// What applies when no rule matches.
    pub default: Action,
    /// The rules, in file order.
    pub rules: Vec<Rule>,
}

/// A policy file that could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// The file could not be read.
    #[error("cannot read the policy file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is larger than [`MAX_POLICY_BYTES`].
    #[error("the policy file {path} is larger than {MAX_POLICY_BYTES} bytes")]
    TooLarge {
        /// The file.
        path: PathBuf,
    },
    /// The text is not a valid policy.
    #[error("{}line {line}: {reason}", origin.as_ref().map(|p| format!("{}: ", p.display())).unwrap_or_default())]
    Invalid {
        /// The file, when it came from one.
        origin: Option<PathBuf>,
        /// 1-based line of the problem.
        line: usize,
        /// What is wrong and, where it helps, what to write instead.
        reason: String,
    },
}

impl PolicyError {
    /// The 1-based line of an invalid policy, if that is what this error is.
    pub fn line(&self) -> Option<usize> {
        match self {
            PolicyError::Invalid { line, .. } => Some(*line),
            PolicyError::Read { .. } | PolicyError::TooLarge { .. } => None,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    default: Option<toml::Spanned<Action>>,
    #[serde(default)]
    rule: Vec<toml::Spanned<RawRule>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    action: Option<Action>,
    tool: Option<toml::Spanned<String>>,
    command: Option<toml::Spanned<String>>,
    path: Option<toml::Spanned<String>>,
    host: Option<toml::Spanned<String>>,
}

fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()
        .get(..end)
        .map(|b| b.iter().filter(|c| **c == b'\n').count())
        .unwrap_or(0)
        + 1
}

impl Policy {
    /// A policy with no rules: `default` for everything.
    pub fn with_default(default: Action) -> Self {
        Policy {
            default,
            rules: Vec::new(),
        }
    }

    /// Reads and parses a policy file.
    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        use std::io::Read;
        let file = std::fs::File::open(path).map_err(|source| PolicyError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut text = String::new();
        file.take(MAX_POLICY_BYTES + 1)
            .read_to_string(&mut text)
            .map_err(|source| PolicyError::Read {
                path: path.to_owned(),
                source,
            })?;
        if text.len() as u64 > MAX_POLICY_BYTES {
            return Err(PolicyError::TooLarge {
                path: path.to_owned(),
            });
        }
        Self::parse(&text, Some(path))
    }

    /// Parses a policy from TOML text.
    pub fn from_toml_str(text: &str) -> Result<Self, PolicyError> {
        Self::parse(text, None)
    }

    fn parse(text: &str, origin: Option<&Path>) -> Result<Self, PolicyError> {
        let invalid = |line: usize, reason: String| PolicyError::Invalid {
            origin: origin.map(Path::to_owned),
            line,
            reason,
        };
        let raw: RawPolicy = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| line_of(text, s.start)).unwrap_or(1);
            // The library's message, without its own multi-line excerpt.
            let reason = e.message().trim().to_owned();
            invalid(line, reason)
        })?;
        let Some(default) = raw.default else {
            return Err(invalid(
                1,
                "no `default`: write `default = \"allow\"`, `\"ask\"` or `\"deny\"` at the top"
                    .into(),
            ));
        };
        if raw.rule.len() > MAX_RULES {
            return Err(invalid(1, format!("more than {MAX_RULES} rules")));
        }
        let mut rules = Vec::with_capacity(raw.rule.len());
        for spanned in raw.rule {
            let line = line_of(text, spanned.span().start);
            let r = spanned.into_inner();
            let Some(action) = r.action else {
                return Err(invalid(
                    line,
                    "this rule has no `action` (allow, ask or deny)".into(),
                ));
            };
            let compile = |g: Option<toml::Spanned<String>>,
                           key: &str|
             -> Result<Option<Glob>, PolicyError> {
                let Some(g) = g else { return Ok(None) };
                let gline = line_of(text, g.span().start);
                let s = g.into_inner();
                if s.is_empty() {
                    return Err(invalid(
                        gline,
                        format!("`{key}` is empty (use \"**\" to match anything)"),
                    ));
                }
                if s.len() > MAX_GLOB_LEN {
                    return Err(invalid(
                        gline,
                        format!("`{key}` is longer than {MAX_GLOB_LEN} bytes"),
                    ));
                }
                let s = if key == "host" {
                    s.to_ascii_lowercase()
                } else {
                    s
                };
                Glob::new(&s)
                    .map(Some)
                    .map_err(|e| invalid(gline, format!("`{key}`: {e}")))
            };
            let rule = Rule {
                action,
                tool: compile(r.tool, "tool")?,
                command: compile(r.command, "command")?,
                path: compile(r.path, "path")?,
                host: compile(r.host, "host")?,
                line,
            };
            if rule.tool.is_none()
                && rule.command.is_none()
                && rule.path.is_none()
                && rule.host.is_none()
            {
                return Err(invalid(
                    line,
                    "this rule matches nothing: give at least one of `tool`, `command`, `path`, `host` (use `default` for a catch-all)".into(),
                ));
            }
            rules.push(rule);
        }
        Ok(Policy {
            default: default.into_inner(),
            rules,
        })
    }

    /// The action for `subject`: the first matching rule's, else the default.
    pub fn decide(&self, subject: &Subject) -> Action {
        self.matching_rule(subject)
            .map(|r| r.action)
            .unwrap_or(self.default)
    }

    /// The first rule that matches `subject`, if any (for messages: "denied by rule at line 7").
    pub fn matching_rule(&self, subject: &Subject) -> Option<&Rule> {
        self.rules.iter().find(|r| r.matches(subject))
    }
}

#[cfg(test)]
mod tests;
