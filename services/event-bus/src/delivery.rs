//! Push delivery: one task per subscriber, each with its own persisted cursor.
//!
//! A subscriber gets the events after its cursor, in order, in batches (a
//! burst becomes a few requests, not one per event): only the types it
//! consumes, which a consumer names in every answer
//! ([`blog_kit::internal::CONSUMES_HEADER`]; before its first delivery the
//! bus asks with an empty push, and a subscriber that names none gets every
//! event). Each push says, in [`blog_kit::internal::COVERS_AFTER_HEADER`],
//! the last event the subscriber acknowledged, so its replay watermark moves
//! over the events it was not sent. The cursor moves only after the
//! subscriber acknowledged, so delivery is at-least-once and the
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

use blog_domain::{Event, EventKind};
use blog_kit::{
    Shutdown, StoreError,
    internal::{self, InternalSecret},
    messaging::{
        bus_client::{OutboundCalls, Peer, post_events},
        retry::{self, DeliveryError, Handover, Pass, Worker},
    },
    telemetry,
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
    /// Where in the log delivery has got to: everything up to it was
    /// acknowledged, refused, or is of a type the subscriber does not consume.
    pub cursor: u64,
    /// The last sequence number the subscriber acknowledged (at start, the
    /// persisted cursor), sent as [`internal::COVERS_AFTER_HEADER`]: the next
    /// push holds everything after it that the subscriber consumes, so its
    /// watermark moves over the events skipped in between. Only this is
    /// persisted: a restarted bus goes through the skipped events again
    /// rather than claim a coverage the subscriber never heard of.
    pub acked: u64,
    /// What the subscriber said it consumes; `None` until it answered a push,
    /// and again after a push failed (it may have been replaced by a
    /// version that consumes other types).
    pub consumes: Option<Consumes>,
    /// The timings of pushes, shared by every deliverer (labelled by subscriber).
    pub calls: OutboundCalls,
}

/// What a subscriber consumes, as it declared it (see [`internal::CONSUMES_HEADER`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Consumes {
    Everything,
    Only(Vec<EventKind>),
}

impl Consumes {
    /// From an answer's headers: the declared types, or every type without a declaration.
    fn from_headers(headers: &reqwest::header::HeaderMap) -> Self {
        internal::consumed(headers).map_or(Consumes::Everything, Consumes::Only)
    }

    fn wants(&self, event: &Event) -> bool {
        match self {
            Consumes::Everything => true,
            Consumes::Only(kinds) => kinds.contains(&event.kind),
        }
    }
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

    /// An empty push, to learn what the subscriber consumes. One that
    /// refuses it outright is taken to consume everything.
    async fn ask(&mut self) -> Result<(), DeliveryError> {
        match self.send(&[]).await {
            Ok(()) => {}
            Err(e) if e.is_transient() => return Err(e),
            Err(_) => self.consumes = Some(Consumes::Everything),
        }
        tracing::info!(subscriber = %self.subscriber.name, consumes = ?self.consumes, "subscriber says what it consumes");
        Ok(())
    }

    /// Moves past events the subscriber does not consume, up to `through`.
    /// Not persisted (see [`Deliverer::acked`]).
    fn skip_to(&mut self, through: u64) {
        if through <= self.cursor {
            return;
        }
        self.cursor = through;
        let head = self.log.head_now();
        self.update(|s| {
            s.cursor = through;
            s.lag = head.saturating_sub(through);
        });
    }

    async fn advance(&mut self, events: &[Event], rejected: u64) {
        let Some(last) = events.last().and_then(|e| e.seq) else { return };
        self.cursor = last;
        self.acked = last;
        // Saved shortly, with the other cursors that move meanwhile.
        self.log.cursor_moved(&self.subscriber.name, last);
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

    /// A consistency-lag mark naming this subscriber (see [`telemetry::lag_mark`]).
    fn mark(&self, point: &str, events: &[Event]) {
        if telemetry::lag_traced() {
            telemetry::lag_mark(&format!("{point}:{}", self.subscriber.name), events.iter().map(|e| e.id.as_str()));
        }
    }

    fn update(&self, f: impl FnOnce(&mut SubscriberStatus)) {
        f(&mut self.status.lock().unwrap_or_else(|p| p.into_inner()));
    }
}

/// A deliverer on the shared loop: each pass pushes the next batch after the
/// cursor, less what the subscriber does not consume; idle until the log's
/// head moves.
struct Delivery {
    deliverer: Deliverer,
    head: tokio::sync::watch::Receiver<u64>,
}

impl Worker for Delivery {
    type Error = DeliveryFailure;

    async fn pass(&mut self) -> Result<Pass, DeliveryFailure> {
        self.head.borrow_and_update();
        let deliverer = &mut self.deliverer;
        let events = deliverer.log.after(deliverer.cursor, deliverer.batch).await?;
        let Some(through) = events.last().and_then(|e| e.seq) else { return Ok(Pass::Idle) };
        // Asked before the first events go out, so even those are only the
        // ones the subscriber consumes.
        let Some(consumes) = deliverer.consumes.clone() else {
            deliverer.ask().await?;
            return Ok(Pass::Worked);
        };
        let wanted: Vec<Event> = events.into_iter().filter(|e| consumes.wants(e)).collect();
        if !wanted.is_empty() {
            retry::hand_over(deliverer, &wanted).await?;
        }
        deliverer.skip_to(through);
        Ok(Pass::Worked)
    }

    async fn idle(&mut self) {
        // A closed channel means the log is gone: nothing will come.
        if self.head.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    fn longest_wait(&self, error: &DeliveryFailure) -> std::time::Duration {
        match error {
            DeliveryFailure::Subscriber(e) => e.longest_wait(),
            DeliveryFailure::Log(_) => retry::MAX_BACKOFF,
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
        if matches!(error, DeliveryFailure::Subscriber(_)) {
            // Whoever answers next is asked again what it consumes.
            self.deliverer.consumes = None;
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
        self.mark("push.sent", events);
        let peer = Peer { url: &self.subscriber.url, name: &self.subscriber.name, calls: &self.calls };
        // One `deliver` span per event, continuing its trace, for as long as the push takes.
        let spans: Vec<tracing::Span> = events
            .iter()
            .map(|event| {
                let span = tracing::info_span!("deliver", subscriber = %self.subscriber.name, event_id = %event.id, kind = %event.kind, trace_id = tracing::field::Empty);
                telemetry::continue_trace(&span, event.trace());
                span
            })
            .collect();
        let answer = post_events(&self.http, peer, &self.secret, events, Some(self.acked)).await;
        for span in &spans {
            tracing::debug!(parent: span, ok = answer.is_ok(), "event pushed");
        }
        drop(spans);
        self.mark("push.answered", events);
        self.consumes = Some(Consumes::from_headers(&answer?));
        Ok(())
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

    /// Serves `app` on a free port and starts a deliverer of `log` to it, as
    /// subscriber `name`, from cursor 0; returns the deliverer's status and
    /// the metrics its pushes are recorded in.
    async fn deliver_to(log: &EventLog, name: &str, app: Router, batch: u32) -> (SharedStatus, blog_kit::metrics::Registry) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/events", listener.local_addr().unwrap());
        let shutdown = Shutdown::new(std::future::pending());
        tokio::spawn(blog_kit::http::serve::serve(listener, app, shutdown.clone()));
        let status = SharedStatus::default();
        let deliverer = Deliverer {
            subscriber: super::Subscriber { name: name.into(), url },
            log: log.clone(),
            http: http_client(Duration::from_secs(5)),
            secret: InternalSecret::parse(SECRET).unwrap(),
            status: status.clone(),
            flow: log.flow().clone(),
            batch,
            cursor: 0,
            acked: 0,
            consumes: None,
            calls: OutboundCalls::default(),
        };
        let metrics = blog_kit::metrics::Registry::default();
        deliverer.calls.register(&metrics);
        tokio::spawn(log.clone().save_moved_cursors(shutdown.clone()));
        tokio::spawn(deliverer.run(shutdown));
        (status, metrics)
    }

    #[tokio::test]
    async fn a_refused_event_is_skipped_a_misdirected_answer_retried_and_the_rest_delivered_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let log = EventLog::open(Store::open(dir.path(), "event-bus", crate::log::MIGRATIONS).unwrap()).await.unwrap();
        let subscriber = Subscriber::default();
        subscriber.answer.store(404, Ordering::SeqCst);
        let (status, metrics) =
            deliver_to(&log, "query", Router::new().route("/events", post(receive)).with_state(subscriber.clone()), 16).await;
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
        crate::log::tests::saved(&log, &[("query", 3)]).await;
        // Every push is timed by subscriber and outcome: the 404s as errors,
        // the refusal of "bad" once, and the deliveries that went through.
        let text = metrics.render();
        let calls = |outcome: &str| {
            let series = format!("blog_outbound_request_duration_seconds_count{{peer=\"query\",outcome=\"{outcome}\"}} ");
            text.lines().find_map(|l| l.strip_prefix(&series)).map_or(0, |n| n.parse::<u64>().unwrap())
        };
        assert_eq!(calls("error"), done.misdirected, "{text}");
        assert_eq!(calls("refused"), 2, "the batch, then \"bad\" alone: {text}");
        assert!(calls("ok") >= 2, "{text}");
    }

    /// A push as a subscriber saw it: its `x-blog-covers-after` and the
    /// sequence numbers it carried.
    type Push = (u64, Vec<u64>);

    /// A subscriber that consumes only `PostCreated`, recording each push it
    /// acknowledges: its `x-blog-covers-after` and the sequence numbers it
    /// carried. It answers `answer` (200 by default).
    #[derive(Clone, Default)]
    struct PostsOnly {
        pushes: Arc<Mutex<Vec<Push>>>,
        answer: Arc<AtomicU16>,
    }

    async fn receive_posts(
        State(subscriber): State<PostsOnly>,
        headers: axum::http::HeaderMap,
        Json(body): Json<Value>,
    ) -> axum::response::Response {
        let answer = StatusCode::from_u16(subscriber.answer.load(Ordering::SeqCst)).unwrap_or(StatusCode::OK);
        if answer != StatusCode::OK {
            return answer.into_response();
        }
        let covers = headers[&internal::COVERS_AFTER_HEADER].to_str().unwrap().parse().unwrap();
        let seqs = match body {
            Value::Array(events) => events.iter().filter_map(|e| e["seq"].as_u64()).collect(),
            single => single["seq"].as_u64().into_iter().collect(),
        };
        subscriber.pushes.lock().unwrap().push((covers, seqs));
        let consumes = internal::consumes_value(&[EventKind::PostCreated]).unwrap();
        ([(internal::CONSUMES_HEADER.clone(), consumes)], "{}").into_response()
    }

    fn typed(id: &str, kind: &str) -> Event {
        Event::from_value(serde_json::json!({"id": id, "type": kind, "data": {"id": id, "postId": "p", "title": "t", "content": "c", "status": "pending"}}))
            .unwrap()
    }

    #[tokio::test]
    async fn a_subscriber_is_pushed_only_what_it_consumes_and_told_what_the_push_covers() {
        let dir = tempfile::tempdir().unwrap();
        let log = EventLog::open(Store::open(dir.path(), "event-bus", crate::log::MIGRATIONS).unwrap()).await.unwrap();
        log.append(vec![typed("a", "PostCreated"), typed("b", "CommentCreated"), typed("c", "CommentCreated"), typed("d", "PostCreated")])
            .await
            .unwrap();
        let subscriber = PostsOnly::default();
        subscriber.answer.store(200, Ordering::SeqCst);
        let app = Router::new().route("/events", post(receive_posts)).with_state(subscriber.clone());
        let (status, _) = deliver_to(&log, "posts-only", app, 100).await;
        let read = || status.lock().unwrap().clone();
        let pushes = || subscriber.pushes.lock().unwrap().clone();

        until("the posts are delivered", || read().cursor == 4).await;
        // Asked first with an empty push, then given the two posts, covering the log from 0.
        assert_eq!(pushes(), [(0, vec![]), (0, vec![1, 4])]);

        // A comment alone: moved over, not pushed, and not persisted as
        // acknowledged (the subscriber's watermark never heard of it).
        log.append(vec![typed("e", "CommentCreated")]).await.unwrap();
        until("the comment is moved over", || read().cursor == 5).await;
        assert_eq!((pushes().len(), read().lag), (2, 0));
        crate::log::tests::saved(&log, &[("posts-only", 4)]).await;

        // The next post covers everything after what the subscriber acknowledged.
        log.append(vec![typed("f", "PostCreated")]).await.unwrap();
        until("the next post is delivered", || read().cursor == 6).await;
        assert_eq!(pushes()[2], (4, vec![6]));
        assert_eq!((read().delivered, read().lag), (3, 0));

        // After a failed push, whoever answers next is asked again first.
        subscriber.answer.store(503, Ordering::SeqCst);
        log.append(vec![typed("g", "PostCreated")]).await.unwrap();
        until("the failure is retried", || read().retries >= 1).await;
        subscriber.answer.store(200, Ordering::SeqCst);
        until("the post is delivered after the failure", || read().cursor == 7).await;
        assert_eq!(pushes()[3..], [(6, vec![]), (6, vec![7])]);
        crate::log::tests::saved(&log, &[("posts-only", 7)]).await;
    }
}
