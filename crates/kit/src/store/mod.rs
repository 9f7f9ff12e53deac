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
//! [`Store`] is the engine behind it: today SQLite ([`sqlite`]: one writer
//! thread with group commit, a pool of readers). A PostgreSQL store
//! implements the same `Tx` over its connection and the same
//! `write`/`read`/`ping`; nothing above this module changes but the choice.
//!
//! A [`Tx`] also collects the events a unit of work publishes
//! ([`Tx::publish`]); only the outbox's unit of work
//! ([`crate::messaging::outbox::Outbox::commit`]) takes them, and a plain
//! [`Store::write`] that publishes fails rather than drop them.

mod sqlite;

use std::{borrow::Cow, fmt::Display, str::FromStr};

use blog_domain::Event;
use rusqlite::{
    Connection,
    types::{FromSql, ToSql, ToSqlOutput},
};
pub use sqlite::{Store, StoreError};

/// What can be bound to a `$n` parameter.
pub trait Value: Sync {
    #[doc(hidden)]
    fn sqlite(&self) -> rusqlite::Result<ToSqlOutput<'_>>;
}

impl<T: ToSql + Sync + ?Sized> Value for T {
    fn sqlite(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        self.to_sql()
    }
}

/// What a column can be read as.
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
pub struct Row<'a, 'r>(&'a rusqlite::Row<'r>);

impl Row<'_, '_> {
    /// Column `index` (from 0).
    pub fn get<T: Column>(&self, index: usize) -> Result<T, StoreError> {
        Ok(self.0.get(index)?)
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
    conn: &'c Connection,
    published: Vec<Event>,
}

impl<'c> Tx<'c> {
    fn new(conn: &'c Connection) -> Self {
        Self { conn, published: Vec::new() }
    }

    /// Runs one statement; returns the rows it changed.
    pub fn execute(&self, sql: &str, params: Params<'_>) -> Result<usize, StoreError> {
        Ok(self.conn.prepare_cached(&dialect(sql))?.execute(bind(params))?)
    }

    /// Runs statements without parameters (a schema).
    pub fn execute_batch(&self, sql: &str) -> Result<(), StoreError> {
        Ok(self.conn.execute_batch(sql)?)
    }

    /// The first row, if any, mapped by `map`.
    pub fn query_one<T>(
        &self,
        sql: &str,
        params: Params<'_>,
        map: impl FnOnce(&Row<'_, '_>) -> Result<T, StoreError>,
    ) -> Result<Option<T>, StoreError> {
        let mut stmt = self.conn.prepare_cached(&dialect(sql))?;
        let mut rows = stmt.query(bind(params))?;
        match rows.next()? {
            Some(row) => map(&Row(row)).map(Some),
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
        let mut stmt = self.conn.prepare_cached(&dialect(sql))?;
        let mut rows = stmt.query(bind(params))?;
        while let Some(row) = rows.next()? {
            f(&Row(row))?;
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
