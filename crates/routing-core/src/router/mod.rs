//! The router: picks a node for every unit of work and hands out connection guards.
//!
//! - `mod.rs`: the handle, its builder and the shared state;
//! - `read.rs`: which node serves a read, and [`ReadConn`];
//! - `write.rs`: the writer's sessions, [`WriteConn`], commits and receipts;
//! - `session.rs`: the guard both handles share, which resets a session before it is reused.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::time::Duration;

use crate::handle::TopologyHandle;
use crate::refusal::RefusalCheck;
use crate::stats::{Counters, bump};
use crate::topology::Topology;
use crate::{
    Backend, BackendError, CausalToken, Consistency, Epoch, Error, ErrorKind, InMemoryMarks,
    NodeConfig, NodeRole, PoolSettings, RegionPolicy, ReplicaPicker, RoleHint, RouterConfig,
    RouterStats, Snapshot, TokenCodec, WriterMarks,
};

mod members;
mod plan;
mod read;
mod session;
mod status;
mod write;

pub use members::NodeRemoval;
pub use read::ReadConn;
pub use status::{
    BanState, MARKS_UNHEALTHY_FOR, MarksHealth, NodeState, PoolOccupancy, PoolState, RouterStatus,
};
pub use write::{WriteConn, WriteReceipt};

/// Routes writes to the primary and reads to replicas. Cheap to clone; every clone shares one
/// topology, one monitor and one set of pools. The monitor stops when the last clone is dropped
/// (or at [`Router::shutdown`]).
pub struct Router<B: Backend> {
    inner: Arc<Inner<B>>,
}

impl<B: Backend> Clone for Router<B> {
    fn clone(&self) -> Self {
        Router {
            inner: self.inner.clone(),
        }
    }
}

/// A router held without keeping it alive (background tasks of the crate's own).
pub(crate) struct WeakRouter<B: Backend>(std::sync::Weak<Inner<B>>);

impl<B: Backend> WeakRouter<B> {
    pub(crate) fn upgrade(&self) -> Option<Router<B>> {
        self.0.upgrade().map(|inner| Router { inner })
    }
}

impl<B: Backend> Router<B> {
    pub(crate) fn downgrade(&self) -> WeakRouter<B> {
        WeakRouter(Arc::downgrade(&self.inner))
    }

    pub(crate) fn subscribe_shutdown(&self) -> tokio::sync::watch::Receiver<bool> {
        self.inner.topo.subscribe_shutdown()
    }
}

impl<B: Backend> std::fmt::Debug for Router<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let snap = self.inner.topo.load();
        f.debug_struct("Router")
            .field("generation", &snap.generation)
            .field("writer", &snap.writer().map(|n| n.name.clone()))
            .field("nodes", &self.node_names())
            .finish()
    }
}

pub(crate) struct NodeRuntime<B: Backend> {
    pub(crate) name: Arc<str>,
    /// Shared with the node's monitor task, which keeps its standby session.
    pub(super) writer_pool: Arc<B::Pool>,
    pub(super) reader_pool: B::Pool,
    pub(crate) in_flight: AtomicUsize,
    /// Fails a waiting checkout at once when the node refuses connections.
    pub(super) refusal: Arc<RefusalCheck>,
    /// Read sessions log in as a role that may only read ([`NodeConfig::reader_url`]).
    pub(crate) read_only_role: bool,
    /// Its request-path metrics, registered at build.
    pub(crate) metrics: crate::telemetry::NodeMetrics,
    /// What the router's recent waits for its replay took (the read planner's prediction).
    pub(super) catch_up: plan::CatchUp,
    /// Stops its probe task when the node is removed.
    pub(super) stop_probe: tokio::sync::watch::Sender<bool>,
    /// Shared with the probe task; gone when both are (see [`NodeRemoval::drained`]). Last, so
    /// that the pools above are dropped first.
    pub(super) alive: Arc<tokio::sync::watch::Sender<()>>,
}

pub(crate) struct Inner<B: Backend> {
    /// Node runtimes by index, swapped whole when a node is added or removed; read lock-free.
    pub(crate) nodes: members::NodeTable<B>,
    /// The configuration of every node present, by index (`None`: removed). Its lock
    /// serializes membership changes; the request path never takes it.
    pub(super) members: parking_lot::Mutex<Vec<Option<NodeConfig>>>,
    /// Builds the pools of nodes added at run time.
    pub(super) backend: B,
    pub(super) probe_settings: PoolSettings,
    pub(crate) config: RouterConfig,
    /// Shared with the monitor, which depends on nothing else of the router.
    pub(super) topo: Arc<TopologyHandle>,
    pub(super) marks: Arc<dyn WriterMarks>,
    pub(super) codec: Option<TokenCodec>,
    pub(super) picker: Box<dyn ReplicaPicker>,
    pub(super) regions: RegionPolicy,
    pub(crate) counters: Counters,
    pub(super) marks_warnings: crate::throttle::WarnThrottle,
    pub(super) max_commit_lsn: AtomicU64,
    pub(crate) metrics: crate::telemetry::RouterMetrics,
}

impl<B: Backend> Drop for Inner<B> {
    fn drop(&mut self) {
        self.topo.shut_down();
    }
}

/// Builds a [`Router`]: nodes, policies, then `build().await`.
pub struct RouterBuilder<B: Backend> {
    backend: B,
    nodes: Vec<NodeConfig>,
    config: RouterConfig,
    marks: Option<Arc<dyn WriterMarks>>,
    codec: Option<TokenCodec>,
    picker: Box<dyn ReplicaPicker>,
    regions: RegionPolicy,
    lag_alert_handlers: Vec<Arc<dyn crate::LagAlertHandler>>,
}

impl<B: Backend> std::fmt::Debug for RouterBuilder<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouterBuilder")
            .field("nodes", &self.nodes)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl<B: Backend> RouterBuilder<B> {
    /// Adds a node.
    pub fn node(mut self, node: NodeConfig) -> Self {
        self.nodes.push(node);
        self
    }

    /// Adds nodes.
    pub fn nodes(mut self, nodes: impl IntoIterator<Item = NodeConfig>) -> Self {
        self.nodes.extend(nodes);
        self
    }

    /// Replaces the whole configuration.
    pub fn config(mut self, config: RouterConfig) -> Self {
        self.config = config;
        self
    }

    /// Sets the default consistency mode.
    pub fn consistency(mut self, mode: Consistency) -> Self {
        self.config.default_consistency = mode;
        self
    }

    /// Where recent-writer marks live (default: [`InMemoryMarks`], one process only).
    pub fn marks(mut self, marks: Arc<dyn WriterMarks>) -> Self {
        self.marks = Some(marks);
        self
    }

    /// Signs causal tokens on write and accepts them on read.
    pub fn tokens(mut self, codec: TokenCodec) -> Self {
        self.codec = Some(codec);
        self
    }

    /// Replica selection policy (default: [`crate::LeastOutstanding`]).
    pub fn picker(mut self, picker: impl ReplicaPicker) -> Self {
        self.picker = Box::new(picker);
        self
    }

    /// Region fallback policy.
    pub fn regions(mut self, regions: RegionPolicy) -> Self {
        self.regions = regions;
        self
    }

    /// Calls `handler` once when a replica's lag crosses above its alert thresholds
    /// ([`RouterConfig::lag_alert`], [`NodeConfig::lag_alert`]) and once when it comes back
    /// below their clear line; a `tracing` event is logged either way. May be called several
    /// times: every handler gets every alert.
    ///
    /// ```no_run
    /// # async fn run<B: routing_core::Backend>(backend: B) -> Result<(), routing_core::Error> {
    /// use std::time::Duration;
    /// use routing_core::{LagAlert, LagAlertKind, LagAlertThresholds, NodeConfig, Router, RouterConfig};
    ///
    /// let router = Router::builder(backend)
    ///     .node(NodeConfig::writer("pg-a", "postgres://app@db-a/shop"))
    ///     .node(NodeConfig::replica("pg-b", "postgres://app@db-b/shop"))
    ///     // A replica far away runs further behind: its own threshold.
    ///     .node(
    ///         NodeConfig::replica("pg-far", "postgres://app@db-far/shop")
    ///             .lag_alert(LagAlertThresholds::bytes(64 << 20)),
    ///     )
    ///     .config(RouterConfig {
    ///         // "Alert if a replica is more than 8 MB or 30 s behind"; clear below half.
    ///         lag_alert: LagAlertThresholds::bytes(8 << 20).and_time(Duration::from_secs(30)),
    ///         ..RouterConfig::default()
    ///     })
    ///     .on_lag_alert(|a: &LagAlert| match a.kind {
    ///         LagAlertKind::Raised => eprintln!("{} is {:?} bytes behind", a.node, a.lag_bytes),
    ///         _ => eprintln!("{} caught up", a.node),
    ///     })
    ///     .build()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn on_lag_alert(mut self, handler: impl crate::LagAlertHandler) -> Self {
        self.lag_alert_handlers.push(Arc::new(handler));
        self
    }

    /// Validates, builds the pools (without connecting), starts the monitor and waits for its first
    /// round of probes (at most `probe_timeout`). Must run inside a tokio runtime.
    pub async fn build(self) -> Result<Router<B>, Error> {
        self.config.validate(&self.nodes)?;
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(Error::Config(
                "Router::build must run inside a tokio runtime".into(),
            ));
        }
        let epoch = Epoch::default();
        // Probe sessions are renewed often: behind a stable endpoint (HAProxy, a cloud writer
        // endpoint) only a new connection shows which server the endpoint points at now.
        let probe_lifetime = (self.config.probe_interval * 4).max(Duration::from_secs(1));
        // Room for the connect attempts a probe makes side by side while a connection is held
        // (`monitor::CONNECT_ATTEMPTS`); a probe uses one session at a time, so the pool
        // normally holds one.
        let probe_settings = PoolSettings {
            max_size: crate::monitor::CONNECT_ATTEMPTS,
            connect_timeout: self.config.probe_timeout,
            max_lifetime: Some(
                self.config
                    .pool
                    .max_lifetime
                    .map_or(probe_lifetime, |l| l.min(probe_lifetime)),
            ),
            idle_timeout: None,
            pre_ping: false,
            statement_timeout: Some(self.config.probe_timeout),
        };
        let factory = members::NodeFactory {
            backend: &self.backend,
            epoch: &epoch,
            pool: self.config.pool,
            probe: probe_settings,
            interval: self.config.probe_interval,
            timeout: self.config.probe_timeout,
        };
        let mut nodes = Vec::with_capacity(self.nodes.len());
        let mut probes = Vec::with_capacity(self.nodes.len());
        for n in &self.nodes {
            let (runtime, probe) = factory.build(n)?;
            nodes.push(Arc::new(runtime));
            probes.push(probe);
        }
        let topology = Topology::new(&self.nodes, self.config.lag, self.config.ban, epoch.clone());
        crate::telemetry::register(
            nodes
                .iter()
                .zip(&self.nodes)
                .filter(|(_, n)| n.lag_alert.unwrap_or(self.config.lag_alert).enabled())
                .map(|(rt, _)| rt.name.clone()),
        );
        let alerts = crate::alerts::LagAlerts::new(
            nodes.iter().map(|n| n.name.clone()),
            self.nodes
                .iter()
                .map(|n| n.lag_alert.unwrap_or(self.config.lag_alert)),
            self.lag_alert_handlers,
        );
        let topo = Arc::new(TopologyHandle::new(topology, epoch).with_alerts(alerts));
        let inner = Arc::new(Inner {
            nodes: members::NodeTable::new(nodes),
            members: parking_lot::Mutex::new(self.nodes.into_iter().map(Some).collect()),
            backend: self.backend,
            probe_settings,
            config: self.config,
            topo: topo.clone(),
            marks: self
                .marks
                .unwrap_or_else(|| Arc::new(InMemoryMarks::default())),
            codec: self.codec,
            picker: self.picker,
            regions: self.regions,
            counters: Counters::default(),
            marks_warnings: crate::throttle::WarnThrottle::new(),
            max_commit_lsn: AtomicU64::new(0),
            metrics: crate::telemetry::RouterMetrics::new(),
        });
        let mut changes = topo.subscribe_changes();
        for (i, probe) in probes.into_iter().enumerate() {
            crate::monitor::spawn_node(&topo, i, probe);
        }
        status::spawn_pool_gauges(&inner);
        let router = Router { inner };
        let deadline = tokio::time::Instant::now()
            + router.inner.config.probe_timeout
            + Duration::from_millis(50);
        while router
            .snapshot()
            .nodes
            .iter()
            .any(|n| !n.removed && n.last_probe.is_none() && n.last_error.is_none())
        {
            if tokio::time::timeout_at(deadline, changes.changed())
                .await
                .is_err()
            {
                break;
            }
        }
        Ok(router)
    }
}

impl<B: Backend> Router<B> {
    /// Starts building a router over `backend`.
    pub fn builder(backend: B) -> RouterBuilder<B> {
        RouterBuilder {
            backend,
            nodes: Vec::new(),
            config: RouterConfig::default(),
            marks: None,
            codec: None,
            picker: Box::new(crate::LeastOutstanding),
            regions: RegionPolicy::default(),
            lag_alert_handlers: Vec::new(),
        }
    }

    /// The latest topology snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.inner.topo.load_full()
    }

    /// Counters of routing decisions.
    pub fn stats(&self) -> RouterStats {
        self.inner.counters.read()
    }

    /// The router's configuration.
    pub fn config(&self) -> &RouterConfig {
        &self.inner.config
    }

    /// Verifies a client's token text (for example an `X-Read-After` header).
    pub fn verify_token(&self, text: &str) -> Result<CausalToken, Error> {
        let codec = self
            .inner
            .codec
            .as_ref()
            .ok_or_else(|| Error::Config("no token key configured".into()))?;
        Ok(codec.verify(text)?)
    }

    /// The token codec, when the router signs and verifies causal tokens ([`RouterBuilder::tokens`]).
    pub fn tokens(&self) -> Option<&TokenCodec> {
        self.inner.codec.as_ref()
    }

    /// Signs a token (the write path does this for you).
    pub fn sign_token(&self, token: &CausalToken) -> Option<String> {
        self.inner.codec.as_ref().map(|c| c.sign(token))
    }

    /// Asks the monitor to probe every node now (rate-limited by the monitor).
    pub fn reprobe(&self) {
        self.inner.nudge();
    }

    /// Waits until the topology changes or `timeout` passes; true if it changed.
    pub async fn topology_changed(&self, timeout: Duration) -> bool {
        let mut rx = self.inner.topo.subscribe_changes();
        let generation = self.snapshot().generation;
        let deadline = tokio::time::Instant::now() + timeout;
        while tokio::time::timeout_at(deadline, rx.changed())
            .await
            .is_ok_and(|r| r.is_ok())
        {
            if self.snapshot().generation != generation {
                return true;
            }
        }
        false
    }

    /// Stops the monitor. Guards already handed out keep working; new requests still route on the
    /// last snapshot.
    pub fn shutdown(&self) {
        self.inner.topo.shut_down();
    }
}

impl<B: Backend> Inner<B> {
    pub(crate) fn nudge(&self) {
        bump(&self.counters.reprobes_requested);
        self.topo.nudge();
    }

    /// Applies a probe outcome and publishes a new snapshot.
    /// Applies what a request saw of node `i` to the topology.
    pub(super) fn record_failure(&self, i: usize, why: &BackendError) {
        if self.topo.record(i, Err(why)) {
            tracing::debug!(node = %self.nodes.name(i), "topology changed");
        }
    }

    /// A checkout on node `i` failed: counted as busy or failed, then reported.
    pub(super) fn report_checkout_failure(&self, i: usize, why: &BackendError) {
        if why.kind == ErrorKind::PoolBusy {
            bump(&self.counters.checkouts_busy);
        } else {
            bump(&self.counters.checkout_failures);
        }
        self.report_failure(i, why);
    }

    /// Node `i` failed a request (a checkout, a wait or a query): a replica is banned and the
    /// monitor re-probes. A busy pool is not a failure.
    pub(super) fn report_failure(&self, i: usize, why: &BackendError) {
        if why.kind == ErrorKind::PoolBusy {
            tracing::debug!(node = %self.nodes.name(i), error = %why, "pool busy");
            return;
        }
        bump(&self.counters.request_failures);
        tracing::warn!(node = %self.nodes.name(i), error = %why, "node failed on the request path");
        if self.topo.load().nodes.get(i).map(|n| n.role) == Some(NodeRole::Replica) {
            self.record_failure(i, why);
        }
        self.nudge();
    }

    /// that error, naming the node (a writer candidate first), instead of waiting out the deadline.
    pub(super) fn misconfigured(&self, snap: &Snapshot) -> Option<Error> {
        let mut found: Option<usize> = None;
        for (i, n) in snap.nodes.iter().enumerate() {
            if n.role == NodeRole::Replica || n.removed {
                continue;
            }
            if n.reachable
                || !matches!(n.last_error_kind, Some(ErrorKind::Auth | ErrorKind::Config))
            {
                return None;
            }
            let better = found.is_none_or(|f| {
                snap.nodes[f].hint != RoleHint::WriterCandidate
                    && n.hint == RoleHint::WriterCandidate
            });
            if better {
                found = Some(i);
            }
        }
        let n = &snap.nodes[found?];
        let kind = n.last_error_kind.unwrap_or(ErrorKind::Config);
        let text = n.last_error.as_deref().unwrap_or("unknown error");
        // `last_error` is the error's Display, which starts with the kind.
        let message = text.strip_prefix(&format!("{kind:?}: ")).unwrap_or(text);
        Some(Error::Backend {
            node: n.name.to_string(),
            source: BackendError::new(kind, message),
        })
    }

    /// `name: last error` of every unreachable node, for error messages.
    pub(super) fn node_errors(&self) -> String {
        let snap = self.topo.load();
        let errors: Vec<String> = snap
            .nodes
            .iter()
            .filter(|n| !n.reachable && !n.removed)
            .map(|n| {
                format!(
                    "{}: {}",
                    n.name,
                    n.last_error.as_deref().unwrap_or("not probed yet")
                )
            })
            .collect();
        errors.join("; ")
    }
}
