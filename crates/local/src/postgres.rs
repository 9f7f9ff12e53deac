//! A PostgreSQL server of the suite's own, for `cargo xtask up --scale N` and
//! for tests that need a throwaway one.
//!
//! It is Debian's `postgresql` (installed with apt when missing and allowed,
//! as the browser for the tests is), never a server of the machine's: the
//! cluster lives in `<data-dir>/postgres`, made by `initdb` on first use, and
//! the server runs as a child of the [`Supervisor`](crate::supervisor) like
//! every service (pid file `<data-dir>/postgres.pid`, restarted if it dies,
//! stopped with SIGINT, PostgreSQL's *fast* shutdown: open sessions are rolled
//! back and a checkpoint is written, so a stop never waits for a pool to let go).
//! It listens on 127.0.0.1 only, on a TCP port the caller picks, with no Unix
//! socket (so it needs no writable `/var/run/postgresql`), and asks for a
//! password (SCRAM) made at `initdb` and kept in `<data-dir>/postgres.password`,
//! readable by its owner only: other users of the machine cannot connect.
//!
//! PostgreSQL refuses to run as root. Started as root, the cluster belongs
//! to the `postgres` system account (Debian's package makes it; otherwise it
//! is created with `useradd`, and `nobody` is the last resort), and the
//! server and `initdb` run as that account.
//!
//! [`Postgres::create_databases`] makes one database per data-owning service
//! (the database-per-service pattern), idempotently; it and
//! [`Postgres::wait_ready`] use `tokio-postgres`, the driver the services'
//! PostgreSQL store uses.

use std::{
    io,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use blog_domain::Service;
use rustix::process::Signal;

use crate::supervisor::{LogSink, ProcessSpec, Supervisor};

/// The role the suite connects as; it owns every database of the cluster.
pub const ROLE: &str = "blog";
/// The supervisor's name for the server (and so `postgres.pid`, `postgres.log`).
pub const PROCESS: &str = "postgres";
/// Where Debian's packages put each major version: `<here>/<version>/bin`.
const DEBIAN_ROOT: &str = "/usr/lib/postgresql";
/// A directory holding `initdb` and `postgres`, for machines laid out otherwise.
pub const BIN_ENV: &str = "BLOG_POSTGRES_BIN";
/// Connections the server accepts: N replicas of four services, each with a pool.
const MAX_CONNECTIONS: u32 = 200;

/// The services that keep their data in a database of their own here: every
/// data-owning service but the bus, whose log stays embedded (issue 11).
pub fn database_services() -> impl Iterator<Item = Service> {
    Service::ALL.into_iter().filter(|s| s.keeps_data() && *s != Service::EventBus)
}

/// The OS account a process runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Account {
    pub uid: u32,
    pub gid: u32,
}

/// A prepared cluster: its binaries, directory, port and password.
#[derive(Debug, Clone)]
pub struct Postgres {
    bin: PathBuf,
    cluster: PathBuf,
    port: u16,
    password: String,
    run_as: Option<Account>,
}

impl Postgres {
    /// Finds the binaries, makes the cluster in `<data_dir>/postgres` if it is
    /// not there yet, and returns what is needed to run it on `port`. Does not
    /// start it (see [`Postgres::process`]).
    pub fn prepare(data_dir: &Path, port: u16) -> io::Result<Self> {
        std::fs::create_dir_all(data_dir)?;
        let cluster = data_dir.join("postgres");
        let bin = binaries(existing_version(&cluster).as_deref())?;
        let run_as = if rustix::process::geteuid().is_root() { Some(server_account()?) } else { None };
        let password_file = data_dir.join("postgres.password");
        if !cluster.join("PG_VERSION").exists() {
            if let Some(account) = run_as {
                reachable_by(account, data_dir)?;
            }
            let password = fresh_password();
            init_cluster(&bin, &cluster, data_dir, &password, run_as)?;
            write_private(&password_file, &password)?;
        }
        let password = std::fs::read_to_string(&password_file)
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!(
                        "{} is unreadable ({e}); it holds the password of the cluster in {}: delete the cluster to make a new one",
                        password_file.display(),
                        cluster.display()
                    ),
                )
            })?
            .trim()
            .to_owned();
        Ok(Self { bin, cluster, port, password, run_as })
    }

    /// The server as a supervised process: `postgres` in the foreground, on
    /// 127.0.0.1:`port` only.
    pub fn process(&self) -> ProcessSpec {
        let settings = [
            "listen_addresses=127.0.0.1".to_owned(),
            format!("port={}", self.port),
            "unix_socket_directories=".to_owned(),
            format!("max_connections={MAX_CONNECTIONS}"),
        ];
        let mut args = vec!["-D".to_owned(), self.cluster.display().to_string()];
        for setting in settings {
            args.push("-c".to_owned());
            args.push(setting);
        }
        ProcessSpec {
            name: PROCESS.to_owned(),
            program: self.bin.join("postgres"),
            args,
            env: vec![("LC_ALL".to_owned(), "C".to_owned())],
            run_as: self.run_as,
            stop_signal: Signal::INT,
            stops_last: true,
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `postgres://…@127.0.0.1:<port>/<database>`, the `DATABASE_URL` of a service.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://{ROLE}:{}@127.0.0.1:{}/{database}", self.password, self.port)
    }

    /// The same without the password, for printing.
    pub fn display_url(&self, database: &str) -> String {
        format!("postgres://{ROLE}@127.0.0.1:{}/{database}", self.port)
    }

    /// A session on `database` (its connection driven by a task of its own).
    pub async fn connect(&self, database: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let (client, connection) = tokio_postgres::connect(&self.url(database), tokio_postgres::NoTls).await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "postgres connection ended");
            }
        });
        Ok(client)
    }

    /// Polls until the server accepts a session and answers a query, or `deadline` passes.
    pub async fn wait_ready(&self, deadline: Instant) -> io::Result<()> {
        let mut last = String::from("no answer yet");
        while Instant::now() < deadline {
            match self.connect("postgres").await {
                Ok(client) => match client.simple_query("SELECT 1").await {
                    Ok(_) => return Ok(()),
                    Err(e) => last = e.to_string(),
                },
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(io::Error::new(io::ErrorKind::TimedOut, format!("PostgreSQL on port {} not ready in time ({last})", self.port)))
    }

    /// Makes each database that does not exist yet. Safe to run again, and
    /// alongside another caller doing the same.
    pub async fn create_databases(&self, names: impl IntoIterator<Item = &str>) -> io::Result<()> {
        let client = self.connect("postgres").await.map_err(io::Error::other)?;
        for name in names {
            if !name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_' || b == b'-') || name.is_empty() {
                return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("not a database name we make: {name:?}")));
            }
            let exists =
                client.query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name]).await.map_err(io::Error::other)?.is_some();
            if exists {
                continue;
            }
            // CREATE DATABASE takes no parameters; the name was checked above.
            match client.batch_execute(&format!("CREATE DATABASE \"{name}\"")).await {
                Ok(()) => {}
                // Another caller made it between the check and here.
                Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::DUPLICATE_DATABASE) => {}
                // Two concurrent CREATE DATABASE of one name can also collide on the catalog's unique index.
                Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) => {}
                Err(e) => return Err(io::Error::other(format!("CREATE DATABASE {name}: {e}"))),
            }
        }
        Ok(())
    }

    /// The databases of the cluster, for checks.
    pub async fn databases(&self) -> io::Result<Vec<String>> {
        let client = self.connect("postgres").await.map_err(io::Error::other)?;
        let rows = client
            .query("SELECT datname FROM pg_database WHERE NOT datistemplate ORDER BY datname", &[])
            .await
            .map_err(io::Error::other)?;
        Ok(rows.iter().map(|row| row.get(0)).collect())
    }
}

/// How long a starting server may take to accept sessions (a first start
/// includes crash recovery of a cluster that was killed).
pub const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Prepares the cluster in `<data_dir>/postgres`, runs its server under
/// `supervisor` on 127.0.0.1:`port`, waits until it answers and makes the
/// services' databases: what the suite does before starting its replicas.
pub async fn start(supervisor: &mut Supervisor, data_dir: &Path, port: u16) -> io::Result<Postgres> {
    let postgres = Postgres::prepare(data_dir, port)?;
    supervisor.add(postgres.process());
    postgres.wait_ready(Instant::now() + START_TIMEOUT).await?;
    postgres.create_databases(database_services().map(Service::name)).await?;
    Ok(postgres)
}

/// A server of its own, with its own supervisor, outside any suite: a test's
/// throwaway PostgreSQL (`tests/src/postgres.rs`).
pub struct Server {
    pub postgres: Postgres,
    pub supervisor: Supervisor,
}

impl Server {
    /// Starts one in `data_dir` (its pid file there too) on `port`, with the services' databases.
    pub async fn start(data_dir: &Path, port: u16, log: LogSink) -> io::Result<Self> {
        ensure_installed()?;
        let (postgres, supervisor) = Supervisor::owning(data_dir.to_owned(), log, async |s| start(s, data_dir, port).await).await?;
        Ok(Self { postgres, supervisor })
    }

    /// Fast shutdown; returns once the server has exited.
    pub async fn stop(self) {
        self.supervisor.shutdown().await;
    }
}

/// The PostgreSQL binaries, installing Debian's `postgresql` with apt when
/// they are missing and this process may (root, apt-get present).
pub fn ensure_installed() -> io::Result<PathBuf> {
    // Tests starting servers in parallel must not run apt-get twice at once (dpkg's lock).
    static INSTALLING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = INSTALLING.lock().unwrap_or_else(|p| p.into_inner());
    if let Ok(bin) = binaries(None) {
        return Ok(bin);
    }
    let root = rustix::process::geteuid().is_root();
    let apt = Path::new("/usr/bin/apt-get").exists();
    if !root || !apt {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("PostgreSQL is not installed: apt-get install postgresql (or set {BIN_ENV} to a directory with initdb and postgres)"),
        ));
    }
    println!("installing Debian's postgresql (for --scale and the PostgreSQL tests)");
    run(Command::new("apt-get").args(["update", "-q"]))?;
    run(Command::new("apt-get").args(["install", "-y", "-q", "postgresql"]).env("DEBIAN_FRONTEND", "noninteractive"))?;
    binaries(None)
}

/// The major version a cluster was made with, if there is one.
fn existing_version(cluster: &Path) -> Option<String> {
    std::fs::read_to_string(cluster.join("PG_VERSION")).ok().map(|v| v.trim().to_owned())
}

/// The directory with `initdb` and `postgres`: [`BIN_ENV`], else Debian's
/// `/usr/lib/postgresql/<version>/bin`, the cluster's own version when there
/// is a cluster (a server of another major version cannot open it), else the newest.
pub fn binaries(version: Option<&str>) -> io::Result<PathBuf> {
    let complete = |dir: &Path| dir.join("initdb").is_file() && dir.join("postgres").is_file();
    if let Some(dir) = std::env::var_os(BIN_ENV).map(PathBuf::from) {
        return if complete(&dir) {
            Ok(dir)
        } else {
            Err(io::Error::new(io::ErrorKind::NotFound, format!("{BIN_ENV}={} has no initdb and postgres", dir.display())))
        };
    }
    let mut installed: Vec<(u32, PathBuf)> = std::fs::read_dir(DEBIAN_ROOT)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let major = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            complete(&bin).then_some((major, bin))
        })
        .collect();
    installed.sort();
    let found = match version {
        Some(wanted) => installed.into_iter().find(|(major, _)| major.to_string() == wanted),
        None => installed.pop(),
    };
    found.map(|(_, bin)| bin).ok_or_else(|| {
        let what = version.map_or_else(|| "PostgreSQL".to_owned(), |v| format!("PostgreSQL {v} (the version of the existing cluster)"));
        io::Error::new(io::ErrorKind::NotFound, format!("{what} is not installed under {DEBIAN_ROOT}"))
    })
}

/// The account the server runs as when we are root: `postgres` (made by
/// Debian's package; created here if absent), else `nobody`.
fn server_account() -> io::Result<Account> {
    if let Some(account) = lookup("postgres") {
        return Ok(account);
    }
    let created = Command::new("useradd")
        .args(["--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin"])
        .arg("postgres")
        .status()
        .is_ok_and(|s| s.success());
    if created && let Some(account) = lookup("postgres") {
        return Ok(account);
    }
    lookup("nobody").ok_or_else(|| io::Error::other("PostgreSQL cannot run as root, and there is no `postgres` or `nobody` account"))
}

fn lookup(name: &str) -> Option<Account> {
    let id = |flag: &str| -> Option<u32> {
        let out = Command::new("id").arg(flag).arg(name).output().ok()?;
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().parse().ok())?
    };
    Some(Account { uid: id("-u")?, gid: id("-g")? })
}

/// Fails with a clear message unless `account` can reach `dir` (search
/// permission on every ancestor): better than `initdb` failing obscurely.
/// Permissions are never widened here: they are the user's.
fn reachable_by(account: Account, dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    for ancestor in dir.ancestors() {
        let Ok(meta) = std::fs::metadata(ancestor) else { continue };
        let mode = meta.mode();
        let allowed = if meta.uid() == account.uid {
            mode & 0o100 != 0
        } else if meta.gid() == account.gid {
            mode & 0o010 != 0
        } else {
            mode & 0o001 != 0
        };
        if !allowed {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "PostgreSQL runs as uid {} and cannot reach {} (mode {:o}): give others search permission (chmod o+x) or choose a data directory elsewhere",
                    account.uid,
                    ancestor.display(),
                    mode & 0o7777
                ),
            ));
        }
    }
    Ok(())
}

/// `initdb` into `cluster`, as `run_as` when given (the directory chowned to it).
fn init_cluster(bin: &Path, cluster: &Path, data_dir: &Path, password: &str, run_as: Option<Account>) -> io::Result<()> {
    std::fs::create_dir_all(cluster)?;
    std::fs::set_permissions(cluster, std::fs::Permissions::from_mode(0o700))?;
    // initdb reads the superuser's password from a file the server account can read.
    let password_file = data_dir.join("postgres.initdb-password");
    write_private(&password_file, password)?;
    if let Some(account) = run_as {
        std::os::unix::fs::chown(cluster, Some(account.uid), Some(account.gid))?;
        std::os::unix::fs::chown(&password_file, Some(account.uid), Some(account.gid))?;
    }
    let mut initdb = Command::new(bin.join("initdb"));
    initdb
        .arg("--pgdata")
        .arg(cluster)
        .args([&format!("--username={ROLE}"), "--auth=scram-sha-256", "--encoding=UTF8", "--locale=C"])
        .arg(format!("--pwfile={}", password_file.display()))
        .env("LC_ALL", "C")
        .current_dir(data_dir);
    if let Some(account) = run_as {
        use std::os::unix::process::CommandExt;
        initdb.uid(account.uid).gid(account.gid);
    }
    let output = initdb.output();
    let _ = std::fs::remove_file(&password_file);
    let output = output.map_err(|e| io::Error::new(e.kind(), format!("cannot run {}: {e}", bin.join("initdb").display())))?;
    if !output.status.success() {
        return Err(io::Error::other(format!(
            "initdb of {} failed ({}):\n{}{}",
            cluster.display(),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )));
    }
    Ok(())
}

/// Writes `contents` to a new file only its owner may read.
pub(crate) fn write_private(path: &Path, contents: &str) -> io::Result<()> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    let _ = std::fs::remove_file(path);
    let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    file.write_all(format!("{contents}\n").as_bytes())
}

/// A password from the OS's random source (two v4 UUIDs: 244 random bits), URL-safe as it is.
fn fresh_password() -> String {
    format!("{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple())
}

fn run(command: &mut Command) -> io::Result<()> {
    let status = command.status()?;
    if status.success() { Ok(()) } else { Err(io::Error::other(format!("{command:?} failed: {status}"))) }
}

#[cfg(test)]
mod tests {
    use blog_kit::ports::free_port;

    use super::*;

    #[test]
    fn every_data_owning_service_but_the_bus_gets_a_database() {
        let names: Vec<_> = database_services().map(Service::name).collect();
        assert_eq!(names.len(), 4, "{names:?}");
        for name in ["posts", "comments", "moderation", "query"] {
            assert!(names.contains(&name), "{name} in {names:?}");
        }
    }

    /// A temporary data directory the server account can reach when we are root.
    fn reachable_tempdir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        dir
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_server_of_our_own_starts_makes_the_databases_once_and_stops_fast() {
        let dir = reachable_tempdir();
        let data = dir.path().join("data");
        let port = free_port();
        let server = Server::start(&data, port, LogSink::Dir(dir.path().to_owned())).await.unwrap();
        let pid = server.supervisor.pid(PROCESS).expect("postgres runs");
        let pid_file = std::fs::read_to_string(data.join("postgres.pid")).unwrap();
        assert_eq!(pid_file.trim(), pid.to_string());
        assert!(data.join("postgres").join("PG_VERSION").is_file());
        let mode = std::fs::metadata(data.join("postgres.password")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "the password file is private");

        // Loopback only, and a password is required.
        let wrong = format!("postgres://{ROLE}:wrong@127.0.0.1:{port}/posts");
        assert!(tokio_postgres::connect(&wrong, tokio_postgres::NoTls).await.is_err(), "a wrong password is refused");
        let expected = ["comments", "moderation", "postgres", "posts", "query"];
        assert_eq!(server.postgres.databases().await.unwrap(), expected);
        // Again, and twice at once: nothing changes, nothing fails.
        let (a, b) = tokio::join!(
            server.postgres.create_databases(database_services().map(Service::name)),
            server.postgres.create_databases(["posts", "extra"])
        );
        a.unwrap();
        b.unwrap();
        assert_eq!(server.postgres.databases().await.unwrap(), ["comments", "extra", "moderation", "postgres", "posts", "query"]);
        assert!(server.postgres.create_databases(["bad\"; DROP"]).await.is_err());

        // A service's DATABASE_URL reaches its own database.
        let (client, connection) = tokio_postgres::connect(&server.postgres.url("posts"), tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(connection);
        let row = client.query_one("SELECT current_database()", &[]).await.unwrap();
        assert_eq!(row.get::<_, String>(0), "posts");

        // Fast shutdown does not wait for the open session.
        server.stop().await;
        assert!(!data.join("postgres.pid").exists());
        assert!(!data.join("postgres").join("postmaster.pid").exists(), "a clean shutdown removes postmaster.pid");
        assert!(client.query_one("SELECT 1", &[]).await.is_err(), "the session ended with the server");

        // The same cluster starts again with its data.
        let again = Server::start(&data, free_port(), LogSink::Dir(dir.path().to_owned())).await.unwrap();
        assert_eq!(again.postgres.databases().await.unwrap().len(), 6);
        again.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_killed_server_is_restarted_by_the_supervisor() {
        let dir = reachable_tempdir();
        let data = dir.path().join("data");
        let server = Server::start(&data, free_port(), LogSink::Dir(dir.path().to_owned())).await.unwrap();
        let old = server.supervisor.pid(PROCESS);
        assert!(server.supervisor.signal(PROCESS, Signal::KILL));
        assert!(server.supervisor.wait_restarted(PROCESS, old, START_TIMEOUT).await, "restarted");
        server.postgres.wait_ready(Instant::now() + START_TIMEOUT).await.unwrap();
        assert_eq!(server.postgres.databases().await.unwrap().len(), 5);
        server.stop().await;
    }

    #[test]
    fn an_unreachable_data_directory_is_refused_with_its_name() {
        let dir = tempfile::tempdir().unwrap();
        let inner = dir.path().join("locked").join("data");
        std::fs::create_dir_all(&inner).unwrap();
        std::fs::set_permissions(dir.path().join("locked"), std::fs::Permissions::from_mode(0o700)).unwrap();
        let stranger = Account { uid: 65534, gid: 65534 };
        let refused = reachable_by(stranger, &inner).unwrap_err();
        assert_eq!(refused.kind(), io::ErrorKind::PermissionDenied);
        assert!(refused.to_string().contains("locked"), "{refused}");
        std::fs::set_permissions(dir.path().join("locked"), std::fs::Permissions::from_mode(0o711)).unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        reachable_by(stranger, &inner).unwrap();
    }
}
