//! A subscriber of the test's own, added to the bus's `SUBSCRIBERS`: it
//! records every event pushed to it (sequence number, id, when) in the order
//! the pushes arrive, and acknowledges them all, consuming every type. The
//! bus faults check with it that delivery per subscriber kept the log's order
//! and skipped nothing across a takeover.

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
    time::Instant,
};

use axum::{Json, Router, extract::State, routing::post};
use blog_domain::Service;
use blog_local::Options;
use serde_json::{Value, json};

/// One event as pushed.
#[derive(Debug, Clone)]
pub struct Receipt {
    pub seq: u64,
    pub id: String,
    pub at: Instant,
}

type Receipts = Arc<Mutex<Vec<Receipt>>>;

pub struct Recorder {
    /// Its `POST /events`.
    pub url: String,
    receipts: Receipts,
    server: tokio::task::JoinHandle<()>,
}

impl Recorder {
    /// The name it has among the bus's subscribers.
    pub const NAME: &str = "recorder";

    pub async fn start() -> Self {
        let receipts = Receipts::default();
        let app = Router::new().route("/events", post(record)).with_state(receipts.clone());
        // A port from the harness's registry (one the OS picked here could be
        // one another suite of this process chose and has not bound yet),
        // bound as it is chosen: nothing can take it in between.
        let listener = blog_kit::ports::free_listener();
        listener.set_nonblocking(true).expect("a non-blocking listener");
        let listener = tokio::net::TcpListener::from_std(listener).expect("a port for the recorder");
        let url = format!("http://{}/events", listener.local_addr().expect("its address"));
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { url, receipts, server }
    }

    /// Adds the recorder to the bus's subscribers, beside the usual ones.
    pub fn subscribe(&self, options: &mut Options) {
        let mut subscribers: Vec<String> =
            Service::SUBSCRIBERS.iter().map(|s| format!("{}={}/events", s.name(), options.url(*s))).collect();
        subscribers.push(format!("{}={}", Self::NAME, self.url));
        options.env.push((Service::EventBus, "SUBSCRIBERS".into(), subscribers.join(",")));
    }

    pub fn receipts(&self) -> Vec<Receipt> {
        self.receipts.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// When the first event pushed after `instant` arrived.
    pub fn first_after(&self, instant: Instant) -> Option<Instant> {
        self.receipts().into_iter().map(|r| r.at).find(|at| *at > instant)
    }

    /// Checks the receipts against the log (`(seq, id)` of every event, in
    /// order): the first receipt of each event comes in the log's order and
    /// together they cover the whole log, nothing skipped; a redelivered
    /// event carries its first number. Returns (events, redeliveries).
    pub fn check_order(&self, log: &[(u64, String)]) -> Result<(usize, usize), String> {
        let receipts = self.receipts();
        let mut seen = HashSet::new();
        let mut first: Vec<(u64, String)> = Vec::new();
        let mut redelivered = 0;
        for receipt in &receipts {
            if seen.insert(receipt.id.clone()) {
                if let Some((last, _)) = first.last()
                    && receipt.seq <= *last
                {
                    return Err(format!("event {} (seq {}) first arrived after seq {last}", receipt.id, receipt.seq));
                }
                first.push((receipt.seq, receipt.id.clone()));
            } else {
                redelivered += 1;
                if !first.iter().any(|(seq, id)| *id == receipt.id && *seq == receipt.seq) {
                    return Err(format!("event {} came again as seq {}", receipt.id, receipt.seq));
                }
            }
        }
        if first != log {
            let missing: Vec<_> = log.iter().filter(|e| !first.contains(e)).take(5).collect();
            return Err(format!("received {} of {} events; missing (first 5): {missing:?}", first.len(), log.len()));
        }
        Ok((first.len(), redelivered))
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// Records a push (one event, a batch, or the empty question of what it consumes) as one step.
async fn record(State(receipts): State<Receipts>, Json(body): Json<Value>) -> Json<Value> {
    let at = Instant::now();
    let events = match body {
        Value::Array(events) => events,
        event => vec![event],
    };
    let mut receipts = receipts.lock().unwrap_or_else(|p| p.into_inner());
    for event in events {
        if let (Some(seq), Some(id)) = (event["seq"].as_u64(), event["id"].as_str()) {
            receipts.push(Receipt { seq, id: id.to_owned(), at });
        }
    }
    Json(json!({"status": "OK"}))
}
