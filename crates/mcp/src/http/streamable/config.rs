//! Configuration of the transport and the per-endpoint generation cache.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use http::{HeaderMap, HeaderName, HeaderValue};

use super::HttpTransportError;
use crate::balance::BalancerConfig;
use crate::limits::Limits;
use crate::retry::RetryPolicy;
use crate::transport::Era;

/// Remembers which generation each endpoint speaks. Clones share the map.
#[derive(Debug, Clone, Default)]
pub struct EraCache(Arc<Mutex<HashMap<String, Era>>>);

impl EraCache {
    /// The remembered generation of `url`.
    pub fn get(&self, url: &str) -> Option<Era> {
        self.0.lock().ok().and_then(|m| m.get(url).copied())
    }

    /// Remembers the generation of `url`.
    pub fn set(&self, url: &str, era: Era) {
        if let Ok(mut m) = self.0.lock() {
            m.insert(url.to_owned(), era);
        }
    }

    /// Forgets `url` (the cached assumption failed).
    pub fn forget(&self, url: &str) {
        if let Ok(mut m) = self.0.lock() {
            m.remove(url);
        }
    }
}

/// Configuration of a [`StreamableHttpTransport`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct HttpConfig {
    /// Endpoint URLs of one logical server (several = load balancing).
    pub endpoints: Vec<String>,
    /// Extra headers on every request (e.g. `Authorization`).
    pub headers: HeaderMap,
    /// Open the GET stream for server-initiated messages (legacy sessions).
    pub get_stream: bool,
    /// Bounds: message size, batch items, receive queue, SSE reconnect timing, redirects.
    pub limits: Limits,
    /// Retry rules (backoff, limits, per-attempt timeout, overall deadline).
    pub retry: RetryPolicy,
    /// Load-balancing rules.
    pub balance: BalancerConfig,
    /// Generation cache (share it between transports to the same servers).
    pub era_cache: EraCache,
}

impl HttpConfig {
    /// A configuration for these endpoints with the defaults.
    pub fn new(endpoints: impl IntoIterator<Item = impl Into<String>>) -> Self {
        HttpConfig {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            headers: HeaderMap::new(),
            get_stream: true,
            limits: Limits::default(),
            retry: RetryPolicy::default(),
            balance: BalancerConfig::default(),
            era_cache: EraCache::default(),
        }
    }

    /// Sets the bounds.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Adds a header given as `Name: value`. Errors name the header, never its value.
    pub fn with_header_line(mut self, line: &str) -> Result<Self, HttpTransportError> {
        let Some((name, value)) = line.split_once(':') else {
            // No colon: the whole text may be a token given without its name.
            return Err(HttpTransportError::BadHeader(format!(
                "<{} characters without a ':'>",
                line.chars().count()
            )));
        };
        let bad = || HttpTransportError::BadHeader(name.trim().to_owned());
        let name = HeaderName::from_bytes(name.trim().as_bytes()).map_err(|_| bad())?;
        let mut value = HeaderValue::from_str(value.trim()).map_err(|_| bad())?;
        value.set_sensitive(true);
        self.headers.append(name, value);
        Ok(self)
    }
}
