//! The write path: the elected writer's sessions, the write guard, commits and their receipts.

use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::future::BoxFuture;

use super::session::{Session, classified};
use super::{Inner, NodeRuntime, Router};
use crate::backend::sql;
use crate::stats::bump;
use crate::{
    Access, Backend, BackendError, CausalToken, Error, ErrorKind, Lsn, RequestContext, UserKey,
};

impl<B: Backend> Router<B> {
    /// A write session on the primary, with no user (no mark is set on finish).
    pub async fn write(&self) -> Result<WriteConn<B>, Error> {
        self.write_with(&RequestContext::default()).await
    }

    /// A write session on the primary for the context's user. Waits up to `write_deadline` for a
    /// reachable primary (across a failover), then fails with [`Error::NoPrimary`].
    #[tracing::instrument(level = "debug", name = "routing.write", skip_all, fields(node))]
    pub async fn write_with(&self, ctx: &RequestContext) -> Result<WriteConn<B>, Error> {
        let (node, runtime, pooled) = self.inner.acquire_on_writer(Access::ReadWrite).await?;
        bump(&self.inner.counters.writes);
        crate::telemetry::write(&runtime.metrics);
        Ok(WriteConn {
            session: Session::new(self.inner.clone(), node, runtime, Access::ReadWrite, pooled),
            user: ctx.user.clone(),
            also_mark: Vec::new(),
        })
    }

    /// Runs `work` in a transaction on the primary for the context's user: commits when it
    /// returns `Ok` (and then, only then, raises the user's mark and signs a token), rolls back
    /// when it returns `Err`, and when the returned future is dropped before it finished. See
    /// [`WriteConn::transaction`].
    pub async fn transaction<T, E, F>(
        &self,
        ctx: &RequestContext,
        work: F,
    ) -> Result<(T, WriteReceipt), E>
    where
        F: for<'c> FnOnce(&'c mut B::Connection) -> BoxFuture<'c, Result<T, E>>,
        E: From<Error>,
    {
        self.write_with(ctx).await?.transaction(work).await
    }
}

impl<B: Backend> Inner<B> {
    /// A session on the current writer, waiting across failovers up to the write deadline.
    pub(super) async fn acquire_on_writer(
        &self,
        access: Access,
    ) -> Result<(usize, Arc<NodeRuntime<B>>, B::Pooled), Error> {
        let started = tokio::time::Instant::now();
        let deadline = started + self.config.write_deadline;
        let mut changes = self.topo.subscribe_changes();
        loop {
            let snap = self.topo.load_full();
            // The writer is never removed (`Router::remove_node` refuses it), so its slot is
            // present; a missing one is treated like no writer.
            if let Some((w, node)) = snap
                .writer
                .and_then(|w| self.nodes.get(w).map(|rt| (w, rt)))
            {
                let pool = if access == Access::ReadWrite {
                    &node.writer_pool
                } else {
                    &node.reader_pool
                };
                changes.borrow_and_update();
                let generation = self.topo.epoch().generation();
                if access == Access::ReadWrite && B::admit_standby(pool).await {
                    // Held since before the election: the checkout below gets it, already
                    // checked, where a new connection to a just-promoted server can take long.
                    tracing::debug!(node = %node.name, "standby writer session pooled");
                }
                // Another writer elected, or another server behind the same node.
                let moved = || {
                    self.topo.load().writer != Some(w)
                        || self.topo.epoch().generation() != generation
                };
                let checkout = crate::telemetry::checkout(
                    &node.metrics,
                    access,
                    node.refusal.checkout(B::checkout(pool)),
                );
                let checkout = tokio::time::timeout_at(deadline, checkout);
                tokio::pin!(checkout);
                // A checkout on a writer that stopped answering (blackholed, not refusing) can
                // take the pool's whole connect timeout. Give up on it as soon as the monitor
                // elects another writer, or sees another server behind the same node (a stable
                // endpoint: a connection held by a proxy with no live server reaches the new one
                // late if at all, and a session made under the old generation would be
                // discarded anyway), so writes follow a failover at once.
                let outcome = loop {
                    tokio::select! {
                        biased;
                        outcome = &mut checkout => break Some(outcome),
                        Ok(()) = changes.changed() => {
                            if moved() {
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
                    // A session the pool made while the generation moved (sqlx cannot stamp a
                    // new connection) may be on the server the topology just left behind.
                    Ok(Ok(pooled)) if moved() => {
                        let mut pooled = pooled;
                        B::discard(&mut pooled);
                        continue;
                    }
                    Ok(Ok(pooled)) => return Ok((w, node.clone(), pooled)),
                    // Every session is in use and the writer answers: it stays the writer, and
                    // waiting out the deadline would only pile up more work on it.
                    Ok(Err(e)) if e.kind == ErrorKind::PoolBusy => {
                        return Err(Error::PoolExhausted {
                            node: node.name.to_string(),
                            waited: started.elapsed(),
                        });
                    }
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
    /// Whether the users' marks (the request's user and any [`WriteConn::mark_user`] named) were
    /// raised to `lsn`: `None` without a user, `Some(false)` when the marks store failed. Then only the token protects this user's next reads on other
    /// processes: hand it to the client.
    pub mark_recorded: Option<bool>,
}

/// A session on the primary. Either run the work in [`WriteConn::transaction`], or run it
/// (committing it) and call [`WriteConn::finish`], or open a transaction and end it with
/// [`WriteConn::commit`]: each returns the commit LSN and token and raises the user's mark.
/// Dropping the guard otherwise sets no mark and rolls back whatever transaction is still open;
/// the session is reset before the next request gets it, or closed.
pub struct WriteConn<B: Backend> {
    session: Session<B>,
    user: Option<UserKey>,
    /// Users this write creates or acts for besides the request's own ([`WriteConn::mark_user`]).
    also_mark: Vec<UserKey>,
}

impl<B: Backend> WriteConn<B> {
    /// The primary serving this session.
    pub fn node_name(&self) -> &str {
        self.session.node_name()
    }

    /// The pooled session, for backend-generic helpers.
    pub fn pooled(&mut self) -> &mut B::Pooled {
        self.session.pooled()
    }

    /// Also raises this user's mark when the write commits: for a write that creates the user
    /// (a sign-up, whose id exists only after the INSERT) or acts for another one. The
    /// request's own user, if any, is still marked.
    pub fn mark_user(&mut self, user: impl Into<UserKey>) -> &mut Self {
        let user = user.into();
        if self.user.as_ref() != Some(&user) && !self.also_mark.contains(&user) {
            self.also_mark.push(user);
        }
        self
    }

    /// Every user whose mark a commit raises.
    fn marked_users(&self) -> Vec<UserKey> {
        self.user.iter().chain(&self.also_mark).cloned().collect()
    }

    /// Maps a driver result: a broken connection becomes [`Error::WriteOutcomeUnknown`] (never
    /// retried automatically), a read-only refusal (the node was demoted) becomes
    /// [`Error::WriteRejected`]; both trigger a re-probe.
    pub fn check<T>(&self, result: Result<T, B::QueryError>) -> Result<T, Error> {
        self.check_backend(result.map_err(classified::<B>))
    }

    /// [`WriteConn::check`] for results of [`Backend::execute`] / [`Backend::query_text`].
    pub fn check_backend<T>(&self, result: Result<T, BackendError>) -> Result<T, Error> {
        result.map_err(|source| self.map_error(source))
    }

    fn map_error(&self, source: BackendError) -> Error {
        let node = self.node_name().to_string();
        match source.kind {
            ErrorKind::Connection | ErrorKind::Timeout => {
                self.session.inner.nudge();
                Error::WriteOutcomeUnknown { node, source }
            }
            ErrorKind::ReadOnly | ErrorKind::NotWriter => {
                self.session.inner.nudge();
                Error::WriteRejected { node, source }
            }
            _ if source.is_aborted_transaction() => Error::NotCommitted {
                node,
                reason: "the transaction was aborted by an earlier error and rolled back".into(),
            },
            _ => Error::Backend { node, source },
        }
    }

    /// Runs `work` in a transaction: `BEGIN`, then `work` on the connection; on `Ok` commits
    /// ([`WriteConn::commit`]: the mark and token come only from a real commit), on `Err` rolls
    /// back and returns the error. If the returned future is dropped before it finished, the
    /// transaction is rolled back when the session returns to the pool (and, when the COMMIT was
    /// already sent, the user's mark is still recorded).
    ///
    /// `work` gets the driver's connection and returns a boxed future; errors convert from
    /// [`Error`], so an application error type with a `From<routing_core::Error>` impl (and one
    /// for the driver's error) lets `?` work on both.
    pub async fn transaction<T, E, F>(self, work: F) -> Result<(T, WriteReceipt), E>
    where
        F: for<'c> FnOnce(&'c mut B::Connection) -> BoxFuture<'c, Result<T, E>>,
        E: From<Error>,
    {
        self.transaction_backend(move |pooled: &mut B::Pooled| work(&mut **pooled))
            .await
    }

    /// [`WriteConn::transaction`] for work written against the [`Backend`] trait (on the pooled
    /// session, with [`Backend::execute`] / [`Backend::query_text`]).
    pub async fn transaction_backend<T, E, F>(mut self, work: F) -> Result<(T, WriteReceipt), E>
    where
        F: for<'c> FnOnce(&'c mut B::Pooled) -> BoxFuture<'c, Result<T, E>>,
        E: From<Error>,
    {
        self.begin().await?;
        match work(self.session.pooled()).await {
            Ok(value) => Ok((value, self.commit().await?)),
            Err(e) => {
                self.rollback().await;
                Err(e)
            }
        }
    }

    /// Opens a transaction on this session (`BEGIN`); end it with [`WriteConn::commit`], or
    /// drop the guard to roll it back. [`WriteConn::transaction`] does both around a closure.
    pub async fn begin(&mut self) -> Result<(), Error> {
        let begun = B::execute_batch(self.session.pooled(), sql::BEGIN).await;
        begun.map_err(|source| self.map_error(source))
    }

    /// Best effort: if the ROLLBACK fails, the reset on drop ends the transaction or closes the
    /// session.
    async fn rollback(&mut self) {
        let _ = B::execute_batch(self.session.pooled(), sql::ROLLBACK).await;
    }

    /// Call after the work committed: reads the session's commit position, raises the user's
    /// mark to it and signs a token. [`Error::NotCommitted`] when a transaction that wrote is
    /// still open on the session (nothing is committed yet; it is rolled back on drop) or the
    /// open transaction was aborted.
    pub async fn finish(mut self) -> Result<WriteReceipt, Error> {
        self.session.pending_mark = self.marked_users();
        let read = B::current_wal_lsn(self.session.pooled()).await;
        let lsn = match read {
            Ok(Some(lsn)) => lsn,
            Ok(None) => {
                self.session.pending_mark.clear();
                return Err(Error::NotCommitted {
                    node: self.node_name().to_string(),
                    reason: "finish() was called with a transaction still open: commit it first, \
                             or use commit() or transaction()"
                        .into(),
                });
            }
            Err(source) => {
                self.session.pending_mark.clear();
                return Err(match self.map_error(source) {
                    Error::Backend { node, source } => Error::WriteOutcomeUnknown { node, source },
                    other => other,
                });
            }
        };
        self.record_commit(lsn).await
    }

    /// Commits the transaction open on this session and finishes like [`WriteConn::finish`],
    /// reading the commit LSN in the same round trip where the driver allows it. A connection
    /// lost here is [`Error::WriteOutcomeUnknown`]; a transaction that an earlier error aborted
    /// (PostgreSQL would answer its COMMIT with ROLLBACK) is [`Error::NotCommitted`]; a COMMIT
    /// the server refused (for example a serialization failure) is [`Error::Backend`]. In both
    /// of the latter nothing was written.
    pub async fn commit(mut self) -> Result<WriteReceipt, Error> {
        // From here on a cancelled future still records the mark (see `Session`).
        self.session.pending_mark = self.marked_users();
        let committed = B::commit_returning_lsn(self.session.pooled()).await;
        let lsn = match committed {
            Ok(Some(lsn)) => lsn,
            Ok(None) => {
                self.session.pending_mark.clear();
                return Err(Error::Backend {
                    node: self.node_name().to_string(),
                    source: BackendError::new(
                        ErrorKind::Query,
                        "the primary reported no WAL position after COMMIT",
                    ),
                });
            }
            Err(source) => {
                if !matches!(source.kind, ErrorKind::Connection | ErrorKind::Timeout) {
                    // The server answered: nothing was committed, there is nothing to mark.
                    self.session.pending_mark.clear();
                }
                return Err(self.map_error(source));
            }
        };
        self.record_commit(lsn).await
    }

    async fn record_commit(mut self, lsn: Lsn) -> Result<WriteReceipt, Error> {
        let inner = self.session.inner.clone();
        inner.max_commit_lsn.fetch_max(lsn.0, Ordering::Relaxed);
        let mut mark_recorded = None;
        // Kept on the session until recorded: a future dropped during the update still marks.
        let users = self.session.pending_mark.clone();
        if !users.is_empty() {
            let mut recorded = true;
            for user in &users {
                recorded &= inner.raise_mark(user, lsn).await;
            }
            if !recorded {
                bump(&inner.counters.mark_update_failures);
                if let Some(suppressed) = inner.marks_warnings.allow() {
                    tracing::warn!(node = %self.node_name(), suppressed, "could not record the user's write mark");
                }
            }
            mark_recorded = Some(recorded);
        }
        // Recorded, or reported as not recorded: the drop path has nothing left to do.
        self.session.pending_mark.clear();
        let snap = inner.topo.load();
        let causal = CausalToken {
            lsn,
            timeline: snap.nodes[self.session.node]
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

impl<B: Backend> Inner<B> {
    /// Raises the user's mark to `lsn` within `marks_timeout`; true when the store took it.
    pub(crate) async fn raise_mark(&self, user: &UserKey, lsn: Lsn) -> bool {
        let update = crate::telemetry::marks(
            &self.metrics,
            crate::telemetry::MarksOp::Set,
            tokio::time::timeout(
                self.config.marks_timeout,
                self.marks.set_max(user, lsn, self.config.mark_ttl),
            ),
        )
        .await;
        matches!(update, Ok(Ok(())))
    }
}

impl<B: Backend> Deref for WriteConn<B> {
    type Target = B::Connection;
    fn deref(&self) -> &B::Connection {
        &self.session
    }
}

impl<B: Backend> DerefMut for WriteConn<B> {
    fn deref_mut(&mut self) -> &mut B::Connection {
        &mut self.session
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
