//! The suite's vocabulary, with no I/O: what an event is, what a comment's
//! status is, which services exist and how their configuration is read.
//!
//! Everything above it (the service kit, the services, the launcher) speaks
//! these types, so a name or a shape is defined once. It depends on nothing
//! of ours, which the crate boundary enforces: storage, HTTP and messaging
//! live in `blog-kit`, on top of this crate.

pub mod config;
pub mod events;
pub mod text;
pub mod topology;
pub mod trace;

pub use events::{CommentData, CommentStatus, DomainEvent, Event, EventKind, PostCreated};
pub use topology::Service;
pub use trace::TraceParent;
