//! Per-phase timings on stderr, for finding where the milliseconds of a start go.
//!
//! With `VMCP_TRACE_TIMING=1` in the environment, every [`mark`] prints one line to stderr:
//!
//! ```text
//! vmcp: timing:   48.7 ms  (+  2.1 ms)  qemu: QMP greeting
//! ```
//!
//! the time since the process began timing ([`begin`], called first thing in `main`; else the
//! first mark), the time since the previous mark, and the phase that just ended. Without the
//! variable a mark costs one relaxed atomic load. The lines are for people and may change;
//! nothing parses them.

use std::io::Write;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

/// The environment variable that turns the timing lines on (`1`).
pub const ENV: &str = "VMCP_TRACE_TIMING";

/// 0: not read yet, 1: off, 2: on.
static ENABLED: AtomicU8 = AtomicU8::new(0);
static ORIGIN: OnceLock<Instant> = OnceLock::new();
static LAST: Mutex<Option<Instant>> = Mutex::new(None);

/// Whether timing lines are printed.
pub fn enabled() -> bool {
    match ENABLED.load(Ordering::Relaxed) {
        1 => false,
        2 => true,
        _ => {
            let on = std::env::var_os(ENV).is_some_and(|v| v == "1");
            ENABLED.store(if on { 2 } else { 1 }, Ordering::Relaxed);
            on
        }
    }
}

/// Starts the clock (idempotent); `main` calls it before anything else.
pub fn begin() {
    if enabled() {
        let now = *ORIGIN.get_or_init(Instant::now);
        if let Ok(mut last) = LAST.lock() {
            last.get_or_insert(now);
        }
    }
}

/// Prints that `phase` just ended (only when [`enabled`]).
pub fn mark(phase: &str) {
    if !enabled() {
        return;
    }
    let now = Instant::now();
    let origin = *ORIGIN.get_or_init(|| now);
    let since_last = match LAST.lock() {
        Ok(mut last) => {
            let prev = last.replace(now).unwrap_or(origin);
            now.saturating_duration_since(prev)
        }
        Err(_) => std::time::Duration::ZERO,
    };
    let line = format_line(now.saturating_duration_since(origin), since_last, phase);
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

fn format_line(total: std::time::Duration, step: std::time::Duration, phase: &str) -> String {
    format!(
        "vmcp: timing: {:7.1} ms  (+{:6.1} ms)  {phase}\n",
        total.as_secs_f64() * 1e3,
        step.as_secs_f64() * 1e3
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn lines_show_total_step_and_phase() {
        let l = format_line(
            Duration::from_micros(48_700),
            Duration::from_micros(2_100),
            "x",
        );
        assert_eq!(l, "vmcp: timing:    48.7 ms  (+   2.1 ms)  x\n");
    }
}
