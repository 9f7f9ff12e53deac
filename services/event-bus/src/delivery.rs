//! Push delivery: one task per subscriber, each with its own persisted cursor.
//!
//! A subscriber gets the events after its cursor, in order, in batches (a
//! burst becomes a few requests, not one per event). The cursor moves only
//! after the subscriber acknowledged, so delivery is at-least-once and the
//! consumers' inboxes make it effectively-once. A subscriber that is down,
//! slow or answers 5xx is retried with exponential backoff and jitter in its
//! own task, so it never holds back the others. A subscriber that refuses an
//! event outright (our inbox's 4xx marked with
//! [`blog_common::internal::REFUSAL_HEADER`]) is sent the batch one event at a
//! time, and the event it refuses is counted and skipped rather than retried
//! forever. Any other 4xx (a wrong URL, a wrong secret, a proxy's page) says
//! nothing about the events: it is retried like a 5xx, logged as an error and
//! counted (`blog_bus_subscriber_misdirected_total`).

use std::sync::{Arc, Mutex};

use blog_common::{
    Event,
    internal::{self, InternalSecret},
    outbox::backoff,
    server::Shutdown,
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

enum Failure {
    /// Down, slow or 5xx: retry the same events later.
    Transient(String),
    /// The subscriber refused the request itself.
    Refused(String),
}

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

impl Deliverer {
    pub async fn run(mut self, shutdown: Shutdown) {
        let mut head = self.log.head();
        let mut failures = 0u32;
        loop {
            head.borrow_and_update();
            let events = match self.log.after(self.cursor, self.batch).await {
                Ok(events) => events,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the event log");
                    failures += 1;
                    if shutdown.sleep(backoff(failures)).await {
                        return;
                    }
                    continue;
                }
            };
            if events.is_empty() {
                tokio::select! {
                    _ = head.changed() => continue,
                    () = shutdown.wait() => return,
                }
            }
            match self.deliver(&events).await {
                Ok(()) => failures = 0,
                Err(error) => {
                    failures += 1;
                    tracing::warn!(subscriber = %self.subscriber.name, attempt = failures, %error, "delivery failed; will retry");
                    self.update(|s| {
                        s.retries += 1;
                        s.last_error = Some(error);
                    });
                    if shutdown.sleep(backoff(failures)).await {
                        return;
                    }
                }
            }
        }
    }

    /// Delivers `events`, advancing the cursor over what was acknowledged or
    /// refused; fails with the transient error that stopped it, if any.
    async fn deliver(&mut self, events: &[Event]) -> Result<(), String> {
        match self.push(events).await {
            Ok(()) => self.advance(events, 0).await,
            Err(Failure::Transient(e)) => Err(e),
            Err(Failure::Refused(e)) if events.len() == 1 => {
                tracing::error!(subscriber = %self.subscriber.name, event_id = %events[0].id, error = %e, "subscriber refused an event; skipped");
                self.advance(events, 1).await
            }
            Err(Failure::Refused(_)) => {
                for event in events {
                    Box::pin(self.deliver(std::slice::from_ref(event))).await?;
                }
                Ok(())
            }
        }
    }

    async fn push(&self, events: &[Event]) -> Result<(), Failure> {
        let request = self
            .http
            .post(&self.subscriber.url)
            .header(reqwest::header::AUTHORIZATION, self.secret.bearer())
            .header(internal::COVERS_AFTER_HEADER.clone(), self.cursor);
        let request = if let [single] = events { request.json(single) } else { request.json(events) };
        let response = request.send().await.map_err(|e| Failure::Transient(e.to_string()))?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let refused = internal::is_refusal(status, response.headers());
        let body: String = response.text().await.unwrap_or_default().chars().take(200).collect();
        let error = format!("{status}: {body}");
        if refused {
            Err(Failure::Refused(error))
        } else {
            if status.is_client_error() {
                // Not our inbox refusing the events: a wrong URL or secret.
                tracing::error!(subscriber = %self.subscriber.name, %error, "subscriber URL or secret is wrong; will retry");
                self.update(|s| s.misdirected += 1);
            }
            Err(Failure::Transient(error))
        }
    }

    async fn advance(&mut self, events: &[Event], rejected: u64) -> Result<(), String> {
        let Some(last) = events.last().and_then(|e| e.seq) else { return Ok(()) };
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
        Ok(())
    }

    fn update(&self, f: impl FnOnce(&mut SubscriberStatus)) {
        f(&mut self.status.lock().unwrap_or_else(|p| p.into_inner()));
    }
}
