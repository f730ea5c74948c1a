//! File contents in a change list come from the guest: the diff must never panic, must stay
//! within its byte bound (plus the one marker line), and must be empty exactly when nothing
//! changed. Policy globs are matched against guest-chosen paths: never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmcp_approval::fuzzing::{glob_matches, unified};

const MARKER: usize = "\\ diff truncated\n".len();

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (old, new) = text.split_once('\u{0}').unwrap_or((text, ""));
    let max = 1 + (data.len() % 512);
    let (d, truncated) = unified(old, new, max);
    assert!(d.len() <= max + MARKER, "{} > {max}", d.len());
    if !truncated {
        assert_eq!(d.is_empty(), old == new);
    }
    let (pattern, path) = old.split_at(old.len().min(old.find('\n').unwrap_or(old.len())));
    let _ = glob_matches(pattern, path);
});
