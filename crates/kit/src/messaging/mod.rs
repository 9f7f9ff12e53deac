//! How events move between services, bottom-up: the one retry loop and
//! transient rule ([`retry`]), the HTTP hand-over and the bus's read API
//! ([`bus_client`]), the unit of work that publishes and its relay
//! ([`outbox`]), and the consuming side ([`inbox`]).

pub mod bus_client;
pub mod inbox;
pub mod outbox;
pub mod retry;

use crate::store::{Store, StoreError};

/// Creates the outbox and inbox tables in `store`, if missing.
pub async fn install(store: &Store) -> Result<(), StoreError> {
    store.install(outbox::SCHEMA).await?;
    store.install(inbox::SCHEMA).await
}
