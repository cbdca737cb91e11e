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
        // A nudge that arrives while this probe is in flight asks for another one: the caller
        // saw a failure (or waits for a writer) after this probe began, so its answer may
        // predate what the caller needs. Marking nudges seen only after the probe dropped them,
        // and a write waiting for a writer then waited for its next re-nudge.
        nudges.borrow_and_update();
        let outcome = probe(&probes).await;
        let Some(topo) = weak.upgrade() else { return };
        if topo.record(i, outcome.as_ref().copied()) {
            tracing::debug!(node = %probes.name, "topology changed");
        }
        drop(topo);
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

/// While a probe's session is not there yet, another connect attempt starts every this share of
/// the probe timeout, beside the ones still in flight.
const CONNECT_STEP_SHARE: u32 = 16;

/// At most this many connect attempts of one probe are in flight; starting another abandons the
/// oldest, so each may take [`CONNECT_ATTEMPTS`] steps (half the probe timeout) to connect.
pub(crate) const CONNECT_ATTEMPTS: u32 = 8;

async fn probe<B: Backend>(probes: &NodeProbe<B>) -> Result<ProbeReport, BackendError> {
    let answer = tokio::time::timeout(probes.timeout, async {
        let mut session = checkout_hedged(probes).await?;
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

/// The probe session. A checkout that has not completed after a step gets company: another
/// attempt starts beside it every step (up to [`CONNECT_ATTEMPTS`] at once, the oldest
/// abandoned), and the first to finish, session or error, is the answer (the probe's own
/// timeout bounds them all). A connection that reaches a proxy such as HAProxy while its
/// backend has no live server is held there in connect retries and never handed to the server
/// that comes up meanwhile: only a connection made after the switch reaches it, so how soon
/// the monitor sees a new primary behind the proxy is one step, not the remaining life of
/// whichever attempt was waiting (abandoning an attempt for the next one, with a limit that
/// doubled so a slow connect still gets through, left up to half the probe timeout between
/// the switch and a fresh attempt). An answering node costs one attempt, as before.
async fn checkout_hedged<B: Backend>(probes: &NodeProbe<B>) -> Result<B::Pooled, BackendError> {
    let step = probes.timeout / CONNECT_STEP_SHARE;
    let mut attempts = std::collections::VecDeque::with_capacity(CONNECT_ATTEMPTS as usize);
    loop {
        if attempts.len() == CONNECT_ATTEMPTS as usize {
            attempts.pop_front();
        }
        attempts.push_back(Box::pin(probes.refusal.checkout(B::checkout(&probes.pool))));
        tokio::select! {
            (done, _, _) = futures_util::future::select_all(attempts.iter_mut()) => return done,
            () = tokio::time::sleep(step) => {}
        }
    }
}
