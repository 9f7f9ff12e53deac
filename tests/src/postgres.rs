//! A throwaway PostgreSQL for a test: the same server `cargo xtask up --scale`
//! runs ([`blog_local::postgres`]), in a temporary directory on a free port,
//! with the services' databases made, stopped (fast shutdown) by
//! [`TestPostgres::stop`] or killed with the test's runtime.

use std::{os::unix::fs::PermissionsExt, path::Path};

use blog_local::{
    postgres::{Postgres, Server},
    supervisor::{LogSink, Supervisor},
};

pub struct TestPostgres {
    server: Server,
    pub dir: tempfile::TempDir,
}

/// A temporary directory the server's account can reach when the tests run
/// as root (PostgreSQL then runs as `postgres`, and a fresh temporary
/// directory is its creator's only).
pub fn reachable_tempdir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("a temp dir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).expect("chmod the temp dir");
    dir
}

impl TestPostgres {
    /// Starts one (installing Debian's `postgresql` first if it is missing
    /// and the tests run as root) and waits until it answers.
    pub async fn start() -> Self {
        let dir = reachable_tempdir();
        let server = Server::start(&dir.path().join("data"), crate::free_port(), LogSink::Dir(dir.path().to_owned()))
            .await
            .unwrap_or_else(|e| panic!("PostgreSQL did not start: {e}\n{}", log(dir.path())));
        Self { server, dir }
    }

    pub fn postgres(&self) -> &Postgres {
        &self.server.postgres
    }

    /// `DATABASE_URL` of `database`.
    pub fn url(&self, database: &str) -> String {
        self.server.postgres.url(database)
    }

    /// Its supervisor, to stop, start or kill the server (process `postgres`).
    pub fn supervisor(&self) -> &Supervisor {
        &self.server.supervisor
    }

    /// The server's log, for failure messages.
    pub fn log(&self) -> String {
        log(self.dir.path())
    }

    pub async fn stop(self) {
        self.server.stop().await;
    }
}

fn log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join(format!("{}.log", blog_local::postgres::PROCESS))).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use std::{
        collections::BTreeMap,
        time::{Duration, Instant},
    };

    use blog_domain::Service;
    use blog_local::{Options, Suite, postgres::database_services, replica_name};
    use rustix::process::Signal;

    use super::*;
    use crate::{DEADLINE, binaries, free_port};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_throwaway_server_has_every_services_database_and_stops() {
        let postgres = TestPostgres::start().await;
        let databases = postgres.postgres().databases().await.unwrap();
        for service in database_services() {
            assert!(databases.iter().any(|d| d == service.name()), "{service} in {databases:?}");
        }
        let client = postgres.postgres().connect("query").await.unwrap();
        let row = client.query_one("SELECT current_database(), current_setting('listen_addresses')", &[]).await.unwrap();
        assert_eq!((row.get::<_, String>(0), row.get::<_, String>(1)), ("query".to_owned(), "127.0.0.1".to_owned()));
        let pid_file = postgres.dir.path().join("data").join("postgres.pid");
        assert!(pid_file.exists());
        postgres.stop().await;
        assert!(client.simple_query("SELECT 1").await.is_err(), "the server is gone");
        assert!(!pid_file.exists());
    }

    /// The scaled-out launcher, as `cargo xtask up --scale 2` runs it: every
    /// data-owning replica gets its service's `DATABASE_URL` and keeps its
    /// data there, not in SQLite; the bus's replicas get `EVENT_STORE` of the
    /// suite's 3-node NATS cluster.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn scaled_out_every_service_runs_twice_with_its_database_url_and_the_bus_on_nats() {
        let dir = reachable_tempdir();
        let data = dir.path().join("data");
        let mut options = Options::standard(binaries(), data.clone(), 0, LogSink::Dir(dir.path().to_owned()));
        options.ports = Service::ALL.iter().map(|s| (*s, free_port())).collect::<BTreeMap<_, _>>();
        options.scale(2, free_port(), crate::nats_nodes(), |_, _| free_port());
        let suite = Suite::launch(options).await.expect("the suite launches");
        suite.wait_ready(DEADLINE).await.expect("every replica ready");
        let postgres = suite.postgres.clone().expect("PostgreSQL runs");

        let pid_of = |name: &str| std::fs::read_to_string(data.join(format!("{name}.pid"))).ok().map(|p| p.trim().to_owned());
        assert!(pid_of("postgres").is_some());
        let nats = suite.nats.clone().expect("NATS runs");
        for i in 1..=blog_local::nats::NODES {
            let name = blog_local::nats::process_name(i);
            assert_eq!(pid_of(&name).map(|p| p.parse::<u32>().unwrap()), suite.supervisor.pid(&name), "{name}.pid");
            assert!(data.join(&name).is_dir(), "{name}'s JetStream data");
        }
        for service in Service::ALL {
            assert!(pid_of(service.name()).is_none(), "{service} runs as replicas only");
            for i in 1..=2 {
                let name = replica_name(service, i);
                let pid = pid_of(&name).unwrap_or_else(|| panic!("{name}.pid"));
                assert_eq!(Some(pid.parse::<u32>().unwrap()), suite.supervisor.pid(&name));
                let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
                let env: Vec<String> = environ.split(|b| *b == 0).map(|v| String::from_utf8_lossy(v).into_owned()).collect();
                let database_url = env.iter().find_map(|v| v.strip_prefix("DATABASE_URL="));
                let event_store = env.iter().find_map(|v| v.strip_prefix("EVENT_STORE="));
                assert_eq!(event_store, (service == Service::EventBus).then(|| nats.url()).as_deref(), "{name}");
                // Only the bus is a user of the NATS nodes, with this run's password.
                let nats_user = env.iter().find_map(|v| v.strip_prefix("NATS_USER="));
                let nats_password = env.iter().find_map(|v| v.strip_prefix("NATS_PASSWORD="));
                let bus = service == Service::EventBus;
                assert_eq!(nats_user, bus.then_some(blog_local::nats::BUS_USER), "{name}");
                assert_eq!(nats_password, bus.then_some(nats.password()), "{name}");
                if database_services().any(|s| s == service) {
                    assert_eq!(database_url, Some(postgres.url(service.name()).as_str()), "{name}");
                } else {
                    assert_eq!(database_url, None, "{name} keeps no data");
                }
                let data_dir = data.join(&name).display().to_string();
                assert!(env.iter().any(|v| v.strip_prefix("DATA_DIR=") == Some(data_dir.as_str())), "{name}: a data directory of its own");
            }
        }
        let databases = postgres.databases().await.unwrap();
        assert_eq!(databases, ["comments", "moderation", "postgres", "posts", "query"]);

        // Through the gateway with one replica of posts stopped: every write still lands.
        let http = blog_kit::http::client::http_client(Duration::from_secs(15));
        let gateway = format!("http://{}", suite.gateway_addr);
        suite.supervisor.stop(&replica_name(Service::Posts, 1)).await;
        for n in 0..10 {
            let answer = http
                .post(format!("{gateway}/posts/create"))
                .json(&serde_json::json!({ "title": format!("post {n}") }))
                .send()
                .await
                .unwrap();
            assert_eq!(answer.status(), 201);
        }
        suite.supervisor.start(&replica_name(Service::Posts, 1));
        let posts = postgres.connect("posts").await.unwrap();
        let stored: i64 = posts.query_one("SELECT count(*) FROM post", &[]).await.unwrap().get(0);
        assert_eq!(stored, 10, "the posts are in PostgreSQL");
        for i in 1..=2 {
            let sqlite = data.join(replica_name(Service::Posts, i)).join("posts.db");
            assert!(!sqlite.exists(), "no SQLite database at {}", sqlite.display());
        }
        // A replica killed with SIGKILL is restarted, with a new pid file.
        let name = replica_name(Service::Query, 2);
        let old = suite.supervisor.pid(&name);
        assert!(suite.supervisor.signal(&name, Signal::KILL));
        assert!(suite.supervisor.wait_restarted(&name, old, DEADLINE).await, "{name} restarted");
        let deadline = Instant::now() + DEADLINE;
        while pid_of(&name) == old.map(|p| p.to_string()) || pid_of(&name).is_none() {
            assert!(Instant::now() < deadline, "{name}.pid rewritten");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        suite.wait_ready(DEADLINE).await.expect("every replica ready again");
        // The service addresses balance too: query's own address answers while a replica is down.
        suite.supervisor.stop(&replica_name(Service::Query, 1)).await;
        for _ in 0..4 {
            let answer = http.get(format!("{}/readyz", suite.options.url(Service::Query))).send().await.unwrap();
            assert_eq!(answer.status(), 200);
        }

        // The suite's NATS nodes let in no anonymous client, and the
        // password is in no service's log (the bus's included).
        for node in nats.nodes() {
            let answer = blog_local::nats::answer_to_connect(node.client, None, "PUB blog.events 2\r\n{}\r\n").unwrap();
            assert_eq!(answer, "-ERR 'Authorization Violation'", "node on {}", node.client);
        }
        suite.stop().await;
        let mut logs = 0;
        for entry in std::fs::read_dir(dir.path()).unwrap().flatten().filter(|e| e.path().extension().is_some_and(|x| x == "log")) {
            let text = std::fs::read_to_string(entry.path()).unwrap();
            assert!(!text.contains(nats.password()), "the NATS password is in {}", entry.path().display());
            logs += 1;
        }
        assert!(logs > Service::ALL.len(), "every process's log was read ({logs})");
        let left: Vec<_> = std::fs::read_dir(&data)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".pid"))
            .collect();
        assert!(left.is_empty(), "every pid file removed at shutdown: {left:?}");
        assert!(!data.join("postgres").join("postmaster.pid").exists(), "PostgreSQL shut down cleanly");
    }
}
