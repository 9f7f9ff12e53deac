//! comments: writes comments and keeps their moderation state.
//!
//! It learns which posts exist from `PostCreated` rather than asking posts, so
//! it keeps working while posts is down. A comment on a post created a moment
//! ago may arrive before that event does, so a comment on an unknown post id
//! gets a short bounded wait for it before the 404 ([`known_posts`]: in
//! memory, capped, waking only that post's waiters); a read never waits. The
//! single database writer only inserts the comment and publishes its event; the
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
use blog_domain::{
    CommentData, CommentStatus, DomainEvent, Event, Service,
    config::{self, ConfigError},
    text::{self, TextError},
};
use blog_kit::{
    ApiError, Applied, BoxError, Consumer, Json, Kit, Outcome, ServiceKit, Shutdown, StoreError, Tx,
    config::CommonConfig,
    http::{self, RequestId},
};
use known_posts::{KnownPosts, WaitError};
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
    pub kit: Kit,
    pub known: KnownPosts,
    pub post_wait: Duration,
}

impl AppState {
    /// The state over `kit`, with the posts its database knows.
    pub async fn load(kit: Kit, post_wait: Duration) -> Result<Self, StoreError> {
        let ids = kit.read(|tx| tx.query_all("SELECT id FROM post", &[], |row| row.get::<String>(0))).await?;
        Ok(Self { kit, known: KnownPosts::new(ids, MAX_POST_WAITERS), post_wait })
    }

    /// The consumer that keeps this state's known posts current.
    pub fn consumer(&self) -> impl Consumer + use<> {
        Comments { known: self.known.clone() }
    }
}

/// How this service's kit is opened.
pub fn kit() -> ServiceKit {
    ServiceKit::new(Service::Comments).migrations(MIGRATIONS)
}

pub async fn run(listener: TcpListener, config: Config, shutdown: Shutdown) -> Result<(), BoxError> {
    let kit = kit().open(&config.common).await?;
    let state = AppState::load(kit.clone(), config.post_wait).await?;
    let consumer = state.consumer();
    kit.serve(app(state)).consumer(consumer).run(listener, shutdown).await
}

pub fn app(state: AppState) -> Router {
    Router::new().route("/posts/{id}/comments", get(list).post(create)).with_state(state)
}

/// A comment's text: trimmed, not empty, at most [`MAX_CONTENT`] characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommentContent(String);

impl CommentContent {
    pub fn parse(raw: &str) -> Result<Self, TextError> {
        text::required("content", raw, MAX_CONTENT).map(CommentContent)
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
    http::Path(post_id): http::Path<String>,
    request_id: RequestId,
    Json(body): Json<CreateComment>,
) -> Result<(StatusCode, Json<Vec<Comment>>), Response> {
    let content = CommentContent::parse(&body.content).map_err(|e| ApiError::from(e).into_response())?;
    checked_post_id(&post_id).map_err(IntoResponse::into_response)?;
    match state.known.wait_for(&post_id, state.post_wait).await {
        Ok(()) => {}
        Err(WaitError::Unknown) => return Err(post_not_found(&post_id).into_response()),
        Err(WaitError::Busy) => return Err(http::retry_later("too many comments are waiting for their post, try again", 1)),
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
        .kit
        .commit(move |tx| {
            tx.execute(
                "INSERT INTO comment (id, post_id, content, status) VALUES ($1, $2, $3, $4)",
                &[&comment.id, &comment.post_id, &comment.content, &comment.status.as_str()],
            )?;
            tx.publish(&event)
        })
        .await
        .map_err(|e| ApiError::from(e).into_response())?;
    let comments = state.kit.read(move |tx| comments_of(tx, &post_id)).await.map_err(|e| ApiError::from(e).into_response())?;
    Ok((StatusCode::CREATED, Json(comments)))
}

/// A read never waits: an unknown post is a 404 at once.
async fn list(State(state): State<AppState>, http::Path(post_id): http::Path<String>) -> Result<Json<Vec<Comment>>, ApiError> {
    checked_post_id(&post_id)?;
    if !state.known.contains(&post_id) {
        return Err(post_not_found(&post_id));
    }
    let comments = state.kit.read(move |tx| comments_of(tx, &post_id)).await?;
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

fn comments_of(tx: &Tx<'_>, post_id: &str) -> Result<Vec<Comment>, StoreError> {
    tx.query_all("SELECT id, content, status FROM comment WHERE post_id = $1 ORDER BY pos", &[&post_id], |row| {
        Ok(Comment { id: row.get(0)?, content: row.get(1)?, status: row.parse(2)? })
    })
}

/// Applies `PostCreated` and `CommentModerated`.
struct Comments {
    known: KnownPosts,
}

impl Consumer for Comments {
    fn apply(&self, tx: &mut Tx<'_>, envelope: &Event, event: &DomainEvent) -> Result<Outcome, StoreError> {
        match event {
            DomainEvent::PostCreated(post) => {
                tx.execute("INSERT INTO post (id) VALUES ($1) ON CONFLICT DO NOTHING", &[&post.id])?;
            }
            DomainEvent::CommentModerated(decision) => record_decision(tx, envelope, decision)?,
            _ => return Ok(Outcome::Ignored),
        }
        Ok(Outcome::Handled)
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
fn record_decision(tx: &mut Tx<'_>, envelope: &Event, decision: &CommentData) -> Result<(), StoreError> {
    let stored = tx.query_one("SELECT content, post_id FROM comment WHERE id = $1", &[&decision.id], |row| {
        Ok((row.get::<String>(0)?, row.get::<String>(1)?))
    })?;
    let Some((content, post_id)) = stored else {
        tracing::warn!(comment_id = %decision.id, "decision for an unknown comment ignored");
        return Ok(());
    };
    let changed =
        tx.execute("UPDATE comment SET status = $2 WHERE id = $1 AND status <> $2", &[&decision.id, &decision.status.as_str()])?;
    if changed == 1 {
        let updated = CommentData { id: decision.id.clone(), content, post_id, status: decision.status };
        tx.publish(&Event::caused_by(envelope, &DomainEvent::CommentUpdated(updated)))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use axum::{body::Body, http::Request};
    use blog_domain::EventKind;
    use blog_kit::testing::TestKit;
    use serde_json::{Value, json};
    use tower::ServiceExt;

    use super::*;

    const WAIT: Duration = Duration::from_secs(30);

    async fn state(known: &[&str], max_waiters: usize) -> (TestKit, AppState) {
        let test = kit().for_test().await.unwrap();
        let known = KnownPosts::new(known.iter().map(|id| (*id).to_owned()), max_waiters);
        let state = AppState { kit: test.kit.clone(), known, post_wait: WAIT };
        (test, state)
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
        let (_test, state) = state(&[], 8).await;
        // A read must not wait for the post.
        assert_not_found_after(&state, "GET", "/posts/nope/comments", Duration::ZERO).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_comment_waits_for_its_post_and_its_answer_lists_it() {
        let (_test, state) = state(&[], 8).await;
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
        let (_test, state) = state(&[], 8).await;
        assert_not_found_after(&state, "POST", "/posts/never/comments", WAIT).await;
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_comments_beyond_the_cap_get_a_503_with_retry_after() {
        let (_test, state) = state(&[], 1).await;
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
        let (_test, state) = state(&[], 8).await;
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

    async fn push(app: &Router, test: &TestKit, events: Value) -> Value {
        let request = Request::post("/events")
            .header("content-type", "application/json")
            .header("authorization", test.bearer())
            .body(Body::from(events.to_string()))
            .unwrap();
        let response = app.clone().oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        serde_json::from_slice(&axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap()).unwrap()
    }

    async fn send(app: &Router, method: &str, uri: &str, body: &str) -> (StatusCode, Value) {
        let request = Request::builder()
            .method(method)
            .uri(uri)
            .header("content-type", "application/json")
            .body(Body::from(body.to_owned()))
            .unwrap();
        let response = app.clone().oneshot(request).await.unwrap();
        let status = response.status();
        (status, serde_json::from_slice(&axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap()).unwrap_or(Value::Null))
    }

    #[tokio::test]
    async fn posts_arrive_as_events_and_a_decision_is_republished_once_as_an_update() {
        let (test, state) = state(&[], 8).await;
        let consumer = state.consumer();
        let app = test.app(test.kit.serve(app(state.clone())).consumer(consumer));
        push(&app, &test, json!({"id":"e1","seq":1,"type":"PostCreated","data":{"id":"p1","title":"t"}})).await;
        assert!(state.known.contains("p1"), "the post is known once its event committed");
        let (status, created) = send(&app, "POST", "/posts/p1/comments", r#"{"content":" hello "}"#).await;
        assert_eq!(status, StatusCode::CREATED, "{created}");
        let comment_id = created[0]["id"].as_str().unwrap().to_owned();
        assert_eq!(created, json!([{"id": comment_id, "content": "hello", "status": "pending"}]));

        let decision = |event_id: &str, status: &str| json!({"id": event_id, "type": "CommentModerated", "data": {"id": comment_id, "content": "hello", "postId": "p1", "status": status}});
        let report = push(&app, &test, json!([decision("d1", "approved"), decision("d1", "approved"), decision("d2", "approved")])).await;
        assert_eq!((report["applied"].as_u64(), report["duplicates"].as_u64()), (Some(2), Some(1)), "{report}");
        let events = test.bus.wait_for(2, Duration::from_secs(10)).await.unwrap();
        assert_eq!(events.iter().map(|e| e.kind.clone()).collect::<Vec<_>>(), [EventKind::CommentCreated, EventKind::CommentUpdated]);
        assert_eq!(events[1].data["status"], "approved");
        let (_, listed) = send(&app, "GET", "/posts/p1/comments", "").await;
        assert_eq!(listed[0]["status"], "approved");
        // A decision for a comment this service never stored changes nothing.
        let stranger = json!({"id":"d3","type":"CommentModerated","data":{"id":"nope","content":"x","postId":"p1","status":"rejected"}});
        assert_eq!(push(&app, &test, stranger).await["applied"].as_u64(), Some(1));
        assert_eq!(test.bus.events().len(), 2);
    }

    #[tokio::test]
    async fn bad_bodies_and_methods_get_json_errors_and_change_nothing() {
        let (test, state) = state(&["p1"], 8).await;
        let consumer = state.consumer();
        let app = test.app(test.kit.serve(app(state)).consumer(consumer));
        let raw = |content_type: &str, body: &str| {
            Request::post("/posts/p1/comments").header("content-type", content_type).body(Body::from(body.to_owned())).unwrap()
        };
        for (what, content_type, body, expected) in [
            ("malformed JSON", "application/json", r#"{"content":"#, StatusCode::BAD_REQUEST),
            ("wrong content type", "text/plain", r#"{"content":"x"}"#, StatusCode::UNSUPPORTED_MEDIA_TYPE),
            ("not an object", "application/json", "[1,2]", StatusCode::BAD_REQUEST),
            ("empty object", "application/json", "{}", StatusCode::BAD_REQUEST),
            ("wrong field type", "application/json", r#"{"content":5}"#, StatusCode::BAD_REQUEST),
            ("empty content", "application/json", r#"{"content":"  "}"#, StatusCode::BAD_REQUEST),
            ("no body", "application/json", "", StatusCode::BAD_REQUEST),
            ("too long", "application/json", &json!({"content": "x".repeat(MAX_CONTENT + 1)}).to_string(), StatusCode::BAD_REQUEST),
            ("oversized", "application/json", &json!({"content": "x".repeat(100_000)}).to_string(), StatusCode::PAYLOAD_TOO_LARGE),
        ] {
            let response = app.clone().oneshot(raw(content_type, body)).await.unwrap();
            assert_eq!(response.status(), expected, "{what}");
            assert!(response.headers()["content-type"].to_str().unwrap().starts_with("application/json"), "{what}");
            let answer: Value = serde_json::from_slice(&axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap()).unwrap();
            assert!(answer["error"].as_str().is_some_and(|e| !e.is_empty()), "{what}: {answer}");
        }
        let (status, body) = send(&app, "DELETE", "/posts/p1/comments", "").await;
        assert_eq!((status, body["error"].is_string()), (StatusCode::METHOD_NOT_ALLOWED, true));
        let (status, listed) = send(&app, "GET", "/posts/p1/comments", "").await;
        assert_eq!((status, listed), (StatusCode::OK, json!([])), "none of it created anything");
        assert!(test.bus.events().is_empty());
    }

    #[tokio::test]
    async fn a_corrupt_status_fails_the_read_loudly() {
        let (test, state) = state(&["p1"], 8).await;
        test.kit
            .commit(|tx| tx.execute("INSERT INTO comment (id, post_id, content, status) VALUES ('c1', 'p1', 'x', 'maybe')", &[]))
            .await
            .unwrap();
        let (status, body) = send(&app(state), "GET", "/posts/p1/comments", "").await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "not read as pending: {body}");
        assert_eq!(body["error"], "internal error");
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
