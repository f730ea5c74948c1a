//! SSE: answers streamed on a POST (resumed with GET + `Last-Event-ID` when they break before
//! the answer, legacy only) and the GET stream for server-initiated messages.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::ACCEPT;
use http::{HeaderValue, Method};

use super::super::client::{HttpBody, HttpClient, HttpError, HttpRequest};
use super::post::{answer_id, content_type, Sink};
use super::resend::{body_failure, Attempt};
use super::{
    shown, HttpTransportError, Shared, ACCEPT_SSE, HEADER_LAST_EVENT_ID, HEADER_PROTOCOL_VERSION,
    HEADER_SESSION_ID,
};
use crate::jsonrpc::{self, RequestId};
use crate::limits::Limits;
use crate::sse;
use crate::transport::Era;

pub(super) enum SseFailure {
    /// The stream broke (I/O).
    Broken(HttpError),
    /// The stream carried garbage.
    Bad(HttpTransportError),
}

impl<C: HttpClient> Shared<C> {
    /// Reads an SSE answer to a POST until the answer to `expect` arrived. A legacy stream
    /// that ends or breaks before it is resumed with GET + `Last-Event-ID`.
    pub(super) async fn read_sse_answer(
        self: &Arc<Self>,
        url: &str,
        body: C::Body,
        expect: Option<&RequestId>,
        sink: &mut Sink<'_>,
    ) -> Result<(), Attempt> {
        let mut parser = sse::Parser::new(self.config.limits.max_message_bytes);
        let mut answered = expect.is_none();
        let mut body = body;
        let mut resumes = 0u32;
        loop {
            match self
                .read_sse(url, &mut body, &mut parser, expect, &mut answered, sink)
                .await
            {
                Ok(()) if answered => {
                    finish_body(body);
                    return Ok(());
                }
                Ok(()) => {}
                Err(SseFailure::Bad(e)) => return Err(Attempt::Fatal(e)),
                Err(SseFailure::Broken(e)) => {
                    if answered {
                        return Ok(());
                    }
                    if parser.last_event_id().is_none() || self.era() != Some(Era::Legacy) {
                        return Err(Attempt::Retry(body_failure(url, e)));
                    }
                }
            }
            // Ended or broke before the answer: resume if the server gave event ids.
            let Some(last) = parser.last_event_id().map(str::to_owned) else {
                return Err(Attempt::Fatal(HttpTransportError::NoAnswer {
                    url: shown(url),
                    id: expect.map(|i| i.to_string()).unwrap_or_default(),
                }));
            };
            resumes += 1;
            if resumes > self.config.retry.max_retries.max(1) + 2 {
                return Err(Attempt::Fatal(HttpTransportError::NoAnswer {
                    url: shown(url),
                    id: expect.map(|i| i.to_string()).unwrap_or_default(),
                }));
            }
            tokio::time::sleep(reconnect_delay(
                &self.config.limits,
                parser.retry_ms(),
                resumes - 1,
            ))
            .await;
            match self.open_get(url, Some(&last)).await {
                Ok(Some(b)) => body = b,
                Ok(None) | Err(_) => {
                    return Err(Attempt::Fatal(HttpTransportError::NoAnswer {
                        url: shown(url),
                        id: expect.map(|i| i.to_string()).unwrap_or_default(),
                    }))
                }
            }
        }
    }

    pub(super) async fn read_sse(
        &self,
        url: &str,
        body: &mut C::Body,
        parser: &mut sse::Parser,
        expect: Option<&RequestId>,
        answered: &mut bool,
        sink: &mut Sink<'_>,
    ) -> Result<(), SseFailure> {
        loop {
            let chunk = match body.chunk().await {
                Ok(Some(c)) => c,
                Ok(None) => return Ok(()),
                Err(e) => return Err(SseFailure::Broken(e)),
            };
            let mut bad = None;
            let mut messages = Vec::new();
            let max_items = self.config.limits.max_batch_items;
            parser
                .feed(&chunk, |ev| {
                    if ev.data.is_empty() || bad.is_some() {
                        return;
                    }
                    match jsonrpc::parse_messages_limited(ev.data.as_bytes(), max_items, |m| {
                        if let Some(id) = expect {
                            if answer_id(&m) == Some(id) {
                                *answered = true;
                            }
                        }
                        messages.push(m);
                    }) {
                        Ok(()) => {}
                        Err(source) => {
                            bad = Some(HttpTransportError::Parse {
                                url: shown(url),
                                source,
                            })
                        }
                    }
                })
                .map_err(|source| {
                    SseFailure::Bad(HttpTransportError::Sse {
                        url: shown(url),
                        source,
                    })
                })?;
            // Waits while the receive queue is full: the server is slowed to our pace.
            for m in messages {
                self.deliver(m, sink).await;
            }
            if let Some(e) = bad {
                return Err(SseFailure::Bad(e));
            }
            if expect.is_some() && *answered {
                // The answer is in: do not wait for a server that keeps the stream open.
                return Ok(());
            }
        }
    }

    /// GET on the endpoint: `Ok(None)` when the server offers no stream (405 and the like).
    pub(super) async fn open_get(
        &self,
        url: &str,
        last_event_id: Option<&str>,
    ) -> Result<Option<C::Body>, HttpError> {
        let mut headers = self.config.headers.clone();
        headers.insert(ACCEPT, ACCEPT_SSE);
        {
            let st = self.lock();
            if let Some(v) = &st.version_header {
                headers.insert(HEADER_PROTOCOL_VERSION, v.clone());
            }
            if let Some(s) = &st.session {
                headers.insert(HEADER_SESSION_ID, s.id.clone());
            }
        }
        if let Some(id) = last_event_id.and_then(|l| HeaderValue::from_str(l).ok()) {
            headers.insert(HEADER_LAST_EVENT_ID, id);
        }
        let resp = self
            .client
            .send(HttpRequest {
                method: Method::GET,
                url: shown(url),
                headers,
                body: Bytes::new(),
                timeout: None,
            })
            .await?;
        if resp.status.is_success() && content_type(&resp.headers).starts_with("text/event-stream")
        {
            Ok(Some(resp.body))
        } else {
            Ok(None)
        }
    }

    /// Opens (or reopens) the GET stream for server-initiated messages of the current session.
    pub(super) fn start_get_stream(self: &Arc<Self>) {
        if !self.config.get_stream {
            return;
        }
        let mut st = self.lock();
        let Some(session) = &st.session else {
            return;
        };
        if st.closed {
            return;
        }
        let url = self.config.endpoints[session.backend].clone();
        let generation = st.generation;
        if let Some(t) = st.get_task.take() {
            t.abort();
        }
        let weak = Arc::downgrade(self);
        st.get_task = Some(tokio::spawn(async move {
            let mut parser: Option<sse::Parser> = None;
            let mut failures = 0u32;
            // Reopenings in a row of streams that ended soon after opening (backoff).
            let mut quick_ends = 0u32;
            loop {
                let Some(me) = weak.upgrade() else { return };
                if me.lock().generation != generation {
                    return;
                }
                let last = parser
                    .as_ref()
                    .and_then(|p| p.last_event_id().map(str::to_owned));
                let mut body = match me.open_get(&url, last.as_deref()).await {
                    Ok(Some(b)) => b,
                    Ok(None) => return,
                    Err(e) => {
                        failures += 1;
                        tracing::debug!("GET stream to {} failed: {e}", shown(&url));
                        if failures > 5 {
                            return;
                        }
                        drop(me);
                        tokio::time::sleep(Duration::from_secs(1 << failures.min(5))).await;
                        continue;
                    }
                };
                let p = parser
                    .get_or_insert_with(|| sse::Parser::new(me.config.limits.max_message_bytes));
                let mut answered = true;
                let opened = Instant::now();
                let r = me
                    .read_sse(&url, &mut body, p, None, &mut answered, &mut Sink::Queue)
                    .await;
                if let Err(SseFailure::Bad(e)) = r {
                    tracing::warn!("dropping the server's GET stream: {e}");
                    return;
                }
                // A stream that lived long was fine: start the backoff over.
                if opened.elapsed() > me.config.limits.sse_max_reconnect {
                    quick_ends = 0;
                }
                let wait = reconnect_delay(&me.config.limits, p.retry_ms(), quick_ends);
                quick_ends = quick_ends.saturating_add(1);
                drop(me);
                failures = 0;
                tokio::time::sleep(wait).await;
            }
        }));
    }
}

/// Polls a future once without a real waker: `Some` when it was ready at once.
pub(super) fn poll_once<F: std::future::Future>(f: F) -> Option<F::Output> {
    let mut f = std::pin::pin!(f);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match f.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(v) => Some(v),
        std::task::Poll::Pending => None,
    }
}

/// Reads what is left of an answered SSE stream so its connection can be reused: at once
/// when the end is already buffered (the usual case), else in a background task for at
/// most 10 s. Anything after the answer is discarded.
pub(super) fn finish_body<B: HttpBody>(mut body: B) {
    loop {
        match poll_once(body.chunk()) {
            Some(Ok(Some(_))) => continue,
            Some(Ok(None) | Err(_)) => return,
            None => break,
        }
    }
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        rt.spawn(async move {
            let drain = async { while let Ok(Some(_)) = body.chunk().await {} };
            let _ = tokio::time::timeout(Duration::from_secs(10), drain).await;
        });
    }
}

/// The wait before reopening an SSE stream: the server's `retry:` but at least
/// `sse_min_reconnect`, doubled for each of `attempt` quick reopenings in a row, at most
/// `sse_max_reconnect`.
pub(super) fn reconnect_delay(limits: &Limits, retry_ms: Option<u64>, attempt: u32) -> Duration {
    let asked = Duration::from_millis(retry_ms.unwrap_or(1000));
    let base = asked.max(limits.sse_min_reconnect);
    base.saturating_mul(1u32 << attempt.min(16))
        .min(limits.sse_max_reconnect.max(limits.sse_min_reconnect))
}
