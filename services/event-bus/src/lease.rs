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
//!
//! A lease's value says who holds it ([`Holder`]: the replica's address and
//! process id), so every replica's `/status` can say which one delivers each
//! subscriber, and an operator (or a test) knows which process to look at.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use async_nats::jetstream::kv;
use blog_kit::{Shutdown, StoreError};
use tokio::sync::watch;

use crate::delivery::Deliverer;

pub const BUCKET: &str = "blog-bus-leases";
/// How long a lease outlives its holder's last renewal.
pub const TTL: Duration = Duration::from_secs(5);

/// Who holds a lease: the value of its key.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Holder {
    /// The replica's address, `<host>:<port>` (the pod's name in Kubernetes).
    pub replica: String,
    pub pid: u32,
    /// Unix milliseconds of the replica's start: tells a restarted replica from its predecessor.
    pub started: i64,
}

/// A lease's value: its holder, and where the holder's delivery had got to
/// at its last renewal (events it passed over as not consumed included,
/// which the saved cursor does not count).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Lease {
    #[serde(flatten)]
    pub holder: Holder,
    #[serde(default)]
    pub cursor: u64,
}

/// The bucket's configuration, with `replicas` replicas.
pub(crate) fn bucket_config(replicas: usize) -> kv::Config {
    kv::Config { bucket: BUCKET.into(), history: 1, max_age: TTL, num_replicas: replicas, ..Default::default() }
}

/// The leases' bucket.
#[derive(Debug, Clone)]
pub struct Leases {
    /// The log's connection, which holds the bucket (made there, see
    /// [`bucket_config`]); replaced when it is stuck.
    link: watch::Receiver<Arc<crate::log::jetstream::Link>>,
    /// This replica, as written in the leases it holds.
    holder: Holder,
}

impl Leases {
    /// The bucket on `link`; `replica` names this replica in the leases it takes.
    pub(crate) fn new(link: watch::Receiver<Arc<crate::log::jetstream::Link>>, replica: &str) -> Self {
        let holder = Holder { replica: replica.to_owned(), pid: std::process::id(), started: crate::log::now_millis() };
        Self { link, holder }
    }

    /// The bucket on the current link.
    fn kv(&self) -> kv::Store {
        self.link.borrow().leases().clone()
    }

    /// This replica.
    pub fn me(&self) -> &Holder {
        &self.holder
    }

    fn value(&self, cursor: u64) -> axum::body::Bytes {
        serde_json::to_vec(&Lease { holder: self.holder.clone(), cursor }).unwrap_or_default().into()
    }

    /// Each subscriber's lease now, by subscriber name.
    pub async fn held(&self) -> Result<BTreeMap<String, Lease>, StoreError> {
        use futures_util::StreamExt;
        let unavailable = |e: &dyn std::fmt::Display| StoreError::Unavailable(format!("JetStream: {e}"));
        let kv = self.kv();
        let mut keys = kv.keys().await.map_err(|e| unavailable(&e))?;
        let mut holders = BTreeMap::new();
        while let Some(key) = keys.next().await {
            let key = key.map_err(|e| unavailable(&e))?;
            let (Some(name), Some(value)) = (crate::log::jetstream::decode_key(&key), kv.get(&key).await.map_err(|e| unavailable(&e))?)
            else {
                continue;
            };
            if let Ok(lease) = serde_json::from_slice::<Lease>(&value) {
                holders.insert(name, lease);
            }
        }
        Ok(holders)
    }

    /// Runs `deliverer` whenever this replica holds its subscriber's lease, until `shutdown`.
    pub async fn deliver_while_held(self, deliverer: Deliverer, shutdown: Shutdown) {
        let name = deliverer.subscriber.name.clone();
        let key = crate::log::jetstream::encode_key(&name);
        let poll = TTL / 5;
        loop {
            let value = self.value(deliverer.status.lock().unwrap_or_else(|p| p.into_inner()).cursor);
            let revision = match self.kv().create(&key, value).await {
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
            tracing::info!(subscriber = %name, replica = %self.holder.replica, "took the delivery lease");
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
            let held = self.renew(&key, revision, &deliverer.status, &shutdown).await;
            let _ = stop.send(());
            let _ = running.await;
            // The cursor goes before the lease does, so the next holder starts
            // where this replica got to, sending nothing again.
            if let Err(e) = deliverer.log.save_cursors_now().await {
                tracing::warn!(subscriber = %name, error = %e, "cannot save the cursor on handing over; the next holder sends its last events again");
            }
            if let Some(revision) = held {
                let _ = self.kv().delete_expect_revision(&key, Some(revision)).await;
                return;
            }
            tracing::warn!(subscriber = %name, "lost the delivery lease");
        }
    }

    /// Renews until shutdown (then returns the lease's revision, for the
    /// caller to release it) or until a renewal fails or runs late (None).
    async fn renew(&self, key: &str, mut revision: u64, status: &crate::delivery::SharedStatus, shutdown: &Shutdown) -> Option<u64> {
        loop {
            if shutdown.sleep(TTL / 3).await {
                return Some(revision);
            }
            let cursor = status.lock().unwrap_or_else(|p| p.into_inner()).cursor;
            match tokio::time::timeout(TTL / 3, self.kv().update(key, self.value(cursor), revision)).await {
                Ok(Ok(next)) => revision = next,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "cannot renew the delivery lease");
                    return None;
                }
                Err(_) => return None,
            }
        }
    }
}
