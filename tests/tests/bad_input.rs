//! Every kind of bad input gets a clear 4xx with a JSON `{"error": ...}` body,
//! never a panic or a 5xx, and nothing from outside can inject events.

use blog_common::Service;
use blog_tests::{Answer, TestSuite};
use serde_json::{Value, json};

fn assert_client_error(answer: &Answer, status: u16, what: &str) {
    assert_eq!(answer.status, status, "{what}: {:?}", answer.body);
    assert!(answer.content_type.starts_with("application/json"), "{what}: content type {}", answer.content_type);
    let message = answer.body["error"].as_str().unwrap_or_default();
    assert!(!message.is_empty(), "{what}: no error message in {:?}", answer.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_json_errors() {
    let suite = TestSuite::launch().await;
    let post = suite.create_post("target").await;
    let comments = format!("/posts/{}/comments", post.id);
    let raw = |path: &str, content_type: &str, body: &str| {
        suite.http.post(format!("{}{path}", suite.gateway)).header("content-type", content_type).body(body.to_owned())
    };

    for path in ["/posts/create", comments.as_str()] {
        let cases: [(&str, &str, &str); 7] = [
            ("malformed JSON", "application/json", "{\"title\":"),
            ("wrong content type", "text/plain", "{\"title\":\"x\",\"content\":\"x\"}"),
            ("not an object", "application/json", "[1,2]"),
            ("empty object", "application/json", "{}"),
            ("wrong field type", "application/json", "{\"title\":5,\"content\":5}"),
            ("empty fields", "application/json", "{\"title\":\"  \",\"content\":\"\"}"),
            ("no body", "application/json", ""),
        ];
        for (what, content_type, body) in cases {
            let answer = suite.send(raw(path, content_type, body)).await;
            let expected = if what == "wrong content type" { 415 } else { 400 };
            assert_client_error(&answer, expected, &format!("{path}: {what}"));
        }
        let huge = json!({"title": "x".repeat(100_000), "content": "x".repeat(100_000)}).to_string();
        assert_client_error(&suite.send(raw(path, "application/json", &huge)).await, 413, &format!("{path}: oversized"));
        let long = json!({"title": "x".repeat(5_000), "content": "x".repeat(5_000)}).to_string();
        assert_client_error(&suite.send(raw(path, "application/json", &long)).await, 400, &format!("{path}: too long"));
    }

    assert_client_error(&suite.post_json("/posts/no-such-post/comments", &json!({"content": "hi"})).await, 404, "comment on unknown post");
    assert_client_error(&suite.get("/posts/no-such-post/comments").await, 404, "list of unknown post");
    assert_client_error(&suite.get("/posts/create").await, 405, "GET on a POST route");
    assert_client_error(&suite.send(suite.http.delete(format!("{}/posts", suite.gateway))).await, 405, "DELETE /posts");

    // None of it created anything.
    assert_eq!(suite.view().await.len(), 1);
    assert!(suite.comments(&post.id).await.is_empty());
    suite.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_events_are_refused_and_unknown_types_acknowledged() {
    let suite = TestSuite::launch().await;
    let malformed = [
        ("no type", json!({"data": {"id": "1"}})),
        ("empty type", json!({"type": "", "data": {}})),
        ("data not an object", json!({"type": "PostCreated", "data": "x"})),
        ("no data", json!({"type": "PostCreated"})),
        ("not an object", json!("PostCreated")),
        ("bad id", json!({"type": "PostCreated", "id": 5, "data": {"id": "p", "title": "t"}})),
        ("known type, bad data", json!({"type": "PostCreated", "data": {"id": "p"}})),
        ("bad status", json!({"type": "CommentUpdated", "data": {"id": "c", "postId": "p", "content": "x", "status": "maybe"}})),
    ];
    for service in [Service::EventBus, Service::Query, Service::Comments, Service::Moderation, Service::Posts] {
        let events = format!("{}/events", suite.url(service));
        for (what, body) in &malformed {
            let answer = suite.send(suite.http.post(&events).json(body)).await;
            if service == Service::Posts && (what.starts_with("known type") || *what == "bad status") {
                // posts consumes nothing, so it checks only the envelope.
                assert_eq!(answer.status, 200, "{service}: {what}");
                continue;
            }
            assert_client_error(&answer, 400, &format!("{service}: {what}"));
        }
        let bad_json = suite.send(suite.http.post(&events).header("content-type", "application/json").body("{")).await;
        assert_client_error(&bad_json, 400, &format!("{service}: malformed JSON"));

        let unknown = suite.send(suite.http.post(&events).json(&json!({"type": "PostLiked", "data": {"id": "p"}}))).await;
        assert_eq!(unknown.status, 200, "{service}: unknown type must be acknowledged: {:?}", unknown.body);
    }

    let bad_page = suite.send(suite.http.get(format!("{}/events?after=abc", suite.url(Service::EventBus)))).await;
    assert_client_error(&bad_page, 400, "bus: bad after");
    let bad_limit = suite.send(suite.http.get(format!("{}/events?limit=0", suite.url(Service::EventBus)))).await;
    assert_client_error(&bad_limit, 400, "bus: bad limit");

    // The unknown event is in the log and was delivered without holding anything up.
    let post = suite.create_post("after the noise").await;
    suite.eventually("the post in query", || async { suite.view().await.contains_key(&post.id).then_some(()) }).await;
    suite.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_cannot_be_injected_through_the_gateway() {
    let suite = TestSuite::launch().await;
    let forged = json!({"type": "PostCreated", "data": {"id": "forged", "title": "forged"}});
    for path in ["/events", "/EVENTS", "/posts/events", "/posts/x/events", "/posts/create/../events"] {
        let answer = suite.post_json(path, &forged).await;
        assert!((400..500).contains(&answer.status), "{path} answered {}", answer.status);
        assert!(answer.body.get("error").is_some(), "{path}: {:?}", answer.body);
    }
    let update = json!({"type": "CommentUpdated", "data": {"id": "c", "postId": "forged", "content": "x", "status": "approved"}});
    suite.post_json("/events", &update).await;

    // Give a forged event every chance to land: a real post made afterwards
    // is visible, so anything sent before it would be too.
    let real = suite.create_post("real").await;
    suite.eventually("the real post in query", || async { suite.view().await.contains_key(&real.id).then_some(()) }).await;
    let view = suite.view().await;
    assert_eq!(view.keys().collect::<Vec<_>>(), [&real.id]);
    let log = suite.bus_events().await;
    assert_eq!(log.len(), 1);
    assert_eq!(log[0]["data"]["id"], Value::String(real.id.clone()));
    suite.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_bodies_are_refused_cleanly_and_the_next_request_is_unaffected() {
    let suite = TestSuite::launch().await;
    let post = suite.create_post("target").await;
    let url = format!("{}/posts/{}/comments", suite.gateway, post.id);
    let oversized = json!({ "content": "x".repeat(200_000) }).to_string();
    let mut statuses = std::collections::BTreeMap::new();
    for _ in 0..200 {
        // The service answers 413 without reading the whole body and closes
        // that connection; the next request through the gateway must not suffer.
        let refused = suite.send(suite.http.post(&url).header("content-type", "application/json").body(oversized.clone())).await;
        let next = suite.post_json(&format!("/posts/{}/comments", post.id), &json!({ "content": "" })).await;
        *statuses.entry((refused.status, next.status)).or_insert(0) += 1;
    }
    assert_eq!(statuses.into_iter().collect::<Vec<_>>(), [((413, 400), 200)]);
    // Over the gateway's own limit (ingress-nginx's default 1 MiB) it refuses by itself.
    let huge = json!({ "content": "x".repeat(2 * 1024 * 1024) }).to_string();
    let answer = suite.send(suite.http.post(&url).header("content-type", "application/json").body(huge)).await;
    assert_client_error(&answer, 413, "over the gateway's limit");
    suite.shutdown().await;
}
