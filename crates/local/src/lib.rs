//! Running the whole suite on one machine, with no cluster and no Docker.
//!
//! [`Suite`] starts every service binary as its own OS process under a
//! [`supervisor::Supervisor`] (restart with backoff, pid files, prefixed
//! logs, clean stop) and puts a [`gateway`] in front that routes exactly as
//! the Kubernetes Ingress does, from the same route table. `cargo xtask up`
//! and the integration tests both use it, so the tests run what users run.
//!
//! Scaled out ([`Options::scale`], `cargo xtask up --scale N`), every service,
//! the bus included, runs as N replicas, `<service>-<i>` (i from 1), each on a
//! port of its own; the data-owning ones get `DATABASE_URL` of their database
//! on the suite's own PostgreSQL ([`postgres`]), and the bus's replicas
//! `EVENT_STORE` of the suite's own 3-node NATS cluster with JetStream
//! ([`nats`]), both started (and waited for) before the services. The gateway
//! balances over the replicas, and each service's usual address becomes a
//! balancer over its replicas too ([`gateway::Gateway::for_service`], what a
//! Kubernetes `Service` is to its pods), so publishers, subscribers and the
//! bus reach whichever replica is alive.

pub mod gateway;
pub mod k8s;
pub mod nats;
pub mod postgres;
pub mod routes;
pub mod supervisor;

use std::{
    collections::BTreeMap,
    io,
    net::SocketAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use blog_domain::Service;
use blog_kit::Shutdown;
use supervisor::{LogSink, ProcessSpec, Supervisor};
use tokio::net::TcpListener;

/// How to launch the suite. Its `Debug` leaves the secrets out.
#[derive(Clone)]
pub struct Options {
    /// Where the service binaries are.
    pub bin_dir: PathBuf,
    /// Each service keeps its data under `<data_dir>/<service>`.
    pub data_dir: PathBuf,
    /// Port of each service.
    pub ports: BTreeMap<Service, u16>,
    pub gateway_addr: SocketAddr,
    pub log: LogSink,
    /// Extra environment for one service, e.g. `POST_WAIT_MS` for comments.
    pub env: Vec<(Service, String, String)>,
    /// `INTERNAL_SECRET` of this run, given to every service but the client.
    pub internal_secret: String,
    /// The ports of each replicated service's replicas (see [`Options::scale`]);
    /// a service not here runs as one process on its port, as always.
    pub replicas: BTreeMap<Service, Vec<u16>>,
    /// Port of the suite's own PostgreSQL, when it runs one (scaled out).
    pub postgres_port: Option<u16>,
    /// The ports of the suite's own NATS nodes, when it runs them (scaled out):
    /// the bus's replicas share the log in their JetStream.
    pub nats: Vec<nats::NodePorts>,
    /// The NATS nodes' password of this run, given to the bus's replicas
    /// (`NATS_PASSWORD`, user [`nats::BUS_USER`]) when there are nodes.
    pub nats_password: String,
}

impl std::fmt::Debug for Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const HIDDEN: &str = "<hidden>";
        // Extra variables are shown by name: a value may be a secret too.
        let env: Vec<(Service, &str)> = self.env.iter().map(|(service, name, _)| (*service, name.as_str())).collect();
        f.debug_struct("Options")
            .field("bin_dir", &self.bin_dir)
            .field("data_dir", &self.data_dir)
            .field("ports", &self.ports)
            .field("gateway_addr", &self.gateway_addr)
            .field("log", &self.log)
            .field("env", &env)
            .field("internal_secret", &HIDDEN)
            .field("replicas", &self.replicas)
            .field("postgres_port", &self.postgres_port)
            .field("nats", &self.nats)
            .field("nats_password", &HIDDEN)
            .finish()
    }
}

/// The supervisor's name for replica `i` (from 1) of `service`; its pid file is `<name>.pid`.
pub fn replica_name(service: Service, i: usize) -> String {
    format!("{}-{i}", service.name())
}

impl Options {
    /// The default ports, gateway on `127.0.0.1:<gateway_port>`.
    pub fn standard(bin_dir: PathBuf, data_dir: PathBuf, gateway_port: u16, log: LogSink) -> Self {
        Self {
            bin_dir,
            data_dir,
            ports: Service::ALL.iter().map(|s| (*s, s.default_port())).collect(),
            gateway_addr: SocketAddr::from(([127, 0, 0, 1], gateway_port)),
            log,
            env: Vec::new(),
            internal_secret: fresh_secret(),
            replicas: BTreeMap::new(),
            postgres_port: None,
            nats: Vec::new(),
            nats_password: fresh_secret(),
        }
    }

    /// Runs `replicas` replicas of every service, replica `i` (from 1) of a
    /// service on `port(service, i)`, PostgreSQL on `postgres_port` and a NATS
    /// node on each of `nats` (the bus's log). One replica is the usual suite.
    pub fn scale(&mut self, replicas: usize, postgres_port: u16, nats: Vec<nats::NodePorts>, mut port: impl FnMut(Service, usize) -> u16) {
        if replicas <= 1 {
            self.replicas.clear();
            self.postgres_port = None;
            self.nats.clear();
            return;
        }
        // Every service, the bus on JetStream (its replicas share the log and take turns per subscriber).
        self.replicas = Service::ALL.into_iter().map(|s| (s, (1..=replicas).map(|i| port(s, i)).collect())).collect();
        self.postgres_port = Some(postgres_port);
        self.nats = nats;
    }

    /// `EVENT_STORE` of the bus's replicas: every NATS node, when there are any.
    pub fn event_store(&self) -> Option<String> {
        (!self.nats.is_empty()).then(|| nats::url_of(&self.nats))
    }

    /// The processes of `service`: `(name, port)` of each replica, or of the one process.
    pub fn processes(&self, service: Service) -> Vec<(String, u16)> {
        match self.replicas.get(&service) {
            Some(ports) => ports.iter().enumerate().map(|(i, port)| (replica_name(service, i + 1), *port)).collect(),
            None => vec![(service.name().to_owned(), self.ports[&service])],
        }
    }

    /// The environment a service process gets: its port, its data directory,
    /// every peer's URL and, for all but the client (which only reads the
    /// bus), the run's internal secret.
    pub fn env_for(&self, service: Service) -> Vec<(String, String)> {
        self.env_for_process(service, service.name(), self.ports[&service])
    }

    /// The same for one process of `service` (a replica) named `name` on `port`:
    /// a data directory of its own and, scaled out, its service's `DATABASE_URL`.
    fn env_for_process(&self, service: Service, name: &str, port: u16) -> Vec<(String, String)> {
        let mut env = vec![
            // glibc gives threads malloc arenas of their own; two keep idle memory small.
            ("MALLOC_ARENA_MAX".to_owned(), "2".to_owned()),
            ("PORT".to_owned(), port.to_string()),
            ("DATA_DIR".to_owned(), self.data_dir.join(name).display().to_string()),
            // It stops by itself if this process dies without stopping it.
            (blog_kit::shutdown::SUPERVISOR_ENV.to_owned(), std::process::id().to_string()),
        ];
        if let Some(workers) = async_workers(service, std::env::var("TOKIO_WORKER_THREADS").ok()) {
            env.push(("TOKIO_WORKER_THREADS".to_owned(), workers));
        }
        for peer in Service::ALL {
            env.push((peer.url_env().to_owned(), self.url(peer)));
        }
        if service != Service::Client {
            env.push((blog_kit::internal::SECRET_ENV.to_owned(), self.internal_secret.clone()));
        }
        if service == Service::EventBus
            && let Some(url) = self.event_store()
        {
            env.push(("EVENT_STORE".to_owned(), url));
            env.push(("NATS_USER".to_owned(), nats::BUS_USER.to_owned()));
            env.push(("NATS_PASSWORD".to_owned(), self.nats_password.clone()));
        }
        env.extend(self.env.iter().filter(|(s, _, _)| *s == service).map(|(_, k, v)| (k.clone(), v.clone())));
        env
    }

    /// The address of `service`: its one process, or the balancer over its replicas.
    pub fn url(&self, service: Service) -> String {
        format!("http://127.0.0.1:{}", self.ports[&service])
    }

    /// The base URLs of the processes of `service`.
    pub fn process_urls(&self, service: Service) -> Vec<String> {
        self.processes(service).into_iter().map(|(_, port)| format!("http://127.0.0.1:{port}")).collect()
    }
}

/// `TOKIO_WORKER_THREADS` of a process of `service`, when the suite sets it.
/// The suite's processes share this machine's cores, so each but query runs
/// one async worker, as a container at the manifests' CPU limit of 500m does:
/// their work is short steps waiting on I/O, and every hop of an event then
/// wakes one thread per process rather than several (a second worker also
/// looks for work to steal at every wake-up; on two cores the idle
/// consistency lag was about 0.5 ms shorter). Query keeps tokio's default, a
/// worker per core: answering `GET /posts` is CPU work (copying the whole
/// view into each answer), and on one worker it served a third fewer. The
/// caller's own `TOKIO_WORKER_THREADS` (`inherited`) applies to all.
pub fn async_workers(service: Service, inherited: Option<String>) -> Option<String> {
    inherited.or_else(|| (service != Service::Query).then(|| "1".to_owned()))
}

/// A secret for one run, from the OS's random source (v4 UUIDs): 244 random
/// bits in hex (nothing to escape in a URL or a configuration file).
pub(crate) fn fresh_secret() -> String {
    format!("{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple())
}

/// The running suite.
pub struct Suite {
    pub options: Options,
    pub supervisor: Supervisor,
    pub gateway_addr: SocketAddr,
    /// The suite's PostgreSQL, when scaled out.
    pub postgres: Option<postgres::Postgres>,
    /// The suite's NATS cluster (the bus's JetStream), when scaled out.
    pub nats: Option<nats::Nats>,
    stop_gateway: tokio::sync::oneshot::Sender<()>,
}

impl Suite {
    /// Starts every service and the gateway; does not wait for the services'
    /// readiness. Scaled out, PostgreSQL and the NATS cluster are started
    /// first and waited for.
    pub async fn launch(options: Options) -> io::Result<Self> {
        std::fs::create_dir_all(&options.data_dir)?;
        for service in Service::ALL {
            let program = options.bin_dir.join(service.name());
            if !program.exists() {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("{} is missing; build the workspace first", program.display()),
                ));
            }
        }
        // A port a service process is to listen on and that something holds
        // already (another suite, or what a killed launcher left running)
        // fails the launch: else that process would fail to start, again
        // and again, while the suite reported ready through the other one.
        for service in Service::ALL {
            for (name, port) in options.processes(service) {
                if let Err(e) = std::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port))) {
                    return Err(io::Error::new(
                        e.kind(),
                        format!("port {port}, where {name} is to listen, is taken ({e}): is another suite running on it?"),
                    ));
                }
            }
        }
        // Bind every address first, so a taken port fails the launch before
        // anything runs (and no other socket takes one while the stores start).
        let listener = TcpListener::bind(options.gateway_addr).await?;
        let gateway_addr = listener.local_addr()?;
        let mut service_addresses = Vec::new();
        for service in options.replicas.keys() {
            let address = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], options.ports[service]))).await?;
            service_addresses.push((address, gateway::Gateway::for_service(*service, options.process_urls(*service))));
        }
        let mut supervisor = Supervisor::new(options.data_dir.clone(), options.log.clone());
        let postgres = match options.postgres_port {
            Some(port) => {
                postgres::ensure_installed()?;
                match postgres::start(&mut supervisor, &options.data_dir, port).await {
                    Ok(postgres) => Some(postgres),
                    Err(e) => {
                        supervisor.shutdown().await;
                        return Err(e);
                    }
                }
            }
            None => None,
        };
        // The NATS nodes elect while the services start (the bus waits for
        // JetStream): the services' ports, chosen before, are taken soonest.
        let nats = match options.nats.as_slice() {
            [] => None,
            nodes => match nats::Nats::prepare(&options.data_dir, nodes.to_vec(), &options.nats_password) {
                Ok(nats) => {
                    for spec in nats.processes() {
                        supervisor.add(spec);
                    }
                    Some(nats)
                }
                Err(e) => {
                    supervisor.shutdown().await;
                    return Err(e);
                }
            },
        };
        let (stop_gateway, stopped) = tokio::sync::oneshot::channel::<()>();
        let shutdown = Shutdown::new(async move {
            let _ = stopped.await;
        });
        for service in Service::ALL {
            let program = options.bin_dir.join(service.name());
            for (name, port) in options.processes(service) {
                let mut env = options.env_for_process(service, &name, port);
                if let Some(postgres) = postgres.as_ref().filter(|_| postgres::database_services().any(|s| s == service)) {
                    env.push(("DATABASE_URL".to_owned(), postgres.url(service.name())));
                }
                supervisor.add(ProcessSpec::new(name, program.clone(), env));
            }
        }
        for (address, balancer) in service_addresses {
            tokio::spawn(gateway::serve(address, balancer, shutdown.clone()));
        }
        let upstreams = Service::ALL.iter().map(|s| (*s, options.process_urls(*s))).collect();
        tokio::spawn(gateway::serve(listener, gateway::Gateway::balanced(upstreams), shutdown));
        if let Some(nats) = &nats
            && let Err(e) = nats.wait_ready(Instant::now() + nats::START_TIMEOUT).await
        {
            supervisor.shutdown().await;
            return Err(e);
        }
        Ok(Self { options, supervisor, gateway_addr, postgres, nats, stop_gateway })
    }

    /// Waits until every running service process answers `/readyz`.
    pub async fn wait_ready(&self, within: Duration) -> io::Result<()> {
        let http = blog_kit::http::client::http_client(Duration::from_secs(1));
        let deadline = Instant::now() + within;
        for service in Service::ALL {
            for (name, port) in self.options.processes(service) {
                if !self.supervisor.is_wanted(&name) {
                    continue;
                }
                wait_ready(&http, &format!("http://127.0.0.1:{port}"), deadline)
                    .await
                    .map_err(|e| io::Error::new(io::ErrorKind::TimedOut, format!("{name}: {e}")))?;
            }
        }
        Ok(())
    }

    /// Stops the gateway, every service (SIGTERM, then SIGKILL after a grace
    /// period) and, last, PostgreSQL and the NATS nodes.
    pub async fn stop(self) {
        let _ = self.stop_gateway.send(());
        self.supervisor.shutdown().await;
    }
}

/// Polls `<base>/readyz` until it answers 200 or `deadline` passes.
pub async fn wait_ready(http: &reqwest::Client, base: &str, deadline: Instant) -> Result<(), String> {
    let mut last = String::from("no answer yet");
    while Instant::now() < deadline {
        match http.get(format!("{base}/readyz")).send().await {
            Ok(r) if r.status().is_success() => return Ok(()),
            Ok(r) => last = format!("readyz answered {}", r.status()),
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err(format!("not ready in time ({last})"))
}

/// A `cargo` command for running cargo from inside a cargo-run process
/// (xtask, a test). Cargo sets package variables (`CARGO_PKG_*`,
/// `CARGO_MANIFEST_*`, ...) for what it runs; build scripts that track them
/// (ring's) would see them change and rebuild half the tree, so they are
/// removed. Configuration variables (`CARGO_HOME`, `CARGO_TARGET_DIR`, ...) stay.
pub fn cargo_command() -> std::process::Command {
    const PER_PACKAGE: [&str; 7] =
        ["CARGO_PKG_", "CARGO_MANIFEST_", "CARGO_CRATE_", "CARGO_BIN_", "CARGO_PRIMARY_PACKAGE", "CARGO_TARGET_TMPDIR", "OUT_DIR"];
    let mut command = std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    for (name, _) in std::env::vars_os() {
        if let Some(name) = name.to_str()
            && PER_PACKAGE.iter().any(|prefix| name.starts_with(prefix))
        {
            command.env_remove(name);
        }
    }
    command
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_options_debug_shows_no_secret() {
        let mut options = Options::standard(PathBuf::from("bin"), PathBuf::from("data"), 0, LogSink::Stdout);
        options.nats_password = "nats-password-of-this-run".into();
        options.env.push((Service::Posts, "DATABASE_URL".into(), "postgres://posts:db-password@h/posts".into()));
        let shown = format!("{options:?}");
        for secret in [options.internal_secret.as_str(), "nats-password-of-this-run", "db-password"] {
            assert!(!secret.is_empty() && !shown.contains(secret), "{shown}");
        }
        assert!(shown.contains("DATABASE_URL") && shown.contains("<hidden>"), "{shown}");
    }

    #[test]
    fn every_service_but_query_runs_one_async_worker_unless_the_caller_chooses() {
        for service in Service::ALL {
            let expected = (service != Service::Query).then(|| "1".to_owned());
            assert_eq!(async_workers(service, None), expected, "{service:?}");
            assert_eq!(async_workers(service, Some("3".to_owned())).as_deref(), Some("3"), "{service:?}");
        }
        let options = Options::standard(PathBuf::from("bin"), PathBuf::from("data"), 0, LogSink::Stdout);
        for service in Service::ALL {
            let set = options.env_for(service).iter().filter(|(name, _)| name == "TOKIO_WORKER_THREADS").count();
            assert!(set <= 1, "{service:?} gets TOKIO_WORKER_THREADS at most once");
        }
    }

    #[test]
    fn scaled_out_every_service_has_named_replicas_the_bus_on_nats_and_unscaled_nothing_changes() {
        let mut options = Options::standard(PathBuf::from("bin"), PathBuf::from("data"), 0, LogSink::Stdout);
        let unscaled: Vec<_> = Service::ALL.into_iter().map(|s| options.processes(s)).collect();
        for (service, processes) in Service::ALL.into_iter().zip(&unscaled) {
            assert_eq!(processes, &[(service.name().to_owned(), service.default_port())]);
        }
        let bus_env = |options: &Options, name: &str, port: u16| options.env_for_process(Service::EventBus, name, port);
        let store_of = |env: Vec<(String, String)>| env.into_iter().find(|(k, _)| k == "EVENT_STORE").map(|(_, v)| v);
        assert_eq!(store_of(bus_env(&options, "event-bus", 4005)), None, "unscaled, the bus keeps its embedded log");
        let nodes: Vec<_> = (1..=nats::NODES).map(|i| nats::NodePorts::from_base(4222, i)).collect();
        options.scale(1, 5433, nodes.clone(), |_, _| unreachable!("one replica is the usual suite"));
        assert!(options.replicas.is_empty() && options.postgres_port.is_none() && options.nats.is_empty());

        options.scale(3, 5433, nodes, |s, i| s.default_port() + 100 * i as u16);
        assert_eq!(
            options.processes(Service::EventBus),
            [("event-bus-1".to_owned(), 4105), ("event-bus-2".to_owned(), 4205), ("event-bus-3".to_owned(), 4305)]
        );
        assert_eq!(
            options.processes(Service::Posts),
            [("posts-1".to_owned(), 4100), ("posts-2".to_owned(), 4200), ("posts-3".to_owned(), 4300)]
        );
        assert_eq!(options.process_urls(Service::Client), ["http://127.0.0.1:3100", "http://127.0.0.1:3200", "http://127.0.0.1:3300"]);
        assert_eq!(options.url(Service::Posts), "http://127.0.0.1:4000", "peers keep the service's address");
        let env = options.env_for_process(Service::Posts, "posts-2", 4200);
        let value = |name: &str| env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
        assert_eq!(value("PORT").as_deref(), Some("4200"));
        assert_eq!(value("DATA_DIR").as_deref(), Some("data/posts-2"));
        assert_eq!(value("EVENT_BUS_URL").as_deref(), Some("http://127.0.0.1:4005"), "the bus's balancer");
        assert_eq!(value("EVENT_STORE"), None, "only the bus reads the log");
        assert_eq!(
            store_of(bus_env(&options, "event-bus-2", 4205)).as_deref(),
            Some("nats://127.0.0.1:4222,127.0.0.1:4223,127.0.0.1:4224"),
            "every bus replica names every NATS node"
        );
    }

    #[test]
    fn every_service_but_the_client_gets_this_runs_secret() {
        let options = Options::standard(PathBuf::from("bin"), PathBuf::from("data"), 0, LogSink::Stdout);
        let secret_of =
            |service| options.env_for(service).into_iter().find(|(name, _)| name == blog_kit::internal::SECRET_ENV).map(|(_, value)| value);
        for service in Service::ALL {
            match service {
                Service::Client => assert_eq!(secret_of(service), None, "the client only reads the bus"),
                _ => assert_eq!(secret_of(service).as_deref(), Some(options.internal_secret.as_str()), "{service}"),
            }
        }
        assert!(blog_kit::internal::InternalSecret::parse(&options.internal_secret).is_ok());
        let another = Options::standard(PathBuf::from("bin"), PathBuf::from("data"), 0, LogSink::Stdout);
        assert_ne!(options.internal_secret, another.internal_secret, "a fresh secret per run");
    }
}
