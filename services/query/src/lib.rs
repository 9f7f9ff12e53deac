//! query: the read side. It joins `PostCreated`, `CommentCreated` and
//! `CommentUpdated` into one view and serves it as the original's
//! `GET /posts` shape: an object keyed by post id, in creation order.
//!
//! Events may arrive in any order (the bus retries, consumers restart), so
//! every effect is an upsert that cannot move a comment backwards: a
//! `CommentUpdated` seen before its `CommentCreated` creates the comment with
//! its final status, and the late `CommentCreated` leaves that status alone. A
//! comment seen before its post is kept and shows up once the post does. The
//! whole view can be rebuilt from the bus by replay.
//!
//! `GET /posts/stream` pushes every committed change of the view as a
//! server-sent event, so a browser sees new posts, comments and moderation
//! results without polling.

use std::sync::Arc;

use axum::{
    Router,
    extract::{Query, State, rejection::QueryRejection},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response, sse},
    routing::get,
};
use blog_common::{
    ApiError, CommentStatus, DomainEvent, Event, Node, Service,
    config::{CommonConfig, ConfigError},
    events::CommentData,
    inbox::{Applied, Handler},
    node::BoxError,
    server::{self, Shutdown},
};
use rusqlite::{Connection, OptionalExtension};
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::sync::broadcast;

pub mod view;

use view::{Change, MAX_PAGE, Snapshot, View};

pub const MIGRATIONS: &[&str] = &["
    CREATE TABLE post (pos INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, title TEXT NOT NULL);
    CREATE TABLE comment (
        pos INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        post_id TEXT NOT NULL,
        content TEXT NOT NULL,
        status TEXT NOT NULL
    );
    CREATE INDEX comment_by_post ON comment (post_id, pos);
"];

#[derive(Debug, Clone)]
pub struct Config {
    pub common: CommonConfig,
}

impl Config {
    pub fn from_env() -> Result<Self, ConfigError> {
        Ok(Self { common: CommonConfig::from_env(Service::Query)? })
    }
}

/// How many view changes a slow stream subscriber may fall behind before it
/// is told to reload.
const LIVE_BUFFER: usize = 1_024;
/// Posts per page when `before` comes without `limit`.
const DEFAULT_PAGE: usize = 20;

#[derive(Debug, Clone)]
pub struct AppState {
    view: Arc<View>,
    live: broadcast::Sender<Applied>,
    shutdown: Shutdown,
}

pub async fn run(listener: TcpListener, config: Config, shutdown: Shutdown) -> Result<(), BoxError> {
    let node = Node::open(Service::Query, &config.common, MIGRATIONS).await?;
    let metrics = node.metrics.clone();
    let view = Arc::new(node.store.read(move |conn| View::load(conn, &metrics)).await?);
    let live = broadcast::Sender::new(LIVE_BUFFER);
    let inbox = node.inbox(Projector { live: live.clone(), view: view.clone() });
    let app = app(AppState { view, live, shutdown: shutdown.clone() });
    node.run(listener, app, Some(inbox), shutdown).await
}

pub fn app(state: AppState) -> Router {
    Router::new().route("/posts", get(posts)).route("/posts/stream", get(stream)).with_state(state)
}

/// `GET /posts/stream`: each change as `event: <type>`, `id: <seq>`,
/// `data: <the event's data>`.
async fn stream(State(state): State<AppState>) -> Response {
    let updates = server::live_stream(state.live.subscribe(), state.shutdown.clone(), |applied: Applied| {
        let (kind, data) = match &applied.event {
            DomainEvent::PostCreated(post) => (applied.event.kind(), serde_json::to_string(post)),
            DomainEvent::CommentCreated(c) | DomainEvent::CommentUpdated(c) => (applied.event.kind(), serde_json::to_string(c)),
            _ => ("resync", Ok("{}".to_owned())),
        };
        let event = sse::Event::default().event(kind).data(data.unwrap_or_else(|_| "{}".to_owned()));
        match applied.seq {
            Some(seq) => event.id(seq.to_string()),
            None => event,
        }
    });
    (server::streaming_headers(), updates).into_response()
}

/// The query string of `GET /posts`; either parameter asks for a page.
#[derive(Debug, Deserialize)]
struct PageParams {
    limit: Option<String>,
    before: Option<String>,
}

impl PageParams {
    /// `(limit, before)` when a page is asked for.
    fn page(&self) -> Result<Option<(usize, Option<i64>)>, ApiError> {
        if self.limit.is_none() && self.before.is_none() {
            return Ok(None);
        }
        let limit = match &self.limit {
            None => DEFAULT_PAGE,
            Some(limit) => match limit.trim().parse::<u64>() {
                Ok(n) if n > 0 => usize::try_from(n).unwrap_or(MAX_PAGE).min(MAX_PAGE),
                _ => return Err(ApiError::bad_request(format!("`limit` must be a whole number from 1 to {MAX_PAGE}"))),
            },
        };
        let before = match &self.before {
            None => None,
            Some(cursor) => match cursor.trim().parse::<i64>() {
                Ok(pos) if pos > 0 => Some(pos),
                _ => return Err(ApiError::bad_request("`before` must be the `next` cursor of a previous page")),
            },
        };
        Ok(Some((limit, before)))
    }
}

/// `GET /posts`: the original's whole view from the shared snapshot, or with
/// `limit`/`before` one page, newest first.
async fn posts(
    State(state): State<AppState>,
    params: Result<Query<PageParams>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let Query(params) = params.map_err(|e| ApiError::bad_request(e.body_text()))?;
    if let Some((limit, before)) = params.page()? {
        let body = state.view.page(limit, before);
        return Ok(([(header::CONTENT_TYPE, "application/json"), (header::CACHE_CONTROL, "no-cache")], body).into_response());
    }
    Ok(full_view(&*state.view.snapshot().await, &headers))
}

/// The snapshot in the encoding the client prefers, or 304 when the client's
/// copy is current. Clients revalidate every time (`no-cache`).
fn full_view(snapshot: &Snapshot, request: &HeaderMap) -> Response {
    let gzip = accepts_gzip(request);
    let current = request
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|tag| snapshot.matches(tag));
    let mut response = if current {
        StatusCode::NOT_MODIFIED.into_response()
    } else if gzip {
        ([(header::CONTENT_ENCODING, "gzip")], snapshot.gzip()).into_response()
    } else {
        snapshot.json.clone().into_response()
    };
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    let etag = if gzip { &snapshot.gzip_etag } else { &snapshot.etag };
    if let Ok(etag) = HeaderValue::from_str(etag) {
        headers.insert(header::ETAG, etag);
    }
    response
}

/// Whether `Accept-Encoding` allows gzip (by name or by `*`, with q > 0).
fn accepts_gzip(request: &HeaderMap) -> bool {
    let mut any = false;
    for coding in request.get_all(header::ACCEPT_ENCODING).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(',')) {
        let mut parts = coding.split(';');
        let name = parts.next().unwrap_or_default().trim().to_ascii_lowercase();
        let q = parts
            .map(|p| p.trim().to_ascii_lowercase())
            .find_map(|p| p.strip_prefix("q=").map(|q| q.trim().parse::<f32>().unwrap_or(0.0)))
            .unwrap_or(1.0);
        match name.as_str() {
            "gzip" | "x-gzip" => return q > 0.0,
            "*" => any = q > 0.0,
            _ => {}
        }
    }
    any
}

/// Projects events into the database and, once committed, into the view in
/// memory; then announces each change to live streams.
struct Projector {
    live: broadcast::Sender<Applied>,
    view: Arc<View>,
}

impl Handler for Projector {
    fn handles(&self, event: &DomainEvent) -> bool {
        matches!(event, DomainEvent::PostCreated(_) | DomainEvent::CommentCreated(_) | DomainEvent::CommentUpdated(_))
    }

    fn apply(&self, conn: &Connection, _: &Event, event: &DomainEvent) -> rusqlite::Result<()> {
        match event {
            DomainEvent::PostCreated(post) => {
                let pos: Option<i64> = conn
                    .prepare_cached("INSERT OR IGNORE INTO post (id, title) VALUES (?1, ?2) RETURNING pos")?
                    .query_row([&post.id, &post.title], |row| row.get(0))
                    .optional()?;
                if let Some(pos) = pos {
                    self.view.stage_post(&post.id, pos);
                }
            }
            DomainEvent::CommentCreated(comment) => self.stage_comment(conn, comment, false)?,
            DomainEvent::CommentUpdated(comment) => self.stage_comment(conn, comment, true)?,
            _ => {}
        }
        Ok(())
    }

    fn committed(&self, events: &[Applied]) {
        self.view.commit(events.iter().filter_map(|applied| match &applied.event {
            DomainEvent::PostCreated(post) => Some(Change::Post(post)),
            DomainEvent::CommentCreated(comment) => Some(Change::Comment { comment, is_update: false }),
            DomainEvent::CommentUpdated(comment) => Some(Change::Comment { comment, is_update: true }),
            _ => None,
        }));
        if self.live.receiver_count() > 0 {
            for applied in events {
                let _ = self.live.send(applied.clone());
            }
        }
    }
}

impl Projector {
    fn stage_comment(&self, conn: &Connection, comment: &CommentData, is_update: bool) -> rusqlite::Result<()> {
        if let Some(pos) = upsert_comment(conn, comment, is_update)? {
            self.view.stage_comment(&comment.id, pos);
        }
        Ok(())
    }
}

/// Inserts the comment or updates it; only an update carries a status that
/// may replace the stored one, and never with `pending`. Returns the comment's
/// position when the statement touched it.
fn upsert_comment(conn: &Connection, comment: &CommentData, is_update: bool) -> rusqlite::Result<Option<i64>> {
    let sql = if is_update && comment.status != CommentStatus::Pending {
        "INSERT INTO comment (id, post_id, content, status) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (id) DO UPDATE SET status = excluded.status, content = excluded.content RETURNING pos"
    } else {
        "INSERT INTO comment (id, post_id, content, status) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (id) DO NOTHING RETURNING pos"
    };
    conn.prepare_cached(sql)?
        .query_row([&comment.id, &comment.post_id, &comment.content, comment.status.as_str()], |row| row.get(0))
        .optional()
}

#[cfg(test)]
mod tests {
    use blog_common::{Store, inbox::Inbox, metrics::Registry, store::StoreError};
    use serde_json::json;

    use super::*;

    /// The view's JSON text after applying `events` one delivery at a time,
    /// as served from memory; checks that a restart (loading the view from
    /// the database) serves the very same bytes.
    async fn view_after(events: Vec<serde_json::Value>) -> String {
        let (_dir, state, store) = state().await;
        let inbox = Inbox::new(store.clone(), Projector { live: state.live.clone(), view: state.view.clone() }, None, &Registry::default());
        for event in events {
            inbox.deliver(vec![Event::from_value(event).unwrap()]).await.unwrap();
        }
        let served = state.view.snapshot().await.json.clone();
        let reloaded = store.read(|c| View::load(c, &Registry::default())).await.unwrap().snapshot().await.json.clone();
        assert_eq!(served, reloaded, "memory and database disagree");
        String::from_utf8(served.to_vec()).unwrap()
    }

    async fn state() -> (tempfile::TempDir, AppState, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), "query", MIGRATIONS).unwrap();
        store.write(|c| c.execute_batch(blog_common::inbox::SCHEMA).map_err(StoreError::from)).await.unwrap();
        let view = Arc::new(store.read(|c| View::load(c, &Registry::default())).await.unwrap());
        let shutdown = Shutdown::new(std::future::pending());
        (dir, AppState { view, live: broadcast::Sender::new(8), shutdown }, store)
    }

    fn comment(kind: &str, status: &str) -> serde_json::Value {
        json!({"type": kind, "data": {"id":"c1","content":"hi","postId":"p1","status":status}})
    }

    #[tokio::test]
    async fn an_update_before_its_creation_is_not_lost() {
        let post = json!({"type":"PostCreated","data":{"id":"p1","title":"T"}});
        let view = view_after(vec![comment("CommentUpdated", "approved"), comment("CommentCreated", "pending"), post]).await;
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&view).unwrap(),
            json!({"p1":{"id":"p1","title":"T","comments":[{"id":"c1","content":"hi","status":"approved"}]}})
        );
    }

    #[tokio::test]
    async fn posts_keep_creation_order() {
        let view = view_after(vec![
            json!({"type":"PostCreated","data":{"id":"b","title":"first"}}),
            json!({"type":"PostCreated","data":{"id":"a","title":"second"}}),
        ])
        .await;
        assert_eq!(view, r#"{"b":{"id":"b","title":"first","comments":[]},"a":{"id":"a","title":"second","comments":[]}}"#);
    }

    async fn get(state: &AppState, uri: &str, headers: &[(&str, &str)]) -> (StatusCode, HeaderMap, Vec<u8>) {
        use http_body_util::BodyExt;
        use tower::ServiceExt;
        let mut request = axum::http::Request::get(uri);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = app(state.clone()).oneshot(request.body(axum::body::Body::empty()).unwrap()).await.unwrap();
        let (parts, body) = response.into_parts();
        (parts.status, parts.headers, body.collect().await.unwrap().to_bytes().to_vec())
    }

    async fn with_posts(count: usize) -> (tempfile::TempDir, AppState, Inbox) {
        let (dir, state, store) = state().await;
        let inbox = Inbox::new(store, Projector { live: state.live.clone(), view: state.view.clone() }, None, &Registry::default());
        let events = (1..=count)
            .map(|i| Event::from_value(json!({"type":"PostCreated","data":{"id":format!("p{i}"),"title":format!("t{i}")}})).unwrap())
            .collect();
        inbox.deliver(events).await.unwrap();
        (dir, state, inbox)
    }

    #[tokio::test]
    async fn the_full_view_is_revalidated_by_etag_and_gzipped_on_request() {
        let (_dir, state, inbox) = with_posts(3).await;
        let (status, headers, plain) = get(&state, "/posts", &[]).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers[header::VARY], "accept-encoding");
        assert_eq!(headers[header::CONTENT_TYPE], "application/json");
        assert!(headers.get(header::CONTENT_ENCODING).is_none());
        let keys: Vec<String> =
            serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(&plain).unwrap().keys().cloned().collect();
        assert_eq!(keys, ["p1", "p2", "p3"]);
        let etag = headers[header::ETAG].to_str().unwrap().to_owned();
        assert!(etag.starts_with('"') && etag.ends_with('"'), "a strong tag: {etag}");

        let (status, gz_headers, gzipped) = get(&state, "/posts", &[("accept-encoding", "br;q=1, gzip;q=0.5")]).await;
        assert_eq!((status, &gz_headers[header::CONTENT_ENCODING]), (StatusCode::OK, &HeaderValue::from_static("gzip")));
        assert_ne!(gz_headers[header::ETAG], etag, "each representation has its own tag");
        let mut unzipped = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&gzipped[..]), &mut unzipped).unwrap();
        assert_eq!(unzipped, plain);
        let (_, refused, _) = get(&state, "/posts", &[("accept-encoding", "gzip;q=0, *")]).await;
        assert!(refused.get(header::CONTENT_ENCODING).is_none(), "gzip;q=0 refuses gzip");

        for tag in [etag.clone(), format!("W/{etag}"), format!("\"x\", {etag}"), "*".to_owned()] {
            let (status, headers, body) = get(&state, "/posts", &[("if-none-match", &tag)]).await;
            assert_eq!(
                (status, body.len(), &headers[header::ETAG]),
                (StatusCode::NOT_MODIFIED, 0, &HeaderValue::from_str(&etag).unwrap()),
                "{tag}"
            );
        }
        let gz_etag = gz_headers[header::ETAG].to_str().unwrap();
        let (status, _, _) = get(&state, "/posts", &[("if-none-match", gz_etag), ("accept-encoding", "gzip")]).await;
        assert_eq!(status, StatusCode::NOT_MODIFIED);

        // A change makes every earlier tag stale.
        inbox.deliver(vec![Event::from_value(json!({"type":"PostCreated","data":{"id":"p4","title":"t4"}})).unwrap()]).await.unwrap();
        let (status, headers, body) = get(&state, "/posts", &[("if-none-match", &etag)]).await;
        assert_eq!(status, StatusCode::OK);
        assert_ne!(headers[header::ETAG], etag);
        assert!(body.ends_with(br#""p4":{"id":"p4","title":"t4","comments":[]}}"#));
    }

    #[tokio::test]
    async fn pages_are_bounded_and_bad_parameters_get_a_json_400() {
        let (_dir, state, _) = with_posts(150).await;
        let page = |body: Vec<u8>| serde_json::from_slice::<serde_json::Value>(&body).unwrap();
        let (status, _, body) = get(&state, "/posts?limit=1000", &[]).await;
        let first = page(body);
        assert_eq!((status, first["posts"].as_array().unwrap().len()), (StatusCode::OK, MAX_PAGE));
        assert_eq!(first["posts"][0], json!({"id":"p150","title":"t150","comments":[]}));
        let next = first["next"].as_str().unwrap().to_owned();
        let (_, _, body) = get(&state, &format!("/posts?limit=100&before={next}"), &[]).await;
        let second = page(body);
        assert_eq!((second["posts"].as_array().unwrap().len(), &second["next"]), (50, &serde_json::Value::Null));
        assert_eq!(second["posts"][0]["id"], "p50");
        let (_, _, body) = get(&state, "/posts?before=3", &[]).await;
        assert_eq!(page(body)["posts"].as_array().unwrap().iter().map(|p| p["id"].clone()).collect::<Vec<_>>(), [json!("p2"), json!("p1")]);
        // Unknown parameters (cache busters) keep the original's full view.
        let (_, _, body) = get(&state, "/posts?_=123", &[]).await;
        assert_eq!(serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(&body).unwrap().len(), 150);

        for bad in
            ["limit=0", "limit=-1", "limit=ten", "limit=", "before=abc", "before=0", "limit=5&limit=6", "before=99999999999999999999"]
        {
            let (status, headers, body) = get(&state, &format!("/posts?{bad}"), &[]).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
            assert_eq!(headers[header::CONTENT_TYPE], "application/json", "{bad}");
            assert!(page(body)["error"].is_string(), "{bad}");
        }
    }
}
