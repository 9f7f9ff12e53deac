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
};

use tokio::{sync::oneshot, time::Instant};

/// Too many requests are waiting already.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Busy;

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

    /// Takes a place among the waiting requests for `id`: `None` when the
    /// post is known already, [`Busy`] when every place is taken. The place
    /// is held until the [`Waiter`] is dropped, however many times it waits.
    pub fn waiter<'a>(&'a self, id: &'a str) -> Result<Option<Waiter<'a>>, Busy> {
        let mut state = self.lock();
        if state.ids.contains(id) {
            return Ok(None);
        }
        if state.waiting >= self.max_waiters {
            return Err(Busy);
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
    use std::time::Duration;

    use super::*;

    /// Whether `id` becomes known within a minute (paused clock).
    async fn known_within_a_minute(known: &KnownPosts, id: &str) -> Result<bool, Busy> {
        match known.waiter(id)? {
            None => Ok(true),
            Some(mut waiter) => Ok(waiter.until(Instant::now() + Duration::from_secs(60)).await),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_post_releases_only_its_own_waiters_and_unknown_ones_time_out() {
        let known = KnownPosts::new(["old".to_owned()], 10);
        assert_eq!(known_within_a_minute(&known, "old").await, Ok(true));
        let waiting = {
            let known = known.clone();
            tokio::spawn(async move { known_within_a_minute(&known, "new").await })
        };
        let other = {
            let known = known.clone();
            tokio::spawn(async move { known_within_a_minute(&known, "other").await })
        };
        while known.waiting() < 2 {
            tokio::task::yield_now().await;
        }
        known.insert("unrelated");
        assert_eq!(known.waiting(), 2, "another post releases no one");
        known.insert("new");
        assert_eq!(waiting.await.unwrap(), Ok(true));
        assert_eq!(known.waiting(), 1);
        assert_eq!(other.await.unwrap(), Ok(false));
        assert_eq!(known.waiting(), 0, "a wait that timed out is off the list");
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_beyond_the_cap_are_refused_and_places_come_back() {
        let known = KnownPosts::new([], 2);
        let waits: Vec<_> = (0..2)
            .map(|n| {
                let known = known.clone();
                tokio::spawn(async move { known_within_a_minute(&known, &format!("p{n}")).await })
            })
            .collect();
        while known.waiting() < 2 {
            tokio::task::yield_now().await;
        }
        assert_eq!(known_within_a_minute(&known, "p9").await, Err(Busy));
        for wait in &waits {
            wait.abort();
        }
        for wait in waits {
            let _ = wait.await;
        }
        assert_eq!(known.waiting(), 0, "a cancelled request gives its place back");
        known.insert("p9");
        assert_eq!(known_within_a_minute(&known, "p9").await, Ok(true));
    }

    /// A request that waits in several steps (asking the bus in between)
    /// keeps its place the whole time, and the post still reaches it.
    #[tokio::test(start_paused = true)]
    async fn a_waiter_keeps_its_place_between_waits_until_dropped() {
        let known = KnownPosts::new([], 1);
        let mut waiter = known.waiter("p1").unwrap().unwrap();
        assert!(!waiter.until(Instant::now() + Duration::from_millis(250)).await);
        assert_eq!(known.waiting(), 1);
        assert!(matches!(known.waiter("p2"), Err(Busy)), "its place is still taken");
        known.insert("p1");
        assert!(waiter.until(Instant::now() + Duration::from_secs(60)).await);
        assert!(waiter.until(Instant::now()).await, "known stays known");
        assert_eq!(known.waiting(), 0);
        drop(waiter);
        assert_eq!(known.waiting(), 0);
        assert!(known.waiter("p2").unwrap().is_some());
    }
}
