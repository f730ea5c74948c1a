//! Text from untrusted peers (a guest agent, a remote MCP server), made safe to print.
//!
//! A peer's text can carry terminal escape sequences (which can rewrite the user's screen,
//! set the window title or, on some terminals, answer back), Unicode bidirectional overrides
//! (which reorder what is shown), forged line breaks (which make a fake `vmcp: ...` line)
//! and megabytes of bytes. [`sanitize`] turns such text into one bounded line: every control
//! character and bidi control becomes a visible escape (`\u{1b}`), `\n`, `\r` and `\t` become
//! `\n`, `\r` and `\t`, and the result is cut after a number of characters with a note of how
//! much was left out.
//!
//! ```
//! let shown = vmcp_sanitize::sanitize("red\u{1b}[31m\nline", 80);
//! assert_eq!(shown, "red\\u{1b}[31m\\nline");
//! let long = vmcp_sanitize::sanitize(&"x".repeat(1000), 10);
//! assert_eq!(long, "xxxxxxxxxx… (990 more characters)");
//! ```
//!
//! Platform independent; no dependencies.

/// Longest text, in characters, that error messages show of a peer's text unless the caller
/// asks for another bound.
pub const DEFAULT_MAX_CHARS: usize = 512;

/// `text` as one printable line of at most `max_chars` characters (plus the escapes and a
/// note of what was cut).
pub fn sanitize(text: &str, max_chars: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max_chars.saturating_mul(2)) + 32);
    let mut chars = text.chars();
    for c in chars.by_ref().take(max_chars) {
        push_safe(&mut out, c);
    }
    let rest = chars.count();
    if rest > 0 {
        out.push_str(&format!("… ({rest} more characters)"));
    }
    out
}

/// [`sanitize`] of bytes that may not be UTF-8 (invalid sequences become U+FFFD). Reads at
/// most about `4 * max_chars` bytes of `bytes`, so a huge buffer costs nothing extra.
pub fn sanitize_bytes(bytes: &[u8], max_chars: usize) -> String {
    let window = max_chars.saturating_mul(4).saturating_add(4);
    if bytes.len() <= window {
        return sanitize(&String::from_utf8_lossy(bytes), max_chars);
    }
    let head = String::from_utf8_lossy(&bytes[..window]);
    let mut out = sanitize(&head, max_chars);
    if !out.ends_with("more characters)") {
        out.push('…');
    }
    out.push_str(&format!(" ({} bytes in all)", bytes.len()));
    out
}

fn push_safe(out: &mut String, c: char) {
    match c {
        '\n' => out.push_str("\\n"),
        '\r' => out.push_str("\\r"),
        '\t' => out.push_str("\\t"),
        c if c.is_control() || is_bidi_control(c) => {
            out.push_str(&format!("\\u{{{:x}}}", c as u32));
        }
        c => out.push(c),
    }
}

/// Unicode bidirectional formatting characters (they reorder how a line is displayed).
fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{200e}' | '\u{200f}' | '\u{061c}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_controls_and_keeps_text() {
        assert_eq!(sanitize("plain text ü", 100), "plain text ü");
        assert_eq!(
            sanitize("a\u{1b}]0;title\u{7}b", 100),
            "a\\u{1b}]0;title\\u{7}b"
        );
        assert_eq!(sanitize("x\u{9b}2Jy", 100), "x\\u{9b}2Jy");
        assert_eq!(
            sanitize("l1\r\nvmcp: fake\tz", 100),
            "l1\\r\\nvmcp: fake\\tz"
        );
        assert_eq!(sanitize("ab\u{202e}cd", 100), "ab\\u{202e}cd");
        assert_eq!(sanitize("\0", 100), "\\u{0}");
    }

    #[test]
    fn caps_length() {
        assert_eq!(sanitize("abcdef", 3), "abc… (3 more characters)");
        assert_eq!(sanitize("abc", 3), "abc");
        assert_eq!(sanitize("", 0), "");
        let huge = "\u{1b}".repeat(1 << 20);
        let s = sanitize(&huge, DEFAULT_MAX_CHARS);
        assert!(s.len() < DEFAULT_MAX_CHARS * 8 + 64, "{}", s.len());
        assert!(!s.contains('\u{1b}'));
    }

    #[test]
    fn bytes_are_bounded_before_decoding() {
        assert_eq!(sanitize_bytes(b"ok\xff", 10), "ok\u{fffd}");
        let big = vec![b'a'; 1 << 20];
        let s = sanitize_bytes(&big, 8);
        assert!(s.starts_with("aaaaaaaa…"), "{s}");
        assert!(s.ends_with("(1048576 bytes in all)"), "{s}");
        assert!(s.len() < 100);
    }
}
