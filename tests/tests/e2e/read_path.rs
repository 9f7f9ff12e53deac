//! The read side served from memory: the original's `GET /posts` object
//! kept byte-for-byte (the original React client reads it), pages for large
//! views, revalidation and compression through the gateway, and query's
//! memory bounded however many readers share a large view.

use std::sync::Arc;

use blog_domain::Service;
use blog_tests::TestSuite;
use serde_json::{Value, json};

/// Query's resident memory, current and peak, in KiB.
fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/<pid>/status of query");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("{name} in /proc/{pid}/status"))
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Creates `count` posts through the gateway with `workers` concurrent clients.
async fn create_posts(suite: &TestSuite, count: usize, workers: usize, title: impl Fn(usize) -> String + Send + Sync + 'static) {
    let title = Arc::new(title);
    let tasks: Vec<_> = (0..workers)
        .map(|w| {
            let (http, url, title) = (suite.http.clone(), format!("{}/posts/create", suite.gateway), title.clone());
            tokio::spawn(async move {
                for i in (w..count).step_by(workers) {
                    let answer = http.post(&url).json(&json!({ "title": title(i) })).send().await.expect("create sent");
                    assert_eq!(answer.status().as_u16(), 201, "create post {i}");
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("writer");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_readers_of_a_ten_thousand_post_view_stay_under_64_mib() {
    const POSTS: usize = 10_000;
    const READERS: usize = 50;
    let suite = TestSuite::launch().await;
    create_posts(&suite, POSTS, 50, |i| format!("post {i:05} of the memory test, with a title of about a hundred characters....")).await;
    let query = format!("{}/posts", suite.url(Service::Query));
    let size = suite
        .eventually("all posts in query", || async {
            let body = suite.http.get(&query).send().await.ok()?.bytes().await.ok()?;
            let view: serde_json::Map<String, Value> = serde_json::from_slice(&body).ok()?;
            (view.len() == POSTS).then_some(body.len())
        })
        .await;

    let pid = suite.suite().supervisor.pid("query").expect("query runs");
    let (rss_before, _) = memory_kib(pid);
    let start = Arc::new(tokio::sync::Barrier::new(READERS));
    let readers: Vec<_> = (0..READERS)
        .map(|_| {
            let (http, url, start) = (suite.http.clone(), query.clone(), start.clone());
            tokio::spawn(async move {
                start.wait().await;
                http.get(url).send().await.expect("GET /posts").bytes().await.expect("the view").len()
            })
        })
        .collect();
    for reader in readers {
        assert_eq!(reader.await.expect("reader"), size, "every reader gets the whole view");
    }
    let (rss_after, peak) = memory_kib(pid);
    println!(
        "query with a {POSTS}-post view ({:.1} MiB of JSON): RSS {:.1} MiB before {READERS} concurrent readers, {:.1} MiB after, peak {:.1} MiB",
        size as f64 / 1_048_576.0,
        rss_before as f64 / 1024.0,
        rss_after as f64 / 1024.0,
        peak as f64 / 1024.0
    );
    assert!(peak < 64 * 1024, "query peaked at {peak} KiB with {READERS} readers of a {size}-byte view");
    suite.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_originals_full_view_and_the_pages_show_the_same_posts() {
    let suite = TestSuite::launch().await;
    let mut created = Vec::new();
    for i in 0..5 {
        let post = suite.create_post(&format!("post {i}")).await;
        let comment = suite.comment(&post.id, &format!("comment on {i}")).await.remove(0);
        created.push((post, comment));
    }
    for (post, comment) in &created {
        suite.wait_for_status(&post.id, &comment.id, "approved").await;
    }

    // The original's shape, byte for byte: an object keyed by id, in creation order.
    let response = suite.http.get(format!("{}/posts", suite.gateway)).send().await.expect("GET /posts");
    assert_eq!(response.headers()["content-type"], "application/json");
    let text = response.text().await.expect("a body");
    let expected: String = created
        .iter()
        .map(|(post, comment)| {
            format!(
                r#""{0}":{{"id":"{0}","title":"{1}","comments":[{{"id":"{2}","content":"{3}","status":"approved"}}]}}"#,
                post.id, post.title, comment.id, comment.content
            )
        })
        .collect::<Vec<_>>()
        .join(",");
    assert_eq!(text, format!("{{{expected}}}"));

    // Pages of two, newest first, walk the same posts.
    let mut walked = Vec::new();
    let mut path = "/posts?limit=2".to_owned();
    loop {
        let page = suite.get(&path).await;
        assert_eq!(page.status, 200, "{path}: {:?}", page.body);
        let posts = page.body["posts"].as_array().expect("posts").clone();
        assert!(posts.len() <= 2);
        walked.extend(posts);
        match page.body["next"].as_str() {
            Some(next) => path = format!("/posts?limit=2&before={next}"),
            None => break,
        }
    }
    let full: serde_json::Map<String, Value> = serde_json::from_str(&text).expect("the full view");
    let mut newest_first: Vec<Value> = full.values().cloned().collect();
    newest_first.reverse();
    assert_eq!(walked, newest_first);

    for bad in ["/posts?limit=zero", "/posts?before=x", "/posts?limit=0"] {
        let answer = suite.get(bad).await;
        assert_eq!((answer.status, answer.body["error"].is_string()), (400, true), "{bad}: {answer:?}");
    }

    // Through the gateway: revalidation answers 304, gzip when asked.
    let first = suite.http.get(format!("{}/posts", suite.gateway)).send().await.expect("GET");
    let etag = first.headers()["etag"].clone();
    assert_eq!(first.headers()["vary"], "accept-encoding");
    let again = suite.http.get(format!("{}/posts", suite.gateway)).header("if-none-match", etag).send().await.expect("GET");
    assert_eq!(again.status().as_u16(), 304);
    let gzipped = suite.http.get(format!("{}/posts", suite.gateway)).header("accept-encoding", "gzip").send().await.expect("GET");
    assert_eq!(gzipped.headers()["content-encoding"], "gzip");
    let body = gzipped.bytes().await.expect("a body");
    assert!(body.starts_with(&[0x1f, 0x8b]) && body.len() < text.len(), "{} gzipped bytes for {} bytes", body.len(), text.len());

    suite.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_view_in_memory_is_the_view_in_the_database_after_concurrent_load() {
    let suite = TestSuite::launch().await;
    let progress = blog_tests::load::Progress::default();
    let report = blog_tests::load::run(suite.http.clone(), suite.gateway.clone(), "mem".into(), 8, 10, progress).await;
    let (posts, comments, _) = suite.assert_converged(&report).await;
    let query = format!("{}/posts", suite.url(Service::Query));
    let served = suite.http.get(&query).send().await.expect("GET /posts").bytes().await.expect("the view");

    // A restart loads the view from the database alone.
    suite.stop(Service::Query).await;
    suite.restart(Service::Query).await;
    let reloaded = suite.http.get(&query).send().await.expect("GET /posts").bytes().await.expect("the view");
    println!("{posts} posts and {comments} comments: {} bytes served from memory, the same after a restart", served.len());
    assert!(
        served == reloaded,
        "memory and database disagree:\n{}\n{}",
        String::from_utf8_lossy(&served),
        String::from_utf8_lossy(&reloaded)
    );
    suite.shutdown().await;
}
