//! The monitor: one task per node, probing on an interval and at once when a caller reports a
//! failure. Tasks hold only a weak reference, so they end with the router.

use std::sync::{Arc, Weak};
use std::time::Duration;

use crate::backend::sql;
use crate::handle::TopologyHandle;
use crate::refusal::RefusalCheck;
use crate::{Backend, BackendError, ErrorKind, ProbeReport};

/// Re-probes triggered by callers come no closer together than this, per node.
const MIN_REPROBE_GAP: Duration = Duration::from_millis(10);

/// What the monitor probes with: one pool per node (used by nothing else), and the timing.
pub(crate) struct Probes<B: Backend> {
    pub(crate) pools: Vec<B::Pool>,
    /// Each node's refused-connection check, shared with its other pools.
    pub(crate) refusals: Vec<Arc<RefusalCheck>>,
    pub(crate) names: Vec<Arc<str>>,
    pub(crate) interval: Duration,
    pub(crate) timeout: Duration,
}

/// Starts one probing task per node. They hold the topology weakly and stop when it is dropped
/// or shut down.
pub(crate) fn spawn<B: Backend>(topo: &Arc<TopologyHandle>, probes: Probes<B>) {
    let probes = Arc::new(probes);
    for i in 0..probes.pools.len() {
        let weak = Arc::downgrade(topo);
        let nudges = topo.subscribe_nudges();
        let shutdown = topo.subscribe_shutdown();
        tokio::spawn(run_node(weak, probes.clone(), i, nudges, shutdown));
    }
}

async fn run_node<B: Backend>(
    weak: Weak<TopologyHandle>,
    probes: Arc<Probes<B>>,
    i: usize,
    mut nudges: tokio::sync::watch::Receiver<u64>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        if *shutdown.borrow() {
            return;
        }
        let outcome = probe(&probes, i).await;
        let Some(topo) = weak.upgrade() else { return };
        if topo.record(i, outcome.as_ref().copied()) {
            tracing::debug!(node = %probes.names[i], "topology changed");
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
        }
    }
}

async fn probe<B: Backend>(probes: &Probes<B>, i: usize) -> Result<ProbeReport, BackendError> {
    let pool = &probes.pools[i];
    let answer = tokio::time::timeout(probes.timeout, async {
        let mut session = probes.refusals[i].checkout(B::checkout(pool)).await?;
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
