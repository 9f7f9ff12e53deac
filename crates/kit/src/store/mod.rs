//! A service's database, seen through a seam a second engine can fill.
//!
//! Services never touch a driver type. They write SQL in the subset SQLite
//! and PostgreSQL both accept (`$1`-style numbered parameters,
//! `INSERT .. ON CONFLICT`, `RETURNING`) and run it through a [`Tx`]:
//! [`Tx::execute`], [`Tx::query_one`], [`Tx::query_all`], [`Tx::for_each`],
//! reading columns with [`Row::get`] (or [`Row::parse`] for domain values,
//! which fails loudly on a value it does not know). Parameters are anything
//! [`Value`], columns anything [`Column`]: the kit's names for what the engine
//! can bind and read.
//!
//! [`Store`] chooses the engine: today only SQLite (`sqlite.rs`: one writer
//! thread with group commit, a pool of readers). The choice is an enum at
//! each level (the store's engine, the transaction's connection, the row,
//! [`Value`]'s conversion), so a PostgreSQL engine is one more variant and
//! the compiler lists every arm it must fill; nothing above this module
//! changes but the constructor a service is opened with.
//!
//! A [`Tx`] also collects the events a unit of work publishes
//! ([`Tx::publish`]); only the outbox's unit of work
//! ([`crate::messaging::outbox::Outbox::commit`]) takes them, and a plain
//! [`Store::write`] that publishes fails rather than drop them.

mod sqlite;

use std::{borrow::Cow, fmt::Display, path::Path, str::FromStr};

use blog_domain::Event;
use rusqlite::{
    Connection,
    types::{FromSql, ToSql, ToSqlOutput},
};
pub use sqlite::StoreError;

/// A service's database. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Store(Engine);

/// The engines a [`Store`] can run on; each arm below is what a second one
/// must provide.
#[derive(Debug, Clone)]
enum Engine {
    Sqlite(sqlite::Sqlite),
}

impl Store {
    /// Opens (creating if needed) the SQLite database `<dir>/<name>.db` and
    /// applies `migrations`: migration `i` runs once, when the schema version
    /// is below `i + 1`.
    pub fn open(dir: &Path, name: &str, migrations: &[&str]) -> Result<Self, StoreError> {
        sqlite::Sqlite::open(dir, name, migrations).map(|db| Store(Engine::Sqlite(db)))
    }

    /// Like [`Store::open`], with the database capped at `max_bytes`
    /// (`DB_MAX_BYTES`): past it, writes fail as on a full disk, loudly and
    /// recoverably (raise the cap) before the filesystem itself fills.
    pub fn open_capped(dir: &Path, name: &str, migrations: &[&str], max_bytes: Option<u64>) -> Result<Self, StoreError> {
        sqlite::Sqlite::open_capped(dir, name, migrations, max_bytes).map(|db| Store(Engine::Sqlite(db)))
    }

    /// Where the database lives.
    pub fn path(&self) -> &Path {
        let Engine::Sqlite(db) = &self.0;
        db.path()
    }

    /// Runs `f` in one transaction and returns its result once the commit is
    /// on disk. If `f` fails, its changes are rolled back. `f` must not
    /// publish: only a unit of work ([`crate::Kit::commit`]) takes events.
    pub async fn write<T, E, F>(&self, f: F) -> Result<T, E>
    where
        F: FnOnce(&mut Tx<'_>) -> Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        self.submit(true, unpublishing(f), |_| {}).await
    }

    /// Like [`Store::write`], answered once committed but without waiting for
    /// the disk: for writes that can be derived again (a consumer's effects
    /// and watermark, a relay's deletions).
    pub async fn write_relaxed<T, E, F>(&self, f: F) -> Result<T, E>
    where
        F: FnOnce(&mut Tx<'_>) -> Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        self.submit(false, unpublishing(f), |_| {}).await
    }

    /// Runs `f` in a transaction; once it is committed (on disk if
    /// `durable`), `on_commit` runs, in commit order, before the caller hears
    /// of it.
    pub(crate) async fn submit<T, E, F, H>(&self, durable: bool, f: F, on_commit: H) -> Result<T, E>
    where
        F: FnOnce(&mut Tx<'_>) -> Result<T, E> + Send + 'static,
        H: FnOnce(&mut T) + Send + 'static,
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        let Engine::Sqlite(db) = &self.0;
        db.submit(durable, f, on_commit).await
    }

    /// Runs `f` on a read-only connection off the async runtime.
    pub async fn read<T, E, F>(&self, f: F) -> Result<T, E>
    where
        F: FnOnce(&Tx<'_>) -> Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        let Engine::Sqlite(db) = &self.0;
        db.read(f).await
    }

    /// Whether the store can take writes: the readiness check.
    pub async fn ping(&self) -> bool {
        let Engine::Sqlite(db) = &self.0;
        db.ping().await
    }

    /// Gauges of the database's size, cap, free space and health.
    pub fn register_metrics(&self, metrics: &crate::metrics::Registry) {
        let Engine::Sqlite(db) = &self.0;
        db.register_metrics(metrics);
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

/// What can be bound to a `$n` parameter: one conversion per engine.
pub trait Value: Sync {
    #[doc(hidden)]
    fn sqlite(&self) -> rusqlite::Result<ToSqlOutput<'_>>;
}

impl<T: ToSql + Sync + ?Sized> Value for T {
    fn sqlite(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        self.to_sql()
    }
}

/// What a column can be read as (each engine's conversion a bound).
pub trait Column: FromSql {}

impl<T: FromSql> Column for T {}

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
}

impl Row<'_, '_> {
    /// Column `index` (from 0).
    pub fn get<T: Column>(&self, index: usize) -> Result<T, StoreError> {
        let RowOf::Sqlite(row) = &self.0;
        Ok(row.get(index)?)
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

/// A transaction (a write's savepoint in a group commit) or a read.
pub struct Tx<'c> {
    conn: Conn<'c>,
    published: Vec<Event>,
}

/// The engine's connection under a [`Tx`].
enum Conn<'c> {
    Sqlite(&'c Connection),
}

impl<'c> Tx<'c> {
    fn sqlite(conn: &'c Connection) -> Self {
        Self { conn: Conn::Sqlite(conn), published: Vec::new() }
    }

    /// Runs one statement; returns the rows it changed.
    pub fn execute(&self, sql: &str, params: Params<'_>) -> Result<usize, StoreError> {
        let Conn::Sqlite(conn) = self.conn;
        Ok(conn.prepare_cached(&dialect(sql))?.execute(bind(params))?)
    }

    /// Runs statements without parameters (a schema).
    pub fn execute_batch(&self, sql: &str) -> Result<(), StoreError> {
        let Conn::Sqlite(conn) = self.conn;
        Ok(conn.execute_batch(sql)?)
    }

    /// The first row, if any, mapped by `map`.
    pub fn query_one<T>(
        &self,
        sql: &str,
        params: Params<'_>,
        map: impl FnOnce(&Row<'_, '_>) -> Result<T, StoreError>,
    ) -> Result<Option<T>, StoreError> {
        let Conn::Sqlite(conn) = self.conn;
        let mut stmt = conn.prepare_cached(&dialect(sql))?;
        let mut rows = stmt.query(bind(params))?;
        match rows.next()? {
            Some(row) => map(&Row(RowOf::Sqlite(row))).map(Some),
            None => Ok(None),
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
        let Conn::Sqlite(conn) = self.conn;
        let mut stmt = conn.prepare_cached(&dialect(sql))?;
        let mut rows = stmt.query(bind(params))?;
        while let Some(row) = rows.next()? {
            f(&Row(RowOf::Sqlite(row)))?;
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

    /// Publishes `event` when, and only when, this unit of work commits.
    pub fn publish(&mut self, event: &Event) -> Result<(), StoreError> {
        self.published.push(event.clone());
        Ok(())
    }

    /// The events published so far, taken.
    pub(crate) fn take_published(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.published)
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
    use super::*;

    #[test]
    fn numbered_parameters_become_sqlites_outside_literals() {
        assert_eq!(dialect("SELECT a FROM t WHERE a = $1 AND b = $12"), "SELECT a FROM t WHERE a = ?1 AND b = ?12");
        assert_eq!(dialect("SELECT '$1', \"$2\" FROM t WHERE x = $2"), "SELECT '$1', \"$2\" FROM t WHERE x = ?2");
        assert!(matches!(dialect("SELECT 1"), Cow::Borrowed(_)));
    }
}
