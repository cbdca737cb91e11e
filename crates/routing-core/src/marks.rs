//! Recent-writer marks: "user U last committed at LSN X", kept for a TTL.

use std::collections::HashMap;
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
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
/// an `Arc<dyn WriterMarks>`.
pub trait WriterMarks: Send + Sync + 'static {
    /// The user's mark, if any and not expired.
    fn get<'a>(&'a self, user: &'a UserKey) -> BoxFuture<'a, Result<Option<Mark>, MarksError>>;

    /// Raises the user's mark to at least `lsn` (never lowers it, even under concurrent writers)
    /// and restarts its TTL.
    fn set_max<'a>(
        &'a self,
        user: &'a UserKey,
        lsn: Lsn,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), MarksError>>;
}

const SHARDS: usize = 64;

/// Bounded in-process marks. Expired marks are evicted as shards are touched; when a shard is
/// full of live marks, the oldest is evicted *safely*: its LSN raises the shard's floor, and users
/// without a mark in that shard are treated as marked at the floor until it expires. Memory stays
/// flat under any number of distinct users, and no user is ever served data older than their write.
#[derive(Debug)]
pub struct InMemoryMarks {
    shards: Vec<Mutex<Shard>>,
    per_shard: usize,
}

#[derive(Debug, Default)]
struct Shard {
    marks: HashMap<UserKey, (Lsn, Instant)>,
    floor: Option<(Lsn, Instant)>,
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

    /// Marks currently held (for tests and metrics).
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().marks.len()).sum()
    }

    /// No marks held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn shard(&self, user: &UserKey) -> &Mutex<Shard> {
        let mut h = DefaultHasher::new();
        user.hash(&mut h);
        &self.shards[(h.finish() as usize) % SHARDS]
    }

    /// Synchronous lookup (the trait wraps it).
    pub fn get_now(&self, user: &UserKey, now: Instant) -> Option<Mark> {
        let shard = self.shard(user).lock();
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
        let expires = now + ttl;
        if let Some(entry) = shard.marks.get_mut(user) {
            if entry.1 <= now {
                *entry = (lsn, expires);
            } else {
                *entry = (entry.0.max(lsn), expires);
            }
            return;
        }
        if shard.marks.len() >= self.per_shard {
            shard.marks.retain(|_, (_, exp)| *exp > now);
        }
        if shard.marks.len() >= self.per_shard {
            let oldest = shard
                .marks
                .iter()
                .min_by_key(|(_, (_, exp))| *exp)
                .map(|(k, v)| (k.clone(), *v));
            if let Some((key, (l, exp))) = oldest {
                shard.marks.remove(&key);
                let floor = match shard.floor.filter(|(_, e)| *e > now) {
                    Some((fl, fe)) => (fl.max(l), fe.max(exp)),
                    None => (l, exp),
                };
                shard.floor = Some(floor);
            }
        }
        shard.marks.insert(user.clone(), (lsn, expires));
    }
}

impl WriterMarks for InMemoryMarks {
    fn get<'a>(&'a self, user: &'a UserKey) -> BoxFuture<'a, Result<Option<Mark>, MarksError>> {
        let r = self.get_now(user, Instant::now());
        Box::pin(async move { Ok(r) })
    }

    fn set_max<'a>(
        &'a self,
        user: &'a UserKey,
        lsn: Lsn,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), MarksError>> {
        self.set_max_now(user, lsn, ttl, Instant::now());
        Box::pin(async move { Ok(()) })
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
}
