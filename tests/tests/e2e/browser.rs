//! The UI in a real browser: Debian's Chromium, headless, driven over
//! WebDriver (chromedriver) against the real services on 127.0.0.1.
//!
//! Each test starts its own chromedriver on a free port and kills it (its
//! whole process group, so Chromium too) when done, and gives every browser
//! session a fresh profile directory. The tests never sleep to synchronise:
//! every expectation is polled with a deadline, and a `window` marker set
//! after the first load proves that what the page shows arrived live, not by
//! a reload. The tests take turns (one browser at a time), since they share
//! a small machine with the build. Screenshots of the main page land in
//! `artifacts/screenshots/` (and one in `docs/screenshot.png` for the README).

use std::{
    future::Future,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use blog_domain::Service;
use blog_tests::{TestSuite, free_port};
use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::{Value, json};

/// Longest any one expectation in the page may take.
const PAGE_DEADLINE: Duration = Duration::from_secs(15);
const DESKTOP: (u32, u32) = (1280, 900);
const PHONE: (u32, u32) = (390, 844);

/// One browser test at a time.
static ONE_BROWSER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The flags the issue asks for, plus headless and a fresh profile.
const CHROMIUM_FLAGS: [&str; 8] = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
];

/// A program from `$env_var`, else from `PATH`; fails the test with the fix.
fn program(name: &str, env_var: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(env_var).filter(|p| !p.is_empty()) {
        return PathBuf::from(path);
    }
    let found = std::env::var_os("PATH").and_then(|path| std::env::split_paths(&path).map(|dir| dir.join(name)).find(|p| p.is_file()));
    found.unwrap_or_else(|| {
        panic!(
            "{name} is not installed: the browser tests need Debian's Chromium and its WebDriver \
             (`apt-get install -y chromium chromium-driver`), or set {env_var} to the binary"
        )
    })
}

/// A chromedriver process of our own, on a free 127.0.0.1 port.
struct Chromedriver {
    child: Child,
    url: String,
    chromium: PathBuf,
    profiles: tempfile::TempDir,
}

impl Chromedriver {
    async fn start() -> Self {
        let chromium = program("chromium", "CHROMIUM");
        let driver = program("chromedriver", "CHROMEDRIVER");
        let port = free_port();
        let mut command = Command::new(&driver);
        command.arg(format!("--port={port}")).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
        // Its own process group, so Chromium's processes can be ended with it.
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let child = command.spawn().unwrap_or_else(|e| panic!("cannot start {}: {e}", driver.display()));
        let this = Self { child, url: format!("http://127.0.0.1:{port}"), chromium, profiles: tempfile::tempdir().expect("a temp dir") };
        let http = blog_kit::http::client::http_client(Duration::from_secs(2));
        let status = format!("{}/status", this.url);
        until("chromedriver to be ready", Duration::from_secs(20), || async {
            let body: Value = http.get(&status).send().await.ok()?.json().await.ok()?;
            body["value"]["ready"].as_bool().filter(|ready| *ready)
        })
        .await;
        this
    }

    /// A new browser (fresh profile) with a window of `size`.
    async fn session(&self, (width, height): (u32, u32)) -> Client {
        let profile = tempfile::tempdir_in(self.profiles.path()).expect("a profile dir").keep();
        let mut args: Vec<String> = CHROMIUM_FLAGS.iter().map(|s| (*s).to_owned()).collect();
        args.push(format!("--user-data-dir={}", profile.display()));
        args.push(format!("--window-size={width},{height}"));
        let capabilities = json!({
            "browserName": "chrome",
            "goog:chromeOptions": { "binary": self.chromium, "args": args },
        });
        let serde_json::Value::Object(capabilities) = capabilities else { unreachable!() };
        let client = ClientBuilder::new(HttpConnector::new())
            .capabilities(capabilities)
            .connect(&self.url)
            .await
            .unwrap_or_else(|e| panic!("chromium did not start through chromedriver: {e}"));
        client.set_window_size(width, height).await.expect("window resized");
        client
    }
}

impl Drop for Chromedriver {
    fn drop(&mut self) {
        if let Some(group) = i32::try_from(self.child.id()).ok().and_then(rustix::process::Pid::from_raw) {
            let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One test's world: its turn at the browser, the suite, a chromedriver
/// and the browsers it opened.
struct Stage {
    suite: TestSuite,
    driver: Chromedriver,
    browsers: Vec<Client>,
    _turn: tokio::sync::MutexGuard<'static, ()>,
}

impl Stage {
    async fn start() -> Self {
        let turn = ONE_BROWSER.lock().await;
        let suite = TestSuite::launch().await;
        Self { suite, driver: Chromedriver::start().await, browsers: Vec::new(), _turn: turn }
    }

    /// A new browser at desktop size with the page open and live.
    async fn browser(&mut self) -> Client {
        let browser = self.driver.session(DESKTOP).await;
        open(&browser, &self.suite).await;
        self.browsers.push(browser.clone());
        browser
    }

    /// Closes the browsers, ends chromedriver and stops the suite.
    async fn finish(self) {
        for browser in self.browsers {
            browser.close().await.expect("browser closed");
        }
        drop(self.driver);
        self.suite.shutdown().await;
    }
}

/// Polls `check` until it returns `Some`, failing after `within`.
async fn until<T, F, Fut>(what: &str, within: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out after {within:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs `script` in the page and returns its value.
async fn js(browser: &Client, script: &str) -> Value {
    browser.execute(script, vec![]).await.unwrap_or_else(|e| panic!("script failed: {e}\n{script}"))
}

/// Polls `script` until it returns `expected`; shows the last value on failure.
async fn until_js(browser: &Client, what: &str, script: &str, expected: &Value) {
    let deadline = Instant::now() + PAGE_DEADLINE;
    loop {
        let last = js(browser, script).await;
        if &last == expected {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}: expected {expected}, last saw {last}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Opens the page and waits until posts are loaded and both streams are
/// live; then marks the window, so a reload would show.
async fn open(browser: &Client, suite: &TestSuite) {
    browser.goto(&format!("{}/", suite.gateway)).await.expect("the page opens");
    until_js(
        browser,
        "the page to load and its streams to connect",
        "return [document.documentElement.dataset.loaded === 'true', \
                 document.getElementById('live-status').dataset.mode, \
                 document.getElementById('flow-panel').dataset.state]",
        &json!([true, "live", "live"]),
    )
    .await;
    js(browser, "window.__sameDocument = 'still here'; return null").await;
}

/// Whether the page is still the one [`open`] loaded.
async fn assert_not_reloaded(browser: &Client) {
    assert_eq!(js(browser, "return window.__sameDocument || null").await, json!("still here"), "the page was reloaded");
}

async fn type_into(browser: &Client, css: &str, text: &str) {
    let input = browser.find(Locator::Css(css)).await.unwrap_or_else(|e| panic!("{css}: {e}"));
    input.clear().await.expect("input cleared");
    if !text.is_empty() {
        input.send_keys(text).await.expect("typed");
    }
}

async fn click(browser: &Client, css: &str) {
    browser
        .find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css}: {e}"))
        .click()
        .await
        .unwrap_or_else(|e| panic!("click {css}: {e}"));
}

/// Creates a post through the form; returns its id once its card shows.
async fn create_post(browser: &Client, title: &str) -> String {
    type_into(browser, "#post-title", title).await;
    click(browser, "#create-post-submit").await;
    let script = format!(
        "const card = [...document.querySelectorAll('article.post')].find(a => a.querySelector('h3').textContent === {});
         return card ? card.dataset.postId : null",
        json!(title)
    );
    until(&format!("the card of {title:?}"), PAGE_DEADLINE, || async { js(browser, &script).await.as_str().map(str::to_owned) }).await
}

async fn add_comment(browser: &Client, post_id: &str, content: &str) {
    let card = format!("article.post[data-post-id={}]", json!(post_id));
    type_into(browser, &format!("{card} input[name=content]"), content).await;
    click(browser, &format!("{card} .comment-form button[type=submit]")).await;
}

/// `[[text, status, text hidden?], ...]` of a post's comments, in order.
fn comments_script(post_id: &str) -> String {
    format!(
        "return [...document.querySelectorAll('article.post[data-post-id=' + CSS.escape({}) + '] li.comment')]
           .map(li => {{ const t = li.querySelector('.comment-text'); return [t.textContent, li.dataset.status, t.hidden]; }})",
        json!(post_id)
    )
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace root").to_owned()
}

/// Waits until no animation runs, so a screenshot shows the resting page.
async fn settle(browser: &Client) {
    until_js(browser, "animations to finish", "return document.getAnimations().filter(a => a.playState === 'running' && a.effect && a.effect.getTiming().iterations !== Infinity).length", &json!(0)).await;
}

async fn screenshot(browser: &Client, name: &str) -> PathBuf {
    let dir = repo_root().join("artifacts/screenshots");
    std::fs::create_dir_all(&dir).expect("artifacts/screenshots is writable");
    let path = dir.join(name);
    let png = browser.screenshot().await.expect("a screenshot");
    assert!(png.starts_with(b"\x89PNG"), "the screenshot is not a PNG");
    std::fs::write(&path, png).expect("screenshot saved");
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn comments_reach_their_final_state_live_and_the_flow_shows_every_event() {
    let mut stage = Stage::start().await;
    let browser = stage.browser().await;
    until_js(&browser, "the empty state", "return document.getElementById('posts-state').dataset.state", &json!("empty")).await;

    let post_id = create_post(&browser, "Watching events flow").await;
    add_comment(&browser, &post_id, "Great explanation, thanks!").await;
    let count =
        format!("return document.querySelectorAll('article.post[data-post-id=' + CSS.escape({}) + '] li.comment').length", json!(post_id));
    until_js(&browser, "the first comment", &count, &json!(1)).await;
    add_comment(&browser, &post_id, "I would rather have an Orange").await;

    // Both reach their final state in place: approved shows its text, the
    // rejected one hides it behind a reveal.
    until_js(
        &browser,
        "both comments moderated",
        &comments_script(&post_id),
        &json!([["Great explanation, thanks!", "approved", false], ["I would rather have an Orange", "rejected", true]]),
    )
    .await;
    let card = format!("article.post[data-post-id={}]", json!(post_id));
    let reveal = browser.find(Locator::Css(&format!("{card} li[data-status=rejected] button.reveal"))).await.expect("a reveal button");
    assert_eq!(reveal.attr("aria-expanded").await.unwrap().as_deref(), Some("false"));
    reveal.click().await.expect("reveal clicked");
    assert_eq!(reveal.attr("aria-expanded").await.unwrap().as_deref(), Some("true"));
    let hidden_text = browser.find(Locator::Css(&format!("{card} li[data-status=rejected] .comment-text"))).await.unwrap();
    assert!(hidden_text.is_displayed().await.unwrap(), "the rejected text shows after the reveal");
    assert_eq!(hidden_text.text().await.unwrap(), "I would rather have an Orange");
    assert_not_reloaded(&browser).await;

    // The event flow panel saw the whole chain, each event with the receipt
    // of each subscriber that consumes its type (the bus pushes nothing else).
    let flow = "const rows = [...document.querySelectorAll('#flow li.flow-item')];
        const receipts = t => rows.filter(r => r.dataset.type === t)
          .map(r => [...r.querySelectorAll('[data-subscriber]')].map(d => d.dataset.subscriber).sort().join(','));
        return ['PostCreated', 'CommentCreated', 'CommentModerated', 'CommentUpdated'].map(receipts)";
    until_js(
        &browser,
        "the four event types in the flow panel, each received by its consumers",
        flow,
        &json!([["comments,query"], ["moderation,query", "moderation,query"], ["comments", "comments"], ["query", "query"]]),
    )
    .await;
    let seqs = js(&browser, "return [...document.querySelectorAll('#flow li.flow-item')].map(r => Number(r.dataset.seq))").await;
    assert_eq!(seqs, json!([7, 6, 5, 4, 3, 2, 1]), "newest first, one row per event");
    let first = js(&browser, "return document.querySelector('#flow li[data-seq=\"1\"]').dataset.type").await;
    assert_eq!(first, json!("PostCreated"));

    // The status view: six healthy services, three subscribers caught up
    // (cursor/head, lag, delivered, retries); each was pushed only the types
    // it consumes: comments 1 post + 2 decisions, moderation 2 comments,
    // query 1 post + 2 comments + 2 updates.
    until_js(
        &browser,
        "the status view",
        "return [document.querySelectorAll('#services li[data-healthy=true]').length,
                 [...document.querySelectorAll('#subscribers tbody tr')]
                   .map(r => [r.dataset.subscriber, ...[...r.querySelectorAll('td')].map(td => td.textContent)])]",
        &json!([6, [["comments", "7/7", "0", "3", "0"], ["moderation", "7/7", "0", "2", "0"], ["query", "7/7", "0", "5", "0"]]]),
    )
    .await;

    // Screenshots: desktop (also the README's), then phone width.
    js(&browser, "document.activeElement && document.activeElement.blur(); window.scrollTo(0, 0); return null").await;
    browser.set_window_size(DESKTOP.0, 1200).await.expect("a taller window for the screenshot");
    settle(&browser).await;
    let desktop = screenshot(&browser, "desktop.png").await;
    // The README's copy changes only on request (or when missing), so a test
    // run leaves the work tree clean.
    let readme_copy = repo_root().join("docs/screenshot.png");
    if !readme_copy.exists() || std::env::var_os("BLOG_UPDATE_SCREENSHOT").is_some() {
        std::fs::create_dir_all(repo_root().join("docs")).expect("docs/ is writable");
        std::fs::copy(&desktop, &readme_copy).expect("docs/screenshot.png written");
    }
    browser.set_window_size(PHONE.0, PHONE.1).await.expect("phone width");
    until_js(&browser, "the phone layout", "return window.innerWidth <= 400", &json!(true)).await;
    let too_wide = js(
        &browser,
        "const width = document.documentElement.clientWidth;
         return [...document.querySelectorAll('body *')].filter(e => e.getBoundingClientRect().right > width + 0.5)
           .slice(0, 5).map(e => e.tagName + '#' + e.id + '.' + e.className + ' ' + Math.round(e.getBoundingClientRect().right) + '/' + width)",
    )
    .await;
    assert_eq!(too_wide, json!([]), "the page scrolls sideways at phone width");
    settle(&browser).await;
    screenshot(&browser, "phone.png").await;
    assert_not_reloaded(&browser).await;

    stage.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_from_another_browser_appears_live() {
    let mut stage = Stage::start().await;
    let watcher = stage.browser().await;
    let author = stage.browser().await;

    let post_id = create_post(&author, "Hello from the other tab").await;
    let card = format!(
        "const card = document.querySelector('article.post[data-post-id=' + CSS.escape({}) + ']');
         return card ? card.querySelector('h3').textContent : null",
        json!(post_id)
    );
    until_js(&watcher, "the other browser's post", &card, &json!("Hello from the other tab")).await;

    add_comment(&author, &post_id, "Live, no reload needed").await;
    until_js(
        &watcher,
        "the other browser's comment, approved",
        &comments_script(&post_id),
        &json!([["Live, no reload needed", "approved", false]]),
    )
    .await;
    // Screen readers hear about both through the live region.
    let heard = js(&watcher, "return document.getElementById('announcer').textContent").await;
    let heard = heard.as_str().unwrap_or_default();
    assert!(heard.contains("New post: Hello from the other tab"), "announced: {heard}");
    assert!(heard.contains("approved"), "announced: {heard}");
    assert_not_reloaded(&watcher).await;

    stage.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validation_errors_show_inline_next_to_their_field() {
    let mut stage = Stage::start().await;
    let browser = stage.browser().await;

    // An empty title: the API's message, next to the field, which keeps focus.
    click(&browser, "#create-post-submit").await;
    until_js(
        &browser,
        "the title error",
        "const e = document.getElementById('post-error'); return e.hidden ? null : e.textContent",
        &json!("`title` must not be empty"),
    )
    .await;
    let state = js(
        &browser,
        "const input = document.getElementById('post-title');
         return [input.getAttribute('aria-invalid'), document.activeElement === input,
                 input.getAttribute('aria-describedby'), document.getElementById('posts-state').dataset.state,
                 document.querySelectorAll('article.post').length]",
    )
    .await;
    assert_eq!(state, json!(["true", true, "post-error", "empty", 0]));
    // Typing clears it.
    type_into(&browser, "#post-title", "x").await;
    until_js(&browser, "the error to clear", "return document.getElementById('post-error').hidden", &json!(true)).await;

    // A blank comment gets the comments service's own message.
    let post = stage.suite.create_post("Needs a comment").await;
    let expected = stage.suite.post_json(&format!("/posts/{}/comments", post.id), &json!({ "content": "   " })).await;
    assert_eq!(expected.status, 400);
    let card = format!("article.post[data-post-id={}]", json!(post.id));
    until(&format!("the card of {}", post.id), PAGE_DEADLINE, || async { browser.find(Locator::Css(&card)).await.ok() }).await;
    add_comment(&browser, &post.id, "   ").await;
    until_js(
        &browser,
        "the comment error",
        &format!(
            "const e = document.querySelector({}); return e.hidden ? null : e.textContent",
            json!(format!("{card} .comment-form .field-error"))
        ),
        &expected.body["error"],
    )
    .await;
    assert_eq!(js(&browser, &comments_script(&post.id)).await, json!([]));
    assert_not_reloaded(&browser).await;

    stage.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_rides_out_a_query_restart_and_catches_up() {
    let mut stage = Stage::start().await;
    let browser = stage.browser().await;

    // The read side goes away: the page says so and keeps trying.
    stage.suite.stop(Service::Query).await;
    until_js(&browser, "the page to notice", "return document.getElementById('live-status').dataset.mode !== 'live'", &json!(true)).await;

    // Meanwhile a post is written; once query is back, the page catches up
    // on its own and goes live again.
    let post = stage.suite.create_post("Written while query was down").await;
    stage.suite.restart(Service::Query).await;
    let card = format!(
        "const card = document.querySelector('article.post[data-post-id=' + CSS.escape({}) + ']');
         return [card ? card.querySelector('h3').textContent : null, document.getElementById('live-status').dataset.mode]",
        json!(post.id)
    );
    until_js(&browser, "the missed post, live again", &card, &json!(["Written while query was down", "live"])).await;
    assert_not_reloaded(&browser).await;

    stage.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_loads_posts_a_page_at_a_time_and_more_on_demand() {
    let mut stage = Stage::start().await;
    let mut created = Vec::new();
    for i in 0..25 {
        created.push(stage.suite.create_post(&format!("Paged post {i:02}")).await);
    }
    let oldest = created[0].clone();
    let newest = created[24].clone();
    let all_approved = stage.suite.comment(&newest.id, "so the view is complete").await.remove(0);
    stage.suite.wait_for_status(&newest.id, &all_approved.id, "approved").await;

    let browser = stage.browser().await;
    let titles = "return [...document.querySelectorAll('article.post h3')].map(h => h.textContent)";
    let first_page: Vec<Value> = (5..25).rev().map(|i| json!(format!("Paged post {i:02}"))).collect();
    until_js(&browser, "the first page, newest first", titles, &Value::Array(first_page)).await;
    let more_visible = "return !document.getElementById('load-more').hidden";
    assert_eq!(js(&browser, more_visible).await, json!(true), "older posts are offered");

    // Comments on a post the page has not loaded cost no reload of the view:
    // the page fetches nothing until it is asked for more.
    let fetches = "return performance.getEntriesByType('resource').filter(r => new URL(r.name).pathname === '/posts').length";
    let before = js(&browser, fetches).await;
    let unseen = stage.suite.comment(&oldest.id, "on a post not loaded yet").await.remove(0);
    stage.suite.wait_for_status(&oldest.id, &unseen.id, "approved").await;
    // A comment after it on a loaded post: once it shows, the page has had the earlier events.
    add_comment(&browser, &newest.id, "a marker").await;
    until_js(
        &browser,
        "the marker comment, approved",
        &comments_script(&newest.id),
        &json!([["so the view is complete", "approved", false], ["a marker", "approved", false]]),
    )
    .await;
    assert_eq!(js(&browser, fetches).await, before, "a comment on an unloaded post reloaded the view");

    // "Load more" brings the rest, with the comment that arrived meanwhile.
    click(&browser, "#load-more").await;
    let everything: Vec<Value> = (0..25).rev().map(|i| json!(format!("Paged post {i:02}"))).collect();
    until_js(&browser, "every post, newest first", titles, &Value::Array(everything)).await;
    until_js(&browser, "the load-more button to go", more_visible, &json!(false)).await;
    assert_eq!(js(&browser, &comments_script(&oldest.id)).await, json!([["on a post not loaded yet", "approved", false]]));

    // A new post still arrives live at the top.
    let live = stage.suite.create_post("Arrived after paging").await;
    let top = "return document.querySelector('article.post').dataset.postId";
    until_js(&browser, "the new post on top", top, &json!(live.id)).await;
    assert_not_reloaded(&browser).await;

    stage.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resync_from_the_stream_reloads_the_first_page_once() {
    let mut stage = Stage::start().await;
    let post = stage.suite.create_post("Missed by the stream").await;
    let browser = stage.browser().await;
    let shown = format!("return document.querySelector('article.post[data-post-id=' + CSS.escape({}) + ']') !== null", json!(post.id));
    until_js(&browser, "the post", &shown, &json!(true)).await;
    let fetches = "return performance.getEntriesByType('resource').filter(r => new URL(r.name).pathname === '/posts').length";
    let before = js(&browser, fetches).await.as_u64().expect("a count");

    // The page forgets the post, as if its PostCreated had been dropped for a
    // slow page, and the server says so with resync, five times in a row.
    let forget = format!(
        "posts.delete({id}); document.querySelector('article.post[data-post-id=' + CSS.escape({id}) + ']').remove();
         for (let i = 0; i < 5; i++) stream.dispatchEvent(new MessageEvent('resync', {{ data: '{{}}' }}));
         return null",
        id = json!(post.id)
    );
    js(&browser, &forget).await;
    until_js(&browser, "the post back after the resync", &shown, &json!(true)).await;
    assert_eq!(js(&browser, fetches).await, json!(before + 1), "five resyncs, one reload of the first page");
    assert_not_reloaded(&browser).await;

    stage.finish().await;
}
