//! Who may talk to the HTTP endpoint: `Host` and `Origin` checks (DNS-rebinding protection)
//! and the bearer token. Pure functions over header values, unit-tested here.
//!
//! A browser page on `http://evil.example` whose name an attacker re-points at 127.0.0.1 sends
//! `Host: evil.example` and `Origin: http://evil.example`: both are refused unless that name
//! was explicitly allowed. Without a `Host` header nothing is accepted. An `Origin` header is
//! optional (non-browser clients send none), but when present its host must be allowed too;
//! the opaque origin `null` is refused.

use std::net::IpAddr;

/// Host names (and IP literals) the server answers to.
#[derive(Debug, Clone)]
pub struct Allowed {
    hosts: Vec<String>,
    origins: Vec<String>,
}

impl Allowed {
    /// Loopback names always; `bound` (the listening IP) and `extra` host names as given;
    /// `origins` are whole origins (`https://app.example:8443`) allowed besides those hosts.
    pub fn new(bound: IpAddr, extra: &[String], origins: &[String]) -> Self {
        let mut hosts: Vec<String> = ["localhost", "127.0.0.1", "::1"]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        if !bound.is_unspecified() {
            hosts.push(bound.to_string());
        }
        hosts.extend(extra.iter().map(|h| h.to_ascii_lowercase()));
        Allowed {
            hosts,
            origins: origins
                .iter()
                .map(|o| o.trim_end_matches('/').to_ascii_lowercase())
                .collect(),
        }
    }

    fn host_ok(&self, host: &str) -> bool {
        let h = host.to_ascii_lowercase();
        self.hosts.contains(&h)
    }

    /// Checks a `Host` header value (`name`, `name:port`, `[v6]:port`).
    pub fn check_host(&self, value: Option<&str>) -> Result<(), String> {
        let Some(v) = value else {
            return Err("the request has no Host header".into());
        };
        match split_host(v) {
            Some(h) if self.host_ok(h) => Ok(()),
            _ => Err(format!(
                "Host {v:?} is not allowed (DNS-rebinding protection; allow it with --allowed-host)"
            )),
        }
    }

    /// Checks an `Origin` header value, when there is one.
    pub fn check_origin(&self, value: Option<&str>) -> Result<(), String> {
        let Some(v) = value else { return Ok(()) };
        let lower = v.trim_end_matches('/').to_ascii_lowercase();
        if self.origins.contains(&lower) {
            return Ok(());
        }
        let rest = lower
            .strip_prefix("http://")
            .or_else(|| lower.strip_prefix("https://"));
        match rest.and_then(split_host) {
            Some(h) if self.host_ok(h) => Ok(()),
            _ => Err(format!(
                "Origin {v:?} is not allowed (DNS-rebinding protection; allow it with --allowed-origin)"
            )),
        }
    }
}

/// The host part of `host[:port]` / `[v6][:port]`, without brackets; `None` when malformed.
fn split_host(v: &str) -> Option<&str> {
    let v = v.trim();
    if let Some(rest) = v.strip_prefix('[') {
        let end = rest.find(']')?;
        let after = &rest[end + 1..];
        if !(after.is_empty() || after.strip_prefix(':').is_some_and(is_port)) {
            return None;
        }
        return Some(&rest[..end]);
    }
    let (h, port) = match v.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (v, None),
    };
    if h.is_empty() || h.contains(':') || h.contains('/') || port.is_some_and(|p| !is_port(p)) {
        return None;
    }
    Some(h)
}

fn is_port(p: &str) -> bool {
    !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit())
}

/// Checks an `Authorization` header against the expected bearer token (constant time).
pub fn check_bearer(expected: &str, value: Option<&str>) -> bool {
    let Some(v) = value else { return false };
    let Some((scheme, token)) = v.trim().split_once(' ') else {
        return false;
    };
    if !scheme.eq_ignore_ascii_case("bearer") {
        return false;
    }
    let (a, b) = (token.trim().as_bytes(), expected.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn loopback() -> Allowed {
        Allowed::new("127.0.0.1".parse().unwrap(), &[], &[])
    }

    #[test]
    fn hosts() {
        let a = loopback();
        for ok in [
            "localhost",
            "localhost:8080",
            "127.0.0.1:1",
            "[::1]:9",
            "[::1]",
            "LOCALHOST:80",
        ] {
            a.check_host(Some(ok))
                .unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in [
            "evil.example",
            "evil.example:8080",
            "127.0.0.1.evil.example",
            "localhost:x",
            "localhost:",
            "",
            "[::1",
            "[::1]x",
            "a:b:c",
        ] {
            assert!(a.check_host(Some(bad)).is_err(), "{bad}");
        }
        assert!(a.check_host(None).unwrap_err().contains("no Host"));
        let wide = Allowed::new("10.0.0.5".parse().unwrap(), &["vm.lan".into()], &[]);
        wide.check_host(Some("10.0.0.5:80")).unwrap();
        wide.check_host(Some("VM.lan")).unwrap();
        assert!(wide.check_host(Some("10.0.0.6")).is_err());
    }

    #[test]
    fn origins() {
        let a = Allowed::new(
            "127.0.0.1".parse().unwrap(),
            &[],
            &["https://app.example".into()],
        );
        a.check_origin(None).unwrap();
        a.check_origin(Some("http://localhost:3000")).unwrap();
        a.check_origin(Some("https://127.0.0.1")).unwrap();
        a.check_origin(Some("https://app.example/")).unwrap();
        for bad in [
            "null",
            "http://evil.example",
            "file://",
            "http://localhost.evil",
            "app.example",
        ] {
            let e = a.check_origin(Some(bad)).unwrap_err();
            assert!(e.contains("DNS-rebinding"), "{bad}: {e}");
        }
    }

    #[test]
    fn bearer() {
        assert!(check_bearer("s3cret", Some("Bearer s3cret")));
        assert!(check_bearer("s3cret", Some("bearer  s3cret ")));
        assert!(!check_bearer("s3cret", Some("Bearer s3cre")));
        assert!(!check_bearer("s3cret", Some("Basic s3cret")));
        assert!(!check_bearer("s3cret", Some("s3cret")));
        assert!(!check_bearer("s3cret", None));
    }

    proptest! {
        #[test]
        fn never_panics(s in "\\PC{0,40}") {
            let a = loopback();
            let _ = a.check_host(Some(&s));
            let _ = a.check_origin(Some(&s));
            let _ = check_bearer("x", Some(&s));
        }
    }
}
