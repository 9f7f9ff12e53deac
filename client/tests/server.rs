//! The client server in-process: content types, caching, security headers,
//! compression, deep links, path traversal attempts, and the read-only API
//! against a fake bus (a real socket on 127.0.0.1, since the API proxies over
//! HTTP).

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use axum::{
    Router,
    body::{Body, to_bytes},
    http::{Request, StatusCode, header},
    response::{IntoResponse, Response},
    routing,
};
use blog_domain::Service;
use blog_kit::Shutdown;
use client::{api::Peers, assets};
use serde_json::{Value, json};
use tower::ServiceExt;

/// Peers whose every URL is `base` (a fake), or a closed port.
fn peers(base: &str) -> Peers {
    let urls: BTreeMap<Service, String> =
        Service::ALL.into_iter().filter(|s| *s != Service::Client).map(|s| (s, base.to_owned())).collect();
    Peers::new(urls, Shutdown::new(std::future::pending()))
}

/// A port nothing listens on.
fn closed() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    format!("http://127.0.0.1:{port}")
}

async fn get(path: &str) -> Response {
    get_with(path, &[]).await
}

async fn get_with(path: &str, headers: &[(&str, &str)]) -> Response {
    let mut request = Request::get(path);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    client::app(peers(&closed())).oneshot(request.body(Body::empty()).unwrap()).await.unwrap()
}

async fn text(response: Response) -> String {
    String::from_utf8(to_bytes(response.into_body(), 1 << 20).await.unwrap().to_vec()).unwrap()
}

fn header<'a>(response: &'a Response, name: &str) -> &'a str {
    response.headers().get(name).map_or("", |v| v.to_str().unwrap())
}

#[tokio::test]
async fn the_page_is_html_revalidated_and_links_hashed_assets() {
    let response = get("/").await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(header(&response, "content-type"), "text/html; charset=utf-8");
    assert_eq!(header(&response, "cache-control"), "no-cache");
    let etag = header(&response, "etag").to_owned();
    assert!(etag.starts_with('"'), "{etag}");
    let html = text(response).await;
    for plain in ["/app.js", "/style.css", "/favicon.svg"] {
        let hashed = assets::url_of(plain).unwrap();
        assert_ne!(hashed, plain);
        assert!(html.contains(&format!("\"{hashed}\"")), "{hashed} not linked");
    }
    assert!(!html.contains("{{"), "a placeholder was left in the HTML");

    let revalidated = get_with("/", &[("if-none-match", &etag)]).await;
    assert_eq!(revalidated.status(), StatusCode::NOT_MODIFIED);
    assert!(text(revalidated).await.is_empty());
}

#[tokio::test]
async fn hashed_assets_are_immutable_and_plain_names_revalidate() {
    for (plain, content_type) in
        [("/app.js", "text/javascript; charset=utf-8"), ("/style.css", "text/css; charset=utf-8"), ("/favicon.svg", "image/svg+xml")]
    {
        let hashed = get(&assets::url_of(plain).unwrap()).await;
        assert_eq!(hashed.status(), StatusCode::OK, "{plain}");
        assert_eq!(header(&hashed, "content-type"), content_type);
        assert_eq!(header(&hashed, "cache-control"), "public, max-age=31536000, immutable");
        let body = text(hashed).await;
        let plain_answer = get(plain).await;
        assert_eq!(header(&plain_answer, "cache-control"), "no-cache");
        assert_eq!(text(plain_answer).await, body, "{plain} and its hashed name differ");
    }
    // A stale hash is a missing file, not the HTML under a script's name.
    let stale = get("/app.000000000000.js").await;
    assert_eq!(stale.status(), StatusCode::NOT_FOUND);
    assert!(header(&stale, "content-type").starts_with("application/json"));
}

#[tokio::test]
async fn every_answer_carries_the_security_headers() {
    for path in ["/", "/app.js", "/some/deep/link", "/missing.png", "/api/status"] {
        let response = get(path).await;
        let csp = header(&response, "content-security-policy");
        assert!(csp.contains("default-src 'none'"), "{path}: {csp}");
        assert!(csp.contains("script-src 'self'"), "{path}: {csp}");
        assert!(csp.contains("style-src 'self'"), "{path}: {csp}");
        assert!(!csp.contains("unsafe-inline") && !csp.contains("unsafe-eval") && !csp.contains("http"), "{path}: {csp}");
        assert_eq!(header(&response, "x-content-type-options"), "nosniff", "{path}");
        assert_eq!(header(&response, "referrer-policy"), "no-referrer", "{path}");
        assert_eq!(header(&response, "x-frame-options"), "DENY", "{path}");
    }
}

#[tokio::test]
async fn the_html_and_scripts_use_no_inline_code() {
    let html = assets::index_html();
    assert!(!html.contains("<script>"), "inline script");
    assert!(!html.contains(" style="), "inline style");
    let handler = html.split(" on").skip(1).any(|rest| {
        let name = rest.trim_start_matches(|c: char| c.is_ascii_alphabetic());
        name.len() < rest.len() && name.starts_with('=')
    });
    assert!(!handler, "inline event handler");
    assert!(!include_str!("../assets/app.js").contains("innerHTML"), "text must go in through textContent");
}

#[tokio::test]
async fn answers_are_gzipped_when_the_browser_accepts_it() {
    let response = get_with(&assets::url_of("/app.js").unwrap(), &[("accept-encoding", "gzip")]).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(header(&response, "content-encoding"), "gzip");
    assert_eq!(header(&response, "content-type"), "text/javascript; charset=utf-8");
    let compressed = to_bytes(response.into_body(), 1 << 20).await.unwrap();
    assert!(compressed.len() < include_str!("../assets/app.js").len() / 2, "{} bytes", compressed.len());

    let identity = get(&assets::url_of("/app.js").unwrap()).await;
    assert_eq!(header(&identity, "content-encoding"), "");
}

/// `identity;q=0` with no coding the server has: a 406 with a JSON error,
/// whatever the handler would have answered (the page, a 404, the stream).
#[tokio::test]
async fn an_accept_encoding_that_rules_out_every_coding_gets_a_json_406() {
    for (path, accept) in [("/", "identity;q=0"), ("/nope.js", "identity;q=0"), ("/", "*;q=0"), ("/api/flow", "compress, identity;q=0")] {
        let response = get_with(path, &[("accept-encoding", accept)]).await;
        assert_eq!(response.status(), StatusCode::NOT_ACCEPTABLE, "{path} {accept}");
        assert_eq!(header(&response, "content-type"), "application/json", "{path} {accept}");
        assert_eq!(header(&response, "x-content-type-options"), "nosniff");
        let body: Value = serde_json::from_str(&text(response).await).unwrap();
        assert!(body["error"].as_str().unwrap().contains("Accept-Encoding"), "{body}");
    }
    assert_eq!(get_with("/", &[("accept-encoding", "identity;q=0, gzip")]).await.status(), StatusCode::OK);
}

#[tokio::test]
async fn deep_links_serve_the_app() {
    for path in ["/post/abc", "/some/deep/link", "/index.html", "/p?x=1"] {
        let response = get(path).await;
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        assert_eq!(header(&response, "content-type"), "text/html; charset=utf-8", "{path}");
        assert_eq!(text(response).await, assets::index_html(), "{path}");
    }
}

#[tokio::test]
async fn path_traversal_reaches_nothing_but_the_embedded_assets() {
    let embedded: Vec<&str> = assets::ASSETS.iter().map(|a| a.body).chain([assets::index_html()]).collect();
    for path in [
        "/../../../../etc/passwd",
        "/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        "/..%2f..%2f..%2fetc%2fpasswd",
        "/assets/../src/lib.rs",
        "/%2e%2e%2fCargo.toml",
        "/..\\..\\Cargo.toml",
        "//etc/passwd",
        "/client/assets/app.js/../../src/lib.rs",
        "/.git/config",
        "/Cargo.toml",
    ] {
        let response = get(path).await;
        let status = response.status();
        let body = text(response).await;
        assert!(status == StatusCode::OK || status == StatusCode::NOT_FOUND || status == StatusCode::BAD_REQUEST, "{path}: {status}");
        if status == StatusCode::OK {
            assert!(embedded.contains(&body.as_str()), "{path} answered something that is not an embedded asset");
        }
        assert!(!body.contains("root:") && !body.contains("[package]") && !body.contains("pub fn"), "{path} leaked a file");
    }
}

#[tokio::test]
async fn the_api_is_read_only() {
    for (method, path) in [("POST", "/api/flow"), ("POST", "/api/status"), ("PUT", "/api/status"), ("POST", "/events"), ("DELETE", "/")] {
        let request =
            Request::builder().method(method).uri(path).header("content-type", "application/json").body(Body::from("{}")).unwrap();
        let response = client::app(peers(&closed())).oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
    }
    let unknown = get("/api/events").await;
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
    assert!(header(&unknown, "content-type").starts_with("application/json"));
}

#[tokio::test]
async fn with_the_bus_down_the_api_answers_json_errors_quickly() {
    let started = std::time::Instant::now();
    let status = get("/api/status").await;
    assert_eq!(status.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = serde_json::from_str(&text(status).await).unwrap();
    assert_eq!(body["error"], "the event bus is unavailable");
    let services = body["services"].as_array().unwrap();
    assert_eq!(services.len(), 6);
    assert!(services.iter().filter(|s| s["name"] != "client").all(|s| s["healthy"] == false), "{body}");

    let flow = get("/api/flow").await;
    assert_eq!(flow.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(header(&flow, "content-type").starts_with("application/json"));
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
}

/// A bus that says more than the UI may show.
async fn fake_bus() -> String {
    let status = json!({
        "head": 7,
        "subscribers": [
            {"name": "query", "url": "http://10.0.0.7:4002/events", "cursor": 7, "lag": 0, "delivered": 7, "retries": 0,
             "rejected": 0, "lastError": null, "lastDeliveryAt": "2026-01-01T00:00:00Z"},
            {"name": "moderation", "url": "http://10.0.0.9:4003/events", "cursor": 5, "lag": 2, "delivered": 5, "retries": 3,
             "rejected": 0, "lastError": "connection refused (os error 111) to 10.0.0.9:4003", "lastDeliveryAt": null}
        ]
    });
    let flow = concat!(
        ": keep-alive\n\n",
        "event: published\r\nid: 1\r\ndata: {\"seq\":1,\"id\":\"e1\",\"type\":\"PostCreated\",\"data\":{\"id\":\"p1\",\"title\":\"Hi\"},",
        "\"timestamp\":\"2026-01-01T00:00:00Z\",\"requestId\":\"secret-request\",\"host\":\"10.0.0.5\"}\r\n\r\n",
        "event: delivered\ndata: {\"seq\":1,\"id\":\"e1\",\"type\":\"PostCreated\",\"subscriber\":\"query\",\"lagMs\":3,",
        "\"url\":\"http://10.0.0.7:4002/events\"}\n\n",
        "event: internal\ndata: {\"seq\":2}\n\n",
    );
    let app = Router::new()
        .route("/status", routing::get(move || async move { axum::Json(status) }))
        .route("/healthz", routing::get(|| async { axum::Json(json!({"status": "ok"})) }))
        .route("/flow", routing::get(move || async move { ([(header::CONTENT_TYPE, "text/event-stream")], flow).into_response() }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

#[tokio::test]
async fn status_shows_health_and_progress_but_no_addresses_or_error_texts() {
    let bus = fake_bus().await;
    let response = client::app(peers(&bus)).oneshot(Request::get("/api/status").body(Body::empty()).unwrap()).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let raw = text(response).await;
    for secret in ["10.0.0", "url", "lastError", "refused", "os error"] {
        assert!(!raw.contains(secret), "{secret} leaked: {raw}");
    }
    let body: Value = serde_json::from_str(&raw).unwrap();
    assert_eq!(body["bus"]["head"], 7);
    let subscribers = body["bus"]["subscribers"].as_array().unwrap();
    assert_eq!(subscribers.len(), 2);
    assert_eq!(subscribers[0]["name"], "query");
    assert_eq!(subscribers[0]["failing"], false);
    assert_eq!(subscribers[1]["name"], "moderation");
    assert_eq!((subscribers[1]["lag"].as_u64(), subscribers[1]["retries"].as_u64()), (Some(2), Some(3)));
    assert_eq!(subscribers[1]["failing"], true);
    assert!(body["services"].as_array().unwrap().iter().all(|s| s["healthy"] == true), "{body}");
}

/// `/api/status` asks the services once per period, however many ask it.
#[tokio::test]
async fn status_answers_are_shared_so_callers_cannot_multiply_internal_requests() {
    let asked = Arc::new(AtomicUsize::new(0));
    let counted = asked.clone();
    let app = Router::new()
        .route(
            "/status",
            routing::get(move || {
                counted.fetch_add(1, Ordering::SeqCst);
                async { axum::Json(json!({"head": 1, "subscribers": []})) }
            }),
        )
        .route("/healthz", routing::get(|| async { axum::Json(json!({"status": "ok"})) }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let bus = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let client = client::app(peers(&bus));
    let started = std::time::Instant::now();
    let calls = (0..25).map(|_| client.clone().oneshot(Request::get("/api/status").body(Body::empty()).unwrap()));
    for response in futures_util::future::join_all(calls).await {
        assert_eq!(response.unwrap().status(), StatusCode::OK);
    }
    let periods = started.elapsed().as_secs_f64() / client::api::STATUS_SHARED_FOR.as_secs_f64();
    let asks = asked.load(Ordering::SeqCst);
    assert!(asks >= 1 && (asks as f64) <= periods.floor() + 1.0, "{asks} asks of the bus in {periods:.1} periods for 25 calls");
    tokio::time::sleep(client::api::STATUS_SHARED_FOR).await;
    assert_eq!(client.oneshot(Request::get("/api/status").body(Body::empty()).unwrap()).await.unwrap().status(), StatusCode::OK);
    assert_eq!(asked.load(Ordering::SeqCst), asks + 1, "asked again once the answer is older than the period");
}

#[tokio::test]
async fn the_flow_passes_only_the_events_public_fields() {
    let bus = fake_bus().await;
    let request = Request::get("/api/flow").header("accept-encoding", "gzip").body(Body::empty()).unwrap();
    let response = client::app(peers(&bus)).oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(header(&response, "content-type"), "text/event-stream");
    assert_eq!(header(&response, "x-accel-buffering"), "no");
    assert_eq!(header(&response, "content-encoding"), "", "an event stream must not be compressed (buffered)");
    // The fake bus ends its stream after these records; ours goes on (the
    // shared subscription reconnects), so read until they have arrived.
    let raw = read_until(response, 2).await;
    for secret in ["secret-request", "requestId", "10.0.0", "url", "internal", "host"] {
        assert!(!raw.contains(secret), "{secret} leaked: {raw}");
    }
    let events: Vec<(&str, Value)> = raw
        .split("\n\n")
        .filter_map(|block| {
            let name = block.lines().find_map(|l| l.strip_prefix("event: "))?;
            let data = block.lines().find_map(|l| l.strip_prefix("data: "))?;
            Some((name, serde_json::from_str(data).unwrap()))
        })
        .collect();
    let events: Vec<_> = events.into_iter().filter(|(name, _)| *name != "resync").take(2).collect();
    assert_eq!(events.len(), 2, "{raw}");
    assert_eq!(events[0].0, "published");
    assert_eq!(
        events[0].1,
        json!({"seq":1,"id":"e1","type":"PostCreated","data":{"id":"p1","title":"Hi"},"timestamp":"2026-01-01T00:00:00Z"})
    );
    assert_eq!(events[1].0, "delivered");
    assert_eq!(events[1].1, json!({"seq":1,"id":"e1","type":"PostCreated","subscriber":"query","lagMs":3}));
}

/// The stream's text up to its `count`-th `published` or `delivered` event.
async fn read_until(response: Response, count: usize) -> String {
    use futures_util::StreamExt;
    let mut body = response.into_body().into_data_stream();
    let mut raw = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while raw.matches("event: published").count() + raw.matches("event: delivered").count() < count {
        let chunk = tokio::time::timeout_at(deadline, body.next()).await.expect("the events arrive in time");
        raw.push_str(&String::from_utf8_lossy(&chunk.expect("the stream stays open").unwrap()));
    }
    raw
}

/// A bus whose `/flow` counts its subscribers and sends one record to each,
/// once `release` is notified, then stays open.
async fn gated_bus(release: std::sync::Arc<tokio::sync::Notify>) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    };

    use futures_util::StreamExt;
    let subscriptions = Arc::new(AtomicUsize::new(0));
    let counter = subscriptions.clone();
    let flow = move || {
        let release = release.clone();
        counter.fetch_add(1, Ordering::SeqCst);
        async move {
            let record = "event: published\ndata: {\"seq\":1,\"id\":\"e1\",\"type\":\"PostCreated\",\"data\":{}}\n\n";
            let gated = futures_util::stream::once(async move {
                release.notified().await;
                Ok::<_, std::convert::Infallible>(record)
            });
            let body = Body::from_stream(gated.chain(futures_util::stream::pending()));
            ([(header::CONTENT_TYPE, "text/event-stream")], body).into_response()
        }
    };
    let app = Router::new().route("/flow", routing::get(flow));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), subscriptions)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_watcher_shares_one_upstream_subscription() {
    use futures_util::StreamExt;
    let release = std::sync::Arc::new(tokio::sync::Notify::new());
    let (bus, subscriptions) = gated_bus(release.clone()).await;
    let app = client::app(peers(&bus));
    const WATCHERS: usize = 8;
    let mut watchers = Vec::new();
    for _ in 0..WATCHERS {
        let response = app.clone().oneshot(Request::get("/api/flow").body(Body::empty()).unwrap()).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        watchers.push(response);
    }
    release.notify_waiters();
    let received = futures_util::stream::iter(watchers).then(|watcher| read_until(watcher, 1)).collect::<Vec<_>>().await;
    assert!(received.iter().all(|raw| raw.contains("\"seq\":1")), "{received:?}");
    let opened = subscriptions.load(std::sync::atomic::Ordering::SeqCst);
    println!("{WATCHERS} watchers, {opened} upstream subscription(s)");
    assert_eq!(opened, 1, "one upstream subscription for every watcher");
}

#[tokio::test]
async fn internal_routes_answer_only_requests_that_did_not_come_through_a_proxy() {
    for path in ["/metrics", "/healthz", "/readyz"] {
        let direct = client::service(peers(&closed())).oneshot(Request::get(path).body(Body::empty()).unwrap()).await.unwrap();
        assert_eq!(direct.status(), StatusCode::OK, "{path} direct");
        for forwarding in ["x-forwarded-for", "x-forwarded-host", "x-forwarded-proto", "x-real-ip", "forwarded"] {
            let request = Request::get(path).header(forwarding, "203.0.113.9").body(Body::empty()).unwrap();
            let proxied = client::service(peers(&closed())).oneshot(request).await.unwrap();
            assert_eq!(proxied.status(), StatusCode::NOT_FOUND, "{path} with {forwarding}");
            assert!(header(&proxied, "content-type").starts_with("application/json"));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shared_subscription_reconnects_while_someone_watches() {
    use std::sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    };
    // Each connection gets one record, numbered after the connection, and ends.
    let connections = Arc::new(AtomicUsize::new(0));
    let counter = connections.clone();
    let flow = move || {
        let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
        async move {
            let record = format!("event: published\ndata: {{\"seq\":{n},\"id\":\"e{n}\",\"type\":\"PostCreated\",\"data\":{{}}}}\n\n");
            ([(header::CONTENT_TYPE, "text/event-stream")], record).into_response()
        }
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let bus = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, Router::new().route("/flow", routing::get(flow))).await });

    let watcher = client::app(peers(&bus)).oneshot(Request::get("/api/flow").body(Body::empty()).unwrap()).await.unwrap();
    assert_eq!(watcher.status(), StatusCode::OK);
    let raw = read_until(watcher, 3).await;
    let resync = raw.find("event: resync").expect("a resync after the upstream ended");
    let second = raw.find("\"seq\":2").expect("the record of the second connection");
    assert!(resync < second, "{raw}");
    assert!(connections.load(Ordering::SeqCst) >= 3, "{raw}");
}
