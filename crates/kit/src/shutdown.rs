//! Graceful shutdown: one signal (SIGTERM or Ctrl-C) turned into a value
//! every task can wait for or sleep against, passed into `run` rather than
//! read from a global, so a test can stop a service it started.

use std::{future::Future, time::Duration};

use tokio::sync::watch;

/// Set by a supervisor (the local suite's launcher) to its own pid: a
/// service started with it stops, as on SIGTERM, once its parent is another
/// process, that is once the supervisor died without stopping it (`kill -9`,
/// a closed terminal). Otherwise it would run on unsupervised, holding its
/// port and its database, and answer for the next launch's processes.
pub const SUPERVISOR_ENV: &str = "BLOG_SUPERVISOR_PID";
/// How often a supervised service looks at its parent.
const SUPERVISOR_CHECK: Duration = Duration::from_secs(1);

/// Resolves once the supervisor named in [`SUPERVISOR_ENV`] is no longer
/// this process's parent; never without one.
async fn supervisor_gone() {
    #[cfg(unix)]
    if let Some(supervisor) = std::env::var(SUPERVISOR_ENV).ok().and_then(|pid| pid.parse::<u32>().ok()) {
        loop {
            let parent = std::os::unix::process::parent_id();
            if parent != supervisor {
                tracing::warn!(supervisor, parent, "the supervisor that started this process is gone; stopping");
                return;
            }
            tokio::time::sleep(SUPERVISOR_CHECK).await;
        }
    }
    std::future::pending::<()>().await;
}

/// Resolves on SIGTERM or Ctrl-C, or once this process's supervisor is gone
/// (see [`SUPERVISOR_ENV`]).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
        () = supervisor_gone() => {},
    }
    tracing::info!("shutdown requested; draining");
}

/// A shutdown that many tasks can wait for. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Shutdown(watch::Receiver<bool>);

impl Shutdown {
    /// Triggers when `signal` resolves.
    pub fn new(signal: impl Future<Output = ()> + Send + 'static) -> Self {
        let (tx, rx) = watch::channel(false);
        tokio::spawn(async move {
            signal.await;
            let _ = tx.send(true);
        });
        Self(rx)
    }

    pub async fn wait(&self) {
        let mut rx = self.0.clone();
        let _ = rx.wait_for(|stop| *stop).await;
    }

    /// Whether shutdown has been requested.
    pub fn requested(&self) -> bool {
        *self.0.borrow()
    }

    /// Sleeps for `duration`; returns true if shutdown came first.
    pub async fn sleep(&self, duration: Duration) -> bool {
        tokio::select! {
            () = tokio::time::sleep(duration) => false,
            () = self.wait() => true,
        }
    }
}
