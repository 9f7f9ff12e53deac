//! The standard routes and layers every service gets: `/healthz`,
//! `/readyz`, `/metrics`, JSON answers for unknown routes and methods, the
//! read limit, panics caught as JSON 500s, a request timeout answered as a
//! JSON 503, tracing spans with the matched path and the trace context,
//! request ids, and the RED metrics of every route.
//!
//! RED metrics: `blog_http_request_duration_seconds{route,method,status}` is a
//! histogram whose `_count` is the request count. `route` is the route
//! template axum matched (`/posts/{id}/comments`), or `unmatched` for anything
//! no route took, never the raw path, so a scan of random URLs cannot grow the
//! label set; `method` is one of the standard methods or `other`; `status`
//! is the class (`2xx` … `5xx`). The time is to the response head: a live
//! stream counts when it starts, not for as long as it runs.

use std::time::Duration;

use axum::{
    Router,
    extract::{DefaultBodyLimit, MatchedPath, Request, State},
    http::{Method, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use blog_domain::TraceParent;
use tower_http::{
    catch_panic::CatchPanicLayer,
    classify::ServerErrorsFailureClass,
    request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer},
    trace::TraceLayer,
};
use tracing::Instrument;

use super::{
    error::{self, error_response},
    extract::REQUEST_ID,
};
use crate::{
    metrics::{Histograms, LATENCY_BUCKETS, Registry},
    store::Store,
    telemetry,
};

/// The W3C trace context header.
pub const TRACEPARENT: header::HeaderName = header::HeaderName::from_static("traceparent");

/// The route label of requests no route matched.
pub const UNMATCHED: &str = "unmatched";

/// How much of a body a service reads before refusing it (the gateway's and
/// ingress-nginx's default limit); routes apply their own, smaller limits to
/// what was read (see [`super::extract::Json`]).
pub const READ_LIMIT: usize = 1024 * 1024;
/// Longest a request may take before it is answered 503 and dropped.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// What the `Retry-After` of a 503 says, in seconds: a request that timed
/// out, a store or a peer that cannot be used now.
pub const RETRY_AFTER_SECS: u64 = 1;

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
                error_response(StatusCode::SERVICE_UNAVAILABLE, "database unavailable")
            }
        }
    };
    let requests = metrics.histograms(
        "blog_http_request_duration_seconds",
        "HTTP requests by route template, method and status class: time to the response head (_count: requests).",
        &["route", "method", "status"],
        LATENCY_BUCKETS,
    );
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
        .layer(CatchPanicLayer::custom(|_| error_response(StatusCode::INTERNAL_SERVER_ERROR, "internal error")))
        .layer(axum::middleware::from_fn(time_limit))
        .layer(axum::middleware::from_fn_with_state(requests, record))
        // The span is `traced`'s, so TraceLayer's lines carry the trace id.
        .layer(TraceLayer::new_for_http().make_span_with(|_: &Request| tracing::Span::current()).on_failure(log_failure))
        .layer(axum::middleware::from_fn(traced))
        .layer(PropagateRequestIdLayer::new(REQUEST_ID.clone()))
        .layer(SetRequestIdLayer::new(REQUEST_ID.clone(), MakeRequestUuid))
        .layer(axum::middleware::from_fn(plausible_request_id))
}

/// The longest `x-request-id` taken from a caller (a UUID is 36 bytes).
pub const MAX_REQUEST_ID: usize = 128;

/// Drops a caller's `x-request-id` that is longer than [`MAX_REQUEST_ID`] or
/// holds anything but visible ASCII, so that a fresh one is made instead:
/// the id is echoed in the answer, written in every log line of the request
/// and carried in the events it publishes, and a caller could otherwise put
/// kilobytes of its own text in all three.
async fn plausible_request_id(mut request: Request, next: axum::middleware::Next) -> Response {
    let plausible = |id: &[u8]| !id.is_empty() && id.len() <= MAX_REQUEST_ID && id.iter().all(u8::is_ascii_graphic);
    if request.headers().get(&REQUEST_ID).is_some_and(|id| !plausible(id.as_bytes())) {
        request.headers_mut().remove(&REQUEST_ID);
    }
    next.run(request).await
}

/// Runs a request in its `request` span and trace context: the caller's
/// `traceparent` continued, or a new trace. Handlers find it as an extension
/// and [`telemetry::current_trace`]; what they publish carries it.
async fn traced(mut request: Request, next: axum::middleware::Next) -> Response {
    let parent = request.headers().get(&TRACEPARENT).and_then(|v| v.to_str().ok()).and_then(TraceParent::parse);
    let path = request.extensions().get::<MatchedPath>().map_or(request.uri().path(), MatchedPath::as_str);
    let id = request.headers().get(&REQUEST_ID).and_then(|v| v.to_str().ok()).unwrap_or("");
    let span = tracing::info_span!("request", method = %request.method(), path, request_id = id, trace_id = tracing::field::Empty);
    let trace = telemetry::continue_trace(&span, parent);
    request.extensions_mut().insert(trace);
    telemetry::in_trace(trace, next.run(request)).instrument(span).await
}

/// Logs a 5xx answer (tower-http's default logs every one at ERROR): a 503
/// is a WARN, because it is the service shedding load or asking for a retry
/// (more live streams than the cap, a request past its time limit), which
/// anyone outside can cause at will, and an ERROR line means a fault. A 503
/// for failing storage is a fault, and is logged at ERROR where it is
/// answered ([`super::error::ApiError`]).
fn log_failure(class: ServerErrorsFailureClass, latency: Duration, _: &tracing::Span) {
    let latency = format_args!("{} ms", latency.as_millis());
    match class {
        ServerErrorsFailureClass::StatusCode(StatusCode::SERVICE_UNAVAILABLE) => {
            tracing::warn!(classification = %class, %latency, "response failed");
        }
        _ => tracing::error!(classification = %class, %latency, "response failed"),
    }
}

/// Records a request in the RED histogram (see the module doc).
async fn record(State(requests): State<Histograms>, request: Request, next: axum::middleware::Next) -> Response {
    let started = std::time::Instant::now();
    let route = request.extensions().get::<MatchedPath>().map_or(UNMATCHED, MatchedPath::as_str).to_owned();
    let method = method_label(request.method());
    let response = next.run(request).await;
    let status = match response.status().as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    };
    requests.with(&[&route, method, status]).observe_duration(started.elapsed());
    response
}

/// A method as a label: the standard ones by name, anything else `other`
/// (a method is any token, so raw values would be unbounded).
fn method_label(method: &Method) -> &'static str {
    const KNOWN: [Method; 9] = [
        Method::GET,
        Method::POST,
        Method::PUT,
        Method::DELETE,
        Method::PATCH,
        Method::HEAD,
        Method::OPTIONS,
        Method::CONNECT,
        Method::TRACE,
    ];
    KNOWN.iter().find(|known| *known == method).map_or("other", Method::as_str)
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

#[cfg(test)]
mod tests {
    use axum::{body::Body, http::Request};
    use tower::ServiceExt;

    use super::*;
    use crate::http::extract;

    async fn answer(app: Router, uri: &str) -> (StatusCode, axum::http::HeaderMap, serde_json::Value) {
        let response = app.oneshot(Request::get(uri).body(Body::empty()).unwrap()).await.unwrap();
        let (parts, body) = response.into_parts();
        let bytes = axum::body::to_bytes(body, 1 << 20).await.unwrap();
        (parts.status, parts.headers, serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null))
    }

    /// A caller's request id is kept when it is a plausible id, and replaced
    /// by a fresh one when it is too long or holds spaces or controls.
    #[tokio::test]
    async fn only_a_plausible_request_id_is_taken_from_the_caller() {
        let app = standard(Router::new().route("/", get(|| async { "ok" })), None, Registry::default());
        let echoed = |id: &str| {
            let request = Request::get("/").header(&REQUEST_ID, id).body(Body::empty()).unwrap();
            let app = app.clone();
            async move { app.oneshot(request).await.unwrap().headers()[&REQUEST_ID].to_str().unwrap().to_owned() }
        };
        for kept in ["3f2c1a9e-7b4d-4e8f-9a61-0c5d2e7f8b13", "req_42.a-B", &"x".repeat(MAX_REQUEST_ID)] {
            assert_eq!(echoed(kept).await, kept);
        }
        for replaced in ["x".repeat(MAX_REQUEST_ID + 1), "x".repeat(7_000), "two words".to_owned(), "tab\there".to_owned()] {
            let fresh = echoed(&replaced).await;
            assert_ne!(fresh, replaced);
            assert_eq!(fresh.len(), 36, "a fresh UUID: {fresh}");
        }
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

    /// A log sink for one test: every line the test's subscriber writes.
    #[derive(Clone, Default)]
    struct Lines(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Lines {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_503_that_sheds_load_is_logged_as_a_warning_and_a_500_as_an_error() {
        let lines = Lines::default();
        let sink = lines.clone();
        let subscriber = tracing_subscriber::fmt().with_ansi(false).with_writer(move || sink.clone()).finish();
        let _logging = tracing::subscriber::set_default(subscriber);
        let app = Router::new()
            .route("/busy", get(|| async { error::retry_later("too many live streams, try again", 1) }))
            .route("/broken", get(|| async { error_response(StatusCode::INTERNAL_SERVER_ERROR, "internal error") }));
        let app = standard(app, None, Registry::default());
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            assert_eq!(answer(app.clone(), "/busy").await.0, StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(answer(app, "/broken").await.0, StatusCode::INTERNAL_SERVER_ERROR);
        });
        let text = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
        // By the classification, not by the bare number: a request or trace id may contain "500" too.
        let line = |status: &str| {
            let status = format!("Status code: {status} ");
            text.lines().find(|l| l.contains("response failed") && l.contains(&status)).unwrap_or_default()
        };
        assert!(line("503").contains(" WARN "), "{text}");
        assert!(line("500").contains(" ERROR "), "{text}");
        assert!(!text.lines().any(|l| l.contains(" ERROR ") && l.contains("Status code: 503 ")), "{text}");
    }

    #[tokio::test]
    async fn requests_are_counted_by_route_template_with_bounded_labels() {
        let metrics = Registry::default();
        let app = Router::new().route("/posts/{id}/comments", get(|| async { "ok" }));
        let app = standard(app, None, metrics.clone());
        for uri in ["/posts/1/comments", "/posts/2/comments", "/nope/1", "/nope/2", "/posts/1/comments/x"] {
            app.clone().oneshot(Request::get(uri).body(Body::empty()).unwrap()).await.unwrap();
        }
        let odd = Request::builder().method("BREW").uri("/posts/1/comments").body(Body::empty()).unwrap();
        app.clone().oneshot(odd).await.unwrap();
        let text = metrics.render();
        let count = |labels: &str| {
            let line = format!("blog_http_request_duration_seconds_count{{{labels}}} ");
            text.lines().find_map(|l| l.strip_prefix(&line)).map(|n| n.parse::<u64>().unwrap())
        };
        assert_eq!(count("route=\"/posts/{id}/comments\",method=\"GET\",status=\"2xx\""), Some(2), "{text}");
        assert_eq!(count("route=\"unmatched\",method=\"GET\",status=\"4xx\""), Some(3), "{text}");
        assert_eq!(count("route=\"/posts/{id}/comments\",method=\"other\",status=\"4xx\""), Some(1), "{text}");
        assert!(!text.contains("/nope"), "{text}");
        assert!(text.contains("le=\"+Inf\""), "{text}");
    }

    #[tokio::test]
    async fn every_extractor_rejection_is_json() {
        let app = Router::new()
            .route("/posts/{id}/comments", get(|extract::Path(id): extract::Path<String>| async move { id }))
            .route("/numbers/{n}", get(|extract::Path(n): extract::Path<u32>| async move { n.to_string() }))
            .route(
                "/query",
                get(|extract::Query(q): extract::Query<std::collections::HashMap<String, u32>>| async move { q.len().to_string() }),
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
