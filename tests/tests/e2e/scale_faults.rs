//! Faults against the scaled-out suite (2 replicas of every service, on
//! PostgreSQL, the bus's on JetStream): a replica of each service killed in turn under load,
//! PostgreSQL stopped under load, and two replicas of a consumer given the
//! same batch at the same moment. Afterwards the suite must hold exactly what
//! was accepted, as in `faults.rs`.

use std::{sync::atomic::Ordering, time::Duration};

use blog_domain::{DomainEvent, Event, EventKind, Service};
use blog_tests::{
    Comment, Mode, Post, Signal, TestSuite,
    load::{self, print_outcome, start as start_load, writes_after},
};
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_one_replica_of_every_service_in_turn_loses_nothing_and_barely_interrupts_writes() {
    let Some(mode) = Mode::scaled(2) else { return };
    let suite = TestSuite::launch_in(mode).await;
    let (load, progress, stop) = start_load(&suite, "replica-kill", 4);
    let mut done = writes_after(&suite, &progress, 0, 20).await;
    // Replica 1 of some, 2 of others; the bus's replicas take their turns too.
    let victims = ["posts-1", "comments-2", "event-bus-1", "moderation-1", "query-2", "client-1", "event-bus-2", "posts-2", "comments-1"];
    for victim in victims {
        suite.kill_process(victim, Signal::KILL).await;
        // Writes go on while it restarts, and for a while after.
        done = writes_after(&suite, &progress, done, 100).await;
    }
    stop.store(true, Ordering::Relaxed);
    let report = load.await.expect("load");
    let counts = suite.assert_converged(&report).await;
    print_outcome(&format!("SIGKILL of {}, one at a time", victims.join(", ")), &report, counts);
    // Every answer that was not a 201 says the request failed in a way a client may retry.
    for (outcome, n) in &report.outcomes {
        assert!(matches!(outcome.as_str(), "201" | "502" | "503" | "504" | "no answer"), "{n} writes answered {outcome}");
    }
    assert!(report.accepted_percent() >= 99.0, "only {:.2} % of writes answered 201: {:?}", report.accepted_percent(), report.outcomes);
    suite.shutdown().await;
}

/// A post accepted by a replica that is killed before it could relay it (the
/// bus is stopped meanwhile): the other replicas take its event over as soon
/// as it is dead, not when its lease on the outbox row runs out (3 s), so a
/// comment on the post is accepted within comments' wait for it, never a 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_whose_replica_died_before_relaying_it_takes_comments_at_once() {
    let Some(mode) = Mode::scaled(2) else { return };
    let suite = TestSuite::launch_in(mode).await;
    suite.stop(Service::EventBus).await;
    let replicas = suite.processes(Service::Posts);
    let urls = suite.process_urls(Service::Posts);
    let mut posts = Vec::new();
    for (name, url) in replicas.iter().zip(&urls) {
        let answer = suite.send(reqwest::Client::new().post(format!("{url}/posts/create")).json(&json!({"title": name}))).await;
        assert_eq!(answer.status, 201, "{name}: {:?}", answer.body);
        let post: Post = serde_json::from_value(answer.body).expect("a post");
        posts.push(post);
        // Dies holding the event: its relay cannot reach the bus.
        suite.kill_process(name, Signal::KILL).await;
    }
    suite.restart(Service::EventBus).await;
    for post in &posts {
        let asked = std::time::Instant::now();
        let comments = suite.comment(&post.id, "on a post its replica never relayed").await;
        assert_eq!(comments.len(), 1);
        println!("comment on {:?} accepted {:.2} s after the bus came back", post.title, asked.elapsed().as_secs_f64());
    }
    for post in &posts {
        suite.wait_for_post_in_query(&post.id).await;
    }
    // At least the last killed replica's post was taken over by a replica still running.
    let taken = counter(&suite, Service::Posts, "blog_outbox_taken_over_total").await;
    assert!(taken >= 1, "the takeover is counted");
    println!("events taken over, counted by the posts replicas running now: {taken}");
    suite.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stopped_under_load_answers_503_and_everything_accepted_catches_up() {
    let Some(mode) = Mode::scaled(2) else { return };
    // Comments' default wait for a post: while PostgreSQL is down no
    // `PostCreated` can be applied, and the load's comments on new posts must
    // end in their 503 within the outage, not wait out the harness's long wait.
    let suite = TestSuite::launch_with_in(mode, |options| {
        options.env.push((Service::Comments, "POST_WAIT_MS".into(), "2000".into()));
    })
    .await;
    let target = suite.create_post("commented while postgres is down").await;
    let known = suite.comment(&target.id, "before the stop").await.remove(0);
    let (load, progress, stop) = start_load(&suite, "postgres-down", 4);
    // Writers of comments may all be waiting for their post's event while
    // PostgreSQL is down (it arrives once it is back); this one keeps writing.
    let posts_only = tokio::spawn(load::posts_until(
        suite.http.clone(),
        suite.gateway.clone(),
        "postgres-down-posts".into(),
        progress.clone(),
        stop.clone(),
    ));
    writes_after(&suite, &progress, 0, 20).await;
    suite.stop_process(blog_local::postgres::PROCESS).await;

    // While it is down, a write answers a clear 503 JSON (the first after the
    // stop may still have been on its way; the next are refused).
    let refused = suite
        .eventually("a write refused with 503 while PostgreSQL is down", || async {
            let answer = suite.post_json("/posts/create", &json!({ "title": "while postgres is down" })).await;
            (answer.status == 503).then_some(answer)
        })
        .await;
    assert!(refused.content_type.starts_with("application/json"), "{refused:?}");
    assert!(refused.body["error"].as_str().is_some_and(|e| !e.is_empty()), "{refused:?}");
    let during = progress.load(Ordering::Relaxed);
    // A few seconds down, under load.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let still = suite.post_json(&format!("/posts/{}/comments", target.id), &json!({ "content": "while postgres is down" })).await;
    assert_eq!(still.status, 503, "a comment while PostgreSQL is down: {:?}", still.body);

    suite.start_process(blog_local::postgres::PROCESS);
    let after = suite
        .eventually("a write accepted again", || async {
            let answer = suite.post_json("/posts/create", &json!({ "title": "postgres is back" })).await;
            (answer.status == 201).then_some(answer)
        })
        .await;
    // A post created once it is back takes a comment at once, though the bus
    // may still be backing off its pushes to comments.
    let after: Post = serde_json::from_value(after.body).expect("a post");
    let first = suite.post_json(&format!("/posts/{}/comments", after.id), &json!({ "content": "once postgres is back" })).await;
    assert_eq!(first.status, 201, "a comment on a post created after the outage: {:?}", first.body);
    let first: Vec<Comment> = serde_json::from_value(first.body).expect("the post's comments");
    writes_after(&suite, &progress, during, 40).await;
    stop.store(true, Ordering::Relaxed);
    let mut report = load.await.expect("load");
    report.merge(posts_only.await.expect("posts-only load"));
    // 503 while it is down, and never a 404: the load comments only on posts
    // it was told were created, and a comment waiting for its post asks the
    // bus for it rather than wait out the bus's backoff of its pushes.
    for (outcome, n) in &report.outcomes {
        assert!(matches!(outcome.as_str(), "201" | "503"), "{n} writes answered {outcome} (only 201 or 503 expected)");
    }
    let refused_by_load = report.outcomes.get("503").copied().unwrap_or(0);
    assert!(refused_by_load > 0, "the load saw PostgreSQL down: {:?}", report.outcomes);
    // The probes are part of what was attempted; the last one was accepted.
    report.attempted_titles.extend([target.title.clone(), "while postgres is down".to_owned(), "postgres is back".to_owned()]);
    report.attempted_contents.extend([known.content.clone(), "while postgres is down".to_owned(), "once postgres is back".to_owned()]);
    report.posts.extend([target.clone(), after.clone()]);
    report.comments.push((target.id.clone(), known));
    report.comments.extend(first.into_iter().map(|comment| (after.id.clone(), comment)));
    let counts = suite.assert_converged(&report).await;
    print_outcome("PostgreSQL stopped for 3 s under load", &report, counts);
    suite.shutdown().await;
}

/// The sum over `service`'s replicas of an unlabelled counter in their `/metrics`.
async fn counter(suite: &TestSuite, service: Service, name: &str) -> u64 {
    let mut sum = 0;
    for url in suite.process_urls(service) {
        let text = suite.http.get(format!("{url}/metrics")).send().await.unwrap().text().await.unwrap();
        sum += text.lines().find_map(|line| line.strip_prefix(&format!("{name} "))).and_then(|v| v.trim().parse::<u64>().ok()).unwrap_or(0);
    }
    sum
}

/// `POST /events` with `batch` to both replicas of `service` at the same moment; both must answer 200.
async fn to_both_replicas_at_once(suite: &TestSuite, service: Service, batch: &Value) {
    let urls = suite.process_urls(service);
    assert_eq!(urls.len(), 2);
    let send =
        |url: &str| suite.send(suite.internal(reqwest::Method::POST, &format!("{url}/events"), blog_tests::Auth::Secret).json(batch));
    let (first, second) = tokio::join!(send(&urls[0]), send(&urls[1]));
    assert_eq!((first.status, second.status), (200, 200), "{service}: {:?} / {:?}", first.body, second.body);
}

fn event(kind: EventKind, data: Value) -> Value {
    let domain = DomainEvent::parse(&kind, data.as_object().expect("an object")).expect("valid event data");
    serde_json::to_value(Event::new(&domain, None)).expect("an event")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_of_a_consumer_given_the_same_batch_at_once_apply_it_once() {
    let Some(mode) = Mode::scaled(2) else { return };
    let suite = TestSuite::launch_in(mode).await;
    const ROUNDS: u64 = 20;
    const BATCH: u64 = 5;
    let post = suite.create_post("target").await;
    suite.eventually("the post in query", || async { suite.view().await.contains_key(&post.id).then_some(()) }).await;
    let applied = "blog_inbox_applied_total";
    let duplicates = "blog_inbox_duplicates_total";
    let before = [
        (counter(&suite, Service::Moderation, applied).await, counter(&suite, Service::Moderation, duplicates).await),
        (counter(&suite, Service::Query, applied).await, counter(&suite, Service::Query, duplicates).await),
    ];

    let mut comment_ids = Vec::new();
    for round in 0..ROUNDS {
        // New comments to moderation: each must be decided once.
        let comments: Vec<Value> = (0..BATCH)
            .map(|i| {
                let id = format!("same-batch-{round}-{i}");
                comment_ids.push(id.clone());
                event(EventKind::CommentCreated, json!({"id": id, "postId": post.id, "content": "an orange", "status": "pending"}))
            })
            .collect();
        to_both_replicas_at_once(&suite, Service::Moderation, &Value::Array(comments)).await;
        // New posts to query: each must be shown once.
        let posts: Vec<Value> = (0..BATCH)
            .map(|i| event(EventKind::PostCreated, json!({"id": format!("same-post-{round}-{i}"), "title": "twice at once"})))
            .collect();
        to_both_replicas_at_once(&suite, Service::Query, &Value::Array(posts)).await;
    }

    let sent = ROUNDS * BATCH;
    let after = [
        (counter(&suite, Service::Moderation, applied).await, counter(&suite, Service::Moderation, duplicates).await),
        (counter(&suite, Service::Query, applied).await, counter(&suite, Service::Query, duplicates).await),
    ];
    for (service, (before, after)) in [Service::Moderation, Service::Query].into_iter().zip(before.into_iter().zip(after)) {
        assert_eq!((after.0 - before.0, after.1 - before.1), (sent, sent), "{service}: (applied, duplicates) over both replicas");
    }
    // Moderation decided each comment once: one decision row, one CommentModerated in the log.
    let moderation = suite.postgres().expect("PostgreSQL").connect("moderation").await.unwrap();
    let decisions: i64 =
        moderation.query_one("SELECT count(*) FROM decision WHERE comment_id LIKE 'same-batch-%'", &[]).await.unwrap().get(0);
    assert_eq!(decisions, sent as i64);
    let decided = suite
        .eventually("every decision in the bus's log", || async {
            let log = suite.bus_events().await;
            let decided: Vec<String> = log
                .iter()
                .filter(|e| e["type"] == "CommentModerated")
                .filter_map(|e| e["data"]["id"].as_str().map(str::to_owned))
                .filter(|id| id.starts_with("same-batch-"))
                .collect();
            (decided.len() >= comment_ids.len()).then_some(decided)
        })
        .await;
    let mut unique = decided.clone();
    unique.sort();
    unique.dedup();
    assert_eq!((decided.len(), unique.len()), (comment_ids.len(), comment_ids.len()), "one decision per comment");
    // Query shows each post once, on both replicas (keys of a JSON object are unique: count them).
    for url in suite.process_urls(Service::Query) {
        suite
            .eventually(&format!("every post at {url}"), || async {
                let view: Value = suite.http.get(format!("{url}/posts")).send().await.ok()?.json().await.ok()?;
                let shown = view.as_object()?.keys().filter(|id| id.starts_with("same-post-")).count();
                (shown as u64 == sent).then_some(())
            })
            .await;
    }
    println!(
        "{sent} CommentCreated to both moderation replicas and {sent} PostCreated to both query replicas at once, \
         in batches of {BATCH}: each applied once ({sent} applied + {sent} duplicates per service), {} decisions",
        unique.len()
    );
    suite.shutdown().await;
}

/// A data service started while its PostgreSQL cannot be reached (a fresh
/// cluster whose database is still starting, an outage across a restart)
/// waits for it instead of exiting, and serves once it answers: every one of
/// posts, comments, moderation and query. One told a wrong password fails at
/// once instead: waiting would not mend its configuration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_service_started_before_its_postgresql_waits_for_it() {
    if Mode::scaled(1).is_none() {
        return;
    }
    let postgres = blog_tests::postgres::TestPostgres::start().await;
    postgres.supervisor().stop(blog_local::postgres::PROCESS).await;
    let logs = tempfile::tempdir().unwrap();
    let http = blog_kit::http::client::http_client(Duration::from_secs(5));
    let start = |service: Service, url: String| {
        let port = blog_tests::free_port();
        let log = std::fs::File::create(logs.path().join(format!("{service}.log"))).unwrap();
        let child = Killed(
            std::process::Command::new(blog_tests::binaries().join(service.name()))
                .env("PORT", port.to_string())
                .env("DATABASE_URL", url)
                .env("INTERNAL_SECRET", "0123456789abcdef0123")
                // No bus: what is published waits in the outbox.
                .env("EVENT_BUS_URL", format!("http://127.0.0.1:{}", blog_tests::free_port()))
                .env("NO_COLOR", "1")
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("the binary runs"),
        );
        (service, child, format!("http://127.0.0.1:{port}"))
    };
    let log = |service: Service| std::fs::read_to_string(logs.path().join(format!("{service}.log"))).unwrap_or_default();
    let mut waiting: Vec<_> =
        blog_local::postgres::database_services().map(|service| start(service, postgres.url(service.name()))).collect();
    tokio::time::sleep(Duration::from_secs(3)).await;
    for (service, child, _) in &mut waiting {
        assert!(child.0.try_wait().unwrap().is_none(), "{service} exited while PostgreSQL was down:\n{}", log(*service));
        assert!(log(*service).contains("PostgreSQL cannot be reached yet"), "{service} says what it waits for:\n{}", log(*service));
    }
    postgres.supervisor().start(blog_local::postgres::PROCESS);
    let deadline = std::time::Instant::now() + blog_tests::DEADLINE;
    for (service, _, url) in &waiting {
        while !http.get(format!("{url}/readyz")).send().await.is_ok_and(|ready| ready.status().is_success()) {
            assert!(std::time::Instant::now() < deadline, "{service} not ready once PostgreSQL answered:\n{}", log(*service));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let posts = &waiting.iter().find(|(service, ..)| *service == Service::Posts).expect("posts").2;
    let created = http.post(format!("{posts}/posts/create")).json(&json!({ "title": "after the wait" })).send().await.unwrap();
    assert_eq!(created.status(), 201, "a write once PostgreSQL answers");

    let wrong = postgres.url(Service::Posts.name()).replacen("@127.0.0.1", "x@127.0.0.1", 1);
    drop(waiting);
    let (_, mut refused, _) = start(Service::Posts, wrong);
    let deadline = std::time::Instant::now() + blog_tests::DEADLINE;
    let status = loop {
        if let Some(status) = refused.0.try_wait().unwrap() {
            break status;
        }
        assert!(std::time::Instant::now() < deadline, "posts kept waiting on a wrong password:\n{}", log(Service::Posts));
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(!status.success(), "{}", log(Service::Posts));
    assert!(log(Service::Posts).contains("password authentication failed"), "the log says why:\n{}", log(Service::Posts));
    postgres.stop().await;
}

/// A child process killed when dropped, so a failing test leaves none behind.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
