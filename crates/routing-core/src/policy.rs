//! Small policy traits with closure impls: which replica, which regions.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::Region;

/// A replica the router may use for a read.
#[derive(Debug, Clone, Copy)]
pub struct Candidate<'a> {
    /// Index of the node in the configuration.
    pub node: usize,
    /// Node name.
    pub name: &'a str,
    /// Configured weight.
    pub weight: u32,
    /// Sessions of this router currently checked out from the node.
    pub in_flight: usize,
    /// Bytes behind the primary at the last probe.
    pub lag_bytes: Option<u64>,
}

/// Chooses among eligible replicas. `candidates` is never empty; return an index into it
/// (out-of-range answers are clamped).
///
/// Any `Fn(&[Candidate<'_>]) -> usize + Send + Sync` is a picker:
/// ```
/// use routing_core::{Candidate, ReplicaPicker};
/// let least_lag = |c: &[Candidate<'_>]| {
///     (0..c.len()).min_by_key(|&i| c[i].lag_bytes.unwrap_or(u64::MAX)).unwrap_or(0)
/// };
/// let picker: Box<dyn ReplicaPicker> = Box::new(least_lag);
/// # let _ = picker;
/// ```
pub trait ReplicaPicker: Send + Sync + 'static {
    /// Picks one candidate.
    fn pick(&self, candidates: &[Candidate<'_>]) -> usize;
}

impl<F> ReplicaPicker for F
where
    F: Fn(&[Candidate<'_>]) -> usize + Send + Sync + 'static,
{
    fn pick(&self, candidates: &[Candidate<'_>]) -> usize {
        self(candidates)
    }
}

/// Weighted random choice.
#[derive(Debug, Default, Clone, Copy)]
pub struct Random;

impl ReplicaPicker for Random {
    fn pick(&self, c: &[Candidate<'_>]) -> usize {
        let total: u64 = c.iter().map(|x| u64::from(x.weight)).sum();
        if total == 0 {
            return rand::random_range(0..c.len());
        }
        let mut r = rand::random_range(0..total);
        for (i, x) in c.iter().enumerate() {
            let w = u64::from(x.weight);
            if r < w {
                return i;
            }
            r -= w;
        }
        c.len() - 1
    }
}

/// Each candidate in turn.
#[derive(Debug, Default)]
pub struct RoundRobin(AtomicUsize);

impl ReplicaPicker for RoundRobin {
    fn pick(&self, c: &[Candidate<'_>]) -> usize {
        self.0.fetch_add(1, Ordering::Relaxed) % c.len()
    }
}

/// Power of two choices on in-flight sessions: two random candidates, the less busy one wins
/// (weights break ties). Near-optimal load spread without a global scan.
#[derive(Debug, Default, Clone, Copy)]
pub struct LeastOutstanding;

impl ReplicaPicker for LeastOutstanding {
    fn pick(&self, c: &[Candidate<'_>]) -> usize {
        if c.len() == 1 {
            return 0;
        }
        let a = rand::random_range(0..c.len());
        let mut b = rand::random_range(0..c.len() - 1);
        if b >= a {
            b += 1;
        }
        let load = |i: usize| (c[i].in_flight, std::cmp::Reverse(c[i].weight));
        if load(b) < load(a) { b } else { a }
    }
}

/// Where a request from a region may read: its own region, then the configured fallback order,
/// then any region, then the primary.
#[derive(Debug, Clone, Default)]
pub struct RegionPolicy {
    fallbacks: HashMap<Region, Vec<Region>>,
    wait_locally_first: bool,
}

impl RegionPolicy {
    /// No fallbacks: own region, then any.
    pub fn new() -> Self {
        Self::default()
    }

    /// Requests from `from` try `order` (in order) after their own region.
    pub fn fallback(
        mut self,
        from: impl Into<Region>,
        order: impl IntoIterator<Item = Region>,
    ) -> Self {
        self.fallbacks
            .insert(from.into(), order.into_iter().collect());
        self
    }

    /// For reads that need an LSN: whether a replica in the request's own region that must
    /// first catch up (a wait of up to `wait_budget`) is tried before a replica in a fallback
    /// region that has already caught up. Default `false`: latency first, a caught-up replica
    /// anywhere before any wait (then the waits, own region first; then the primary). `true`
    /// keeps reads in-region at the cost of waiting.
    pub fn wait_locally_first(mut self, on: bool) -> Self {
        self.wait_locally_first = on;
        self
    }

    /// See [`RegionPolicy::wait_locally_first`].
    pub fn waits_locally_first(&self) -> bool {
        self.wait_locally_first
    }

    /// The rank of a replica in `replica_region` for a request from `from`: 0 is best.
    /// `None` region on either side ranks last-but-usable.
    pub fn rank(&self, from: Option<&Region>, replica_region: Option<&Region>) -> usize {
        let (Some(from), Some(r)) = (from, replica_region) else {
            return usize::MAX;
        };
        if from == r {
            return 0;
        }
        match self
            .fallbacks
            .get(from)
            .and_then(|order| order.iter().position(|x| x == r))
        {
            Some(p) => p + 1,
            None => usize::MAX,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cands(loads: &[usize]) -> Vec<Candidate<'static>> {
        loads
            .iter()
            .enumerate()
            .map(|(i, &l)| Candidate {
                node: i,
                name: "n",
                weight: 1,
                in_flight: l,
                lag_bytes: Some(0),
            })
            .collect()
    }

    #[test]
    fn round_robin_cycles() {
        let rr = RoundRobin::default();
        let c = cands(&[0, 0, 0]);
        let picks: Vec<usize> = (0..6).map(|_| rr.pick(&c)).collect();
        assert_eq!(picks, vec![0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn least_outstanding_avoids_the_busy_node() {
        let c = cands(&[100, 0]);
        for _ in 0..100 {
            assert_eq!(LeastOutstanding.pick(&c), 1);
        }
    }

    #[test]
    fn random_respects_weights() {
        let mut c = cands(&[0, 0]);
        c[0].weight = 0;
        for _ in 0..200 {
            assert_eq!(Random.pick(&c), 1);
        }
        let c = cands(&[0, 0, 0]);
        let mut seen = [0; 3];
        for _ in 0..3000 {
            seen[Random.pick(&c)] += 1;
        }
        assert!(seen.iter().all(|&n| n > 700), "{seen:?}");
    }

    #[test]
    fn closures_are_pickers() {
        let last = |c: &[Candidate<'_>]| c.len() - 1;
        assert_eq!(last.pick(&cands(&[0, 0, 0])), 2);
    }

    #[test]
    fn region_ranks_follow_fallback_order() {
        let p = RegionPolicy::new().fallback("eu", [Region::new("us"), Region::new("ap")]);
        let eu = Region::new("eu");
        assert_eq!(p.rank(Some(&eu), Some(&Region::new("eu"))), 0);
        assert_eq!(p.rank(Some(&eu), Some(&Region::new("us"))), 1);
        assert_eq!(p.rank(Some(&eu), Some(&Region::new("ap"))), 2);
        assert_eq!(p.rank(Some(&eu), Some(&Region::new("sa"))), usize::MAX);
        assert_eq!(p.rank(None, Some(&eu)), usize::MAX);
    }
}
