//! W3C trace context (`traceparent`), the one piece of tracing the domain
//! knows: an event carries the trace of the action that caused it next to its
//! `requestId`, so a comment's whole life (the POST, `CommentCreated`,
//! `CommentModerated`, `CommentUpdated`, every consumer's apply) is one trace.
//!
//! Only version `00` is written; a later version is read by its first four
//! fields, as the specification asks. An invalid value is dropped, never an
//! error: trace context is advisory and must not refuse an event.

use std::fmt;

use uuid::Uuid;

/// One span's place in a trace: `00-<trace id>-<span id>-<flags>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceParent {
    pub trace_id: [u8; 16],
    /// The span that is the parent of whatever continues from here.
    pub span_id: [u8; 8],
    pub sampled: bool,
}

impl TraceParent {
    /// A new trace, sampled.
    pub fn start() -> Self {
        Self { trace_id: *Uuid::new_v4().as_bytes(), span_id: new_span_id(), sampled: true }
    }

    /// A span in the same trace whose parent is this one.
    pub fn child(&self) -> Self {
        Self { span_id: new_span_id(), ..*self }
    }

    /// Parses a `traceparent` header or envelope field; `None` if invalid.
    pub fn parse(text: &str) -> Option<Self> {
        let text = text.trim();
        let mut fields = text.split('-');
        let (version, trace, span, flags) = (fields.next()?, fields.next()?, fields.next()?, fields.next()?);
        // Version 00 has exactly four fields; later versions may add more.
        if version.len() != 2 || version == "ff" || (version == "00" && fields.next().is_some()) {
            return None;
        }
        hex::<1>(version)?;
        let trace_id = hex::<16>(trace)?;
        let span_id = hex::<8>(span)?;
        let [flags] = hex::<1>(flags)?;
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(Self { trace_id, span_id, sampled: flags & 1 == 1 })
    }

    /// The trace id as 32 lowercase hex digits (what logs and tracing systems show).
    pub fn trace_id_hex(&self) -> String {
        to_hex(&self.trace_id)
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "00-{}-{}-{:02x}", to_hex(&self.trace_id), to_hex(&self.span_id), u8::from(self.sampled))
    }
}

fn new_span_id() -> [u8; 8] {
    loop {
        let bytes = Uuid::new_v4().into_bytes();
        let id: [u8; 8] = bytes[8..].try_into().unwrap_or([1; 8]);
        if id != [0; 8] {
            return id;
        }
    }
}

/// Exactly `N` bytes of lowercase hex (the specification forbids uppercase).
fn hex<const N: usize>(text: &str) -> Option<[u8; N]> {
    if text.len() != 2 * N || !text.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return None;
    }
    let mut out = [0; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn the_specifications_example_round_trips() {
        let parent = TraceParent::parse(EXAMPLE).unwrap();
        assert_eq!(parent.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert!(parent.sampled);
        assert_eq!(parent.to_string(), EXAMPLE);
    }

    #[test]
    fn children_keep_the_trace_and_get_a_new_span() {
        let parent = TraceParent::parse(EXAMPLE).unwrap();
        let child = parent.child();
        assert_eq!(child.trace_id, parent.trace_id);
        assert_ne!(child.span_id, parent.span_id);
        assert_ne!(TraceParent::start().trace_id, TraceParent::start().trace_id);
        assert_eq!(TraceParent::parse(&child.to_string()), Some(child));
    }

    #[test]
    fn invalid_values_are_dropped() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0x",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad}");
        }
        // A later version is read by its first four fields.
        assert!(TraceParent::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-later").is_some_and(|p| !p.sampled));
    }
}
