//! The read path: which node serves a read, and the read guard.

use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use smallvec::SmallVec;

use super::plan::{Need, Step, plan_replicas};
use super::session::{Session, classified};
use super::{Inner, NodeRuntime, Router};
use crate::backend::sql;
use crate::stats::bump;
use crate::{
    Access, Backend, BackendError, Candidate, CausalToken, ClusterView, Consistency, Error,
    ErrorKind, Lsn, MarksFailure, RequestContext, Snapshot, TokenPolicy, UserKey, judge,
};

impl<B: Backend> Router<B> {
    /// A read session with the router's default consistency.
    pub async fn read(&self) -> Result<ReadConn<B>, Error> {
        self.read_with(&RequestContext::default()).await
    }

    /// A read session routed for this request: see [`Consistency`].
    #[tracing::instrument(
        level = "debug",
        name = "routing.read",
        skip_all,
        fields(mode, node, reason, guard, region)
    )]
    pub async fn read_with(&self, ctx: &RequestContext) -> Result<ReadConn<B>, Error> {
        let inner = &self.inner;
        let snap = inner.topo.load_full();
        crate::telemetry::read_region(ctx.region.as_ref());
        let mode = if ctx.force_primary {
            Consistency::Primary
        } else {
            ctx.consistency.unwrap_or(inner.config.default_consistency)
        };
        crate::telemetry::read_mode(&mode);
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
                let mut mark_needed = false;
                let mut early = None;
                if mode == Consistency::ReadYourWrites
                    && let Some(user) = &ctx.user
                {
                    // The marks lookup runs while a session is checked out on the replica the
                    // read would get without a mark: with the mark the same replica usually
                    // serves it (the snapshot shows it past the LSN), and the lookup's round
                    // trip then costs no time of its own.
                    let guess = need.map_or(Need::Any, Need::AtLeast);
                    let (mark, checked_out) = tokio::join!(
                        inner.lookup_mark(user),
                        inner.early_checkout(&snap, ctx, guess)
                    );
                    early = checked_out;
                    match mark {
                        Ok(Some(m)) => {
                            mark_needed = true;
                            need = need.max(Some(m.lsn));
                        }
                        Ok(None) => {}
                        Err(()) => primary = matches!(inner.on_marks_failure(), Need::Primary),
                    }
                }
                crate::telemetry::read_guard(ctx.token.is_some(), mark_needed, primary);
                let need = match need {
                    _ if primary => Need::Primary,
                    Some(lsn) => Need::AtLeast(lsn),
                    None => Need::Any,
                };
                if let Some((node, runtime, pooled)) = early {
                    if inner.serves_at_once(&snap, ctx, need, node) {
                        bump(&inner.counters.reads_replica);
                        crate::telemetry::read_on_replica(
                            &runtime.metrics,
                            false,
                            matches!(need, Need::AtLeast(_)),
                        );
                        return Ok(ReadConn::new(inner.clone(), node, runtime, pooled, false));
                    }
                    // Not good enough after all: never handed out, it goes back as it came.
                    drop(pooled);
                }
                need
            }
        };
        match need {
            Need::Primary => inner.read_on_primary(false).await,
            need => inner.read_on_replica(&snap, ctx, need).await,
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
                tracing::debug!(node = %conn.node_name(), "read retried elsewhere after a connection failure");
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
        let first = work(conn.pooled()).await;
        match first {
            Ok(v) => Ok(v),
            Err(e) if e.kind == ErrorKind::Connection => {
                bump(&self.inner.counters.read_retries);
                tracing::debug!(node = %conn.node_name(), "read retried elsewhere after a connection failure");
                drop(conn.check_backend::<()>(Err(e)));
                drop(conn);
                let mut conn = self.read_with(ctx).await?;
                let second = work(conn.pooled()).await;
                conn.check_backend(second)
            }
            Err(e) => conn.check_backend(Err(e)),
        }
    }
}

impl<B: Backend> Inner<B> {
    async fn lookup_mark(&self, user: &UserKey) -> Result<Option<crate::Mark>, ()> {
        let lookup = tokio::time::timeout(self.config.marks_timeout, self.marks.get(user));
        match crate::telemetry::marks(&self.metrics, crate::telemetry::MarksOp::Get, lookup).await {
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
        let view = ClusterView::from_snapshot(
            snap,
            Lsn(self.max_commit_lsn.load(Ordering::Relaxed)),
            self.config.probe_interval,
            Instant::now(),
        );
        let policy = TokenPolicy {
            floor: self.config.future_lsn_tolerance,
            ..TokenPolicy::default()
        };
        let verdict = judge(token, &view, &policy);
        if verdict.is_untrusted() {
            bump(&self.counters.tokens_untrusted);
        }
        Ok(verdict.route()?)
    }

    /// A session on the current writer, waiting across failovers up to the write deadline.
    pub(super) async fn read_on_primary(
        self: &Arc<Self>,
        fallback: bool,
    ) -> Result<ReadConn<B>, Error> {
        let (node, runtime, pooled) =
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
        crate::telemetry::read_on_primary(&runtime.metrics, &self.metrics, fallback);
        Ok(ReadConn::new(self.clone(), node, runtime, pooled, true))
    }

    async fn read_on_replica(
        self: &Arc<Self>,
        snap: &Snapshot,
        ctx: &RequestContext,
        need: Need,
    ) -> Result<ReadConn<B>, Error> {
        let steps = self.plan(snap, ctx, need);
        let lsn = match need {
            Need::AtLeast(lsn) => Some(lsn),
            _ => None,
        };
        // At most two checkouts: a read never tours every replica before the primary.
        let mut excluded: SmallVec<[usize; 2]> = SmallVec::new();
        let mut steps = steps.into_iter();
        let mut step = steps.next();
        while excluded.len() < 2 {
            let Some(current) = step.as_mut() else { break };
            current.among.retain(|i| !excluded.contains(i));
            if current.among.is_empty() {
                step = steps.next();
                continue;
            }
            let choice = self.pick(snap, &current.among);
            let must_wait = current.wait;
            // Removed since the snapshot was taken: never checked out again.
            let Some(node) = self.nodes.get(choice) else {
                excluded.push(choice);
                continue;
            };
            let checkout = node.refusal.checkout(B::checkout(&node.reader_pool));
            let checkout = crate::telemetry::checkout(&node.metrics, Access::ReadOnly, checkout);
            let mut pooled = match checkout.await {
                Ok(p) => p,
                Err(e) => {
                    // A busy pool is not banned (`report_failure` ignores it): the replica stays
                    // eligible; this read tries another node.
                    self.report_checkout_failure(choice, &e);
                    excluded.push(choice);
                    continue;
                }
            };
            if let (true, Some(lsn)) = (must_wait, lsn) {
                bump(&self.counters.lsn_waits);
                let started = Instant::now();
                let wait = self.wait_for_replay(choice, pooled, lsn);
                let outcome = crate::telemetry::lsn_wait(&node.metrics, wait).await;
                if let Ok(waited) = &outcome {
                    let (budget, now) = (self.config.wait_budget, Instant::now());
                    let took = now - started;
                    node.catch_up.record(took, waited.is_some(), budget, now);
                }
                match outcome {
                    Ok(Some(caught_up)) => pooled = caught_up,
                    Ok(None) => {
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
            crate::telemetry::read_on_replica(&node.metrics, must_wait, lsn.is_some());
            return Ok(ReadConn::new(self.clone(), choice, node, pooled, false));
        }
        self.read_on_primary(true).await
    }

    /// A session on the replica the plan for `need` picks first, if that step needs no wait
    /// (see the marks lookup in `read_with`). A failed checkout is reported like any other;
    /// the read then takes its ordinary path.
    async fn early_checkout(
        &self,
        snap: &Snapshot,
        ctx: &RequestContext,
        need: Need,
    ) -> Option<(usize, Arc<NodeRuntime<B>>, B::Pooled)> {
        let steps = self.plan(snap, ctx, need);
        let first = steps.first().filter(|s| !s.wait && !s.among.is_empty())?;
        let choice = self.pick(snap, &first.among);
        let node = self.nodes.get(choice)?;
        match node.refusal.checkout(B::checkout(&node.reader_pool)).await {
            Ok(pooled) => Some((choice, node, pooled)),
            Err(e) => {
                self.report_checkout_failure(choice, &e);
                None
            }
        }
    }

    /// Would the plan for `need` serve the read on `node` without waiting (first step)?
    fn serves_at_once(
        &self,
        snap: &Snapshot,
        ctx: &RequestContext,
        need: Need,
        node: usize,
    ) -> bool {
        let steps = self.plan(snap, ctx, need);
        steps
            .first()
            .is_some_and(|s| !s.wait && s.among.contains(&node))
    }

    /// The read plan for `need` (see [`plan_replicas`]), with what this router's recent waits
    /// on each replica took.
    fn plan(&self, snap: &Snapshot, ctx: &RequestContext, need: Need) -> SmallVec<[Step; 4]> {
        let now = Instant::now();
        plan_replicas(
            snap,
            now,
            &self.regions,
            ctx.region.as_ref(),
            need,
            self.config.wait_budget,
            |i| self.nodes.expected_wait(i, now),
        )
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
                in_flight: self
                    .nodes
                    .get(i)
                    .map_or(0, |n| n.in_flight.load(Ordering::Relaxed)),
                lag_bytes: snap.nodes[i].lag_bytes,
            })
            .collect();
        among[self.picker.pick(&cands).min(among.len() - 1)]
    }

    /// Polls replica `i`'s replay LSN until it reaches `lsn` (then returns the session the last
    /// poll ran on: it has replayed `lsn`, so the read is exact) or the wait budget runs out
    /// (`None`). Between polls no session is held: each poll is a short checkout, one query,
    /// release, so a burst of waiting reads takes turns on the pool instead of pinning a
    /// session each for the whole budget. `pooled` is the first poll's session.
    async fn wait_for_replay(
        &self,
        i: usize,
        pooled: B::Pooled,
        lsn: Lsn,
    ) -> Result<Option<B::Pooled>, BackendError> {
        let deadline = tokio::time::Instant::now() + self.config.wait_budget;
        let mut pause = Duration::from_millis(1);
        let mut pooled = Some(pooled);
        loop {
            let session = match pooled.take() {
                Some(p) => Some(p),
                // Bounded by what is left of the budget; a busy pool only means a later poll.
                None => {
                    let Some(node) = self.nodes.get(i) else {
                        // Removed while the read waited for it.
                        return Ok(None);
                    };
                    let checkout = node.refusal.checkout(B::checkout(&node.reader_pool));
                    match tokio::time::timeout_at(deadline, checkout).await {
                        Ok(Ok(p)) => Some(p),
                        Ok(Err(e)) if e.kind == ErrorKind::PoolBusy => None,
                        Ok(Err(e)) => return Err(e),
                        Err(_) => return Ok(None),
                    }
                }
            };
            if let Some(mut session) = session {
                let text = B::query_text(&mut session, sql::REPLAY_LSN).await?;
                let replayed = text.as_deref().and_then(|t| t.parse::<Lsn>().ok());
                if replayed >= Some(lsn) {
                    return Ok(Some(session));
                }
                // Only a SELECT ran on it: dropped here, it goes back to the pool as it came.
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            tokio::time::sleep(pause.min(deadline - now)).await;
            pause = (pause * 2).min(Duration::from_millis(8));
        }
    }
}

/// A session on a replica, or on the primary in read-only mode. Dereferences to the driver's
/// connection. A transaction run on it never changes node. When dropped, the session is reset
/// (any open transaction rolled back, settings and role restored, read-only verified) before
/// the next request gets it, or closed.
pub struct ReadConn<B: Backend> {
    session: Session<B>,
    on_primary: bool,
}

impl<B: Backend> ReadConn<B> {
    pub(super) fn new(
        inner: Arc<Inner<B>>,
        node: usize,
        runtime: Arc<NodeRuntime<B>>,
        pooled: B::Pooled,
        on_primary: bool,
    ) -> Self {
        ReadConn {
            session: Session::new(inner, node, runtime, Access::ReadOnly, pooled),
            on_primary,
        }
    }

    /// The node serving this session.
    pub fn node_name(&self) -> &str {
        self.session.node_name()
    }

    /// Served by the primary (read-only) rather than a replica.
    pub fn on_primary(&self) -> bool {
        self.on_primary
    }

    /// The pooled session, for backend-generic helpers.
    pub fn pooled(&mut self) -> &mut B::Pooled {
        self.session.pooled()
    }

    /// Maps a driver result: a write refused by the read-only session (including a
    /// `BEGIN READ WRITE` on a replica, and any permission error under read-only credentials,
    /// see [`crate::NodeConfig::reader_url`]) becomes [`Error::MisroutedWrite`]; a broken
    /// connection bans the node and triggers a re-probe.
    pub fn check<T>(&self, result: Result<T, B::QueryError>) -> Result<T, Error> {
        self.check_backend(result.map_err(classified::<B>))
    }

    /// [`ReadConn::check`] for results of [`Backend::execute`] / [`Backend::query_text`].
    pub fn check_backend<T>(&self, result: Result<T, BackendError>) -> Result<T, Error> {
        result.map_err(|source| {
            let node = self.node_name().to_string();
            let inner = &self.session.inner;
            let read_only_role = self.session.runtime.read_only_role;
            match source.kind {
                ErrorKind::ReadOnly => Error::MisroutedWrite { node },
                // The reader role may read everything and write nothing: a refusal is a write.
                _ if read_only_role && is_permission_denied(&source) => {
                    Error::MisroutedWrite { node }
                }
                ErrorKind::Connection => {
                    inner.report_failure(self.session.node, &source);
                    Error::Backend { node, source }
                }
                _ => Error::Backend { node, source },
            }
        })
    }
}

impl<B: Backend> Deref for ReadConn<B> {
    type Target = B::Connection;
    fn deref(&self) -> &B::Connection {
        &self.session
    }
}

impl<B: Backend> DerefMut for ReadConn<B> {
    fn deref_mut(&mut self) -> &mut B::Connection {
        &mut self.session
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

/// SQLSTATE 42501, or its message where the driver dropped the code.
fn is_permission_denied(e: &BackendError) -> bool {
    e.sqlstate.as_deref() == Some("42501") || e.message.contains("permission denied for ")
}
