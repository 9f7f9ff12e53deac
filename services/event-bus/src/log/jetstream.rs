//! The log in a NATS JetStream stream (`EVENT_STORE=nats://host:port[,…]`),
//! for N bus replicas sharing one replicated log.
//!
//! Every event is one message on subject [`SUBJECT`] of stream [`STREAM`],
//! its body the event's JSON without `seq` (the stream's sequence number is
//! the event's), its `Nats-Msg-Id` the event's id: within the stream's
//! duplicate window ([`DUPLICATE_WINDOW`]) JetStream stores a retried id once
//! and answers with the original's sequence number. A retry later than that
//! is stored again, and the subscribers' inboxes (keyed by event id) make the
//! second copy harmless. A publish answers once JetStream acknowledged every
//! event of it: stored by a quorum of the stream's replicas (3 when the
//! address lists 3 servers or more, else 1).
//!
//! Subscribers' cursors live in the key-value bucket [`CURSORS`] (same
//! replicas), one key per subscriber, only ever moved forward (compare and
//! set on the key's revision), so two replicas saving at once never move one back.
//!
//! Each replica publishes the deliveries it makes on the core NATS subject
//! [`DELIVERED_SUBJECT`] (no stream: a live view, lost when nobody listens)
//! and every replica's `/flow` shows what arrives there, its own included:
//! each delivery once, whichever replica made it.
//!
//! The servers require a user and password ([`Credentials`]: `NATS_USER`,
//! `NATS_PASSWORD`), kept apart from the address: `EVENT_STORE` holds no
//! secret, so it may be printed, and an address with credentials in it is
//! refused (async-nats would ignore them, and print them in its debug logs).
//!
//! The client may get stuck, and is then replaced ([`keep_connected`]).
//! async-nats (0.46) bounds a reconnect's TCP connect by `connection_timeout`
//! but waits for the server's INFO without any bound, and after a
//! disconnection it tries the servers in a random order. A server that hangs
//! (SIGSTOPped, or a frozen VM) still accepts TCP connections in its kernel,
//! so a client that tries it first waits for an INFO that never comes, the
//! live servers untried, until the hung one resumes: in CI the bus stayed off
//! JetStream for the whole minute a test allowed. No option of the client
//! changes that, so each connection ([`Link`]: the client and every handle
//! made on it) is watched, and one away from every server for
//! [`STUCK_AFTER`] is dropped for a new one, found by racing one client per
//! server, each trying the servers from a different one ([`connect_any`]),
//! so a hung server holds up one racer only.

use std::{sync::Arc, time::Duration};

use async_nats::{
    HeaderMap, ServerAddr,
    connection::State,
    jetstream::{self, consumer, kv, stream},
};
use blog_domain::Event;
use blog_kit::{Shutdown, StoreError};
use futures_util::{StreamExt, TryStreamExt};
use tokio::{
    sync::{broadcast, watch},
    time::Instant,
};

use super::Stored;
use crate::flow::{Delivered, Flow};

pub const STREAM: &str = "BLOG_EVENTS";
pub const SUBJECT: &str = "blog.events";
pub const CURSORS: &str = "blog-bus-cursors";
/// Core NATS subject carrying every replica's deliveries to every replica's `/flow`.
pub const DELIVERED_SUBJECT: &str = "blog.flow.delivered";
/// Most deliveries in one message on [`DELIVERED_SUBJECT`] (a JSON array; far under NATS's 1 MiB payload limit).
const DELIVERED_BATCH: usize = 256;
/// How long JetStream remembers a `Nats-Msg-Id` (its default, stated here).
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);
/// How long an acknowledgement or a read may take before the request fails
/// (503). Short: while a stream elects a new leader (its leader's node lost)
/// a publish goes unanswered, and the publisher's relay retries it sooner
/// (idempotent by `Nats-Msg-Id`) than a long wait would end.
const TIMEOUT: Duration = Duration::from_secs(3);
/// How often the client asks its server whether it is there. Two unanswered
/// pings end the connection and the client moves to another server: a server
/// that hangs (stopped, not dead: its sockets stay open) is left within a few
/// seconds, where async-nats's default (60 s) held the bus on it until it came
/// back.
const PING_INTERVAL: Duration = Duration::from_secs(1);
/// How long a client may stay away from every server before it is replaced
/// ([`keep_connected`]), and how long one round of [`connect_any`] lasts. A
/// reconnect to a live server takes milliseconds; one stuck on a hung
/// server's INFO never ends, and a client reconnects to the server it was on
/// first (it keeps the order it won a race with).
const STUCK_AFTER: Duration = Duration::from_secs(3);
/// Connection attempts (one server each) after which a client gives up, so
/// that a client dropped while it was still trying does not try for ever:
/// the link's watch ([`keep_connected`]) makes new ones meanwhile.
const MAX_RECONNECTS: usize = 10;
/// How long the bus waits at start-up for a server to answer and for the
/// stream and the buckets to be there.
const START_WITHIN: Duration = Duration::from_secs(30);
/// Reads of one page in flight at once.
const READ_AHEAD: usize = 64;

#[derive(Debug, Clone)]
pub struct JetStreamLog {
    /// The current link; [`keep_connected`] replaces it when it is stuck.
    link: watch::Receiver<Arc<Link>>,
    leases: crate::lease::Leases,
}

/// One client and the handles made on it (a handle is bound to its client):
/// replaced as a whole.
#[derive(Debug)]
pub(crate) struct Link {
    client: async_nats::Client,
    js: jetstream::Context,
    stream: stream::Stream,
    cursors: kv::Store,
    leases: kv::Store,
}

impl Link {
    /// The bucket of the delivery leases, on this link.
    pub(crate) fn leases(&self) -> &kv::Store {
        &self.leases
    }
}

/// What it takes to open a link.
#[derive(Debug, Clone)]
struct Cluster {
    servers: Vec<ServerAddr>,
    credentials: Option<Credentials>,
    /// Replicas of the stream and of the buckets.
    replicas: usize,
}

impl Cluster {
    /// A client connected to one of the servers (before `deadline`) with the
    /// stream and the buckets, made if they are not there yet (any number of
    /// replicas may do this at once).
    async fn open(&self, deadline: Instant) -> Result<Link, StoreError> {
        let client = connect_any(&self.servers, self.credentials.as_ref(), deadline).await?;
        let js = jetstream::new(client.clone());
        let config = stream::Config {
            name: STREAM.into(),
            subjects: vec![SUBJECT.into()],
            storage: stream::StorageType::File,
            num_replicas: self.replicas,
            duplicate_window: DUPLICATE_WINDOW,
            allow_direct: true,
            // The log is append-only: no message is deleted and the stream is never purged.
            deny_delete: true,
            deny_purge: true,
            ..Default::default()
        };
        let stream = retry_while_electing(|| js.get_or_create_stream(config.clone())).await?;
        let cursors = kv::Config { bucket: CURSORS.into(), history: 1, num_replicas: self.replicas, ..Default::default() };
        let cursors = bucket(&js, cursors).await?;
        let leases = bucket(&js, crate::lease::bucket_config(self.replicas)).await?;
        Ok(Link { client, js, stream, cursors, leases })
    }
}

/// The key-value bucket `config` names, made if it is not there yet.
async fn bucket(js: &jetstream::Context, config: kv::Config) -> Result<kv::Store, StoreError> {
    retry_while_electing(|| async {
        match js.get_key_value(config.bucket.clone()).await {
            Ok(store) => Ok(store),
            Err(_) => js.create_key_value(config.clone()).await,
        }
    })
    .await
}

/// A client that has connected to one of `servers`. Clients race, one per
/// server, each trying the servers in order from its own (async-nats's
/// random order could start every client at a hung server, where it would
/// wait for ever: see the module's documentation); the first to connect
/// wins and the others are dropped. Rounds of [`STUCK_AFTER`] until one
/// wins, or the error of the last round after `deadline`.
async fn connect_any(
    servers: &[ServerAddr],
    credentials: Option<&Credentials>,
    deadline: Instant,
) -> Result<async_nats::Client, StoreError> {
    loop {
        let racers = (0..servers.len()).map(|first| {
            let mut order = servers.to_vec();
            order.rotate_left(first);
            let options = options(credentials);
            Box::pin(async move {
                let client = options.retain_servers_order().connect(order).await.map_err(unavailable)?;
                // Queued until the client has connected; fails once it gave up.
                client.flush().await.map_err(unavailable)?;
                Ok::<_, StoreError>(client)
            })
        });
        let error = match tokio::time::timeout(STUCK_AFTER, futures_util::future::select_ok(racers)).await {
            Ok(Ok((client, _losers))) => return Ok(client),
            Ok(Err(e)) => e,
            Err(_) => unavailable(format!("no server answered within {STUCK_AFTER:?}")),
        };
        if Instant::now() >= deadline {
            return Err(error);
        }
        tracing::warn!(error = %error, "no NATS server answered; trying again");
    }
}

/// The bus's client options, but for the servers and their order.
fn options(credentials: Option<&Credentials>) -> async_nats::ConnectOptions {
    let options = match credentials {
        Some(c) => async_nats::ConnectOptions::with_user_and_password(c.user.clone(), c.password.to_string()),
        None => async_nats::ConnectOptions::new(),
    };
    options
        .name("event-bus")
        .retry_on_initial_connect()
        .max_reconnects(MAX_RECONNECTS)
        .ping_interval(PING_INTERVAL)
        .request_timeout(Some(TIMEOUT))
}

/// Replaces the link once its client has been away from every server for
/// [`STUCK_AFTER`] (stuck on a hung server, or given up after
/// [`MAX_RECONNECTS`]), until every receiver of `link` is dropped. The old
/// client goes with its last handle; one stuck on a hung server lingers
/// until that server resumes or dies.
async fn keep_connected(cluster: Cluster, link: watch::Sender<Arc<Link>>) {
    let mut away_since = None;
    loop {
        tokio::select! {
            () = link.closed() => return,
            () = tokio::time::sleep(PING_INTERVAL) => {}
        }
        let state = link.borrow().client.connection_state();
        if state == State::Connected {
            away_since = None;
            continue;
        }
        if away_since.get_or_insert_with(Instant::now).elapsed() < STUCK_AFTER {
            continue;
        }
        tracing::warn!(?state, "the NATS client found no server within {STUCK_AFTER:?}; replacing it");
        match cluster.open(Instant::now()).await {
            Ok(new) => {
                tracing::info!(server = %new.client.server_info().server_name, "a new NATS client took over");
                link.send_replace(Arc::new(new));
                away_since = None;
            }
            Err(e) => tracing::warn!(error = %e, "no new NATS client yet; trying again"),
        }
    }
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("JetStream: {e}"))
}

/// The user and password the bus gives the NATS servers. Cheap to clone;
/// the password is never printed.
#[derive(Clone)]
pub struct Credentials {
    user: String,
    password: std::sync::Arc<str>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").field("user", &self.user).field("password", &"..").finish()
    }
}

impl Credentials {
    pub fn new(user: impl Into<String>, password: impl AsRef<str>) -> Self {
        Self { user: user.into(), password: password.as_ref().into() }
    }

    pub fn user(&self) -> &str {
        &self.user
    }
}

/// `nats://h:p,h:p` (or `nats://h:p,nats://h:p`) into the servers' addresses.
/// Credentials have variables of their own ([`Credentials`]); one inside the
/// address is refused without repeating it.
pub fn parse_servers(url: &str) -> Result<Vec<async_nats::ServerAddr>, String> {
    let rest = url.strip_prefix("nats://").ok_or_else(|| "expected nats://host:port[,host:port…]".to_owned())?;
    let servers: Vec<_> = rest
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            let s = if s.contains("://") { s.to_owned() } else { format!("nats://{s}") };
            if s.contains('@') {
                return Err("a user or password in the address: set NATS_USER and NATS_PASSWORD instead".to_owned());
            }
            s.parse::<async_nats::ServerAddr>().map_err(|e| format!("`{s}`: {e}"))
        })
        .collect::<Result<_, _>>()?;
    if servers.is_empty() {
        return Err("no server in the address".into());
    }
    Ok(servers)
}

impl JetStreamLog {
    /// Connects (retrying for [`START_WITHIN`]) and makes the stream and
    /// the buckets if they are not there yet; any number of replicas may do
    /// this at once. A task keeps the log connected while it lives
    /// ([`keep_connected`]).
    /// `replica` names this replica in the delivery leases it takes.
    pub async fn connect(url: &str, credentials: Option<&Credentials>, replica: &str) -> Result<Self, StoreError> {
        let servers = parse_servers(url).map_err(unavailable)?;
        let replicas = servers.len().min(3);
        let cluster = Cluster { servers, credentials: credentials.cloned(), replicas };
        let (sender, link) = watch::channel(Arc::new(cluster.open(Instant::now() + START_WITHIN).await?));
        tokio::spawn(keep_connected(cluster, sender));
        let leases = crate::lease::Leases::new(link.clone(), replica);
        Ok(Self { link, leases })
    }

    /// The current link (cheap: an `Arc`); the borrow of the watch ends here.
    fn link(&self) -> Arc<Link> {
        self.link.borrow().clone()
    }

    /// The highest sequence number in the stream.
    pub async fn head(&self) -> Result<u64, StoreError> {
        Ok(self.state().await?.last_seq)
    }

    /// The stream as JetStream reports it now (its leader answers).
    pub async fn state(&self) -> Result<StreamState, StoreError> {
        let link = self.link();
        let mut stream = link.stream.clone();
        let info = tokio::time::timeout(TIMEOUT, stream.info()).await.map_err(unavailable)?.map_err(unavailable)?;
        let cluster = info.cluster.clone().unwrap_or_default();
        let mut replicas: Vec<Peer> =
            cluster.replicas.iter().map(|p| Peer { name: p.name.clone(), current: p.current && !p.offline }).collect();
        if let Some(leader) = &cluster.leader {
            replicas.insert(0, Peer { name: leader.clone(), current: true });
        }
        Ok(StreamState {
            stream: STREAM,
            last_seq: info.state.last_sequence,
            messages: info.state.messages,
            leader: cluster.leader,
            replicas,
            server: link.client.server_info().server_name,
        })
    }

    /// Publishes every event (pipelined), then waits for each acknowledgement in order.
    /// Publishes `events` and waits for the stream to store them; returns
    /// where each is, and the events stored now (not duplicates of ones
    /// stored before) as the stream holds them.
    pub async fn append(&self, events: Vec<Event>, timestamp: &str) -> Result<(Vec<Stored>, Vec<Event>), StoreError> {
        let link = self.link();
        let mut pending = Vec::with_capacity(events.len());
        for mut event in events {
            event.seq = None;
            event.timestamp = Some(timestamp.to_owned());
            let body = serde_json::to_vec(&event).map_err(unavailable)?;
            let mut headers = HeaderMap::new();
            headers.insert("Nats-Msg-Id", event.id.as_str());
            let ack = link.js.publish_with_headers(SUBJECT, headers, body.into()).await.map_err(unavailable)?;
            pending.push((event, ack));
        }
        let mut stored = Vec::with_capacity(pending.len());
        let mut fresh = Vec::with_capacity(pending.len());
        for (mut event, ack) in pending {
            let ack = ack.await.map_err(unavailable)?;
            stored.push(Stored { id: event.id.clone(), seq: ack.sequence });
            if !ack.duplicate {
                event.seq = Some(ack.sequence);
                fresh.push(event);
            }
        }
        Ok((stored, fresh))
    }

    /// Up to `limit` events after `after`, in order, as the stream's leader
    /// has them (reads are pipelined, [`READ_AHEAD`] at a time). A sequence
    /// number with no readable event is passed over (see [`Self::read`]), and
    /// so is a whole page of them: the next page is read, up to the head.
    pub async fn after(&self, mut after: u64, limit: u32) -> Result<Vec<Event>, StoreError> {
        let head = self.head().await?;
        while after < head {
            let last = head.min(after.saturating_add(u64::from(limit)));
            let events: Vec<Event> = futures_util::stream::iter(after + 1..=last)
                .map(|seq| self.read(seq))
                .buffered(READ_AHEAD)
                .try_filter_map(|event| std::future::ready(Ok(event)))
                .try_collect()
                .await?;
            if !events.is_empty() {
                return Ok(events);
            }
            after = last;
        }
        Ok(Vec::new())
    }

    /// The event numbered `seq`, or `None` when the stream holds none there:
    /// a message deleted by hand, or one that is not an event (the bus
    /// writes only events; anything else came from elsewhere). Either is
    /// logged and passed over, so that one bad message cannot hold every
    /// subscriber at it forever.
    async fn read(&self, seq: u64) -> Result<Option<Event>, StoreError> {
        match self.link().stream.get_raw_message(seq).await {
            Ok(message) => Ok(readable(message.sequence, &message.payload)),
            Err(e) if matches!(e.kind(), stream::RawMessageErrorKind::NoMessageFound) => {
                tracing::warn!(seq, "no message at this number in the stream (deleted); passed over");
                Ok(None)
            }
            Err(e) => Err(unavailable(e)),
        }
    }

    /// Every stored event from `after + 1` on, as it is stored, across
    /// replicas: an ordered consumer (recreated by the client after a
    /// failure). It ends when its link is replaced: follow again.
    pub async fn tail(&self, after: u64) -> Result<impl futures_util::Stream<Item = Result<Event, StoreError>> + Send + use<>, StoreError> {
        let mut replaced = self.link.clone();
        let link = replaced.borrow_and_update().clone();
        let consumer = link
            .stream
            .create_consumer(consumer::pull::OrderedConfig {
                deliver_policy: consumer::DeliverPolicy::ByStartSequence { start_sequence: after + 1 },
                ..Default::default()
            })
            .await
            .map_err(unavailable)?;
        let messages = consumer.messages().await.map_err(unavailable)?;
        let messages = messages.take_until(async move {
            let _ = replaced.changed().await;
        });
        Ok(messages.filter_map(|message| {
            let event = message.map_err(unavailable).and_then(|message| {
                let seq = message.info().map_err(unavailable)?.stream_sequence;
                Ok(readable(seq, &message.payload))
            });
            std::future::ready(event.transpose())
        }))
    }

    pub async fn cursors(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let store = self.link().cursors.clone();
        let mut keys = store.keys().await.map_err(unavailable)?;
        let mut cursors = Vec::new();
        while let Some(key) = keys.next().await {
            let key = key.map_err(unavailable)?;
            if let (Some(name), Some(value)) = (decode_key(&key), store.get(&key).await.map_err(unavailable)?) {
                cursors.push((name, parse_cursor(&value)));
            }
        }
        Ok(cursors)
    }

    /// Moves `name`'s cursor to `seq` unless it is already there or beyond.
    pub async fn save_cursor(&self, name: &str, seq: u64) -> Result<(), StoreError> {
        let key = encode_key(name);
        let value = bytes_of(seq);
        let cursors = self.link().cursors.clone();
        for _ in 0..16 {
            let moved = match cursors.entry(&key).await.map_err(unavailable)? {
                Some(entry) if entry.operation == kv::Operation::Put && parse_cursor(&entry.value) >= seq => return Ok(()),
                Some(entry) => cursors.update(&key, value.clone(), entry.revision).await.is_ok(),
                None => cursors.create(&key, value.clone()).await.is_ok(),
            };
            if moved {
                return Ok(());
            }
        }
        Err(unavailable(format!("the cursor of {name} kept changing under us")))
    }

    pub fn leases(&self) -> &crate::lease::Leases {
        &self.leases
    }

    /// Shares deliveries between the replicas' `/flow`s until `shutdown`:
    /// what this replica's deliverers record on the returned sender is
    /// published on [`DELIVERED_SUBJECT`], and what any replica publishes
    /// there (this one's included) is told to `flow`. Both ends are bounded
    /// and drop records rather than wait: a watcher that falls behind loses
    /// part of the view, never slows delivery. Each link subscribes anew.
    pub async fn share_deliveries(&self, flow: broadcast::Sender<Flow>, shutdown: Shutdown) -> Result<broadcast::Sender<Flow>, StoreError> {
        let mut links = self.link.clone();
        let client = links.borrow_and_update().client.clone();
        let mut subscription = client.subscribe(DELIVERED_SUBJECT).await.map_err(unavailable)?;
        let recorded = broadcast::Sender::new(crate::flow::BUFFER);
        tokio::spawn(publish_deliveries(self.link.clone(), recorded.subscribe(), shutdown.clone()));
        tokio::spawn(async move {
            loop {
                let stop = shutdown.clone();
                let mut replaced = links.clone();
                let until = async move {
                    tokio::select! {
                        () = stop.wait() => {}
                        _ = replaced.changed() => {}
                    }
                };
                let mut shared = std::pin::pin!(subscription.take_until(until));
                while let Some(message) = shared.next().await {
                    match serde_json::from_slice::<Vec<Delivered>>(&message.payload) {
                        Ok(records) if flow.receiver_count() > 0 => records.into_iter().for_each(|record| {
                            let _ = flow.send(Flow::Delivered(record));
                        }),
                        Ok(_) => {}
                        Err(e) => tracing::warn!(error = %e, "unreadable deliveries from another replica"),
                    }
                }
                // Stopped, or the link was replaced: subscribe on the new one.
                loop {
                    if shutdown.requested() {
                        return;
                    }
                    let client = links.borrow_and_update().client.clone();
                    match client.subscribe(DELIVERED_SUBJECT).await {
                        Ok(next) => {
                            subscription = next;
                            break;
                        }
                        Err(e) => tracing::warn!(error = %e, "cannot share deliveries on the new NATS client; retrying"),
                    }
                    if shutdown.sleep(PING_INTERVAL).await {
                        return;
                    }
                }
            }
        });
        Ok(recorded)
    }

    pub fn ping(&self) -> bool {
        self.link().client.connection_state() == State::Connected
    }

    /// Whether JetStream answers now: connected to a server, and the stream's
    /// leader reports its state within `within`.
    pub async fn reachable(&self, within: Duration) -> Result<(), StoreError> {
        let link = self.link();
        if link.client.connection_state() != State::Connected {
            return Err(unavailable(format!("not connected ({:?})", link.client.connection_state())));
        }
        let mut stream = link.stream.clone();
        match tokio::time::timeout(within, stream.info()).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(unavailable(e)),
            Err(_) => Err(unavailable(format!("the stream did not answer within {within:?}"))),
        }
    }
}

/// Publishes the deliveries recorded on `records`, as many as are waiting
/// (up to [`DELIVERED_BATCH`]) in one message, on the current link; those it
/// falls behind on are dropped.
async fn publish_deliveries(link: watch::Receiver<Arc<Link>>, mut records: broadcast::Receiver<Flow>, shutdown: Shutdown) {
    use broadcast::error::{RecvError, TryRecvError};
    loop {
        let first = tokio::select! {
            first = records.recv() => first,
            () = shutdown.wait() => return,
        };
        let mut batch = Vec::new();
        match first {
            Ok(Flow::Delivered(record)) => batch.push(record),
            Ok(Flow::Published(_)) => {}
            Err(RecvError::Lagged(dropped)) => tracing::debug!(dropped, "deliveries not shared: the connection was slow"),
            Err(RecvError::Closed) => return,
        }
        while batch.len() < DELIVERED_BATCH {
            match records.try_recv() {
                Ok(Flow::Delivered(record)) => batch.push(record),
                Ok(Flow::Published(_)) | Err(TryRecvError::Lagged(_)) => {}
                Err(TryRecvError::Empty | TryRecvError::Closed) => break,
            }
        }
        if batch.is_empty() {
            continue;
        }
        match serde_json::to_vec(&batch) {
            Ok(body) => {
                let client = link.borrow().client.clone();
                if let Err(e) = client.publish(DELIVERED_SUBJECT, body.into()).await {
                    tracing::debug!(error = %e, "deliveries not shared");
                }
            }
            Err(e) => tracing::warn!(error = %e, "deliveries not shared"),
        }
    }
}

/// The stream's state, for `/status`.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StreamState {
    pub stream: &'static str,
    /// The stream's last sequence number: the log's head.
    pub last_seq: u64,
    pub messages: u64,
    /// The NATS server that leads the stream's replicas.
    pub leader: Option<String>,
    /// Every server holding a replica of the stream, leader first, and whether it is current with the leader.
    pub replicas: Vec<Peer>,
    /// The NATS server this replica is connected to now.
    pub server: String,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Peer {
    pub name: String,
    pub current: bool,
}

/// A freshly started cluster answers "no suitable peers" or times out
/// until its meta leader is elected; creation is retried for a while.
async fn retry_while_electing<T, E: std::fmt::Display, F: std::future::Future<Output = Result<T, E>>>(
    mut attempt: impl FnMut() -> F,
) -> Result<T, StoreError> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match attempt().await {
            Ok(value) => return Ok(value),
            Err(e) if tokio::time::Instant::now() > deadline => return Err(unavailable(e)),
            Err(e) => {
                tracing::warn!(error = %e, "JetStream not ready yet; retrying");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }
}

/// The event in a stream message, or `None` (logged) when it is not one.
fn readable(seq: u64, payload: &[u8]) -> Option<Event> {
    decode(seq, payload).map_err(|e| tracing::error!(seq, error = %e, "a message in the stream is not an event; passed over")).ok()
}

fn decode(seq: u64, payload: &[u8]) -> Result<Event, StoreError> {
    let mut event: Event = serde_json::from_slice(payload).map_err(|e| unavailable(format!("event {seq} is unreadable: {e}")))?;
    event.seq = Some(seq);
    Ok(event)
}

fn bytes_of(seq: u64) -> axum::body::Bytes {
    seq.to_string().into()
}

fn parse_cursor(value: &[u8]) -> u64 {
    std::str::from_utf8(value).ok().and_then(|s| s.parse().ok()).unwrap_or(0)
}

/// Subscriber names may hold any character; keys may not: hex of the UTF-8 bytes.
pub fn encode_key(name: &str) -> String {
    name.bytes().map(|b| format!("{b:02x}")).collect()
}

pub(crate) fn decode_key(key: &str) -> Option<String> {
    let bytes =
        (0..key.len()).step_by(2).map(|i| key.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok())).collect::<Option<Vec<u8>>>()?;
    String::from_utf8(bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_list_every_server() {
        assert_eq!(parse_servers("nats://127.0.0.1:4222,127.0.0.1:4223, nats://h:1").unwrap().len(), 3);
        assert!(parse_servers("http://h:1").is_err());
        assert!(parse_servers("nats://").is_err());
        let refused = parse_servers("nats://127.0.0.1:1,bus:hunter2@127.0.0.1:2").unwrap_err();
        assert!(refused.contains("NATS_PASSWORD") && !refused.contains("hunter2"), "{refused}");
    }

    #[test]
    fn credentials_never_print_their_password() {
        let shown = format!("{:?}", Credentials::new("blog-bus", "hunter2"));
        assert!(shown.contains("blog-bus") && !shown.contains("hunter2"), "{shown}");
    }

    /// A server that hangs: its kernel accepts connections (into the listen
    /// backlog), nothing answers on them, as with a SIGSTOPped nats-server.
    fn hung_server() -> (std::net::TcpListener, ServerAddr) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = format!("nats://{}", listener.local_addr().unwrap()).parse().unwrap();
        (listener, addr)
    }

    /// Just enough of a NATS server for a client to connect and stay: INFO,
    /// then a PONG for every PING.
    async fn live_server(name: &str) -> ServerAddr {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let info = format!(
            "INFO {{\"server_id\":\"{name}\",\"server_name\":\"{name}\",\"version\":\"2.10.0\",\"port\":{port},\"max_payload\":1048576,\"proto\":1,\"headers\":true}}\r\n"
        );
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let info = info.clone();
                tokio::spawn(async move {
                    let (read, mut write) = socket.into_split();
                    write.write_all(info.as_bytes()).await?;
                    let mut lines = tokio::io::BufReader::new(read).lines();
                    while let Some(line) = lines.next_line().await? {
                        if line == "PING" {
                            write.write_all(b"PONG\r\n").await?;
                        }
                    }
                    Ok::<_, std::io::Error>(())
                });
            }
        });
        format!("nats://127.0.0.1:{port}").parse().unwrap()
    }

    /// Why [`connect_any`] races: async-nats bounds the TCP connect only, and
    /// a client that tries a hung server waits for its INFO for ever, the
    /// live server after it untried. If this fails, async-nats bounds that
    /// wait now, and the race may be simpler.
    #[tokio::test]
    async fn async_nats_waits_for_a_hung_servers_info_for_ever() {
        let (_hung, hung) = hung_server();
        let live = live_server("live").await;
        let timeout = Duration::from_millis(200);
        let client = async_nats::ConnectOptions::new()
            .retain_servers_order()
            .retry_on_initial_connect()
            .connection_timeout(timeout)
            .connect(vec![hung, live])
            .await
            .unwrap();
        assert!(tokio::time::timeout(10 * timeout, client.flush()).await.is_err(), "connected: {:?}", client.server_info());
        assert_eq!(client.connection_state(), State::Pending);
    }

    #[tokio::test]
    async fn a_hung_server_holds_up_one_racer_only() {
        let (_hung, hung) = hung_server();
        let live = live_server("live").await;
        for servers in [vec![hung.clone(), live.clone()], vec![live, hung]] {
            let started = Instant::now();
            let client = connect_any(&servers, None, started).await.unwrap();
            assert_eq!(client.server_info().server_name, "live");
            assert_eq!(client.connection_state(), State::Connected);
            assert!(started.elapsed() < STUCK_AFTER, "{:?}", started.elapsed());
        }
    }

    #[tokio::test]
    async fn with_every_server_hung_no_client_connects() {
        let (_hung, hung) = hung_server();
        let started = Instant::now();
        let error = connect_any(&[hung], None, started).await.unwrap_err();
        assert!(error.to_string().contains("no server answered"), "{error}");
        assert!(started.elapsed() >= STUCK_AFTER);
    }

    #[test]
    fn cursor_keys_round_trip_any_name() {
        for name in ["query", "a b/ü.*>"] {
            assert_eq!(decode_key(&encode_key(name)).as_deref(), Some(name));
        }
        assert_eq!(decode_key("zz"), None);
    }
}
