//! moderation: decides on every comment and publishes `CommentModerated`.
//!
//! The rule is the original's, made configurable: a comment whose text
//! contains a blocked word (`BLOCKED_WORDS`, comma-separated, "orange" by
//! default) is rejected, compared case-insensitively. Each comment is decided
//! once: the decision is keyed by comment id, so even a `CommentCreated`
//! published twice under different event ids yields one decision.

use axum::Router;
use blog_domain::{
    CommentData, CommentStatus, DomainEvent, Event, EventKind, Service,
    config::{self, ConfigError},
};
use blog_kit::{BoxError, Consumer, Outcome, ServiceKit, Shutdown, StoreError, Tx, config::CommonConfig, store::Migration};
use tokio::net::TcpListener;

pub const MIGRATIONS: &[Migration] = &[Migration::per_engine(
    "CREATE TABLE decision (comment_id TEXT PRIMARY KEY, status TEXT NOT NULL) WITHOUT ROWID;",
    "CREATE TABLE decision (comment_id TEXT PRIMARY KEY, status TEXT NOT NULL);",
)];

#[derive(Debug, Clone)]
pub struct Config {
    pub common: CommonConfig,
    pub rule: Rule,
}

impl Config {
    pub fn from_env() -> Result<Self, ConfigError> {
        Ok(Self { common: CommonConfig::from_env(Service::Moderation)?, rule: Rule::new(&config::list("BLOCKED_WORDS", "orange")) })
    }
}

/// The moderation rule: reject text containing any blocked word.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    blocked: Vec<String>,
}

impl Rule {
    pub fn new(words: &[String]) -> Self {
        Self { blocked: words.iter().map(|w| w.to_lowercase()).filter(|w| !w.is_empty()).collect() }
    }

    pub fn decide(&self, content: &str) -> CommentStatus {
        let text = content.to_lowercase();
        if self.blocked.iter().any(|word| text.contains(word.as_str())) { CommentStatus::Rejected } else { CommentStatus::Approved }
    }
}

/// How this service's kit is opened.
pub fn kit() -> ServiceKit {
    ServiceKit::new(Service::Moderation).migrations(MIGRATIONS)
}

pub async fn run(listener: TcpListener, config: Config, shutdown: Shutdown) -> Result<(), BoxError> {
    let kit = kit().open(&config.common).await?;
    kit.serve(Router::new()).consumer(Moderator { rule: config.rule }).run(listener, shutdown).await
}

/// Decides on each `CommentCreated` and publishes the decision.
#[derive(Debug)]
pub struct Moderator {
    pub rule: Rule,
}

impl Consumer for Moderator {
    fn consumes(&self) -> &'static [EventKind] {
        &[EventKind::CommentCreated]
    }

    fn apply(&self, tx: &mut Tx<'_>, envelope: &Event, event: &DomainEvent) -> Result<Outcome, StoreError> {
        let DomainEvent::CommentCreated(comment) = event else { return Ok(Outcome::Ignored) };
        let status = self.rule.decide(&comment.content);
        let decided = tx.execute(
            "INSERT INTO decision (comment_id, status) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            &[&comment.id, &status.as_str()],
        )?;
        if decided == 1 {
            let moderated = CommentData { status, ..comment.clone() };
            tx.publish(&Event::caused_by(envelope, &DomainEvent::CommentModerated(moderated)))?;
        }
        Ok(Outcome::Handled)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use axum::{body::Body, http::Request};
    use blog_domain::EventKind;
    use http_body_util::BodyExt;
    use serde_json::{Value, json};
    use tower::ServiceExt;

    use super::*;

    const WITHIN: Duration = Duration::from_secs(10);

    async fn post_events(app: &Router, bearer: &str, body: Value) -> (axum::http::StatusCode, Value) {
        let request = Request::post("/events")
            .header("content-type", "application/json")
            .header("authorization", bearer)
            .body(Body::from(body.to_string()))
            .unwrap();
        let response = app.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }

    fn created(event_id: &str, comment_id: &str, content: &str) -> Value {
        json!({"id": event_id, "type": "CommentCreated", "data": {"id": comment_id, "content": content, "postId": "p1", "status": "pending"}})
    }

    #[tokio::test]
    async fn each_comment_is_decided_once_and_the_decision_published_once() {
        let test = kit().for_test().await.unwrap();
        let app = test.app(test.kit.serve(Router::new()).consumer(Moderator { rule: rule(&["orange"]) }));
        let bearer = test.bearer();
        let (status, report) = post_events(&app, &bearer, created("e1", "c1", "an Orange")).await;
        assert_eq!((status, report["applied"].as_u64()), (axum::http::StatusCode::OK, Some(1)), "{report}");
        // The same event again, and the same comment under another event id.
        let (_, again) = post_events(&app, &bearer, json!([created("e1", "c1", "an Orange"), created("e2", "c1", "an Orange")])).await;
        assert_eq!((again["applied"].as_u64(), again["duplicates"].as_u64()), (Some(1), Some(1)), "{again}");
        post_events(&app, &bearer, created("e3", "c2", "apples")).await;
        // Not moderation's business: acknowledged, ignored.
        let (_, ignored) = post_events(&app, &bearer, json!({"id": "e4", "type": "PostCreated", "data": {"id": "p9", "title": "t"}})).await;
        assert_eq!(ignored["ignored"].as_u64(), Some(1), "{ignored}");

        let events = test.bus.wait_for(2, WITHIN).await.unwrap();
        let decisions: Vec<(String, String)> = events
            .iter()
            .map(|e| {
                assert_eq!(e.kind, EventKind::CommentModerated);
                (e.data["id"].as_str().unwrap().to_owned(), e.data["status"].as_str().unwrap().to_owned())
            })
            .collect();
        assert_eq!(decisions, [("c1".to_owned(), "rejected".to_owned()), ("c2".to_owned(), "approved".to_owned())]);
        let stored: i64 = test.kit.read(|tx| tx.query_row("SELECT count(*) FROM decision", &[], |r| r.get(0))).await.unwrap();
        assert_eq!(stored, 2);
    }

    #[tokio::test]
    async fn malformed_events_are_refused_as_such_and_strangers_are_turned_away() {
        let test = kit().for_test().await.unwrap();
        let app = test.app(test.kit.serve(Router::new()).consumer(Moderator { rule: rule(&["orange"]) }));
        let bad = json!({"id": "e1", "type": "CommentCreated", "data": {"id": "c1"}});
        let request = |auth: &str| {
            Request::post("/events")
                .header("content-type", "application/json")
                .header("authorization", auth)
                .body(Body::from(bad.to_string()))
                .unwrap()
        };
        let refused = app.clone().oneshot(request(&test.bearer())).await.unwrap();
        assert_eq!(refused.status(), axum::http::StatusCode::BAD_REQUEST);
        assert!(refused.headers().contains_key(&blog_kit::internal::REFUSAL_HEADER), "marked as a refusal of the event");
        assert_eq!(
            app.clone().oneshot(request("Bearer not-the-secret-0123456")).await.unwrap().status(),
            axum::http::StatusCode::FORBIDDEN
        );
        assert!(test.bus.events().is_empty());
    }

    fn rule(words: &[&str]) -> Rule {
        Rule::new(&words.iter().map(|w| (*w).to_owned()).collect::<Vec<_>>())
    }

    #[test]
    fn orange_is_rejected_case_insensitively_by_default() {
        let rule = rule(&["orange"]);
        assert_eq!(rule.decide("I like apples"), CommentStatus::Approved);
        assert_eq!(rule.decide("an orange"), CommentStatus::Rejected);
        assert_eq!(rule.decide("ORANGES!"), CommentStatus::Rejected);
        assert_eq!(rule.decide("Orangé"), CommentStatus::Approved);
    }

    #[test]
    fn blocked_words_are_configurable() {
        let fruit = rule(&["Kiwi", "", "PLUM"]);
        assert_eq!(fruit.decide("kiwi"), CommentStatus::Rejected);
        assert_eq!(fruit.decide("a plum"), CommentStatus::Rejected);
        assert_eq!(fruit.decide("orange"), CommentStatus::Approved);
        assert_eq!(rule(&[]).decide("anything"), CommentStatus::Approved);
    }
}
