//! Running the whole suite on one machine, with no cluster and no Docker.
//!
//! [`Suite`] starts every service binary as its own OS process under a
//! [`supervisor::Supervisor`] (restart with backoff, pid files, prefixed
//! logs, clean stop) and puts a [`gateway`] in front that routes exactly as
//! the Kubernetes Ingress does, from the same route table. `cargo xtask up`
//! and the integration tests both use it, so the tests run what users run.

pub mod gateway;
pub mod k8s;
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

/// How to launch the suite.
#[derive(Debug, Clone)]
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
        }
    }

    /// The environment a service process gets: its port, its data directory,
    /// every peer's URL and, for all but the client (which only reads the
    /// bus), the run's internal secret.
    pub fn env_for(&self, service: Service) -> Vec<(String, String)> {
        let mut env = vec![
            // glibc gives threads malloc arenas of their own; two keep idle memory small.
            ("MALLOC_ARENA_MAX".to_owned(), "2".to_owned()),
            ("PORT".to_owned(), self.ports[&service].to_string()),
            ("DATA_DIR".to_owned(), self.data_dir.join(service.name()).display().to_string()),
        ];
        for peer in Service::ALL {
            env.push((peer.url_env().to_owned(), self.url(peer)));
        }
        if service != Service::Client {
            env.push((blog_kit::internal::SECRET_ENV.to_owned(), self.internal_secret.clone()));
        }
        env.extend(self.env.iter().filter(|(s, _, _)| *s == service).map(|(_, k, v)| (k.clone(), v.clone())));
        env
    }

    pub fn url(&self, service: Service) -> String {
        format!("http://127.0.0.1:{}", self.ports[&service])
    }
}

/// A secret for one run, from the OS's random source (v4 UUIDs): 244 random bits.
fn fresh_secret() -> String {
    format!("{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple())
}

/// The running suite.
pub struct Suite {
    pub options: Options,
    pub supervisor: Supervisor,
    pub gateway_addr: SocketAddr,
    stop_gateway: tokio::sync::oneshot::Sender<()>,
}

impl Suite {
    /// Starts every service and the gateway; does not wait for readiness.
    pub async fn launch(options: Options) -> io::Result<Self> {
        std::fs::create_dir_all(&options.data_dir)?;
        let mut supervisor = Supervisor::new(options.data_dir.clone(), options.log.clone());
        for service in Service::ALL {
            let program = options.bin_dir.join(service.name());
            if !program.exists() {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("{} is missing; build the workspace first", program.display()),
                ));
            }
            supervisor.add(ProcessSpec { name: service.name().to_owned(), program, env: options.env_for(service) });
        }
        let listener = TcpListener::bind(options.gateway_addr).await?;
        let gateway_addr = listener.local_addr()?;
        let upstreams = Service::ALL.iter().map(|s| (*s, options.url(*s))).collect();
        let (stop_gateway, stopped) = tokio::sync::oneshot::channel::<()>();
        let shutdown = Shutdown::new(async move {
            let _ = stopped.await;
        });
        tokio::spawn(gateway::serve(listener, gateway::Gateway::new(upstreams), shutdown));
        Ok(Self { options, supervisor, gateway_addr, stop_gateway })
    }

    /// Waits until every running service answers `/readyz`.
    pub async fn wait_ready(&self, within: Duration) -> io::Result<()> {
        let http = blog_kit::http::client::http_client(Duration::from_secs(1));
        let deadline = Instant::now() + within;
        for service in Service::ALL {
            if !self.supervisor.is_wanted(service.name()) {
                continue;
            }
            wait_ready(&http, &self.options.url(service), deadline)
                .await
                .map_err(|e| io::Error::new(io::ErrorKind::TimedOut, format!("{service}: {e}")))?;
        }
        Ok(())
    }

    /// Stops the gateway and every service (SIGTERM, then SIGKILL after a grace period).
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
