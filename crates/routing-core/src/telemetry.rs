//! Metrics through the [`metrics`] facade and the topology's `tracing` events.
//!
//! The library records; the application installs a recorder (an exporter such as
//! `metrics-exporter-prometheus`): without one every call here is a no-op. Install it before
//! building the router: the request path's series are registered once, at build, so a request
//! pays no label allocation or key lookup. Metric names are the constants below; labels never
//! hold a connection string, only node names and fixed words.
//!
//! Tracing: every routed request runs in a `debug` span (`routing.read` with `mode`, `node`
//! and `reason`; `routing.write` with `node`), so a healthy service logs nothing per request
//! at `info`. Topology changes are events: a writer elected, lost or replaced (a failover),
//! a generation bump and a node's role change at `info`/`warn`, bans at `warn`, re-admissions
//! at `info`; marks-store failures are `warn` (at most one a second).

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use metrics::{Counter, Histogram, SharedString, counter, gauge, histogram};

use crate::{Access, BackendError, NodeRole, Snapshot};

/// Counter: reads handed out, by `node` and `reason`: `eventual` (a replica, no LSN needed),
/// `caught_up` (a replica the snapshot showed past the needed LSN), `waited` (a replica, after
/// waiting for it to replay the LSN), `mode` (the primary, because the request's mode asked
/// for it: `Primary`, a recent writer, a marks failure), `fallback` (the primary, because no
/// replica could serve it).
pub const READS: &str = "routing_reads_total";
/// Counter: write sessions handed out, by `node`.
pub const WRITES: &str = "routing_writes_total";
/// Counter: reads that wanted a replica and went to the primary (`reason="fallback"` reads).
pub const PRIMARY_FALLBACKS: &str = "routing_primary_fallbacks_total";
/// Counter: waits for a replica to replay an LSN, by `node` and `outcome`
/// (`caught_up`, `timed_out`, `failed`).
pub const LSN_WAITS: &str = "routing_lsn_waits_total";
/// Histogram: how long those waits took, in seconds, by `node`.
pub const LSN_WAIT_SECONDS: &str = "routing_lsn_wait_seconds";
/// Histogram: marks-store round trips on requests, in seconds, by `op` (`get`, `set`).
pub const MARKS_SECONDS: &str = "routing_marks_seconds";
/// Counter: marks-store failures, by `op` and `kind` (`error`, `timeout`).
pub const MARKS_FAILURES: &str = "routing_marks_failures_total";
/// Histogram: request-path checkouts, in seconds, by `node` and `access` (`read`, `write`).
pub const CHECKOUT_SECONDS: &str = "routing_checkout_seconds";
/// Counter: failed request-path checkouts, by `node`, `access` and `kind` (the
/// [`crate::ErrorKind`] in snake case, `pool_busy` for a full pool).
pub const CHECKOUT_FAILURES: &str = "routing_checkout_failures_total";
/// Gauge: sessions of a node handed out now, by `node`.
pub const SESSIONS_IN_USE: &str = "routing_sessions_in_use";
/// Gauge: open connections in a node's pool, by `node` and `access` (when the adapter says).
pub const POOL_CONNECTIONS: &str = "routing_pool_connections";
/// Gauge: idle connections in a node's pool, by `node` and `access` (when the adapter says).
pub const POOL_IDLE: &str = "routing_pool_idle_connections";
/// Gauge: bytes a replica is behind the primary, by `node`, at the last probe.
pub const LAG_BYTES: &str = "routing_replica_lag_bytes";
/// Gauge: seconds a replica is behind the primary, by `node`, at the last probe.
pub const LAG_SECONDS: &str = "routing_replica_lag_seconds";
/// Gauge: 1 while a node's lag alert is raised, else 0, by `node`.
pub const LAG_ALERT: &str = "routing_lag_alert";
/// Gauge: the topology generation.
pub const GENERATION: &str = "routing_topology_generation";
/// Counter: times the writer became another node.
pub const FAILOVERS: &str = "routing_failovers_total";
/// Counter: nodes added to or removed from a running router, by `change` (`added`, `removed`).
pub const MEMBERSHIP_CHANGES: &str = "routing_membership_changes_total";
/// Counter: discovery polls, by `source` and `outcome` (`ok`, `error`, `timeout`, `empty`).
pub const DISCOVERY_POLLS: &str = "routing_discovery_polls_total";

fn access_label(access: Access) -> &'static str {
    match access {
        Access::ReadWrite => "write",
        Access::ReadOnly => "read",
        _ => "probe",
    }
}

fn kind_label(e: &BackendError) -> String {
    let debug = format!("{:?}", e.kind);
    let mut out = String::with_capacity(debug.len() + 4);
    for (i, c) in debug.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// One node's request-path metrics, registered once when the router is built (so a request
/// pays no label allocation or key lookup). A recorder installed after that sees none of them:
/// install it first.
pub(crate) struct NodeMetrics {
    name: Arc<str>,
    /// By reason: eventual, caught_up, waited, mode, fallback.
    reads: [Counter; 5],
    writes: Counter,
    checkout_read: Histogram,
    checkout_write: Histogram,
    lsn_wait: Histogram,
    /// By outcome: caught_up, timed_out, failed.
    lsn_waits: [Counter; 3],
}

const READ_REASONS: [&str; 5] = ["eventual", "caught_up", "waited", "mode", "fallback"];
const WAIT_OUTCOMES: [&str; 3] = ["caught_up", "timed_out", "failed"];

impl NodeMetrics {
    pub(crate) fn new(name: &Arc<str>) -> Self {
        let node = || SharedString::from(name.clone());
        NodeMetrics {
            name: name.clone(),
            reads: READ_REASONS.map(|r| counter!(READS, "node" => node(), "reason" => r)),
            writes: counter!(WRITES, "node" => node()),
            checkout_read: histogram!(CHECKOUT_SECONDS, "node" => node(), "access" => "read"),
            checkout_write: histogram!(CHECKOUT_SECONDS, "node" => node(), "access" => "write"),
            lsn_wait: histogram!(LSN_WAIT_SECONDS, "node" => node()),
            lsn_waits: WAIT_OUTCOMES.map(|o| counter!(LSN_WAITS, "node" => node(), "outcome" => o)),
        }
    }
}

impl std::fmt::Debug for NodeMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeMetrics")
            .field("node", &self.name)
            .finish()
    }
}

/// The router-wide request-path metrics, registered when the router is built.
pub(crate) struct RouterMetrics {
    fallbacks: Counter,
    marks_get: Histogram,
    marks_set: Histogram,
    /// get/error, get/timeout, set/error, set/timeout.
    marks_failures: [Counter; 4],
}

impl RouterMetrics {
    pub(crate) fn new() -> Self {
        RouterMetrics {
            fallbacks: counter!(PRIMARY_FALLBACKS),
            marks_get: histogram!(MARKS_SECONDS, "op" => "get"),
            marks_set: histogram!(MARKS_SECONDS, "op" => "set"),
            marks_failures: [
                counter!(MARKS_FAILURES, "op" => "get", "kind" => "error"),
                counter!(MARKS_FAILURES, "op" => "get", "kind" => "timeout"),
                counter!(MARKS_FAILURES, "op" => "set", "kind" => "error"),
                counter!(MARKS_FAILURES, "op" => "set", "kind" => "timeout"),
            ],
        }
    }
}

impl std::fmt::Debug for RouterMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouterMetrics").finish_non_exhaustive()
    }
}

/// Which marks-store call: a lookup on a read, or an update after a commit.
#[derive(Debug, Clone, Copy)]
pub(crate) enum MarksOp {
    Get,
    Set,
}

/// Records the request's mode on the current `routing.read` span.
pub(crate) fn read_mode(mode: &crate::Consistency) {
    tracing::Span::current().record("mode", tracing::field::debug(mode));
}

/// The request's region, on the read span.
pub(crate) fn read_region(region: Option<&crate::Region>) {
    if let Some(region) = region {
        tracing::Span::current().record("region", region.as_str());
    }
}

/// What guarded a read-your-writes or causal read, on the read span: the client's token, the
/// user's mark, both, or neither; `marks-failed` when the marks store did not answer and the
/// read went to the primary for it.
pub(crate) fn read_guard(token: bool, mark: bool, marks_failed: bool) {
    let span = tracing::Span::current();
    if span.is_disabled() {
        return;
    }
    let guard = match (token, mark, marks_failed) {
        (_, _, true) => "marks-failed",
        (true, true, _) => "mark+token",
        (true, false, _) => "token",
        (false, true, _) => "mark",
        (false, false, _) => "none",
    };
    span.record("guard", guard);
}

/// A read handed out on a replica.
pub(crate) fn read_on_replica(m: &NodeMetrics, waited: bool, needed_lsn: bool) {
    let reason = match (waited, needed_lsn) {
        (true, _) => 2,
        (false, true) => 1,
        (false, false) => 0,
    };
    read(m, reason);
}

/// A read handed out on the primary.
pub(crate) fn read_on_primary(m: &NodeMetrics, router: &RouterMetrics, fallback: bool) {
    if fallback {
        router.fallbacks.increment(1);
    }
    read(m, if fallback { 4 } else { 3 });
}

fn read(m: &NodeMetrics, reason: usize) {
    let span = tracing::Span::current();
    if !span.is_disabled() {
        span.record("node", &*m.name);
        span.record("reason", READ_REASONS[reason]);
    }
    m.reads[reason].increment(1);
}

/// A write session handed out.
pub(crate) fn write(m: &NodeMetrics) {
    tracing::Span::current().record("node", &*m.name);
    m.writes.increment(1);
}

/// Times a request-path checkout and counts its failures.
pub(crate) async fn checkout<T>(
    m: &NodeMetrics,
    access: Access,
    f: impl Future<Output = Result<T, BackendError>>,
) -> Result<T, BackendError> {
    let started = Instant::now();
    let out = f.await;
    let elapsed = started.elapsed().as_secs_f64();
    if access == Access::ReadWrite {
        m.checkout_write.record(elapsed);
    } else {
        m.checkout_read.record(elapsed);
    }
    if let Err(e) = &out {
        let access = access_label(access);
        counter!(CHECKOUT_FAILURES, "node" => SharedString::from(m.name.clone()), "access" => access, "kind" => kind_label(e))
            .increment(1);
    }
    out
}

/// Times a wait for a replica to replay an LSN (`Ok(Some)`: caught up, `Ok(None)`: budget
/// spent).
pub(crate) async fn lsn_wait<T>(
    m: &NodeMetrics,
    f: impl Future<Output = Result<Option<T>, BackendError>>,
) -> Result<Option<T>, BackendError> {
    let started = Instant::now();
    let out = f.await;
    let outcome = match &out {
        Ok(Some(_)) => 0,
        Ok(None) => 1,
        Err(_) => 2,
    };
    m.lsn_wait.record(started.elapsed().as_secs_f64());
    m.lsn_waits[outcome].increment(1);
    out
}

/// Times a marks-store call bounded by a timeout, and counts its failures.
pub(crate) async fn marks<T, E>(
    router: &RouterMetrics,
    op: MarksOp,
    f: impl Future<Output = Result<Result<T, E>, tokio::time::error::Elapsed>>,
) -> Result<Result<T, E>, tokio::time::error::Elapsed> {
    let started = Instant::now();
    let out = f.await;
    let (latency, failures) = match op {
        MarksOp::Get => (&router.marks_get, &router.marks_failures[0..2]),
        MarksOp::Set => (&router.marks_set, &router.marks_failures[2..4]),
    };
    latency.record(started.elapsed().as_secs_f64());
    match &out {
        Ok(Ok(_)) => {}
        Ok(Err(_)) => failures[0].increment(1),
        Err(_) => failures[1].increment(1),
    }
    out
}

/// Pool gauges of one node.
pub(crate) fn pools(
    node: &str,
    in_use: usize,
    writer: Option<crate::PoolState>,
    reader: Option<crate::PoolState>,
) {
    gauge!(SESSIONS_IN_USE, "node" => node.to_string()).set(in_use as f64);
    for (access, state) in [("write", writer), ("read", reader)] {
        if let Some(s) = state {
            gauge!(POOL_CONNECTIONS, "node" => node.to_string(), "access" => access)
                .set(f64::from(s.connections));
            gauge!(POOL_IDLE, "node" => node.to_string(), "access" => access)
                .set(f64::from(s.idle));
        }
    }
}

/// A node added to or removed from a running router.
pub(crate) fn membership(node: &str, added: bool) {
    counter!(MEMBERSHIP_CHANGES, "change" => if added { "added" } else { "removed" }).increment(1);
    if added {
        tracing::info!(
            node,
            "node added: probed from now on, serves reads once it qualifies"
        );
    }
}

/// One discovery poll and its outcome.
pub(crate) fn discovery_poll(source: &str, outcome: &'static str) {
    counter!(DISCOVERY_POLLS, "source" => source.to_string(), "outcome" => outcome).increment(1);
}

/// A removed node's gauges go to zero (the `metrics` facade cannot unregister them).
pub(crate) fn node_gone(node: &str) {
    gauge!(LAG_BYTES, "node" => node.to_string()).set(0.0);
    gauge!(LAG_SECONDS, "node" => node.to_string()).set(0.0);
    gauge!(LAG_ALERT, "node" => node.to_string()).set(0.0);
    for access in ["write", "read"] {
        gauge!(POOL_CONNECTIONS, "node" => node.to_string(), "access" => access).set(0.0);
        gauge!(POOL_IDLE, "node" => node.to_string(), "access" => access).set(0.0);
    }
}

/// A node's lag alert state.
pub(crate) fn lag_alert(node: &str, raised: bool) {
    gauge!(LAG_ALERT, "node" => node.to_string()).set(if raised { 1.0 } else { 0.0 });
}

/// After node `i` was probed or failed: its lag gauges, and an event for every change between
/// the two snapshots that an operator cares about. `last_writer` is the writer elected before
/// `new` (through any gap without one), so a failover seen as "writer lost" then "another
/// writer" is still reported as one.
pub(crate) fn topology(
    old: &Snapshot,
    new: &Snapshot,
    i: usize,
    probed: bool,
    last_writer: Option<usize>,
) {
    let node = &new.nodes[i];
    if probed && node.role == NodeRole::Replica {
        if let Some(b) = node.lag_bytes {
            gauge!(LAG_BYTES, "node" => node.name.to_string()).set(b as f64);
        }
        if let Some(t) = node.lag {
            gauge!(LAG_SECONDS, "node" => node.name.to_string()).set(t.as_secs_f64());
        }
    }
    gauge!(GENERATION).set(new.generation as f64);
    if old.generation != new.generation {
        tracing::info!(
            from = old.generation,
            to = new.generation,
            writer = new.writer().map(|w| &*w.name),
            "topology generation moved: sessions from before are never handed out again"
        );
    }
    match (old.writer, new.writer) {
        (_, Some(b)) if old.writer != Some(b) => match last_writer {
            Some(a) if a != b => {
                counter!(FAILOVERS).increment(1);
                tracing::warn!(
                    from = %new.nodes[a].name,
                    to = %new.nodes[b].name,
                    timeline = new.timeline,
                    "failover: another node is the writer"
                );
            }
            Some(_) => tracing::info!(node = %new.nodes[b].name, "writer answers again"),
            None => {
                tracing::info!(node = %new.nodes[b].name, timeline = new.timeline, "writer elected")
            }
        },
        (Some(a), None) => {
            tracing::warn!(node = %old.nodes[a].name, "writer lost: writes wait for a primary")
        }
        _ => {}
    }
    let now = Instant::now();
    for (o, n) in old.nodes.iter().zip(&new.nodes) {
        if o.role != n.role && n.role != NodeRole::Unknown {
            tracing::info!(node = %n.name, from = ?o.role, to = ?n.role, "node role changed");
        }
        let banned = n.banned_until.filter(|t| *t > now);
        match banned {
            // A new ban (or a longer one after a failure once the last had run out).
            Some(until) if o.banned_until != n.banned_until => tracing::warn!(
                node = %n.name,
                ban_ms = until.saturating_duration_since(now).as_millis() as u64,
                error = n.last_error.as_deref().unwrap_or(""),
                "node banned from reads"
            ),
            None if o.banned_until.is_some() && n.banned_until.is_none() && n.reachable => {
                tracing::info!(node = %n.name, "node re-admitted after a ban")
            }
            _ => {}
        }
    }
}

/// Describes every metric to the installed recorder (Prometheus `# HELP` lines) and registers
/// the series that may stay at zero for a long time, so a dashboard sees them from the start:
/// called when a router is built (the request path's own series are registered with it, in
/// [`NodeMetrics`] and [`RouterMetrics`]).
pub(crate) fn register(alerting: impl IntoIterator<Item = std::sync::Arc<str>>) {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(READS, "Read sessions handed out, by node and reason");
    describe_counter!(WRITES, "Write sessions handed out, by node");
    describe_counter!(
        PRIMARY_FALLBACKS,
        "Reads that wanted a replica and went to the primary"
    );
    describe_counter!(
        LSN_WAITS,
        "Waits for a replica to replay an LSN, by node and outcome"
    );
    describe_histogram!(
        LSN_WAIT_SECONDS,
        Unit::Seconds,
        "Duration of LSN waits, by node"
    );
    describe_histogram!(
        MARKS_SECONDS,
        Unit::Seconds,
        "Marks-store round trips on requests, by op"
    );
    describe_counter!(MARKS_FAILURES, "Marks-store failures, by op and kind");
    describe_histogram!(
        CHECKOUT_SECONDS,
        Unit::Seconds,
        "Request-path checkouts, by node and access"
    );
    describe_counter!(
        CHECKOUT_FAILURES,
        "Failed request-path checkouts, by node, access and kind"
    );
    describe_gauge!(SESSIONS_IN_USE, "Sessions of a node handed out now");
    describe_gauge!(
        POOL_CONNECTIONS,
        "Open connections in a node's pool, by access"
    );
    describe_gauge!(POOL_IDLE, "Idle connections in a node's pool, by access");
    describe_gauge!(
        LAG_BYTES,
        Unit::Bytes,
        "Bytes a replica is behind the primary"
    );
    describe_gauge!(
        LAG_SECONDS,
        Unit::Seconds,
        "Seconds a replica is behind the primary"
    );
    describe_gauge!(LAG_ALERT, "1 while a node's lag alert is raised");
    describe_gauge!(GENERATION, "The topology generation");
    describe_counter!(FAILOVERS, "Times the writer became another node");
    describe_counter!(DISCOVERY_POLLS, "Discovery polls, by source and outcome");
    describe_counter!(
        MEMBERSHIP_CHANGES,
        "Nodes added to or removed from the running router, by change"
    );
    counter!(FAILOVERS).increment(0);
    for node in alerting {
        lag_alert(&node, false);
    }
}

/// How often the pool gauges are refreshed.
pub(crate) fn gauge_interval(probe_interval: Duration) -> Duration {
    probe_interval.clamp(Duration::from_millis(250), Duration::from_secs(5))
}
