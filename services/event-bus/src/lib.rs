//! event-bus: the suite's durable event log and its fan-out.
//!
//! `POST /events` stores each event once (by id) and answers only when it is
//! on disk; one [`delivery::Deliverer`] per subscriber pushes the log to that
//! subscriber's `POST /events` from its own persisted cursor; `GET /events`
//! pages through the log for consumers catching up; `GET /status` and
//! `GET /metrics` show each subscriber's cursor, lag, retries and last error;
//! `GET /flow` streams events as they are stored and acknowledged.
//!
//! With `EVENT_STORE=nats://…` the log is a JetStream stream shared by any
//! number of bus replicas ([`log::jetstream`]), each subscriber delivered by
//! the one replica holding its lease ([`lease`]). `/status` then reads
//! JetStream's own state on every request: the head is the stream's last
//! sequence number, each cursor the durable one (or the deliverer's newer
//! one from its lease), each subscriber names the replica delivering it, and
//! the stream's leader and replicas are shown; `/readyz` answers 503 while
//! JetStream cannot be reached; `/flow` shows every replica's deliveries
//! (shared over NATS), each once.

pub mod delivery;
pub mod flow;
pub mod lease;
pub mod log;

use std::{path::PathBuf, sync::Arc, time::Duration};

use axum::{
    Router,
    extract::{DefaultBodyLimit, State},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use blog_domain::{
    Event, Service,
    config::{self, ConfigError},
};
use blog_kit::{
    ApiError, BoxError, Json, Shutdown,
    http::{Query, RequestId, client::http_client, layers, serve::serve, sse},
    internal::{self, InternalSecret},
    messaging::inbox::{EventsError, MAX_BATCH, MAX_EVENTS_BODY, parse_events},
    metrics::{self, Registry},
    store::Store,
};
use delivery::{Deliverer, SharedStatus, Subscriber, SubscriberStatus};
use flow::Flow;
use log::{EventLog, Stored};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::net::TcpListener;

/// Events returned by `GET /events` when no `limit` is given, and the most allowed.
pub const DEFAULT_PAGE: u32 = 1_000;
pub const MAX_PAGE: u32 = 10_000;

#[derive(Debug, Clone)]
pub struct Config {
    pub port: u16,
    pub data_dir: PathBuf,
    pub subscribers: Vec<Subscriber>,
    pub delivery_timeout: Duration,
    pub batch: u32,
    /// `INTERNAL_SECRET`: required of publishers, sent to subscribers.
    pub internal_secret: InternalSecret,
    /// `DB_MAX_BYTES`: cap of the log's database (unset or 0: none; refused
    /// with `EVENT_STORE`).
    pub db_max_bytes: Option<u64>,
    /// `EVENT_STORE`: `nats://host:port[,…]` keeps the log in JetStream; unset, in `DATA_DIR`.
    pub event_store: Option<String>,
    /// `NATS_USER` and `NATS_PASSWORD`: who the bus is to the JetStream
    /// servers (both or neither; the suite's servers refuse anonymous clients).
    pub nats_credentials: Option<log::jetstream::Credentials>,
    /// This replica's name in the delivery leases: `<HOSTNAME or 127.0.0.1>:<PORT>`.
    pub replica: String,
}

impl Config {
    pub fn from_env() -> Result<Self, ConfigError> {
        let default_subscribers = Service::SUBSCRIBERS
            .iter()
            .map(|s| Ok(format!("{}={}", s.name(), config::endpoint(&config::peer_url(*s)?, "/events"))))
            .collect::<Result<Vec<_>, ConfigError>>()?
            .join(",");
        let port = config::var("PORT", Service::EventBus.default_port())?;
        let host = std::env::var("HOSTNAME").ok().filter(|h| !h.trim().is_empty()).unwrap_or_else(|| "127.0.0.1".to_owned());
        let event_store = event_store(std::env::var("EVENT_STORE").ok())?;
        Ok(Self {
            port,
            replica: format!("{host}:{port}"),
            data_dir: config::var("DATA_DIR", PathBuf::from(".data").join(Service::EventBus.name()))?,
            subscribers: parse_subscribers(&config::list("SUBSCRIBERS", &default_subscribers))?,
            delivery_timeout: Duration::from_millis(config::var("DELIVERY_TIMEOUT_MS", 5_000)?),
            batch: delivery_batch(config::var("DELIVERY_BATCH", 256)?)?,
            internal_secret: InternalSecret::from_env()?,
            db_max_bytes: config::sqlite_cap(config::db_max_bytes()?, event_store.as_ref().map(|_| "EVENT_STORE"))?,
            event_store,
            nats_credentials: nats_credentials(std::env::var(NATS_USER_ENV).ok(), std::env::var(NATS_PASSWORD_ENV).ok())?,
        })
    }
}

/// Who the bus is to NATS, and its password.
pub const NATS_USER_ENV: &str = "NATS_USER";
pub const NATS_PASSWORD_ENV: &str = "NATS_PASSWORD";

/// `NATS_USER` and `NATS_PASSWORD`: both set, or neither. The password is
/// never repeated in an error.
fn nats_credentials(user: Option<String>, password: Option<String>) -> Result<Option<log::jetstream::Credentials>, ConfigError> {
    let set = |v: Option<String>| v.map(|v| v.trim().to_owned()).filter(|v| !v.is_empty());
    match (set(user), set(password)) {
        (None, None) => Ok(None),
        (Some(user), Some(password)) => Ok(Some(log::jetstream::Credentials::new(user, password))),
        (Some(user), None) => Err(ConfigError {
            name: NATS_PASSWORD_ENV.into(),
            value: String::new(),
            reason: format!("{NATS_USER_ENV} ({user}) is set: the password of that user is needed too"),
        }),
        (None, Some(_)) => Err(ConfigError {
            name: NATS_USER_ENV.into(),
            value: String::new(),
            reason: format!("{NATS_PASSWORD_ENV} is set: the user it belongs to is needed too"),
        }),
    }
}

/// `EVENT_STORE`, when set, must name JetStream servers.
fn event_store(value: Option<String>) -> Result<Option<String>, ConfigError> {
    match value.filter(|v| !v.trim().is_empty()) {
        None => Ok(None),
        Some(url) => match log::jetstream::parse_servers(url.trim()) {
            Ok(_) => Ok(Some(url.trim().to_owned())),
            // An address with a user or password in it is not repeated.
            Err(reason) => {
                Err(ConfigError { name: "EVENT_STORE".into(), value: if url.contains('@') { "<hidden>".into() } else { url }, reason })
            }
        },
    }
}

/// Events per push: at least one, at most what a consumer accepts in one request.
fn delivery_batch(batch: u32) -> Result<u32, ConfigError> {
    if batch == 0 || batch as usize > MAX_BATCH {
        return Err(ConfigError {
            name: "DELIVERY_BATCH".into(),
            value: batch.to_string(),
            reason: format!("must be between 1 and {MAX_BATCH} (the most events a consumer accepts per request)"),
        });
    }
    Ok(batch)
}

/// `name=url` pairs; the url is the subscriber's `POST /events`. Names are
/// unique: each names one persisted cursor, and two subscribers sharing one
/// would each skip what the other acknowledged.
pub fn parse_subscribers(items: &[String]) -> Result<Vec<Subscriber>, ConfigError> {
    let subscribers = items
        .iter()
        .map(|item| match item.split_once('=') {
            Some((name, url)) if !name.trim().is_empty() && config::parse_base_url("SUBSCRIBERS", url.trim()).is_ok() => {
                Ok(Subscriber { name: name.trim().to_owned(), url: url.trim().to_owned() })
            }
            _ => {
                Err(ConfigError { name: "SUBSCRIBERS".into(), value: item.clone(), reason: "expected name=http://host:port/events".into() })
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut names = std::collections::HashSet::new();
    if let Some(twice) = subscribers.iter().find(|s| !names.insert(s.name.as_str())) {
        return Err(ConfigError {
            name: "SUBSCRIBERS".into(),
            value: items.join(","),
            reason: format!("subscriber name `{}` appears twice; each name is one delivery cursor", twice.name),
        });
    }
    Ok(subscribers)
}

#[derive(Debug, Clone)]
pub struct AppState {
    log: EventLog,
    subscribers: Arc<Vec<SharedStatus>>,
    shutdown: Shutdown,
    secret: InternalSecret,
}

/// How long `/readyz` and `/status` wait for JetStream to answer before
/// calling the replica not ready (or showing its last knowledge).
pub const READY_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a stopping bus waits for its deliverers' pushes in flight before
/// saving their cursors: a push answered later is sent again at the next start.
const SHUTDOWN_SAVE_WAIT: Duration = Duration::from_secs(2);

pub async fn run(listener: TcpListener, config: Config, shutdown: Shutdown) -> Result<(), BoxError> {
    let (store, log) = match &config.event_store {
        Some(url) => (None, EventLog::open_jetstream(url, config.nats_credentials.as_ref(), &config.replica, shutdown.clone()).await?),
        None => {
            let store = Store::open_capped(&config.data_dir, Service::EventBus.name(), log::MIGRATIONS, config.db_max_bytes)?;
            (Some(store.clone()), EventLog::open(store).await?)
        }
    };
    let saved: std::collections::HashMap<String, u64> = log.cursors().await?.into_iter().collect();
    let http = http_client(config.delivery_timeout);
    // On JetStream the deliverers' records go through NATS, so that every
    // replica's `/flow` shows every replica's deliveries, each once.
    let flow = match log.jetstream() {
        Some(jetstream) => jetstream.share_deliveries(log.flow().clone(), shutdown.clone()).await?,
        None => log.flow().clone(),
    };
    let head = log.head_now();
    let mut statuses = Vec::new();
    let mut deliverers = Vec::new();
    let calls = blog_kit::messaging::bus_client::OutboundCalls::default();
    for subscriber in config.subscribers {
        let cursor = saved.get(&subscriber.name).copied().unwrap_or(0);
        let status = SharedStatus::new(std::sync::Mutex::new(SubscriberStatus {
            name: subscriber.name.clone(),
            url: subscriber.url.clone(),
            cursor,
            lag: head.saturating_sub(cursor),
            ..SubscriberStatus::default()
        }));
        statuses.push(status.clone());
        let deliverer = Deliverer {
            subscriber,
            log: log.clone(),
            http: http.clone(),
            secret: config.internal_secret.clone(),
            status,
            flow: flow.clone(),
            batch: config.batch,
            cursor,
            acked: cursor,
            consumes: None,
            calls: calls.clone(),
        };
        // Replicas sharing a JetStream log take turns per subscriber.
        deliverers.push(match log.leases() {
            Some(leases) => tokio::spawn(leases.deliver_while_held(deliverer, shutdown.clone())),
            None => tokio::spawn(deliverer.run(shutdown.clone())),
        });
    }
    let cursors = tokio::spawn(log.clone().save_moved_cursors(shutdown.clone()));
    let state = AppState { log, subscribers: Arc::new(statuses), shutdown: shutdown.clone(), secret: config.internal_secret };
    let metrics = registry(&state);
    calls.register(&metrics);
    if let Some(store) = &store {
        store.register_metrics(&metrics);
    }
    let log = state.log.clone();
    let app = layers::standard(app(state), store, metrics).layer(axum::middleware::from_fn_with_state(log.clone(), jetstream_readiness));
    serve(listener, app, shutdown).await?;
    // What the deliverers got to, saved once they stopped (each ends its
    // push in flight first; not waited for past SHUTDOWN_SAVE_WAIT). The
    // saver has stopped by then, so this is the one save after it.
    let _ = cursors.await;
    let stopped = async {
        for deliverer in deliverers {
            let _ = deliverer.await;
        }
    };
    let _ = tokio::time::timeout(SHUTDOWN_SAVE_WAIT, stopped).await;
    if let Err(e) = log.save_cursors_now().await {
        tracing::warn!(error = %e, "cannot persist the delivery cursors at shutdown; their last events will be sent again");
    }
    Ok(())
}

/// `/readyz` on JetStream: 503 (JSON) unless JetStream answers within
/// [`READY_TIMEOUT`]; the standard check answers otherwise.
async fn jetstream_readiness(State(log): State<EventLog>, request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    if request.uri().path() == "/readyz"
        && let Some(jetstream) = log.jetstream()
        && let Err(e) = jetstream.reachable(READY_TIMEOUT).await
    {
        return blog_kit::http::error_response(axum::http::StatusCode::SERVICE_UNAVAILABLE, &e.to_string());
    }
    next.run(request).await
}

pub fn app(state: AppState) -> Router {
    Router::new()
        .route(
            "/events",
            post(publish)
                .route_layer(axum::middleware::from_fn_with_state(state.secret.clone(), internal::require_secret))
                .get(events)
                .layer(DefaultBodyLimit::max(MAX_EVENTS_BODY)),
        )
        .route("/status", get(status))
        .route("/flow", get(flow_stream))
        .with_state(state)
}

async fn flow_stream(State(state): State<AppState>) -> axum::response::Response {
    use axum::response::IntoResponse;
    let stream = sse::live_stream(state.log.flow().subscribe(), state.shutdown.clone(), |record: Flow| record.to_sse());
    (sse::streaming_headers(), stream).into_response()
}

async fn publish(
    State(state): State<AppState>,
    request_id: RequestId,
    Json(body): Json<Value, MAX_EVENTS_BODY>,
) -> Result<Json<Value>, Response> {
    let (mut events, batch) = parse_events(body).map_err(IntoResponse::into_response)?;
    for (i, event) in events.iter_mut().enumerate() {
        if let Err(e) = event.domain() {
            return Err(EventsError::Malformed(if batch { format!("event {i}: {e}") } else { e.to_string() }).into_response());
        }
        if event.request_id.is_none() {
            event.request_id.clone_from(&request_id.0);
        }
        if event.traceparent.is_none() {
            event.traceparent = blog_kit::telemetry::current_trace().map(|t| t.to_string());
        }
    }
    blog_kit::telemetry::lag_mark("bus.received", events.iter().map(|e| e.id.as_str()));
    let stored = state.log.append(events).await.map_err(|e| ApiError::from(e).into_response())?;
    Ok(Json(match (batch, stored.as_slice()) {
        (false, [Stored { id, seq }]) => json!({"status": "OK", "id": id, "seq": seq}),
        _ => json!({"status": "OK", "events": stored}),
    }))
}

#[derive(Deserialize)]
struct Page {
    #[serde(default)]
    after: u64,
    limit: Option<u32>,
}

async fn events(State(state): State<AppState>, Query(page): Query<Page>) -> Result<Json<Vec<Event>>, ApiError> {
    let limit = page.limit.unwrap_or(DEFAULT_PAGE);
    if limit == 0 || limit > MAX_PAGE {
        return Err(ApiError::bad_request(format!("`limit` must be between 1 and {MAX_PAGE}")));
    }
    // Sequence numbers are SQLite integers: anything above i64::MAX is no
    // position in the log (and would wrap to the start of it).
    if i64::try_from(page.after).is_err() {
        return Err(ApiError::bad_request(format!("`after` must be at most {}", i64::MAX)));
    }
    Ok(Json(state.log.after(page.after, limit).await?))
}

#[derive(Serialize)]
struct Status {
    head: u64,
    subscribers: Vec<SubscriberStatus>,
}

impl AppState {
    fn snapshot(&self) -> Status {
        let head = self.log.head_now();
        let subscribers = self
            .subscribers
            .iter()
            .map(|s| {
                let mut status = s.lock().unwrap_or_else(|p| p.into_inner()).clone();
                status.lag = head.saturating_sub(status.cursor);
                status
            })
            .collect();
        Status { head, subscribers }
    }
}

/// `/status`: the snapshot, and on JetStream the shared state read from it now.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct StatusView {
    head: u64,
    subscribers: Vec<SubscriberView>,
    /// This replica (JetStream).
    #[serde(skip_serializing_if = "Option::is_none")]
    replica: Option<lease::Holder>,
    /// The stream as JetStream reports it (JetStream).
    #[serde(skip_serializing_if = "Option::is_none")]
    jetstream: Option<log::jetstream::StreamState>,
    /// Why JetStream's state could not be read; the rest is then this replica's last knowledge.
    #[serde(skip_serializing_if = "Option::is_none")]
    jetstream_error: Option<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SubscriberView {
    /// `delivered`, `retries`, `rejected` and `misdirected` count this replica's own pushes.
    #[serde(flatten)]
    status: SubscriberStatus,
    /// The replica holding the subscriber's delivery lease (JetStream); none while it is free.
    #[serde(skip_serializing_if = "Option::is_none")]
    deliverer: Option<lease::Holder>,
}

async fn status(State(state): State<AppState>) -> Json<StatusView> {
    let Status { head, subscribers } = state.snapshot();
    let mut view = StatusView {
        head,
        subscribers: subscribers.into_iter().map(|status| SubscriberView { status, deliverer: None }).collect(),
        replica: None,
        jetstream: None,
        jetstream_error: None,
    };
    let Some(jetstream) = state.log.jetstream() else { return Json(view) };
    view.replica = Some(jetstream.leases().me().clone());
    let read = tokio::time::timeout(READY_TIMEOUT, shared_state(jetstream)).await;
    match read.unwrap_or_else(|_| Err(blog_kit::StoreError::Unavailable(format!("JetStream did not answer within {READY_TIMEOUT:?}")))) {
        Ok((stream, cursors, mut leases)) => {
            view.head = stream.last_seq;
            for subscriber in &mut view.subscribers {
                let name = &subscriber.status.name;
                let lease = leases.remove(name);
                let durable = cursors.get(name).copied().unwrap_or(0);
                let held = lease.as_ref().map_or(0, |l| l.cursor);
                let mine = lease.as_ref().is_some_and(|l| &l.holder == jetstream.leases().me());
                let local = if mine { subscriber.status.cursor } else { 0 };
                subscriber.status.cursor = durable.max(held).max(local).min(stream.last_seq);
                subscriber.status.lag = stream.last_seq.saturating_sub(subscriber.status.cursor);
                subscriber.deliverer = lease.map(|l| l.holder);
            }
            view.jetstream = Some(stream);
        }
        Err(e) => view.jetstream_error = Some(e.to_string()),
    }
    Json(view)
}

type SharedState = (log::jetstream::StreamState, std::collections::HashMap<String, u64>, std::collections::BTreeMap<String, lease::Lease>);

/// The stream's state, the durable cursors and the leases, read at once.
async fn shared_state(jetstream: &log::jetstream::JetStreamLog) -> Result<SharedState, blog_kit::StoreError> {
    let (stream, cursors, leases) = tokio::join!(jetstream.state(), jetstream.cursors(), jetstream.leases().held());
    Ok((stream?, cursors?.into_iter().collect(), leases?))
}

fn registry(state: &AppState) -> Registry {
    let registry = Registry::default();
    let head = state.clone();
    registry.gauge("blog_bus_head_seq", "Highest sequence number in the log.", move |out| {
        out.push((String::new(), head.log.head_now() as f64))
    });
    type Field = fn(&SubscriberStatus) -> f64;
    let families: [(&str, &str, Field); 6] = [
        ("blog_bus_subscriber_cursor", "Where delivery got to: acknowledged, refused or not consumed.", |s| s.cursor as f64),
        ("blog_bus_subscriber_lag", "Events stored but not yet acknowledged by the subscriber.", |s| s.lag as f64),
        ("blog_bus_subscriber_delivered_total", "Events the subscriber acknowledged.", |s| s.delivered as f64),
        ("blog_bus_subscriber_retries_total", "Failed delivery attempts.", |s| s.retries as f64),
        ("blog_bus_subscriber_rejected_total", "Events the subscriber refused and the bus skipped.", |s| s.rejected as f64),
        ("blog_bus_subscriber_misdirected_total", "4xx answers that did not refuse the events (wrong URL or secret); retried.", |s| {
            s.misdirected as f64
        }),
    ];
    for (name, help, field) in families {
        let state = state.clone();
        registry.gauge(name, help, move |out| {
            for s in state.snapshot().subscribers {
                out.push((format!("subscriber=\"{}\"", metrics::label(&s.name)), field(&s)));
            }
        });
    }
    let state = state.clone();
    registry.gauge("blog_bus_subscriber_failing", "1 while the last delivery attempt failed.", move |out| {
        for s in state.snapshot().subscribers {
            out.push((format!("subscriber=\"{}\"", metrics::label(&s.name)), f64::from(u8::from(s.last_error.is_some()))));
        }
    });
    registry
}

#[cfg(test)]
mod tests {
    use axum::{body::Body, http::Request};
    use tower::ServiceExt;

    use super::*;

    const SECRET: &str = "bus-test-secret-0123456789";

    /// The bus's whole router (standard layers included) over a temporary log.
    async fn bus() -> (tempfile::TempDir, AppState, Router) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), "event-bus", log::MIGRATIONS).unwrap();
        let log = EventLog::open(store.clone()).await.unwrap();
        let status = SharedStatus::new(std::sync::Mutex::new(SubscriberStatus { name: "query".into(), ..SubscriberStatus::default() }));
        let state = AppState {
            log,
            subscribers: Arc::new(vec![status]),
            shutdown: Shutdown::new(std::future::pending()),
            secret: InternalSecret::parse(SECRET).unwrap(),
        };
        let router = layers::standard(app(state.clone()), Some(store), registry(&state));
        (dir, state, router)
    }

    async fn call(router: &Router, request: Request<Body>) -> (axum::http::StatusCode, axum::http::HeaderMap, Value) {
        let response = router.clone().oneshot(request).await.unwrap();
        let (parts, body) = response.into_parts();
        let bytes = axum::body::to_bytes(body, 1 << 20).await.unwrap();
        (parts.status, parts.headers, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }

    fn publish_request(auth: Option<&str>, body: &Value) -> Request<Body> {
        let request = Request::post("/events").header("content-type", "application/json").header("x-request-id", "req-1");
        let request = match auth {
            Some(auth) => request.header("authorization", auth),
            None => request,
        };
        request.body(Body::from(body.to_string())).unwrap()
    }

    fn get(uri: &str) -> Request<Body> {
        Request::get(uri).body(Body::empty()).unwrap()
    }

    #[tokio::test]
    async fn publishing_needs_the_secret_and_stores_each_id_once_with_its_request_id() {
        let (_dir, state, router) = bus().await;
        let bearer = format!("Bearer {SECRET}");
        let post = json!({"id": "e1", "type": "PostCreated", "data": {"id": "p1", "title": "t"}});
        assert_eq!(call(&router, publish_request(None, &post)).await.0, axum::http::StatusCode::UNAUTHORIZED);
        assert_eq!(call(&router, publish_request(Some("Bearer wrong-0123456789abcdef"), &post)).await.0, axum::http::StatusCode::FORBIDDEN);
        assert_eq!(state.log.head_now(), 0, "a refused request stores nothing");

        let (status, _, single) = call(&router, publish_request(Some(&bearer), &post)).await;
        assert_eq!((status, single), (axum::http::StatusCode::OK, json!({"status": "OK", "id": "e1", "seq": 1})));
        let unknown = json!({"id": "e2", "type": "PostLiked", "data": {"id": "p1"}});
        let (_, _, batch) = call(&router, publish_request(Some(&bearer), &json!([post, unknown]))).await;
        assert_eq!(batch, json!({"status": "OK", "events": [{"id": "e1", "seq": 1}, {"id": "e2", "seq": 2}]}));

        let (status, _, page) = call(&router, get("/events?after=0&limit=10")).await;
        assert_eq!(status, axum::http::StatusCode::OK);
        assert_eq!(page.as_array().map(Vec::len), Some(2));
        assert_eq!(
            (&page[0]["requestId"], &page[1]["type"], &page[1]["data"]),
            (&json!("req-1"), &json!("PostLiked"), &json!({"id": "p1"}))
        );
        let (_, _, rest) = call(&router, get("/events?after=1")).await;
        assert_eq!(rest.as_array().map(|events| events.iter().map(|e| e["id"].clone()).collect::<Vec<_>>()), Some(vec![json!("e2")]));
    }

    #[tokio::test]
    async fn bad_events_and_pages_get_json_400s_and_only_bad_events_are_marked_refused() {
        let (_dir, state, router) = bus().await;
        let bearer = format!("Bearer {SECRET}");
        for bad in [
            json!({"type": "PostCreated", "data": {"id": "p"}}),
            json!({"data": {}}),
            json!([{"type": "PostCreated", "data": {"id": "p", "title": "t"}}, {"type": "CommentUpdated", "data": {"id": "c", "postId": "p", "content": "x", "status": "maybe"}}]),
        ] {
            let (status, headers, body) = call(&router, publish_request(Some(&bearer), &bad)).await;
            assert_eq!(status, axum::http::StatusCode::BAD_REQUEST, "{bad}");
            assert!(headers.contains_key(&internal::REFUSAL_HEADER), "{bad}");
            assert!(body["error"].is_string(), "{bad}");
        }
        let too_many = Value::Array(vec![json!({"type": "PostLiked", "data": {}}); MAX_BATCH + 1]);
        let (status, headers, _) = call(&router, publish_request(Some(&bearer), &too_many)).await;
        assert_eq!(status, axum::http::StatusCode::BAD_REQUEST);
        assert!(!headers.contains_key(&internal::REFUSAL_HEADER), "a batch size is the sender's fault, not the events'");
        assert_eq!(state.log.head_now(), 0, "a refused batch stores none of its events");

        for uri in ["/events?after=abc", "/events?limit=0", "/events?limit=10001", "/events?after=9223372036854775808", "/events?after=-1"]
        {
            let (status, headers, body) = call(&router, get(uri)).await;
            assert_eq!(status, axum::http::StatusCode::BAD_REQUEST, "{uri}");
            assert!(headers["content-type"].to_str().unwrap().starts_with("application/json") && body["error"].is_string(), "{uri}");
        }
        let (status, _, body) = call(&router, Request::delete("/events").body(Body::empty()).unwrap()).await;
        assert_eq!((status, body["error"].is_string()), (axum::http::StatusCode::METHOD_NOT_ALLOWED, true));
        let (status, _, status_page) = call(&router, get("/status")).await;
        assert_eq!(status, axum::http::StatusCode::OK);
        assert_eq!((&status_page["head"], &status_page["subscribers"][0]["name"]), (&json!(0), &json!("query")));
    }

    #[tokio::test]
    async fn the_log_numbers_events_without_gaps_when_publishers_retry() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), "event-bus", log::MIGRATIONS).unwrap();
        let log = EventLog::open(store).await.unwrap();
        let event =
            |id: &str| Event::from_value(serde_json::json!({"id": id, "type": "PostCreated", "data": {"id": id, "title": "t"}})).unwrap();
        let first = log.append(vec![event("a"), event("b")]).await.unwrap();
        // A publisher that lost the answer sends the same batch again, then more.
        let again = log.append(vec![event("a"), event("b"), event("c")]).await.unwrap();
        let seqs = |stored: &[Stored]| stored.iter().map(|s| s.seq).collect::<Vec<_>>();
        assert_eq!(seqs(&first), [1, 2]);
        assert_eq!(seqs(&again), [1, 2, 3], "a retried id keeps its number and takes no new one");
        let read: Vec<u64> = log.after(0, 10).await.unwrap().iter().filter_map(|e| e.seq).collect();
        assert_eq!(read, [1, 2, 3]);
    }

    #[test]
    fn subscribers_are_name_url_pairs() {
        let parsed = parse_subscribers(&["query=http://q:4002/events".into()]).unwrap();
        assert_eq!(parsed, [Subscriber { name: "query".into(), url: "http://q:4002/events".into() }]);
        assert!(parse_subscribers(&["query".into()]).is_err());
        assert!(parse_subscribers(&["=http://x/events".into()]).is_err());
        let twice = parse_subscribers(&["q=http://a/events".into(), "q=http://b/events".into()]).unwrap_err();
        assert_eq!(twice.name, "SUBSCRIBERS");
        assert!(twice.reason.contains("`q` appears twice"), "{twice}");
    }

    #[test]
    fn the_delivery_batch_fits_what_consumers_accept() {
        assert_eq!(delivery_batch(1).unwrap(), 1);
        assert_eq!(delivery_batch(MAX_BATCH as u32).unwrap(), MAX_BATCH as u32);
        for bad in [0, MAX_BATCH as u32 + 1] {
            assert_eq!(delivery_batch(bad).unwrap_err().name, "DELIVERY_BATCH");
        }
    }

    #[test]
    fn nats_credentials_come_in_pairs_and_errors_never_repeat_a_password() {
        let some = |v: &str| Some(v.to_owned());
        assert!(nats_credentials(None, None).unwrap().is_none());
        assert!(nats_credentials(some(" "), some("")).unwrap().is_none(), "empty is unset");
        assert_eq!(nats_credentials(some("blog-bus"), some("hunter2")).unwrap().unwrap().user(), "blog-bus");
        assert_eq!(nats_credentials(some("blog-bus"), None).unwrap_err().name, NATS_PASSWORD_ENV);
        let error = nats_credentials(None, some("hunter2")).unwrap_err();
        assert_eq!(error.name, NATS_USER_ENV);
        assert!(!error.to_string().contains("hunter2"), "{error}");
        let error = event_store(some("nats://u:hunter2@127.0.0.1:4222")).unwrap_err();
        assert!(!error.to_string().contains("hunter2"), "{error}");
        assert_eq!(event_store(some("nats://127.0.0.1:4222")).unwrap().as_deref(), Some("nats://127.0.0.1:4222"));
    }
}
