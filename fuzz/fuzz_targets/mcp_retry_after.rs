//! A `Retry-After` header value comes from the network: any bytes must parse to a value or
//! `None`, never panic, and a parsed value must give a wait without overflow.
#![no_main]

use std::time::{Duration, SystemTime};

use libfuzzer_sys::fuzz_target;
use vmcp_mcp::retry::{classify, Failure, RequestKind, RetryAfter, RetryPolicy};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Some(ra) = RetryAfter::parse(text) else {
        return;
    };
    if let RetryAfter::Delay(_) = ra {
        assert!(text.trim().bytes().all(|b| b.is_ascii_digit()));
    }
    for now in [
        SystemTime::UNIX_EPOCH,
        SystemTime::now(),
        SystemTime::UNIX_EPOCH + Duration::from_secs(u32::MAX as u64),
    ] {
        let _ = ra.delay_from(now);
        let failure = Failure::NotProcessed {
            status: 503,
            retry_after: Some(ra),
        };
        let policy = RetryPolicy::new().with_deadline(Some(Duration::from_secs(60)));
        let _ = classify(
            &policy,
            &RequestKind::method("tools/call"),
            &failure,
            1,
            Duration::ZERO,
            now,
            0.5,
        );
    }
});
