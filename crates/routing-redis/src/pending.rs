//! Mark updates that did not reach Redis in time, kept (max-merged per key) until a background
//! retry lands them or their TTL passes. Lookups in this process include them meanwhile.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;

use parking_lot::Mutex;

/// At most this many users' updates wait for a retry (about 200 bytes each).
pub(crate) const MAX_PENDING: usize = 100_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PendingMark {
    pub(crate) epoch_key: String,
    pub(crate) lsn: u64,
    pub(crate) expires: Instant,
}

#[derive(Debug, Default)]
pub(crate) struct Pending {
    map: Mutex<HashMap<String, PendingMark>>,
    len: AtomicUsize,
    /// A flusher task is running.
    pub(crate) flushing: AtomicBool,
}

/// What `Pending::add` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Added {
    Kept,
    /// The table is full: the update is dropped.
    Full,
}

impl Pending {
    pub(crate) fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    /// Records (max-merges) an update for `mark_key`.
    pub(crate) fn add(&self, mark_key: &str, epoch_key: &str, lsn: u64, expires: Instant) -> Added {
        let mut map = self.map.lock();
        if let Some(p) = map.get_mut(mark_key) {
            if p.expires <= Instant::now() {
                p.lsn = lsn;
            } else {
                p.lsn = p.lsn.max(lsn);
            }
            p.expires = p.expires.max(expires);
            return Added::Kept;
        }
        if map.len() >= MAX_PENDING {
            let now = Instant::now();
            map.retain(|_, p| p.expires > now);
            if map.len() >= MAX_PENDING {
                self.len.store(map.len(), Ordering::Relaxed);
                return Added::Full;
            }
        }
        map.insert(
            mark_key.to_owned(),
            PendingMark {
                epoch_key: epoch_key.to_owned(),
                lsn,
                expires,
            },
        );
        self.len.store(map.len(), Ordering::Relaxed);
        Added::Kept
    }

    /// The pending update for `mark_key`, if any and not expired.
    pub(crate) fn get(&self, mark_key: &str, now: Instant) -> Option<PendingMark> {
        if self.len() == 0 {
            return None;
        }
        self.map
            .lock()
            .get(mark_key)
            .filter(|p| p.expires > now)
            .cloned()
    }

    /// Forgets the update for `mark_key` if Redis now holds at least `landed`.
    pub(crate) fn landed(&self, mark_key: &str, landed: u64) {
        if self.len() == 0 {
            return;
        }
        let mut map = self.map.lock();
        if map.get(mark_key).is_some_and(|p| p.lsn <= landed) {
            map.remove(mark_key);
            self.len.store(map.len(), Ordering::Relaxed);
        }
    }

    /// Drops expired updates and returns up to `max` of the others, oldest deadline first.
    /// Also returns how many expired.
    pub(crate) fn due(&self, max: usize, now: Instant) -> (Vec<(String, PendingMark)>, usize) {
        let mut map = self.map.lock();
        let before = map.len();
        map.retain(|_, p| p.expires > now);
        let expired = before - map.len();
        self.len.store(map.len(), Ordering::Relaxed);
        let mut due: Vec<(String, PendingMark)> =
            map.iter().map(|(k, p)| (k.clone(), p.clone())).collect();
        due.sort_by_key(|(_, p)| p.expires);
        due.truncate(max);
        (due, expired)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn merges_by_max_lands_and_expires() {
        let p = Pending::default();
        let now = Instant::now();
        let later = now + Duration::from_secs(10);
        assert_eq!(p.add("k", "e", 5, later), Added::Kept);
        assert_eq!(p.add("k", "e", 3, later), Added::Kept);
        assert_eq!(p.get("k", now).map(|m| m.lsn), Some(5));
        p.landed("k", 4);
        assert_eq!(
            p.get("k", now).map(|m| m.lsn),
            Some(5),
            "a lower landing keeps it"
        );
        p.landed("k", 5);
        assert_eq!(p.get("k", now), None);
        assert_eq!(p.len(), 0);
        p.add("gone", "e", 1, now);
        let (due, expired) = p.due(10, now + Duration::from_millis(1));
        assert!(due.is_empty());
        assert_eq!(expired, 1);
    }
}
