//! Structured logs through `tracing`: human-readable by default, one JSON
//! object per line when `LOG_FORMAT=json` (what a cluster's log collector
//! wants). The level comes from `RUST_LOG`, `info` by default.
//!
//! Trace context: every request runs in a `request` span, every applied
//! event in an `apply` span and every push of the bus in a `deliver` span,
//! each with a `trace_id` field, so their log lines carry it (`RUST_LOG=debug`
//! adds one line per request and per applied or pushed event). The context
//! is W3C `traceparent` ([`blog_domain::TraceParent`]): taken from a
//! request's header or started, held for the request's task
//! ([`current_trace`]), written into each event the request publishes, and
//! continued from the event by the bus's deliveries and every consumer's
//! apply ([`continue_trace`]), so a comment's whole life is one trace.
//!
//! Export: with `OTEL_EXPORTER_OTLP_ENDPOINT` set, those spans also go to an
//! OpenTelemetry collector over OTLP/HTTP with protobuf (the exporter reads
//! the standard `OTEL_*` variables: endpoint, headers, timeout, and
//! `OTEL_BSP_*` for batching), under the service's name, from a thread and a
//! small runtime of their own so export never runs on the service's runtime.
//! Unset, no exporter, no OpenTelemetry layer and no export thread exist:
//! the ids are made here ([`TraceParent::child`]) and only logged.

use std::{
    io::IsTerminal,
    sync::{LazyLock, OnceLock},
};

use blog_domain::TraceParent;
use opentelemetry::trace::{SpanContext, TraceContextExt, TraceFlags, TracerProvider as _};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::{EnvFilter, fmt, prelude::*};

use crate::http::client::http_client;

tokio::task_local! {
    static CURRENT: TraceParent;
}

/// The tracer provider, when spans are exported; flushed by [`shutdown`].
static EXPORT: OnceLock<SdkTracerProvider> = OnceLock::new();

/// Sets up logging (and span export when `OTEL_EXPORTER_OTLP_ENDPOINT` is
/// set) for `service`.
pub fn init(service: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json"));
    let export = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").is_ok_and(|e| !e.trim().is_empty());
    let otel = if export {
        match exporting_provider(service) {
            Ok(provider) => {
                let tracer = provider.tracer("blog");
                let _ = EXPORT.set(provider);
                Some(tracing_opentelemetry::layer().with_tracer(tracer))
            }
            Err(e) => {
                eprintln!("OTEL_EXPORTER_OTLP_ENDPOINT is set but no exporter could be built: {e}; spans are not exported");
                None
            }
        }
    } else {
        None
    };
    let registry = tracing_subscriber::registry().with(filter).with(otel);
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

/// Sends what is still batched to the collector (called once the service
/// stopped, outside its runtime).
pub fn shutdown() {
    if let Some(provider) = EXPORT.get()
        && let Err(e) = provider.shutdown()
    {
        eprintln!("flushing spans to the collector failed: {e}");
    }
}

fn exporting_provider(service: &str) -> Result<SdkTracerProvider, Box<dyn std::error::Error>> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
        .with_http_client(ExportClient(http_client(std::time::Duration::from_secs(10))))
        .build()?;
    let resource = opentelemetry_sdk::Resource::builder().with_service_name(service.to_owned()).build();
    Ok(SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource).build())
}

/// The exporter's HTTP client: the suite's rustls reqwest client. The batch
/// processor calls it from its own thread, outside any runtime, so each
/// request runs on a one-thread runtime kept for export (never dropped, so
/// never dropped inside another runtime).
#[derive(Debug)]
struct ExportClient(reqwest::Client);

static EXPORT_RUNTIME: LazyLock<Option<tokio::runtime::Runtime>> =
    LazyLock::new(|| tokio::runtime::Builder::new_multi_thread().worker_threads(1).thread_name("otlp-export").enable_all().build().ok());

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for ExportClient {
    async fn send_bytes(
        &self,
        request: opentelemetry_http::Request<bytes::Bytes>,
    ) -> Result<opentelemetry_http::Response<bytes::Bytes>, opentelemetry_http::HttpError> {
        let runtime = EXPORT_RUNTIME.as_ref().ok_or("no runtime for span export")?;
        let request = reqwest::Request::try_from(request.map(reqwest::Body::from))?;
        let client = self.0.clone();
        let answer = runtime
            .spawn(async move {
                let response = client.execute(request).await?;
                let mut answer = opentelemetry_http::Response::builder().status(response.status());
                for (name, value) in response.headers() {
                    answer = answer.header(name, value);
                }
                let body = response.bytes().await?;
                Ok::<_, opentelemetry_http::HttpError>(answer.body(body)?)
            })
            .await??;
        Ok(answer)
    }
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
/// When spans are exported, `span` joins `parent`'s trace in OpenTelemetry
/// and its ids are the exported span's, so the exported spans form one tree.
pub fn continue_trace(span: &tracing::Span, parent: Option<TraceParent>) -> TraceParent {
    let trace = exported_ids(span, parent).unwrap_or_else(|| parent.map_or_else(TraceParent::start, |parent| parent.child()));
    span.record("trace_id", trace.trace_id_hex());
    trace
}

fn exported_ids(span: &tracing::Span, parent: Option<TraceParent>) -> Option<TraceParent> {
    EXPORT.get()?;
    if let Some(parent) = parent {
        let flags = if parent.sampled { TraceFlags::SAMPLED } else { TraceFlags::default() };
        let remote = SpanContext::new(
            opentelemetry::TraceId::from_bytes(parent.trace_id),
            opentelemetry::SpanId::from_bytes(parent.span_id),
            flags,
            true,
            opentelemetry::trace::TraceState::default(),
        );
        let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(remote));
    }
    let context = span.context();
    let ids = context.span().span_context().clone();
    ids.is_valid().then(|| TraceParent {
        trace_id: ids.trace_id().to_bytes(),
        span_id: ids.span_id().to_bytes(),
        sampled: ids.is_sampled(),
    })
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
