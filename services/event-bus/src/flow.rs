//! The bus's live feed for people watching the event flow (the UI's "event
//! flow" panel): each event as it is stored, and each acknowledgement by a
//! subscriber with how long the event took to get there. It carries the
//! events' own fields only, nothing about the requests or addresses behind them.

use std::time::SystemTime;

use axum::response::sse;
use blog_domain::EventKind;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Records buffered for a slow watcher before it is told to resync.
pub const BUFFER: usize = 4_096;

#[derive(Debug, Clone)]
pub enum Flow {
    Published(Published),
    Delivered(Delivered),
}

#[derive(Debug, Clone, Serialize)]
pub struct Published {
    pub seq: u64,
    pub id: String,
    #[serde(rename = "type")]
    pub kind: EventKind,
    pub data: Map<String, Value>,
    pub timestamp: String,
}

/// On JetStream it also travels between replicas (`log::jetstream::DELIVERED_SUBJECT`), in this shape.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Delivered {
    pub seq: u64,
    pub id: String,
    #[serde(rename = "type")]
    pub kind: EventKind,
    pub subscriber: String,
    /// From the event being stored to the subscriber acknowledging it.
    pub lag_ms: u64,
}

impl Flow {
    pub fn to_sse(&self) -> sse::Event {
        let (name, json) = match self {
            Flow::Published(p) => ("published", serde_json::to_string(p)),
            Flow::Delivered(d) => ("delivered", serde_json::to_string(d)),
        };
        sse::Event::default().event(name).data(json.unwrap_or_else(|_| "{}".to_owned()))
    }
}

/// Milliseconds from an RFC 3339 `timestamp` until now (0 if unreadable).
pub fn millis_since(timestamp: Option<&str>) -> u64 {
    timestamp
        .and_then(|t| humantime::parse_rfc3339(t).ok())
        .and_then(|at| SystemTime::now().duration_since(at).ok())
        .map_or(0, |d| d.as_millis() as u64)
}
