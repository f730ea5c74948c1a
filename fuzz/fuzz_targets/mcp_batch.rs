//! JSON-RPC bodies from an MCP server, batches above all: parsing with a batch limit must never
//! panic, never hand out more messages than the limit, and agree with the single-message
//! parser on non-batch input. The JSON-value counter used before decoding results must stop at
//! its budget.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmcp_mcp::{jsonrpc, limits};

fuzz_target!(|data: &[u8]| {
    let max = usize::from(data.first().copied().unwrap_or(0) % 8);
    let body = data.get(1..).unwrap_or_default();
    let mut n = 0usize;
    let r = jsonrpc::parse_messages_limited(body, max, |m| {
        n += 1;
        let back = m.to_vec();
        assert!(jsonrpc::parse_message(&back).is_ok());
    });
    assert!(n <= max.max(1), "{n} messages with a limit of {max}");
    if r.is_err() {
        assert_eq!(n, 0, "messages delivered from an invalid body");
    }
    if let Ok(text) = std::str::from_utf8(body) {
        if let Ok(count) = limits::json_nodes(text, max * 4) {
            assert!(count <= max * 4);
        }
    }
});
