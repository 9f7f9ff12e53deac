//! client: serves the browser UI. The HTML, JavaScript and CSS are embedded
//! in the binary at compile time, so there is no build toolchain and nothing
//! on disk to serve from: a request can only ever reach one of these assets.
//! Every other `GET` path answers the app's HTML, so deep links work.

use axum::{
    Router,
    http::{HeaderValue, Uri, header},
    response::{IntoResponse, Response},
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

#[derive(Debug, Clone)]
pub struct Config {
    pub port: u16,
}

impl Config {
    pub fn from_env() -> Result<Self, ConfigError> {
        Ok(Self { port: config::var("PORT", Service::Client.default_port())? })
    }
}

/// An embedded asset.
struct Asset {
    path: &'static str,
    content_type: &'static str,
    body: &'static str,
}

const INDEX: Asset = Asset { path: "/index.html", content_type: "text/html; charset=utf-8", body: include_str!("../assets/index.html") };

const ASSETS: &[Asset] = &[
    Asset { path: "/app.js", content_type: "text/javascript; charset=utf-8", body: include_str!("../assets/app.js") },
    Asset { path: "/style.css", content_type: "text/css; charset=utf-8", body: include_str!("../assets/style.css") },
];

pub async fn run(listener: TcpListener, _config: Config, shutdown: Shutdown) -> Result<(), BoxError> {
    server::serve(listener, server::standard(app(), None, Registry::default()), shutdown).await?;
    Ok(())
}

pub fn app() -> Router {
    Router::new().route("/", get(serve_asset)).route("/{*path}", get(serve_asset))
}

async fn serve_asset(uri: Uri) -> Response {
    let asset = ASSETS.iter().find(|a| a.path == uri.path()).unwrap_or(&INDEX);
    let mut response = asset.body.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(asset.content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    response
}
