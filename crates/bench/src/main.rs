//! `blog-bench`: measures the suite, started in release mode, and a bare axum
//! handler answering a constant on the same machine in the same run, so every
//! throughput figure is also printed as a ratio of that handler (this
//! machine's speed drifts; ratios within one run do not).
//!
//! Run it through `cargo xtask bench`, which builds everything in release
//! mode first. Every phase is bounded in time and the run stops by itself.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use blog_common::{Service, bus_client::client_builder};
use blog_local::{Options, Suite, supervisor::LogSink};
use serde_json::{Value, json};
use tokio::sync::mpsc;

/// Concurrent clients of the throughput phases.
const CLIENTS: usize = 50;
/// Length of each throughput phase.
const PHASE: Duration = Duration::from_secs(5);
/// Comments whose consistency lag is measured, per condition.
const LAG_SAMPLES: usize = 200;

type Error = Box<dyn std::error::Error + Send + Sync>;

fn main() -> Result<(), Error> {
    let mut args = std::env::args().skip(1);
    match args.next().as_deref() {
        Some("baseline") => baseline(args.next().ok_or("baseline PORT")?.parse()?),
        Some("run") => {
            let bin_dir = PathBuf::from(args.next().ok_or("run BIN_DIR")?);
            tokio::runtime::Runtime::new()?.block_on(run(bin_dir))
        }
        _ => Err("usage: blog-bench run BIN_DIR | blog-bench baseline PORT".into()),
    }
}

/// The bare handler: the same runtime and HTTP stack as the services, no work.
fn baseline(port: u16) -> Result<(), Error> {
    tokio::runtime::Runtime::new()?.block_on(async move {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
        let app = axum::Router::new().route("/", axum::routing::get(|| async { "ok" }).post(|| async { "ok" }));
        let never = blog_common::server::Shutdown::new(std::future::pending());
        blog_common::server::serve(listener, app, never).await?;
        Ok(())
    })
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map_or(0, |a| a.port())
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

async fn run(bin_dir: PathBuf) -> Result<(), Error> {
    let dir = tempfile::tempdir()?;
    let baseline_port = free_port();
    let mut baseline =
        Command::new(std::env::current_exe()?).args(["baseline", &baseline_port.to_string()]).stdout(Stdio::null()).spawn()?;

    let mut options = Options::standard(bin_dir, dir.path().join("data"), free_port(), LogSink::Dir(dir.path().to_owned()));
    options.ports = Service::ALL.iter().map(|s| (*s, free_port())).collect::<BTreeMap<_, _>>();
    let suite = Suite::launch(options).await?;
    suite.wait_ready(Duration::from_secs(30)).await?;
    let gateway = format!("http://{}", suite.gateway_addr);
    let bus = suite.options.url(Service::EventBus);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle_rss = rss_line(&suite);

    println!(
        "blog-bench: {CLIENTS} concurrent clients, {} s per throughput phase, {} cores",
        PHASE.as_secs(),
        std::thread::available_parallelism()?
    );

    // 1. The bare handler.
    let base_url = format!("http://127.0.0.1:{baseline_port}/");
    let (bare, _, _) = saturate(move |http, _| {
        let url = base_url.clone();
        async move { http.get(url).send().await.is_ok_and(|r| r.status().is_success()) }
    })
    .await;
    println!("bare axum handler:            {bare:>9.0} req/s");

    // 2. Durable post creation through the gateway.
    let url = format!("{gateway}/posts/create");
    let (posts, created, failed) = saturate(move |http, i| {
        let url = url.clone();
        async move { http.post(url).json(&json!({ "title": format!("bench {i}") })).send().await.is_ok_and(|r| r.status().as_u16() == 201) }
    })
    .await;
    let http = client_builder().build()?;
    let drain = Instant::now();
    wait_for_idle_bus(&http, &bus).await;
    let drained = drain.elapsed();
    let shown = http.get(format!("{gateway}/posts")).send().await?.json::<serde_json::Map<String, Value>>().await?.len();
    println!(
        "posts through the gateway:    {posts:>9.0} posts/s  = {:.1} % of the bare handler ({failed} failed); {shown} of {created} in query, {:.2} s after the last write",
        100.0 * posts / bare,
        drained.as_secs_f64()
    );
    if shown as u64 != created {
        return Err(format!("query shows {shown} posts, {created} were created").into());
    }

    // 3. Events accepted by the bus: one per request, and in batches of 100.
    let events = format!("{bus}/events");
    let secret = suite.options.internal_secret.clone();
    let single = events.clone();
    let single_secret = secret.clone();
    let (bus_single, _, _) = saturate(move |http, i| {
        let url = single.clone();
        let secret = single_secret.clone();
        async move {
            let event = json!({"id": format!("bench-{i}"), "type": "BenchEvent", "data": {"i": i}});
            http.post(url).bearer_auth(secret).json(&event).send().await.is_ok_and(|r| r.status().is_success())
        }
    })
    .await;
    let batched = events.clone();
    let (bus_batches, _, _) = saturate(move |http, i| {
        let url = batched.clone();
        let secret = secret.clone();
        async move {
            let batch: Vec<Value> =
                (0..100).map(|j| json!({"id": format!("bench-{i}-{j}"), "type": "BenchEvent", "data": {"j": j}})).collect();
            http.post(url).bearer_auth(secret).json(&batch).send().await.is_ok_and(|r| r.status().is_success())
        }
    })
    .await;
    println!("bus, one event per request:   {bus_single:>9.0} events/s = {:.1} % of the bare handler", 100.0 * bus_single / bare);
    println!("bus, 100 events per request:  {:>9.0} events/s", bus_batches * 100.0);
    // Let the subscribers work through the benchmark events before measuring lag.
    wait_for_idle_bus(&http, &bus).await;

    // 4. Consistency lag: a comment's POST until query streams it approved.
    let post: Value = http.post(format!("{gateway}/posts/create")).json(&json!({"title": "lag"})).send().await?.json().await?;
    let post_id = post["id"].as_str().ok_or("post id")?.to_owned();
    let idle = measure_lag(&http, &gateway, &post_id, LAG_SAMPLES).await?;
    print_lag("consistency lag, idle:      ", &idle);
    let busy_url = format!("{gateway}/posts/create");
    let background = tokio::spawn(saturate(move |http, i| {
        let url = busy_url.clone();
        async move { http.post(url).json(&json!({ "title": format!("load {i}") })).send().await.is_ok_and(|r| r.status().as_u16() == 201) }
    }));
    let busy = measure_lag(&http, &gateway, &post_id, LAG_SAMPLES / 4).await?;
    let (background_posts, _, _) = background.await?;
    print_lag(&format!("consistency lag, {background_posts:.0} posts/s:"), &busy);

    wait_for_idle_bus(&http, &bus).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    println!("RSS MiB at idle after start:  {idle_rss}");
    println!("RSS MiB at idle after load:   {}", rss_line(&suite));

    suite.stop().await;
    let _ = baseline.kill();
    let _ = baseline.wait();
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

/// Posts `samples` comments one after another and times each from the start
/// of its POST until query's live stream reports it approved. Sorted.
async fn measure_lag(http: &reqwest::Client, gateway: &str, post_id: &str, samples: usize) -> Result<Vec<Duration>, Error> {
    let mut stream = http.get(format!("{gateway}/posts/stream")).send().await?;
    let (tx, mut approved) = mpsc::unbounded_channel::<(String, Instant)>();
    let reader = tokio::spawn(async move {
        let mut buffer = String::new();
        while let Ok(Some(chunk)) = stream.chunk().await {
            let now = Instant::now();
            buffer.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = buffer.find("\n\n") {
                let block: String = buffer.drain(..end + 2).collect();
                if block.contains("event: CommentUpdated")
                    && let Some(data) = block.lines().find_map(|l| l.strip_prefix("data:"))
                    && let Ok(comment) = serde_json::from_str::<Value>(data.trim())
                    && comment["status"] == "approved"
                {
                    let _ = tx.send((comment["id"].as_str().unwrap_or_default().to_owned(), now));
                }
            }
        }
    });
    let mut lags = Vec::with_capacity(samples);
    for i in 0..samples {
        let started = Instant::now();
        let list: Vec<Value> = http
            .post(format!("{gateway}/posts/{post_id}/comments"))
            .json(&json!({ "content": format!("lag sample {i}") }))
            .send()
            .await?
            .json()
            .await?;
        let id = list.last().and_then(|c| c["id"].as_str()).ok_or("comment id")?.to_owned();
        loop {
            let (seen, at) = tokio::time::timeout(Duration::from_secs(30), approved.recv()).await?.ok_or("stream ended")?;
            if seen == id {
                lags.push(at - started);
                break;
            }
        }
    }
    reader.abort();
    lags.sort();
    Ok(lags)
}
