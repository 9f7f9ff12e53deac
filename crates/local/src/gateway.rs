//! The local stand-in for ingress-nginx: every request goes to the service
//! the shared route table names for its path, with the Ingress's matching
//! rules (see [`crate::routes`]). It answers whatever `Host` a request
//! carries, so a browser at `http://127.0.0.1:8080` and
//! `curl -H 'Host: posts.com'` both work. Request bodies are read whole, up to
//! 1 MiB like ingress-nginx's default `client_max_body_size` (413 beyond),
//! within [`BODY_READ_TIMEOUT`] (a JSON 408 beyond, as nginx's
//! `client_body_timeout`), and only a body received to its end is passed on:
//! one whose client hung up mid-body is no request. A buffered request can
//! be sent again when a pooled connection turns out to have been closed by
//! the service (as it does after refusing an oversized body), where a
//! streamed one would fail. Responses stream, so the live
//! update stream passes through like any other response. Connections are
//! served by [`blog_kit::http::serve::serve`] (a client has 10 s to send its
//! request head), an upstream has 2 s to accept a connection and
//! [`UPSTREAM_HEADERS_TIMEOUT`] to answer.
//!
//! The path is checked before it is matched, and the upstream URL is built
//! from the checked path: an HTTP client resolves `..` (and servers decode
//! `%2e`) after routing, so `/posts/x/comments/../../../events` would match
//! the comments route and then reach comments' internal `/events`. Dot
//! segments (literal or percent-encoded, any case), empty segments,
//! backslashes and encoded slashes are refused with a JSON 400; percent-encoded
//! unreserved characters are decoded first (RFC 3986 §6.2.2.2), so no spelling
//! hides one of them. The services' internal routes ([`INTERNAL_PATHS`]) are
//! refused for every upstream, so the catch-all route cannot reach the
//! client's own `/metrics` either.
//!
//! A service may run as several replicas (`cargo xtask up --scale N`): the
//! gateway takes them in turn (round robin), and a replica it could not
//! connect to is skipped for [`EJECT_FOR`] (tried again only when no other
//! is left), and so is one that has kept a request waiting for its answer
//! for [`HUNG_AFTER`] without answering anything since (a stopped or wedged
//! process, whose kernel still accepts connections): the requests after it
//! go to the others. Failover is only ever for a request that was never sent: when
//! the connection to a replica is refused (or cannot be made in time), the
//! same request goes to the next one. Once a connection is made, nothing is
//! resent, because the replica may have processed it (a `POST` answered by a
//! crash after its commit would otherwise be done twice): a request cut off
//! there is a JSON 502, as before. With no replica reachable the answer is a
//! JSON 503 with `Retry-After` (nothing was sent, so a retry is safe). The
//! live stream balances like any other request. [`Gateway::for_service`]
//! makes the same balancer pass everything, internal routes included, to one
//! service: the suite's stand-in for a Kubernetes `Service` address in front
//! of the replicas, which the bus and the other services call.

use std::{
    collections::BTreeMap,
    io,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{
    Router,
    body::Body,
    extract::{Request, State},
    http::{HeaderMap, HeaderName, StatusCode, header},
    response::Response,
};
use blog_domain::Service;
use blog_kit::{
    Shutdown,
    http::error::{error_response, retry_later, shown_path},
};

use crate::routes::RouteTable;
use tokio::net::TcpListener;

/// Longest the gateway waits for an upstream's response head: past each
/// service's own request timeout, so a slow request gets the service's JSON
/// 503 first; a hung upstream gets a JSON 504. A response body (the live
/// update stream included) is not bounded once its head has arrived.
pub const UPSTREAM_HEADERS_TIMEOUT: std::time::Duration =
    blog_kit::http::layers::REQUEST_TIMEOUT.saturating_add(std::time::Duration::from_secs(5));

/// Largest request body passed on (ingress-nginx's default `client_max_body_size`).
pub const MAX_REQUEST_BODY: usize = 1024 * 1024;

/// How long a replica that refused a connection is passed over.
pub const EJECT_FOR: Duration = Duration::from_secs(1);

/// How long a replica may keep a request waiting for its response head,
/// answering nothing meanwhile, before the requests after it go to the other
/// replicas first. Above a comment's wait for its post (2 s) and a service's
/// usual answer; far below [`UPSTREAM_HEADERS_TIMEOUT`].
pub const HUNG_AFTER: Duration = Duration::from_secs(3);

/// Largest request body passed on to one service by [`Gateway::for_service`]:
/// an internal event batch may be as large as a consumer takes.
pub const MAX_INTERNAL_BODY: usize = blog_kit::messaging::inbox::MAX_EVENTS_BODY;

/// What the gateway answers for.
#[derive(Debug, Clone, Copy)]
enum Front {
    /// The public front door: routed by the table, internal routes refused.
    Public,
    /// One service's own address: every path and method, to its replicas.
    Service(Service),
}

#[derive(Debug)]
pub struct Gateway {
    front: Front,
    table: RouteTable,
    upstreams: BTreeMap<Service, Replicas>,
    http: reqwest::Client,
}

impl Gateway {
    /// `upstreams` maps each service to its base URL.
    pub fn new(upstreams: BTreeMap<Service, String>) -> Arc<Self> {
        Self::balanced(upstreams.into_iter().map(|(service, base)| (service, vec![base])).collect())
    }

    /// `upstreams` maps each service to the base URLs of its replicas.
    pub fn balanced(upstreams: BTreeMap<Service, Vec<String>>) -> Arc<Self> {
        Self::with_front(Front::Public, upstreams)
    }

    /// Every request, internal routes included, to one of `replicas` of
    /// `service`: the address the other services know it by.
    pub fn for_service(service: Service, replicas: Vec<String>) -> Arc<Self> {
        Self::with_front(Front::Service(service), BTreeMap::from([(service, replicas)]))
    }

    fn with_front(front: Front, upstreams: BTreeMap<Service, Vec<String>>) -> Arc<Self> {
        let http = blog_kit::http::client::build_client(|builder| builder.pool_max_idle_per_host(512));
        let upstreams = upstreams.into_iter().map(|(service, bases)| (service, Replicas::new(bases))).collect();
        Arc::new(Self { front, table: RouteTable::standard(), upstreams, http })
    }

    pub fn router(self: Arc<Self>) -> Router {
        Router::new().fallback(proxy).with_state(self)
    }
}

pub async fn serve(listener: TcpListener, gateway: Arc<Gateway>, shutdown: Shutdown) -> io::Result<()> {
    blog_kit::http::serve::serve(listener, gateway.router(), shutdown).await
}

/// A service's replicas, taken in turn, those that recently refused a
/// connection last, and before them those that seem hung.
#[derive(Debug)]
struct Replicas {
    bases: Vec<String>,
    next: AtomicUsize,
    /// Per replica, until when it is passed over (ms since `epoch`; 0: never refused).
    ejected_until: Vec<AtomicU64>,
    /// Per replica, its requests waiting for an answer.
    waiting: Vec<Mutex<Waiting>>,
    epoch: Instant,
}

/// A replica's requests sent and not answered yet.
#[derive(Debug, Default)]
struct Waiting {
    requests: usize,
    /// Since when (ms since `epoch`) it has had some waiting and answered none.
    since: u64,
}

/// One request waiting for a replica's answer; done when dropped (answered,
/// failed, or abandoned with its client).
struct Sent<'a> {
    replicas: &'a Replicas,
    replica: usize,
}

impl Drop for Sent<'_> {
    fn drop(&mut self) {
        let mut waiting = lock(&self.replicas.waiting[self.replica]);
        waiting.requests = waiting.requests.saturating_sub(1);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Replicas {
    fn new(bases: Vec<String>) -> Self {
        let ejected_until = bases.iter().map(|_| AtomicU64::new(0)).collect();
        let waiting = bases.iter().map(|_| Mutex::default()).collect();
        Self { bases, next: AtomicUsize::new(0), ejected_until, waiting, epoch: Instant::now() }
    }

    /// Notes a request sent to `replica`, until the guard is dropped.
    fn sent(&self, replica: usize) -> Sent<'_> {
        let mut waiting = lock(&self.waiting[replica]);
        if waiting.requests == 0 {
            waiting.since = self.now_ms();
        }
        waiting.requests += 1;
        Sent { replicas: self, replica }
    }

    /// Whether `replica` has kept a request waiting for [`HUNG_AFTER`] with no answer since.
    fn hung(&self, replica: usize, now: u64) -> bool {
        let waiting = lock(&self.waiting[replica]);
        waiting.requests > 0 && now.saturating_sub(waiting.since) >= u64::try_from(HUNG_AFTER.as_millis()).unwrap_or(u64::MAX)
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// The order to try the replicas in for one request: each in turn
    /// starts, those that seem hung go after the others and ejected ones to
    /// the end (still tried: better a replica that may be back than no answer).
    fn order(&self) -> Vec<usize> {
        let count = self.bases.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let now = self.now_ms();
        let mut order: Vec<usize> = (0..count).map(|k| (start + k) % count).collect();
        order.sort_by_cached_key(|&i| (self.ejected_until[i].load(Ordering::Relaxed) > now, self.hung(i, now)));
        order
    }

    fn refused(&self, replica: usize) {
        let until = self.now_ms().saturating_add(u64::try_from(EJECT_FOR.as_millis()).unwrap_or(u64::MAX));
        self.ejected_until[replica].store(until, Ordering::Relaxed);
    }

    fn answered(&self, replica: usize) {
        self.ejected_until[replica].store(0, Ordering::Relaxed);
        lock(&self.waiting[replica]).since = self.now_ms();
    }
}

/// Routes every service answers for the cluster itself (the bus, probes,
/// Prometheus), never for the public.
pub const INTERNAL_PATHS: &[&str] = &["/events", "/status", "/metrics", "/flow", "/healthz", "/readyz"];

/// Why a request path is refused before routing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathRefusal {
    /// Dot or empty segments, backslashes, encoded slashes, bad encoding: 400.
    Malformed(&'static str),
    /// One of [`INTERNAL_PATHS`]: 404, as if it did not exist.
    Internal,
}

/// `raw` with percent-encoded unreserved characters decoded, or why it is
/// refused. The result is what is routed and sent upstream.
pub fn checked_path(raw: &str) -> Result<String, PathRefusal> {
    use PathRefusal::Malformed;
    let bytes = raw.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => return Err(Malformed("backslashes are not allowed in a path")),
            b'%' => {
                let byte = raw
                    .get(i + 1..i + 3)
                    .and_then(|hex| u8::from_str_radix(hex, 16).ok())
                    .ok_or(Malformed("malformed percent-encoding in the path"))?;
                match byte {
                    b'/' | b'\\' => return Err(Malformed("encoded slashes are not allowed in a path")),
                    b if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') => decoded.push(b),
                    b => decoded.extend_from_slice(format!("%{b:02X}").as_bytes()),
                }
                i += 3;
            }
            b => {
                decoded.push(b);
                i += 1;
            }
        }
    }
    let path = String::from_utf8(decoded).map_err(|_| Malformed("the path is not UTF-8"))?;
    let Some(rest) = path.strip_prefix('/') else {
        return Err(Malformed("the path must start with `/`"));
    };
    let segments: Vec<&str> = rest.split('/').collect();
    for (n, segment) in segments.iter().enumerate() {
        if *segment == "." || *segment == ".." {
            return Err(Malformed("dot segments are not allowed in a path"));
        }
        // One trailing slash is an ordinary path; `//` anywhere is not.
        if segment.is_empty() && n + 1 < segments.len() {
            return Err(Malformed("empty segments are not allowed in a path"));
        }
    }
    let bare = path.trim_end_matches('/').to_ascii_lowercase();
    if INTERNAL_PATHS.contains(&bare.as_str()) {
        return Err(PathRefusal::Internal);
    }
    Ok(path)
}

/// Longest a client may take to send a request's body, as ingress-nginx's
/// `client_body_timeout`: past it the request is answered 408 and nothing
/// is passed on, so a client trickling a body cannot hold a connection (and
/// a file descriptor of the gateway) for longer than its head and this.
pub const BODY_READ_TIMEOUT: Duration = blog_kit::http::layers::REQUEST_TIMEOUT;

/// Why a request body is not passed on.
#[derive(Debug, PartialEq, Eq)]
enum BodyRefusal {
    TooLarge,
    /// The client stopped sending before the body's end (its connection
    /// closed or broke mid-body, or a chunked body never ended): a request
    /// that was not sent whole is never processed.
    CutOff,
    TooSlow,
}

impl BodyRefusal {
    fn response(&self) -> Response {
        let mut response = match self {
            BodyRefusal::TooLarge => error_response(StatusCode::PAYLOAD_TOO_LARGE, "request body is too large"),
            BodyRefusal::CutOff => error_response(StatusCode::BAD_REQUEST, "the request body was cut off before its end"),
            BodyRefusal::TooSlow => error_response(StatusCode::REQUEST_TIMEOUT, "the request body was not sent in time"),
        };
        if *self != BodyRefusal::TooLarge {
            // What is left of the body is not read: the connection ends here.
            response.headers_mut().insert(header::CONNECTION, axum::http::HeaderValue::from_static("close"));
        }
        response
    }
}

/// The whole body, sent within [`BODY_READ_TIMEOUT`]. An oversized body is
/// still read (up to 8 times `max`) before the 413, as nginx's lingering
/// close does: answering with unread data in the connection gets it reset,
/// and the client would see the reset instead of the answer.
async fn read_body(body: Body, max: usize) -> Result<axum::body::Bytes, BodyRefusal> {
    use futures_util::StreamExt;
    let read = async {
        let mut stream = body.into_data_stream();
        let mut buffer = Vec::new();
        let mut seen = 0;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|_| BodyRefusal::CutOff)?;
            seen += chunk.len();
            if seen > max.saturating_mul(8) {
                break;
            }
            if seen <= max {
                buffer.extend_from_slice(&chunk);
            }
        }
        if seen > max { Err(BodyRefusal::TooLarge) } else { Ok(buffer.into()) }
    };
    tokio::time::timeout(BODY_READ_TIMEOUT, read).await.unwrap_or(Err(BodyRefusal::TooSlow))
}

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1).
fn hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "transfer-encoding"
            | "te"
            | "trailer"
            | "upgrade"
            | "proxy-authorization"
            | "proxy-authenticate"
    )
}

fn forwardable(headers: &HeaderMap) -> impl Iterator<Item = (&HeaderName, &axum::http::HeaderValue)> {
    headers.iter().filter(|(name, _)| !hop_by_hop(name))
}

async fn proxy(State(gateway): State<Arc<Gateway>>, request: Request) -> Response {
    let (service, path, max_body) = match gateway.front {
        Front::Service(service) => (service, request.uri().path().to_owned(), MAX_INTERNAL_BODY),
        Front::Public => {
            let path = match checked_path(request.uri().path()) {
                Ok(path) => path,
                Err(PathRefusal::Malformed(why)) => return error_response(StatusCode::BAD_REQUEST, why),
                Err(PathRefusal::Internal) => return error_response(StatusCode::NOT_FOUND, "no such route"),
            };
            let Some(route) = gateway.table.route(&path) else {
                return error_response(StatusCode::NOT_FOUND, &format!("no route for {}", shown_path(&path)));
            };
            (route.service, path, MAX_REQUEST_BODY)
        }
    };
    let Some(replicas) = gateway.upstreams.get(&service).filter(|r| !r.bases.is_empty()) else {
        return error_response(StatusCode::BAD_GATEWAY, &format!("no upstream for {service}"));
    };
    let path_and_query = match request.uri().query() {
        Some(query) => format!("{path}?{query}"),
        None => path,
    };
    let (parts, body) = request.into_parts();
    let body = match read_body(body, max_body).await {
        Ok(body) => body,
        Err(refusal) => return refusal.response(),
    };
    let mut headers = HeaderMap::new();
    for (name, value) in forwardable(&parts.headers) {
        if name != header::HOST {
            headers.append(name, value.clone());
        }
    }
    // A service's own address stands for a Kubernetes Service, which forwards
    // without a trace: only the public front says it is a proxy (the client
    // keeps `/healthz` and `/metrics` from anyone who came through one).
    if matches!(gateway.front, Front::Public) {
        if let Some(host) = parts.headers.get(header::HOST) {
            headers.insert(HeaderName::from_static("x-forwarded-host"), host.clone());
        }
        headers.insert(HeaderName::from_static("x-forwarded-proto"), axum::http::HeaderValue::from_static("http"));
    }
    for replica in replicas.order() {
        let upstream = gateway
            .http
            .request(parts.method.clone(), format!("{}{path_and_query}", replicas.bases[replica]))
            .headers(headers.clone())
            .body(body.clone());
        let waiting = replicas.sent(replica);
        let Ok(sent) = tokio::time::timeout(UPSTREAM_HEADERS_TIMEOUT, upstream.send()).await else {
            tracing::warn!(%service, replica, "upstream did not answer in time");
            replicas.refused(replica);
            return error_response(StatusCode::GATEWAY_TIMEOUT, &format!("{service} did not answer in time"));
        };
        drop(waiting);
        match sent {
            Ok(answer) => {
                replicas.answered(replica);
                let mut response = Response::builder().status(answer.status());
                for (name, value) in forwardable(answer.headers()) {
                    response = response.header(name, value);
                }
                return response
                    .body(Body::from_stream(answer.bytes_stream()))
                    .unwrap_or_else(|_| error_response(StatusCode::BAD_GATEWAY, "unreadable upstream response"));
            }
            // No connection, so not one byte of the request went out: the next replica may have it.
            Err(e) if e.is_connect() => {
                tracing::warn!(%service, replica, error = %e, "upstream refused the connection; trying another replica");
                replicas.refused(replica);
            }
            // Sent, at least in part: it may have been processed, so it is never sent again.
            Err(e) => {
                tracing::warn!(%service, replica, error = %e, "upstream unavailable");
                return error_response(StatusCode::BAD_GATEWAY, &format!("{service} is unavailable"));
            }
        }
    }
    retry_later(&format!("no replica of {service} is reachable; nothing was sent, try again"), 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hung_upstream_gets_a_json_504() {
        use axum::http::Request;
        use tower::ServiceExt;
        // Accepts connections (the kernel's backlog does) and never answers.
        let hung = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", hung.local_addr().unwrap());
        let upstreams = Service::ALL.into_iter().map(|s| (s, base.clone())).collect();
        let request = Request::get("/posts").body(Body::empty()).unwrap();
        let answer = Gateway::new(upstreams).router().oneshot(request).await.unwrap();
        assert_eq!(answer.status(), StatusCode::GATEWAY_TIMEOUT);
        let body = axum::body::to_bytes(answer.into_body(), 1 << 16).await.unwrap();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert!(body["error"].as_str().is_some_and(|e| e.contains("did not answer")), "{body}");
        drop(hung);
    }

    /// A replica on a real socket: answers every request with its name and counts them.
    async fn replica(name: &'static str) -> (String, Arc<AtomicUsize>) {
        use axum::response::IntoResponse;
        use futures_util::StreamExt;
        let seen = Arc::new(AtomicUsize::new(0));
        let counter = seen.clone();
        let app = Router::new().fallback(move |request: Request| {
            let counter = counter.clone();
            async move {
                counter.fetch_add(1, Ordering::SeqCst);
                if request.uri().path() == "/posts/stream" {
                    let events = futures_util::stream::iter([Ok::<_, io::Error>(format!("data: {name}\n\n"))])
                        .chain(futures_util::stream::pending());
                    return ([(header::CONTENT_TYPE, "text/event-stream")], Body::from_stream(events)).into_response();
                }
                let status = if request.method() == axum::http::Method::POST { StatusCode::CREATED } else { StatusCode::OK };
                // Read the body as a real service does: a server that answers
                // without reading a large body closes the connection, and a
                // later request racing that close on the pooled connection
                // would fail as "sent, maybe processed" (never resent).
                let _ = axum::body::to_bytes(request.into_body(), usize::MAX).await;
                (status, axum::Json(serde_json::json!({ "replica": name }))).into_response()
            }
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (base, seen)
    }

    /// The address of a replica that is down: nothing listens there.
    fn dead_replica() -> String {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", listener.local_addr().unwrap())
    }

    /// A replica that accepts a request, reads it whole and dies before answering.
    async fn dying_replica() -> (String, Arc<AtomicUsize>) {
        use tokio::io::AsyncReadExt;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(AtomicUsize::new(0));
        let counter = seen.clone();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let mut request = Vec::new();
                let mut buffer = [0u8; 4096];
                while let Ok(n @ 1..) = socket.read(&mut buffer).await {
                    request.extend_from_slice(&buffer[..n]);
                    if request.windows(7).any(|w| w == b"\"post\"}") {
                        break;
                    }
                }
                if !request.is_empty() {
                    counter.fetch_add(1, Ordering::SeqCst);
                }
                drop(socket);
            }
        });
        (base, seen)
    }

    fn every_service(overrides: &[(Service, Vec<String>)]) -> BTreeMap<Service, Vec<String>> {
        let mut upstreams: BTreeMap<Service, Vec<String>> = Service::ALL.into_iter().map(|s| (s, vec![dead_replica()])).collect();
        upstreams.extend(overrides.iter().cloned());
        upstreams
    }

    async fn call(router: &Router, request: axum::http::Request<Body>) -> (StatusCode, serde_json::Value) {
        use tower::ServiceExt;
        let answer = router.clone().oneshot(request).await.unwrap();
        let status = answer.status();
        let body = axum::body::to_bytes(answer.into_body(), 1 << 16).await.unwrap();
        (status, serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null))
    }

    fn create_post() -> axum::http::Request<Body> {
        axum::http::Request::post("/posts/create")
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(r#"{"title":"post"}"#))
            .unwrap()
    }

    #[test]
    fn replicas_take_turns_and_one_that_refused_goes_last_until_it_answers() {
        let replicas = Replicas::new(vec!["a".into(), "b".into(), "c".into()]);
        assert_eq!(replicas.order(), [0, 1, 2]);
        assert_eq!(replicas.order(), [1, 2, 0]);
        replicas.refused(2);
        assert_eq!(replicas.order(), [0, 1, 2]);
        assert_eq!(replicas.order(), [0, 1, 2], "its turn passes to the next");
        assert_eq!(replicas.order(), [1, 0, 2]);
        replicas.answered(2);
        assert_eq!(replicas.order(), [2, 0, 1]);
    }

    #[test]
    fn a_replica_that_kept_a_request_waiting_too_long_goes_after_the_others_until_it_answers() {
        let mut replicas = Replicas::new(vec!["a".into(), "b".into(), "c".into()]);
        replicas.epoch -= HUNG_AFTER * 2;
        let waiting = replicas.sent(0);
        assert_eq!(replicas.order(), [0, 1, 2], "a request just sent is no sign of anything");
        lock(&replicas.waiting[0]).since -= u64::try_from(HUNG_AFTER.as_millis()).unwrap();
        assert_eq!(replicas.order(), [1, 2, 0]);
        assert_eq!(replicas.order(), [2, 1, 0]);
        assert_eq!(replicas.order(), [1, 2, 0], "its turns pass to the others");
        replicas.refused(1);
        assert_eq!(replicas.order(), [2, 0, 1], "one that refused goes after one that seems hung");
        replicas.answered(0);
        assert_eq!(replicas.order(), [2, 0, 1]);
        assert_eq!(replicas.order(), [0, 2, 1], "an answer clears it, with a request still waiting");
        lock(&replicas.waiting[0]).since = 0;
        assert!(replicas.hung(0, replicas.now_ms()), "still waiting, long after its last answer");
        drop(waiting);
        assert!(!replicas.hung(0, replicas.now_ms()), "nothing waiting: not hung, however long ago it answered");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requests_after_one_a_replica_left_waiting_go_to_the_others() {
        // Accepts connections (the kernel's backlog does) and never answers: a stopped process.
        let hung = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let (good, seen) = replica("good").await;
        let router =
            Gateway::balanced(every_service(&[(Service::Query, vec![format!("http://{}", hung.local_addr().unwrap()), good])])).router();
        let stuck = tokio::spawn({
            let router = router.clone();
            async move { call(&router, axum::http::Request::get("/posts").body(Body::empty()).unwrap()).await }
        });
        tokio::time::sleep(HUNG_AFTER + Duration::from_millis(300)).await;
        assert!(!stuck.is_finished(), "the first request went to the hung replica");
        for _ in 0..4 {
            let request = axum::http::Request::get("/posts").body(Body::empty()).unwrap();
            let (status, body) = tokio::time::timeout(HUNG_AFTER, call(&router, request)).await.expect("answered by the live replica");
            assert_eq!((status, &body["replica"]), (StatusCode::OK, &serde_json::json!("good")));
        }
        assert_eq!(seen.load(Ordering::SeqCst), 4);
        stuck.abort();
        drop(hung);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requests_are_shared_among_replicas_and_a_dead_one_loses_none() {
        let (a, seen_a) = replica("a").await;
        let (b, seen_b) = replica("b").await;
        let (c, seen_c) = replica("c").await;
        let router =
            Gateway::balanced(every_service(&[(Service::Query, vec![a, b]), (Service::Posts, vec![dead_replica(), c, dead_replica()])]))
                .router();
        for _ in 0..10 {
            let (status, _) = call(&router, axum::http::Request::get("/posts").body(Body::empty()).unwrap()).await;
            assert_eq!(status, StatusCode::OK);
        }
        assert_eq!((seen_a.load(Ordering::SeqCst), seen_b.load(Ordering::SeqCst)), (5, 5), "round robin");
        // Writes too: a refused connection means nothing was sent, so the next replica gets it.
        for _ in 0..20 {
            let (status, body) = call(&router, create_post()).await;
            assert_eq!(status, StatusCode::CREATED, "{body}");
            assert_eq!(body["replica"], "c");
        }
        assert_eq!(seen_c.load(Ordering::SeqCst), 20, "each write reached the live replica exactly once");
    }

    /// Sends `head` and `body` on a raw connection to the gateway at
    /// `address`, then closes it without finishing the body.
    async fn send_and_hang_up(address: std::net::SocketAddr, head: &str, body: &[u8]) {
        use tokio::io::AsyncWriteExt;
        let mut tcp = tokio::net::TcpStream::connect(address).await.unwrap();
        tcp.write_all(head.as_bytes()).await.unwrap();
        tcp.write_all(body).await.unwrap();
        tcp.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        drop(tcp);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_request_whose_client_hung_up_before_the_body_ended_is_never_passed_on() {
        let (posts, seen) = replica("posts").await;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let gateway = Gateway::balanced(every_service(&[(Service::Posts, vec![posts.clone()]), (Service::Comments, vec![posts])]));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(
            listener,
            gateway,
            Shutdown::new(async move {
                let _ = stopped.await;
            }),
        ));
        let json = br#"{"title":"never finished"}"#;
        for (path, framing) in [("/posts/create", "chunked"), ("/posts/create", "length"), ("/posts/p1/comments", "chunked")] {
            let head = |framing: &str| match framing {
                "chunked" => {
                    format!("POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
                }
                _ => format!("POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n"),
            };
            // Every chunk but the last, empty one that ends a chunked body.
            let body = match framing {
                "chunked" => [format!("{:x}\r\n", json.len()).into_bytes(), json.to_vec(), b"\r\n".to_vec()].concat(),
                _ => json.to_vec(),
            };
            send_and_hang_up(address, &head(framing), &body).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(seen.load(Ordering::SeqCst), 0, "a body cut off is no request");
        // The same requests sent whole are passed on.
        let http = reqwest::Client::new();
        let answer = http.post(format!("http://{address}/posts/create")).body(&json[..]).send().await.unwrap();
        assert_eq!(answer.status(), StatusCode::CREATED);
        assert_eq!(seen.load(Ordering::SeqCst), 1);
        let _ = stop.send(());
        let _ = server.await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_not_sent_in_time_is_a_json_408_and_is_never_passed_on() {
        let (posts, seen) = replica("posts").await;
        let router = Gateway::balanced(every_service(&[(Service::Posts, vec![posts])])).router();
        use futures_util::StreamExt;
        // A first chunk, then nothing: the client neither ends the body nor hangs up.
        let trickle = futures_util::stream::iter([Ok::<_, io::Error>(axum::body::Bytes::from_static(b"{\"title\""))])
            .chain(futures_util::stream::pending());
        let request = axum::http::Request::post("/posts/create")
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from_stream(trickle))
            .unwrap();
        let started = tokio::time::Instant::now();
        let (status, body) = call(&router, request).await;
        assert_eq!(status, StatusCode::REQUEST_TIMEOUT, "{body}");
        assert!(body["error"].as_str().is_some_and(|e| e.contains("not sent in time")), "{body}");
        assert_eq!(started.elapsed(), BODY_READ_TIMEOUT);
        assert_eq!(seen.load(Ordering::SeqCst), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_request_a_replica_may_have_processed_is_never_sent_again() {
        let (dying, seen_dying) = dying_replica().await;
        let (live, seen_live) = replica("live").await;
        let router = Gateway::balanced(every_service(&[(Service::Posts, vec![dying, live])])).router();
        let (mut cut_off, mut created) = (0, 0);
        for _ in 0..10 {
            match call(&router, create_post()).await {
                (StatusCode::BAD_GATEWAY, body) => {
                    assert!(body["error"].as_str().is_some_and(|e| e.contains("posts is unavailable")), "{body}");
                    cut_off += 1;
                }
                (StatusCode::CREATED, _) => created += 1,
                other => panic!("unexpected answer {other:?}"),
            }
        }
        assert!(cut_off >= 1, "the dying replica got its turn");
        assert_eq!(cut_off + created, 10);
        assert_eq!(seen_dying.load(Ordering::SeqCst), cut_off, "each cut-off request reached the dying replica once");
        assert_eq!(seen_live.load(Ordering::SeqCst), created, "and none of them was resent to the live one");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn with_no_replica_reachable_the_answer_is_a_json_503_to_retry() {
        let router = Gateway::balanced(every_service(&[(Service::Posts, vec![dead_replica(), dead_replica()])])).router();
        use tower::ServiceExt;
        let answer = router.oneshot(create_post()).await.unwrap();
        assert_eq!(answer.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(answer.headers()[header::RETRY_AFTER], "1");
        let body = axum::body::to_bytes(answer.into_body(), 1 << 16).await.unwrap();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert!(body["error"].as_str().is_some_and(|e| e.contains("no replica of posts")), "{body}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn live_streams_are_balanced_too() {
        use futures_util::StreamExt;
        use tower::ServiceExt;
        let (a, _) = replica("a").await;
        let (b, _) = replica("b").await;
        let router = Gateway::balanced(every_service(&[(Service::Query, vec![a, dead_replica(), b])])).router();
        let mut names = Vec::new();
        let mut streams = Vec::new();
        for _ in 0..4 {
            let answer = router.clone().oneshot(axum::http::Request::get("/posts/stream").body(Body::empty()).unwrap()).await.unwrap();
            assert_eq!(answer.status(), StatusCode::OK);
            let mut body = answer.into_body().into_data_stream();
            let first = body.next().await.unwrap().unwrap();
            names.push(String::from_utf8(first.to_vec()).unwrap());
            streams.push(body); // kept open, as a browser keeps its stream
        }
        names.sort();
        assert_eq!(names, ["data: a\n\n", "data: a\n\n", "data: b\n\n", "data: b\n\n"]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_service_address_passes_internal_routes_to_its_replicas() {
        let (a, seen_a) = replica("a").await;
        let router = Gateway::for_service(Service::Query, vec![dead_replica(), a]).router();
        for path in ["/events", "/readyz", "/metrics"] {
            let request = axum::http::Request::post(path).body(Body::from(vec![b' '; 2 * MAX_REQUEST_BODY])).unwrap();
            let (status, body) = call(&router, request).await;
            assert_eq!(status, StatusCode::CREATED, "{path}: {body}");
        }
        assert_eq!(seen_a.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn ordinary_paths_pass_with_unreserved_characters_decoded() {
        assert_eq!(checked_path("/posts/abc/comments"), Ok("/posts/abc/comments".into()));
        assert_eq!(checked_path("/posts/"), Ok("/posts/".into()));
        assert_eq!(checked_path("/posts/%61b%7e/comments"), Ok("/posts/ab~/comments".into()));
        assert_eq!(checked_path("/posts/a%20b/comments"), Ok("/posts/a%20b/comments".into()));
        assert_eq!(checked_path("/posts/a%ff/comments"), Ok("/posts/a%FF/comments".into()));
        assert_eq!(checked_path("/api/flow"), Ok("/api/flow".into()));
        assert_eq!(checked_path("/"), Ok("/".into()));
    }

    #[test]
    fn dot_and_empty_segments_backslashes_and_encoded_slashes_are_refused() {
        for path in [
            "/posts/x/comments/../../../events",
            "/posts/%2e%2e/events",
            "/posts/%2E%2e/metrics",
            "/posts/.%2e/status",
            "/posts/%2e./status",
            "/posts/./flow",
            "/posts/%2E/flow",
            "/posts/x/..%2f..%2fevents",
            "/posts/x/..%2F..%2Fevents",
            "/posts/x/..%5c..%5cevents",
            "/posts\\..\\events",
            "//events",
            "/posts//comments",
            "/posts/%zz",
            "/posts/%2",
            "posts",
        ] {
            assert!(matches!(checked_path(path), Err(PathRefusal::Malformed(_))), "{path}: {:?}", checked_path(path));
        }
    }

    #[test]
    fn internal_routes_are_refused_in_any_spelling() {
        for name in INTERNAL_PATHS {
            let upper = name.to_ascii_uppercase();
            let encoded: String = name.bytes().map(|b| if b == b'/' { "/".to_owned() } else { format!("%{b:02x}") }).collect();
            for path in [name.to_string(), format!("{name}/"), upper, encoded] {
                assert_eq!(checked_path(&path), Err(PathRefusal::Internal), "{path}");
            }
        }
    }
}
