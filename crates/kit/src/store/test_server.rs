//! A throwaway PostgreSQL server for tests (feature `testing`): Debian's
//! binaries (`/usr/lib/postgresql/<version>/bin`, or `BLOG_POSTGRES_BIN`), `initdb` in a
//! temporary directory, listening on 127.0.0.1 on a free port, run as the
//! `postgres` account when the tests run as root (PostgreSQL refuses root).
//!
//! Tests of one binary share a server ([`shared`]) and each takes a fresh
//! database of its own ([`TestServer::database`]); the server is stopped
//! (fast shutdown, by its PID) when the last test holding it ends. Without
//! the binaries, [`shared`] says so and returns `None` so the caller can
//! skip, except in CI (`CI` set), where a missing PostgreSQL fails the test.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, PoisonError, Weak},
    time::{Duration, Instant},
};

use super::DatabaseUrl;

/// Longest a server may take to start or stop.
const DEADLINE: Duration = Duration::from_secs(60);

/// A running server; stopped when dropped.
#[derive(Debug)]
pub struct TestServer {
    child: Child,
    bin: PathBuf,
    port: u16,
    dir: tempfile::TempDir,
}

static SHARED: Mutex<Weak<TestServer>> = Mutex::new(Weak::new());

/// The server the tests of this binary share, started by the first caller;
/// `None` when PostgreSQL is not installed here and this is not CI.
pub fn shared() -> Option<Arc<TestServer>> {
    let mut shared = SHARED.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(server) = shared.upgrade() {
        return Some(server);
    }
    let Some(bin) = binaries() else {
        assert!(std::env::var_os("CI").is_none(), "PostgreSQL's binaries are missing; CI must run the PostgreSQL tests");
        eprintln!("skipped: no PostgreSQL binaries (set BLOG_POSTGRES_BIN or install postgresql)");
        return None;
    };
    let server = Arc::new(TestServer::start(&bin).unwrap_or_else(|e| panic!("cannot start PostgreSQL: {e}")));
    *shared = Arc::downgrade(&server);
    Some(server)
}

/// The directory of `initdb` and `postgres`.
fn binaries() -> Option<PathBuf> {
    if let Some(bin) = std::env::var_os("BLOG_POSTGRES_BIN") {
        return Some(PathBuf::from(bin));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("postgres").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

/// The account to run as when root: `postgres`, else `nobody`.
fn account() -> Option<(u32, u32)> {
    if !rustix::process::geteuid().is_root() {
        return None;
    }
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let find = |name: &str| {
        passwd.lines().find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            (fields.first() == Some(&name) && fields.len() > 3).then(|| Some((fields[2].parse().ok()?, fields[3].parse().ok()?)))?
        })
    };
    Some(find("postgres").or_else(|| find("nobody")).unwrap_or((65534, 65534)))
}

fn as_account(mut command: Command, account: Option<(u32, u32)>) -> Command {
    use std::os::unix::process::CommandExt;
    if let Some((uid, gid)) = account {
        command.uid(uid).gid(gid);
    }
    command
}

/// `postgres` on `dir/data`, its socket in `dir`, on 127.0.0.1:`port`.
fn spawn(bin: &Path, dir: &Path, port: u16) -> Result<Child, String> {
    let log = |name: &str| std::fs::OpenOptions::new().create(true).append(true).open(dir.join(name)).map_err(|e| e.to_string());
    let mut postgres = Command::new(bin.join("postgres"));
    postgres
        .arg("-D")
        .arg(dir.join("data"))
        .arg("-k")
        .arg(dir)
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-c", "max_connections=200"])
        .stdin(Stdio::null())
        .stdout(log("postgres.log")?)
        .stderr(log("postgres.err")?);
    as_account(postgres, account()).spawn().map_err(|e| format!("postgres: {e}"))
}

impl TestServer {
    /// A server of the caller's own (to stop and start again), or `None`
    /// as for [`shared`].
    pub fn own() -> Option<Self> {
        let Some(bin) = binaries() else {
            assert!(std::env::var_os("CI").is_none(), "PostgreSQL's binaries are missing; CI must run the PostgreSQL tests");
            eprintln!("skipped: no PostgreSQL binaries (set BLOG_POSTGRES_BIN or install postgresql)");
            return None;
        };
        Some(Self::start(&bin).unwrap_or_else(|e| panic!("cannot start PostgreSQL: {e}")))
    }

    fn start(bin: &Path) -> Result<Self, String> {
        let account = account();
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        if let Some((uid, gid)) = account {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).map_err(|e| e.to_string())?;
        }
        let data = dir.path().join("data");
        let log = |name: &str| std::fs::File::create(dir.path().join(name)).map_err(|e| e.to_string());
        let mut initdb = Command::new(bin.join("initdb"));
        initdb
            .args(["-A", "trust", "-U", "blog", "-E", "UTF8", "--locale=C", "--no-sync", "-D"])
            .arg(&data)
            .stdout(log("initdb.log")?)
            .stderr(log("initdb.err")?);
        let status = as_account(initdb, account).status().map_err(|e| format!("initdb: {e}"))?;
        if !status.success() {
            let err = std::fs::read_to_string(dir.path().join("initdb.err")).unwrap_or_default();
            return Err(format!("initdb failed ({status}): {err}"));
        }
        let port = crate::ports::free_port();
        let child = spawn(bin, dir.path(), port)?;
        let server = Self { child, bin: bin.to_owned(), port, dir };
        server.wait_ready()?;
        Ok(server)
    }

    /// Stops the server (fast shutdown) and waits until it has exited.
    pub fn stop(&mut self) {
        // Never signal a PID already reaped (it may be someone else's now).
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        let pid = rustix::process::Pid::from_child(&self.child);
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::INT);
        let deadline = Instant::now() + DEADLINE;
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the stopped server again, on the same port and data.
    pub fn restart(&mut self) {
        self.child = spawn(&self.bin, self.dir.path(), self.port).unwrap_or_else(|e| panic!("cannot restart PostgreSQL: {e}"));
        self.wait_ready().unwrap_or_else(|e| panic!("{e}"));
    }

    /// Polls `postmaster.pid`, whose last line says `ready` once the server
    /// accepts connections.
    fn wait_ready(&self) -> Result<(), String> {
        let deadline = Instant::now() + DEADLINE;
        let pid_file = self.dir.path().join("data").join("postmaster.pid");
        loop {
            let status = std::fs::read_to_string(&pid_file).unwrap_or_default();
            if status.lines().nth(7).is_some_and(|line| line.trim() == "ready") {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("not ready in {DEADLINE:?}: {}", self.log()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The server's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("postgres.err")).unwrap_or_default()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL of `database` on this server.
    pub fn url(&self, database: &str) -> DatabaseUrl {
        let raw = format!("postgres://blog@127.0.0.1:{}/{database}", self.port);
        raw.parse().unwrap_or_else(|e| panic!("{raw}: {e}"))
    }

    /// A fresh, empty database.
    pub async fn database(&self) -> DatabaseUrl {
        let name = format!("t_{}", uuid::Uuid::new_v4().simple());
        let config = format!("host=127.0.0.1 port={} user=blog dbname=postgres", self.port);
        let (client, connection) = tokio_postgres::connect(&config, tokio_postgres::NoTls).await.expect("connect to the test server");
        let driver = tokio::spawn(connection);
        client.batch_execute(&format!("CREATE DATABASE {name}")).await.expect("create a test database");
        drop(client);
        let _ = driver.await;
        self.url(&name)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        // Fast shutdown; killed if it does not end in time.
        self.stop();
    }
}
