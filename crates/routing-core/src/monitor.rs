//! The monitor: one task per node, probing on an interval and at once when a caller reports a
//! failure. Tasks hold only a weak reference, so they end with the router.

use std::sync::{Arc, Weak};
use std::time::Duration;

use crate::backend::sql;
use crate::router::Inner;
use crate::{Backend, BackendError, ErrorKind, ProbeReport};

/// Re-probes triggered by callers come no closer together than this, per node.
const MIN_REPROBE_GAP: Duration = Duration::from_millis(10);

pub(crate) fn spawn<B: Backend>(inner: &Arc<Inner<B>>) {
    for i in 0..inner.nodes.len() {
        let weak = Arc::downgrade(inner);
        let nudges = inner.nudges.subscribe();
        let shutdown = inner.shutdown.subscribe();
        tokio::spawn(run_node(weak, i, nudges, shutdown));
    }
}

async fn run_node<B: Backend>(
    weak: Weak<Inner<B>>,
    i: usize,
    mut nudges: tokio::sync::watch::Receiver<u64>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        if *shutdown.borrow() {
            return;
        }
        let Some(inner) = weak.upgrade() else { return };
        let interval = inner.config.probe_interval;
        let outcome = probe(&inner, i).await;
        inner.record_probe(i, outcome.as_ref().copied());
        drop(inner);
        nudges.mark_unchanged();
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            r = nudges.changed() => {
                if r.is_err() { return; }
                tokio::time::sleep(MIN_REPROBE_GAP).await;
            }
            _ = shutdown.changed() => return,
        }
    }
}

async fn probe<B: Backend>(inner: &Inner<B>, i: usize) -> Result<ProbeReport, BackendError> {
    let pool = &inner.nodes[i].probe_pool;
    let answer = tokio::time::timeout(inner.config.probe_timeout, async {
        let mut session = B::checkout(pool).await?;
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
            format!("probe timed out after {:?}", inner.config.probe_timeout),
        )),
    }
}
