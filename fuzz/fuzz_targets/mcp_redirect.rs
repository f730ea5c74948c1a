//! The redirect policy as pure logic, on any pair of URLs a server could name: it never
//! panics, and a redirect it follows stays on the original scheme, host and port and within
//! the hop limit. Messages never contain the target's userinfo or query.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmcp_mcp::http::redirect;

fn origin(u: &str) -> Option<(String, String, u16)> {
    let uri: http::Uri = u.parse().ok()?;
    let scheme = uri.scheme_str()?.to_ascii_lowercase();
    let port = uri.port_u16().unwrap_or(if scheme == "https" { 443 } else { 80 });
    Some((scheme, uri.host()?.to_ascii_lowercase(), port))
}

fuzz_target!(|data: &[u8]| {
    let hops = usize::from(data.first().copied().unwrap_or(0) % 6);
    let text = String::from_utf8_lossy(data.get(1..).unwrap_or_default());
    let (a, b) = text.split_once('\n').unwrap_or((&text, ""));
    match redirect::check(a, b, hops, 3) {
        Ok(()) => {
            assert!(hops < 3);
            assert!(origin(a).is_some());
            assert_eq!(origin(a), origin(b));
        }
        Err(e) => {
            let shown = e.to_string();
            if let Some((before, rest)) = b.split_once('?') {
                // The message for the same target without its query is the baseline: text
                // that the fixed wording ("more than 3 redirects") happens to share with the
                // query is not a leak.
                let baseline = redirect::check(a, before, hops, 3)
                    .err()
                    .map(|e| e.to_string())
                    .unwrap_or_default();
                if rest.len() > 8
                    && !a.contains(rest)
                    && !before.contains(rest)
                    && !baseline.contains(rest)
                {
                    assert!(!shown.contains(rest), "query shown: {shown}");
                }
            }
        }
    }
});
