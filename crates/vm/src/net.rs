//! Guest networking modes and published ports (backend-neutral; the QEMU plan turns them into
//! `-netdev user` arguments, see `docs/network.md`).
//!
//! - [`NetMode::None`] (default): no network card at all.
//! - [`NetMode::Allow`]: only through the VM's [`vmcp_egress::Proxy`] on the host, under the
//!   policy. The guest gets no resolver; DNS happens on the host, inside the proxy.
//! - [`NetMode::Nat`]: unrestricted user-mode NAT (QEMU's slirp), guest DNS through it.
//!
//! **Over the agent channel** (the default): no card for the allow-list or for published
//! ports. The guest agent listens on `127.0.0.1:3128` ([`TUNNEL_PROXY`]) and carries each
//! connection over its channel to the proxy; a published port is a host listener whose
//! connections the agent makes to the guest port. The lifecycle runs both ([`ChannelNet`])
//! and points every exec at the proxy, so the guest's boot state holds no network setting.
//! Without a card the guest has no route anywhere else, by construction.
//!
//! **On a card** ([`NetConfig::card`]; QEMU on Linux and macOS only, about twice the bulk
//! throughput under TCG): a QEMU user-mode network with `restrict=on`, so the guest can
//! reach nothing but one forward, `PROXY_ADDR:PROXY_PORT`, which QEMU hands to a
//! per-connection helper (`vmcp __egress-pipe`) that connects to the proxy on host loopback;
//! published ports are QEMU `hostfwd` rules, on 127.0.0.1 unless an address is given.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;

use vmcp_egress::Policy;

mod channel;

pub use channel::{serve_over_channel, ChannelNetHandle, MAX_PUBLISHED_CONNECTIONS};

/// The guest's address on the user-mode network.
pub const GUEST_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
/// Prefix length of the user-mode network.
pub const GUEST_PREFIX: u8 = 24;
/// The user-mode network's gateway (QEMU's slirp host side).
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
/// The resolver QEMU's user-mode network offers the guest (NAT mode only: in allow-list mode
/// the guest gets no resolver, names are resolved by the host's proxy).
pub const DNS: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 3);
/// Where the guest finds the egress proxy in [`NetMode::Allow`].
pub const PROXY_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 100);
/// Port of the egress proxy inside the guest's network.
pub const PROXY_PORT: u16 = 3128;
/// Where the guest finds the egress proxy when it travels over the agent channel.
pub const TUNNEL_PROXY: std::net::SocketAddrV4 =
    std::net::SocketAddrV4::new(Ipv4Addr::LOCALHOST, PROXY_PORT);
/// Most published ports per VM.
pub const MAX_PUBLISH: usize = 64;

/// How the guest reaches the network.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum NetMode {
    /// No network card.
    #[default]
    None,
    /// Only through the per-VM egress proxy, under this policy.
    Allow(Policy),
    /// Unrestricted outbound NAT.
    Nat,
}

/// A `--net` value that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NetError {
    /// Unknown mode.
    #[error("bad --net {0:?}: expected none, nat or allow=HOST[:PORT],...")]
    Mode(String),
    /// Bad allow list.
    #[error("bad --net allow list")]
    Policy(#[from] vmcp_egress::RuleError),
    /// Bad `--publish`.
    #[error("bad --publish {0:?}: expected HOST_PORT:GUEST_PORT or ADDRESS:HOST_PORT:GUEST_PORT (ports 1-65535)")]
    Publish(String),
}

impl FromStr for NetMode {
    type Err = NetError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" => Ok(NetMode::None),
            "nat" => Ok(NetMode::Nat),
            _ => match s.strip_prefix("allow=") {
                Some(list) => Ok(NetMode::Allow(list.parse()?)),
                None => Err(NetError::Mode(s.to_string())),
            },
        }
    }
}

impl fmt::Display for NetMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NetMode::None => f.write_str("none"),
            NetMode::Nat => f.write_str("nat"),
            NetMode::Allow(p) => write!(f, "allow={p}"),
        }
    }
}

/// A host port forwarded to a guest port (TCP).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortForward {
    /// Host address and port to listen on.
    pub host: SocketAddr,
    /// Guest port.
    pub guest_port: u16,
}

impl FromStr for PortForward {
    type Err = NetError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || NetError::Publish(s.to_string());
        let port = |p: &str| match p.parse::<u16>() {
            Ok(0) | Err(_) => Err(bad()),
            Ok(n) => Ok(n),
        };
        let (host_part, guest) = s.rsplit_once(':').ok_or_else(bad)?;
        let guest_port = port(guest)?;
        let host = match host_part.rsplit_once(':') {
            None => SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port(host_part)?),
            Some((addr, p)) => {
                let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
                SocketAddr::new(IpAddr::V4(addr), port(p)?)
            }
        };
        Ok(PortForward { host, guest_port })
    }
}

impl fmt::Display for PortForward {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.guest_port)
    }
}

/// The network of one VM.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct NetConfig {
    /// Mode.
    pub mode: NetMode,
    /// Published ports (at most [`MAX_PUBLISH`]).
    pub publish: Vec<PortForward>,
    /// The program QEMU starts per guest connection to the proxy, called as
    /// `PROGRAM __egress-pipe 127.0.0.1:PORT`; the running executable when `None` (the `vmcp`
    /// binary handles that argument).
    pub pipe_program: Option<PathBuf>,
    /// Decides about targets off the allow list in [`NetMode::Allow`] (an approval policy)
    /// instead of refusing them at once.
    pub gate: Option<EgressGate>,
    /// Carry allow-list egress and published ports on a restricted network card instead of
    /// the agent channel (see the module docs). Only QEMU on Linux and macOS has that;
    /// backends without a per-connection forward (VZ, QEMU on Windows) clear it.
    pub card: bool,
}

/// What the lifecycle serves over the agent channel of one VM (unless [`NetConfig::card`]).
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct ChannelNet {
    /// The egress policy and its gate, served to the guest's `127.0.0.1:3128`.
    pub egress: Option<(Policy, Option<EgressGate>)>,
    /// Host listeners whose connections go to guest ports.
    pub publish: Vec<PortForward>,
}

/// Most connections the egress proxy serves at once when it is fed over the agent channel:
/// each may hold a window (1 MiB) queued on the host besides the proxy's own buffers, so a
/// guest that opens many slow connections holds at most about 80 MiB of host memory.
pub const CHANNEL_PROXY_CONNECTIONS: usize = 64;

/// The egress proxy of one VM under `policy` (and the host's own addresses, which are
/// refused unless listed), with `gate` deciding about targets off the list, serving at most
/// `max_connections` at once.
pub fn egress_proxy(
    policy: &Policy,
    gate: Option<&EgressGate>,
    max_connections: usize,
) -> vmcp_egress::Proxy {
    let policy = policy.clone().with_host_addrs(vmcp_egress::host_addrs());
    let mut limits = vmcp_egress::Limits::default();
    limits.max_connections = max_connections;
    if let Some(g) = gate {
        limits.gate_timeout = g.wait;
    }
    let proxy = vmcp_egress::Proxy::new(policy, limits);
    match gate {
        Some(g) => proxy.with_gate(g.gate.clone()),
        None => proxy,
    }
}

/// An approval gate for the egress proxy and how long a connection may wait for it.
#[derive(Clone)]
pub struct EgressGate {
    /// The gate.
    pub gate: std::sync::Arc<dyn vmcp_egress::Gate>,
    /// Longest wait of one connection for a decision.
    pub wait: std::time::Duration,
}

impl fmt::Debug for EgressGate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EgressGate")
            .field("wait", &self.wait)
            .finish_non_exhaustive()
    }
}

impl PartialEq for EgressGate {
    fn eq(&self, other: &Self) -> bool {
        std::sync::Arc::ptr_eq(&self.gate, &other.gate) && self.wait == other.wait
    }
}

impl Eq for EgressGate {}

impl NetConfig {
    /// Whether the guest gets a network card: for NAT, and for an allow-list or published
    /// ports unless they travel over the agent channel.
    pub fn has_device(&self) -> bool {
        match self.mode {
            NetMode::Nat => true,
            NetMode::Allow(_) => self.card,
            NetMode::None => self.card && !self.publish.is_empty(),
        }
    }

    /// What travels over the agent channel (nothing with [`NetConfig::card`]).
    pub fn channel_net(&self) -> ChannelNet {
        if self.card {
            return ChannelNet::default();
        }
        ChannelNet {
            egress: match &self.mode {
                NetMode::Allow(p) => Some((p.clone(), self.gate.clone())),
                NetMode::None | NetMode::Nat => None,
            },
            publish: self.publish.clone(),
        }
    }

    /// The egress proxy the guest's kernel command line names (`vmcp.proxy=`, exported by
    /// the agent as `HTTP_PROXY` and friends): the card's, in allow-list mode with a card.
    /// Over the agent channel the command line names none: the lifecycle sends the same
    /// variables (for [`TUNNEL_PROXY`]) with every exec instead.
    pub fn kernel_proxy(&self) -> Option<std::net::SocketAddrV4> {
        match (&self.mode, self.card) {
            (NetMode::Allow(_), true) => Some(std::net::SocketAddrV4::new(PROXY_ADDR, PROXY_PORT)),
            _ => None,
        }
    }

    /// A warning line for the user, if the mode deserves one.
    pub fn warning(&self) -> Option<&'static str> {
        match self.mode {
            NetMode::Nat => Some(
                "warning: --net nat gives the guest unrestricted outbound network access (any host, any port, DNS, the host's loopback services through 10.0.2.2); use --net allow=HOST,... to restrict it",
            ),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse() {
        assert_eq!("none".parse::<NetMode>().unwrap(), NetMode::None);
        assert_eq!("nat".parse::<NetMode>().unwrap(), NetMode::Nat);
        let m: NetMode = "allow=api.example.com:443,10.0.0.0/8".parse().unwrap();
        assert_eq!(m.to_string(), "allow=api.example.com:443,10.0.0.0/8");
        let e = "open".parse::<NetMode>().unwrap_err().to_string();
        assert!(e.contains("none, nat or allow="), "{e}");
        let e = vmcp_test_support::error_chain(&"allow=a..b".parse::<NetMode>().unwrap_err());
        assert!(e.contains("bad host \"a..b\""), "{e}");
    }

    #[test]
    fn publish_parses_with_loopback_default() {
        let p: PortForward = "8080:80".parse().unwrap();
        assert_eq!(p.host.to_string(), "127.0.0.1:8080");
        assert_eq!(p.guest_port, 80);
        let p: PortForward = "0.0.0.0:8080:80".parse().unwrap();
        assert_eq!(p.host.to_string(), "0.0.0.0:8080");
        for bad in [
            "80",
            "0:80",
            "8080:0",
            "x:80",
            "a:1:2",
            "1.2.3.4:70000:1",
            "",
        ] {
            assert!(bad.parse::<PortForward>().is_err(), "{bad}");
        }
    }

    #[test]
    fn device_only_when_asked() {
        let mut n = NetConfig::default();
        assert!(!n.has_device());
        n.publish.push("8080:80".parse().unwrap());
        assert!(
            !n.has_device(),
            "published over the agent channel by default"
        );
        n.card = true;
        assert!(n.has_device());
        let nat = NetConfig {
            mode: NetMode::Nat,
            ..NetConfig::default()
        };
        assert!(nat.has_device() && nat.warning().is_some());
    }

    #[test]
    fn over_the_channel_only_nat_needs_a_card() {
        let mut n = NetConfig {
            mode: "allow=pypi.org".parse().unwrap(),
            publish: vec!["8080:80".parse().unwrap()],

            ..NetConfig::default()
        };
        assert!(!n.has_device());
        assert_eq!(n.kernel_proxy(), None);
        let c = n.channel_net();
        assert!(c.egress.is_some());
        assert_eq!(c.publish, n.publish);
        n.mode = NetMode::Nat;
        assert!(n.has_device());
        assert_eq!(n.kernel_proxy(), None);
        assert!(n.channel_net().egress.is_none(), "no proxy for NAT");
        n.card = true;
        let c = n.channel_net();
        assert!(
            c.egress.is_none() && c.publish.is_empty(),
            "nothing on the channel with a card"
        );
        n.mode = "allow=pypi.org".parse().unwrap();
        assert_eq!(
            n.kernel_proxy(),
            Some(std::net::SocketAddrV4::new(PROXY_ADDR, PROXY_PORT))
        );
    }
}
