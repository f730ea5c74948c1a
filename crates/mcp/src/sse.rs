//! Incremental Server-Sent Events parser (the WHATWG event-stream format).
//!
//! Feed it chunks as they arrive; it returns complete events. Lines end with `\n`, `\r\n` or
//! `\r`; a blank line dispatches the event; `data:` lines are joined with `\n`; lines starting
//! with `:` are comments (keep-alives); `id:` sets the last event id (kept across events, as
//! the spec says, unless it contains NUL); `retry:` sets the reconnection delay. A leading
//! UTF-8 BOM in the first chunk is skipped.
//!
//! Limits: an event (or a line) larger than the parser's limit is an error, so a hostile
//! server cannot make us buffer without bound.
//!
//! [`encode_message`] is the other direction (the server's SSE answers): one JSON-RPC message
//! as one `message` event; compact JSON never contains a newline, so it is one `data:` line.

/// One JSON-RPC message as an SSE `message` event.
pub fn encode_message(msg: &crate::jsonrpc::Message) -> Vec<u8> {
    let mut v = Vec::with_capacity(256);
    v.extend_from_slice(b"event: message\ndata: ");
    msg.write_to(&mut v);
    v.extend_from_slice(b"\n\n");
    v
}

/// One message that is already compact JSON (a stdio server's line, passed through
/// unchanged) as an SSE `message` event; `json` must not contain a line break.
pub fn encode_json_line(json: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(json.len() + 24);
    v.extend_from_slice(b"event: message\ndata: ");
    v.extend_from_slice(json);
    v.extend_from_slice(b"\n\n");
    v
}

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Event {
    /// `event:` field (None = "message").
    pub event: Option<String>,
    /// Joined `data:` lines.
    pub data: String,
    /// The last event id at dispatch time.
    pub id: Option<String>,
}

/// Errors of the parser.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum SseError {
    /// An event grew past the limit.
    #[error("server-sent event larger than {0} bytes")]
    TooLarge(usize),
    /// A line is not UTF-8.
    #[error("server-sent event is not UTF-8")]
    NotUtf8,
}

/// The parser state.
#[derive(Debug)]
pub struct Parser {
    line: Vec<u8>,
    data: String,
    has_data: bool,
    event: Option<String>,
    last_id: Option<String>,
    retry_ms: Option<u64>,
    /// The previous chunk ended in `\r`: skip a `\n` that starts the next one.
    skip_lf: bool,
    started: bool,
    limit: usize,
}

impl Parser {
    /// A parser that rejects events larger than `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Parser {
            line: Vec::new(),
            data: String::new(),
            has_data: false,
            event: None,
            last_id: None,
            retry_ms: None,
            skip_lf: false,
            started: false,
            limit,
        }
    }

    /// The last event id seen (for `Last-Event-ID` on reconnect).
    pub fn last_event_id(&self) -> Option<&str> {
        self.last_id.as_deref()
    }

    /// The reconnection delay the server asked for, in milliseconds.
    pub fn retry_ms(&self) -> Option<u64> {
        self.retry_ms
    }

    /// Feeds a chunk; calls `on_event` for every completed event.
    pub fn feed(
        &mut self,
        mut chunk: &[u8],
        mut on_event: impl FnMut(Event),
    ) -> Result<(), SseError> {
        if !self.started && !chunk.is_empty() {
            // A BOM is only recognised when the first chunk holds all of it.
            if let Some(rest) = chunk.strip_prefix(b"\xEF\xBB\xBF") {
                chunk = rest;
            }
            self.started = true;
        }
        if self.skip_lf {
            self.skip_lf = false;
            if let Some(rest) = chunk.strip_prefix(b"\n") {
                chunk = rest;
            }
        }
        while !chunk.is_empty() {
            match chunk.iter().position(|&b| b == b'\n' || b == b'\r') {
                Some(i) => {
                    if self.line.len() + i > self.limit {
                        return Err(SseError::TooLarge(self.limit));
                    }
                    let cr = chunk[i] == b'\r';
                    if self.line.is_empty() {
                        self.process_line(&chunk[..i], &mut on_event)?;
                    } else {
                        self.line.extend_from_slice(&chunk[..i]);
                        let line = std::mem::take(&mut self.line);
                        self.process_line(&line, &mut on_event)?;
                        self.line = line;
                        self.line.clear();
                    }
                    chunk = &chunk[i + 1..];
                    if cr {
                        if chunk.is_empty() {
                            self.skip_lf = true;
                        } else if chunk[0] == b'\n' {
                            chunk = &chunk[1..];
                        }
                    }
                }
                None => {
                    if self.line.len() + chunk.len() > self.limit {
                        return Err(SseError::TooLarge(self.limit));
                    }
                    self.line.extend_from_slice(chunk);
                    chunk = &[];
                }
            }
        }
        Ok(())
    }

    fn process_line(
        &mut self,
        line: &[u8],
        on_event: &mut impl FnMut(Event),
    ) -> Result<(), SseError> {
        if line.is_empty() {
            if self.has_data {
                let mut data = std::mem::take(&mut self.data);
                if data.ends_with('\n') {
                    data.pop();
                }
                on_event(Event {
                    event: self.event.take(),
                    data,
                    id: self.last_id.clone(),
                });
            }
            self.has_data = false;
            self.data.clear();
            self.event = None;
            return Ok(());
        }
        if line[0] == b':' {
            return Ok(());
        }
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(i) => {
                let v = &line[i + 1..];
                (&line[..i], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &b""[..]),
        };
        let value = std::str::from_utf8(value).map_err(|_| SseError::NotUtf8)?;
        match field {
            b"data" => {
                if self.data.len() + value.len() + 1 > self.limit {
                    return Err(SseError::TooLarge(self.limit));
                }
                self.data.push_str(value);
                self.data.push('\n');
                self.has_data = true;
            }
            b"event" => self.event = Some(value.to_owned()),
            b"id" if !value.contains('\0') => self.last_id = Some(value.to_owned()),
            b"retry" => {
                if let Ok(ms) = value.parse() {
                    self.retry_ms = Some(ms);
                }
            }
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoded_messages_parse_back() {
        let m = crate::jsonrpc::Message::notification(
            "notifications/message",
            crate::jsonrpc::to_raw(&serde_json::json!({"data": "a\nb"})).ok(),
        );
        let mut p = Parser::new(1 << 20);
        let mut got = Vec::new();
        p.feed(&encode_message(&m), |ev| got.push(ev)).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].data.as_bytes(), m.to_vec().as_slice());
    }
    use proptest::prelude::*;

    fn all(input: &[&[u8]]) -> Vec<Event> {
        let mut p = Parser::new(1 << 20);
        let mut out = Vec::new();
        for c in input {
            p.feed(c, |e| out.push(e)).unwrap();
        }
        out
    }

    #[test]
    fn basic_events() {
        let ev = all(&[b"id: 1\ndata: {\"a\":1}\n\n: keepalive\n\nevent: x\ndata: a\ndata: b\n\n"]);
        assert_eq!(ev.len(), 2);
        assert_eq!(ev[0].data, "{\"a\":1}");
        assert_eq!(ev[0].id.as_deref(), Some("1"));
        assert_eq!(ev[1].data, "a\nb");
        assert_eq!(ev[1].event.as_deref(), Some("x"));
        assert_eq!(ev[1].id.as_deref(), Some("1"));
    }

    #[test]
    fn line_endings_and_splits() {
        let ev = all(&[
            b"\xEF\xBB\xBFdata:x\r",
            b"\n\r",
            b"\ndata: y\r\rretry: 50\n",
        ]);
        assert_eq!(
            ev.iter().map(|e| e.data.as_str()).collect::<Vec<_>>(),
            ["x", "y"]
        );
        let mut p = Parser::new(100);
        p.feed(b"retry: 50\nid: 7\n\n", |_| {}).unwrap();
        assert_eq!(p.retry_ms(), Some(50));
        assert_eq!(p.last_event_id(), Some("7"));
    }

    #[test]
    fn empty_data_events_are_dispatched_without_data_lines_skipped() {
        // A priming event: an id and no data: nothing dispatched, id kept.
        let mut p = Parser::new(100);
        let mut n = 0;
        p.feed(b"id: p0\n\n", |_| n += 1).unwrap();
        assert_eq!(n, 0);
        assert_eq!(p.last_event_id(), Some("p0"));
    }

    #[test]
    fn limit() {
        let mut p = Parser::new(8);
        assert_eq!(
            p.feed(b"data: 0123456789\n", |_| {}),
            Err(SseError::TooLarge(8))
        );
        let mut p = Parser::new(8);
        assert_eq!(
            p.feed(b"data: 0123456789", |_| {}),
            Err(SseError::TooLarge(8))
        );
    }

    proptest! {
        #[test]
        fn any_split_gives_same_events(split in 0usize..60) {
            let input = b"id: 1\r\ndata: {\"x\":1}\r\n\r\ndata: a\rdata: b\r\r:c\n\ndata:z\n\n";
            let split = split.min(input.len());
            let one = all(&[input]);
            let two = all(&[&input[..split], &input[split..]]);
            prop_assert_eq!(one, two);
        }

        #[test]
        fn never_panics(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..8)) {
            let mut p = Parser::new(256);
            for c in &chunks {
                if p.feed(c, |_| {}).is_err() { break; }
            }
        }
    }
}
