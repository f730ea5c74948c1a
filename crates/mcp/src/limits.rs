//! Every bound the MCP client puts on what a server can make it hold, do or print, in one
//! place.
//!
//! A remote MCP server is untrusted (ARCHITECTURE.md): whatever it sends, the client's memory,
//! time, task count and output stay within the numbers below. Each constant is the default of
//! a [`Limits`] field; the transports and the client take their bounds from a `Limits` value
//! ([`crate::ClientConfig::limits`], [`crate::http::HttpConfig::limits`]), so an embedder can
//! raise one without touching the others. docs/security.md ("MCP client") lists them with the
//! reasoning and the test that tries to break each.
//!
//! How the defaults were chosen: the largest message the reference servers
//! (`@modelcontextprotocol/server-everything`, the Python SDK) send in the interop tests is a
//! few KiB (`tools/list` of server-everything: about 10 KiB); large real-world servers list
//! some hundred tools (a few hundred KiB). A resource or tool result may carry a file, so a
//! single message may be much larger than that, but not hundreds of MiB. The defaults leave
//! two orders of magnitude of headroom over real traffic while keeping the worst case of all
//! bounds together under the 64 MB RSS the soak test holds the CLI to (BENCHMARKS.md).
//!
//! Also here: [`Pager`], the pure driver of `*/list` pagination, and [`json_nodes`], the cost
//! check that runs before a server's answer is decoded into typed values.

use std::collections::HashSet;
use std::time::Duration;

/// Largest JSON body, SSE event or stdio line accepted from a server (8 MiB).
pub const MAX_MESSAGE_BYTES: usize = 8 << 20;
/// Most messages in one JSON-RPC batch (a JSON array body or SSE event).
pub const MAX_BATCH_ITEMS: usize = 256;
/// Most JSON values (objects, arrays, strings, numbers, ...) a result may contain before it is
/// decoded into typed values; for `*/list`, the sum over all pages. A `serde_json::Value` node
/// costs up to ~80 bytes, so 250 000 nodes stay below 20 MB however the server shapes them.
pub const MAX_RESULT_NODES: usize = 250_000;
/// Most pages one `*/list` call fetches.
pub const MAX_LIST_PAGES: usize = 1_000;
/// Most items one `*/list` call collects over all pages.
pub const MAX_LIST_ITEMS: usize = 20_000;
/// Most result bytes one `*/list` call reads over all pages (16 MiB).
pub const MAX_LIST_BYTES: usize = 16 << 20;
/// Longest a `*/list` call may take over all pages.
pub const MAX_LIST_TIME: Duration = Duration::from_secs(300);
/// Longest `nextCursor` accepted (the cursors seen are kept to detect loops).
pub const MAX_CURSOR_BYTES: usize = 4 << 10;
/// Server-to-client requests (`ping`, `roots/list`, ...) handled at the same time.
pub const MAX_SERVER_REQUESTS: usize = 16;
/// Further server requests answered at once with a JSON-RPC "busy" error while the handlers
/// are all in use; beyond both, requests are dropped with a rate-limited warning.
pub const MAX_SERVER_REJECTS: usize = 16;
/// Messages waiting in the HTTP transport's receive queue; readers wait when it is full.
pub const RECEIVE_QUEUE_MESSAGES: usize = 256;
/// Bytes waiting in the HTTP transport's receive queue (16 MiB); readers wait when it is full.
pub const RECEIVE_QUEUE_BYTES: usize = 16 << 20;
/// Notifications waiting for the reader of [`crate::Client::notifications`]; newer ones are
/// dropped (with a rate-limited warning) when it is full.
pub const NOTIFICATION_QUEUE: usize = 1_024;
/// Shortest wait before reopening a server's SSE stream, whatever its `retry:` says.
pub const SSE_MIN_RECONNECT: Duration = Duration::from_millis(500);
/// Longest wait between reopenings of a server's SSE stream (backoff cap).
pub const SSE_MAX_RECONNECT: Duration = Duration::from_secs(30);
/// Redirects followed per HTTP request (same origin only, see [`crate::http::redirect`]);
/// the default of [`crate::http::ReqwestOptions::max_redirects`].
pub const MAX_REDIRECTS: usize = 3;
/// Longest server-supplied text put into an error message or log line (characters).
pub const MAX_PRINTED_CHARS: usize = 200;
/// Longest stdio stderr line logged (bytes; the rest of the line is dropped).
pub const MAX_STDERR_LINE: usize = 4 << 10;
/// Most JSON values of a JSON-RPC error's `data` that are decoded (larger data is dropped,
/// the error is kept).
pub const ERROR_DATA_MAX_NODES: usize = 4096;

/// The bounds in effect for one client or transport. Defaults: the constants of this module.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Limits {
    /// [`MAX_MESSAGE_BYTES`].
    pub max_message_bytes: usize,
    /// [`MAX_BATCH_ITEMS`].
    pub max_batch_items: usize,
    /// [`MAX_RESULT_NODES`].
    pub max_result_nodes: usize,
    /// [`MAX_LIST_PAGES`].
    pub max_list_pages: usize,
    /// [`MAX_LIST_ITEMS`].
    pub max_list_items: usize,
    /// [`MAX_LIST_BYTES`].
    pub max_list_bytes: usize,
    /// [`MAX_LIST_TIME`].
    pub max_list_time: Duration,
    /// [`MAX_SERVER_REQUESTS`].
    pub max_server_requests: usize,
    /// [`MAX_SERVER_REJECTS`].
    pub max_server_rejects: usize,
    /// [`RECEIVE_QUEUE_MESSAGES`].
    pub receive_queue_messages: usize,
    /// [`RECEIVE_QUEUE_BYTES`].
    pub receive_queue_bytes: usize,
    /// [`NOTIFICATION_QUEUE`].
    pub notification_queue: usize,
    /// [`SSE_MIN_RECONNECT`].
    pub sse_min_reconnect: Duration,
    /// [`SSE_MAX_RECONNECT`].
    pub sse_max_reconnect: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_bytes: MAX_MESSAGE_BYTES,
            max_batch_items: MAX_BATCH_ITEMS,
            max_result_nodes: MAX_RESULT_NODES,
            max_list_pages: MAX_LIST_PAGES,
            max_list_items: MAX_LIST_ITEMS,
            max_list_bytes: MAX_LIST_BYTES,
            max_list_time: MAX_LIST_TIME,
            max_server_requests: MAX_SERVER_REQUESTS,
            max_server_rejects: MAX_SERVER_REJECTS,
            receive_queue_messages: RECEIVE_QUEUE_MESSAGES,
            receive_queue_bytes: RECEIVE_QUEUE_BYTES,
            notification_queue: NOTIFICATION_QUEUE,
            sse_min_reconnect: SSE_MIN_RECONNECT,
            sse_max_reconnect: SSE_MAX_RECONNECT,
        }
    }
}

impl Limits {
    /// Sets the `*/list` bounds (pages, items, result bytes, total time).
    pub fn with_list(mut self, pages: usize, items: usize, bytes: usize, time: Duration) -> Self {
        self.max_list_pages = pages;
        self.max_list_items = items;
        self.max_list_bytes = bytes;
        self.max_list_time = time;
        self
    }

    /// Sets the largest message accepted.
    pub fn with_max_message_bytes(mut self, bytes: usize) -> Self {
        self.max_message_bytes = bytes;
        self
    }

    /// Sets how many server requests are handled, and how many more rejected, at once.
    pub fn with_server_requests(mut self, handled: usize, rejected: usize) -> Self {
        self.max_server_requests = handled.max(1);
        self.max_server_rejects = rejected;
        self
    }
}

/// A bound was hit. The message names the bound and its value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LimitError {
    /// More pages than allowed.
    #[error("more than {0} pages")]
    Pages(usize),
    /// More items than allowed.
    #[error("more than {0} items")]
    Items(usize),
    /// More bytes than allowed.
    #[error("more than {0} bytes of results")]
    Bytes(usize),
    /// Took too long.
    #[error("not complete after {:.0} s", .0.as_secs_f64())]
    Time(Duration),
    /// The server sent a cursor it had sent before (it would never end).
    #[error("the server repeated the page cursor {0:?} (a pagination loop)")]
    RepeatedCursor(String),
    /// A cursor longer than allowed.
    #[error("a page cursor longer than {0} bytes")]
    CursorTooLong(usize),
    /// A result with more JSON values than allowed.
    #[error("more than {0} JSON values in the answer")]
    Nodes(usize),
}

/// The pagination driver of a `*/list` call: pure bookkeeping, no I/O.
///
/// The caller fetches the first page without a cursor, then after each page calls
/// [`Pager::page`] with what the page held; `Ok(Some(cursor))` means fetch the page at
/// `cursor`, `Ok(None)` means done, `Err` means stop (a bound was hit). Every cursor returned
/// was never returned before (the set of seen cursors is bounded by `max_list_pages`), so a
/// server cannot make the call loop; pages, items, bytes, JSON values and time are capped.
#[derive(Debug)]
pub struct Pager {
    pages: usize,
    items: usize,
    bytes: usize,
    nodes: usize,
    seen: HashSet<String>,
    max_pages: usize,
    max_items: usize,
    max_bytes: usize,
    max_nodes: usize,
    max_time: Duration,
}

/// What one page held, for [`Pager::page`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Page<'a> {
    /// Items on the page.
    pub items: usize,
    /// Raw size of the page's result, in bytes.
    pub bytes: usize,
    /// JSON values in the page's result ([`json_nodes`]).
    pub nodes: usize,
    /// The page's `nextCursor`.
    pub next_cursor: Option<&'a str>,
}

impl Pager {
    /// A driver with the `*/list` bounds of `limits`.
    pub fn new(limits: &Limits) -> Self {
        Pager {
            pages: 0,
            items: 0,
            bytes: 0,
            nodes: 0,
            seen: HashSet::new(),
            max_pages: limits.max_list_pages.max(1),
            max_items: limits.max_list_items,
            max_bytes: limits.max_list_bytes,
            max_nodes: limits.max_result_nodes,
            max_time: limits.max_list_time,
        }
    }

    /// JSON values still allowed (the budget for decoding the next page).
    pub fn nodes_left(&self) -> usize {
        self.max_nodes.saturating_sub(self.nodes)
    }

    /// Bytes still allowed.
    pub fn bytes_left(&self) -> usize {
        self.max_bytes.saturating_sub(self.bytes)
    }

    /// Checks the time spent so far (`elapsed` since the call started).
    pub fn check_time(&self, elapsed: Duration) -> Result<(), LimitError> {
        if elapsed > self.max_time {
            return Err(LimitError::Time(self.max_time));
        }
        Ok(())
    }

    /// Accounts one page and says what to fetch next.
    pub fn page(
        &mut self,
        page: Page<'_>,
        elapsed: Duration,
    ) -> Result<Option<String>, LimitError> {
        self.pages += 1;
        self.items = self.items.saturating_add(page.items);
        self.bytes = self.bytes.saturating_add(page.bytes);
        self.nodes = self.nodes.saturating_add(page.nodes);
        if self.items > self.max_items {
            return Err(LimitError::Items(self.max_items));
        }
        if self.bytes > self.max_bytes {
            return Err(LimitError::Bytes(self.max_bytes));
        }
        if self.nodes > self.max_nodes {
            return Err(LimitError::Nodes(self.max_nodes));
        }
        let Some(cursor) = page.next_cursor.filter(|c| !c.is_empty()) else {
            return Ok(None);
        };
        self.check_time(elapsed)?;
        if self.pages >= self.max_pages {
            return Err(LimitError::Pages(self.max_pages));
        }
        if cursor.len() > MAX_CURSOR_BYTES {
            return Err(LimitError::CursorTooLong(MAX_CURSOR_BYTES));
        }
        if !self.seen.insert(cursor.to_owned()) {
            return Err(LimitError::RepeatedCursor(crate::sanitize::for_display(
                cursor, 40,
            )));
        }
        Ok(Some(cursor.to_owned()))
    }

    /// Pages accounted so far.
    pub fn pages(&self) -> usize {
        self.pages
    }
}

/// Counts the JSON values in `json` (every object, array, string, number, boolean and null,
/// nested ones included), stopping with [`LimitError::Nodes`] as soon as the count passes
/// `max`. One pass, no allocation beyond the parser's; run it before decoding a server's
/// answer into `serde_json::Value` or typed structs, whose memory grows with this count.
pub fn json_nodes(json: &str, max: usize) -> Result<usize, LimitError> {
    use serde::de::DeserializeSeed;
    let mut count = 0usize;
    let mut de = serde_json::Deserializer::from_str(json);
    // Deep nesting is already refused by serde_json (recursion limit 128).
    let seed = Counter {
        count: &mut count,
        max,
    };
    match seed.deserialize(&mut de) {
        Ok(()) => Ok(count),
        // Syntax errors are reported by the real decode that follows.
        Err(_) if count <= max => Ok(count),
        Err(_) => Err(LimitError::Nodes(max)),
    }
}

struct Counter<'a> {
    count: &'a mut usize,
    max: usize,
}

impl Counter<'_> {
    fn bump<E: serde::de::Error>(&mut self) -> Result<(), E> {
        *self.count += 1;
        if *self.count > self.max {
            return Err(E::custom("too many JSON values"));
        }
        Ok(())
    }
}

impl<'de> serde::de::DeserializeSeed<'de> for Counter<'_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Counter<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E: serde::de::Error>(mut self, _: bool) -> Result<(), E> {
        self.bump()
    }
    fn visit_i64<E: serde::de::Error>(mut self, _: i64) -> Result<(), E> {
        self.bump()
    }
    fn visit_u64<E: serde::de::Error>(mut self, _: u64) -> Result<(), E> {
        self.bump()
    }
    fn visit_f64<E: serde::de::Error>(mut self, _: f64) -> Result<(), E> {
        self.bump()
    }
    fn visit_str<E: serde::de::Error>(mut self, _: &str) -> Result<(), E> {
        self.bump()
    }
    fn visit_unit<E: serde::de::Error>(mut self) -> Result<(), E> {
        self.bump()
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(mut self, mut seq: A) -> Result<(), A::Error> {
        self.bump()?;
        while seq
            .next_element_seed(Counter {
                count: &mut *self.count,
                max: self.max,
            })?
            .is_some()
        {}
        Ok(())
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(mut self, mut map: A) -> Result<(), A::Error> {
        self.bump()?;
        while map.next_key::<serde::de::IgnoredAny>()?.is_some() {
            map.next_value_seed(Counter {
                count: &mut *self.count,
                max: self.max,
            })?;
        }
        Ok(())
    }
}

/// Warns at most once per `interval`, counting what it suppressed: for warnings a server can
/// trigger at will (dropped requests, full queues), so it cannot flood the log.
#[derive(Debug)]
pub struct RateLimitedWarning {
    interval: Duration,
    state: std::sync::Mutex<(Option<std::time::Instant>, u64)>,
}

impl RateLimitedWarning {
    /// At most one warning per `interval`.
    pub const fn new(interval: Duration) -> Self {
        RateLimitedWarning {
            interval,
            state: std::sync::Mutex::new((None, 0)),
        }
    }

    /// Logs `what` at warn level unless one was logged less than `interval` ago; then it is
    /// counted and the count is added to the next warning.
    pub fn warn(&self, what: impl std::fmt::Display) {
        let now = std::time::Instant::now();
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match st.0 {
            Some(last) if now.saturating_duration_since(last) < self.interval => st.1 += 1,
            _ => {
                let suppressed = std::mem::take(&mut st.1);
                st.0 = Some(now);
                drop(st);
                if suppressed > 0 {
                    tracing::warn!("{what} ({suppressed} similar warnings suppressed)");
                } else {
                    tracing::warn!("{what}");
                }
            }
        }
    }

    /// How many warnings are waiting to be reported as suppressed.
    pub fn suppressed(&self) -> u64 {
        self.state.lock().map(|s| s.1).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(items: usize, next: Option<&str>) -> Page<'_> {
        Page {
            items,
            bytes: 100,
            nodes: 10,
            next_cursor: next,
        }
    }

    #[test]
    fn alternating_cursors_stop_at_the_first_repeat() {
        let mut p = Pager::new(&Limits::default());
        let t = Duration::ZERO;
        assert_eq!(p.page(page(1, Some("a")), t).unwrap().as_deref(), Some("a"));
        assert_eq!(p.page(page(1, Some("b")), t).unwrap().as_deref(), Some("b"));
        assert_eq!(
            p.page(page(1, Some("a")), t),
            Err(LimitError::RepeatedCursor("a".into()))
        );
    }

    #[test]
    fn ends_on_missing_or_empty_cursor() {
        let mut p = Pager::new(&Limits::default());
        assert_eq!(p.page(page(3, None), Duration::ZERO), Ok(None));
        let mut p = Pager::new(&Limits::default());
        assert_eq!(p.page(page(3, Some("")), Duration::ZERO), Ok(None));
    }

    #[test]
    fn caps_pages_items_bytes_nodes_time() {
        let l = Limits::default().with_list(3, 10, 1000, Duration::from_secs(5));
        let mut p = Pager::new(&l);
        let t = Duration::ZERO;
        p.page(page(1, Some("1")), t).unwrap();
        p.page(page(1, Some("2")), t).unwrap();
        assert_eq!(p.page(page(1, Some("3")), t), Err(LimitError::Pages(3)));
        let mut p = Pager::new(&l);
        assert_eq!(p.page(page(11, Some("1")), t), Err(LimitError::Items(10)));
        let mut p = Pager::new(&l);
        let big = Page {
            bytes: 1001,
            ..page(1, None)
        };
        assert_eq!(p.page(big, t), Err(LimitError::Bytes(1000)));
        let mut p = Pager::new(&l);
        assert_eq!(
            p.page(page(1, Some("1")), Duration::from_secs(6)),
            Err(LimitError::Time(Duration::from_secs(5)))
        );
        let mut p = Pager::new(&Limits::default());
        let many = Page {
            nodes: MAX_RESULT_NODES + 1,
            ..page(1, None)
        };
        assert_eq!(p.page(many, t), Err(LimitError::Nodes(MAX_RESULT_NODES)));
        let mut p = Pager::new(&Limits::default());
        let long = "x".repeat(MAX_CURSOR_BYTES + 1);
        assert!(matches!(
            p.page(page(1, Some(&long)), t),
            Err(LimitError::CursorTooLong(_))
        ));
    }

    #[test]
    fn counts_json_values() {
        assert_eq!(json_nodes("{}", 10), Ok(1));
        assert_eq!(json_nodes(r#"{"a":[1,2,{"b":null}],"c":"x"}"#, 10), Ok(7));
        assert_eq!(json_nodes("[0,0,0,0]", 3), Err(LimitError::Nodes(3)));
        // Syntax errors are left to the decoder.
        assert_eq!(json_nodes("[1,", 10), Ok(2));
    }

    #[test]
    fn rate_limited_warning_counts_suppressed() {
        let w = RateLimitedWarning::new(Duration::from_secs(3600));
        w.warn("first");
        w.warn("second");
        w.warn("third");
        assert_eq!(w.suppressed(), 2);
    }

    proptest::proptest! {
        /// Whatever cursors a server sends, the driver never hands out one twice and stops
        /// within the page cap.
        #[test]
        fn pagination_always_ends(cursors in proptest::collection::vec(proptest::option::of("[ab]{0,3}"), 1..2000)) {
            let l = Limits::default().with_list(50, usize::MAX, usize::MAX, Duration::MAX);
            let mut p = Pager::new(&l);
            let mut given = HashSet::new();
            let mut fetched = 1;
            for c in &cursors {
                match p.page(page(0, c.as_deref()), Duration::ZERO) {
                    Ok(Some(next)) => {
                        proptest::prop_assert!(given.insert(next));
                        fetched += 1;
                    }
                    Ok(None) | Err(_) => break,
                }
            }
            proptest::prop_assert!(fetched <= 50);
        }
    }
}
