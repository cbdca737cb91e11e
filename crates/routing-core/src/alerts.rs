//! Replica lag alerts: thresholds in bytes and in time, per router and per node, with
//! hysteresis, so an operator hears once when a replica falls behind and once when it is back.
//!
//! The alert state machine ([`LagAlertThresholds::next_state`]) is pure; the monitor feeds it
//! every probe of every node and, on a transition only, emits one `tracing` event and calls
//! every [`LagAlertHandler`] registered with [`crate::RouterBuilder::on_lag_alert`] once.

use std::sync::Arc;
use std::time::Duration;

/// When a replica's lag raises an alert, and when the alert clears.
///
/// An alert is **raised** when the replica is more than [`max_bytes`](Self::max_bytes) behind
/// the primary or more than [`max_time`](Self::max_time) behind in time (whichever is set), and
/// **cleared** only once every measure is back below [`clear_ratio`](Self::clear_ratio) times
/// its threshold. Lag that moves back and forth between the two lines (a flapping replica)
/// therefore alerts once, not once per crossing of the upper line.
///
/// These thresholds are independent of [`crate::LagBounds`], which take a replica out of the
/// read rotation: alerting at a lower lag than exclusion warns before reads move to the primary.
/// With neither threshold set (the default), no alert is ever raised. Only probe answers are
/// judged: a node that stops answering keeps its alert state until it answers again (its bans
/// are reported separately), and a replica promoted to primary has no lag, so its alert clears.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LagAlertThresholds {
    /// Alert when more than this many bytes of WAL behind the primary (the cheat sheet's
    /// "alert if lag > N MB"). `None`: bytes never alert.
    pub max_bytes: Option<u64>,
    /// Alert when more than this far behind in time. `None`: time never alerts.
    pub max_time: Option<Duration>,
    /// A raised alert clears once every measure is below this fraction of its threshold
    /// (within `(0, 1]`; 1 means no hysteresis).
    pub clear_ratio: f64,
}

impl Default for LagAlertThresholds {
    fn default() -> Self {
        LagAlertThresholds::DISABLED
    }
}

impl LagAlertThresholds {
    /// No thresholds: never alerts.
    pub const DISABLED: LagAlertThresholds = LagAlertThresholds {
        max_bytes: None,
        max_time: None,
        clear_ratio: 0.5,
    };

    /// Alert above `max_bytes` of WAL behind the primary.
    pub fn bytes(max_bytes: u64) -> Self {
        LagAlertThresholds {
            max_bytes: Some(max_bytes),
            ..Self::DISABLED
        }
    }

    /// Alert above `max_time` behind in time.
    pub fn time(max_time: Duration) -> Self {
        LagAlertThresholds {
            max_time: Some(max_time),
            ..Self::DISABLED
        }
    }

    /// Also alert above `max_bytes`.
    pub fn and_bytes(mut self, max_bytes: u64) -> Self {
        self.max_bytes = Some(max_bytes);
        self
    }

    /// Also alert above `max_time`.
    pub fn and_time(mut self, max_time: Duration) -> Self {
        self.max_time = Some(max_time);
        self
    }

    /// Sets the hysteresis (see [`LagAlertThresholds::clear_ratio`]).
    pub fn clear_ratio(mut self, ratio: f64) -> Self {
        self.clear_ratio = ratio;
        self
    }

    /// True when at least one threshold is set.
    pub fn enabled(&self) -> bool {
        self.max_bytes.is_some() || self.max_time.is_some()
    }

    /// The state machine: whether an alert is raised after observing `bytes` and `time` behind
    /// the primary, given whether it was `raised` before. A measure that is unknown (`None`)
    /// neither raises nor clears; with no configured measure known, the state is kept.
    pub fn next_state(&self, raised: bool, bytes: Option<u64>, time: Option<Duration>) -> bool {
        let bytes = self.max_bytes.and(bytes);
        let time = self.max_time.and(time);
        if bytes.is_none() && time.is_none() {
            return raised;
        }
        let over = |ratio: f64| {
            let b = matches!((self.max_bytes, bytes), (Some(max), Some(b)) if b as f64 > max as f64 * ratio);
            let t = matches!((self.max_time, time), (Some(max), Some(t)) if t.as_secs_f64() > max.as_secs_f64() * ratio);
            b || t
        };
        if raised {
            over(self.clear_ratio)
        } else {
            over(1.0)
        }
    }

    pub(crate) fn validate(&self, field: &str) -> Result<(), crate::Error> {
        if !(self.clear_ratio > 0.0 && self.clear_ratio <= 1.0) {
            return Err(crate::Error::Config(format!(
                "{field}.clear_ratio = {} is outside (0, 1]",
                self.clear_ratio
            )));
        }
        if self.max_bytes == Some(0) {
            return Err(crate::Error::Config(format!(
                "{field}.max_bytes = 0 would alert on any lag; leave it unset to disable"
            )));
        }
        if self.max_time == Some(Duration::ZERO) {
            return Err(crate::Error::Config(format!(
                "{field}.max_time = 0s would alert on any lag; leave it unset to disable"
            )));
        }
        Ok(())
    }
}

/// Which way a lag alert went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum LagAlertKind {
    /// The replica crossed above a threshold.
    Raised,
    /// The replica came back below the clear line of every threshold.
    Cleared,
}

/// One lag alert transition, as passed to a [`LagAlertHandler`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct LagAlert {
    /// The node's configured name.
    pub node: Arc<str>,
    /// Raised or cleared.
    pub kind: LagAlertKind,
    /// Bytes behind the primary at the probe that caused the transition.
    pub lag_bytes: Option<u64>,
    /// Time behind the primary at that probe.
    pub lag: Option<Duration>,
    /// The thresholds in force for this node.
    pub thresholds: LagAlertThresholds,
}

/// Receives lag alerts. Object-safe; any `Fn(&LagAlert) + Send + Sync + 'static` closure
/// implements it. Called from the monitor's task, once per transition: keep it quick (hand
/// slow work, such as paging someone, to a channel or a spawned task).
pub trait LagAlertHandler: Send + Sync + 'static {
    /// One transition of one node.
    fn on_lag_alert(&self, alert: &LagAlert);
}

impl<F> LagAlertHandler for F
where
    F: Fn(&LagAlert) + Send + Sync + 'static,
{
    fn on_lag_alert(&self, alert: &LagAlert) {
        self(alert)
    }
}

/// The alert state of every node, kept by the topology handle.
pub(crate) struct LagAlerts {
    nodes: Vec<(Arc<str>, LagAlertThresholds, bool)>,
    handlers: Vec<Arc<dyn LagAlertHandler>>,
}

impl std::fmt::Debug for LagAlerts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LagAlerts")
            .field("nodes", &self.nodes)
            .field("handlers", &self.handlers.len())
            .finish()
    }
}

impl LagAlerts {
    /// `thresholds[i]` for node `names[i]`.
    pub(crate) fn new(
        names: impl IntoIterator<Item = Arc<str>>,
        thresholds: impl IntoIterator<Item = LagAlertThresholds>,
        handlers: Vec<Arc<dyn LagAlertHandler>>,
    ) -> Self {
        LagAlerts {
            nodes: names
                .into_iter()
                .zip(thresholds)
                .map(|(n, t)| (n, t, false))
                .collect(),
            handlers,
        }
    }

    /// Feeds node `i`'s latest lag to its state machine; the alert on a transition.
    pub(crate) fn observe(
        &mut self,
        i: usize,
        lag_bytes: Option<u64>,
        lag: Option<Duration>,
    ) -> Option<LagAlert> {
        let (name, thresholds, raised) = self.nodes.get_mut(i)?;
        if !thresholds.enabled() {
            return None;
        }
        let next = thresholds.next_state(*raised, lag_bytes, lag);
        if next == *raised {
            return None;
        }
        *raised = next;
        Some(LagAlert {
            node: name.clone(),
            kind: if next {
                LagAlertKind::Raised
            } else {
                LagAlertKind::Cleared
            },
            lag_bytes,
            lag,
            thresholds: *thresholds,
        })
    }

    /// Logs the transition and calls every handler (outside any lock).
    pub(crate) fn emit(handlers: &[Arc<dyn LagAlertHandler>], alert: &LagAlert) {
        let bytes = alert.lag_bytes;
        let ms = alert.lag.map(|d| d.as_millis() as u64);
        match alert.kind {
            LagAlertKind::Raised => tracing::warn!(
                node = %alert.node,
                lag_bytes = bytes,
                lag_ms = ms,
                max_bytes = alert.thresholds.max_bytes,
                max_ms = alert.thresholds.max_time.map(|d| d.as_millis() as u64),
                "replica lag above the alert threshold"
            ),
            LagAlertKind::Cleared => tracing::info!(
                node = %alert.node,
                lag_bytes = bytes,
                lag_ms = ms,
                "replica lag back below the alert threshold"
            ),
        }
        for h in handlers {
            h.on_lag_alert(alert);
        }
    }

    /// Adds a node at the next index.
    pub(crate) fn push(&mut self, name: Arc<str>, thresholds: LagAlertThresholds) {
        self.nodes.push((name, thresholds, false));
    }

    /// Forgets node `i`'s alert (it was removed): its gauge goes to 0, no handler is called.
    pub(crate) fn clear(&mut self, i: usize) {
        if let Some(n) = self.nodes.get_mut(i) {
            if n.2 {
                crate::telemetry::lag_alert(&n.0, false);
            }
            n.1 = LagAlertThresholds::default();
            n.2 = false;
        }
    }

    /// Whether each node's alert is raised now.
    pub(crate) fn raised(&self) -> Vec<bool> {
        self.nodes.iter().map(|n| n.2).collect()
    }

    pub(crate) fn handlers(&self) -> &[Arc<dyn LagAlertHandler>] {
        &self.handlers
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Option<Duration> {
        Some(Duration::from_millis(n))
    }

    /// Feeds a series of (bytes, time) observations; returns the transitions.
    fn run(t: LagAlertThresholds, series: &[(Option<u64>, Option<Duration>)]) -> Vec<LagAlertKind> {
        let mut alerts = LagAlerts::new([Arc::from("r1")], [t], Vec::new());
        series
            .iter()
            .filter_map(|&(b, d)| alerts.observe(0, b, d).map(|a| a.kind))
            .collect()
    }

    use LagAlertKind::{Cleared, Raised};

    #[test]
    fn one_raise_per_crossing_not_one_per_probe() {
        let t = LagAlertThresholds::bytes(1000);
        let over = (Some(5000), None);
        let under = (Some(10), None);
        let got = run(
            t,
            &[under, over, over, over, under, under, over, over, under],
        );
        assert_eq!(got, [Raised, Cleared, Raised, Cleared]);
    }

    #[test]
    fn flapping_within_the_hysteresis_alerts_once() {
        let t = LagAlertThresholds::bytes(1000).clear_ratio(0.5);
        // Back and forth across the 1000-byte line, never under the 500-byte clear line.
        let series: Vec<_> = [900, 1100, 800, 1200, 600, 1001, 999, 501, 1500, 700]
            .into_iter()
            .map(|b| (Some(b), None))
            .collect();
        assert_eq!(run(t, &series), [Raised]);
        let mut series = series;
        series.push((Some(500), None));
        assert_eq!(run(t, &series), [Raised, Cleared], "500 is not above 500");
    }

    #[test]
    fn time_and_bytes_raise_independently_and_clear_together() {
        let t = LagAlertThresholds::bytes(1000)
            .and_time(Duration::from_secs(1))
            .clear_ratio(0.5);
        let got = run(
            t,
            &[
                (Some(0), ms(1500)),  // time over: raised
                (Some(2000), ms(0)),  // bytes over now: still raised
                (Some(100), ms(600)), // time above its clear line (500 ms): still raised
                (Some(600), ms(100)), // bytes above theirs (500): still raised
                (Some(100), ms(100)), // both under: cleared
            ],
        );
        assert_eq!(got, [Raised, Cleared]);
    }

    #[test]
    fn unknown_lag_neither_raises_nor_clears() {
        let t = LagAlertThresholds::time(Duration::from_secs(1));
        assert_eq!(
            run(t, &[(None, None), (Some(1 << 40), None), (None, ms(2000))]),
            [Raised],
            "bytes are not configured: a huge byte lag is ignored"
        );
        assert_eq!(run(t, &[(None, ms(2000)), (None, None)]), [Raised]);
    }

    #[test]
    fn no_hysteresis_with_ratio_one() {
        let t = LagAlertThresholds::bytes(1000).clear_ratio(1.0);
        let got = run(t, &[(Some(1001), None), (Some(1000), None)]);
        assert_eq!(got, [Raised, Cleared]);
    }

    #[test]
    fn disabled_never_alerts() {
        let got = run(
            LagAlertThresholds::DISABLED,
            &[(Some(u64::MAX), ms(1 << 40))],
        );
        assert!(got.is_empty());
    }

    #[test]
    fn each_node_has_its_own_thresholds_and_state() {
        let mut alerts = LagAlerts::new(
            [Arc::from("a"), Arc::from("b")],
            [
                LagAlertThresholds::bytes(1000),
                LagAlertThresholds::bytes(10_000),
            ],
            Vec::new(),
        );
        let a = alerts.observe(0, Some(5000), None).expect("a crosses 1000");
        assert_eq!((&*a.node, a.kind), ("a", Raised));
        assert_eq!(a.lag_bytes, Some(5000));
        assert!(
            alerts.observe(1, Some(5000), None).is_none(),
            "b's is 10000"
        );
        assert!(
            alerts.observe(0, Some(5000), None).is_none(),
            "a stays raised"
        );
    }

    #[test]
    fn closures_are_handlers_and_each_handler_is_called_once_per_transition() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let calls = Arc::new(AtomicUsize::new(0));
        let seen = calls.clone();
        let handler: Arc<dyn LagAlertHandler> = Arc::new(move |_: &LagAlert| {
            seen.fetch_add(1, Ordering::SeqCst);
        });
        let mut alerts = LagAlerts::new(
            [Arc::from("a")],
            [LagAlertThresholds::bytes(1)],
            vec![handler.clone(), handler],
        );
        for _ in 0..5 {
            if let Some(a) = alerts.observe(0, Some(100), None) {
                LagAlerts::emit(alerts.handlers(), &a);
            }
        }
        assert_eq!(calls.load(Ordering::SeqCst), 2, "two handlers, one raise");
    }

    #[test]
    fn invalid_thresholds_name_the_field_and_value() {
        let err = LagAlertThresholds::bytes(10)
            .clear_ratio(1.5)
            .validate("lag_alert")
            .unwrap_err();
        assert!(
            err.to_string().contains("lag_alert.clear_ratio = 1.5"),
            "{err}"
        );
        let err = LagAlertThresholds::bytes(0).validate("x").unwrap_err();
        assert!(err.to_string().contains("x.max_bytes = 0"), "{err}");
    }
}
