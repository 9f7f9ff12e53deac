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
//! Posts and each post's comments are ordered by the bus sequence number of
//! their creating event ([`order_key`]), not by when query received it: the
//! kit's relay publishes each writer's events in commit order, so the log's order is
//! the writer's creation order, and a view rebuilt from the bus while new
//! events are pushed ahead of the catch-up comes out in the same order as one
//! built live.
//!
//! `GET /posts/stream` pushes every committed change of the view as a
//! server-sent event, so a browser sees new posts, comments and moderation
//! results without polling.

use std::sync::Arc;

use axum::{
    Router,
    extract::State,
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use blog_domain::{CommentData, CommentStatus, DomainEvent, Event, PostCreated, Service, config::ConfigError};
use blog_kit::{
    ApiError, Applied, BoxError, Consumer, Kit, Outcome, ServiceKit, Shutdown, StoreError, Tx,
    config::CommonConfig,
    http::{Query, sse},
};
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::sync::broadcast;

pub mod view;

use view::{Change, MAX_PAGE, Snapshot, View};

pub const MIGRATIONS: &[&str] = &[
    "
    CREATE TABLE post (pos INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, title TEXT NOT NULL);
    CREATE TABLE comment (
        pos INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        post_id TEXT NOT NULL,
        content TEXT NOT NULL,
        status TEXT NOT NULL
    );
    CREATE INDEX comment_by_post ON comment (post_id, pos);
",
    "
    -- The order key (see `order_key`; 4611686018427387904 is UNSEQUENCED). Rows from before it keep the order
    -- they had (arrival), ahead of every newer one: their creating events'
    -- sequence numbers were not kept. Deleting query.db rebuilds them in the
    -- log's order.
    ALTER TABLE post ADD COLUMN ord INTEGER NOT NULL DEFAULT 0;
    UPDATE post SET ord = pos - 4611686018427387904;
    CREATE UNIQUE INDEX post_by_ord ON post (ord);
    ALTER TABLE comment ADD COLUMN ord INTEGER NOT NULL DEFAULT 0;
    UPDATE comment SET ord = pos - 4611686018427387904;
    CREATE UNIQUE INDEX comment_by_ord ON comment (ord);
",
];

/// Where the order keys of events without a bus sequence number start; the
/// migration puts rows that predate the keys below `-UNSEQUENCED`.
const UNSEQUENCED: i64 = 1 << 62;

/// The SQL expression of a new row's order key in `table`, given the creating
/// (or first-seen updating) event's sequence number as `$1` (NULL when it
/// has none) and [`UNSEQUENCED`] as `$2`. A sequenced event takes its sequence number, so the order is the
/// log's whatever the delivery order; an event without one (an operator
/// posting the original's shape straight to `/events`) or one whose number is
/// already taken (only a hand-made event can repeat one) takes the next key
/// above [`UNSEQUENCED`]: after every sequenced item, in arrival order, and
/// never the same key as another row.
fn order_key(table: &str) -> String {
    format!(
        "CASE WHEN $1 IS NOT NULL AND NOT EXISTS (SELECT 1 FROM {table} WHERE ord = $1) THEN $1
              ELSE (SELECT coalesce(max(ord), $2) + 1 FROM {table} WHERE ord > $2) END"
    )
}

/// `event`'s sequence number as an order key, when it fits below the keys of
/// unsequenced events.
fn sequenced(event: &Event) -> Option<i64> {
    event.seq.and_then(|seq| i64::try_from(seq).ok()).filter(|seq| *seq < UNSEQUENCED)
}

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

impl AppState {
    /// The state over `kit`, with the view its database holds.
    pub async fn load(kit: &Kit, shutdown: Shutdown) -> Result<Self, StoreError> {
        let metrics = kit.metrics().clone();
        let view = Arc::new(kit.read(move |tx| View::load(tx, &metrics)).await?);
        Ok(Self { view, live: broadcast::Sender::new(LIVE_BUFFER), shutdown })
    }

    /// The consumer that projects events into this state's view.
    pub fn consumer(&self) -> impl Consumer + use<> {
        Projector { live: self.live.clone(), view: self.view.clone() }
    }
}

/// How this service's kit is opened.
pub fn kit() -> ServiceKit {
    ServiceKit::new(Service::Query).migrations(MIGRATIONS)
}

pub async fn run(listener: TcpListener, config: Config, shutdown: Shutdown) -> Result<(), BoxError> {
    let kit = kit().open(&config.common).await?;
    let state = AppState::load(&kit, shutdown.clone()).await?;
    let consumer = state.consumer();
    kit.serve(app(state)).consumer(consumer).run(listener, shutdown).await
}

pub fn app(state: AppState) -> Router {
    Router::new().route("/posts", get(posts)).route("/posts/stream", get(stream)).with_state(state)
}

/// `GET /posts/stream`: each change as `event: <type>`, `id: <seq>`,
/// `data: <the event's data>`.
async fn stream(State(state): State<AppState>) -> Response {
    let updates = sse::live_stream(state.live.subscribe(), state.shutdown.clone(), |applied: Applied| {
        let (kind, data) = match &applied.event {
            DomainEvent::PostCreated(post) => (applied.event.kind(), serde_json::to_string(post)),
            DomainEvent::CommentCreated(c) | DomainEvent::CommentUpdated(c) => (applied.event.kind(), serde_json::to_string(c)),
            _ => (blog_domain::EventKind::Unknown("resync".to_owned()), Ok("{}".to_owned())),
        };
        let event = axum::response::sse::Event::default().event(kind.as_str()).data(data.unwrap_or_else(|_| "{}".to_owned()));
        match applied.seq {
            Some(seq) => event.id(seq.to_string()),
            None => event,
        }
    });
    (sse::streaming_headers(), updates).into_response()
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
            // A post's order key; keys of posts from before the keys are negative.
            Some(cursor) => match cursor.trim().parse::<i64>() {
                Ok(ord) => Some(ord),
                Err(_) => return Err(ApiError::bad_request("`before` must be the `next` cursor of a previous page")),
            },
        };
        Ok(Some((limit, before)))
    }
}

/// `GET /posts`: the original's whole view from the shared snapshot, or with
/// `limit`/`before` one page, newest first.
async fn posts(State(state): State<AppState>, Query(params): Query<PageParams>, headers: HeaderMap) -> Result<Response, ApiError> {
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

impl Consumer for Projector {
    fn apply(&self, tx: &mut Tx<'_>, envelope: &Event, event: &DomainEvent) -> Result<Outcome, StoreError> {
        let seq = sequenced(envelope);
        match event {
            DomainEvent::PostCreated(post) => {
                let ord = upsert_post(tx, post, seq)?;
                self.view.note_post(&post.id, ord);
            }
            DomainEvent::CommentCreated(comment) => {
                let ord = upsert_comment(tx, comment, false, seq)?;
                self.view.note_comment(&comment.id, ord);
            }
            DomainEvent::CommentUpdated(comment) => {
                let ord = upsert_comment(tx, comment, true, seq)?;
                self.view.note_comment(&comment.id, ord);
            }
            _ => return Ok(Outcome::Ignored),
        }
        Ok(Outcome::Handled)
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

/// Inserts the post once; a repeat keeps the title and moves the post only
/// to an earlier key. Returns the post's order key.
fn upsert_post(tx: &Tx<'_>, post: &PostCreated, seq: Option<i64>) -> Result<i64, StoreError> {
    let sql = format!(
        "INSERT INTO post (id, title, ord) VALUES ($3, $4, {})
         ON CONFLICT (id) DO UPDATE SET ord = min(ord, excluded.ord) RETURNING ord",
        order_key("post")
    );
    tx.query_row(&sql, &[&seq, &UNSEQUENCED, &post.id, &post.title], |row| row.get(0))
}

/// Inserts the comment or updates it; only an update carries a status that
/// may replace the stored one, and never with `pending`. Whichever of its
/// events comes first creates it; a later one with a lower sequence number
/// (its `CommentCreated`, after an update overtook it) moves it there.
/// Returns the comment's order key.
fn upsert_comment(tx: &Tx<'_>, comment: &CommentData, is_update: bool, seq: Option<i64>) -> Result<i64, StoreError> {
    let replace =
        if is_update && comment.status != CommentStatus::Pending { ", status = excluded.status, content = excluded.content" } else { "" };
    let sql = format!(
        "INSERT INTO comment (id, post_id, content, status, ord) VALUES ($3, $4, $5, $6, {})
         ON CONFLICT (id) DO UPDATE SET ord = min(ord, excluded.ord){replace} RETURNING ord",
        order_key("comment")
    );
    tx.query_row(&sql, &[&seq, &UNSEQUENCED, &comment.id, &comment.post_id, &comment.content, &comment.status.as_str()], |row| row.get(0))
}

#[cfg(test)]
mod tests {
    use blog_kit::{
        config::CommonConfig,
        internal::InternalSecret,
        messaging::inbox::Inbox,
        metrics::Registry,
        store::Store,
        testing::{TEST_SECRET, TestKit},
    };
    use serde_json::json;

    use super::*;

    /// The view's JSON text after applying `events` one delivery at a time,
    /// as served from memory; checks that a restart (loading the view from
    /// the database) serves the very same bytes.
    async fn view_after(events: Vec<serde_json::Value>) -> String {
        let (test, state) = state().await;
        let inbox = test.kit.inbox(state.consumer());
        for event in events {
            inbox.deliver(vec![Event::from_value(event).unwrap()]).await.unwrap();
        }
        let served = state.view.snapshot().await.json.clone();
        let reloaded = test.kit.read(|tx| View::load(tx, &Registry::default())).await.unwrap().snapshot().await.json.clone();
        assert_eq!(served, reloaded, "memory and database disagree");
        String::from_utf8(served.to_vec()).unwrap()
    }

    async fn state() -> (TestKit, AppState) {
        let test = kit().for_test().await.unwrap();
        let state = AppState::load(&test.kit, test.shutdown.clone()).await.unwrap();
        (test, state)
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

    /// A log as the bus numbers it: posts and comments interleaved, updates
    /// after their creations, a post whose comments come later.
    fn log() -> Vec<serde_json::Value> {
        let post = |id: &str| json!({"type":"PostCreated","data":{"id":id,"title":format!("title {id}")}});
        let comment = |kind: &str, id: &str, post: &str, status: &str| json!({"type":kind,"data":{"id":id,"content":format!("text {id}"),"postId":post,"status":status}});
        let events = vec![
            post("p1"),
            post("p2"),
            comment("CommentCreated", "c1", "p1", "pending"),
            comment("CommentCreated", "c2", "p2", "pending"),
            comment("CommentCreated", "c3", "p1", "pending"),
            comment("CommentUpdated", "c3", "p1", "approved"),
            comment("CommentUpdated", "c1", "p1", "rejected"),
            post("p3"),
            comment("CommentCreated", "c4", "p3", "pending"),
            comment("CommentCreated", "c5", "p1", "pending"),
            comment("CommentUpdated", "c5", "p1", "approved"),
            comment("CommentUpdated", "c2", "p2", "rejected"),
        ];
        events
            .into_iter()
            .enumerate()
            .map(|(i, mut event)| {
                event["seq"] = json!(i + 1);
                event["id"] = json!(format!("e{}", i + 1));
                event
            })
            .collect()
    }

    /// `log()` in the order of the seqs, as the original would serve it.
    const IN_LOG_ORDER: &str = r#"{"p1":{"id":"p1","title":"title p1","comments":[{"id":"c1","content":"text c1","status":"rejected"},{"id":"c3","content":"text c3","status":"approved"},{"id":"c5","content":"text c5","status":"approved"}]},"p2":{"id":"p2","title":"title p2","comments":[{"id":"c2","content":"text c2","status":"rejected"}]},"p3":{"id":"p3","title":"title p3","comments":[{"id":"c4","content":"text c4","status":"pending"}]}}"#;

    /// Deterministic shuffles (a fixed-seed linear congruential generator).
    fn shuffled<T: Clone>(items: &[T], seed: u64) -> Vec<T> {
        let mut items = items.to_vec();
        let mut state = seed;
        for i in (1..items.len()).rev() {
            state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            items.swap(i, usize::try_from(state >> 33).unwrap() % (i + 1));
        }
        items
    }

    #[tokio::test]
    async fn any_delivery_order_gives_the_order_of_the_seqs() {
        let log = log();
        assert_eq!(view_after(log.clone()).await, IN_LOG_ORDER, "delivered in order");
        let mut reversed = log.clone();
        reversed.reverse();
        assert_eq!(view_after(reversed).await, IN_LOG_ORDER, "later seqs, updates and comments first");
        // A rebuild: newer events pushed first, then the older ones caught up.
        let (old, new) = log.split_at(5);
        assert_eq!(view_after([new, old].concat()).await, IN_LOG_ORDER, "pushes ahead of the catch-up");
        for seed in 1..=40 {
            assert_eq!(view_after(shuffled(&log, seed)).await, IN_LOG_ORDER, "shuffle {seed}");
        }
    }

    #[tokio::test]
    async fn events_without_a_seq_come_after_every_sequenced_item_in_arrival_order() {
        let unsequenced = |id: &str, event: serde_json::Value| {
            let mut event = event;
            event["id"] = json!(id);
            event
        };
        let post = |id: &str| json!({"type":"PostCreated","data":{"id":id,"title":id}});
        let comment = |id: &str| json!({"type":"CommentCreated","data":{"id":id,"content":id,"postId":"s2","status":"pending"}});
        let view = view_after(vec![
            unsequenced("u1", post("u1")),
            json!({"id":"e9","seq":9,"type":"PostCreated","data":{"id":"s9","title":"s9"}}),
            unsequenced("u2", comment("uc1")),
            unsequenced("u0", post("u0")),
            json!({"id":"e4","seq":4,"type":"CommentCreated","data":{"id":"sc4","content":"sc4","postId":"s2","status":"pending"}}),
            // A hand-made event repeating a seq takes no one's place.
            json!({"id":"x","seq":9,"type":"PostCreated","data":{"id":"dup","title":"dup"}}),
            json!({"id":"e2","seq":2,"type":"PostCreated","data":{"id":"s2","title":"s2"}}),
            // A seq beyond the sequenced keys is treated as none.
            json!({"id":"big","seq":u64::MAX,"type":"PostCreated","data":{"id":"big","title":"big"}}),
        ])
        .await;
        let post = |id: &str| format!(r#""{id}":{{"id":"{id}","title":"{id}","comments":[]}}"#);
        let comments = r#"[{"id":"sc4","content":"sc4","status":"pending"},{"id":"uc1","content":"uc1","status":"pending"}]"#;
        let expected = format!(
            r#"{{"s2":{{"id":"s2","title":"s2","comments":{comments}}},{}}}"#,
            ["s9", "u1", "u0", "dup", "big"].map(post).join(",")
        );
        assert_eq!(view, expected);
    }

    #[tokio::test]
    async fn a_database_from_before_the_order_keys_keeps_its_order_ahead_of_new_items() {
        let dir = tempfile::tempdir().unwrap();
        let legacy = Store::open(dir.path(), "query", &MIGRATIONS[..1]).unwrap();
        legacy
            .write(|tx| {
                tx.execute_batch(
                    // Positions among the seqs to come: the new items must still come after.
                    "INSERT INTO post (pos, id, title) VALUES (5, 'old2', 'old2'), (9, 'old1', 'old1');
                     INSERT INTO comment (pos, id, post_id, content, status) VALUES (4, 'oc', 'old1', 'oc', 'pending');",
                )
            })
            .await
            .unwrap();
        drop(legacy);
        let config = CommonConfig {
            port: 0,
            data_dir: dir.path().to_owned(),
            bus_url: blog_domain::config::parse_base_url("EVENT_BUS_URL", "http://127.0.0.1:9").unwrap(),
            internal_secret: InternalSecret::parse(TEST_SECRET).unwrap(),
            db_max_bytes: None,
        };
        let kit = kit().open(&config).await.unwrap();
        let state = AppState::load(&kit, Shutdown::new(std::future::pending())).await.unwrap();
        let view = state.view.clone();
        let inbox = kit.inbox(state.consumer());
        for event in [
            json!({"id":"e7","seq":7,"type":"PostCreated","data":{"id":"new","title":"new"}}),
            json!({"id":"e2","seq":2,"type":"CommentCreated","data":{"id":"nc","content":"nc","postId":"old1","status":"pending"}}),
            json!({"id":"e3","seq":3,"type":"CommentUpdated","data":{"id":"oc","content":"oc","postId":"old1","status":"approved"}}),
        ] {
            inbox.deliver(vec![Event::from_value(event).unwrap()]).await.unwrap();
        }
        let served = view.snapshot().await.json.clone();
        let reloaded = kit.read(|tx| View::load(tx, &Registry::default())).await.unwrap().snapshot().await.json.clone();
        assert_eq!(served, reloaded, "memory and database disagree");
        assert_eq!(
            std::str::from_utf8(&served).unwrap(),
            r#"{"old2":{"id":"old2","title":"old2","comments":[]},"old1":{"id":"old1","title":"old1","comments":[{"id":"oc","content":"oc","status":"approved"},{"id":"nc","content":"nc","status":"pending"}]},"new":{"id":"new","title":"new","comments":[]}}"#
        );
        let page: serde_json::Value = serde_json::from_slice(&view.page(1, None)).unwrap();
        let (_, _, body) = get(
            &AppState { view, live: broadcast::Sender::new(8), shutdown: Shutdown::new(std::future::pending()) },
            &format!("/posts?limit=5&before={}", page["next"].as_str().unwrap()),
            &[],
        )
        .await;
        let older: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(older["posts"].as_array().unwrap().iter().map(|p| p["id"].clone()).collect::<Vec<_>>(), [json!("old1"), json!("old2")]);
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

    async fn with_posts(count: usize) -> (TestKit, AppState, Inbox) {
        let (test, state) = state().await;
        let inbox = test.kit.inbox(state.consumer());
        let events = (1..=count)
            .map(|i| {
                let event =
                    json!({"id":format!("e{i}"),"seq":i,"type":"PostCreated","data":{"id":format!("p{i}"),"title":format!("t{i}")}});
                Event::from_value(event).unwrap()
            })
            .collect();
        inbox.deliver(events).await.unwrap();
        (test, state, inbox)
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
    async fn the_whole_service_answers_wrong_methods_and_stray_events_in_json() {
        let (test, state) = state().await;
        let consumer = state.consumer();
        let app = test.app(test.kit.serve(app(state.clone())).consumer(consumer));
        let call = |request: axum::http::Request<axum::body::Body>| {
            let app = app.clone();
            async move {
                use tower::ServiceExt;
                let response = app.oneshot(request).await.unwrap();
                let status = response.status();
                let body = axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap();
                (status, serde_json::from_slice::<serde_json::Value>(&body).unwrap_or_default())
            }
        };
        let (status, body) = call(axum::http::Request::delete("/posts").body(axum::body::Body::empty()).unwrap()).await;
        assert_eq!((status, body["error"].is_string()), (StatusCode::METHOD_NOT_ALLOWED, true), "{body}");
        let events = |body: &str| {
            axum::http::Request::post("/events")
                .header("content-type", "application/json")
                .header("authorization", test.bearer())
                .body(axum::body::Body::from(body.to_owned()))
                .unwrap()
        };
        let (status, report) = call(events(r#"{"id":"e1","seq":1,"type":"PostCreated","data":{"id":"p1","title":"t"}}"#)).await;
        assert_eq!((status, report["applied"].as_u64()), (StatusCode::OK, Some(1)), "{report}");
        let (status, report) = call(events(
            r#"{"id":"e2","seq":2,"type":"CommentModerated","data":{"id":"c","content":"x","postId":"p1","status":"approved"}}"#,
        ))
        .await;
        assert_eq!((status, report["ignored"].as_u64()), (StatusCode::OK, Some(1)), "query keeps no decisions: {report}");
        let (status, _) = call(events(r#"{"type":"CommentUpdated","data":{"id":"c","content":"x","postId":"p1","status":"maybe"}}"#)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(state.view.snapshot().await.json.as_ref(), br#"{"p1":{"id":"p1","title":"t","comments":[]}}"#);
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
            ["limit=0", "limit=-1", "limit=ten", "limit=", "before=abc", "before=1.5", "limit=5&limit=6", "before=99999999999999999999"]
        {
            let (status, headers, body) = get(&state, &format!("/posts?{bad}"), &[]).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
            assert_eq!(headers[header::CONTENT_TYPE], "application/json", "{bad}");
            assert!(page(body)["error"].is_string(), "{bad}");
        }
    }
}
