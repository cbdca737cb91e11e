//! The monitor: one task per node (started at build or when a node is added, ended when it is
//! removed), probing on an interval and at once when a caller reports a
//! failure. Tasks hold only a weak reference, so they end with the router.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use futures_util::future::select_all;

use crate::backend::sql;
use crate::handle::TopologyHandle;
use crate::refusal::RefusalCheck;
use crate::{Backend, BackendError, ErrorKind, NodeRole, ProbeReport, Snapshot};

/// Re-probes triggered by callers come no closer together than this, per node.
const MIN_REPROBE_GAP: Duration = Duration::from_millis(10);

/// What the monitor probes one node with: a pool used by nothing else, the node's refused-
/// connection check, and the timing.
pub(crate) struct NodeProbe<B: Backend> {
    pub(crate) pool: B::Pool,
    /// The node's writer pool, whose standby session follows the election.
    pub(crate) writer_pool: Arc<B::Pool>,
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
    probes: NodeProbe<B>,
    i: usize,
    mut nudges: tokio::sync::watch::Receiver<u64>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let NodeProbe {
        pool,
        writer_pool,
        refusal,
        name,
        interval,
        timeout,
        mut stop,
        _alive,
    } = probes;
    let connect = || Box::pin(refusal.checkout(B::checkout(&pool)));
    // Connect attempts still in flight when a probe timed out: the next probe takes them over.
    let mut attempts = Attempts::new(timeout / CONNECT_STEP_SHARE);
    loop {
        if *shutdown.borrow() || *stop.borrow() {
            return;
        }
        // A nudge that arrives while this probe is in flight asks for another one: the caller
        // saw a failure (or waits for a writer) after this probe began, so its answer may
        // predate what the caller needs. Marking nudges seen only after the probe dropped them,
        // and a write waiting for a writer then waited for its next re-nudge.
        nudges.borrow_and_update();
        let outcome = probe::<B, _, _>(&mut attempts, &connect, timeout).await;
        let Some(topo) = weak.upgrade() else { return };
        if topo.record(i, outcome.as_ref().copied()) {
            tracing::debug!(node = %name, "topology changed");
        }
        let snap = topo.load_full();
        drop(topo);
        follow_election::<B>(&writer_pool, &snap, i, &name).await;
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            r = nudges.changed() => {
                if r.is_err() { return; }
                tokio::time::sleep(MIN_REPROBE_GAP).await;
            }
            _ = shutdown.changed() => return,
            _ = stop.changed() => return,
        }
    }
}

/// The writer pool's standby session follows the election: held on a node in recovery while no
/// writer is elected (a failover is under way: it may be the one promoted), pooled once this
/// node is elected (after the writer check), closed when another node is.
async fn follow_election<B: Backend>(pool: &B::Pool, snap: &Snapshot, i: usize, name: &str) {
    match snap.writer {
        Some(w) if w == i => {
            if B::admit_standby(pool).await {
                tracing::debug!(node = %name, "standby writer session pooled");
            }
        }
        Some(_) => B::release_standby(pool),
        None => {
            let n = &snap.nodes[i];
            // A load-balanced node counts as a replica whatever it is; it is never elected.
            if n.reachable && n.role == NodeRole::Replica && !n.load_balanced {
                B::hold_standby(pool);
            } else {
                B::release_standby(pool);
            }
        }
    }
}

/// While a probe's session is not there yet, another connect attempt starts every this share of
/// the probe timeout, beside the ones still in flight.
const CONNECT_STEP_SHARE: u32 = 16;

/// At most this many connect attempts of one probe are in flight; starting another abandons the
/// oldest, so each may take [`CONNECT_ATTEMPTS`] steps (half the probe timeout) to connect.
pub(crate) const CONNECT_ATTEMPTS: u32 = 8;

async fn probe<B, F, C>(
    attempts: &mut Attempts<F>,
    connect: &C,
    timeout: Duration,
) -> Result<ProbeReport, BackendError>
where
    B: Backend,
    F: Future<Output = Result<B::Pooled, BackendError>>,
    C: Fn() -> Pin<Box<F>>,
{
    let answer = tokio::time::timeout(timeout, async {
        let mut session = attempts.checkout(connect).await?;
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
            format!("probe timed out after {timeout:?}"),
        )),
    }
}

/// A probe's connect attempts, oldest first, each with when it started.
///
/// A checkout that has not completed after a step gets company: another attempt starts beside
/// it every step (up to [`CONNECT_ATTEMPTS`] at once, the oldest abandoned), and the first to
/// finish, session or error, is the answer. A connection that reaches a proxy such as HAProxy
/// while its backend has no live server is held there; one made after the switch reaches the
/// new server at once, so how soon the monitor sees a new primary behind the proxy is one step,
/// not the remaining life of whichever attempt was waiting (abandoning an attempt for the next
/// one, with a limit that doubled so a slow connect still gets through, left up to half the
/// probe timeout between the switch and a fresh attempt). The same holds for a server that is
/// starting up, which a pool may retry inside one attempt (sqlx's `PgPool` did, with a growing
/// backoff; the adapters' bb8 pools do not). Attempts still in
/// flight when the probe timed out are kept for the next probe (a held connection that the
/// proxy hands on just as the timeout strikes is then used, not thrown away and made again);
/// one older than [`CONNECT_ATTEMPTS`] steps is dropped then. An answering node costs one
/// attempt, as before.
struct Attempts<F> {
    step: Duration,
    in_flight: VecDeque<(Instant, Pin<Box<F>>)>,
}

impl<F, T> Attempts<F>
where
    F: Future<Output = Result<T, BackendError>>,
{
    fn new(step: Duration) -> Self {
        Attempts {
            step,
            in_flight: VecDeque::with_capacity(CONNECT_ATTEMPTS as usize),
        }
    }

    async fn checkout(&mut self, connect: &impl Fn() -> Pin<Box<F>>) -> Result<T, BackendError> {
        let life = self.step * CONNECT_ATTEMPTS;
        self.in_flight.retain(|(at, _)| at.elapsed() < life);
        loop {
            let next = match self.in_flight.back() {
                Some((at, _)) if at.elapsed() < self.step => *at + self.step,
                _ => {
                    if self.in_flight.len() == CONNECT_ATTEMPTS as usize {
                        self.in_flight.pop_front();
                    }
                    let at = Instant::now();
                    self.in_flight.push_back((at, connect()));
                    at + self.step
                }
            };
            let won = tokio::select! {
                (done, index, _) = select_all(self.in_flight.iter_mut().map(|(_, f)| f)) => {
                    Some((done, index))
                }
                () = tokio::time::sleep_until(next.into()) => None,
            };
            if let Some((done, index)) = won {
                self.in_flight.remove(index);
                if done.is_ok() {
                    // The node answers: the other attempts are not needed.
                    self.in_flight.clear();
                }
                return done;
            }
        }
    }
}
