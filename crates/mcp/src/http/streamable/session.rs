//! Sessions and protocol generations: the headers each request carries, choosing the
//! endpoint, re-establishing an expired (or moved) legacy session, ending it with DELETE.

use std::borrow::Cow;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method};
use serde::Deserialize;

use super::super::client::{HttpBody, HttpClient, HttpRequest};
use super::{
    error_chain, resend::Attempt, shown, HttpTransportError, Shared, HEADER_METHOD, HEADER_NAME,
    HEADER_PROTOCOL_VERSION, HEADER_SESSION_ID,
};
use crate::balance::EndpointId;
use crate::jsonrpc::{self, Message, RequestId};
use crate::transport::Era;

impl<C: HttpClient> Shared<C> {
    pub(super) fn session_backend(&self) -> Option<usize> {
        self.lock().session.as_ref().map(|s| s.backend)
    }

    /// The endpoint for the next request: the session's, else the balancer's choice.
    pub(super) fn pick_backend(&self) -> Result<(usize, u64), HttpTransportError> {
        let (sticky, generation) = {
            let st = self.lock();
            (st.session.as_ref().map(|s| s.backend), st.generation)
        };
        match sticky {
            Some(b) => Ok((b, generation)),
            // One endpoint: nothing to choose; its failures are reported by the retries.
            None if self.config.endpoints.len() == 1 => Ok((0, generation)),
            None => self
                .balancer
                .pick(Instant::now())
                .map(|(id, _)| (id.0, generation))
                .map_err(HttpTransportError::AllBackendsDown),
        }
    }

    pub(super) fn request_headers(&self, msg: &Message, method: Option<&str>) -> HeaderMap {
        let mut h = self.base_headers.clone();
        let st = self.lock();
        if let Some(v) = &st.version_header {
            h.insert(HEADER_PROTOCOL_VERSION, v.clone());
        }
        if let Some(s) = &st.session {
            h.insert(HEADER_SESSION_ID, s.id.clone());
        }
        let modern = st.protocol.as_ref().is_some_and(|p| p.era == Era::Modern);
        drop(st);
        if modern {
            if let Some(m) = method {
                if let Ok(v) = HeaderValue::from_str(m) {
                    h.insert(HEADER_METHOD, v);
                }
                if let Message::Request(r) = msg {
                    if let Some(name) = mcp_name(m, r.params.as_deref()) {
                        if let Ok(v) = HeaderValue::from_str(&encode_header_value(&name)) {
                            h.insert(HEADER_NAME, v);
                        }
                    }
                }
            }
        }
        h
    }

    /// One POST to one endpoint. `capture`: return the answer to this id instead of queueing.
    /// Replays `initialize` + `notifications/initialized` to get a new session: on the old
    /// endpoint after a 404, on another one when `dead` names the old one. Skipped if another
    /// task already did it since `seen_generation`.
    pub(super) async fn reinitialize(
        self: &Arc<Self>,
        seen_generation: u64,
        dead: Option<usize>,
    ) -> Result<(), HttpTransportError> {
        let _guard = self.reinit.lock().await;
        let (params, old_backend) = {
            let mut st = self.lock();
            if st.generation != seen_generation {
                return Ok(());
            }
            let old = st.session.take().map(|s| s.backend);
            st.generation += 1;
            if let Some(t) = st.get_task.take() {
                t.abort();
            }
            (st.init_params.clone(), old)
        };
        let Some(params) = params else {
            return Err(HttpTransportError::NoInitialize);
        };
        let mut exclude: Vec<EndpointId> = Vec::new();
        let mut backend = match (dead, old_backend) {
            (None, Some(b)) => b,
            (Some(d), _) => {
                exclude.push(EndpointId(d));
                self.balancer
                    .fail_over(EndpointId(d), Instant::now(), "session endpoint failed")
                    .map_err(HttpTransportError::AllBackendsDown)?
                    .0
                     .0
            }
            (None, None) => {
                self.balancer
                    .pick(Instant::now())
                    .map_err(HttpTransportError::AllBackendsDown)?
                    .0
                     .0
            }
        };
        loop {
            let n = self.next_internal_id.fetch_add(1, Ordering::Relaxed);
            let id = RequestId::String(format!("vmcp-reinit-{n}"));
            let init = Message::Request(jsonrpc::Request {
                id: id.clone(),
                method: "initialize".into(),
                params: Some(params.clone()),
            });
            let body = Bytes::from(init.to_vec());
            let mut answer = None;
            let err = match self
                .attempt(
                    &init,
                    Some("initialize"),
                    &body,
                    backend,
                    Some((&id, &mut answer)),
                    &[],
                )
                .await
            {
                Attempt::Done if matches!(answer, Some(Message::Response(_))) => {
                    let note = Message::notification("notifications/initialized", None);
                    let nbody = Bytes::from(note.to_vec());
                    let _ = self
                        .attempt(&note, note.method(), &nbody, backend, None, &[])
                        .await;
                    tracing::info!(
                        "re-established the MCP session on {}",
                        shown(&self.config.endpoints[backend])
                    );
                    self.start_get_stream();
                    return Ok(());
                }
                Attempt::Done => HttpTransportError::NoAnswer {
                    url: shown(&self.config.endpoints[backend]),
                    id: id.to_string(),
                },
                Attempt::Retry(f) => {
                    if f.backend_failed {
                        let _ = self.balancer.fail_over(
                            EndpointId(backend),
                            Instant::now(),
                            &error_chain(&f.error),
                        );
                    }
                    f.error
                }
                Attempt::Fatal(e) => e,
            };
            exclude.push(EndpointId(backend));
            match self.balancer.pick_excluding(Instant::now(), &exclude) {
                Ok((next, _)) => backend = next.0,
                Err(_) => return Err(err),
            }
        }
    }

    pub(super) async fn close(&self) {
        let (session, task) = {
            let mut st = self.lock();
            st.closed = true;
            (st.session.take(), st.get_task.take())
        };
        if let Ok(mut h) = self.health.lock() {
            h.take();
        }
        if let Some(t) = task {
            t.abort();
        }
        let Some(session) = session else { return };
        let mut headers = self.config.headers.clone();
        headers.insert(HEADER_SESSION_ID, session.id);
        if let Some(v) = self.lock().version_header.clone() {
            headers.insert(HEADER_PROTOCOL_VERSION, v);
        }
        let req = HttpRequest {
            method: Method::DELETE,
            url: self.config.endpoints[session.backend].clone(),
            headers,
            body: Bytes::new(),
            timeout: Some(Duration::from_secs(2)),
        };
        match self.client.send(req).await {
            Ok(mut r) => while let Ok(Some(_)) = r.body.chunk().await {},
            Err(e) => tracing::debug!("DELETE of the MCP session failed: {e}"),
        }
    }
}

#[derive(Deserialize)]
pub(super) struct NameProbe<'a> {
    #[serde(borrow, default)]
    name: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    uri: Option<Cow<'a, str>>,
}

/// The `Mcp-Name` value of a request, if its method has one.
pub(super) fn mcp_name(
    method: &str,
    params: Option<&serde_json::value::RawValue>,
) -> Option<String> {
    let params = params?;
    let probe: NameProbe<'_> = serde_json::from_str(params.get()).ok()?;
    match method {
        "tools/call" | "prompts/get" => probe.name.map(Cow::into_owned),
        "resources/read" => probe.uri.map(Cow::into_owned),
        _ => None,
    }
}

/// Encodes a header value per 2026-07-28: plain when it is visible ASCII without leading or
/// trailing whitespace and not sentinel-shaped, else `=?base64?...?=`.
pub fn encode_header_value(value: &str) -> Cow<'_, str> {
    let plain = !value.is_empty()
        && value
            .bytes()
            .all(|b| (0x20..=0x7e).contains(&b) || b == b'\t')
        && !value.starts_with([' ', '\t'])
        && !value.ends_with([' ', '\t'])
        && (!value.starts_with("=?base64?") || !value.ends_with("?="));
    if plain {
        Cow::Borrowed(value)
    } else {
        Cow::Owned(format!(
            "=?base64?{}?=",
            base64::engine::general_purpose::STANDARD.encode(value.as_bytes())
        ))
    }
}
