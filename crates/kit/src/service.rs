//! One entry point for a service with a database:
//!
//! ```text
//! let kit = ServiceKit::new(Service::Posts).migrations(MIGRATIONS).open(&config.common, &shutdown).await?;
//! kit.serve(app(AppState { kit: kit.clone() })).consumer(handler).run(listener, shutdown).await
//! ```
//!
//! [`ServiceKit`] opens `<DATA_DIR>/<service>.db` with the outbox and inbox
//! tables and the service's own migrations, and gives a [`Kit`]: what
//! handlers hold to write ([`Kit::commit`], the unit of work that publishes)
//! and read ([`Kit::read`]). [`Kit::serve`] adds the standard routes and
//! layers and `POST /events` (the consumer's inbox, or an acknowledgement for
//! a service that consumes nothing), and runs the relay, the catch-up and
//! the server until shutdown. [`main`] is a binary's whole `main`.

use std::{future::Future, time::Duration};

use axum::Router;
use blog_domain::{Service, config::ConfigError};
use tokio::net::TcpListener;

use crate::{
    config::CommonConfig,
    http::{client::http_client, layers, serve::serve},
    internal::InternalSecret,
    messaging::{
        self,
        bus_client::BusClient,
        inbox::{self, Consumer, Inbox},
        outbox::Outbox,
    },
    metrics::Registry,
    shutdown::{Shutdown, shutdown_signal},
    store::{Migration, Refresh, Store, StoreError, Tx},
    telemetry,
};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Timeout of calls to the bus.
const BUS_TIMEOUT: Duration = Duration::from_secs(5);

/// How a service's kit is opened.
#[derive(Debug, Clone)]
pub struct ServiceKit {
    pub(crate) service: Service,
    pub(crate) migrations: &'static [Migration],
}

impl ServiceKit {
    pub fn new(service: Service) -> Self {
        Self { service, migrations: &[] }
    }

    /// The service's own schema: migration `i` runs once, when the database's
    /// version is below `i + 1` (its SQLite or its PostgreSQL text).
    pub fn migrations(mut self, migrations: &'static [Migration]) -> Self {
        self.migrations = migrations;
        self
    }

    /// Opens the service's database as `config` says: PostgreSQL at
    /// `DATABASE_URL` when set (waiting, until `shutdown`, for a server that
    /// cannot be reached yet), else SQLite in `DATA_DIR`.
    pub async fn open(self, config: &CommonConfig, shutdown: &Shutdown) -> Result<Kit, StoreError> {
        let store = match &config.database_url {
            Some(url) => Store::connect_waiting(url, self.service.name(), self.migrations, shutdown).await?,
            None => Store::open_capped(&config.data_dir, self.service.name(), &self.sqlite_migrations(), config.db_max_bytes)?,
        };
        let bus = BusClient::new(http_client(BUS_TIMEOUT), &config.bus_url, config.internal_secret.clone());
        Kit::over(self.service, store, bus, config.internal_secret.clone()).await
    }
}

impl ServiceKit {
    pub(crate) fn sqlite_migrations(&self) -> Vec<&'static str> {
        self.migrations.iter().map(|m| m.sqlite).collect()
    }
}

/// What a service's handlers hold: its database and its outbox. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Kit {
    service: Service,
    store: Store,
    outbox: Outbox,
    metrics: Registry,
    bus: BusClient,
    secret: InternalSecret,
}

impl Kit {
    pub(crate) async fn over(service: Service, store: Store, bus: BusClient, secret: InternalSecret) -> Result<Self, StoreError> {
        messaging::install(&store).await?;
        let metrics = Registry::default();
        store.register_metrics(&metrics);
        bus.calls().register(&metrics);
        let outbox = Outbox::new(store.clone(), &metrics);
        Ok(Self { service, store, outbox, metrics, bus, secret })
    }

    pub fn service(&self) -> Service {
        self.service
    }

    /// The unit of work: runs `f` in one durable transaction; the events it
    /// publishes ([`Tx::publish`]) are committed with its rows and go to the
    /// bus once the commit is on disk. There is nothing else to call.
    pub async fn commit<T, E, F>(&self, f: F) -> Result<T, E>
    where
        F: FnOnce(&mut Tx<'_>) -> Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        self.outbox.commit(true, f).await
    }

    /// Runs `f` on a read-only connection off the async runtime.
    pub async fn read<T, E, F>(&self, f: F) -> Result<T, E>
    where
        F: FnOnce(&Tx<'_>) -> Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        self.store.read(f).await
    }

    /// What the service's other replicas change, as their [`Tx::notify`] on
    /// `channel` names it (PostgreSQL); with SQLite nothing ever arrives.
    /// Receive with [`crate::store::next_refresh`].
    pub fn listen(&self, channel: &'static str) -> tokio::sync::broadcast::Receiver<Refresh> {
        self.store.listen(channel)
    }

    /// The service's metrics, for gauges and counters of its own.
    pub fn metrics(&self) -> &Registry {
        &self.metrics
    }

    /// The inbox that applies events with `consumer`.
    pub fn inbox(&self, consumer: impl Consumer) -> Inbox {
        Inbox::new(self.store.clone(), consumer, self.outbox.clone(), self.bus.clone(), &self.metrics)
    }

    /// A server for `routes`, with everything every service has.
    pub fn serve(&self, routes: Router) -> Serving {
        Serving { kit: self.clone(), routes, inbox: None }
    }
}

/// A service about to run: its routes and, if it consumes, its inbox.
#[derive(Debug)]
pub struct Serving {
    kit: Kit,
    routes: Router,
    inbox: Option<Inbox>,
}

impl Serving {
    /// Applies the events the bus pushes with `consumer`.
    pub fn consumer(self, consumer: impl Consumer) -> Self {
        let inbox = self.kit.inbox(consumer);
        self.inbox(inbox)
    }

    /// Applies the events the bus pushes with `inbox`, which the service's
    /// handlers may also hold (to [`Inbox::pull`]).
    pub fn inbox(mut self, inbox: Inbox) -> Self {
        self.inbox = Some(inbox);
        self
    }

    /// The whole application: the service's routes, `POST /events`, and the
    /// standard routes and layers.
    pub fn router(&self) -> Router {
        let events = match &self.inbox {
            Some(inbox) => inbox.router(&self.kit.secret),
            None => inbox::ack_events(&self.kit.secret),
        };
        layers::standard(self.routes.clone().merge(events), Some(self.kit.store.clone()), self.kit.metrics.clone())
    }

    /// Runs the relay, the catch-up with the bus (for a consumer) and the
    /// HTTP server until `shutdown`.
    pub async fn run(self, listener: TcpListener, shutdown: Shutdown) -> Result<(), BoxError> {
        let app = self.router();
        self.start_background(&shutdown);
        serve(listener, app, shutdown).await?;
        // Every request has been answered: nothing commits any more.
        self.kit.outbox.release().await;
        Ok(())
    }

    /// Starts the relay and, for a consumer, the catch-up.
    pub(crate) fn start_background(&self, shutdown: &Shutdown) {
        tokio::spawn(self.kit.outbox.clone().relay(self.kit.bus.clone(), shutdown.clone()));
        if let Some(inbox) = &self.inbox {
            tokio::spawn(inbox::catch_up(inbox.clone(), shutdown.clone()));
        }
    }
}

/// Runs a service binary: telemetry, configuration, bind, serve. Returns the
/// process exit code, so `main` stays a few lines.
pub fn main<C, F, Fut>(
    service: Service,
    config: impl FnOnce() -> Result<C, ConfigError>,
    port: impl Fn(&C) -> u16,
    run: F,
) -> std::process::ExitCode
where
    F: FnOnce(TcpListener, C, Shutdown) -> Fut,
    Fut: Future<Output = Result<(), Box<dyn std::error::Error + Send + Sync>>>,
{
    telemetry::init(service.name());
    let config = match config().and_then(|config| Ok((crate::config::bind_addr()?, config))) {
        Ok(config) => config,
        Err(e) => {
            tracing::error!(error = %e, "invalid configuration");
            return std::process::ExitCode::from(2);
        }
    };
    // Reads run on the blocking pool; they are short, and every extra thread
    // can keep a malloc arena of its own, so a few threads are plenty.
    let runtime = match tokio::runtime::Builder::new_multi_thread().max_blocking_threads(8).enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the runtime");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        let (ip, config) = config;
        let addr = std::net::SocketAddr::new(ip, port(&config));
        let listener = TcpListener::bind(addr).await?;
        tracing::info!(service = service.name(), version = env!("CARGO_PKG_VERSION"), "starting");
        run(listener, config, Shutdown::new(shutdown_signal())).await
    });
    runtime.shutdown_timeout(Duration::from_secs(1));
    telemetry::shutdown();
    match result {
        Ok(()) => {
            tracing::info!(service = service.name(), "stopped");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(service = service.name(), error = %e, "failed");
            std::process::ExitCode::FAILURE
        }
    }
}
