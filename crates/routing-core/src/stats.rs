//! Counters a router keeps about its own decisions, for metrics and the consistency checker.

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident,)*) => {
        #[derive(Debug, Default)]
        pub(crate) struct Counters { $(pub(crate) $name: AtomicU64,)* }

        /// A copy of a router's counters.
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
        #[cfg_attr(feature = "serde", derive(serde::Serialize))]
        #[non_exhaustive]
        pub struct RouterStats { $($(#[$doc])* pub $name: u64,)* }

        impl Counters {
            pub(crate) fn read(&self) -> RouterStats {
                RouterStats { $($name: self.$name.load(Ordering::Relaxed),)* }
            }
        }
    };
}

counters! {
    /// Reads served by a replica.
    reads_replica,
    /// Reads served by the primary (read-only session), for any reason.
    reads_primary,
    /// Of those, reads that wanted a replica but had none eligible or caught up in time.
    reads_primary_fallback,
    /// LSN-mode reads that waited on a replica to catch up.
    lsn_waits,
    /// Waits that ran out of budget (the read then went to the primary).
    lsn_wait_timeouts,
    /// Write sessions handed out.
    writes,
    /// Mark lookups that failed or timed out (the read followed `on_marks_failure`).
    marks_errors,
    /// Mark updates after a commit that failed (the user may read older data from replicas
    /// unless they carry a token; see `on_marks_failure`).
    mark_update_failures,
    /// Tokens from another cluster or timeline (read sent to the primary).
    tokens_untrusted,
    /// Checkouts that failed (the node did not give a session: connection refused, timeout,
    /// a failed session check) and were retried elsewhere. Failures of queries on a session
    /// are not counted here.
    checkout_failures,
    /// Checkouts that found every session of a read pool in use (the node answers; the read
    /// went elsewhere). A steady count says the pool is too small for the load.
    checkouts_busy,
    /// Failures a request saw on a node: a failed checkout, or a connection that broke under a
    /// session's query. Each bans a replica and asks for a re-probe.
    request_failures,
    /// Immediate re-probes requested by callers.
    reprobes_requested,
    /// Reads that `read_retrying` ran a second time, on another node, after a connection failure.
    read_retries,
    /// Sessions reset after use and returned to their pool.
    sessions_reset,
    /// Sessions closed after use because they could not be reset (broken, a reset that failed
    /// or timed out, or a driver still tracking an open transaction).
    sessions_discarded,
}

impl RouterStats {
    /// Fraction of reads served by replicas.
    pub fn replica_share(&self) -> f64 {
        let total = self.reads_replica + self.reads_primary;
        if total == 0 {
            0.0
        } else {
            self.reads_replica as f64 / total as f64
        }
    }
}

pub(crate) fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}
