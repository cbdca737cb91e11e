//! The router's state for a health endpoint or an operator: [`Router::status`] as one typed
//! value, serializable to JSON with the `serde` feature. Built from the latest snapshot and the
//! router's counters; taking it costs no query.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::{Backend, NodeRole, RoleHint, Router, RouterStats};

/// A marks store that failed within this long counts as unhealthy in the status.
pub const MARKS_UNHEALTHY_FOR: Duration = Duration::from_secs(10);

/// How full a pool is, as its adapter reports it ([`Backend::pool_state`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct PoolState {
    /// Open connections, idle or in use.
    pub connections: u32,
    /// Open connections waiting in the pool.
    pub idle: u32,
    /// A writer pool holds a standby session, connected and not counted above, for the first
    /// write should its node be elected (held only while no writer is elected).
    pub standby: bool,
}

/// A node's pools.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct PoolOccupancy {
    /// Sessions of this node handed out by the router now (reads and writes).
    pub in_use: usize,
    /// The configured size of each pool ([`crate::PoolSettings::max_size`]).
    pub max_size: u32,
    /// The writer pool, when the adapter reports it.
    pub writer: Option<PoolState>,
    /// The reader pool, when the adapter reports it.
    pub reader: Option<PoolState>,
}

/// A ban in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct BanState {
    /// Milliseconds until it expires (it may be lifted earlier by healthy probes).
    pub remaining_ms: u64,
    /// When it expires, in milliseconds since the Unix epoch.
    pub expires_at_unix_ms: u64,
}

/// One node in a [`RouterStatus`].
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct NodeState {
    /// Configured name.
    pub name: String,
    /// Configured region.
    pub region: Option<String>,
    /// Configured role hint.
    pub hint: RoleHint,
    /// Observed role.
    pub role: NodeRole,
    /// Did the last probe succeed?
    pub reachable: bool,
    /// May it serve reads that need no LSN now?
    pub readable: bool,
    /// Configured as a load-balancing endpoint.
    pub load_balanced: bool,
    /// Replay LSN (replica) or current LSN (primary) at the last probe, as PostgreSQL writes it.
    pub lsn: Option<String>,
    /// Timeline.
    pub timeline: Option<u32>,
    /// Bytes behind the primary.
    pub lag_bytes: Option<u64>,
    /// Milliseconds behind the primary.
    pub lag_ms: Option<u64>,
    /// Out of the read rotation for lag.
    pub lag_excluded: bool,
    /// Its lag alert is raised ([`crate::LagAlertThresholds`]).
    pub lag_alert: bool,
    /// A ban in force, if any.
    pub ban: Option<BanState>,
    /// Failures since the last success.
    pub consecutive_failures: u32,
    /// Milliseconds since the last probe answered.
    pub last_probe_ms_ago: Option<u64>,
    /// The last failure, passwords masked.
    pub last_error: Option<String>,
    /// Its pools.
    pub pool: PoolOccupancy,
}

/// The marks store's health as the router has seen it on requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct MarksHealth {
    /// No lookup or update failed within [`MARKS_UNHEALTHY_FOR`].
    pub healthy: bool,
    /// Milliseconds since the last failure, if any.
    pub last_failure_ms_ago: Option<u64>,
    /// Lookups that failed or timed out, since the router started.
    pub lookup_failures: u64,
    /// Updates after a commit that failed, since the router started.
    pub update_failures: u64,
}

/// Everything an operator asks a running router: see [`Router::status`].
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct RouterStatus {
    /// The topology generation (moves when the writer becomes another server).
    pub generation: u64,
    /// The elected writer's name, if one is reachable.
    pub writer: Option<String>,
    /// The writer's timeline.
    pub timeline: Option<u32>,
    /// The cluster's system identifier, as decimal text (it exceeds JSON's exact integers).
    pub system_id: Option<String>,
    /// The writer's latest LSN.
    pub primary_lsn: Option<String>,
    /// Every node present, in the order configured or added (removed nodes are left out).
    pub nodes: Vec<NodeState>,
    /// The marks store.
    pub marks: MarksHealth,
    /// The router's counters.
    pub counters: RouterStats,
}

impl RouterStatus {
    /// The node named `name`.
    pub fn node(&self, name: &str) -> Option<&NodeState> {
        self.nodes.iter().find(|n| n.name == name)
    }
}

/// Refreshes the pool gauges ([`crate::telemetry::POOL_CONNECTIONS`] and friends) until the
/// router is gone or shut down.
pub(super) fn spawn_pool_gauges<B: Backend>(inner: &std::sync::Arc<super::Inner<B>>) {
    let weak = std::sync::Arc::downgrade(inner);
    let mut shutdown = inner.topo.subscribe_shutdown();
    let every = crate::telemetry::gauge_interval(inner.config.probe_interval);
    tokio::spawn(async move {
        loop {
            {
                let Some(inner) = weak.upgrade() else { return };
                for (_, rt) in inner.nodes.live() {
                    crate::telemetry::pools(
                        &rt.name,
                        rt.in_flight.load(std::sync::atomic::Ordering::Relaxed),
                        B::pool_state(&rt.writer_pool),
                        B::pool_state(&rt.reader_pool),
                    );
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = shutdown.changed() => return,
            }
        }
    });
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl<B: Backend> Router<B> {
    /// The router's state now: nodes, roles, generation, reachability, lag, bans with their
    /// expiry, lag alerts, marks store health and pool occupancy. With the `serde` feature it
    /// serializes to JSON for a health endpoint; no password appears in it.
    ///
    /// ```no_run
    /// # fn run<B: routing_core::Backend>(router: routing_core::Router<B>) {
    /// let status = router.status();
    /// for node in &status.nodes {
    ///     if let Some(ban) = node.ban {
    ///         eprintln!("{} banned for {} ms more", node.name, ban.remaining_ms);
    ///     }
    /// }
    /// // With the `serde` feature:
    /// let json = serde_json::to_string(&status).unwrap();
    /// # }
    /// ```
    pub fn status(&self) -> RouterStatus {
        let inner = &self.inner;
        let snap = inner.topo.load_full();
        let now = Instant::now();
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let alerts = inner.topo.lag_alerts_raised();
        let nodes = snap
            .nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| !n.removed)
            .filter_map(|(i, n)| Some((i, n, inner.nodes.get(i)?)))
            .map(|(i, n, rt)| NodeState {
                name: n.name.to_string(),
                region: n.region.as_ref().map(|r| r.as_str().to_string()),
                hint: n.hint,
                role: n.role,
                reachable: n.reachable,
                readable: n.is_readable_replica(now),
                load_balanced: n.load_balanced,
                lsn: n.lsn.map(|l| l.to_string()),
                timeline: n.timeline,
                lag_bytes: n.lag_bytes,
                lag_ms: n.lag.map(ms),
                lag_excluded: n.lag_excluded,
                lag_alert: alerts.get(i).copied().unwrap_or(false),
                ban: n.banned_until.filter(|t| *t > now).map(|t| {
                    let remaining = t - now;
                    BanState {
                        remaining_ms: ms(remaining),
                        expires_at_unix_ms: ms(wall + remaining),
                    }
                }),
                consecutive_failures: n.consecutive_failures,
                last_probe_ms_ago: n.last_probe.map(|t| ms(now.saturating_duration_since(t))),
                last_error: n.last_error.clone(),
                pool: PoolOccupancy {
                    in_use: rt.in_flight.load(std::sync::atomic::Ordering::Relaxed),
                    max_size: inner.config.pool.max_size,
                    writer: B::pool_state(&rt.writer_pool),
                    reader: B::pool_state(&rt.reader_pool),
                },
            })
            .collect();
        let counters = inner.counters.read();
        let since = inner.marks_warnings.since_last();
        RouterStatus {
            generation: snap.generation,
            writer: snap.writer().map(|w| w.name.to_string()),
            timeline: snap.timeline,
            system_id: snap.system_id.map(|s| s.to_string()),
            primary_lsn: snap.primary_lsn.map(|l| l.to_string()),
            nodes,
            marks: MarksHealth {
                healthy: since.is_none_or(|d| d >= MARKS_UNHEALTHY_FOR),
                last_failure_ms_ago: since.map(ms),
                lookup_failures: counters.marks_errors,
                update_failures: counters.mark_update_failures,
            },
            counters,
        }
    }
}
