//! client: serves the browser UI and two read-only views of the back end.
//!
//! The HTML, JavaScript and CSS are embedded in the binary at compile time
//! ([`assets`]), so there is no front-end toolchain and nothing on disk to
//! serve from. `GET /api/status` and `GET /api/flow` ([`api`]) let the page
//! show the services' health and the bus's event flow without ever talking
//! to an internal service itself.
//!
//! Every answer carries the same security headers: the Content-Security-Policy
//! allows only this origin's own scripts, styles and connections (no inline
//! code, no third parties), and answers are gzip-compressed when the browser
//! accepts it (event streams excepted, so they are not buffered).

pub mod api;
pub mod assets;

use std::collections::BTreeMap;

use axum::{
    Router,
    http::{HeaderName, HeaderValue, header},
    middleware,
    response::Response,
    routing::get,
};
use blog_domain::{
    Service,
    config::{self, ConfigError},
};
use blog_kit::{BoxError, Shutdown, http::serve::serve, metrics::Registry};
use tokio::net::TcpListener;
use tower_http::compression::CompressionLayer;

#[derive(Debug, Clone)]
pub struct Config {
    pub port: u16,
    /// Base URL of every other service (`<SERVICE>_URL`), for `/api/status`
    /// and `/api/flow`.
    pub peers: BTreeMap<Service, String>,
}

impl Config {
    pub fn from_env() -> Result<Self, ConfigError> {
        let peers = Service::ALL
            .into_iter()
            .filter(|s| *s != Service::Client)
            .map(|s| (s, config::peer_url(s)))
            .map(|(s, url)| Ok((s, config::endpoint(&url?, ""))))
            .collect::<Result<_, ConfigError>>()?;
        Ok(Self { port: config::var("PORT", Service::Client.default_port())?, peers })
    }
}

/// Only this origin's own files and connections; nothing inline, no frames.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
     connect-src 'self'; manifest-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

pub async fn run(listener: TcpListener, config: Config, shutdown: Shutdown) -> Result<(), BoxError> {
    let peers = api::Peers::new(config.peers, shutdown.clone());
    serve(listener, service(peers), shutdown).await?;
    Ok(())
}

/// The whole server: [`app`] with the standard routes, whose internal ones
/// (`/metrics`, `/healthz`, `/readyz`) answer only requests that did not come
/// through a proxy. The client is the Ingress's catch-all route, so without
/// this its metrics would be public; ingress-nginx and the local gateway
/// always add forwarding headers, the kubelet's probes and Prometheus never do.
pub fn service(peers: api::Peers) -> Router {
    blog_kit::http::layers::standard(app(peers), None, Registry::default()).layer(middleware::from_fn(internal_only_direct))
}

const INTERNAL_ROUTES: [&str; 3] = ["/metrics", "/healthz", "/readyz"];
const FORWARDING_HEADERS: [&str; 5] = ["x-forwarded-for", "x-forwarded-host", "x-forwarded-proto", "x-real-ip", "forwarded"];

async fn internal_only_direct(request: axum::extract::Request, next: middleware::Next) -> Response {
    let internal = INTERNAL_ROUTES.iter().any(|route| request.uri().path().trim_end_matches('/').eq_ignore_ascii_case(route));
    if internal && FORWARDING_HEADERS.iter().any(|name| request.headers().contains_key(*name)) {
        return blog_kit::http::error_response(axum::http::StatusCode::NOT_FOUND, "no such route");
    }
    next.run(request).await
}

pub fn app(peers: api::Peers) -> Router {
    Router::new()
        .route("/", get(assets::serve))
        .route("/{*path}", get(assets::serve))
        .merge(api::router(peers))
        .layer(middleware::map_response(security_headers))
        .layer(CompressionLayer::new())
        .layer(middleware::map_response(not_acceptable_as_json))
}

/// A 406 says what is wrong, in JSON like every other error. Only the
/// compression layer answers 406: when `Accept-Encoding` rules out every
/// coding it has, `identity` included (`identity;q=0`), it replaces the
/// status of whatever the handler answered and keeps its body (a page, a
/// 404's error, an event stream left open).
async fn not_acceptable_as_json(response: Response) -> Response {
    if response.status() != axum::http::StatusCode::NOT_ACCEPTABLE {
        return response;
    }
    let refusal = blog_kit::http::error_response(
        axum::http::StatusCode::NOT_ACCEPTABLE,
        "Accept-Encoding rules out every coding this server has: gzip, br, zstd, deflate and none (identity)",
    );
    security_headers(refusal).await
}

async fn security_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CONTENT_SECURITY_POLICY));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(HeaderName::from_static("cross-origin-opener-policy"), HeaderValue::from_static("same-origin"));
    headers.insert(HeaderName::from_static("permissions-policy"), HeaderValue::from_static("camera=(), microphone=(), geolocation=()"));
    response
}
