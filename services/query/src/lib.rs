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

use axum::{
    Router,
    extract::State,
    response::{IntoResponse, Response, sse},
    routing::get,
};
use blog_common::{
    ApiError, CommentStatus, DomainEvent, Event, Json, Node, Service,
    config::{CommonConfig, ConfigError},
    events::CommentData,
    inbox::{Applied, Handler},
    node::BoxError,
    server::{self, Shutdown},
    store::{Store, StoreError},
};
use rusqlite::Connection;
use serde::{Serialize, Serializer, ser::SerializeMap};
use tokio::net::TcpListener;
use tokio::sync::broadcast;

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

#[derive(Debug, Clone)]
pub struct AppState {
    store: Store,
    live: broadcast::Sender<Applied>,
    shutdown: Shutdown,
}

pub async fn run(listener: TcpListener, config: Config, shutdown: Shutdown) -> Result<(), BoxError> {
    let node = Node::open(Service::Query, &config.common, MIGRATIONS).await?;
    let live = broadcast::Sender::new(LIVE_BUFFER);
    let inbox = node.inbox(Projector { live: live.clone() });
    let app = app(AppState { store: node.store.clone(), live, shutdown: shutdown.clone() });
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

#[derive(Debug, Serialize)]
struct CommentView {
    id: String,
    content: String,
    status: CommentStatus,
}

#[derive(Debug, Serialize)]
struct PostView {
    id: String,
    title: String,
    comments: Vec<CommentView>,
}

/// Posts keyed by id, in creation order.
struct PostsView(Vec<PostView>);

impl Serialize for PostsView {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for post in &self.0 {
            map.serialize_entry(&post.id, post)?;
        }
        map.end()
    }
}

async fn posts(State(state): State<AppState>) -> Result<Json<PostsView>, ApiError> {
    Ok(Json(state.store.read(read_view).await?))
}

fn read_view(conn: &Connection) -> Result<PostsView, StoreError> {
    let mut posts: Vec<PostView> = conn
        .prepare_cached("SELECT id, title FROM post ORDER BY pos")?
        .query_map([], |row| Ok(PostView { id: row.get(0)?, title: row.get(1)?, comments: Vec::new() }))?
        .collect::<Result<_, _>>()?;
    let index: std::collections::HashMap<String, usize> = posts.iter().enumerate().map(|(i, p)| (p.id.clone(), i)).collect();
    let mut stmt = conn.prepare_cached("SELECT post_id, id, content, status FROM comment ORDER BY pos")?;
    let mut rows = stmt.query([])?;
    while let Some(row) = rows.next()? {
        let post_id: String = row.get(0)?;
        if let Some(&i) = index.get(&post_id) {
            let status: String = row.get(3)?;
            posts[i].comments.push(CommentView {
                id: row.get(1)?,
                content: row.get(2)?,
                status: CommentStatus::parse(&status).unwrap_or(CommentStatus::Pending),
            });
        }
    }
    Ok(PostsView(posts))
}

/// Projects events into the view and announces each change to live streams.
struct Projector {
    live: broadcast::Sender<Applied>,
}

impl Handler for Projector {
    fn handles(&self, event: &DomainEvent) -> bool {
        matches!(event, DomainEvent::PostCreated(_) | DomainEvent::CommentCreated(_) | DomainEvent::CommentUpdated(_))
    }

    fn apply(&self, conn: &Connection, _: &Event, event: &DomainEvent) -> rusqlite::Result<()> {
        match event {
            DomainEvent::PostCreated(post) => {
                conn.prepare_cached("INSERT OR IGNORE INTO post (id, title) VALUES (?1, ?2)")?.execute([&post.id, &post.title])?;
            }
            DomainEvent::CommentCreated(comment) => upsert_comment(conn, comment, false)?,
            DomainEvent::CommentUpdated(comment) => upsert_comment(conn, comment, true)?,
            _ => {}
        }
        Ok(())
    }

    fn committed(&self, events: &[Applied]) {
        if self.live.receiver_count() > 0 {
            for applied in events {
                let _ = self.live.send(applied.clone());
            }
        }
    }
}

/// Inserts the comment or updates it; only an update carries a status that
/// may replace the stored one, and never with `pending`.
fn upsert_comment(conn: &Connection, comment: &CommentData, is_update: bool) -> rusqlite::Result<()> {
    let sql = if is_update && comment.status != CommentStatus::Pending {
        "INSERT INTO comment (id, post_id, content, status) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (id) DO UPDATE SET status = excluded.status, content = excluded.content"
    } else {
        "INSERT INTO comment (id, post_id, content, status) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (id) DO NOTHING"
    };
    conn.prepare_cached(sql)?.execute([&comment.id, &comment.post_id, &comment.content, comment.status.as_str()])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use blog_common::{inbox::Inbox, metrics::Registry};
    use serde_json::json;

    use super::*;

    /// The view's JSON text after applying `events` one delivery at a time.
    async fn view_after(events: Vec<serde_json::Value>) -> String {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), "query", MIGRATIONS).unwrap();
        store.write(|c| c.execute_batch(blog_common::inbox::SCHEMA).map_err(StoreError::from)).await.unwrap();
        let inbox = Inbox::new(store.clone(), Projector { live: broadcast::Sender::new(8) }, None, &Registry::default());
        for event in events {
            inbox.deliver(vec![Event::from_value(event).unwrap()]).await.unwrap();
        }
        serde_json::to_string(&store.read(read_view).await.unwrap()).unwrap()
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
}
