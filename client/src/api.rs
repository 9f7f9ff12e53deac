//! The UI's two read-only windows into the back end: `GET /api/status` (each
//! service's health and each subscriber's progress) and `GET /api/flow` (the
//! bus's live event flow).
//!
//! They exist so the browser never talks to internal services: the client
//! asks them and passes on an allow-listed copy. Fields are copied by name,
//! never forwarded wholesale, so internal addresses, raw error texts and
//! request ids cannot leak even if the bus starts sending more. Only `GET`
//! is routed, so nothing can be published through here. A peer that is down
//! or slow gets a JSON 502/503 within a few seconds, never a hang.
//!
//! The flow is one upstream subscription to the bus, whoever watches: the
//! first watcher starts it, each record is filtered and framed once and
//! fanned out in process (a broadcast channel), and it reconnects with
//! backoff while anyone still watches (sending `resync`, as a lagging
//! watcher gets, since records may have passed meanwhile). It ends at the
//! first record after the last watcher left.

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{
    Json, Router,
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response, sse::Event},
    routing::get,
};
use blog_domain::Service;
use blog_kit::{
    Shutdown,
    http::{error_response, sse},
    messaging::retry::backoff,
};
use futures_util::{Stream, StreamExt, stream};
use serde_json::{Map, Value, json};
use tokio::sync::{broadcast, watch};

/// How long a status probe or the start of the flow stream may take.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest SSE block accepted from the bus before the stream is dropped.
const MAX_BLOCK: usize = 256 * 1024;
/// Flow records buffered per watcher; one further behind gets `resync`.
const FLOW_BUFFER: usize = 256;

/// The one upstream subscription to the bus's `/flow`, shared by every watcher.
#[derive(Debug)]
struct FlowHub {
    events: broadcast::Sender<Event>,
    /// Whether the upstream stream is open right now.
    connected: AtomicBool,
    /// Counts the upstream connections made, so a watcher can wait for the
    /// next one (a short-lived one included).
    connections: watch::Sender<u64>,
    /// Whether the task holding the upstream runs.
    running: AtomicBool,
}

/// What the API handlers need.
#[derive(Debug, Clone)]
pub struct Peers {
    /// Base URL of every service but the client.
    pub urls: BTreeMap<Service, String>,
    /// For short requests: every call is bounded by [`PEER_TIMEOUT`].
    pub http: reqwest::Client,
    /// For the flow stream, which has no end: only connecting is bounded.
    pub streaming: reqwest::Client,
    pub shutdown: Shutdown,
    hub: Arc<FlowHub>,
    /// The last `/api/status` answer and when it was made (see [`STATUS_SHARED_FOR`]).
    status: Arc<tokio::sync::Mutex<Option<(Instant, StatusCode, Value)>>>,
}

impl Peers {
    pub fn new(urls: BTreeMap<Service, String>, shutdown: Shutdown) -> Self {
        let http = blog_kit::http::client::http_client(PEER_TIMEOUT);
        let streaming = blog_kit::http::client::build_client(|builder| builder);
        let hub = FlowHub {
            events: broadcast::channel(FLOW_BUFFER).0,
            connected: AtomicBool::new(false),
            connections: watch::channel(0).0,
            running: AtomicBool::new(false),
        };
        Self { urls, http, streaming, shutdown, hub: Arc::new(hub), status: Arc::default() }
    }

    /// Starts the upstream task unless it runs.
    fn ensure_flow(&self) {
        if self.hub.running.compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst).is_ok() {
            tokio::spawn(relay_flow(self.clone()));
        }
    }

    fn bus(&self) -> String {
        self.urls.get(&Service::EventBus).cloned().unwrap_or_else(|| Service::EventBus.local_url())
    }
}

pub fn router(peers: Peers) -> Router {
    Router::new().route("/api/status", get(status)).route("/api/flow", get(flow)).with_state(peers)
}

/// `{"services":[{"name","healthy"}],"bus":{"head","subscribers":[...]}}`;
/// 503 with the services' health and an `error` when the bus cannot answer.
/// How long one `/api/status` answer is shared. Each takes a request to
/// every service and the bus's status (on JetStream, a question to the
/// stream's leader): an anonymous caller asking in a loop would otherwise
/// make six internal requests of each of its own, and the page asks every
/// few seconds anyway.
pub const STATUS_SHARED_FOR: Duration = Duration::from_secs(1);

/// The suite's health: asked of the services at most once per
/// [`STATUS_SHARED_FOR`], by one caller while the others wait for its answer.
async fn status(State(peers): State<Peers>) -> Response {
    let mut shared = peers.status.lock().await;
    let answer = match shared.take() {
        Some(answer) if answer.0.elapsed() < STATUS_SHARED_FOR => answer,
        _ => {
            let (code, body) = probe_status(&peers).await;
            (Instant::now(), code, body)
        }
    };
    let response = (answer.1, Json(answer.2.clone())).into_response();
    *shared = Some(answer);
    response
}

async fn probe_status(peers: &Peers) -> (StatusCode, Value) {
    let probes = peers.urls.iter().map(|(service, base)| {
        let http = peers.http.clone();
        let url = format!("{base}/healthz");
        async move {
            let healthy = matches!(http.get(url).send().await, Ok(r) if r.status().is_success());
            json!({ "name": service.name(), "healthy": healthy })
        }
    });
    let bus = async {
        let answer = peers.http.get(format!("{}/status", peers.bus())).send().await.map_err(|_| StatusCode::SERVICE_UNAVAILABLE)?;
        if !answer.status().is_success() {
            return Err(StatusCode::BAD_GATEWAY);
        }
        answer.json::<Value>().await.map_err(|_| StatusCode::BAD_GATEWAY)
    };
    let (mut services, bus) = tokio::join!(futures_util::future::join_all(probes), bus);
    // The client answers this request, so it is up.
    services.push(json!({ "name": Service::Client.name(), "healthy": true }));
    match bus {
        Ok(bus) => (StatusCode::OK, json!({ "services": services, "bus": public_bus_status(&bus) })),
        Err(code) => {
            let message =
                if code == StatusCode::SERVICE_UNAVAILABLE { "the event bus is unavailable" } else { "the event bus answered badly" };
            (code, json!({ "error": message, "services": services }))
        }
    }
}

/// The bus's `/status` without URLs or error texts: a subscriber is only
/// `failing` or not.
pub fn public_bus_status(bus: &Value) -> Value {
    let subscribers: Vec<Value> = bus["subscribers"]
        .as_array()
        .map(|list| {
            list.iter()
                .map(|s| {
                    let mut out = pick(s, &["name", "cursor", "lag", "delivered", "retries", "rejected", "lastDeliveryAt"]);
                    out.insert("failing".into(), Value::Bool(!s["lastError"].is_null()));
                    Value::Object(out)
                })
                .collect()
        })
        .unwrap_or_default();
    json!({ "head": bus["head"], "subscribers": subscribers })
}

/// Copies the named fields of `value` that are present.
fn pick(value: &Value, fields: &[&str]) -> Map<String, Value> {
    fields.iter().filter_map(|f| value.get(*f).map(|v| ((*f).to_owned(), v.clone()))).collect()
}

/// The bus's `/flow`, with only the public fields of each record, from the
/// shared subscription. 503 if the bus cannot be reached in [`PEER_TIMEOUT`]
/// or too many streams are open.
async fn flow(State(peers): State<Peers>) -> Response {
    let watcher = peers.hub.events.subscribe();
    peers.ensure_flow();
    let mut connections = peers.hub.connections.subscribe();
    let before = *connections.borrow_and_update();
    let open = peers.hub.connected.load(Ordering::SeqCst)
        || matches!(tokio::time::timeout(PEER_TIMEOUT, connections.wait_for(|n| *n > before)).await, Ok(Ok(_)));
    if !open {
        return error_response(StatusCode::SERVICE_UNAVAILABLE, "the event bus is unavailable");
    }
    match sse::live_stream(watcher, peers.shutdown.clone(), |event: Event| event) {
        // ingress-nginx buffers responses unless told not to; a buffered
        // event stream would arrive in lumps.
        Ok(sse) => ([("x-accel-buffering", "no")], sse).into_response(),
        Err(full) => full.into_response(),
    }
}

/// Holds the upstream subscription while anyone watches: connects, fans each
/// public record out, and reconnects with backoff when the bus goes away.
async fn relay_flow(peers: Peers) {
    let hub = &peers.hub;
    let mut attempt = 0;
    loop {
        while hub.events.receiver_count() > 0 {
            let request = peers.streaming.get(format!("{}/flow", peers.bus())).header("accept", "text/event-stream").send();
            if let Ok(Ok(upstream)) = tokio::time::timeout(PEER_TIMEOUT, request).await
                && upstream.status().is_success()
            {
                attempt = 0;
                hub.connected.store(true, Ordering::SeqCst);
                hub.connections.send_modify(|n| *n += 1);
                let mut records = std::pin::pin!(public_flow(upstream.bytes_stream(), peers.shutdown.clone()));
                while let Some(record) = records.next().await {
                    if hub.events.send(record).is_err() {
                        break;
                    }
                }
                hub.connected.store(false, Ordering::SeqCst);
                // Records may pass while reconnecting: watchers reload.
                let _ = hub.events.send(Event::default().event("resync").data("{}"));
            }
            attempt += 1;
            if peers.shutdown.sleep(backoff(attempt)).await {
                hub.running.store(false, Ordering::SeqCst);
                return;
            }
        }
        hub.running.store(false, Ordering::SeqCst);
        // A watcher that came between the check and the store must not be
        // left without an upstream.
        if hub.events.receiver_count() == 0 || hub.running.compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst).is_err() {
            return;
        }
    }
}

/// Turns the bus's SSE bytes into public SSE events; ends with the upstream,
/// on an unreadable or oversized block, or at shutdown.
pub fn public_flow<S, B, E>(upstream: S, shutdown: Shutdown) -> impl Stream<Item = Event> + Send
where
    S: Stream<Item = Result<B, E>> + Send + Unpin + 'static,
    B: AsRef<[u8]>,
{
    struct Reader<S> {
        upstream: S,
        buffer: Vec<u8>,
        shutdown: Shutdown,
    }
    let reader = Reader { upstream, buffer: Vec::new(), shutdown };
    stream::unfold(reader, |mut reader| async move {
        loop {
            while let Some(block) = take_block(&mut reader.buffer) {
                if let Some(event) = public_event(&block) {
                    return Some((event, reader));
                }
            }
            if reader.buffer.len() > MAX_BLOCK {
                return None;
            }
            let chunk = tokio::select! {
                chunk = reader.upstream.next() => chunk,
                () = reader.shutdown.wait() => None,
            };
            match chunk {
                Some(Ok(bytes)) => reader.buffer.extend(bytes.as_ref().iter().filter(|b| **b != b'\r')),
                Some(Err(_)) | None => return None,
            }
        }
    })
}

/// Removes the first complete SSE block (up to a blank line) from `buffer`,
/// which holds no carriage returns.
fn take_block(buffer: &mut Vec<u8>) -> Option<String> {
    let end = buffer.windows(2).position(|w| w == b"\n\n")?;
    let block: Vec<u8> = buffer.drain(..end + 2).collect();
    Some(String::from_utf8_lossy(&block[..end]).into_owned())
}

/// One SSE block of the bus as a public event, or `None` for comments,
/// keep-alives and anything not on the allow-list.
pub fn public_event(block: &str) -> Option<Event> {
    let mut name = "message";
    let mut data = String::new();
    for line in block.lines() {
        if let Some(value) = line.strip_prefix("event:") {
            name = value.trim();
        } else if let Some(value) = line.strip_prefix("data:") {
            if !data.is_empty() {
                data.push('\n');
            }
            data.push_str(value.strip_prefix(' ').unwrap_or(value));
        }
    }
    let fields: &[&str] = match name {
        "published" => &["seq", "id", "type", "data", "timestamp"],
        "delivered" => &["seq", "id", "type", "subscriber", "lagMs"],
        _ => return None,
    };
    let value: Value = serde_json::from_str(&data).ok()?;
    let public = pick(&value, fields);
    let mut event = Event::default().event(name).json_data(&public).ok()?;
    if let Some(seq) = public.get("seq").and_then(Value::as_u64) {
        event = event.id(seq.to_string());
    }
    Some(event)
}
