//! The end-to-end test harness: [`TestSuite`] starts the real service
//! binaries as OS processes on 127.0.0.1 with ephemeral ports and a temporary
//! data directory, behind the same gateway `cargo xtask up` runs, and offers
//! typed steps (`create_post`, `comment`, `wait_for_status`) so each test
//! reads as arrange, act, assert. Waiting is always polling with a deadline.
//!
//! A suite runs in one of two [`Mode`]s: one process per service on SQLite,
//! as `cargo xtask up` runs it, or scaled out, as `cargo xtask up --scale N`
//! runs it (N replicas of every service on the suite's own PostgreSQL, the
//! bus's on the suite's own 3-node NATS cluster with JetStream). Process
//! control takes a service (all its processes) or one process by name
//! (`posts-1`, `event-bus-2`, `nats-3`).

pub mod load;
pub mod postgres;
pub mod recorder;

use std::{
    collections::BTreeMap,
    future::Future,
    path::PathBuf,
    sync::OnceLock,
    time::{Duration, Instant},
};

use blog_domain::Service;
use blog_local::{Options, Suite, postgres::PROCESS, supervisor::LogSink};
pub use rustix::process::Signal;
use serde::Deserialize;
use serde_json::{Value, json};

/// How long any eventual condition may take before a test fails.
pub const DEADLINE: Duration = Duration::from_secs(20);

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Post {
    pub id: String,
    pub title: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Comment {
    pub id: String,
    pub content: String,
    pub status: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct PostView {
    pub id: String,
    pub title: String,
    pub comments: Vec<Comment>,
}

/// A raw answer: status and JSON body (`Value::Null` if the body is not JSON).
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: Value,
    pub content_type: String,
    pub headers: reqwest::header::HeaderMap,
}

/// The credentials an internal request carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Auth {
    /// `Authorization: Bearer <the run's INTERNAL_SECRET>`, as the suite's own callers send.
    Secret,
    /// No `Authorization` header.
    Missing,
    /// A well-formed bearer token that is not the secret.
    Wrong,
}

/// How the suite runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// One process per service, each on its SQLite database.
    Single,
    /// This many replicas of every service, on one PostgreSQL, the bus's on a 3-node JetStream.
    Scaled(usize),
}

impl Mode {
    /// `replicas` replicas on PostgreSQL and JetStream, or `None` (the test
    /// skips) when PostgreSQL or nats-server is not installed and cannot be;
    /// in CI (`CI` set) that fails instead.
    pub fn scaled(replicas: usize) -> Option<Self> {
        match blog_local::postgres::ensure_installed().and_then(|_| blog_local::nats::ensure_installed().map(drop)) {
            Ok(_) => Some(Self::Scaled(replicas)),
            Err(e) if std::env::var_os("CI").is_some() => panic!("CI must run the scaled-out tests: {e}"),
            Err(e) => {
                eprintln!("skipped: {e}");
                None
            }
        }
    }
}

pub struct TestSuite {
    suite: Option<Suite>,
    pub mode: Mode,
    pub dir: tempfile::TempDir,
    pub http: reqwest::Client,
    /// `http://127.0.0.1:<port>` of the gateway.
    pub gateway: String,
}

/// Builds the service binaries once per test process; returns their directory.
pub fn binaries() -> PathBuf {
    static BIN_DIR: OnceLock<PathBuf> = OnceLock::new();
    BIN_DIR
        .get_or_init(|| {
            let exe = std::env::current_exe().expect("test binary path");
            // target/<profile>/deps/<test> -> target/<profile>
            let bin_dir = exe.parent().and_then(|deps| deps.parent()).expect("test binary lives in target/<profile>/deps").to_owned();
            let mut build = blog_local::cargo_command();
            // The same selection as `cargo test --workspace`, so this build and
            // the test build share every artifact instead of rebuilding.
            build.args(["build", "--workspace", "--all-targets", "--manifest-path", concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.toml")]);
            if bin_dir.ends_with("release") {
                build.arg("--release");
            }
            let status = build.status().expect("cargo runs");
            assert!(status.success(), "building the service binaries failed");
            bin_dir
        })
        .clone()
}

/// The last lines of each named process's log in `dir`.
fn logs_in(dir: &std::path::Path, names: &[String]) -> String {
    let mut out = String::new();
    for name in names {
        let Ok(log) = std::fs::read_to_string(dir.join(format!("{name}.log"))) else { continue };
        let tail: Vec<&str> = log.lines().rev().take(15).collect();
        out.push_str(&format!("--- {name} ---\n"));
        for line in tail.into_iter().rev() {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

pub use blog_kit::ports::free_port;

/// Ports for the suite's NATS nodes, from [`free_port`].
pub fn nats_nodes() -> Vec<blog_local::nats::NodePorts> {
    blog_local::nats::free_nodes(blog_local::nats::NODES)
}

impl TestSuite {
    pub async fn launch() -> Self {
        Self::launch_in(Mode::Single).await
    }

    pub async fn launch_in(mode: Mode) -> Self {
        Self::launch_with_in(mode, |_| {}).await
    }

    /// Starts the suite after `configure` adjusted the launch options.
    pub async fn launch_with(configure: impl FnOnce(&mut Options)) -> Self {
        Self::launch_with_in(Mode::Single, configure).await
    }

    /// Starts the suite in `mode` after `configure` adjusted the launch options.
    pub async fn launch_with_in(mode: Mode, configure: impl FnOnce(&mut Options)) -> Self {
        // Scaled out, PostgreSQL runs as its own account and needs to reach its directory.
        let dir = postgres::reachable_tempdir();
        let mut options = Options::standard(binaries(), dir.path().join("data"), 0, LogSink::Dir(dir.path().to_owned()));
        options.ports = Service::ALL.iter().map(|s| (*s, free_port())).collect::<BTreeMap<_, _>>();
        // The tests check what is accepted, not how fast: a comment's post may
        // take seconds to reach comments on a loaded machine (CI runs many
        // suites at once), so the bounded wait is the longest there is.
        options.env.push((Service::Comments, "POST_WAIT_MS".into(), comments::MAX_POST_WAIT.as_millis().to_string()));
        if let Mode::Scaled(replicas) = mode {
            options.scale(replicas, free_port(), nats_nodes(), |_, _| free_port());
        }
        configure(&mut options);
        let suite = Suite::launch(options)
            .await
            .unwrap_or_else(|e| panic!("the suite launches: {e}\n{}", logs_in(dir.path(), &[PROCESS.to_owned()])));
        let gateway = format!("http://{}", suite.gateway_addr);
        let this = Self { suite: Some(suite), mode, dir, http: blog_kit::http::client::http_client(Duration::from_secs(15)), gateway };
        if let Err(e) = this.suite().wait_ready(DEADLINE).await {
            panic!("suite not ready: {e}\n{}", this.logs());
        }
        this
    }

    pub fn suite(&self) -> &Suite {
        self.suite.as_ref().expect("suite running")
    }

    /// Base URL of one service, bypassing the gateway.
    pub fn url(&self, service: Service) -> String {
        self.suite().options.url(service)
    }

    /// The names of `service`'s processes: its name, or `<service>-<i>` per replica.
    pub fn processes(&self, service: Service) -> Vec<String> {
        self.suite().options.processes(service).into_iter().map(|(name, _)| name).collect()
    }

    /// The base URL of each of `service`'s processes, bypassing any balancer.
    pub fn process_urls(&self, service: Service) -> Vec<String> {
        self.suite().options.process_urls(service)
    }

    /// The suite's PostgreSQL, scaled out.
    pub fn postgres(&self) -> Option<&blog_local::postgres::Postgres> {
        self.suite().postgres.as_ref()
    }

    /// The names of the suite's NATS nodes (`nats-<i>`), scaled out.
    pub fn nats_nodes(&self) -> Vec<String> {
        (1..=self.suite().options.nats.len()).map(blog_local::nats::process_name).collect()
    }

    /// Every process's log (and PostgreSQL's and the NATS nodes'), for failure messages.
    pub fn logs(&self) -> String {
        let names: Vec<String> =
            Service::ALL.into_iter().flat_map(|s| self.processes(s)).chain([PROCESS.to_owned()]).chain(self.nats_nodes()).collect();
        logs_in(self.dir.path(), &names)
    }

    // ---- requests ----

    pub async fn send(&self, request: reqwest::RequestBuilder) -> Answer {
        let response = request.send().await.expect("request sent");
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let content_type = headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
        let bytes = response.bytes().await.expect("body read");
        Answer { status, body: serde_json::from_slice(&bytes).unwrap_or(Value::Null), content_type, headers }
    }

    /// The run's `INTERNAL_SECRET`.
    pub fn internal_secret(&self) -> &str {
        &self.suite().options.internal_secret
    }

    /// A request to one service's internal route, carrying `auth`.
    pub fn internal(&self, method: reqwest::Method, url: &str, auth: Auth) -> reqwest::RequestBuilder {
        let request = self.http.request(method, url);
        match auth {
            Auth::Secret => request.bearer_auth(self.internal_secret()),
            Auth::Missing => request,
            Auth::Wrong => request.bearer_auth(format!("{}x", self.internal_secret())),
        }
    }

    /// `POST <service>/events` with the secret, as the bus or a relay sends it.
    pub async fn post_events(&self, service: Service, body: &Value) -> Answer {
        self.post_events_as(service, body, Auth::Secret).await
    }

    /// `POST <service>/events` with the given credentials.
    pub async fn post_events_as(&self, service: Service, body: &Value, auth: Auth) -> Answer {
        self.send(self.internal(reqwest::Method::POST, &format!("{}/events", self.url(service)), auth).json(body)).await
    }

    /// POST with a JSON body through the gateway.
    pub async fn post_json(&self, path: &str, body: &Value) -> Answer {
        self.send(self.http.post(format!("{}{path}", self.gateway)).json(body)).await
    }

    /// GET through the gateway.
    pub async fn get(&self, path: &str) -> Answer {
        self.send(self.http.get(format!("{}{path}", self.gateway))).await
    }

    pub async fn create_post(&self, title: &str) -> Post {
        let answer = self.post_json("/posts/create", &json!({ "title": title })).await;
        assert_eq!(answer.status, 201, "create post: {:?}", answer.body);
        serde_json::from_value(answer.body).expect("a post")
    }

    /// Adds a comment; returns the post's comment list as answered.
    pub async fn comment(&self, post_id: &str, content: &str) -> Vec<Comment> {
        let answer = self.post_json(&format!("/posts/{post_id}/comments"), &json!({ "content": content })).await;
        assert_eq!(answer.status, 201, "comment: {:?}", answer.body);
        serde_json::from_value(answer.body).expect("a comment list")
    }

    /// The query service's view, through the gateway.
    pub async fn view(&self) -> BTreeMap<String, PostView> {
        let answer = self.get("/posts").await;
        assert_eq!(answer.status, 200, "GET /posts: {:?}", answer.body);
        serde_json::from_value(answer.body).expect("the posts view")
    }

    /// Waits until every query process shows the post (scaled out, a read
    /// through the gateway may reach a replica that has not caught up yet).
    pub async fn wait_for_post_in_query(&self, post_id: &str) {
        for url in self.process_urls(Service::Query) {
            self.eventually(&format!("post {post_id} at {url}"), || async {
                let view: Value = self.http.get(format!("{url}/posts")).send().await.ok()?.json().await.ok()?;
                view.get(post_id).map(|_| ())
            })
            .await;
        }
    }

    /// The comments service's list for a post, through the gateway.
    pub async fn comments(&self, post_id: &str) -> Vec<Comment> {
        self.try_comments(post_id).await.unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`TestSuite::comments`], or what was answered instead (a 404 while
    /// the comments service has not yet been sent the post).
    pub async fn try_comments(&self, post_id: &str) -> Result<Vec<Comment>, String> {
        let answer = self.get(&format!("/posts/{post_id}/comments")).await;
        if answer.status != 200 {
            return Err(format!("GET comments of post {post_id}: {} {:?}", answer.status, answer.body));
        }
        serde_json::from_value(answer.body).map_err(|e| format!("GET comments of post {post_id}: not a comment list: {e}"))
    }

    /// Waits until query (every query process, scaled out) shows the comment with `status`.
    pub async fn wait_for_status(&self, post_id: &str, comment_id: &str, status: &str) {
        for url in self.process_urls(Service::Query) {
            self.eventually(&format!("comment {comment_id} {status} at {url}"), || async {
                let view: BTreeMap<String, PostView> = self.http.get(format!("{url}/posts")).send().await.ok()?.json().await.ok()?;
                let found = view.get(post_id)?.comments.iter().find(|c| c.id == comment_id)?.status == status;
                found.then_some(())
            })
            .await;
        }
    }

    /// The bus's whole log.
    pub async fn bus_events(&self) -> Vec<Value> {
        let mut all = Vec::new();
        let mut after = 0;
        loop {
            let answer = self.send(self.http.get(format!("{}/events?after={after}&limit=10000", self.url(Service::EventBus)))).await;
            let page = answer.body.as_array().cloned().unwrap_or_default();
            if page.is_empty() {
                return all;
            }
            after = page.last().and_then(|e| e["seq"].as_u64()).unwrap_or(after);
            all.extend(page);
        }
    }

    /// Polls `check` until it returns `Some`, failing the test after [`DEADLINE`].
    pub async fn eventually<T, F, Fut>(&self, what: &str, mut check: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Option<T>>,
    {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(value) = check().await {
                return value;
            }
            if Instant::now() > deadline {
                panic!("timed out waiting for {what}\n{}", self.logs());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    // ---- process control ----

    /// Stops every process of a service (SIGTERM) and keeps them stopped.
    pub async fn stop(&self, service: Service) {
        for name in self.processes(service) {
            self.stop_process(&name).await;
        }
    }

    /// Starts a stopped service's processes again and waits until they are ready.
    pub async fn restart(&self, service: Service) {
        for name in self.processes(service) {
            self.suite().supervisor.start(&name);
        }
        self.wait_ready(service).await;
    }

    /// Sends `signal` to every process of a service; the supervisor restarts one that dies.
    pub async fn kill(&self, service: Service, signal: Signal) {
        for name in self.processes(service) {
            self.kill_process(&name, signal).await;
        }
    }

    /// Stops one process (`posts-1`, or `posts` unscaled; `postgres` scaled out) and keeps it stopped.
    pub async fn stop_process(&self, name: &str) {
        self.suite().supervisor.stop(name).await;
    }

    /// Starts a stopped process again, without waiting for it.
    pub fn start_process(&self, name: &str) {
        self.suite().supervisor.start(name);
    }

    /// Sends `signal` to one process; after SIGKILL, waits until it was restarted and is ready.
    pub async fn kill_process(&self, name: &str, signal: Signal) {
        let old = self.suite().supervisor.pid(name);
        if !self.suite().supervisor.signal(name, signal) {
            panic!("{name} was not running (starts so far: {})\n{}", self.suite().supervisor.starts(name), self.logs());
        }
        if signal == Signal::KILL && !self.suite().supervisor.wait_restarted(name, old, DEADLINE).await {
            panic!("{name} was not restarted\n{}", self.logs());
        }
        if signal == Signal::KILL
            && let Some(url) = self.process_url(name)
        {
            self.wait_ready_at(name, &url).await;
        }
    }

    /// The base URL of the service process called `name`.
    pub fn process_url(&self, name: &str) -> Option<String> {
        Service::ALL
            .into_iter()
            .flat_map(|s| self.suite().options.processes(s))
            .find(|(n, _)| n == name)
            .map(|(_, port)| format!("http://127.0.0.1:{port}"))
    }

    /// Waits until every process of `service` is ready.
    pub async fn wait_ready(&self, service: Service) {
        for (name, url) in self.processes(service).into_iter().zip(self.process_urls(service)) {
            self.wait_ready_at(&name, &url).await;
        }
    }

    async fn wait_ready_at(&self, name: &str, url: &str) {
        let deadline = Instant::now() + DEADLINE;
        if let Err(e) = blog_local::wait_ready(&self.http, url, deadline).await {
            panic!("{name}: {e}\n{}", self.logs());
        }
    }

    /// Stops every service gracefully.
    pub async fn shutdown(mut self) {
        if let Some(suite) = self.suite.take() {
            suite.stop().await;
        }
    }

    /// Stops the suite as [`TestSuite::shutdown`] does; returns each
    /// process's name and whole log, from start to stop.
    pub async fn shutdown_with_logs(mut self) -> Vec<(String, String)> {
        let names: Vec<String> = Service::ALL.into_iter().flat_map(|s| self.processes(s)).collect();
        if let Some(suite) = self.suite.take() {
            suite.stop().await;
        }
        names
            .into_iter()
            .map(|name| {
                let log = std::fs::read_to_string(self.dir.path().join(format!("{name}.log"))).unwrap_or_default();
                (name, log)
            })
            .collect()
    }
}
