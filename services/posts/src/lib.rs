//! posts: `POST /posts/create` writes a post and stages `PostCreated` in the
//! same transaction; the outbox relay publishes it. The user's 201 depends
//! only on this service's own database, never on the bus being up.

use axum::{Router, extract::State, http::StatusCode, routing::post};
use blog_common::{
    ApiError, DomainEvent, Event, Json, Node, Service,
    config::{CommonConfig, ConfigError},
    error::required_text,
    events::PostCreated,
    node::BoxError,
    outbox::{self, Outbox},
    server::{RequestId, Shutdown},
    store::{Store, StoreError},
};
use serde::Deserialize;
use tokio::net::TcpListener;

/// Longest title accepted, in characters.
pub const MAX_TITLE: usize = 200;

pub const MIGRATIONS: &[&str] = &["CREATE TABLE post (id TEXT PRIMARY KEY, title TEXT NOT NULL) WITHOUT ROWID;"];

#[derive(Debug, Clone)]
pub struct Config {
    pub common: CommonConfig,
}

impl Config {
    pub fn from_env() -> Result<Self, ConfigError> {
        Ok(Self { common: CommonConfig::from_env(Service::Posts)? })
    }
}

#[derive(Debug, Clone)]
pub struct AppState {
    store: Store,
    outbox: Outbox,
}

pub async fn run(listener: TcpListener, config: Config, shutdown: Shutdown) -> Result<(), BoxError> {
    let node = Node::open(Service::Posts, &config.common, MIGRATIONS).await?;
    let app = app(AppState { store: node.store.clone(), outbox: node.outbox.clone() });
    node.run(listener, app, None, shutdown).await
}

pub fn app(state: AppState) -> Router {
    Router::new().route("/posts/create", post(create)).with_state(state)
}

/// A post title: trimmed, not empty, at most [`MAX_TITLE`] characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostTitle(String);

impl PostTitle {
    pub fn parse(raw: &str) -> Result<Self, ApiError> {
        required_text("title", raw, MAX_TITLE).map(PostTitle)
    }
}

#[derive(Deserialize)]
struct CreatePost {
    title: String,
}

async fn create(
    State(state): State<AppState>,
    request_id: RequestId,
    Json(body): Json<CreatePost>,
) -> Result<(StatusCode, Json<PostCreated>), ApiError> {
    let title = PostTitle::parse(&body.title)?;
    let post = PostCreated { id: uuid::Uuid::now_v7().simple().to_string(), title: title.0 };
    let event = Event::new(&DomainEvent::PostCreated(post.clone()), request_id.0);
    let row = post.clone();
    state
        .store
        .write(move |conn| {
            conn.execute("INSERT INTO post (id, title) VALUES (?1, ?2)", [&row.id, &row.title])?;
            outbox::stage(conn, &event)?;
            Ok::<_, StoreError>(())
        })
        .await?;
    state.outbox.wake();
    Ok((StatusCode::CREATED, Json(post)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn titles_are_trimmed_and_bounded() {
        assert_eq!(PostTitle::parse("  Hello ").unwrap(), PostTitle("Hello".into()));
        assert!(PostTitle::parse("   ").is_err());
        assert!(PostTitle::parse(&"x".repeat(MAX_TITLE)).is_ok());
        assert!(PostTitle::parse(&"é".repeat(MAX_TITLE + 1)).is_err());
    }
}
