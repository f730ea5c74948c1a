//! Sessions and protocol generations: what the transport reads from the messages it carries
//! (generation and version, `x-mcp-header` annotations), the headers each request carries,
//! choosing the endpoint, re-establishing an expired (or moved) legacy session, ending it
//! with DELETE.
//!
//! The client says nothing to the transport beyond the messages; from them:
//! - an `initialize` request switches to the legacy generation; its answer's
//!   `protocolVersion` becomes the `MCP-Protocol-Version` header and is remembered in the
//!   [`super::EraCache`];
//! - a `server/discover` request switches to the modern generation with the version in its
//!   `_meta`; a successful answer is remembered in the cache. When the cache already says
//!   every endpoint is legacy, the transport answers it itself with "method not found" (no
//!   round trip); an HTTP 4xx without a JSON-RPC error becomes that answer too;
//! - in the modern generation, `tools/list` answers are read for `x-mcp-header` annotations
//!   (tools with invalid ones are removed from the answer, as the protocol requires) and
//!   `tools/call` mirrors the annotated arguments into `Mcp-Param-*` headers.

use std::borrow::Cow;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method};
use serde::Deserialize;

use super::super::client::{HttpBody, HttpClient, HttpRequest};
use super::ProtocolState;
use super::{
    error_chain, resend::Attempt, shown, HttpTransportError, Shared, HEADER_METHOD, HEADER_NAME,
    HEADER_PROTOCOL_VERSION, HEADER_SESSION_ID,
};
use crate::balance::EndpointId;
use crate::jsonrpc::{self, ErrorResponse, Message, Request, RequestId, Response, RpcError};
use crate::model::{is_modern, META_PROTOCOL_VERSION};
use crate::param_headers;
use crate::transport::Era;

impl<C: HttpClient> Shared<C> {
    /// Sends one message, reading from it (and from the answer, for the few requests that
    /// matter) what the HTTP exchange needs.
    pub(super) async fn send(self: &Arc<Self>, msg: &Message) -> Result<(), HttpTransportError> {
        let Message::Request(r) = msg else {
            return self.post(msg, &[], false).await.map(|_| ());
        };
        match r.method.as_str() {
            "initialize" => {
                self.set_protocol(Era::Legacy, None);
                let answer = self.post(msg, &[], true).await?;
                if let Some(Message::Response(a)) = &answer {
                    self.learn_initialize(a);
                }
                self.enqueue_opt(answer).await;
                Ok(())
            }
            "server/discover" => {
                if self.known_era() == Some(Era::Legacy) {
                    let answer = not_found(&r.id, "the endpoint speaks the 2025 protocol (remembered from an earlier connection)".into());
                    self.enqueue(answer).await;
                    return Ok(());
                }
                self.set_protocol(Era::Modern, discover_version(r));
                match self.post(msg, &[], true).await {
                    Ok(answer) => {
                        if let Some(Message::Response(_)) = &answer {
                            self.remember_era(Era::Modern);
                        }
                        self.enqueue_opt(answer).await;
                        Ok(())
                    }
                    // An HTTP error without a JSON-RPC one: the server does not know the method.
                    Err(HttpTransportError::Status { status, body, .. })
                        if (400..500).contains(&status) =>
                    {
                        let why = format!("HTTP {status}: {body}");
                        self.enqueue(not_found(&r.id, why)).await;
                        Ok(())
                    }
                    Err(e) => Err(e),
                }
            }
            "tools/list" if self.era() == Some(Era::Modern) => {
                let mut answer = self.post(msg, &[], true).await?;
                if let Some(Message::Response(a)) = &mut answer {
                    self.learn_tools(r, a);
                }
                self.enqueue_opt(answer).await;
                Ok(())
            }
            "tools/call" if self.era() == Some(Era::Modern) => {
                let headers = self.param_headers(r);
                self.post(msg, &headers, false).await.map(|_| ())
            }
            _ => self.post(msg, &[], false).await.map(|_| ()),
        }
    }

    async fn enqueue_opt(&self, m: Option<Message>) {
        if let Some(m) = m {
            self.enqueue(m).await;
        }
    }

    fn set_protocol(&self, era: Era, version: Option<String>) {
        let mut st = self.lock();
        st.version_header = version
            .as_deref()
            .and_then(|v| HeaderValue::from_str(v).ok());
        st.protocol = Some(ProtocolState { era, version });
    }

    /// The answer to `initialize`: its version goes into the headers from now on.
    fn learn_initialize(&self, answer: &Response) {
        #[derive(Deserialize)]
        struct Init<'a> {
            #[serde(borrow, rename = "protocolVersion")]
            version: Option<Cow<'a, str>>,
        }
        let Ok(Init {
            version: Some(version),
        }) = serde_json::from_str::<Init<'_>>(answer.result.get())
        else {
            return;
        };
        if is_modern(&version) {
            return;
        }
        self.set_protocol(Era::Legacy, Some(version.into_owned()));
        self.remember_era(Era::Legacy);
    }

    fn remember_era(&self, era: Era) {
        for url in &self.config.endpoints {
            self.config.era_cache.set(url, era);
        }
    }

    /// The generation every endpoint is known to speak, if they agree.
    fn known_era(&self) -> Option<Era> {
        let cache = &self.config.era_cache;
        let mut eras = self.config.endpoints.iter().map(|u| cache.get(u));
        let first = eras.next().flatten()?;
        eras.all(|e| e == Some(first)).then_some(first)
    }

    /// Reads the `x-mcp-header` annotations of a `tools/list` page (a first page starts
    /// over) and removes the tools whose annotations are invalid.
    fn learn_tools(&self, request: &Request, answer: &mut Response) {
        let first_page = request
            .params
            .as_deref()
            .is_none_or(|p| !p.get().contains("\"cursor\""));
        let raw = answer.result.get();
        if first_page {
            self.lock().param_specs.clear();
        }
        if !raw.contains("x-mcp-header") {
            return;
        }
        // Over the budget: the client refuses the answer anyway; do not parse it here.
        if crate::limits::json_nodes(raw, self.config.limits.max_result_nodes).is_err() {
            return;
        }
        let Ok(mut page) = serde_json::from_str::<serde_json::Value>(raw) else {
            return;
        };
        let Some(tools) = page.get_mut("tools").and_then(|t| t.as_array_mut()) else {
            return;
        };
        let mut specs = Vec::new();
        let before = tools.len();
        tools.retain(|t| {
            let name = t.get("name").and_then(|n| n.as_str()).unwrap_or("");
            let schema = t.get("inputSchema").unwrap_or(&serde_json::Value::Null);
            match param_headers::extract(schema) {
                Ok(h) => {
                    if !h.is_empty() {
                        specs.push((name.to_owned(), h));
                    }
                    true
                }
                Err(e) => {
                    tracing::warn!(
                        "ignoring tool {} of the server: {e}",
                        crate::sanitize::for_display(name, 80)
                    );
                    false
                }
            }
        });
        if tools.len() != before {
            if let Ok(raw) = jsonrpc::to_raw(&page) {
                answer.result = raw;
            }
        }
        self.lock().param_specs.extend(specs);
    }

    /// The `Mcp-Param-*` headers of a `tools/call`.
    fn param_headers(&self, request: &Request) -> Vec<(String, String)> {
        #[derive(Deserialize)]
        struct Call<'a> {
            #[serde(borrow)]
            name: Cow<'a, str>,
            #[serde(default)]
            arguments: Option<serde_json::Value>,
        }
        let Some(params) = request.params.as_deref() else {
            return Vec::new();
        };
        if self.lock().param_specs.is_empty() {
            return Vec::new();
        }
        let Ok(call) = serde_json::from_str::<Call<'_>>(params.get()) else {
            return Vec::new();
        };
        let spec = self.lock().param_specs.get(call.name.as_ref()).cloned();
        spec.map(|s| param_headers::headers_for(&s, call.arguments.as_ref()))
            .unwrap_or_default()
    }

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

/// Decodes a header value of 2026-07-28: the `=?base64?...?=` sentinel, else the value as
/// it is (also when the sentinel does not hold valid Base64 of UTF-8).
pub fn decode_header_value(value: &str) -> Cow<'_, str> {
    value
        .strip_prefix("=?base64?")
        .and_then(|r| r.strip_suffix("?="))
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .and_then(|b| String::from_utf8(b).ok())
        .map_or(Cow::Borrowed(value), Cow::Owned)
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

/// The version a `server/discover` request names in its `_meta`.
fn discover_version(request: &Request) -> Option<String> {
    #[derive(Deserialize)]
    struct Params {
        #[serde(rename = "_meta", default)]
        meta: Option<serde_json::Map<String, serde_json::Value>>,
    }
    let p: Params = serde_json::from_str(request.params.as_deref()?.get()).ok()?;
    p.meta?
        .get(META_PROTOCOL_VERSION)?
        .as_str()
        .map(str::to_owned)
}

/// A "method not found" answer to `id`, made by the transport.
fn not_found(id: &RequestId, why: String) -> Message {
    Message::Error(ErrorResponse {
        id: Some(id.clone()),
        error: RpcError::new(
            jsonrpc::METHOD_NOT_FOUND,
            format!("server/discover is not supported here ({why})"),
        ),
    })
}
