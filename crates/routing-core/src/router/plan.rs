//! The read decision, without I/O: from the mode's requirement and a topology snapshot, which
//! replicas a read may go to, in which order, and where it must wait or verify. The router acts
//! on the plan (checks out, waits, falls back to the primary); unit tests check the plan alone.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use smallvec::SmallVec;

use crate::{Lsn, NodeStatus, Region, RegionPolicy, Snapshot};

/// What a read needs, from its consistency mode, mark and token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Need {
    /// The primary (read-only session).
    Primary,
    /// Any eligible replica.
    Any,
    /// A replica that has replayed this LSN.
    AtLeast(Lsn),
}

/// One group of replicas the picker chooses among.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Step {
    /// Node indexes.
    pub(crate) among: SmallVec<[usize; 8]>,
    /// The snapshot does not show these past the LSN: check out, then wait for (or verify) the
    /// replay position on the session itself.
    pub(crate) wait: bool,
}

/// An estimate this old is forgotten: the next guarded read may wait on the replica again
/// (once), and times that wait. So a replica that stopped lagging is waited on again within
/// about this long, and one that keeps lagging costs at most one futile wait per period.
pub(crate) const CATCH_UP_MEMORY: Duration = Duration::from_secs(1);

/// How long the router's recent waits for one replica's replay took: the planner's prediction
/// of the next wait. The probe's lag alone cannot tell: it compares the replica with the
/// primary's position at the primary's last probe (up to a probe interval old), so a replica a
/// steady 20-50 ms behind reads as caught up at most probes. Lock-free; written by every wait.
#[derive(Debug)]
pub(crate) struct CatchUp {
    born: Instant,
    /// The estimate (ns), a running mean of the last waits.
    nanos: AtomicU64,
    /// When it was last updated (ns since `born`; 0: never).
    at: AtomicU64,
}

impl Default for CatchUp {
    fn default() -> Self {
        CatchUp {
            born: Instant::now(),
            nanos: AtomicU64::new(0),
            at: AtomicU64::new(0),
        }
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl CatchUp {
    /// Records a wait that took `took`; `caught_up` false when it ran out of budget (the replay
    /// then takes at least that long).
    pub(crate) fn record(&self, took: Duration, caught_up: bool, budget: Duration, now: Instant) {
        let sample = nanos(if caught_up { took } else { took.max(budget) });
        let stamp = nanos(now.saturating_duration_since(self.born)).max(1);
        let old = self.nanos.load(Ordering::Relaxed);
        let value = match self.expected_nanos(now) {
            // A quarter weight to the newest wait: one slow wait on a loaded machine does not
            // condemn a replica, a lasting change in lag shows within a few waits.
            Some(_) => old - old / 4 + sample / 4,
            None => sample,
        };
        self.nanos.store(value, Ordering::Relaxed);
        self.at.store(stamp, Ordering::Relaxed);
    }

    /// The expected wait, if the router waited on this replica within [`CATCH_UP_MEMORY`].
    pub(crate) fn expected(&self, now: Instant) -> Option<Duration> {
        self.expected_nanos(now).map(Duration::from_nanos)
    }

    fn expected_nanos(&self, now: Instant) -> Option<u64> {
        let at = self.at.load(Ordering::Relaxed);
        let age = nanos(now.saturating_duration_since(self.born)).saturating_sub(at);
        (at != 0 && age < nanos(CATCH_UP_MEMORY)).then(|| self.nanos.load(Ordering::Relaxed))
    }
}

/// Replicas for a read that needs `need` (`Any` or `AtLeast`), best first; empty when only the
/// primary can serve it.
///
/// - A replica on another timeline than the writer's (following a fenced old primary) serves
///   nothing: its LSNs are on a dead branch. For a guarded read its timeline must be known too.
/// - Without an LSN: one step per region tier, own region first ([`RegionPolicy::rank`]).
/// - With an LSN: replicas the snapshot shows past it, by tier; then replicas worth waiting for
///   (expected catch-up within half the budget), by tier. The expected catch-up is the
///   larger of the probe's lag and `expected_wait` (what the router's recent waits on that
///   replica took, [`CatchUp`]); a replica of unknown lag is not waited on. With
///   [`RegionPolicy::wait_locally_first`], each tier's waits come before the next tier.
/// - A load-balanced node ([`crate::NodeConfig::load_balanced`]) is never taken as caught up
///   from the snapshot (its probe reached one server of several): a guarded read verifies the
///   session it got.
pub(crate) fn plan_replicas(
    snap: &Snapshot,
    now: Instant,
    regions: &RegionPolicy,
    region: Option<&Region>,
    need: Need,
    wait_budget: Duration,
    expected_wait: impl Fn(usize) -> Option<Duration>,
) -> SmallVec<[Step; 4]> {
    let lsn = match need {
        Need::Primary => return SmallVec::new(),
        Need::Any => None,
        Need::AtLeast(lsn) => Some(lsn),
    };
    // (rank, node), for every replica this read may use at all.
    let mut usable: SmallVec<[(usize, usize); 8]> = snap
        .nodes
        .iter()
        .enumerate()
        .filter(|(_, n)| n.is_readable_replica(now) && on_writers_branch(n, snap, lsn.is_some()))
        .map(|(i, n)| (regions.rank(region, n.region.as_ref()), i))
        .collect();
    usable.sort_unstable();
    let tiers = tiers(&usable);
    let mut steps = SmallVec::new();
    let Some(lsn) = lsn else {
        for tier in tiers {
            push(&mut steps, tier.iter().copied(), false);
        }
        return steps;
    };
    let caught_up = |i: &usize| !snap.nodes[*i].load_balanced && snap.nodes[*i].lsn >= Some(lsn);
    let hopeful = |i: &usize| {
        !wait_budget.is_zero()
            && !caught_up(i)
            && snap.nodes[*i]
                .lag
                .map(|lag| expected_wait(*i).map_or(lag, |w| w.max(lag)))
                .is_some_and(|expected| expected <= wait_budget / 2)
    };
    if regions.waits_locally_first() {
        for tier in &tiers {
            push(&mut steps, tier.iter().copied().filter(caught_up), false);
            push(&mut steps, tier.iter().copied().filter(hopeful), true);
        }
    } else {
        for tier in &tiers {
            push(&mut steps, tier.iter().copied().filter(caught_up), false);
        }
        for tier in &tiers {
            push(&mut steps, tier.iter().copied().filter(hopeful), true);
        }
    }
    steps
}

/// Is the replica replaying the elected writer's history? Unknown timelines are fine for an
/// unguarded read, not for a guarded one (LSNs compare only within one timeline).
fn on_writers_branch(n: &NodeStatus, snap: &Snapshot, guarded: bool) -> bool {
    match (n.timeline, snap.timeline) {
        (Some(mine), Some(writers)) => mine == writers,
        (Some(_), None) => true,
        (None, _) => !guarded,
    }
}

/// Node indexes grouped by rank (the input is sorted by rank).
fn tiers(usable: &[(usize, usize)]) -> SmallVec<[SmallVec<[usize; 8]>; 4]> {
    let mut out: SmallVec<[SmallVec<[usize; 8]>; 4]> = SmallVec::new();
    let mut last = None;
    for &(rank, i) in usable {
        if last != Some(rank) {
            out.push(SmallVec::new());
            last = Some(rank);
        }
        if let Some(tier) = out.last_mut() {
            tier.push(i);
        }
    }
    out
}

fn push(steps: &mut SmallVec<[Step; 4]>, among: impl Iterator<Item = usize>, wait: bool) {
    let among: SmallVec<[usize; 8]> = among.collect();
    if !among.is_empty() {
        steps.push(Step { among, wait });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::Topology;
    use crate::{BanPolicy, Epoch, LagBounds, NodeConfig, NodeRole, Region};

    fn test_snapshot(nodes: usize) -> Snapshot {
        let configs: Vec<NodeConfig> = (0..nodes)
            .map(|i| NodeConfig::replica(format!("n{i}"), "postgres://h/db"))
            .collect();
        Topology::new(
            &configs,
            LagBounds::default(),
            BanPolicy::default(),
            Epoch::default(),
        )
        .snapshot()
    }

    const BUDGET: Duration = Duration::from_millis(100);

    fn lsn(x: u64) -> Lsn {
        Lsn(x)
    }

    /// Writer on timeline 2 at LSN 1000; replicas as given: (region, timeline, lsn, lag ms).
    fn snap(replicas: &[(&str, Option<u32>, u64, u64)]) -> Snapshot {
        let mut s = test_snapshot(replicas.len() + 1);
        s.writer = Some(0);
        s.timeline = Some(2);
        s.primary_lsn = Some(lsn(1000));
        s.nodes[0].role = NodeRole::Primary;
        for (k, (region, timeline, at, lag)) in replicas.iter().enumerate() {
            let n = &mut s.nodes[k + 1];
            n.role = NodeRole::Replica;
            n.reachable = true;
            n.region = Some(Region::new(*region));
            n.timeline = *timeline;
            n.lsn = Some(lsn(*at));
            n.lag = Some(Duration::from_millis(*lag));
        }
        s
    }

    fn plan(s: &Snapshot, regions: &RegionPolicy, need: Need) -> Vec<(Vec<usize>, bool)> {
        plan_replicas(
            s,
            Instant::now(),
            regions,
            Some(&Region::new("eu")),
            need,
            BUDGET,
            |_| None,
        )
        .into_iter()
        .map(|st| (st.among.to_vec(), st.wait))
        .collect()
    }

    #[test]
    fn a_replica_on_another_timeline_serves_nothing() {
        // Node 1 still follows the old primary (timeline 1) and looks far ahead.
        let s = snap(&[("eu", Some(1), 5000, 0), ("eu", Some(2), 900, 10)]);
        let r = RegionPolicy::new();
        assert_eq!(plan(&s, &r, Need::Any), vec![(vec![2], false)]);
        assert_eq!(plan(&s, &r, Need::AtLeast(lsn(950))), vec![(vec![2], true)]);
        assert_eq!(
            plan(&s, &r, Need::AtLeast(lsn(800))),
            vec![(vec![2], false)]
        );
    }

    #[test]
    fn an_unknown_timeline_serves_only_unguarded_reads() {
        let s = snap(&[("eu", None, 5000, 0)]);
        let r = RegionPolicy::new();
        assert_eq!(plan(&s, &r, Need::Any), vec![(vec![1], false)]);
        assert!(plan(&s, &r, Need::AtLeast(lsn(10))).is_empty());
    }

    #[test]
    fn a_caught_up_replica_in_a_fallback_region_comes_before_waiting_or_the_primary() {
        // eu lags (not caught up, lag beyond the budget), us is caught up.
        let s = snap(&[("eu", Some(2), 500, 5000), ("us", Some(2), 1000, 0)]);
        let r = RegionPolicy::new().fallback("eu", [Region::new("us")]);
        assert_eq!(
            plan(&s, &r, Need::AtLeast(lsn(1000))),
            vec![(vec![2], false)]
        );
        // A local replica worth waiting for comes after the caught-up remote one by default,
        // before it when waiting locally is preferred.
        let s = snap(&[("eu", Some(2), 990, 10), ("us", Some(2), 1000, 0)]);
        assert_eq!(
            plan(&s, &r, Need::AtLeast(lsn(1000))),
            vec![(vec![2], false), (vec![1], true)]
        );
        let local = r.clone().wait_locally_first(true);
        assert_eq!(
            plan(&s, &local, Need::AtLeast(lsn(1000))),
            vec![(vec![1], true), (vec![2], false)]
        );
    }

    #[test]
    fn unguarded_reads_try_every_tier_in_order() {
        let s = snap(&[
            ("us", Some(2), 1000, 0),
            ("eu", Some(2), 1000, 0),
            ("ap", None, 0, 0),
        ]);
        let r = RegionPolicy::new().fallback("eu", [Region::new("us")]);
        assert_eq!(
            plan(&s, &r, Need::Any),
            vec![(vec![2], false), (vec![1], false), (vec![3], false)]
        );
    }

    #[test]
    fn load_balanced_nodes_are_verified_on_the_session() {
        let mut s = snap(&[("eu", Some(2), 1000, 0)]);
        s.nodes[1].load_balanced = true;
        let r = RegionPolicy::new();
        assert_eq!(
            plan(&s, &r, Need::AtLeast(lsn(1000))),
            vec![(vec![1], true)]
        );
        assert_eq!(plan(&s, &r, Need::Any), vec![(vec![1], false)]);
    }

    #[test]
    fn primary_reads_and_zero_budgets_plan_no_waits() {
        let s = snap(&[("eu", Some(2), 990, 10)]);
        let r = RegionPolicy::new();
        assert!(plan(&s, &r, Need::Primary).is_empty());
        let steps = plan_replicas(
            &s,
            Instant::now(),
            &r,
            None,
            Need::AtLeast(lsn(1000)),
            Duration::ZERO,
            |_| None,
        );
        assert!(steps.is_empty());
    }

    #[test]
    fn a_replica_whose_recent_waits_were_long_is_not_waited_on() {
        // Replica 1 shows no lag (the probe compared it with an old primary position), but the
        // router's last waits on it took 60 ms: beyond half the budget, so not worth a wait.
        let s = snap(&[("eu", Some(2), 900, 0), ("eu", Some(2), 900, 0)]);
        let steps = plan_replicas(
            &s,
            Instant::now(),
            &RegionPolicy::default(),
            None,
            Need::AtLeast(lsn(1000)),
            BUDGET,
            |i| (i == 1).then_some(Duration::from_millis(60)),
        );
        let steps: Vec<_> = steps
            .into_iter()
            .map(|s| (s.among.to_vec(), s.wait))
            .collect();
        assert_eq!(steps, vec![(vec![2], true)]);
    }

    #[test]
    fn catch_up_estimates_follow_the_waits_and_are_forgotten() {
        let c = CatchUp::default();
        let t0 = Instant::now();
        assert_eq!(c.expected(t0), None, "no wait yet");
        c.record(Duration::from_millis(2), true, BUDGET, t0);
        assert_eq!(c.expected(t0), Some(Duration::from_millis(2)));
        // A wait that ran out counts as at least the budget.
        c.record(Duration::from_millis(1), false, BUDGET, t0);
        assert_eq!(
            c.expected(t0),
            Some(Duration::from_micros(1_500) + BUDGET / 4)
        );
        assert_eq!(c.expected(t0 + CATCH_UP_MEMORY), None, "forgotten");
        // After that, the next wait starts a new estimate.
        c.record(
            Duration::from_millis(3),
            true,
            BUDGET,
            t0 + CATCH_UP_MEMORY * 2,
        );
        assert_eq!(
            c.expected(t0 + CATCH_UP_MEMORY * 2),
            Some(Duration::from_millis(3))
        );
    }
}
