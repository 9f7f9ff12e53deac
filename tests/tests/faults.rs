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
use blog_common::Service;
use blog_tests::{
    DEADLINE, Signal, TestSuite,
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_or_hanging_subscriber_holds_back_nobody_and_catches_up() {
    let flaky = Flaky::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let flaky_url = format!("http://{}/events", listener.local_addr().unwrap());
    tokio::spawn(axum::serve(listener, Router::new().route("/events", post(flaky_events)).with_state(flaky.clone())).into_future());

    let suite = TestSuite::launch_with(|options| {
        let subscribers = [Service::Comments, Service::Moderation, Service::Query]
            .iter()
            .map(|s| format!("{}={}/events", s.name(), options.url(*s)))
            .chain([format!("flaky={flaky_url}")])
            .collect::<Vec<_>>()
            .join(",");
        options.env.push((Service::EventBus, "SUBSCRIBERS".into(), subscribers));
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
        let url = format!("{}/events", suite.url(consumer));
        for event in &log {
            let answer = suite.send(suite.http.post(&url).json(event)).await;
            assert_eq!(answer.status, 200, "{consumer}: {:?}", answer.body);
            assert_eq!(answer.body["applied"], 0, "{consumer} applied a duplicate: {:?}", answer.body);
        }
        let answer = suite.send(suite.http.post(&url).json(&Value::Array(log.iter().rev().cloned().collect()))).await;
        assert_eq!(answer.body["applied"], 0, "{consumer}: {:?}", answer.body);
    }

    // A CommentUpdated that overtakes its CommentCreated is not lost.
    let data = |status: &str| json!({"id": "c-ooo", "postId": post.id, "content": "out of order", "status": status});
    let query = format!("{}/events", suite.url(Service::Query));
    suite.send(suite.http.post(&query).json(&json!({"id": "e-upd", "type": "CommentUpdated", "data": data("approved")}))).await;
    suite.send(suite.http.post(&query).json(&json!({"id": "e-new", "type": "CommentCreated", "data": data("pending")}))).await;
    suite.send(suite.http.post(&query).json(&json!({"id": "e-new", "type": "CommentCreated", "data": data("pending")}))).await;
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
