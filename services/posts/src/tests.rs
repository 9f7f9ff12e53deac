//! In-process tests: the service's whole router over a temporary database,
//! its relay publishing to a fake bus.

use std::time::Duration;

use axum::{body::Body, http::Request};
use blog_domain::EventKind;
use blog_kit::testing::TestKit;
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

use super::*;

const WITHIN: Duration = Duration::from_secs(10);

async fn posts() -> (TestKit, Router) {
    let test = kit().for_test().await.unwrap();
    let app = test.app(test.kit.serve(app(AppState { kit: test.kit.clone() })));
    (test, app)
}

async fn send(app: &Router, request: Request<Body>) -> (StatusCode, Value) {
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

fn create(body: &str) -> Request<Body> {
    Request::post("/posts/create")
        .header("content-type", "application/json")
        .header("x-request-id", "req-7")
        .body(Body::from(body.to_owned()))
        .unwrap()
}

#[test]
fn titles_are_trimmed_and_bounded() {
    assert_eq!(PostTitle::parse("  Hello ").unwrap(), PostTitle("Hello".into()));
    assert!(PostTitle::parse("   ").is_err());
    assert!(PostTitle::parse("\u{200B}").is_err());
    assert!(PostTitle::parse("a\u{7}").is_err());
    assert!(PostTitle::parse(&"x".repeat(MAX_TITLE)).is_ok());
    assert!(PostTitle::parse(&"é".repeat(MAX_TITLE + 1)).is_err());
}

#[tokio::test]
async fn a_created_post_is_answered_201_and_published_once_with_its_request_id() {
    let (test, app) = posts().await;
    let (status, body) = send(&app, create(r#"{"title":"  First post "}"#)).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["title"], "First post");
    let id = body["id"].as_str().unwrap().to_owned();
    let events = test.bus.wait_for(1, WITHIN).await.unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].kind, EventKind::PostCreated);
    assert_eq!(Value::Object(events[0].data.clone()), json!({"id": id, "title": "First post"}));
    assert_eq!(events[0].request_id.as_deref(), Some("req-7"));
    let stored: i64 = test.kit.read(|tx| tx.query_row("SELECT count(*) FROM post", &[], |r| r.get(0))).await.unwrap();
    assert_eq!(stored, 1);
}

#[tokio::test]
async fn bad_bodies_get_a_json_400_and_publish_nothing() {
    let (test, app) = posts().await;
    for (body, expected) in [
        (r#"{"title":"   "}"#, "`title` must not be empty"),
        (r#"{"title":"\u200b"}"#, "`title` must not be empty"),
        (r#"{"title":" \u200b\u00ad\u2060 "}"#, "`title` must not be empty"),
        (r#"{"title":"a\u0000b"}"#, "`title` must not contain control characters"),
        (r#"{"title":"ding\u0007"}"#, "`title` must not contain control characters"),
        (r#"{"title":"esc\u001b[31m"}"#, "`title` must not contain control characters"),
        (&format!(r#"{{"title":"{}"}}"#, "x".repeat(MAX_TITLE + 1)), "`title` must be at most 200 characters"),
        (r#"{"title":7}"#, "invalid request body"),
        (r#"{"title":"#, "malformed JSON"),
        (r"{}", "invalid request body"),
        ("[1,2]", "invalid request body"),
        ("", "malformed JSON"),
    ] {
        let (status, answer) = send(&app, create(body)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {answer}");
        assert!(answer["error"].as_str().is_some_and(|e| e.contains(expected)), "{body}: {answer}");
    }
    let no_type = Request::post("/posts/create").body(Body::from(r#"{"title":"t"}"#)).unwrap();
    assert_eq!(send(&app, no_type).await.0, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let too_big = create(&format!(r#"{{"title":"{}"}}"#, "x".repeat(70 * 1024)));
    assert_eq!(send(&app, too_big).await.0, StatusCode::PAYLOAD_TOO_LARGE);
    let stored: i64 = test.kit.read(|tx| tx.query_row("SELECT count(*) FROM post", &[], |r| r.get(0))).await.unwrap();
    assert_eq!(stored, 0);
    assert!(test.bus.events().is_empty());
}

#[tokio::test]
async fn unknown_routes_and_methods_are_json_and_events_need_the_secret() {
    let (test, app) = posts().await;
    let (status, body) = send(&app, Request::get("/posts/create").body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{body}");
    assert!(body["error"].is_string());
    let (status, body) = send(&app, Request::get("/nowhere").body(Body::empty()).unwrap()).await;
    assert_eq!((status, body["error"].is_string()), (StatusCode::NOT_FOUND, true));
    assert_eq!(send(&app, Request::get("/readyz").body(Body::empty()).unwrap()).await, (StatusCode::OK, json!({"status": "ready"})));

    let event = r#"{"type":"PostLiked","data":{"id":"p"}}"#;
    let events = |auth: Option<String>| {
        let request = Request::post("/events").header("content-type", "application/json");
        let request = match auth {
            Some(auth) => request.header("authorization", auth),
            None => request,
        };
        request.body(Body::from(event)).unwrap()
    };
    assert_eq!(send(&app, events(None)).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(send(&app, events(Some("Bearer wrong-secret-0123456789".into()))).await.0, StatusCode::FORBIDDEN);
    assert_eq!(send(&app, events(Some(test.bearer()))).await, (StatusCode::OK, json!({})), "a service that consumes nothing acknowledges");
}
