//! Structured logs through `tracing`: human-readable by default, one JSON
//! object per line when `LOG_FORMAT=json` (what a cluster's log collector
//! wants). The level comes from `RUST_LOG`, `info` by default.

use std::io::IsTerminal;

use tracing_subscriber::{EnvFilter, fmt, prelude::*};

pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json"));
    let registry = tracing_subscriber::registry().with(filter);
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
