//! The PostgreSQL engine behind [`super::Tx`]: one database per service
//! (`DATABASE_URL`), shared by every replica of it.
//!
//! The seam is synchronous (a unit of work is a closure over a [`super::Tx`]),
//! so a unit of work runs on a blocking thread holding one pooled connection
//! (deadpool-postgres, statements prepared once per connection and cached),
//! and each statement is driven with the runtime's `block_on`: the closure
//! never runs on an async worker, and the connection's I/O keeps running on
//! them. There is no group commit: PostgreSQL commits many connections at
//! once itself. A durable write is an ordinary commit (`synchronous_commit`
//! on: a 201 means committed and flushed); a relaxed one sets
//! `synchronous_commit = off` for its transaction, the same promise as
//! SQLite's relaxed writes (safe against a crash of the service, possibly
//! without the last commits after a crash of the server).
//!
//! Any statement that fails aborts the whole transaction in PostgreSQL (not
//! only itself, as in SQLite), so a unit of work whose closure swallowed an
//! error is rolled back and its caller told, never reported committed.
//!
//! Migrations run at start inside one transaction holding an advisory lock,
//! so replicas starting together apply each once. A service started before
//! its server answers (a fresh cluster, an outage) waits for it
//! ([`Postgres::connect`] given a [`Shutdown`]), where exiting would have
//! Kubernetes space its restarts out to five minutes; a server that answers
//! and refuses (a wrong password, no such database) is a mistake in the
//! configuration and fails the start at once. The server being down is a
//! storage failure like a full disk: writes answer 503, readiness is false,
//! and both recover by themselves once connections can be made again.
//!
//! [`Postgres::listen`] keeps one dedicated connection per channel `LISTEN`ing
//! for what other replicas [`super::Tx::notify`]; each (re)connection reports
//! [`Refresh::Everything`], since notifications sent meanwhile are lost.

use std::{
    cell::Cell,
    collections::{BTreeMap, HashMap},
    str::FromStr,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod, Runtime};
use futures_util::StreamExt;
use tokio::{runtime::Handle, sync::broadcast};
use tokio_postgres::{AsyncMessage, NoTls};

use super::{Migration, Params, Refresh, StoreError, Tx};
use crate::shutdown::Shutdown;

/// Connections per replica.
const POOL_SIZE: usize = 8;
/// Longest wait for a new connection, or for a free one from the pool.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest one statement may take before the unit of work fails (the
/// request would have timed out anyway).
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(15);
/// Key of the advisory lock migrations hold ("blog").
const MIGRATION_LOCK: i64 = 0x626c_6f67;
/// Largest notification payload sent (PostgreSQL's limit is 8000 bytes).
const NOTIFY_LIMIT: usize = 7_000;
/// Refreshes a slow listener may fall behind before it is told to look at everything.
const LISTEN_BUFFER: usize = 1_024;
/// First and longest pause between attempts to reach the server at start.
const REACH_PAUSE_MIN: Duration = Duration::from_millis(250);
const REACH_PAUSE_MAX: Duration = Duration::from_secs(5);
/// How often waiting for the server at start is logged.
const REACH_WARN_EVERY: Duration = Duration::from_secs(10);
/// Pause between attempts to (re)establish a listening connection.
const LISTEN_RETRY: Duration = Duration::from_millis(500);

/// `DATABASE_URL`, parsed (`postgres://user:password@host:port/database` or
/// the key=value form). Its text, which holds the password, is never shown.
#[derive(Clone)]
pub struct DatabaseUrl(tokio_postgres::Config);

impl FromStr for DatabaseUrl {
    type Err = String;

    fn from_str(raw: &str) -> Result<Self, String> {
        let config = tokio_postgres::Config::from_str(raw).map_err(|e| e.to_string())?;
        if config.get_hosts().is_empty() {
            return Err("no host".to_owned());
        }
        if config.get_dbname().is_none() {
            return Err("no database name".to_owned());
        }
        Ok(Self(config))
    }
}

impl std::fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatabaseUrl").field("dbname", &self.0.get_dbname()).field("ports", &self.0.get_ports()).finish_non_exhaustive()
    }
}

/// Longest `application_name` PostgreSQL keeps (`NAMEDATALEN` - 1 bytes).
const APPLICATION_NAME_MAX: usize = 63;

/// `<base> <origin>`, within [`APPLICATION_NAME_MAX`] and in printable ASCII
/// (what the server keeps of it unchanged), so it reads back as it was set.
fn replica_name(base: &str, origin: &str) -> String {
    let room = APPLICATION_NAME_MAX.saturating_sub(origin.len() + 1);
    let base: String = base.chars().filter(|c| c.is_ascii_graphic()).take(room).collect();
    format!("{base} {origin}")
}

/// Whether `e` says the server or the connection failed (not the request).
pub(super) fn is_storage_failure(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() || std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>()) {
        return true;
    }
    let Some(code) = e.code() else { return false };
    let code = code.code();
    // Connection exceptions, insufficient resources (a full disk), operator
    // intervention (shutdown, crash recovery), system errors, and the
    // conflicts of concurrent transactions (serialization failure, deadlock):
    // all worth trying again later.
    ["08", "53", "57", "58"].iter().any(|class| code.starts_with(class)) || code == "40001" || code == "40P01"
}

/// A service's PostgreSQL database. Cheap to clone.
#[derive(Clone)]
pub(super) struct Postgres {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    config: tokio_postgres::Config,
    name: String,
    /// This replica's `application_name` (see [`Postgres::replica`]).
    replica: String,
    /// Tells this replica's notifications from other replicas'.
    origin: String,
    listeners: Mutex<HashMap<&'static str, broadcast::Sender<Refresh>>>,
    commits: super::CommitMetrics,
}

impl Postgres {
    /// Connects and migrates. With `wait`, a server that cannot be reached
    /// yet is waited for (until `wait` is triggered); without, that fails at once.
    pub(super) async fn connect(
        url: &DatabaseUrl,
        name: &str,
        migrations: &[Migration],
        wait: Option<&Shutdown>,
    ) -> Result<Self, StoreError> {
        let mut config = url.0.clone();
        config.connect_timeout(CONNECT_TIMEOUT);
        let origin = uuid::Uuid::new_v4().simple().to_string();
        // Every connection of this replica carries its name, so the others
        // can tell from `pg_stat_activity` whether it is still alive.
        let replica = replica_name(config.get_application_name().unwrap_or(name), &origin);
        config.application_name(&replica);
        let manager = Manager::from_config(config.clone(), NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(CONNECT_TIMEOUT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .recycle_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        let store = Self {
            inner: Arc::new(Inner {
                pool,
                config,
                name: name.to_owned(),
                replica,
                origin,
                listeners: Mutex::default(),
                commits: super::CommitMetrics::new(),
            }),
        };
        if let Some(shutdown) = wait {
            store.reachable(shutdown).await?;
        }
        store.migrate(migrations).await?;
        Ok(store)
    }

    /// Returns once a connection can be had: retried with a growing pause
    /// (to [`REACH_PAUSE_MAX`]) while the server cannot be reached or says it
    /// cannot take connections now; an answer that refuses for good (a
    /// wrong password, no such database) is returned at once, as is
    /// `shutdown`.
    async fn reachable(&self, shutdown: &Shutdown) -> Result<(), StoreError> {
        let mut pause = REACH_PAUSE_MIN;
        let mut warned: Option<tokio::time::Instant> = None;
        loop {
            let e = match self.inner.pool.get().await {
                Ok(_) => {
                    if warned.is_some() {
                        tracing::info!(database = %self.inner.name, "PostgreSQL reached");
                    }
                    return Ok(());
                }
                Err(PoolError::Backend(e)) if !worth_waiting_for(&e) => return Err(e.into()),
                Err(e) => e,
            };
            if warned.is_none_or(|at| at.elapsed() >= REACH_WARN_EVERY) {
                tracing::warn!(database = %self.inner.name, error = %e, "PostgreSQL cannot be reached yet; waiting for it");
                warned = Some(tokio::time::Instant::now());
            }
            if shutdown.sleep(pause).await {
                return Err(StoreError::Unavailable(format!("stopped while waiting for PostgreSQL: {e}")));
            }
            pause = (pause * 2).min(REACH_PAUSE_MAX);
        }
    }

    pub(super) fn name(&self) -> &str {
        &self.inner.name
    }

    /// The `application_name` of every connection this replica opens, its
    /// own for as long as the process lives: while some session in
    /// `pg_stat_activity` has it, the replica is alive (the server ends a
    /// dead process's sessions as soon as their sockets close).
    pub(super) fn replica(&self) -> &str {
        &self.inner.replica
    }

    /// Applies the migrations the database lacks, one transaction holding
    /// the advisory lock: a replica starting meanwhile waits, then finds
    /// them applied.
    async fn migrate(&self, migrations: &[Migration]) -> Result<(), StoreError> {
        let texts: Vec<&'static str> = migrations.iter().map(|m| m.postgres).collect();
        self.locked(move |tx| {
            tx.execute_batch(
                "CREATE TABLE IF NOT EXISTS store_schema (id BIGINT PRIMARY KEY CHECK (id = 0), version BIGINT NOT NULL);
                 INSERT INTO store_schema (id, version) VALUES (0, 0) ON CONFLICT DO NOTHING;",
            )?;
            let version: i64 = tx.query_row("SELECT version FROM store_schema WHERE id = 0", &[], |row| row.get(0))?;
            for (i, sql) in texts.iter().enumerate().skip(usize::try_from(version).unwrap_or(usize::MAX)) {
                if !sql.trim().is_empty() {
                    tx.execute_batch(sql)?;
                }
                tx.execute("UPDATE store_schema SET version = $1 WHERE id = 0", &[&(i as i64 + 1)])?;
            }
            Ok(())
        })
        .await
    }

    /// Runs an idempotent schema under the migrations' lock.
    pub(super) async fn install(&self, sql: &'static str) -> Result<(), StoreError> {
        self.locked(move |tx| tx.execute_batch(sql)).await
    }

    async fn locked(&self, f: impl FnOnce(&mut Tx<'_>) -> Result<(), StoreError> + Send + 'static) -> Result<(), StoreError> {
        self.submit(
            true,
            move |tx| {
                tx.query_row("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK], |_| Ok(()))?;
                f(tx)
            },
            |_| {},
        )
        .await
    }

    async fn client(&self) -> Result<Object, StoreError> {
        self.inner.pool.get().await.map_err(|e| StoreError::Unavailable(e.to_string()))
    }

    /// Runs `f` in one transaction on a blocking thread; once committed,
    /// `on_commit` runs before the caller hears of it.
    pub(super) async fn submit<T, E, F, H>(&self, durable: bool, f: F, on_commit: H) -> Result<T, E>
    where
        F: FnOnce(&mut Tx<'_>) -> Result<T, E> + Send + 'static,
        H: FnOnce(&mut T) + Send + 'static,
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        let session = Session::new(self.client().await?);
        let (origin, commits) = (self.inner.origin.clone(), self.inner.commits.clone());
        tokio::task::spawn_blocking(move || {
            session.execute_batch(if durable { "BEGIN" } else { "BEGIN; SET LOCAL synchronous_commit = off" })?;
            let mut tx = Tx::postgres(&session);
            let outcome = f(&mut tx);
            let notes = tx.take_notes();
            let mut value = match outcome {
                Ok(value) => value,
                Err(e) => {
                    session.rollback();
                    return Err(e);
                }
            };
            let committing = std::time::Instant::now();
            let committed = notify(&session, &origin, notes).and_then(|()| session.commit());
            commits.observe(durable, 1, committing.elapsed());
            if let Err(e) = committed {
                session.rollback();
                return Err(e.into());
            }
            on_commit(&mut value);
            Ok(value)
        })
        .await
        .map_err(|e| E::from(StoreError::Join(e.to_string())))?
    }

    /// Runs `f` on a pooled connection (each statement on its own) off the async runtime.
    pub(super) async fn read<T, E, F>(&self, f: F) -> Result<T, E>
    where
        F: FnOnce(&Tx<'_>) -> Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        let session = Session::new(self.client().await?);
        tokio::task::spawn_blocking(move || f(&Tx::postgres(&session))).await.map_err(|e| E::from(StoreError::Join(e.to_string())))?
    }

    /// Whether a connection can be had and answers.
    pub(super) async fn ping(&self) -> bool {
        match self.client().await {
            Ok(client) => tokio::time::timeout(CONNECT_TIMEOUT, client.simple_query("SELECT 1")).await.is_ok_and(|r| r.is_ok()),
            Err(_) => false,
        }
    }

    pub(super) fn register_metrics(&self, metrics: &crate::metrics::Registry) {
        self.inner.commits.register(metrics);
        let inner = self.inner.clone();
        metrics.gauge("blog_db_connections", "Connections to PostgreSQL held by the pool.", move |out| {
            out.push((String::new(), inner.pool.status().size as f64));
        });
    }

    /// What other replicas notify on `channel`; one listening connection per
    /// channel, however many receivers.
    pub(super) fn listen(&self, channel: &'static str) -> broadcast::Receiver<Refresh> {
        let mut listeners = self.inner.listeners.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(sender) = listeners.get(channel) {
            return sender.subscribe();
        }
        let (sender, receiver) = broadcast::channel(LISTEN_BUFFER);
        listeners.insert(channel, sender.clone());
        let (config, origin) = (self.inner.config.clone(), self.inner.origin.clone());
        tokio::spawn(async move {
            // Ends with the last receiver (the map's sender counts none).
            while sender.receiver_count() > 0 {
                if let Err(e) = listen_once(&config, &origin, channel, &sender).await {
                    tracing::warn!(error = %e, channel, "lost the connection listening for other replicas' changes; reconnecting");
                }
                tokio::time::sleep(LISTEN_RETRY).await;
            }
        });
        receiver
    }
}

/// Listens on `channel` until the connection ends.
async fn listen_once(
    config: &tokio_postgres::Config,
    origin: &str,
    channel: &'static str,
    sender: &broadcast::Sender<Refresh>,
) -> Result<(), tokio_postgres::Error> {
    let (client, mut connection) = config.connect(NoTls).await?;
    let (notes, mut received) = tokio::sync::mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(note)) => {
                    if notes.send(note).is_err() {
                        break;
                    }
                }
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    });
    client.batch_execute(&format!("LISTEN {channel}")).await?;
    // Whatever was notified before this point is lost to this replica.
    let _ = sender.send(Refresh::Everything);
    while let Some(note) = received.recv().await {
        let mut lines = note.payload().lines();
        if lines.next() == Some(origin) {
            continue;
        }
        let _ = sender.send(Refresh::Items(lines.map(str::to_owned).collect()));
        if sender.receiver_count() == 0 {
            break;
        }
    }
    drop(client);
    driver.await.unwrap_or(Ok(()))
}

/// Sends the collected notifications, grouped per channel in as few
/// payloads as fit: `origin`, then one item per line.
fn notify(session: &Session, origin: &str, notes: Vec<(&'static str, String)>) -> Result<(), StoreError> {
    let mut by_channel: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for (channel, item) in notes {
        by_channel.entry(channel).or_default().push(item);
    }
    for (channel, items) in by_channel {
        let mut payload = origin.to_owned();
        for item in items {
            if payload.len() + 1 + item.len() > NOTIFY_LIMIT && payload.len() > origin.len() {
                session.query("SELECT pg_notify($1, $2)", &[&channel, &payload])?;
                payload = origin.to_owned();
            }
            payload.push('\n');
            payload.push_str(&item);
        }
        session.query("SELECT pg_notify($1, $2)", &[&channel, &payload])?;
    }
    Ok(())
}

/// A pooled connection driven from a blocking thread.
pub(super) struct Session {
    /// Always there until the session is dropped.
    client: Option<Object>,
    handle: Handle,
    /// Set when a statement failed: PostgreSQL has aborted the transaction,
    /// and a `COMMIT` would quietly roll it back.
    failed: Cell<bool>,
    /// Set when the connection may still be inside a transaction: it must
    /// not go back to the pool.
    poisoned: Cell<bool>,
}

impl Session {
    /// Must be made on the runtime (it takes its handle).
    fn new(client: Object) -> Self {
        Self { client: Some(client), handle: Handle::current(), failed: Cell::new(false), poisoned: Cell::new(false) }
    }

    fn client(&self) -> Result<&Object, StoreError> {
        self.client.as_ref().ok_or_else(|| StoreError::Unavailable("the connection is gone".to_owned()))
    }

    fn run<T>(&self, future: impl Future<Output = Result<T, tokio_postgres::Error>>) -> Result<T, StoreError> {
        let result = self.handle.block_on(async { tokio::time::timeout(STATEMENT_TIMEOUT, future).await });
        match result {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => {
                self.failed.set(true);
                Err(e.into())
            }
            Err(_) => {
                self.failed.set(true);
                self.poisoned.set(true);
                Err(StoreError::Unavailable(format!("no answer from the database within {STATEMENT_TIMEOUT:?}")))
            }
        }
    }

    pub(super) fn execute(&self, sql: &str, params: Params<'_>) -> Result<usize, StoreError> {
        let client = self.client()?;
        let params: Vec<_> = params.iter().map(|p| p.postgres()).collect();
        let statement = self.run(client.prepare_cached(sql))?;
        let changed = self.run(client.execute(&statement, &params))?;
        Ok(usize::try_from(changed).unwrap_or(usize::MAX))
    }

    pub(super) fn query(&self, sql: &str, params: Params<'_>) -> Result<Vec<tokio_postgres::Row>, StoreError> {
        let client = self.client()?;
        let params: Vec<_> = params.iter().map(|p| p.postgres()).collect();
        let statement = self.run(client.prepare_cached(sql))?;
        self.run(client.query(&statement, &params))
    }

    pub(super) fn execute_batch(&self, sql: &str) -> Result<(), StoreError> {
        self.run(self.client()?.batch_execute(sql))
    }

    fn commit(&self) -> Result<(), StoreError> {
        if self.failed.get() {
            return Err(StoreError::Commit("a statement failed, so PostgreSQL aborted the transaction".to_owned()));
        }
        self.execute_batch("COMMIT").inspect_err(|_| self.poisoned.set(true))
    }

    fn rollback(&self) {
        if self.execute_batch("ROLLBACK").is_err() {
            self.poisoned.set(true);
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if self.poisoned.get()
            && let Some(client) = self.client.take()
        {
            // Detached from the pool: the connection closes instead of being reused.
            drop(Object::take(client));
        }
    }
}

/// Whether a failed connection attempt may succeed later: no answer (refused,
/// timed out, cut), or the server's own "not now" (SQLSTATE class 08,
/// connection exception; 53, insufficient resources such as too many
/// connections; 57, operator intervention such as starting up or shutting
/// down). Anything else it answered (a wrong password, no such database)
/// stays true until someone changes the configuration.
fn worth_waiting_for(e: &tokio_postgres::Error) -> bool {
    e.as_db_error().is_none_or(|db| ["08", "53", "57"].iter().any(|class| db.code().code().starts_with(class)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replica_name_is_what_the_server_keeps_of_it() {
        let origin = "0123456789abcdef0123456789abcdef";
        assert_eq!(replica_name("posts", origin), format!("posts {origin}"));
        let long = replica_name(&"é-x".repeat(40), origin);
        assert_eq!(long.len(), APPLICATION_NAME_MAX, "clipped to what the server keeps");
        assert!(long.bytes().all(|b| (b' '..=b'~').contains(&b)), "printable ASCII only: {long}");
        assert!(long.ends_with(&format!(" {origin}")));
    }
}
