//! One POST and its answer: status handling, JSON bodies, and the bounded receive queue
//! every message from the server goes through.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};

use super::super::client::{HttpBody, HttpClient, HttpError, HttpRequest, HttpResponse};
use super::resend::{body_failure, transport_failure, Attempt, AttemptFailure};
use super::{shown, snippet, HttpTransportError, Queued, Session, Shared, HEADER_SESSION_ID};
use crate::jsonrpc::{self, ErrorResponse, Message, RequestId};
use crate::limits::RateLimitedWarning;
use crate::retry::{Failure, RetryAfter};
use crate::transport::Era;

/// Where a message goes while a response is read.
pub(super) enum Sink<'a> {
    /// Into the receive queue.
    Queue,
    /// The answer to `id` is returned to the caller; everything else is queued.
    Capture(&'a RequestId, &'a mut Option<Message>),
}

/// Roughly what a queued message costs in memory.
pub(super) fn message_cost(m: &Message) -> usize {
    let raw =
        |p: &Option<Box<serde_json::value::RawValue>>| p.as_ref().map_or(0, |p| p.get().len());
    64 + match m {
        Message::Request(r) => r.method.len() + raw(&r.params),
        Message::Notification(n) => n.method.len() + raw(&n.params),
        Message::Response(r) => r.result.get().len(),
        Message::Error(e) => e.error.message.len(),
    }
}

impl<C: HttpClient> Shared<C> {
    /// One POST to one endpoint. `capture`: return the answer to this id instead of queueing.
    pub(super) async fn attempt(
        self: &Arc<Self>,
        msg: &Message,
        method: Option<&str>,
        body: &Bytes,
        backend: usize,
        capture: Option<(&RequestId, &mut Option<Message>)>,
        extra: &[(String, String)],
    ) -> Attempt {
        let url = self.config.endpoints[backend].clone();
        let had_session = self.lock().session.is_some();
        let req = HttpRequest {
            method: Method::POST,
            url: url.clone(),
            headers: {
                let mut h = self.request_headers(msg, method);
                for (k, v) in extra {
                    if let (Ok(k), Ok(v)) = (
                        HeaderName::from_bytes(k.as_bytes()),
                        HeaderValue::from_str(v),
                    ) {
                        h.insert(k, v);
                    }
                }
                h
            },
            body: body.clone(),
            timeout: None,
        };
        let resp = match self.client.send(req).await {
            Ok(r) => r,
            Err(e) => return Attempt::Retry(transport_failure(url, e)),
        };
        let status = resp.status;
        if status == StatusCode::ACCEPTED {
            return Attempt::Done;
        }
        if status.is_success() {
            if let (Message::Request(r), Some(id)) = (msg, resp.headers.get(&HEADER_SESSION_ID)) {
                if r.method == "initialize" {
                    let mut st = self.lock();
                    st.session = Some(Session {
                        id: id.clone(),
                        backend,
                    });
                    st.generation += 1;
                }
            }
            let expect = match msg {
                Message::Request(r) => Some(&r.id),
                _ => None,
            };
            let mut sink = match capture {
                Some((id, slot)) => Sink::Capture(id, slot),
                None => Sink::Queue,
            };
            return match self.read_response(&url, resp, expect, &mut sink).await {
                Ok(()) => Attempt::Done,
                Err(f) => f,
            };
        }
        // Error statuses.
        let retry_after = resp
            .headers
            .get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(RetryAfter::parse);
        let is_json = content_type(&resp.headers).starts_with("application/json");
        let text = read_limited(resp.body, 64 << 10).await.unwrap_or_default();
        if status == StatusCode::NOT_FOUND && had_session && self.era() == Some(Era::Legacy) {
            return Attempt::Retry(AttemptFailure {
                error: HttpTransportError::Status {
                    url: shown(&url),
                    status: 404,
                    body: "session expired".into(),
                },
                failure: Failure::NotProcessed {
                    status: 404,
                    retry_after: None,
                },
                backend_failed: false,
                reinit: true,
                at_once: false,
            });
        }
        let failure = Failure::from_status(status.as_u16(), retry_after);
        if let Some(f @ Failure::NotProcessed { .. }) = &failure {
            return Attempt::Retry(AttemptFailure {
                error: HttpTransportError::Status {
                    url: shown(&url),
                    status: status.as_u16(),
                    body: snippet(&text),
                },
                failure: f.clone(),
                backend_failed: status == StatusCode::SERVICE_UNAVAILABLE,
                reinit: false,
                at_once: false,
            });
        }
        // A JSON-RPC error in the body answers the request.
        if is_json || text.trim_start().starts_with('{') {
            if let Ok(Message::Error(mut e)) = jsonrpc::parse_message(text.as_bytes()) {
                if let Message::Request(r) = msg {
                    if e.id.is_none() {
                        e.id = Some(r.id.clone());
                    }
                }
                let m = Message::Error(e);
                match capture {
                    Some((id, slot)) if matches!(&m, Message::Error(ErrorResponse { id: Some(i), .. }) if i == id) => {
                        *slot = Some(m)
                    }
                    _ => self.enqueue(m).await,
                }
                return Attempt::Done;
            }
        }
        let error = HttpTransportError::Status {
            url: shown(&url),
            status: status.as_u16(),
            body: snippet(&text),
        };
        if let Some(f @ Failure::MaybeProcessed { .. }) = failure {
            // 502/504: a gateway failed; the request may or may not have been processed.
            return Attempt::Retry(AttemptFailure {
                error,
                failure: f,
                backend_failed: true,
                reinit: false,
                at_once: false,
            });
        }
        Attempt::Fatal(error)
    }

    /// Reads a 2xx response: JSON or SSE. Legacy SSE streams that break before the answer
    /// are resumed with GET + Last-Event-ID.
    pub(super) async fn read_response(
        self: &Arc<Self>,
        url: &str,
        resp: HttpResponse<C::Body>,
        expect: Option<&RequestId>,
        sink: &mut Sink<'_>,
    ) -> Result<(), Attempt> {
        let ct = content_type(&resp.headers);
        if ct.starts_with("application/json") {
            let limit = self.config.limits.max_message_bytes;
            let bytes = match read_all(resp.body, limit).await {
                Ok(Some(b)) => b,
                // Too large: it would be again, so it is not retried.
                Ok(None) => {
                    return Err(Attempt::Fatal(HttpTransportError::TooLarge {
                        url: shown(url),
                        limit,
                    }))
                }
                Err(e) => return Err(Attempt::Retry(body_failure(url, e))),
            };
            if bytes.is_empty() {
                return if expect.is_some() {
                    Err(Attempt::Fatal(HttpTransportError::NoAnswer {
                        url: shown(url),
                        id: expect.map(|i| i.to_string()).unwrap_or_default(),
                    }))
                } else {
                    Ok(())
                };
            }
            let mut messages = Vec::new();
            let parsed =
                jsonrpc::parse_messages_limited(&bytes, self.config.limits.max_batch_items, |m| {
                    messages.push(m)
                });
            drop(bytes);
            if let Err(source) = parsed {
                return Err(Attempt::Fatal(HttpTransportError::Parse {
                    url: shown(url),
                    source,
                }));
            }
            let mut answered = expect.is_none();
            for m in messages {
                if expect.is_some() && answer_id(&m) == expect {
                    answered = true;
                }
                self.deliver(m, sink).await;
            }
            // A JSON answer is the whole answer: without our id in it, nothing will come.
            return if answered {
                Ok(())
            } else {
                Err(Attempt::Fatal(HttpTransportError::NoAnswer {
                    url: shown(url),
                    id: expect.map(|i| i.to_string()).unwrap_or_default(),
                }))
            };
        }
        if ct.starts_with("text/event-stream") {
            return self.read_sse_answer(url, resp.body, expect, sink).await;
        }
        if expect.is_none() {
            return Ok(());
        }
        Err(Attempt::Fatal(HttpTransportError::ContentType {
            url: shown(url),
            content_type: ct.to_owned(),
        }))
    }

    pub(super) async fn deliver(&self, m: Message, sink: &mut Sink<'_>) {
        if let Sink::Capture(id, slot) = sink {
            if answer_id(&m) == Some(*id) {
                **slot = Some(m);
                return;
            }
        }
        self.enqueue(m).await;
    }

    /// Puts a message into the receive queue, waiting while the queue is full (in messages
    /// or bytes). Never fails: when the receiver is gone the message is dropped.
    pub(super) async fn enqueue(&self, msg: Message) {
        let budget = self.config.limits.receive_queue_bytes.max(1);
        let cost = u32::try_from(message_cost(&msg).min(budget)).unwrap_or(u32::MAX);
        let permit = self.queue_bytes.clone().acquire_many_owned(cost).await.ok();
        if self.tx.is_closed() {
            return;
        }
        if self.tx.capacity() == 0 {
            QUEUE_FULL.warn(format_args!(
                "the MCP receive queue is full ({} messages); reading from the server pauses",
                self.config.limits.receive_queue_messages
            ));
        }
        let _ = self
            .tx
            .send(Queued {
                msg,
                _bytes: permit,
            })
            .await;
    }
}

pub(super) fn answer_id(m: &Message) -> Option<&RequestId> {
    match m {
        Message::Response(r) => Some(&r.id),
        Message::Error(e) => e.id.as_ref(),
        Message::Request(_) | Message::Notification(_) => None,
    }
}

pub(super) fn content_type(h: &HeaderMap) -> &str {
    h.get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

/// The whole body, or `None` when it is larger than `limit` bytes (reading stops there).
pub(super) async fn read_all<B: HttpBody>(
    mut body: B,
    limit: usize,
) -> Result<Option<Vec<u8>>, HttpError> {
    let mut out = Vec::new();
    while let Some(c) = body.chunk().await? {
        if out.len().saturating_add(c.len()) > limit {
            return Ok(None);
        }
        out.extend_from_slice(&c);
    }
    Ok(Some(out))
}

/// Warned when a server fills the receive queue (at most every 5 s).
pub(super) static QUEUE_FULL: RateLimitedWarning = RateLimitedWarning::new(Duration::from_secs(5));

pub(super) async fn read_limited<B: HttpBody>(mut body: B, limit: usize) -> Option<String> {
    let mut out = Vec::new();
    while let Ok(Some(c)) = body.chunk().await {
        out.extend_from_slice(&c);
        if out.len() >= limit {
            break;
        }
    }
    Some(String::from_utf8_lossy(&out).into_owned())
}
