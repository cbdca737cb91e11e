//! The read decision, without I/O: from the mode's requirement and a topology snapshot, which
//! replicas a read may go to, in which order, and where it must wait or verify. The router acts
//! on the plan (checks out, waits, falls back to the primary); unit tests check the plan alone.

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

/// Replicas for a read that needs `need` (`Any` or `AtLeast`), best first; empty when only the
/// primary can serve it.
///
/// - A replica on another timeline than the writer's (following a fenced old primary) serves
///   nothing: its LSNs are on a dead branch. For a guarded read its timeline must be known too.
/// - Without an LSN: one step per region tier, own region first ([`RegionPolicy::rank`]).
/// - With an LSN: replicas the snapshot shows past it, by tier; then replicas worth waiting for
///   (last measured lag within half the budget), by tier. With
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
            && snap.nodes[*i].lag.unwrap_or(Duration::MAX) <= wait_budget / 2
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
        );
        assert!(steps.is_empty());
    }
}
