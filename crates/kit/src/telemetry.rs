//! Structured logs through `tracing`: human-readable by default, one JSON
//! object per line when `LOG_FORMAT=json` (what a cluster's log collector
//! wants). The level comes from `RUST_LOG`, `info` by default.
//!
//! Trace context: every request runs in a `request` span and every applied
//! event in an `apply` span, each with a `trace_id` field, so their log lines
//! carry it (`RUST_LOG=debug` adds one line per request and per applied or
//! delivered event). The context itself is W3C `traceparent`
//! ([`blog_domain::TraceParent`]): taken from a request's header or started,
//! held for the request's task ([`current_trace`]), written into each event
//! the request publishes, and continued from the event by the bus's
//! deliveries and every consumer's apply ([`continue_trace`]).

use std::io::IsTerminal;

use blog_domain::TraceParent;
use tracing_subscriber::{EnvFilter, fmt, prelude::*};

tokio::task_local! {
    static CURRENT: TraceParent;
}

/// The trace context of the request this task serves, if any.
pub fn current_trace() -> Option<TraceParent> {
    CURRENT.try_with(|trace| *trace).ok()
}

/// Runs `f` with `trace` as its [`current_trace`].
pub async fn in_trace<F: std::future::Future>(trace: TraceParent, f: F) -> F::Output {
    CURRENT.scope(trace, f).await
}

/// The trace context of a new span `span`: a child of `parent`, or the start
/// of a new trace. Its `trace_id` field is recorded (declare it `Empty`).
pub fn continue_trace(span: &tracing::Span, parent: Option<TraceParent>) -> TraceParent {
    let trace = parent.map_or_else(TraceParent::start, |parent| parent.child());
    span.record("trace_id", trace.trace_id_hex());
    trace
}

pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json"));
    let registry = tracing_subscriber::registry().with(filter);
    let result = if json {
        registry.with(fmt::layer().json().flatten_event(true).with_current_span(false)).try_init()
    } else {
        // Colours only on a terminal: under the launcher or a log collector
        // the output is a pipe, where escape codes are noise.
        registry.with(fmt::layer().compact().with_target(false).with_ansi(std::io::stdout().is_terminal())).try_init()
    };
    // A second init (tests starting several apps in one process) keeps the first.
    drop(result);
}

/// The target of the consistency-lag trace points. Off unless `RUST_LOG`
/// enables it (`blog_lag=trace`): `cargo xtask bench --lag` does, on a suite
/// of its own, and reads the marks back from the logs to show where each
/// millisecond of an event's path goes.
pub const LAG_TARGET: &str = "blog_lag";

/// Marks that the events `ids` reached `stage` in this process, with the
/// wall clock in microseconds, so marks from different processes line up.
/// Costs one check of a cached flag when the target is off.
pub fn lag_mark<'a>(stage: &str, ids: impl IntoIterator<Item = &'a str>) {
    if !lag_traced() {
        return;
    }
    let ids = ids.into_iter().collect::<Vec<_>>().join(",");
    if ids.is_empty() {
        return;
    }
    let at_us = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64);
    tracing::trace!(target: LAG_TARGET, stage, at_us, ids);
}

/// Whether [`lag_mark`] records anything: callers that must keep ids for a
/// later mark copy them only then.
pub fn lag_traced() -> bool {
    tracing::enabled!(target: LAG_TARGET, tracing::Level::TRACE)
}

/// The ids of `events` when [`lag_traced`], for marks taken after the events
/// were handed on; empty (no allocation) otherwise.
pub fn lag_ids(events: &[blog_domain::Event]) -> Vec<String> {
    if lag_traced() { events.iter().map(|e| e.id.clone()).collect() } else { Vec::new() }
}
