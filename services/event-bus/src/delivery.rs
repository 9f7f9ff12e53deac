//! Push delivery: one task per subscriber, each with its own persisted cursor.
//!
//! A subscriber gets the events after its cursor, in order, in batches (a
//! burst becomes a few requests, not one per event). The cursor moves only
//! after the subscriber acknowledged, so delivery is at-least-once and the
//! consumers' inboxes make it effectively-once. A subscriber that is down,
//! slow or answers 5xx is retried with exponential backoff and jitter in its
//! own task, so it never holds back the others. A subscriber that refuses an
//! event outright (our inbox's 4xx marked with
//! [`blog_kit::internal::REFUSAL_HEADER`]) is sent the batch one event at a
//! time, and the event it refuses is counted and skipped rather than retried
//! forever. Any other 4xx (a wrong URL, a wrong secret, a proxy's page) says
//! nothing about the events: it is retried like a 5xx, logged as an error and
//! counted (`blog_bus_subscriber_misdirected_total`). The loop, the backoff,
//! the transient rule and the batch splitting are the kit's
//! ([`blog_kit::messaging::retry`]), shared with the services' relays.

use std::sync::{Arc, Mutex};

use blog_domain::Event;
use blog_kit::{
    Shutdown, StoreError,
    internal::InternalSecret,
    messaging::{
        bus_client::post_events,
        retry::{self, DeliveryError, Handover, Pass, Worker},
    },
};
use serde::Serialize;

use crate::{
    flow::{Delivered, Flow, millis_since},
    log::{EventLog, now_millis},
};

/// A subscriber from configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscriber {
    pub name: String,
    /// The full URL of its `POST /events`.
    pub url: String,
}

/// What the bus knows about one subscriber's delivery.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SubscriberStatus {
    pub name: String,
    pub url: String,
    pub cursor: u64,
    pub lag: u64,
    pub delivered: u64,
    pub retries: u64,
    pub rejected: u64,
    /// 4xx answers that did not refuse the events (a wrong URL or secret); retried.
    pub misdirected: u64,
    pub last_error: Option<String>,
    /// Unix milliseconds of the last acknowledged delivery.
    pub last_delivery_at: Option<i64>,
}

pub type SharedStatus = Arc<Mutex<SubscriberStatus>>;

#[derive(Clone)]
pub struct Deliverer {
    pub subscriber: Subscriber,
    pub log: EventLog,
    pub http: reqwest::Client,
    pub secret: InternalSecret,
    pub status: SharedStatus,
    pub flow: tokio::sync::broadcast::Sender<Flow>,
    pub batch: u32,
    pub cursor: u64,
}

/// Why a pass of a deliverer failed.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryFailure {
    #[error("cannot read the event log: {0}")]
    Log(#[from] StoreError),
    #[error("delivery failed: {0}")]
    Subscriber(#[from] DeliveryError),
}

impl Deliverer {
    pub async fn run(self, shutdown: Shutdown) {
        let head = self.log.head();
        retry::run(Delivery { deliverer: self, head }, shutdown).await;
    }

    async fn advance(&mut self, events: &[Event], rejected: u64) {
        let Some(last) = events.last().and_then(|e| e.seq) else { return };
        self.cursor = last;
        // Losing this write only means redelivering events the subscriber
        // will recognise, so it does not stop delivery.
        if let Err(e) = self.log.save_cursor(&self.subscriber.name, last).await {
            tracing::error!(error = %e, "cannot persist the delivery cursor");
        }
        if self.flow.receiver_count() > 0 {
            for event in events {
                let record = Delivered {
                    seq: event.seq.unwrap_or(0),
                    id: event.id.clone(),
                    kind: event.kind.clone(),
                    subscriber: self.subscriber.name.clone(),
                    lag_ms: millis_since(event.timestamp.as_deref()),
                };
                let _ = self.flow.send(Flow::Delivered(record));
            }
        }
        let head = self.log.head_now();
        let delivered = events.len() as u64 - rejected;
        self.update(|s| {
            s.cursor = last;
            s.lag = head.saturating_sub(last);
            s.delivered += delivered;
            s.rejected += rejected;
            s.last_error = None;
            s.last_delivery_at = Some(now_millis());
        });
    }

    fn update(&self, f: impl FnOnce(&mut SubscriberStatus)) {
        f(&mut self.status.lock().unwrap_or_else(|p| p.into_inner()));
    }
}

/// A deliverer on the shared loop: each pass pushes the next batch after the
/// cursor; idle until the log's head moves.
struct Delivery {
    deliverer: Deliverer,
    head: tokio::sync::watch::Receiver<u64>,
}

impl Worker for Delivery {
    type Error = DeliveryFailure;

    async fn pass(&mut self) -> Result<Pass, DeliveryFailure> {
        self.head.borrow_and_update();
        let events = self.deliverer.log.after(self.deliverer.cursor, self.deliverer.batch).await?;
        if events.is_empty() {
            return Ok(Pass::Idle);
        }
        retry::hand_over(&mut self.deliverer, &events).await?;
        Ok(Pass::Worked)
    }

    async fn idle(&mut self) {
        // A closed channel means the log is gone: nothing will come.
        if self.head.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    fn failed(&mut self, error: &DeliveryFailure, attempt: u32) {
        let subscriber = &self.deliverer.subscriber.name;
        match error {
            DeliveryFailure::Subscriber(e) if e.is_misdirected() => {
                tracing::error!(%subscriber, attempt, error = %e, "subscriber URL or secret is wrong; will retry");
                self.deliverer.update(|s| s.misdirected += 1);
            }
            DeliveryFailure::Subscriber(_) => tracing::warn!(%subscriber, attempt, %error, "delivery failed; will retry"),
            DeliveryFailure::Log(_) => tracing::error!(%subscriber, attempt, %error, "cannot read the event log; will retry"),
        }
        let message = error.to_string();
        self.deliverer.update(|s| {
            s.retries += 1;
            s.last_error = Some(message);
        });
    }
}

impl Handover for Deliverer {
    type Item = Event;

    async fn send(&mut self, events: &[Event]) -> Result<(), DeliveryError> {
        post_events(&self.http, &self.subscriber.url, &self.secret, events, Some(self.cursor)).await
    }

    async fn accepted(&mut self, events: &[Event]) {
        self.advance(events, 0).await;
    }

    async fn refused(&mut self, event: &Event, error: &DeliveryError) {
        tracing::error!(subscriber = %self.subscriber.name, event_id = %event.id, %error, "subscriber refused an event; skipped");
        self.advance(std::slice::from_ref(event), 1).await;
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::atomic::{AtomicU16, Ordering},
        time::Duration,
    };

    use axum::{Json, Router, extract::State, http::StatusCode, response::IntoResponse, routing::post};
    use blog_kit::{http::client::http_client, store::Store};
    use serde_json::Value;

    use super::*;

    const SECRET: &str = "delivery-test-secret-0123456789";

    /// A subscriber recording what it acknowledges; it answers `answer` (200
    /// by default) and refuses, marked, any request holding the id "bad".
    #[derive(Clone, Default)]
    struct Subscriber {
        acknowledged: Arc<Mutex<Vec<String>>>,
        answer: Arc<AtomicU16>,
    }

    async fn receive(State(subscriber): State<Subscriber>, Json(body): Json<Value>) -> axum::response::Response {
        let answer = StatusCode::from_u16(subscriber.answer.load(Ordering::SeqCst)).unwrap_or(StatusCode::OK);
        if answer != StatusCode::OK {
            return answer.into_response();
        }
        let events = match body {
            Value::Array(items) => items,
            single => vec![single],
        };
        let ids: Vec<String> = events.iter().map(|e| e["id"].as_str().unwrap_or_default().to_owned()).collect();
        if ids.iter().any(|id| id == "bad") {
            return blog_kit::internal::mark_refusal(StatusCode::BAD_REQUEST.into_response());
        }
        subscriber.acknowledged.lock().unwrap().extend(ids);
        StatusCode::OK.into_response()
    }

    async fn until(what: &str, check: impl Fn() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while !check() {
            assert!(tokio::time::Instant::now() < deadline, "{what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn event(id: &str) -> Event {
        Event::from_value(serde_json::json!({"id": id, "type": "PostCreated", "data": {"id": id, "title": "t"}})).unwrap()
    }

    #[tokio::test]
    async fn a_refused_event_is_skipped_a_misdirected_answer_retried_and_the_rest_delivered_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let log = EventLog::open(Store::open(dir.path(), "event-bus", crate::log::MIGRATIONS).unwrap()).await.unwrap();
        let subscriber = Subscriber::default();
        subscriber.answer.store(404, Ordering::SeqCst);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/events", listener.local_addr().unwrap());
        let shutdown = Shutdown::new(std::future::pending());
        tokio::spawn(blog_kit::http::serve::serve(
            listener,
            Router::new().route("/events", post(receive)).with_state(subscriber.clone()),
            shutdown.clone(),
        ));
        let status = SharedStatus::default();
        let deliverer = Deliverer {
            subscriber: super::Subscriber { name: "query".into(), url },
            log: log.clone(),
            http: http_client(Duration::from_secs(5)),
            secret: InternalSecret::parse(SECRET).unwrap(),
            status: status.clone(),
            flow: log.flow().clone(),
            batch: 16,
            cursor: 0,
        };
        tokio::spawn(deliverer.run(shutdown));
        log.append(vec![event("a"), event("bad"), event("c")]).await.unwrap();

        let read = || status.lock().unwrap().clone();
        until("a wrong URL is counted and retried", || read().misdirected >= 2).await;
        assert!(subscriber.acknowledged.lock().unwrap().is_empty());
        assert_eq!(read().cursor, 0, "nothing is skipped for a fault of the path");
        subscriber.answer.store(200, Ordering::SeqCst);
        until("the subscriber has what it accepts", || read().cursor == 3).await;
        assert_eq!(*subscriber.acknowledged.lock().unwrap(), ["a", "c"]);
        let done = read();
        assert_eq!((done.delivered, done.rejected, done.lag, done.last_error), (2, 1, 0, None));
        assert!(done.retries >= 2);
        assert_eq!(log.cursors().await.unwrap(), [("query".to_owned(), 3)], "the cursor is persisted");
    }
}
