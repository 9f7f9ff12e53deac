//! The HTTP client of the event bus, used by outbox relays (publish) and by
//! consumers catching up on start (replay).

use std::time::Duration;

use serde::Deserialize;

use crate::{events::Event, internal::InternalSecret};

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("event bus unreachable: {0}")]
    Unreachable(#[from] reqwest::Error),
    #[error("event bus answered {status}: {body}")]
    Status {
        status: u16,
        body: String,
        /// The bus refused the events themselves (see [`crate::internal::REFUSAL_HEADER`]).
        refused: bool,
    },
}

impl BusError {
    /// Whether retrying the same request can succeed: anything but the bus's
    /// own refusal of the events. A 404 or 405 from a wrong URL, a 401 or 403
    /// from a wrong secret, a proxy's error page: all are faults of the path,
    /// not of the events, and are retried until the path is fixed.
    pub fn is_transient(&self) -> bool {
        match self {
            BusError::Unreachable(_) => true,
            BusError::Status { refused, .. } => !refused,
        }
    }

    /// A 4xx that is not a refusal of the events: something is misconfigured
    /// (URL, secret) and an operator must be told.
    pub fn is_misdirected(&self) -> bool {
        matches!(self, BusError::Status { status: 400..500, refused: false, .. })
    }
}

/// A client builder with the suite's TLS (rustls with the ring provider, no
/// OpenSSL) and connection settings.
pub fn client_builder() -> reqwest::ClientBuilder {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder().connect_timeout(Duration::from_secs(2)).pool_idle_timeout(Duration::from_secs(60)).tcp_nodelay(true)
}

/// Builds a client from [`client_builder`] adjusted by `configure`. On a
/// machine without a CA bundle the platform verifier cannot start; rather
/// than fail, the client then trusts no certificate at all: the suite's own
/// traffic is plain HTTP and keeps working, an HTTPS peer is refused.
pub fn build_client(configure: impl Fn(reqwest::ClientBuilder) -> reqwest::ClientBuilder) -> reqwest::Client {
    match configure(client_builder()).build() {
        Ok(client) => client,
        Err(e) => {
            tracing::warn!(error = %e, "no CA certificates found; HTTPS peers will be refused");
            configure(client_builder())
                .tls_certs_only(std::iter::empty())
                .build()
                .expect("a client without TLS roots needs nothing from the system")
        }
    }
}

/// The HTTP client every service uses to call peers, with a timeout so a hung
/// peer cannot hold a task forever.
pub fn http_client(timeout: Duration) -> reqwest::Client {
    build_client(|builder| builder.timeout(timeout))
}

#[derive(Debug, Clone)]
pub struct BusClient {
    http: reqwest::Client,
    base: String,
    secret: InternalSecret,
}

impl BusClient {
    pub fn new(http: reqwest::Client, base_url: &str, secret: InternalSecret) -> Self {
        Self { http, base: base_url.trim_end_matches('/').to_owned(), secret }
    }

    /// Publishes `events` in one request; the bus stores each id once, so a
    /// retry after a lost answer does not duplicate anything.
    pub async fn publish(&self, events: &[Event]) -> Result<(), BusError> {
        let response = self
            .http
            .post(format!("{}/events", self.base))
            .header(reqwest::header::AUTHORIZATION, self.secret.bearer())
            .json(events)
            .send()
            .await?;
        check(response).await.map(drop)
    }

    /// Up to `limit` stored events with a sequence number above `after`.
    pub async fn events_after(&self, after: u64, limit: u32) -> Result<Vec<Event>, BusError> {
        let url = format!("{}/events?after={after}&limit={limit}", self.base);
        let response = check(self.http.get(url).send().await?).await?;
        #[derive(Deserialize)]
        struct Page(Vec<Event>);
        Ok(response.json::<Page>().await?.0)
    }
}

async fn check(response: reqwest::Response) -> Result<reqwest::Response, BusError> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let refused = crate::internal::is_refusal(status, response.headers());
    let body = response.text().await.unwrap_or_default();
    Err(BusError::Status { status: status.as_u16(), body: body.chars().take(300).collect(), refused })
}
