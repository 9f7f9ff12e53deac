//! The consuming side: every event applied at most once, in the same
//! transaction as its record.
//!
//! A consumer's `POST /events` takes one event (the original's shape) or a
//! batch (what the bus sends under load). For each event the consumer cares
//! about, the event id goes into the `inbox` table in the same transaction as
//! the effect: a redelivered event finds its id and changes nothing. The
//! highest bus sequence seen is kept too, so on start the consumer asks the bus
//! for everything after it. Events of types the consumer does not handle are
//! acknowledged and ignored; events of known types with malformed data are
//! refused with a 400 marked as a refusal of the events (see
//! [`crate::internal::REFUSAL_HEADER`]), which the bus counts and skips rather
//! than retrying forever.

use std::sync::Arc;

use axum::{
    Router,
    extract::{DefaultBodyLimit, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::post,
};
use rusqlite::Connection;
use serde::Serialize;
use serde_json::Value;

use crate::{
    bus_client::{BusClient, BusError},
    error::{ApiError, Json, error_response},
    events::{DomainEvent, Event},
    internal::{self, InternalSecret},
    metrics::{Counter, Registry},
    outbox::Outbox,
    store::{Store, StoreError},
};

/// The tables every consuming service's database holds.
pub const SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS inbox (event_id TEXT PRIMARY KEY, seq INTEGER) WITHOUT ROWID;
    CREATE TABLE IF NOT EXISTS consumer_cursor (id INTEGER PRIMARY KEY CHECK (id = 0), seq INTEGER NOT NULL);
    INSERT OR IGNORE INTO consumer_cursor (id, seq) VALUES (0, 0);
";

/// Most events one `POST /events` may carry.
pub const MAX_BATCH: usize = 1_000;
/// Body limit of `POST /events`, which carries batches.
pub const MAX_EVENTS_BODY: usize = 8 * 1024 * 1024;
/// Events asked of the bus per page while catching up.
const REPLAY_PAGE: u32 = 500;

/// What a service does with the events it consumes.
pub trait Handler: Send + Sync + 'static {
    /// Whether this service acts on `event`; the others are acknowledged and ignored.
    fn handles(&self, event: &DomainEvent) -> bool;

    /// Applies `event` inside the delivery's transaction. Events the effect
    /// publishes in turn are staged in the outbox with the same connection.
    fn apply(&self, conn: &Connection, envelope: &Event, event: &DomainEvent) -> rusqlite::Result<()>;

    /// Runs after the transaction that applied `events` committed.
    fn committed(&self, _events: &[Applied]) {}
}

/// An event that a delivery applied, as [`Handler::committed`] sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// The bus's sequence number, when the event came from the bus.
    pub seq: Option<u64>,
    pub event: DomainEvent,
}

/// What one delivery did.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    pub applied: usize,
    pub duplicates: usize,
    pub ignored: usize,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rejected: Vec<Rejection>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Rejection {
    pub id: String,
    pub error: String,
}

#[derive(Debug, thiserror::Error)]
pub enum CatchUpError {
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A consumer's inbox. Cheap to clone.
#[derive(Clone)]
pub struct Inbox {
    store: Store,
    handler: Arc<dyn Handler>,
    outbox: Option<Outbox>,
    applied: Counter,
    duplicates: Counter,
    rejected: Counter,
}

impl std::fmt::Debug for Inbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbox").finish_non_exhaustive()
    }
}

impl Inbox {
    /// `outbox` is woken after every delivery that applied something, for
    /// services whose effects publish events.
    pub fn new(store: Store, handler: impl Handler, outbox: Option<Outbox>, metrics: &Registry) -> Self {
        Self {
            store,
            handler: Arc::new(handler),
            outbox,
            applied: metrics.counter("blog_inbox_applied_total", "Events applied."),
            duplicates: metrics.counter("blog_inbox_duplicates_total", "Redelivered events recognised and skipped."),
            rejected: metrics.counter("blog_inbox_rejected_total", "Events refused for malformed data."),
        }
    }

    /// Applies `events` in one transaction. A batch holding nothing this
    /// consumer handles is acknowledged without touching the database (the
    /// cursor then lags behind ignored events, which only means a replay may
    /// fetch them again and ignore them again).
    pub async fn deliver(&self, events: Vec<Event>) -> Result<Report, StoreError> {
        let mut report = Report::default();
        let mut relevant = Vec::with_capacity(events.len());
        for event in events {
            match event.domain() {
                Ok(domain) if self.handler.handles(&domain) => relevant.push((event, domain)),
                Ok(_) => report.ignored += 1,
                Err(e) => report.rejected.push(Rejection { id: event.id.clone(), error: e.to_string() }),
            }
        }
        self.rejected.add(report.rejected.len() as u64);
        if relevant.is_empty() {
            return Ok(report);
        }
        let handler = self.handler.clone();
        // Relaxed: after a power loss the effects roll back with the cursor,
        // and the catch-up on start replays them from the bus.
        let (report, applied) = self
            .store
            .write_relaxed(move |conn| {
                let mut applied = Vec::new();
                let mut max_seq = 0;
                for (event, domain) in relevant {
                    max_seq = max_seq.max(event.seq.unwrap_or(0));
                    let fresh = conn
                        .prepare_cached("INSERT OR IGNORE INTO inbox (event_id, seq) VALUES (?1, ?2)")?
                        .execute(rusqlite::params![event.id, event.seq.map(|s| s as i64)])?
                        == 1;
                    if !fresh {
                        report.duplicates += 1;
                        continue;
                    }
                    handler.apply(conn, &event, &domain)?;
                    report.applied += 1;
                    applied.push(Applied { seq: event.seq, event: domain });
                }
                if max_seq > 0 {
                    conn.prepare_cached("UPDATE consumer_cursor SET seq = max(seq, ?1) WHERE id = 0")?.execute([max_seq as i64])?;
                }
                Ok::<_, StoreError>((report, applied))
            })
            .await?;
        self.applied.add(report.applied as u64);
        self.duplicates.add(report.duplicates as u64);
        if !applied.is_empty() {
            self.handler.committed(&applied);
            if let Some(outbox) = &self.outbox {
                outbox.wake();
            }
        }
        Ok(report)
    }

    /// The highest bus sequence number this consumer has seen.
    pub async fn cursor(&self) -> Result<u64, StoreError> {
        self.store
            .read(|conn| {
                conn.query_row("SELECT seq FROM consumer_cursor WHERE id = 0", [], |row| row.get::<_, i64>(0))
                    .map(|seq| seq as u64)
                    .map_err(StoreError::from)
            })
            .await
    }

    /// Asks the bus for every event after the cursor and applies it; returns
    /// how many events were fetched.
    pub async fn catch_up(&self, bus: &BusClient) -> Result<usize, CatchUpError> {
        let mut fetched = 0;
        let mut after = self.cursor().await?;
        loop {
            let page = bus.events_after(after, REPLAY_PAGE).await?;
            let count = page.len();
            let last = page.last().and_then(|e| e.seq).unwrap_or(0);
            self.deliver(page).await?;
            fetched += count;
            if count < REPLAY_PAGE as usize || last <= after {
                return Ok(fetched);
            }
            after = last;
        }
    }

    /// `POST /events`, for callers holding `secret`.
    pub fn router(&self, secret: &InternalSecret) -> Router {
        Router::new()
            .route("/events", post(receive))
            .route_layer(axum::middleware::from_fn_with_state(secret.clone(), internal::require_secret))
            .layer(DefaultBodyLimit::max(MAX_EVENTS_BODY))
            .with_state(self.clone())
    }
}

/// Why a `POST /events` body was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventsError {
    /// More events than one request may carry: the sender's batch size is
    /// wrong, not the events, so this is not marked as their refusal.
    #[error("at most {MAX_BATCH} events per request")]
    TooMany,
    /// The events themselves are malformed: marked with
    /// [`crate::internal::REFUSAL_HEADER`], so the sender sets them aside.
    #[error("{0}")]
    Malformed(String),
}

impl IntoResponse for EventsError {
    fn into_response(self) -> Response {
        let response = error_response(StatusCode::BAD_REQUEST, &self.to_string());
        match self {
            EventsError::TooMany => response,
            EventsError::Malformed(_) => internal::mark_refusal(response),
        }
    }
}

/// Parses the body of `POST /events`: one event or an array of events.
pub fn parse_events(body: Value) -> Result<(Vec<Event>, bool), EventsError> {
    match body {
        Value::Array(items) => {
            if items.len() > MAX_BATCH {
                return Err(EventsError::TooMany);
            }
            let events = items
                .into_iter()
                .enumerate()
                .map(|(i, item)| Event::from_value(item).map_err(|e| EventsError::Malformed(format!("event {i}: {e}"))))
                .collect::<Result<Vec<_>, _>>()?;
            Ok((events, true))
        }
        single => {
            let event = Event::from_value(single).map_err(|e| EventsError::Malformed(e.to_string()))?;
            Ok((vec![event], false))
        }
    }
}

async fn receive(State(inbox): State<Inbox>, Json(body): Json<Value, MAX_EVENTS_BODY>) -> Result<Json<Report>, Response> {
    let (events, batch) = parse_events(body).map_err(IntoResponse::into_response)?;
    let report = inbox.deliver(events).await.map_err(|e| ApiError::from(e).into_response())?;
    if !batch && let Some(rejection) = report.rejected.first() {
        return Err(EventsError::Malformed(rejection.error.clone()).into_response());
    }
    Ok(Json(report))
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use serde_json::json;

    use super::*;

    /// Counts applied posts in a table, and remembers what committed.
    #[derive(Default)]
    struct Posts(Mutex<Vec<Applied>>);

    impl Handler for Arc<Posts> {
        fn handles(&self, event: &DomainEvent) -> bool {
            matches!(event, DomainEvent::PostCreated(_))
        }

        fn apply(&self, conn: &Connection, _: &Event, event: &DomainEvent) -> rusqlite::Result<()> {
            if let DomainEvent::PostCreated(post) = event {
                conn.execute("INSERT INTO post (id) VALUES (?1)", [&post.id])?;
            }
            Ok(())
        }

        fn committed(&self, events: &[Applied]) {
            self.0.lock().unwrap().extend_from_slice(events);
        }
    }

    fn event(value: Value) -> Event {
        Event::from_value(value).unwrap()
    }

    #[tokio::test]
    async fn redelivery_changes_nothing_and_unknown_types_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), "c", &["CREATE TABLE post (id TEXT PRIMARY KEY);"]).unwrap();
        store.write(|c| c.execute_batch(SCHEMA).map_err(StoreError::from)).await.unwrap();
        let seen = Arc::new(Posts::default());
        let inbox = Inbox::new(store.clone(), seen.clone(), None, &Registry::default());

        let post = event(json!({"id":"e1","seq":1,"type":"PostCreated","data":{"id":"p1","title":"t"}}));
        let liked = event(json!({"id":"e2","seq":2,"type":"PostLiked","data":{"id":"p1"}}));
        let bad = event(json!({"id":"e3","seq":3,"type":"PostCreated","data":{"id":"p2"}}));

        let first = inbox.deliver(vec![post.clone(), liked.clone(), bad]).await.unwrap();
        assert_eq!((first.applied, first.duplicates, first.ignored, first.rejected.len()), (1, 0, 1, 1));
        let again = inbox.deliver(vec![post.clone(), post]).await.unwrap();
        assert_eq!((again.applied, again.duplicates), (0, 2));

        let rows: i64 = store.read(|c| c.query_row("SELECT count(*) FROM post", [], |r| r.get(0)).map_err(StoreError::from)).await.unwrap();
        assert_eq!(rows, 1);
        assert_eq!(seen.0.lock().unwrap().len(), 1);
        assert_eq!(inbox.cursor().await.unwrap(), 1, "the cursor follows applied events");
        let ignored_only = inbox.deliver(vec![liked]).await.unwrap();
        assert_eq!((ignored_only.ignored, ignored_only.applied), (1, 0));
    }

    #[test]
    fn bodies_are_one_event_or_a_bounded_batch() {
        assert!(!parse_events(json!({"type":"X","data":{}})).unwrap().1);
        assert_eq!(parse_events(json!([{"type":"X","data":{}},{"type":"Y","data":{}}])).unwrap().0.len(), 2);
        assert!(parse_events(json!([{"type":"X","data":{}}, {"data":{}}])).is_err());
        assert!(parse_events(json!("event")).is_err());
        let too_many: Vec<Value> = (0..=MAX_BATCH).map(|i| json!({"type":"X","data":{"i":i}})).collect();
        assert!(parse_events(Value::Array(too_many)).is_err());
    }
}
