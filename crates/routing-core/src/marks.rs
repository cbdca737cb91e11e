//! Recent-writer marks: "user U last committed at LSN X", kept for a TTL.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::{Lsn, UserKey};

/// A user's mark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mark {
    /// The user's newest commit LSN.
    pub lsn: Lsn,
    /// Time left before the mark expires.
    pub expires_in: Duration,
}

/// The marks store could not answer.
#[derive(Debug, thiserror::Error)]
#[error("writer marks store unavailable: {message}")]
pub struct MarksError {
    /// What happened (no secrets).
    pub message: String,
    /// The store's error.
    #[source]
    pub source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

impl MarksError {
    /// An error with a message.
    pub fn new(message: impl Into<String>) -> Self {
        MarksError {
            message: message.into(),
            source: None,
        }
    }
}

/// Where marks live: in memory for one process, in Redis for many. Object safe, so a router holds
/// an `Arc<dyn WriterMarks>`; written with [`async_trait`](crate::async_trait), so an
/// implementation is ordinary async code:
///
/// ```
/// use std::time::Duration;
/// use routing_core::{async_trait, InMemoryMarks, Lsn, Mark, MarksError, UserKey, WriterMarks};
///
/// /// Counts lookups, stores in memory.
/// #[derive(Default)]
/// struct Counted(InMemoryMarks, std::sync::atomic::AtomicU64);
///
/// #[async_trait]
/// impl WriterMarks for Counted {
///     async fn get(&self, user: &UserKey) -> Result<Option<Mark>, MarksError> {
///         self.1.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
///         self.0.get(user).await
///     }
///     async fn set_max(&self, user: &UserKey, lsn: Lsn, ttl: Duration) -> Result<(), MarksError> {
///         self.0.set_max(user, lsn, ttl).await
///     }
/// }
/// let _: std::sync::Arc<dyn WriterMarks> = std::sync::Arc::new(Counted::default());
/// ```
#[async_trait::async_trait]
pub trait WriterMarks: Send + Sync + 'static {
    /// The user's mark, if any and not expired.
    async fn get(&self, user: &UserKey) -> Result<Option<Mark>, MarksError>;

    /// Raises the user's mark to at least `lsn` (never lowers it, even under concurrent writers)
    /// and restarts its TTL.
    async fn set_max(&self, user: &UserKey, lsn: Lsn, ttl: Duration) -> Result<(), MarksError>;
}

const SHARDS: usize = 64;
/// Most queue steps one call spends dropping expired marks: enough to keep up with any insert
/// rate (marks expire no faster than they are written), small enough that no call scans a shard.
const SWEEP_BUDGET: usize = 64;
/// A shard's tables are shrunk when their capacity exceeds this many times their length (plus
/// [`SHRINK_SLACK`]); the gap between this factor and the 2x shrink target keeps shrinking
/// amortized O(1) instead of rehashing on every removal.
const SHRINK_FACTOR: usize = 8;
/// Capacity below which a shard is never shrunk (not worth a rehash).
const SHRINK_SLACK: usize = 64;

/// Bounded in-process marks. Memory follows the live set and no call scans a shard:
///
/// - each shard keeps its marks in a hash map plus a FIFO queue of the keys in write order (one
///   queue entry per held mark); every call drops a bounded number of expired marks from the
///   queue's front, and shrinks the shard's tables once they are far larger than its contents;
/// - when a shard is full of live marks, the mark at the queue's front (the oldest write, which
///   with one TTL for every mark is also the first to expire) is evicted *safely*: its LSN raises
///   the shard's floor, and users without a mark in that shard are treated as marked at the floor
///   until it expires. No user is ever served data older than their write.
///
/// A mark refreshed after it was queued keeps its queue slot; when it reaches the front it is moved
/// to the back (each refresh pays for at most one such move). With mixed TTLs a short-lived mark
/// queued behind a longer-lived one is dropped when it reaches the front: it is never served after
/// it expires, it only holds its slot until then.
#[derive(Debug)]
pub struct InMemoryMarks {
    shards: Vec<Mutex<Shard>>,
    per_shard: usize,
}

#[derive(Debug, Default)]
struct Shard {
    marks: HashMap<UserKey, (Lsn, Instant)>,
    /// Every key in `marks` exactly once, in the order it was queued, with the expiry it had then.
    /// A mark whose expiry in `marks` differs was refreshed since and is requeued, not dropped.
    queue: VecDeque<(Instant, UserKey)>,
    floor: Option<(Lsn, Instant)>,
    /// Queue steps taken, to test that no call scans the shard.
    #[cfg(test)]
    steps: usize,
}

/// What [`Shard::pop_front`] found at the front of the queue.
enum Front {
    /// Nothing queued.
    Empty,
    /// The front mark had expired: removed.
    Expired,
    /// The front mark was refreshed since it was queued: moved to the back with its new expiry.
    Requeued,
    /// The front mark is live and in place: left queued and held.
    Live,
}

impl Shard {
    /// Looks at the queue's front and drops or requeues it when it is stale. O(1).
    fn pop_front(&mut self, now: Instant) -> Front {
        let Some((queued, key)) = self.queue.front() else {
            return Front::Empty;
        };
        #[cfg(test)]
        {
            self.steps += 1;
        }
        let held = self.marks.get(key).map(|(_, exp)| *exp);
        match held {
            Some(exp) if exp <= now => {
                if let Some((_, key)) = self.queue.pop_front() {
                    self.marks.remove(&key);
                }
                Front::Expired
            }
            Some(exp) if exp != *queued => {
                if let Some((_, key)) = self.queue.pop_front() {
                    self.queue.push_back((exp, key));
                }
                Front::Requeued
            }
            Some(_) => Front::Live,
            // Unreachable while every held key is queued once; dropping the slot keeps it so.
            None => {
                self.queue.pop_front();
                Front::Expired
            }
        }
    }

    /// Drops up to [`SWEEP_BUDGET`] expired marks from the queue's front, then shrinks the tables
    /// if they are far larger than what is left.
    fn sweep(&mut self, now: Instant) {
        for _ in 0..SWEEP_BUDGET {
            match self.pop_front(now) {
                Front::Expired | Front::Requeued => {}
                Front::Empty | Front::Live => break,
            }
        }
        if self.floor.is_some_and(|(_, exp)| exp <= now) {
            self.floor = None;
        }
        self.shrink_if_sparse();
    }

    fn shrink_if_sparse(&mut self) {
        let len = self.marks.len();
        let target = len.saturating_mul(2);
        if self.marks.capacity() > len.saturating_mul(SHRINK_FACTOR) + SHRINK_SLACK {
            self.marks.shrink_to(target);
        }
        if self.queue.capacity() > self.queue.len().saturating_mul(SHRINK_FACTOR) + SHRINK_SLACK {
            self.queue.shrink_to(target);
        }
    }

    /// Frees one slot in a full shard: the first live mark in queue order is removed and its LSN
    /// raises the floor. O(1): at most [`SWEEP_BUDGET`] refreshed marks are requeued before the
    /// front is evicted whatever its state (evicting a live mark is always safe).
    fn evict_one(&mut self, now: Instant) {
        for _ in 0..SWEEP_BUDGET {
            match self.pop_front(now) {
                Front::Expired | Front::Empty => return,
                Front::Requeued => {}
                Front::Live => break,
            }
        }
        let Some((_, key)) = self.queue.pop_front() else {
            return;
        };
        if let Some((l, exp)) = self.marks.remove(&key) {
            let floor = match self.floor.filter(|(_, e)| *e > now) {
                Some((fl, fe)) => (fl.max(l), fe.max(exp)),
                None => (l, exp),
            };
            self.floor = Some(floor);
        }
    }
}

impl Default for InMemoryMarks {
    fn default() -> Self {
        Self::with_capacity(1_000_000)
    }
}

impl InMemoryMarks {
    /// Holds at most about `capacity` live marks.
    pub fn with_capacity(capacity: usize) -> Self {
        let per_shard = capacity.div_ceil(SHARDS).max(1);
        InMemoryMarks {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            per_shard,
        }
    }

    /// Marks currently held (for tests and metrics). Expired marks count until a call on their
    /// shard sweeps them.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().marks.len()).sum()
    }

    /// No marks held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Slots allocated across all shards (map plus queue capacities): the memory measure tests
    /// check against [`InMemoryMarks::len`].
    #[cfg(test)]
    pub(crate) fn allocated_slots(&self) -> usize {
        self.shards
            .iter()
            .map(|s| {
                let s = s.lock();
                s.marks.capacity() + s.queue.capacity()
            })
            .sum()
    }

    fn shard_index(user: &UserKey) -> usize {
        let mut h = DefaultHasher::new();
        user.hash(&mut h);
        (h.finish() as usize) % SHARDS
    }

    fn shard(&self, user: &UserKey) -> &Mutex<Shard> {
        &self.shards[Self::shard_index(user)]
    }

    /// Synchronous lookup (the trait wraps it).
    pub fn get_now(&self, user: &UserKey, now: Instant) -> Option<Mark> {
        let mut shard = self.shard(user).lock();
        shard.sweep(now);
        let own = shard.marks.get(user).copied().filter(|(_, exp)| *exp > now);
        let floor = shard.floor.filter(|(_, exp)| *exp > now);
        let best = match (own, floor) {
            (Some(a), Some(b)) => Some(if b.0 > a.0 { b } else { a }),
            (a, b) => a.or(b),
        }?;
        Some(Mark {
            lsn: best.0,
            expires_in: best.1.saturating_duration_since(now),
        })
    }

    /// Synchronous max-merge (the trait wraps it).
    pub fn set_max_now(&self, user: &UserKey, lsn: Lsn, ttl: Duration, now: Instant) {
        let mut shard = self.shard(user).lock();
        shard.sweep(now);
        let expires = now + ttl;
        if let Some(entry) = shard.marks.get_mut(user) {
            // Keeps its queue slot; the sweep requeues it when it reaches the front.
            if entry.1 <= now {
                *entry = (lsn, expires);
            } else {
                *entry = (entry.0.max(lsn), expires);
            }
            return;
        }
        if shard.marks.len() >= self.per_shard {
            shard.evict_one(now);
        }
        shard.marks.insert(user.clone(), (lsn, expires));
        shard.queue.push_back((expires, user.clone()));
    }
}

#[async_trait::async_trait]
impl WriterMarks for InMemoryMarks {
    async fn get(&self, user: &UserKey) -> Result<Option<Mark>, MarksError> {
        Ok(self.get_now(user, Instant::now()))
    }

    async fn set_max(&self, user: &UserKey, lsn: Lsn, ttl: Duration) -> Result<(), MarksError> {
        self.set_max_now(user, lsn, ttl, Instant::now());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn max_merges_and_expires() {
        let m = InMemoryMarks::default();
        let u = UserKey::from("alice");
        let t0 = Instant::now();
        m.set_max_now(&u, Lsn(50), Duration::from_secs(1), t0);
        m.set_max_now(&u, Lsn(40), Duration::from_secs(1), t0);
        assert_eq!(m.get_now(&u, t0).map(|x| x.lsn), Some(Lsn(50)));
        assert!(m.get_now(&u, t0 + Duration::from_secs(2)).is_none());
        assert!(m.get_now(&UserKey::from("bob"), t0).is_none());
    }

    #[test]
    fn concurrent_writers_never_move_a_mark_backwards() {
        let m = Arc::new(InMemoryMarks::default());
        let u = UserKey::from("carol");
        let handles: Vec<_> = (0..8)
            .map(|t| {
                let m = m.clone();
                let u = u.clone();
                std::thread::spawn(move || {
                    for i in 0..2000u64 {
                        let lsn = Lsn(i * 8 + t);
                        m.set_max_now(&u, lsn, Duration::from_secs(60), Instant::now());
                        let seen = m
                            .get_now(&u, Instant::now())
                            .map(|x| x.lsn)
                            .unwrap_or_default();
                        assert!(seen >= lsn, "mark {seen} below own write {lsn}");
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().expect("thread");
        }
        assert_eq!(
            m.get_now(&u, Instant::now()).map(|x| x.lsn),
            Some(Lsn(1999 * 8 + 7))
        );
    }

    #[test]
    fn memory_stays_bounded_under_a_million_users_and_eviction_is_safe() {
        let m = InMemoryMarks::with_capacity(1_000);
        let t0 = Instant::now();
        for i in 0..1_000_000u64 {
            m.set_max_now(&UserKey::from(i), Lsn(i), Duration::from_secs(60), t0);
        }
        assert!(m.len() <= 1_000 + SHARDS, "held {}", m.len());
        // An evicted user still sees a mark at least as new as their own write.
        let early = UserKey::from(3u64);
        assert!(m.get_now(&early, t0).is_some_and(|x| x.lsn >= Lsn(3)));
        // Expired marks go away entirely.
        let later = t0 + Duration::from_secs(120);
        m.set_max_now(
            &UserKey::from("late"),
            Lsn(1),
            Duration::from_secs(1),
            later,
        );
        assert!(m.get_now(&early, later).is_none());
    }

    /// Keys that land in shard `index`, in a stable order.
    fn keys_in_shard(index: usize, n: usize) -> Vec<UserKey> {
        (0u64..)
            .map(UserKey::from)
            .filter(|k| InMemoryMarks::shard_index(k) == index)
            .take(n)
            .collect()
    }

    #[test]
    fn memory_follows_the_live_set_after_a_million_users_expire() {
        let m = InMemoryMarks::default();
        let ttl = Duration::from_secs(30);
        let t0 = Instant::now();
        for i in 0..1_000_000u64 {
            m.set_max_now(&UserKey::from(i), Lsn(i), ttl, t0);
        }
        let held = m.len();
        let slots = m.allocated_slots();
        assert!(held > 950_000, "held {held}");
        assert!(slots >= held, "slots {slots} held {held}");

        // Everyone expires; ordinary traffic (reads of other users) sweeps the shards a bounded
        // number of marks per call, and the tables shrink with them.
        let later = t0 + Duration::from_secs(60);
        for i in 0..50_000u64 {
            assert!(m.get_now(&UserKey::from(i), later).is_none());
        }
        assert_eq!(m.len(), 0);
        let drained = m.allocated_slots();
        assert!(
            drained <= SHARDS * SHRINK_SLACK * 2,
            "still {drained} slots"
        );

        // A new, small live set: memory follows it, not the old peak.
        for i in 0..1_000u64 {
            m.set_max_now(&UserKey::from(format!("new-{i}")), Lsn(i), ttl, later);
        }
        assert_eq!(m.len(), 1_000);
        let small = m.allocated_slots();
        assert!(
            small * 100 < slots,
            "{small} slots for 1000 marks, peak {slots}"
        );
    }

    #[test]
    fn a_full_shard_evicts_the_oldest_write_without_scanning() {
        let m = InMemoryMarks::with_capacity(SHARDS * 4);
        assert_eq!(m.per_shard, 4);
        let keys = keys_in_shard(5, 1_000);
        let ttl = Duration::from_secs(60);
        let t0 = Instant::now();
        for (i, k) in keys[..4].iter().enumerate() {
            m.set_max_now(k, Lsn(10 * (i as u64 + 1)), ttl, t0);
        }
        let steps = |m: &InMemoryMarks| m.shards[5].lock().steps;

        // Full: the fifth write evicts the first one, whose LSN becomes the floor.
        m.set_max_now(&keys[4], Lsn(50), ttl, t0);
        assert_eq!(m.len(), 4);
        assert_eq!(m.get_now(&keys[0], t0).map(|x| x.lsn), Some(Lsn(10)));
        assert!(!m.shards[5].lock().marks.contains_key(&keys[0]));
        for (k, want) in keys[1..5].iter().zip([20, 30, 40, 50]) {
            assert_eq!(m.get_now(k, t0).map(|x| x.lsn), Some(Lsn(want)));
        }

        // A refreshed mark keeps its place in line: the next one is evicted instead.
        m.set_max_now(&keys[1], Lsn(21), ttl, t0 + Duration::from_secs(1));
        m.set_max_now(&keys[5], Lsn(60), ttl, t0 + Duration::from_secs(1));
        let shard = m.shards[5].lock();
        assert!(shard.marks.contains_key(&keys[1]));
        assert!(!shard.marks.contains_key(&keys[2]));
        assert_eq!(shard.floor.map(|f| f.0), Some(Lsn(30)));
        drop(shard);
        // The evicted user still sees at least their own write (through the floor).
        assert!(m.get_now(&keys[2], t0).is_some_and(|x| x.lsn >= Lsn(30)));

        // A thousand more inserts into the full shard: a constant number of queue steps each.
        let before = steps(&m);
        let t1 = t0 + Duration::from_secs(2);
        for (i, k) in keys[6..].iter().enumerate() {
            m.set_max_now(k, Lsn(100 + i as u64), ttl, t1);
        }
        let per_insert = (steps(&m) - before) as f64 / (keys.len() - 6) as f64;
        assert!(per_insert <= 3.0, "{per_insert} steps per insert");
        assert_eq!(m.shards[5].lock().marks.len(), 4);
        assert_eq!(m.shards[5].lock().queue.len(), 4);
        // Eviction never lowers anyone: the floor covers every evicted write.
        assert!(m.get_now(&keys[6], t1).is_some_and(|x| x.lsn >= Lsn(106)));
    }

    #[test]
    fn refreshed_marks_survive_the_sweep_and_expired_floors_clear() {
        let m = InMemoryMarks::with_capacity(SHARDS * 4);
        let keys = keys_in_shard(9, 5);
        let t0 = Instant::now();
        let short = Duration::from_secs(10);
        m.set_max_now(&keys[0], Lsn(1), short, t0);
        m.set_max_now(&keys[1], Lsn(2), short, t0);
        // keys[0] refreshed: its queued expiry is stale, so the sweep must requeue, not drop it.
        m.set_max_now(&keys[0], Lsn(3), short, t0 + Duration::from_secs(8));
        let t1 = t0 + Duration::from_secs(12);
        assert!(m.get_now(&keys[1], t1).is_none());
        assert_eq!(m.get_now(&keys[0], t1).map(|x| x.lsn), Some(Lsn(3)));
        assert_eq!(m.shards[9].lock().marks.len(), 1);
        // A mark written after expiry starts over (no max-merge with a dead mark).
        let t2 = t0 + Duration::from_secs(30);
        m.set_max_now(&keys[0], Lsn(2), short, t2);
        assert_eq!(m.get_now(&keys[0], t2).map(|x| x.lsn), Some(Lsn(2)));
        // Fill, evict, let the floor expire: it is cleared, not kept forever.
        for (i, k) in keys.iter().enumerate() {
            m.set_max_now(k, Lsn(100 + i as u64), short, t2);
        }
        assert!(m.shards[9].lock().floor.is_some());
        let t3 = t2 + Duration::from_secs(20);
        assert!(m.get_now(&keys[0], t3).is_none());
        assert!(m.shards[9].lock().floor.is_none());
        assert_eq!(m.shards[9].lock().marks.len(), 0);
    }
}
