//! vmcp's egress policy and the per-VM proxy that enforces it.
//!
//! A VM started with `--net allow=RULES` reaches the outside only through a [`Proxy`] that
//! vmcp runs on the host for that VM. This crate holds:
//! - [`policy`]: the rules (`HOST[:PORT]` with names, `*.suffix` wildcards, IP addresses and
//!   CIDR ranges) and the decision, as pure, property-tested logic. Special addresses
//!   (loopback, private, link-local including 169.254.169.254, shared, reserved, the host's
//!   own) are refused unless a rule lists them literally; every decision names its rule or
//!   why none matched;
//! - [`sni`]: a bounded ClientHello parser that reads the TLS server name;
//! - [`proxy`]: HTTP CONNECT and plain HTTP on hyper, DNS resolved on the host only, the
//!   address connected to always one the allowed name resolved to and one that passes the
//!   address rule; refusals logged (rate limited) and explained in the response.
//!
//! Platforms: the policy and proxy are plain Rust and tokio and build everywhere; the
//! host-address probe uses `getifaddrs` on Unix and a no-packet UDP probe elsewhere.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use vmcp_egress::{host_addrs, Limits, Policy, Proxy};
//! let policy: Policy = "api.example.com:443,*.pythonhosted.org".parse()?;
//! let policy = policy.with_host_addrs(host_addrs());
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let handle = Proxy::new(policy, Limits::default()).spawn(listener);
//! // ... point the guest's HTTP_PROXY at it; drop `handle` to stop it.
//! # drop(handle); Ok(()) }
//! ```

pub mod addr;
mod idle;
pub mod pipe;
pub mod policy;
pub mod proxy;
mod ratelimit;
pub mod sni;
#[cfg(not(unix))]
mod sys_other;
#[cfg(unix)]
mod sys_unix;
#[cfg(unix)]
mod unix;

#[cfg(not(unix))]
use sys_other as sys;
#[cfg(unix)]
use sys_unix as sys;

pub use addr::{AddrClass, Cidr};
pub use policy::{Allowed, Denial, Host, HostPattern, Policy, Rule, RuleError, Target};
pub use proxy::{
    Accept, DenialRecord, Dial, Gate, Limits, Proxy, ProxyHandle, Resolve, Stats, SystemDialer,
    SystemResolver,
};

/// The addresses of this host's interfaces (empty, with a log line, if they cannot be read).
pub fn host_addrs() -> Vec<std::net::IpAddr> {
    match sys::interface_addrs() {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(target: "vmcp::egress", "cannot list this host's addresses: {e}");
            Vec::new()
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn host_addrs_include_loopback() {
        let a = super::host_addrs();
        assert!(a.iter().any(|a| a.is_loopback()), "{a:?}");
    }
}
