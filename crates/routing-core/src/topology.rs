//! The cluster as the monitor sees it: roles, health, lag, bans, and the writer election.
//! Pure state: probes and failures go in, immutable [`Snapshot`]s come out.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::{
    BackendError, BanPolicy, Epoch, ErrorKind, LagBounds, Lsn, NodeConfig, ProbeReport, Region,
    RoleHint,
};

/// Healthy probes in a row that lift a ban before it expires.
const READMIT_AFTER_HEALTHY_PROBES: u32 = 3;
/// Healthy probes in a row after which the ban backoff starts again from its base.
const FORGIVE_AFTER_HEALTHY_PROBES: u32 = 20;

/// A node's role as last observed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize),
    serde(rename_all = "snake_case")
)]
#[non_exhaustive]
pub enum NodeRole {
    /// Never probed successfully.
    Unknown,
    /// The elected writer: out of recovery, newest timeline.
    Primary,
    /// In recovery (a streaming replica).
    Replica,
    /// Out of recovery but not the elected writer (an old primary after a promotion, or one on an
    /// older timeline). Never written to or read from until it is seen in recovery again.
    Fenced,
    /// Removed from the router at run time ([`crate::Router::remove_node`]): never probed,
    /// elected or read again. Its slot stays so that node indices never move.
    Removed,
}

/// One node in a [`Snapshot`].
#[derive(Debug, Clone)]
pub struct NodeStatus {
    /// Configured name.
    pub name: Arc<str>,
    /// Configured region.
    pub region: Option<Region>,
    /// Configured role hint.
    pub hint: RoleHint,
    /// Configured weight.
    pub weight: u32,
    /// Configured as a load-balancing endpoint ([`NodeConfig::load_balanced`]).
    pub load_balanced: bool,
    /// Configured to serve reads ([`NodeConfig::reads`]).
    pub reads: bool,
    /// Removed at run time: a tombstone, kept so indices stay stable.
    pub removed: bool,
    /// Observed role.
    pub role: NodeRole,
    /// Did the last probe succeed?
    pub reachable: bool,
    /// Replay LSN (replica) or current LSN (primary) at the last probe.
    pub lsn: Option<Lsn>,
    /// Receive LSN (replica).
    pub receive_lsn: Option<Lsn>,
    /// Bytes behind the primary at the last probe.
    pub lag_bytes: Option<u64>,
    /// Time behind the primary at the last probe (zero when caught up, whatever the timestamps say).
    pub lag: Option<Duration>,
    /// Replay speed estimate, bytes per second.
    pub replay_rate: Option<f64>,
    /// Timeline.
    pub timeline: Option<u32>,
    /// Cluster system identifier.
    pub system_id: Option<u64>,
    /// Not used for reads until then.
    pub banned_until: Option<Instant>,
    /// Failures since the last success.
    pub consecutive_failures: u32,
    /// Out of the read rotation for lag (with hysteresis).
    pub lag_excluded: bool,
    /// When the last probe answered.
    pub last_probe: Option<Instant>,
    /// The last failure, redacted.
    pub last_error: Option<String>,
    /// How the last failure was classified, when the caller knew.
    pub last_error_kind: Option<ErrorKind>,
    last_caught_up: Option<Instant>,
    rate_sample: Option<(Instant, Lsn)>,
    in_recovery: Option<bool>,
    fenced: bool,
    healthy_streak: u32,
    /// The server instance last probed (postmaster start time), to tell a restarted or another
    /// server behind the same URL from the same one.
    started: Option<u64>,
}

impl NodeStatus {
    /// May this node serve `Eventual` reads now?
    pub fn is_readable_replica(&self, now: Instant) -> bool {
        self.role == NodeRole::Replica
            && self.reads
            && !self.removed
            && self.reachable
            && self.lsn.is_some()
            && !self.lag_excluded
            && self.banned_until.is_none_or(|t| t <= now)
    }
}

/// An immutable view of the topology, published by the monitor and read lock-free by requests.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The topology generation: moves only when the writer becomes another server (another
    /// node, timeline, cluster or server instance) or a node turns out to belong to another
    /// cluster. A writer that misses a probe and answers again as the same server keeps it.
    pub generation: u64,
    /// Index of the elected writer, if one is reachable.
    pub writer: Option<usize>,
    /// Every node, in the order it was configured or added; a node removed at run time stays
    /// as a tombstone (`removed`, role [`NodeRole::Removed`]) so indices never move.
    pub nodes: Vec<NodeStatus>,
    /// The writer's latest LSN.
    pub primary_lsn: Option<Lsn>,
    /// The writer's timeline.
    pub timeline: Option<u32>,
    /// The cluster's system identifier.
    pub system_id: Option<u64>,
}

impl Snapshot {
    /// The writer's status.
    pub fn writer(&self) -> Option<&NodeStatus> {
        self.writer.map(|i| &self.nodes[i])
    }
}

/// The server a generation stands for: sessions made under it all reach this server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct WriterIdentity {
    node: usize,
    timeline: Option<u32>,
    system_id: Option<u64>,
    /// Postmaster start time; `None` when the probe did not report it.
    started: Option<u64>,
}

impl WriterIdentity {
    /// Same node, timeline and cluster, and the same server instance where both are known.
    fn same_server(&self, other: &WriterIdentity) -> bool {
        self.node == other.node
            && self.timeline == other.timeline
            && self.system_id == other.system_id
            && match (self.started, other.started) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            }
    }
}

/// Mutable topology state; the router keeps it behind a mutex and publishes snapshots.
#[derive(Debug)]
pub(crate) struct Topology {
    snap: Snapshot,
    lag: LagBounds,
    ban: BanPolicy,
    epoch: Epoch,
    /// Highest timeline any writer was seen on: primaries below it are fenced.
    max_timeline: u32,
    /// The writer the current generation was set for (the last one elected).
    generation_of: Option<WriterIdentity>,
}

impl Topology {
    pub(crate) fn new(nodes: &[NodeConfig], lag: LagBounds, ban: BanPolicy, epoch: Epoch) -> Self {
        let nodes = nodes.iter().map(fresh_status).collect();
        let generation = epoch.generation();
        Topology {
            snap: Snapshot {
                generation,
                writer: None,
                nodes,
                primary_lsn: None,
                timeline: None,
                system_id: None,
            },
            lag,
            ban,
            epoch,
            max_timeline: 0,
            generation_of: None,
        }
    }

    pub(crate) fn snapshot(&self) -> Snapshot {
        self.snap.clone()
    }

    /// Appends a node (never probed yet); returns its index.
    pub(crate) fn add(&mut self, node: &NodeConfig) -> usize {
        self.snap.nodes.push(fresh_status(node));
        self.snap.nodes.len() - 1
    }

    /// Makes node `i` a tombstone: never elected, read or probed again. Refused for the elected
    /// writer (`Err(())`): writes would stop until another node is promoted, which is a
    /// failover, not a membership change. Returns whether a role changed.
    pub(crate) fn remove(&mut self, i: usize) -> Result<bool, ()> {
        if self.snap.writer == Some(i) {
            return Err(());
        }
        let Some(node) = self.snap.nodes.get_mut(i) else {
            return Ok(false);
        };
        node.removed = true;
        node.reachable = false;
        node.in_recovery = None;
        node.fenced = false;
        node.lsn = None;
        node.lag_bytes = None;
        node.lag = None;
        Ok(self.elect())
    }

    /// Was node `i` removed (or never added)?
    pub(crate) fn is_removed(&self, i: usize) -> bool {
        self.snap.nodes.get(i).is_none_or(|n| n.removed)
    }

    /// Records a probe answer and re-elects the writer. Returns true when a role or the
    /// generation changed.
    pub(crate) fn apply_probe(&mut self, i: usize, report: ProbeReport, now: Instant) -> bool {
        if self.is_removed(i) {
            return false;
        }
        let primary_lsn = self.snap.primary_lsn;
        let node = &mut self.snap.nodes[i];
        node.reachable = true;
        node.last_probe = Some(now);
        node.last_error = None;
        node.last_error_kind = None;
        node.healthy_streak = node.healthy_streak.saturating_add(1);
        // A ban ends when it expires or, earlier, after a few healthy probes in a row: backoff
        // keeps a flapping node out, not one that came back. The backoff exponent is forgotten
        // only once the node stays healthy.
        if node.banned_until.is_some_and(|t| t > now)
            && node.healthy_streak >= READMIT_AFTER_HEALTHY_PROBES
        {
            node.banned_until = None;
        }
        if node.banned_until.is_none_or(|t| t <= now) {
            node.banned_until = None;
            if node.healthy_streak >= FORGIVE_AFTER_HEALTHY_PROBES {
                node.consecutive_failures = 0;
            }
        }
        if let (Some((t0, l0)), Some(l1)) = (node.rate_sample, report.lsn) {
            let dt = now.saturating_duration_since(t0).as_secs_f64();
            if dt > 0.0 {
                let sample = l1.bytes_after(l0) as f64 / dt;
                node.replay_rate =
                    Some(node.replay_rate.map_or(sample, |r| 0.7 * r + 0.3 * sample));
            }
        }
        // A node that shows another cluster is another server now, whatever its role: sessions
        // made to it (readers included) must go. A new timeline or server instance matters
        // only for the writer, which `settle_generation` compares.
        let cluster_changed =
            matches!((node.system_id, report.system_id), (Some(a), Some(b)) if a != b);
        if report.started.is_some() {
            node.started = report.started;
        }
        node.rate_sample = report.lsn.map(|l| (now, l));
        node.lsn = report.lsn;
        node.receive_lsn = report.receive_lsn;
        node.timeline = report.timeline;
        if report.system_id.is_some() {
            node.system_id = report.system_id;
        }
        if report.in_recovery {
            // Caught up: replayed everything the primary had at its last probe or, before the
            // primary has answered, everything this replica has received (an idle cluster's old
            // replay timestamp is not lag).
            let caught_up = match (primary_lsn, report.lsn, report.receive_lsn) {
                (Some(p), Some(r), _) => r >= p,
                (None, Some(r), Some(recv)) => r >= recv,
                _ => false,
            };
            match (primary_lsn, report.lsn) {
                _ if caught_up => {
                    node.last_caught_up = Some(now);
                    node.lag_bytes = Some(0);
                    node.lag = Some(Duration::ZERO);
                }
                (p, _) => {
                    node.lag_bytes = p.zip(report.lsn).map(|(p, r)| p.bytes_after(r));
                    let since_caught_up = node
                        .last_caught_up
                        .map(|t| now.saturating_duration_since(t));
                    node.lag = match (report.replay_age, since_caught_up) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    };
                }
            }
            node.lag_excluded =
                lag_exclusion(&self.lag, node.lag_excluded, node.lag_bytes, node.lag);
        } else {
            node.lag_bytes = Some(0);
            node.lag = Some(Duration::ZERO);
            node.lag_excluded = false;
        }
        node.in_recovery = Some(report.in_recovery);
        let changed = self.elect();
        let moved = self.settle_generation(cluster_changed);
        changed || moved
    }

    /// Records a failed probe or a failed checkout: the node is unreachable and, if it serves
    /// reads, banned with exponential backoff. Returns true when a role changed. Never moves
    /// the generation: an unreachable writer is no new server, and if it answers again as the
    /// same one its pooled sessions are still good (broken ones are dropped at checkout).
    pub(crate) fn apply_failure(&mut self, i: usize, why: &str, now: Instant) -> bool {
        if self.is_removed(i) {
            return false;
        }
        let ban = self.ban;
        let node = &mut self.snap.nodes[i];
        let already_banned = node.banned_until.is_some_and(|t| t > now);
        node.healthy_streak = 0;
        node.reachable = false;
        node.last_error = Some(crate::secret::redact(why));
        node.last_error_kind = None;
        if !already_banned {
            node.consecutive_failures = node.consecutive_failures.saturating_add(1);
            let shift = node.consecutive_failures.saturating_sub(1).min(20);
            let backoff = ban.base.saturating_mul(1u32 << shift).min(ban.max);
            node.banned_until = Some(now + backoff);
        }
        let changed = self.elect();
        self.settle_generation(false);
        changed
    }

    /// [`Topology::apply_failure`] for a classified error, so callers can tell failures that
    /// waiting may fix (connection) from those it will not (authentication, configuration).
    pub(crate) fn apply_error(&mut self, i: usize, err: &BackendError, now: Instant) -> bool {
        let changed = self.apply_failure(i, &err.to_string(), now);
        if let Some(n) = self.snap.nodes.get_mut(i).filter(|n| !n.removed) {
            n.last_error_kind = Some(err.kind);
        }
        changed
    }

    /// Chooses the writer among reachable, unfenced, out-of-recovery nodes on the newest timeline:
    /// then the current writer (no flapping), then writer candidates, then configuration order.
    /// Every other reachable out-of-recovery node is fenced until it is seen in recovery again.
    ///
    /// A load-balanced node ([`NodeConfig::load_balanced`]) is never elected nor fenced: its probe
    /// speaks for whichever server the balancer picked, so seeing it out of recovery only means
    /// the balancer still sends some connections to a primary (HAProxy's reader frontend keeps a
    /// just-promoted replica for its check interval). Electing it would make the whole pool the
    /// "primary", whose reads skip every LSN check and land on replicas. It counts as a replica:
    /// each guarded read on it checks the replay position of the session it got.
    /// Returns true when a role or the writer changed (the generation is `settle_generation`'s).
    fn elect(&mut self) -> bool {
        let old_writer = self.snap.writer;
        let before: Vec<NodeRole> = self.snap.nodes.iter().map(|n| n.role).collect();
        for n in &mut self.snap.nodes {
            if n.in_recovery == Some(true) {
                n.fenced = false;
            }
            if n.reachable && n.in_recovery == Some(false) && !n.fenced {
                self.max_timeline = self.max_timeline.max(n.timeline.unwrap_or(0));
            }
        }
        let max_tl = self.max_timeline;
        let key = |i: usize, n: &NodeStatus| {
            (
                old_writer == Some(i),
                n.hint == RoleHint::WriterCandidate,
                std::cmp::Reverse(i),
            )
        };
        let writer = self
            .snap
            .nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| {
                !n.load_balanced
                    && !n.removed
                    && n.reachable
                    && n.in_recovery == Some(false)
                    && !n.fenced
                    && n.timeline.unwrap_or(0) >= max_tl
            })
            .max_by_key(|(i, n)| key(*i, n))
            .map(|(i, _)| i);
        for (i, n) in self.snap.nodes.iter_mut().enumerate() {
            if n.reachable && n.in_recovery == Some(false) && Some(i) != writer && !n.load_balanced
            {
                n.fenced = true;
            }
            n.role = match n.in_recovery {
                _ if n.removed => NodeRole::Removed,
                None => NodeRole::Unknown,
                Some(true) => NodeRole::Replica,
                Some(false) if n.load_balanced => NodeRole::Replica,
                Some(false) if n.fenced || n.timeline.unwrap_or(0) < max_tl => NodeRole::Fenced,
                Some(false) => NodeRole::Primary,
            };
        }
        self.snap.writer = writer;
        if let Some(w) = writer {
            let wn = &self.snap.nodes[w];
            self.snap.primary_lsn = match (self.snap.primary_lsn, wn.lsn) {
                (Some(a), Some(b)) if old_writer == Some(w) => Some(a.max(b)),
                (_, b) => b.or(self.snap.primary_lsn),
            };
            self.snap.timeline = wn.timeline;
            if wn.system_id.is_some() {
                self.snap.system_id = wn.system_id;
            }
        }
        writer != old_writer
            || self
                .snap
                .nodes
                .iter()
                .zip(&before)
                .any(|(n, b)| n.role != *b)
    }

    /// Moves the generation when, and only when, the elected writer is another server than the
    /// one the generation was set for (another node, timeline, cluster or server instance), or
    /// when `cluster_changed` (a node answered as another cluster). Bumping empties every pool
    /// of every node, so a writer that is unknown for a moment (a missed probe) moves nothing:
    /// no writer session is handed out meanwhile, and a writer that comes back as the same
    /// server keeps its sessions. The first election moves nothing either: no writer session
    /// can exist before there was a writer. Returns true when it moved.
    fn settle_generation(&mut self, cluster_changed: bool) -> bool {
        let current = self.snap.writer.map(|w| {
            let n = &self.snap.nodes[w];
            WriterIdentity {
                node: w,
                timeline: n.timeline,
                system_id: n.system_id,
                started: n.started,
            }
        });
        let moved = cluster_changed
            || matches!((&self.generation_of, &current), (Some(a), Some(b)) if !a.same_server(b));
        if let Some(c) = current {
            self.generation_of = Some(c);
        }
        if moved {
            self.snap.generation = self.epoch.bump();
        }
        moved
    }
}

/// A node as it is before its first probe.
fn fresh_status(n: &NodeConfig) -> NodeStatus {
    NodeStatus {
        name: Arc::from(n.name.as_str()),
        region: n.region.clone(),
        hint: n.role,
        weight: n.weight,
        load_balanced: n.load_balanced,
        reads: n.reads,
        removed: false,
        role: NodeRole::Unknown,
        reachable: false,
        lsn: None,
        receive_lsn: None,
        lag_bytes: None,
        lag: None,
        replay_rate: None,
        timeline: None,
        system_id: None,
        banned_until: None,
        consecutive_failures: 0,
        lag_excluded: false,
        last_probe: None,
        last_error: None,
        last_error_kind: None,
        last_caught_up: None,
        rate_sample: None,
        in_recovery: None,
        fenced: false,
        healthy_streak: 0,
        started: None,
    }
}

fn lag_exclusion(
    bounds: &LagBounds,
    excluded: bool,
    bytes: Option<u64>,
    time: Option<Duration>,
) -> bool {
    let over = |ratio: f64| {
        let b = matches!((bounds.max_bytes, bytes), (Some(max), Some(b)) if (b as f64) > max as f64 * ratio);
        let t = matches!((bounds.max_time, time), (Some(max), Some(t)) if t.as_secs_f64() > max.as_secs_f64() * ratio);
        b || t
    };
    if excluded {
        over(bounds.readmit_ratio)
    } else {
        over(1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(n: usize) -> Vec<NodeConfig> {
        (0..n)
            .map(|i| {
                if i == 0 {
                    NodeConfig::writer(format!("n{i}"), "postgres://x")
                } else {
                    NodeConfig::replica(format!("n{i}"), "postgres://x")
                }
            })
            .collect()
    }

    fn topo(n: usize) -> Topology {
        topo_of(&nodes(n))
    }

    fn topo_of(nodes: &[NodeConfig]) -> Topology {
        Topology::new(
            nodes,
            LagBounds::default(),
            BanPolicy::default(),
            Epoch::default(),
        )
    }

    fn primary(lsn: u64, tl: u32) -> ProbeReport {
        ProbeReport {
            in_recovery: false,
            lsn: Some(Lsn(lsn)),
            receive_lsn: None,
            replay_age: None,
            timeline: Some(tl),
            system_id: Some(42),
            started: Some(7),
        }
    }

    fn replica(lsn: u64, age_ms: u64) -> ProbeReport {
        ProbeReport {
            in_recovery: true,
            lsn: Some(Lsn(lsn)),
            receive_lsn: Some(Lsn(lsn)),
            replay_age: Some(Duration::from_millis(age_ms)),
            timeline: Some(1),
            system_id: Some(42),
            started: Some(9),
        }
    }

    #[test]
    fn a_load_balanced_node_is_never_elected_nor_fenced() {
        // An HAProxy writer frontend (node 0) and reader frontend (node 1) during a switchover:
        // the writer frontend has no server yet, the reader frontend still reaches the
        // just-promoted replica.
        let mut nodes = nodes(2);
        nodes[1] = nodes[1].clone().load_balanced();
        let mut t = topo_of(&nodes);
        let now = Instant::now();
        t.apply_probe(0, primary(1000, 1), now);
        t.apply_probe(1, replica(1000, 5), now);
        assert_eq!(t.snapshot().writer, Some(0));
        t.apply_failure(0, "gone", now);
        t.apply_probe(1, primary(2000, 2), now);
        let s = t.snapshot();
        assert_eq!(s.writer, None, "the reader frontend is not a writer");
        assert_eq!(s.nodes[1].role, NodeRole::Replica);
        // The writer frontend comes back on the new primary: elected, nothing fenced.
        t.apply_probe(0, primary(2100, 2), now);
        let s = t.snapshot();
        assert_eq!(s.writer, Some(0));
        assert_eq!(s.nodes[0].role, NodeRole::Primary);
        assert_eq!(s.nodes[1].role, NodeRole::Replica);
    }

    #[test]
    fn membership_keeps_indices_and_never_removes_the_writer() {
        let mut t = topo(2);
        let now = Instant::now();
        t.apply_probe(0, primary(1000, 1), now);
        t.apply_probe(1, replica(1000, 5), now);
        // The writer stays: removing it is refused and changes nothing.
        assert_eq!(t.remove(0), Err(()));
        assert_eq!(t.snapshot().writer, Some(0));
        // An added node takes the next index and is unknown until probed.
        let added = t.add(&NodeConfig::replica("n2", "postgres://x"));
        assert_eq!(added, 2);
        assert_eq!(t.snapshot().nodes[2].role, NodeRole::Unknown);
        assert!(!t.snapshot().nodes[2].is_readable_replica(now));
        t.apply_probe(2, replica(1000, 5), now);
        assert!(t.snapshot().nodes[2].is_readable_replica(now));
        // A removed replica is a tombstone: never readable, and late probes are ignored.
        assert_eq!(t.remove(1), Ok(true));
        assert!(!t.apply_probe(1, replica(1000, 5), now));
        assert!(!t.apply_failure(1, "late", now));
        let s = t.snapshot();
        assert_eq!(s.nodes.len(), 3);
        assert_eq!(s.nodes[1].role, NodeRole::Removed);
        assert!(!s.nodes[1].is_readable_replica(now));
        assert!(s.nodes[2].is_readable_replica(now));
        // A removed node that was the only primary is never elected, even if it answers.
        let mut t = topo(2);
        t.apply_probe(1, replica(1000, 5), now);
        assert_eq!(t.remove(0), Ok(true));
        t.apply_probe(0, primary(1000, 1), now);
        assert_eq!(t.snapshot().writer, None);
    }

    #[test]
    fn a_no_reads_node_is_never_read_but_may_be_elected() {
        let mut nodes = nodes(2);
        nodes[1] = nodes[1].clone().no_reads();
        let mut t = topo_of(&nodes);
        let now = Instant::now();
        t.apply_probe(0, primary(1000, 1), now);
        t.apply_probe(1, replica(1000, 5), now);
        let s = t.snapshot();
        assert_eq!(s.nodes[1].role, NodeRole::Replica);
        assert!(!s.nodes[1].is_readable_replica(now));
        t.apply_failure(0, "gone", now);
        t.apply_probe(1, primary(2000, 2), now);
        assert_eq!(t.snapshot().writer, Some(1));
    }

    #[test]
    fn elects_the_primary_and_classifies_replicas() {
        let mut t = topo(3);
        let now = Instant::now();
        assert!(t.apply_probe(0, primary(1000, 1), now));
        t.apply_probe(1, replica(1000, 5), now);
        t.apply_probe(2, replica(900, 5), now);
        let s = t.snapshot();
        assert_eq!(s.writer, Some(0));
        assert_eq!(s.nodes[1].role, NodeRole::Replica);
        assert_eq!(
            s.nodes[1].lag,
            Some(Duration::ZERO),
            "equal LSNs are no lag, whatever the timestamps say"
        );
        assert_eq!(s.nodes[2].lag_bytes, Some(100));
        assert_eq!(s.system_id, Some(42));
    }

    #[test]
    fn split_primaries_resolve_to_the_newest_timeline_and_fence_the_other() {
        let mut t = topo(3);
        let now = Instant::now();
        t.apply_probe(0, primary(1000, 1), now);
        t.apply_probe(1, replica(1000, 0), now);
        let g0 = t.snapshot().generation;
        // node 1 promoted (timeline 2) while node 0 is still up and writable
        t.apply_probe(1, primary(1100, 2), now);
        t.apply_probe(0, primary(1200, 1), now);
        let s = t.snapshot();
        assert_eq!(s.writer, Some(1));
        assert_eq!(s.nodes[0].role, NodeRole::Fenced);
        assert!(s.generation > g0);
        // the old primary never comes back as writer, even when the new one is unreachable
        t.apply_failure(1, "connection refused", now);
        t.apply_probe(0, primary(1300, 1), now);
        assert_eq!(t.snapshot().writer, None);
        // ...until it is rebuilt as a replica and later promoted on a newer timeline
        t.apply_probe(0, replica(1100, 0), now);
        assert_eq!(t.snapshot().nodes[0].role, NodeRole::Replica);
        t.apply_probe(0, primary(1400, 3), now);
        assert_eq!(t.snapshot().writer, Some(0));
    }

    #[test]
    fn equal_timelines_keep_the_current_writer() {
        let mut t = topo(2);
        let now = Instant::now();
        t.apply_probe(1, primary(10, 1), now);
        t.apply_probe(0, primary(10, 1), now);
        let s = t.snapshot();
        assert_eq!(s.writer, Some(1), "no flapping to the writer candidate");
        assert_eq!(s.nodes[0].role, NodeRole::Fenced);
    }

    #[test]
    fn bans_back_off_exponentially_and_readmit_when_healthy() {
        let mut t = topo(2);
        let t0 = Instant::now();
        t.apply_probe(0, primary(10, 1), t0);
        t.apply_probe(1, replica(10, 0), t0);
        assert!(t.snapshot().nodes[1].is_readable_replica(t0));
        t.apply_failure(1, "refused", t0);
        let b1 = t.snapshot().nodes[1].banned_until.expect("banned");
        assert_eq!(b1 - t0, Duration::from_millis(500));
        let t1 = b1 + Duration::from_millis(1);
        t.apply_failure(1, "refused", t1);
        let b2 = t.snapshot().nodes[1].banned_until.expect("banned again");
        assert_eq!(b2 - t1, Duration::from_secs(1));
        // one healthy probe during the ban does not readmit early...
        let t2 = t1 + Duration::from_millis(10);
        t.apply_probe(1, replica(10, 0), t2);
        assert!(!t.snapshot().nodes[1].is_readable_replica(t2));
        // ...three in a row do, long before the ban would expire
        t.apply_probe(1, replica(10, 0), t2);
        t.apply_probe(1, replica(10, 0), t2);
        assert!(t.snapshot().nodes[1].is_readable_replica(t2));
        // failing again soon escalates the backoff (it is not forgotten yet)
        t.apply_failure(1, "refused", t2);
        let b3 = t.snapshot().nodes[1].banned_until.expect("banned");
        assert_eq!(b3 - t2, Duration::from_secs(2));
        // staying healthy forgets it
        let t3 = b3 + Duration::from_millis(1);
        for _ in 0..20 {
            t.apply_probe(1, replica(10, 0), t3);
        }
        let s = t.snapshot();
        assert!(s.nodes[1].is_readable_replica(t3));
        assert_eq!(s.nodes[1].consecutive_failures, 0);
    }

    #[test]
    fn ban_backoff_is_capped() {
        let mut t = topo(2);
        let mut now = Instant::now();
        for _ in 0..40 {
            t.apply_failure(1, "refused", now);
            now = t.snapshot().nodes[1].banned_until.expect("banned") + Duration::from_millis(1);
        }
        let s = t.snapshot();
        let ban = s.nodes[1].banned_until.expect("banned");
        assert!(ban - (now - Duration::from_millis(1)) <= Duration::from_secs(30));
    }

    #[test]
    fn lag_exclusion_has_hysteresis() {
        let bounds = LagBounds {
            max_bytes: Some(1000),
            max_time: None,
            readmit_ratio: 0.5,
        };
        let mut t = Topology::new(&nodes(2), bounds, BanPolicy::default(), Epoch::default());
        let now = Instant::now();
        t.apply_probe(0, primary(10_000, 1), now);
        t.apply_probe(1, replica(9_500, 0), now);
        assert!(!t.snapshot().nodes[1].lag_excluded);
        t.apply_probe(1, replica(8_000, 0), now);
        assert!(
            t.snapshot().nodes[1].lag_excluded,
            "2000 bytes behind > 1000"
        );
        t.apply_probe(1, replica(9_200, 0), now);
        assert!(
            t.snapshot().nodes[1].lag_excluded,
            "800 behind is under the bound but above the readmit line"
        );
        t.apply_probe(1, replica(9_600, 0), now);
        assert!(
            !t.snapshot().nodes[1].lag_excluded,
            "400 behind: readmitted"
        );
    }

    #[test]
    fn time_lag_uses_time_since_caught_up_not_stale_timestamps() {
        let bounds = LagBounds {
            max_bytes: None,
            max_time: Some(Duration::from_secs(1)),
            readmit_ratio: 0.5,
        };
        let mut t = Topology::new(&nodes(2), bounds, BanPolicy::default(), Epoch::default());
        let t0 = Instant::now();
        t.apply_probe(0, primary(100, 1), t0);
        t.apply_probe(1, replica(100, 3_600_000), t0);
        assert!(
            !t.snapshot().nodes[1].lag_excluded,
            "idle primary: an hour-old replay timestamp is not lag"
        );
        t.apply_probe(0, primary(200, 1), t0);
        t.apply_probe(1, replica(100, 3_600_000), t0 + Duration::from_millis(100));
        assert_eq!(t.snapshot().nodes[1].lag, Some(Duration::from_millis(100)));
        t.apply_probe(1, replica(100, 3_600_000), t0 + Duration::from_secs(2));
        assert!(t.snapshot().nodes[1].lag_excluded, "paused for 2 s");
    }

    #[test]
    fn generation_bumps_on_role_change_and_epoch_refuses_old_connections() {
        let epoch = Epoch::default();
        let mut t = Topology::new(
            &nodes(2),
            LagBounds::default(),
            BanPolicy::default(),
            epoch.clone(),
        );
        let now = Instant::now();
        t.apply_probe(0, primary(10, 1), now);
        t.apply_probe(1, replica(10, 0), now);
        let stamped = epoch.generation();
        assert!(epoch.admits(stamped));
        assert!(
            !t.apply_probe(1, replica(20, 0), now),
            "a lag update is not a role change"
        );
        assert!(epoch.admits(stamped));
        t.apply_failure(0, "refused", now);
        t.apply_probe(1, primary(30, 2), now);
        assert!(
            !epoch.admits(stamped),
            "connections from before the promotion are refused"
        );
        assert!(epoch.admits(epoch.generation()));
    }

    #[test]
    fn a_replica_probed_before_the_primary_is_not_lagging_on_an_old_timestamp() {
        let mut t = topo(2);
        let now = Instant::now();
        // The replica answers first: fully applied what it received, last commit an hour ago.
        t.apply_probe(1, replica(500, 3_600_000), now);
        let s = t.snapshot();
        assert_eq!(s.nodes[1].lag, Some(Duration::ZERO));
        assert!(!s.nodes[1].lag_excluded);
        // Received more than applied (apply delay): the timestamp is real lag.
        let mut delayed = replica(500, 800);
        delayed.receive_lsn = Some(Lsn(900));
        t.apply_probe(1, delayed, now + Duration::from_secs(2));
        assert_eq!(t.snapshot().nodes[1].lag, Some(Duration::from_millis(800)));
    }

    #[test]
    fn a_stable_endpoint_that_moves_to_a_new_timeline_bumps_the_generation() {
        let epoch = Epoch::default();
        let mut t = Topology::new(
            &nodes(1),
            LagBounds::default(),
            BanPolicy::default(),
            epoch.clone(),
        );
        let now = Instant::now();
        t.apply_probe(0, primary(100, 1), now);
        let stamped = epoch.generation();
        assert!(
            !t.apply_probe(0, primary(200, 1), now),
            "same server, more WAL: nothing changed"
        );
        assert!(epoch.admits(stamped));
        // The endpoint now reaches the promoted replica: same role, new timeline.
        assert!(t.apply_probe(0, primary(300, 2), now));
        assert!(
            !epoch.admits(stamped),
            "sessions to the old server are never handed out again"
        );
        assert_eq!(t.snapshot().writer, Some(0));
    }

    #[test]
    fn a_writer_that_misses_a_probe_and_comes_back_keeps_the_generation() {
        let epoch = Epoch::default();
        let mut t = Topology::new(
            &nodes(2),
            LagBounds::default(),
            BanPolicy::default(),
            epoch.clone(),
        );
        let now = Instant::now();
        t.apply_probe(0, primary(100, 1), now);
        t.apply_probe(1, replica(100, 0), now);
        let stamped = epoch.generation();
        // One failed probe: the writer is unknown for a moment...
        t.apply_failure(0, "probe timed out", now);
        assert_eq!(t.snapshot().writer, None);
        assert!(epoch.admits(stamped), "an unknown writer is no new server");
        // ...and answers again as the same server: nothing moved.
        t.apply_probe(0, primary(200, 1), now);
        assert_eq!(t.snapshot().writer, Some(0));
        assert!(epoch.admits(stamped), "the same server keeps its sessions");
        assert_eq!(t.snapshot().generation, stamped);
        // Several misses in a row change nothing either.
        for _ in 0..5 {
            t.apply_failure(0, "refused", now);
        }
        t.apply_probe(0, primary(300, 1), now);
        assert!(epoch.admits(stamped));
        // A replica failing never moves it.
        t.apply_failure(1, "refused", now);
        t.apply_probe(1, replica(300, 0), now);
        assert!(epoch.admits(stamped));
    }

    #[test]
    fn another_server_instance_as_writer_moves_the_generation() {
        let epoch = Epoch::default();
        let mut t = Topology::new(
            &nodes(1),
            LagBounds::default(),
            BanPolicy::default(),
            epoch.clone(),
        );
        let now = Instant::now();
        t.apply_probe(0, primary(100, 1), now);
        let stamped = epoch.generation();
        // Restarted (or another server behind the same endpoint): same timeline and cluster,
        // another postmaster start time. Its pooled sessions are dead or point elsewhere.
        t.apply_failure(0, "refused", now);
        let restarted = ProbeReport {
            started: Some(8),
            ..primary(100, 1)
        };
        assert!(t.apply_probe(0, restarted, now));
        assert!(!epoch.admits(stamped));
        // Without a start time in the probe the instance is not compared.
        let stamped = epoch.generation();
        let unknown = ProbeReport {
            started: None,
            ..primary(150, 1)
        };
        t.apply_probe(0, unknown, now);
        assert!(epoch.admits(stamped));
    }

    #[test]
    fn another_node_as_writer_or_another_cluster_moves_the_generation() {
        let epoch = Epoch::default();
        let mut t = Topology::new(
            &nodes(3),
            LagBounds::default(),
            BanPolicy::default(),
            epoch.clone(),
        );
        let now = Instant::now();
        t.apply_probe(0, primary(100, 1), now);
        t.apply_probe(2, replica(100, 0), now);
        let stamped = epoch.generation();
        // Node 0 gone; node 1, never seen before, answers as a primary on the same timeline.
        t.apply_failure(0, "refused", now);
        assert!(epoch.admits(stamped));
        t.apply_probe(1, primary(100, 1), now);
        assert_eq!(t.snapshot().writer, Some(1));
        assert!(!epoch.admits(stamped), "another node is another server");
        // A replica whose URL now reaches another cluster: its sessions must go too.
        let stamped = epoch.generation();
        let foreign = ProbeReport {
            system_id: Some(43),
            ..replica(100, 0)
        };
        assert!(t.apply_probe(2, foreign, now));
        assert!(!epoch.admits(stamped));
    }

    #[test]
    fn replay_rate_is_estimated() {
        let mut t = topo(2);
        let t0 = Instant::now();
        t.apply_probe(0, primary(0, 1), t0);
        t.apply_probe(1, replica(0, 0), t0);
        t.apply_probe(1, replica(1_000_000, 0), t0 + Duration::from_secs(1));
        let rate = t.snapshot().nodes[1].replay_rate.expect("rate");
        assert!((rate - 1_000_000.0).abs() < 1.0, "{rate}");
    }
}
