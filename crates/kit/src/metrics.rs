//! A small Prometheus text-format registry: counters, gauges read at scrape
//! time, and labelled latency/size histograms (the RED metrics of every HTTP
//! route, every outbound call and every store commit).
//!
//! Why not a metrics crate: the issue's rule is "a well-kept crate unless the
//! hand-written one is smaller and as correct". This file is under 350 lines
//! with its tests and adds no dependency; `prometheus-client` would add its own
//! encoder and registry types and still need a custom collector for the gauges
//! read at scrape time (outbox depth, subscriber lag, database size), which are
//! most of what services expose. "As correct" is shown by the tests below: the
//! exposition is checked line by line against the text format's rules
//! (`# HELP`/`# TYPE` once per family, cumulative `_bucket` series ending in
//! `le="+Inf"` equal to `_count`, `_sum`, escaped label values), and an
//! end-to-end test reads `/metrics` of every service after unknown paths and
//! checks that the label sets stay bounded.
//!
//! Counters and histogram buckets are atomics, so recording never takes a
//! lock; a labelled family takes a short lock only to find its child, and
//! callers that record often keep the child ([`Histograms::with`] returns a
//! cheap handle). Label values are the caller's to bound: the HTTP layer
//! uses route templates, never raw paths (see [`crate::http::layers`]).

use std::{
    collections::BTreeMap,
    fmt::Write,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

type Gauge = Box<dyn Fn(&mut Vec<(String, f64)>) + Send + Sync>;

struct Family {
    name: String,
    help: String,
    kind: &'static str,
    source: Source,
}

enum Source {
    Counter(Arc<AtomicU64>),
    Gauge(Gauge),
    Histogram(Histograms),
}

/// The metrics of one service. Cheap to clone.
#[derive(Clone, Default)]
pub struct Registry {
    families: Arc<Mutex<Vec<Family>>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").finish_non_exhaustive()
    }
}

/// A monotonically increasing count.
#[derive(Debug, Clone, Default)]
pub struct Counter(Arc<AtomicU64>);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }

    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Bucket bounds in seconds for request and call latencies: from half a
/// millisecond (an in-memory read) to ten seconds (the request timeout).
pub const LATENCY_BUCKETS: &[f64] = &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Bucket bounds for counts of things per operation (jobs in a group commit,
/// events in a batch): powers of two up to the largest batch.
pub const SIZE_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];

/// One histogram: a count per bucket (not cumulative; the exposition sums
/// them), the sum of observations, all atomics.
#[derive(Clone)]
pub struct Histogram(Arc<HistogramCells>);

struct HistogramCells {
    bounds: &'static [f64],
    /// One per bound, then the `+Inf` bucket.
    buckets: Box<[AtomicU64]>,
    /// The sum as `f64` bits, added to with compare-and-swap.
    sum: AtomicU64,
}

impl std::fmt::Debug for Histogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Histogram").field("count", &self.count()).finish_non_exhaustive()
    }
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        let buckets = (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect();
        Self(Arc::new(HistogramCells { bounds, buckets, sum: AtomicU64::new(0f64.to_bits()) }))
    }

    pub fn observe(&self, value: f64) {
        let cells = &self.0;
        let index = cells.bounds.iter().position(|bound| value <= *bound).unwrap_or(cells.bounds.len());
        cells.buckets[index].fetch_add(1, Ordering::Relaxed);
        let _ = cells.sum.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| Some((f64::from_bits(bits) + value).to_bits()));
    }

    /// Observes a duration in seconds.
    pub fn observe_duration(&self, elapsed: Duration) {
        self.observe(elapsed.as_secs_f64());
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.0.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (i, bucket) in self.0.buckets.iter().enumerate() {
            cumulative += bucket.load(Ordering::Relaxed);
            let le = self.0.bounds.get(i).map_or_else(|| "+Inf".to_owned(), f64::to_string);
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {cumulative}");
        }
        let sum = f64::from_bits(self.0.sum.load(Ordering::Relaxed));
        // `_count` is the `+Inf` bucket as read above, so the two always agree.
        if labels.is_empty() {
            let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {cumulative}");
        } else {
            let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}\n{name}_count{{{labels}}} {cumulative}");
        }
    }
}

/// A histogram family: one [`Histogram`] per set of label values, all with
/// the same label names and buckets. Cheap to clone.
#[derive(Clone)]
pub struct Histograms {
    names: &'static [&'static str],
    bounds: &'static [f64],
    children: Arc<Mutex<BTreeMap<String, Histogram>>>,
}

impl std::fmt::Debug for Histograms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Histograms").field("labels", &self.names).finish_non_exhaustive()
    }
}

impl Histograms {
    /// A family labelled `names`, not yet registered (see
    /// [`Registry::add_histograms`]): for parts built before the registry.
    pub fn new(names: &'static [&'static str], bounds: &'static [f64]) -> Self {
        Self { names, bounds, children: Arc::default() }
    }

    /// The histogram for `values`, one per label name in order.
    pub fn with(&self, values: &[&str]) -> Histogram {
        debug_assert_eq!(values.len(), self.names.len(), "one value per label");
        let mut key = String::new();
        for (i, (name, value)) in self.names.iter().zip(values).enumerate() {
            let _ = write!(key, "{}{name}=\"{}\"", if i == 0 { "" } else { "," }, label(value));
        }
        let mut children = self.children.lock().unwrap_or_else(PoisonError::into_inner);
        children.entry(key).or_insert_with(|| Histogram::new(self.bounds)).clone()
    }

    /// The label sets recorded so far, as exposition text (`a="x",b="y"`).
    pub fn label_sets(&self) -> Vec<String> {
        self.children.lock().unwrap_or_else(PoisonError::into_inner).keys().cloned().collect()
    }
}

impl Registry {
    /// Registers a counter `name` (without label).
    pub fn counter(&self, name: &str, help: &str) -> Counter {
        let counter = Counter::default();
        self.push(name, help, "counter", Source::Counter(counter.0.clone()));
        counter
    }

    /// Registers a gauge family whose samples `(labels, value)` are computed at
    /// scrape time; `labels` is the text between the braces, or empty.
    pub fn gauge(&self, name: &str, help: &str, read: impl Fn(&mut Vec<(String, f64)>) + Send + Sync + 'static) {
        self.push(name, help, "gauge", Source::Gauge(Box::new(read)));
    }

    /// Registers a histogram family `name` labelled `names`.
    pub fn histograms(&self, name: &str, help: &str, names: &'static [&'static str], bounds: &'static [f64]) -> Histograms {
        let family = Histograms::new(names, bounds);
        self.add_histograms(name, help, &family);
        family
    }

    /// Registers a family made before the registry (a store's commit times).
    pub fn add_histograms(&self, name: &str, help: &str, family: &Histograms) {
        self.push(name, help, "histogram", Source::Histogram(family.clone()));
    }

    fn push(&self, name: &str, help: &str, kind: &'static str, source: Source) {
        let family = Family { name: name.to_owned(), help: help.to_owned(), kind, source };
        self.families.lock().unwrap_or_else(PoisonError::into_inner).push(family);
    }

    /// The exposition text.
    pub fn render(&self) -> String {
        let families = self.families.lock().unwrap_or_else(PoisonError::into_inner);
        let mut out = String::new();
        let mut samples = Vec::new();
        for family in families.iter() {
            let _ = writeln!(out, "# HELP {} {}\n# TYPE {} {}", family.name, family.help, family.name, family.kind);
            match &family.source {
                Source::Counter(value) => {
                    let _ = writeln!(out, "{} {}", family.name, value.load(Ordering::Relaxed));
                }
                Source::Gauge(read) => {
                    samples.clear();
                    read(&mut samples);
                    for (labels, value) in &samples {
                        if labels.is_empty() {
                            let _ = writeln!(out, "{} {value}", family.name);
                        } else {
                            let _ = writeln!(out, "{}{{{labels}}} {value}", family.name);
                        }
                    }
                }
                Source::Histogram(histograms) => {
                    let children: Vec<(String, Histogram)> = histograms
                        .children
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .iter()
                        .map(|(k, h)| (k.clone(), h.clone()))
                        .collect();
                    for (labels, histogram) in children {
                        histogram.render(&mut out, &family.name, &labels);
                    }
                }
            }
        }
        out
    }
}

/// A label value escaped for the exposition format.
pub fn label(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_labelled_gauges() {
        let registry = Registry::default();
        let published = registry.counter("blog_published_total", "Events published.");
        published.add(3);
        registry.gauge("blog_lag", "Lag.", |out| out.push((format!("subscriber=\"{}\"", label("q\"1")), 2.0)));
        let text = registry.render();
        assert!(text.contains("# TYPE blog_published_total counter\nblog_published_total 3\n"));
        assert!(text.contains("blog_lag{subscriber=\"q\\\"1\"} 2\n"));
    }

    #[test]
    fn histograms_render_cumulative_buckets_sum_and_count_per_label_set() {
        let registry = Registry::default();
        let family = registry.histograms("t_seconds", "Time.", &["route", "status"], &[0.1, 1.0]);
        let ok = family.with(&["/a/{id}", "2xx"]);
        for value in [0.05, 0.1, 0.5, 3.0] {
            ok.observe(value);
        }
        family.with(&["say \"hi\"\n", "5xx"]).observe_duration(Duration::from_millis(200));
        let text = registry.render();
        let expected_ok = "t_seconds_bucket{route=\"/a/{id}\",status=\"2xx\",le=\"0.1\"} 2\n\
             t_seconds_bucket{route=\"/a/{id}\",status=\"2xx\",le=\"1\"} 3\n\
             t_seconds_bucket{route=\"/a/{id}\",status=\"2xx\",le=\"+Inf\"} 4\n\
             t_seconds_sum{route=\"/a/{id}\",status=\"2xx\"} 3.65\n\
             t_seconds_count{route=\"/a/{id}\",status=\"2xx\"} 4\n";
        assert!(text.contains(expected_ok), "{text}");
        assert!(text.contains("t_seconds_bucket{route=\"say \\\"hi\\\"\\n\",status=\"5xx\",le=\"0.1\"} 0\n"), "{text}");
        assert!(text.contains("t_seconds_count{route=\"say \\\"hi\\\"\\n\",status=\"5xx\"} 1\n"), "{text}");
        assert_eq!(text.matches("# TYPE t_seconds histogram\n").count(), 1, "{text}");
        assert_eq!(family.label_sets().len(), 2);
        // The same values find the same child.
        assert_eq!(family.with(&["/a/{id}", "2xx"]).count(), 4);
    }

    #[test]
    fn an_unlabelled_histogram_and_values_on_bucket_bounds() {
        let registry = Registry::default();
        let family = Histograms::new(&[], SIZE_BUCKETS);
        registry.add_histograms("jobs", "Jobs per commit.", &family);
        let sizes = family.with(&[]);
        sizes.observe(1.0);
        sizes.observe(512.0);
        sizes.observe(513.0);
        let text = registry.render();
        assert!(text.contains("jobs_bucket{le=\"1\"} 1\n"), "{text}");
        assert!(text.contains("jobs_bucket{le=\"256\"} 1\njobs_bucket{le=\"512\"} 2\njobs_bucket{le=\"+Inf\"} 3\n"), "{text}");
        assert!(text.contains("jobs_sum 1026\njobs_count 3\n"), "{text}");
    }

    #[test]
    fn concurrent_observations_are_all_counted() {
        let family = Histograms::new(&["k"], LATENCY_BUCKETS);
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let family = family.clone();
                std::thread::spawn(move || {
                    let h = family.with(&[if t % 2 == 0 { "even" } else { "odd" }]);
                    for _ in 0..1000 {
                        h.observe(0.001);
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        assert_eq!(family.with(&["even"]).count() + family.with(&["odd"]).count(), 4000);
        let sum = f64::from_bits(family.with(&["even"]).0.sum.load(Ordering::Relaxed));
        assert!((sum - 2.0).abs() < 1e-9, "{sum}");
    }
}
