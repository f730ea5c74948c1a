//! JSON-RPC 2.0 messages as MCP uses them.
//!
//! One [`Message`] type serves both directions. `params` and `result` stay raw JSON
//! ([`RawValue`]) until the code that knows their type parses them, so a message is parsed
//! once: the transport reads the envelope, the client parses the result straight into the
//! typed MCP struct. Batches (JSON arrays, allowed by revision 2025-03-26 only) are accepted on
//! input by [`parse_messages`] and never sent.
//!
//! Limits: request ids we issue are integers; string ids from the peer are kept and echoed.
//! A message that is valid JSON but no valid JSON-RPC message is an [`Error::Invalid`].
//! Nothing a peer sends is materialised beyond its raw bytes before it is checked: a batch
//! is counted while it is parsed and refused past [`crate::limits::MAX_BATCH_ITEMS`] (or the
//! limit given to [`parse_messages_limited`]); an `id` that is neither number nor string is
//! refused without building it; `error.data` is decoded only up to
//! [`ERROR_DATA_MAX_NODES`] JSON values (larger data is dropped, the error is kept).

use serde::de::Error as _;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// JSON-RPC error code: invalid JSON was received.
pub const PARSE_ERROR: i64 = -32700;
/// JSON-RPC error code: the JSON sent is not a valid request object.
pub const INVALID_REQUEST: i64 = -32600;
/// JSON-RPC error code: the method does not exist or is not available.
pub const METHOD_NOT_FOUND: i64 = -32601;
/// JSON-RPC error code: invalid method parameters.
pub const INVALID_PARAMS: i64 = -32602;
/// JSON-RPC error code: internal error.
pub const INTERNAL_ERROR: i64 = -32603;
/// MCP 2026-07-28: HTTP headers do not match the body.
pub const HEADER_MISMATCH: i64 = -32020;
/// MCP 2026-07-28: a required client capability is missing.
pub const MISSING_REQUIRED_CLIENT_CAPABILITY: i64 = -32021;
/// MCP 2026-07-28: the requested protocol version is not supported.
pub const UNSUPPORTED_PROTOCOL_VERSION: i64 = -32022;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The bytes are not JSON.
    #[error("malformed JSON-RPC message")]
    Json(#[from] serde_json::Error),
    /// The JSON is not a JSON-RPC 2.0 message.
    #[error("invalid JSON-RPC message: {0}")]
    Invalid(&'static str),
    /// A batch with more messages than allowed.
    #[error("a JSON-RPC batch of more than {0} messages")]
    BatchTooLarge(usize),
}

/// Most JSON values of an error's `data` that are decoded ([`crate::limits`]).
pub use crate::limits::ERROR_DATA_MAX_NODES;

/// A request id: a number or a string (never null in MCP).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RequestId {
    /// A numeric id (the kind this client issues).
    Number(i64),
    /// A string id.
    String(String),
}

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RequestId::Number(n) => write!(f, "{n}"),
            RequestId::String(s) => write!(f, "{s:?}"),
        }
    }
}

/// The `error` member of an error response. Its `Display` escapes control characters and
/// cuts the message ([`crate::sanitize::for_display`]): it may come from a hostile server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
#[error(
    "JSON-RPC error {code}: {}",
    crate::sanitize::for_display(message, crate::limits::MAX_PRINTED_CHARS)
)]
pub struct RpcError {
    /// Error code.
    pub code: i64,
    /// Short description.
    pub message: String,
    /// Extra data (`None` also when the peer's data had more than [`ERROR_DATA_MAX_NODES`]
    /// JSON values).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "bounded_data"
    )]
    pub data: Option<serde_json::Value>,
}

impl RpcError {
    /// An error with a code and a message and no data.
    pub fn new(code: i64, message: impl Into<String>) -> Self {
        RpcError {
            code,
            message: message.into(),
            data: None,
        }
    }

    /// True for the error codes only a modern (2026-07-28 and later) server sends.
    pub fn is_modern_error(&self) -> bool {
        matches!(
            self.code,
            HEADER_MISMATCH | MISSING_REQUIRED_CLIENT_CAPABILITY | UNSUPPORTED_PROTOCOL_VERSION
        )
    }
}

/// A request: expects a response with the same id.
#[derive(Debug, Clone)]
pub struct Request {
    /// Request id.
    pub id: RequestId,
    /// Method name.
    pub method: String,
    /// Parameters (a JSON object in MCP).
    pub params: Option<Box<RawValue>>,
}

/// A notification: no id, no response.
#[derive(Debug, Clone)]
pub struct Notification {
    /// Method name.
    pub method: String,
    /// Parameters.
    pub params: Option<Box<RawValue>>,
}

/// A successful response.
#[derive(Debug, Clone)]
pub struct Response {
    /// Id of the request answered.
    pub id: RequestId,
    /// The result.
    pub result: Box<RawValue>,
}

/// An error response.
#[derive(Debug, Clone)]
pub struct ErrorResponse {
    /// Id of the request answered (absent when the request could not be read).
    pub id: Option<RequestId>,
    /// The error.
    pub error: RpcError,
}

/// Any JSON-RPC 2.0 message.
#[derive(Debug, Clone)]
pub enum Message {
    /// A request.
    Request(Request),
    /// A notification.
    Notification(Notification),
    /// A successful response.
    Response(Response),
    /// An error response.
    Error(ErrorResponse),
}

impl Message {
    /// A request with params given as raw JSON.
    pub fn request(id: i64, method: impl Into<String>, params: Option<Box<RawValue>>) -> Self {
        Message::Request(Request {
            id: RequestId::Number(id),
            method: method.into(),
            params,
        })
    }

    /// A notification with params given as raw JSON.
    pub fn notification(method: impl Into<String>, params: Option<Box<RawValue>>) -> Self {
        Message::Notification(Notification {
            method: method.into(),
            params,
        })
    }

    /// The method of a request or notification.
    pub fn method(&self) -> Option<&str> {
        match self {
            Message::Request(r) => Some(&r.method),
            Message::Notification(n) => Some(&n.method),
            Message::Response(_) | Message::Error(_) => None,
        }
    }

    /// Serializes the message to compact JSON bytes.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(128);
        self.write_to(&mut out);
        out
    }

    /// The message as one line of newline-delimited JSON (stdio framing, both roles).
    pub fn to_line(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(256);
        self.write_to(&mut out);
        out.push(b'\n');
        out
    }

    /// Appends the compact JSON encoding of the message to `out`.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        // Serializing these shapes cannot fail: keys are strings, RawValue is valid JSON.
        let _ = match self {
            Message::Request(r) => serde_json::to_writer(
                &mut *out,
                &Wire {
                    jsonrpc: "2.0",
                    id: Some(&r.id),
                    method: Some(&r.method),
                    params: r.params.as_deref(),
                    result: None,
                    error: None,
                },
            ),
            Message::Notification(n) => serde_json::to_writer(
                &mut *out,
                &Wire {
                    jsonrpc: "2.0",
                    id: None,
                    method: Some(&n.method),
                    params: n.params.as_deref(),
                    result: None,
                    error: None,
                },
            ),
            Message::Response(r) => serde_json::to_writer(
                &mut *out,
                &Wire {
                    jsonrpc: "2.0",
                    id: Some(&r.id),
                    method: None,
                    params: None,
                    result: Some(&r.result),
                    error: None,
                },
            ),
            Message::Error(e) => serde_json::to_writer(
                &mut *out,
                &WireError {
                    jsonrpc: "2.0",
                    id: e.id.as_ref(),
                    error: &e.error,
                },
            ),
        };
    }
}

#[derive(Serialize)]
struct Wire<'a> {
    jsonrpc: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a RequestId>,
    #[serde(skip_serializing_if = "Option::is_none")]
    method: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    params: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    result: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a RpcError>,
}

#[derive(Serialize)]
struct WireError<'a> {
    jsonrpc: &'static str,
    // JSON-RPC wants `"id": null` when the id is unknown.
    id: Option<&'a RequestId>,
    error: &'a RpcError,
}

/// The envelope as read: every member optional, then classified.
#[derive(Deserialize)]
struct RawMessage<'a> {
    #[serde(borrow, default)]
    jsonrpc: Option<&'a str>,
    #[serde(default, deserialize_with = "id_or_null")]
    id: Option<RequestId>,
    #[serde(default)]
    method: Option<String>,
    #[serde(default)]
    params: Option<Box<RawValue>>,
    #[serde(default)]
    result: Option<Box<RawValue>>,
    #[serde(default)]
    error: Option<RpcError>,
}

fn id_or_null<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<RequestId>, D::Error> {
    d.deserialize_any(IdVisitor)
}

/// Reads an id without building anything for values that cannot be one (a huge array is
/// refused at its first byte).
struct IdVisitor;

impl<'de> serde::de::Visitor<'de> for IdVisitor {
    type Value = Option<RequestId>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an integer or string request id, or null")
    }
    fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<Self::Value, E> {
        Ok(Some(RequestId::Number(n)))
    }
    fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<Self::Value, E> {
        i64::try_from(n)
            .map(|n| Some(RequestId::Number(n)))
            .map_err(|_| E::custom("request id is not a 64-bit integer"))
    }
    fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Err(E::custom("request id is not an integer"))
    }
    fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Self::Value, E> {
        Ok(Some(RequestId::String(s.to_owned())))
    }
    fn visit_string<E: serde::de::Error>(self, s: String) -> Result<Self::Value, E> {
        Ok(Some(RequestId::String(s)))
    }
    fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Err(E::custom("request id is neither number nor string"))
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, _: A) -> Result<Self::Value, A::Error> {
        Err(A::Error::custom("request id is neither number nor string"))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, _: A) -> Result<Self::Value, A::Error> {
        Err(A::Error::custom("request id is neither number nor string"))
    }
}

fn bounded_data<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<serde_json::Value>, D::Error> {
    let mut budget = ERROR_DATA_MAX_NODES;
    let v = serde::de::DeserializeSeed::deserialize(
        BoundedValue {
            budget: &mut budget,
        },
        d,
    )?;
    Ok(v.filter(|v| !v.is_null()))
}

/// Builds a `Value` of at most `budget` nodes; past that it skips the rest and yields `None`.
struct BoundedValue<'a> {
    budget: &'a mut usize,
}

impl BoundedValue<'_> {
    fn take(&mut self) -> bool {
        if *self.budget == 0 {
            return false;
        }
        *self.budget -= 1;
        true
    }

    fn leaf<E>(mut self, v: serde_json::Value) -> Result<Option<serde_json::Value>, E> {
        Ok(self.take().then_some(v))
    }
}

impl<'de> serde::de::DeserializeSeed<'de> for BoundedValue<'_> {
    type Value = Option<serde_json::Value>;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for BoundedValue<'_> {
    type Value = Option<serde_json::Value>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Self::Value, E> {
        self.leaf(v.into())
    }
    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Self::Value, E> {
        self.leaf(v.into())
    }
    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Self::Value, E> {
        self.leaf(v.into())
    }
    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Self::Value, E> {
        self.leaf(v.into())
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
        self.leaf(v.into())
    }
    fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
        self.leaf(serde_json::Value::Null)
    }
    fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
        self.leaf(serde_json::Value::Null)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(
        mut self,
        mut seq: A,
    ) -> Result<Self::Value, A::Error> {
        let mut ok = self.take();
        let mut items = Vec::new();
        while ok {
            match seq.next_element_seed(BoundedValue {
                budget: &mut *self.budget,
            })? {
                None => return Ok(Some(serde_json::Value::Array(items))),
                Some(Some(v)) => items.push(v),
                Some(None) => ok = false,
            }
        }
        drop(items);
        while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
        Ok(None)
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(
        mut self,
        mut map: A,
    ) -> Result<Self::Value, A::Error> {
        let mut ok = self.take();
        let mut out = serde_json::Map::new();
        while ok {
            let Some(key) = map.next_key::<String>()? else {
                return Ok(Some(serde_json::Value::Object(out)));
            };
            match map.next_value_seed(BoundedValue {
                budget: &mut *self.budget,
            })? {
                Some(v) => {
                    out.insert(key, v);
                }
                None => ok = false,
            }
        }
        drop(out);
        while map
            .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
            .is_some()
        {}
        Ok(None)
    }
}

impl RawMessage<'_> {
    fn classify(self) -> Result<Message, Error> {
        if self.jsonrpc != Some("2.0") {
            return Err(Error::Invalid("missing \"jsonrpc\": \"2.0\""));
        }
        match (self.id, self.method, self.result, self.error) {
            (Some(id), Some(method), None, None) => Ok(Message::Request(Request {
                id,
                method,
                params: self.params,
            })),
            (None, Some(method), None, None) => Ok(Message::Notification(Notification {
                method,
                params: self.params,
            })),
            (Some(id), None, Some(result), None) => Ok(Message::Response(Response { id, result })),
            (id, None, None, Some(error)) => Ok(Message::Error(ErrorResponse { id, error })),
            _ => Err(Error::Invalid(
                "not a request, notification, result or error",
            )),
        }
    }
}

/// Parses one JSON-RPC message.
pub fn parse_message(bytes: &[u8]) -> Result<Message, Error> {
    let raw: RawMessage<'_> = serde_json::from_slice(bytes)?;
    raw.classify()
}

/// Parses one message or a batch (a JSON array of messages), calling `each` per message;
/// batches of more than [`crate::limits::MAX_BATCH_ITEMS`] messages are refused.
pub fn parse_messages(bytes: &[u8], each: impl FnMut(Message)) -> Result<(), Error> {
    parse_messages_limited(bytes, crate::limits::MAX_BATCH_ITEMS, each)
}

/// Like [`parse_messages`] with a batch limit of `max_items`. The batch is counted while it
/// is parsed: the parse stops at element `max_items + 1`, so a huge batch costs no more
/// memory than `max_items` messages. `each` is called only when the whole input is valid.
pub fn parse_messages_limited(
    bytes: &[u8],
    max_items: usize,
    mut each: impl FnMut(Message),
) -> Result<(), Error> {
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    if first == Some(&b'[') {
        let mut de = serde_json::Deserializer::from_slice(bytes);
        let mut failure = None;
        let batch = serde::de::DeserializeSeed::deserialize(
            Batch {
                max: max_items,
                failure: &mut failure,
            },
            &mut de,
        );
        let batch = match (batch, failure) {
            (Ok(b), _) => b,
            (Err(_), Some(f)) => return Err(f),
            (Err(e), None) => return Err(Error::Json(e)),
        };
        de.end()?;
        if batch.is_empty() {
            return Err(Error::Invalid("empty batch"));
        }
        for m in batch {
            each(m);
        }
        Ok(())
    } else {
        each(parse_message(bytes)?);
        Ok(())
    }
}

/// A batch read element by element, classified as it goes, refused past `max` elements.
struct Batch<'a> {
    max: usize,
    failure: &'a mut Option<Error>,
}

impl<'de> serde::de::DeserializeSeed<'de> for Batch<'_> {
    type Value = Vec<Message>;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Batch<'_> {
    type Value = Vec<Message>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON-RPC batch")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::new();
        while let Some(raw) = seq.next_element::<RawMessage<'de>>()? {
            if out.len() == self.max {
                *self.failure = Some(Error::BatchTooLarge(self.max));
                return Err(A::Error::custom("batch too large"));
            }
            match raw.classify() {
                Ok(m) => out.push(m),
                Err(e) => {
                    let text = e.to_string();
                    *self.failure = Some(e);
                    return Err(A::Error::custom(text));
                }
            }
        }
        Ok(out)
    }
}

/// Serializes a value to raw JSON (for params).
pub fn to_raw<T: Serialize + ?Sized>(value: &T) -> Result<Box<RawValue>, serde_json::Error> {
    serde_json::value::to_raw_value(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trips_each_kind() {
        let cases = [
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{"cursor":"x"}}"#,
            r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#,
            r#"{"jsonrpc":"2.0","id":"a","result":{"tools":[]}}"#,
            r#"{"jsonrpc":"2.0","id":7,"error":{"code":-32601,"message":"nope"}}"#,
            r#"{"jsonrpc":"2.0","id":null,"error":{"code":-32700,"message":"parse","data":[1]}}"#,
        ];
        for case in cases {
            let m = parse_message(case.as_bytes()).unwrap();
            assert_eq!(String::from_utf8(m.to_vec()).unwrap(), case);
        }
    }

    #[test]
    fn classifies() {
        let m = parse_message(br#"{"jsonrpc":"2.0","id":3,"method":"ping"}"#).unwrap();
        assert!(
            matches!(m, Message::Request(ref r) if r.method == "ping" && r.id == RequestId::Number(3))
        );
        assert_eq!(m.method(), Some("ping"));
        let m = parse_message(br#"{"jsonrpc":"2.0","id":3,"result":{}}"#).unwrap();
        assert!(matches!(m, Message::Response(_)));
        assert_eq!(m.method(), None);
    }

    #[test]
    fn rejects_invalid() {
        for bad in [
            &br#"{"id":1,"method":"x"}"#[..],
            br#"{"jsonrpc":"1.0","id":1,"method":"x"}"#,
            br#"{"jsonrpc":"2.0","id":1}"#,
            br#"{"jsonrpc":"2.0","id":1,"result":{},"error":{"code":1,"message":""}}"#,
            br#"{"jsonrpc":"2.0","id":1.5,"result":{}}"#,
            br#"{"jsonrpc":"2.0","id":[],"result":{}}"#,
            b"not json",
            b"[]",
        ] {
            assert!(
                parse_messages(bad, |_| {}).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn batches() {
        let mut n = 0;
        parse_messages(
            br#" [{"jsonrpc":"2.0","method":"a"},{"jsonrpc":"2.0","id":1,"result":{}}]"#,
            |_| n += 1,
        )
        .unwrap();
        assert_eq!(n, 2);
    }

    #[test]
    fn batch_limit_is_checked_while_parsing() {
        let ok = format!("[{}]", [r#"{"jsonrpc":"2.0","method":"a"}"#; 4].join(","));
        let mut n = 0;
        parse_messages_limited(ok.as_bytes(), 4, |_| n += 1).unwrap();
        assert_eq!(n, 4);
        assert!(matches!(
            parse_messages_limited(ok.as_bytes(), 3, |_| {}),
            Err(Error::BatchTooLarge(3))
        ));
        // 10M empty objects: refused after MAX_BATCH_ITEMS elements, without reading on.
        let mut huge = String::from("[");
        for _ in 0..2_000 {
            huge.push_str(r#"{"jsonrpc":"2.0","method":"a"},"#);
        }
        huge.push_str("garbage that is never reached");
        assert!(matches!(
            parse_messages(huge.as_bytes(), |_| {}),
            Err(Error::BatchTooLarge(crate::limits::MAX_BATCH_ITEMS))
        ));
        // A wrong element is reported as such.
        assert!(matches!(
            parse_messages(br#"[{"jsonrpc":"2.0","method":"a"},{}]"#, |_| {}),
            Err(Error::Invalid(_))
        ));
    }

    #[test]
    fn ids_and_error_data_are_not_materialised() {
        // An id that is a huge array is refused (not built first).
        let mut big = String::from(r#"{"jsonrpc":"2.0","id":["#);
        big.push_str(&"0,".repeat(100_000));
        big.push_str(r#"0],"result":{}}"#);
        assert!(parse_message(big.as_bytes()).is_err());
        // error.data beyond the node budget is dropped, the error is kept.
        let mut e =
            String::from(r#"{"jsonrpc":"2.0","id":1,"error":{"code":1,"message":"m","data":["#);
        e.push_str(&"[0,{\"a\":1}],".repeat(ERROR_DATA_MAX_NODES));
        e.push_str(r#"0]}}"#);
        match parse_message(e.as_bytes()).unwrap() {
            Message::Error(er) => {
                assert_eq!(er.error.message, "m");
                assert_eq!(er.error.data, None);
            }
            other => panic!("{other:?}"),
        }
        let small = br#"{"jsonrpc":"2.0","id":1,"error":{"code":1,"message":"m","data":{"supported":["x"],"n":[1,null]}}}"#;
        match parse_message(small).unwrap() {
            Message::Error(er) => assert_eq!(
                er.error.data,
                Some(serde_json::json!({"supported":["x"],"n":[1,null]}))
            ),
            other => panic!("{other:?}"),
        }
        let shown = RpcError::new(1, "evil\x1b[2J").to_string();
        assert!(!shown.contains('\x1b'), "{shown}");
    }

    #[test]
    fn modern_errors() {
        assert!(RpcError::new(UNSUPPORTED_PROTOCOL_VERSION, "x").is_modern_error());
        assert!(!RpcError::new(METHOD_NOT_FOUND, "x").is_modern_error());
        assert_eq!(RequestId::String("a".into()).to_string(), "\"a\"");
    }

    proptest! {
        #[test]
        fn never_panics_on_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = parse_messages(&bytes, |_| {});
        }

        #[test]
        fn requests_round_trip(id in any::<i64>(), method in "[a-z/]{1,20}", key in "[a-z]{1,8}", val in any::<i64>()) {
            let params = to_raw(&serde_json::json!({ key: val })).unwrap();
            let m = Message::request(id, method.clone(), Some(params));
            let back = parse_message(&m.to_vec()).unwrap();
            match back {
                Message::Request(r) => {
                    prop_assert_eq!(r.id, RequestId::Number(id));
                    prop_assert_eq!(r.method, method);
                }
                other => prop_assert!(false, "{:?}", other),
            }
        }
    }
}
