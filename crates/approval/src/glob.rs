//! The glob dialect of policy rules, matched without allocation or backtracking blow-up.
//!
//! - `*` matches any run of characters except `/`;
//! - `**` matches any run of characters including `/` (so `**/x` also matches `x` and `a/b/x`);
//! - `?` matches one character except `/`;
//! - `\` escapes the next character;
//! - everything else matches itself. Matching of `host` globs is ASCII case-insensitive (the
//!   caller lower-cases both sides).
//!
//! The matcher is a table over (pattern position, text position), so hostile patterns and texts
//! (both capped by the caller) cost at most O(pattern × text), never exponential backtracking.

/// One element of a compiled pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    Lit(char),
    Any,
    Star,
    DoubleStar,
}

/// A compiled glob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Glob {
    source: String,
    toks: Vec<Tok>,
}

impl Glob {
    /// Compiles `pattern`; fails on a trailing lone `\`.
    pub(crate) fn new(pattern: &str) -> Result<Self, String> {
        let mut toks = Vec::new();
        let mut chars = pattern.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some(e) => toks.push(Tok::Lit(e)),
                    None => return Err("the pattern ends with a lone `\\`".into()),
                },
                '?' => toks.push(Tok::Any),
                '*' => {
                    if chars.peek() == Some(&'*') {
                        chars.next();
                        while chars.peek() == Some(&'*') {
                            chars.next();
                        }
                        // `**/` also matches nothing at all, so `**/x` matches `x`.
                        if chars.peek() == Some(&'/') {
                            chars.next();
                            toks.push(Tok::DoubleStar);
                            toks.push(Tok::Lit('/'));
                            continue;
                        }
                        toks.push(Tok::DoubleStar);
                    } else {
                        toks.push(Tok::Star);
                    }
                }
                c => toks.push(Tok::Lit(c)),
            }
        }
        Ok(Glob {
            source: pattern.to_owned(),
            toks,
        })
    }

    /// The pattern as written.
    pub(crate) fn as_str(&self) -> &str {
        &self.source
    }

    /// Whether the whole of `text` matches.
    ///
    /// Bottom-up dynamic programming over (pattern position, text position): O(pattern × text)
    /// time and space whatever the input, no recursion.
    pub(crate) fn matches(&self, text: &str) -> bool {
        let text: Vec<char> = text.chars().collect();
        let (np, nt) = (self.toks.len(), text.len());
        let w = nt + 1;
        // dp[p * w + t]: toks[p..] matches text[t..].
        let mut dp = vec![false; (np + 1) * w];
        let at = |p: usize, t: usize| p * w + t;
        if let Some(end) = dp.get_mut(at(np, nt)) {
            *end = true;
        }
        for p in (0..np).rev() {
            for t in (0..=nt).rev() {
                let get =
                    |dp: &[bool], p: usize, t: usize| dp.get(at(p, t)).copied().unwrap_or(false);
                let c = text.get(t);
                let r = match &self.toks[p] {
                    Tok::Lit(l) => c == Some(l) && get(&dp, p + 1, t + 1),
                    Tok::Any => c.is_some_and(|c| *c != '/') && get(&dp, p + 1, t + 1),
                    Tok::Star => {
                        get(&dp, p + 1, t) || (c.is_some_and(|c| *c != '/') && get(&dp, p, t + 1))
                    }
                    Tok::DoubleStar => {
                        // `**/` may also match the empty string including its slash.
                        let skip_slash =
                            self.toks.get(p + 1) == Some(&Tok::Lit('/')) && get(&dp, p + 2, t);
                        skip_slash || get(&dp, p + 1, t) || (c.is_some() && get(&dp, p, t + 1))
                    }
                };
                if let Some(slot) = dp.get_mut(at(p, t)) {
                    *slot = r;
                }
            }
        }
        dp.first().copied().unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::Glob;
    use proptest::prelude::*;

    fn g(p: &str) -> Glob {
        Glob::new(p).unwrap()
    }

    #[test]
    fn basics() {
        assert!(g("*.rs").matches("main.rs"));
        assert!(!g("*.rs").matches("src/main.rs"));
        assert!(g("**/*.rs").matches("src/main.rs"));
        assert!(g("**/*.rs").matches("main.rs"));
        assert!(g("**").matches(""));
        assert!(g("**").matches("a/b/c"));
        assert!(g("/src/**").matches("/src/a/b"));
        assert!(g("/src/**").matches("/src/"));
        assert!(!g("/src/**").matches("/srcx/a"));
        assert!(g("**/.git/**").matches("/x/.git/config"));
        assert!(g("**/.git/**").matches(".git/config"));
        assert!(!g("**/.git/**").matches("/x/.github/config"));
        assert!(g("a?c").matches("abc"));
        assert!(!g("a?c").matches("a/c"));
        assert!(g("\\*").matches("*"));
        assert!(!g("\\*").matches("x"));
        assert!(g("git *").matches("git push origin"));
        assert!(g("*.pypi.org").matches("files.pypi.org"));
        assert!(!g("*.pypi.org").matches("pypi.org"));
        assert!(Glob::new("a\\").is_err());
        assert!(g("").matches(""));
        assert!(!g("").matches("a"));
    }

    #[test]
    fn hostile_pattern_is_fast() {
        let p = "*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*b".repeat(4);
        let t = "a".repeat(4096);
        let start = std::time::Instant::now();
        assert!(!g(&p).matches(&t));
        // A table, not backtracking. Generous bound for a loaded 2-core machine.
        assert!(start.elapsed() < std::time::Duration::from_secs(20));
    }

    proptest! {
        #[test]
        fn literal_matches_itself(s in "[a-z/._-]{0,30}") {
            prop_assert!(g(&s).matches(&s));
        }

        #[test]
        fn double_star_matches_everything(s in "\\PC{0,40}") {
            prop_assert!(g("**").matches(&s));
        }

        #[test]
        fn star_never_crosses_slash(a in "[a-z]{0,8}", b in "[a-z]{0,8}") {
            let text = format!("{a}/{b}");
            prop_assert!(!g("*").matches(&text));
            prop_assert!(g("*/*").matches(&text));
        }

        #[test]
        fn suffix_glob(stem in "[a-z/]{0,20}", ext in "[a-z]{1,4}") {
            let text = format!("{stem}.{ext}");
            let yes = g(&format!("**.{ext}"));
            let no = g(&format!("**.{ext}x"));
            prop_assert!(yes.matches(&text));
            prop_assert!(!no.matches(&text));
        }

        #[test]
        fn never_panics(p in "\\PC{0,20}", t in "\\PC{0,40}") {
            if let Ok(glob) = Glob::new(&p) {
                let _ = glob.matches(&t);
            }
        }
    }
}
