//! A small async client for the QEMU Machine Protocol (QMP).
//!
//! QMP is line-oriented JSON: QEMU greets with `{"QMP": {...}}`, the client must send
//! `qmp_capabilities` before any other command, and each command is answered by one
//! `{"return": ...}` or `{"error": {"class", "desc"}}` line. Asynchronous `{"event": ...}`
//! lines may arrive at any time; the client keeps the names of the last few and skips them
//! while waiting for an answer. Commands are sent one at a time (`&mut self`), which is all
//! vmcp needs (start check, status, quit).
//!
//! Lines are capped at [`MAX_LINE`] bytes so a misbehaving peer cannot make us buffer
//! without bound.

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};

/// Longest QMP line accepted.
pub const MAX_LINE: usize = 1 << 20;
/// How many event names are remembered.
const EVENT_HISTORY: usize = 16;

/// Errors of the QMP client.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QmpError {
    /// Reading or writing the socket failed.
    #[error("QMP I/O failed")]
    Io(#[from] std::io::Error),
    /// QEMU closed the connection (or there is none).
    #[error("QEMU closed the QMP connection")]
    Closed,
    /// QEMU did not answer in time.
    #[error("QEMU did not answer on QMP within {0:?}")]
    Timeout(std::time::Duration),
    /// A line was not valid JSON or not a QMP message.
    #[error("malformed QMP message: {0}")]
    Malformed(String),
    /// A line exceeded [`MAX_LINE`].
    #[error("QMP line longer than {MAX_LINE} bytes")]
    TooLong,
    /// QEMU answered a command with an error.
    #[error("QMP command {command} failed: {class}: {desc}")]
    Command {
        /// The command.
        command: String,
        /// QMP error class.
        class: String,
        /// QEMU's description.
        desc: String,
    },
}

/// One parsed QMP line.
#[derive(Debug, Clone, PartialEq)]
pub enum QmpMessage {
    /// The greeting, with QEMU's version.
    Greeting {
        /// `major.minor.micro`.
        version: String,
    },
    /// A successful answer.
    Return(Value),
    /// An error answer.
    Error {
        /// Error class.
        class: String,
        /// Description.
        desc: String,
    },
    /// An asynchronous event.
    Event {
        /// Event name (`SHUTDOWN`, `STOP`, ...).
        name: String,
    },
}

/// Parses one QMP line. Never panics on any input.
pub fn parse_line(line: &[u8]) -> Result<QmpMessage, QmpError> {
    let v: Value = serde_json::from_slice(line).map_err(|e| QmpError::Malformed(e.to_string()))?;
    let obj = v
        .as_object()
        .ok_or_else(|| QmpError::Malformed("not a JSON object".into()))?;
    if let Some(greeting) = obj.get("QMP") {
        let ver = &greeting["version"]["qemu"];
        let part = |k: &str| ver[k].as_u64().map(|n| n.to_string());
        let version = match (part("major"), part("minor"), part("micro")) {
            (Some(a), Some(b), Some(c)) => format!("{a}.{b}.{c}"),
            _ => "unknown".into(),
        };
        return Ok(QmpMessage::Greeting { version });
    }
    if let Some(ret) = obj.get("return") {
        return Ok(QmpMessage::Return(ret.clone()));
    }
    if let Some(err) = obj.get("error") {
        let s = |k: &str| err[k].as_str().unwrap_or("").to_string();
        return Ok(QmpMessage::Error {
            class: s("class"),
            desc: s("desc"),
        });
    }
    if let Some(name) = obj.get("event").and_then(Value::as_str) {
        return Ok(QmpMessage::Event {
            name: name.to_string(),
        });
    }
    Err(QmpError::Malformed(
        "no QMP, return, error or event key".into(),
    ))
}

/// The bytes of one QMP request line.
pub fn request(command: &str, arguments: Option<Value>) -> Result<Vec<u8>, QmpError> {
    let mut req = json!({ "execute": command });
    if let Some(args) = arguments {
        req["arguments"] = args;
    }
    let mut bytes = serde_json::to_vec(&req).map_err(|e| QmpError::Malformed(e.to_string()))?;
    bytes.push(b'\n');
    Ok(bytes)
}

/// A negotiated QMP session.
#[derive(Debug)]
pub struct QmpClient<S> {
    stream: BufReader<S>,
    version: String,
    events: Vec<String>,
    line: Vec<u8>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> QmpClient<S> {
    /// Reads the greeting and enters command mode (`qmp_capabilities`).
    pub async fn connect(stream: S) -> Result<Self, QmpError> {
        let mut c = QmpClient {
            stream: BufReader::new(stream),
            version: String::new(),
            events: Vec::new(),
            line: Vec::new(),
        };
        match c.next_message().await? {
            QmpMessage::Greeting { version } => c.version = version,
            other => {
                return Err(QmpError::Malformed(format!(
                    "expected the QMP greeting, got {other:?}"
                )))
            }
        }
        c.execute("qmp_capabilities", None).await?;
        Ok(c)
    }

    /// QEMU's version from the greeting.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Names of the most recent events, oldest first.
    pub fn events(&self) -> &[String] {
        &self.events
    }

    async fn next_message(&mut self) -> Result<QmpMessage, QmpError> {
        loop {
            self.line.clear();
            let n = (&mut self.stream)
                .take(MAX_LINE as u64 + 1)
                .read_until(b'\n', &mut self.line)
                .await?;
            if n == 0 {
                return Err(QmpError::Closed);
            }
            if self.line.last() != Some(&b'\n') {
                if n > MAX_LINE {
                    return Err(QmpError::TooLong);
                }
                return Err(QmpError::Closed);
            }
            if self.line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            return parse_line(&self.line);
        }
    }

    /// Runs `command` with optional `arguments`; returns its `return` value.
    pub async fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        let bytes = request(command, arguments)?;
        let w = self.stream.get_mut();
        w.write_all(&bytes).await?;
        w.flush().await?;
        self.answer(command).await
    }

    /// The stream, for a caller that writes a request itself (e.g. with a file descriptor
    /// attached, see [`request`]) and then reads the [`QmpClient::answer`].
    pub fn stream_mut(&mut self) -> &mut S {
        self.stream.get_mut()
    }

    /// Reads the answer to `command`, which the caller sent; events on the way are recorded.
    pub async fn answer(&mut self, command: &str) -> Result<Value, QmpError> {
        loop {
            match self.next_message().await? {
                QmpMessage::Return(v) => return Ok(v),
                QmpMessage::Error { class, desc } => {
                    return Err(QmpError::Command {
                        command: command.to_string(),
                        class,
                        desc,
                    })
                }
                QmpMessage::Event { name } => {
                    if self.events.len() == EVENT_HISTORY {
                        self.events.remove(0);
                    }
                    self.events.push(name);
                }
                QmpMessage::Greeting { .. } => {
                    return Err(QmpError::Malformed("a second greeting".into()))
                }
            }
        }
    }

    /// `query-status`: the run state (`running`, `paused`, `prelaunch`, `shutdown`, ...).
    pub async fn query_status(&mut self) -> Result<String, QmpError> {
        let v = self.execute("query-status", None).await?;
        v["status"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| QmpError::Malformed(format!("query-status returned {v}")))
    }

    /// `system_powerdown`: asks the guest to power off (ACPI button).
    pub async fn system_powerdown(&mut self) -> Result<(), QmpError> {
        self.execute("system_powerdown", None).await.map(|_| ())
    }

    /// `quit`: QEMU exits at once (no guest shutdown).
    pub async fn quit(&mut self) -> Result<(), QmpError> {
        match self.execute("quit", None).await {
            Ok(_) | Err(QmpError::Closed) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

    const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "x"}, "capabilities": ["oob"]}}"#;

    /// A scripted QEMU: for each expected command, sends the given lines.
    async fn fake_qemu(
        stream: tokio::io::DuplexStream,
        script: Vec<(&'static str, Vec<&'static str>)>,
    ) -> Vec<String> {
        let (r, mut w) = tokio::io::split(stream);
        let mut r = BufReader::new(r);
        w.write_all(format!("{GREETING}\r\n").as_bytes())
            .await
            .unwrap();
        let mut seen = Vec::new();
        for (expect, answers) in script {
            let mut line = String::new();
            if r.read_line(&mut line).await.unwrap() == 0 {
                break;
            }
            let v: Value = serde_json::from_str(&line).unwrap();
            assert_eq!(v["execute"], expect);
            seen.push(line.trim().to_string());
            for a in answers {
                w.write_all(format!("{a}\r\n").as_bytes()).await.unwrap();
            }
        }
        seen
    }

    #[tokio::test]
    async fn handshake_status_events_and_errors() {
        let (a, b) = tokio::io::duplex(4096);
        let server = tokio::spawn(fake_qemu(
            b,
            vec![
                ("qmp_capabilities", vec![r#"{"return": {}}"#]),
                (
                    "query-status",
                    vec![
                        r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "RESUME"}"#,
                        "",
                        r#"{"return": {"status": "running", "running": true}}"#,
                    ],
                ),
                (
                    "system_powerdown",
                    vec![r#"{"error": {"class": "GenericError", "desc": "nope"}}"#],
                ),
                ("quit", vec![]),
            ],
        ));
        let mut c = QmpClient::connect(a).await.unwrap();
        assert_eq!(c.version(), "10.0.2");
        assert_eq!(c.query_status().await.unwrap(), "running");
        assert_eq!(c.events(), ["RESUME"]);
        let e = c.system_powerdown().await.unwrap_err();
        assert!(
            e.to_string().contains("system_powerdown") && e.to_string().contains("nope"),
            "{e}"
        );
        // The fake closes after reading quit without answering: quit still succeeds.
        c.quit().await.unwrap();
        let seen = server.await.unwrap();
        assert_eq!(seen.len(), 4);
        assert_eq!(seen[0], r#"{"execute":"qmp_capabilities"}"#);
    }

    #[tokio::test]
    async fn rejects_missing_greeting_and_closed_peer() {
        let (a, mut b) = tokio::io::duplex(4096);
        b.write_all(b"{\"return\": {}}\n").await.unwrap();
        let e = QmpClient::connect(a).await.unwrap_err();
        assert!(matches!(e, QmpError::Malformed(_)), "{e}");

        let (a, b) = tokio::io::duplex(4096);
        drop(b);
        assert!(matches!(
            QmpClient::connect(a).await.unwrap_err(),
            QmpError::Closed
        ));
    }

    #[tokio::test]
    async fn overlong_line_is_an_error() {
        let (a, mut b) = tokio::io::duplex(64 * 1024);
        let writer = tokio::spawn(async move {
            let chunk = vec![b'x'; 64 * 1024];
            for _ in 0..(MAX_LINE / chunk.len() + 2) {
                if b.write_all(&chunk).await.is_err() {
                    break;
                }
            }
        });
        assert!(matches!(
            QmpClient::connect(a).await.unwrap_err(),
            QmpError::TooLong
        ));
        writer.await.unwrap();
    }

    #[test]
    fn parses_each_kind() {
        assert_eq!(
            parse_line(GREETING.as_bytes()).unwrap(),
            QmpMessage::Greeting {
                version: "10.0.2".into()
            }
        );
        assert_eq!(
            parse_line(br#"{"QMP": {}}"#).unwrap(),
            QmpMessage::Greeting {
                version: "unknown".into()
            }
        );
        assert_eq!(
            parse_line(br#"{"event": "SHUTDOWN", "data": {}}"#).unwrap(),
            QmpMessage::Event {
                name: "SHUTDOWN".into()
            }
        );
        assert!(parse_line(b"[1,2]").is_err());
        assert!(parse_line(b"{\"x\": 1}").is_err());
        assert!(parse_line(b"not json").is_err());
    }

    proptest! {
        #[test]
        fn parse_line_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = parse_line(&bytes);
        }

        #[test]
        fn parse_line_never_panics_on_json_shapes(
            key in prop::sample::select(vec!["QMP", "return", "error", "event", "x"]),
            inner in "[a-z{}\\[\\]:,\"0-9 ]{0,40}",
        ) {
            let line = format!("{{\"{key}\": {inner}}}");
            let _ = parse_line(line.as_bytes());
        }
    }
}
