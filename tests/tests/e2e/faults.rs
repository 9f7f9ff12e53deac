//! Fault injection against the real binaries: kills, stops, hangs, failing
//! subscribers, duplicated and reordered deliveries. After each fault the
//! suite must converge to exactly what was accepted: every accepted post and
//! comment in query once, with its final moderation status; comments and
//! query agreeing; no duplicate event ids in the bus's log.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use axum::{Router, extract::State, http::StatusCode, routing::post};
use blog_domain::Service;
use blog_tests::{
    DEADLINE, Mode, Signal, TestSuite,
    load::{self, LoadReport, Progress},
};
use serde_json::{Value, json};

/// Starts a load run in the background.
fn start_load(suite: &TestSuite, tag: &str, workers: usize, rounds: usize) -> (tokio::task::JoinHandle<LoadReport>, Progress) {
    let progress = Progress::default();
    let task = tokio::spawn(load::run(suite.http.clone(), suite.gateway.clone(), tag.to_owned(), workers, rounds, progress.clone()));
    (task, progress)
}

/// Waits until the load has had at least `n` writes accepted.
async fn after_writes(suite: &TestSuite, progress: &Progress, n: usize) {
    suite.eventually(&format!("{n} accepted writes"), || async { (progress.load(Ordering::Relaxed) >= n).then_some(()) }).await;
}

fn report_counts(name: &str, report: &LoadReport, counts: (usize, usize, usize)) {
    println!(
        "{name}: accepted {} posts + {} comments ({} requests failed during the fault); converged to {} posts, {} comments, {} events, no duplicates",
        report.posts.len(),
        report.comments.len(),
        report.failures,
        counts.0,
        counts.1,
        counts.2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_bus_mid_burst_loses_nothing() {
    let suite = TestSuite::launch().await;
    let (load, progress) = start_load(&suite, "bus-kill", 6, 12);
    after_writes(&suite, &progress, 40).await;
    suite.kill(Service::EventBus, Signal::KILL).await;
    after_writes(&suite, &progress, 120).await;
    suite.kill(Service::EventBus, Signal::KILL).await;
    let report = load.await.expect("load");
    // Writers never depend on the bus: every request was accepted.
    assert_eq!(report.failures, 0);
    assert_eq!(report.posts.len(), 6 * 12);
    let counts = suite.assert_converged(&report).await;
    report_counts("bus kill -9 twice mid-burst", &report, counts);
    suite.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_consumer_catches_up_under_load() {
    let suite = TestSuite::launch().await;
    let mut report = LoadReport::default();
    for consumer in [Service::Query, Service::Moderation] {
        let (load, progress) = start_load(&suite, consumer.name(), 4, 8);
        after_writes(&suite, &progress, 15).await;
        suite.stop(consumer).await;
        after_writes(&suite, &progress, 60).await;
        suite.restart(consumer).await;
        let round = load.await.expect("load");
        assert_eq!(round.failures, 0, "{consumer} being down must not fail writes");
        report.merge(round);
        let counts = suite.assert_converged(&report).await;
        report_counts(&format!("{consumer} stopped under load"), &report, counts);
    }
    suite.shutdown().await;
}

/// Comments learns of posts from the bus's pushes. When they do not come
/// (here the bus pushes to a port where nothing listens, as it backs off
/// from a subscriber after an outage), a comment waiting for its post asks
/// the bus for what comments missed and is accepted within its wait, post
/// after post: with one process per service, and scaled out (every comments
/// replica asks through its own inbox; the bus's replicas on JetStream).
async fn comments_on_posts_the_bus_never_pushed(mode: Mode) {
    let nowhere = blog_tests::free_port();
    let suite = TestSuite::launch_with_in(mode, |options| {
        let subscribers = [
            format!("{}=http://127.0.0.1:{nowhere}/events", Service::Comments.name()),
            format!("{}={}/events", Service::Moderation.name(), options.url(Service::Moderation)),
            format!("{}={}/events", Service::Query.name(), options.url(Service::Query)),
        ];
        options.env.push((Service::EventBus, "SUBSCRIBERS".into(), subscribers.join(",")));
    })
    .await;
    for n in 0..4 {
        let post = suite.create_post(&format!("never pushed to comments {n}")).await;
        let listed = suite.comment(&post.id, "asked for").await;
        assert_eq!(listed.len(), 1, "{listed:?}");
    }
    suite.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_comment_waiting_for_a_post_the_bus_never_pushed_asks_the_bus_for_it() {
    comments_on_posts_the_bus_never_pushed(Mode::Single).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaled_out_a_comment_waiting_for_a_post_the_bus_never_pushed_asks_the_bus_for_it() {
    let Some(mode) = Mode::scaled(2) else { return };
    comments_on_posts_the_bus_never_pushed(mode).await;
}

/// A comment's 404 is the bus's word: with the bus up, a post that never
/// existed is a 404 after the wait; with the bus down comments cannot tell,
/// and says so with a 503 to retry, never a 404 for a post that may exist.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_comment_on_an_unknown_post_is_a_404_only_when_the_bus_could_say_so() {
    let suite = TestSuite::launch_with(|options| {
        options.env.push((Service::Comments, "POST_WAIT_MS".into(), "1000".into()));
    })
    .await;
    let comment = json!({ "content": "on a post nobody made" });
    let answer = suite.post_json("/posts/nobody-made-this/comments", &comment).await;
    assert_eq!(answer.status, 404, "{:?}", answer.body);
    suite.stop(Service::EventBus).await;
    let answer = suite.post_json("/posts/nobody-made-this/comments", &comment).await;
    assert_eq!(answer.status, 503, "the bus is down: {:?}", answer.body);
    assert!(answer.content_type.starts_with("application/json") && answer.body["error"].is_string(), "{answer:?}");
    assert_eq!(answer.headers["retry-after"], "1");
    suite.restart(Service::EventBus).await;
    let post = suite.create_post("after the bus is back").await;
    assert_eq!(suite.comment(&post.id, "and a comment").await.len(), 1);
    suite.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_killed_right_after_answering_still_publishes() {
    let suite = TestSuite::launch().await;
    let post = suite.create_post("before").await;
    // A read never waits for a post comments does not know yet (404 at once).
    let known = format!("/posts/{}/comments", post.id);
    suite.eventually("comments to know the post", || async { (suite.get(&known).await.status == 200).then_some(()) }).await;

    // With the bus away the events can only be in the publishers' outboxes
    // when the publishers die.
    suite.stop(Service::EventBus).await;
    let orphan = suite.create_post("accepted, then posts died").await;
    let comment = suite.comment(&post.id, "accepted, then comments died").await.remove(0);
    suite.kill(Service::Posts, Signal::KILL).await;
    suite.kill(Service::Comments, Signal::KILL).await;
    suite.restart(Service::EventBus).await;

    suite.eventually("the orphaned post in query", || async { suite.view().await.contains_key(&orphan.id).then_some(()) }).await;
    suite.wait_for_status(&post.id, &comment.id, "approved").await;
    let mut report = LoadReport::default();
    report.posts = vec![post.clone(), orphan];
    report.comments = vec![(post.id.clone(), comment)];
    report.attempted_titles = report.posts.iter().map(|p| p.title.clone()).collect();
    report.attempted_contents = report.comments.iter().map(|(_, c)| c.content.clone()).collect();
    let counts = suite.assert_converged(&report).await;
    report_counts("publishers kill -9 after 201", &report, counts);
    suite.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_everything_at_once_twice_under_load() {
    let suite = TestSuite::launch().await;
    let (load, progress) = start_load(&suite, "all", 4, 15);
    for round in 1..=2 {
        after_writes(&suite, &progress, 40 * round).await;
        let names: Vec<_> = Service::ALL.iter().map(|s| s.name()).collect();
        let old: Vec<_> = names.iter().map(|n| suite.suite().supervisor.pid(n)).collect();
        for name in &names {
            suite.suite().supervisor.signal(name, Signal::KILL);
        }
        for (name, old) in names.iter().zip(old) {
            assert!(suite.suite().supervisor.wait_restarted(name, old, DEADLINE).await, "{name} restarted");
        }
        for service in Service::ALL {
            suite.wait_ready(service).await;
        }
    }
    let report = load.await.expect("load");
    let counts = suite.assert_converged(&report).await;
    report_counts("every process kill -9 at once, twice", &report, counts);
    suite.shutdown().await;
}

/// A subscriber of our own that fails (500) or hangs on demand and records
/// the sequence numbers it acknowledged.
#[derive(Clone, Default)]
struct Flaky {
    failing: Arc<AtomicBool>,
    hanging: Arc<AtomicBool>,
    acknowledged: Arc<Mutex<Vec<u64>>>,
}

async fn flaky_events(State(flaky): State<Flaky>, body: axum::Json<Value>) -> StatusCode {
    if flaky.hanging.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_secs(3)).await;
        return StatusCode::OK;
    }
    if flaky.failing.load(Ordering::SeqCst) {
        return StatusCode::INTERNAL_SERVER_ERROR;
    }
    let events = match body.0 {
        Value::Array(events) => events,
        single => vec![single],
    };
    flaky.acknowledged.lock().unwrap().extend(events.iter().filter_map(|e| e["seq"].as_u64()));
    StatusCode::OK
}

/// The bus's standard subscribers plus `name` at `url`.
fn add_subscriber(options: &mut blog_local::Options, name: &str, url: &str) {
    let subscribers = [Service::Comments, Service::Moderation, Service::Query]
        .iter()
        .map(|s| format!("{}={}/events", s.name(), options.url(*s)))
        .chain([format!("{name}={url}")])
        .collect::<Vec<_>>()
        .join(",");
    options.env.push((Service::EventBus, "SUBSCRIBERS".into(), subscribers));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_or_hanging_subscriber_holds_back_nobody_and_catches_up() {
    let flaky = Flaky::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let flaky_url = format!("http://{}/events", listener.local_addr().unwrap());
    tokio::spawn(axum::serve(listener, Router::new().route("/events", post(flaky_events)).with_state(flaky.clone())).into_future());

    let suite = TestSuite::launch_with(|options| {
        add_subscriber(options, "flaky", &flaky_url);
        options.env.push((Service::EventBus, "DELIVERY_TIMEOUT_MS".into(), "500".into()));
    })
    .await;

    flaky.failing.store(true, Ordering::SeqCst);
    let (load, _) = start_load(&suite, "flaky-500", 3, 5);
    let first = load.await.expect("load");
    // The others kept receiving while flaky answered 500.
    let counts = suite.assert_converged(&first).await;
    report_counts("a subscriber answering 500", &first, counts);
    assert!(flaky.acknowledged.lock().unwrap().is_empty());

    flaky.failing.store(false, Ordering::SeqCst);
    flaky.hanging.store(true, Ordering::SeqCst);
    let (load, _) = start_load(&suite, "flaky-hang", 3, 5);
    let mut report = first.clone();
    report.merge(load.await.expect("load"));
    let counts = suite.assert_converged(&report).await;
    report_counts("a subscriber hanging", &report, counts);

    // Query itself frozen (SIGSTOP): comments and moderation carry on.
    suite.kill(Service::Query, Signal::STOP).await;
    let frozen = suite.create_post("while query is frozen").await;
    let comment = suite.comment(&frozen.id, "decided anyway").await.remove(0);
    suite
        .eventually("comments to record the decision", || async {
            (suite.comments(&frozen.id).await[0].status == "approved").then_some(())
        })
        .await;
    suite.kill(Service::Query, Signal::CONT).await;
    suite.wait_for_status(&frozen.id, &comment.id, "approved").await;

    // Recovered, flaky receives the whole log, in order, from the first event.
    flaky.hanging.store(false, Ordering::SeqCst);
    let head = suite.bus_events().await.len() as u64;
    let seen = suite
        .eventually("flaky to catch up", || async {
            let acknowledged = flaky.acknowledged.lock().unwrap().clone();
            (acknowledged.last() == Some(&head)).then_some(acknowledged)
        })
        .await;
    let mut first_seen = seen.clone();
    first_seen.dedup();
    assert_eq!(first_seen, (1..=head).collect::<Vec<_>>(), "per-subscriber order without gaps");
    let flaky_status = suite
        .eventually("the bus to see flaky caught up", || async {
            let status = suite.send(suite.http.get(format!("{}/status", suite.url(Service::EventBus)))).await.body;
            let flaky = status["subscribers"].as_array()?.iter().find(|s| s["name"] == "flaky").cloned()?;
            (flaky["lag"] == 0).then_some(flaky)
        })
        .await;
    assert!(flaky_status["retries"].as_u64().unwrap() > 0, "{flaky_status}");
    println!("flaky subscriber recovered: {} events in order after {} retries", head, flaky_status["retries"]);
    suite.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicated_and_reordered_deliveries_apply_once() {
    let suite = TestSuite::launch().await;
    let post = suite.create_post("dup").await;
    let comment = suite.comment(&post.id, "said once").await.remove(0);
    suite.wait_for_status(&post.id, &comment.id, "approved").await;
    let log = suite.bus_events().await;
    assert_eq!(log.len(), 4);

    // Every event again, three times, to every consumer, singly and as a batch.
    for consumer in [Service::Comments, Service::Moderation, Service::Query] {
        for event in &log {
            let answer = suite.post_events(consumer, event).await;
            assert_eq!(answer.status, 200, "{consumer}: {:?}", answer.body);
            assert_eq!(answer.body["applied"], 0, "{consumer} applied a duplicate: {:?}", answer.body);
        }
        let answer = suite.post_events(consumer, &Value::Array(log.iter().rev().cloned().collect())).await;
        assert_eq!(answer.body["applied"], 0, "{consumer}: {:?}", answer.body);
    }

    // A CommentUpdated that overtakes its CommentCreated is not lost.
    let data = |status: &str| json!({"id": "c-ooo", "postId": post.id, "content": "out of order", "status": status});
    suite.post_events(Service::Query, &json!({"id": "e-upd", "type": "CommentUpdated", "data": data("approved")})).await;
    suite.post_events(Service::Query, &json!({"id": "e-new", "type": "CommentCreated", "data": data("pending")})).await;
    suite.post_events(Service::Query, &json!({"id": "e-new", "type": "CommentCreated", "data": data("pending")})).await;
    suite.wait_for_status(&post.id, "c-ooo", "approved").await;

    // Nothing was published twice as a result.
    let after = suite.bus_events().await;
    assert_eq!(after.len(), 4, "no extra events: {after:?}");
    let view = suite.view().await;
    assert_eq!(view[&post.id].comments.len(), 2);
    assert_eq!(suite.comments(&post.id).await.len(), 1);
    println!("duplicates x4 to 3 consumers and a reordered pair: 0 re-applied, log still 4 events");
    suite.shutdown().await;
}

/// A peer at the wrong address, then the right one: a server of the test's
/// own that first answers like something that is not our bus or inbox would
/// (404 and 405 HTML pages, alternately), then, switched, forwards to `target`
/// (the real bus) or acknowledges and records what it got.
#[derive(Clone, Default)]
struct WrongThenRight {
    right: Arc<AtomicBool>,
    target: Arc<Mutex<Option<String>>>,
    acknowledged: Arc<Mutex<Vec<u64>>>,
    wrong_answers: Arc<std::sync::atomic::AtomicUsize>,
}

impl WrongThenRight {
    /// Serves on 127.0.0.1; returns its base URL.
    async fn start(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(axum::serve(listener, Router::new().fallback(wrong_then_right).with_state(self.clone())).into_future());
        url
    }
}

async fn wrong_then_right(State(peer): State<WrongThenRight>, request: axum::extract::Request) -> axum::response::Response {
    use axum::response::IntoResponse;
    if !peer.right.load(Ordering::SeqCst) {
        let n = peer.wrong_answers.fetch_add(1, Ordering::SeqCst);
        let status = if n % 2 == 0 { StatusCode::NOT_FOUND } else { StatusCode::METHOD_NOT_ALLOWED };
        return (status, [("content-type", "text/html")], "<html><body><h1>Not here</h1></body></html>").into_response();
    }
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX).await.unwrap();
    let target = peer.target.lock().unwrap().clone();
    let Some(target) = target else {
        let events: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let events = match events {
            Value::Array(events) => events,
            single => vec![single],
        };
        peer.acknowledged.lock().unwrap().extend(events.iter().filter_map(|e| e["seq"].as_u64()));
        return axum::Json(json!({})).into_response();
    };
    // Forward as a relay would have sent it to the right address.
    let mut forward = reqwest::Client::new().request(parts.method, format!("{target}{}", parts.uri));
    for name in ["authorization", "content-type"] {
        if let Some(value) = parts.headers.get(name) {
            forward = forward.header(name, value);
        }
    }
    let answer = forward.body(body).send().await.unwrap();
    let mut response = axum::response::Response::builder().status(answer.status().as_u16());
    for (name, value) in answer.headers() {
        response = response.header(name.as_str(), value.as_bytes());
    }
    response.body(axum::body::Body::from(answer.bytes().await.unwrap())).unwrap()
}

/// The value of an unlabelled counter in `service`'s `/metrics`.
async fn metric(suite: &TestSuite, service: Service, name: &str) -> u64 {
    let text = suite.http.get(format!("{}/metrics", suite.url(service))).send().await.unwrap().text().await.unwrap();
    text.lines().find_map(|line| line.strip_prefix(&format!("{name} "))).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_pointed_at_the_wrong_url_loses_nothing_once_pointed_right() {
    let peer = WrongThenRight::default();
    let wrong_url = peer.start().await;
    let suite = TestSuite::launch_with(|options| {
        *peer.target.lock().unwrap() = Some(options.url(Service::EventBus));
        options.env.push((Service::Posts, "EVENT_BUS_URL".into(), wrong_url.clone()));
    })
    .await;

    let mut posts = Vec::new();
    for i in 0..5 {
        posts.push(suite.create_post(&format!("misrouted {i}")).await.id);
    }
    // Answered 404 and 405 a few times (more than the 5 events, so a relay
    // that parked each refused event would have parked them all by now).
    suite.eventually("the relay to be answered 6 times", || async { (peer.wrong_answers.load(Ordering::SeqCst) >= 6).then_some(()) }).await;
    assert!(suite.bus_events().await.is_empty());

    peer.right.store(true, Ordering::SeqCst);
    let view = suite.eventually("all 5 posts in query", || async { Some(suite.view().await).filter(|v| v.len() == 5) }).await;
    assert!(posts.iter().all(|id| view.contains_key(id)));
    assert_eq!(suite.bus_events().await.len(), 5);
    // Every wrong answer was counted for the alert.
    let wrong = peer.wrong_answers.load(Ordering::SeqCst) as u64;
    assert_eq!(metric(&suite, Service::Posts, "blog_outbox_misdirected_total").await, wrong);
    println!("relay at a wrong URL: {wrong} 404/405 answers retried and counted, then all 5 posts published");
    suite.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_answering_404_is_retried_not_skipped() {
    let peer = WrongThenRight::default();
    let peer_url = peer.start().await;
    let suite = TestSuite::launch_with(|options| add_subscriber(options, "elsewhere", &format!("{peer_url}/events"))).await;

    let post = suite.create_post("for everyone").await;
    let comment = suite.comment(&post.id, "hello").await.remove(0);
    suite.wait_for_status(&post.id, &comment.id, "approved").await;
    suite
        .eventually("the subscriber to be tried 6 times", || async { (peer.wrong_answers.load(Ordering::SeqCst) >= 6).then_some(()) })
        .await;
    let status = suite.send(suite.http.get(format!("{}/status", suite.url(Service::EventBus)))).await.body;
    let status = status["subscribers"].as_array().unwrap().iter().find(|s| s["name"] == "elsewhere").cloned().unwrap();
    assert_eq!(status["rejected"], 0, "nothing skipped: {status}");
    assert_eq!(status["cursor"], 0, "nothing skipped: {status}");
    assert!(status["misdirected"].as_u64().unwrap() >= 6, "counted for the alert: {status}");
    assert!(peer.acknowledged.lock().unwrap().is_empty());

    peer.right.store(true, Ordering::SeqCst);
    let head = suite.bus_events().await.len() as u64;
    assert_eq!(head, 4);
    let seen = suite
        .eventually("the subscriber to get every event", || async {
            let acknowledged = peer.acknowledged.lock().unwrap().clone();
            (acknowledged.last() == Some(&head)).then_some(acknowledged)
        })
        .await;
    assert_eq!(seen, (1..=head).collect::<Vec<_>>());
    println!("subscriber answering 404/405: {} misdirected answers retried, then all {head} events in order", status["misdirected"]);
    suite.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_set_aside_are_re_driven_when_the_publisher_starts() {
    let suite = TestSuite::launch().await;
    suite.stop(Service::Posts).await;
    // As an earlier bus that did not know the event would have left it: parked.
    let parked = json!({"id": "parked-1", "type": "PostCreated", "data": {"id": "p-parked", "title": "parked"}});
    let store = blog_kit::store::Store::open(&suite.dir.path().join("data").join("posts"), "posts", &[]).unwrap();
    store
        .write(move |tx| tx.execute("INSERT INTO outbox_refused (pos, event, error) VALUES (1, $1, 'refused')", &[&parked.to_string()]))
        .await
        .unwrap();
    drop(store);

    suite.restart(Service::Posts).await;
    suite.eventually("the re-driven post in query", || async { suite.view().await.contains_key("p-parked").then_some(()) }).await;
    let log = suite.bus_events().await;
    assert_eq!(log.len(), 1);
    assert_eq!(log[0]["id"], "parked-1");
    println!("1 parked event re-driven on start and published");
    suite.shutdown().await;
}

/// Whether process `pid` has ended (gone, or a zombie its new parent has not
/// reaped: a container's first process may never reap).
fn ended(pid: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_or(true, |stat| stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')))
}

/// A service the local launcher started stops by itself, within seconds,
/// once the launcher died without stopping it (`kill -9`, a closed
/// terminal), rather than run on unsupervised, holding its port and its
/// database and answering for the next launch's processes.
#[test]
fn a_service_whose_supervisor_died_stops_by_itself() {
    let data = tempfile::tempdir().unwrap();
    let log = data.path().join("service.log");
    let program = blog_tests::binaries().join(Service::Moderation.name());
    // A stand-in supervisor: a shell that starts the service, says its pid and waits.
    let script = format!("{}=$$ \"$0\" > \"$1\" 2>&1 & echo $!; wait", blog_kit::shutdown::SUPERVISOR_ENV);
    let mut supervisor = std::process::Command::new("sh")
        .args(["-c", &script, program.to_str().unwrap(), log.to_str().unwrap()])
        .env("PORT", "0")
        .env("DATA_DIR", data.path())
        .env("INTERNAL_SECRET", "0123456789abcdef0123")
        .env("NO_COLOR", "1")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("sh runs");
    let mut pid = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(supervisor.stdout.take().unwrap()), &mut pid).unwrap();
    let pid = pid.trim().to_owned();
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let deadline = std::time::Instant::now() + DEADLINE;
    while !read_log().contains("starting") {
        assert!(std::time::Instant::now() < deadline && !ended(&pid), "the service did not start: {}", read_log());
        std::thread::sleep(Duration::from_millis(20));
    }
    supervisor.kill().expect("kill -9 the supervisor");
    supervisor.wait().expect("reaped");
    let deadline = std::time::Instant::now() + DEADLINE;
    while !ended(&pid) {
        if std::time::Instant::now() > deadline {
            let _ = std::process::Command::new("kill").args(["-9", &pid]).status();
            panic!("the service ran on without its supervisor: {}", read_log());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let text = read_log();
    assert!(text.contains("the supervisor that started this process is gone"), "{text}");
    assert!(text.contains("stopped"), "it stopped as on SIGTERM, draining: {text}");
}

/// A launch onto a port something holds already (another suite, or what a
/// killed launcher left running) fails at once and names the port, rather
/// than report the suite up while one of its processes cannot start and the
/// other answers for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_launch_onto_a_taken_port_fails_and_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let log = blog_local::supervisor::LogSink::Dir(dir.path().to_owned());
    let mut options = blog_local::Options::standard(blog_tests::binaries(), dir.path().join("data"), 0, log);
    options.ports = Service::ALL.iter().map(|s| (*s, blog_tests::free_port())).collect();
    let taken = blog_kit::ports::free_listener();
    let port = taken.local_addr().unwrap().port();
    options.ports.insert(Service::Query, port);
    let Err(error) = blog_local::Suite::launch(options).await else { panic!("launched with query's port {port} taken") };
    let message = error.to_string();
    assert!(message.contains(&format!("port {port}")) && message.contains("query"), "{message}");
    assert!(!dir.path().join("data").join("posts").exists(), "nothing ran: {message}");
}
