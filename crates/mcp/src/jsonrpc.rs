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
}

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

/// The `error` member of an error response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
#[error("JSON-RPC error {code}: {message}")]
pub struct RpcError {
    /// Error code.
    pub code: i64,
    /// Short description.
    pub message: String,
    /// Extra data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
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
    let v: Option<serde_json::Value> = Option::deserialize(d)?;
    match v {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::Number(n)) => n
            .as_i64()
            .map(|n| Some(RequestId::Number(n)))
            .ok_or_else(|| D::Error::custom("request id is not an integer")),
        Some(serde_json::Value::String(s)) => Ok(Some(RequestId::String(s))),
        Some(_) => Err(D::Error::custom("request id is neither number nor string")),
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

/// Parses one message or a batch (a JSON array of messages), calling `each` per message.
pub fn parse_messages(bytes: &[u8], mut each: impl FnMut(Message)) -> Result<(), Error> {
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    if first == Some(&b'[') {
        let batch: Vec<RawMessage<'_>> = serde_json::from_slice(bytes)?;
        if batch.is_empty() {
            return Err(Error::Invalid("empty batch"));
        }
        for raw in batch {
            each(raw.classify()?);
        }
        Ok(())
    } else {
        each(parse_message(bytes)?);
        Ok(())
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
