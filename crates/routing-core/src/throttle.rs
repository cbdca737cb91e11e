//! At most one warning a second for failures that can hit every request (a down marks store
//! would otherwise log once per request).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

const EVERY: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub(crate) struct WarnThrottle {
    origin: Instant,
    next_nanos: AtomicU64,
    suppressed: AtomicU64,
    /// Nanoseconds after `origin` of the last occurrence, plus one (0: never).
    last_nanos: AtomicU64,
}

impl WarnThrottle {
    pub(crate) fn new() -> Self {
        WarnThrottle {
            origin: Instant::now(),
            next_nanos: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
            last_nanos: AtomicU64::new(0),
        }
    }

    /// `Some(n)` when this occurrence should be logged (`n` were suppressed since the last one).
    pub(crate) fn allow(&self) -> Option<u64> {
        let now = u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last_nanos
            .store(now.saturating_add(1), Ordering::Relaxed);
        let next = self.next_nanos.load(Ordering::Relaxed);
        let step = u64::try_from(EVERY.as_nanos()).unwrap_or(u64::MAX);
        if now >= next
            && self
                .next_nanos
                .compare_exchange(
                    next,
                    now.saturating_add(step),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Ordering::Relaxed));
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        None
    }
}

impl WarnThrottle {
    /// How long ago the last occurrence was (logged or not); `None` if there was none.
    pub(crate) fn since_last(&self) -> Option<Duration> {
        let last = self.last_nanos.load(Ordering::Relaxed).checked_sub(1)?;
        Some(
            self.origin
                .elapsed()
                .saturating_sub(Duration::from_nanos(last)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_the_first_and_counts_the_rest() {
        let t = WarnThrottle::new();
        assert_eq!(t.allow(), Some(0));
        for _ in 0..99 {
            assert_eq!(t.allow(), None);
        }
    }
}
