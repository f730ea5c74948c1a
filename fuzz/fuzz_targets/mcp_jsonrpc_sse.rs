//! Bytes from an MCP server: an SSE stream split at arbitrary points, each event's data parsed
//! as JSON-RPC (one message or a batch), and each line parsed as a stdio message. Nothing may
//! panic; the parser must give the same events however the stream is split.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmcp_mcp::{jsonrpc, sse};

fuzz_target!(|data: &[u8]| {
    let split = data.first().map(|b| *b as usize).unwrap_or(0).min(data.len());
    let mut whole = Vec::new();
    let mut p = sse::Parser::new(1 << 16);
    let ok_whole = p.feed(data, |e| whole.push(e)).is_ok();
    let mut parts = Vec::new();
    let mut q = sse::Parser::new(1 << 16);
    let ok_parts = q.feed(&data[..split], |e| parts.push(e)).is_ok()
        && q.feed(&data[split..], |e| parts.push(e)).is_ok();
    // A BOM is only recognised whole in the first chunk, so splits inside it may differ.
    if ok_whole && ok_parts && split >= 3 {
        assert_eq!(whole, parts);
    }
    for e in &whole {
        let _ = jsonrpc::parse_messages(e.data.as_bytes(), |m| {
            let _ = m.to_vec();
        });
    }
    for line in data.split(|b| *b == b'\n') {
        if let Ok(m) = jsonrpc::parse_message(line) {
            let back = m.to_vec();
            assert!(jsonrpc::parse_message(&back).is_ok());
        }
    }
});
