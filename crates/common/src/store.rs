//! One embedded SQLite database per service, written with group commit.
//!
//! Every write goes to a single writer thread that owns the write connection.
//! It takes whatever jobs are queued, runs each inside its own savepoint (so a
//! job that fails rolls back alone), commits them together, and only then
//! answers each caller. Under load many requests share one commit; at idle a
//! lone write commits at once. Reads run on a small pool of read-only
//! connections, which WAL lets proceed alongside the writer.
//!
//! Two kinds of write: [`Store::write`] is durable (`synchronous=FULL`: the
//! commit is fsynced before anyone is answered), for what a caller is told is
//! kept: a user's 201, the bus's acknowledgement to a publisher.
//! [`Store::write_relaxed`] skips the fsync (`synchronous=NORMAL` in WAL mode:
//! safe against a process crash, consistent after a power loss but possibly
//! without the last commits), for what can be derived again: a consumer's
//! effects roll back together with its cursor and are replayed from the bus,
//! a lost cursor or outbox deletion only means a redelivery the receiver
//! recognises. A batch with any durable job is committed durably.

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread,
};

use rusqlite::{Connection, OpenFlags};
use tokio::sync::oneshot;

/// Most jobs one commit takes; bounds the latency of the last job in a batch.
const MAX_BATCH: usize = 512;
/// Read connections kept open for reuse.
const READ_POOL: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("cannot create data directory {path}: {source}")]
    DataDir { path: PathBuf, source: std::io::Error },
    #[error("the database writer has stopped")]
    WriterGone,
    #[error("commit failed: {0}")]
    Commit(String),
    #[error("read task failed: {0}")]
    Join(String),
}

type Completion = Box<dyn FnOnce(Option<&str>) + Send>;

struct Job {
    durable: bool,
    run: Box<dyn FnOnce(&Connection) -> Completion + Send>,
}

/// A service's database. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    writer: mpsc::Sender<Job>,
    /// Cleared when the writer thread ends for any reason (a panic included).
    writer_alive: Arc<AtomicBool>,
    readers: Mutex<Vec<Connection>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.inner.path).finish()
    }
}

impl Store {
    /// Opens (creating if needed) `<dir>/<name>.db` and applies `migrations`:
    /// migration `i` runs once, when the schema version is below `i + 1`.
    pub fn open(dir: &Path, name: &str, migrations: &[&str]) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::DataDir { path: dir.to_owned(), source })?;
        let path = dir.join(format!("{name}.db"));
        let mut conn = Connection::open(&path)?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = FULL;
             PRAGMA foreign_keys = ON;
             PRAGMA busy_timeout = 5000;
             PRAGMA cache_size = -2000;",
        )?;
        migrate(&mut conn, migrations)?;

        let (writer, jobs) = mpsc::channel::<Job>();
        let writer_alive = Arc::new(AtomicBool::new(true));
        let alive = WriterAlive(writer_alive.clone());
        thread::Builder::new()
            .name(format!("{name}-db-writer"))
            .spawn(move || {
                let _alive = alive;
                write_loop(conn, jobs);
            })
            .map_err(|e| StoreError::Commit(e.to_string()))?;

        Ok(Self { inner: Arc::new(Inner { path, writer, writer_alive, readers: Mutex::new(Vec::new()) }) })
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Runs `f` in the next group commit and returns its result once the
    /// commit is on disk. If `f` fails, its changes are rolled back and the
    /// rest of the batch commits without them.
    pub async fn write<T, E, F>(&self, f: F) -> Result<T, E>
    where
        F: FnOnce(&Connection) -> Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<StoreError> + From<rusqlite::Error> + Send + 'static,
    {
        self.submit(true, f).await
    }

    /// Like [`Store::write`], answered once committed but without waiting for
    /// the disk: for writes that can be derived again (see the module docs).
    pub async fn write_relaxed<T, E, F>(&self, f: F) -> Result<T, E>
    where
        F: FnOnce(&Connection) -> Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<StoreError> + From<rusqlite::Error> + Send + 'static,
    {
        self.submit(false, f).await
    }

    async fn submit<T, E, F>(&self, durable: bool, f: F) -> Result<T, E>
    where
        F: FnOnce(&Connection) -> Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<StoreError> + From<rusqlite::Error> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel::<Result<T, E>>();
        let run = Box::new(move |conn: &Connection| -> Completion {
            let outcome = run_in_savepoint(conn, f);
            Box::new(move |commit_error: Option<&str>| {
                let result = match (outcome, commit_error) {
                    (Ok(value), None) => Ok(value),
                    (Ok(_), Some(e)) => Err(StoreError::Commit(e.to_owned()).into()),
                    (Err(e), _) => Err(e),
                };
                let _ = tx.send(result);
            })
        });
        self.inner.writer.send(Job { durable, run }).map_err(|_| E::from(StoreError::WriterGone))?;
        rx.await.map_err(|_| E::from(StoreError::WriterGone))?
    }

    /// Runs `f` on a read-only connection off the async runtime.
    pub async fn read<T, E, F>(&self, f: F) -> Result<T, E>
    where
        F: FnOnce(&Connection) -> Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<StoreError> + From<rusqlite::Error> + Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let pooled = inner.readers.lock().unwrap_or_else(|p| p.into_inner()).pop();
            let conn = match pooled {
                Some(conn) => conn,
                None => open_reader(&inner.path)?,
            };
            let result = f(&conn);
            let mut readers = inner.readers.lock().unwrap_or_else(|p| p.into_inner());
            if readers.len() < READ_POOL {
                readers.push(conn);
            }
            result
        })
        .await
        .map_err(|e| E::from(StoreError::Join(e.to_string())))?
    }

    /// Whether the store can take writes: the readiness check. False when
    /// the writer thread has died or the database does not answer.
    pub async fn ping(&self) -> bool {
        self.inner.writer_alive.load(Ordering::SeqCst)
            && self.read(|conn| conn.query_row("SELECT 1", [], |row| row.get::<_, i64>(0)).map_err(StoreError::from)).await.is_ok()
    }
}

/// Clears the writer's liveness flag when the writer thread ends, unwinding included.
struct WriterAlive(Arc<AtomicBool>);

impl Drop for WriterAlive {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
        tracing::error!("the database writer thread stopped; the service is no longer ready");
    }
}

fn open_reader(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)?;
    conn.execute_batch("PRAGMA busy_timeout = 5000; PRAGMA cache_size = -1000;")?;
    Ok(conn)
}

fn migrate(conn: &mut Connection, migrations: &[&str]) -> Result<(), StoreError> {
    let version: usize = conn.query_row("PRAGMA user_version", [], |row| row.get::<_, i64>(0))? as usize;
    for (i, sql) in migrations.iter().enumerate().skip(version) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
    }
    Ok(())
}

fn run_in_savepoint<T, E, F>(conn: &Connection, f: F) -> Result<T, E>
where
    F: FnOnce(&Connection) -> Result<T, E>,
    E: From<rusqlite::Error>,
{
    conn.execute_batch("SAVEPOINT job")?;
    match f(conn) {
        Ok(value) => {
            conn.execute_batch("RELEASE job")?;
            Ok(value)
        }
        Err(e) => {
            conn.execute_batch("ROLLBACK TO job; RELEASE job")?;
            Err(e)
        }
    }
}

fn write_loop(conn: Connection, jobs: mpsc::Receiver<Job>) {
    let mut batch: Vec<Job> = Vec::with_capacity(MAX_BATCH);
    let mut done: Vec<Completion> = Vec::with_capacity(MAX_BATCH);
    let mut synced = true;
    while let Ok(first) = jobs.recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let durable = batch.iter().any(|job| job.durable);
        if durable != synced {
            let mode = if durable { "PRAGMA synchronous = FULL" } else { "PRAGMA synchronous = NORMAL" };
            if conn.execute_batch(mode).is_ok() {
                synced = durable;
            }
        }
        let began = conn.execute_batch("BEGIN IMMEDIATE");
        for job in batch.drain(..) {
            done.push((job.run)(&conn));
        }
        // Without the outer transaction each job's savepoint committed on its
        // own when released, so there is nothing left to commit.
        let commit = if began.is_ok() { conn.execute_batch("COMMIT") } else { Ok(()) };
        let error = match commit {
            Ok(()) => None,
            Err(e) => {
                tracing::error!(error = %e, "group commit failed; rolling back the batch");
                let _ = conn.execute_batch("ROLLBACK");
                Some(e.to_string())
            }
        };
        for completion in done.drain(..) {
            completion(error.as_deref());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCHEMA: &[&str] = &["CREATE TABLE item (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);"];

    async fn insert(store: &Store, name: &'static str) -> Result<i64, StoreError> {
        store
            .write(move |c| {
                c.execute("INSERT INTO item (name) VALUES (?1)", [name])?;
                Ok(c.last_insert_rowid())
            })
            .await
    }

    async fn count(store: &Store) -> i64 {
        store.read(|c| c.query_row("SELECT count(*) FROM item", [], |r| r.get(0)).map_err(StoreError::from)).await.unwrap()
    }

    #[tokio::test]
    async fn a_failing_job_rolls_back_alone() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), "t", SCHEMA).unwrap();
        let (a, b, c) = tokio::join!(insert(&store, "a"), insert(&store, "a"), insert(&store, "b"));
        assert_eq!([a.is_ok(), b.is_ok(), c.is_ok()].iter().filter(|ok| **ok).count(), 2);
        assert_eq!(count(&store).await, 2);
    }

    #[tokio::test]
    async fn relaxed_and_durable_writes_share_batches_and_both_persist() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path(), "t", SCHEMA).unwrap();
            let relaxed = |name: &'static str| {
                let store = store.clone();
                async move {
                    store.write_relaxed(move |c| c.execute("INSERT INTO item (name) VALUES (?1)", [name]).map_err(StoreError::from)).await
                }
            };
            let (a, b, c) = tokio::join!(relaxed("r1"), insert(&store, "d1"), relaxed("r2"));
            assert!(a.is_ok() && b.is_ok() && c.is_ok());
            let mode: i64 = store.write(|c| c.query_row("PRAGMA synchronous", [], |r| r.get(0)).map_err(StoreError::from)).await.unwrap();
            assert_eq!(mode, 2, "a batch with a durable job commits with synchronous=FULL");
        }
        let store = Store::open(dir.path(), "t", SCHEMA).unwrap();
        assert_eq!(count(&store).await, 3);
    }

    #[tokio::test]
    async fn data_and_schema_version_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path(), "t", SCHEMA).unwrap();
            let writes: Vec<_> = (0..100)
                .map(|i| {
                    let store = store.clone();
                    tokio::spawn(async move {
                        store
                            .write(move |c| c.execute("INSERT INTO item (name) VALUES (?1)", [format!("n{i}")]).map_err(StoreError::from))
                            .await
                    })
                })
                .collect();
            for w in writes {
                w.await.unwrap().unwrap();
            }
        }
        let store = Store::open(dir.path(), "t", SCHEMA).unwrap();
        assert_eq!(count(&store).await, 100);
        assert!(store.ping().await);
    }

    #[tokio::test]
    async fn readiness_notices_a_dead_writer() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), "t", SCHEMA).unwrap();
        assert!(store.ping().await);
        let crashed = store.write(|_| -> Result<(), StoreError> { panic!("a bug in a write job") }).await;
        assert!(matches!(crashed, Err(StoreError::WriterGone)), "{crashed:?}");
        // The caller may hear of it while the thread is still unwinding.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while store.ping().await {
            assert!(std::time::Instant::now() < deadline, "reads still work, but readiness must see that writes cannot");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert!(matches!(insert(&store, "x").await, Err(StoreError::WriterGone)));
    }
}
