//! Observability end to end: one comment is one trace across every service
//! (in the bus's log and in each service's log lines), and every service's
//! `/metrics` has the RED series with label sets that unknown paths cannot grow.

use std::{
    collections::BTreeSet,
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use blog_domain::{Service, TraceParent};
use blog_local::supervisor::LogSink;
use blog_tests::{Mode, TestSuite};
use serde_json::{Value, json};

/// What a caller (a browser's tracing library, an API gateway) would send.
const TRACE_ID: &str = "5e1ec7ab1e0ddba11c0ffee15badcafe";
const TRACEPARENT: &str = "00-5e1ec7ab1e0ddba11c0ffee15badcafe-b0a710ad5eed1e55-01";

/// The suite with debug lines from the kit and the bus (one per request,
/// applied and pushed event), its logs in `logs`, exporting spans to
/// `collector` when given.
async fn launch_logging_to(logs: &Path, collector: Option<&str>) -> TestSuite {
    let logs = logs.to_owned();
    let collector = collector.map(str::to_owned);
    TestSuite::launch_with(move |options| {
        options.log = LogSink::Dir(logs);
        for service in Service::ALL {
            options.env.push((service, "RUST_LOG".into(), "info,blog_kit=debug,event_bus=debug,tower_http=debug".into()));
            if let Some(endpoint) = &collector {
                options.env.push((service, "OTEL_EXPORTER_OTLP_ENDPOINT".into(), endpoint.clone()));
                // Export within a fraction of a second rather than the default 5 s.
                options.env.push((service, "OTEL_BSP_SCHEDULE_DELAY".into(), "100".into()));
            }
        }
    })
    .await
}

fn log_of(dir: &Path, service: Service) -> String {
    std::fs::read_to_string(dir.join(format!("{}.log", service.name()))).unwrap_or_default()
}

/// One exported span, as the collector received it.
#[derive(Debug, Clone)]
struct ReceivedSpan {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
}

/// A real OTLP/HTTP receiver on 127.0.0.1: `POST /v1/traces` with an
/// `ExportTraceServiceRequest` in protobuf, decoded with opentelemetry-proto.
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
}

impl Collector {
    async fn start() -> (Self, String) {
        use axum::{body::Bytes, extract::State, http::StatusCode, routing::post};
        use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
        use prost::Message;

        async fn receive(State(collector): State<Collector>, body: Bytes) -> (StatusCode, [(&'static str, &'static str); 1], Vec<u8>) {
            let Ok(request) = ExportTraceServiceRequest::decode(body) else {
                return (StatusCode::BAD_REQUEST, [("content-type", "text/plain")], b"not an ExportTraceServiceRequest".to_vec());
            };
            let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
            let mut spans = collector.spans.lock().unwrap();
            for resource_spans in request.resource_spans {
                let service = resource_spans
                    .resource
                    .iter()
                    .flat_map(|r| &r.attributes)
                    .find(|a| a.key == "service.name")
                    .and_then(|a| a.value.as_ref())
                    .and_then(|v| match &v.value {
                        Some(opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(s)) => Some(s.clone()),
                        _ => None,
                    })
                    .unwrap_or_default();
                for span in resource_spans.scope_spans.into_iter().flat_map(|s| s.spans) {
                    spans.push(ReceivedSpan {
                        service: service.clone(),
                        name: span.name,
                        trace_id: hex(&span.trace_id),
                        span_id: hex(&span.span_id),
                        parent_span_id: hex(&span.parent_span_id),
                    });
                }
            }
            (StatusCode::OK, [("content-type", "application/x-protobuf")], Vec::new())
        }

        let collector = Collector::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let app = axum::Router::new().route("/v1/traces", post(receive)).with_state(collector.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (collector, endpoint)
    }

    fn spans_of(&self, trace_id: &str) -> Vec<ReceivedSpan> {
        self.spans.lock().unwrap().iter().filter(|s| s.trace_id == trace_id).cloned().collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_comment_is_one_trace_through_every_service_and_the_bus_log() {
    one_comment_one_trace(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_comment_is_one_exported_trace_at_an_otlp_collector() {
    let (collector, endpoint) = Collector::start().await;
    one_comment_one_trace(Some((collector, endpoint))).await;
}

async fn one_comment_one_trace(collector: Option<(Collector, String)>) {
    let logs = tempfile::tempdir().unwrap();
    let suite = launch_logging_to(logs.path(), collector.as_ref().map(|(_, endpoint)| endpoint.as_str())).await;
    let post = suite.create_post("Traced").await;
    suite.wait_for_post_in_query(&post.id).await;

    let gateway = format!("http://{}", suite.suite().gateway_addr);
    let http = blog_kit::http::client::http_client(Duration::from_secs(15));
    let request = http.post(format!("{gateway}/posts/{}/comments", post.id)).header("traceparent", TRACEPARENT);
    let answer = suite.send(request.json(&json!({"content": "follow me"}))).await;
    assert_eq!(answer.status, 201, "{:?}", answer.body);
    let comment_id = answer.body[0]["id"].as_str().unwrap().to_owned();
    suite.wait_for_status(&post.id, &comment_id, "approved").await;

    // Every event the comment caused carries the trace, each from its own span.
    let caused: Vec<Value> = suite.bus_events().await.into_iter().filter(|e| e["data"]["id"] == comment_id.as_str()).collect();
    let kinds: Vec<&str> = caused.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["CommentCreated", "CommentModerated", "CommentUpdated"], "{caused:#?}");
    let mut spans = BTreeSet::new();
    for event in &caused {
        let parent = event["traceparent"].as_str().and_then(TraceParent::parse).unwrap_or_else(|| panic!("no traceparent: {event}"));
        assert_eq!(parent.trace_id_hex(), TRACE_ID, "{event}");
        spans.insert(parent.span_id);
    }
    assert_eq!(spans.len(), 3, "each event has its own parent span: {caused:#?}");
    assert!(!spans.contains(&TraceParent::parse(TRACEPARENT).unwrap().span_id), "the caller's span is a parent, not ours");
    // The post was another action: another trace.
    let post_event = suite.bus_events().await.into_iter().find(|e| e["type"] == "PostCreated").unwrap();
    assert_ne!(post_event["traceparent"].as_str().and_then(TraceParent::parse).unwrap().trace_id_hex(), TRACE_ID);

    // Every service the comment went through logged under its trace id:
    // comments (the request, the decision applied), moderation and query
    // (their applies), the bus (its deliveries); posts never saw it.
    for service in [Service::Comments, Service::Moderation, Service::Query, Service::EventBus] {
        suite
            .eventually(&format!("{} logs the trace id", service.name()), || async {
                log_of(logs.path(), service).lines().any(|line| line.contains(TRACE_ID)).then_some(())
            })
            .await;
    }
    let moderation = log_of(logs.path(), Service::Moderation);
    assert!(moderation.lines().any(|l| l.contains(TRACE_ID) && l.contains("event applied")), "{moderation}");
    let bus = log_of(logs.path(), Service::EventBus);
    for subscriber in ["moderation", "query", "comments"] {
        assert!(
            bus.lines().any(|l| l.contains(TRACE_ID) && l.contains("event pushed") && l.contains(subscriber)),
            "the bus's push to {subscriber} is traced:\n{bus}"
        );
    }
    assert!(!log_of(logs.path(), Service::Posts).contains(TRACE_ID));

    // Exported: every service's spans are in the trace, and they form one
    // tree under the caller's span (each parent is in the trace, or is the caller).
    if let Some((collector, _)) = collector {
        let expected: BTreeSet<(&str, &str)> =
            [("comments", "request"), ("comments", "apply"), ("moderation", "apply"), ("query", "apply"), ("event-bus", "deliver")].into();
        let spans = suite
            .eventually("every service's spans at the collector", || async {
                let spans = collector.spans_of(TRACE_ID);
                let seen: BTreeSet<(&str, &str)> = spans.iter().map(|s| (s.service.as_str(), s.name.as_str())).collect();
                expected.is_subset(&seen).then_some(spans.clone())
            })
            .await;
        let caller = &TRACEPARENT[36..52];
        let ids: BTreeSet<&str> = spans.iter().map(|s| s.span_id.as_str()).collect();
        for span in &spans {
            assert!(
                span.parent_span_id == caller || ids.contains(span.parent_span_id.as_str()),
                "{span:?} hangs outside the trace: {spans:#?}"
            );
        }
        // The events' parents are exported spans (the request, an apply).
        for event in &caused {
            let parent = TraceParent::parse(event["traceparent"].as_str().unwrap()).unwrap();
            let parent_hex: String = parent.span_id.iter().map(|b| format!("{b:02x}")).collect();
            assert!(ids.contains(parent_hex.as_str()), "{event}: its parent span was not exported: {spans:#?}");
        }
        // The trace as a tree, for `--nocapture` (the README shows one).
        fn draw(spans: &[ReceivedSpan], parent: &str, depth: usize, out: &mut Vec<String>) {
            for span in spans.iter().filter(|s| s.parent_span_id == parent) {
                out.push(format!("{}{} {} ({})", "  ".repeat(depth), span.service, span.name, span.span_id));
                draw(spans, &span.span_id, depth + 1, out);
            }
        }
        let mut tree = Vec::new();
        draw(&spans, caller, 0, &mut tree);
        println!("trace {TRACE_ID}, {} spans:\n{}", spans.len(), tree.join("\n"));
        assert_eq!(tree.len(), spans.len(), "every span is in the tree under the caller");
        let posts = collector.spans.lock().unwrap().iter().filter(|s| s.service == "posts").count();
        assert!(posts >= 1, "posts exports its own spans (the post's trace)");
        assert!(spans.iter().all(|s| s.service != "posts"), "{spans:#?}");
    }
    suite.shutdown().await;
}

/// The values of `label` in the samples of `series` in an exposition.
fn label_values(text: &str, series: &str, label: &str) -> BTreeSet<String> {
    let pattern = regex::Regex::new(&format!(r#"(?m)^{series}\{{(?:[^}}]*,)?{label}="([^"]*)""#)).unwrap();
    pattern.captures_iter(text).map(|c| c[1].to_owned()).collect()
}

fn sample(text: &str, line_start: &str) -> Option<u64> {
    text.lines().find_map(|l| l.strip_prefix(line_start)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_red_series_with_bounded_labels_after_unknown_paths() {
    let suite = TestSuite::launch().await;
    let post = suite.create_post("Counted").await;
    suite.comment(&post.id, "a counted comment").await;
    suite.wait_for_post_in_query(&post.id).await;
    let http = blog_kit::http::client::http_client(Duration::from_secs(15));

    let services = [Service::Posts, Service::Comments, Service::Query, Service::Moderation, Service::EventBus, Service::Client];
    const UNKNOWN: usize = 25;
    for service in services {
        for i in 0..UNKNOWN {
            let url = format!("{}/scan-{i}/{}", suite.url(service), "x".repeat(i));
            let method = if i % 5 == 0 { reqwest::Method::from_bytes(b"PROPFIND").unwrap() } else { reqwest::Method::GET };
            http.request(method, url).send().await.unwrap();
        }
    }
    for service in services {
        let text = http.get(format!("{}/metrics", suite.url(service))).send().await.unwrap().text().await.unwrap();
        let name = service.name();
        let series = "blog_http_request_duration_seconds_count";
        assert!(!text.contains("scan-"), "{name}: a raw path became a label\n{text}");
        let routes = label_values(&text, series, "route");
        assert!(routes.len() < 12, "{name}: the route label is bounded by the routes: {routes:?}");
        assert!(routes.iter().all(|r| r == "unmatched" || r.starts_with('/')), "{name}: {routes:?}");
        let methods = label_values(&text, series, "method");
        assert!(methods.iter().all(|m| ["GET", "POST", "other"].contains(&m.as_str())), "{name}: {methods:?}");
        // The client serves every path (`/{*path}`: the page for any GET, a
        // 405 for other methods), so its scans are counted under that template.
        let (route, get_status) = if service == Service::Client { ("/{*path}", "2xx") } else { ("unmatched", "4xx") };
        let scans =
            |method: &str, status: &str| sample(&text, &format!("{series}{{route=\"{route}\",method=\"{method}\",status=\"{status}\"}}"));
        assert_eq!(scans("GET", get_status), Some((UNKNOWN - UNKNOWN / 5) as u64), "{name}\n{text}");
        assert_eq!(scans("other", "4xx"), Some((UNKNOWN / 5) as u64), "{name}\n{text}");
        let bucket =
            format!("blog_http_request_duration_seconds_bucket{{route=\"{route}\",method=\"GET\",status=\"{get_status}\",le=\"+Inf\"}}");
        assert_eq!(sample(&text, &bucket), scans("GET", get_status), "{name}: +Inf bucket equals the count");
    }

    // The write path: posts' route, its commits and its hand-over to the bus;
    // the bus's pushes to each subscriber.
    let posts = http.get(format!("{}/metrics", suite.url(Service::Posts))).send().await.unwrap().text().await.unwrap();
    let created = "blog_http_request_duration_seconds_count{route=\"/posts/create\",method=\"POST\",status=\"2xx\"}";
    assert_eq!(sample(&posts, created), Some(1), "{posts}");
    assert!(sample(&posts, "blog_store_commit_jobs_count{durable=\"true\"}").is_some_and(|n| n >= 1), "{posts}");
    assert!(
        sample(&posts, "blog_outbound_request_duration_seconds_count{peer=\"event-bus\",outcome=\"ok\"}").is_some_and(|n| n >= 1),
        "{posts}"
    );
    let query = http.get(format!("{}/metrics", suite.url(Service::Query))).send().await.unwrap().text().await.unwrap();
    let lag = "blog_inbox_consistency_lag_seconds_count{type=\"PostCreated\"}";
    assert_eq!(sample(&query, lag), Some(1), "query's consistency lag counts the one post it applied\n{query}");
    let bus = http.get(format!("{}/metrics", suite.url(Service::EventBus))).send().await.unwrap().text().await.unwrap();
    let peers = label_values(&bus, "blog_outbound_request_duration_seconds_count", "peer");
    assert_eq!(peers, ["comments", "moderation", "query"].map(str::to_owned).into(), "{bus}");
    suite.shutdown().await;
}

in_both_modes!(a_clean_stop_logs_no_error);

/// A clean stop is no failure: after a comment went the whole way, stopping
/// the suite (SIGTERM to every process, every replica) leaves no error in
/// any log, while each process did log that it stopped.
async fn a_clean_stop_logs_no_error(mode: Mode) {
    let suite = TestSuite::launch_in(mode).await;
    let post = suite.create_post("stopped cleanly").await;
    let comment = suite.comment(&post.id, "then the suite stops").await.remove(0);
    suite.wait_for_status(&post.id, &comment.id, "approved").await;
    let logs = suite.shutdown_with_logs().await;
    for service in Service::ALL {
        assert!(logs.iter().any(|(name, _)| name.starts_with(service.name())), "no log of {}: {logs:?}", service.name());
    }
    for (name, log) in logs {
        assert!(log.lines().any(|line| line.contains("stopped")), "{name} logged no stop:\n{log}");
        let errors: Vec<&str> = log.lines().filter(|line| line.contains(" ERROR ") || line.contains("\"level\":\"ERROR\"")).collect();
        assert!(errors.is_empty(), "{name} logged errors on a clean stop:\n{}", errors.join("\n"));
    }
}
