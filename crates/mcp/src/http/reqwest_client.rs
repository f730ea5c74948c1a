//! [`HttpClient`] on `reqwest` (hyper, one keep-alive pool, rustls with a preconfigured
//! `rustls::ClientConfig`, proxies from `HTTP_PROXY`/`HTTPS_PROXY`/`NO_PROXY`).
//!
//! reqwest is pinned to an exact version in the workspace and used only here. Redirects follow
//! [`super::redirect`] (same origin, at most [`ReqwestOptions::max_redirects`] hops), not
//! reqwest's default. reqwest's errors are kept without their URL (it may carry credentials
//! or a token); the transport names the endpoint itself, without secrets.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::client::{
    Delivery, HttpBody, HttpClient, HttpError, HttpErrorKind, HttpRequest, HttpResponse,
};

/// Options of the reqwest client.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ReqwestOptions {
    /// TLS configuration; `None` = `crate::tls`'s strict default.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Read proxies from the environment (`HTTP_PROXY`, `HTTPS_PROXY`, `ALL_PROXY`, `NO_PROXY`).
    pub proxy_from_env: bool,
    /// User-Agent header.
    pub user_agent: String,
    /// Connect timeout.
    pub connect_timeout: Duration,
    /// Redirects followed per request, all within the original origin
    /// (default [`crate::limits::MAX_REDIRECTS`]; 0 = none).
    pub max_redirects: usize,
}

impl ReqwestOptions {
    /// Sets the TLS configuration.
    pub fn with_tls(mut self, tls: Arc<rustls::ClientConfig>) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Turns reading proxies from the environment on or off.
    pub fn with_proxy_from_env(mut self, on: bool) -> Self {
        self.proxy_from_env = on;
        self
    }

    /// Sets the User-Agent.
    pub fn with_user_agent(mut self, ua: impl Into<String>) -> Self {
        self.user_agent = ua.into();
        self
    }
}

impl Default for ReqwestOptions {
    fn default() -> Self {
        ReqwestOptions {
            tls: None,
            proxy_from_env: true,
            user_agent: concat!("vmcp/", env!("CARGO_PKG_VERSION")).to_owned(),
            connect_timeout: Duration::from_secs(10),
            max_redirects: crate::limits::MAX_REDIRECTS,
        }
    }
}

/// Errors building the client.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReqwestClientError {
    /// reqwest refused the configuration.
    #[error("cannot build the HTTP client")]
    Build(#[source] reqwest::Error),
    /// The default TLS configuration could not be built.
    #[error("cannot set up TLS")]
    Tls(#[source] crate::tls::TlsError),
}

/// The reqwest-based client. Cloning shares the pool.
#[derive(Clone, Debug)]
pub struct ReqwestClient {
    client: reqwest::Client,
}

impl ReqwestClient {
    /// Builds a client.
    pub fn new(opts: &ReqwestOptions) -> Result<Self, ReqwestClientError> {
        let mut b = reqwest::Client::builder()
            .user_agent(opts.user_agent.clone())
            .connect_timeout(opts.connect_timeout)
            .tcp_nodelay(true)
            .redirect(super::redirect::policy(opts.max_redirects))
            .pool_idle_timeout(Duration::from_secs(60));
        if !opts.proxy_from_env {
            b = b.no_proxy();
        }
        // reqwest needs a rustls configuration even for plain http (it has no provider of its
        // own): the strict default of crate::tls when none is given.
        let tls = match &opts.tls {
            Some(t) => t.clone(),
            None => crate::tls::client_config(&crate::tls::TlsOptions::default())
                .map_err(ReqwestClientError::Tls)?,
        };
        b = b.tls_backend_preconfigured((*tls).clone());
        Ok(ReqwestClient {
            client: b.build().map_err(ReqwestClientError::Build)?,
        })
    }
}

/// A reqwest response body.
pub struct ReqwestBody(reqwest::Response);

impl HttpBody for ReqwestBody {
    async fn chunk(&mut self) -> Result<Option<Bytes>, HttpError> {
        self.0.chunk().await.map_err(|e| classify(e, true))
    }
}

impl HttpClient for ReqwestClient {
    type Body = ReqwestBody;

    async fn send(&self, req: HttpRequest) -> Result<HttpResponse<ReqwestBody>, HttpError> {
        let mut rb = self
            .client
            .request(req.method, &req.url)
            .headers(req.headers);
        if !req.body.is_empty() {
            rb = rb.body(req.body);
        }
        if let Some(t) = req.timeout {
            rb = rb.timeout(t);
        }
        let resp = rb.send().await.map_err(|e| classify(e, false))?;
        Ok(HttpResponse {
            status: resp.status(),
            headers: resp.headers().clone(),
            body: ReqwestBody(resp),
        })
    }
}

/// Maps a reqwest error to our classification. `in_body`: the head had arrived already.
fn classify(e: reqwest::Error, in_body: bool) -> HttpError {
    // The URL may hold credentials or a token; the transport names the endpoint itself.
    let e = e.without_url();
    if e.is_redirect() {
        // A refused redirect: a definite answer, not a failure to retry.
        return HttpError::with_source(HttpErrorKind::Other, Delivery::MaybeSent, e);
    }
    if in_body {
        let kind = if e.is_timeout() {
            HttpErrorKind::Timeout
        } else {
            HttpErrorKind::Io
        };
        return HttpError::with_source(kind, Delivery::MaybeSent, e);
    }
    if e.is_builder() {
        return HttpError::with_source(HttpErrorKind::Other, Delivery::NotSent, e);
    }
    if e.is_connect() {
        // Connection establishment (TCP, proxy CONNECT, TLS handshake) failed: nothing of the
        // request was written.
        let kind = if is_tls(&e) {
            HttpErrorKind::Tls
        } else if e.is_timeout() {
            HttpErrorKind::Timeout
        } else {
            HttpErrorKind::Connect
        };
        return HttpError::with_source(kind, Delivery::NotSent, e);
    }
    let kind = if e.is_timeout() {
        HttpErrorKind::Timeout
    } else {
        HttpErrorKind::Io
    };
    HttpError::with_source(kind, Delivery::MaybeSent, e)
}

fn is_tls(e: &reqwest::Error) -> bool {
    crate::tls::TlsRejection::find(e).is_some()
}
