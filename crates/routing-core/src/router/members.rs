//! Run-time membership: the node table the request path indexes, and adding or removing a node
//! on a running router.
//!
//! Node indices never move. The table is append-only: an added node takes the next slot (in the
//! topology and here, in step, under one lock), and a removed node leaves a tombstone (a
//! [`crate::NodeRole::Removed`] entry in the topology, an empty slot here). The table is swapped
//! atomically as a whole, so the request path reads it lock-free, like the snapshot.
//!
//! Removal, in order: the topology marks the node removed (no plan names it from the next
//! snapshot on), its slot is emptied (a request that planned on an older snapshot finds no node
//! and goes elsewhere), its probe task stops. Sessions already handed out keep their node's
//! runtime alive and finish normally; when the last one is back (reset, or discarded), the
//! runtime drops and with it its pools, which close their connections.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::watch;

use super::{Inner, NodeRuntime, Router};
use crate::monitor::NodeProbe;
use crate::refusal::RefusalCheck;
use crate::{Access, Backend, Epoch, Error, NodeConfig, PoolSettings, PoolSpec};

/// Every node's runtime by index; `None` for a removed node.
pub(crate) struct NodeTable<B: Backend> {
    slots: ArcSwap<Vec<Option<Arc<NodeRuntime<B>>>>>,
}

impl<B: Backend> NodeTable<B> {
    pub(crate) fn new(nodes: Vec<Arc<NodeRuntime<B>>>) -> Self {
        NodeTable {
            slots: ArcSwap::from_pointee(nodes.into_iter().map(Some).collect()),
        }
    }

    /// Node `i`'s runtime; `None` once it was removed. Lock-free.
    pub(crate) fn get(&self, i: usize) -> Option<Arc<NodeRuntime<B>>> {
        self.slots.load().get(i).and_then(Clone::clone)
    }

    /// What node `i`'s recent replay waits predict ([`super::plan::CatchUp`]), without taking
    /// a reference to its runtime: the read planner asks this for every replica it might wait on.
    pub(crate) fn expected_wait(
        &self,
        i: usize,
        now: std::time::Instant,
    ) -> Option<std::time::Duration> {
        self.slots.load().get(i)?.as_ref()?.catch_up.expected(now)
    }

    /// The nodes present now, with their indices.
    pub(crate) fn live(&self) -> Vec<(usize, Arc<NodeRuntime<B>>)> {
        self.slots
            .load()
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.clone().map(|rt| (i, rt)))
            .collect()
    }

    /// The name of node `i`, also of a removed one while it is still present ("?" otherwise).
    pub(crate) fn name(&self, i: usize) -> Arc<str> {
        self.get(i)
            .map_or_else(|| Arc::from("?"), |rt| rt.name.clone())
    }

    fn len(&self) -> usize {
        self.slots.load().len()
    }

    /// Appends; only under the membership lock.
    fn push(&self, rt: Arc<NodeRuntime<B>>) -> usize {
        let mut next = Vec::clone(&self.slots.load());
        next.push(Some(rt));
        let i = next.len() - 1;
        self.slots.store(Arc::new(next));
        i
    }

    /// Empties slot `i`; only under the membership lock.
    fn clear(&self, i: usize) -> Option<Arc<NodeRuntime<B>>> {
        let mut next = Vec::clone(&self.slots.load());
        let out = next.get_mut(i).and_then(Option::take);
        self.slots.store(Arc::new(next));
        out
    }
}

/// What a new node needs that the builder and [`Router::add_node`] share.
pub(super) struct NodeFactory<'a, B: Backend> {
    pub(super) backend: &'a B,
    pub(super) epoch: &'a Epoch,
    pub(super) pool: PoolSettings,
    pub(super) probe: PoolSettings,
    pub(super) interval: Duration,
    pub(super) timeout: Duration,
}

impl<B: Backend> NodeFactory<'_, B> {
    /// Builds the node's pools (without connecting) and its probe.
    pub(super) fn build(&self, n: &NodeConfig) -> Result<(NodeRuntime<B>, NodeProbe<B>), Error> {
        let refusal = Arc::new(RefusalCheck::for_node(n));
        let pool = |access, settings| {
            let mut node = n.clone();
            node.url = n.url_for(access).clone();
            self.backend
                .build_pool(PoolSpec {
                    node,
                    access,
                    settings,
                    epoch: self.epoch.clone(),
                })
                .map_err(|source| Error::Backend {
                    node: n.name.clone(),
                    source,
                })
        };
        let name: Arc<str> = Arc::from(n.name.as_str());
        let (stop_probe, stop) = watch::channel(false);
        let alive = Arc::new(watch::channel(()).0);
        let writer_pool = Arc::new(pool(Access::ReadWrite, self.pool)?);
        let runtime = NodeRuntime {
            name: name.clone(),
            writer_pool: writer_pool.clone(),
            reader_pool: pool(Access::ReadOnly, self.pool)?,
            in_flight: AtomicUsize::new(0),
            refusal: refusal.clone(),
            read_only_role: n.reader_url.is_some(),
            metrics: crate::telemetry::NodeMetrics::new(&name),
            catch_up: super::plan::CatchUp::default(),
            stop_probe,
            alive: alive.clone(),
        };
        let probe = NodeProbe {
            pool: pool(Access::Probe, self.probe)?,
            writer_pool,
            refusal,
            name,
            interval: self.interval,
            timeout: self.timeout,
            stop,
            _alive: alive,
        };
        Ok((runtime, probe))
    }
}

/// A node being removed ([`Router::remove_node`]). It already gets no new work; dropping this
/// handle changes nothing (the node drains all the same).
#[derive(Debug)]
#[must_use = "the node drains anyway; await `drained()` to know when its pools are closed"]
pub struct NodeRemoval {
    name: String,
    alive: watch::Receiver<()>,
}

impl NodeRemoval {
    /// The removed node's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Completes when every session the node handed out is back (reset or discarded) and its
    /// pools, probe pool included, are dropped, which closes their connections. Sessions still
    /// held by the application keep it waiting: bound it with a timeout if they may be long.
    pub async fn drained(mut self) {
        // The sender lives in the node's runtime and probe task; it is gone with both.
        while self.alive.changed().await.is_ok() {}
    }

    /// True once [`NodeRemoval::drained`] would complete at once.
    pub fn is_drained(&self) -> bool {
        self.alive.has_changed().is_err()
    }
}

impl<B: Backend> Router<B> {
    /// Adds a node to the running router. It is probed by the monitor like every other node
    /// and serves reads once a probe shows it a healthy replica within the lag bounds (roles
    /// always come from the servers themselves). Waits for its first probe, at most
    /// `probe_timeout`; an unreachable node is added all the same and keeps being probed.
    ///
    /// Fails with [`Error::Config`] for a name already present or an empty name or URL, and
    /// with [`Error::Backend`] when the backend refuses its connection string; nothing changes
    /// then.
    pub async fn add_node(&self, node: NodeConfig) -> Result<(), Error> {
        let inner = &self.inner;
        let i = {
            let mut configs = inner.members.lock();
            let mut all: Vec<NodeConfig> = configs.iter().flatten().cloned().collect();
            all.push(node.clone());
            inner.config.validate(&all)?;
            let factory = inner.factory();
            let (runtime, probe) = factory.build(&node)?;
            let runtime = Arc::new(runtime);
            if inner.nodes.len() != configs.len() {
                return Err(Error::Config(
                    "node table out of step with the membership list".into(),
                ));
            }
            let i = inner.nodes.push(runtime);
            configs.push(Some(node.clone()));
            let thresholds = node.lag_alert.unwrap_or(inner.config.lag_alert);
            let t = inner.topo.add_node(&node, thresholds);
            debug_assert_eq!(t, i);
            if thresholds.enabled() {
                crate::telemetry::lag_alert(&node.name, false);
            }
            crate::monitor::spawn_node(&inner.topo, i, probe);
            i
        };
        crate::telemetry::membership(&node.name, true);
        let mut changes = inner.topo.subscribe_changes();
        let deadline =
            tokio::time::Instant::now() + inner.config.probe_timeout + Duration::from_millis(50);
        loop {
            let snap = inner.topo.load();
            let n = &snap.nodes[i];
            if n.removed || n.last_probe.is_some() || n.last_error.is_some() {
                break;
            }
            drop(snap);
            if tokio::time::timeout_at(deadline, changes.changed())
                .await
                .is_err()
            {
                break;
            }
        }
        Ok(())
    }

    /// Removes the node named `name`: from now on it gets no new work and is not probed; the
    /// sessions it handed out finish normally, then its pools close (await
    /// [`NodeRemoval::drained`] to know when). Its status, metrics and alerts are gone from
    /// [`Router::status`].
    ///
    /// Refused with [`Error::UnknownNode`] when no such node is present, and with
    /// [`Error::RemoveWriter`] for the elected writer: removing it would stop every write until
    /// another node is promoted, which is a failover (Patroni's switchover), not a membership
    /// change. Switch over first; once the monitor elected the new writer, the old one can go.
    pub fn remove_node(&self, name: &str) -> Result<NodeRemoval, Error> {
        let inner = &self.inner;
        let mut configs = inner.members.lock();
        let i = configs
            .iter()
            .position(|c| c.as_ref().is_some_and(|c| c.name == name))
            .ok_or_else(|| Error::UnknownNode {
                node: name.to_string(),
            })?;
        inner
            .topo
            .remove_node(i)
            .map_err(|()| Error::RemoveWriter {
                node: name.to_string(),
            })?;
        configs[i] = None;
        let runtime = inner.nodes.clear(i);
        drop(configs);
        let Some(runtime) = runtime else {
            return Err(Error::UnknownNode {
                node: name.to_string(),
            });
        };
        runtime.stop_probe.send_replace(true);
        let alive = runtime.alive.subscribe();
        crate::telemetry::pools(&runtime.name, 0, None, None);
        crate::telemetry::node_gone(&runtime.name);
        crate::telemetry::membership(name, false);
        tracing::info!(
            node = name,
            in_flight = runtime.in_flight.load(Ordering::Relaxed),
            "node removed: no new work; its sessions drain, then its pools close"
        );
        Ok(NodeRemoval {
            name: name.to_string(),
            alive,
        })
    }

    /// The names of the nodes present now (not removed), in the order they were added.
    pub fn node_names(&self) -> Vec<String> {
        self.inner
            .members
            .lock()
            .iter()
            .flatten()
            .map(|c| c.name.clone())
            .collect()
    }
}

impl<B: Backend> Inner<B> {
    pub(super) fn factory(&self) -> NodeFactory<'_, B> {
        NodeFactory {
            backend: &self.backend,
            epoch: self.topo.epoch(),
            pool: self.config.pool,
            probe: self.probe_settings,
            interval: self.config.probe_interval,
            timeout: self.config.probe_timeout,
        }
    }
}
