//! Load for fault tests: concurrent writers through the gateway, and a check
//! that the suite converged to exactly what was accepted.
//!
//! A request cut off by a fault may or may not have been committed, so every
//! title and comment text is unique: a post or comment may show up only if it
//! was attempted, must show up if it was accepted (201), and never twice.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
};

use serde_json::{Value, json};

use crate::{Comment, Post, TestSuite};

/// What a load run attempted and what was accepted.
#[derive(Debug, Default, Clone)]
pub struct LoadReport {
    pub posts: Vec<Post>,
    /// Accepted comments with their post id.
    pub comments: Vec<(String, Comment)>,
    pub attempted_titles: HashSet<String>,
    pub attempted_contents: HashSet<String>,
    /// Requests that failed (refused connections while a service was down, 502s).
    pub failures: usize,
    /// How many write requests ended how: `"201"`, `"503"`, ..., or `"no answer"`.
    pub outcomes: BTreeMap<String, usize>,
}

impl LoadReport {
    pub fn merge(&mut self, other: LoadReport) {
        self.posts.extend(other.posts);
        self.comments.extend(other.comments);
        self.attempted_titles.extend(other.attempted_titles);
        self.attempted_contents.extend(other.attempted_contents);
        self.failures += other.failures;
        for (outcome, n) in other.outcomes {
            *self.outcomes.entry(outcome).or_default() += n;
        }
    }

    /// The share of write requests answered 201, in percent.
    pub fn accepted_percent(&self) -> f64 {
        let total: usize = self.outcomes.values().sum();
        let accepted = self.outcomes.get("201").copied().unwrap_or(0);
        if total == 0 { 100.0 } else { 100.0 * accepted as f64 / total as f64 }
    }
}

/// A running count of accepted writes, so a test can inject its fault mid-burst.
pub type Progress = Arc<AtomicUsize>;

/// The status a comment with this text must end with: moderation's own rule
/// with its default words, which the suites run with.
pub fn expected_status(content: &str) -> &'static str {
    static RULE: std::sync::LazyLock<moderation::Rule> = std::sync::LazyLock::new(moderation::Rule::default);
    RULE.decide(content).as_str()
}

/// Runs `workers` concurrent writers, each creating `rounds` posts with two
/// comments each (one of them rejected), through the gateway at `gateway`.
pub async fn run(http: reqwest::Client, gateway: String, tag: String, workers: usize, rounds: usize, progress: Progress) -> LoadReport {
    run_until(http, gateway, tag, workers, rounds, progress, Stop::default()).await
}

/// Set to end a load run early: each writer finishes the post it is on and stops.
pub type Stop = Arc<AtomicBool>;

/// [`run`], ending early once `stop` is set.
pub async fn run_until(
    http: reqwest::Client,
    gateway: String,
    tag: String,
    workers: usize,
    rounds: usize,
    progress: Progress,
    stop: Stop,
) -> LoadReport {
    let tasks: Vec<_> = (0..workers)
        .map(|w| {
            let (http, gateway, progress, stop) = (http.clone(), gateway.clone(), progress.clone(), stop.clone());
            let tag = format!("{tag}-w{w}");
            tokio::spawn(async move { writer(http, gateway, tag, rounds, progress, stop, true).await })
        })
        .collect();
    let mut report = LoadReport::default();
    for task in tasks {
        report.merge(task.await.expect("writer task"));
    }
    report
}

/// One writer creating posts only, until `stop`: unlike [`run_until`]'s
/// writers it never waits for an event to travel (a comment waits, bounded,
/// for its post to reach comments), so it keeps sending through any outage.
pub async fn posts_until(http: reqwest::Client, gateway: String, tag: String, progress: Progress, stop: Stop) -> LoadReport {
    writer(http, gateway, tag, usize::MAX / 64, progress, stop, false).await
}

/// Creates `rounds` posts (each with its comments when `with_comments`). A
/// failed attempt (a service restarting) is retried after a short pause under
/// a new title, since the failed one may still have been committed.
async fn writer(
    http: reqwest::Client,
    gateway: String,
    tag: String,
    rounds: usize,
    progress: Progress,
    stop: Stop,
    with_comments: bool,
) -> LoadReport {
    let mut report = LoadReport::default();
    let mut attempt = 0;
    while report.posts.len() < rounds && attempt < rounds.saturating_mul(50) && !stop.load(Ordering::Relaxed) {
        attempt += 1;
        let title = format!("{tag}-a{attempt}");
        report.attempted_titles.insert(title.clone());
        let Some(post) =
            post_json::<Post>(&http, &format!("{gateway}/posts/create"), json!({ "title": title }), &mut report.outcomes).await
        else {
            report.failures += 1;
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
            continue;
        };
        progress.fetch_add(1, Ordering::Relaxed);
        let texts: &[&str] = if with_comments { &["fine", "an orange"] } else { &[] };
        for (i, text) in texts.iter().enumerate() {
            let content = format!("{tag}-a{attempt}-c{i} {text}");
            report.attempted_contents.insert(content.clone());
            let url = format!("{gateway}/posts/{}/comments", post.id);
            match post_json::<Vec<Comment>>(&http, &url, json!({ "content": content }), &mut report.outcomes).await {
                Some(list) => match list.into_iter().find(|c| c.content == content) {
                    Some(comment) => {
                        progress.fetch_add(1, Ordering::Relaxed);
                        report.comments.push((post.id.clone(), comment));
                    }
                    None => report.failures += 1,
                },
                None => report.failures += 1,
            }
        }
        report.posts.push(post);
    }
    report
}

/// POSTs `body`; the 201 answer's body, with the outcome counted in `outcomes`.
async fn post_json<T: serde::de::DeserializeOwned>(
    http: &reqwest::Client,
    url: &str,
    body: Value,
    outcomes: &mut BTreeMap<String, usize>,
) -> Option<T> {
    let response = match http.post(url).json(&body).send().await {
        Ok(response) => response,
        Err(_) => {
            *outcomes.entry("no answer".to_owned()).or_default() += 1;
            return None;
        }
    };
    let status = response.status().as_u16();
    *outcomes.entry(status.to_string()).or_default() += 1;
    if status != 201 {
        return None;
    }
    response.json().await.ok()
}

/// Starts `workers` writers through `suite`'s gateway until `stop` is set.
pub fn start(suite: &TestSuite, tag: &str, workers: usize) -> (tokio::task::JoinHandle<LoadReport>, Progress, Stop) {
    let (progress, stop) = (Progress::default(), Stop::default());
    let run = run_until(suite.http.clone(), suite.gateway.clone(), tag.to_owned(), workers, 10_000, progress.clone(), stop.clone());
    (tokio::spawn(run), progress, stop)
}

/// Waits until the load has had `n` more writes accepted than `from`; returns the count.
pub async fn writes_after(suite: &TestSuite, progress: &Progress, from: usize, n: usize) -> usize {
    suite
        .eventually(&format!("{n} more accepted writes"), || async {
            let now = progress.load(Ordering::Relaxed);
            (now >= from + n).then_some(now)
        })
        .await
}

/// Prints what a fault test's load saw and what the suite converged to.
pub fn print_outcome(name: &str, report: &LoadReport, counts: (usize, usize, usize)) {
    println!(
        "{name}: {} write requests, answered {:?} ({:.2} % 201); converged to {} posts, {} comments, {} events, \
         none lost or duplicated",
        report.outcomes.values().sum::<usize>(),
        report.outcomes,
        report.accepted_percent(),
        counts.0,
        counts.1,
        counts.2
    );
}

impl TestSuite {
    /// Waits until query, the comments service and the bus's log all hold
    /// exactly what `report` says, and returns the counts checked:
    /// (posts, comments, events in the log).
    pub async fn assert_converged(&self, report: &LoadReport) -> (usize, usize, usize) {
        let deadline = std::time::Instant::now() + crate::DEADLINE + crate::DEADLINE;
        loop {
            let problem = match self.check_converged(report).await {
                Ok(counts) => return counts,
                Err(problem) => problem,
            };
            if std::time::Instant::now() > deadline {
                panic!("the suite did not converge: {problem}\n{}", self.logs());
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    async fn check_converged(&self, report: &LoadReport) -> Result<(usize, usize, usize), String> {
        let view = self.view().await;
        for post in &report.posts {
            let shown = view.get(&post.id).ok_or_else(|| format!("accepted post {} missing from query", post.title))?;
            if shown.title != post.title {
                return Err(format!("post {} has title {}", post.id, shown.title));
            }
        }
        let mut titles = HashSet::new();
        let mut contents = HashSet::new();
        let mut comment_count = 0;
        for post in view.values() {
            if !report.attempted_titles.contains(&post.title) || !titles.insert(post.title.clone()) {
                return Err(format!("post {:?} in query was never attempted or shows twice", post.title));
            }
            for comment in &post.comments {
                comment_count += 1;
                if !report.attempted_contents.contains(&comment.content) || !contents.insert(comment.content.clone()) {
                    return Err(format!("comment {:?} was never attempted or shows twice", comment.content));
                }
                if comment.status != expected_status(&comment.content) {
                    return Err(format!("comment {:?} is {} in query", comment.content, comment.status));
                }
            }
            // The comments service learns of a post from the bus, on its own
            // delivery: until then it answers 404 for it, and that is not
            // converged yet rather than a failure.
            let listed = self.try_comments(&post.id).await?;
            let mut by_comments: Vec<_> = listed.iter().map(|c| (&c.id, &c.status)).collect();
            let mut by_query: Vec<_> = post.comments.iter().map(|c| (&c.id, &c.status)).collect();
            if matches!(self.mode, crate::Mode::Scaled(_)) {
                // Replicas relay their own outboxes: two comments made on
                // different replicas may reach the bus, and so query, in
                // either order. The same comments, the same statuses.
                by_comments.sort();
                by_query.sort();
            }
            if by_comments != by_query {
                return Err(format!("comments and query disagree on post {}: {by_comments:?} vs {by_query:?}", post.title));
            }
        }
        for (post_id, comment) in &report.comments {
            let found = view.get(post_id).map_or(0, |p| p.comments.iter().filter(|c| c.id == comment.id).count());
            if found != 1 {
                return Err(format!("accepted comment {:?} shows {found} times", comment.content));
            }
        }

        let log = self.bus_events().await;
        let ids: HashSet<_> = log.iter().map(|e| e["id"].as_str().unwrap_or_default()).collect();
        if ids.len() != log.len() {
            return Err(format!("the bus log has duplicate event ids: {} events, {} ids", log.len(), ids.len()));
        }
        let mut by_type: HashMap<&str, usize> = HashMap::new();
        for event in &log {
            *by_type.entry(event["type"].as_str().unwrap_or_default()).or_default() += 1;
        }
        let expected: BTreeMap<&str, usize> = [
            ("PostCreated", view.len()),
            ("CommentCreated", comment_count),
            ("CommentModerated", comment_count),
            ("CommentUpdated", comment_count),
        ]
        .into();
        let actual: BTreeMap<&str, usize> = expected.keys().map(|k| (*k, by_type.get(k).copied().unwrap_or(0))).collect();
        if actual != expected {
            return Err(format!("bus log counts {actual:?}, expected {expected:?}"));
        }
        Ok((view.len(), comment_count, log.len()))
    }
}
