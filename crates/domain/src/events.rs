//! The event envelope and the suite's event types, defined once.
//!
//! The envelope keeps the original app's `type` and `data` so its payloads stay
//! valid, and adds what a real log needs: a unique `id` (the idempotency key
//! end to end), the bus-assigned `seq`, a `timestamp` and the `requestId` of the
//! HTTP request that caused it, so one post can be followed across services,
//! and its W3C `traceparent` (see [`crate::trace`]), so a tracing system can
//! too. Both are optional: the original's payloads without them stay valid,
//! and an envelope without them is written without them.
//! An event without an id gets one derived from its content, so a client that
//! retries an id-less event still publishes it once.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::trace::TraceParent;

/// The type of an event: the suite's four, or one this version does not
/// know, kept by name so it passes through the bus unchanged.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum EventKind {
    PostCreated,
    CommentCreated,
    CommentModerated,
    CommentUpdated,
    /// A type this version does not know: stored and relayed as written,
    /// acknowledged and ignored by consumers.
    Unknown(String),
}

impl EventKind {
    /// The suite's four types, in the order a comment's life shows them.
    pub const KNOWN: [EventKind; 4] =
        [EventKind::PostCreated, EventKind::CommentCreated, EventKind::CommentModerated, EventKind::CommentUpdated];

    /// The name on the wire (the original's `type`).
    pub fn as_str(&self) -> &str {
        match self {
            EventKind::PostCreated => "PostCreated",
            EventKind::CommentCreated => "CommentCreated",
            EventKind::CommentModerated => "CommentModerated",
            EventKind::CommentUpdated => "CommentUpdated",
            EventKind::Unknown(name) => name,
        }
    }

    /// The kind named `name`; any name is a kind.
    pub fn named(name: &str) -> Self {
        Self::KNOWN.into_iter().find(|kind| kind.as_str() == name).unwrap_or_else(|| EventKind::Unknown(name.to_owned()))
    }
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<String> for EventKind {
    fn from(name: String) -> Self {
        match Self::named(&name) {
            EventKind::Unknown(_) => EventKind::Unknown(name),
            known => known,
        }
    }
}

impl Serialize for EventKind {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for EventKind {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(EventKind::from)
    }
}

const MAX_ID_LEN: usize = 128;

/// An event as stored by the bus and delivered to subscribers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    #[serde(rename = "type")]
    pub kind: EventKind,
    pub data: Map<String, Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<String>,
    #[serde(rename = "requestId", default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// The trace context of the span that published it (W3C `traceparent`).
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "valid_traceparent")]
    pub traceparent: Option<String>,
}

/// A `traceparent` as read from a stored event: kept only when valid.
fn valid_traceparent<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<String>, D::Error> {
    Ok(Option::<Value>::deserialize(deserializer)?.and_then(|v| v.as_str().and_then(TraceParent::parse)).map(|p| p.to_string()))
}

/// Why an event was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    #[error("an event must be a JSON object")]
    NotAnObject,
    #[error("event `type` must be a non-empty string of at most 128 characters, without control characters")]
    BadType,
    #[error("event `data` must be a JSON object")]
    BadData,
    #[error("event `id` must be a non-empty string of at most 128 characters, without control characters")]
    BadId,
    #[error("event `seq` must be a non-negative integer")]
    BadSeq,
    #[error("invalid {kind} data: {reason}")]
    Invalid { kind: String, reason: String },
}

impl Event {
    /// A new event for `domain`, with a fresh time-ordered id.
    pub fn new(domain: &DomainEvent, request_id: Option<String>) -> Self {
        Self {
            id: Uuid::now_v7().to_string(),
            seq: None,
            kind: domain.kind(),
            data: domain.data(),
            timestamp: None,
            request_id,
            traceparent: None,
        }
    }

    /// The trace this event belongs to, when it carries a valid one.
    pub fn trace(&self) -> Option<TraceParent> {
        self.traceparent.as_deref().and_then(TraceParent::parse)
    }

    /// An event caused by `cause` (a decision on a comment, a recorded
    /// decision). Its id is derived from the cause's, so applying the cause
    /// again, after a replay, stages the very same event and the bus keeps it once.
    /// It continues the cause's request id and trace (the consumer's apply
    /// span, when the kit applies it, becomes its parent).
    pub fn caused_by(cause: &Event, domain: &DomainEvent) -> Self {
        let id = Uuid::new_v5(&Uuid::NAMESPACE_OID, format!("{}/{}", cause.id, domain.kind()).as_bytes());
        Self { id: id.to_string(), traceparent: cause.traceparent.clone(), ..Self::new(domain, cause.request_id.clone()) }
    }

    /// Parses an untrusted JSON value into an envelope, checking the envelope
    /// only; [`DomainEvent::parse`] checks the data of known types.
    pub fn from_value(value: Value) -> Result<Self, EventError> {
        let Value::Object(mut object) = value else {
            return Err(EventError::NotAnObject);
        };
        let kind = match object.remove("type") {
            Some(Value::String(kind)) if printable(&kind) => EventKind::from(kind),
            _ => return Err(EventError::BadType),
        };
        let data = match object.remove("data") {
            Some(Value::Object(data)) => data,
            _ => return Err(EventError::BadData),
        };
        let seq = match object.remove("seq") {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) => Some(n.as_u64().ok_or(EventError::BadSeq)?),
            Some(_) => return Err(EventError::BadSeq),
        };
        let id = match object.remove("id") {
            None | Some(Value::Null) => content_id(kind.as_str(), &data),
            Some(Value::String(id)) if printable(&id) => id,
            Some(_) => return Err(EventError::BadId),
        };
        let text = |v: Option<Value>| match v {
            Some(Value::String(s)) => Some(s),
            _ => None,
        };
        let traceparent = text(object.remove("traceparent")).and_then(|t| TraceParent::parse(&t)).map(|p| p.to_string());
        Ok(Self {
            id,
            seq,
            kind,
            data,
            timestamp: text(object.remove("timestamp")),
            request_id: text(object.remove("requestId")),
            traceparent,
        })
    }

    /// The typed form of this event ([`DomainEvent::Other`] for types this
    /// version does not know).
    pub fn domain(&self) -> Result<DomainEvent, EventError> {
        DomainEvent::parse(&self.kind, &self.data)
    }
}

/// Whether an id or type is fit to store and log: not blank, at most
/// [`MAX_ID_LEN`] bytes, no control characters (which would reach text logs raw).
fn printable(text: &str) -> bool {
    !text.trim().is_empty() && text.len() <= MAX_ID_LEN && !text.chars().any(char::is_control)
}

/// The id of an event that came without one: a UUIDv5 of its type and data,
/// so the same id-less event published twice is stored once.
fn content_id(kind: &str, data: &Map<String, Value>) -> String {
    // serde_json's map is ordered by key, so this rendering is canonical.
    let canonical = format!("{kind}\n{}", Value::Object(data.clone()));
    Uuid::new_v5(&Uuid::NAMESPACE_OID, canonical.as_bytes()).to_string()
}

/// A comment's moderation state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CommentStatus {
    Pending,
    Approved,
    Rejected,
}

impl CommentStatus {
    pub const fn as_str(self) -> &'static str {
        match self {
            CommentStatus::Pending => "pending",
            CommentStatus::Approved => "approved",
            CommentStatus::Rejected => "rejected",
        }
    }
}

/// A stored or sent status that is none of the three: a corrupt row or a
/// foreign writer. Never read as `pending`: it fails the read that met it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown comment status {0:?}")]
pub struct UnknownStatus(pub String);

impl std::str::FromStr for CommentStatus {
    type Err = UnknownStatus;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "pending" => Ok(CommentStatus::Pending),
            "approved" => Ok(CommentStatus::Approved),
            "rejected" => Ok(CommentStatus::Rejected),
            other => Err(UnknownStatus(other.to_owned())),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PostCreated {
    pub id: String,
    pub title: String,
}

/// The data of `CommentCreated`, `CommentModerated` and `CommentUpdated`,
/// which carry the same fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CommentData {
    pub id: String,
    pub content: String,
    pub post_id: String,
    pub status: CommentStatus,
}

/// The typed events of the suite.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DomainEvent {
    PostCreated(PostCreated),
    CommentCreated(CommentData),
    CommentModerated(CommentData),
    CommentUpdated(CommentData),
    /// A type this version does not know: acknowledged and ignored, so new
    /// event types can be introduced without older consumers refusing them.
    Other(String),
}

impl DomainEvent {
    /// Checks the data of a known type; unknown types are [`DomainEvent::Other`].
    pub fn parse(kind: &EventKind, data: &Map<String, Value>) -> Result<Self, EventError> {
        fn typed<T: serde::de::DeserializeOwned>(kind: &str, data: &Map<String, Value>) -> Result<T, EventError> {
            serde_json::from_value(Value::Object(data.clone()))
                .map_err(|e| EventError::Invalid { kind: kind.to_owned(), reason: e.to_string() })
        }
        let name = kind.as_str();
        let event = match kind {
            EventKind::PostCreated => DomainEvent::PostCreated(typed(name, data)?),
            EventKind::CommentCreated => DomainEvent::CommentCreated(typed(name, data)?),
            EventKind::CommentModerated => DomainEvent::CommentModerated(typed(name, data)?),
            EventKind::CommentUpdated => DomainEvent::CommentUpdated(typed(name, data)?),
            EventKind::Unknown(name) => return Ok(DomainEvent::Other(name.clone())),
        };
        let ids_present = match &event {
            DomainEvent::PostCreated(p) => !p.id.is_empty(),
            DomainEvent::CommentCreated(c) | DomainEvent::CommentModerated(c) | DomainEvent::CommentUpdated(c) => {
                !c.id.is_empty() && !c.post_id.is_empty()
            }
            DomainEvent::Other(_) => true,
        };
        if ids_present { Ok(event) } else { Err(EventError::Invalid { kind: name.to_owned(), reason: "ids must not be empty".to_owned() }) }
    }

    pub fn kind(&self) -> EventKind {
        match self {
            DomainEvent::PostCreated(_) => EventKind::PostCreated,
            DomainEvent::CommentCreated(_) => EventKind::CommentCreated,
            DomainEvent::CommentModerated(_) => EventKind::CommentModerated,
            DomainEvent::CommentUpdated(_) => EventKind::CommentUpdated,
            DomainEvent::Other(name) => EventKind::Unknown(name.clone()),
        }
    }

    fn data(&self) -> Map<String, Value> {
        let value = match self {
            DomainEvent::PostCreated(p) => serde_json::to_value(p),
            DomainEvent::CommentCreated(c) | DomainEvent::CommentModerated(c) | DomainEvent::CommentUpdated(c) => serde_json::to_value(c),
            DomainEvent::Other(_) => Ok(Value::Object(Map::new())),
        };
        match value {
            Ok(Value::Object(map)) => map,
            _ => Map::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn original_payloads_are_valid_events() {
        let event = Event::from_value(
            json!({"type":"CommentCreated","data":{"id":"653ac657","content":"hello world","postId":"96d08084","status":"pending"}}),
        )
        .unwrap();
        assert_eq!(event.kind, EventKind::CommentCreated);
        assert_eq!(
            event.domain().unwrap(),
            DomainEvent::CommentCreated(CommentData {
                id: "653ac657".into(),
                content: "hello world".into(),
                post_id: "96d08084".into(),
                status: CommentStatus::Pending,
            })
        );
    }

    #[test]
    fn id_less_events_get_a_content_derived_id() {
        let a = Event::from_value(json!({"type":"X","data":{"b":1,"a":2}})).unwrap();
        let b = Event::from_value(json!({"type":"X","data":{"a":2,"b":1}})).unwrap();
        let c = Event::from_value(json!({"type":"X","data":{"a":3,"b":1}})).unwrap();
        assert_eq!(a.id, b.id);
        assert_ne!(a.id, c.id);
    }

    #[test]
    fn malformed_envelopes_are_refused() {
        assert_eq!(Event::from_value(json!([])), Err(EventError::NotAnObject));
        assert_eq!(Event::from_value(json!({"data":{}})), Err(EventError::BadType));
        assert_eq!(Event::from_value(json!({"type":"","data":{}})), Err(EventError::BadType));
        assert_eq!(Event::from_value(json!({"type":"X","data":[]})), Err(EventError::BadData));
        assert_eq!(Event::from_value(json!({"type":"X"})), Err(EventError::BadData));
        assert_eq!(Event::from_value(json!({"type":"X","data":{},"id":7})), Err(EventError::BadId));
        assert_eq!(Event::from_value(json!({"type":"X","data":{},"seq":-1})), Err(EventError::BadSeq));
        for control in ["a\nb", "a\rb", "\u{1b}[31mred", "tab\there", "nul\0", "del\u{7f}", "c1\u{85}"] {
            assert_eq!(Event::from_value(json!({"type":"X","data":{},"id":control})), Err(EventError::BadId), "{control:?}");
            assert_eq!(Event::from_value(json!({"type":control,"data":{}})), Err(EventError::BadType), "{control:?}");
        }
        assert!(Event::from_value(json!({"type":"X","data":{},"id":"ünïcode-ok 1"})).is_ok());
    }

    #[test]
    fn known_types_with_bad_data_are_refused_and_unknown_types_pass() {
        let bad = Event::from_value(json!({"type":"PostCreated","data":{"id":"1"}})).unwrap();
        assert!(matches!(bad.domain(), Err(EventError::Invalid { .. })));
        let status =
            Event::from_value(json!({"type":"CommentUpdated","data":{"id":"1","content":"x","postId":"p","status":"maybe"}})).unwrap();
        assert!(status.domain().is_err());
        let unknown = Event::from_value(json!({"type":"PostLiked","data":{"id":"1"}})).unwrap();
        assert_eq!(unknown.domain(), Ok(DomainEvent::Other("PostLiked".into())));
    }

    #[test]
    fn unknown_types_round_trip_unchanged_and_statuses_fail_loudly() {
        let original = json!({"id":"e1","type":"PostLiked","data":{"id":"p1","by":["x"]},"requestId":"r"});
        let event = Event::from_value(original.clone()).unwrap();
        assert_eq!(event.kind, EventKind::Unknown("PostLiked".into()));
        assert_eq!(serde_json::to_value(&event).unwrap(), original);
        assert_eq!(EventKind::from("CommentUpdated".to_owned()), EventKind::CommentUpdated);
        assert_eq!("approved".parse::<CommentStatus>(), Ok(CommentStatus::Approved));
        assert_eq!("Approved".parse::<CommentStatus>(), Err(UnknownStatus("Approved".into())));
        assert!("".parse::<CommentStatus>().is_err());
    }

    #[test]
    fn caused_events_have_ids_derived_from_their_cause() {
        let created = DomainEvent::PostCreated(PostCreated { id: "p1".into(), title: "Hi".into() });
        let cause = Event::new(&created, Some("req".into()));
        let other = Event::new(&created, None);
        let a = Event::caused_by(&cause, &created);
        assert_eq!(a.id, Event::caused_by(&cause, &created).id);
        assert_ne!(a.id, Event::caused_by(&other, &created).id);
        assert_ne!(a.id, cause.id);
        assert_eq!(a.request_id.as_deref(), Some("req"));
    }

    #[test]
    fn the_traceparent_travels_in_the_envelope_only_when_present_and_valid() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let created = DomainEvent::PostCreated(PostCreated { id: "p1".into(), title: "Hi".into() });
        let plain = serde_json::to_value(Event::new(&created, None)).unwrap();
        assert!(plain.get("traceparent").is_none(), "{plain}");
        let traced = Event::from_value(json!({"id":"e","type":"PostCreated","data":{"id":"p1","title":"Hi"},"traceparent":tp})).unwrap();
        assert_eq!(traced.trace().unwrap().trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(serde_json::to_value(&traced).unwrap()["traceparent"], tp);
        assert_eq!(Event::caused_by(&traced, &created).traceparent.as_deref(), Some(tp));
        let bad = json!({"id":"e","type":"X","data":{},"traceparent":"nonsense"});
        assert_eq!(Event::from_value(bad.clone()).unwrap().traceparent, None);
        assert_eq!(serde_json::from_value::<Event>(bad).unwrap().traceparent, None);
        let stored: Event = serde_json::from_value(json!({"id":"e","type":"X","data":{},"traceparent":tp})).unwrap();
        assert_eq!(stored.traceparent.as_deref(), Some(tp));
    }

    #[test]
    fn new_events_round_trip() {
        let domain = DomainEvent::PostCreated(PostCreated { id: "p1".into(), title: "Hi".into() });
        let event = Event::new(&domain, Some("req-1".into()));
        let value = serde_json::to_value(&event).unwrap();
        assert_eq!(value["type"], "PostCreated");
        assert_eq!(value["data"], json!({"id":"p1","title":"Hi"}));
        assert_eq!(value["requestId"], "req-1");
        let back = Event::from_value(value).unwrap();
        assert_eq!(back, event);
        assert_eq!(back.domain().unwrap(), domain);
    }
}
