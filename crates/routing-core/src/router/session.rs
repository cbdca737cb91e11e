//! The one guard behind [`crate::ReadConn`] and [`crate::WriteConn`]: it owns the pooled
//! session, counts it as in flight on its node, and when dropped makes the session clean for
//! the next holder before it goes back to the pool, or discards it.
//!
//! A pooled session is shared state: whatever a request did to it (left a transaction open,
//! changed a setting or the role, was cancelled halfway) must not reach the next request. The
//! reset runs in a spawned task, off the request's path; until it succeeds the session is held
//! by a [`Returning`] whose own drop discards it, so a reset that fails, times out or never runs
//! (the runtime shutting down) can only close the connection, never return it dirty.
//!
//! A session nobody touched (its connection never handed to code, by reference or otherwise)
//! is exactly as clean as when it was checked out: it goes straight back to the pool, with no
//! task and no round trip. Anything else is reset: neither driver tells what a request left
//! behind (see ARCHITECTURE.md, "Session hygiene").

use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::{Inner, NodeRuntime};
use crate::backend::sql;
use crate::stats::bump;
use crate::{Access, Backend, BackendError, ErrorKind, UserKey};

pub(crate) struct Session<B: Backend> {
    /// `Some` until dropped.
    pooled: Option<B::Pooled>,
    pub(crate) node: usize,
    /// The node's runtime: keeps its pools open until the session is back, even if the node
    /// was removed meanwhile.
    pub(crate) runtime: Arc<NodeRuntime<B>>,
    access: Access,
    pub(crate) inner: Arc<Inner<B>>,
    /// Set while a commit is in flight for these users: if the guard is dropped then (the
    /// caller's future was cancelled), the reset task first records their marks at the
    /// session's commit position, so a cancelled `finish`/`commit` never loses them.
    pub(crate) pending_mark: Vec<UserKey>,
    /// Set once the connection was handed out (`Deref`, `DerefMut`, `pooled()`): from then on
    /// it may hold state a request left, and is reset before reuse. Atomic because `Deref`
    /// takes `&self` (diesel-async runs queries through a shared reference too).
    touched: AtomicBool,
}

impl<B: Backend> Session<B> {
    pub(crate) fn new(
        inner: Arc<Inner<B>>,
        node: usize,
        runtime: Arc<NodeRuntime<B>>,
        access: Access,
        pooled: B::Pooled,
    ) -> Self {
        runtime.in_flight.fetch_add(1, Ordering::Relaxed);
        Session {
            pooled: Some(pooled),
            node,
            runtime,
            access,
            inner,
            pending_mark: Vec::new(),
            touched: AtomicBool::new(false),
        }
    }

    pub(crate) fn pooled(&mut self) -> &mut B::Pooled {
        *self.touched.get_mut() = true;
        self.pooled
            .as_mut()
            .expect("a session is present until its guard drops")
    }

    fn pooled_ref(&self) -> &B::Pooled {
        self.touched.store(true, Ordering::Relaxed);
        self.pooled
            .as_ref()
            .expect("a session is present until its guard drops")
    }

    pub(crate) fn node_name(&self) -> &str {
        &self.runtime.name
    }
}

impl<B: Backend> Deref for Session<B> {
    type Target = B::Connection;
    fn deref(&self) -> &B::Connection {
        self.pooled_ref()
    }
}

impl<B: Backend> DerefMut for Session<B> {
    fn deref_mut(&mut self) -> &mut B::Connection {
        self.pooled()
    }
}

impl<B: Backend> Drop for Session<B> {
    fn drop(&mut self) {
        self.runtime.in_flight.fetch_sub(1, Ordering::Relaxed);
        let Some(pooled) = self.pooled.take() else {
            return;
        };
        if !*self.touched.get_mut() && self.pending_mark.is_empty() {
            // Never handed out: as clean as it came from the pool.
            drop(pooled);
            return;
        }
        let returning = Returning::<B> {
            pooled: Some(pooled),
        };
        // Without a runtime nothing can reset the session: `returning` drops and discards it.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(clean_and_return(
                self.inner.clone(),
                self.runtime.clone(),
                self.access,
                returning,
                std::mem::take(&mut self.pending_mark),
            ));
        }
    }
}

/// A session on its way back to the pool: discarded unless the reset succeeded.
struct Returning<B: Backend> {
    pooled: Option<B::Pooled>,
}

impl<B: Backend> Drop for Returning<B> {
    fn drop(&mut self) {
        if let Some(mut pooled) = self.pooled.take() {
            B::discard(&mut pooled);
        }
    }
}

async fn clean_and_return<B: Backend>(
    inner: Arc<Inner<B>>,
    node: Arc<NodeRuntime<B>>,
    access: Access,
    mut returning: Returning<B>,
    pending_mark: Vec<UserKey>,
) {
    let Some(pooled) = returning.pooled.as_mut() else {
        return;
    };
    let limit = inner.config.pool.connect_timeout;
    if !pending_mark.is_empty() {
        // Queries on one session run in order: this runs after the cancelled COMMIT, whatever
        // became of it, so its position covers that commit if it happened.
        let recorded = tokio::time::timeout(limit, async {
            match B::current_wal_lsn(pooled).await {
                Ok(Some(lsn)) => {
                    let mut all = true;
                    for user in &pending_mark {
                        all &= inner.raise_mark(user, lsn).await;
                    }
                    all
                }
                _ => false,
            }
        })
        .await
        .unwrap_or(false);
        if !recorded {
            bump(&inner.counters.mark_update_failures);
            tracing::warn!(node = %node.name, "a cancelled commit's mark could not be recorded");
        }
    }
    match tokio::time::timeout(limit, reset_session::<B>(pooled, access)).await {
        Ok(Ok(())) => {
            bump(&inner.counters.sessions_reset);
            // Back to the pool, clean.
            drop(returning.pooled.take());
        }
        Ok(Err(e)) => {
            bump(&inner.counters.sessions_discarded);
            tracing::debug!(node = %node.name, error = %e, "session discarded: reset failed");
        }
        Err(_) => {
            bump(&inner.counters.sessions_discarded);
            tracing::debug!(node = %node.name, ?limit, "session discarded: reset timed out");
        }
    }
}

/// Makes a session as it was after connect ([`Access::reset_sql`]); an error means it must be
/// discarded.
pub(crate) async fn reset_session<B: Backend>(
    pooled: &mut B::Pooled,
    access: Access,
) -> Result<(), BackendError> {
    if !B::reusable(pooled) {
        return Err(BackendError::new(
            ErrorKind::Connection,
            "the driver still tracks an open transaction on this session",
        ));
    }
    let reset = access.reset_sql();
    match B::execute_batch(pooled, reset).await {
        Ok(()) => Ok(()),
        // An aborted transaction refuses everything but its end: end it, then reset.
        Err(e) if e.kind != ErrorKind::Connection => {
            B::execute_batch(pooled, sql::ROLLBACK).await?;
            B::execute_batch(pooled, reset).await
        }
        Err(e) => Err(e),
    }
}

/// A driver error from application code, classified, with its SQLSTATE and the driver's error
/// kept as the source.
pub(crate) fn classified<B: Backend>(e: B::QueryError) -> BackendError {
    let mut out = BackendError::new(B::classify(&e), e.to_string());
    if let Some(code) = B::sqlstate(&e) {
        out = out.with_sqlstate(code);
    }
    out.with_source(e)
}
