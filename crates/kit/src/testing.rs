//! The in-process test tier (feature `testing`): a service over a temporary
//! database, talking to a fake bus.
//!
//! The fake bus is a real HTTP endpoint on `127.0.0.1:0` in the test's own
//! process that records what it is sent, checking the secret and numbering
//! events once by id as the real bus does; nothing of the kit is mocked, so
//! a test that reads [`FakeBus::events`] has seen the relay, the outbox and
//! the HTTP hand-over work.

use std::{
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use axum::{
    Json, Router,
    extract::{Query, State},
    routing::post,
};
use blog_domain::Event;
use serde::Deserialize;
use tokio::{net::TcpListener, sync::watch};

use crate::{
    http::{client::http_client, serve::serve},
    internal::{self, InternalSecret},
    messaging::bus_client::BusClient,
    service::{BoxError, Kit, ServiceKit, Serving},
    shutdown::Shutdown,
    store::{DatabaseUrl, Store},
};

/// The secret of a test's internal calls.
pub const TEST_SECRET: &str = "test-secret-0123456789abcdef";

/// A kit over a temporary database and a [`FakeBus`], and the shutdown that
/// ends what it started.
#[derive(Debug)]
pub struct TestKit {
    pub kit: Kit,
    pub bus: FakeBus,
    pub shutdown: Shutdown,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    _dir: tempfile::TempDir,
}

impl ServiceKit {
    /// The kit of a test: a temporary database, a fake bus, the relay running.
    pub async fn for_test(self) -> Result<TestKit, BoxError> {
        self.for_test_on(None).await
    }

    /// Like [`ServiceKit::for_test`], on the PostgreSQL database at
    /// `database_url` when given (several test kits on one database are
    /// replicas of one service).
    pub async fn for_test_on(self, database_url: Option<DatabaseUrl>) -> Result<TestKit, BoxError> {
        let dir = tempfile::tempdir()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let shutdown = Shutdown::new(async move {
            let _ = stopped.await;
        });
        let secret = InternalSecret::parse(TEST_SECRET)?;
        let bus = FakeBus::start(secret.clone(), shutdown.clone()).await?;
        let store = match &database_url {
            Some(url) => Store::connect(url, self.service.name(), self.migrations).await?,
            None => Store::open(dir.path(), self.service.name(), &self.sqlite_migrations())?,
        };
        let client = BusClient::new(http_client(Duration::from_secs(5)), &bus.url, secret.clone());
        let kit = Kit::over(self.service, store, client, secret).await?;
        Ok(TestKit { kit, bus, shutdown, stop: Some(stop), _dir: dir })
    }
}

impl TestKit {
    /// The application of `serving` as `oneshot` tests call it, with its
    /// relay (and catch-up, for a consumer) running against the fake bus.
    pub fn app(&self, serving: Serving) -> Router {
        serving.start_background(&self.shutdown);
        serving.router()
    }

    /// The `Authorization` value internal callers send.
    pub fn bearer(&self) -> String {
        format!("Bearer {TEST_SECRET}")
    }
}

impl Drop for TestKit {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A recording bus: `POST /events` (with the secret) stores each id once,
/// `GET /events?after=&limit=` pages through what it holds.
#[derive(Debug, Clone)]
pub struct FakeBus {
    pub url: url::Url,
    log: Arc<Mutex<Vec<Event>>>,
    count: watch::Receiver<usize>,
}

#[derive(Debug, Clone)]
struct BusState {
    log: Arc<Mutex<Vec<Event>>>,
    count: Arc<watch::Sender<usize>>,
}

impl FakeBus {
    async fn start(secret: InternalSecret, shutdown: Shutdown) -> Result<Self, BoxError> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let url = url::Url::parse(&format!("http://{}", listener.local_addr()?))?;
        let (count, receiver) = watch::channel(0);
        let state = BusState { log: Arc::default(), count: Arc::new(count) };
        let log = state.log.clone();
        let app = Router::new()
            .route("/events", post(append).route_layer(axum::middleware::from_fn_with_state(secret, internal::require_secret)).get(page))
            .with_state(state);
        tokio::spawn(serve(listener, app, shutdown));
        Ok(Self { url, log, count: receiver })
    }

    /// Every event stored, in order.
    pub fn events(&self) -> Vec<Event> {
        self.log.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Stores `event` as if another service had published it.
    pub fn seed(&self, mut event: Event) {
        let mut log = self.log.lock().unwrap_or_else(PoisonError::into_inner);
        event.seq = Some(log.len() as u64 + 1);
        log.push(event);
    }

    /// Waits until the bus holds `count` events (or more); fails after `within`.
    pub async fn wait_for(&self, count: usize, within: Duration) -> Result<Vec<Event>, String> {
        let mut receiver = self.count.clone();
        match tokio::time::timeout(within, receiver.wait_for(|n| *n >= count)).await {
            Ok(Ok(_)) => Ok(self.events()),
            _ => Err(format!("the bus holds {} events, not {count}, after {within:?}", self.events().len())),
        }
    }
}

async fn append(State(state): State<BusState>, Json(body): Json<serde_json::Value>) -> Json<serde_json::Value> {
    let events: Vec<Event> = match body {
        serde_json::Value::Array(items) => items.into_iter().filter_map(|item| Event::from_value(item).ok()).collect(),
        single => Event::from_value(single).into_iter().collect(),
    };
    let count = {
        let mut log = state.log.lock().unwrap_or_else(PoisonError::into_inner);
        for mut event in events {
            if log.iter().all(|stored| stored.id != event.id) {
                event.seq = Some(log.len() as u64 + 1);
                log.push(event);
            }
        }
        log.len()
    };
    state.count.send_replace(count);
    Json(serde_json::json!({"status": "OK"}))
}

#[derive(Deserialize)]
struct Page {
    #[serde(default)]
    after: u64,
    limit: Option<usize>,
}

async fn page(State(state): State<BusState>, Query(page): Query<Page>) -> Json<Vec<Event>> {
    let log = state.log.lock().unwrap_or_else(PoisonError::into_inner);
    let after = usize::try_from(page.after).unwrap_or(usize::MAX);
    Json(log.iter().skip(after).take(page.limit.unwrap_or(1_000)).cloned().collect())
}
