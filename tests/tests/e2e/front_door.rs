//! The front door: nothing internal is reachable through the gateway, in any
//! spelling. Requests are written as raw bytes over a TCP socket, because an
//! HTTP client (reqwest included) normalises `..` and `%2e` before sending,
//! which is exactly what would hide the hole.

use blog_tests::TestSuite;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Internal routes, each answered by at least one service.
const INTERNAL: &[&str] = &["events", "status", "metrics", "flow", "healthz", "readyz"];

/// Ways to spell `/<name>` (or a path that resolves to it) that a lenient
/// router or HTTP client would turn into the internal route.
fn spellings(name: &str) -> Vec<String> {
    let upper = name.to_ascii_uppercase();
    let encoded: String = name.bytes().map(|b| format!("%{b:02x}")).collect();
    vec![
        format!("/{name}"),
        format!("/{name}/"),
        format!("/{upper}"),
        format!("/{encoded}"),
        format!("//{name}"),
        format!("/posts/x/comments/../../../{name}"),
        format!("/posts/x/comments/%2e%2e/%2e%2e/%2e%2e/{name}"),
        format!("/posts/x/comments/%2E%2e/%2e%2E/.%2e/{name}"),
        format!("/posts/%2e%2e/{name}"),
        format!("/posts/%2E%2e/{name}"),
        format!("/posts/.%2e/{name}"),
        format!("/posts/%2e./{name}"),
        format!("/posts/../{name}"),
        format!("/posts/./../{name}"),
        format!("/posts/x/..%2f..%2f{name}"),
        format!("/posts/x/..%2F..%2F{name}"),
        format!("/posts/x/comments/..%2f..%2f..%2f{name}"),
        format!("/posts/x/..\\..\\{name}"),
        format!("/posts\\..\\{name}"),
        format!("/posts/x/..%5c..%5c{name}"),
        format!("/posts/x/..%5C..%5C{name}"),
        format!("/posts//{name}"),
        format!("/posts/x/comments/..//..//../{upper}"),
    ]
}

/// One request written byte for byte; the status and whatever body arrived.
async fn raw_request(gateway: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    let addr = gateway.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("the gateway accepts connections");
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: posts.com\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.expect("request written");
    let mut answer = Vec::new();
    let mut buffer = [0u8; 4096];
    // Read the head first: a 2xx is already the failure (and `/flow` would
    // stream forever).
    loop {
        let n = stream.read(&mut buffer).await.expect("answer read");
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&buffer[..n]);
        if answer.windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text.split(' ').nth(1).and_then(|code| code.parse().ok()).unwrap_or(0);
    assert!(!(200..400).contains(&status), "{method} {path} was answered {status}:\n{text}");
    let _ = stream.read_to_end(&mut answer).await;
    (status, String::from_utf8_lossy(&answer).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_internal_route_is_reachable_through_the_gateway_in_any_spelling() {
    let suite = TestSuite::launch().await;
    let post = suite.create_post("target").await;
    let comment = suite.comment(&post.id, "a comment to forge a decision for").await.remove(0);
    suite.wait_for_status(&post.id, &comment.id, "approved").await;
    let before = suite.bus_events().await.len();

    let forged = json!({"type": "CommentModerated", "seq": 1_000_000, "data": {
        "id": comment.id, "postId": post.id, "content": "forged", "status": "rejected"
    }})
    .to_string();
    let mut tried = 0;
    for name in INTERNAL {
        for path in spellings(name) {
            for (method, body) in [("GET", ""), ("POST", forged.as_str())] {
                let (status, answer) = raw_request(&suite.gateway, method, &path, body).await;
                tried += 1;
                assert!((400..500).contains(&status), "{method} {path}: {status}\n{answer}");
                for marker in ["\"applied\"", "# TYPE", "# HELP", "\"ready\"", "\"ok\"", "event-stream", "\"subscribers\""] {
                    assert!(!answer.contains(marker), "{method} {path} reached an internal handler ({marker}):\n{answer}");
                }
                // What the gateway refuses itself is a JSON error; a request
                // line hyper cannot parse is refused before any handler.
                if answer.contains("content-type") || answer.contains("Content-Type") {
                    assert!(answer.contains("{\"error\":"), "{method} {path}: not a JSON error:\n{answer}");
                }
            }
        }
    }
    println!("{tried} internal-route spellings refused");

    // The public routes still work, query strings included.
    let listed = suite.get(&format!("/posts/{}/comments?unused=1", post.id)).await;
    assert_eq!(listed.status, 200, "{:?}", listed.body);
    assert_eq!(suite.get("/posts?x=y").await.status, 200);

    // Nothing forged landed: a real post made afterwards is visible, so a
    // forged event sent before it would be too.
    let real = suite.create_post("real").await;
    suite.eventually("the real post in query", || async { suite.view().await.contains_key(&real.id).then_some(()) }).await;
    let view = suite.view().await;
    assert_eq!(view.len(), 2);
    assert_eq!(view[&post.id].comments[0].status, "approved");
    assert_eq!(suite.comments(&post.id).await[0].status, "approved");
    let log = suite.bus_events().await;
    assert_eq!(log.len(), before + 1, "{log:?}");
    assert_eq!(log.last().map(|e| &e["data"]["id"]), Some(&Value::String(real.id.clone())));
    suite.shutdown().await;
}

/// Runs the client binary with `bind` as `BIND_ADDR` (unset if `None`) on a
/// free port; its output goes to a file in `dir`.
fn start_client(dir: &std::path::Path, bind: Option<&str>) -> (std::process::Child, u16, std::path::PathBuf) {
    let port = blog_tests::free_port();
    let log = dir.join(format!("client-{port}.log"));
    let out = std::fs::File::create(&log).unwrap();
    let mut command = std::process::Command::new(blog_tests::binaries().join("client"));
    command.env("PORT", port.to_string()).env_remove("BIND_ADDR").stdout(out.try_clone().unwrap()).stderr(out);
    if let Some(bind) = bind {
        command.env("BIND_ADDR", bind);
    }
    (command.spawn().expect("the client binary starts"), port, log)
}

/// The output up to the line saying where the process listens (polled);
/// the process is stopped then.
async fn stop_once_listening(child: &mut std::process::Child, log: &std::path::Path) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let listening = loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains("listening") {
            break text;
        }
        assert!(std::time::Instant::now() < deadline, "the process never said where it listens:\n{text}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    child.kill().unwrap();
    child.wait().unwrap();
    listening
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_listen_on_loopback_unless_bind_addr_says_otherwise() {
    let dir = tempfile::tempdir().unwrap();

    // Unset: loopback only.
    let (mut child, port, log) = start_client(dir.path(), None);
    let listening = stop_once_listening(&mut child, &log).await;
    assert!(listening.contains(&format!("127.0.0.1:{port}")), "{listening}");

    // Set: that address.
    let (mut child, port, log) = start_client(dir.path(), Some("0.0.0.0"));
    let listening = stop_once_listening(&mut child, &log).await;
    assert!(listening.contains(&format!("0.0.0.0:{port}")), "{listening}");

    // Malformed: a configuration error naming the variable.
    let (mut child, _, log) = start_client(dir.path(), Some("everywhere"));
    let status = child.wait().unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(status.code(), Some(2), "{text}");
    assert!(text.contains("BIND_ADDR"), "{text}");
}
