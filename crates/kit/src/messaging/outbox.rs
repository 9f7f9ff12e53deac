//! The transactional outbox: the unit of work that publishes, and the relay
//! that hands what it published to the bus.
//!
//! A writer says `outbox.commit(|tx| { tx.execute(..)?; tx.publish(&event)?; Ok(x) })`.
//! The events it publishes are written to the `outbox` table in the same
//! transaction as its rows, so the two commit or vanish together, and the
//! user gets an answer as soon as that commit is durable, whatever the bus is
//! doing. Nothing else is asked of the writer: the commit itself hands the
//! committed events to the relay in memory (on the database writer's thread,
//! in commit order) and wakes it, so the happy path neither polls nor reads
//! the events back from the table.
//!
//! The table stays the durable record: the relay deletes a row only once the
//! bus acknowledged its event, sweeps the table on start (and every
//! [`IDLE_CHECK`] when idle) for anything a crash left, and reads it back
//! whenever the in-memory queue overflowed while the bus was away. Until a
//! sweep finds the table caught up, hand-offs are not taken, so events always
//! reach the bus in commit order. The relay retries with the shared loop of
//! [`super::retry`]; the bus stores each event id once, so a batch re-sent
//! after a lost acknowledgement is harmless.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use blog_domain::Event;
use tokio::sync::Notify;

use super::{
    bus_client::BusClient,
    retry::{self, DeliveryError, Handover, Pass, Worker},
};
use crate::{
    metrics::{Counter, Registry},
    shutdown::Shutdown,
    store::{Store, StoreError, Tx},
};

/// The tables every service's database holds.
pub(crate) const SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS outbox (pos INTEGER PRIMARY KEY AUTOINCREMENT, event TEXT NOT NULL);
    CREATE TABLE IF NOT EXISTS outbox_refused (pos INTEGER PRIMARY KEY, event TEXT NOT NULL, error TEXT NOT NULL);
";

/// Events per request to the bus.
const BATCH: usize = 256;
/// Most events waiting in memory; past it the relay reads the table instead.
const QUEUE_CAP: usize = 16 * BATCH;
/// How often an idle relay sweeps the table: a safety net only.
pub const IDLE_CHECK: Duration = Duration::from_secs(5);

/// Committed events not yet acknowledged, by outbox position.
#[derive(Debug, Default)]
struct Queue {
    events: BTreeMap<i64, Event>,
    /// Set while the table may hold events the queue lacks (at start, after
    /// an overflow): hand-offs are dropped until a sweep catches up.
    behind: bool,
    /// Rows in the table at the last sweep.
    swept_depth: usize,
}

#[derive(Debug)]
struct Shared {
    queue: Mutex<Queue>,
    wake: Notify,
}

/// A service's outbox. Cheap to clone.
#[derive(Clone)]
pub struct Outbox {
    store: Store,
    shared: Arc<Shared>,
    published: Counter,
    retries: Counter,
    misdirected: Counter,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox").finish_non_exhaustive()
    }
}

impl Outbox {
    /// The outbox of `store`, whose database must hold [`SCHEMA`].
    pub fn new(store: Store, metrics: &Registry) -> Self {
        let shared = Arc::new(Shared { queue: Mutex::new(Queue { behind: true, ..Queue::default() }), wake: Notify::new() });
        let gauge = shared.clone();
        metrics.gauge("blog_outbox_depth", "Events committed and not yet acknowledged by the bus.", move |out| {
            let queue = gauge.queue.lock().unwrap_or_else(PoisonError::into_inner);
            out.push((String::new(), queue.events.len().max(if queue.behind { queue.swept_depth } else { 0 }) as f64));
        });
        Self {
            store,
            shared,
            published: metrics.counter("blog_outbox_published_total", "Events the bus acknowledged."),
            retries: metrics.counter("blog_outbox_retries_total", "Failed attempts to reach the bus."),
            misdirected: metrics.counter(
                "blog_outbox_misdirected_total",
                "4xx answers that did not refuse the events (wrong EVENT_BUS_URL or INTERNAL_SECRET); retried.",
            ),
        }
    }

    /// The unit of work: runs `f` in the next group commit, writes the events
    /// it publishes to the outbox in the same transaction, and once committed
    /// (on disk if `durable`) hands them to the relay.
    pub async fn commit<T, E, F>(&self, durable: bool, f: F) -> Result<T, E>
    where
        F: FnOnce(&mut Tx<'_>) -> Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        let shared = self.shared.clone();
        let stage = move |tx: &mut Tx<'_>| -> Result<(T, Vec<(i64, Event)>), E> {
            let value = f(tx)?;
            let mut staged = Vec::new();
            for event in tx.take_published() {
                let json = serde_json::to_string(&event).map_err(|e| StoreError::Commit(format!("cannot serialise an event: {e}")))?;
                let pos = tx.query_row("INSERT INTO outbox (event) VALUES ($1) RETURNING pos", &[&json], |row| row.get(0))?;
                staged.push((pos, event));
            }
            Ok((value, staged))
        };
        let hand_off = move |(_, staged): &mut (T, Vec<(i64, Event)>)| shared.hand_off(std::mem::take(staged));
        let (value, _) = self.store.submit(durable, stage, hand_off).await?;
        Ok(value)
    }

    /// Delivers committed events to the bus until `shutdown`. Events the bus
    /// refused earlier are re-driven first: each start of the service tries
    /// them again (after a fix to the bus, they go through; if still refused,
    /// they are set aside again).
    pub async fn relay(self, bus: BusClient, shutdown: Shutdown) {
        match self.redrive().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(events = n, "re-driving events the bus refused before"),
            Err(e) => tracing::error!(error = %e, "cannot re-drive refused events"),
        }
        retry::run(Relay { outbox: self, bus, sweep: true }, shutdown).await;
    }

    /// Moves every set-aside event back into the outbox; returns how many.
    pub async fn redrive(&self) -> Result<usize, StoreError> {
        self.store
            .write(|tx| {
                let moved = tx.execute("INSERT INTO outbox (event) SELECT event FROM outbox_refused ORDER BY pos", &[])?;
                tx.execute("DELETE FROM outbox_refused", &[])?;
                Ok(moved)
            })
            .await
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.shared.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The first batch waiting in memory.
    fn next_batch(&self) -> Vec<(i64, Event)> {
        self.queue().events.iter().take(BATCH).map(|(pos, event)| (*pos, event.clone())).collect()
    }

    /// Reads the oldest rows of the table into the queue.
    async fn sweep(&self) -> Result<(), StoreError> {
        let was_behind = self.queue().behind;
        let (rows, depth) = self
            .store
            .read(|tx| {
                let rows = tx.query_all("SELECT pos, event FROM outbox ORDER BY pos LIMIT $1", &[&(BATCH as i64)], |row| {
                    Ok((row.get::<i64>(0)?, row.get::<String>(1)?))
                })?;
                let depth: i64 = tx.query_row("SELECT count(*) FROM outbox", &[], |row| row.get(0))?;
                Ok::<_, StoreError>((rows, depth))
            })
            .await?;
        let caught_up = rows.len() < BATCH;
        let mut readable = Vec::with_capacity(rows.len());
        for (pos, json) in rows {
            match serde_json::from_str::<Event>(&json) {
                Ok(event) => readable.push((pos, event)),
                Err(e) => self.refuse(pos, json, &format!("unreadable outbox row: {e}")).await?,
            }
        }
        let mut queue = self.queue();
        queue.swept_depth = usize::try_from(depth).unwrap_or(0);
        queue.events.extend(readable);
        if caught_up && was_behind {
            queue.behind = false;
        }
        Ok(())
    }

    async fn acknowledged(&self, batch: &[(i64, Event)]) {
        let positions: Vec<i64> = batch.iter().map(|(pos, _)| *pos).collect();
        {
            let mut queue = self.queue();
            for pos in &positions {
                queue.events.remove(pos);
            }
        }
        let count = positions.len() as u64;
        let deleted = self
            .store
            .write_relaxed(move |tx| {
                for pos in &positions {
                    tx.execute("DELETE FROM outbox WHERE pos = $1", &[pos])?;
                }
                Ok::<_, StoreError>(())
            })
            .await;
        match deleted {
            Ok(()) => self.published.add(count),
            // The rows stay and are sent again after a sweep; the bus ignores the repeats.
            Err(e) => tracing::error!(error = %e, "cannot delete published events from the outbox"),
        }
    }

    async fn refuse(&self, pos: i64, json: String, error: &str) -> Result<(), StoreError> {
        self.queue().events.remove(&pos);
        let error = error.to_owned();
        self.store
            .write(move |tx| {
                tx.execute(
                    "INSERT INTO outbox_refused (pos, event, error) VALUES ($1, $2, $3)
                     ON CONFLICT (pos) DO UPDATE SET event = excluded.event, error = excluded.error",
                    &[&pos, &json, &error],
                )?;
                tx.execute("DELETE FROM outbox WHERE pos = $1", &[&pos])?;
                Ok(())
            })
            .await
    }
}

impl Shared {
    /// Takes committed events (on the writer thread, in commit order).
    fn hand_off(&self, staged: Vec<(i64, Event)>) {
        if staged.is_empty() {
            return;
        }
        {
            let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
            if !queue.behind && queue.events.len() + staged.len() > QUEUE_CAP {
                queue.behind = true;
            }
            if !queue.behind {
                queue.events.extend(staged);
            }
        }
        self.wake.notify_one();
    }
}

/// Why a pass of the relay failed.
#[derive(Debug, thiserror::Error)]
enum RelayError {
    #[error("cannot read the outbox: {0}")]
    Store(#[from] StoreError),
    #[error("publishing to the bus failed: {0}")]
    Bus(#[from] DeliveryError),
}

struct Relay {
    outbox: Outbox,
    bus: BusClient,
    /// Whether the next pass that finds the queue empty reads the table.
    sweep: bool,
}

impl Worker for Relay {
    type Error = RelayError;

    async fn pass(&mut self) -> Result<Pass, RelayError> {
        let mut batch = self.outbox.next_batch();
        if batch.is_empty() && (self.sweep || self.outbox.queue().behind) {
            let was_behind = self.outbox.queue().behind;
            self.outbox.sweep().await?;
            // One more sweep after catching up: it finds what was committed
            // while the queue was still not taking hand-offs.
            self.sweep = was_behind && !self.outbox.queue().behind;
            batch = self.outbox.next_batch();
        }
        if batch.is_empty() {
            return Ok(Pass::Idle);
        }
        retry::hand_over(&mut Publisher { outbox: &self.outbox, bus: &self.bus }, &batch).await?;
        Ok(Pass::Worked)
    }

    async fn idle(&mut self) {
        tokio::select! {
            () = self.outbox.shared.wake.notified() => {}
            () = tokio::time::sleep(IDLE_CHECK) => self.sweep = true,
        }
    }

    fn failed(&mut self, error: &RelayError, attempt: u32) {
        match error {
            RelayError::Bus(e) => {
                self.outbox.retries.inc();
                if e.is_misdirected() {
                    self.outbox.misdirected.inc();
                    tracing::error!(error = %e, attempt, "the bus URL or secret is wrong: publishing refused; will retry");
                } else {
                    tracing::warn!(error = %e, attempt, "publishing to the bus failed; will retry");
                }
            }
            RelayError::Store(e) => tracing::error!(error = %e, attempt, "cannot read the outbox; will retry"),
        }
    }
}

struct Publisher<'a> {
    outbox: &'a Outbox,
    bus: &'a BusClient,
}

impl Handover for Publisher<'_> {
    type Item = (i64, Event);

    async fn send(&mut self, batch: &[(i64, Event)]) -> Result<(), DeliveryError> {
        let events: Vec<Event> = batch.iter().map(|(_, event)| event.clone()).collect();
        self.bus.publish(&events).await
    }

    async fn accepted(&mut self, batch: &[(i64, Event)]) {
        self.outbox.acknowledged(batch).await;
    }

    async fn refused(&mut self, (pos, event): &(i64, Event), error: &DeliveryError) {
        tracing::error!(%error, event_id = %event.id, "the bus refused an event; moved to outbox_refused");
        let json = serde_json::to_string(event).unwrap_or_default();
        if let Err(e) = self.outbox.refuse(*pos, json, &error.to_string()).await {
            tracing::error!(error = %e, "cannot set the refused event aside");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        collections::HashSet,
        sync::atomic::{AtomicBool, Ordering},
    };

    use axum::{Json, Router, extract::State, http::StatusCode, response::IntoResponse, routing::post};
    use blog_domain::{DomainEvent, PostCreated};

    use super::*;
    use crate::{http::client::http_client, internal::InternalSecret};

    const SECRET: &str = "outbox-test-secret-0123456789";

    /// A bus that records the ids it accepts, answers 503 while `down`, and
    /// refuses (as the real bus does, marked) any batch holding the id "bad".
    #[derive(Clone, Default)]
    struct Bus {
        ids: Arc<Mutex<Vec<String>>>,
        down: Arc<AtomicBool>,
    }

    async fn receive(State(bus): State<Bus>, Json(body): Json<serde_json::Value>) -> axum::response::Response {
        let events: Vec<Event> = match body {
            serde_json::Value::Array(items) => items.into_iter().map(|item| Event::from_value(item).unwrap()).collect(),
            single => vec![Event::from_value(single).unwrap()],
        };
        if bus.down.load(Ordering::SeqCst) {
            return StatusCode::SERVICE_UNAVAILABLE.into_response();
        }
        if events.iter().any(|e| e.id == "bad") {
            return crate::internal::mark_refusal(StatusCode::BAD_REQUEST.into_response());
        }
        bus.ids.lock().unwrap().extend(events.into_iter().map(|e| e.id));
        StatusCode::OK.into_response()
    }

    impl Bus {
        async fn start(&self, shutdown: Shutdown) -> BusClient {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = url::Url::parse(&format!("http://{}", listener.local_addr().unwrap())).unwrap();
            let app = Router::new().route("/events", post(receive)).with_state(self.clone());
            tokio::spawn(crate::http::serve::serve(listener, app, shutdown));
            BusClient::new(http_client(Duration::from_secs(5)), &url, InternalSecret::parse(SECRET).unwrap())
        }

        fn ids(&self) -> Vec<String> {
            self.ids.lock().unwrap().clone()
        }

        /// Waits (polling, with a deadline) until `count` distinct ids arrived.
        async fn wait_for(&self, count: usize) -> Vec<String> {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            loop {
                let ids = self.ids();
                if ids.iter().collect::<HashSet<_>>().len() >= count {
                    return ids;
                }
                assert!(tokio::time::Instant::now() < deadline, "{} of {count} events arrived", ids.len());
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }

    fn event(id: &str) -> Event {
        let mut event = Event::new(&DomainEvent::PostCreated(PostCreated { id: id.to_owned(), title: "t".to_owned() }), None);
        event.id = id.to_owned();
        event
    }

    async fn outbox() -> (tempfile::TempDir, Store, Outbox) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), "outbox", &["CREATE TABLE item (id TEXT PRIMARY KEY);"]).unwrap();
        crate::messaging::install(&store).await.unwrap();
        let outbox = Outbox::new(store.clone(), &Registry::default());
        (dir, store, outbox)
    }

    async fn publish(outbox: &Outbox, ids: Vec<String>) {
        outbox
            .commit(true, move |tx| {
                for id in &ids {
                    tx.execute("INSERT INTO item (id) VALUES ($1)", &[id])?;
                    tx.publish(&event(id))?;
                }
                Ok::<_, StoreError>(())
            })
            .await
            .unwrap();
    }

    async fn rows(store: &Store, table: &'static str) -> i64 {
        store.read(move |tx| tx.query_row(&format!("SELECT count(*) FROM {table}"), &[], |r| r.get(0))).await.unwrap()
    }

    /// Waits (polling, with a deadline) until the tables hold `pending` and `refused` rows.
    async fn settles_at(store: &Store, pending: i64, refused: i64) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while rows(store, "outbox").await != pending || rows(store, "outbox_refused").await != refused {
            assert!(tokio::time::Instant::now() < deadline, "the outbox never held {pending} rows and {refused} refused");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn never() -> Shutdown {
        Shutdown::new(std::future::pending())
    }

    #[tokio::test]
    async fn what_a_crash_left_goes_out_first_then_new_commits_in_commit_order() {
        let (_dir, store, outbox) = outbox().await;
        // Committed by an earlier run whose relay never got to them.
        publish(&outbox, vec!["e1".into(), "e2".into()]).await;
        publish(&outbox, vec!["e3".into()]).await;
        let bus = Bus::default();
        let client = bus.start(never()).await;
        tokio::spawn(outbox.clone().relay(client, never()));
        publish(&outbox, vec!["e4".into()]).await;
        publish(&outbox, vec!["e5".into(), "e6".into()]).await;
        assert_eq!(bus.wait_for(6).await, ["e1", "e2", "e3", "e4", "e5", "e6"]);
        settles_at(&store, 0, 0).await;
    }

    #[tokio::test]
    async fn a_refused_event_is_set_aside_and_the_rest_of_its_batch_goes_through() {
        let (_dir, store, outbox) = outbox().await;
        let bus = Bus::default();
        tokio::spawn(outbox.clone().relay(bus.start(never()).await, never()));
        publish(&outbox, vec!["a".into(), "bad".into(), "c".into()]).await;
        assert_eq!(bus.wait_for(2).await, ["a", "c"]);
        settles_at(&store, 0, 1).await;
    }

    #[tokio::test]
    async fn a_long_outage_overflows_memory_and_every_event_still_arrives_once_in_order() {
        let (_dir, _store, outbox) = outbox().await;
        let bus = Bus::default();
        bus.down.store(true, Ordering::SeqCst);
        tokio::spawn(outbox.clone().relay(bus.start(never()).await, never()));
        let total = QUEUE_CAP + 3 * BATCH + 7;
        let ids: Vec<String> = (0..total).map(|i| format!("e{i:06}")).collect();
        for chunk in ids.chunks(1_000) {
            publish(&outbox, chunk.to_vec()).await;
        }
        assert!(outbox.queue().behind, "past {QUEUE_CAP} waiting events the queue stops taking hand-offs");
        bus.down.store(false, Ordering::SeqCst);
        let arrived = bus.wait_for(total).await;
        let mut first_seen = Vec::new();
        let mut seen = HashSet::new();
        for id in &arrived {
            if seen.insert(id.clone()) {
                first_seen.push(id.clone());
            }
        }
        assert_eq!(first_seen, ids, "each event arrives, in commit order");
    }

    #[tokio::test]
    async fn a_plain_write_that_publishes_fails_rather_than_lose_the_event() {
        let (_dir, store, _outbox) = outbox().await;
        let result = store
            .write(|tx| {
                tx.execute("INSERT INTO item (id) VALUES ('x')", &[])?;
                tx.publish(&event("lost"))
            })
            .await;
        assert!(matches!(result, Err(StoreError::Unpublished)), "{result:?}");
        assert_eq!(rows(&store, "item").await, 0, "and writes nothing");
    }
}
