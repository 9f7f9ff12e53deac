//! Which posts exist, in memory, and the requests waiting for one to appear.
//!
//! A comment may arrive a moment before its post's `PostCreated` does, so a
//! `POST` for an unknown post waits briefly. The wait must stay cheap: the
//! check is a set lookup (no database, no blocking pool), a `PostCreated`
//! releases only the requests waiting for that post, and the number of waiting
//! requests is capped, so a flood of comments on made-up ids cannot pile up.
//!
//! The set holds every post id, the same data as the `post` table (loaded
//! from it at start, kept current by the consumer after each commit): about
//! 100 bytes per post, so memory grows with the posts the blog has, never
//! with what strangers send.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use tokio::{sync::oneshot, time::Instant};

/// Why a wait ended without the post.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitError {
    /// The post did not appear in time.
    Unknown,
    /// Too many requests are waiting already.
    Busy,
}

#[derive(Debug, Default)]
struct State {
    ids: HashSet<String>,
    waiters: HashMap<String, Vec<oneshot::Sender<()>>>,
    waiting: usize,
}

/// Cheap to clone; every clone sees the same set.
#[derive(Debug, Clone)]
pub struct KnownPosts {
    state: Arc<Mutex<State>>,
    max_waiters: usize,
}

impl KnownPosts {
    pub fn new(ids: impl IntoIterator<Item = String>, max_waiters: usize) -> Self {
        let state = State { ids: ids.into_iter().collect(), ..State::default() };
        Self { state: Arc::new(Mutex::new(state)), max_waiters }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn contains(&self, id: &str) -> bool {
        self.lock().ids.contains(id)
    }

    /// Records a committed post and releases the requests waiting for it.
    pub fn insert(&self, id: &str) {
        let mut state = self.lock();
        state.ids.insert(id.to_owned());
        if let Some(waiters) = state.waiters.remove(id) {
            state.waiting -= waiters.len();
            for waiter in waiters {
                let _ = waiter.send(());
            }
        }
    }

    /// Requests waiting right now.
    pub fn waiting(&self) -> usize {
        self.lock().waiting
    }

    /// Returns once `id` is known, or after `within`.
    pub async fn wait_for(&self, id: &str, within: Duration) -> Result<(), WaitError> {
        let Some(mut waiter) = self.waiter(id)? else { return Ok(()) };
        if waiter.until(Instant::now() + within).await { Ok(()) } else { Err(WaitError::Unknown) }
    }

    /// Takes a place among the waiting requests for `id`: `None` when the
    /// post is known already, [`WaitError::Busy`] when every place is taken.
    pub fn waiter<'a>(&'a self, id: &'a str) -> Result<Option<Waiter<'a>>, WaitError> {
        let mut state = self.lock();
        if state.ids.contains(id) {
            return Ok(None);
        }
        if state.waiting >= self.max_waiters {
            return Err(WaitError::Busy);
        }
        let (sender, receiver) = oneshot::channel();
        state.waiters.entry(id.to_owned()).or_default().push(sender);
        state.waiting += 1;
        Ok(Some(Waiter { known: self, id, receiver: Some(receiver) }))
    }
}

/// One request's place among the waiting; leaving (with its post, late, or
/// cancelled with its request) gives the place back.
#[derive(Debug)]
pub struct Waiter<'a> {
    known: &'a KnownPosts,
    id: &'a str,
    /// `None` once the wait has ended.
    receiver: Option<oneshot::Receiver<()>>,
}

impl Waiter<'_> {
    /// Waits until the post is known or `deadline`; says whether it is known.
    pub async fn until(&mut self, deadline: Instant) -> bool {
        if let Some(receiver) = self.receiver.as_mut() {
            match tokio::time::timeout_at(deadline, receiver).await {
                Err(_elapsed) => return false,
                Ok(_) => self.receiver = None,
            }
        }
        self.known.contains(self.id)
    }
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        // Closed first, so the sender below is recognisably ours.
        drop(self.receiver.take());
        let mut state = self.known.lock();
        let Some(waiters) = state.waiters.get_mut(self.id) else { return };
        let before = waiters.len();
        waiters.retain(|waiter| !waiter.is_closed());
        let removed = before - waiters.len();
        if waiters.is_empty() {
            state.waiters.remove(self.id);
        }
        state.waiting -= removed;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_post_releases_only_its_own_waiters_and_unknown_ones_time_out() {
        let known = KnownPosts::new(["old".to_owned()], 10);
        assert_eq!(known.wait_for("old", Duration::from_secs(60)).await, Ok(()));
        let waiting = {
            let known = known.clone();
            tokio::spawn(async move { known.wait_for("new", Duration::from_secs(60)).await })
        };
        let other = {
            let known = known.clone();
            tokio::spawn(async move { known.wait_for("other", Duration::from_secs(60)).await })
        };
        while known.waiting() < 2 {
            tokio::task::yield_now().await;
        }
        known.insert("unrelated");
        assert_eq!(known.waiting(), 2, "another post releases no one");
        known.insert("new");
        assert_eq!(waiting.await.unwrap(), Ok(()));
        assert_eq!(known.waiting(), 1);
        assert_eq!(other.await.unwrap(), Err(WaitError::Unknown));
        assert_eq!(known.waiting(), 0, "a wait that timed out is off the list");
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_beyond_the_cap_are_refused_and_places_come_back() {
        let known = KnownPosts::new([], 2);
        let waits: Vec<_> = (0..2)
            .map(|n| {
                let known = known.clone();
                tokio::spawn(async move { known.wait_for(&format!("p{n}"), Duration::from_secs(60)).await })
            })
            .collect();
        while known.waiting() < 2 {
            tokio::task::yield_now().await;
        }
        assert_eq!(known.wait_for("p9", Duration::from_secs(60)).await, Err(WaitError::Busy));
        for wait in &waits {
            wait.abort();
        }
        for wait in waits {
            let _ = wait.await;
        }
        assert_eq!(known.waiting(), 0, "a cancelled request gives its place back");
        known.insert("p9");
        assert_eq!(known.wait_for("p9", Duration::from_secs(60)).await, Ok(()));
    }
}
