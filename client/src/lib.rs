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
use blog_common::{
    Service,
    config::{self, ConfigError},
    metrics::Registry,
    node::BoxError,
    server::{self, Shutdown},
};
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
        let peers = Service::ALL.into_iter().filter(|s| *s != Service::Client).map(|s| (s, config::peer_url(s))).collect();
        Ok(Self { port: config::var("PORT", Service::Client.default_port())?, peers })
    }
}

/// Only this origin's own files and connections; nothing inline, no frames.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
     connect-src 'self'; manifest-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

pub async fn run(listener: TcpListener, config: Config, shutdown: Shutdown) -> Result<(), BoxError> {
    let peers = api::Peers::new(config.peers, shutdown.clone());
    server::serve(listener, server::standard(app(peers), None, Registry::default()), shutdown).await?;
    Ok(())
}

pub fn app(peers: api::Peers) -> Router {
    Router::new()
        .route("/", get(assets::serve))
        .route("/{*path}", get(assets::serve))
        .merge(api::router(peers))
        .layer(middleware::map_response(security_headers))
        .layer(CompressionLayer::new())
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
