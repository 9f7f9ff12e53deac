//! A service's database, seen through a seam two engines fill.
//!
//! Services never touch a driver type. They write SQL in the subset SQLite
//! and PostgreSQL both accept (`$1`-style numbered parameters,
//! `INSERT .. ON CONFLICT`, `RETURNING`) and run it through a [`Tx`]:
//! [`Tx::execute`], [`Tx::query_one`], [`Tx::query_all`], [`Tx::for_each`],
//! reading columns with [`Row::get`] (or [`Row::parse`] for domain values,
//! which fails loudly on a value it does not know). Parameters are anything
//! [`Value`], columns anything [`Column`]: the kit's names for what both
//! engines can bind and read (text, `i64` as `BIGINT`, their `Option`s).
//!
//! [`Store`] is the engine behind it, chosen by configuration: SQLite in
//! `DATA_DIR` ([`sqlite`]: one write connection, where a lone write commits
//! on its caller's thread and concurrent ones group-commit on a writer
//! thread; a pool of readers), or PostgreSQL at `DATABASE_URL` ([`postgres`]: a pool of
//! connections shared by every replica of the service, each unit of work one
//! transaction on a blocking thread). Schemas are [`Migration`]s: one text
//! where both engines accept it, an explicit pair where they differ (SQLite's
//! `WITHOUT ROWID` and `AUTOINCREMENT`, PostgreSQL's identity columns).
//!
//! A [`Tx`] also collects the events a unit of work publishes
//! ([`Tx::publish`]); only the outbox's unit of work
//! ([`crate::messaging::outbox::Outbox::commit`]) takes them, and a plain
//! [`Store::write`] that publishes fails rather than drop them. And it
//! collects [`Tx::notify`] items: on PostgreSQL they reach the service's other
//! replicas once the transaction commits ([`Store::listen`]), so state they
//! keep in memory follows changes any replica made; with SQLite there is one
//! process and nobody to tell.

mod postgres;
mod sqlite;
#[cfg(any(test, feature = "testing"))]
pub mod test_server;

use std::{borrow::Cow, fmt::Display, path::Path, str::FromStr};

use blog_domain::Event;
use rusqlite::{
    Connection,
    types::{FromSql, ToSql, ToSqlOutput},
};
use tokio::sync::broadcast;

pub use postgres::DatabaseUrl;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("database error: {}", postgres_detail(.0))]
    Postgres(#[from] tokio_postgres::Error),
    /// No connection to PostgreSQL could be had in time.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    #[error("cannot create data directory {path}: {source}")]
    DataDir { path: std::path::PathBuf, source: std::io::Error },
    #[error("the database writer has stopped")]
    WriterGone,
    #[error("commit failed: {0}")]
    Commit(String),
    #[error("storage is full or failing: {0}")]
    Full(String),
    #[error("read task failed: {0}")]
    Join(String),
    /// A stored value the code does not know (a corrupt row, a foreign writer).
    #[error("unreadable stored value: {0}")]
    Corrupt(String),
    /// A plain write published events; only a unit of work may.
    #[error("events published outside a unit of work would be lost")]
    Unpublished,
}

/// A PostgreSQL error with the server's own words: tokio-postgres shows an
/// error the server sent only as "db error".
fn postgres_detail(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {} (SQLSTATE {})", db.severity(), db.message(), db.code().code()),
        None => e.to_string(),
    }
}

impl StoreError {
    /// Whether the storage (not the request) is at fault: a full disk, a
    /// database at its size cap, an I/O error, a database server that is
    /// down or going away. Such a write can succeed later.
    pub fn is_storage_failure(&self) -> bool {
        match self {
            StoreError::Full(_) | StoreError::Unavailable(_) => true,
            StoreError::Sqlite(e) => sqlite::is_storage_failure(e),
            StoreError::Postgres(e) => postgres::is_storage_failure(e),
            _ => false,
        }
    }
}

/// Which engine a store runs on, for the few statements that differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Sqlite,
    Postgres,
}

/// One schema step: the same text for both engines where they agree, an
/// explicit pair where they do not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Migration {
    pub sqlite: &'static str,
    pub postgres: &'static str,
}

impl Migration {
    /// A step both engines run as written.
    pub const fn same(sql: &'static str) -> Self {
        Self { sqlite: sql, postgres: sql }
    }

    /// A step written once per engine.
    pub const fn per_engine(sqlite: &'static str, postgres: &'static str) -> Self {
        Self { sqlite, postgres }
    }

    pub fn for_engine(&self, engine: Engine) -> &'static str {
        match engine {
            Engine::Sqlite => self.sqlite,
            Engine::Postgres => self.postgres,
        }
    }
}

/// What a listener of [`Store::listen`] must look at again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refresh {
    /// Items another replica changed (what its [`Tx::notify`] named).
    Items(Vec<String>),
    /// Everything: notifications may have been missed (the listening
    /// connection was (re)established).
    Everything,
}

/// The next refresh from a [`Store::listen`] receiver: a listener that fell
/// behind must look at everything; `None` once the store is gone.
pub async fn next_refresh(receiver: &mut broadcast::Receiver<Refresh>) -> Option<Refresh> {
    match receiver.recv().await {
        Ok(refresh) => Some(refresh),
        Err(broadcast::error::RecvError::Lagged(_)) => Some(Refresh::Everything),
        Err(broadcast::error::RecvError::Closed) => None,
    }
}

/// What every commit records: how long the `COMMIT` took (with its fsync
/// when durable) and how many units of work it carried (SQLite's group
/// commit; on PostgreSQL each unit of work is its own transaction, so 1),
/// labelled `durable` (`true` waits for the disk, `false` is a relaxed
/// consumer commit). Made with the store, registered with the service's
/// metrics later ([`Store::register_metrics`]).
#[derive(Clone, Debug)]
pub(crate) struct CommitMetrics {
    seconds: crate::metrics::Histograms,
    jobs: crate::metrics::Histograms,
}

impl CommitMetrics {
    pub(crate) fn new() -> Self {
        use crate::metrics::{Histograms, LATENCY_BUCKETS, SIZE_BUCKETS};
        Self { seconds: Histograms::new(&["durable"], LATENCY_BUCKETS), jobs: Histograms::new(&["durable"], SIZE_BUCKETS) }
    }

    pub(crate) fn observe(&self, durable: bool, jobs: usize, took: std::time::Duration) {
        let durable = if durable { "true" } else { "false" };
        self.seconds.with(&[durable]).observe_duration(took);
        self.jobs.with(&[durable]).observe(jobs as f64);
    }

    pub(crate) fn register(&self, metrics: &crate::metrics::Registry) {
        metrics.add_histograms("blog_store_commit_seconds", "Time of each database COMMIT (with its fsync when durable).", &self.seconds);
        metrics.add_histograms("blog_store_commit_jobs", "Units of work per commit (the group commit's size).", &self.jobs);
    }
}

/// A service's database. Cheap to clone.
#[derive(Clone)]
pub struct Store(Backend);

#[derive(Clone)]
enum Backend {
    Sqlite(sqlite::Sqlite),
    Postgres(postgres::Postgres),
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Backend::Sqlite(s) => f.debug_struct("Store").field("sqlite", &s.path()).finish(),
            Backend::Postgres(p) => f.debug_struct("Store").field("postgres", &p.name()).finish(),
        }
    }
}

impl Store {
    /// Opens (creating if needed) `<dir>/<name>.db` and applies `migrations`:
    /// migration `i` runs once, when the schema version is below `i + 1`.
    pub fn open(dir: &Path, name: &str, migrations: &[&str]) -> Result<Self, StoreError> {
        Self::open_capped(dir, name, migrations, None)
    }

    /// Like [`Store::open`], with the database capped at `max_bytes`
    /// (`DB_MAX_BYTES`): past it, writes fail as on a full disk.
    pub fn open_capped(dir: &Path, name: &str, migrations: &[&str], max_bytes: Option<u64>) -> Result<Self, StoreError> {
        Ok(Self(Backend::Sqlite(sqlite::Sqlite::open_capped(dir, name, migrations, max_bytes)?)))
    }

    /// Connects to the PostgreSQL database at `url` and applies `migrations`
    /// (their PostgreSQL texts) under an advisory lock, so replicas starting
    /// together migrate once.
    pub async fn connect(url: &DatabaseUrl, name: &str, migrations: &[Migration]) -> Result<Self, StoreError> {
        Ok(Self(Backend::Postgres(postgres::Postgres::connect(url, name, migrations, None).await?)))
    }

    /// [`Store::connect`], waiting for a server that cannot be reached yet
    /// (until `shutdown`) instead of failing: how a service starts.
    pub async fn connect_waiting(
        url: &DatabaseUrl,
        name: &str,
        migrations: &[Migration],
        shutdown: &crate::Shutdown,
    ) -> Result<Self, StoreError> {
        Ok(Self(Backend::Postgres(postgres::Postgres::connect(url, name, migrations, Some(shutdown)).await?)))
    }

    pub fn engine(&self) -> Engine {
        match &self.0 {
            Backend::Sqlite(_) => Engine::Sqlite,
            Backend::Postgres(_) => Engine::Postgres,
        }
    }

    /// This replica's name on PostgreSQL, live while the process is (see
    /// `postgres::Postgres::replica`); `None` with SQLite, where a service is
    /// one process.
    pub(crate) fn replica(&self) -> Option<&str> {
        match &self.0 {
            Backend::Sqlite(_) => None,
            Backend::Postgres(p) => Some(p.replica()),
        }
    }

    /// Runs an idempotent schema (`CREATE .. IF NOT EXISTS`) once per start,
    /// serialised with other replicas' migrations.
    pub async fn install(&self, schema: Migration) -> Result<(), StoreError> {
        match &self.0 {
            Backend::Sqlite(_) => self.write(move |tx| tx.execute_batch(schema.sqlite)).await,
            Backend::Postgres(p) => p.install(schema.postgres).await,
        }
    }

    /// Runs `f` in one durable transaction and returns its result once the
    /// commit is on disk. If `f` fails, its changes are rolled back.
    pub async fn write<T, E, F>(&self, f: F) -> Result<T, E>
    where
        F: FnOnce(&mut Tx<'_>) -> Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        self.submit(true, unpublishing(f), |_| {}).await
    }

    /// Like [`Store::write`], answered once committed but without waiting for
    /// the disk: for writes that can be derived again.
    pub async fn write_relaxed<T, E, F>(&self, f: F) -> Result<T, E>
    where
        F: FnOnce(&mut Tx<'_>) -> Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        self.submit(false, unpublishing(f), |_| {}).await
    }

    /// Runs `f` in a transaction; once it committed (on disk if `durable`),
    /// `on_commit` runs before the caller hears of it.
    pub(crate) async fn submit<T, E, F, H>(&self, durable: bool, f: F, on_commit: H) -> Result<T, E>
    where
        F: FnOnce(&mut Tx<'_>) -> Result<T, E> + Send + 'static,
        H: FnOnce(&mut T) + Send + 'static,
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        match &self.0 {
            Backend::Sqlite(s) => s.submit(durable, f, on_commit).await,
            Backend::Postgres(p) => p.submit(durable, f, on_commit).await,
        }
    }

    /// Runs `f` on a read connection off the async runtime.
    pub async fn read<T, E, F>(&self, f: F) -> Result<T, E>
    where
        F: FnOnce(&Tx<'_>) -> Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        match &self.0 {
            Backend::Sqlite(s) => s.read(f).await,
            Backend::Postgres(p) => p.read(f).await,
        }
    }

    /// Whether the store can take writes: the readiness check.
    pub async fn ping(&self) -> bool {
        match &self.0 {
            Backend::Sqlite(s) => s.ping().await,
            Backend::Postgres(p) => p.ping().await,
        }
    }

    /// Gauges of the database (size, cap, free space, degraded) and the
    /// histograms of its commits (see [`CommitMetrics`]).
    pub fn register_metrics(&self, metrics: &crate::metrics::Registry) {
        match &self.0 {
            Backend::Sqlite(s) => s.register_metrics(metrics),
            Backend::Postgres(p) => p.register_metrics(metrics),
        }
    }

    /// What other replicas change, as their [`Tx::notify`] on `channel`
    /// names it. With SQLite nothing ever arrives (one process).
    pub fn listen(&self, channel: &'static str) -> broadcast::Receiver<Refresh> {
        match &self.0 {
            Backend::Sqlite(s) => s.listen(),
            Backend::Postgres(p) => p.listen(channel),
        }
    }
}

/// `f` must not publish: a plain write has no outbox to take the events.
fn unpublishing<T, E, F>(f: F) -> impl FnOnce(&mut Tx<'_>) -> Result<T, E> + Send + 'static
where
    F: FnOnce(&mut Tx<'_>) -> Result<T, E> + Send + 'static,
    E: From<StoreError>,
{
    move |tx| {
        let value = f(tx)?;
        if tx.take_published().is_empty() { Ok(value) } else { Err(StoreError::Unpublished.into()) }
    }
}

/// What can be bound to a `$n` parameter.
pub trait Value: Sync {
    #[doc(hidden)]
    fn sqlite(&self) -> rusqlite::Result<ToSqlOutput<'_>>;
    #[doc(hidden)]
    fn postgres(&self) -> &(dyn tokio_postgres::types::ToSql + Sync);
}

impl<T: ToSql + tokio_postgres::types::ToSql + Sync> Value for T {
    fn sqlite(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        ToSql::to_sql(self)
    }

    fn postgres(&self) -> &(dyn tokio_postgres::types::ToSql + Sync) {
        self
    }
}

/// What a column can be read as.
pub trait Column: FromSql + for<'a> tokio_postgres::types::FromSql<'a> {}

impl<T: FromSql + for<'a> tokio_postgres::types::FromSql<'a>> Column for T {}

/// The parameters of one statement, `$1` first.
pub type Params<'a> = &'a [&'a dyn Value];

struct Bind<'a>(&'a dyn Value);

impl ToSql for Bind<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        self.0.sqlite()
    }
}

/// One row of a result.
pub struct Row<'a, 'r>(RowOf<'a, 'r>);

enum RowOf<'a, 'r> {
    Sqlite(&'a rusqlite::Row<'r>),
    Postgres(&'a tokio_postgres::Row),
}

impl Row<'_, '_> {
    /// Column `index` (from 0).
    pub fn get<T: Column>(&self, index: usize) -> Result<T, StoreError> {
        match self.0 {
            RowOf::Sqlite(row) => Ok(row.get(index)?),
            RowOf::Postgres(row) => Ok(row.try_get(index)?),
        }
    }

    /// Column `index` read as text and parsed: a value the type does not
    /// know is a [`StoreError::Corrupt`], never a default.
    pub fn parse<T>(&self, index: usize) -> Result<T, StoreError>
    where
        T: FromStr,
        T::Err: Display,
    {
        let text: String = self.get(index)?;
        text.parse().map_err(|e: T::Err| StoreError::Corrupt(format!("column {index}: {e}")))
    }
}

/// A transaction (a write's savepoint in a group commit, a PostgreSQL
/// transaction) or a read.
pub struct Tx<'c> {
    conn: Conn<'c>,
    published: Vec<Event>,
    notes: Vec<(&'static str, String)>,
}

enum Conn<'c> {
    Sqlite(&'c Connection),
    Postgres(&'c postgres::Session),
}

impl<'c> Tx<'c> {
    fn sqlite(conn: &'c Connection) -> Self {
        Self { conn: Conn::Sqlite(conn), published: Vec::new(), notes: Vec::new() }
    }

    fn postgres(session: &'c postgres::Session) -> Self {
        Self { conn: Conn::Postgres(session), published: Vec::new(), notes: Vec::new() }
    }

    /// The engine, for the few statements written once per engine.
    pub fn engine(&self) -> Engine {
        match self.conn {
            Conn::Sqlite(_) => Engine::Sqlite,
            Conn::Postgres(_) => Engine::Postgres,
        }
    }

    /// Runs one statement; returns the rows it changed.
    pub fn execute(&self, sql: &str, params: Params<'_>) -> Result<usize, StoreError> {
        match self.conn {
            Conn::Sqlite(conn) => Ok(conn.prepare_cached(&dialect(sql))?.execute(bind(params))?),
            Conn::Postgres(session) => session.execute(sql, params),
        }
    }

    /// Runs statements without parameters (a schema).
    pub fn execute_batch(&self, sql: &str) -> Result<(), StoreError> {
        match self.conn {
            Conn::Sqlite(conn) => Ok(conn.execute_batch(sql)?),
            Conn::Postgres(session) => session.execute_batch(sql),
        }
    }

    /// The first row, if any, mapped by `map`.
    pub fn query_one<T>(
        &self,
        sql: &str,
        params: Params<'_>,
        map: impl FnOnce(&Row<'_, '_>) -> Result<T, StoreError>,
    ) -> Result<Option<T>, StoreError> {
        match self.conn {
            Conn::Sqlite(conn) => {
                let mut stmt = conn.prepare_cached(&dialect(sql))?;
                let mut rows = stmt.query(bind(params))?;
                match rows.next()? {
                    Some(row) => map(&Row(RowOf::Sqlite(row))).map(Some),
                    None => Ok(None),
                }
            }
            Conn::Postgres(session) => match session.query(sql, params)?.first() {
                Some(row) => map(&Row(RowOf::Postgres(row))).map(Some),
                None => Ok(None),
            },
        }
    }

    /// The one row the statement returns (an aggregate, a `RETURNING`).
    pub fn query_row<T>(
        &self,
        sql: &str,
        params: Params<'_>,
        map: impl FnOnce(&Row<'_, '_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.query_one(sql, params, map)?.ok_or_else(|| StoreError::Corrupt(format!("no row from `{sql}`")))
    }

    /// Calls `f` with each row, in order.
    pub fn for_each(
        &self,
        sql: &str,
        params: Params<'_>,
        mut f: impl FnMut(&Row<'_, '_>) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        match self.conn {
            Conn::Sqlite(conn) => {
                let mut stmt = conn.prepare_cached(&dialect(sql))?;
                let mut rows = stmt.query(bind(params))?;
                while let Some(row) = rows.next()? {
                    f(&Row(RowOf::Sqlite(row)))?;
                }
            }
            Conn::Postgres(session) => {
                for row in &session.query(sql, params)? {
                    f(&Row(RowOf::Postgres(row)))?;
                }
            }
        }
        Ok(())
    }

    /// Every row, mapped by `map`.
    pub fn query_all<T>(
        &self,
        sql: &str,
        params: Params<'_>,
        mut map: impl FnMut(&Row<'_, '_>) -> Result<T, StoreError>,
    ) -> Result<Vec<T>, StoreError> {
        let mut out = Vec::new();
        self.for_each(sql, params, |row| {
            out.push(map(row)?);
            Ok(())
        })?;
        Ok(out)
    }

    /// Tells the service's other replicas, once this transaction commits,
    /// that `item` changed (see [`Store::listen`]); an item is a line of text
    /// the listener understands, such as an id.
    pub fn notify(&mut self, channel: &'static str, item: impl Into<String>) {
        self.notes.push((channel, item.into()));
    }

    /// Publishes `event` when, and only when, this unit of work commits.
    pub fn publish(&mut self, event: &Event) -> Result<(), StoreError> {
        self.published.push(event.clone());
        Ok(())
    }

    /// How many events this unit of work has published so far.
    pub(crate) fn published_count(&self) -> usize {
        self.published.len()
    }

    /// Puts `traceparent` on the events published after the first `from`
    /// (what a consumer's apply published: its span is their parent).
    pub(crate) fn trace_published_since(&mut self, from: usize, traceparent: &str) {
        for event in self.published.iter_mut().skip(from) {
            event.traceparent = Some(traceparent.to_owned());
        }
    }

    /// The events published so far, taken.
    pub(crate) fn take_published(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.published)
    }

    /// The notifications collected so far, taken.
    fn take_notes(&mut self) -> Vec<(&'static str, String)> {
        std::mem::take(&mut self.notes)
    }
}

fn bind<'a>(params: Params<'a>) -> rusqlite::ParamsFromIter<impl Iterator<Item = Bind<'a>>> {
    rusqlite::params_from_iter(params.iter().map(|p| Bind(*p)))
}

/// `$n` parameters as SQLite's `?n` (the same numbered binding), outside
/// string literals and quoted names.
fn dialect(sql: &str) -> Cow<'_, str> {
    if !sql.contains('$') {
        return Cow::Borrowed(sql);
    }
    let mut out = String::with_capacity(sql.len());
    let mut quote: Option<char> = None;
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == '\'' || c == '"' => quote = Some(c),
            None if c == '$' && chars.peek().is_some_and(char::is_ascii_digit) => {
                out.push('?');
                continue;
            }
            None => {}
        }
        out.push(c);
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    const SCHEMA: &[Migration] = &[
        Migration::per_engine(
            "CREATE TABLE item (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, size INTEGER);",
            "CREATE TABLE item (id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, name TEXT NOT NULL UNIQUE, size BIGINT);",
        ),
        Migration::same("INSERT INTO item (name) VALUES ('seed');"),
    ];

    /// A fresh store on each engine: SQLite, then PostgreSQL when here.
    async fn engines() -> Vec<(Store, Option<tempfile::TempDir>, Option<std::sync::Arc<test_server::TestServer>>)> {
        let dir = tempfile::tempdir().unwrap();
        let sqlite: Vec<&str> = SCHEMA.iter().map(|m| m.sqlite).collect();
        let mut stores = vec![(Store::open(dir.path(), "t", &sqlite).unwrap(), Some(dir), None)];
        if let Some(server) = test_server::shared() {
            let url = server.database().await;
            stores.push((Store::connect(&url, "t", SCHEMA).await.unwrap(), None, Some(server)));
        }
        stores
    }

    async fn insert(store: &Store, name: &'static str) -> Result<i64, StoreError> {
        store.write(move |c| c.query_row("INSERT INTO item (name) VALUES ($1) RETURNING id", &[&name], |r| r.get(0))).await
    }

    async fn count(store: &Store) -> i64 {
        store.read(|c| c.query_row("SELECT count(*) FROM item", &[], |r| r.get(0))).await.unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn on_both_engines_a_failing_job_rolls_back_alone() {
        for (store, _dir, _server) in engines().await {
            let (a, b, c) = tokio::join!(insert(&store, "a"), insert(&store, "a"), insert(&store, "b"));
            let failed: Vec<_> = [a, b, c].into_iter().filter_map(Result::err).collect();
            assert_eq!(failed.len(), 1, "{:?}", store.engine());
            assert!(!failed[0].is_storage_failure(), "a duplicate is the request's fault: {}", failed[0]);
            assert_eq!(count(&store).await, 3, "seed, a, b on {:?}", store.engine());
            assert!(store.ping().await);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn on_both_engines_values_round_trip_and_bad_ones_fail_loudly() {
        for (store, _dir, _server) in engines().await {
            let engine = store.engine();
            let rows = store
                .write(|tx| {
                    tx.execute("INSERT INTO item (name, size) VALUES ($1, $2), ($3, $4)", &[&"x", &Some(7_i64), &"y", &None::<i64>])?;
                    tx.execute("UPDATE item SET size = $1 WHERE name = $2 AND size IS NULL", &[&i64::MAX, &"seed"])?;
                    tx.query_all("SELECT name, size FROM item ORDER BY name", &[], |r| Ok((r.get::<String>(0)?, r.get::<Option<i64>>(1)?)))
                })
                .await
                .unwrap();
            assert_eq!(rows, [("seed".to_owned(), Some(i64::MAX)), ("x".to_owned(), Some(7)), ("y".to_owned(), None)], "{engine:?}");
            let corrupt = store.read(|tx| tx.query_row("SELECT name FROM item WHERE name = 'x'", &[], |r| r.parse::<i64>(0))).await;
            assert!(matches!(corrupt, Err(StoreError::Corrupt(_))), "{engine:?}: {corrupt:?}");
            let none = store.read(|tx| tx.query_one("SELECT name FROM item WHERE name = $1", &[&"nope"], |r| r.get::<String>(0))).await;
            assert_eq!(none.unwrap(), None);
            let published = store
                .write(|tx| {
                    tx.execute("INSERT INTO item (name) VALUES ('lost')", &[])?;
                    tx.publish(&Event::from_value(serde_json::json!({"type": "X", "data": {}})).unwrap())
                })
                .await;
            assert!(matches!(published, Err(StoreError::Unpublished)), "{engine:?}");
            assert_eq!(count(&store).await, 3, "{engine:?}: the refused write left nothing");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_never_reports_a_transaction_it_aborted_as_committed() {
        let Some(server) = test_server::shared() else { return };
        let store = Store::connect(&server.database().await, "t", SCHEMA).await.unwrap();
        let swallowed = store
            .write(|tx| {
                tx.execute("INSERT INTO item (name) VALUES ('kept?')", &[])?;
                // The duplicate fails; the closure ignores it and says Ok.
                let _ = tx.execute("INSERT INTO item (name) VALUES ('seed')", &[]);
                Ok::<_, StoreError>(())
            })
            .await;
        assert!(matches!(swallowed, Err(StoreError::Commit(_))), "{swallowed:?}");
        assert_eq!(count(&store).await, 1, "nothing of it committed");
        insert(&store, "after").await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn replicas_starting_together_migrate_once() {
        let Some(server) = test_server::shared() else { return };
        let url = server.database().await;
        let starts: Vec<_> = (0..4)
            .map(|_| {
                let url = url.clone();
                tokio::spawn(async move { Store::connect(&url, "t", SCHEMA).await })
            })
            .collect();
        let mut stores = Vec::new();
        for start in starts {
            stores.push(start.await.unwrap().unwrap());
        }
        assert_eq!(count(&stores[0]).await, 1, "the seeding migration ran once");
        let installs: Vec<_> = stores.iter().map(|s| s.install(Migration::same("CREATE TABLE IF NOT EXISTS extra (x BIGINT);"))).collect();
        for install in futures_util::future::join_all(installs).await {
            install.unwrap();
        }
        let again = Store::connect(&url, "t", SCHEMA).await.unwrap();
        assert_eq!(count(&again).await, 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn replicas_hear_of_each_others_commits_and_never_of_rollbacks() {
        let Some(server) = test_server::shared() else { return };
        let url = server.database().await;
        let (a, b) = (Store::connect(&url, "t", SCHEMA).await.unwrap(), Store::connect(&url, "t", SCHEMA).await.unwrap());
        let (mut heard_by_a, mut heard_by_b) = (a.listen("items"), b.listen("items"));
        for heard in [&mut heard_by_a, &mut heard_by_b] {
            assert_eq!(next_refresh(heard).await, Some(Refresh::Everything), "listening begins with a full look");
        }
        let rolled_back = a
            .write(|tx| {
                tx.notify("items", "never");
                tx.execute("INSERT INTO item (name) VALUES ('seed')", &[])
            })
            .await;
        assert!(rolled_back.is_err());
        let many: Vec<String> = (0..2_000).map(|i| format!("item-{i}")).collect();
        let sent = many.clone();
        a.write(move |tx| {
            for item in sent {
                tx.notify("items", item);
            }
            tx.execute("INSERT INTO item (name) VALUES ('n')", &[])
        })
        .await
        .unwrap();
        let mut heard = Vec::new();
        while heard.len() < many.len() {
            match tokio::time::timeout(Duration::from_secs(10), next_refresh(&mut heard_by_b)).await {
                Ok(Some(Refresh::Items(items))) => heard.extend(items),
                other => panic!("after {} items: {other:?}", heard.len()),
            }
        }
        assert_eq!(heard, many, "in order, across payloads, and nothing of the rolled-back write");
        assert!(heard_by_a.try_recv().is_err(), "a replica does not hear itself");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_down_is_a_storage_failure_and_the_store_recovers() {
        let Some(mut server) = test_server::TestServer::own() else { return };
        let url = server.database().await;
        let store = Store::connect(&url, "t", SCHEMA).await.unwrap();
        insert(&store, "before").await.unwrap();
        server.stop();
        let refused = insert(&store, "while down").await.unwrap_err();
        assert!(refused.is_storage_failure(), "{refused}");
        assert!(!store.ping().await);
        server.restart();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !store.ping().await {
            assert!(Instant::now() < deadline, "not ready again: {}", server.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        insert(&store, "after").await.unwrap();
        assert_eq!(count(&store).await, 3, "seed, before, after");
    }

    #[test]
    fn numbered_parameters_become_sqlites_outside_literals() {
        assert_eq!(dialect("SELECT a FROM t WHERE a = $1 AND b = $12"), "SELECT a FROM t WHERE a = ?1 AND b = ?12");
        assert_eq!(dialect("SELECT '$1', \"$2\" FROM t WHERE x = $2"), "SELECT '$1', \"$2\" FROM t WHERE x = ?2");
        assert!(matches!(dialect("SELECT 1"), Cow::Borrowed(_)));
    }
}
