//! The monitor: one task per node (started at build or when a node is added, ended when it is
//! removed), probing on an interval and at once when a caller reports a
//! failure. Tasks hold only a weak reference, so they end with the router.

use std::sync::{Arc, Weak};
use std::time::Duration;

use crate::backend::sql;
use crate::handle::TopologyHandle;
use crate::refusal::RefusalCheck;
use crate::{Backend, BackendError, ErrorKind, ProbeReport};

/// Re-probes triggered by callers come no closer together than this, per node.
const MIN_REPROBE_GAP: Duration = Duration::from_millis(10);

/// What the monitor probes one node with: a pool used by nothing else, the node's refused-
/// connection check, and the timing.
pub(crate) struct NodeProbe<B: Backend> {
    pub(crate) pool: B::Pool,
    /// The node's refused-connection check, shared with its other pools.
    pub(crate) refusal: Arc<RefusalCheck>,
    pub(crate) name: Arc<str>,
    pub(crate) interval: Duration,
    pub(crate) timeout: Duration,
    /// Set when the node is removed: the task ends and drops its pool.
    pub(crate) stop: tokio::sync::watch::Receiver<bool>,
    /// Held until the task ends, so whoever waits for the node to drain sees the probe pool go.
    pub(crate) _alive: Arc<tokio::sync::watch::Sender<()>>,
}

/// Starts the probing task of node `i`. It holds the topology weakly and stops when it is
/// dropped or shut down, or when the node is removed.
pub(crate) fn spawn_node<B: Backend>(topo: &Arc<TopologyHandle>, i: usize, probe: NodeProbe<B>) {
    let weak = Arc::downgrade(topo);
    let nudges = topo.subscribe_nudges();
    let shutdown = topo.subscribe_shutdown();
    tokio::spawn(run_node(weak, probe, i, nudges, shutdown));
}

async fn run_node<B: Backend>(
    weak: Weak<TopologyHandle>,
    mut probes: NodeProbe<B>,
    i: usize,
    mut nudges: tokio::sync::watch::Receiver<u64>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        if *shutdown.borrow() || *probes.stop.borrow() {
            return;
        }
        let outcome = probe(&probes).await;
        let Some(topo) = weak.upgrade() else { return };
        if topo.record(i, outcome.as_ref().copied()) {
            tracing::debug!(node = %probes.name, "topology changed");
        }
        drop(topo);
        nudges.mark_unchanged();
        tokio::select! {
            _ = tokio::time::sleep(probes.interval) => {}
            r = nudges.changed() => {
                if r.is_err() { return; }
                tokio::time::sleep(MIN_REPROBE_GAP).await;
            }
            _ = shutdown.changed() => return,
            _ = probes.stop.changed() => return,
        }
    }
}

/// The first connect attempt of a probe is given this share of the probe timeout; each next
/// attempt twice as long as the one before, until the timeout.
const FIRST_CONNECT_SHARE: u32 = 8;

async fn probe<B: Backend>(probes: &NodeProbe<B>) -> Result<ProbeReport, BackendError> {
    let answer = tokio::time::timeout(probes.timeout, async {
        let mut session = checkout_retrying(probes).await?;
        B::query_text(&mut session, sql::PROBE).await
    })
    .await;
    match answer {
        Ok(Ok(Some(text))) => ProbeReport::parse(&text)
            .map_err(|e| BackendError::new(ErrorKind::Query, e.to_string())),
        Ok(Ok(None)) => Err(BackendError::new(ErrorKind::Query, "probe returned no row")),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(BackendError::new(
            ErrorKind::Timeout,
            format!("probe timed out after {:?}", probes.timeout),
        )),
    }
}

/// The probe session. A checkout that makes no progress is abandoned and made again, with a
/// limit that doubles each time (the probe's own timeout bounds them all): a connection that
/// reaches a proxy such as HAProxy while its backend has no live server is held there in
/// connect retries and never handed to the server that comes up meanwhile, so waiting it out
/// would notice a new primary behind the proxy up to a whole probe timeout late.
async fn checkout_retrying<B: Backend>(probes: &NodeProbe<B>) -> Result<B::Pooled, BackendError> {
    let mut limit = probes.timeout / FIRST_CONNECT_SHARE;
    loop {
        let checkout = probes.refusal.checkout(B::checkout(&probes.pool));
        match tokio::time::timeout(limit, checkout).await {
            Ok(session) => return session,
            Err(_) => limit *= 2,
        }
    }
}
