//! A service's place in the event flow: its database, outbox relay, inbox and
//! HTTP server, wired the same way for every service that owns data.

use axum::Router;
use tokio::net::TcpListener;

use crate::{
    Service,
    bus_client::{BusClient, http_client},
    config::CommonConfig,
    inbox::{self, Handler, Inbox},
    internal::InternalSecret,
    metrics::Registry,
    outbox::{self, Outbox, backoff},
    server::{self, Shutdown},
    store::{Store, StoreError},
};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Timeout of calls to the bus.
const BUS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct Node {
    pub service: Service,
    pub store: Store,
    pub metrics: Registry,
    pub bus: BusClient,
    pub outbox: Outbox,
    pub secret: InternalSecret,
}

impl Node {
    /// Opens `<DATA_DIR>/<service>.db` with the outbox and inbox tables and
    /// the service's own `migrations`.
    pub async fn open(service: Service, config: &CommonConfig, migrations: &[&str]) -> Result<Self, StoreError> {
        let store = Store::open_capped(&config.data_dir, service.name(), migrations, config.db_max_bytes)?;
        store
            .write(|conn| {
                conn.execute_batch(outbox::SCHEMA)?;
                conn.execute_batch(inbox::SCHEMA)?;
                Ok::<_, StoreError>(())
            })
            .await?;
        let metrics = Registry::default();
        store.register_metrics(&metrics);
        let bus = BusClient::new(http_client(BUS_TIMEOUT), &config.bus_url, config.internal_secret.clone());
        let outbox = Outbox::new(store.clone(), &metrics);
        Ok(Self { service, store, metrics, bus, outbox, secret: config.internal_secret.clone() })
    }

    /// An inbox applying events with `handler`; effects it stages wake the relay.
    pub fn inbox(&self, handler: impl Handler) -> Inbox {
        Inbox::new(self.store.clone(), handler, Some(self.outbox.clone()), &self.metrics)
    }

    /// Runs the relay, the catch-up with the bus (when `inbox` is given) and
    /// the HTTP server until `shutdown`.
    pub async fn run(self, listener: TcpListener, routes: Router, inbox: Option<Inbox>, shutdown: Shutdown) -> Result<(), BoxError> {
        tokio::spawn(self.outbox.clone().relay(self.bus.clone(), shutdown.clone()));
        let events = match inbox {
            Some(inbox) => {
                tokio::spawn(catch_up(inbox.clone(), self.bus.clone(), shutdown.clone()));
                inbox.router(&self.secret)
            }
            None => server::ack_events(&self.secret),
        };
        let app = server::standard(routes.merge(events), Some(self.store.clone()), self.metrics.clone());
        server::serve(listener, app, shutdown).await?;
        Ok(())
    }
}

/// Replays what the service missed while it was down, retrying until the
/// bus answers; from then on the bus pushes. The watermark is read once: a
/// retry resumes from where the previous attempt got to, not from whatever
/// pushes meanwhile did to the database.
async fn catch_up(inbox: Inbox, bus: BusClient, shutdown: Shutdown) {
    let mut attempt = 0;
    let mut after = None;
    loop {
        let result = match after.as_mut() {
            Some(after) => inbox.catch_up(&bus, after).await,
            None => match inbox.cursor().await {
                Ok(watermark) => {
                    tracing::info!(watermark, "catching up with the bus");
                    after = Some(watermark);
                    continue;
                }
                Err(e) => Err(e.into()),
            },
        };
        match result {
            Ok(fetched) => {
                tracing::info!(fetched, "caught up with the bus");
                return;
            }
            Err(e) => {
                attempt += 1;
                tracing::warn!(error = %e, attempt, "cannot catch up with the bus yet");
                if shutdown.sleep(backoff(attempt)).await {
                    return;
                }
            }
        }
    }
}
