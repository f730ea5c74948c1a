//! Making server-controlled text and secret-bearing URLs safe to print.
//!
//! - [`for_display`]: text from a server (an HTTP error body, a JSON-RPC error message, a log
//!   line of a stdio server) with control characters replaced, so it cannot move the cursor,
//!   recolour or retitle the user's terminal (ANSI/OSC escapes, C1 controls, bidi overrides),
//!   and cut to a length.
//! - [`url_for_display`]: an endpoint URL without its credentials (`user:password@`), query
//!   (`?token=...`) and fragment, for every error message and log line.
//!
//! [`for_display`] is the shared `vmcp-sanitize` rule; [`for_terminal`] (multi-line tool output)
//! and [`url_for_display`] are the MCP client's additions.

/// `text` as one printable line of at most `max_chars` characters: the workspace's shared
/// rule, [`vmcp_sanitize::sanitize`] (control characters and bidi controls as `\u{..}`,
/// line breaks as `\n`, a note of what was cut).
pub fn for_display(text: &str, max_chars: usize) -> String {
    vmcp_sanitize::sanitize(text, max_chars)
}

/// `text` for a terminal that shows it as is (multi-line tool output): like [`for_display`]
/// but newlines and tabs are kept and the length is not cut.
pub fn for_terminal(text: &str) -> String {
    if !text.chars().any(|c| c != '\n' && c != '\t' && is_unsafe(c)) {
        return text.to_owned();
    }
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\n' | '\t' => out.push(c),
            c if is_unsafe(c) => {
                use std::fmt::Write as _;
                let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out
}

/// Control and invisible formatting characters a terminal may act on.
fn is_unsafe(c: char) -> bool {
    c.is_control()
        || matches!(c,
            '\u{200b}'..='\u{200f}' // zero-width, LRM/RLM
            | '\u{2028}'..='\u{202e}' // separators, bidi embeddings and overrides
            | '\u{2060}'..='\u{2069}' // word joiner .. bidi isolates
            | '\u{feff}')
}

/// `url` without userinfo, query and fragment: `https://user:pw@h:8443/mcp?token=x#f` ->
/// `https://h:8443/mcp`. Text that is no URL is shown as `<URL>` plus its scheme-less
/// length, never echoed (it may be a secret given in the wrong place). Control characters are
/// escaped and the result is capped like [`for_display`].
pub fn url_for_display(url: &str) -> String {
    let url = url.trim();
    let Some((scheme, rest)) = url.split_once("://") else {
        return format!("<not a URL, {} characters>", url.chars().count());
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let path_end = tail.find(['?', '#']).unwrap_or(tail.len());
    let path = &tail[..path_end];
    let marker = if path_end < tail.len() && tail[path_end..].starts_with('?') {
        "?…"
    } else {
        ""
    };
    for_display(&format!("{scheme}://{host}{path}{marker}"), 300)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_control_characters() {
        let evil = "ok\x1b]0;pwned\x07\x1b[31mred\u{202e}txt\u{9b}2J";
        let shown = for_display(evil, 200);
        assert!(!shown.chars().any(is_unsafe), "{shown}");
        assert!(shown.contains("\\u{1b}]0;pwned\\u{7}"), "{shown}");
        assert!(shown.contains("\\u{202e}"), "{shown}");
        assert_eq!(for_display("a\nb", 10), "a\\nb");
    }

    #[test]
    fn caps_length() {
        assert_eq!(
            for_display(&"é".repeat(500), 3),
            "ééé… (497 more characters)"
        );
        assert_eq!(for_display("abc", 3), "abc");
    }

    #[test]
    fn terminal_text_keeps_lines() {
        assert_eq!(for_terminal("a\nb\tc"), "a\nb\tc");
        assert_eq!(for_terminal("a\x1b[2Jb\r"), "a\\u{1b}[2Jb\\u{d}");
    }

    #[test]
    fn urls_lose_secrets() {
        assert_eq!(
            url_for_display("https://user:s3cret@example.test:8443/mcp?token=abc#frag"),
            "https://example.test:8443/mcp?…"
        );
        assert_eq!(url_for_display("http://h/mcp"), "http://h/mcp");
        assert_eq!(url_for_display("http://a@b@h"), "http://h");
        assert_eq!(url_for_display("http://h#x"), "http://h");
        assert_eq!(url_for_display("s3cret"), "<not a URL, 6 characters>");
        assert!(!url_for_display("http://h/\x1b[2J").contains('\x1b'));
    }
}
