//! comments: writes comments and keeps their moderation state.
//!
//! It learns which posts exist from `PostCreated` rather than asking posts, so
//! it keeps working while posts is down. A comment on a post created a moment
//! ago may arrive before that event does, so a comment on an unknown post id
//! gets a short bounded wait for it before the 404 ([`known_posts`]: in
//! memory, capped, waking only that post's waiters); a read never waits. The
//! single database writer only inserts the comment and stages its event; the
//! answer's comment list is read afterwards on the read path. A
//! `CommentModerated` decision is stored and re-published as `CommentUpdated`
//! in the same transaction, once.

pub mod known_posts;

use std::time::Duration;

use axum::{
    Router,
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::get,
};
use blog_common::{
    ApiError, CommentStatus, DomainEvent, Event, Json, Node, Service,
    config::{self, CommonConfig, ConfigError},
    error::{self, required_text},
    events::CommentData,
    inbox::{Applied, Handler},
    node::BoxError,
    outbox::{self, Outbox},
    server::{RequestId, Shutdown},
    store::{Store, StoreError},
};
use known_posts::{KnownPosts, WaitError};
use rusqlite::{Connection, OptionalExtension};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

/// Longest comment accepted, in characters.
pub const MAX_CONTENT: usize = 2_000;
const MAX_ID: usize = 128;
/// Longest `POST_WAIT_MS` may ask for.
pub const MAX_POST_WAIT: Duration = Duration::from_secs(60);
/// Most comment requests waiting for their post at once; more get a 503.
pub const MAX_POST_WAITERS: usize = 1024;

pub const MIGRATIONS: &[&str] = &["
    CREATE TABLE post (id TEXT PRIMARY KEY) WITHOUT ROWID;
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
    /// How long a comment on an unknown post waits for its `PostCreated`.
    pub post_wait: Duration,
}

impl Config {
    pub fn from_env() -> Result<Self, ConfigError> {
        Ok(Self { common: CommonConfig::from_env(Service::Comments)?, post_wait: post_wait(config::var("POST_WAIT_MS", 2_000)?)? })
    }
}

/// `POST_WAIT_MS` as a duration, at most [`MAX_POST_WAIT`] (a larger value
/// would overflow the deadline arithmetic, and holds requests for nothing).
pub fn post_wait(millis: u64) -> Result<Duration, ConfigError> {
    let wait = Duration::from_millis(millis);
    if wait > MAX_POST_WAIT {
        return Err(ConfigError {
            name: "POST_WAIT_MS".into(),
            value: millis.to_string(),
            reason: format!("at most {} ms", MAX_POST_WAIT.as_millis()),
        });
    }
    Ok(wait)
}

#[derive(Debug, Clone)]
pub struct AppState {
    store: Store,
    outbox: Outbox,
    known: KnownPosts,
    post_wait: Duration,
}

pub async fn run(listener: TcpListener, config: Config, shutdown: Shutdown) -> Result<(), BoxError> {
    let node = Node::open(Service::Comments, &config.common, MIGRATIONS).await?;
    let ids = node
        .store
        .read(|conn| {
            let mut stmt = conn.prepare("SELECT id FROM post")?;
            let ids = stmt.query_map([], |row| row.get::<_, String>(0))?.collect::<Result<Vec<_>, _>>()?;
            Ok::<_, StoreError>(ids)
        })
        .await?;
    let known = KnownPosts::new(ids, MAX_POST_WAITERS);
    let inbox = node.inbox(Consumer { known: known.clone() });
    let state = AppState { store: node.store.clone(), outbox: node.outbox.clone(), known, post_wait: config.post_wait };
    node.run(listener, app(state), Some(inbox), shutdown).await
}

pub fn app(state: AppState) -> Router {
    Router::new().route("/posts/{id}/comments", get(list).post(create)).with_state(state)
}

/// A comment's text: trimmed, not empty, at most [`MAX_CONTENT`] characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommentContent(String);

impl CommentContent {
    pub fn parse(raw: &str) -> Result<Self, ApiError> {
        required_text("content", raw, MAX_CONTENT).map(CommentContent)
    }
}

/// A comment as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Comment {
    pub id: String,
    pub content: String,
    pub status: CommentStatus,
}

#[derive(Deserialize)]
struct CreateComment {
    content: String,
}

async fn create(
    State(state): State<AppState>,
    error::Path(post_id): error::Path<String>,
    request_id: RequestId,
    Json(body): Json<CreateComment>,
) -> Result<(StatusCode, Json<Vec<Comment>>), Response> {
    let content = CommentContent::parse(&body.content).map_err(IntoResponse::into_response)?;
    checked_post_id(&post_id).map_err(IntoResponse::into_response)?;
    match state.known.wait_for(&post_id, state.post_wait).await {
        Ok(()) => {}
        Err(WaitError::Unknown) => return Err(post_not_found(&post_id).into_response()),
        Err(WaitError::Busy) => return Err(error::retry_later("too many comments are waiting for their post, try again", 1)),
    }
    let comment = CommentData {
        id: uuid::Uuid::now_v7().simple().to_string(),
        content: content.0,
        post_id: post_id.clone(),
        status: CommentStatus::Pending,
    };
    let event = Event::new(&DomainEvent::CommentCreated(comment.clone()), request_id.0);
    // Only the write runs on the single writer; the list is read after the
    // durable commit, on the read path, and so includes the new comment.
    state
        .store
        .write(move |conn| {
            conn.execute(
                "INSERT INTO comment (id, post_id, content, status) VALUES (?1, ?2, ?3, ?4)",
                [&comment.id, &comment.post_id, &comment.content, comment.status.as_str()],
            )?;
            outbox::stage(conn, &event)?;
            Ok::<_, StoreError>(())
        })
        .await
        .map_err(|e| ApiError::from(e).into_response())?;
    state.outbox.wake();
    let comments = state.store.read(move |conn| comments_of(conn, &post_id)).await.map_err(|e| ApiError::from(e).into_response())?;
    Ok((StatusCode::CREATED, Json(comments)))
}

/// A read never waits: an unknown post is a 404 at once.
async fn list(State(state): State<AppState>, error::Path(post_id): error::Path<String>) -> Result<Json<Vec<Comment>>, ApiError> {
    checked_post_id(&post_id)?;
    if !state.known.contains(&post_id) {
        return Err(post_not_found(&post_id));
    }
    let comments = state.store.read(move |conn| comments_of(conn, &post_id)).await?;
    Ok(Json(comments))
}

/// A post id from a path: control characters are refused (they would reach
/// text logs raw), and an id no event can carry is no post.
fn checked_post_id(post_id: &str) -> Result<(), ApiError> {
    if post_id.chars().any(char::is_control) {
        return Err(ApiError::bad_request("a post id must not contain control characters"));
    }
    if post_id.is_empty() || post_id.len() > MAX_ID {
        return Err(post_not_found(post_id));
    }
    Ok(())
}

fn post_not_found(post_id: &str) -> ApiError {
    ApiError::not_found(format!("post {post_id:?} not found"))
}

fn comments_of(conn: &Connection, post_id: &str) -> Result<Vec<Comment>, StoreError> {
    let mut stmt = conn.prepare_cached("SELECT id, content, status FROM comment WHERE post_id = ?1 ORDER BY pos")?;
    let rows = stmt.query_map([post_id], |row| {
        let status: String = row.get(2)?;
        Ok(Comment { id: row.get(0)?, content: row.get(1)?, status: CommentStatus::parse(&status).unwrap_or(CommentStatus::Pending) })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Applies `PostCreated` and `CommentModerated`.
struct Consumer {
    known: KnownPosts,
}

impl Handler for Consumer {
    fn handles(&self, event: &DomainEvent) -> bool {
        matches!(event, DomainEvent::PostCreated(_) | DomainEvent::CommentModerated(_))
    }

    fn apply(&self, conn: &Connection, envelope: &Event, event: &DomainEvent) -> rusqlite::Result<()> {
        match event {
            DomainEvent::PostCreated(post) => {
                conn.prepare_cached("INSERT OR IGNORE INTO post (id) VALUES (?1)")?.execute([&post.id])?;
            }
            DomainEvent::CommentModerated(decision) => record_decision(conn, envelope, decision)?,
            _ => {}
        }
        Ok(())
    }

    fn committed(&self, events: &[Applied]) {
        for applied in events {
            if let DomainEvent::PostCreated(post) = &applied.event {
                self.known.insert(&post.id);
            }
        }
    }
}

/// Stores a decision and publishes `CommentUpdated`, unless the comment
/// already has that status (a second decision event for the same comment).
fn record_decision(conn: &Connection, envelope: &Event, decision: &CommentData) -> rusqlite::Result<()> {
    let stored: Option<(String, String)> = conn
        .prepare_cached("SELECT content, post_id FROM comment WHERE id = ?1")?
        .query_row([&decision.id], |row| Ok((row.get(0)?, row.get(1)?)))
        .optional()?;
    let Some((content, post_id)) = stored else {
        tracing::warn!(comment_id = %decision.id, "decision for an unknown comment ignored");
        return Ok(());
    };
    let changed = conn
        .prepare_cached("UPDATE comment SET status = ?2 WHERE id = ?1 AND status <> ?2")?
        .execute([&decision.id, decision.status.as_str()])?;
    if changed == 1 {
        let updated = CommentData { id: decision.id.clone(), content, post_id, status: decision.status };
        outbox::stage(conn, &Event::caused_by(envelope, &DomainEvent::CommentUpdated(updated)))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use axum::{body::Body, http::Request};
    use serde_json::Value;
    use tower::ServiceExt;

    use super::*;

    const WAIT: Duration = Duration::from_secs(30);

    async fn state(dir: &tempfile::TempDir, known: &[&str], max_waiters: usize) -> AppState {
        let store = Store::open(dir.path(), "comments", MIGRATIONS).unwrap();
        store.write(|conn| Ok::<_, StoreError>(conn.execute_batch(outbox::SCHEMA)?)).await.unwrap();
        let outbox = Outbox::new(store.clone(), &blog_common::metrics::Registry::default());
        let known = KnownPosts::new(known.iter().map(|id| (*id).to_owned()), max_waiters);
        AppState { store, outbox, known, post_wait: WAIT }
    }

    async fn call(state: &AppState, method: &str, uri: &str) -> (StatusCode, axum::http::HeaderMap, Value) {
        let body = if method == "POST" { Body::from(r#"{"content":"hello"}"#) } else { Body::empty() };
        let request = Request::builder().method(method).uri(uri).header("content-type", "application/json").body(body).unwrap();
        let response = app(state.clone()).oneshot(request).await.unwrap();
        let (parts, body) = response.into_parts();
        let bytes = axum::body::to_bytes(body, 1 << 20).await.unwrap();
        (parts.status, parts.headers, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }

    /// A comment on `post`, sent once it is waiting for that post.
    async fn waiting_comment(state: &AppState, post: &str) -> tokio::task::JoinHandle<(StatusCode, axum::http::HeaderMap, Value)> {
        let before = state.known.waiting();
        let uri = format!("/posts/{post}/comments");
        let sent = {
            let state = state.clone();
            tokio::spawn(async move { call(&state, "POST", &uri).await })
        };
        while state.known.waiting() == before {
            tokio::task::yield_now().await;
        }
        sent
    }

    /// `method uri` answers a JSON 404 after exactly `waited` (paused clock).
    async fn assert_not_found_after(state: &AppState, method: &str, uri: &str, waited: Duration) {
        let started = tokio::time::Instant::now();
        let (status, _, body) = call(state, method, uri).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
        assert!(body["error"].is_string());
        assert_eq!(started.elapsed(), waited, "{method} {uri}");
        assert_eq!(state.known.waiting(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_read_for_an_unknown_post_is_a_404_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let state = state(&dir, &[], 8).await;
        // A read must not wait for the post.
        assert_not_found_after(&state, "GET", "/posts/nope/comments", Duration::ZERO).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_comment_waits_for_its_post_and_its_answer_lists_it() {
        let dir = tempfile::tempdir().unwrap();
        let state = state(&dir, &[], 8).await;
        let pending = waiting_comment(&state, "p1").await;
        state.known.insert("p1");
        let (status, _, body) = pending.await.unwrap();
        assert_eq!(status, StatusCode::CREATED, "{body}");
        assert_eq!(body.as_array().map(Vec::len), Some(1), "{body}");
        let (status, _, body) = call(&state, "POST", "/posts/p1/comments").await;
        assert_eq!(status, StatusCode::CREATED);
        assert_eq!(body.as_array().map(Vec::len), Some(2), "the list is read after the commit: {body}");
        let (_, _, listed) = call(&state, "GET", "/posts/p1/comments").await;
        assert_eq!(listed, body);
    }

    #[tokio::test(start_paused = true)]
    async fn a_comment_on_a_post_that_never_comes_is_a_404_after_the_wait() {
        let dir = tempfile::tempdir().unwrap();
        let state = state(&dir, &[], 8).await;
        assert_not_found_after(&state, "POST", "/posts/never/comments", WAIT).await;
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_comments_beyond_the_cap_get_a_503_with_retry_after() {
        let dir = tempfile::tempdir().unwrap();
        let state = state(&dir, &[], 1).await;
        let first = waiting_comment(&state, "p1").await;
        let (status, headers, body) = call(&state, "POST", "/posts/p2/comments").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert_eq!(headers["retry-after"], "1");
        assert!(body["error"].is_string());
        state.known.insert("p1");
        assert_eq!(first.await.unwrap().0, StatusCode::CREATED);
    }

    #[tokio::test(start_paused = true)]
    async fn post_ids_with_control_characters_or_too_long_are_refused_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let state = state(&dir, &[], 8).await;
        let long = "x".repeat(MAX_ID + 1);
        for method in ["GET", "POST"] {
            for (uri, expected) in [
                ("/posts/a%0Ab/comments".to_owned(), StatusCode::BAD_REQUEST),
                ("/posts/a%1Bb/comments".to_owned(), StatusCode::BAD_REQUEST),
                ("/posts/%7F/comments".to_owned(), StatusCode::BAD_REQUEST),
                (format!("/posts/{long}/comments"), StatusCode::NOT_FOUND),
                ("/posts/%FF/comments".to_owned(), StatusCode::BAD_REQUEST),
            ] {
                let (status, _, body) = call(&state, method, &uri).await;
                assert_eq!(status, expected, "{method} {uri}: {body}");
                assert!(body["error"].is_string(), "{method} {uri}: {body}");
            }
        }
        assert_eq!(state.known.waiting(), 0);
    }

    #[test]
    fn post_wait_ms_is_bounded() {
        assert_eq!(post_wait(2_000).unwrap(), Duration::from_secs(2));
        assert_eq!(post_wait(60_000).unwrap(), MAX_POST_WAIT);
        for millis in [60_001, u64::MAX] {
            let error = post_wait(millis).unwrap_err();
            assert_eq!(error.name, "POST_WAIT_MS");
            assert!(error.to_string().contains("POST_WAIT_MS"), "{error}");
        }
    }

    #[test]
    fn content_is_trimmed_and_bounded() {
        assert_eq!(CommentContent::parse(" hi ").unwrap(), CommentContent("hi".into()));
        assert!(CommentContent::parse("").is_err());
        assert!(CommentContent::parse(&"x".repeat(MAX_CONTENT + 1)).is_err());
    }
}
