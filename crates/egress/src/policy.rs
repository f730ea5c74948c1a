//! The egress policy: rules, targets and decisions. Pure logic, no I/O.
//!
//! # The rule, stated once
//! A connection to `HOST:PORT` is allowed when
//! 1. some rule matches the host and the port: a **name** rule (`api.example.com`) matches that
//!    name only, a **wildcard** (`*.example.com`) matches names *below* `example.com` (not
//!    `example.com` itself), `*` matches any name; an **address** or **range** rule
//!    (`192.0.2.7`, `203.0.113.0/24`, `[2001:db8::1]`) matches addresses inside it. A rule
//!    without `:PORT` matches every port;
//! 2. and every address the proxy connects to passes the address rule: for a name, only the
//!    addresses the name resolved to on the host are used, and each must be **public**, or be
//!    listed literally by an address/range rule that lies entirely inside the special range
//!    the address is in (`10.1.0.0/16` opens part of `10.0.0.0/8`; `0.0.0.0/0` opens the
//!    public internet but no loopback, private, link-local, shared or reserved address).
//!    The host's own addresses need a rule naming exactly that address.
//!
//! Names are compared in ASCII lower case without a trailing dot. A name whose last label is
//! all digits (`127.1`, `2130706433`) is refused as a target and as a rule, since resolvers
//! read such names as addresses.
//!
//! Every decision carries the rule that allowed it, or a [`Denial`] that says why none did,
//! in words a user can act on.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use crate::addr::{canonical, special_range, AddrClass, Cidr};

/// Longest host name accepted (RFC 1035).
pub const MAX_NAME_LEN: usize = 253;
/// Most rules in one policy.
pub const MAX_RULES: usize = 1024;

/// What a rule matches on the host side.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum HostPattern {
    /// Exactly this name (lower case, no trailing dot).
    Name(String),
    /// Names below this suffix (`*.example.com` holds `example.com`).
    Below(String),
    /// Any name (`*`); addresses are still checked.
    AnyName,
    /// Addresses inside this range (a single address is a full-length range).
    Range(Cidr),
}

/// One allow rule, `HOST[:PORT]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Rule {
    /// What it matches.
    pub host: HostPattern,
    /// The port, or every port when `None`.
    pub port: Option<u16>,
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let host = match &self.host {
            HostPattern::Name(n) => n.clone(),
            HostPattern::Below(s) => format!("*.{s}"),
            HostPattern::AnyName => "*".into(),
            HostPattern::Range(c) if c.network().is_ipv6() => {
                let full = c.prefix() == 128;
                match (full, self.port) {
                    (true, Some(_)) => format!("[{}]", c.network()),
                    (true, None) => c.network().to_string(),
                    (false, Some(_)) => format!("[{c}]"),
                    (false, None) => c.to_string(),
                }
            }
            HostPattern::Range(c) if c.prefix() == 32 => c.network().to_string(),
            HostPattern::Range(c) => c.to_string(),
        };
        match self.port {
            Some(p) => write!(f, "{host}:{p}"),
            None => f.write_str(&host),
        }
    }
}

/// A rule or target that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RuleError {
    /// Empty rule (e.g. `a,,b`).
    #[error("empty rule in the allow list")]
    Empty,
    /// Bad port.
    #[error("bad port in {0:?}: expected 1-65535")]
    Port(String),
    /// Bad host name.
    #[error("bad host {0:?}: expected a DNS name (letters, digits, '-', '_' and dots, last label not all digits), *.suffix, an IP address or a CIDR range")]
    Host(String),
    /// Too many rules.
    #[error("too many rules ({0}; at most {MAX_RULES})")]
    TooMany(usize),
}

/// Lower-cases a DNS name, drops one trailing dot and checks its syntax.
pub fn normalize_name(raw: &str) -> Option<String> {
    let name = raw.strip_suffix('.').unwrap_or(raw).to_ascii_lowercase();
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return None;
    }
    let mut last = "";
    for label in name.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return None;
        }
        last = label;
    }
    if last.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(name)
}

fn parse_port(all: &str, p: &str) -> Result<u16, RuleError> {
    if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
        return Err(RuleError::Port(all.to_string()));
    }
    match p.parse::<u16>() {
        Ok(0) | Err(_) => Err(RuleError::Port(all.to_string())),
        Ok(n) => Ok(n),
    }
}

/// Splits `HOST[:PORT]`, `[V6]:PORT`, `[V6]` or a bare IPv6 address/range.
fn split_host_port(s: &str) -> Result<(&str, Option<u16>), RuleError> {
    if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| RuleError::Host(s.to_string()))?;
        return match after {
            "" => Ok((host, None)),
            _ => match after.strip_prefix(':') {
                Some(p) => Ok((host, Some(parse_port(s, p)?))),
                None => Err(RuleError::Host(s.to_string())),
            },
        };
    }
    match s.matches(':').count() {
        0 => Ok((s, None)),
        1 => {
            let (h, p) = s.split_once(':').unwrap_or((s, ""));
            Ok((h, Some(parse_port(s, p)?)))
        }
        // A bare IPv6 address or range; a port needs brackets.
        _ => Ok((s, None)),
    }
}

impl FromStr for Rule {
    type Err = RuleError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.is_empty() {
            return Err(RuleError::Empty);
        }
        let (host, port) = split_host_port(s)?;
        let bad = || RuleError::Host(s.to_string());
        let pattern = if host == "*" {
            HostPattern::AnyName
        } else if let Some(suffix) = host.strip_prefix("*.") {
            HostPattern::Below(normalize_name(suffix).ok_or_else(bad)?)
        } else if host.contains('/') || host.parse::<IpAddr>().is_ok() {
            HostPattern::Range(host.parse::<Cidr>().map_err(|_| bad())?)
        } else {
            HostPattern::Name(normalize_name(host).ok_or_else(bad)?)
        };
        Ok(Rule {
            host: pattern,
            port,
        })
    }
}

/// Where a client asked to go.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Host {
    /// A DNS name (normalized).
    Name(String),
    /// An address literal.
    Ip(IpAddr),
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Name(n) => f.write_str(n),
            Host::Ip(IpAddr::V6(a)) => write!(f, "[{a}]"),
            Host::Ip(a) => write!(f, "{a}"),
        }
    }
}

/// A host and port a client asked for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target {
    /// Host.
    pub host: Host,
    /// Port.
    pub port: u16,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

impl Target {
    /// Parses an HTTP authority (`host:port`, `[v6]:port`, or `host` with `default_port`).
    pub fn parse_authority(s: &str, default_port: Option<u16>) -> Result<Target, RuleError> {
        let bad = || RuleError::Host(s.to_string());
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (h, after) = rest.split_once(']').ok_or_else(bad)?;
            let port = match after {
                "" => None,
                a => Some(parse_port(s, a.strip_prefix(':').ok_or_else(bad)?)?),
            };
            let ip: IpAddr = h.parse().map_err(|_| bad())?;
            if !ip.is_ipv6() {
                return Err(bad());
            }
            (Host::Ip(ip), port)
        } else {
            let (h, port) = match s.split_once(':') {
                Some((h, p)) => (h, Some(parse_port(s, p)?)),
                None => (s, None),
            };
            match h.parse::<std::net::Ipv4Addr>() {
                Ok(v4) => (Host::Ip(IpAddr::V4(v4)), port),
                Err(_) => (Host::Name(normalize_name(h).ok_or_else(bad)?), port),
            }
        };
        let port = port
            .or(default_port)
            .ok_or_else(|| RuleError::Port(s.to_string()))?;
        Ok(Target { host, port })
    }
}

/// Why a connection was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Denial {
    /// No rule matches the host and port.
    #[error("no rule allows {target}{}", hint.as_ref().map(|h| format!(" ({h})")).unwrap_or_default())]
    NoRule {
        /// What was asked for.
        target: Target,
        /// A nearby rule (same host, other port), to help the user.
        hint: Option<String>,
    },
    /// The address is special and no rule lists it literally.
    #[error(
        "{target} {} {class} address and no rule lists it literally (add {addr} or its range to the allow list to open it)",
        match target.host { Host::Name(_) => format!("resolved to {addr}, a"), Host::Ip(_) => "is a".to_string() }
    )]
    SpecialAddress {
        /// What was asked for.
        target: Target,
        /// The refused address.
        addr: IpAddr,
        /// Its class.
        class: AddrClass,
    },
    /// The TLS server name differs from the CONNECT host.
    #[error("TLS server name {sni:?} differs from the CONNECT host {target}")]
    SniMismatch {
        /// What was asked for in CONNECT.
        target: Target,
        /// The server name in the ClientHello.
        sni: String,
    },
    /// A plain HTTP request named two different hosts.
    #[error("Host header {header:?} differs from the request target {target}")]
    HostMismatch {
        /// The request target.
        target: Target,
        /// The Host header.
        header: String,
    },
    /// The request did not name a valid host.
    #[error("bad request target: {0}")]
    BadTarget(String),
    /// No rule allows the target and the approval gate refused it.
    #[error("{target} is not on the allow list and was not approved: {reason}")]
    Gated {
        /// What was asked for.
        target: Target,
        /// The gate's reason (denied by a rule, by a person, timed out).
        reason: String,
    },
}

impl Denial {
    /// The rule name for logs and the `X-Vmcp-Egress` header: which check refused.
    pub fn check(&self) -> &'static str {
        match self {
            Denial::NoRule { .. } => "no-rule",
            Denial::SpecialAddress { .. } => "special-address",
            Denial::SniMismatch { .. } => "sni-mismatch",
            Denial::HostMismatch { .. } => "host-mismatch",
            Denial::BadTarget(_) => "bad-target",
            Denial::Gated { .. } => "approval",
        }
    }

    /// The `HOST:PORT` that was asked for, when the request named one.
    pub fn target(&self) -> Option<&Target> {
        match self {
            Denial::NoRule { target, .. }
            | Denial::SpecialAddress { target, .. }
            | Denial::SniMismatch { target, .. }
            | Denial::HostMismatch { target, .. }
            | Denial::Gated { target, .. } => Some(target),
            Denial::BadTarget(_) => None,
        }
    }
}

/// An allowed connection: where to connect and which rule allowed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allowed {
    /// The rule that matched the host and port.
    pub rule: Rule,
    /// Addresses that passed the address rule, in resolver order.
    pub addrs: Vec<SocketAddr>,
    /// Resolved addresses that were dropped, and why (a rebinding attempt shows up here).
    pub dropped: Vec<Denial>,
}

/// The allow list plus the host's own addresses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    rules: Vec<Rule>,
    host_addrs: Vec<IpAddr>,
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rules: Vec<String> = self.rules.iter().map(ToString::to_string).collect();
        f.write_str(&rules.join(","))
    }
}

impl FromStr for Policy {
    type Err = RuleError;
    /// Parses a comma-separated list of rules.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rules = s
            .split(',')
            .map(str::parse)
            .collect::<Result<Vec<Rule>, _>>()?;
        Policy::new(rules)
    }
}

impl Policy {
    /// A policy of these rules (at most [`MAX_RULES`]).
    pub fn new(rules: Vec<Rule>) -> Result<Policy, RuleError> {
        if rules.len() > MAX_RULES {
            return Err(RuleError::TooMany(rules.len()));
        }
        Ok(Policy {
            rules,
            host_addrs: Vec::new(),
        })
    }

    /// Also refuses these addresses (the host's own) unless a rule names one exactly.
    pub fn with_host_addrs(mut self, addrs: impl IntoIterator<Item = IpAddr>) -> Policy {
        self.host_addrs = addrs.into_iter().map(canonical).collect();
        self.host_addrs.sort();
        self.host_addrs.dedup();
        self
    }

    /// A policy with `rules` and this one's host addresses.
    pub fn with_rules(&self, rules: Vec<Rule>) -> Policy {
        Policy {
            rules,
            host_addrs: self.host_addrs.clone(),
        }
    }

    /// The rules.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    fn port_ok(rule: &Rule, port: u16) -> bool {
        rule.port.is_none_or(|p| p == port)
    }

    /// The rule that lets a client ask for `target` (step 1), before any address is known.
    pub fn match_target(&self, target: &Target) -> Result<&Rule, Denial> {
        let host_matches = |rule: &Rule| match (&rule.host, &target.host) {
            (HostPattern::Name(n), Host::Name(t)) => n == t,
            (HostPattern::Below(s), Host::Name(t)) => t
                .strip_suffix(s.as_str())
                .is_some_and(|head| head.len() > 1 && head.ends_with('.')),
            (HostPattern::AnyName, Host::Name(_)) => true,
            (HostPattern::Range(c), Host::Ip(a)) => c.contains(*a),
            _ => false,
        };
        let mut hint = None;
        for rule in &self.rules {
            if host_matches(rule) {
                if Self::port_ok(rule, target.port) {
                    return Ok(rule);
                }
                hint.get_or_insert_with(|| format!("{rule} allows another port"));
            }
        }
        Err(Denial::NoRule {
            target: target.clone(),
            hint,
        })
    }

    /// Whether some rule of this policy allows everything `rule` would allow (same or wider
    /// host, same port or every port), including the special addresses `rule` would open by
    /// listing them literally: a range inside a special range (`10.1.0.0/16`) is covered only
    /// by a range inside that special range too, and one of the host's own addresses only by
    /// exactly that address. Used to keep an agent-supplied allow list within the user's.
    pub fn covers(&self, rule: &Rule) -> bool {
        let below = |name: &str, suffix: &str| {
            name.strip_suffix(suffix)
                .is_some_and(|head| head.len() > 1 && head.ends_with('.'))
        };
        self.rules.iter().any(|c| {
            let port_ok = match (c.port, rule.port) {
                (None, _) => true,
                (Some(a), Some(b)) => a == b,
                (Some(_), None) => false,
            };
            port_ok
                && match (&c.host, &rule.host) {
                    (
                        HostPattern::AnyName,
                        HostPattern::Name(_) | HostPattern::Below(_) | HostPattern::AnyName,
                    ) => true,
                    (HostPattern::Below(s), HostPattern::Name(n)) => below(n, s),
                    (HostPattern::Below(s), HostPattern::Below(t)) => t == s || below(t, s),
                    (HostPattern::Name(a), HostPattern::Name(b)) => a == b,
                    (HostPattern::Range(c), HostPattern::Range(r)) => {
                        let special_ok = match special_range(r.network()) {
                            Some((range, _)) if r.within(&range) => c.within(&range),
                            _ => true,
                        };
                        let own = r.prefix() == Cidr::host(r.network()).prefix()
                            && self
                                .host_addrs
                                .binary_search(&canonical(r.network()))
                                .is_ok();
                        r.within(c) && special_ok && (!own || c == r)
                    }
                    _ => false,
                }
        })
    }

    /// The first rule of `other` this policy does not [cover](Policy::covers), if any.
    pub fn first_uncovered<'a>(&self, other: &'a Policy) -> Option<&'a Rule> {
        other.rules.iter().find(|r| !self.covers(r))
    }

    /// Whether `addr` (one address `target` resolved to, or the address literal) may be
    /// connected to under the address rule (step 2).
    pub fn check_addr(&self, target: &Target, addr: IpAddr) -> Result<(), Denial> {
        let addr = canonical(addr);
        let refuse = |class| Denial::SpecialAddress {
            target: target.clone(),
            addr,
            class,
        };
        if self.host_addrs.binary_search(&addr).is_ok() {
            let exact = self.rules.iter().any(|r| {
                Self::port_ok(r, target.port)
                    && matches!(&r.host, HostPattern::Range(c) if *c == Cidr::host(addr))
            });
            return if exact {
                Ok(())
            } else {
                Err(refuse(AddrClass::HostOwn))
            };
        }
        let Some((range, class)) = special_range(addr) else {
            return Ok(());
        };
        let literal = self.rules.iter().any(|r| {
            Self::port_ok(r, target.port)
                && matches!(&r.host, HostPattern::Range(c) if c.contains(addr) && c.within(&range))
        });
        if literal {
            Ok(())
        } else {
            Err(refuse(class))
        }
    }

    /// The whole decision for `target`, given the addresses a name resolved to (ignored for
    /// an address literal). Refused when no rule matches or no address passes.
    pub fn decide(&self, target: &Target, resolved: &[IpAddr]) -> Result<Allowed, Denial> {
        let rule = self.match_target(target)?.clone();
        let candidates: Vec<IpAddr> = match &target.host {
            Host::Ip(a) => vec![*a],
            Host::Name(_) => resolved.to_vec(),
        };
        let mut addrs = Vec::new();
        let mut dropped = Vec::new();
        for a in candidates {
            match self.check_addr(target, a) {
                Ok(()) => addrs.push(SocketAddr::new(canonical(a), target.port)),
                Err(d) => dropped.push(d),
            }
        }
        if addrs.is_empty() {
            return Err(dropped
                .into_iter()
                .next()
                .unwrap_or(Denial::BadTarget(format!(
                    "{target} resolved to no address"
                ))));
        }
        Ok(Allowed {
            rule,
            addrs,
            dropped,
        })
    }
}

#[cfg(test)]
mod tests;
