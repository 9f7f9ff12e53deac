//! The consuming side: every event applied at most once, in the same
//! transaction as its record.
//!
//! A consumer's `POST /events` takes one event (the original's shape) or a
//! batch (what the bus sends under load). For each event the consumer cares
//! about, the event id goes into the `inbox` table in the same transaction as
//! the effect: a redelivered event finds its id and changes nothing. The
//! highest bus sequence seen is kept too, so on start the consumer asks the bus
//! for everything after it ([`catch_up`], on the shared retry loop), and a
//! request that waits for an event can ask again at any time
//! ([`Inbox::pull`]: one pull at a time, shared by whoever asked meanwhile,
//! so a crowd of waiting requests costs the bus a few reads a second). A
//! consumer names the event types it acts on once ([`Consumer::consumes`]):
//! only those reach [`Consumer::apply`], and every answer to a push names
//! them to the bus ([`crate::internal::CONSUMES_HEADER`]), which then pushes
//! nothing else. `apply` says whether it acted on an event
//! ([`Outcome::Handled`]) or not ([`Outcome::Ignored`]); ignored events, other
//! types and types this version does not know are acknowledged and leave no
//! record; events of known types with malformed data are
//! refused with a 400 marked as a refusal of the events (see
//! [`crate::internal::REFUSAL_HEADER`]), which the bus counts and skips rather
//! than retrying forever.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use axum::{
    Router,
    extract::{DefaultBodyLimit, State},
    http::{HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    routing::post,
};
use blog_domain::{DomainEvent, Event, EventKind};
use serde::Serialize;
use serde_json::Value;

use super::{
    bus_client::BusClient,
    outbox::Outbox,
    retry::{self, DeliveryError, Pass, Worker},
};
use crate::{
    http::{ApiError, Json, error_response},
    internal::{self, InternalSecret},
    metrics::{Counter, Histograms, LATENCY_BUCKETS, Registry},
    shutdown::Shutdown,
    store::{Migration, Store, StoreError, Tx},
    telemetry,
};

/// The tables every consuming service's database holds.
pub(crate) const SCHEMA: Migration = Migration::per_engine(
    "
    CREATE TABLE IF NOT EXISTS inbox (event_id TEXT PRIMARY KEY, seq INTEGER) WITHOUT ROWID;
    CREATE TABLE IF NOT EXISTS consumer_cursor (id INTEGER PRIMARY KEY CHECK (id = 0), seq INTEGER NOT NULL);
    INSERT OR IGNORE INTO consumer_cursor (id, seq) VALUES (0, 0);
    CREATE TABLE IF NOT EXISTS replay_seen (seq INTEGER PRIMARY KEY);
",
    "
    CREATE TABLE IF NOT EXISTS inbox (event_id TEXT PRIMARY KEY, seq BIGINT);
    CREATE TABLE IF NOT EXISTS consumer_cursor (id BIGINT PRIMARY KEY CHECK (id = 0), seq BIGINT NOT NULL);
    INSERT INTO consumer_cursor (id, seq) VALUES (0, 0) ON CONFLICT DO NOTHING;
    CREATE TABLE IF NOT EXISTS replay_seen (seq BIGINT PRIMARY KEY);
",
);

/// Most events one `POST /events` may carry.
pub const MAX_BATCH: usize = 1_000;
/// Body limit of `POST /events`, which carries batches.
pub const MAX_EVENTS_BODY: usize = 8 * 1024 * 1024;
/// Events asked of the bus per page while catching up.
const REPLAY_PAGE: u32 = 500;
/// The shortest time between the starts of two [`Inbox::pull`]s.
pub const MIN_PULL_INTERVAL: Duration = Duration::from_millis(50);

/// Whether a consumer acted on an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Applied: recorded in the inbox, so a redelivery changes nothing.
    Handled,
    /// Not this consumer's business; it must have written nothing.
    Ignored,
}

/// What a service does with the events it consumes.
pub trait Consumer: Send + Sync + 'static {
    /// The event types this consumer acts on, the one list of them: only
    /// these reach [`Consumer::apply`] (the rest are acknowledged and
    /// ignored), and the bus, told with every answer, pushes only these.
    fn consumes(&self) -> &'static [EventKind];

    /// Applies `event`, of a type in [`Consumer::consumes`], inside the
    /// delivery's unit of work: events it publishes in turn go out with
    /// [`Tx::publish`] when the delivery commits.
    fn apply(&self, tx: &mut Tx<'_>, envelope: &Event, event: &DomainEvent) -> Result<Outcome, StoreError>;

    /// Runs after the transaction that applied `events` committed.
    fn committed(&self, _events: &[Applied]) {}
}

/// An event that a delivery applied, as [`Consumer::committed`] sees it.
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
    Bus(#[from] DeliveryError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A consumer's inbox. Cheap to clone.
#[derive(Clone)]
pub struct Inbox {
    store: Store,
    consumer: Arc<dyn Consumer>,
    /// [`Consumer::consumes`] as the header value every answer carries.
    consumes: Option<HeaderValue>,
    outbox: Outbox,
    bus: BusClient,
    pulls: Arc<Pulls>,
    applied: Counter,
    duplicates: Counter,
    rejected: Counter,
    /// From the bus storing an event to its effect committed here, by type.
    consistency_lag: Histograms,
}

impl std::fmt::Debug for Inbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbox").finish_non_exhaustive()
    }
}

/// The pulls of an inbox and its clones.
#[derive(Debug, Default)]
struct Pulls {
    /// Pulls started so far; the number of a pull is this count after it started.
    started: AtomicU64,
    /// Held while a pull runs: the number of the last pull that succeeded,
    /// and when the last one started.
    last: tokio::sync::Mutex<(u64, Option<tokio::time::Instant>)>,
}

impl Inbox {
    /// An inbox over `store` (holding [`SCHEMA`]); deliveries commit through
    /// `outbox`, so what a consumer publishes goes out with them; catch-ups
    /// read from `bus`.
    pub fn new(store: Store, consumer: impl Consumer, outbox: Outbox, bus: BusClient, metrics: &Registry) -> Self {
        Self {
            store,
            consumes: internal::consumes_value(consumer.consumes()),
            consumer: Arc::new(consumer),
            outbox,
            bus,
            pulls: Arc::default(),
            applied: metrics.counter("blog_inbox_applied_total", "Events applied."),
            duplicates: metrics.counter("blog_inbox_duplicates_total", "Redelivered events recognised and skipped."),
            rejected: metrics.counter("blog_inbox_rejected_total", "Events refused for malformed data."),
            consistency_lag: metrics.histograms(
                "blog_inbox_consistency_lag_seconds",
                "From the bus storing an event to this consumer committing its effect (wall clocks), by event type.",
                &["type"],
                LATENCY_BUCKETS,
            ),
        }
    }

    /// Applies `events` in one transaction, and moves the replay watermark
    /// over their sequence numbers. A batch holding nothing this consumer
    /// handles and no sequence number is acknowledged without touching the
    /// database.
    pub async fn deliver(&self, events: Vec<Event>) -> Result<Report, StoreError> {
        self.deliver_range(events, None).await
    }

    /// [`Inbox::deliver`] for a batch the bus sent as the whole of its log
    /// after `covers_after` (a catch-up page, or a push from a subscriber's
    /// cursor): sequence numbers missing from it do not exist in the log, so
    /// the watermark may move over them.
    pub async fn deliver_range(&self, events: Vec<Event>, covers_after: Option<u64>) -> Result<Report, StoreError> {
        let covers_after = covers_after.and_then(|after| i64::try_from(after).ok());
        let traced = telemetry::lag_ids(&events);
        telemetry::lag_mark("inbox.received", traced.iter().map(String::as_str));
        let consumes = self.consumer.consumes();
        let mut report = Report::default();
        let mut relevant = Vec::with_capacity(events.len());
        // Every event from the bus counts towards the watermark, whatever
        // becomes of it here: the bus will not send it again.
        let seqs: Vec<i64> = events.iter().filter_map(|e| e.seq.and_then(|s| i64::try_from(s).ok())).collect();
        for event in events {
            match event.domain() {
                Ok(domain) if consumes.contains(&event.kind) && !matches!(domain, DomainEvent::Other(_)) => {
                    relevant.push((event, domain));
                }
                Ok(_) => report.ignored += 1,
                Err(e) => report.rejected.push(Rejection { id: event.id.clone(), error: e.to_string() }),
            }
        }
        self.rejected.add(report.rejected.len() as u64);
        if relevant.is_empty() && seqs.is_empty() {
            return Ok(report);
        }
        let consumer = self.consumer.clone();
        let traced_in_writer = traced.clone();
        // Relaxed: after a power loss the effects roll back with the
        // watermark, and the catch-up on start replays them from the bus.
        let (report, applied, stored_at) = self
            .outbox
            .commit(false, move |tx| {
                telemetry::lag_mark("inbox.applying", traced_in_writer.iter().map(String::as_str));
                let mut applied = Vec::new();
                let mut stored_at = Vec::new();
                for (event, domain) in relevant {
                    let seq = event.seq.and_then(|s| i64::try_from(s).ok());
                    let fresh =
                        tx.execute("INSERT INTO inbox (event_id, seq) VALUES ($1, $2) ON CONFLICT DO NOTHING", &[&event.id, &seq])? == 1;
                    if !fresh {
                        report.duplicates += 1;
                        continue;
                    }
                    // The apply continues the event's trace; what it
                    // publishes (a decision, a recorded status) is its child.
                    let span = tracing::info_span!("apply", event_id = %event.id, kind = %event.kind, trace_id = tracing::field::Empty);
                    let trace = telemetry::continue_trace(&span, event.trace());
                    let _entered = span.enter();
                    let published_before = tx.published_count();
                    let outcome = consumer.apply(tx, &event, &domain)?;
                    tx.trace_published_since(published_before, &trace.to_string());
                    tracing::debug!(?outcome, "event applied");
                    match outcome {
                        Outcome::Handled => {
                            report.applied += 1;
                            stored_at.push((event.kind.clone(), event.timestamp.clone()));
                            applied.push(Applied { seq: event.seq, event: domain });
                        }
                        Outcome::Ignored => {
                            // No record of what this consumer does not keep.
                            tx.execute("DELETE FROM inbox WHERE event_id = $1", &[&event.id])?;
                            report.ignored += 1;
                        }
                    }
                }
                advance_watermark(tx, &seqs, covers_after)?;
                Ok::<_, StoreError>((report, applied, stored_at))
            })
            .await?;
        let now = std::time::SystemTime::now();
        for (kind, timestamp) in stored_at {
            let Some(stored) = timestamp.and_then(|t| humantime::parse_rfc3339_weak(&t).ok()) else { continue };
            // A clock step backwards between hosts reads as no lag, not as an error.
            self.consistency_lag.with(&[kind.as_str()]).observe_duration(now.duration_since(stored).unwrap_or_default());
        }
        telemetry::lag_mark("inbox.committed", traced.iter().map(String::as_str));
        self.applied.add(report.applied as u64);
        self.duplicates.add(report.duplicates as u64);
        if !applied.is_empty() {
            self.consumer.committed(&applied);
        }
        telemetry::lag_mark("inbox.done", traced.iter().map(String::as_str));
        Ok(report)
    }

    /// The replay watermark: every bus event up to it has been processed.
    pub async fn cursor(&self) -> Result<u64, StoreError> {
        self.store.read(|tx| Ok::<_, StoreError>(watermark(tx)? as u64)).await
    }

    /// Asks the bus for every event after `after` and applies it, moving
    /// `after` along page by page, so a retry resumes where this attempt got
    /// to; returns how many events were fetched.
    pub async fn catch_up(&self, after: &mut u64) -> Result<usize, CatchUpError> {
        let mut fetched = 0;
        loop {
            let page = self.bus.events_after(*after, REPLAY_PAGE).await?;
            let count = page.len();
            let last = page.last().and_then(|e| e.seq).unwrap_or(0);
            self.deliver_range(page, Some(*after)).await?;
            fetched += count;
            if count < REPLAY_PAGE as usize || last <= *after {
                return Ok(fetched);
            }
            *after = last;
        }
    }

    /// Asks the bus for every event after the watermark and applies it, for
    /// a request waiting for an event that a push should have brought (the
    /// bus may be backing off its deliveries here after an outage). Returns
    /// once a pull that started after the call succeeded: at most one runs
    /// at a time, callers that ask while one runs share the next, and pulls
    /// start at least [`MIN_PULL_INTERVAL`] apart. Cancel-safe: what a
    /// cancelled pull applied stays applied.
    pub async fn pull(&self) -> Result<(), CatchUpError> {
        let asked = self.pulls.started.load(Ordering::Acquire);
        let mut last = self.pulls.last.lock().await;
        let (succeeded, started_at) = *last;
        if succeeded > asked {
            return Ok(());
        }
        if let Some(started_at) = started_at {
            tokio::time::sleep_until(started_at + MIN_PULL_INTERVAL).await;
        }
        let number = self.pulls.started.fetch_add(1, Ordering::AcqRel) + 1;
        last.1 = Some(tokio::time::Instant::now());
        let mut after = self.cursor().await?;
        self.catch_up(&mut after).await?;
        last.0 = number;
        Ok(())
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

fn watermark(tx: &Tx<'_>) -> Result<i64, StoreError> {
    tx.query_row("SELECT seq FROM consumer_cursor WHERE id = 0", &[], |row| row.get(0))
}

/// Records `seqs` as processed and moves the watermark over the gap-free run
/// above it, if the next sequence number is there. A batch that covers the
/// log from `covers_after` at or below the watermark moves it to the batch's
/// end at once, gaps in the numbering included. Only sequence numbers above
/// the watermark are kept.
///
/// Replicas sharing a database apply deliveries concurrently, so the cursor
/// row is locked first (a no-op update): deliveries move the watermark one
/// after the other, each seeing what the ones before it committed, and none
/// can overwrite a higher watermark with a lower one.
fn advance_watermark(tx: &Tx<'_>, seqs: &[i64], covers_after: Option<i64>) -> Result<(), StoreError> {
    tx.execute("UPDATE consumer_cursor SET seq = seq WHERE id = 0", &[])?;
    let before = watermark(tx)?;
    let mut mark = before;
    if let (Some(after), Some(&last)) = (covers_after, seqs.iter().max())
        && after <= mark
    {
        mark = mark.max(last);
    }
    for seq in seqs.iter().filter(|seq| **seq > mark) {
        tx.execute("INSERT INTO replay_seen (seq) VALUES ($1) ON CONFLICT DO NOTHING", &[seq])?;
    }
    // All kept numbers are above the watermark, so when `mark + 1` is among
    // them, the first one not followed by its successor ends the run from it.
    let end: Option<i64> = tx.query_row(
        "SELECT min(s.seq) FROM replay_seen s
         WHERE NOT EXISTS (SELECT 1 FROM replay_seen n WHERE n.seq = s.seq + 1)
           AND EXISTS (SELECT 1 FROM replay_seen f WHERE f.seq = $1)",
        &[&(mark + 1)],
        |row| row.get(0),
    )?;
    mark = mark.max(end.unwrap_or(mark));
    if mark > before {
        tx.execute("UPDATE consumer_cursor SET seq = $1 WHERE id = 0 AND seq < $1", &[&mark])?;
        tx.execute("DELETE FROM replay_seen WHERE seq <= $1", &[&mark])?;
    }
    Ok(())
}

/// Replays what the service missed while it was down, retrying until the
/// bus answers; from then on the bus pushes. The watermark is read once: a
/// retry resumes from where the previous attempt got to, not from whatever
/// pushes meanwhile did to the database.
pub async fn catch_up(inbox: Inbox, shutdown: Shutdown) {
    retry::run(CatchUp { inbox, after: None }, shutdown).await;
}

struct CatchUp {
    inbox: Inbox,
    after: Option<u64>,
}

impl Worker for CatchUp {
    type Error = CatchUpError;

    async fn pass(&mut self) -> Result<Pass, CatchUpError> {
        let mut after = match self.after {
            Some(after) => after,
            None => {
                let watermark = self.inbox.cursor().await?;
                tracing::info!(watermark, "catching up with the bus");
                watermark
            }
        };
        let result = self.inbox.catch_up(&mut after).await;
        self.after = Some(after);
        let fetched = result?;
        tracing::info!(fetched, "caught up with the bus");
        Ok(Pass::Done)
    }

    async fn idle(&mut self) {}

    fn failed(&mut self, error: &CatchUpError, attempt: u32) {
        tracing::warn!(%error, attempt, "cannot catch up with the bus yet");
    }

    fn longest_wait(&self, error: &CatchUpError) -> Duration {
        match error {
            CatchUpError::Bus(e) => e.longest_wait(),
            CatchUpError::Store(_) => retry::MAX_BACKOFF,
        }
    }
}

/// Answers `POST /events` for a service that consumes nothing: the caller
/// must hold `secret`, the envelope is checked and the event acknowledged, as
/// the original's services do.
pub fn ack_events(secret: &InternalSecret) -> Router {
    async fn ack(Json(body): Json<Value, MAX_EVENTS_BODY>) -> Result<Response, Response> {
        parse_events(body).map_err(IntoResponse::into_response)?;
        Ok(axum::Json(serde_json::json!({})).into_response())
    }
    Router::new()
        .route("/events", post(ack))
        .route_layer(axum::middleware::from_fn_with_state(secret.clone(), internal::require_secret))
        .layer(DefaultBodyLimit::max(MAX_EVENTS_BODY))
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

async fn receive(
    State(inbox): State<Inbox>,
    headers: axum::http::HeaderMap,
    Json(body): Json<Value, MAX_EVENTS_BODY>,
) -> Result<Response, Response> {
    let (events, batch) = parse_events(body).map_err(IntoResponse::into_response)?;
    let covers_after = headers.get(&internal::COVERS_AFTER_HEADER).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
    // Detached from the request: a caller that hangs up (the bus killed, a
    // timeout) drops this handler, and a commit already queued would then
    // stand without its after-commit hook (query's view in memory, comments'
    // known posts); a redelivery finds it applied and could not repair that.
    let consumes = inbox.consumes.clone();
    let report = tokio::spawn(async move { inbox.deliver_range(events, covers_after).await })
        .await
        .map_err(|e| ApiError::from(StoreError::Join(e.to_string())).into_response())?
        .map_err(|e| ApiError::from(e).into_response())?;
    if !batch && let Some(rejection) = report.rejected.first() {
        return Err(EventsError::Malformed(rejection.error.clone()).into_response());
    }
    let mut response = axum::Json(report).into_response();
    if let Some(consumes) = consumes {
        response.headers_mut().insert(internal::CONSUMES_HEADER.clone(), consumes);
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use serde_json::json;

    use super::*;

    const SECRET: &str = "inbox-test-secret-0123456789";

    /// An inbox over `store` whose catch-ups read from the bus at `bus`.
    fn inbox_reading(store: &Store, consumer: impl Consumer, bus: &url::Url) -> Inbox {
        let bus = BusClient::new(crate::http::client::http_client(Duration::from_secs(5)), bus, InternalSecret::parse(SECRET).unwrap());
        Inbox::new(store.clone(), consumer, Outbox::new(store.clone(), &Registry::default()), bus, &Registry::default())
    }

    /// An inbox over `store` that is only pushed to (nothing listens at its bus).
    fn inbox(store: &Store, consumer: impl Consumer) -> Inbox {
        inbox_reading(store, consumer, &url::Url::parse("http://127.0.0.1:9").unwrap())
    }

    /// Counts applied posts in a table, and remembers what committed.
    #[derive(Default)]
    struct Posts(Mutex<Vec<Applied>>);

    impl Consumer for Arc<Posts> {
        fn consumes(&self) -> &'static [EventKind] {
            &[EventKind::PostCreated]
        }

        fn apply(&self, tx: &mut Tx<'_>, _: &Event, event: &DomainEvent) -> Result<Outcome, StoreError> {
            let DomainEvent::PostCreated(post) = event else { return Ok(Outcome::Ignored) };
            tx.execute("INSERT INTO post (id) VALUES ($1)", &[&post.id])?;
            Ok(Outcome::Handled)
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
        crate::messaging::install(&store).await.unwrap();
        let seen = Arc::new(Posts::default());
        let inbox = inbox(&store, seen.clone());

        let post = event(json!({"id":"e1","seq":1,"type":"PostCreated","data":{"id":"p1","title":"t"}}));
        let liked = event(json!({"id":"e2","seq":2,"type":"PostLiked","data":{"id":"p1"}}));
        let bad = event(json!({"id":"e3","seq":3,"type":"PostCreated","data":{"id":"p2"}}));

        let first = inbox.deliver(vec![post.clone(), liked.clone(), bad]).await.unwrap();
        assert_eq!((first.applied, first.duplicates, first.ignored, first.rejected.len()), (1, 0, 1, 1));
        let again = inbox.deliver(vec![post.clone(), post]).await.unwrap();
        assert_eq!((again.applied, again.duplicates), (0, 2));

        let rows: i64 = store.read(|c| c.query_row("SELECT count(*) FROM post", &[], |r| r.get(0))).await.unwrap();
        assert_eq!(rows, 1);
        assert_eq!(seen.0.lock().unwrap().len(), 1);
        assert_eq!(inbox.cursor().await.unwrap(), 3, "applied, ignored and refused events all count");
        let ignored_only = inbox.deliver(vec![liked]).await.unwrap();
        assert_eq!((ignored_only.ignored, ignored_only.applied), (1, 0));
    }

    async fn inbox_over_posts() -> (tempfile::TempDir, Store, Inbox) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), "c", &["CREATE TABLE post (id TEXT PRIMARY KEY);"]).unwrap();
        crate::messaging::install(&store).await.unwrap();
        let inbox = inbox(&store, Arc::new(Posts::default()));
        (dir, store, inbox)
    }

    fn post(seq: u64) -> Event {
        event(json!({"id": format!("e{seq}"), "seq": seq, "type": "PostCreated", "data": {"id": format!("p{seq}"), "title": "t"}}))
    }

    fn liked(seq: u64) -> Event {
        event(json!({"id": format!("l{seq}"), "seq": seq, "type": "PostLiked", "data": {"id": "p"}}))
    }

    /// Requests asking at once share pulls, so a crowd costs the bus a read
    /// or two; a pull applies what the bus holds after the watermark, once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_pulls_share_reads_of_the_bus_and_apply_what_it_holds_once() {
        use axum::extract::Query;

        #[derive(serde::Deserialize)]
        struct After {
            after: u64,
        }
        async fn page(State(reads): State<Arc<AtomicU64>>, Query(query): Query<After>) -> axum::Json<Vec<Event>> {
            reads.fetch_add(1, Ordering::SeqCst);
            // Slow enough that the other requests ask while a pull runs.
            tokio::time::sleep(Duration::from_millis(20)).await;
            axum::Json((1..=3).map(post).filter(|e| e.seq > Some(query.after)).collect())
        }
        let reads = Arc::new(AtomicU64::new(0));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = url::Url::parse(&format!("http://{}", listener.local_addr().unwrap())).unwrap();
        let (_stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let shutdown = Shutdown::new(async move {
            let _ = stopped.await;
        });
        let bus = Router::new().route("/events", axum::routing::get(page)).with_state(reads.clone());
        tokio::spawn(crate::http::serve::serve(listener, bus, shutdown));

        let (_dir, store, _) = inbox_over_posts().await;
        let seen = Arc::new(Posts::default());
        let inbox = inbox_reading(&store, seen.clone(), &url);
        let crowd: Vec<_> = (0..20)
            .map(|_| {
                let inbox = inbox.clone();
                tokio::spawn(async move { inbox.pull().await })
            })
            .collect();
        for request in crowd {
            request.await.unwrap().unwrap();
        }
        let shared = reads.load(Ordering::SeqCst);
        assert!((1..=2).contains(&shared), "20 requests asking at once read the bus {shared} times");
        assert_eq!(seen.0.lock().unwrap().len(), 3, "each event applied once");
        assert_eq!(inbox.cursor().await.unwrap(), 3);
        inbox.pull().await.unwrap();
        assert_eq!(reads.load(Ordering::SeqCst), shared + 1, "a request asking later gets a pull of its own");
        assert_eq!(seen.0.lock().unwrap().len(), 3, "which finds nothing new");
    }

    #[tokio::test]
    async fn the_watermark_moves_only_over_gap_free_runs() {
        let (_dir, _store, inbox) = inbox_over_posts().await;
        inbox.deliver(vec![post(1), post(2)]).await.unwrap();
        assert_eq!(inbox.cursor().await.unwrap(), 2);

        // Pushes run ahead of the replay: 5 and 7 are applied, the watermark stays.
        inbox.deliver(vec![post(5)]).await.unwrap();
        inbox.deliver(vec![post(7)]).await.unwrap();
        assert_eq!(inbox.cursor().await.unwrap(), 2, "a push above a gap does not move the watermark");
        // Filling part of the gap moves it to the end of what is contiguous.
        inbox.deliver(vec![post(3)]).await.unwrap();
        assert_eq!(inbox.cursor().await.unwrap(), 3);
        // Ignored types count: 4 completes the run through 5, 6 through 7.
        inbox.deliver(vec![liked(4)]).await.unwrap();
        assert_eq!(inbox.cursor().await.unwrap(), 5);
        let replay = inbox.deliver(vec![post(5), liked(6), post(7), post(8)]).await.unwrap();
        assert_eq!((replay.applied, replay.duplicates, replay.ignored), (1, 2, 1));
        assert_eq!(inbox.cursor().await.unwrap(), 8);
    }

    #[tokio::test]
    async fn a_batch_covering_the_log_moves_the_watermark_over_numbers_the_log_lacks() {
        let (_dir, _store, inbox) = inbox_over_posts().await;
        inbox.deliver_range(vec![post(1), post(2)], Some(0)).await.unwrap();
        // The log has no 3 or 4 (a log written before its numbering was kept
        // dense): a push from cursor 2 holding 5 and 6 covers them.
        inbox.deliver_range(vec![post(5), post(6)], Some(2)).await.unwrap();
        assert_eq!(inbox.cursor().await.unwrap(), 6);
        // A push that continues from above the watermark covers nothing below it.
        inbox.deliver_range(vec![post(9)], Some(8)).await.unwrap();
        assert_eq!(inbox.cursor().await.unwrap(), 6, "7 and 8 may still exist");
        // ...until the range below it arrives; then the run through 9 counts.
        inbox.deliver_range(vec![post(8)], Some(6)).await.unwrap();
        assert_eq!(inbox.cursor().await.unwrap(), 9);
        // Without the hint (an operator's direct post), a gap stays a gap.
        inbox.deliver(vec![post(11)]).await.unwrap();
        assert_eq!(inbox.cursor().await.unwrap(), 9);
    }

    #[tokio::test]
    async fn out_of_order_batches_huge_and_missing_seqs_do_not_poison_the_watermark() {
        let (_dir, store, inbox) = inbox_over_posts().await;
        inbox.deliver(vec![post(3), post(1)]).await.unwrap();
        assert_eq!(inbox.cursor().await.unwrap(), 1);
        let huge = event(json!({"id": "h", "seq": u64::MAX, "type": "PostCreated", "data": {"id": "ph", "title": "t"}}));
        let big = event(json!({"id": "b", "seq": i64::MAX, "type": "PostCreated", "data": {"id": "pb", "title": "t"}}));
        let no_seq = event(json!({"id": "n", "type": "PostCreated", "data": {"id": "pn", "title": "t"}}));
        inbox.deliver(vec![huge, big, no_seq]).await.unwrap();
        assert_eq!(inbox.cursor().await.unwrap(), 1);
        inbox.deliver(vec![post(2)]).await.unwrap();
        assert_eq!(inbox.cursor().await.unwrap(), 3, "the gap filled, the watermark jumps over what was seen");
        let kept: i64 = store.read(|c| c.query_row("SELECT count(*) FROM replay_seen", &[], |r| r.get(0))).await.unwrap();
        assert_eq!(kept, 1, "only seqs above the watermark are kept (the far one)");
    }

    /// Replicas sharing one PostgreSQL database: the same batches delivered
    /// to two of them at the same moment (a push timed out and was sent
    /// again elsewhere) are applied once, and the shared watermark ends at
    /// the end of the log.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_replicas_given_the_same_batch_at_once_apply_it_once() {
        const SCHEMA: &[Migration] = &[Migration::same("CREATE TABLE post (id TEXT PRIMARY KEY);")];
        let Some(server) = crate::store::test_server::shared() else { return };
        let url = server.database().await;
        let mut replicas = Vec::new();
        for _ in 0..2 {
            let store = Store::connect(&url, "c", SCHEMA).await.unwrap();
            crate::messaging::install(&store).await.unwrap();
            let seen = Arc::new(Posts::default());
            let inbox = inbox(&store, seen.clone());
            replicas.push((inbox, seen, store));
        }
        let (a, b) = (&replicas[0].0, &replicas[1].0);
        for round in 0..6_u64 {
            let batch: Vec<Event> = (1..=50).map(|i| post(round * 50 + i)).collect();
            let (ra, rb) = tokio::join!(a.deliver_range(batch.clone(), Some(round * 50)), b.deliver_range(batch, Some(round * 50)));
            let (ra, rb) = (ra.unwrap(), rb.unwrap());
            assert_eq!((ra.applied + rb.applied, ra.duplicates + rb.duplicates), (50, 50), "round {round}: {ra:?} {rb:?}");
        }
        let store = &replicas[0].2;
        let rows: i64 = store.read(|c| c.query_row("SELECT count(*) FROM post", &[], |r| r.get(0))).await.unwrap();
        assert_eq!(rows, 300);
        let committed: usize = replicas.iter().map(|(_, seen, _)| seen.0.lock().unwrap().len()).sum();
        assert_eq!(committed, 300, "each event's after-commit hook ran once, on the replica that applied it");
        assert_eq!((a.cursor().await.unwrap(), b.cursor().await.unwrap()), (300, 300), "one watermark, shared");
    }

    /// Every answer names what the consumer consumes, the bus's empty ask
    /// included; a type it does not list never reaches `apply`, even one
    /// `apply` would take.
    #[tokio::test]
    async fn answers_name_the_consumed_types_and_only_those_are_applied() {
        use tower::ServiceExt;

        /// [`Posts`], which takes every post it is given, listing no posts.
        struct Unlisted(Arc<Posts>);
        impl Consumer for Unlisted {
            fn consumes(&self) -> &'static [EventKind] {
                &[EventKind::CommentCreated]
            }

            fn apply(&self, tx: &mut Tx<'_>, envelope: &Event, event: &DomainEvent) -> Result<Outcome, StoreError> {
                self.0.apply(tx, envelope, event)
            }
        }

        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), "c", &["CREATE TABLE post (id TEXT PRIMARY KEY);"]).unwrap();
        crate::messaging::install(&store).await.unwrap();
        let inbox = inbox(&store, Unlisted(Arc::default()));
        let secret = InternalSecret::parse(SECRET).unwrap();
        let push = |body: Value| {
            axum::http::Request::post("/events")
                .header(axum::http::header::AUTHORIZATION, secret.bearer())
                .header(axum::http::header::CONTENT_TYPE, "application/json")
                .header(&internal::COVERS_AFTER_HEADER, "0")
                .body(axum::body::Body::from(body.to_string()))
                .unwrap()
        };
        let router = inbox.router(&secret);
        let asked = router.clone().oneshot(push(json!([]))).await.unwrap();
        assert_eq!(asked.status(), StatusCode::OK);
        assert_eq!(internal::consumed(asked.headers()), Some(vec![EventKind::CommentCreated]));
        let pushed = router.oneshot(push(json!([post(1), post(2)]))).await.unwrap();
        assert_eq!(internal::consumed(pushed.headers()), Some(vec![EventKind::CommentCreated]));
        let rows: i64 = store.read(|c| c.query_row("SELECT count(*) FROM post", &[], |r| r.get(0))).await.unwrap();
        assert_eq!(rows, 0, "a type the consumer does not list is not applied");
        assert_eq!(inbox.cursor().await.unwrap(), 2, "but it counts towards the watermark");
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
