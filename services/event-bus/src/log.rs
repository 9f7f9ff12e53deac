//! The append-only event log and the subscribers' delivery cursors, in the
//! bus's own SQLite database.
//!
//! An event is acknowledged to its publisher only after the group commit that
//! stored it is on disk. Its id is unique, so a publisher retrying after a
//! lost answer gets the original sequence number back instead of a copy.
//!
//! The most recent events are also kept in memory, so the deliverers (one per
//! subscriber) do not each read and parse every event back from SQLite. Every
//! sequence number up to the head is committed, so a deliverer that finds no
//! cached run after its cursor reads the database instead and is never wrong.
//!
//! With `EVENT_STORE=nats://…` the same log lives in a JetStream stream
//! instead ([`jetstream`]), shared by every bus replica: the cache and the
//! head then follow the stream (every replica's appends) through a tail, and
//! a replica caches what it appended itself at once when it follows what the
//! cache holds.

pub mod jetstream;

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use blog_domain::Event;
use blog_kit::{StoreError, Tx, store::Store, telemetry};
use serde_json::{Map, Value};
use tokio::sync::{Notify, broadcast, watch};

use crate::flow::{Flow, Published};

/// Events kept in memory for delivery.
const RECENT: usize = 8_192;
/// How often a replica on JetStream reads the stream's head besides following its tail.
const HEAD_CHECK: Duration = Duration::from_secs(1);
/// How long a deliverer's progress may wait to be saved: the cursors that
/// moved meanwhile are saved together, off the deliverers' path.
pub const CURSOR_SAVE_EVERY: Duration = Duration::from_millis(100);

pub const MIGRATIONS: &[&str] = &[
    "
    CREATE TABLE event (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        type TEXT NOT NULL,
        data TEXT NOT NULL,
        timestamp INTEGER NOT NULL,
        request_id TEXT
    );
    CREATE TABLE subscriber_cursor (name TEXT PRIMARY KEY, seq INTEGER NOT NULL) WITHOUT ROWID;
",
    "ALTER TABLE event ADD COLUMN traceparent TEXT;",
];

/// Where one stored event landed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Stored {
    pub id: String,
    pub seq: u64,
}

/// Where the events are kept.
#[derive(Debug, Clone)]
enum Backend {
    Sqlite(Store),
    // Boxed: the client's handles are large, and clones should stay cheap.
    JetStream(Arc<jetstream::JetStreamLog>),
}

#[derive(Debug, Clone)]
pub struct EventLog {
    backend: Backend,
    head: watch::Sender<u64>,
    recent: Arc<Mutex<BTreeMap<u64, Event>>>,
    flow: broadcast::Sender<Flow>,
    cursors: Arc<MovedCursors>,
}

/// Delivery cursors that moved and are not saved yet, by subscriber.
#[derive(Debug, Default)]
struct MovedCursors {
    moved: Mutex<BTreeMap<String, u64>>,
    wake: Notify,
}

impl EventLog {
    pub async fn open(store: Store) -> Result<Self, StoreError> {
        let head = store
            .read(|tx| Ok::<_, StoreError>(tx.query_row("SELECT coalesce(max(seq), 0) FROM event", &[], |r| r.get::<i64>(0))? as u64))
            .await?;
        Ok(Self::new(Backend::Sqlite(store), head))
    }

    fn new(backend: Backend, head: u64) -> Self {
        Self {
            backend,
            head: watch::Sender::new(head),
            recent: Arc::default(),
            flow: broadcast::Sender::new(crate::flow::BUFFER),
            cursors: Arc::default(),
        }
    }

    /// The log in JetStream at `url` (`nats://host:port[,host:port…]`), and a
    /// task following its tail until `shutdown`.
    /// `credentials`, when the servers require them (ours do).
    /// `replica` names this replica in the delivery leases it takes.
    pub async fn open_jetstream(
        url: &str,
        credentials: Option<&jetstream::Credentials>,
        replica: &str,
        shutdown: blog_kit::Shutdown,
    ) -> Result<Self, StoreError> {
        let stream = Arc::new(jetstream::JetStreamLog::connect(url, credentials, replica).await?);
        let head = stream.head().await?;
        let log = Self::new(Backend::JetStream(stream.clone()), head);
        tokio::spawn(log.clone().follow(stream.clone(), head, shutdown.clone()));
        tokio::spawn(log.clone().check_head(stream, shutdown));
        Ok(log)
    }

    /// A safety net under [`EventLog::follow`]: JetStream's own head, every
    /// [`HEAD_CHECK`]. After a node of the cluster died, the tail's ordered
    /// consumer was seen to stall without an error (CI: a subscriber missed
    /// the last event for 20 s); a head moved here wakes the deliverers, and
    /// [`EventLog::after`] reads what the cache lacks from the stream itself.
    async fn check_head(self, stream: Arc<jetstream::JetStreamLog>, shutdown: blog_kit::Shutdown) {
        while !shutdown.sleep(HEAD_CHECK).await {
            match stream.head().await {
                Ok(head) => self.advance(head),
                Err(e) => tracing::debug!(error = %e, "cannot read JetStream's head; the tail and the next check will"),
            }
        }
    }

    /// Caches what any replica stores after `after`, moves the head and
    /// feeds `/flow`; follows again from the last event seen if the tail
    /// ends (the client recreates it after most failures by itself).
    async fn follow(self, stream: Arc<jetstream::JetStreamLog>, mut after: u64, shutdown: blog_kit::Shutdown) {
        use futures_util::StreamExt;
        loop {
            match stream.tail(after).await {
                Ok(tail) => {
                    let stop = shutdown.clone();
                    let mut tail = std::pin::pin!(tail.take_until(async move { stop.wait().await }));
                    while let Some(event) = tail.next().await {
                        match event {
                            Ok(event) => {
                                let seq = event.seq.unwrap_or(0);
                                after = after.max(seq);
                                self.remember(vec![event]);
                                self.advance(seq);
                            }
                            Err(e) => tracing::warn!(error = %e, "following the JetStream log"),
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot follow the JetStream log; retrying"),
            }
            if shutdown.sleep(Duration::from_secs(1)).await {
                return;
            }
        }
    }

    fn advance(&self, seq: u64) {
        self.head.send_if_modified(|head| {
            let moved = seq > *head;
            *head = (*head).max(seq);
            moved
        });
    }

    /// The live feed of stored and delivered events.
    pub fn flow(&self) -> &broadcast::Sender<Flow> {
        &self.flow
    }

    /// The highest sequence number stored; deliverers watch it for changes.
    pub fn head(&self) -> watch::Receiver<u64> {
        self.head.subscribe()
    }

    pub fn head_now(&self) -> u64 {
        *self.head.borrow()
    }

    /// Stores `events` durably, each id once.
    pub async fn append(&self, events: Vec<Event>) -> Result<Vec<Stored>, StoreError> {
        let now = now_millis();
        let traced = telemetry::lag_ids(&events);
        let store = match &self.backend {
            Backend::Sqlite(store) => store,
            Backend::JetStream(stream) => {
                // Cached now if they follow what the cache holds (else the
                // tail brings them, in order); the head moves now so
                // deliverers need not wait for the tail.
                telemetry::lag_mark("bus.appending", traced.iter().map(String::as_str));
                let (stored, fresh) = stream.append(events, &format_millis(now)).await?;
                telemetry::lag_mark("bus.stored", traced.iter().map(String::as_str));
                self.remember_following(fresh);
                if let Some(max) = stored.iter().map(|s| s.seq).max() {
                    self.advance(max);
                }
                return Ok(stored);
            }
        };
        let traced_in_writer = traced.clone();
        let (stored, fresh) = store
            .write(move |tx| {
                telemetry::lag_mark("bus.appending", traced_in_writer.iter().map(String::as_str));
                let mut stored = Vec::with_capacity(events.len());
                let mut fresh = Vec::with_capacity(events.len());
                let timestamp = format_millis(now);
                for mut event in events {
                    let data = Value::Object(std::mem::take(&mut event.data)).to_string();
                    // Looked up first rather than `ON CONFLICT DO NOTHING`:
                    // a conflicting insert still consumes an AUTOINCREMENT
                    // number, and the log's numbering must have no gaps
                    // (consumers' replay watermarks move over gap-free runs).
                    let existing: Option<i64> = tx.query_one("SELECT seq FROM event WHERE id = $1", &[&event.id], |r| r.get(0))?;
                    let inserted = usize::from(existing.is_none());
                    let seq = match existing {
                        Some(seq) => seq,
                        None => tx.query_row(
                            "INSERT INTO event (id, type, data, timestamp, request_id, traceparent) VALUES ($1, $2, $3, $4, $5, $6) RETURNING seq",
                            &[&event.id, &event.kind.as_str(), &data, &now, &event.request_id, &event.traceparent],
                            |r| r.get(0),
                        )?,
                    } as u64;
                    stored.push(Stored { id: event.id.clone(), seq });
                    if inserted == 1 {
                        event.data = serde_json::from_str(&data).unwrap_or_default();
                        event.seq = Some(seq);
                        event.timestamp = Some(timestamp.clone());
                        fresh.push(event);
                    }
                }
                Ok::<_, StoreError>((stored, fresh))
            })
            .await?;
        telemetry::lag_mark("bus.stored", traced.iter().map(String::as_str));
        self.remember(fresh);
        if let Some(max) = stored.iter().map(|s| s.seq).max() {
            self.advance(max);
        }
        Ok(stored)
    }

    /// Caches freshly stored events and tells flow watchers about them,
    /// each once (on JetStream the replica that stored an event may have
    /// cached it before its tail brings it).
    fn remember(&self, fresh: Vec<Event>) {
        self.cache(fresh, false);
    }

    /// Like [`EventLog::remember`], for the events this replica just stored
    /// on JetStream: only as long as each follows what the cache holds, so
    /// the cache stays a run without gaps and `/flow` tells the log's order;
    /// the tail brings the rest.
    fn remember_following(&self, fresh: Vec<Event>) {
        self.cache(fresh, true);
    }

    fn cache(&self, fresh: Vec<Event>, following: bool) {
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        for event in fresh {
            let seq = event.seq.unwrap_or(0);
            if recent.contains_key(&seq) {
                continue;
            }
            if following && recent.last_key_value().is_none_or(|(last, _)| *last + 1 != seq) {
                break;
            }
            if self.flow.receiver_count() > 0 {
                let record = Published {
                    seq,
                    id: event.id.clone(),
                    kind: event.kind.clone(),
                    data: event.data.clone(),
                    timestamp: event.timestamp.clone().unwrap_or_default(),
                };
                let _ = self.flow.send(Flow::Published(record));
            }
            recent.insert(seq, event);
        }
        while recent.len() > RECENT {
            recent.pop_first();
        }
    }

    /// Up to `limit` events after `after`, in order.
    pub async fn after(&self, after: u64, limit: u32) -> Result<Vec<Event>, StoreError> {
        // On SQLite the head moves only once its events are committed here,
        // so nothing lies beyond it: a caught-up deliverer needs no read
        // (every delivery ends with one such call). JetStream's head can lag
        // the stream (other replicas append), so there the stream is asked.
        if matches!(self.backend, Backend::Sqlite(_)) && after >= self.head_now() {
            return Ok(Vec::new());
        }
        let cached: Vec<Event> = {
            let recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
            recent
                .range(after + 1..)
                .take(limit as usize)
                .enumerate()
                .take_while(|(i, (seq, _))| **seq == after + 1 + *i as u64)
                .map(|(_, (_, event))| event.clone())
                .collect()
        };
        // A run short of both the page and the head is the cache lagging
        // behind the log (JetStream's tail): read the log itself.
        let complete = cached.len() == limit as usize || cached.last().and_then(|e| e.seq) >= Some(self.head_now());
        if !cached.is_empty() && complete {
            return Ok(cached);
        }
        match &self.backend {
            Backend::Sqlite(store) => store.read(move |tx| read_after(tx, after, limit)).await,
            Backend::JetStream(stream) => stream.after(after, limit).await,
        }
    }

    pub async fn cursors(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let store = match &self.backend {
            Backend::Sqlite(store) => store,
            Backend::JetStream(stream) => return stream.cursors().await,
        };
        store
            .read(|tx| tx.query_all("SELECT name, seq FROM subscriber_cursor", &[], |r| Ok((r.get::<String>(0)?, r.get::<i64>(1)? as u64))))
            .await
    }

    /// Records that `name`'s deliverer got to `seq`; saved within
    /// [`CURSOR_SAVE_EVERY`] by [`EventLog::save_moved_cursors`], together
    /// with every other cursor that moved meanwhile. A deliverer need not
    /// wait for a write after each push, and the bus writes once per period
    /// for all of them rather than once per push. A crash loses at most that
    /// period's progress: events the subscribers are sent again and recognise.
    pub fn cursor_moved(&self, name: &str, seq: u64) {
        let mut moved = self.cursors.moved.lock().unwrap_or_else(|p| p.into_inner());
        let cursor = moved.entry(name.to_owned()).or_default();
        *cursor = (*cursor).max(seq);
        drop(moved);
        self.cursors.wake.notify_one();
    }

    /// Saves the cursors that moved, [`CURSOR_SAVE_EVERY`] after the first
    /// of them did, until `shutdown`. What the deliverers do while they stop
    /// is the caller's to save, with [`EventLog::save_cursors_now`].
    pub async fn save_moved_cursors(self, shutdown: blog_kit::Shutdown) {
        let mut failing = false;
        loop {
            tokio::select! {
                () = self.cursors.wake.notified() => {}
                () = shutdown.wait() => return,
            }
            if shutdown.sleep(CURSOR_SAVE_EVERY).await {
                return;
            }
            match self.save_cursors_now().await {
                Ok(()) => failing = false,
                Err(e) => {
                    if !failing {
                        tracing::error!(error = %e, "cannot persist the delivery cursors; retrying");
                    }
                    failing = true;
                    // Taken back by `save_cursors_now`; tried again next period.
                    self.cursors.wake.notify_one();
                }
            }
        }
    }

    /// Saves every cursor that moved since the last save; on failure they
    /// stay to be saved next time.
    pub async fn save_cursors_now(&self) -> Result<(), StoreError> {
        let moved = std::mem::take(&mut *self.cursors.moved.lock().unwrap_or_else(|p| p.into_inner()));
        if moved.is_empty() {
            return Ok(());
        }
        let result = self.save_cursors(moved.clone()).await;
        if result.is_err() {
            let mut pending = self.cursors.moved.lock().unwrap_or_else(|p| p.into_inner());
            for (name, seq) in moved {
                let cursor = pending.entry(name).or_default();
                *cursor = (*cursor).max(seq);
            }
        }
        result
    }

    /// Moves each cursor to its `seq` unless it is already beyond. Relaxed,
    /// in one commit on SQLite: a cursor lost to a power loss only means
    /// redelivering events the subscriber recognises.
    async fn save_cursors(&self, cursors: BTreeMap<String, u64>) -> Result<(), StoreError> {
        let store = match &self.backend {
            Backend::Sqlite(store) => store,
            Backend::JetStream(stream) => {
                for (name, seq) in &cursors {
                    stream.save_cursor(name, *seq).await?;
                }
                return Ok(());
            }
        };
        store
            .write_relaxed(move |tx| {
                for (name, seq) in &cursors {
                    tx.execute(
                        "INSERT INTO subscriber_cursor (name, seq) VALUES ($1, $2)
                         ON CONFLICT (name) DO UPDATE SET seq = max(subscriber_cursor.seq, excluded.seq)",
                        &[name, &(*seq as i64)],
                    )?;
                }
                Ok(())
            })
            .await
    }

    /// The delivery leases, when the log is shared by replicas (JetStream).
    pub fn leases(&self) -> Option<crate::lease::Leases> {
        match &self.backend {
            Backend::Sqlite(_) => None,
            Backend::JetStream(stream) => Some(stream.leases().clone()),
        }
    }

    pub async fn ping(&self) -> bool {
        match &self.backend {
            Backend::Sqlite(store) => store.ping().await,
            Backend::JetStream(stream) => stream.ping(),
        }
    }

    /// The JetStream log, when the events live there.
    pub fn jetstream(&self) -> Option<&jetstream::JetStreamLog> {
        match &self.backend {
            Backend::Sqlite(_) => None,
            Backend::JetStream(stream) => Some(stream),
        }
    }
}

fn read_after(tx: &Tx<'_>, after: u64, limit: u32) -> Result<Vec<Event>, StoreError> {
    tx.query_all(
        "SELECT seq, id, type, data, timestamp, request_id, traceparent FROM event WHERE seq > $1 ORDER BY seq LIMIT $2",
        &[&(after as i64), &limit],
        |row| {
            let data: String = row.get(3)?;
            let millis: i64 = row.get(4)?;
            Ok(Event {
                seq: Some(row.get::<i64>(0)? as u64),
                id: row.get(1)?,
                kind: row.get::<String>(2)?.into(),
                data: serde_json::from_str::<Map<String, Value>>(&data).unwrap_or_default(),
                timestamp: Some(format_millis(millis)),
                request_id: row.get(5)?,
                traceparent: row.get(6)?,
            })
        },
    )
}

pub fn now_millis() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

fn format_millis(millis: i64) -> String {
    let time = UNIX_EPOCH + Duration::from_millis(millis.max(0) as u64);
    humantime::format_rfc3339_millis(time).to_string()
}

#[cfg(test)]
pub(crate) mod tests {
    use blog_kit::store::Store;

    use super::*;

    fn stored(seq: u64) -> Event {
        let mut event =
            Event::from_value(serde_json::json!({"id": format!("e{seq}"), "type": "PostCreated", "data": {"id": "p", "title": "t"}}))
                .unwrap();
        event.seq = Some(seq);
        event
    }

    /// What a replica stored itself is cached only while it follows the
    /// cache, so the cache has no gaps; `/flow` hears of each event once, in
    /// the log's order, whichever of the append and the tail brings it first.
    #[tokio::test]
    async fn events_this_replica_stored_are_cached_only_in_order_and_told_once() {
        let dir = tempfile::tempdir().unwrap();
        let log = EventLog::open(Store::open(dir.path(), "event-bus", MIGRATIONS).unwrap()).await.unwrap();
        let mut flow = log.flow().subscribe();
        log.remember(vec![stored(1), stored(2)]);
        log.remember_following(vec![stored(4)]);
        assert!(!log.recent.lock().unwrap().contains_key(&4), "after a gap the tail brings it");
        log.remember_following(vec![stored(3), stored(4)]);
        log.remember(vec![stored(3), stored(4)]);
        assert_eq!(log.recent.lock().unwrap().keys().copied().collect::<Vec<_>>(), [1, 2, 3, 4]);
        let mut told = Vec::new();
        while let Ok(Flow::Published(p)) = flow.try_recv() {
            told.push(p.seq);
        }
        assert_eq!(told, [1, 2, 3, 4]);
        log.remember_following(vec![stored(5)]);
        assert!(log.recent.lock().unwrap().contains_key(&5));
    }

    /// Waits until `log`'s persisted cursors are `expected` (by name).
    pub(crate) async fn saved(log: &EventLog, expected: &[(&str, u64)]) {
        let expected: Vec<(String, u64)> = expected.iter().map(|(name, seq)| ((*name).to_owned(), *seq)).collect();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let mut cursors = log.cursors().await.unwrap();
            cursors.sort();
            if cursors == expected {
                return;
            }
            assert!(std::time::Instant::now() < deadline, "persisted cursors {cursors:?}, expected {expected:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Deliverers' progress is saved by one task, each cursor at the highest
    /// it was moved to, shortly after it moved; what moved last is saved when
    /// the bus stops, without waiting for the period.
    #[tokio::test]
    async fn moved_cursors_are_saved_together_shortly_after_and_at_shutdown() {
        let dir = tempfile::tempdir().unwrap();
        let log = EventLog::open(Store::open(dir.path(), "event-bus", MIGRATIONS).unwrap()).await.unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let saver = tokio::spawn(log.clone().save_moved_cursors(blog_kit::Shutdown::new(async move {
            let _ = stopped.await;
        })));
        log.cursor_moved("query", 3);
        log.cursor_moved("query", 2);
        log.cursor_moved("comments", 5);
        saved(&log, &[("comments", 5), ("query", 3)]).await;
        log.cursor_moved("query", 9);
        stop.send(()).unwrap();
        saver.await.unwrap();
        // What moved after the last period is saved by the stopping bus.
        log.save_cursors_now().await.unwrap();
        let mut cursors = log.cursors().await.unwrap();
        cursors.sort();
        assert_eq!(cursors, [("comments".to_owned(), 5), ("query".to_owned(), 9)]);
    }
}
