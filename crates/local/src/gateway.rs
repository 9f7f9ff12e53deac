//! The local stand-in for ingress-nginx: every request goes to the service
//! the shared route table names for its path, with the Ingress's matching
//! rules (see [`blog_common::routes`]). It answers whatever `Host` a request
//! carries, so a browser at `http://127.0.0.1:8080` and
//! `curl -H 'Host: posts.com'` both work. Request bodies are read whole, up to
//! 1 MiB like ingress-nginx's default `client_max_body_size` (413 beyond): a
//! buffered request can be sent again when a pooled connection turns out to
//! have been closed by the service (as it does after refusing an oversized
//! body), where a streamed one would fail. Responses stream, so the live
//! update stream passes through like any other response.

use std::{collections::BTreeMap, io, sync::Arc};

use axum::{
    Router,
    body::Body,
    extract::{Request, State},
    http::{HeaderMap, HeaderName, StatusCode, header},
    response::{IntoResponse, Response},
};
use blog_common::{Service, error::error_response, routes::RouteTable, server::Shutdown};
use tokio::net::TcpListener;

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
        let http = blog_common::bus_client::build_client(|builder| builder.pool_max_idle_per_host(512));
        Arc::new(Self { table: RouteTable::standard(), upstreams, http })
    }

    pub fn router(self: Arc<Self>) -> Router {
        Router::new().fallback(proxy).with_state(self)
    }
}

pub async fn serve(listener: TcpListener, gateway: Arc<Gateway>, shutdown: Shutdown) -> io::Result<()> {
    blog_common::server::serve(listener, gateway.router(), shutdown).await
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
    let path = request.uri().path();
    let Some(route) = gateway.table.route(path) else {
        return error_response(StatusCode::NOT_FOUND, &format!("no route for {path}"));
    };
    let service = route.service;
    let Some(base) = gateway.upstreams.get(&service) else {
        return error_response(StatusCode::BAD_GATEWAY, &format!("no upstream for {service}"));
    };
    let target = format!("{base}{}", request.uri().path_and_query().map_or(path, |pq| pq.as_str()));
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
    match upstream.send().await {
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
