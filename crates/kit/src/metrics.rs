//! A minimal Prometheus text-format registry.
//!
//! Services expose a handful of counters and gauges; a full metrics stack
//! would cost more in binary size and memory than it gives here. Counters are
//! atomics; gauges are read when scraped, so they are never stale.

use std::{
    fmt::Write,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
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

    fn push(&self, name: &str, help: &str, kind: &'static str, source: Source) {
        let family = Family { name: name.to_owned(), help: help.to_owned(), kind, source };
        self.families.lock().unwrap_or_else(|p| p.into_inner()).push(family);
    }

    /// The exposition text.
    pub fn render(&self) -> String {
        let families = self.families.lock().unwrap_or_else(|p| p.into_inner());
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
}
