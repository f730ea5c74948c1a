//! The `*/list` pagination driver against any sequence of pages a server may send (cursors,
//! item counts, sizes, elapsed time from the input): it never hands out a cursor twice, never
//! goes past its page limit, and stops on every other bound.
#![no_main]

use std::collections::HashSet;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use vmcp_mcp::limits::{Limits, Page, Pager};

fuzz_target!(|data: &[u8]| {
    let limits = Limits::default().with_list(16, 200, 4096, Duration::from_secs(60));
    let mut pager = Pager::new(&limits);
    let mut given = HashSet::new();
    let mut fetched = 1usize;
    // Each page: [cursor byte (0 = none), items, size, elapsed seconds].
    for chunk in data.chunks(4) {
        let [c, items, size, secs] = <[u8; 4]>::try_from(chunk).unwrap_or([0; 4]);
        let cursor = (c != 0).then(|| format!("{}", c % 24));
        let page = Page {
            items: usize::from(items),
            bytes: usize::from(size) * 8,
            nodes: usize::from(items) * 3,
            next_cursor: cursor.as_deref(),
        };
        match pager.page(page, Duration::from_secs(u64::from(secs))) {
            Ok(Some(next)) => {
                assert!(given.insert(next), "a cursor handed out twice");
                fetched += 1;
                assert!(fetched <= 16, "past the page limit");
            }
            Ok(None) | Err(_) => return,
        }
    }
});
