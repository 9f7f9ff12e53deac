//! Where each millisecond of the consistency lag goes, from the inside.
//!
//! A suite of its own is started with the services' consistency-lag trace
//! points on (`RUST_LOG=info,blog_lag=trace`, JSON logs; see
//! `blog_kit::telemetry::lag_mark`): each service logs, with the wall clock
//! in microseconds, when an event reached each stage of its path (its writer
//! committed it and handed it to the relay, the relay took it, the bus
//! received it, its writer took it up (on the caller's thread when idle,
//! else on the writer thread), it was stored, the push to a
//! subscriber left, the subscriber received it, applied it, committed it...).
//! Comments are sent one at a time, as in the lag probes; afterwards the logs
//! are read back and every hop is cut into its stages. The marks cost a
//! little themselves (each is a log line through a pipe), so the untraced
//! probes give the lag and this gives its shares.

use std::{
    collections::HashMap,
    path::Path,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use blog_domain::Service;
use blog_kit::telemetry::LAG_TARGET;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::{Error, launch_with, percentile, post_comment, sse_events};

/// The three events of a comment's path: (type, publisher, the consumer the
/// next step waits for).
const HOPS: [(&str, &str, &str); 3] =
    [("CommentCreated", "comments", "moderation"), ("CommentModerated", "moderation", "comments"), ("CommentUpdated", "comments", "query")];

/// The stage that is a comment's whole lag.
const TOTAL: &str = "total: POST sent -> stream shows it approved";

/// `(service, stage, event id)` -> the first time it was marked, in µs.
type Marks = HashMap<(String, String, String), u64>;
/// `(service, durable)` -> each commit's (µs, jobs in it).
type Commits = HashMap<(String, bool), Vec<(u64, u64)>>;
/// Per comment: when its POST started, when query's stream showed it
/// approved, and the ids of its three events by type.
type Sample = (u64, u64, HashMap<String, String>);

fn wall_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

/// Runs `samples` comments through a traced suite and prints each hop's stages.
pub(crate) async fn breakdown(http: &reqwest::Client, bin_dir: &Path, samples: usize) -> Result<(), Error> {
    let dir = tempfile::tempdir()?;
    let suite = launch_with(bin_dir, dir.path(), 1, |options| {
        for service in Service::ALL {
            options.env.push((service, "RUST_LOG".into(), format!("info,{LAG_TARGET}=trace")));
            options.env.push((service, "LOG_FORMAT".into(), "json".into()));
        }
    })
    .await?;
    let gateway = format!("http://{}", suite.gateway_addr);
    let bus = suite.options.url(Service::EventBus);
    let post: Value = http.post(format!("{gateway}/posts/create")).json(&json!({"title": "traced"})).send().await?.json().await?;
    let post_id = post["id"].as_str().ok_or("post id")?.to_owned();

    let (tx, mut seen) = mpsc::unbounded_channel::<(String, Value, std::time::Instant)>();
    let flow = sse_events(http.get(format!("{bus}/flow")).send().await?, tx.clone());
    let stream = sse_events(http.get(format!("{gateway}/posts/stream")).send().await?, tx);
    let mut comments: Vec<Sample> = Vec::with_capacity(samples);
    for i in 0..samples {
        let started = wall_us();
        let id = post_comment(http, &gateway, &post_id, &format!("traced sample {i}")).await?;
        let mut events = HashMap::new();
        let note = |events: &mut HashMap<String, String>, data: &Value| {
            if data["data"]["id"] == id.as_str() {
                events.insert(data["type"].as_str().unwrap_or_default().to_owned(), data["id"].as_str().unwrap_or_default().to_owned());
            }
        };
        let shown = loop {
            let (event, data, _) = tokio::time::timeout(Duration::from_secs(30), seen.recv()).await?.ok_or("a stream ended")?;
            match event.as_str() {
                "published" => note(&mut events, &data),
                "CommentUpdated" if data["id"] == id.as_str() && data["status"] == "approved" => break wall_us(),
                _ => {}
            }
        };
        // The last `published` may trail the stream a little.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while events.len() < HOPS.len() && std::time::Instant::now() < deadline {
            let Ok(Some((event, data, _))) = tokio::time::timeout(Duration::from_secs(5), seen.recv()).await else { break };
            if event == "published" {
                note(&mut events, &data);
            }
        }
        comments.push((started, shown, events));
    }
    flow.abort();
    stream.abort();
    suite.stop().await;
    let (marks, commits) = read_marks(dir.path());
    report(&marks, &commits, &comments);
    Ok(())
}

/// The marks in every service's log, and each service's commit times.
fn read_marks(dir: &Path) -> (Marks, Commits) {
    let mut marks = Marks::new();
    let mut commits = Commits::new();
    for service in Service::ALL {
        let Ok(text) = std::fs::read_to_string(dir.join(format!("{}.log", service.name()))) else { continue };
        for line in text.lines() {
            let Ok(record) = serde_json::from_str::<Value>(line) else { continue };
            if record["target"] != LAG_TARGET {
                continue;
            }
            let stage = record["stage"].as_str().unwrap_or_default();
            if stage == "store.commit" {
                let durable = record["durable"].as_bool().unwrap_or(false);
                let took = record["took_us"].as_u64().unwrap_or(0);
                let jobs = record["jobs"].as_u64().unwrap_or(0);
                commits.entry((service.name().to_owned(), durable)).or_default().push((took, jobs));
                continue;
            }
            let at = record["at_us"].as_u64().unwrap_or(0);
            for id in record["ids"].as_str().unwrap_or_default().split(',') {
                marks.entry((service.name().to_owned(), stage.to_owned(), id.to_owned())).or_insert(at);
            }
        }
    }
    (marks, commits)
}

fn report(marks: &Marks, commits: &Commits, comments: &[Sample]) {
    let bus = Service::EventBus.name();
    let mark = |service: &str, stage: &str, id: &str| marks.get(&(service.to_owned(), stage.to_owned(), id.to_owned())).copied();
    let between = |a: Option<u64>, b: Option<u64>| a.zip(b).map(|(a, b)| b.saturating_sub(a));
    // (label, samples in µs), in print order.
    let mut rows: Vec<(String, Vec<u64>)> = Vec::new();
    // Each comment's own stages, for the tail.
    let mut per_comment: Vec<Vec<(String, u64)>> = Vec::with_capacity(comments.len());
    let mut fan_out: HashMap<&str, Vec<String>> = HashMap::new();
    for (started, shown, events) in comments {
        let mut stages: Vec<(String, u64)> = Vec::new();
        let mut add = |label: String, value: Option<u64>| {
            if let Some(value) = value {
                stages.push((label.clone(), value));
            }
            match rows.iter_mut().find(|(l, _)| *l == label) {
                Some((_, values)) => values.extend(value),
                None => rows.push((label, value.into_iter().collect())),
            }
        };
        // Where the previous hop ended: the POST's start, then the moment the
        // previous consumer's writer took up the event that causes this one.
        let mut origin = Some(*started);
        let mut applied_at = None;
        for (n, (kind, publisher, consumer)) in HOPS.iter().enumerate() {
            let Some(id) = events.get(*kind) else { break };
            let hop = n + 1;
            let committed = if hop == 1 {
                "POST sent -> comments committed it (gateway, parse, durable write)".to_owned()
            } else {
                format!("{publisher}: apply, commit, hand to its relay")
            };
            let chain: [(String, Option<u64>); 10] = [
                ("origin".into(), origin),
                (committed, mark(publisher, "outbox.committed", id)),
                (format!("{publisher}: relay woken, takes the hand-off"), mark(publisher, "relay.taken", id)),
                ("relay -> bus: HTTP POST received".into(), mark(bus, "bus.received", id)),
                ("bus: waits for the write connection".into(), mark(bus, "bus.appending", id)),
                ("bus: insert, commit + fsync, hand back".into(), mark(bus, "bus.stored", id)),
                (format!("bus: deliverer woken, push to {consumer} sent"), mark(bus, &format!("push.sent:{consumer}"), id)),
                (format!("push: HTTP until {consumer} has it"), mark(consumer, "inbox.received", id)),
                (format!("{consumer}: waits for the write connection"), mark(consumer, "inbox.applying", id)),
                (format!("{consumer}: apply, commit, hand back"), mark(consumer, "inbox.committed", id)),
            ];
            // The last link belongs to the next hop (its publisher's apply and
            // commit), except on the last hop.
            let links = if hop == HOPS.len() { &chain[..] } else { &chain[..9] };
            for pair in links.windows(2) {
                add(format!("hop {hop} {kind}: {}", pair[1].0), between(pair[0].1, pair[1].1));
            }
            add(format!("hop {hop} {kind}: total"), between(origin, links[links.len() - 1].1));
            add(
                format!("hop {hop} {kind}: (overlaps) {consumer}'s after-commit hook (view, known posts)"),
                between(mark(consumer, "inbox.committed", id), mark(consumer, "inbox.done", id)),
            );
            // Off the critical path: the answers.
            add(
                format!("hop {hop} {kind}: (off path) bus stored -> relay has the answer"),
                between(mark(bus, "bus.stored", id), mark(publisher, "relay.published", id)),
            );
            add(
                format!("hop {hop} {kind}: (off path) {consumer} done -> bus has its answer"),
                between(mark(consumer, "inbox.done", id), mark(bus, &format!("push.answered:{consumer}"), id)),
            );
            let pushed: Vec<String> = Service::SUBSCRIBERS
                .iter()
                .map(|s| s.name())
                .filter(|s| mark(bus, &format!("push.sent:{s}"), id).is_some())
                .map(str::to_owned)
                .collect();
            fan_out.insert(kind, pushed);
            origin = chain[8].1;
            if hop == HOPS.len() {
                applied_at = chain[9].1;
            }
        }
        add(
            "query committed -> its stream shows it (view update, SSE to this client)".to_owned(),
            applied_at.map(|c| shown.saturating_sub(c)),
        );
        add(TOTAL.to_owned(), Some(shown.saturating_sub(*started)));
        per_comment.push(stages);
    }
    println!("where the lag goes, traced (median / p90 of {} comments, marks from the services' own clocks):", comments.len());
    // Each stage's median in µs, for the tail.
    let mut medians: HashMap<&str, u64> = HashMap::new();
    for (label, values) in &mut rows {
        values.sort_unstable();
        let as_durations: Vec<Duration> = values.iter().map(|us| Duration::from_micros(*us)).collect();
        let median = percentile(&as_durations, 0.5);
        medians.insert(label.as_str(), median.as_micros() as u64);
        println!("  {label:<86} {:>6.2} ms  (p90 {:.2})", median.as_secs_f64() * 1e3, percentile(&as_durations, 0.9).as_secs_f64() * 1e3);
    }
    for (kind, _, _) in HOPS {
        if let Some(pushed) = fan_out.get(kind) {
            println!("  {kind} pushed to: {}", pushed.join(", "));
        }
    }
    let mut keys: Vec<_> = commits.keys().cloned().collect();
    keys.sort();
    for key in keys {
        let list = &commits[&key];
        let mut took: Vec<Duration> = list.iter().map(|(t, _)| Duration::from_micros(*t)).collect();
        took.sort_unstable();
        let jobs = list.iter().map(|(_, j)| *j).sum::<u64>() as f64 / list.len().max(1) as f64;
        println!(
            "  {:<11} {} commits: {:>5} of them, COMMIT median {:.2} ms, p90 {:.2} ms, {jobs:.1} jobs each",
            key.0,
            if key.1 { "durable" } else { "relaxed" },
            list.len(),
            percentile(&took, 0.5).as_secs_f64() * 1e3,
            percentile(&took, 0.9).as_secs_f64() * 1e3,
        );
    }
    print_tail(&medians, &per_comment);
}

/// Where the slowest comments (the tenth with the longest total) lost their
/// time: for each, the stages that took longest beyond their own median.
fn print_tail(median: &HashMap<&str, u64>, per_comment: &[Vec<(String, u64)>]) {
    let total = |stages: &Vec<(String, u64)>| stages.iter().find(|(l, _)| l == TOTAL).map_or(0, |(_, v)| *v);
    let mut slowest: Vec<&Vec<(String, u64)>> = per_comment.iter().collect();
    slowest.sort_by_key(|stages| std::cmp::Reverse(total(stages)));
    slowest.truncate(per_comment.len().div_ceil(10));
    println!("the slowest tenth of those comments, and the stages that took them longest beyond each stage's median:");
    for stages in slowest {
        let mut excess: Vec<(&str, u64)> = stages
            .iter()
            .filter(|(label, _)| {
                label != TOTAL && !label.contains("(off path)") && !label.contains("(overlaps)") && !label.ends_with(": total")
            })
            .map(|(label, value)| (label.as_str(), value.saturating_sub(median.get(label.as_str()).copied().unwrap_or(0))))
            .filter(|(_, extra)| *extra >= 100)
            .collect();
        excess.sort_by_key(|(_, extra)| std::cmp::Reverse(*extra));
        let over = total(stages).saturating_sub(median.get(TOTAL).copied().unwrap_or(0));
        let parts: Vec<String> = excess.iter().take(3).map(|(label, extra)| format!("{label} +{:.2}", *extra as f64 / 1e3)).collect();
        println!("  {:.2} ms (+{:.2}): {}", total(stages) as f64 / 1e3, over as f64 / 1e3, parts.join("; "));
    }
}
