//! The topology as the monitor and the router share it: the state machine behind a mutex, the
//! latest snapshot (read lock-free by requests), and the channels that say "changed",
//! "probe now" and "stop". The monitor depends on this handle alone, not on the router.

use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use tokio::sync::watch;

use crate::topology::Topology;
use crate::{BackendError, Epoch, ProbeReport, Snapshot};

pub(crate) struct TopologyHandle {
    topology: Mutex<Topology>,
    snapshot: ArcSwap<Snapshot>,
    changes: watch::Sender<u64>,
    nudges: watch::Sender<u64>,
    shutdown: watch::Sender<bool>,
    epoch: Epoch,
}

impl TopologyHandle {
    pub(crate) fn new(topology: Topology, epoch: Epoch) -> Self {
        TopologyHandle {
            snapshot: ArcSwap::from_pointee(topology.snapshot()),
            topology: Mutex::new(topology),
            changes: watch::channel(0).0,
            nudges: watch::channel(0).0,
            shutdown: watch::channel(false).0,
            epoch,
        }
    }

    /// The latest snapshot, lock-free.
    pub(crate) fn load(&self) -> arc_swap::Guard<Arc<Snapshot>> {
        self.snapshot.load()
    }

    /// The latest snapshot, owned.
    pub(crate) fn load_full(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// The generation and writer identity every pool checks.
    pub(crate) fn epoch(&self) -> &Epoch {
        &self.epoch
    }

    /// Applies a probe outcome (or a failure seen on the request path) to node `i`, publishes
    /// the new snapshot and records the elected writer's identity for the pools. True when the
    /// topology changed.
    pub(crate) fn record(&self, i: usize, outcome: Result<ProbeReport, &BackendError>) -> bool {
        let now = Instant::now();
        let mut topo = self.topology.lock();
        let failed = outcome.is_err();
        let changed = match outcome {
            Ok(report) => topo.apply_probe(i, report, now),
            Err(why) => topo.apply_error(i, why, now),
        };
        if failed || changed {
            // Pooled sessions idle since before this are checked at their next checkout.
            self.epoch.trouble();
        }
        let snap = topo.snapshot();
        if let (Some(_), Some(timeline), Some(system_id)) =
            (snap.writer, snap.timeline, snap.system_id)
        {
            self.epoch.set_writer_identity(timeline, system_id);
        }
        self.snapshot.store(Arc::new(snap));
        drop(topo);
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
        changed
    }

    /// Told after every [`TopologyHandle::record`].
    pub(crate) fn subscribe_changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Asks the monitor to probe every node now.
    pub(crate) fn nudge(&self) {
        self.nudges.send_modify(|n| *n = n.wrapping_add(1));
    }

    pub(crate) fn subscribe_nudges(&self) -> watch::Receiver<u64> {
        self.nudges.subscribe()
    }

    /// Stops the monitor.
    pub(crate) fn shut_down(&self) {
        self.shutdown.send_replace(true);
    }

    pub(crate) fn subscribe_shutdown(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }
}
