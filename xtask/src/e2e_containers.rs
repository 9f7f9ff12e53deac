//! `cargo xtask e2e-containers`: the suite as containers, wired as the
//! manifests say, behind a real nginx configured from the Ingress file.
//!
//! What a cluster would do is reproduced with plain Docker, so the images,
//! the manifests and the Ingress are proven together without a cluster:
//! - one network where each container answers to its Service's name (a
//!   network alias), as cluster DNS would;
//! - each container gets what its workload says, read from the YAML: the
//!   environment (ConfigMap then `env`; each Secret key a workload refers
//!   to gets a value generated for this run), the numeric user, a read-only root
//!   with tmpfs for `emptyDir`s, a named volume for each claim, the memory
//!   and CPU limits, all capabilities dropped, no privilege escalation;
//! - nginx gets the configuration `blog_local::k8s::nginx_conf` derives
//!   from infrastructure/k8s/ingress.yaml, and only its port is published,
//!   on 127.0.0.1.
//!
//! Then it drives the flow through the ingress with `Host: posts.com`,
//! kills the bus and query (SIGKILL) in the middle of it and checks that
//! nothing was lost, checks that every process runs as the non-root user
//! and that `docker stop` (SIGTERM) ends each service cleanly and fast, and
//! prints each image's size and memory use.

use std::{
    fs,
    path::PathBuf,
    time::{Duration, Instant},
};

use blog_domain::Service;
use blog_local::k8s::{self, Manifests, Mount};
use reqwest::{StatusCode, header};
use serde_json::{Value, json};

use crate::{
    Result,
    containers::{NGINX_IMAGE, docker_ok, docker_output, ensure_engine, image_size, stop_engine, work_dir},
    root,
};

const NETWORK: &str = "blog-e2e";
const INGRESS: &str = "blog-e2e-ingress";
/// Docker's embedded DNS server on user-defined networks.
const DOCKER_DNS: &str = "127.0.0.11";
/// How long a stopped service may take to exit before it counts as slow.
const STOP_BUDGET: Duration = Duration::from_secs(5);

fn container(service: Service) -> String {
    format!("blog-e2e-{}", service.name())
}

/// `cargo xtask e2e-containers [--keep] [--stop-engine]`.
pub fn run(mut args: pico_args::Arguments) -> Result {
    let keep = args.contains("--keep");
    let stop = args.contains("--stop-engine");
    crate::no_more_arguments(args)?;
    ensure_engine()?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let started = Instant::now();
    let result = runtime.block_on(scenario());
    if result.is_err() {
        save_logs();
    }
    if !keep {
        remove_everything();
    }
    if stop {
        stop_engine()?;
    }
    if result.is_ok() {
        println!("containerised end-to-end run passed in {:.0} s", started.elapsed().as_secs_f64());
    }
    result
}

/// The Service (name, port) that selects `app: <service>`, from the manifests.
fn service_address(manifests: &Manifests, service: Service) -> Result<(String, u64)> {
    let found = manifests
        .of_kind("Service")
        .find(|s| s["spec"]["selector"]["app"] == service.name())
        .ok_or_else(|| format!("no Service selects app: {}", service.name()))?;
    let name = found["metadata"]["name"].as_str().ok_or("Service without a name")?;
    let port = found["spec"]["ports"][0]["port"].as_u64().ok_or("Service without a port")?;
    Ok((name.to_owned(), port))
}

fn remove_everything() {
    let mut names: Vec<String> = Service::ALL.iter().map(|s| container(*s)).collect();
    names.push(INGRESS.to_owned());
    for name in &names {
        let _ = docker_ok(&["rm", "-f", "-v", name]);
    }
    if let Ok(volumes) = docker_output(&["volume", "ls", "-q", "--filter", "name=blog-e2e-"]) {
        for volume in volumes.lines() {
            let _ = docker_ok(&["volume", "rm", volume]);
        }
    }
    let _ = docker_ok(&["network", "rm", NETWORK]);
}

fn save_logs() {
    let dir = work_dir().join("e2e-logs");
    let _ = fs::create_dir_all(&dir);
    let mut names: Vec<String> = Service::ALL.iter().map(|s| container(*s)).collect();
    names.push(INGRESS.to_owned());
    for name in names {
        if let Ok(output) = crate::containers::docker().args(["logs", "--tail", "200", &name]).output() {
            let mut text = output.stdout;
            text.extend_from_slice(&output.stderr);
            let _ = fs::write(dir.join(format!("{name}.log")), &text);
            let text = String::from_utf8_lossy(&text);
            let tail: Vec<&str> = text.lines().rev().take(8).collect();
            eprintln!("--- last lines of {name} ---");
            for line in tail.into_iter().rev() {
                eprintln!("{line}");
            }
        }
    }
    eprintln!("container logs saved in {}", dir.display());
}

/// `docker run` for one service, every setting taken from its workload.
fn start_service(manifests: &Manifests, service: Service, secret: &str) -> Result {
    let workload = manifests.workload(service)?;
    let (alias, _) = service_address(manifests, service)?;
    let name = container(service);
    let mut args: Vec<String> = vec![
        "run".into(),
        "-d".into(),
        "--name".into(),
        name.clone(),
        "--network".into(),
        NETWORK.into(),
        "--network-alias".into(),
        alias,
        "--cap-drop".into(),
        "ALL".into(),
        "--security-opt".into(),
        "no-new-privileges".into(),
    ];
    if let Some((user, group)) = workload.run_as() {
        args.extend(["--user".into(), format!("{user}:{group}")]);
    }
    if workload.read_only_root() {
        args.push("--read-only".into());
    }
    for mount in workload.mounts()? {
        match mount {
            Mount::Persistent { name: claim, path } => args.extend(["-v".into(), format!("{name}-{claim}:{path}")]),
            Mount::Scratch { path, .. } => args.extend(["--tmpfs".into(), format!("{path}:rw,nosuid,nodev,mode=1777")]),
        }
    }
    if let Some(bytes) = workload.memory_limit() {
        args.extend(["--memory".into(), bytes.to_string()]);
    }
    if let Some(millis) = workload.cpu_limit_millis() {
        args.extend(["--cpus".into(), format!("{:.3}", millis as f64 / 1000.0)]);
    }
    if let Some(grace) = workload.pod["terminationGracePeriodSeconds"].as_u64() {
        args.extend(["--stop-timeout".into(), grace.to_string()]);
    }
    for (key, value) in workload.env()? {
        args.extend(["-e".into(), format!("{key}={value}")]);
    }
    // The one Secret of the suite (blog-internal) holds the shared secret.
    for reference in workload.secret_env() {
        args.extend(["-e".into(), format!("{}={secret}", reference.variable)]);
    }
    args.push(workload.image()?.to_owned());
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    docker_output(&refs)?;
    Ok(())
}

/// A fresh shared secret for this run: 32 bytes from the kernel, in hex.
fn run_secret() -> Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 32];
    fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Polls the service's `/readyz` from inside the network, as the kubelet
/// would probe the pod.
async fn wait_ready(address: &(String, u64), within: Duration) -> Result {
    let url = format!("http://{}:{}/readyz", address.0, address.1);
    let deadline = Instant::now() + within;
    loop {
        if docker_ok(&["exec", INGRESS, "curl", "-fsS", "-o", "/dev/null", "--max-time", "2", &url]) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("{url} not ready within {within:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// An HTTP client that talks to the ingress as `posts.com`.
struct Ingress {
    http: reqwest::Client,
    base: String,
}

impl Ingress {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn get(&self, path: &str) -> Result<(StatusCode, String)> {
        let response = self.http.get(self.url(path)).header(header::HOST, "posts.com").send().await?;
        Ok((response.status(), response.text().await?))
    }

    async fn post(&self, path: &str, body: &Value) -> Result<(StatusCode, Value)> {
        let response = self.http.post(self.url(path)).header(header::HOST, "posts.com").json(body).send().await?;
        let status = response.status();
        let text = response.text().await?;
        Ok((status, serde_json::from_str(&text).unwrap_or(Value::String(text))))
    }

    async fn create_post(&self, title: &str) -> Result<String> {
        let (status, body) = self.post("/posts/create", &json!({ "title": title })).await?;
        if status != StatusCode::CREATED {
            return Err(format!("POST /posts/create answered {status}: {body}").into());
        }
        Ok(body["id"].as_str().ok_or("the created post has no id")?.to_owned())
    }

    async fn comment(&self, post: &str, content: &str) -> Result {
        let (status, body) = self.post(&format!("/posts/{post}/comments"), &json!({ "content": content })).await?;
        if status != StatusCode::CREATED {
            return Err(format!("POST /posts/{post}/comments answered {status}: {body}").into());
        }
        Ok(())
    }

    /// Polls `GET /posts` until the view is exactly `expected`: each post id
    /// with its comments' (content, status), in order.
    async fn wait_for_view(&self, expected: &[(&str, Vec<(&str, &str)>)], within: Duration) -> Result {
        let deadline = Instant::now() + within;
        let mut last = String::new();
        loop {
            if let Ok((StatusCode::OK, text)) = self.get("/posts").await {
                if let Ok(view) = serde_json::from_str::<Value>(&text)
                    && view_matches(&view, expected)
                {
                    return Ok(());
                }
                last = text;
            }
            if Instant::now() > deadline {
                return Err(format!("the query view did not reach the expected state within {within:?}; last: {last}").into());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn view_matches(view: &Value, expected: &[(&str, Vec<(&str, &str)>)]) -> bool {
    let Some(posts) = view.as_object() else { return false };
    posts.len() == expected.len()
        && expected.iter().all(|(id, comments)| {
            let Some(found) = posts.get(*id).and_then(|p| p["comments"].as_array()) else { return false };
            found.len() == comments.len()
                && found.iter().zip(comments).all(|(c, (content, status))| c["content"] == *content && c["status"] == *status)
        })
}

async fn step<T>(what: &str, future: impl Future<Output = Result<T>>) -> Result<T> {
    let started = Instant::now();
    let value = future.await.map_err(|e| format!("{what}: {e}"))?;
    println!("  ok  {what} ({:.1} s)", started.elapsed().as_secs_f64());
    Ok(value)
}

async fn scenario() -> Result {
    let manifests = Manifests::load(&root().join(k8s::MANIFEST_DIR))?;
    for service in Service::ALL {
        let image = manifests.workload(service)?.image()?.to_owned();
        if !crate::containers::image_exists(&image) {
            return Err(format!("image {image} is missing: run `cargo xtask images` first").into());
        }
    }
    remove_everything();
    docker_output(&["network", "create", NETWORK])?;

    // The ingress first: it resolves upstreams per request, so it needs none of them yet.
    let conf_dir = work_dir().join("e2e");
    fs::create_dir_all(&conf_dir)?;
    let conf: PathBuf = conf_dir.join("nginx.conf");
    fs::write(&conf, k8s::nginx_conf(&k8s::ingress_paths(&manifests)?, DOCKER_DNS))?;
    docker_output(&[
        "run",
        "-d",
        "--name",
        INGRESS,
        "--network",
        NETWORK,
        "-p",
        "127.0.0.1::80",
        "-v",
        &format!("{}:/etc/nginx/nginx.conf:ro", conf.display()),
        NGINX_IMAGE,
    ])?;
    let published = docker_output(&["port", INGRESS, "80/tcp"])?;
    let port = published.lines().next().and_then(|l| l.rsplit(':').next()).ok_or("the ingress port is not published")?.to_owned();
    let ingress = Ingress {
        http: blog_kit::http::client::client_builder().timeout(Duration::from_secs(15)).no_proxy().build()?,
        base: format!("http://127.0.0.1:{port}"),
    };
    println!("ingress (nginx from {}) on {}", k8s::INGRESS_FILE, ingress.base);

    let addresses: Vec<(Service, (String, u64))> =
        Service::ALL.iter().map(|s| Ok((*s, service_address(&manifests, *s)?))).collect::<Result<_>>()?;
    let secret = run_secret()?;
    step("start six services as their manifests say", async {
        for service in Service::ALL {
            start_service(&manifests, service, &secret)?;
        }
        for (_, address) in &addresses {
            wait_ready(address, Duration::from_secs(60)).await?;
        }
        Ok(())
    })
    .await?;

    step("routing: the UI at /, 404 for another host", async {
        let (status, body) = ingress.get("/").await?;
        if status != StatusCode::OK || !body.to_ascii_lowercase().contains("<html") {
            return Err(format!("GET / answered {status}").into());
        }
        let response = ingress.http.get(ingress.url("/posts")).header(header::HOST, "other.example").send().await?;
        if response.status() != StatusCode::NOT_FOUND {
            return Err(format!("another host got {}", response.status()).into());
        }
        Ok(())
    })
    .await?;

    step("the client's internal routes: refused through the catch-all route, served to a scraper in the network", async {
        let client = service_address(&manifests, Service::Client)?;
        for path in ["/metrics", "/healthz", "/readyz"] {
            let (status, _) = ingress.get(path).await?;
            if status != StatusCode::NOT_FOUND {
                return Err(format!("GET {path} through the ingress answered {status}, not 404").into());
            }
            let direct = format!("http://{}:{}{path}", client.0, client.1);
            if !docker_ok(&["exec", INGRESS, "curl", "-fsS", "-o", "/dev/null", "--max-time", "5", &direct]) {
                return Err(format!("{direct} did not answer a direct request (as Prometheus sends)").into());
            }
        }
        Ok(())
    })
    .await?;

    let first = step("post, comment, moderate through the ingress", async {
        let post = ingress.create_post("First post").await?;
        ingress.comment(&post, "hello world").await?;
        ingress.comment(&post, "I like oranges").await?;
        ingress
            .wait_for_view(&[(&post, vec![("hello world", "approved"), ("I like oranges", "rejected")])], Duration::from_secs(15))
            .await?;
        let (status, body) = ingress.get(&format!("/posts/{post}/comments")).await?;
        let comments: Value = serde_json::from_str(&body)?;
        if status != StatusCode::OK || comments.as_array().map(Vec::len) != Some(2) {
            return Err(format!("GET /posts/{post}/comments answered {status}: {body}").into());
        }
        Ok(post)
    })
    .await?;

    step("/events is not exposed", async {
        let (status, body) = ingress.post("/events", &json!({"type": "PostCreated", "data": {"id": "x", "title": "forged"}})).await?;
        if status.is_success() {
            return Err(format!("POST /events through the ingress answered {status}: {body}").into());
        }
        // The bus would answer with the log as JSON; the client answers
        // with its page or a JSON error.
        let (status, body) = ingress.get("/events?after=0").await?;
        let leaked = serde_json::from_str::<Value>(&body)
            .is_ok_and(|v| v.as_array().is_some_and(|events| !events.is_empty()) || v.get("events").is_some());
        if leaked {
            return Err(format!("GET /events through the ingress returned the event log ({status})").into());
        }
        Ok(())
    })
    .await?;

    let second = step("live stream through the ingress is unbuffered", async {
        let mut stream = ingress.http.get(ingress.url("/posts/stream")).header(header::HOST, "posts.com").send().await?;
        if stream.status() != StatusCode::OK {
            return Err(format!("GET /posts/stream answered {}", stream.status()).into());
        }
        let post = ingress.create_post("Streamed post").await?;
        let mut seen = String::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !seen.contains("Streamed post") {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, stream.chunk()).await {
                Ok(Ok(Some(chunk))) => seen.push_str(&String::from_utf8_lossy(&chunk)),
                Ok(Ok(None)) => return Err("the stream ended".into()),
                Ok(Err(e)) => return Err(e.into()),
                Err(_) => return Err(format!("the new post did not arrive on the stream within 5 s; got {seen:?}").into()),
            }
        }
        Ok(post)
    })
    .await?;

    // With the bus down, comments cannot hear of a new post (it would wait
    // POST_WAIT_MS and answer 503, as the bus cannot be asked either), so the
    // comment goes to the first post.
    let third = step("bus killed: writes are kept and delivered after its restart", async {
        docker_output(&["kill", &container(Service::EventBus)])?;
        let post = ingress.create_post("Written while the bus was down").await?;
        ingress.comment(&first, "queued in the outbox").await?;
        docker_output(&["start", &container(Service::EventBus)])?;
        ingress
            .wait_for_view(
                &[
                    (&first, vec![("hello world", "approved"), ("I like oranges", "rejected"), ("queued in the outbox", "approved")]),
                    (&second, vec![]),
                    (&post, vec![]),
                ],
                Duration::from_secs(30),
            )
            .await?;
        Ok(post)
    })
    .await?;

    step("query killed: it catches up from its volume and the bus", async {
        docker_output(&["kill", &container(Service::Query)])?;
        let post = ingress.create_post("Written while query was down").await?;
        ingress.comment(&post, "orange again").await?;
        ingress.comment(&post, "fine words").await?;
        docker_output(&["start", &container(Service::Query)])?;
        ingress
            .wait_for_view(
                &[
                    (&first, vec![("hello world", "approved"), ("I like oranges", "rejected"), ("queued in the outbox", "approved")]),
                    (&second, vec![]),
                    (&third, vec![]),
                    (&post, vec![("orange again", "rejected"), ("fine words", "approved")]),
                ],
                Duration::from_secs(30),
            )
            .await
    })
    .await?;

    step("every service runs as uid 65532", async {
        for service in Service::ALL {
            let name = container(service);
            let table = docker_output(&["top", &name, "-o", "pid,uid"])?;
            let uids: Vec<&str> = table.lines().skip(1).filter_map(|line| line.split_whitespace().nth(1)).collect();
            if uids.is_empty() || uids.iter().any(|uid| *uid != "65532") {
                return Err(format!("{name} runs as {uids:?}").into());
            }
        }
        Ok(())
    })
    .await?;

    let usage = docker_output(&["stats", "--no-stream", "--format", "{{.Name}} {{.MemUsage}}"])?;

    step("docker stop ends each service cleanly and fast (an open stream included)", async {
        let mut stream = ingress.http.get(ingress.url("/posts/stream")).header(header::HOST, "posts.com").send().await?;
        let _ = tokio::time::timeout(Duration::from_millis(200), stream.chunk()).await;
        for service in Service::ALL.iter().rev() {
            let name = container(*service);
            let started = Instant::now();
            docker_output(&["stop", &name])?;
            let took = started.elapsed();
            let code = docker_output(&["inspect", "-f", "{{.State.ExitCode}}", &name])?;
            println!("        {:<10} stopped in {:.2} s, exit code {code}", service.name(), took.as_secs_f64());
            if code != "0" || took > STOP_BUDGET {
                return Err(format!("{name} took {took:?} and exited {code}").into());
            }
        }
        Ok(())
    })
    .await?;

    println!("\nmemory in use after the run:");
    for line in usage.lines().filter(|l| l.starts_with("blog-e2e-")) {
        println!("  {line}");
    }
    println!("\nimage sizes:");
    for service in Service::ALL {
        let image = manifests.workload(service)?.image()?.to_owned();
        println!("  {:<18} {:>6.1} MB", image, image_size(&image)? as f64 / 1e6);
    }
    Ok(())
}
