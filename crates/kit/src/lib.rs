//! The service kit: everything a blog service stands on, in layers that
//! read bottom-up and cannot form cycles (each module uses only those above
//! it in this list):
//!
//! - [`shutdown`], [`telemetry`], [`metrics`]: process plumbing.
//! - [`store`]: the database behind a seam (SQLite now): [`store::Tx`] for
//!   SQL in the subset both engines accept, group commit underneath.
//! - [`http`]: the JSON error shape, extractors, the standard layers,
//!   serving, live streams, the outgoing client.
//! - [`internal`] and [`config`]: the secret of internal calls and what every
//!   service reads from its environment.
//! - [`messaging`]: the one retry loop, the hand-over to the bus, the outbox
//!   (a unit of work that publishes) and its relay, the inbox.
//! - [`service`]: [`ServiceKit`], the one entry point, and [`Kit`], what
//!   handlers hold.
//!
//! The vocabulary (events, statuses, the service table) is `blog-domain`'s,
//! re-exported here as [`domain`].

pub mod config;
pub mod http;
pub mod internal;
pub mod messaging;
pub mod metrics;
pub mod ports;
pub mod service;
pub mod shutdown;
pub mod store;
pub mod telemetry;
#[cfg(feature = "testing")]
pub mod testing;

pub use blog_domain as domain;
pub use http::{ApiError, Json};
pub use messaging::inbox::{Applied, Consumer, Outcome};
pub use service::{BoxError, Kit, ServiceKit};
pub use shutdown::Shutdown;
pub use store::{StoreError, Tx};
