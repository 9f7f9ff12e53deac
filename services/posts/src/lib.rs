//! posts: `POST /posts/create` writes a post and publishes `PostCreated` in
//! the same unit of work; the kit's relay hands it to the bus. The user's
//! 201 depends only on this service's own database, never on the bus being up.

use axum::{Router, extract::State, http::StatusCode, routing::post};
use blog_domain::{
    DomainEvent, Event, PostCreated, Service,
    config::ConfigError,
    text::{self, TextError},
};
use blog_kit::{
    ApiError, BoxError, Json, Kit, ServiceKit, Shutdown,
    config::CommonConfig,
    http::{Object, RequestId},
    store::Migration,
};
use serde::Deserialize;
use tokio::net::TcpListener;

/// Longest title accepted, in characters.
pub const MAX_TITLE: usize = 200;

pub const MIGRATIONS: &[Migration] = &[Migration::per_engine(
    "CREATE TABLE post (id TEXT PRIMARY KEY, title TEXT NOT NULL) WITHOUT ROWID;",
    "CREATE TABLE post (id TEXT PRIMARY KEY, title TEXT NOT NULL);",
)];

#[derive(Debug, Clone)]
pub struct Config {
    pub common: CommonConfig,
}

impl Config {
    pub fn from_env() -> Result<Self, ConfigError> {
        Ok(Self { common: CommonConfig::from_env(Service::Posts)? })
    }
}

/// How this service's kit is opened.
pub fn kit() -> ServiceKit {
    ServiceKit::new(Service::Posts).migrations(MIGRATIONS)
}

#[derive(Debug, Clone)]
pub struct AppState {
    pub kit: Kit,
}

pub async fn run(listener: TcpListener, config: Config, shutdown: Shutdown) -> Result<(), BoxError> {
    let kit = kit().open(&config.common, &shutdown).await?;
    kit.serve(app(AppState { kit: kit.clone() })).run(listener, shutdown).await
}

pub fn app(state: AppState) -> Router {
    Router::new().route("/posts/create", post(create)).with_state(state)
}

/// A post title: trimmed, not empty, at most [`MAX_TITLE`] characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostTitle(String);

impl PostTitle {
    pub fn parse(raw: &str) -> Result<Self, TextError> {
        text::required("title", raw, MAX_TITLE).map(PostTitle)
    }
}

#[derive(Deserialize)]
struct CreatePost {
    title: String,
}

async fn create(
    State(state): State<AppState>,
    request_id: RequestId,
    Json(Object(body)): Json<Object<CreatePost>>,
) -> Result<(StatusCode, Json<PostCreated>), ApiError> {
    let title = PostTitle::parse(&body.title)?;
    let post = PostCreated { id: uuid::Uuid::now_v7().simple().to_string(), title: title.0 };
    let event = Event::new(&DomainEvent::PostCreated(post.clone()), request_id.0);
    let row = post.clone();
    state
        .kit
        .commit(move |tx| {
            tx.execute("INSERT INTO post (id, title) VALUES ($1, $2)", &[&row.id, &row.title])?;
            tx.publish(&event)
        })
        .await?;
    Ok((StatusCode::CREATED, Json(post)))
}

#[cfg(test)]
mod tests;
