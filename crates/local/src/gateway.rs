//! The local stand-in for ingress-nginx: every request goes to the service
//! the shared route table names for its path, with the Ingress's matching
//! rules (see [`crate::routes`]). It answers whatever `Host` a request
//! carries, so a browser at `http://127.0.0.1:8080` and
//! `curl -H 'Host: posts.com'` both work. Request bodies are read whole, up to
//! 1 MiB like ingress-nginx's default `client_max_body_size` (413 beyond): a
//! buffered request can be sent again when a pooled connection turns out to
//! have been closed by the service (as it does after refusing an oversized
//! body), where a streamed one would fail. Responses stream, so the live
//! update stream passes through like any other response. Connections are
//! served by [`blog_kit::http::serve::serve`] (a client has 10 s to send its
//! request head), an upstream has 2 s to accept a connection and
//! [`UPSTREAM_HEADERS_TIMEOUT`] to answer.
//!
//! The path is checked before it is matched, and the upstream URL is built
//! from the checked path: an HTTP client resolves `..` (and servers decode
//! `%2e`) after routing, so `/posts/x/comments/../../../events` would match
//! the comments route and then reach comments' internal `/events`. Dot
//! segments (literal or percent-encoded, any case), empty segments,
//! backslashes and encoded slashes are refused with a JSON 400; percent-encoded
//! unreserved characters are decoded first (RFC 3986 §6.2.2.2), so no spelling
//! hides one of them. The services' internal routes ([`INTERNAL_PATHS`]) are
//! refused for every upstream, so the catch-all route cannot reach the
//! client's own `/metrics` either.

use std::{collections::BTreeMap, io, sync::Arc};

use axum::{
    Router,
    body::Body,
    extract::{Request, State},
    http::{HeaderMap, HeaderName, StatusCode, header},
    response::{IntoResponse, Response},
};
use blog_domain::Service;
use blog_kit::{Shutdown, http::error_response};

use crate::routes::RouteTable;
use tokio::net::TcpListener;

/// Longest the gateway waits for an upstream's response head: past each
/// service's own request timeout, so a slow request gets the service's JSON
/// 503 first; a hung upstream gets a JSON 504. A response body (the live
/// update stream included) is not bounded once its head has arrived.
pub const UPSTREAM_HEADERS_TIMEOUT: std::time::Duration =
    blog_kit::http::layers::REQUEST_TIMEOUT.saturating_add(std::time::Duration::from_secs(5));

/// Largest request body passed on (ingress-nginx's default `client_max_body_size`).
pub const MAX_REQUEST_BODY: usize = 1024 * 1024;

#[derive(Debug)]
pub struct Gateway {
    table: RouteTable,
    upstreams: BTreeMap<Service, String>,
    http: reqwest::Client,
}

impl Gateway {
    /// `upstreams` maps each service to its base URL.
    pub fn new(upstreams: BTreeMap<Service, String>) -> Arc<Self> {
        let http = blog_kit::http::client::build_client(|builder| builder.pool_max_idle_per_host(512));
        Arc::new(Self { table: RouteTable::standard(), upstreams, http })
    }

    pub fn router(self: Arc<Self>) -> Router {
        Router::new().fallback(proxy).with_state(self)
    }
}

pub async fn serve(listener: TcpListener, gateway: Arc<Gateway>, shutdown: Shutdown) -> io::Result<()> {
    blog_kit::http::serve::serve(listener, gateway.router(), shutdown).await
}

/// Routes every service answers for the cluster itself (the bus, probes,
/// Prometheus), never for the public.
pub const INTERNAL_PATHS: &[&str] = &["/events", "/status", "/metrics", "/flow", "/healthz", "/readyz"];

/// Why a request path is refused before routing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathRefusal {
    /// Dot or empty segments, backslashes, encoded slashes, bad encoding: 400.
    Malformed(&'static str),
    /// One of [`INTERNAL_PATHS`]: 404, as if it did not exist.
    Internal,
}

/// `raw` with percent-encoded unreserved characters decoded, or why it is
/// refused. The result is what is routed and sent upstream.
pub fn checked_path(raw: &str) -> Result<String, PathRefusal> {
    use PathRefusal::Malformed;
    let bytes = raw.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => return Err(Malformed("backslashes are not allowed in a path")),
            b'%' => {
                let byte = raw
                    .get(i + 1..i + 3)
                    .and_then(|hex| u8::from_str_radix(hex, 16).ok())
                    .ok_or(Malformed("malformed percent-encoding in the path"))?;
                match byte {
                    b'/' | b'\\' => return Err(Malformed("encoded slashes are not allowed in a path")),
                    b if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') => decoded.push(b),
                    b => decoded.extend_from_slice(format!("%{b:02X}").as_bytes()),
                }
                i += 3;
            }
            b => {
                decoded.push(b);
                i += 1;
            }
        }
    }
    let path = String::from_utf8(decoded).map_err(|_| Malformed("the path is not UTF-8"))?;
    let Some(rest) = path.strip_prefix('/') else {
        return Err(Malformed("the path must start with `/`"));
    };
    let segments: Vec<&str> = rest.split('/').collect();
    for (n, segment) in segments.iter().enumerate() {
        if *segment == "." || *segment == ".." {
            return Err(Malformed("dot segments are not allowed in a path"));
        }
        // One trailing slash is an ordinary path; `//` anywhere is not.
        if segment.is_empty() && n + 1 < segments.len() {
            return Err(Malformed("empty segments are not allowed in a path"));
        }
    }
    let bare = path.trim_end_matches('/').to_ascii_lowercase();
    if INTERNAL_PATHS.contains(&bare.as_str()) {
        return Err(PathRefusal::Internal);
    }
    Ok(path)
}

/// Most of an oversized body read and thrown away before answering 413.
const DRAIN_LIMIT: usize = 8 * MAX_REQUEST_BODY;

/// The whole body, or `None` past [`MAX_REQUEST_BODY`]. An oversized body is
/// still read (up to [`DRAIN_LIMIT`]) before the 413, as nginx's lingering
/// close does: answering with unread data in the connection gets it reset,
/// and the client would see the reset instead of the answer.
async fn read_body(body: Body) -> Option<axum::body::Bytes> {
    use futures_util::StreamExt;
    let mut stream = body.into_data_stream();
    let mut buffer = Vec::new();
    let mut seen = 0;
    while let Some(Ok(chunk)) = stream.next().await {
        seen += chunk.len();
        if seen > DRAIN_LIMIT {
            break;
        }
        if seen <= MAX_REQUEST_BODY {
            buffer.extend_from_slice(&chunk);
        }
    }
    (seen <= MAX_REQUEST_BODY).then(|| buffer.into())
}

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1).
fn hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "transfer-encoding"
            | "te"
            | "trailer"
            | "upgrade"
            | "proxy-authorization"
            | "proxy-authenticate"
    )
}

fn forwardable(headers: &HeaderMap) -> impl Iterator<Item = (&HeaderName, &axum::http::HeaderValue)> {
    headers.iter().filter(|(name, _)| !hop_by_hop(name))
}

async fn proxy(State(gateway): State<Arc<Gateway>>, request: Request) -> Response {
    let path = match checked_path(request.uri().path()) {
        Ok(path) => path,
        Err(PathRefusal::Malformed(why)) => return error_response(StatusCode::BAD_REQUEST, why),
        Err(PathRefusal::Internal) => return error_response(StatusCode::NOT_FOUND, "no such route"),
    };
    let Some(route) = gateway.table.route(&path) else {
        return error_response(StatusCode::NOT_FOUND, &format!("no route for {path}"));
    };
    let service = route.service;
    let Some(base) = gateway.upstreams.get(&service) else {
        return error_response(StatusCode::BAD_GATEWAY, &format!("no upstream for {service}"));
    };
    let target = match request.uri().query() {
        Some(query) => format!("{base}{path}?{query}"),
        None => format!("{base}{path}"),
    };
    let (parts, body) = request.into_parts();
    let Some(body) = read_body(body).await else {
        return error_response(StatusCode::PAYLOAD_TOO_LARGE, "request body is too large");
    };
    let mut upstream = gateway.http.request(parts.method, target);
    for (name, value) in forwardable(&parts.headers) {
        if name != header::HOST {
            upstream = upstream.header(name, value);
        }
    }
    if let Some(host) = parts.headers.get(header::HOST) {
        upstream = upstream.header("x-forwarded-host", host);
    }
    let upstream = upstream.header("x-forwarded-proto", "http").body(body);
    let Ok(sent) = tokio::time::timeout(UPSTREAM_HEADERS_TIMEOUT, upstream.send()).await else {
        tracing::warn!(%service, "upstream did not answer in time");
        return error_response(StatusCode::GATEWAY_TIMEOUT, &format!("{service} did not answer in time"));
    };
    match sent {
        Ok(answer) => {
            let mut response = Response::builder().status(answer.status());
            for (name, value) in forwardable(answer.headers()) {
                response = response.header(name, value);
            }
            response
                .body(Body::from_stream(answer.bytes_stream()))
                .unwrap_or_else(|_| error_response(StatusCode::BAD_GATEWAY, "unreadable upstream response"))
        }
        Err(e) => {
            tracing::warn!(%service, error = %e, "upstream unavailable");
            (StatusCode::BAD_GATEWAY, error_response(StatusCode::BAD_GATEWAY, &format!("{service} is unavailable"))).into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hung_upstream_gets_a_json_504() {
        use axum::http::Request;
        use tower::ServiceExt;
        // Accepts connections (the kernel's backlog does) and never answers.
        let hung = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", hung.local_addr().unwrap());
        let upstreams = Service::ALL.into_iter().map(|s| (s, base.clone())).collect();
        let request = Request::get("/posts").body(Body::empty()).unwrap();
        let answer = Gateway::new(upstreams).router().oneshot(request).await.unwrap();
        assert_eq!(answer.status(), StatusCode::GATEWAY_TIMEOUT);
        let body = axum::body::to_bytes(answer.into_body(), 1 << 16).await.unwrap();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert!(body["error"].as_str().is_some_and(|e| e.contains("did not answer")), "{body}");
        drop(hung);
    }

    #[test]
    fn ordinary_paths_pass_with_unreserved_characters_decoded() {
        assert_eq!(checked_path("/posts/abc/comments"), Ok("/posts/abc/comments".into()));
        assert_eq!(checked_path("/posts/"), Ok("/posts/".into()));
        assert_eq!(checked_path("/posts/%61b%7e/comments"), Ok("/posts/ab~/comments".into()));
        assert_eq!(checked_path("/posts/a%20b/comments"), Ok("/posts/a%20b/comments".into()));
        assert_eq!(checked_path("/posts/a%ff/comments"), Ok("/posts/a%FF/comments".into()));
        assert_eq!(checked_path("/api/flow"), Ok("/api/flow".into()));
        assert_eq!(checked_path("/"), Ok("/".into()));
    }

    #[test]
    fn dot_and_empty_segments_backslashes_and_encoded_slashes_are_refused() {
        for path in [
            "/posts/x/comments/../../../events",
            "/posts/%2e%2e/events",
            "/posts/%2E%2e/metrics",
            "/posts/.%2e/status",
            "/posts/%2e./status",
            "/posts/./flow",
            "/posts/%2E/flow",
            "/posts/x/..%2f..%2fevents",
            "/posts/x/..%2F..%2Fevents",
            "/posts/x/..%5c..%5cevents",
            "/posts\\..\\events",
            "//events",
            "/posts//comments",
            "/posts/%zz",
            "/posts/%2",
            "posts",
        ] {
            assert!(matches!(checked_path(path), Err(PathRefusal::Malformed(_))), "{path}: {:?}", checked_path(path));
        }
    }

    #[test]
    fn internal_routes_are_refused_in_any_spelling() {
        for name in INTERNAL_PATHS {
            let upper = name.to_ascii_uppercase();
            let encoded: String = name.bytes().map(|b| if b == b'/' { "/".to_owned() } else { format!("%{b:02x}") }).collect();
            for path in [name.to_string(), format!("{name}/"), upper, encoded] {
                assert_eq!(checked_path(&path), Err(PathRefusal::Internal), "{path}");
            }
        }
    }
}
