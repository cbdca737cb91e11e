//! Counters a `RedisMarks` keeps (the router keeps its own: `marks_errors`,
//! `mark_update_failures`).

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident,)*) => {
        #[derive(Debug, Default)]
        pub(crate) struct Counters { $(pub(crate) $name: AtomicU64,)* }

        /// A copy of a [`crate::RedisMarks`]'s counters (shared by its clones).
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
        #[non_exhaustive]
        pub struct RedisMarksStats { $($(#[$doc])* pub $name: u64,)* }

        impl Counters {
            pub(crate) fn read(&self) -> RedisMarksStats {
                RedisMarksStats { $($name: self.$name.load(Ordering::Relaxed),)* }
            }
        }
    };
}

counters! {
    /// Mark lookups attempted.
    gets,
    /// Mark updates attempted.
    sets,
    /// Operations that failed with an error from Redis or the connection (not timeouts), and
    /// malformed values.
    errors,
    /// Operations that did not finish within the configured timeout.
    timeouts,
    /// Lookups answered "unknown" (an error) because the user had no mark while the store's data
    /// was younger than the restart window: see [`crate::RestartPolicy`].
    unknown_after_data_loss,
    /// Times this process found the store without its epoch key and started a new epoch (first
    /// use of a Redis, or a Redis that lost its data).
    epochs_started,
    /// Times the connection was replaced because every operation kept timing out.
    reconnects_forced,
    /// Mark updates that failed on the request path and were landed later by the background
    /// retry.
    updates_retried,
    /// Mark updates that failed and never landed: their TTL passed first (Redis stayed
    /// unavailable), or too many were waiting.
    updates_dropped,
}

pub(crate) fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}
