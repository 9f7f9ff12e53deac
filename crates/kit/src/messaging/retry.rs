//! The one way the suite retries a hand-over of events, shared by the
//! outbox relay (service → bus), the bus's deliverers (bus → subscriber) and
//! a consumer's catch-up (bus → consumer on start):
//!
//! - [`DeliveryError`] and its one rule of what is transient: anything but
//!   the receiver's own refusal of the events (marked with
//!   [`crate::internal::REFUSAL_HEADER`]); a wrong URL or secret, a proxy's
//!   error page, a timeout are faults of the path, retried until it is fixed.
//! - [`hand_over`]: send a batch; when the receiver refuses it, send its
//!   events one at a time and set aside only the one it refuses, so one bad
//!   event cannot block every later one.
//! - [`run`]: the loop around a [`Worker`]: one pass after another, waiting
//!   when idle, with exponential backoff and jitter after a failure (up to
//!   [`MAX_BACKOFF`], or [`MAX_BACKOFF_QUICK`] for a failure that cost the
//!   receiver next to nothing; cut short, after [`MIN_RETRY`], when the
//!   worker sees the cause of the failure gone), until the work is done or
//!   shutdown.

use std::{fmt::Display, future::Future, time::Duration};

use crate::shutdown::Shutdown;

/// The longest wait between two attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// The longest wait after a failure that cost the receiver next to nothing:
/// no connection (its process or pod is starting) or a quick 5xx (it cannot
/// take the events right now: its database or its own storage is away). It
/// should have them soon after it can take them again.
pub const MAX_BACKOFF_QUICK: Duration = Duration::from_secs(1);

/// Exponential backoff from 50 ms to [`MAX_BACKOFF`] with full jitter on the upper half.
pub fn backoff(attempt: u32) -> Duration {
    backoff_within(attempt, MAX_BACKOFF)
}

/// [`backoff`] that never waits longer than `longest`.
pub fn backoff_within(attempt: u32, longest: Duration) -> Duration {
    let ceiling = 50u64.saturating_mul(1 << attempt.min(7)).min(longest.as_millis() as u64);
    Duration::from_millis(ceiling / 2 + fastrand::u64(0..=ceiling / 2))
}

/// The shortest wait after a failure, even when the worker sees its cause
/// gone ([`Worker::recovered`]): a failing pass is never repeated faster.
pub const MIN_RETRY: Duration = Duration::from_millis(50);

/// Why handing events to a receiver failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeliveryError {
    /// No connection: refused (nothing listens at the address), or the
    /// name does not resolve, or connecting timed out.
    #[error("no connection: {0}")]
    NoConnection(String),
    /// No answer on a connection: timeout, reset.
    #[error("unreachable: {0}")]
    Unreachable(String),
    /// An answer other than success.
    #[error("answered {status}: {body}")]
    Status {
        status: u16,
        body: String,
        /// The receiver refused the events themselves.
        refused: bool,
    },
}

impl DeliveryError {
    /// Whether sending the same events again can succeed: the one rule.
    pub fn is_transient(&self) -> bool {
        match self {
            DeliveryError::NoConnection(_) | DeliveryError::Unreachable(_) => true,
            DeliveryError::Status { refused, .. } => !refused,
        }
    }

    /// The longest wait before trying again after this error: short after
    /// one that cost the receiver next to nothing, long after one that held
    /// a connection until it timed out or broke, or that says something is
    /// misconfigured (which an operator must fix, and is logged each time).
    pub fn longest_wait(&self) -> Duration {
        match self {
            DeliveryError::NoConnection(_) | DeliveryError::Status { status: 500.., .. } => MAX_BACKOFF_QUICK,
            DeliveryError::Unreachable(_) | DeliveryError::Status { .. } => MAX_BACKOFF,
        }
    }

    /// A 4xx that is not a refusal of the events: something is misconfigured
    /// (URL, secret) and an operator must be told.
    pub fn is_misdirected(&self) -> bool {
        matches!(self, DeliveryError::Status { status: 400..500, refused: false, .. })
    }
}

impl From<reqwest::Error> for DeliveryError {
    fn from(error: reqwest::Error) -> Self {
        if error.is_connect() { DeliveryError::NoConnection(error.to_string()) } else { DeliveryError::Unreachable(error.to_string()) }
    }
}

/// A receiver of batches, as [`hand_over`] drives it.
pub trait Handover: Send {
    type Item: Send + Sync;

    /// Sends `items` in one request.
    fn send(&mut self, items: &[Self::Item]) -> impl Future<Output = Result<(), DeliveryError>> + Send;
    /// `items` were acknowledged.
    fn accepted(&mut self, items: &[Self::Item]) -> impl Future<Output = ()> + Send;
    /// `item` was refused for good: set it aside.
    fn refused(&mut self, item: &Self::Item, error: &DeliveryError) -> impl Future<Output = ()> + Send;
}

/// Hands `items` over, splitting the batch when the receiver refuses it;
/// fails with the transient error that stopped it, if any (what was
/// acknowledged before it stays acknowledged).
pub async fn hand_over<H: Handover>(receiver: &mut H, items: &[H::Item]) -> Result<(), DeliveryError> {
    match receiver.send(items).await {
        Ok(()) => {
            receiver.accepted(items).await;
            return Ok(());
        }
        Err(e) if e.is_transient() => return Err(e),
        Err(e) if items.len() == 1 => {
            receiver.refused(&items[0], &e).await;
            return Ok(());
        }
        Err(_) => {}
    }
    for item in items {
        let single = std::slice::from_ref(item);
        match receiver.send(single).await {
            Ok(()) => receiver.accepted(single).await,
            Err(e) if e.is_transient() => return Err(e),
            Err(e) => receiver.refused(item, &e).await,
        }
    }
    Ok(())
}

/// What one pass of a [`Worker`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// It did something; there may be more at once.
    Worked,
    /// Nothing to do: wait for [`Worker::idle`].
    Idle,
    /// The work is finished for good.
    Done,
}

/// A task that [`run`] repeats.
pub trait Worker: Send {
    type Error: Display + Send;

    /// One pass over the work.
    fn pass(&mut self) -> impl Future<Output = Result<Pass, Self::Error>> + Send;
    /// Resolves when there may be work again.
    fn idle(&mut self) -> impl Future<Output = ()> + Send;
    /// A pass failed for the `attempt`-th time in a row: log it, count it.
    fn failed(&mut self, error: &Self::Error, attempt: u32);
    /// Resolves when the cause of the last failure is seen gone, so the
    /// next pass need not wait out the backoff (never, by default).
    fn recovered(&mut self) -> impl Future<Output = ()> + Send {
        std::future::pending()
    }
    /// The longest backoff after `error` (by default [`MAX_BACKOFF`]).
    fn longest_wait(&self, _error: &Self::Error) -> Duration {
        MAX_BACKOFF
    }
}

/// Runs `worker` until it is done or `shutdown`, backing off after failures.
pub async fn run<W: Worker>(mut worker: W, shutdown: Shutdown) {
    let mut failures = 0u32;
    loop {
        match worker.pass().await {
            Ok(Pass::Worked) => {
                failures = 0;
                // A backlog does not hold a stopping process up.
                if shutdown.requested() {
                    return;
                }
            }
            Ok(Pass::Idle) => {
                failures = 0;
                tokio::select! {
                    () = worker.idle() => {}
                    () = shutdown.wait() => return,
                }
            }
            Ok(Pass::Done) => return,
            Err(error) => {
                failures = failures.saturating_add(1);
                worker.failed(&error, failures);
                let wait = backoff_within(failures, worker.longest_wait(&error));
                let first = wait.min(MIN_RETRY);
                if shutdown.sleep(first).await {
                    return;
                }
                tokio::select! {
                    () = worker.recovered() => {}
                    stopped = shutdown.sleep(wait - first) => if stopped { return },
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        for attempt in 1..40 {
            assert!(backoff_within(attempt, MAX_BACKOFF_QUICK) <= MAX_BACKOFF_QUICK);
        }
        assert!(backoff(1) <= Duration::from_millis(100));
        assert!(backoff(1) >= Duration::from_millis(50));
        for attempt in 1..40 {
            assert!(backoff(attempt) <= Duration::from_secs(5));
        }
        assert!(backoff(30) >= Duration::from_millis(2_500));
    }

    #[test]
    fn only_the_receivers_refusal_is_final() {
        let status = |status, refused| DeliveryError::Status { status, body: String::new(), refused };
        assert!(DeliveryError::Unreachable("down".into()).is_transient());
        assert!(status(503, false).is_transient());
        assert!(status(404, false).is_transient() && status(404, false).is_misdirected());
        assert!(status(403, false).is_misdirected());
        assert!(!status(400, true).is_transient() && !status(400, true).is_misdirected());
        assert!(!status(503, false).is_misdirected());
    }

    /// Refuses any batch holding a "bad" item, and is down while `down` says so.
    #[derive(Default)]
    struct Receiver {
        down: bool,
        sent: Vec<Vec<&'static str>>,
        accepted: Vec<&'static str>,
        refused: Vec<&'static str>,
    }

    impl Handover for Receiver {
        type Item = &'static str;

        async fn send(&mut self, items: &[&'static str]) -> Result<(), DeliveryError> {
            self.sent.push(items.to_vec());
            if self.down {
                return Err(DeliveryError::Unreachable("down".into()));
            }
            if items.contains(&"bad") {
                return Err(DeliveryError::Status { status: 400, body: "bad".into(), refused: true });
            }
            Ok(())
        }

        async fn accepted(&mut self, items: &[&'static str]) {
            self.accepted.extend_from_slice(items);
        }

        async fn refused(&mut self, item: &&'static str, _: &DeliveryError) {
            self.refused.push(item);
        }
    }

    #[tokio::test]
    async fn a_refused_batch_is_split_and_only_the_refused_event_set_aside() {
        let mut receiver = Receiver::default();
        hand_over(&mut receiver, &["a", "bad", "c"]).await.unwrap();
        assert_eq!(receiver.sent, [vec!["a", "bad", "c"], vec!["a"], vec!["bad"], vec!["c"]]);
        assert_eq!((receiver.accepted, receiver.refused), (vec!["a", "c"], vec!["bad"]));

        let mut down = Receiver { down: true, ..Receiver::default() };
        assert!(hand_over(&mut down, &["a", "bad"]).await.is_err());
        assert_eq!((down.sent.len(), down.accepted.len(), down.refused.len()), (1, 0, 0), "a transient failure sets nothing aside");
    }

    /// Fails `failures` times, then finishes; records when each pass ran.
    struct Flaky {
        failures: u32,
        longest: Duration,
        passes: Arc<Mutex<Vec<tokio::time::Instant>>>,
        attempts: Vec<u32>,
    }

    impl Worker for Flaky {
        type Error = String;

        async fn pass(&mut self) -> Result<Pass, String> {
            self.passes.lock().unwrap().push(tokio::time::Instant::now());
            if self.failures == 0 {
                return Ok(Pass::Done);
            }
            self.failures -= 1;
            Err("not yet".into())
        }

        async fn idle(&mut self) {}

        fn failed(&mut self, _: &String, attempt: u32) {
            self.attempts.push(attempt);
            assert_eq!(attempt as usize, self.attempts.len(), "attempts count up while failures continue");
        }

        fn longest_wait(&self, _: &String) -> Duration {
            self.longest
        }
    }

    /// The waits between the passes of a worker that fails `failures` times,
    /// backing off at most `longest`.
    async fn waits(failures: u32, longest: Duration) -> Vec<Duration> {
        let passes = Arc::new(Mutex::new(Vec::new()));
        let worker = Flaky { failures, longest, passes: passes.clone(), attempts: Vec::new() };
        run(worker, Shutdown::new(std::future::pending())).await;
        let passes = passes.lock().unwrap().clone();
        assert_eq!(passes.len(), failures as usize + 1);
        passes.windows(2).map(|w| w[1] - w[0]).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn failures_back_off_exponentially_until_the_work_is_done() {
        for (i, wait) in waits(9, MAX_BACKOFF).await.iter().enumerate() {
            let ceiling = Duration::from_millis((50u64 << (i + 1).min(7)).min(5_000));
            assert!(*wait >= ceiling / 2 && *wait <= ceiling, "wait {i}: {wait:?} outside [{:?}, {ceiling:?}]", ceiling / 2);
        }
    }

    /// Fails until `fixed`; sees its cause gone when `gone` is notified, or
    /// at once when `always_gone`.
    struct Recovering {
        fixed: Arc<std::sync::atomic::AtomicBool>,
        gone: Arc<tokio::sync::Notify>,
        always_gone: bool,
        passes: Arc<Mutex<Vec<tokio::time::Instant>>>,
    }

    impl Worker for Recovering {
        type Error = String;

        async fn pass(&mut self) -> Result<Pass, String> {
            self.passes.lock().unwrap().push(tokio::time::Instant::now());
            if self.fixed.load(std::sync::atomic::Ordering::SeqCst) { Ok(Pass::Done) } else { Err("down".into()) }
        }

        async fn idle(&mut self) {}

        fn failed(&mut self, _: &String, _: u32) {}

        async fn recovered(&mut self) {
            if !self.always_gone {
                self.gone.notified().await;
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_recovery_ends_the_backoff_but_never_before_the_shortest_wait() {
        let fixed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let gone = Arc::new(tokio::sync::Notify::new());
        let passes = Arc::new(Mutex::new(Vec::new()));
        let worker = Recovering { fixed: fixed.clone(), gone: gone.clone(), always_gone: false, passes: passes.clone() };
        let task = tokio::spawn(run(worker, Shutdown::new(std::future::pending())));
        // Long enough for the backoff to reach its ceiling (2.5 to 5 s).
        tokio::time::sleep(Duration::from_secs(60)).await;
        let before = passes.lock().unwrap().len();
        assert!(before < 30, "{before} passes in a minute: backing off");
        let signalled = tokio::time::Instant::now();
        fixed.store(true, std::sync::atomic::Ordering::SeqCst);
        gone.notify_one();
        task.await.unwrap();
        let passes = passes.lock().unwrap().clone();
        assert_eq!(passes.len(), before + 1, "one more pass, and it succeeded");
        let last_failure = passes[before - 1];
        let waited = passes[before] - signalled.max(last_failure + MIN_RETRY);
        assert_eq!(waited, Duration::ZERO, "the pass ran as soon as the cause was gone and the shortest wait was over");

        // A worker that always sees its cause gone still waits the shortest wait.
        let passes = Arc::new(Mutex::new(Vec::new()));
        let fixed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let worker = Recovering { fixed: fixed.clone(), gone, always_gone: true, passes: passes.clone() };
        let task = tokio::spawn(run(worker, Shutdown::new(std::future::pending())));
        tokio::time::sleep(Duration::from_secs(1)).await;
        fixed.store(true, std::sync::atomic::Ordering::SeqCst);
        task.await.unwrap();
        let passes = passes.lock().unwrap().clone();
        assert!(passes.len() > 2);
        for pair in passes.windows(2) {
            assert!(pair[1] - pair[0] >= MIN_RETRY, "{:?}", pair[1] - pair[0]);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn while_nothing_listens_the_backoff_stops_at_its_own_ceiling() {
        let waits = waits(12, MAX_BACKOFF_QUICK).await;
        assert!(waits.iter().all(|wait| *wait <= MAX_BACKOFF_QUICK), "{waits:?}");
        assert!(waits[6..].iter().all(|wait| *wait >= MAX_BACKOFF_QUICK / 2), "still backing off: {waits:?}");
    }

    /// Errors as reqwest gives them: nothing listening, a connection that
    /// closes without an answer; and answers that are not a success.
    #[tokio::test]
    async fn only_failures_that_cost_the_receiver_nothing_get_the_short_ceiling() {
        use tokio::io::AsyncReadExt;
        let http = crate::http::client::http_client(Duration::from_secs(5));
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let nobody = closed.local_addr().unwrap();
        drop(closed);
        let error = DeliveryError::from(http.get(format!("http://{nobody}/")).send().await.unwrap_err());
        assert!(matches!(error, DeliveryError::NoConnection(_)), "{error:?}");
        assert_eq!(error.longest_wait(), MAX_BACKOFF_QUICK);

        let hangs_up = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = hangs_up.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut socket, _) = hangs_up.accept().await.unwrap();
            let _ = socket.read(&mut [0; 1024]).await;
        });
        let error = DeliveryError::from(http.get(format!("http://{address}/")).send().await.unwrap_err());
        assert!(matches!(error, DeliveryError::Unreachable(_)), "{error:?}");
        assert_eq!(error.longest_wait(), MAX_BACKOFF);
        let status = |status| DeliveryError::Status { status, body: String::new(), refused: false };
        assert_eq!(status(503).longest_wait(), MAX_BACKOFF_QUICK, "a quick 5xx");
        assert_eq!(status(404).longest_wait(), MAX_BACKOFF, "misdirected");
        assert_eq!(status(403).longest_wait(), MAX_BACKOFF, "misdirected");
    }

    /// Always finds more to do, counting its passes.
    struct Backlog(Arc<Mutex<u32>>);

    impl Worker for Backlog {
        type Error = String;

        async fn pass(&mut self) -> Result<Pass, String> {
            *self.0.lock().unwrap() += 1;
            tokio::task::yield_now().await;
            Ok(Pass::Worked)
        }

        async fn idle(&mut self) {}

        fn failed(&mut self, error: &String, _: u32) {
            panic!("a backlog does not fail: {error}");
        }
    }

    #[tokio::test]
    async fn a_backlog_does_not_hold_up_a_stopping_worker() {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let shutdown = Shutdown::new(async move {
            let _ = stopped.await;
        });
        let passes = Arc::new(Mutex::new(0));
        let task = tokio::spawn(run(Backlog(passes.clone()), shutdown));
        while *passes.lock().unwrap() < 3 {
            tokio::task::yield_now().await;
        }
        stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(10), task).await.expect("the worker stops with work left").unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_ends_the_backoff() {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let shutdown = Shutdown::new(async move {
            let _ = stopped.await;
        });
        let passes = Arc::new(Mutex::new(Vec::new()));
        let worker = Flaky { failures: u32::MAX, longest: MAX_BACKOFF, passes: passes.clone(), attempts: Vec::new() };
        let task = tokio::spawn(run(worker, shutdown));
        while passes.lock().unwrap().len() < 3 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        stop.send(()).unwrap();
        task.await.unwrap();
        let after = passes.lock().unwrap().len();
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(passes.lock().unwrap().len(), after, "no pass after shutdown");
    }
}
