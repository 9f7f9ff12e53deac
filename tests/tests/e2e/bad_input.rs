//! Every kind of bad input gets a clear 4xx with a JSON `{"error": ...}` body,
//! never a panic or a 5xx, and nothing from outside can inject events. Bad
//! bodies of one route are the in-process tier's (each service's own tests:
//! `bad_bodies_..._get_json_...`); what crosses processes stays here.

use blog_domain::{DomainEvent, Event, EventKind, Service};
use blog_kit::{internal::REFUSAL_HEADER, messaging::inbox::MAX_BATCH};
use blog_tests::{Answer, Auth, Mode, Signal, TestSuite};
use serde_json::{Value, json};

in_both_modes!(
    malformed_events_are_refused_and_unknown_types_acknowledged,
    events_cannot_be_injected_through_the_gateway,
    oversized_bodies_are_refused_cleanly_and_the_next_request_is_unaffected,
    internal_writes_without_the_secret_are_refused_and_change_nothing,
    a_forged_decision_with_the_predictable_id_cannot_preempt_moderation,
);

fn assert_client_error(answer: &Answer, status: u16, what: &str) {
    assert_eq!(answer.status, status, "{what}: {:?}", answer.body);
    assert!(answer.content_type.starts_with("application/json"), "{what}: content type {}", answer.content_type);
    let message = answer.body["error"].as_str().unwrap_or_default();
    assert!(!message.is_empty(), "{what}: no error message in {:?}", answer.body);
}

async fn malformed_events_are_refused_and_unknown_types_acknowledged(mode: Mode) {
    let suite = TestSuite::launch_in(mode).await;
    let malformed = [
        ("no type", json!({"data": {"id": "1"}})),
        ("empty type", json!({"type": "", "data": {}})),
        ("data not an object", json!({"type": "PostCreated", "data": "x"})),
        ("no data", json!({"type": "PostCreated"})),
        ("not an object", json!("PostCreated")),
        ("bad id", json!({"type": "PostCreated", "id": 5, "data": {"id": "p", "title": "t"}})),
        ("control characters in id", json!({"type": "PostCreated", "id": "e\n1 FAKE LOG LINE", "data": {"id": "p", "title": "t"}})),
        ("escape sequence in type", json!({"type": "\u{1b}[2JPostCreated", "data": {"id": "p", "title": "t"}})),
        ("known type, bad data", json!({"type": "PostCreated", "data": {"id": "p"}})),
        ("bad status", json!({"type": "CommentUpdated", "data": {"id": "c", "postId": "p", "content": "x", "status": "maybe"}})),
    ];
    for service in [Service::EventBus, Service::Query, Service::Comments, Service::Moderation, Service::Posts] {
        let events = format!("{}/events", suite.url(service));
        for (what, body) in &malformed {
            let answer = suite.post_events(service, body).await;
            if service == Service::Posts && (what.starts_with("known type") || *what == "bad status") {
                // posts consumes nothing, so it checks only the envelope.
                assert_eq!(answer.status, 200, "{service}: {what}");
                continue;
            }
            assert_client_error(&answer, 400, &format!("{service}: {what}"));
            // Marked as a refusal of the event, which a sender may set aside.
            assert!(answer.headers.contains_key(REFUSAL_HEADER.as_str()), "{service}: {what}: not marked as a refusal");
        }
        let too_many = Value::Array(vec![json!({"type": "PostLiked", "data": {}}); MAX_BATCH + 1]);
        let answer = suite.post_events(service, &too_many).await;
        assert_client_error(&answer, 400, &format!("{service}: too many events"));
        assert!(!answer.headers.contains_key(REFUSAL_HEADER.as_str()), "{service}: a batch size is not the events' fault");
        let unauthorised = suite.post_events_as(service, &malformed[0].1, Auth::Missing).await;
        assert!(!unauthorised.headers.contains_key(REFUSAL_HEADER.as_str()), "{service}: a 401 is not the events' fault");
        let bad_json = suite
            .send(suite.internal(reqwest::Method::POST, &events, Auth::Secret).header("content-type", "application/json").body("{"))
            .await;
        assert_client_error(&bad_json, 400, &format!("{service}: malformed JSON"));

        let unknown = suite.post_events(service, &json!({"type": "PostLiked", "data": {"id": "p"}})).await;
        assert_eq!(unknown.status, 200, "{service}: unknown type must be acknowledged: {:?}", unknown.body);
    }

    let bad_page = suite.send(suite.http.get(format!("{}/events?after=abc", suite.url(Service::EventBus)))).await;
    assert_client_error(&bad_page, 400, "bus: bad after");
    let bad_limit = suite.send(suite.http.get(format!("{}/events?limit=0", suite.url(Service::EventBus)))).await;
    assert_client_error(&bad_limit, 400, "bus: bad limit");
    // Past i64::MAX (the log's integer), up to u64::MAX and beyond: a 400, never a 500 or the log from the start.
    for after in ["9223372036854775808", "18446744073709551615", "18446744073709551616", "-1"] {
        let answer = suite.send(suite.http.get(format!("{}/events?after={after}", suite.url(Service::EventBus)))).await;
        assert_client_error(&answer, 400, &format!("bus: after={after}"));
    }
    let last = suite.send(suite.http.get(format!("{}/events?after=9223372036854775807", suite.url(Service::EventBus)))).await;
    assert_eq!((last.status, last.body.clone()), (200, json!([])), "the largest position is past the end of the log");

    // The unknown event is in the log and was delivered without holding anything up.
    let post = suite.create_post("after the noise").await;
    suite.wait_for_post_in_query(&post.id).await;
    suite.shutdown().await;
}

async fn events_cannot_be_injected_through_the_gateway(mode: Mode) {
    let suite = TestSuite::launch_in(mode).await;
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
    suite.wait_for_post_in_query(&real.id).await;
    let view = suite.view().await;
    assert_eq!(view.keys().collect::<Vec<_>>(), [&real.id]);
    let log = suite.bus_events().await;
    assert_eq!(log.len(), 1);
    assert_eq!(log[0]["data"]["id"], Value::String(real.id.clone()));
    suite.shutdown().await;
}

async fn oversized_bodies_are_refused_cleanly_and_the_next_request_is_unaffected(mode: Mode) {
    let suite = TestSuite::launch_in(mode).await;
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

async fn internal_writes_without_the_secret_are_refused_and_change_nothing(mode: Mode) {
    let suite = TestSuite::launch_in(mode).await;
    let post = suite.create_post("before").await;
    let mut comment = suite.comment(&post.id, "fine").await.remove(0);
    suite.wait_for_status(&post.id, &comment.id, "approved").await;
    comment.status = "approved".to_owned();
    let log_before = suite.bus_events().await.len();

    // Every service's `POST /events`, with events that would each change something.
    let forged_post = json!({"id": "forged-post", "type": "PostCreated", "data": {"id": "forged", "title": "forged"}});
    let forged_update = json!({"id": "forged-upd", "type": "CommentUpdated",
        "data": {"id": comment.id, "postId": post.id, "content": "fine", "status": "rejected"}});
    let forged_decision = json!({"id": "forged-dec", "type": "CommentModerated",
        "data": {"id": comment.id, "postId": post.id, "content": "fine", "status": "rejected"}});
    let forged_comment = json!({"id": "forged-new", "type": "CommentCreated",
        "data": {"id": "c-forged", "postId": post.id, "content": "orange", "status": "pending"}});
    let mut refused = 0;
    for service in [Service::EventBus, Service::Posts, Service::Comments, Service::Moderation, Service::Query] {
        for body in [&forged_post, &forged_update, &forged_decision, &forged_comment, &Value::Array(vec![forged_post.clone()])] {
            for (auth, status) in [(Auth::Missing, 401), (Auth::Wrong, 403)] {
                let answer = suite.post_events_as(service, body, auth).await;
                assert_client_error(&answer, status, &format!("{service} {auth:?}"));
                assert_eq!(answer.headers.contains_key("www-authenticate"), status == 401, "{service} {auth:?}");
                refused += 1;
            }
        }
        // A body that is not even JSON is refused for the missing secret first.
        let garbage = suite.send(suite.internal(reqwest::Method::POST, &format!("{}/events", suite.url(service)), Auth::Missing).body("{"));
        assert_client_error(&garbage.await, 401, &format!("{service}: garbage without secret"));
    }

    // Nothing changed: a real post made afterwards is visible, so any forged
    // event sent before it would be too.
    let real = suite.create_post("after").await;
    suite.wait_for_post_in_query(&real.id).await;
    let view = suite.view().await;
    assert_eq!(view.len(), 2, "{view:?}");
    assert_eq!(view[&post.id].comments, [comment.clone()]);
    assert_eq!(suite.comments(&post.id).await, [comment]);
    assert_eq!(suite.bus_events().await.len(), log_before + 1);
    println!("{refused} internal writes without or with a wrong secret refused (401/403 JSON) across 5 services; view and log unchanged");
    suite.shutdown().await;
}

async fn a_forged_decision_with_the_predictable_id_cannot_preempt_moderation(mode: Mode) {
    let suite = TestSuite::launch_in(mode).await;
    let post = suite.create_post("target").await;
    // Moderation frozen, so the forgery arrives before the real decision.
    suite.kill(Service::Moderation, Signal::STOP).await;
    let comment = suite.comment(&post.id, "orange juice").await.remove(0);
    let created = suite
        .eventually("CommentCreated in the log", || async {
            suite.bus_events().await.into_iter().find(|e| e["type"] == "CommentCreated" && e["data"]["id"] == comment.id.as_str())
        })
        .await;
    let cause = Event::from_value(created).expect("an event");
    let data = json!({"id": comment.id, "postId": post.id, "content": comment.content, "status": "approved"});
    let decision = DomainEvent::parse(&EventKind::CommentModerated, data.as_object().unwrap()).unwrap();
    // The very id moderation's real decision will carry.
    let forged = serde_json::to_value(Event::caused_by(&cause, &decision)).unwrap();
    for auth in [Auth::Missing, Auth::Wrong] {
        let answer = suite.post_events_as(Service::Comments, &forged, auth).await;
        assert!(matches!(answer.status, 401 | 403), "{auth:?}: {:?}", answer.body);
    }

    suite.kill(Service::Moderation, Signal::CONT).await;
    suite.wait_for_status(&post.id, &comment.id, "rejected").await;
    assert_eq!(suite.comments(&post.id).await[0].status, "rejected");
    println!("forged CommentModerated {} (derived id) refused; the real decision applied: rejected", forged["id"]);
    suite.shutdown().await;
}

#[test]
fn services_refuse_to_start_with_bad_configuration_and_name_the_variable() {
    let bin_dir = blog_tests::binaries();
    let secret = ("INTERNAL_SECRET", "0123456789abcdef0123");
    type Case<'a> = (Service, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case<'_>> = vec![
        (Service::EventBus, vec![], "INTERNAL_SECRET"),
        (Service::Posts, vec![], "INTERNAL_SECRET"),
        (Service::Comments, vec![], "INTERNAL_SECRET"),
        (Service::Moderation, vec![], "INTERNAL_SECRET"),
        (Service::Query, vec![], "INTERNAL_SECRET"),
        (Service::Query, vec![("INTERNAL_SECRET", "too-short")], "INTERNAL_SECRET"),
        (Service::EventBus, vec![secret, ("DELIVERY_BATCH", "0")], "DELIVERY_BATCH"),
        (Service::EventBus, vec![secret, ("DELIVERY_BATCH", "1001")], "DELIVERY_BATCH"),
        (Service::EventBus, vec![secret, ("SUBSCRIBERS", "q=http://127.0.0.1:1/events,q=http://127.0.0.1:2/events")], "SUBSCRIBERS"),
    ];
    for (service, env, variable) in cases {
        let data = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new(bin_dir.join(service.name()))
            .env_remove("INTERNAL_SECRET")
            .env("PORT", "0")
            .env("DATA_DIR", data.path())
            .env("NO_COLOR", "1")
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("the binary runs");
        // A service that accepted the configuration would run forever.
        let deadline = std::time::Instant::now() + blog_tests::DEADLINE;
        while child.try_wait().expect("wait").is_none() {
            if std::time::Instant::now() > deadline {
                child.kill().expect("kill");
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let output = child.wait_with_output().expect("output");
        let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
        assert_eq!(output.status.code(), Some(2), "{service} {env:?}: {text}");
        assert!(text.contains(variable), "{service} {env:?}: the message must name {variable}: {text}");
        assert!(!text.contains("too-short"), "a secret is never echoed: {text}");
    }
}
