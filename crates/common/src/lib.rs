//! What every service of the blog suite shares, so that each service crate
//! holds only its own domain.
//!
//! The suite is event driven: a service that owns data writes its row and the
//! event describing it in one local SQLite transaction ([`outbox`]), a relay
//! hands the event to the bus, the bus appends it to its durable log and pushes
//! it to every subscriber, and each subscriber applies it exactly once by
//! recording the event id in the same transaction as the effect ([`inbox`]).
//! Everything a service needs to take part in that flow lives here, once:
//! the event envelope and types, storage with group commit, the outbox relay,
//! the inbox, the bus client, HTTP bootstrap, errors, telemetry and the single
//! table of services and routes.

pub mod bus_client;
pub mod config;
pub mod error;
pub mod events;
pub mod inbox;
pub mod internal;
pub mod metrics;
pub mod node;
pub mod outbox;
pub mod routes;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod topology;

pub use error::{ApiError, Json};
pub use events::{CommentStatus, DomainEvent, Event};
pub use node::Node;
pub use store::Store;
pub use topology::Service;
