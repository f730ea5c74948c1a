//! Test-only helpers shared by the vmcp crates (a dev-dependency only).

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

#[cfg(test)]
mod tests {
    #[test]
    fn prints_without_panicking() {
        crate::skipped!("test-support: skip notes reach stderr ({})", 1);
    }
}
