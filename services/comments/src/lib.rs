//! comments: writes comments and keeps their moderation state.
//!
//! It learns which posts exist from `PostCreated` rather than asking posts, so
//! it keeps working while posts is down. A comment on a post created a moment
//! ago may arrive before that event does, so an unknown post id gets a short
//! bounded wait for it before the 404. A `CommentModerated` decision is stored
//! and re-published as `CommentUpdated` in the same transaction, once.

use std::time::Duration;

use axum::{Router, extract::State, http::StatusCode, routing::get};
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
use rusqlite::{Connection, OptionalExtension};
use serde::{Deserialize, Serialize};
use tokio::{net::TcpListener, sync::watch};

/// Longest comment accepted, in characters.
pub const MAX_CONTENT: usize = 2_000;
const MAX_ID: usize = 128;

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
        Ok(Self {
            common: CommonConfig::from_env(Service::Comments)?,
            post_wait: Duration::from_millis(config::var("POST_WAIT_MS", 2_000)?),
        })
    }
}

#[derive(Debug, Clone)]
pub struct AppState {
    store: Store,
    outbox: Outbox,
    /// Bumped after every commit that made a post known.
    posts_seen: watch::Receiver<u64>,
    post_wait: Duration,
}

pub async fn run(listener: TcpListener, config: Config, shutdown: Shutdown) -> Result<(), BoxError> {
    let node = Node::open(Service::Comments, &config.common, MIGRATIONS).await?;
    let (posts_seen_tx, posts_seen) = watch::channel(0);
    let inbox = node.inbox(Consumer { posts_seen: posts_seen_tx });
    let state = AppState { store: node.store.clone(), outbox: node.outbox.clone(), posts_seen, post_wait: config.post_wait };
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
) -> Result<(StatusCode, Json<Vec<Comment>>), ApiError> {
    let content = CommentContent::parse(&body.content)?;
    state.wait_for_post(&post_id).await?;
    let comment =
        CommentData { id: uuid::Uuid::now_v7().simple().to_string(), content: content.0, post_id, status: CommentStatus::Pending };
    let event = Event::new(&DomainEvent::CommentCreated(comment.clone()), request_id.0);
    let comments = state
        .store
        .write(move |conn| {
            conn.execute(
                "INSERT INTO comment (id, post_id, content, status) VALUES (?1, ?2, ?3, ?4)",
                [&comment.id, &comment.post_id, &comment.content, comment.status.as_str()],
            )?;
            outbox::stage(conn, &event)?;
            comments_of(conn, &comment.post_id)
        })
        .await?;
    state.outbox.wake();
    Ok((StatusCode::CREATED, Json(comments)))
}

async fn list(State(state): State<AppState>, error::Path(post_id): error::Path<String>) -> Result<Json<Vec<Comment>>, ApiError> {
    state.wait_for_post(&post_id).await?;
    let comments = state.store.read(move |conn| comments_of(conn, &post_id)).await?;
    Ok(Json(comments))
}

impl AppState {
    /// Returns once `post_id` is known, or 404 after the bounded wait.
    async fn wait_for_post(&self, post_id: &str) -> Result<(), ApiError> {
        if post_id.is_empty() || post_id.len() > MAX_ID {
            return Err(ApiError::not_found(format!("post {post_id:?} not found")));
        }
        let deadline = tokio::time::Instant::now() + self.post_wait;
        let mut seen = self.posts_seen.clone();
        loop {
            seen.mark_unchanged();
            if self.post_exists(post_id).await? {
                return Ok(());
            }
            match tokio::time::timeout_at(deadline, seen.changed()).await {
                Ok(Ok(())) => continue,
                _ => return Err(ApiError::not_found(format!("post {post_id:?} not found"))),
            }
        }
    }

    async fn post_exists(&self, post_id: &str) -> Result<bool, StoreError> {
        let id = post_id.to_owned();
        self.store.read(move |conn| Ok(conn.query_row("SELECT 1 FROM post WHERE id = ?1", [id], |_| Ok(())).optional()?.is_some())).await
    }
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
    posts_seen: watch::Sender<u64>,
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
        if events.iter().any(|e| matches!(e.event, DomainEvent::PostCreated(_))) {
            self.posts_seen.send_modify(|n| *n += 1);
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
    use super::*;

    #[test]
    fn content_is_trimmed_and_bounded() {
        assert_eq!(CommentContent::parse(" hi ").unwrap(), CommentContent("hi".into()));
        assert!(CommentContent::parse("").is_err());
        assert!(CommentContent::parse(&"x".repeat(MAX_CONTENT + 1)).is_err());
    }
}
