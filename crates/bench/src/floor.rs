//! This machine's floor for the consistency lag: the comment's path with
//! nothing on it but what the design and its durability promise require.
//!
//! Four processes stand for comments, the bus, moderation and query, each an
//! axum server (the services' HTTP stack and client) with its own SQLite
//! database in WAL mode and the async workers the suite gives that service.
//! A comment goes through the same seven steps, one after another, as in the
//! suite: comments commits it durably, the bus appends `CommentCreated`
//! durably, moderation applies it (relaxed), the bus appends
//! `CommentModerated` durably, comments applies it (relaxed), the bus appends
//! `CommentUpdated` durably, query applies it (relaxed). Each step is one
//! `INSERT` and its commit, then one HTTP `POST` of the event (about 250
//! bytes of JSON) to the next step, sent while the step answers its caller,
//! as the relays and the deliverers do. Nothing else: no event parsing beyond JSON, no inbox or
//! outbox tables, no cursors, no routing, no gateway, no tracing, no
//! metrics, and query's view is a counter.
//!
//! Measured like the suite's lag: from the comment's `POST` until query shows
//! it, by a request held open until query has it (as query's stream) and by
//! polling a `GET` every millisecond (as the original's method; the answer is
//! a few bytes, where the suite's view is the whole post).

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    Router,
    body::Bytes,
    extract::{Path as UrlPath, State},
    routing::{get, post},
};
use blog_domain::Service;
use blog_kit::{http::client::client_builder, ports::free_port};
use rusqlite::Connection;
use tokio::sync::watch;

use crate::Error;

/// The roles, in the order of their ports on every role's command line.
const ROLES: [Service; 4] = [Service::Comments, Service::EventBus, Service::Moderation, Service::Query];
/// The chain: which role takes each step, and whether its commit is durable.
const STEPS: [(usize, bool); 7] = [(0, true), (1, true), (2, false), (1, true), (0, false), (1, true), (3, false)];
/// Commits at start, with no fsync, that grow each write-ahead log to its
/// working size, as the services' stores preallocate theirs.
const WARM_COMMITS: usize = 1_100;

struct Role {
    db: Mutex<Connection>,
    http: reqwest::Client,
    ports: Vec<u16>,
    /// The last sample query has (query's role only).
    seen: watch::Sender<u64>,
}

/// `blog-bench floor-role INDEX DIR PORT...`: one role of the chain, on
/// `PORT[INDEX]`, with its database in `DIR`.
pub(crate) fn role(index: usize, dir: &Path, ports: Vec<u16>) -> Result<(), Error> {
    let db = Connection::open(dir.join(format!("{}.db", ROLES.get(index).ok_or("no such role")?.name())))?;
    db.execute_batch(
        "PRAGMA journal_mode = WAL;
         PRAGMA synchronous = OFF;
         CREATE TABLE IF NOT EXISTS event (seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, data TEXT NOT NULL);
         CREATE TABLE IF NOT EXISTS filler (data TEXT);",
    )?;
    for _ in 0..WARM_COMMITS {
        db.execute("INSERT INTO filler VALUES (?1)", [&"x".repeat(64)])?;
    }
    db.execute_batch("DELETE FROM filler; PRAGMA wal_checkpoint(PASSIVE);")?;
    let port = *ports.get(index).ok_or("a port for every role")?;
    let role = Arc::new(Role { db: Mutex::new(db), http: client_builder().build()?, ports, seen: watch::Sender::new(0) });
    tokio::runtime::Runtime::new()?.block_on(async move {
        let app = Router::new()
            .route("/step/{step}", post(step))
            .route("/seen", get(|State(role): State<Arc<Role>>| async move { role.seen.borrow().to_string() }))
            .route("/wait/{n}", get(wait))
            .with_state(role);
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
        blog_kit::http::serve::serve(listener, app, blog_kit::Shutdown::new(std::future::pending())).await?;
        Ok(())
    })
}

/// Commits the event (`body`), hands it to the next step and answers.
async fn step(State(role): State<Arc<Role>>, UrlPath(step): UrlPath<usize>, body: Bytes) -> Result<&'static str, String> {
    let event: serde_json::Value = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
    let id = format!("{}-{step}", event["id"].as_str().unwrap_or_default());
    let durable = STEPS.get(step).ok_or("no such step")?.1;
    {
        let db = role.db.lock().unwrap_or_else(|p| p.into_inner());
        db.execute_batch(if durable { "PRAGMA synchronous = FULL; BEGIN" } else { "PRAGMA synchronous = NORMAL; BEGIN" })
            .map_err(|e| e.to_string())?;
        db.execute("INSERT INTO event (id, data) VALUES (?1, ?2)", [&id, &String::from_utf8_lossy(&body).into_owned()])
            .map_err(|e| e.to_string())?;
        db.execute_batch("COMMIT").map_err(|e| e.to_string())?;
    }
    match STEPS.get(step + 1) {
        Some(&(next, _)) => {
            let url = format!("http://127.0.0.1:{}/step/{}", role.ports[next], step + 1);
            let http = role.http.clone();
            tokio::spawn(async move {
                if let Ok(answer) = http.post(url).header("content-type", "application/json").body(body).send().await {
                    let _ = answer.bytes().await;
                }
            });
        }
        None => {
            let n = event["n"].as_u64().unwrap_or(0);
            role.seen.send_modify(|seen| *seen = (*seen).max(n));
        }
    }
    Ok("{}")
}

/// Answers once query has sample `n`: the stream's view of the chain.
async fn wait(State(role): State<Arc<Role>>, UrlPath(n): UrlPath<u64>) -> &'static str {
    let _ = role.seen.subscribe().wait_for(|seen| *seen >= n).await;
    "{}"
}

/// The chain's processes; killed when dropped.
struct Chain(Vec<Child>);

impl Drop for Chain {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Starts the chain, measures `samples` comments through it each way and
/// prints both beside the suite's figures.
pub(crate) async fn measure(samples: usize) -> Result<(), Error> {
    let dir = tempfile::tempdir()?;
    let ports: Vec<u16> = ROLES.iter().map(|_| free_port()).collect();
    let me = std::env::current_exe()?;
    let chain = Chain(
        ROLES
            .iter()
            .enumerate()
            .map(|(index, &service)| {
                let mut command = Command::new(&me);
                // The async workers the suite gives the service.
                if let Some(workers) = blog_local::async_workers(service, std::env::var("TOKIO_WORKER_THREADS").ok()) {
                    command.env("TOKIO_WORKER_THREADS", workers);
                }
                command
                    .arg("floor-role")
                    .arg(index.to_string())
                    .arg(dir.path())
                    .args(ports.iter().map(u16::to_string))
                    .stdout(Stdio::null())
                    .spawn()
            })
            .collect::<Result<_, _>>()?,
    );
    let http = client_builder().build()?;
    let url = |role: usize, path: &str| format!("http://127.0.0.1:{}{path}", ports[role]);
    let deadline = Instant::now() + Duration::from_secs(30);
    for role in 0..ROLES.len() {
        while http.get(url(role, "/seen")).send().await.is_err() {
            if Instant::now() > deadline {
                return Err("the floor's chain did not start".into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let filler = "x".repeat(160);
    let mut n = 0u64;
    let send = async |n: u64| -> Result<Instant, Error> {
        let started = Instant::now();
        let event = serde_json::json!({"id": format!("{n:032x}"), "type": "CommentCreated", "n": n, "data": {"content": filler}});
        http.post(url(0, "/step/0")).json(&event).send().await?.error_for_status()?;
        Ok(started)
    };
    // Warm-up: connections made, code paged in.
    for _ in 0..20 {
        n += 1;
        let waiting = tokio::spawn(http.get(url(3, &format!("/wait/{n}"))).send());
        send(n).await?;
        waiting.await??;
    }
    let mut streamed = Vec::with_capacity(samples);
    for _ in 0..samples {
        n += 1;
        // Open before the comment is sent, as a stream is.
        let waiting = tokio::spawn(http.get(url(3, &format!("/wait/{n}"))).send());
        tokio::task::yield_now().await;
        let started = send(n).await?;
        waiting.await??;
        streamed.push(started.elapsed());
    }
    let mut polled = Vec::with_capacity(samples);
    for _ in 0..samples {
        n += 1;
        let started = send(n).await?;
        let mut every_ms = tokio::time::interval(Duration::from_millis(1));
        loop {
            every_ms.tick().await;
            let seen: u64 = http.get(url(3, "/seen")).send().await?.text().await?.parse()?;
            if seen >= n {
                polled.push(started.elapsed());
                break;
            }
            if started.elapsed() > Duration::from_secs(10) {
                return Err(format!("sample {n} did not reach the end of the floor's chain").into());
            }
        }
    }
    drop(chain);
    streamed.sort();
    polled.sort();
    println!(
        "this machine's floor for that lag: the same 7 steps, 4 processes, nothing but each step's SQLite commit (4 fsynced) and HTTP hand-off:"
    );
    crate::print_lag("  floor, polling a GET every 1 ms:                  ", &polled);
    crate::print_lag("  floor, answered when query has it (as a stream):", &streamed);
    Ok(())
}
