use std::net::{IpAddr, Ipv4Addr};

use proptest::prelude::*;

use super::*;

fn policy(s: &str) -> Policy {
    s.parse().unwrap()
}

fn target(s: &str) -> Target {
    Target::parse_authority(s, None).unwrap()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn rules_parse_and_print_back() {
    for s in [
        "api.example.com",
        "api.example.com:443",
        "*.example.com",
        "*.example.com:8443",
        "*",
        "*:443",
        "192.0.2.7",
        "192.0.2.7:80",
        "203.0.113.0/24",
        "203.0.113.0/24:5432",
        "2001:db8::1",
        "[2001:db8::1]:443",
        "2001:db8::/32",
        "[2001:db8::/32]:443",
        "0.0.0.0/0",
    ] {
        assert_eq!(s.parse::<Rule>().unwrap().to_string(), s, "{s}");
    }
    assert_eq!(
        "API.Example.COM.:443".parse::<Rule>().unwrap().to_string(),
        "api.example.com:443"
    );
    for bad in [
        "",
        " ",
        "a:0",
        "a:65536",
        "a:",
        "a:b",
        "-a.com",
        "a..com",
        "a b",
        "127.1",
        "2130706433",
        "*.",
        "*.*.com",
        "10.0.0.1/8",
        "[10.0.0.1",
        "[::1]x",
        "a.com:443:1",
    ] {
        assert!(bad.parse::<Rule>().is_err(), "{bad:?} parsed");
    }
    let e = "a,,b".parse::<Policy>().unwrap_err();
    assert_eq!(e, RuleError::Empty);
}

#[test]
fn names_and_wildcards() {
    let p = policy("api.example.com:443,*.cdn.test");
    assert!(p.match_target(&target("api.example.com:443")).is_ok());
    assert!(p.match_target(&target("API.EXAMPLE.COM.:443")).is_ok());
    let e = p.match_target(&target("api.example.com:80")).unwrap_err();
    assert!(
        e.to_string()
            .contains("api.example.com:443 allows another port"),
        "{e}"
    );
    assert!(p.match_target(&target("example.com:443")).is_err());
    assert!(p.match_target(&target("evilapi.example.com:443")).is_err());
    assert!(p.match_target(&target("a.cdn.test:1")).is_ok());
    assert!(p.match_target(&target("a.b.cdn.test:1")).is_ok());
    // The suffix itself and look-alikes are not below it.
    assert!(p.match_target(&target("cdn.test:1")).is_err());
    assert!(p.match_target(&target("xcdn.test:1")).is_err());
    // A name rule never opens an address literal and vice versa.
    assert!(p.match_target(&target("93.184.216.34:443")).is_err());
    let p = policy("93.184.216.34");
    assert!(p.match_target(&target("example.com:443")).is_err());
    assert!(p.match_target(&target("93.184.216.34:443")).is_ok());
}

#[test]
fn special_addresses_need_a_literal_rule() {
    let p = policy("api.test:443");
    let t = target("api.test:443");
    for a in [
        "127.0.0.1",
        "10.0.0.5",
        "192.168.1.1",
        "169.254.169.254",
        "::1",
        "::ffff:169.254.169.254",
        "fe80::1",
        "0.0.0.0",
    ] {
        let e = p.decide(&t, &[ip(a)]).unwrap_err();
        assert!(matches!(e, Denial::SpecialAddress { .. }), "{a}: {e}");
        assert!(e.to_string().contains("no rule lists it literally"), "{e}");
    }
    let ok = p.decide(&t, &[ip("93.184.216.34")]).unwrap();
    assert_eq!(ok.rule.to_string(), "api.test:443");
    assert_eq!(ok.addrs, vec!["93.184.216.34:443".parse().unwrap()]);

    // 0.0.0.0/0 opens public addresses only.
    let p = policy("0.0.0.0/0,::/0");
    assert!(p.decide(&target("8.8.8.8:53"), &[]).is_ok());
    for a in [
        "10.0.0.1:80",
        "127.0.0.1:80",
        "169.254.169.254:80",
        "[::1]:80",
        "[fd00::1]:80",
    ] {
        assert!(p.decide(&target(a), &[]).is_err(), "{a}");
    }
    // A range inside the special range opens it, for its port.
    let p = policy("api.test,10.1.0.0/16:5432,169.254.169.254:80");
    assert!(p.decide(&target("10.1.2.3:5432"), &[]).is_ok());
    assert!(p.decide(&target("10.1.2.3:5433"), &[]).is_err());
    assert!(p.decide(&target("10.2.0.1:5432"), &[]).is_err());
    assert!(p
        .decide(&target("api.test:5432"), &[ip("10.1.0.9")])
        .is_ok());
    assert!(p.decide(&target("169.254.169.254:80"), &[]).is_ok());
}

#[test]
fn rebinding_answers_are_dropped_or_refused() {
    let p = policy("api.test");
    let t = target("api.test:443");
    let mixed = p
        .decide(&t, &[ip("10.0.0.1"), ip("93.184.216.34"), ip("127.0.0.1")])
        .unwrap();
    assert_eq!(mixed.addrs, vec!["93.184.216.34:443".parse().unwrap()]);
    assert_eq!(mixed.dropped.len(), 2);
    let e = p.decide(&t, &[ip("127.0.0.1")]).unwrap_err();
    assert!(e.to_string().contains("resolved to 127.0.0.1"), "{e}");
    assert!(p.decide(&t, &[]).is_err());
}

#[test]
fn host_addresses_need_an_exact_rule() {
    let own = ip("198.51.100.20");
    let p = policy("api.test,198.51.100.0/24").with_host_addrs([own]);
    let t = target("api.test:443");
    let e = p.decide(&t, &[own]).unwrap_err();
    assert!(e.to_string().contains("this host's own"), "{e}");
    assert!(p.decide(&target("198.51.100.20:22"), &[]).is_err());
    assert!(p.decide(&target("198.51.100.21:22"), &[]).is_ok());
    let p = policy("198.51.100.20:22").with_host_addrs([own]);
    assert!(p.decide(&target("198.51.100.20:22"), &[]).is_ok());
}

#[test]
fn authorities() {
    assert_eq!(
        Target::parse_authority("[::1]:8080", None).unwrap().host,
        Host::Ip(ip("::1"))
    );
    assert_eq!(
        Target::parse_authority("Example.com", Some(80)).unwrap(),
        Target {
            host: Host::Name("example.com".into()),
            port: 80
        }
    );
    for bad in [
        "",
        "a:",
        ":80",
        "[::1",
        "[1.2.3.4]:80",
        "127.1:80",
        "a b:80",
        "a.com:0",
    ] {
        assert!(Target::parse_authority(bad, Some(80)).is_err(), "{bad:?}");
    }
    assert!(Target::parse_authority("a.com", None).is_err());
}

#[test]
fn ceilings_cover_only_narrower_rules() {
    let own = ip("198.51.100.20");
    let cap = policy(
        "*.example.com,api.test:443,203.0.113.0/24,0.0.0.0/0:443,10.1.0.0/16,198.51.100.0/24",
    )
    .with_host_addrs([own]);
    let rule = |s: &str| s.parse::<Rule>().unwrap();
    for ok in [
        "a.example.com",
        "*.b.example.com",
        "*.example.com:80",
        "api.test:443",
        "203.0.113.7",
        "203.0.113.0/25:22",
        "8.8.8.8:443",
        "10.1.2.0/24",
        "198.51.100.21",
    ] {
        assert!(cap.covers(&rule(ok)), "{ok} should be covered");
    }
    for widens in [
        "example.com",        // *.example.com is below example.com only
        "*",                  // any name
        "api.test",           // every port, the cap allows 443
        "api.test:80",        // another port
        "other.test",         // another name
        "203.0.112.0/23",     // a wider range
        "10.0.0.0/8",         // more of a private range than the cap opens
        "10.2.0.1",           // a private address the cap does not list
        "192.168.0.0/16:443", // inside 0.0.0.0/0:443, but a literal private range opens it
        "198.51.100.20",      // the host's own address needs that exact rule
    ] {
        assert!(!cap.covers(&rule(widens)), "{widens} should not be covered");
    }
    let agent = policy("a.example.com,other.test:443");
    assert_eq!(cap.first_uncovered(&agent), Some(&rule("other.test:443")));
    assert_eq!(cap.first_uncovered(&policy("api.test:443")), None);
}

fn arb_v4() -> impl Strategy<Value = IpAddr> {
    any::<u32>().prop_map(|b| IpAddr::V4(Ipv4Addr::from(b)))
}

fn arb_name() -> impl Strategy<Value = String> {
    "[a-z][a-z0-9-]{0,8}(\\.[a-z][a-z0-9]{0,8}){0,3}".prop_filter("no trailing hyphen", |s| {
        !s.split('.').any(|l| l.ends_with('-'))
    })
}

proptest! {
    /// Whatever the resolver answers, an allowed connection only ever goes to public
    /// addresses or to addresses a range rule lists inside their special range.
    #[test]
    fn never_connects_to_an_unlisted_special_address(
        answers in proptest::collection::vec(arb_v4(), 0..6),
        port in 1u16..,
    ) {
        let p = policy("*,192.168.7.0/24");
        let t = Target { host: Host::Name("x.test".into()), port };
        if let Ok(ok) = p.decide(&t, &answers) {
            for a in ok.addrs {
                let ip = a.ip();
                let public = crate::addr::classify(ip) == AddrClass::Public;
                let listed = "192.168.7.0/24".parse::<Cidr>().unwrap().contains(ip);
                prop_assert!(public || listed, "{ip}");
                prop_assert!(answers.contains(&ip));
            }
        }
    }

    /// A name rule matches that name only; a wildcard only names below its suffix.
    #[test]
    fn name_rules_match_exactly(rule in arb_name(), other in arb_name(), port in 1u16..) {
        let p = policy(&rule);
        let t = Target { host: Host::Name(other.clone()), port };
        prop_assert_eq!(p.match_target(&t).is_ok(), rule == other);
        let w = policy(&format!("*.{rule}"));
        let below = other.ends_with(&format!(".{rule}"));
        prop_assert_eq!(w.match_target(&t).is_ok(), below);
    }

    /// Rules print to a string that parses back to the same rule.
    #[test]
    fn rule_display_round_trips(name in arb_name(), port in proptest::option::of(1u16..)) {
        for host in [name.clone(), format!("*.{name}")] {
            let text = match port { Some(p) => format!("{host}:{p}"), None => host };
            let r: Rule = text.parse().unwrap();
            prop_assert_eq!(r.to_string().parse::<Rule>().unwrap(), r);
        }
    }

    #[test]
    fn parsers_never_panic(s in ".{0,80}") {
        let _ = s.parse::<Policy>();
        let _ = Target::parse_authority(&s, Some(80));
    }

    /// A rule the ceiling covers never lets a connection through that the ceiling refuses:
    /// same targets, same or fewer addresses.
    #[test]
    fn covered_rules_allow_nothing_the_ceiling_refuses(
        cap_net in arb_v4(), cap_prefix in 0u8..=32,
        net in arb_v4(), prefix in 0u8..=32,
        addr in arb_v4(), port in 1u16..,
        cap_port in proptest::option::of(1u16..4), rule_port in proptest::option::of(1u16..4),
    ) {
        let cap_rule = Rule { host: HostPattern::Range(Cidr::new(cap_net, cap_prefix).unwrap()), port: cap_port };
        let rule = Rule { host: HostPattern::Range(Cidr::new(net, prefix).unwrap()), port: rule_port };
        let cap = Policy::new(vec![cap_rule]).unwrap();
        let agent = Policy::new(vec![rule.clone()]).unwrap();
        if cap.covers(&rule) {
            for port in [port, 1, 2, 3] {
                let t = Target { host: Host::Ip(addr), port };
                if agent.decide(&t, &[]).is_ok() {
                    prop_assert!(cap.decide(&t, &[]).is_ok(), "{rule} allows {t}, {cap} does not");
                }
            }
        }
    }
}
