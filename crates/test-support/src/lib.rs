//! Test-only helpers shared by the vmcp crates (a dev-dependency only).

mod http;
mod serve;
pub mod vm;

pub use http::{free_port, http_server};
pub use serve::mcp_serve_http;

/// Prints why a test is skipped, straight to the process's stderr.
///
/// The test harness captures `eprintln!` output of passing tests, so a skip reported that way
/// would be silent; this writes past the capture, so every skip shows up in `cargo test` output.
/// Use it as `vmcp_test_support::skipped!("SKIPPED: no python3 ({})", why)` and then return.
#[macro_export]
macro_rules! skipped {
    ($($arg:tt)*) => {
        $crate::write_skip(::std::format_args!($($arg)*))
    };
}

#[doc(hidden)]
pub fn write_skip(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut err = std::io::stderr().lock();
    // Nothing sensible to do if stderr is gone.
    let _ = writeln!(err, "{args}");
}

/// An error and all its sources on one line, `a: b: c`, as the `vmcp` binary prints them; tests
/// assert on what a user would read.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut line = err.to_string();
    let mut cur = err.source();
    while let Some(cause) = cur {
        line.push_str(": ");
        line.push_str(&cause.to_string());
        cur = cause.source();
    }
    line
}

#[cfg(test)]
mod tests {
    #[test]
    fn prints_without_panicking() {
        crate::skipped!("test-support: skip notes reach stderr ({})", 1);
    }

    #[test]
    fn error_chain_joins_sources() {
        let inner = std::io::Error::other("disk on fire");
        assert_eq!(
            crate::error_chain(&Wrapper(inner)),
            "cannot save: disk on fire"
        );
    }

    #[derive(Debug)]
    struct Wrapper(std::io::Error);
    impl std::fmt::Display for Wrapper {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("cannot save")
        }
    }
    impl std::error::Error for Wrapper {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }
}
