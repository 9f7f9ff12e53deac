//! Data survives restarts, and a consumer that was down catches up by replay,
//! even when pushes from the bus run ahead of its catch-up.

use std::sync::atomic::Ordering;

use blog_domain::Service;
use blog_tests::{
    Signal, TestSuite,
    load::{self, Progress},
};
use serde_json::json;

/// How many times `service`'s log says `text` so far.
fn log_count(suite: &TestSuite, service: Service, text: &str) -> usize {
    std::fs::read_to_string(suite.dir.path().join(format!("{}.log", service.name()))).unwrap_or_default().matches(text).count()
}

/// Removes `service`'s database files (the WAL and shared-memory files too).
fn delete_database(suite: &TestSuite, service: Service) {
    let dir = suite.dir.path().join("data").join(service.name());
    for suffix in ["", "-wal", "-shm"] {
        let path = dir.join(format!("{}.db{suffix}", service.name()));
        if path.exists() {
            std::fs::remove_file(&path).expect("database file removed");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_query_catches_up_when_it_starts_again() {
    let suite = TestSuite::launch().await;
    let before = suite.create_post("before").await;
    suite.eventually("the first post in query", || async { suite.view().await.contains_key(&before.id).then_some(()) }).await;

    suite.stop(Service::Query).await;
    let during = suite.create_post("while query was down").await;
    let comment = suite.comment(&during.id, "missed by query").await.remove(0);
    // Moderation and comments still do their part while query is down.
    suite
        .eventually("comments to record the decision", || async {
            (suite.comments(&during.id).await[0].status == "approved").then_some(())
        })
        .await;

    suite.restart(Service::Query).await;
    suite.wait_for_status(&during.id, &comment.id, "approved").await;
    let view = suite.view().await;
    assert_eq!(view.len(), 2);
    assert_eq!(view[&during.id].comments.len(), 1);
    suite.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_every_service_keeps_all_data() {
    let suite = TestSuite::launch().await;
    let post = suite.create_post("kept").await;
    let good = suite.comment(&post.id, "good").await.remove(0);
    let bad = suite.comment(&post.id, "orange").await.remove(1);
    suite.wait_for_status(&post.id, &bad.id, "rejected").await;
    suite.wait_for_status(&post.id, &good.id, "approved").await;
    let log_before = suite.bus_events().await.len();

    for service in Service::ALL {
        suite.stop(service).await;
    }
    for service in Service::ALL {
        suite.restart(service).await;
    }

    let view = suite.view().await;
    assert_eq!(view.len(), 1);
    let statuses: Vec<_> = view[&post.id].comments.iter().map(|c| c.status.as_str()).collect();
    assert_eq!(statuses, ["approved", "rejected"]);
    assert_eq!(suite.comments(&post.id).await.len(), 2);
    assert_eq!(suite.bus_events().await.len(), log_before);

    // And the suite keeps working after the restart.
    let late = suite.comment(&post.id, "after restart").await.remove(2);
    suite.wait_for_status(&post.id, &late.id, "approved").await;
    suite.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_query_view_can_be_rebuilt_from_the_bus_alone() {
    let suite = TestSuite::launch().await;
    let post = suite.create_post("rebuild me").await;
    let comment = suite.comment(&post.id, "still here").await.remove(0);
    suite.wait_for_status(&post.id, &comment.id, "approved").await;

    suite.stop(Service::Query).await;
    std::fs::remove_dir_all(suite.dir.path().join("data").join("query")).expect("query's data removed");
    suite.restart(Service::Query).await;

    suite.wait_for_status(&post.id, &comment.id, "approved").await;
    assert_eq!(suite.view().await.len(), 1);
    suite.shutdown().await;
}

/// The repro: a consumer restarted empty while the bus is paused gets
/// a push ahead of its catch-up; once the bus answers it must still replay
/// everything before that push.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_ahead_of_a_stalled_catch_up_leaves_no_gap() {
    let suite = TestSuite::launch().await;
    let mut posts = Vec::new();
    for i in 0..3 {
        posts.push(suite.create_post(&format!("before {i}")).await.id);
    }
    suite.eventually("3 posts in query", || async { (suite.view().await.len() == 3).then_some(()) }).await;
    let head = suite.bus_events().await.len() as u64;
    assert_eq!(head, 3);

    suite.kill(Service::EventBus, Signal::STOP).await;
    suite.kill(Service::Query, Signal::STOP).await;
    delete_database(&suite, Service::Query);
    let stalled_before = log_count(&suite, Service::Query, "cannot catch up with the bus yet");
    // The launcher restarts query with an empty database; its catch-up hangs on the frozen bus.
    suite.kill(Service::Query, Signal::KILL).await;

    let pushed = json!({"id": "pushed-ahead", "seq": head + 1, "type": "PostCreated", "data": {"id": "p-ahead", "title": "ahead"}});
    let answer = suite.post_events(Service::Query, &pushed).await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    assert_eq!(answer.body["applied"], 1);
    // At least one catch-up attempt fails after the push, so a retry that
    // re-read the cursor would now start after the pushed seq.
    suite
        .eventually("a catch-up attempt to fail after the push", || async {
            (log_count(&suite, Service::Query, "cannot catch up with the bus yet") > stalled_before).then_some(())
        })
        .await;
    assert_eq!(suite.view().await.len(), 1, "only the pushed post so far");

    suite.kill(Service::EventBus, Signal::CONT).await;
    let view = suite.eventually("all 4 posts in query", || async { Some(suite.view().await).filter(|v| v.len() == 4) }).await;
    for id in posts.iter().chain([&"p-ahead".to_owned()]) {
        assert!(view.contains_key(id), "{id} missing from {view:?}");
    }
    // And the next event the bus pushes lands too.
    let after = suite.create_post("after").await;
    suite.eventually("5 posts in query", || async { suite.view().await.contains_key(&after.id).then_some(()) }).await;
    assert_eq!(suite.view().await.len(), 5);
    println!("pushed seq {} ahead of a stalled catch-up: query ended with all {} posts", head + 1, 5);
    suite.shutdown().await;
}

/// Query rebuilt from nothing while posts and comments keep coming, with the
/// bus frozen across the restart so the first catch-up attempt fails: when the
/// bus resumes it pushes the newest events while the replay retries from the
/// start of the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuilding_query_from_empty_under_live_traffic_applies_every_event() {
    let suite = TestSuite::launch().await;
    let progress = Progress::default();
    let load = tokio::spawn(load::run(suite.http.clone(), suite.gateway.clone(), "rebuild".into(), 6, 20, progress.clone()));
    suite.eventually("some writes accepted", || async { (progress.load(Ordering::Relaxed) >= 30).then_some(()) }).await;

    suite.kill(Service::EventBus, Signal::STOP).await;
    suite.kill(Service::Query, Signal::STOP).await;
    delete_database(&suite, Service::Query);
    let stalled_before = log_count(&suite, Service::Query, "cannot catch up with the bus yet");
    suite.kill(Service::Query, Signal::KILL).await;
    suite
        .eventually("query's first catch-up attempt to fail", || async {
            (log_count(&suite, Service::Query, "cannot catch up with the bus yet") > stalled_before).then_some(())
        })
        .await;
    let at_rebuild = progress.load(Ordering::Relaxed);
    // More traffic from the moment the bus resumes, racing the replay.
    let more = tokio::spawn(load::run(suite.http.clone(), suite.gateway.clone(), "during".into(), 6, 10, progress.clone()));
    suite.kill(Service::EventBus, Signal::CONT).await;

    let mut report = load.await.expect("load");
    report.merge(more.await.expect("load"));
    // Comments on posts the frozen bus had not yet announced may time out
    // (404); every write that was accepted must show up.
    let (posts, comments, events) = suite.assert_converged(&report).await;
    println!(
        "query rebuilt from empty after {at_rebuild} writes, bus frozen across the restart, {} accepted ({} refused while frozen): {posts} posts, {comments} comments, {events} events, every one applied",
        report.posts.len() + report.comments.len(),
        report.failures
    );
    suite.shutdown().await;
}

/// The bus's database capped small (`DB_MAX_BYTES`, which fails exactly as a
/// full disk does): publishing answers 503 JSON, the bus is not ready, users'
/// writes still succeed (the outboxes hold the events), and once the bus runs
/// with room again every event arrives, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_bus_refuses_loudly_and_loses_nothing_once_it_has_room() {
    const CAP: &str = "98304";
    let suite = TestSuite::launch_with(|options| options.env.push((Service::EventBus, "DB_MAX_BYTES".into(), CAP.into()))).await;
    let bus = suite.url(Service::EventBus);
    let mut posts = Vec::new();
    let unready = loop {
        posts.push(suite.create_post(&format!("filling the log {}", posts.len())).await.id);
        let ready = suite.send(suite.http.get(format!("{bus}/readyz"))).await;
        if ready.status != 200 {
            break ready;
        }
        assert!(posts.len() < 2_000, "the bus never filled up");
    };
    assert_eq!(unready.status, 503, "{:?}", unready.body);
    assert!(unready.body["error"].is_string(), "{:?}", unready.body);
    let filled_at = posts.len();

    // A publish straight to the full bus (larger than any room left in a
    // page): a clear 503, never a 500.
    let event = json!({"id": "direct-full", "type": "PostLiked", "data": {"id": "x", "note": "x".repeat(64 * 1024)}});
    let refused = suite.post_events(Service::EventBus, &event).await;
    assert_eq!(refused.status, 503, "{:?}", refused.body);
    assert!(refused.body["error"].as_str().unwrap().contains("full"), "{:?}", refused.body);
    // Users are still answered 201: their events wait in the outboxes.
    for i in 0..5 {
        posts.push(suite.create_post(&format!("while full {i}")).await.id);
    }
    let stored = suite.bus_events().await.len();
    assert!(stored < posts.len(), "the cap held: {stored} stored of {}", posts.len());

    // Restarted with room (the cap raised): everything is delivered, once.
    suite.stop(Service::EventBus).await;
    let env: Vec<(String, String)> =
        suite.suite().options.env_for(Service::EventBus).into_iter().filter(|(name, _)| name != "DB_MAX_BYTES").collect();
    let mut roomy = std::process::Command::new(blog_tests::binaries().join(Service::EventBus.name()))
        .envs(env)
        .env("DB_MAX_BYTES", "0")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("the bus starts");
    suite.wait_ready(Service::EventBus).await;
    let view =
        suite.eventually("every post in query", || async { Some(suite.view().await).filter(|view| view.len() == posts.len()) }).await;
    assert!(posts.iter().all(|id| view.contains_key(id)));
    let log = suite.bus_events().await;
    assert_eq!(log.len(), posts.len(), "each event once");
    println!(
        "bus capped at {CAP} bytes: not ready after {filled_at} posts ({stored} events stored), publish answered 503 JSON, 5 more posts answered 201; restarted with room: all {} posts delivered, log {} events",
        posts.len(),
        log.len()
    );
    roomy.kill().expect("the bus stops");
    let _ = roomy.wait();
    suite.shutdown().await;
}

/// Bytes in use (pages minus free pages) of each service's database, read
/// with the services stopped.
async fn used_bytes(suite: &TestSuite) -> Vec<(Service, u64)> {
    let mut sizes = Vec::new();
    for service in Service::ALL.into_iter().filter(|s| s.keeps_data()) {
        let store = blog_kit::store::Store::open(&suite.dir.path().join("data").join(service.name()), service.name(), &[]).unwrap();
        let used = store
            .read(|tx| {
                let pragma = |name: &str| tx.query_row(&format!("PRAGMA {name}"), &[], |r| r.get::<i64>(0));
                Ok::<_, blog_kit::StoreError>((pragma("page_count")? - pragma("freelist_count")?) * pragma("page_size")?)
            })
            .await
            .unwrap();
        sizes.push((service, used as u64));
    }
    sizes
}

/// The figures behind the volume sizes: bytes per post and per comment in
/// each database, the bus's log included (kept whole: a rebuild replays it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sizing_bytes_per_post_and_comment() {
    const POSTS: usize = 200;
    let suite = TestSuite::launch().await;
    let measure = || async {
        for service in Service::ALL {
            suite.stop(service).await;
        }
        let sizes = used_bytes(&suite).await;
        for service in Service::ALL {
            suite.restart(service).await;
        }
        sizes
    };
    let empty = measure().await;
    let mut posts = Vec::new();
    for i in 0..POSTS {
        posts.push(suite.create_post(&format!("A post title of ordinary length, number {i}")).await.id);
    }
    suite.eventually("every post in query", || async { (suite.view().await.len() == POSTS).then_some(()) }).await;
    let with_posts = measure().await;
    for (i, post) in posts.iter().enumerate() {
        suite.comment(post, &format!("A comment of ordinary length, saying something about post {i}")).await;
        suite.comment(post, &format!("Another comment, this one mentioning an orange, on post {i}")).await;
    }
    suite
        .eventually("every comment moderated in query", || async {
            let view = suite.view().await;
            let done = view.values().flat_map(|p| &p.comments).filter(|c| c.status != "pending").count();
            (done == 2 * POSTS).then_some(())
        })
        .await;
    let with_comments = measure().await;
    let log = suite.bus_events().await.len();
    assert_eq!(log, POSTS * 7, "1 PostCreated + 3 events per comment");
    println!("sizing: {POSTS} posts (~45-character titles), then {} comments (~60 characters), {log} events", 2 * POSTS);
    for ((service, empty), ((_, posts), (_, comments))) in empty.iter().zip(with_posts.iter().zip(&with_comments)) {
        let per_post = (posts - empty) as f64 / POSTS as f64;
        let per_comment = (comments - posts) as f64 / (2 * POSTS) as f64;
        println!("sizing: {service}: {per_post:.0} bytes per post, {per_comment:.0} bytes per comment");
        assert!(per_post + per_comment < 8_192.0, "{service}: out of line");
    }
    suite.shutdown().await;
}
