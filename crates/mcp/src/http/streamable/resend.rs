//! The retry policy applied to POSTs: how a failed attempt is classified, when another
//! endpoint takes the retry, when an expired session is re-established first, and the
//! health probes of the balancer.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use http::{HeaderValue, Method};

use super::super::client::{Delivery, HttpClient, HttpError, HttpErrorKind, HttpRequest};
use super::post::read_limited;
use super::{
    error_chain, give_up, shown, HttpTransportError, Shared, HEADER_METHOD, HEADER_PROTOCOL_VERSION,
};
use crate::balance::EndpointId;
use crate::jsonrpc::{self, Message, RequestId};
use crate::retry::{self, Decision, Failure, Phase, RequestKind};
use crate::transport::Era;

/// How one attempt ended.
pub(super) enum Attempt {
    Done,
    Retry(AttemptFailure),
    Fatal(HttpTransportError),
}

/// A failure that the retry policy may act on.
pub(super) struct AttemptFailure {
    pub(super) error: HttpTransportError,
    /// What it means for retrying.
    pub(super) failure: Failure,
    /// The endpoint is unusable (count against it).
    pub(super) backend_failed: bool,
    /// The session expired: re-establish it, then resend at once.
    pub(super) reinit: bool,
}

impl<C: HttpClient> Shared<C> {
    /// Sends one message with retries; queues what comes back.
    pub(super) async fn post(
        self: &Arc<Self>,
        msg: &Message,
        extra: &[(String, String)],
    ) -> Result<(), HttpTransportError> {
        let method = msg.method();
        let era = self.era();
        if era == Some(Era::Modern) && matches!(msg, Message::Notification(_)) {
            // 2026-07-28 defines no client notifications over HTTP.
            return Ok(());
        }
        if let Message::Request(r) = msg {
            if r.method == "initialize" {
                self.lock().init_params = r.params.clone();
            }
        }
        let body = Bytes::from(msg.to_vec());
        let kind = match method {
            Some(m) => RequestKind::method(m),
            // A response to a server request: repeating it is harmless to us but we cannot
            // know what the server does with a duplicate, so it counts as unsafe.
            None => RequestKind::new("response", retry::Safety::Unsafe),
        };
        let policy = &self.config.retry;
        let start = Instant::now();
        let mut attempts: u32 = 0;
        loop {
            attempts += 1;
            let (backend, generation) = self.pick_backend()?;
            let outcome = match policy.attempt_timeout {
                Some(t) => {
                    match tokio::time::timeout(
                        t,
                        self.attempt(msg, method, &body, backend, None, extra),
                    )
                    .await
                    {
                        Ok(o) => o,
                        Err(_) => Attempt::Retry(AttemptFailure {
                            error: HttpTransportError::Request {
                                url: shown(&self.config.endpoints[backend]),
                                source: HttpError::new(HttpErrorKind::Timeout, Delivery::MaybeSent),
                            },
                            failure: Failure::Timeout(Phase::MaybeSent),
                            backend_failed: true,
                            reinit: false,
                        }),
                    }
                }
                None => self.attempt(msg, method, &body, backend, None, extra).await,
            };
            let f = match outcome {
                Attempt::Done => {
                    self.balancer.report_success(EndpointId(backend));
                    if let (Message::Notification(n), Some(Era::Legacy)) = (msg, self.era()) {
                        if n.method == "notifications/initialized" {
                            self.start_get_stream();
                        }
                    }
                    return Ok(());
                }
                Attempt::Fatal(e) => return Err(e),
                Attempt::Retry(f) => f,
            };
            let legacy = self.era() == Some(Era::Legacy);
            if f.reinit && attempts <= policy.max_retries + 1 {
                // Expired session: the request was not processed; set up a new one and resend.
                self.reinitialize(generation, None).await?;
                continue;
            }
            if f.backend_failed {
                self.balancer.report_failure(
                    EndpointId(backend),
                    Instant::now(),
                    &error_chain(&f.error),
                );
            }
            let decision = retry::classify(
                policy,
                &kind,
                &f.failure,
                attempts,
                start.elapsed(),
                SystemTime::now(),
                rand::random::<f64>(),
            );
            let delay = match decision {
                Decision::RetryAfter(d) => d,
                Decision::GiveUp(why) => return Err(give_up(why, &kind.name, f.error)),
            };
            // Another endpoint can take the retry at once when this one failed to connect.
            let other_available = f.backend_failed
                && self.config.endpoints.len() > 1
                && self
                    .balancer
                    .any_available(Instant::now(), &[EndpointId(backend)]);
            tracing::debug!(
                "retrying {} (attempt {}): {}",
                kind.name,
                attempts + 1,
                f.error
            );
            if legacy && f.backend_failed && self.session_backend() == Some(backend) {
                // The session's endpoint failed: move the session elsewhere if we can.
                if other_available {
                    let _ = self.reinitialize(generation, Some(backend)).await;
                    continue;
                }
            } else if other_available {
                continue;
            }
            tokio::time::sleep(delay).await;
        }
    }

    /// One health probe: a `ping` POST; alive if the server answers below 500.
    pub(super) async fn probe(&self, url: String) -> Result<(), String> {
        let ping = Message::Request(jsonrpc::Request {
            id: RequestId::String("vmcp-health".into()),
            method: "ping".into(),
            params: None,
        });
        let mut headers = self.base_headers.clone();
        if let Some(v) = &self.lock().version_header {
            headers.insert(HEADER_PROTOCOL_VERSION, v.clone());
        }
        if self.era() == Some(Era::Modern) {
            headers.insert(HEADER_METHOD, HeaderValue::from_static("ping"));
        }
        let resp = self
            .client
            .send(HttpRequest {
                method: Method::POST,
                url,
                headers,
                body: Bytes::from(ping.to_vec()),
                timeout: Some(self.config.balance.health_check.timeout),
            })
            .await
            .map_err(|e| error_chain(&e))?;
        let status = resp.status;
        let _ = read_limited(resp.body, 4096).await;
        if status.is_server_error() {
            Err(format!("HTTP {status}"))
        } else {
            Ok(())
        }
    }
}

pub(super) fn transport_failure(url: String, e: HttpError) -> AttemptFailure {
    // A rejected certificate will be rejected again: no retry.
    let rejection = crate::tls::TlsRejection::find(&e);
    let failure = match (&rejection, e.delivery, e.kind) {
        (Some(r), _, _) if r.is_permanent() => Failure::Permanent,
        (_, _, HttpErrorKind::Other) => Failure::Permanent,
        (_, Delivery::NotSent, _) => Failure::NotSent,
        (_, _, HttpErrorKind::Timeout) => Failure::Timeout(Phase::MaybeSent),
        _ => Failure::Reset(Phase::MaybeSent),
    };
    AttemptFailure {
        error: HttpTransportError::Request {
            url: shown(&url),
            source: e,
        },
        failure,
        // A certificate problem is not a dead endpoint.
        backend_failed: rejection.is_none(),
        reinit: false,
    }
}

pub(super) fn body_failure(url: &str, e: HttpError) -> AttemptFailure {
    let failure = if e.kind == HttpErrorKind::Timeout {
        Failure::Timeout(Phase::MaybeSent)
    } else {
        Failure::Reset(Phase::MaybeSent)
    };
    AttemptFailure {
        error: HttpTransportError::Request {
            url: shown(url),
            source: HttpError {
                delivery: Delivery::MaybeSent,
                ..e
            },
        },
        failure,
        backend_failed: true,
        reinit: false,
    }
}
