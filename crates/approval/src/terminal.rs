//! Asking on the terminal: a readable description of what would cross, then `y/n`.
//!
//! [`TerminalAsker::stdio`] asks on the process's stdin/stderr when stdin is a terminal and
//! otherwise denies at once (`stdin is not a terminal`), so a scripted run never waits for an
//! answer nobody can give. Questions are asked one at a time. Everything shown that came from
//! the sandbox (file names, diff lines, host names) is passed through [`printable`], so escape
//! sequences cannot reach the terminal.
//!
//! Limit: a question that is decided elsewhere (the page, the timeout) while the prompt is
//! shown still consumes the next line typed; that answer is then ignored (printed as too late).

use std::io::{BufRead, Read, Write};
use std::sync::{Arc, Mutex, PoisonError};

use crate::broker::Asker;
use crate::crossing::{Crossing, Decision, PendingApproval};

/// `s` with control characters escaped and cut at 512 characters: safe to print.
pub fn printable(s: &str) -> String {
    vmcp_sanitize::sanitize(s, 512)
}

struct Io {
    input: Box<dyn BufRead + Send>,
    output: Box<dyn Write + Send>,
}

/// Asks on a terminal; see the module docs.
pub struct TerminalAsker {
    io: Arc<Mutex<Io>>,
    interactive: bool,
    with_diffs: bool,
}

impl std::fmt::Debug for TerminalAsker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TerminalAsker")
            .field("interactive", &self.interactive)
            .finish_non_exhaustive()
    }
}

impl TerminalAsker {
    /// Reads answers from stdin and writes questions to stderr; interactive only when stdin
    /// is a terminal.
    pub fn stdio() -> Self {
        use std::io::IsTerminal;
        let interactive = std::io::stdin().is_terminal();
        Self::new(
            std::io::BufReader::new(std::io::stdin()),
            std::io::stderr(),
            interactive,
        )
    }

    /// Asks on `input`/`output`; when `interactive` is false every question is denied unasked.
    pub fn new(
        input: impl BufRead + Send + 'static,
        output: impl Write + Send + 'static,
        interactive: bool,
    ) -> Self {
        TerminalAsker {
            io: Arc::new(Mutex::new(Io {
                input: Box::new(input),
                output: Box::new(output),
            })),
            interactive,
            with_diffs: true,
        }
    }

    /// Whether diffs are printed with the change list (default: yes).
    pub fn with_diffs(mut self, yes: bool) -> Self {
        self.with_diffs = yes;
        self
    }

    /// The text shown before the `y/n` prompt.
    pub fn describe(pending: &PendingApproval, with_diffs: bool) -> String {
        let mut s = format!("vmcp: approval needed: {}\n", pending.crossing.headline());
        if let Some(c) = &pending.context {
            s.push_str(&format!("  caused by: {}\n", printable(c)));
        }
        if let Crossing::ShareChanges { changes, .. } = &pending.crossing {
            s.push_str(&changes.summary(with_diffs));
        }
        s
    }
}

/// Parses an answer line: `Some(true)` for yes, `Some(false)` for no, `None` to ask again.
fn parse_answer(line: &str) -> Option<bool> {
    match line.trim().to_ascii_lowercase().as_str() {
        "y" | "yes" => Some(true),
        "n" | "no" | "" => Some(false),
        _ => None,
    }
}

#[async_trait::async_trait]
impl Asker for TerminalAsker {
    fn name(&self) -> &str {
        "terminal"
    }

    async fn ask(&self, pending: &PendingApproval) -> Option<Decision> {
        if !self.interactive {
            return Some(Decision::deny(
                "stdin is not a terminal, so nobody could be asked",
            ));
        }
        let io = Arc::clone(&self.io);
        let text = Self::describe(pending, self.with_diffs);
        let answer = tokio::task::spawn_blocking(move || {
            let mut io = io.lock().unwrap_or_else(PoisonError::into_inner);
            let Io { input, output } = &mut *io;
            let _ = output.write_all(text.as_bytes());
            // At most a few tries; a line is read with a bound so a huge paste cannot grow it.
            for _ in 0..3 {
                let _ = output.write_all(b"Approve? [y/N] ");
                let _ = output.flush();
                let mut line = Vec::new();
                let reader: &mut (dyn BufRead + Send) = &mut **input;
                match Read::take(reader, 1024).read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => return false,
                    Ok(_) => {}
                }
                if let Some(yes) = parse_answer(&String::from_utf8_lossy(&line)) {
                    return yes;
                }
                let _ = output.write_all(b"please answer y or n\n");
            }
            false
        })
        .await
        .unwrap_or(false);
        Some(if answer {
            Decision::Approved
        } else {
            Decision::deny("denied on the terminal")
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers() {
        assert_eq!(parse_answer("y\n"), Some(true));
        assert_eq!(parse_answer(" YES "), Some(true));
        assert_eq!(parse_answer("n"), Some(false));
        assert_eq!(parse_answer("\n"), Some(false));
        assert_eq!(parse_answer("maybe"), None);
    }

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn pending() -> PendingApproval {
        use crate::change::{ChangeKind, ChangeSet, Diff, FileChange};
        PendingApproval {
            id: "p-1".into(),
            crossing: Crossing::ShareChanges {
                sandbox: "vm\u{1b}[31m".into(),
                host_dir: "/home/me/src".into(),
                changes: ChangeSet {
                    entries: vec![FileChange {
                        path: "notes\u{1b}]0;pwned\u{7}.txt".into(),
                        kind: ChangeKind::Modified,
                        old_size: Some(4),
                        new_size: Some(8),
                        new_sha256: Some("00".into()),
                        diff: Diff::Text {
                            unified: "@@ -1 +1 @@\n-old\n+new \u{1b}[2J\n".into(),
                            truncated: false,
                        },
                    }],
                    omitted: 0,
                    refused: vec![],
                },
            },
            context: Some("tool run".into()),
            created_at: std::time::SystemTime::now(),
            expires_at: std::time::SystemTime::now(),
            changes_hash: String::new(),
        }
    }

    async fn ask(input: &str, interactive: bool) -> (Option<Decision>, String) {
        let out = Shared::default();
        let asker = TerminalAsker::new(
            std::io::Cursor::new(input.as_bytes().to_vec()),
            out.clone(),
            interactive,
        );
        let d = asker.ask(&pending()).await;
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        (d, text)
    }

    #[tokio::test]
    async fn asks_and_parses() {
        let (d, text) = ask("y\n", true).await;
        assert_eq!(d, Some(Decision::Approved));
        assert!(text.contains("approval needed: sandbox vm"), "{text}");
        assert!(text.contains("modified notes"), "{text}");
        assert!(text.contains("+new"), "{text}");
        assert!(text.contains("caused by: tool run"), "{text}");
        assert!(
            !text.contains('\u{1b}') && !text.contains('\u{7}'),
            "{text:?}"
        );

        let (d, text) = ask("what\nno\n", true).await;
        assert_eq!(d, Some(Decision::deny("denied on the terminal")));
        assert!(text.contains("please answer y or n"), "{text}");

        // End of input, or only garbage: denied.
        assert!(!ask("", true).await.0.unwrap().is_approved());
        assert!(!ask("a\nb\nc\ny\n", true).await.0.unwrap().is_approved());
        // A huge line is read in bounded pieces, not approved.
        let huge = format!("{}y\n", "x".repeat(100_000));
        assert!(!ask(&huge, true).await.0.unwrap().is_approved());
    }

    #[tokio::test]
    async fn not_a_terminal_denies_without_asking() {
        let (d, text) = ask("y\n", false).await;
        match d {
            Some(Decision::Denied { reason }) => assert!(reason.contains("not a terminal")),
            d => panic!("{d:?}"),
        }
        assert!(text.is_empty());
    }
}
