//! `blog-bench`: measures the suite, started in release mode, and a bare axum
//! handler on the same machine in the same run, so every throughput figure is
//! also printed as a ratio of that handler (this machine's speed drifts;
//! ratios within one run do not). For `GET /posts` the bare handler serves
//! the very bytes query answered (plain and gzipped), from memory.
//!
//! Two suites: a fresh one for the consistency lag (measured as the
//! original's was: polling `GET /posts` on query every millisecond) and for
//! query's memory under 50 concurrent readers of a 10,000-post view; a
//! second one for throughput, reads before writes.
//!
//! Run it through `cargo xtask bench`, which builds everything in release
//! mode first. Every phase is bounded in time and the run stops by itself.

use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use blog_domain::Service;
use blog_kit::{http::client::client_builder, ports::free_port};
use blog_local::{Options, Suite, supervisor::LogSink};
use serde_json::{Value, json};
use tokio::sync::mpsc;

/// Concurrent clients of the throughput phases.
const CLIENTS: usize = 50;
/// Length of each throughput phase.
const PHASE: Duration = Duration::from_secs(5);
/// Comments whose consistency lag is measured, per condition.
const LAG_SAMPLES: usize = 200;
/// Posts (one comment each) of the view whose reads are measured.
const READ_VIEW_POSTS: usize = 1_000;
/// Posts (one comment each) of the view whose readers' memory is measured.
const MEMORY_VIEW_POSTS: usize = 10_000;

mod floor;
mod trace;

type Error = Box<dyn std::error::Error + Send + Sync>;

fn main() -> Result<(), Error> {
    let mut args = std::env::args().skip(1);
    match args.next().as_deref() {
        Some("baseline") => {
            let port = args.next().ok_or("baseline PORT [VIEW_FILE GZIP_FILE]")?.parse()?;
            let view = match (args.next(), args.next()) {
                (Some(json), Some(gzip)) => Some((std::fs::read(json)?, std::fs::read(gzip)?)),
                _ => None,
            };
            baseline(port, view)
        }
        Some("run") => {
            let bin_dir = PathBuf::from(args.next().ok_or("run BIN_DIR [--scale N]")?);
            let replicas = match (args.next().as_deref(), args.next()) {
                (None, _) => 1,
                (Some("--scale"), Some(n)) => n.parse()?,
                _ => return Err("run BIN_DIR [--scale N]".into()),
            };
            tokio::runtime::Runtime::new()?.block_on(async move {
                let embedded = run(bin_dir.clone()).await?;
                if replicas > 1 {
                    let scaled = scaled(&bin_dir, replicas).await?;
                    compare(&embedded, &scaled, replicas);
                }
                Ok(())
            })
        }
        Some("floor") => tokio::runtime::Runtime::new()?.block_on(floor::measure(LAG_SAMPLES)),
        Some("floor-role") => {
            let usage = "floor-role INDEX DIR PORT...";
            let index = args.next().ok_or(usage)?.parse()?;
            let dir = PathBuf::from(args.next().ok_or(usage)?);
            let ports = args.map(|port| port.parse()).collect::<Result<Vec<u16>, _>>()?;
            floor::role(index, &dir, ports)
        }
        Some("lag") => {
            let bin_dir = PathBuf::from(args.next().ok_or("lag BIN_DIR")?);
            tokio::runtime::Runtime::new()?.block_on(async { lag(&client_builder().build()?, &bin_dir).await.map(drop) })
        }
        _ => {
            Err("usage: blog-bench run BIN_DIR [--scale N] | blog-bench lag BIN_DIR | blog-bench floor | blog-bench baseline PORT [VIEW_FILE GZIP_FILE]"
                .into())
        }
    }
}

/// The bare handler: the same runtime and HTTP stack as the services, no
/// work: a constant at `/`, and given a view, its bytes at `/posts` and its
/// gzipped bytes at `/posts.gz`, from memory.
fn baseline(port: u16, view: Option<(Vec<u8>, Vec<u8>)>) -> Result<(), Error> {
    use axum::http::header;
    tokio::runtime::Runtime::new()?.block_on(async move {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
        let (json, gzip) = view.unwrap_or_default();
        let (json, gzip) = (axum::body::Bytes::from(json), axum::body::Bytes::from(gzip));
        let app = axum::Router::new()
            .route("/", axum::routing::get(|| async { "ok" }).post(|| async { "ok" }))
            .route("/posts", axum::routing::get(move || std::future::ready(([(header::CONTENT_TYPE, "application/json")], json.clone()))))
            .route(
                "/posts.gz",
                axum::routing::get(move || {
                    std::future::ready(([(header::CONTENT_TYPE, "application/json"), (header::CONTENT_ENCODING, "gzip")], gzip.clone()))
                }),
            );
        let never = blog_kit::Shutdown::new(std::future::pending());
        blog_kit::http::serve::serve(listener, app, never).await?;
        Ok(())
    })
}

/// Runs `CLIENTS` loops of `request` for [`PHASE`]; returns successful
/// requests per second, their count, and the number of failures.
async fn saturate<F, Fut>(request: F) -> (f64, u64, u64)
where
    F: Fn(reqwest::Client, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let http = client_builder().pool_max_idle_per_host(CLIENTS).build().expect("client");
    let request = Arc::new(request);
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let tasks: Vec<_> = (0..CLIENTS as u64)
        .map(|client| {
            let (http, request, done, failed, stop) = (http.clone(), request.clone(), done.clone(), failed.clone(), stop.clone());
            tokio::spawn(async move {
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    if request(http.clone(), client * 1_000_000 + i).await {
                        done.fetch_add(1, Ordering::Relaxed);
                    } else {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(PHASE).await;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        let _ = task.await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let done = done.load(Ordering::Relaxed);
    (done as f64 / elapsed, done, failed.load(Ordering::Relaxed))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()))
        .unwrap_or(0)
}

fn rss_line(suite: &Suite) -> String {
    Service::ALL
        .iter()
        .map(|s| format!("{} {:.1}", s.name(), suite.supervisor.pid(s.name()).map_or(0, rss_kib) as f64 / 1024.0))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Starts the suite as `cargo xtask up` does, on free ports, in `dir`; with
/// more than one replica as `cargo xtask up --scale` does, on PostgreSQL.
async fn launch(bin_dir: &std::path::Path, dir: &std::path::Path, replicas: usize) -> Result<Suite, Error> {
    launch_with(bin_dir, dir, replicas, |_| {}).await
}

/// [`launch`] with the options adjusted by `configure`.
async fn launch_with(
    bin_dir: &std::path::Path,
    dir: &std::path::Path,
    replicas: usize,
    configure: impl FnOnce(&mut Options),
) -> Result<Suite, Error> {
    let mut options = Options::standard(bin_dir.to_owned(), dir.join("data"), free_port(), LogSink::Dir(dir.to_owned()));
    options.ports = Service::ALL.iter().map(|s| (*s, free_port())).collect::<BTreeMap<_, _>>();
    options.scale(replicas, free_port(), blog_local::nats::free_nodes(blog_local::nats::NODES), |_, _| free_port());
    configure(&mut options);
    let suite = Suite::launch(options).await?;
    suite.wait_ready(Duration::from_secs(30)).await?;
    Ok(suite)
}

/// `wrk` on PATH, which the figures were measured with: a client in C
/// takes less of the two cores than this process's own does.
fn wrk_available() -> bool {
    Command::new("wrk").arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok()
}

/// `wrk -t2 -c50` on `url` for [`PHASE`]: (requests per second, requests
/// that failed or were not 2xx).
fn wrk(url: &str, headers: &[(&str, &str)]) -> Result<(f64, u64), Error> {
    let mut command = Command::new("wrk");
    command.args(["-t2", &format!("-c{CLIENTS}"), &format!("-d{}s", PHASE.as_secs()), url]);
    for (name, value) in headers {
        command.arg("-H").arg(format!("{name}: {value}"));
    }
    let output = command.output()?;
    let text = String::from_utf8_lossy(&output.stdout);
    let number = |prefix: &str| text.lines().find_map(|l| l.trim().strip_prefix(prefix)).map(str::trim);
    let rate = number("Requests/sec:").and_then(|n| n.parse().ok()).ok_or_else(|| format!("unexpected wrk output: {text}"))?;
    let non_2xx = number("Non-2xx or 3xx responses:").and_then(|n| n.parse().ok()).unwrap_or(0);
    let errors =
        number("Socket errors:").map_or(0, |line| line.split(|c: char| !c.is_ascii_digit()).filter_map(|n| n.parse::<u64>().ok()).sum());
    Ok((rate, non_2xx + errors))
}

/// Runs `CLIENTS` loops of GET `url` for [`PHASE`] with wrk when it is
/// installed, else with this process's client checking it read `expected`
/// bytes; returns requests per second and failures.
async fn read_phase(url: String, headers: &[(&'static str, &'static str)], expected: usize) -> (f64, u64) {
    if wrk_available() {
        let headers = headers.to_vec();
        match tokio::task::spawn_blocking(move || wrk(&url, &headers)).await {
            Ok(Ok(result)) => return result,
            Ok(Err(e)) => eprintln!("blog-bench: {e}"),
            Err(e) => eprintln!("blog-bench: {e}"),
        }
        return (0.0, 0);
    }
    let headers: Vec<_> = headers.to_vec();
    let (rate, _, failed) = saturate(move |http, _| {
        let mut request = http.get(&url);
        for (name, value) in &headers {
            request = request.header(*name, *value);
        }
        async move {
            match request.send().await {
                Ok(response) if response.status().is_success() => response.bytes().await.is_ok_and(|b| b.len() == expected),
                _ => false,
            }
        }
    })
    .await;
    (rate, failed)
}

async fn run(bin_dir: PathBuf) -> Result<Summary, Error> {
    println!(
        "blog-bench: {CLIENTS} concurrent clients, {} s per throughput phase, {} cores",
        PHASE.as_secs(),
        std::thread::available_parallelism()?
    );
    let http = client_builder().build()?;

    // A. Fresh suites: the consistency lag at idle and where it goes; then
    // memory under readers.
    let streamed = lag(&http, &bin_dir).await?;
    let dir = tempfile::tempdir()?;
    let suite = launch(&bin_dir, dir.path(), 1).await?;
    memory_under_readers(&http, &suite).await?;
    suite.stop().await;
    drop(dir);

    // B. Throughput: reads of a 1,000 x 1 view, then writes.
    let dir = tempfile::tempdir()?;
    let suite = launch(&bin_dir, dir.path(), 1).await?;
    let gateway = format!("http://{}", suite.gateway_addr);
    let query = suite.options.url(Service::Query);
    let bus = suite.options.url(Service::EventBus);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle_rss = rss_line(&suite);

    create_view(&http, &gateway, &query, READ_VIEW_POSTS).await?;
    let json_view = http.get(format!("{query}/posts")).send().await?.bytes().await?;
    let gzip_view = http.get(format!("{query}/posts")).header("accept-encoding", "gzip").send().await?.bytes().await?;
    std::fs::write(dir.path().join("view.json"), &json_view)?;
    std::fs::write(dir.path().join("view.json.gz"), &gzip_view)?;
    let baseline_port = free_port();
    let mut baseline = Command::new(std::env::current_exe()?)
        .arg("baseline")
        .arg(baseline_port.to_string())
        .arg(dir.path().join("view.json"))
        .arg(dir.path().join("view.json.gz"))
        .stdout(Stdio::null())
        .spawn()?;
    let base = format!("http://127.0.0.1:{baseline_port}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while http.get(format!("{base}/")).send().await.is_err() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // 1. The bare handler.
    // This process's client, as the write phases compared with it use.
    let base_url = format!("{base}/");
    let (bare, _, _) = saturate(move |http, _| {
        let url = base_url.clone();
        async move { http.get(url).send().await.is_ok_and(|r| r.status().is_success()) }
    })
    .await;
    println!("bare axum handler:            {bare:>9.0} req/s");

    // 2. GET /posts on query against the bare handler serving the same bytes.
    let (json_len, gzip_len) = (json_view.len(), gzip_view.len());
    println!(
        "GET /posts, {READ_VIEW_POSTS} posts x 1 comment: {:.0} KB of JSON, {:.0} KB gzipped ({})",
        json_len as f64 / 1e3,
        gzip_len as f64 / 1e3,
        if wrk_available() { "wrk -t2 -c50" } else { "this process's client, 50 connections" }
    );
    let (bare_view, _) = read_phase(format!("{base}/posts"), &[], json_len).await;
    let (query_view, failed_view) = read_phase(format!("{query}/posts"), &[], json_len).await;
    let (bare_gzip, _) = read_phase(format!("{base}/posts.gz"), &[], gzip_len).await;
    let (query_gzip, failed_gzip) = read_phase(format!("{query}/posts"), &[("accept-encoding", "gzip")], gzip_len).await;
    println!("  bare handler, same bytes:   {bare_view:>9.0} req/s");
    println!(
        "  query:                      {query_view:>9.0} req/s  = {:.1} % of the bare handler ({failed_view} failed)",
        100.0 * query_view / bare_view
    );
    println!("  bare handler, same gzip:    {bare_gzip:>9.0} req/s");
    println!(
        "  query, gzip:                {query_gzip:>9.0} req/s  = {:.1} % of the bare handler ({failed_gzip} failed)",
        100.0 * query_gzip / bare_gzip
    );

    // 3. Durable post creation through the gateway.
    let written = posts_phase(&http, &gateway, READ_VIEW_POSTS).await?;
    println!("posts through the gateway:    {}", written.line(Some(bare)));
    // 4. Events accepted by the bus: one per request, and in batches of 100.
    let (bus_single, bus_batched) = bus_phase(&bus, &suite.options.internal_secret).await;
    println!("bus, one event per request:   {bus_single:>9.0} events/s = {:.1} % of the bare handler", 100.0 * bus_single / bare);
    println!("bus, 100 events per request:  {bus_batched:>9.0} events/s");
    // Let the subscribers work through the benchmark events before measuring lag.
    wait_for_idle_bus(&http, &bus).await;

    // 5. Consistency lag under write load (by the stream: polling a view of
    // tens of thousands of posts would measure the polling).
    let post: Value = http.post(format!("{gateway}/posts/create")).json(&json!({"title": "lag"})).send().await?.json().await?;
    let post_id = post["id"].as_str().ok_or("post id")?.to_owned();
    let busy_url = format!("{gateway}/posts/create");
    let background = tokio::spawn(saturate(move |http, i| {
        let url = busy_url.clone();
        async move { http.post(url).json(&json!({ "title": format!("load {i}") })).send().await.is_ok_and(|r| r.status().as_u16() == 201) }
    }));
    let busy = measure_lag(&http, &gateway, &post_id, LAG_SAMPLES / 4, LagProbe::Stream).await?;
    let (background_posts, _, _) = background.await?;
    print_lag(&format!("consistency lag, {background_posts:.0} posts/s, stream:"), &busy);

    wait_for_idle_bus(&http, &bus).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    println!("RSS MiB at idle after start:  {idle_rss}");
    println!("RSS MiB at idle after load:   {}", rss_line(&suite));
    let rss = total_rss_mib(&suite);

    suite.stop().await;
    let _ = baseline.kill();
    let _ = baseline.wait();
    Ok(Summary { posts_per_s: written.per_s, lag: streamed, rss_mib: rss, bus_single, bus_batched })
}

/// Events per second the bus at `bus` accepts (acknowledged as stored), over
/// [`PHASE`] each: one event per request, then 100 per request.
async fn bus_phase(bus: &str, secret: &str) -> (f64, f64) {
    let events = format!("{bus}/events");
    let (single, single_secret) = (events.clone(), secret.to_owned());
    let (bus_single, _, _) = saturate(move |http, i| {
        let (url, secret) = (single.clone(), single_secret.clone());
        async move {
            let event = json!({"id": format!("bench-{i}"), "type": "BenchEvent", "data": {"i": i}});
            http.post(url).bearer_auth(secret).json(&event).send().await.is_ok_and(|r| r.status().is_success())
        }
    })
    .await;
    let secret = secret.to_owned();
    let (bus_batches, _, _) = saturate(move |http, i| {
        let (url, secret) = (events.clone(), secret.clone());
        async move {
            let batch: Vec<Value> =
                (0..100).map(|j| json!({"id": format!("bench-{i}-{j}"), "type": "BenchEvent", "data": {"j": j}})).collect();
            http.post(url).bearer_auth(secret).json(&batch).send().await.is_ok_and(|r| r.status().is_success())
        }
    })
    .await;
    (bus_single, bus_batches * 100.0)
}

/// What the scaled-out run is compared on.
struct Summary {
    /// Events/s the bus accepted, one per request and 100 per request.
    bus_single: f64,
    bus_batched: f64,
    posts_per_s: f64,
    /// Consistency lag at idle, by query's live stream, sorted.
    lag: Vec<Duration>,
    /// Every process of the suite (PostgreSQL with its backends), at idle after the write load.
    rss_mib: f64,
}

/// A write phase's result.
struct Written {
    per_s: f64,
    failed: u64,
    shown: usize,
    expected: usize,
    drained: Duration,
}

impl Written {
    fn line(&self, bare: Option<f64>) -> String {
        let ratio = bare.map(|bare| format!("  = {:.1} % of the bare handler", 100.0 * self.per_s / bare)).unwrap_or_default();
        format!(
            "{:>9.0} posts/s{ratio} ({} failed); {} of {} in query, {:.2} s after the last write",
            self.per_s,
            self.failed,
            self.shown,
            self.expected,
            self.drained.as_secs_f64()
        )
    }
}

/// Durable post creation through the gateway for [`PHASE`] by [`CLIENTS`]
/// clients, then waits until query shows every post (`already` were there).
async fn posts_phase(http: &reqwest::Client, gateway: &str, already: usize) -> Result<Written, Error> {
    let url = format!("{gateway}/posts/create");
    let (per_s, created, failed) = saturate(move |http, i| {
        let url = url.clone();
        async move { http.post(url).json(&json!({ "title": format!("bench {i}") })).send().await.is_ok_and(|r| r.status().as_u16() == 201) }
    })
    .await;
    // The bus being idle is not enough: a relay may still hold a batch.
    let drain = Instant::now();
    let expected = created as usize + already;
    let mut shown;
    loop {
        shown = http.get(format!("{gateway}/posts")).send().await?.json::<serde_json::Map<String, Value>>().await?.len();
        if shown >= expected || drain.elapsed() > Duration::from_secs(60) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let written = Written { per_s, failed, shown, expected, drained: drain.elapsed() };
    if shown != expected {
        return Err(format!("query shows {shown} posts, {expected} were created").into());
    }
    Ok(written)
}

/// The RSS of `pid` and every process below it (PostgreSQL's backends), in KiB.
fn tree_rss_kib(pid: u32) -> u64 {
    let parent_of = |child: u32| -> Option<u32> {
        let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).ok()?;
        // pid (comm) state ppid ...: comm may hold spaces, so read after the last ')'.
        stat.rsplit(')').next()?.split_whitespace().nth(1)?.parse().ok()
    };
    let all: Vec<u32> =
        std::fs::read_dir("/proc").into_iter().flatten().flatten().filter_map(|e| e.file_name().to_str()?.parse().ok()).collect();
    let mut tree = vec![pid];
    let mut i = 0;
    while i < tree.len() {
        let parent = tree[i];
        tree.extend(all.iter().copied().filter(|child| parent_of(*child) == Some(parent)));
        i += 1;
    }
    tree.into_iter().map(rss_kib).sum()
}

/// Per service, the RSS of all its processes, in MiB; PostgreSQL last when it runs.
fn rss_by_service(suite: &Suite) -> Vec<(String, f64)> {
    let mut out: Vec<(String, f64)> = Service::ALL
        .iter()
        .map(|s| {
            let kib: u64 = suite.options.processes(*s).iter().map(|(name, _)| suite.supervisor.pid(name).map_or(0, rss_kib)).sum();
            (s.name().to_owned(), kib as f64 / 1024.0)
        })
        .collect();
    if let Some(pid) = suite.supervisor.pid(blog_local::postgres::PROCESS) {
        out.push(("postgres".to_owned(), tree_rss_kib(pid) as f64 / 1024.0));
    }
    if let Some(nats) = &suite.nats {
        let kib: u64 = (1..=nats.nodes().len()).filter_map(|i| suite.supervisor.pid(&blog_local::nats::process_name(i))).map(rss_kib).sum();
        out.push(("nats (3 nodes)".to_owned(), kib as f64 / 1024.0));
    }
    out
}

fn total_rss_mib(suite: &Suite) -> f64 {
    rss_by_service(suite).iter().map(|(_, mib)| mib).sum()
}

/// The same write throughput, idle consistency lag and memory on a suite
/// scaled out to `replicas` replicas on the suite's own PostgreSQL.
async fn scaled(bin_dir: &std::path::Path, replicas: usize) -> Result<Summary, Error> {
    use std::os::unix::fs::PermissionsExt;
    println!("\nscaled out: {replicas} replicas of every service, on PostgreSQL, the bus's on a 3-node JetStream");
    blog_local::postgres::ensure_installed()?;
    blog_local::nats::ensure_installed()?;
    let http = client_builder().build()?;
    let dir = tempfile::tempdir()?;
    // PostgreSQL runs as its own account when this runs as root.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711))?;
    let suite = launch(bin_dir, dir.path(), replicas).await?;
    let gateway = format!("http://{}", suite.gateway_addr);
    let bus = suite.options.url(Service::EventBus);
    let post: Value = http.post(format!("{gateway}/posts/create")).json(&json!({"title": "lag"})).send().await?.json().await?;
    let post_id = post["id"].as_str().ok_or("post id")?.to_owned();
    let lag = measure_lag(&http, &gateway, &post_id, LAG_SAMPLES, LagProbe::Stream).await?;
    print_lag("consistency lag, idle, query's live stream:          ", &lag);
    lag_breakdown(&http, &gateway, &bus, &post_id, LAG_SAMPLES / 2).await?;
    let written = posts_phase(&http, &gateway, 1).await?;
    println!("posts through the gateway:    {}", written.line(None));
    wait_for_idle_bus(&http, &bus).await;
    // Through the bus's usual address: the balancer over its replicas.
    let (bus_single, bus_batched) = bus_phase(&bus, &suite.options.internal_secret).await;
    println!("bus, one event per request:   {bus_single:>9.0} events/s (JetStream, 3 replicas, through {replicas} bus replicas)");
    println!("bus, 100 events per request:  {bus_batched:>9.0} events/s");
    wait_for_idle_bus(&http, &bus).await;
    // The consistency lag again, now that the log holds the benchmark's events.
    let after = measure_lag(&http, &gateway, &post_id, LAG_SAMPLES / 4, LagProbe::Stream).await?;
    print_lag("consistency lag, idle again, after the bus phase:    ", &after);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss = rss_by_service(&suite);
    let line: Vec<String> = rss.iter().map(|(name, mib)| format!("{name} {mib:.1}")).collect();
    println!("RSS MiB at idle after load (all replicas of a service together): {}", line.join(", "));
    let rss_mib = rss.iter().map(|(_, mib)| mib).sum();
    suite.stop().await;
    Ok(Summary { posts_per_s: written.per_s, lag, rss_mib, bus_single, bus_batched })
}

fn compare(embedded: &Summary, scaled: &Summary, replicas: usize) {
    let lag = |s: &Summary| {
        format!("p50 {:.2} ms, p99 {:.2} ms", percentile(&s.lag, 0.50).as_secs_f64() * 1e3, percentile(&s.lag, 0.99).as_secs_f64() * 1e3)
    };
    println!("\nside by side, this run:            embedded (SQLite, 1 each)   PostgreSQL + JetStream, {replicas} replicas");
    println!("  posts/s through the gateway:     {:>12.0}                {:>12.0}", embedded.posts_per_s, scaled.posts_per_s);
    println!("  bus events/s, 1 per request:     {:>12.0}                {:>12.0}", embedded.bus_single, scaled.bus_single);
    println!("  bus events/s, 100 per request:   {:>12.0}                {:>12.0}", embedded.bus_batched, scaled.bus_batched);
    println!("  consistency lag, idle, stream:   {:<27} {}", lag(embedded), lag(scaled));
    println!("  RSS MiB at idle, whole suite:    {:>12.1}                {:>12.1}", embedded.rss_mib, scaled.rss_mib);
}

/// Creates `count` posts with one comment each through the gateway and waits
/// until query shows every comment moderated.
async fn create_view(http: &reqwest::Client, gateway: &str, query: &str, count: usize) -> Result<(), Error> {
    let writers: Vec<_> = (0..CLIENTS)
        .map(|w| {
            let (http, gateway) = (http.clone(), gateway.to_owned());
            tokio::spawn(async move {
                for i in (w..count).step_by(CLIENTS) {
                    let post: Value = http
                        .post(format!("{gateway}/posts/create"))
                        .json(&json!({ "title": format!("post {i} of the read benchmark") }))
                        .send()
                        .await?
                        .json()
                        .await?;
                    let id = post["id"].as_str().ok_or("post id")?;
                    let answer = http
                        .post(format!("{gateway}/posts/{id}/comments"))
                        .json(&json!({ "content": format!("the one comment of post {i}") }))
                        .send()
                        .await?;
                    if answer.status().as_u16() != 201 {
                        return Err::<(), Error>(format!("comment answered {}", answer.status()).into());
                    }
                }
                Ok(())
            })
        })
        .collect();
    for writer in writers {
        writer.await??;
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let view: serde_json::Map<String, Value> = http.get(format!("{query}/posts")).send().await?.json().await?;
        let moderated = view.values().filter(|p| p["comments"][0]["status"].as_str().is_some_and(|s| s != "pending")).count();
        if moderated >= count {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("only {moderated} of {count} comments moderated in query").into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Query's resident memory (current, peak) in KiB.
fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status.lines().find_map(|l| l.strip_prefix(name)).and_then(|rest| rest.split_whitespace().next()?.parse().ok()).unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Grows the view to [`MEMORY_VIEW_POSTS`] posts with a comment each, then has
/// `CLIENTS` readers read it whole for a phase; prints query's memory.
async fn memory_under_readers(http: &reqwest::Client, suite: &Suite) -> Result<(), Error> {
    let gateway = format!("http://{}", suite.gateway_addr);
    let query = suite.options.url(Service::Query);
    create_view(http, &gateway, &query, MEMORY_VIEW_POSTS).await?;
    let size = http.get(format!("{query}/posts")).send().await?.bytes().await?.len();
    let pid = suite.supervisor.pid(Service::Query.name()).ok_or("query is not running")?;
    let (before, _) = memory_kib(pid);
    let (reads, _) = read_phase(format!("{query}/posts"), &[], size).await;
    let (after, peak) = memory_kib(pid);
    let mib = |kib: u64| kib as f64 / 1024.0;
    println!(
        "query memory, {CLIENTS} readers of a {MEMORY_VIEW_POSTS}-post view ({:.1} MB): RSS {:.1} MiB before, {:.1} MiB after, peak {:.1} MiB ({reads:.0} reads/s)",
        size as f64 / 1e6,
        mib(before),
        mib(after),
        mib(peak)
    );
    Ok(())
}

fn print_lag(label: &str, samples: &[Duration]) {
    println!(
        "{label}  p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} comments)",
        percentile(samples, 0.50).as_secs_f64() * 1e3,
        percentile(samples, 0.99).as_secs_f64() * 1e3,
        samples.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
        samples.len()
    );
}

async fn wait_for_idle_bus(http: &reqwest::Client, bus: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        let idle = match http.get(format!("{bus}/status")).send().await {
            Ok(r) => {
                r.json::<Value>().await.is_ok_and(|s| s["subscribers"].as_array().is_some_and(|subs| subs.iter().all(|s| s["lag"] == 0)))
            }
            Err(_) => false,
        };
        if idle {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The consistency lag on a fresh, idle suite, by polling and by the stream,
/// with the breakdown seen from outside; then, on a fresh suite with the
/// services' trace points on, the breakdown from inside (see [`trace`]).
async fn lag(http: &reqwest::Client, bin_dir: &std::path::Path) -> Result<Vec<Duration>, Error> {
    let dir = tempfile::tempdir()?;
    let suite = launch(bin_dir, dir.path(), 1).await?;
    let gateway = format!("http://{}", suite.gateway_addr);
    let query = suite.options.url(Service::Query);
    let post: Value = http.post(format!("{gateway}/posts/create")).json(&json!({"title": "lag"})).send().await?.json().await?;
    let post_id = post["id"].as_str().ok_or("post id")?.to_owned();
    let period = std::cell::Cell::new(0.0);
    let polled = measure_lag(http, &gateway, &post_id, LAG_SAMPLES, LagProbe::Poll(&query, &period)).await?;
    print_lag("consistency lag, idle, polling GET /posts every 1 ms:", &polled);
    println!("  (one GET every {:.2} ms on average while polling)", period.get());
    let streamed = measure_lag(http, &gateway, &post_id, LAG_SAMPLES, LagProbe::Stream).await?;
    print_lag("consistency lag, idle, query's live stream:          ", &streamed);
    lag_breakdown(http, &gateway, &suite.options.url(Service::EventBus), &post_id, LAG_SAMPLES / 2).await?;
    suite.stop().await;
    drop(dir);
    trace::breakdown(http, bin_dir, LAG_SAMPLES / 2).await?;
    floor::measure(LAG_SAMPLES).await?;
    Ok(streamed)
}

/// Comments on `post_id` through the gateway; returns the new comment's id.
async fn post_comment(http: &reqwest::Client, gateway: &str, post_id: &str, content: &str) -> Result<String, Error> {
    let list: Vec<Value> =
        http.post(format!("{gateway}/posts/{post_id}/comments")).json(&json!({ "content": content })).send().await?.json().await?;
    Ok(list.last().and_then(|c| c["id"].as_str()).ok_or("comment id")?.to_owned())
}

/// How [`measure_lag`] sees a comment approved in query.
#[derive(Clone, Copy)]
enum LagProbe<'a> {
    /// `GET /posts` on query (this base URL) every millisecond, as the
    /// original's lag was measured; sets the mean time between GETs.
    Poll(&'a str, &'a std::cell::Cell<f64>),
    /// Query's live stream, `GET /posts/stream` through the gateway.
    Stream,
}

/// Posts `samples` comments one after another and times each from the start
/// of its POST until query shows it approved. Sorted.
async fn measure_lag(
    http: &reqwest::Client,
    gateway: &str,
    post_id: &str,
    samples: usize,
    probe: LagProbe<'_>,
) -> Result<Vec<Duration>, Error> {
    let (tx, mut events) = mpsc::unbounded_channel::<(String, Value, Instant)>();
    let reader = match probe {
        LagProbe::Stream => Some(sse_events(http.get(format!("{gateway}/posts/stream")).send().await?, tx)),
        LagProbe::Poll(..) => None,
    };
    let mut lags = Vec::with_capacity(samples);
    let (mut polls, mut polling) = (0u32, Duration::ZERO);
    for i in 0..samples {
        let started = Instant::now();
        let id = post_comment(http, gateway, post_id, &format!("lag sample {i}")).await?;
        match probe {
            LagProbe::Stream => loop {
                let (event, data, at) = tokio::time::timeout(Duration::from_secs(30), events.recv()).await?.ok_or("stream ended")?;
                if event == "CommentUpdated" && data["id"] == id.as_str() && data["status"] == "approved" {
                    lags.push(at - started);
                    break;
                }
            },
            LagProbe::Poll(query, _) => {
                let deadline = started + Duration::from_secs(30);
                // A GET every millisecond on a fixed schedule: a tick the
                // timer or a slow answer made late is made up at once, so
                // the GETs average one per millisecond (a 1 ms sleep after
                // each answer polled about every 2 ms: 1 ms, the GET, and
                // the timer rounding up to its next millisecond).
                let mut every_ms = tokio::time::interval(Duration::from_millis(1));
                let first = every_ms.tick().await;
                let mut last = first;
                loop {
                    polls += 1;
                    let body = http.get(format!("{query}/posts")).send().await?.error_for_status()?.bytes().await?;
                    // Query showed it when the answer arrived; the probe's
                    // own reading of it comes after.
                    let at = Instant::now();
                    if shown_approved(&body, post_id, &id)? {
                        lags.push(at - started);
                        break;
                    }
                    if at > deadline {
                        return Err(format!("comment {id} not approved in query after 30 s").into());
                    }
                    last = every_ms.tick().await;
                }
                // From the first GET to the last: `polls - 1` periods.
                polling += last - first;
                polls -= 1;
            }
        }
    }
    if let Some(reader) = reader {
        reader.abort();
    }
    if let LagProbe::Poll(_, period) = probe {
        period.set(polling.as_secs_f64() * 1e3 / f64::from(polls.max(1)));
    }
    lags.sort();
    Ok(lags)
}

/// Whether comment `id` of post `post_id` is approved in a `GET /posts`
/// answer. Only the ids and statuses are read, borrowed from the body: the
/// probe shares the machine's two cores with the suite it measures, and
/// building the whole view as `serde_json::Value`s on every poll (a map and
/// a string for every key and value of a view that grows to hundreds of
/// comments) made the probe one of the busiest processes while it polled.
fn shown_approved(body: &[u8], post_id: &str, id: &str) -> Result<bool, Error> {
    #[derive(serde::Deserialize)]
    struct Post<'a> {
        #[serde(borrow)]
        comments: Vec<Comment<'a>>,
    }
    #[derive(serde::Deserialize)]
    struct Comment<'a> {
        id: &'a str,
        status: &'a str,
    }
    let view: HashMap<&str, Post<'_>> = serde_json::from_slice(body)?;
    let comment = view.get(post_id).and_then(|post| post.comments.iter().rev().find(|c| c.id == id));
    Ok(comment.is_some_and(|c| c.status == "approved"))
}

/// Reads server-sent events from `response`, sending `(event name, data,
/// arrival)` for each until the stream ends.
fn sse_events(mut response: reqwest::Response, tx: mpsc::UnboundedSender<(String, Value, Instant)>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut buffer = String::new();
        while let Ok(Some(chunk)) = response.chunk().await {
            let now = Instant::now();
            buffer.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = buffer.find("\n\n") {
                let block: String = buffer.drain(..end + 2).collect();
                let field = |name: &str| block.lines().find_map(|l| l.strip_prefix(name)).map(str::trim).unwrap_or_default().to_owned();
                if let Ok(data) = serde_json::from_str::<Value>(&field("data:")) {
                    let _ = tx.send((field("event:"), data, now));
                }
            }
        }
    })
}

/// Where a comment's consistency lag goes: each comment's path timed at the
/// points an outside observer sees (its POST answered, each event stored by
/// the bus as the bus's live flow shows it, each subscriber's acknowledgement,
/// query's stream); prints the median of each stage.
async fn lag_breakdown(http: &reqwest::Client, gateway: &str, bus: &str, post_id: &str, samples: usize) -> Result<(), Error> {
    let (tx, mut marks) = mpsc::unbounded_channel::<(String, Value, Instant)>();
    let flow = sse_events(http.get(format!("{bus}/flow")).send().await?, tx.clone());
    let stream = sse_events(http.get(format!("{gateway}/posts/stream")).send().await?, tx);
    // Stage name, from mark, to mark.
    const STAGES: [(&str, &str, &str); 8] = [
        ("comment POST answered (durable write)", "start", "answered"),
        ("hop 1: answered -> CommentCreated stored by the bus", "answered", "stored CommentCreated"),
        ("hop 1: stored -> moderation acknowledged it", "stored CommentCreated", "acked CommentCreated moderation"),
        ("hop 2: CommentCreated stored -> CommentModerated stored", "stored CommentCreated", "stored CommentModerated"),
        ("hop 2: stored -> comments acknowledged it", "stored CommentModerated", "acked CommentModerated comments"),
        ("hop 3: CommentModerated stored -> CommentUpdated stored", "stored CommentModerated", "stored CommentUpdated"),
        ("hop 3: stored -> query's stream shows it approved", "stored CommentUpdated", "shown"),
        ("hop 3: stored -> query acknowledged it", "stored CommentUpdated", "acked CommentUpdated query"),
    ];
    let mut seq_to_comment: HashMap<u64, (String, String)> = HashMap::new();
    let mut times: Vec<Vec<Duration>> = vec![Vec::new(); STAGES.len()];
    for i in 0..samples {
        let started = Instant::now();
        let id = post_comment(http, gateway, post_id, &format!("breakdown sample {i}")).await?;
        let answered = Instant::now();
        let mut seen: HashMap<String, Instant> = HashMap::from([("start".to_owned(), started), ("answered".to_owned(), answered)]);
        while STAGES.iter().any(|(_, _, to)| !seen.contains_key(*to)) {
            let (event, data, at) = tokio::time::timeout(Duration::from_secs(30), marks.recv()).await?.ok_or("a stream ended")?;
            let mark = match event.as_str() {
                "published" => {
                    let (seq, kind) = (data["seq"].as_u64().unwrap_or(0), data["type"].as_str().unwrap_or_default().to_owned());
                    let comment = data["data"]["id"].as_str().unwrap_or_default().to_owned();
                    seq_to_comment.insert(seq, (kind.clone(), comment.clone()));
                    (comment == id).then(|| format!("stored {kind}"))
                }
                "delivered" => seq_to_comment
                    .get(&data["seq"].as_u64().unwrap_or(0))
                    .filter(|(_, comment)| *comment == id)
                    .map(|(kind, _)| format!("acked {kind} {}", data["subscriber"].as_str().unwrap_or_default())),
                "CommentUpdated" => (data["id"] == id.as_str() && data["status"] == "approved").then(|| "shown".to_owned()),
                _ => None,
            };
            if let Some(mark) = mark {
                seen.entry(mark).or_insert(at);
            }
        }
        for (stage, (_, from, to)) in STAGES.iter().enumerate() {
            times[stage].push(seen[*to].saturating_duration_since(seen[*from]));
        }
    }
    flow.abort();
    stream.abort();
    println!("where the lag goes, idle (median of {samples} comments, as seen from outside through the bus's /flow):");
    for ((name, _, _), mut samples) in STAGES.iter().zip(times) {
        samples.sort();
        println!(
            "  {name:<58} {:>6.2} ms (p99 {:.2} ms)",
            percentile(&samples, 0.5).as_secs_f64() * 1e3,
            percentile(&samples, 0.99).as_secs_f64() * 1e3
        );
    }
    Ok(())
}
