//! The topology as the monitor and the router share it: the state machine behind a mutex, the
//! latest snapshot (read lock-free by requests), and the channels that say "changed",
//! "probe now" and "stop". The monitor depends on this handle alone, not on the router.

use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use tokio::sync::watch;

use crate::alerts::LagAlerts;
use crate::topology::Topology;
use crate::{BackendError, Epoch, ProbeReport, Snapshot};

pub(crate) struct TopologyHandle {
    topology: Mutex<Topology>,
    snapshot: ArcSwap<Snapshot>,
    changes: watch::Sender<u64>,
    nudges: watch::Sender<u64>,
    shutdown: watch::Sender<bool>,
    epoch: Epoch,
    /// Lag alert state per node; locked only while the topology lock is held.
    alerts: Mutex<LagAlerts>,
    /// The last writer elected, through gaps without one (for failover events); written only
    /// while the topology lock is held.
    last_writer: Mutex<Option<usize>>,
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
            alerts: Mutex::new(LagAlerts::new([], [], Vec::new())),
            last_writer: Mutex::new(None),
        }
    }

    /// Sets the lag alert thresholds and handlers (before the monitor starts).
    pub(crate) fn with_alerts(self, alerts: LagAlerts) -> Self {
        *self.alerts.lock() = alerts;
        self
    }

    /// Whether each node's lag alert is raised now.
    pub(crate) fn lag_alerts_raised(&self) -> Vec<bool> {
        self.alerts.lock().raised()
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
        if topo.is_removed(i) {
            // A probe that was in flight when the node was removed: nothing to record.
            return false;
        }
        let probed = outcome.is_ok();
        let failed = !probed;
        let old = self.snapshot.load_full();
        let changed = match outcome {
            Ok(report) => topo.apply_probe(i, report, now),
            Err(why) => topo.apply_error(i, why, now),
        };
        if failed || changed {
            // Pooled sessions idle since before this are checked at their next checkout.
            self.epoch.trouble();
        }
        let snap = topo.snapshot();
        // Only a probe answer measures lag; a failure leaves the alert as it was.
        let alert = if probed {
            let mut alerts = self.alerts.lock();
            let node = &snap.nodes[i];
            alerts
                .observe(i, node.lag_bytes, node.lag)
                .map(|a| (a, alerts.handlers().to_vec()))
        } else {
            None
        };
        let snap = Arc::new(snap);
        let last_writer = {
            let mut last = self.last_writer.lock();
            let before = *last;
            if snap.writer.is_some() {
                *last = snap.writer;
            }
            before
        };
        if let (Some(_), Some(timeline), Some(system_id)) =
            (snap.writer, snap.timeline, snap.system_id)
        {
            self.epoch.set_writer_identity(timeline, system_id);
        }
        self.snapshot.store(snap.clone());
        drop(topo);
        crate::telemetry::topology(&old, &snap, i, probed, last_writer);
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
        if let Some((alert, handlers)) = alert {
            crate::telemetry::lag_alert(&alert.node, alert.kind == crate::LagAlertKind::Raised);
            LagAlerts::emit(&handlers, &alert);
        }
        changed
    }

    /// Appends a node to the topology (and its lag alert state) and publishes the snapshot;
    /// returns its index. The caller makes sure its runtime slot exists first.
    pub(crate) fn add_node(
        &self,
        node: &crate::NodeConfig,
        thresholds: crate::LagAlertThresholds,
    ) -> usize {
        let mut topo = self.topology.lock();
        let i = topo.add(node);
        self.alerts
            .lock()
            .push(Arc::from(node.name.as_str()), thresholds);
        self.snapshot.store(Arc::new(topo.snapshot()));
        drop(topo);
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
        i
    }

    /// Makes node `i` a tombstone and publishes the snapshot: from then on no plan names it.
    /// `Err(())` when it is the elected writer (nothing changes then).
    pub(crate) fn remove_node(&self, i: usize) -> Result<(), ()> {
        let mut topo = self.topology.lock();
        topo.remove(i)?;
        self.alerts.lock().clear(i);
        self.snapshot.store(Arc::new(topo.snapshot()));
        drop(topo);
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
        Ok(())
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
