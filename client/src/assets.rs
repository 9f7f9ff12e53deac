//! The embedded assets and how they are cached.
//!
//! Scripts, styles and the icon are served under a name that carries a hash
//! of their content (`/app.3f2a1b9c4d5e.js`), so the browser may keep them
//! forever (`immutable`): a new build changes the name, and the HTML, which
//! is always revalidated (`no-cache` + `ETag`), points at the new one. The
//! plain names (`/app.js`) keep working for anything that links them, without
//! long caching.
//!
//! Nothing here reads the filesystem: a path either names one of these
//! embedded files or it does not, so no request can reach anything else
//! (no path traversal is possible by construction). Paths that look like a
//! file we do not have answer 404, and every other path answers the app, so
//! deep links open the UI.

use std::{collections::HashMap, sync::LazyLock};

use axum::{
    body::Body,
    http::{HeaderMap, HeaderValue, StatusCode, Uri, header},
    response::{IntoResponse, Response},
};
use blog_kit::http::error_response;

/// An embedded file.
#[derive(Debug)]
pub struct Asset {
    /// The plain path, e.g. `/app.js`.
    pub path: &'static str,
    pub content_type: &'static str,
    pub body: &'static str,
}

/// Every embedded file but the HTML.
pub const ASSETS: &[Asset] = &[
    Asset { path: "/app.js", content_type: "text/javascript; charset=utf-8", body: include_str!("../assets/app.js") },
    Asset { path: "/style.css", content_type: "text/css; charset=utf-8", body: include_str!("../assets/style.css") },
    Asset { path: "/favicon.svg", content_type: "image/svg+xml", body: include_str!("../assets/favicon.svg") },
];

const INDEX_TEMPLATE: &str = include_str!("../assets/index.html");
const HTML: &str = "text/html; charset=utf-8";

/// A year: the longest `max-age` caches honour.
pub const IMMUTABLE: &str = "public, max-age=31536000, immutable";
pub const REVALIDATE: &str = "no-cache";

/// FNV-1a: stable across builds and platforms, which is all a cache key needs.
fn content_hash(body: &str) -> String {
    let hash = body.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    format!("{:012x}", hash >> 16)
}

/// `/app.js` -> `/app.<hash>.js`.
fn hashed_path(asset: &Asset) -> String {
    let (stem, ext) = asset.path.rsplit_once('.').unwrap_or((asset.path, ""));
    format!("{stem}.{}.{ext}", content_hash(asset.body))
}

/// A servable file: body, type, cache policy and validator.
#[derive(Debug)]
struct Served {
    body: &'static str,
    content_type: &'static str,
    cache_control: &'static str,
    etag: String,
}

impl Served {
    fn new(body: &'static str, content_type: &'static str, cache_control: &'static str) -> Self {
        Self { body, content_type, cache_control, etag: format!("\"{}\"", content_hash(body)) }
    }
}

/// The HTML with the hashed asset names filled in.
static INDEX: LazyLock<Served> = LazyLock::new(|| {
    let html =
        ASSETS.iter().fold(INDEX_TEMPLATE.to_owned(), |html, asset| html.replace(&format!("{{{{{}}}}}", asset.path), &hashed_path(asset)));
    Served::new(Box::leak(html.into_boxed_str()), HTML, REVALIDATE)
});

/// Every asset path, hashed and plain.
static TABLE: LazyLock<HashMap<String, Served>> = LazyLock::new(|| {
    let mut table = HashMap::new();
    for asset in ASSETS {
        table.insert(hashed_path(asset), Served::new(asset.body, asset.content_type, IMMUTABLE));
        table.insert(asset.path.to_owned(), Served::new(asset.body, asset.content_type, REVALIDATE));
    }
    table
});

/// The hashed URL of an asset, as the HTML links it (for tests).
pub fn url_of(plain: &str) -> Option<String> {
    ASSETS.iter().find(|a| a.path == plain).map(hashed_path)
}

/// The rendered HTML (for tests).
pub fn index_html() -> &'static str {
    INDEX.body
}

/// `GET /` and every other path the API does not answer.
pub async fn serve(uri: Uri, headers: HeaderMap) -> Response {
    let path = uri.path();
    if let Some(served) = TABLE.get(path) {
        return respond(served, &headers);
    }
    let last = path.rsplit('/').next().unwrap_or("");
    if path.starts_with("/api/") || (last.contains('.') && last != "index.html") {
        // A stale hash or a file we never had: HTML under a script's name
        // would only confuse the browser.
        return error_response(StatusCode::NOT_FOUND, "no such file");
    }
    respond(&INDEX, &headers)
}

fn respond(served: &Served, headers: &HeaderMap) -> Response {
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|tags| tags.split(',').any(|t| t.trim().trim_start_matches("W/") == served.etag));
    let mut response = if fresh { StatusCode::NOT_MODIFIED.into_response() } else { Body::from(served.body).into_response() };
    let out = response.headers_mut();
    out.insert(header::CONTENT_TYPE, HeaderValue::from_static(served.content_type));
    out.insert(header::CACHE_CONTROL, HeaderValue::from_static(served.cache_control));
    if let Ok(etag) = HeaderValue::from_str(&served.etag) {
        out.insert(header::ETAG, etag);
    }
    response
}
