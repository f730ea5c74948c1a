//! The retry policy applied to POSTs, through the crate's one retry driver
//! ([`crate::retry::retry`]): how a failed attempt is classified, when another endpoint takes
//! the retry at once, when an expired session is re-established first, how a given-up retry
//! is reported, and the health probes of the balancer.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderValue, Method};

use super::super::client::{Delivery, HttpClient, HttpError, HttpErrorKind, HttpRequest};
use super::post::read_limited;
use super::{
    error_chain, shown, HttpTransportError, Shared, HEADER_METHOD, HEADER_PROTOCOL_VERSION,
};
use crate::balance::EndpointId;
use crate::jsonrpc::{self, Message, RequestId};
use crate::retry::{self, Classify, Failure, Phase, RequestKind, RetryError};
use crate::transport::Era;

/// How one attempt ended.
pub(super) enum Attempt {
    Done,
    Retry(AttemptFailure),
    Fatal(HttpTransportError),
}

/// A failure that the retry policy may act on.
#[derive(Debug)]
pub(super) struct AttemptFailure {
    pub(super) error: HttpTransportError,
    /// What it means for retrying.
    pub(super) failure: Failure,
    /// The endpoint is unusable (count against it).
    pub(super) backend_failed: bool,
    /// The session expired: re-establish it, then resend at once.
    pub(super) reinit: bool,
    /// Retry without the backoff delay (set by the POST loop).
    pub(super) at_once: bool,
}

impl AttemptFailure {
    /// A failure no retry can help.
    fn fatal(error: HttpTransportError) -> Self {
        AttemptFailure {
            error,
            failure: Failure::Permanent,
            backend_failed: false,
            reinit: false,
            at_once: false,
        }
    }
}

impl std::fmt::Display for AttemptFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", error_chain(&self.error))
    }
}

impl std::error::Error for AttemptFailure {}

impl Classify for AttemptFailure {
    fn failure(&self) -> Failure {
        self.failure.clone()
    }

    fn retry_at_once(&self) -> bool {
        self.at_once
    }
}

/// What the failure of one attempt asks to do before the next one.
enum BeforeNext {
    /// The session expired: set up a new one (seen at this session generation).
    Reinit(u64),
    /// The session's endpoint failed: move the session to another endpoint.
    MoveSession(u64, usize),
}

impl<C: HttpClient> Shared<C> {
    /// Sends one message with retries; queues what comes back, except the answer to the
    /// request itself when `capture` (returned instead).
    pub(super) async fn post(
        self: &Arc<Self>,
        msg: &Message,
        extra: &[(String, String)],
        capture: bool,
    ) -> Result<Option<Message>, HttpTransportError> {
        let method = msg.method();
        if self.era() == Some(Era::Modern) && matches!(msg, Message::Notification(_)) {
            // 2026-07-28 defines no client notifications over HTTP (closing a request's
            // stream is its cancellation).
            return Ok(None);
        }
        let mut expect = None;
        if let Message::Request(r) = msg {
            if r.method == "initialize" {
                self.lock().init_params = r.params.clone();
            }
            if capture {
                expect = Some(&r.id);
            }
        }
        let body = Bytes::from(msg.to_vec());
        let kind = match method {
            Some(m) => RequestKind::method(m),
            // A response to a server request: repeating it is harmless to us but we cannot
            // know what the server does with a duplicate, so it counts as unsafe.
            None => RequestKind::new("response", retry::Safety::Unsafe),
        };
        let before_next: Mutex<Option<BeforeNext>> = Mutex::new(None);
        let me = self;
        let outcome = retry::retry(
            &self.config.retry,
            &kind,
            &retry::TokioClock,
            |a: retry::Attempt| {
                let before = before_next
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .take();
                let (body, before_next) = (&body, &before_next);
                async move {
                    match before {
                        Some(BeforeNext::Reinit(generation)) => me
                            .reinitialize(generation, None)
                            .await
                            .map_err(AttemptFailure::fatal)?,
                        Some(BeforeNext::MoveSession(generation, dead)) => {
                            let _ = me.reinitialize(generation, Some(dead)).await;
                        }
                        None => {}
                    }
                    let (backend, generation) = me.pick_backend().map_err(AttemptFailure::fatal)?;
                    let mut answer = None;
                    let attempt = me.attempt(
                        msg,
                        method,
                        body,
                        backend,
                        expect.map(|id| (id, &mut answer)),
                        extra,
                    );
                    // Timed here (not only by the driver) so the endpoint is charged with it.
                    let outcome = match a.budget {
                        Some(b) => tokio::time::timeout(b, attempt).await.unwrap_or_else(|_| {
                            Attempt::Retry(AttemptFailure {
                                error: HttpTransportError::Request {
                                    url: shown(&me.config.endpoints[backend]),
                                    source: HttpError::new(
                                        HttpErrorKind::Timeout,
                                        Delivery::MaybeSent,
                                    ),
                                },
                                failure: Failure::Timeout(Phase::MaybeSent),
                                backend_failed: true,
                                reinit: false,
                                at_once: false,
                            })
                        }),
                        None => attempt.await,
                    };
                    let mut f = match outcome {
                        Attempt::Done => {
                            me.balancer.report_success(EndpointId(backend));
                            if let (Message::Notification(n), Some(Era::Legacy)) = (msg, me.era()) {
                                if n.method == "notifications/initialized" {
                                    me.start_get_stream();
                                }
                            }
                            return Ok(answer);
                        }
                        Attempt::Fatal(e) => return Err(AttemptFailure::fatal(e)),
                        Attempt::Retry(f) => f,
                    };
                    let next = if f.reinit {
                        // Expired session: the request was not processed; set up a new one
                        // and resend at once.
                        f.failure = Failure::NotSent;
                        f.at_once = true;
                        Some(BeforeNext::Reinit(generation))
                    } else {
                        if f.backend_failed {
                            me.balancer.report_failure(
                                EndpointId(backend),
                                Instant::now(),
                                &error_chain(&f.error),
                            );
                        }
                        // Another endpoint can take the retry at once when this one failed.
                        f.at_once = f.backend_failed
                            && me.config.endpoints.len() > 1
                            && me
                                .balancer
                                .any_available(Instant::now(), &[EndpointId(backend)]);
                        let session_endpoint =
                            me.era() == Some(Era::Legacy) && me.session_backend() == Some(backend);
                        // The session's endpoint failed: move the session elsewhere.
                        (f.at_once && session_endpoint)
                            .then_some(BeforeNext::MoveSession(generation, backend))
                    };
                    *before_next.lock().unwrap_or_else(PoisonError::into_inner) = next;
                    Err(f)
                }
            },
        )
        .await;
        outcome.map_err(|e| gave_up(e, &kind.name))
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
        at_once: false,
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
        at_once: false,
    }
}

/// The error of a POST the retry driver gave up on.
fn gave_up(e: RetryError<AttemptFailure>, method: &str) -> HttpTransportError {
    let method = method.to_owned();
    match e {
        RetryError::Failed(f) => f.error,
        RetryError::NotInvited { source, .. } => HttpTransportError::UnsafeNotResent {
            method,
            last: Box::new(source.error),
        },
        RetryError::NotRepeatable { source, .. } => match source.error {
            HttpTransportError::Request { url, source } => HttpTransportError::NotResent {
                method,
                url,
                source,
            },
            other => other,
        },
        RetryError::Exhausted {
            attempts, source, ..
        } => HttpTransportError::RetriesExhausted {
            method,
            attempts,
            last: Box::new(source.error),
        },
        RetryError::Deadline { budget, source, .. } => HttpTransportError::Deadline {
            method,
            budget,
            last: Box::new(source.error),
        },
        RetryError::RetryAfterTooLong {
            wait,
            limit,
            source,
            ..
        } => HttpTransportError::RetryAfterTooLong {
            wait,
            limit,
            last: Box::new(source.error),
        },
        RetryError::DeadlineDuringAttempt { budget: after, .. }
        | RetryError::AttemptTimeout { timeout: after, .. }
        | RetryError::AttemptTimeoutNotRepeatable { timeout: after, .. } => {
            HttpTransportError::OutOfTime { method, after }
        }
    }
}
