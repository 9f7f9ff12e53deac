//! The HTTP side of handing events over: [`post_events`], which the relay
//! (through [`BusClient::publish`]) and the bus's deliverers both use, and
//! the bus's read API for consumers catching up. Every hand-over is timed in
//! [`OutboundCalls`] (the relay's calls to the bus, the bus's pushes to each
//! subscriber): the RED metrics of the suite's outbound traffic.

use blog_domain::{Event, config::endpoint};
use serde::Deserialize;
use url::Url;

use super::retry::DeliveryError;
use crate::{
    internal::{self, InternalSecret},
    metrics::{Histograms, LATENCY_BUCKETS, Registry, SIZE_BUCKETS},
};

/// Outbound hand-overs by peer (`event-bus`, or a subscriber's name: both
/// come from configuration, so the set is bounded) and outcome (`ok`,
/// `refused`: the peer refused the events, `error`: anything else, retried).
#[derive(Debug, Clone)]
pub struct OutboundCalls {
    seconds: Histograms,
    events: Histograms,
}

impl Default for OutboundCalls {
    fn default() -> Self {
        Self { seconds: Histograms::new(&["peer", "outcome"], LATENCY_BUCKETS), events: Histograms::new(&["peer"], SIZE_BUCKETS) }
    }
}

impl OutboundCalls {
    pub fn register(&self, metrics: &Registry) {
        metrics.add_histograms(
            "blog_outbound_request_duration_seconds",
            "Hand-overs of events to a peer (relay to the bus, bus to a subscriber) by outcome (_count: calls).",
            &self.seconds,
        );
        metrics.add_histograms("blog_outbound_events", "Events per hand-over (batch size).", &self.events);
    }

    fn observe<T>(&self, peer: &str, events: usize, started: std::time::Instant, result: &Result<T, DeliveryError>) {
        let outcome = match result {
            Ok(_) => "ok",
            Err(DeliveryError::Status { refused: true, .. }) => "refused",
            Err(_) => "error",
        };
        self.seconds.with(&[peer, outcome]).observe_duration(started.elapsed());
        self.events.with(&[peer]).observe(events as f64);
    }
}

/// Where a hand-over goes and how it is recorded.
#[derive(Debug, Clone, Copy)]
pub struct Peer<'a> {
    pub url: &'a str,
    /// The `peer` label: a configured name, never a URL.
    pub name: &'a str,
    pub calls: &'a OutboundCalls,
}

/// Posts `events` to `peer` as an internal caller: one event as the original's
/// single object, more as an array. `covers_after` is sent with pushes from
/// the bus (see [`internal::COVERS_AFTER_HEADER`]). Returns the headers of
/// the acknowledgement (a consumer names what it consumes there, see
/// [`internal::CONSUMES_HEADER`]).
pub async fn post_events(
    http: &reqwest::Client,
    peer: Peer<'_>,
    secret: &InternalSecret,
    events: &[Event],
    covers_after: Option<u64>,
) -> Result<reqwest::header::HeaderMap, DeliveryError> {
    let started = std::time::Instant::now();
    let result = post_events_untimed(http, peer.url, secret, events, covers_after).await;
    peer.calls.observe(peer.name, events.len(), started, &result);
    result
}

async fn post_events_untimed(
    http: &reqwest::Client,
    url: &str,
    secret: &InternalSecret,
    events: &[Event],
    covers_after: Option<u64>,
) -> Result<reqwest::header::HeaderMap, DeliveryError> {
    let mut request = http.post(url).header(reqwest::header::AUTHORIZATION, secret.bearer());
    if let Some(after) = covers_after {
        request = request.header(internal::COVERS_AFTER_HEADER.clone(), after);
    }
    let request = if let [single] = events { request.json(single) } else { request.json(events) };
    let mut answer = check(request.send().await?).await?;
    let headers = std::mem::take(answer.headers_mut());
    // Read to the end, so the connection goes back to the pool.
    let _ = answer.bytes().await;
    Ok(headers)
}

/// The bus as a publisher and a catching-up consumer see it.
#[derive(Debug, Clone)]
pub struct BusClient {
    http: reqwest::Client,
    events: String,
    secret: InternalSecret,
    calls: OutboundCalls,
}

impl BusClient {
    pub fn new(http: reqwest::Client, base_url: &Url, secret: InternalSecret) -> Self {
        Self { http, events: endpoint(base_url, "/events"), secret, calls: OutboundCalls::default() }
    }

    /// The timings of this client's publishes, to register with the service's metrics.
    pub fn calls(&self) -> &OutboundCalls {
        &self.calls
    }

    /// Publishes `events` in one request; the bus stores each id once, so a
    /// retry after a lost answer does not duplicate anything.
    pub async fn publish(&self, events: &[Event]) -> Result<(), DeliveryError> {
        if events.is_empty() {
            return Ok(());
        }
        let peer = Peer { url: &self.events, name: blog_domain::Service::EventBus.name(), calls: &self.calls };
        post_events(&self.http, peer, &self.secret, events, None).await.map(drop)
    }

    /// Up to `limit` stored events with a sequence number above `after`.
    pub async fn events_after(&self, after: u64, limit: u32) -> Result<Vec<Event>, DeliveryError> {
        let url = format!("{}?after={after}&limit={limit}", self.events);
        let response = check(self.http.get(url).send().await?).await?;
        #[derive(Deserialize)]
        struct Page(Vec<Event>);
        Ok(response.json::<Page>().await?.0)
    }
}

/// A success, or the [`DeliveryError`] the answer amounts to.
async fn check(response: reqwest::Response) -> Result<reqwest::Response, DeliveryError> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let refused = internal::is_refusal(status, response.headers());
    let body = response.text().await.unwrap_or_default();
    Err(DeliveryError::Status { status: status.as_u16(), body: body.chars().take(300).collect(), refused })
}
