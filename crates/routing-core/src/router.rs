//! The router: picks a node for every unit of work and hands out connection guards.

use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use futures_util::future::BoxFuture;
use parking_lot::Mutex;
use smallvec::SmallVec;
use tokio::sync::watch;

use crate::backend::sql;
use crate::stats::{Counters, bump};
use crate::topology::Topology;
use crate::{
    Access, Backend, BackendError, Candidate, CausalToken, Consistency, Epoch, Error, ErrorKind,
    InMemoryMarks, Lsn, MarksFailure, NodeConfig, NodeRole, PoolSettings, PoolSpec, ProbeReport,
    RegionPolicy, ReplicaPicker, RequestContext, RoleHint, RouterConfig, RouterStats, Snapshot,
    TokenCodec, TokenError, UserKey, WriterMarks,
};

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

impl<B: Backend> std::fmt::Debug for Router<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let snap = self.inner.snapshot.load();
        f.debug_struct("Router")
            .field("generation", &snap.generation)
            .field("writer", &snap.writer().map(|n| n.name.clone()))
            .field(
                "nodes",
                &self
                    .inner
                    .nodes
                    .iter()
                    .map(|n| n.name.clone())
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

pub(crate) struct NodeRuntime<B: Backend> {
    pub(crate) name: Arc<str>,
    writer_pool: B::Pool,
    reader_pool: B::Pool,
    pub(crate) probe_pool: B::Pool,
    in_flight: AtomicUsize,
}

pub(crate) struct Inner<B: Backend> {
    pub(crate) nodes: Vec<NodeRuntime<B>>,
    pub(crate) config: RouterConfig,
    topology: Mutex<Topology>,
    snapshot: ArcSwap<Snapshot>,
    changes: watch::Sender<u64>,
    pub(crate) nudges: watch::Sender<u64>,
    pub(crate) shutdown: watch::Sender<bool>,
    marks: Arc<dyn WriterMarks>,
    codec: Option<TokenCodec>,
    picker: Box<dyn ReplicaPicker>,
    regions: RegionPolicy,
    counters: Counters,
    marks_warnings: crate::throttle::WarnThrottle,
    max_commit_lsn: AtomicU64,
}

impl<B: Backend> Drop for Inner<B> {
    fn drop(&mut self) {
        self.shutdown.send_replace(true);
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
        let probe_settings = PoolSettings {
            max_size: 1,
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
        let mut nodes = Vec::with_capacity(self.nodes.len());
        for n in &self.nodes {
            let pool = |access, settings| {
                self.backend
                    .build_pool(PoolSpec {
                        node: n.clone(),
                        access,
                        settings,
                        epoch: epoch.clone(),
                    })
                    .map_err(|source| Error::Backend {
                        node: n.name.clone(),
                        source,
                    })
            };
            nodes.push(NodeRuntime {
                name: Arc::from(n.name.as_str()),
                writer_pool: pool(Access::ReadWrite, self.config.pool)?,
                reader_pool: pool(Access::ReadOnly, self.config.pool)?,
                probe_pool: pool(Access::Probe, probe_settings)?,
                in_flight: AtomicUsize::new(0),
            });
        }
        let topology = Topology::new(&self.nodes, self.config.lag, self.config.ban, epoch);
        let snapshot = ArcSwap::from_pointee(topology.snapshot());
        let inner = Arc::new(Inner {
            nodes,
            config: self.config,
            topology: Mutex::new(topology),
            snapshot,
            changes: watch::channel(0).0,
            nudges: watch::channel(0).0,
            shutdown: watch::channel(false).0,
            marks: self
                .marks
                .unwrap_or_else(|| Arc::new(InMemoryMarks::default())),
            codec: self.codec,
            picker: self.picker,
            regions: self.regions,
            counters: Counters::default(),
            marks_warnings: crate::throttle::WarnThrottle::new(),
            max_commit_lsn: AtomicU64::new(0),
        });
        let mut changes = inner.changes.subscribe();
        crate::monitor::spawn(&inner);
        let router = Router { inner };
        let deadline = tokio::time::Instant::now()
            + router.inner.config.probe_timeout
            + Duration::from_millis(50);
        while router
            .snapshot()
            .nodes
            .iter()
            .any(|n| n.last_probe.is_none() && n.last_error.is_none())
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

enum Need {
    Primary,
    Any,
    AtLeast(Lsn),
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
        }
    }

    /// The latest topology snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.inner.snapshot.load_full()
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
        let mut rx = self.inner.changes.subscribe();
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
        self.inner.shutdown.send_replace(true);
    }

    /// A write session on the primary, with no user (no mark is set on finish).
    pub async fn write(&self) -> Result<WriteConn<B>, Error> {
        self.write_with(&RequestContext::default()).await
    }

    /// A write session on the primary for the context's user. Waits up to `write_deadline` for a
    /// reachable primary (across a failover), then fails with [`Error::NoPrimary`].
    pub async fn write_with(&self, ctx: &RequestContext) -> Result<WriteConn<B>, Error> {
        let (node, pooled) = self.inner.acquire_on_writer(Access::ReadWrite).await?;
        bump(&self.inner.counters.writes);
        Ok(WriteConn {
            pooled,
            node,
            user: ctx.user.clone(),
            inner: self.inner.clone(),
        })
    }

    /// A read session with the router's default consistency.
    pub async fn read(&self) -> Result<ReadConn<B>, Error> {
        self.read_with(&RequestContext::default()).await
    }

    /// A read session routed for this request: see [`Consistency`].
    pub async fn read_with(&self, ctx: &RequestContext) -> Result<ReadConn<B>, Error> {
        let inner = &self.inner;
        let snap = inner.snapshot.load_full();
        let mode = if ctx.force_primary {
            Consistency::Primary
        } else {
            ctx.consistency.unwrap_or(inner.config.default_consistency)
        };
        let need = match mode {
            Consistency::Primary => Need::Primary,
            Consistency::Eventual => Need::Any,
            Consistency::RecentWriterTtl { ttl } => match &ctx.user {
                None => Need::Any,
                Some(user) => match inner.lookup_mark(user).await {
                    Ok(Some(m)) if inner.config.mark_ttl.saturating_sub(m.expires_in) < ttl => {
                        Need::Primary
                    }
                    Ok(_) => Need::Any,
                    Err(()) => inner.on_marks_failure(),
                },
            },
            Consistency::ReadYourWrites | Consistency::Causal => {
                let mut need: Option<Lsn> = None;
                if let Some(token) = &ctx.token {
                    match inner.judge_token(token, &snap)? {
                        Some(lsn) => need = Some(lsn),
                        None => return inner.read_on_primary(true).await,
                    }
                }
                let mut primary = false;
                if mode == Consistency::ReadYourWrites
                    && let Some(user) = &ctx.user
                {
                    match inner.lookup_mark(user).await {
                        Ok(Some(m)) => need = need.max(Some(m.lsn)),
                        Ok(None) => {}
                        Err(()) => primary = matches!(inner.on_marks_failure(), Need::Primary),
                    }
                }
                match need {
                    _ if primary => Need::Primary,
                    Some(lsn) => Need::AtLeast(lsn),
                    None => Need::Any,
                }
            }
        };
        match need {
            Need::Primary => inner.read_on_primary(false).await,
            Need::Any => inner.read_on_replica(&snap, ctx, None).await,
            Need::AtLeast(lsn) => inner.read_on_replica(&snap, ctx, Some(lsn)).await,
        }
    }

    /// Runs `work` on a read session; if the node fails underneath (a connection error outside a
    /// transaction), bans it and runs `work` once more on another node.
    pub async fn read_retrying<T, F>(&self, ctx: &RequestContext, mut work: F) -> Result<T, Error>
    where
        F: for<'c> FnMut(&'c mut B::Connection) -> BoxFuture<'c, Result<T, B::QueryError>>,
    {
        let mut conn = self.read_with(ctx).await?;
        let first = work(&mut conn).await;
        match first {
            Ok(v) => Ok(v),
            Err(e) if B::classify(&e) == ErrorKind::Connection => {
                bump(&self.inner.counters.read_retries);
                drop(conn.check::<()>(Err(e)));
                drop(conn);
                let mut conn = self.read_with(ctx).await?;
                let second = work(&mut conn).await;
                conn.check(second)
            }
            Err(e) => conn.check(Err(e)),
        }
    }

    /// [`Router::read_retrying`] for work written against the [`Backend`] trait (on the pooled
    /// session, with [`Backend::query_text`] / [`Backend::execute`]), so backend-generic code gets
    /// the same single retry: a [`ErrorKind::Connection`] failure bans the node and `work` runs
    /// once more on another node (or the primary); any other error is returned as
    /// [`ReadConn::check_backend`] maps it. Only for work outside a transaction.
    pub async fn read_retrying_backend<T, F>(
        &self,
        ctx: &RequestContext,
        mut work: F,
    ) -> Result<T, Error>
    where
        F: for<'c> FnMut(&'c mut B::Pooled) -> BoxFuture<'c, Result<T, BackendError>>,
    {
        let mut conn = self.read_with(ctx).await?;
        let first = work(&mut conn.pooled).await;
        match first {
            Ok(v) => Ok(v),
            Err(e) if e.kind == ErrorKind::Connection => {
                bump(&self.inner.counters.read_retries);
                drop(conn.check_backend::<()>(Err(e)));
                drop(conn);
                let mut conn = self.read_with(ctx).await?;
                let second = work(&mut conn.pooled).await;
                conn.check_backend(second)
            }
            Err(e) => conn.check_backend(Err(e)),
        }
    }
}

impl<B: Backend> Inner<B> {
    pub(crate) fn nudge(&self) {
        bump(&self.counters.reprobes_requested);
        self.nudges.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Applies a probe outcome and publishes a new snapshot.
    pub(crate) fn record_probe(&self, i: usize, outcome: Result<ProbeReport, &BackendError>) {
        let now = Instant::now();
        let mut topo = self.topology.lock();
        let changed = match outcome {
            Ok(report) => topo.apply_probe(i, report, now),
            Err(why) => topo.apply_error(i, why, now),
        };
        self.snapshot.store(Arc::new(topo.snapshot()));
        drop(topo);
        if changed {
            tracing::info!(node = %self.nodes[i].name, "topology changed");
        }
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    fn report_failure(&self, i: usize, why: &BackendError) {
        bump(&self.counters.checkout_failures);
        tracing::warn!(node = %self.nodes[i].name, error = %why, "node failed on the request path");
        self.record_probe(i, Err(why));
        self.nudge();
    }

    async fn lookup_mark(&self, user: &UserKey) -> Result<Option<crate::Mark>, ()> {
        match tokio::time::timeout(self.config.marks_timeout, self.marks.get(user)).await {
            Ok(Ok(m)) => Ok(m),
            Ok(Err(e)) => {
                bump(&self.counters.marks_errors);
                if let Some(suppressed) = self.marks_warnings.allow() {
                    tracing::warn!(error = %e, suppressed, "mark lookup failed");
                }
                Err(())
            }
            Err(_) => {
                bump(&self.counters.marks_errors);
                if let Some(suppressed) = self.marks_warnings.allow() {
                    tracing::warn!(timeout = ?self.config.marks_timeout, suppressed, "mark lookup timed out");
                }
                Err(())
            }
        }
    }

    fn on_marks_failure(&self) -> Need {
        match self.config.on_marks_failure {
            MarksFailure::Eventual => Need::Any,
            _ => Need::Primary,
        }
    }

    /// `Some(lsn)` when replicas may serve the token; `None` when it must go to the primary
    /// (another cluster, another timeline); an error when it claims an impossible future.
    fn judge_token(&self, token: &CausalToken, snap: &Snapshot) -> Result<Option<Lsn>, Error> {
        let foreign =
            matches!(snap.system_id, Some(s) if token.system_id != 0 && token.system_id != s);
        let other_timeline = matches!(snap.timeline, Some(t) if t != token.timeline);
        if foreign || other_timeline {
            bump(&self.counters.tokens_untrusted);
            return Ok(None);
        }
        let known = snap
            .primary_lsn
            .unwrap_or_default()
            .max(Lsn(self.max_commit_lsn.load(Ordering::Relaxed)));
        if token.lsn.bytes_after(known) > self.config.future_lsn_tolerance {
            return Err(Error::Token(TokenError::FromTheFuture {
                lsn: token.lsn,
                primary: known,
            }));
        }
        Ok(Some(token.lsn))
    }

    /// A session on the current writer, waiting across failovers up to the write deadline.
    async fn acquire_on_writer(&self, access: Access) -> Result<(usize, B::Pooled), Error> {
        let started = tokio::time::Instant::now();
        let deadline = started + self.config.write_deadline;
        let mut changes = self.changes.subscribe();
        loop {
            let snap = self.snapshot.load_full();
            if let Some(w) = snap.writer {
                let node = &self.nodes[w];
                let pool = if access == Access::ReadWrite {
                    &node.writer_pool
                } else {
                    &node.reader_pool
                };
                changes.borrow_and_update();
                let checkout = tokio::time::timeout_at(deadline, B::checkout(pool));
                tokio::pin!(checkout);
                // A checkout on a writer that stopped answering (blackholed, not refusing) can
                // take the pool's whole connect timeout. Give up on it as soon as the monitor
                // elects another writer, so writes follow a failover at once.
                let outcome = loop {
                    tokio::select! {
                        biased;
                        outcome = &mut checkout => break Some(outcome),
                        Ok(()) = changes.changed() => {
                            if self.snapshot.load().writer != Some(w) {
                                break None;
                            }
                        }
                    }
                };
                let Some(outcome) = outcome else {
                    bump(&self.counters.checkout_failures);
                    continue;
                };
                match outcome {
                    // Elected away while we connected: never hand out a session on a node that
                    // is no longer the writer (it may be an old primary still accepting writes).
                    Ok(Ok(pooled)) if self.snapshot.load().writer != Some(w) => {
                        drop(pooled);
                        continue;
                    }
                    Ok(Ok(pooled)) => return Ok((w, pooled)),
                    Ok(Err(e)) if matches!(e.kind, ErrorKind::Auth | ErrorKind::Config) => {
                        return Err(Error::Backend {
                            node: node.name.to_string(),
                            source: e,
                        });
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(node = %node.name, error = %e, "writer checkout failed");
                        bump(&self.counters.checkout_failures);
                        self.nudge();
                    }
                    Err(_) => {
                        return Err(Error::NoPrimary {
                            waited: started.elapsed(),
                        });
                    }
                }
            } else if let Some(err) = self.misconfigured(&snap) {
                return Err(err);
            } else {
                self.nudge();
            }
            // Wait for the monitor to publish something new, re-nudging now and then.
            let pause = tokio::time::Instant::now() + Duration::from_millis(50);
            let _ = tokio::time::timeout_at(pause.min(deadline), changes.changed()).await;
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::NoPrimary {
                    waited: started.elapsed(),
                });
            }
        }
    }

    /// With no writer known: if every node that could be the writer (any node not seen in
    /// recovery) last failed for a reason waiting will not fix (authentication, configuration),
    /// that error, naming the node (a writer candidate first), instead of waiting out the deadline.
    fn misconfigured(&self, snap: &Snapshot) -> Option<Error> {
        let mut found: Option<usize> = None;
        for (i, n) in snap.nodes.iter().enumerate() {
            if n.role == NodeRole::Replica {
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
    fn node_errors(&self) -> String {
        let snap = self.snapshot.load();
        let errors: Vec<String> = snap
            .nodes
            .iter()
            .filter(|n| !n.reachable)
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

    async fn read_on_primary(self: &Arc<Self>, fallback: bool) -> Result<ReadConn<B>, Error> {
        let (node, pooled) =
            self.acquire_on_writer(Access::ReadOnly)
                .await
                .map_err(|e| match e {
                    Error::NoPrimary { waited } => {
                        let errors = self.node_errors();
                        let mut reason =
                            format!("no replica eligible and no primary within {waited:?}");
                        if !errors.is_empty() {
                            reason.push_str(" (");
                            reason.push_str(&errors);
                            reason.push(')');
                        }
                        Error::NoReader { reason }
                    }
                    other => other,
                })?;
        bump(&self.counters.reads_primary);
        if fallback {
            bump(&self.counters.reads_primary_fallback);
        }
        Ok(ReadConn::new(self.clone(), node, pooled, true))
    }

    async fn read_on_replica(
        self: &Arc<Self>,
        snap: &Snapshot,
        ctx: &RequestContext,
        need: Option<Lsn>,
    ) -> Result<ReadConn<B>, Error> {
        let now = Instant::now();
        // Locality: only the best-ranked region tier that has an eligible replica.
        let mut tier: SmallVec<[usize; 8]> = SmallVec::new();
        let mut best = usize::MAX;
        let mut any = false;
        for (i, n) in snap.nodes.iter().enumerate() {
            if !n.is_readable_replica(now) {
                continue;
            }
            let rank = self.regions.rank(ctx.region.as_ref(), n.region.as_ref());
            if !any || rank < best {
                tier.clear();
                best = rank;
                any = true;
            }
            if rank == best {
                tier.push(i);
            }
        }
        let mut excluded: SmallVec<[usize; 2]> = SmallVec::new();
        for _attempt in 0..2 {
            tier.retain(|i| !excluded.contains(i));
            if tier.is_empty() {
                break;
            }
            let (choice, must_wait) = match need {
                None => (self.pick(snap, &tier), false),
                Some(lsn) => {
                    let caught_up: SmallVec<[usize; 8]> = tier
                        .iter()
                        .copied()
                        .filter(|&i| snap.nodes[i].lsn >= Some(lsn))
                        .collect();
                    if !caught_up.is_empty() {
                        (self.pick(snap, &caught_up), false)
                    } else {
                        // Wait only where the last measured lag leaves a margin (half the
                        // budget): a replica lagging about as much as the budget usually misses it.
                        let budget = self.config.wait_budget;
                        let hopeful: SmallVec<[usize; 8]> = tier
                            .iter()
                            .copied()
                            .filter(|&i| snap.nodes[i].lag.unwrap_or(Duration::MAX) <= budget / 2)
                            .collect();
                        if hopeful.is_empty() || budget.is_zero() {
                            break;
                        }
                        (self.pick(snap, &hopeful), true)
                    }
                }
            };
            let node = &self.nodes[choice];
            let mut pooled = match B::checkout(&node.reader_pool).await {
                Ok(p) => p,
                Err(e) => {
                    self.report_failure(choice, &e);
                    excluded.push(choice);
                    continue;
                }
            };
            if let (true, Some(lsn)) = (must_wait, need) {
                bump(&self.counters.lsn_waits);
                match self.wait_for_replay(&mut pooled, lsn).await {
                    Ok(true) => {}
                    Ok(false) => {
                        bump(&self.counters.lsn_wait_timeouts);
                        break;
                    }
                    Err(e) => {
                        self.report_failure(choice, &e);
                        excluded.push(choice);
                        continue;
                    }
                }
            }
            bump(&self.counters.reads_replica);
            return Ok(ReadConn::new(self.clone(), choice, pooled, false));
        }
        self.read_on_primary(true).await
    }

    fn pick(&self, snap: &Snapshot, among: &[usize]) -> usize {
        if among.len() == 1 {
            return among[0];
        }
        let cands: SmallVec<[Candidate<'_>; 8]> = among
            .iter()
            .map(|&i| Candidate {
                node: i,
                name: &snap.nodes[i].name,
                weight: snap.nodes[i].weight,
                in_flight: self.nodes[i].in_flight.load(Ordering::Relaxed),
                lag_bytes: snap.nodes[i].lag_bytes,
            })
            .collect();
        among[self.picker.pick(&cands).min(among.len() - 1)]
    }

    /// Polls the replica's replay LSN until it reaches `lsn` or the wait budget runs out.
    async fn wait_for_replay(
        &self,
        pooled: &mut B::Pooled,
        lsn: Lsn,
    ) -> Result<bool, BackendError> {
        let deadline = Instant::now() + self.config.wait_budget;
        let mut pause = Duration::from_millis(1);
        loop {
            let text = B::query_text(pooled, sql::REPLAY_LSN).await?;
            let replayed = text.as_deref().and_then(|t| t.parse::<Lsn>().ok());
            if replayed >= Some(lsn) {
                return Ok(true);
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(false);
            }
            tokio::time::sleep(pause.min(deadline - now)).await;
            pause = (pause * 2).min(Duration::from_millis(8));
        }
    }
}

/// Outcome of a finished write: the commit LSN and, with a token key configured, the signed
/// token to hand to the client (for example in `X-Read-After`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteReceipt {
    /// The LSN a reader must reach to see this write.
    pub lsn: Lsn,
    /// The causal token as a value.
    pub causal: CausalToken,
    /// The signed token text, when the router has a key.
    pub token: Option<String>,
    /// Whether the user's mark was raised to `lsn`: `None` without a user, `Some(false)` when the
    /// marks store failed. Then only the token protects this user's next reads on other
    /// processes: hand it to the client.
    pub mark_recorded: Option<bool>,
}

/// A session on a replica, or on the primary in read-only mode. Dereferences to the driver's
/// connection. A transaction run on it never changes node.
pub struct ReadConn<B: Backend> {
    pooled: B::Pooled,
    node: usize,
    on_primary: bool,
    inner: Arc<Inner<B>>,
}

impl<B: Backend> ReadConn<B> {
    fn new(inner: Arc<Inner<B>>, node: usize, pooled: B::Pooled, on_primary: bool) -> Self {
        inner.nodes[node].in_flight.fetch_add(1, Ordering::Relaxed);
        ReadConn {
            pooled,
            node,
            on_primary,
            inner,
        }
    }

    /// The node serving this session.
    pub fn node_name(&self) -> &str {
        &self.inner.nodes[self.node].name
    }

    /// Served by the primary (read-only) rather than a replica.
    pub fn on_primary(&self) -> bool {
        self.on_primary
    }

    /// The pooled session, for backend-generic helpers.
    pub fn pooled(&mut self) -> &mut B::Pooled {
        &mut self.pooled
    }

    /// Maps a driver result: a write refused by the read-only session becomes
    /// [`Error::MisroutedWrite`]; a broken connection bans the node and triggers a re-probe.
    pub fn check<T>(&self, result: Result<T, B::QueryError>) -> Result<T, Error> {
        self.check_backend(result.map_err(classified::<B>))
    }

    /// [`ReadConn::check`] for results of [`Backend::execute`] / [`Backend::query_text`].
    pub fn check_backend<T>(&self, result: Result<T, BackendError>) -> Result<T, Error> {
        result.map_err(|source| {
            let node = self.node_name().to_string();
            match source.kind {
                ErrorKind::ReadOnly => Error::MisroutedWrite { node },
                ErrorKind::Connection => {
                    self.inner.report_failure(self.node, &source);
                    Error::Backend { node, source }
                }
                _ => Error::Backend { node, source },
            }
        })
    }
}

fn classified<B: Backend>(e: B::QueryError) -> BackendError {
    let mut out = BackendError::new(B::classify(&e), e.to_string());
    if let Some(code) = B::sqlstate(&e) {
        out = out.with_sqlstate(code);
    }
    out.with_source(e)
}

impl<B: Backend> Drop for ReadConn<B> {
    fn drop(&mut self) {
        self.inner.nodes[self.node]
            .in_flight
            .fetch_sub(1, Ordering::Relaxed);
    }
}

impl<B: Backend> Deref for ReadConn<B> {
    type Target = B::Connection;
    fn deref(&self) -> &B::Connection {
        &self.pooled
    }
}

impl<B: Backend> DerefMut for ReadConn<B> {
    fn deref_mut(&mut self) -> &mut B::Connection {
        &mut self.pooled
    }
}

impl<B: Backend> std::fmt::Debug for ReadConn<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadConn")
            .field("node", &self.node_name())
            .field("on_primary", &self.on_primary)
            .finish()
    }
}

/// A session on the primary. Run the work (commit it), then call [`WriteConn::finish`] to get the
/// commit LSN and token and to update the user's mark. Dropping it without `finish` sets no mark.
pub struct WriteConn<B: Backend> {
    pooled: B::Pooled,
    node: usize,
    user: Option<UserKey>,
    inner: Arc<Inner<B>>,
}

impl<B: Backend> WriteConn<B> {
    /// The primary serving this session.
    pub fn node_name(&self) -> &str {
        &self.inner.nodes[self.node].name
    }

    /// The pooled session, for backend-generic helpers.
    pub fn pooled(&mut self) -> &mut B::Pooled {
        &mut self.pooled
    }

    /// Maps a driver result: a broken connection becomes [`Error::WriteOutcomeUnknown`] (never
    /// retried automatically), a read-only refusal (the node was demoted) becomes
    /// [`Error::WriteRejected`]; both trigger a re-probe.
    pub fn check<T>(&self, result: Result<T, B::QueryError>) -> Result<T, Error> {
        self.check_backend(result.map_err(classified::<B>))
    }

    /// [`WriteConn::check`] for results of [`Backend::execute`] / [`Backend::query_text`].
    pub fn check_backend<T>(&self, result: Result<T, BackendError>) -> Result<T, Error> {
        result.map_err(|source| {
            let node = self.node_name().to_string();
            match source.kind {
                ErrorKind::Connection | ErrorKind::Timeout => {
                    self.inner.nudge();
                    Error::WriteOutcomeUnknown { node, source }
                }
                ErrorKind::ReadOnly | ErrorKind::NotWriter => {
                    self.inner.nudge();
                    Error::WriteRejected { node, source }
                }
                _ => Error::Backend { node, source },
            }
        })
    }

    /// Call after the work committed: reads the session's WAL position (the LSN after COMMIT,
    /// which a reader must reach), raises the user's mark to it and signs a token.
    pub async fn finish(mut self) -> Result<WriteReceipt, Error> {
        let node = self.node_name().to_string();
        let lsn = B::current_wal_lsn(&mut self.pooled)
            .await
            .map_err(|source| {
                self.inner.nudge();
                Error::WriteOutcomeUnknown {
                    node: node.clone(),
                    source,
                }
            })?;
        self.record_commit(node, lsn).await
    }

    /// Commits the explicit transaction opened on this session (`BEGIN`) and finishes like
    /// [`WriteConn::finish`], reading the commit LSN in the same round trip where the driver
    /// allows it. A connection lost here is [`Error::WriteOutcomeUnknown`]; a COMMIT the server
    /// refused (for example a serialization failure) is [`Error::Backend`] and nothing was written.
    pub async fn commit(mut self) -> Result<WriteReceipt, Error> {
        let node = self.node_name().to_string();
        let lsn = B::commit_returning_lsn(&mut self.pooled)
            .await
            .map_err(|source| {
                if matches!(source.kind, ErrorKind::Connection | ErrorKind::Timeout) {
                    self.inner.nudge();
                    Error::WriteOutcomeUnknown {
                        node: node.clone(),
                        source,
                    }
                } else {
                    Error::Backend {
                        node: node.clone(),
                        source,
                    }
                }
            })?;
        self.record_commit(node, lsn).await
    }

    async fn record_commit(self, node: String, lsn: Option<Lsn>) -> Result<WriteReceipt, Error> {
        let lsn = lsn.ok_or_else(|| Error::Backend {
            node: node.clone(),
            source: BackendError::new(ErrorKind::Query, "the primary reported no WAL position"),
        })?;
        let inner = &self.inner;
        inner.max_commit_lsn.fetch_max(lsn.0, Ordering::Relaxed);
        let mut mark_recorded = None;
        if let Some(user) = &self.user {
            let update = tokio::time::timeout(
                inner.config.marks_timeout,
                inner.marks.set_max(user, lsn, inner.config.mark_ttl),
            )
            .await;
            let recorded = matches!(update, Ok(Ok(())));
            if !recorded {
                bump(&inner.counters.mark_update_failures);
                if let Some(suppressed) = inner.marks_warnings.allow() {
                    tracing::warn!(node = %node, suppressed, "could not record the user's write mark");
                }
            }
            mark_recorded = Some(recorded);
        }
        let snap = inner.snapshot.load();
        let causal = CausalToken {
            lsn,
            timeline: snap.nodes[self.node]
                .timeline
                .or(snap.timeline)
                .unwrap_or(0),
            system_id: snap.system_id.unwrap_or(0),
        };
        let token = inner.codec.as_ref().map(|c| c.sign(&causal));
        Ok(WriteReceipt {
            lsn,
            causal,
            token,
            mark_recorded,
        })
    }
}

impl<B: Backend> Deref for WriteConn<B> {
    type Target = B::Connection;
    fn deref(&self) -> &B::Connection {
        &self.pooled
    }
}

impl<B: Backend> DerefMut for WriteConn<B> {
    fn deref_mut(&mut self) -> &mut B::Connection {
        &mut self.pooled
    }
}

impl<B: Backend> std::fmt::Debug for WriteConn<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteConn")
            .field("node", &self.node_name())
            .field("user", &self.user)
            .finish()
    }
}
