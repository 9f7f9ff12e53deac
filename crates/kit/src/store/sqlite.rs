//! The SQLite engine behind [`super::Tx`]: one embedded database per
//! service, written with group commit.
//!
//! One write connection, committed by one party at a time. A write that finds
//! nothing queued and nobody committing commits at once on its caller's
//! thread: at idle, a lone write costs no hand-off between threads (two
//! wake-ups, each 0.05 to 0.25 ms on a two-core VM). Before it looks, a
//! write lets the other ready tasks of its runtime run once: writes arriving
//! together (requests that came in while the one async worker of a service
//! was busy) see each other and all queue, so they share one commit instead
//! of taking the connection one after another. A write that finds another
//! arriving, or the connection busy, queues for the writer thread, which takes whatever jobs
//! are queued once the connection is free, runs each inside its own savepoint
//! (so a job that fails rolls back alone), commits them together, and only
//! then answers each caller: under load many requests share one commit.
//! Reads run on a small pool of read-only connections, which WAL lets
//! proceed alongside the writer.
//!
//! Checkpoints (copying the write-ahead log into the database, after which
//! the log is reused from its start) run on the writer thread, after the
//! commit that filled the log has been answered: never on a caller's thread,
//! where SQLite's own automatic checkpoint would hold up that caller, and with
//! it the one async worker of its service, for a few milliseconds.
//!
//! Two kinds of write: a durable one (`synchronous=FULL`: the
//! commit is fsynced before anyone is answered), for what a caller is told is
//! kept: a user's 201, the bus's acknowledgement to a publisher.
//! A relaxed one ([`Store::write_relaxed`]) skips the fsync (`synchronous=NORMAL` in WAL mode:
//! safe against a process crash, consistent after a power loss but possibly
//! without the last commits), for what can be derived again: a consumer's
//! effects roll back together with its cursor and are replayed from the bus,
//! a lost cursor or outbox deletion only means a redelivery the receiver
//! recognises. A batch with any durable job is committed durably.
//!
//! A full or failing disk (or a database at its `DB_MAX_BYTES` cap, which
//! SQLite reports exactly as a full disk) fails the writes that needed the
//! space, rolled back so nothing half-written remains, and marks the store
//! *degraded*: readiness turns false and callers answer 503, so nobody is told
//! a write was kept when it was not. While degraded, the writer probes after
//! each batch (and readiness asks it to) by allocating a few pages in a
//! savepoint it rolls back; the mark clears once there is room again.

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering},
        mpsc,
    },
    thread,
};

use rusqlite::{Connection, OpenFlags};
use tokio::sync::oneshot;

use tokio::sync::broadcast;

use super::{Refresh, StoreError, Tx};

/// Most jobs one commit takes; bounds the latency of the last job in a batch.
const MAX_BATCH: usize = 512;
/// Read connections kept open for reuse.
const READ_POOL: usize = 4;
/// Frames in the write-ahead log after which a checkpoint runs (SQLite's
/// default for its automatic checkpoint).
const CHECKPOINT_FRAMES: u32 = 1000;

pub(super) fn is_storage_failure(e: &rusqlite::Error) -> bool {
    use rusqlite::ErrorCode::{DiskFull, ReadOnly, SystemIoFailure};
    matches!(e.sqlite_error_code(), Some(DiskFull | SystemIoFailure | ReadOnly))
}

/// How a group commit ended, as each job's caller hears it.
#[derive(Debug, Clone)]
enum CommitError {
    Storage(String),
    Other(String),
}

type Completion = Box<dyn FnOnce(Option<&CommitError>) + Send>;
/// A job that ran: its completion, and whether the job itself failed.
type Ran = (Completion, bool);

struct Job {
    durable: bool,
    /// Runs the job; returns its completion and whether the job failed.
    run: Box<dyn FnOnce(&Connection) -> Ran + Send>,
}

/// A service's SQLite database. Cheap to clone.
#[derive(Clone)]
pub(super) struct Sqlite {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    writer: mpsc::Sender<Job>,
    /// The write connection, held by whoever commits: the writer thread for
    /// a queued batch, or a caller that found nothing queued (see [`Sqlite::submit`]).
    state: Arc<Mutex<Writer>>,
    /// Jobs sent to the writer thread and not yet committed.
    queued: Arc<AtomicUsize>,
    /// Writes deciding whether to commit on their caller's thread.
    arriving: AtomicUsize,
    /// Cleared when the writer thread ends for any reason (a panic included).
    writer_alive: Arc<AtomicBool>,
    /// Set by the writer when storage failed a write, cleared by a commit.
    degraded: Arc<AtomicBool>,
    /// `DB_MAX_BYTES`, when set.
    max_bytes: Option<u64>,
    commits: super::CommitMetrics,
    /// Time of each checkpoint.
    checkpoints: crate::metrics::Histograms,
    readers: Mutex<Vec<Connection>>,
    /// Kept so that listeners' receivers stay open; nothing is ever sent
    /// (one process: nobody else changes the database).
    refresh: broadcast::Sender<Refresh>,
}

impl Sqlite {
    /// Opens (creating if needed) `<dir>/<name>.db` and applies `migrations`,
    /// capped at `max_bytes` (`DB_MAX_BYTES`): past it, writes fail as on a
    /// full disk. Capping a database below its volume's size makes it fail
    /// loudly, and recoverably (raise the cap), before the filesystem itself fills.
    pub(super) fn open_capped(dir: &Path, name: &str, migrations: &[&str], max_bytes: Option<u64>) -> Result<Self, StoreError> {
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
        plan_once(&conn)?;
        // Room for the commit protocol's statements beside the jobs' own.
        conn.set_prepared_statement_cache_capacity(64);
        migrate(&mut conn, migrations)?;
        conn.execute_batch(PROBE_SCHEMA)?;
        preallocate_wal(&conn, &path);
        // Replaces SQLite's automatic checkpoint, which runs inside the COMMIT
        // that filled the log, on whichever thread committed.
        let wal_frames = Arc::new(AtomicU32::new(0));
        let frames = wal_frames.clone();
        conn.wal_hook(Some(move |_: &mut rusqlite::hooks::Wal, pages: std::ffi::c_int| {
            frames.store(u32::try_from(pages).unwrap_or(0), Ordering::SeqCst);
            Ok(())
        }))?;
        if let Some(max_bytes) = max_bytes {
            let page_size: i64 = conn.query_row("PRAGMA page_size", [], |row| row.get(0))?;
            // SQLite keeps the cap at least the current size.
            let pages = (max_bytes / page_size.max(1) as u64).max(1);
            conn.query_row(&format!("PRAGMA max_page_count = {pages}"), [], |_| Ok(()))?;
        }

        let (writer, jobs) = mpsc::channel::<Job>();
        let degraded = Arc::new(AtomicBool::new(false));
        let writer_alive = Arc::new(AtomicBool::new(true));
        let mut alive = WriterAlive { alive: writer_alive.clone(), closed: false };
        let writer_degraded = degraded.clone();
        let commits = super::CommitMetrics::new();
        let writer_commits = commits.clone();
        let checkpoints = crate::metrics::Histograms::new(&[], crate::metrics::LATENCY_BUCKETS);
        let writer_checkpoints = checkpoints.clone();
        let state = Arc::new(Mutex::new(Writer { conn, synced: true, broken: false, wal_frames }));
        let queued = Arc::new(AtomicUsize::new(0));
        let (writer_state, writer_queued) = (state.clone(), queued.clone());
        thread::Builder::new()
            .name(format!("{name}-db-writer"))
            .spawn(move || {
                alive.closed = write_loop(&writer_state, &jobs, &writer_queued, &writer_degraded, &writer_commits, &writer_checkpoints);
                drop(alive);
            })
            .map_err(|e| StoreError::Commit(e.to_string()))?;

        let inner = Inner {
            path,
            writer,
            state,
            queued,
            arriving: AtomicUsize::new(0),
            writer_alive,
            degraded,
            max_bytes,
            commits,
            checkpoints,
            readers: Mutex::new(Vec::new()),
            refresh: broadcast::Sender::new(1),
        };
        Ok(Self { inner: Arc::new(inner) })
    }

    pub(super) fn path(&self) -> &Path {
        &self.inner.path
    }

    pub(super) fn listen(&self) -> broadcast::Receiver<Refresh> {
        self.inner.refresh.subscribe()
    }

    /// Runs `f` in the next group commit; once the batch is committed (on
    /// disk if `durable`), `on_commit` runs on the committing thread, in commit
    /// order, before the caller hears of it.
    pub(super) async fn submit<T, E, F, H>(&self, durable: bool, f: F, on_commit: H) -> Result<T, E>
    where
        F: FnOnce(&mut Tx<'_>) -> Result<T, E> + Send + 'static,
        H: FnOnce(&mut T) + Send + 'static,
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel::<Result<T, E>>();
        let run = Box::new(move |conn: &Connection| -> Ran {
            let outcome = run_in_savepoint(conn, f);
            let failed = outcome.is_err();
            let completion: Completion = Box::new(move |commit_error: Option<&CommitError>| {
                let result = match (outcome, commit_error) {
                    (Ok(mut value), None) => {
                        on_commit(&mut value);
                        Ok(value)
                    }
                    (Ok(_), Some(CommitError::Storage(e))) => Err(StoreError::Full(e.clone()).into()),
                    (Ok(_), Some(CommitError::Other(e))) => Err(StoreError::Commit(e.clone()).into()),
                    (Err(e), _) => Err(e),
                };
                let _ = tx.send(result);
            });
            (completion, failed)
        });
        let job = Job { durable, run };
        let inner = &self.inner;
        if !inner.writer_alive.load(Ordering::SeqCst) {
            return Err(StoreError::WriterGone.into());
        }
        let alone = {
            let _deciding = Arriving::count(&inner.arriving);
            tokio::task::yield_now().await;
            inner.arriving.load(Ordering::SeqCst) == 1
        };
        match if alone { self.idle_writer() } else { None } {
            // Nothing queued and nobody committing: commit here, sparing the
            // two thread hand-offs (to the writer thread and back) that a
            // lone write would otherwise wait for. Under load callers find
            // the writer busy and queue, and the writer thread commits them
            // together.
            Some(mut writer) => {
                let committed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    commit_batch(&mut writer, &mut vec![job], &inner.degraded, &inner.commits);
                }));
                if committed.is_err() {
                    writer.broken = true;
                    inner.writer_alive.store(false, Ordering::SeqCst);
                    tracing::error!("a write job panicked; the service is no longer ready");
                }
                let checkpoint_due = writer.checkpoint_due();
                drop(writer);
                if checkpoint_due {
                    // A job that changes nothing hands the connection to the
                    // writer thread, which checkpoints after committing it.
                    inner.queued.fetch_add(1, Ordering::SeqCst);
                    let nothing = Job { durable: false, run: Box::new(|_| (Box::new(|_| {}), false)) };
                    if inner.writer.send(nothing).is_err() {
                        inner.queued.fetch_sub(1, Ordering::SeqCst);
                    }
                }
            }
            None => {
                inner.queued.fetch_add(1, Ordering::SeqCst);
                if inner.writer.send(job).is_err() {
                    inner.queued.fetch_sub(1, Ordering::SeqCst);
                    return Err(StoreError::WriterGone.into());
                }
            }
        }
        rx.await.map_err(|_| E::from(StoreError::WriterGone))?
    }

    /// The write connection, when no job is queued for the writer thread
    /// and nobody holds it.
    fn idle_writer(&self) -> Option<std::sync::MutexGuard<'_, Writer>> {
        if self.inner.queued.load(Ordering::SeqCst) > 0 {
            return None;
        }
        self.inner.state.try_lock().ok().filter(|writer| !writer.broken)
    }

    /// Runs `f` on a read-only connection off the async runtime.
    pub(super) async fn read<T, E, F>(&self, f: F) -> Result<T, E>
    where
        F: FnOnce(&Tx<'_>) -> Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let pooled = inner.readers.lock().unwrap_or_else(|p| p.into_inner()).pop();
            let conn = match pooled {
                Some(conn) => conn,
                None => open_reader(&inner.path)?,
            };
            let result = f(&Tx::sqlite(&conn));
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
    /// the writer thread has died, the database does not answer, or storage
    /// failed a write and a probe write still cannot allocate space.
    pub(super) async fn ping(&self) -> bool {
        if !self.inner.writer_alive.load(Ordering::SeqCst) {
            return false;
        }
        if self.inner.degraded.load(Ordering::SeqCst) {
            // An empty job: after it the writer probes for room again.
            let _ = self.submit(false, |_| Ok::<_, StoreError>(()), |_| {}).await;
            return !self.inner.degraded.load(Ordering::SeqCst);
        }
        self.read(|tx| tx.query_row("SELECT 1", &[], |row| row.get::<i64>(0))).await.is_ok()
    }

    /// Gauges of the database's size on disk, its cap and the free space of
    /// the filesystem holding it.
    pub(super) fn register_metrics(&self, metrics: &crate::metrics::Registry) {
        self.inner.commits.register(metrics);
        metrics.add_histograms(
            "blog_store_checkpoint_seconds",
            "Time of each checkpoint of SQLite's write-ahead log into the database (on the writer thread).",
            &self.inner.checkpoints,
        );
        let inner = self.inner.clone();
        metrics.gauge("blog_db_bytes", "Size of the database files (database and write-ahead log).", move |out| {
            let size = |suffix: &str| {
                let mut path = inner.path.clone().into_os_string();
                path.push(suffix);
                std::fs::metadata(path).map_or(0, |m| m.len())
            };
            out.push((String::new(), (size("") + size("-wal")) as f64));
        });
        if let Some(max) = self.inner.max_bytes {
            metrics.gauge("blog_db_max_bytes", "DB_MAX_BYTES: past it, writes fail as on a full disk.", move |out| {
                out.push((String::new(), max as f64));
            });
        }
        let inner = self.inner.clone();
        metrics.gauge("blog_data_free_bytes", "Space available to the service on the data directory's filesystem.", move |out| {
            let dir = inner.path.parent().unwrap_or(Path::new("."));
            if let Ok(stat) = rustix::fs::statvfs(dir) {
                out.push((String::new(), stat.f_bavail.saturating_mul(stat.f_frsize) as f64));
            }
        });
        let inner = self.inner.clone();
        metrics.gauge("blog_db_degraded", "1 while storage is failing writes (full disk, cap reached, I/O errors).", move |out| {
            out.push((String::new(), f64::from(u8::from(inner.degraded.load(Ordering::SeqCst)))));
        });
    }
}

/// A table for readiness probes of a degraded store; always empty.
const PROBE_SCHEMA: &str = "CREATE TABLE IF NOT EXISTS store_probe (filler BLOB);";

/// Clears the writer's liveness flag when the writer thread ends, unwinding
/// included. An error unless the store was closed (every handle dropped, as
/// at shutdown), which is no failure.
struct WriterAlive {
    alive: Arc<AtomicBool>,
    closed: bool,
}

impl Drop for WriterAlive {
    fn drop(&mut self) {
        self.alive.store(false, Ordering::SeqCst);
        if self.closed {
            tracing::debug!("the database writer thread stopped: the store was closed");
        } else {
            tracing::error!("the database writer thread stopped; the service is no longer ready");
        }
    }
}

fn open_reader(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)?;
    conn.execute_batch("PRAGMA busy_timeout = 5000; PRAGMA cache_size = -1000;")?;
    plan_once(&conn)?;
    Ok(conn)
}

/// Plans each statement once, whatever values are later bound to it (the
/// query planner stability guarantee). Without it SQLite prepares a cached
/// statement again after every new value bound where that value could
/// change the plan (compared in a subquery, a `LIMIT`, a `LIKE` pattern):
/// the inbox's watermark query was parsed and planned anew on every
/// delivery, a tenth of a consumer's time. Our statements are written for
/// the one plan they get.
fn plan_once(conn: &Connection) -> rusqlite::Result<()> {
    conn.set_db_config(rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true).map(drop)
}

/// The log's preallocated size: a header, then the frames (each its own
/// header and a page) of a full log, plus a tenth for the last commits before
/// the checkpoint (the one that fills the log overshoots it by its own frames).
const fn wal_bytes(page: u64) -> u64 {
    32 + (CHECKPOINT_FRAMES as u64 * 11 / 10) * (page + 24)
}

/// Gives the write-ahead log its working size up front, as real blocks.
///
/// Every durable commit fsyncs the log. While the log grows, that fsync also
/// has to journal the file's new blocks and size: on the test VM's ext4 a
/// commit then costs about 0.26 ms instead of 0.18 ms over blocks the log
/// already has. SQLite reuses the log from its start after each checkpoint, so
/// once the log has grown to the checkpoint's size every later commit writes
/// over its own blocks; this does the growing once, at start, instead of during
/// a fresh database's first thousand commits. The log is emptied first
/// (everything checkpointed into the database), so the zeros only ever follow
/// valid frames, where SQLite's recovery stops at the first frame whose checksum
/// fails. Best effort: if the log cannot be emptied or written, it stays as it
/// was and grows as SQLite needs.
fn preallocate_wal(conn: &Connection, db: &Path) {
    use std::os::unix::fs::FileExt;
    let pragma = |sql: &str| conn.query_row(sql, [], |row| row.get::<_, i64>(0));
    let sizes = || -> rusqlite::Result<(i64, i64)> { Ok((pragma("PRAGMA wal_checkpoint(TRUNCATE)")?, pragma("PRAGMA page_size")?)) };
    let Ok((0, page)) = sizes() else { return };
    let size = wal_bytes(page.max(0) as u64);
    let mut name = db.as_os_str().to_owned();
    name.push("-wal");
    let grow = || -> std::io::Result<()> {
        let wal = std::fs::OpenOptions::new().write(true).open(&name)?;
        if wal.metadata()?.len() != 0 {
            return Ok(());
        }
        let zeros = vec![0u8; 64 * 1024];
        for at in (0..size).step_by(zeros.len()) {
            wal.write_all_at(&zeros[..(size - at).min(zeros.len() as u64) as usize], at)?;
        }
        wal.sync_all()
    };
    if let Err(e) = grow() {
        tracing::debug!(error = %e, "write-ahead log not preallocated");
    }
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
    F: FnOnce(&mut Tx<'_>) -> Result<T, E>,
    E: From<StoreError>,
{
    run_cached(conn, "SAVEPOINT job").map_err(StoreError::from)?;
    match f(&mut Tx::sqlite(conn)) {
        Ok(value) => {
            run_cached(conn, "RELEASE job").map_err(StoreError::from)?;
            Ok(value)
        }
        Err(e) => {
            // SQLite may already have rolled the whole transaction back (a
            // full disk): then there is no savepoint left, and the writer sees
            // the transaction gone. If the savepoint exists but cannot be
            // rolled back, the whole transaction goes, so no part of this job
            // can commit.
            if conn.execute_batch("ROLLBACK TO job; RELEASE job").is_err() && !conn.is_autocommit() {
                let _ = conn.execute_batch("ROLLBACK");
            }
            Err(e)
        }
    }
}

/// The write connection and the durability its last commit was set to.
struct Writer {
    conn: Connection,
    synced: bool,
    /// Set when a job panicked mid-commit: the connection may hold half a
    /// transaction, so nobody writes through it again.
    broken: bool,
    /// Frames in the write-ahead log after the last commit.
    wal_frames: Arc<AtomicU32>,
}

impl Writer {
    fn checkpoint_due(&self) -> bool {
        !self.broken && self.wal_frames.load(Ordering::SeqCst) >= CHECKPOINT_FRAMES
    }

    /// Copies the log into the database. Runs while the writer holds the
    /// connection, so no frame is added meanwhile: the checkpoint completes
    /// (unless a reader still needs an older snapshot, when the next commit
    /// finds the log still full and it is tried again), and the next commit
    /// reuses the log from its start, as after SQLite's automatic checkpoint.
    fn checkpoint(&self, took: &crate::metrics::Histograms) {
        debug_assert!(
            thread::current().name().is_some_and(|name| name.ends_with("-db-writer")),
            "checkpoints run on the writer thread only"
        );
        let started = std::time::Instant::now();
        let result = self.conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| {
            Ok((row.get::<_, i64>(0)?, row.get::<_, i64>(1)?, row.get::<_, i64>(2)?))
        });
        took.with(&[]).observe_duration(started.elapsed());
        match result {
            // Until the next commit says otherwise: a busy checkpoint is
            // retried after it, not in a loop here.
            Ok((_, log, copied)) => {
                self.wal_frames.store(0, Ordering::SeqCst);
                tracing::debug!(log, copied, took_us = started.elapsed().as_micros() as u64, "checkpoint");
            }
            Err(e) => tracing::warn!(error = %e, "checkpoint failed; retried after the next commit"),
        }
    }
}

/// A write counted in [`Inner::arriving`] while it decides where to commit.
struct Arriving<'a>(&'a AtomicUsize);

impl<'a> Arriving<'a> {
    fn count(arriving: &'a AtomicUsize) -> Self {
        arriving.fetch_add(1, Ordering::SeqCst);
        Self(arriving)
    }
}

impl Drop for Arriving<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The writer thread: commits whatever callers queued, in batches. True
/// when it ends because every handle to the store is gone.
fn write_loop(
    state: &Mutex<Writer>,
    jobs: &mpsc::Receiver<Job>,
    queued: &AtomicUsize,
    degraded: &AtomicBool,
    commits: &super::CommitMetrics,
    checkpoints: &crate::metrics::Histograms,
) -> bool {
    let mut batch: Vec<Job> = Vec::with_capacity(MAX_BATCH);
    while let Ok(first) = jobs.recv() {
        // Poisoned or broken: a job panicked mid-commit; the queued jobs'
        // callers hear that the writer is gone.
        let Ok(mut writer) = state.lock() else { return false };
        if writer.broken {
            return false;
        }
        // Taken once the connection is ours, so that the jobs queued while
        // someone else committed all share this commit.
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let taken = batch.len();
        commit_batch(&mut writer, &mut batch, degraded, commits);
        // Every caller has its answer; writes arriving meanwhile wait for the
        // connection as they would behind a commit.
        if writer.checkpoint_due() {
            writer.checkpoint(checkpoints);
        }
        drop(writer);
        queued.fetch_sub(taken, Ordering::SeqCst);
    }
    // Every handle to the store is gone.
    true
}

/// Runs `batch` in one transaction, each job in its own savepoint, commits
/// (with an fsync if any job is durable) and answers every job.
fn commit_batch(writer: &mut Writer, batch: &mut Vec<Job>, degraded: &AtomicBool, commits: &super::CommitMetrics) {
    let conn = &writer.conn;
    let mut done: Vec<Completion> = Vec::with_capacity(batch.len());
    let durable = batch.iter().any(|job| job.durable);
    if durable != writer.synced {
        let mode = if durable { "PRAGMA synchronous = FULL" } else { "PRAGMA synchronous = NORMAL" };
        if run_cached(conn, mode).is_ok() {
            writer.synced = durable;
        }
    }
    let mut began = run_cached(conn, "BEGIN IMMEDIATE");
    let mut storage_failed = began.as_ref().is_err_and(is_storage_failure);
    for job in batch.drain(..) {
        let (completion, failed) = (job.run)(conn);
        done.push(completion);
        if began.is_ok() && conn.is_autocommit() {
            // SQLite rolled the whole transaction back (as it may on a
            // full disk or an I/O error): every job in it so far is lost,
            // and its caller must hear so. The rest get a new transaction.
            storage_failed = true;
            let lost = CommitError::Storage("the database rolled the transaction back".to_owned());
            for completion in done.drain(..) {
                completion(Some(&lost));
            }
            began = run_cached(conn, "BEGIN IMMEDIATE");
        } else if failed && !storage_failed {
            // The job rolled back alone; whether the storage was the
            // cause, a probe allocation tells (the job's error is the caller's type).
            storage_failed = !can_allocate(conn);
        }
    }
    // Without the outer transaction each job's savepoint committed on its
    // own when released, so there is nothing left to commit.
    let committing = std::time::Instant::now();
    let commit = if began.is_ok() { run_cached(conn, "COMMIT") } else { Ok(()) };
    commits.observe(durable, done.len(), committing.elapsed());
    if crate::telemetry::lag_traced() {
        let took_us = committing.elapsed().as_micros() as u64;
        tracing::trace!(target: crate::telemetry::LAG_TARGET, stage = "store.commit", durable, jobs = done.len(), took_us);
    }
    let error = match commit {
        Ok(()) => None,
        Err(e) => {
            tracing::error!(error = %e, "group commit failed; rolling back the batch");
            let _ = conn.execute_batch("ROLLBACK");
            Some(if is_storage_failure(&e) {
                storage_failed = true;
                CommitError::Storage(e.to_string())
            } else {
                CommitError::Other(e.to_string())
            })
        }
    };
    // Once degraded, only a probe that finds room clears the mark: a
    // small write that happened to fit says nothing about the next one.
    if !storage_failed && degraded.load(Ordering::SeqCst) {
        storage_failed = !can_allocate(conn);
    }
    if storage_failed != degraded.swap(storage_failed, Ordering::SeqCst) {
        if storage_failed {
            tracing::error!("storage is full or failing: writes are refused (503) and the service is not ready");
        } else {
            tracing::info!("storage accepts writes again");
        }
    }
    for completion in done.drain(..) {
        completion(error.as_ref());
    }
}

/// Runs one statement of the commit protocol (`BEGIN`, `SAVEPOINT`, …),
/// parsed once per connection rather than on every commit.
fn run_cached(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([]).map(drop)
}

/// Whether the database can take a few more pages: written and rolled back.
fn can_allocate(conn: &Connection) -> bool {
    if conn.execute_batch("SAVEPOINT probe").is_err() {
        return false;
    }
    let inserted = conn.execute("INSERT INTO store_probe (filler) VALUES (zeroblob(16384))", []);
    let _ = conn.execute_batch("ROLLBACK TO probe; RELEASE probe");
    !matches!(inserted, Err(ref e) if is_storage_failure(e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

    const SCHEMA: &[&str] = &["CREATE TABLE item (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);"];

    async fn insert(store: &Store, name: &'static str) -> Result<i64, StoreError> {
        store.write(move |c| c.query_row("INSERT INTO item (name) VALUES ($1) RETURNING id", &[&name], |r| r.get(0))).await
    }

    async fn count(store: &Store) -> i64 {
        store.read(|c| c.query_row("SELECT count(*) FROM item", &[], |r| r.get(0))).await.unwrap()
    }

    #[tokio::test]
    async fn a_failing_job_rolls_back_alone() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), "t", SCHEMA).unwrap();
        let (a, b, c) = tokio::join!(insert(&store, "a"), insert(&store, "a"), insert(&store, "b"));
        assert_eq!([a.is_ok(), b.is_ok(), c.is_ok()].iter().filter(|ok| **ok).count(), 2);
        assert_eq!(count(&store).await, 2);
    }

    /// Commits counted so far: (durable, relaxed).
    fn commits(db: &Sqlite) -> (u64, u64) {
        let seconds = &db.inner.commits.seconds;
        (seconds.with(&["true"]).count(), seconds.with(&["false"]).count())
    }

    fn put(db: &Sqlite, durable: bool, name: &'static str) -> impl std::future::Future<Output = Result<usize, StoreError>> + 'static {
        let db = db.clone();
        async move { db.submit(durable, move |c| c.execute("INSERT INTO item (name) VALUES ($1)", &[&name]), |_| {}).await }
    }

    #[tokio::test]
    #[allow(clippy::await_holding_lock, reason = "the test holds the connection to make the writes queue")]
    async fn relaxed_and_durable_writes_share_batches_and_both_persist() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = Sqlite::open_capped(dir.path(), "t", SCHEMA, None).unwrap();
            // Someone is committing: the writes queue for the writer thread,
            // which commits them together once the connection is free.
            let busy = db.inner.state.lock().unwrap();
            let writes = [put(&db, false, "r1"), put(&db, true, "d1"), put(&db, false, "r2")].map(tokio::spawn);
            while db.inner.queued.load(Ordering::SeqCst) < 3 {
                tokio::task::yield_now().await;
            }
            drop(busy);
            for write in writes {
                write.await.unwrap().unwrap();
            }
            assert_eq!(commits(&db), (1, 0), "one commit, durable since one of its jobs is");
            let mode: i64 = db.submit(false, |c| c.query_row("PRAGMA synchronous", &[], |r| r.get(0)), |_| {}).await.unwrap();
            assert_eq!(mode, 1, "a lone relaxed write commits with synchronous=NORMAL");
            let mode: i64 = db.submit(true, |c| c.query_row("PRAGMA synchronous", &[], |r| r.get(0)), |_| {}).await.unwrap();
            assert_eq!(mode, 2, "and the next durable one with synchronous=FULL again");
        }
        let store = Store::open(dir.path(), "t", SCHEMA).unwrap();
        assert_eq!(count(&store).await, 3);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lone_write_commits_on_its_callers_thread_and_concurrent_ones_share_commits() {
        let dir = tempfile::tempdir().unwrap();
        let db = Sqlite::open_capped(dir.path(), "t", SCHEMA, None).unwrap();
        let thread = || std::thread::current().name().map(str::to_owned);
        let ran_on = db.submit(true, move |_| Ok::<_, StoreError>(thread()), |_| {}).await.unwrap();
        assert_eq!(ran_on, thread(), "nothing queued: committed without a hand-off to the writer thread");

        concurrent_writes_share_commits(&db, 1).await;
    }

    /// A service's runtime has one worker (as on Kubernetes at a 500m CPU
    /// limit): writes that arrived together still find each other and share
    /// commits, rather than each committing alone on the worker.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn on_one_worker_concurrent_writes_share_commits() {
        let dir = tempfile::tempdir().unwrap();
        let db = Sqlite::open_capped(dir.path(), "t", SCHEMA, None).unwrap();
        concurrent_writes_share_commits(&db, 0).await;
    }

    /// 300 durable writes at once, on a store that has committed `before` times.
    async fn concurrent_writes_share_commits(db: &Sqlite, before: u64) {
        let names: Vec<&'static str> = (0..300).map(|i| &*format!("n{i}").leak()).collect();
        let writes: Vec<_> = names.iter().map(|name| tokio::spawn(put(db, true, name))).collect();
        for write in writes {
            write.await.unwrap().unwrap();
        }
        let (durable, relaxed) = commits(db);
        assert_eq!(relaxed, 0);
        let took = durable - before;
        assert!(took < 300 / 2, "300 concurrent writes took {took} commits: most must share one");
        let rows: i64 = db.read(|c| c.query_row("SELECT count(*) FROM item", &[], |r| r.get(0))).await.unwrap();
        assert_eq!(rows, 300);
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
                        store.write(move |c| c.execute("INSERT INTO item (name) VALUES ($1)", &[&format!("n{i}")])).await
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

    /// The log is grown once at start, as real blocks, and a crash image of
    /// it (valid frames followed by the zeros) recovers every commit.
    #[tokio::test]
    async fn the_write_ahead_log_is_grown_once_at_start_and_a_crash_image_of_it_recovers() {
        use std::os::unix::fs::MetadataExt;
        let (dir, crashed) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let wal = |dir: &Path| std::fs::metadata(dir.join("t.db-wal")).unwrap();
        let store = Store::open(dir.path(), "t", SCHEMA).unwrap();
        let grown = wal(dir.path());
        assert_eq!(grown.len(), 32 + 1100 * (4096 + 24), "a checkpoint's worth of frames and a tenth");
        assert!(grown.blocks() * 512 >= grown.len(), "real blocks, not a sparse file: {} of {} bytes", grown.blocks() * 512, grown.len());
        for i in 0..200 {
            store.write(move |c| c.execute("INSERT INTO item (name) VALUES ($1)", &[&format!("n{i}")])).await.unwrap();
        }
        assert_eq!(wal(dir.path()).len(), grown.len(), "200 commits wrote over the log's blocks without growing it");

        // What a crash leaves: the database and its log as they are, the
        // committed frames followed by the rest of the zeros.
        for file in ["t.db", "t.db-wal"] {
            std::fs::copy(dir.path().join(file), crashed.path().join(file)).unwrap();
        }
        drop(store);
        let recovered = Store::open(crashed.path(), "t", SCHEMA).unwrap();
        assert_eq!(count(&recovered).await, 200);
        let check: String = recovered.read(|c| c.query_row("PRAGMA integrity_check", &[], |r| r.get(0))).await.unwrap();
        assert_eq!(check, "ok");
        assert_eq!(wal(crashed.path()).len(), grown.len(), "recovered, checkpointed and grown again");
        insert(&recovered, "after").await.unwrap();
        assert_eq!(count(&recovered).await, 201);
    }

    /// Lone writes (committed on the caller's thread) and concurrent ones
    /// (on the writer thread) fill the log many times over: every checkpoint
    /// is ours, on the writer thread (a debug assertion), and each lets the
    /// log start again, so it never grows past its preallocated size.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn checkpoints_run_on_the_writer_thread_and_keep_the_log_at_its_size() {
        let dir = tempfile::tempdir().unwrap();
        let db = Sqlite::open_capped(dir.path(), "t", SCHEMA, None).unwrap();
        let wal = || std::fs::metadata(dir.path().join("t.db-wal")).unwrap().len();
        let size = wal();
        for round in 0..6 {
            for i in 0..400 {
                db.submit(false, move |c| c.execute("INSERT INTO item (name) VALUES ($1)", &[&format!("{round}-{i}")]), |_| {})
                    .await
                    .unwrap();
            }
            let together: Vec<_> = (0..200)
                .map(|i| {
                    let db = db.clone();
                    tokio::spawn(async move {
                        db.submit(false, move |c| c.execute("INSERT INTO item (name) VALUES ($1)", &[&format!("{round}-c{i}")]), |_| {})
                            .await
                    })
                })
                .collect();
            for write in together {
                write.await.unwrap().unwrap();
            }
        }
        let checkpoints = db.inner.checkpoints.with(&[]).count();
        assert!(checkpoints >= 3, "3,600 commits of two or more frames each took {checkpoints} checkpoints");
        assert_eq!(wal(), size, "the log was reused from its start after each checkpoint");
        assert!(db.inner.writer_alive.load(Ordering::SeqCst), "the writer thread survived");
        let rows: i64 = db.read(|c| c.query_row("SELECT count(*) FROM item", &[], |r| r.get(0))).await.unwrap();
        assert_eq!(rows, 3_600);
    }

    #[tokio::test]
    async fn a_full_database_refuses_writes_loudly_and_recovers_when_the_cap_is_raised() {
        let dir = tempfile::tempdir().unwrap();
        let mut kept = 0;
        {
            let store = Store::open_capped(dir.path(), "t", SCHEMA, Some(64 * 1024)).unwrap();
            let error = loop {
                let name = format!("{kept:0>400}");
                match store.write(move |c| c.execute("INSERT INTO item (name) VALUES ($1)", &[&name])).await {
                    Ok(_) => kept += 1,
                    Err(e) => break e,
                }
                assert!(kept < 10_000, "the cap was never reached");
            };
            assert!(error.is_storage_failure(), "{error}");
            // A write that needs no new page still commits; the store stays not ready.
            store.write(|c| c.execute("UPDATE item SET name = name WHERE id = 1", &[])).await.unwrap();
            assert!(!store.ping().await, "a full store is not ready");
            assert_eq!(count(&store).await, kept, "the refused write left nothing behind");
            let metrics = crate::metrics::Registry::default();
            store.register_metrics(&metrics);
            let text = metrics.render();
            assert!(text.contains("blog_db_degraded 1\n") && text.contains("blog_db_max_bytes 65536\n"), "{text}");
            assert!(text.contains("\nblog_data_free_bytes ") && text.contains("\nblog_db_bytes "), "{text}");
        }
        let store = Store::open_capped(dir.path(), "t", SCHEMA, Some(1024 * 1024)).unwrap();
        assert!(store.ping().await);
        insert(&store, "after").await.unwrap();
        assert_eq!(count(&store).await, kept + 1);
    }

    #[tokio::test]
    async fn on_a_full_database_every_answer_tells_the_truth() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_capped(dir.path(), "t", SCHEMA, Some(48 * 1024)).unwrap();
        // Rounds of concurrent writes, small and large, so that batches mix
        // jobs that fit with jobs that fill the database (which makes SQLite
        // roll the whole transaction back, jobs that fitted included).
        let mut told_kept = 0;
        for round in 0..40 {
            let writes: Vec<_> = (0..24)
                .map(|i| {
                    let store = store.clone();
                    let name = format!("{round}-{i}-{}", "x".repeat(if i % 3 == 0 { 3_000 } else { 20 }));
                    tokio::spawn(async move { store.write(move |c| c.execute("INSERT INTO item (name) VALUES ($1)", &[&name])).await })
                })
                .collect();
            for write in writes {
                match write.await.unwrap() {
                    Ok(_) => told_kept += 1,
                    Err(e) => assert!(e.is_storage_failure(), "{e}"),
                }
            }
        }
        assert!(!store.ping().await, "the database filled up");
        assert_eq!(count(&store).await, told_kept, "exactly the writes answered Ok are in the database");
    }

    #[tokio::test]
    async fn a_failing_job_that_is_not_the_storage_keeps_the_store_ready() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_capped(dir.path(), "t", SCHEMA, Some(64 * 1024)).unwrap();
        insert(&store, "a").await.unwrap();
        let duplicate = insert(&store, "a").await.unwrap_err();
        assert!(!duplicate.is_storage_failure(), "{duplicate}");
        assert!(store.ping().await);
    }

    /// A job that panics, committed by its caller (`queued: false`) or by
    /// the writer thread (`queued: true`, the connection held meanwhile so
    /// that it must queue): its caller and every later writer hear that the
    /// writer is gone, and readiness turns false.
    #[allow(clippy::await_holding_lock, reason = "the test holds the connection to make the job queue")]
    async fn a_panicking_job_stops_the_writer(queued: bool) {
        let dir = tempfile::tempdir().unwrap();
        let db = Sqlite::open_capped(dir.path(), "t", SCHEMA, None).unwrap();
        assert!(db.ping().await);
        let busy = queued.then(|| db.inner.state.lock().unwrap());
        let job = db.clone();
        let crashed =
            tokio::spawn(async move { job.submit(true, |_| -> Result<(), StoreError> { panic!("a bug in a write job") }, |_| {}).await });
        while queued && db.inner.queued.load(Ordering::SeqCst) < 1 {
            tokio::task::yield_now().await;
        }
        drop(busy);
        let crashed = crashed.await.unwrap();
        assert!(matches!(crashed, Err(StoreError::WriterGone)), "{crashed:?}");
        // The caller may hear of it while the writer thread is still unwinding.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while db.ping().await {
            assert!(std::time::Instant::now() < deadline, "reads still work, but readiness must see that writes cannot");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert!(matches!(put(&db, true, "x").await, Err(StoreError::WriterGone)));
        assert!(matches!(put(&db, false, "y").await, Err(StoreError::WriterGone)));
    }

    #[tokio::test]
    async fn readiness_notices_a_dead_writer_when_the_caller_commits() {
        a_panicking_job_stops_the_writer(false).await;
    }

    #[tokio::test]
    async fn readiness_notices_a_dead_writer_when_the_writer_thread_commits() {
        a_panicking_job_stops_the_writer(true).await;
    }

    /// Statements whose plan SQLite would redo whenever a new value is bound
    /// (a bound value compared in a subquery, a `LIMIT`, a `LIKE`
    /// pattern): prepared once, on both kinds of connection, they are never
    /// prepared again, however often they run with new values.
    #[test]
    fn a_cached_statement_is_planned_once_whatever_is_bound() {
        let dir = tempfile::tempdir().unwrap();
        let db = Sqlite::open_capped(dir.path(), "t", &["CREATE TABLE seen (seq INTEGER PRIMARY KEY, name TEXT);"], None).unwrap();
        const STATEMENTS: [&str; 3] = [
            "SELECT min(s.seq) FROM seen s WHERE NOT EXISTS (SELECT 1 FROM seen n WHERE n.seq = s.seq + 1)
               AND EXISTS (SELECT 1 FROM seen f WHERE f.seq = ?1)",
            "SELECT count(*) FROM (SELECT seq FROM seen WHERE seq > ?1 ORDER BY seq LIMIT ?1)",
            "SELECT count(*) FROM seen WHERE name LIKE ?1",
        ];
        let writer = db.inner.state.lock().unwrap();
        let reader = open_reader(db.path()).unwrap();
        for conn in [&writer.conn, &reader] {
            for sql in STATEMENTS {
                let mut statement = conn.prepare(sql).unwrap();
                for value in [1_i64, 2, 5, 40] {
                    let _: Option<i64> = statement.query_row([value], |row| row.get(0)).unwrap();
                }
                assert_eq!(statement.get_status(rusqlite::StatementStatus::RePrepare), 0, "prepared again: {sql}");
            }
        }
    }
}
