//! HTTP bootstrap shared by every service: the standard routes (`/healthz`,
//! `/readyz`, `/metrics`), JSON errors for unknown routes and methods, body
//! limits, request ids, tracing, a request timeout so draining cannot hang,
//! and graceful shutdown on SIGTERM or Ctrl-C.

use std::{future::Future, io, time::Duration};

use axum::{
    Router,
    extract::{DefaultBodyLimit, FromRequestParts, MatchedPath, Request},
    http::{HeaderName, StatusCode, header, request::Parts},
    response::{IntoResponse, Response},
    routing::get,
};
use tokio::{net::TcpListener, sync::watch};
use tower_http::{
    catch_panic::CatchPanicLayer,
    request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer},
    trace::TraceLayer,
};

use crate::{error, metrics::Registry, store::Store};

/// Body limit of the public routes: titles and comments are short.
pub const MAX_BODY: usize = 64 * 1024;
/// How much of a body a service reads before refusing it (the gateway's and
/// ingress-nginx's default limit); routes apply their own, smaller limits to
/// what was read (see [`crate::error::Json`]).
pub const READ_LIMIT: usize = 1024 * 1024;
/// Longest a request may take before it is answered 503 and dropped.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// What a timed-out request's `Retry-After` says, in seconds.
pub const RETRY_AFTER_SECS: u64 = 1;

static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
    tracing::info!("shutdown requested; draining");
}

/// A shutdown that many tasks can wait for. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Shutdown(watch::Receiver<bool>);

impl Shutdown {
    /// Triggers when `signal` resolves.
    pub fn new(signal: impl Future<Output = ()> + Send + 'static) -> Self {
        let (tx, rx) = watch::channel(false);
        tokio::spawn(async move {
            signal.await;
            let _ = tx.send(true);
        });
        Self(rx)
    }

    pub async fn wait(&self) {
        let mut rx = self.0.clone();
        let _ = rx.wait_for(|stop| *stop).await;
    }

    /// Sleeps for `duration`; returns true if shutdown came first.
    pub async fn sleep(&self, duration: Duration) -> bool {
        tokio::select! {
            () = tokio::time::sleep(duration) => false,
            () = self.wait() => true,
        }
    }
}

/// The `x-request-id` of the current request (set by the standard layers if
/// the caller sent none), to carry into published events.
#[derive(Debug, Clone, Default)]
pub struct RequestId(pub Option<String>);

impl<S: Send + Sync> FromRequestParts<S> for RequestId {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let id = parts.headers.get(&REQUEST_ID).and_then(|v| v.to_str().ok()).map(|s| s.chars().take(128).collect());
        Ok(RequestId(id))
    }
}

/// Adds the standard routes and layers to a service's routes. Readiness is
/// the database answering, when the service has one.
pub fn standard(app: Router, store: Option<Store>, metrics: Registry) -> Router {
    let ready = move || {
        let store = store.clone();
        async move {
            let ok = match &store {
                Some(store) => store.ping().await,
                None => true,
            };
            if ok {
                (StatusCode::OK, axum::Json(serde_json::json!({"status": "ready"}))).into_response()
            } else {
                error::error_response(StatusCode::SERVICE_UNAVAILABLE, "database unavailable")
            }
        }
    };
    let metrics_text = move || {
        let text = metrics.render();
        async move { ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text) }
    };
    app.route("/healthz", get(|| async { axum::Json(serde_json::json!({"status": "ok"})) }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics_text))
        .fallback(error::not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(DefaultBodyLimit::max(READ_LIMIT))
        .layer(CatchPanicLayer::custom(|_| error::error_response(StatusCode::INTERNAL_SERVER_ERROR, "internal error")))
        .layer(axum::middleware::from_fn(time_limit))
        .layer(TraceLayer::new_for_http().make_span_with(|req: &Request| {
            let path = req.extensions().get::<MatchedPath>().map_or(req.uri().path(), MatchedPath::as_str);
            let id = req.headers().get(&REQUEST_ID).and_then(|v| v.to_str().ok()).unwrap_or("");
            tracing::debug_span!("request", method = %req.method(), path, request_id = id)
        }))
        .layer(PropagateRequestIdLayer::new(REQUEST_ID.clone()))
        .layer(SetRequestIdLayer::new(REQUEST_ID.clone(), MakeRequestUuid))
}

/// Answers a request that outlives [`REQUEST_TIMEOUT`] with a JSON 503 and
/// `Retry-After` (tower-http's timeout layer answers an empty 408, which
/// also invites an automatic retry that may double a write that commits
/// later). Only the wait for the response head is bounded: a stream, once
/// answered, runs on.
async fn time_limit(request: Request, next: axum::middleware::Next) -> Response {
    match tokio::time::timeout(REQUEST_TIMEOUT, next.run(request)).await {
        Ok(response) => response,
        Err(_) => error::retry_later("the request took too long, try again", RETRY_AFTER_SECS),
    }
}

/// Longest a client may take to send a request's head (the request line and
/// headers): a slowloris client trickling bytes is cut off after this.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `app` on `listener` until `shutdown`, then lets in-flight requests
/// finish (each is bounded by [`REQUEST_TIMEOUT`]). Nagle's algorithm is
/// off: every hop of an event is a small write, and Nagle would hold each one
/// back until the previous was acknowledged (up to a delayed-ACK 40 ms).
///
/// hyper's own connection builder rather than `axum::serve`, which exposes no
/// header-read timeout: each connection must send its request head within
/// [`HEADER_READ_TIMEOUT`] or is closed.
pub async fn serve(listener: TcpListener, app: Router, shutdown: Shutdown) -> io::Result<()> {
    use hyper_util::{
        rt::{TokioIo, TokioTimer},
        server::graceful::GracefulShutdown,
        service::TowerToHyperService,
    };
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "listening");
    }
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT);
    let graceful = GracefulShutdown::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.wait() => break,
        };
        let tcp = match accepted {
            Ok((tcp, _)) => tcp,
            // Out of file descriptors and the like: wait rather than spin.
            Err(e) => {
                tracing::warn!(error = %e, "cannot accept a connection");
                if shutdown.sleep(Duration::from_secs(1)).await {
                    break;
                }
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let connection = http.serve_connection(TokioIo::new(tcp), TowerToHyperService::new(app.clone()));
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// Answers `POST /events` for a service that consumes nothing: the caller
/// must hold `secret`, the envelope is checked and the event acknowledged, as
/// the original's services do.
pub fn ack_events(secret: &crate::internal::InternalSecret) -> Router {
    async fn ack(error::Json(body): error::Json<serde_json::Value, { crate::inbox::MAX_EVENTS_BODY }>) -> Result<Response, Response> {
        crate::inbox::parse_events(body).map_err(IntoResponse::into_response)?;
        Ok(axum::Json(serde_json::json!({})).into_response())
    }
    Router::new()
        .route("/events", axum::routing::post(ack))
        .route_layer(axum::middleware::from_fn_with_state(secret.clone(), crate::internal::require_secret))
        .layer(DefaultBodyLimit::max(crate::inbox::MAX_EVENTS_BODY))
}

/// The address every service listens on: `BIND_ADDR`, loopback unless a
/// container or manifest says `0.0.0.0`, so a laptop running the suite does
/// not offer it to the whole network.
pub fn bind_addr() -> Result<std::net::IpAddr, crate::config::ConfigError> {
    crate::config::var("BIND_ADDR", std::net::IpAddr::from([127, 0, 0, 1]))
}

/// Runs a service binary: telemetry, configuration, bind, serve. Returns the
/// process exit code, so `main` stays a few lines.
pub fn main<C, F, Fut>(
    service: crate::Service,
    config: impl FnOnce() -> Result<C, crate::config::ConfigError>,
    port: impl Fn(&C) -> u16,
    run: F,
) -> std::process::ExitCode
where
    F: FnOnce(TcpListener, C, Shutdown) -> Fut,
    Fut: Future<Output = Result<(), Box<dyn std::error::Error + Send + Sync>>>,
{
    crate::telemetry::init();
    let config = match config().and_then(|config| Ok((bind_addr()?, config))) {
        Ok(config) => config,
        Err(e) => {
            tracing::error!(error = %e, "invalid configuration");
            return std::process::ExitCode::from(2);
        }
    };
    // Reads run on the blocking pool; they are short, and every extra thread
    // can keep a malloc arena of its own, so a few threads are plenty.
    let runtime = match tokio::runtime::Builder::new_multi_thread().max_blocking_threads(8).enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the runtime");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        let (ip, config) = config;
        let addr = std::net::SocketAddr::new(ip, port(&config));
        let listener = TcpListener::bind(addr).await?;
        tracing::info!(service = service.name(), version = env!("CARGO_PKG_VERSION"), "starting");
        run(listener, config, Shutdown::new(shutdown_signal())).await
    });
    runtime.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(()) => {
            tracing::info!(service = service.name(), "stopped");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(service = service.name(), error = %e, "failed");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Most live streams (server-sent events) one service serves at once: each
/// holds a connection, a task and a broadcast receiver for as long as the
/// client stays. Beyond it, a new stream gets a JSON 503 with `Retry-After`.
pub const MAX_STREAMS: usize = 512;
/// What a refused stream's `Retry-After` says, in seconds.
pub const STREAM_RETRY_AFTER_SECS: u64 = 5;

static OPEN_STREAMS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// All [`MAX_STREAMS`] places are taken: answered as a JSON 503 with
/// `Retry-After`.
#[derive(Debug, Clone, Copy)]
pub struct StreamsFull;

impl IntoResponse for StreamsFull {
    fn into_response(self) -> Response {
        error::retry_later("too many live streams are open, try again later", STREAM_RETRY_AFTER_SECS)
    }
}

/// One of the process's [`MAX_STREAMS`] places for a live stream, given back
/// when dropped (the stream ended or its client went away). A process is one
/// service, so the count is per service.
#[derive(Debug)]
pub struct StreamSlot(());

impl StreamSlot {
    /// A place, unless all are taken.
    pub fn acquire() -> Result<Self, StreamsFull> {
        use std::sync::atomic::Ordering::SeqCst;
        OPEN_STREAMS
            .fetch_update(SeqCst, SeqCst, |open| (open < MAX_STREAMS).then_some(open + 1))
            .map(|_| StreamSlot(()))
            .map_err(|_| StreamsFull)
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        OPEN_STREAMS.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A server-sent event stream of what `updates` broadcasts, rendered by
/// `render`, with keep-alive comments, ending at shutdown (an endless stream
/// would otherwise hold graceful shutdown open). A subscriber too slow to keep
/// up gets one `resync` event, telling it to reload rather than miss changes.
/// Holds a [`StreamSlot`] while it runs; when none is left, the answer is
/// [`StreamsFull`]'s 503.
pub fn live_stream<T, F>(
    updates: tokio::sync::broadcast::Receiver<T>,
    shutdown: Shutdown,
    render: F,
) -> Result<axum::response::Sse<impl futures_util::Stream<Item = Result<axum::response::sse::Event, std::convert::Infallible>>>, StreamsFull>
where
    T: Clone + Send + 'static,
    F: Fn(T) -> axum::response::sse::Event + Send + 'static,
{
    use axum::response::sse::{Event, KeepAlive};
    use tokio::sync::broadcast::error::RecvError;

    let slot = StreamSlot::acquire()?;
    let stream = futures_util::stream::unfold((updates, shutdown, render, slot), |(mut updates, shutdown, render, slot)| async move {
        let next = tokio::select! {
            next = updates.recv() => next,
            () = shutdown.wait() => return None,
        };
        let event = match next {
            Ok(update) => render(update),
            Err(RecvError::Lagged(_)) => Event::default().event("resync").data("{}"),
            Err(RecvError::Closed) => return None,
        };
        Some((Ok(event), (updates, shutdown, render, slot)))
    });
    Ok(axum::response::Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)).text("keep-alive")))
}

/// Headers that keep proxies (ingress-nginx honours `X-Accel-Buffering`)
/// from buffering a live stream.
pub fn streaming_headers() -> [(HeaderName, &'static str); 2] {
    [(header::CACHE_CONTROL, "no-cache"), (HeaderName::from_static("x-accel-buffering"), "no")]
}

#[cfg(test)]
mod tests {
    use axum::{body::Body, http::Request};
    use tower::ServiceExt;

    use super::*;

    async fn answer(app: Router, uri: &str) -> (StatusCode, axum::http::HeaderMap, serde_json::Value) {
        let response = app.oneshot(Request::get(uri).body(Body::empty()).unwrap()).await.unwrap();
        let (parts, body) = response.into_parts();
        let bytes = axum::body::to_bytes(body, 1 << 20).await.unwrap();
        (parts.status, parts.headers, serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null))
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_past_the_timeout_gets_a_json_503_with_retry_after() {
        let slow = Router::new().route(
            "/slow",
            get(|| async {
                tokio::time::sleep(REQUEST_TIMEOUT * 3).await;
                "late"
            }),
        );
        let (status, headers, body) = answer(standard(slow, None, Registry::default()), "/slow").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(headers[header::RETRY_AFTER], RETRY_AFTER_SECS.to_string());
        assert!(headers[header::CONTENT_TYPE].to_str().unwrap().starts_with("application/json"));
        assert!(body["error"].as_str().is_some_and(|e| !e.is_empty()), "{body}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_trickling_its_headers_is_cut_off() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let shutdown = Shutdown::new(async move {
            let _ = stopped.await;
        });
        let app = standard(Router::new().route("/", get(|| async { "hello" })), None, Registry::default());
        let server = tokio::spawn(serve(listener, app, shutdown));

        let (mut reader, mut writer) = tokio::net::TcpStream::connect(addr).await.unwrap().into_split();
        // One byte a second of a head that never ends, as slowloris sends.
        let trickle = tokio::spawn(async move {
            let head = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ".iter().chain(std::iter::repeat(&b'a'));
            let mut sent = 0usize;
            for byte in head {
                if writer.write_all(&[*byte]).await.is_err() {
                    break;
                }
                sent += 1;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            sent
        });
        // The server must close the connection; the deadline only bounds a
        // broken build, it is three times the timeout.
        let mut buffer = Vec::new();
        let closed = tokio::time::timeout(HEADER_READ_TIMEOUT * 3, reader.read_to_end(&mut buffer)).await;
        assert!(closed.is_ok(), "a connection trickling its headers stayed open");
        trickle.abort();
        println!("trickling connection closed by the server; it answered {:?}", String::from_utf8_lossy(&buffer));

        // Everyone else is served as usual.
        let mut other = tokio::net::TcpStream::connect(addr).await.unwrap();
        other.write_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").await.unwrap();
        let mut answer = String::new();
        other.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("hello"), "{answer}");
        let _ = stop.send(());
        server.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn live_streams_beyond_the_cap_get_a_json_503_with_retry_after() {
        let (updates, _) = tokio::sync::broadcast::channel::<u32>(4);
        let shutdown = Shutdown::new(std::future::pending());
        let open =
            |_: usize| live_stream(updates.subscribe(), shutdown.clone(), |n| axum::response::sse::Event::default().data(n.to_string()));
        let mut streams: Vec<_> = (0..MAX_STREAMS).map(|n| open(n).unwrap_or_else(|_| panic!("stream {n} refused"))).collect();
        let Err(refused) = open(MAX_STREAMS) else { panic!("one stream too many is refused") };
        let refused = refused.into_response();
        assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(refused.headers()[header::RETRY_AFTER], STREAM_RETRY_AFTER_SECS.to_string());
        let body = axum::body::to_bytes(refused.into_body(), 1 << 16).await.unwrap();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert!(body["error"].as_str().is_some_and(|e| e.contains("too many")), "{body}");
        // A stream that ends gives its place back.
        streams.pop();
        assert!(open(0).is_ok(), "a freed place is reused");
        println!("{MAX_STREAMS} streams open, stream {} refused with 503", MAX_STREAMS + 1);
    }

    #[tokio::test]
    async fn every_extractor_rejection_is_json() {
        let app = Router::new()
            .route("/posts/{id}/comments", get(|error::Path(id): error::Path<String>| async move { id }))
            .route("/numbers/{n}", get(|error::Path(n): error::Path<u32>| async move { n.to_string() }))
            .route(
                "/query",
                get(|error::Query(q): error::Query<std::collections::HashMap<String, u32>>| async move { q.len().to_string() }),
            );
        let app = standard(app, None, Registry::default());
        for uri in ["/posts/%FF/comments", "/posts/%C3%28/comments", "/numbers/x", "/numbers/99999999999", "/query?a=b"] {
            let (status, headers, body) = answer(app.clone(), uri).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{uri}: {body}");
            assert!(headers[header::CONTENT_TYPE].to_str().unwrap().starts_with("application/json"), "{uri}");
            assert!(body["error"].as_str().is_some_and(|e| !e.is_empty()), "{uri}: {body}");
        }
        let response = app.clone().oneshot(Request::post("/posts/a/comments").body(Body::empty()).unwrap()).await.unwrap();
        assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert!(response.headers()[header::CONTENT_TYPE].to_str().unwrap().starts_with("application/json"));
        assert_eq!(answer(app, "/posts/a%20b/comments").await.0, StatusCode::OK);
    }
}
