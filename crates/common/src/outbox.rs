//! The transactional outbox of a publishing service.
//!
//! A handler stages its event with [`stage`] inside the same transaction as
//! the row it describes, so the two commit or vanish together; the user gets
//! an answer as soon as that commit is durable, whatever the bus is doing.
//! The relay then hands staged events to the bus in batches, deleting them
//! only once the bus has acknowledged them. It is woken the moment something
//! is staged, so the happy path adds no polling delay, and it retries with
//! exponential backoff and jitter while the bus is away. The bus stores each
//! event id once, so a batch re-sent after a lost acknowledgement is harmless.

use std::{sync::Arc, time::Duration};

use rusqlite::Connection;
use tokio::sync::Notify;

use crate::{
    bus_client::{BusClient, BusError},
    events::Event,
    metrics::{Counter, Registry},
    server::Shutdown,
    store::{Store, StoreError},
};

/// The tables every publishing service's database holds.
pub const SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS outbox (pos INTEGER PRIMARY KEY AUTOINCREMENT, event TEXT NOT NULL);
    CREATE TABLE IF NOT EXISTS outbox_refused (pos INTEGER PRIMARY KEY, event TEXT NOT NULL, error TEXT NOT NULL);
";

const BATCH: u32 = 256;
/// How often the relay looks at the outbox when nothing woke it: a safety net
/// only; staging wakes it at once.
const IDLE_CHECK: Duration = Duration::from_secs(5);

/// Stages `event` for publication, inside the caller's transaction.
pub fn stage(conn: &Connection, event: &Event) -> rusqlite::Result<()> {
    let json = serde_json::to_string(event).map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
    conn.execute("INSERT INTO outbox (event) VALUES (?1)", [json])?;
    Ok(())
}

/// Handle to a service's outbox: wakes the relay and reports its progress.
#[derive(Clone)]
pub struct Outbox {
    store: Store,
    wake: Arc<Notify>,
    published: Counter,
    retries: Counter,
    misdirected: Counter,
    depth: Arc<std::sync::atomic::AtomicU64>,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox").finish_non_exhaustive()
    }
}

impl Outbox {
    pub fn new(store: Store, metrics: &Registry) -> Self {
        let depth = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let gauge = depth.clone();
        metrics.gauge("blog_outbox_depth", "Events staged and not yet acknowledged by the bus.", move |out| {
            out.push((String::new(), gauge.load(std::sync::atomic::Ordering::Relaxed) as f64));
        });
        Self {
            store,
            wake: Arc::new(Notify::new()),
            published: metrics.counter("blog_outbox_published_total", "Events the bus acknowledged."),
            retries: metrics.counter("blog_outbox_retries_total", "Failed attempts to reach the bus."),
            misdirected: metrics.counter(
                "blog_outbox_misdirected_total",
                "4xx answers that did not refuse the events (wrong EVENT_BUS_URL or INTERNAL_SECRET); retried.",
            ),
            depth,
        }
    }

    /// Tells the relay that something was staged and committed.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Delivers staged events to the bus until `shutdown`. Events the bus
    /// refused earlier are re-driven first: each start of the service tries
    /// them again (after a fix to the bus, they go through; if still refused,
    /// they are set aside again).
    pub async fn relay(self, bus: BusClient, shutdown: Shutdown) {
        match self.redrive().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(events = n, "re-driving events the bus refused before"),
            Err(e) => tracing::error!(error = %e, "cannot re-drive refused events"),
        }
        let mut failures: u32 = 0;
        loop {
            let batch = match self.pending().await {
                Ok(batch) => batch,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the outbox");
                    failures += 1;
                    if shutdown.sleep(backoff(failures)).await {
                        return;
                    }
                    continue;
                }
            };
            if batch.is_empty() {
                tokio::select! {
                    () = self.wake.notified() => {}
                    () = tokio::time::sleep(IDLE_CHECK) => {}
                    () = shutdown.wait() => return,
                }
                continue;
            }
            match self.publish(&bus, batch).await {
                Ok(()) => failures = 0,
                Err(e) => {
                    failures += 1;
                    self.retries.inc();
                    if e.is_misdirected() {
                        self.misdirected.inc();
                        tracing::error!(error = %e, attempt = failures, "the bus URL or secret is wrong: publishing refused; will retry");
                    } else {
                        tracing::warn!(error = %e, attempt = failures, "publishing to the bus failed; will retry");
                    }
                    if shutdown.sleep(backoff(failures)).await {
                        return;
                    }
                }
            }
        }
    }

    async fn pending(&self) -> Result<Vec<(i64, Event)>, StoreError> {
        let (rows, depth) = self
            .store
            .read(|conn| {
                let mut stmt = conn.prepare_cached("SELECT pos, event FROM outbox ORDER BY pos LIMIT ?1")?;
                let rows =
                    stmt.query_map([BATCH], |row| Ok((row.get::<_, i64>(0)?, row.get::<_, String>(1)?)))?.collect::<Result<Vec<_>, _>>()?;
                let depth: i64 = conn.query_row("SELECT count(*) FROM outbox", [], |row| row.get(0))?;
                Ok::<_, StoreError>((rows, depth))
            })
            .await?;
        self.depth.store(depth as u64, std::sync::atomic::Ordering::Relaxed);
        let mut batch = Vec::with_capacity(rows.len());
        for (pos, json) in rows {
            match serde_json::from_str::<Event>(&json) {
                Ok(event) => batch.push((pos, event)),
                Err(e) => self.refuse(pos, json, &format!("unreadable outbox row: {e}")).await?,
            }
        }
        Ok(batch)
    }

    async fn publish(&self, bus: &BusClient, batch: Vec<(i64, Event)>) -> Result<(), BusError> {
        let events: Vec<Event> = batch.iter().map(|(_, e)| e.clone()).collect();
        match bus.publish(&events).await {
            Ok(()) => {
                let last = batch.last().map_or(0, |(pos, _)| *pos);
                self.acknowledged(last, events.len()).await;
                Ok(())
            }
            Err(e) if e.is_transient() => Err(e),
            // The bus refused the request itself: find the event it objects to
            // by sending one at a time, and set that one aside, so one bad event
            // cannot block every later one.
            Err(e) if batch.len() == 1 => {
                let (pos, event) = &batch[0];
                tracing::error!(error = %e, event_id = %event.id, "the bus refused an event; moved to outbox_refused");
                let json = serde_json::to_string(event).unwrap_or_default();
                if let Err(err) = self.refuse(*pos, json, &e.to_string()).await {
                    tracing::error!(error = %err, "cannot set the refused event aside");
                }
                Ok(())
            }
            Err(_) => {
                for single in batch {
                    Box::pin(self.publish(bus, vec![single])).await?;
                }
                Ok(())
            }
        }
    }

    async fn acknowledged(&self, last: i64, count: usize) {
        let deleted = self
            .store
            .write_relaxed(move |conn| conn.execute("DELETE FROM outbox WHERE pos <= ?1", [last]).map_err(StoreError::from))
            .await;
        match deleted {
            Ok(_) => self.published.add(count as u64),
            // The rows stay and are sent again; the bus ignores the repeats.
            Err(e) => tracing::error!(error = %e, "cannot delete published events from the outbox"),
        }
    }

    /// Moves every set-aside event back into the outbox; returns how many.
    pub async fn redrive(&self) -> Result<usize, StoreError> {
        self.store
            .write(|conn| {
                let moved = conn.execute("INSERT INTO outbox (event) SELECT event FROM outbox_refused ORDER BY pos", [])?;
                conn.execute("DELETE FROM outbox_refused", [])?;
                Ok(moved)
            })
            .await
    }

    async fn refuse(&self, pos: i64, json: String, error: &str) -> Result<(), StoreError> {
        let error = error.to_owned();
        self.store
            .write(move |conn| {
                conn.execute(
                    "INSERT OR REPLACE INTO outbox_refused (pos, event, error) VALUES (?1, ?2, ?3)",
                    rusqlite::params![pos, json, error],
                )?;
                conn.execute("DELETE FROM outbox WHERE pos = ?1", [pos])?;
                Ok(())
            })
            .await
    }
}

/// Exponential backoff from 50 ms to 5 s with full jitter on the upper half.
pub fn backoff(attempt: u32) -> Duration {
    let ceiling = 50u64.saturating_mul(1 << attempt.min(7)).min(5_000);
    Duration::from_millis(ceiling / 2 + fastrand::u64(0..=ceiling / 2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        assert!(backoff(1) <= Duration::from_millis(100));
        assert!(backoff(1) >= Duration::from_millis(50));
        for attempt in 1..40 {
            assert!(backoff(attempt) <= Duration::from_secs(5));
        }
        assert!(backoff(30) >= Duration::from_millis(2_500));
    }
}
