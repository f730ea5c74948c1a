//! Which HTTP redirects the client follows: pure logic, plugged into reqwest by
//! [`super::ReqwestClient`].
//!
//! An MCP request carries credentials (`Authorization`, `X-Api-Key`, whatever `--header`
//! added), the session id and the tool call itself. A redirect may only move it within the
//! origin it was sent to, so the rules are:
//!
//! - same origin only: scheme, host and port of the redirect target equal those of the
//!   *original* request (so a chain cannot walk away one hop at a time); a redirect to
//!   another origin is refused with an error, it is not followed without credentials either,
//!   since the body (the tool call) would still go there;
//! - never from https to http (implied by the origin rule, checked and named on its own);
//! - at most `max` hops (default [`crate::limits::MAX_REDIRECTS`]); loops end there.
//!
//! Credentials therefore only ever go to the origin the user named. reqwest's own policy
//! (10 hops, any host, only `Authorization`/`Cookie` stripped) is replaced entirely.

/// Why a redirect is not followed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RedirectRefusal {
    /// The target is on another origin.
    #[error(
        "the server redirected to another origin ({to}); only redirects within {from} are followed"
    )]
    OtherOrigin {
        /// The original origin (shown without credentials).
        from: String,
        /// The target (shown without credentials and query).
        to: String,
    },
    /// From https to http.
    #[error("the server redirected from https to http ({to}); refused")]
    Downgrade {
        /// The target.
        to: String,
    },
    /// Too many hops.
    #[error("more than {0} redirects")]
    TooMany(usize),
    /// The target is not an absolute http(s) URL.
    #[error("the server redirected to {0}, which is not an http(s) URL")]
    BadTarget(String),
}

/// Scheme, host and port.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Origin {
    scheme: String,
    host: String,
    port: u16,
}

fn origin(url: &str) -> Option<Origin> {
    let uri: http::Uri = url.parse().ok()?;
    let scheme = uri.scheme_str()?.to_ascii_lowercase();
    let default = match scheme.as_str() {
        "http" => 80,
        "https" => 443,
        _ => return None,
    };
    let host = uri.host()?.to_ascii_lowercase();
    Some(Origin {
        port: uri.port_u16().unwrap_or(default),
        scheme,
        host,
    })
}

/// Decides whether to follow a redirect from a request originally sent to `original` to
/// `target`, after `hops` redirects were already followed. `Ok(())` = follow.
pub fn check(original: &str, target: &str, hops: usize, max: usize) -> Result<(), RedirectRefusal> {
    if hops >= max {
        return Err(RedirectRefusal::TooMany(max));
    }
    // The query and fragment never reach a message, even when the URL does not parse.
    let shown =
        |u: &str| crate::sanitize::url_for_display(u.split(['?', '#']).next().unwrap_or_default());
    let Some(to) = origin(target) else {
        return Err(RedirectRefusal::BadTarget(shown(target)));
    };
    let Some(from) = origin(original) else {
        return Err(RedirectRefusal::BadTarget(shown(original)));
    };
    if from.scheme == "https" && to.scheme == "http" {
        return Err(RedirectRefusal::Downgrade { to: shown(target) });
    }
    if from != to {
        return Err(RedirectRefusal::OtherOrigin {
            from: format!("{}://{}:{}", from.scheme, from.host, from.port),
            to: shown(target),
        });
    }
    Ok(())
}

/// The reqwest policy applying [`check`] with at most `max` hops.
pub(crate) fn policy(max: usize) -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(move |attempt| {
        let previous = attempt.previous();
        let original = previous.first().map(|u| u.as_str().to_owned());
        let hops = previous.len().saturating_sub(1);
        let original = original.unwrap_or_default();
        match check(&original, attempt.url().as_str(), hops, max) {
            Ok(()) => attempt.follow(),
            Err(refusal) => attempt.error(refusal),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_origin_is_followed() {
        assert_eq!(check("http://h:8/a", "http://h:8/b?x=1", 0, 3), Ok(()));
        assert_eq!(check("https://H/a", "https://h:443/b", 2, 3), Ok(()));
        assert_eq!(check("http://h/a", "http://h:80/b", 0, 3), Ok(()));
    }

    #[test]
    fn other_origins_downgrades_and_loops_are_refused() {
        assert!(matches!(
            check("http://h/a", "http://evil/a", 0, 3),
            Err(RedirectRefusal::OtherOrigin { .. })
        ));
        assert!(matches!(
            check("http://h:1/a", "http://h:2/a", 0, 3),
            Err(RedirectRefusal::OtherOrigin { .. })
        ));
        assert!(matches!(
            check("https://h/a", "http://h/a", 0, 3),
            Err(RedirectRefusal::Downgrade { .. })
        ));
        assert!(matches!(
            check("http://h/a", "https://h/a", 0, 3),
            Err(RedirectRefusal::OtherOrigin { .. })
        ));
        assert_eq!(
            check("http://h/a", "http://h/b", 3, 3),
            Err(RedirectRefusal::TooMany(3))
        );
        assert!(matches!(
            check("http://h/a", "file:///etc/passwd", 0, 3),
            Err(RedirectRefusal::BadTarget(_))
        ));
        // No secret of the target in the message.
        let e = check("http://h/a", "http://u:pw@evil/?token=t", 0, 3).unwrap_err();
        assert!(
            !e.to_string().contains("pw") && !e.to_string().contains("token"),
            "{e}"
        );
    }

    proptest::proptest! {
        /// Whatever the URLs, a followed redirect stays on the original origin and within
        /// the hop limit.
        #[test]
        fn followed_means_same_origin(a in "(http|https|ftp)://[a-c]{1,2}(:[0-9]{1,3})?/[a-z]{0,3}",
                                      b in "(http|https|ftp)://[a-c]{1,2}(:[0-9]{1,3})?/[a-z]{0,3}",
                                      hops in 0usize..6) {
            if check(&a, &b, hops, 3).is_ok() {
                proptest::prop_assert!(hops < 3);
                proptest::prop_assert_eq!(origin(&a), origin(&b));
            }
        }
    }
}
