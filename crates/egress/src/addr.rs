//! Address classes and CIDR ranges.
//!
//! An address is *special* when it is not a plain public unicast address: loopback, private,
//! link-local (which holds the cloud metadata address 169.254.169.254), shared (CGNAT),
//! unspecified, multicast, broadcast or reserved. The policy refuses special addresses unless
//! a rule lists them literally (see [`crate::policy`]).
//!
//! IPv6 forms that carry an IPv4 address (IPv4-mapped `::ffff:a.b.c.d`, IPv4-compatible
//! `::a.b.c.d`, NAT64 `64:ff9b::/96`, 6to4 `2002::/16`) are classified by the IPv4 address they
//! carry, so `::ffff:127.0.0.1` is loopback and `::ffff:169.254.169.254` is link-local.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// Why an address is not a plain public one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum AddrClass {
    /// A public unicast address.
    Public,
    /// `127.0.0.0/8`, `::1`.
    Loopback,
    /// `10/8`, `172.16/12`, `192.168/16`, `fc00::/7`, `fec0::/10`.
    Private,
    /// `169.254/16` (includes the cloud metadata address), `fe80::/10`.
    LinkLocal,
    /// `100.64/10` (carrier-grade NAT).
    Shared,
    /// `0.0.0.0/8`, `::`.
    Unspecified,
    /// `224/4`, `ff00::/8`.
    Multicast,
    /// `255.255.255.255`, `240/4`, `192.0.0/24`, `198.18/15`.
    Reserved,
    /// An address of this host's own interfaces.
    HostOwn,
}

impl AddrClass {
    /// A short name for messages.
    pub fn as_str(self) -> &'static str {
        match self {
            AddrClass::Public => "public",
            AddrClass::Loopback => "loopback",
            AddrClass::Private => "private",
            AddrClass::LinkLocal => "link-local",
            AddrClass::Shared => "shared (CGNAT)",
            AddrClass::Unspecified => "unspecified",
            AddrClass::Multicast => "multicast",
            AddrClass::Reserved => "reserved",
            AddrClass::HostOwn => "this host's own",
        }
    }
}

impl fmt::Display for AddrClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A CIDR range (`10.0.0.0/8`, `2001:db8::/32`, or a single address with the full prefix).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    /// First address (host bits cleared).
    net: IpAddr,
    /// Prefix length.
    prefix: u8,
}

/// A CIDR range that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an IP address or CIDR range (expected 10.0.0.0/8, 2001:db8::/32, 192.0.2.7)")]
pub struct CidrError(pub String);

fn mask_v4(a: Ipv4Addr, prefix: u8) -> Ipv4Addr {
    let bits = u32::from(a);
    let mask = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix))
    };
    Ipv4Addr::from(bits & mask)
}

fn mask_v6(a: Ipv6Addr, prefix: u8) -> Ipv6Addr {
    let bits = u128::from(a);
    let mask = if prefix == 0 {
        0
    } else {
        u128::MAX << (128 - u32::from(prefix))
    };
    Ipv6Addr::from(bits & mask)
}

impl Cidr {
    /// The range of `addr/prefix`; `None` if the prefix is longer than the address.
    pub fn new(addr: IpAddr, prefix: u8) -> Option<Cidr> {
        let net = match addr {
            IpAddr::V4(a) if prefix <= 32 => IpAddr::V4(mask_v4(a, prefix)),
            IpAddr::V6(a) if prefix <= 128 => IpAddr::V6(mask_v6(a, prefix)),
            _ => return None,
        };
        Some(Cidr { net, prefix })
    }

    /// The single address `addr`.
    pub fn host(addr: IpAddr) -> Cidr {
        let prefix = if addr.is_ipv4() { 32 } else { 128 };
        Cidr { net: addr, prefix }
    }

    /// First address.
    pub fn network(&self) -> IpAddr {
        self.net
    }

    /// Prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Whether `addr` is inside. An IPv4 range also holds the IPv4-mapped IPv6 form of its
    /// addresses.
    pub fn contains(&self, addr: IpAddr) -> bool {
        match (self.net, canonical(addr)) {
            (IpAddr::V4(n), IpAddr::V4(a)) => mask_v4(a, self.prefix) == n,
            (IpAddr::V6(n), IpAddr::V6(a)) => mask_v6(a, self.prefix) == n,
            _ => false,
        }
    }

    /// Whether all of `self` lies inside `outer`.
    pub fn within(&self, outer: &Cidr) -> bool {
        self.prefix >= outer.prefix && outer.contains(self.net)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.net, self.prefix)
    }
}

impl FromStr for Cidr {
    type Err = CidrError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || CidrError(s.to_string());
        match s.split_once('/') {
            None => s.parse::<IpAddr>().map(Cidr::host).map_err(|_| bad()),
            Some((a, p)) => {
                let addr: IpAddr = a.parse().map_err(|_| bad())?;
                if p.is_empty() || p.len() > 3 || !p.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(bad());
                }
                let prefix: u8 = p.parse().map_err(|_| bad())?;
                let c = Cidr::new(addr, prefix).ok_or_else(bad)?;
                // `10.0.0.1/8` is almost always a typo for `10.0.0.0/8` or `10.0.0.1`.
                if c.net != addr {
                    return Err(bad());
                }
                Ok(c)
            }
        }
    }
}

/// The address with an IPv4-mapped IPv6 address turned into the IPv4 address it carries.
pub fn canonical(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => addr,
        },
        v4 => v4,
    }
}

/// The special range an address falls in, with its class; `None` for public addresses.
/// (The host's own addresses are not known here; see [`crate::policy::Policy`].)
pub fn special_range(addr: IpAddr) -> Option<(Cidr, AddrClass)> {
    match canonical(addr) {
        IpAddr::V4(a) => special_v4(a),
        IpAddr::V6(a) => special_v6(a),
    }
}

/// The class of an address, ignoring the host's own addresses.
pub fn classify(addr: IpAddr) -> AddrClass {
    special_range(addr).map_or(AddrClass::Public, |(_, c)| c)
}

const V4_SPECIAL: &[([u8; 4], u8, AddrClass)] = &[
    ([0, 0, 0, 0], 8, AddrClass::Unspecified),
    ([10, 0, 0, 0], 8, AddrClass::Private),
    ([100, 64, 0, 0], 10, AddrClass::Shared),
    ([127, 0, 0, 0], 8, AddrClass::Loopback),
    ([169, 254, 0, 0], 16, AddrClass::LinkLocal),
    ([172, 16, 0, 0], 12, AddrClass::Private),
    ([192, 0, 0, 0], 24, AddrClass::Reserved),
    ([192, 168, 0, 0], 16, AddrClass::Private),
    ([198, 18, 0, 0], 15, AddrClass::Reserved),
    ([224, 0, 0, 0], 4, AddrClass::Multicast),
    ([240, 0, 0, 0], 4, AddrClass::Reserved),
];

fn special_v4(a: Ipv4Addr) -> Option<(Cidr, AddrClass)> {
    for (net, prefix, class) in V4_SPECIAL {
        let c = Cidr {
            net: IpAddr::V4(Ipv4Addr::from(*net)),
            prefix: *prefix,
        };
        if c.contains(IpAddr::V4(a)) {
            return Some((c, *class));
        }
    }
    None
}

fn v6_range(net: [u16; 8], prefix: u8) -> Cidr {
    Cidr {
        net: IpAddr::V6(Ipv6Addr::from(net)),
        prefix,
    }
}

fn special_v6(a: Ipv6Addr) -> Option<(Cidr, AddrClass)> {
    let seg = a.segments();
    // Forms that carry an IPv4 address are judged by it: a NAT64 or 6to4 gateway would
    // deliver to that address.
    let embedded = if seg[..6] == [0, 0, 0, 0, 0, 0] && u128::from(a) > 1 {
        // IPv4-compatible (deprecated) `::a.b.c.d`.
        Some((
            v6_range([0; 8], 96),
            Ipv4Addr::from((u128::from(a) as u32).to_be_bytes()),
        ))
    } else if seg[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        Some((
            v6_range([0x64, 0xff9b, 0, 0, 0, 0, 0, 0], 96),
            Ipv4Addr::from((u128::from(a) as u32).to_be_bytes()),
        ))
    } else if seg[0] == 0x2002 {
        let v4 = (u32::from(seg[1]) << 16) | u32::from(seg[2]);
        Some((
            v6_range([0x2002, 0, 0, 0, 0, 0, 0, 0], 16),
            Ipv4Addr::from(v4),
        ))
    } else {
        None
    };
    if let Some((range, v4)) = embedded {
        return special_v4(v4).map(|(_, class)| (range, class));
    }
    let table: [([u16; 8], u8, AddrClass); 7] = [
        ([0; 8], 128, AddrClass::Unspecified),
        ([0, 0, 0, 0, 0, 0, 0, 1], 128, AddrClass::Loopback),
        ([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7, AddrClass::Private),
        ([0xfec0, 0, 0, 0, 0, 0, 0, 0], 10, AddrClass::Private),
        ([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10, AddrClass::LinkLocal),
        ([0xff00, 0, 0, 0, 0, 0, 0, 0], 8, AddrClass::Multicast),
        // Discard-only prefix.
        ([0x0100, 0, 0, 0, 0, 0, 0, 0], 64, AddrClass::Reserved),
    ];
    for (net, prefix, class) in table {
        let c = v6_range(net, prefix);
        if c.contains(IpAddr::V6(a)) {
            return Some((c, class));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn classes() {
        for (a, c) in [
            ("127.0.0.1", AddrClass::Loopback),
            ("127.255.1.2", AddrClass::Loopback),
            ("::1", AddrClass::Loopback),
            ("::ffff:127.0.0.1", AddrClass::Loopback),
            ("::127.0.0.1", AddrClass::Loopback),
            ("10.1.2.3", AddrClass::Private),
            ("172.31.255.255", AddrClass::Private),
            ("192.168.0.1", AddrClass::Private),
            ("fd00::1", AddrClass::Private),
            ("169.254.169.254", AddrClass::LinkLocal),
            ("::ffff:169.254.169.254", AddrClass::LinkLocal),
            ("64:ff9b::a9fe:a9fe", AddrClass::LinkLocal),
            ("2002:a9fe:a9fe::1", AddrClass::LinkLocal),
            ("fe80::1", AddrClass::LinkLocal),
            ("100.64.0.1", AddrClass::Shared),
            ("0.0.0.0", AddrClass::Unspecified),
            ("::", AddrClass::Unspecified),
            ("224.0.0.251", AddrClass::Multicast),
            ("ff02::1", AddrClass::Multicast),
            ("255.255.255.255", AddrClass::Reserved),
            ("8.8.8.8", AddrClass::Public),
            ("172.32.0.1", AddrClass::Public),
            ("2606:4700::1111", AddrClass::Public),
            ("64:ff9b::808:808", AddrClass::Public),
        ] {
            assert_eq!(classify(ip(a)), c, "{a}");
        }
    }

    #[test]
    fn cidr_parse_and_contains() {
        let c: Cidr = "10.0.0.0/8".parse().unwrap();
        assert!(c.contains(ip("10.200.0.1")));
        assert!(c.contains(ip("::ffff:10.0.0.1")));
        assert!(!c.contains(ip("11.0.0.1")));
        assert_eq!(c.to_string(), "10.0.0.0/8");
        let h: Cidr = "192.0.2.7".parse().unwrap();
        assert_eq!(h.prefix(), 32);
        assert!(h.within(&"192.0.2.0/24".parse().unwrap()));
        assert!(!c.within(&"10.0.0.0/16".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(ip("1.2.3.4")));
        let v6: Cidr = "2001:db8::/32".parse().unwrap();
        assert!(v6.contains(ip("2001:db8::1")));
        assert!(!v6.contains(ip("10.0.0.1")));
        for bad in [
            "10.0.0.1/8",
            "10.0.0.0/33",
            "::/129",
            "x",
            "10.0.0.0/",
            "1.2.3.4/+8",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    proptest::proptest! {
        #[test]
        fn mapped_v4_classified_like_v4(bits: u32) {
            let v4 = Ipv4Addr::from(bits);
            let mapped = IpAddr::V6(v4.to_ipv6_mapped());
            proptest::prop_assert_eq!(classify(mapped), classify(IpAddr::V4(v4)));
        }

        #[test]
        fn cidr_contains_its_network_and_is_within_itself(bits: u128, prefix in 0u8..=128) {
            let c = Cidr::new(IpAddr::V6(Ipv6Addr::from(bits)), prefix).unwrap();
            proptest::prop_assert!(c.contains(c.network()));
            proptest::prop_assert!(c.within(&c));
            let parsed: Cidr = c.to_string().parse().unwrap();
            proptest::prop_assert_eq!(parsed, c);
        }

        #[test]
        fn v4_range_membership_matches_masking(net: u32, addr: u32, prefix in 0u8..=32) {
            let c = Cidr::new(IpAddr::V4(Ipv4Addr::from(net)), prefix).unwrap();
            let shift = 32 - u32::from(prefix);
            let same = if prefix == 0 { true } else { (net >> shift) == (addr >> shift) };
            proptest::prop_assert_eq!(c.contains(IpAddr::V4(Ipv4Addr::from(addr))), same);
        }
    }
}
