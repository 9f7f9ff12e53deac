//! The view query serves, kept in memory.
//!
//! SQLite stays the source of truth: at start the view is loaded from the
//! database, and afterwards every delivery changes it only once the
//! transaction that applied it has committed ([`View::commit`], called from
//! `Consumer::committed`), so a reader never sees what was rolled back and
//! sees each change as soon as its commit is done.
//!
//! Concurrent deliveries may call `committed` in another order than they
//! committed, so the memory side never depends on the call order: the
//! order key of each post and comment (the database's `ord`, which gives the
//! creation order) is noted while applying, inside the transaction
//! ([`View::note_post`], [`View::note_comment`]), and the effects follow
//! the same order-insensitive rules as the SQL upserts (a key only moves
//! down, so taking the keys in any order ends at the database's).
//!
//! `GET /posts` answers from a [`Snapshot`]: the whole view serialised once,
//! shared by every reader through an `Arc`, rebuilt by the first reader after
//! a change (others wait for it instead of building their own), and
//! compressed at most once per snapshot. However many readers there are, one
//! buffer per version is alive.

use std::{
    collections::{BTreeMap, HashMap},
    io::Write,
    sync::{
        Arc, Mutex, MutexGuard, OnceLock, RwLock,
        atomic::{AtomicU64, Ordering},
    },
};

use blog_domain::{CommentData, CommentStatus, DomainEvent, PostCreated};
use blog_kit::{
    StoreError, Tx,
    metrics::{Counter, Registry},
};
use bytes::Bytes;
use serde::{Serialize, Serializer, ser::SerializeMap, ser::SerializeSeq};

/// Most posts one page holds.
pub const MAX_PAGE: usize = 100;

#[derive(Debug, Serialize)]
struct CommentEntry {
    id: String,
    content: String,
    status: CommentStatus,
}

#[derive(Debug)]
struct PostEntry {
    id: String,
    title: String,
}

/// What the database holds, in memory, keyed by the database's order keys
/// (`ord`: the bus sequence number of the creating event, see
/// [`crate::order_key`]).
#[derive(Debug, Default)]
struct Projection {
    /// Posts by `ord`: iteration is creation order.
    posts: BTreeMap<i64, PostEntry>,
    post_at: HashMap<String, i64>,
    /// Comments by post id (the post may not have arrived yet), then `ord`.
    comments: HashMap<String, BTreeMap<i64, CommentEntry>>,
    comment_at: HashMap<String, (String, i64)>,
    /// Bumped by every change; names the snapshot built from it.
    version: u64,
}

impl Projection {
    fn load(tx: &Tx<'_>) -> Result<Self, StoreError> {
        let mut projection = Projection::default();
        tx.for_each("SELECT ord, id, title FROM post ORDER BY ord", &[], |row| {
            projection.add_post(row.get(0)?, row.get(1)?, row.get(2)?);
            Ok(())
        })?;
        tx.for_each("SELECT ord, post_id, id, content, status FROM comment ORDER BY ord", &[], |row| {
            let entry = CommentEntry { id: row.get(2)?, content: row.get(3)?, status: row.parse(4)? };
            projection.add_comment(row.get(0)?, row.get(1)?, entry);
            Ok(())
        })?;
        Ok(projection)
    }

    fn add_post(&mut self, ord: i64, id: String, title: String) {
        self.post_at.insert(id.clone(), ord);
        self.posts.insert(ord, PostEntry { id, title });
    }

    fn add_comment(&mut self, ord: i64, post_id: String, comment: CommentEntry) {
        self.comment_at.insert(comment.id.clone(), (post_id.clone(), ord));
        self.comments.entry(post_id).or_default().insert(ord, comment);
    }

    /// The same rule as the SQL upsert: a post is inserted once, and a key
    /// only ever moves down (an earlier creating event was seen late).
    fn post_created(&mut self, post: &PostCreated, ord: Option<i64>) -> bool {
        let Some(ord) = ord else { return false };
        match self.post_at.get(&post.id).copied() {
            None => {
                self.add_post(ord, post.id.clone(), post.title.clone());
                true
            }
            Some(current) if ord < current => match self.posts.remove(&current) {
                Some(entry) => {
                    self.add_post(ord, entry.id, entry.title);
                    true
                }
                None => false,
            },
            Some(_) => false,
        }
    }

    /// The same rule as the SQL upsert: a comment is inserted once; only an
    /// update that is not `pending` replaces its status and content; its key
    /// only ever moves down.
    fn comment(&mut self, comment: &CommentData, is_update: bool, ord: Option<i64>) -> bool {
        let Some((post_id, current)) = self.comment_at.get(&comment.id).cloned() else {
            let Some(ord) = ord else { return false };
            let entry = CommentEntry { id: comment.id.clone(), content: comment.content.clone(), status: comment.status };
            self.add_comment(ord, comment.post_id.clone(), entry);
            return true;
        };
        let Some(by_ord) = self.comments.get_mut(&post_id) else { return false };
        let mut changed = false;
        if is_update
            && comment.status != CommentStatus::Pending
            && let Some(entry) = by_ord.get_mut(&current)
        {
            entry.status = comment.status;
            entry.content.clone_from(&comment.content);
            changed = true;
        }
        if let Some(ord) = ord.filter(|ord| *ord < current)
            && let Some(entry) = by_ord.remove(&current)
        {
            self.add_comment(ord, post_id, entry);
            changed = true;
        }
        changed
    }

    fn post_out<'a>(&'a self, post: &'a PostEntry) -> PostOut<'a> {
        PostOut { id: &post.id, title: &post.title, comments: CommentsOut(self.comments.get(&post.id)) }
    }
}

#[derive(Serialize)]
struct PostOut<'a> {
    id: &'a str,
    title: &'a str,
    comments: CommentsOut<'a>,
}

struct CommentsOut<'a>(Option<&'a BTreeMap<i64, CommentEntry>>);

impl Serialize for CommentsOut<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut seq = serializer.serialize_seq(Some(self.0.map_or(0, BTreeMap::len)))?;
        for comment in self.0.into_iter().flat_map(BTreeMap::values) {
            seq.serialize_element(comment)?;
        }
        seq.end()
    }
}

/// The original's `GET /posts`: posts keyed by id, in creation order.
struct FullView<'a>(&'a Projection);

impl Serialize for FullView<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.posts.len()))?;
        for post in self.0.posts.values() {
            map.serialize_entry(&post.id, &self.0.post_out(post))?;
        }
        map.end()
    }
}

/// One page, newest first, and the cursor of the next (older) page.
#[derive(Serialize)]
struct PageOut<'a> {
    posts: Vec<PostOut<'a>>,
    next: Option<String>,
}

/// Order keys noted inside the applying transaction, taken once it committed.
#[derive(Debug, Default)]
struct Noted {
    posts: HashMap<String, i64>,
    comments: HashMap<String, i64>,
}

/// What a committed delivery changes in the view.
#[derive(Debug, Clone, Copy)]
pub enum Change<'a> {
    Post(&'a PostCreated),
    Comment { comment: &'a CommentData, is_update: bool },
}

/// The whole view serialised once, shared by every reader of its version.
#[derive(Debug)]
pub struct Snapshot {
    pub version: u64,
    /// Strong entity tag of the uncompressed representation (quoted).
    pub etag: String,
    /// Strong entity tag of the gzip representation (quoted).
    pub gzip_etag: String,
    pub json: Bytes,
    gzip: OnceLock<Bytes>,
}

impl Snapshot {
    /// The JSON gzipped, compressed by the first reader that asks.
    pub fn gzip(&self) -> Bytes {
        self.gzip.get_or_init(|| gzip(&self.json)).clone()
    }

    /// Whether `tag` (an entity tag from `If-None-Match`, `W/` allowed) names
    /// this version in the encoding that would be sent (gzipped or not): the
    /// other encoding's tag names other bytes, and a cache that holds those
    /// must not be told its copy of these is current (RFC 9110 §13.1.2).
    pub fn matches(&self, tag: &str, gzip: bool) -> bool {
        let tag = tag.trim();
        let tag = tag.strip_prefix("W/").unwrap_or(tag);
        tag == "*" || tag == if gzip { &self.gzip_etag } else { &self.etag }
    }
}

fn gzip(data: &[u8]) -> Bytes {
    let mut encoder = flate2::write::GzEncoder::new(Vec::with_capacity(data.len() / 4), flate2::Compression::new(3));
    // Writing to a Vec cannot fail.
    let _ = encoder.write_all(data);
    Bytes::from(encoder.finish().unwrap_or_default())
}

/// The in-memory view. Shared by the projector and the HTTP handlers.
#[derive(Debug)]
pub struct View {
    projection: Mutex<Projection>,
    noted: Mutex<Noted>,
    /// The projection's version, readable without its lock.
    version: AtomicU64,
    current: RwLock<Option<Arc<Snapshot>>>,
    /// One snapshot build at a time; the readers that wait reuse its result.
    building: tokio::sync::Mutex<()>,
    /// Tells this process's entity tags from another run's.
    epoch: u64,
    builds: Counter,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl View {
    /// Loads the view from the database.
    pub fn load(tx: &Tx<'_>, metrics: &Registry) -> Result<Self, StoreError> {
        Ok(Self::with(Projection::load(tx)?, metrics))
    }

    /// Replaces the view with the database's (another replica's changes may
    /// have been missed).
    pub fn reload(&self, tx: &Tx<'_>) -> Result<(), StoreError> {
        let mut fresh = Projection::load(tx)?;
        let mut projection = lock(&self.projection);
        fresh.version = projection.version + 1;
        *projection = fresh;
        self.version.store(projection.version, Ordering::Release);
        Ok(())
    }

    /// Reads back the rows another replica changed (`p <post id>` and
    /// `c <comment id>` lines) and applies them by the rules of a delivery,
    /// whose keys only move down and statuses never back to `pending`, so a
    /// row read before or after this replica's own commits ends the same.
    /// Returns the changes, as the live stream tells them.
    pub fn refresh_from(&self, tx: &Tx<'_>, items: &[String]) -> Result<Vec<DomainEvent>, StoreError> {
        let mut posts = Vec::new();
        let mut comments = Vec::new();
        for item in items {
            if let Some(id) = item.strip_prefix("p ") {
                let row = tx.query_one("SELECT ord, id, title FROM post WHERE id = $1", &[&id], |row| {
                    Ok((row.get::<i64>(0)?, PostCreated { id: row.get(1)?, title: row.get(2)? }))
                })?;
                posts.extend(row);
            } else if let Some(id) = item.strip_prefix("c ") {
                let row = tx.query_one("SELECT ord, id, content, post_id, status FROM comment WHERE id = $1", &[&id], |row| {
                    Ok((
                        row.get::<i64>(0)?,
                        CommentData { id: row.get(1)?, content: row.get(2)?, post_id: row.get(3)?, status: row.parse(4)? },
                    ))
                })?;
                comments.extend(row);
            }
        }
        posts.sort_by_key(|(ord, _)| *ord);
        comments.sort_by_key(|(ord, _)| *ord);
        let mut projection = lock(&self.projection);
        let mut changes = Vec::new();
        for (ord, post) in posts {
            if projection.post_created(&post, Some(ord)) {
                changes.push(DomainEvent::PostCreated(post));
            }
        }
        for (ord, comment) in comments {
            let known = projection.comment_at.contains_key(&comment.id);
            if projection.comment(&comment, true, Some(ord)) {
                changes.push(if known { DomainEvent::CommentUpdated(comment) } else { DomainEvent::CommentCreated(comment) });
            }
        }
        if !changes.is_empty() {
            projection.version += 1;
            self.version.store(projection.version, Ordering::Release);
        }
        Ok(changes)
    }

    fn with(projection: Projection, metrics: &Registry) -> Self {
        Self {
            projection: Mutex::new(projection),
            noted: Mutex::default(),
            version: AtomicU64::new(0),
            current: RwLock::new(None),
            building: tokio::sync::Mutex::new(()),
            epoch: uuid::Uuid::new_v4().as_u64_pair().0,
            builds: metrics.counter("blog_query_snapshot_builds_total", "Serialisations of the whole view (one per version read)."),
        }
    }

    /// Notes the order key the applying transaction left a post at.
    pub fn note_post(&self, id: &str, ord: i64) {
        lock(&self.noted).posts.insert(id.to_owned(), ord);
    }

    /// Notes the order key the applying transaction left a comment at.
    pub fn note_comment(&self, id: &str, ord: i64) {
        lock(&self.noted).comments.insert(id.to_owned(), ord);
    }

    /// Applies what a committed transaction changed; returns whether the view changed.
    pub fn commit<'a>(&self, changes: impl IntoIterator<Item = Change<'a>>) -> bool {
        let mut projection = lock(&self.projection);
        let mut changed = false;
        for change in changes {
            changed |= match change {
                // Taken whether needed or not, so nothing stays behind: a
                // key only moves down, so a missed or stale one is harmless.
                Change::Post(post) => {
                    let ord = lock(&self.noted).posts.remove(&post.id);
                    projection.post_created(post, ord)
                }
                Change::Comment { comment, is_update } => {
                    let ord = lock(&self.noted).comments.remove(&comment.id);
                    projection.comment(comment, is_update, ord)
                }
            };
        }
        if changed {
            projection.version += 1;
            self.version.store(projection.version, Ordering::Release);
        }
        changed
    }

    /// The current snapshot, built first if the view changed since the last.
    pub async fn snapshot(&self) -> Arc<Snapshot> {
        if let Some(current) = self.fresh() {
            return current;
        }
        let _building = self.building.lock().await;
        if let Some(current) = self.fresh() {
            return current;
        }
        let snapshot = {
            let projection = lock(&self.projection);
            let json = serde_json::to_vec(&FullView(&projection)).unwrap_or_default();
            let tag = format!("{:016x}-{}", self.epoch, projection.version);
            Arc::new(Snapshot {
                version: projection.version,
                etag: format!("\"{tag}\""),
                gzip_etag: format!("\"{tag}-gzip\""),
                json: Bytes::from(json),
                gzip: OnceLock::new(),
            })
        };
        self.builds.inc();
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Some(snapshot.clone());
        snapshot
    }

    fn fresh(&self) -> Option<Arc<Snapshot>> {
        let current = self.current.read().unwrap_or_else(|p| p.into_inner()).clone()?;
        (current.version == self.version.load(Ordering::Acquire)).then_some(current)
    }

    /// Up to `limit` posts created before the post at cursor `before` (all
    /// when `None`), newest first, as `{"posts":[...],"next":...}`.
    pub fn page(&self, limit: usize, before: Option<i64>) -> Vec<u8> {
        let projection = lock(&self.projection);
        let mut older = projection.posts.range(..before.unwrap_or(i64::MAX)).rev();
        let taken: Vec<(&i64, &PostEntry)> = older.by_ref().take(limit.min(MAX_PAGE)).collect();
        let next = match (older.next(), taken.last()) {
            (Some(_), Some((ord, _))) => Some(ord.to_string()),
            _ => None,
        };
        let page = PageOut { posts: taken.into_iter().map(|(_, post)| projection.post_out(post)).collect(), next };
        serde_json::to_vec(&page).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view() -> View {
        View::with(Projection::default(), &Registry::default())
    }

    fn post(id: &str) -> PostCreated {
        PostCreated { id: id.to_owned(), title: format!("title {id}") }
    }

    fn comment(id: &str, post_id: &str, status: CommentStatus) -> CommentData {
        CommentData { id: id.to_owned(), content: format!("text {id}"), post_id: post_id.to_owned(), status }
    }

    fn text(view: &View) -> String {
        String::from_utf8(serde_json::to_vec(&FullView(&lock(&view.projection))).unwrap()).unwrap()
    }

    #[test]
    fn commits_in_another_order_than_the_database_give_the_database_order() {
        let view = view();
        // The database applied a, then b, then c's approval, then c's creation.
        view.note_post("a", 1);
        view.note_post("b", 2);
        view.note_comment("c", 1);
        let (a, b) = (post("a"), post("b"));
        let approved = comment("c", "a", CommentStatus::Approved);
        let created = comment("c", "a", CommentStatus::Pending);
        // The calls after commit arrive in reverse.
        assert!(view.commit([Change::Comment { comment: &created, is_update: false }]));
        assert!(view.commit([Change::Comment { comment: &approved, is_update: true }]));
        assert!(!view.commit([Change::Comment { comment: &created, is_update: false }]), "a late creation changes nothing");
        // An update of a known comment notes its position again; the commit takes it.
        view.note_comment("c", 1);
        assert!(view.commit([Change::Comment { comment: &approved, is_update: true }]));
        view.commit([Change::Post(&b)]);
        view.commit([Change::Post(&a)]);
        assert_eq!(
            text(&view),
            r#"{"a":{"id":"a","title":"title a","comments":[{"id":"c","content":"text c","status":"approved"}]},"b":{"id":"b","title":"title b","comments":[]}}"#
        );
        let noted = lock(&view.noted);
        assert!(noted.posts.is_empty() && noted.comments.is_empty(), "noted positions are not kept: {noted:?}");
    }

    #[test]
    fn keys_only_move_down_whatever_order_the_commits_come_in() {
        // c's approval is seq 9, its creation seq 5; p's creation is seq 7
        // and a copy of it seq 3. Whatever the delivery order, the database
        // keeps the lowest key seen per item and returns it.
        let (p, q) = (post("p"), post("q"));
        let approved = comment("c", "p", CommentStatus::Approved);
        let created = comment("c", "p", CommentStatus::Pending);
        let d = comment("d", "p", CommentStatus::Pending);
        let expected = r#"{"p":{"id":"p","title":"title p","comments":[{"id":"c","content":"text c","status":"approved"},{"id":"d","content":"text d","status":"pending"}]},"q":{"id":"q","title":"title q","comments":[]}}"#;
        let log: Vec<(i64, Change<'_>)> = vec![
            (9, Change::Comment { comment: &approved, is_update: true }),
            (5, Change::Comment { comment: &created, is_update: false }),
            (7, Change::Post(&p)),
            (3, Change::Post(&p)),
        ];
        for (reversed, late_commits) in [(false, false), (true, false), (false, true), (true, true)] {
            let view = view();
            view.note_post("q", 4);
            view.commit([Change::Post(&q)]);
            view.note_comment("d", 6);
            view.commit([Change::Comment { comment: &d, is_update: false }]);
            let mut deliveries = log.clone();
            if reversed {
                deliveries.reverse();
            }
            let mut database: HashMap<String, i64> = HashMap::new();
            for (seq, change) in &deliveries {
                let id = match change {
                    Change::Post(post) => &post.id,
                    Change::Comment { comment, .. } => &comment.id,
                };
                let ord = *database.entry(id.clone()).and_modify(|ord| *ord = (*ord).min(*seq)).or_insert(*seq);
                match change {
                    Change::Post(_) => view.note_post(id, ord),
                    Change::Comment { .. } => view.note_comment(id, ord),
                }
                if !late_commits {
                    view.commit([*change]);
                }
            }
            if late_commits {
                // The calls after commit come in the other order.
                for (_, change) in deliveries.iter().rev() {
                    view.commit([*change]);
                }
            }
            let case = format!("reversed: {reversed}, late commits: {late_commits}");
            assert_eq!(text(&view), expected, "{case}");
            let projection = lock(&view.projection);
            assert_eq!((projection.post_at["p"], &projection.comment_at["c"]), (3, &("p".to_owned(), 5)), "{case}");
        }
    }

    #[test]
    fn pages_go_newest_first_and_end_with_no_cursor() {
        let view = view();
        let posts: Vec<_> = (1..=5).map(|i| post(&format!("p{i}"))).collect();
        for (i, p) in posts.iter().enumerate() {
            view.note_post(&p.id, i as i64 + 1);
        }
        view.commit(posts.iter().map(Change::Post));
        let page = |limit, before| serde_json::from_slice::<serde_json::Value>(&view.page(limit, before)).unwrap();
        let first = page(2, None);
        let ids =
            |v: &serde_json::Value| v["posts"].as_array().unwrap().iter().map(|p| p["id"].as_str().unwrap().to_owned()).collect::<Vec<_>>();
        assert_eq!((ids(&first), first["next"].clone()), (vec!["p5".to_owned(), "p4".to_owned()], serde_json::json!("4")));
        let second = page(2, Some(4));
        assert_eq!((ids(&second), second["next"].clone()), (vec!["p3".to_owned(), "p2".to_owned()], serde_json::json!("2")));
        let last = page(2, Some(2));
        assert_eq!((ids(&last), last["next"].clone()), (vec!["p1".to_owned()], serde_json::Value::Null));
        assert_eq!(ids(&page(1_000, None)).len(), 5);
    }

    #[tokio::test]
    async fn readers_share_one_snapshot_per_version() {
        let view = Arc::new(view());
        let p = post("p");
        view.note_post("p", 1);
        view.commit([Change::Post(&p)]);
        let readers: Vec<_> = (0..50)
            .map(|_| {
                let view = view.clone();
                tokio::spawn(async move { view.snapshot().await })
            })
            .collect();
        let mut snapshots = Vec::new();
        for reader in readers {
            snapshots.push(reader.await.unwrap());
        }
        assert!(snapshots.iter().all(|s| Arc::ptr_eq(s, &snapshots[0])), "every reader got the same buffer");
        assert_eq!(view.builds.get(), 1);
        let gzipped = snapshots[0].gzip();
        assert!(Arc::ptr_eq(&view.snapshot().await, &snapshots[0]));
        assert_eq!(snapshots[1].gzip().as_ptr(), gzipped.as_ptr(), "compressed once per snapshot");
        let mut json = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&gzipped[..]), &mut json).unwrap();
        assert_eq!(json, snapshots[0].json);

        let q = post("q");
        view.note_post("q", 2);
        view.commit([Change::Post(&q)]);
        let after = view.snapshot().await;
        assert_ne!(after.etag, snapshots[0].etag);
        assert!(after.json.ends_with(br#""q":{"id":"q","title":"title q","comments":[]}}"#));
        assert_eq!(view.builds.get(), 2);
    }
}
