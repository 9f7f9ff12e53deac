//! The whole flow through the gateway: post -> comment -> moderation -> query,
//! with the statuses reaching both the comments service and query.

use blog_domain::Service;
use blog_tests::{Mode, TestSuite};
use serde_json::json;

in_both_modes!(
    a_comment_is_moderated_and_its_status_reaches_query_and_comments,
    blocked_words_come_from_the_environment,
    the_gateway_routes_like_the_ingress_whatever_the_host,
    a_comment_on_a_post_created_a_moment_ago_is_accepted,
    live_streams_show_the_view_changing_and_the_events_flowing,
);

async fn a_comment_is_moderated_and_its_status_reaches_query_and_comments(mode: Mode) {
    let suite = TestSuite::launch_in(mode).await;

    let post = suite.create_post("First post").await;
    assert_eq!(post.title, "First post");

    let after_first = suite.comment(&post.id, "hello world").await;
    assert_eq!(after_first.len(), 1);
    assert_eq!((after_first[0].content.as_str(), after_first[0].status.as_str()), ("hello world", "pending"));

    let after_second = suite.comment(&post.id, "I love an ORANGE").await;
    assert_eq!(after_second.len(), 2);
    assert_eq!(after_second[1].status, "pending");

    suite.wait_for_status(&post.id, &after_first[0].id, "approved").await;
    suite.wait_for_status(&post.id, &after_second[1].id, "rejected").await;

    let view = suite.view().await;
    assert_eq!(view.len(), 1);
    let shown = &view[&post.id];
    assert_eq!(shown.title, "First post");
    let statuses: Vec<_> = shown.comments.iter().map(|c| (c.content.as_str(), c.status.as_str())).collect();
    assert_eq!(statuses, [("hello world", "approved"), ("I love an ORANGE", "rejected")]);

    let comments = suite.comments(&post.id).await;
    let statuses: Vec<_> = comments.iter().map(|c| c.status.as_str()).collect();
    assert_eq!(statuses, ["approved", "rejected"]);

    // Every event of the flow is in the bus's log once, in causal order per comment.
    let log = suite.bus_events().await;
    let kinds: Vec<_> = log.iter().map(|e| e["type"].as_str().unwrap_or_default()).collect();
    assert_eq!(kinds.iter().filter(|k| **k == "PostCreated").count(), 1);
    assert_eq!(kinds.iter().filter(|k| **k == "CommentCreated").count(), 2);
    assert_eq!(kinds.iter().filter(|k| **k == "CommentModerated").count(), 2);
    assert_eq!(kinds.iter().filter(|k| **k == "CommentUpdated").count(), 2);
    let seqs: Vec<_> = log.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=7).collect::<Vec<_>>());

    suite.shutdown().await;
}

async fn blocked_words_come_from_the_environment(mode: Mode) {
    let suite = TestSuite::launch_with_in(mode, |options| {
        options.env.push((Service::Moderation, "BLOCKED_WORDS".into(), "Kiwi, plum".into()));
    })
    .await;
    let post = suite.create_post("Fruit").await;
    let kiwi = suite.comment(&post.id, "a KIWI a day").await.remove(0);
    let orange = suite.comment(&post.id, "orange is fine here").await.remove(1);
    suite.wait_for_status(&post.id, &kiwi.id, "rejected").await;
    suite.wait_for_status(&post.id, &orange.id, "approved").await;
    suite.shutdown().await;
}

async fn the_gateway_routes_like_the_ingress_whatever_the_host(mode: Mode) {
    let suite = TestSuite::launch_in(mode).await;
    let created = suite
        .send(suite.http.post(format!("{}/posts/create", suite.gateway)).header("host", "posts.com").json(&json!({"title": "Via host"})))
        .await;
    assert_eq!(created.status, 201, "{:?}", created.body);

    // Matching is case-insensitive: /POSTS reaches query (a JSON answer), not
    // the client (which would serve its HTML page).
    let upper = suite.get("/POSTS").await;
    assert!(upper.content_type.starts_with("application/json"), "{upper:?}");

    // /posts/<anything> and /postsXYZ belong to query, which has no such route.
    let deep = suite.get("/posts/123").await;
    assert_eq!((deep.status, deep.body["error"].is_string()), (404, true));
    let xyz = suite.get("/postsXYZ").await;
    assert_eq!(xyz.status, 404);

    // Everything else is the client, which serves the UI.
    let page = suite.send(suite.http.get(format!("{}/", suite.gateway)).header("host", "posts.com")).await;
    assert_eq!(page.status, 200);
    assert!(page.content_type.starts_with("text/html"), "{}", page.content_type);
    let deep_link = suite.get("/some/deep/link").await;
    assert!(deep_link.content_type.starts_with("text/html"));

    // Health endpoints of every service answer.
    for service in Service::ALL {
        for path in ["/healthz", "/readyz"] {
            let answer = suite.send(suite.http.get(format!("{}{path}", suite.url(service)))).await;
            assert_eq!(answer.status, 200, "{service}{path}");
        }
    }
    suite.shutdown().await;
}

async fn a_comment_on_a_post_created_a_moment_ago_is_accepted(mode: Mode) {
    let suite = TestSuite::launch_in(mode).await;
    // No wait between the two: comments learns of the post by event.
    for i in 0..20 {
        let post = suite.create_post(&format!("post {i}")).await;
        let comments = suite.comment(&post.id, "first!").await;
        assert_eq!(comments.len(), 1);
    }
    suite.shutdown().await;
}

/// Reads server-sent events from `response` until `done` says the collected
/// `(event, data)` pairs are enough.
async fn read_events(mut response: reqwest::Response, done: impl Fn(&[(String, String)]) -> bool) -> Vec<(String, String)> {
    let mut buffer = String::new();
    let mut events = Vec::new();
    while !done(&events) {
        let chunk = response.chunk().await.expect("stream readable").expect("stream still open");
        buffer.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buffer.find("\n\n") {
            let block: String = buffer.drain(..end + 2).collect();
            let field = |name: &str| block.lines().find_map(|l| l.strip_prefix(name)).map(str::to_owned);
            if let (Some(event), Some(data)) = (field("event:"), field("data:")) {
                events.push((event.trim().to_owned(), data.trim().to_owned()));
            }
        }
    }
    events
}

/// The base URL of the bus process holding the fewest delivery leases (the
/// only process when not scaled out), once every subscriber's lease is held.
async fn least_delivering_bus(suite: &TestSuite) -> String {
    let processes = suite.suite().options.processes(Service::EventBus);
    let url = |port: u16| format!("http://127.0.0.1:{port}");
    if let [(_, port)] = processes.as_slice() {
        return url(*port);
    }
    suite
        .eventually("every subscriber's delivery lease held", || async {
            let status = suite.send(suite.http.get(format!("{}/status", url(processes[0].1)))).await.body;
            let ports: Vec<u16> = status["subscribers"]
                .as_array()?
                .iter()
                .map(|s| s["deliverer"]["replica"].as_str()?.rsplit(':').next()?.parse().ok())
                .collect::<Option<_>>()?;
            processes.iter().map(|(_, port)| *port).min_by_key(|port| ports.iter().filter(|p| *p == port).count()).map(url)
        })
        .await
}

async fn live_streams_show_the_view_changing_and_the_events_flowing(mode: Mode) {
    let suite = TestSuite::launch_in(mode).await;
    let live = suite.http.get(format!("{}/posts/stream", suite.gateway)).send().await.expect("stream opens");
    assert_eq!(live.headers()["content-type"], "text/event-stream");
    // One bus process's flow, as the UI reads one through the bus's address:
    // scaled out, the replica delivering the fewest subscribers, which shows
    // every event stored and the other replicas' deliveries too.
    let flow = suite.http.get(format!("{}/flow", least_delivering_bus(&suite).await)).send().await.expect("flow opens");
    assert_eq!(flow.headers()["content-type"], "text/event-stream");

    let post = suite.create_post("live").await;
    suite.comment(&post.id, "an orange").await;

    let kinds = |events: &[(String, String)]| events.iter().map(|(e, _)| e.clone()).collect::<Vec<_>>();
    let changes = tokio::time::timeout(
        blog_tests::DEADLINE,
        read_events(live, |events| events.iter().any(|(e, d)| e == "CommentUpdated" && d.contains("rejected"))),
    )
    .await
    .expect("view changes streamed in time");
    let mut told = kinds(&changes);
    if mode != Mode::Single {
        // Scaled out, a query replica hears of what the other applied through
        // PostgreSQL, so its stream may tell a post's events in either order.
        told.sort();
    }
    let mut expected = vec!["PostCreated", "CommentCreated", "CommentUpdated"];
    if mode != Mode::Single {
        expected.sort_unstable();
    }
    assert_eq!(told, expected);
    assert!(changes.iter().any(|(e, d)| e == "PostCreated" && d.contains(&post.id)));

    // Each event is published once and pushed to, and acknowledged by, the
    // subscribers that consume its type, and no other.
    let flowed = tokio::time::timeout(
        blog_tests::DEADLINE,
        read_events(flow, |events| {
            let count = |kind: &str| events.iter().filter(|(e, _)| e == kind).count();
            count("published") >= 4 && count("delivered") >= 6
        }),
    )
    .await
    .expect("flow streamed in time");
    // Each stored event once, in the log's order.
    let published: Vec<_> =
        flowed.iter().filter(|(e, _)| e == "published").map(|(_, d)| serde_json::from_str::<serde_json::Value>(d).unwrap()).collect();
    let seqs: Vec<_> = published.iter().map(|p| p["seq"].as_u64().unwrap_or_default()).collect();
    assert_eq!(seqs, [1, 2, 3, 4], "{flowed:?}");
    let types: Vec<_> = published.iter().map(|p| p["type"].as_str().unwrap_or_default().to_owned()).collect();
    assert_eq!(types, ["PostCreated", "CommentCreated", "CommentModerated", "CommentUpdated"]);
    assert!(published.iter().all(|p| p.get("requestId").is_none()), "the flow reveals only the events' own fields");
    // Each (subscriber, event) once, whichever replica delivered it.
    let mut delivered: Vec<(u64, String, String)> = flowed
        .iter()
        .filter(|(e, _)| e == "delivered")
        .map(|(_, d)| serde_json::from_str::<serde_json::Value>(d).unwrap())
        .map(|d| {
            let field = |name: &str| d[name].as_str().unwrap_or_default().to_owned();
            (d["seq"].as_u64().unwrap_or_default(), field("type"), field("subscriber"))
        })
        .collect();
    delivered.sort();
    let expected = [
        (1, "PostCreated", "comments"),
        (1, "PostCreated", "query"),
        (2, "CommentCreated", "moderation"),
        (2, "CommentCreated", "query"),
        (3, "CommentModerated", "comments"),
        (4, "CommentUpdated", "query"),
    ];
    assert_eq!(delivered, expected.map(|(q, t, s)| (q, t.to_owned(), s.to_owned())), "{flowed:?}");
    // Every subscriber's cursor still reaches the head: what it does not
    // consume it is moved over, not held back by; and it was pushed nothing else.
    // Scaled out, each replica says so, and counts what it delivered itself: summed, each delivery once.
    let mut delivered_counts = std::collections::BTreeMap::new();
    for url in suite.process_urls(Service::EventBus) {
        let status = suite
            .eventually(&format!("every cursor at the head at {url}"), || async {
                let status = suite.send(suite.http.get(format!("{url}/status"))).await.body;
                status["subscribers"].as_array()?.iter().all(|s| s["cursor"] == 4 && s["lag"] == 0).then_some(status)
            })
            .await;
        for subscriber in status["subscribers"].as_array().unwrap() {
            *delivered_counts.entry(subscriber["name"].as_str().unwrap().to_owned()).or_insert(0) +=
                subscriber["delivered"].as_u64().unwrap();
        }
    }
    let delivered_counts: Vec<_> = delivered_counts.into_iter().collect();
    assert_eq!(delivered_counts, [("comments".to_owned(), 2), ("moderation".to_owned(), 1), ("query".to_owned(), 3)]);
    suite.shutdown().await;
}
