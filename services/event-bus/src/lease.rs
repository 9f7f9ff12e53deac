//! One active deliverer per subscriber across N bus replicas on JetStream.
//!
//! Every replica runs a [`Deliverer`] per subscriber, but only while it holds
//! that subscriber's lease: a key in the JetStream key-value bucket
//! [`BUCKET`], whose messages expire [`TTL`] after they are written. A
//! replica takes a free lease with `create` (it fails while another holds
//! it), renews it every third of the TTL with `update` on the revision it
//! last wrote (it fails once another replica took over), and lets it go on
//! a clean stop. A replica that dies stops renewing: the key expires within
//! the TTL and another replica takes over from the saved cursor, so a
//! subscriber waits at most the TTL plus a poll.
//!
//! A holder that cannot renew within two thirds of the TTL stops its
//! deliverer before the key can expire, so two replicas do not push to one
//! subscriber at once unless a push outlives that margin (a request taking
//! longer than the delivery timeout's share of it); the consumers' inboxes
//! keep such an overlap harmless. A replica that does not hold a lease
//! shows the holder's saved cursor in its `/status`, read every poll.

use std::time::Duration;

use async_nats::jetstream::{self, kv};
use blog_kit::{Shutdown, StoreError};

use crate::delivery::Deliverer;

pub const BUCKET: &str = "blog-bus-leases";
/// How long a lease outlives its holder's last renewal.
pub const TTL: Duration = Duration::from_secs(5);

/// The leases' bucket.
#[derive(Debug, Clone)]
pub struct Leases {
    kv: kv::Store,
    /// This replica's name in the leases it holds.
    holder: String,
}

impl Leases {
    pub(crate) async fn open(js: &jetstream::Context, replicas: usize) -> Result<Self, StoreError> {
        let config = kv::Config { bucket: BUCKET.into(), history: 1, max_age: TTL, num_replicas: replicas, ..Default::default() };
        let kv = match js.get_key_value(BUCKET).await {
            Ok(kv) => kv,
            Err(_) => js.create_key_value(config).await.map_err(|e| StoreError::Unavailable(format!("JetStream: {e}")))?,
        };
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        Ok(Self { kv, holder: format!("{}-{}", std::process::id(), nanos) })
    }

    /// Runs `deliverer` whenever this replica holds its subscriber's lease, until `shutdown`.
    pub async fn deliver_while_held(self, deliverer: Deliverer, shutdown: Shutdown) {
        let name = deliverer.subscriber.name.clone();
        let key = crate::log::jetstream::encode_key(&name);
        let poll = TTL / 5;
        loop {
            let revision = match self.kv.create(&key, self.holder.clone().into()).await {
                Ok(revision) => revision,
                Err(_) => {
                    // Another replica delivers: show its progress here too.
                    if let Ok(cursors) = deliverer.log.cursors().await
                        && let Some((_, cursor)) = cursors.into_iter().find(|(n, _)| *n == name)
                    {
                        deliverer.status.lock().unwrap_or_else(|p| p.into_inner()).cursor = cursor;
                    }
                    if shutdown.sleep(poll).await {
                        return;
                    }
                    continue;
                }
            };
            tracing::info!(subscriber = %name, holder = %self.holder, "took the delivery lease");
            let mut active = deliverer.clone();
            match active.log.cursors().await {
                Ok(cursors) => {
                    if let Some((_, cursor)) = cursors.into_iter().find(|(n, _)| *n == name) {
                        active.cursor = active.cursor.max(cursor);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot read the saved cursor; delivering from the last known one"),
            }
            active.status.lock().unwrap_or_else(|p| p.into_inner()).cursor = active.cursor;
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let parent = shutdown.clone();
            let child = Shutdown::new(async move {
                tokio::select! {
                    () = parent.wait() => {}
                    _ = stopped => {}
                }
            });
            let running = tokio::spawn(active.run(child));
            let released = self.renew(&key, revision, &shutdown).await;
            let _ = stop.send(());
            let _ = running.await;
            if released {
                return;
            }
            tracing::warn!(subscriber = %name, "lost the delivery lease");
        }
    }

    /// Renews until shutdown (then releases the lease and returns true) or
    /// until a renewal fails or runs late (returns false).
    async fn renew(&self, key: &str, mut revision: u64, shutdown: &Shutdown) -> bool {
        loop {
            if shutdown.sleep(TTL / 3).await {
                let _ = self.kv.delete_expect_revision(key, Some(revision)).await;
                return true;
            }
            match tokio::time::timeout(TTL / 3, self.kv.update(key, self.holder.clone().into(), revision)).await {
                Ok(Ok(next)) => revision = next,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "cannot renew the delivery lease");
                    return false;
                }
                Err(_) => return false,
            }
        }
    }
}
