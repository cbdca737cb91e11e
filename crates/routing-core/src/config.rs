//! Router configuration, validated once at build time.

use std::time::Duration;

use crate::{ConnString, Consistency, Error, LagAlertThresholds, Region};

/// What the operator expects a node to be. Roles are always verified by probing: a
/// `Replica` that gets promoted becomes the writer, a `WriterCandidate` found in recovery serves reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize),
    serde(rename_all = "snake_case")
)]
#[non_exhaustive]
pub enum RoleHint {
    /// Expected to be (or become) the primary; preferred among equal writers.
    WriterCandidate,
    /// Expected to be a streaming replica.
    Replica,
}

/// One node of the cluster.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Unique name, used in errors, logs and metrics (the `node` label: routers in one process
    /// that export metrics name their nodes apart).
    pub name: String,
    /// Connection string (URL or conninfo); its password never appears in output.
    pub url: ConnString,
    /// Expected role.
    pub role: RoleHint,
    /// Region tag for locality.
    pub region: Option<Region>,
    /// Relative share of reads for weighted pickers (0 = never picked while others are eligible).
    pub weight: u32,
    /// Connection string for this node's read sessions, when they should log in as another
    /// role than `url`'s: a role that may only read (for example one granted
    /// `pg_read_all_data` and nothing else). The read-only session default cannot stop a
    /// `BEGIN READ WRITE` on the primary; such a role makes every write through a read session
    /// fail at the server. `None`: read sessions use `url`.
    pub reader_url: Option<ConnString>,
    /// The URL reaches a load balancer that spreads connections over several servers (a cloud
    /// reader endpoint, an HAProxy reader frontend): the monitor's probe then speaks for one of
    /// them only, so a read that needs an LSN verifies the replay position of the session it got
    /// instead of trusting the snapshot.
    pub load_balanced: bool,
    /// Connection string for this node's monitor probes, when they should log in as another
    /// role than `url`'s: a least-privilege monitoring role (see [`NodeConfig::monitor_url`]
    /// for the grants). `None`: probes use `url`.
    pub monitor_url: Option<ConnString>,
    /// Lag alert thresholds for this node, replacing [`RouterConfig::lag_alert`] (for example
    /// a replica in a far region that is expected to run further behind). `None`: the router's.
    pub lag_alert: Option<LagAlertThresholds>,
    /// Serves reads when it is a healthy replica (default). False for a node that may be the
    /// writer but must never take reads (Patroni's `noloadbalance` tag): [`NodeConfig::no_reads`].
    pub reads: bool,
}

impl NodeConfig {
    /// A writer candidate.
    pub fn writer(name: impl Into<String>, url: impl Into<ConnString>) -> Self {
        Self::new(name, url, RoleHint::WriterCandidate)
    }

    /// A replica.
    pub fn replica(name: impl Into<String>, url: impl Into<ConnString>) -> Self {
        Self::new(name, url, RoleHint::Replica)
    }

    fn new(name: impl Into<String>, url: impl Into<ConnString>, role: RoleHint) -> Self {
        NodeConfig {
            name: name.into(),
            url: url.into(),
            role,
            region: None,
            weight: 1,
            reader_url: None,
            load_balanced: false,
            monitor_url: None,
            lag_alert: None,
            reads: true,
        }
    }

    /// Overrides the router's lag alert thresholds for this node (see
    /// [`NodeConfig::lag_alert`]); [`LagAlertThresholds::DISABLED`] silences it.
    pub fn lag_alert(mut self, thresholds: LagAlertThresholds) -> Self {
        self.lag_alert = Some(thresholds);
        self
    }

    /// Sets the region.
    pub fn region(mut self, region: impl Into<Region>) -> Self {
        self.region = Some(region.into());
        self
    }

    /// Read sessions on this node log in with this connection string (see
    /// [`NodeConfig::reader_url`]): the only read-only guard on the primary that a
    /// `BEGIN READ WRITE` cannot bypass.
    pub fn reader_url(mut self, url: impl Into<ConnString>) -> Self {
        self.reader_url = Some(url.into());
        self
    }

    /// Never sends reads to this node, whatever its role; it may still be elected the writer
    /// (Patroni's `noloadbalance` tag).
    pub fn no_reads(mut self) -> Self {
        self.reads = false;
        self
    }

    /// Marks the node as a load-balancing endpoint (see [`NodeConfig::load_balanced`]).
    pub fn load_balanced(mut self) -> Self {
        self.load_balanced = true;
        self
    }

    /// The monitor probes this node logging in with this connection string, so that neither
    /// the application's role nor a superuser is needed for monitoring.
    ///
    /// # Least-privilege roles
    ///
    /// No role the router uses needs to be a superuser. What each one needs (PostgreSQL 15):
    ///
    /// - **Monitor** (`monitor_url`): `LOGIN` and membership in `pg_monitor`
    ///   (`CREATE ROLE routing_monitor LOGIN PASSWORD '...' IN ROLE pg_monitor`). The probe
    ///   ([`crate::sql::PROBE`]) reads a replica's timeline from
    ///   `pg_stat_wal_receiver.received_tli`, whose columns read as NULL to roles without
    ///   `pg_read_all_stats` (which `pg_monitor` includes): without it the snapshot shows every
    ///   replica's timeline as unknown. Everything else in the probe (`pg_is_in_recovery()`, the
    ///   WAL positions, the replay timestamp, `pg_walfile_name()` and `pg_control_system()`, the
    ///   system identifier) is executable by PUBLIC on a default installation; where
    ///   `pg_control_system()` was revoked from PUBLIC, also
    ///   `GRANT EXECUTE ON FUNCTION pg_catalog.pg_control_system() TO routing_monitor`, or the
    ///   system identifier reads as unknown and causal tokens are signed without one (then never
    ///   trusted for replica choice). The monitor needs no access to any table.
    /// - **Readers** ([`NodeConfig::reader_url`]): `LOGIN` and read access to what the
    ///   application reads, and nothing it could write with: `IN ROLE pg_read_all_data`, or
    ///   `USAGE` on the schemas and `SELECT` on the tables.
    /// - **Writer** (`url`): `LOGIN` and what the application's statements need, nothing more:
    ///   `CONNECT` on the database, `USAGE` (and `CREATE`, for migrations; PostgreSQL 15 no
    ///   longer grants it to PUBLIC on `public`) on its schemas, and `SELECT`/`INSERT`/`UPDATE`/
    ///   `DELETE` on its tables, or ownership of them. The router's own statements on writer
    ///   sessions (`pg_is_in_recovery()`, `pg_current_wal_insert_lsn()`, the session reset) need
    ///   no grant.
    pub fn monitor_url(mut self, url: impl Into<ConnString>) -> Self {
        self.monitor_url = Some(url.into());
        self
    }

    /// The connection string for sessions of this access: [`NodeConfig::reader_url`] for read
    /// sessions and [`NodeConfig::monitor_url`] for the monitor's probes when set, `url`
    /// otherwise (always for writes).
    pub fn url_for(&self, access: crate::Access) -> &ConnString {
        match (access, &self.reader_url, &self.monitor_url) {
            (crate::Access::ReadOnly, Some(url), _) => url,
            (crate::Access::Probe, _, Some(url)) => url,
            _ => &self.url,
        }
    }

    /// Sets the weight.
    pub fn weight(mut self, weight: u32) -> Self {
        self.weight = weight;
        self
    }
}

/// When a replica is too far behind to serve reads.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LagBounds {
    /// Exclude when more than this many bytes behind the primary.
    pub max_bytes: Option<u64>,
    /// Exclude when more than this far behind in time.
    pub max_time: Option<Duration>,
    /// Re-admit only once lag is below this fraction of the bound (hysteresis, no flapping).
    pub readmit_ratio: f64,
}

impl Default for LagBounds {
    fn default() -> Self {
        // Tighter than GitLab's 8 MB / 60 s: stale-but-eligible replicas are what Eventual serves.
        LagBounds {
            max_bytes: Some(16 * 1024 * 1024),
            max_time: Some(Duration::from_secs(10)),
            readmit_ratio: 0.5,
        }
    }
}

/// How long a failed replica stays out.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BanPolicy {
    /// First ban.
    pub base: Duration,
    /// Longest ban; bans double up to this on consecutive failures.
    pub max: Duration,
}

impl Default for BanPolicy {
    fn default() -> Self {
        BanPolicy {
            base: Duration::from_millis(500),
            max: Duration::from_secs(30),
        }
    }
}

/// Pool settings the adapters apply to every node pool.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PoolSettings {
    /// Connections per node and access mode.
    pub max_size: u32,
    /// Longest wait for a connection (connect included).
    pub connect_timeout: Duration,
    /// Connections older than this are closed (recycling across failovers and DNS changes).
    pub max_lifetime: Option<Duration>,
    /// Idle connections older than this are closed.
    pub idle_timeout: Option<Duration>,
    /// Validate a pooled connection (and, for writers, that its node is still read-write) at
    /// checkout once it has been idle for [`crate::CHECK_IDLE_AFTER`] or since a node failed (a
    /// recently used one is known good: see [`crate::Epoch::needs_check`]).
    pub pre_ping: bool,
    /// Server-side statement timeout for this pool's sessions (used for probes).
    pub statement_timeout: Option<Duration>,
}

impl Default for PoolSettings {
    fn default() -> Self {
        PoolSettings {
            max_size: 16,
            connect_timeout: Duration::from_secs(2),
            max_lifetime: Some(Duration::from_secs(30 * 60)),
            idle_timeout: Some(Duration::from_secs(10 * 60)),
            pre_ping: true,
            statement_timeout: None,
        }
    }
}

/// What reads do when the marks store cannot answer (down, or slower than `marks_timeout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum MarksFailure {
    /// Read on the primary (read-only). Safe: never stale.
    #[default]
    Primary,
    /// Treat the user as having no mark. Fast, but may serve a user their own stale data.
    Eventual,
}

/// Everything tunable about a router. `Default` is what we recommend.
#[derive(Debug, Clone)]
pub struct RouterConfig {
    /// Mode used when a request does not choose.
    pub default_consistency: Consistency,
    /// How often the monitor probes each node.
    pub probe_interval: Duration,
    /// A probe slower than this counts as a failure.
    pub probe_timeout: Duration,
    /// How long a write waits for a reachable primary before failing.
    pub write_deadline: Duration,
    /// How long an LSN-mode read may wait for a replica to catch up before using the primary.
    /// It waits only on a replica expected to catch up within half of it (from the probe's lag
    /// and what the router's recent waits on that replica took), so the budget also says how
    /// much latency a read may trade for keeping the primary free. The default (20 ms) is
    /// latency first: a replica a few milliseconds behind is worth waiting for, one 20 ms
    /// behind is not (the primary answers sooner). For primary offload first, set it to about twice the
    /// lag you will live with (reads right after a write then wait about that lag); `0` never
    /// waits. Figures: `BENCHMARKS.md`, "Offload and latency under lag".
    pub wait_budget: Duration,
    /// Lag bounds for replicas.
    pub lag: LagBounds,
    /// Ban backoff for failing replicas.
    pub ban: BanPolicy,
    /// How long a recent-writer mark lives.
    pub mark_ttl: Duration,
    /// Longest wait for the marks store on a request.
    pub marks_timeout: Duration,
    /// What to do when the marks store fails.
    pub on_marks_failure: MarksFailure,
    /// Pools for application connections.
    pub pool: PoolSettings,
    /// The least a token LSN may be ahead of the primary's known position before it is rejected
    /// as from the future; the tolerance grows beyond it with the primary's observed write rate
    /// (two probe intervals' worth, see [`crate::TokenPolicy`]). Never applied while the
    /// primary's position is unknown.
    pub future_lsn_tolerance: u64,
    /// When a replica's lag raises an alert (an event and a call to every
    /// [`crate::LagAlertHandler`]); nodes may override it ([`NodeConfig::lag_alert`]).
    /// Default: disabled.
    pub lag_alert: LagAlertThresholds,
}

impl Default for RouterConfig {
    fn default() -> Self {
        RouterConfig {
            default_consistency: Consistency::ReadYourWrites,
            probe_interval: Duration::from_millis(250),
            probe_timeout: Duration::from_secs(1),
            write_deadline: Duration::from_secs(5),
            wait_budget: Duration::from_millis(20),
            lag: LagBounds::default(),
            ban: BanPolicy::default(),
            mark_ttl: Duration::from_secs(30),
            marks_timeout: Duration::from_millis(50),
            on_marks_failure: MarksFailure::Primary,
            pool: PoolSettings::default(),
            future_lsn_tolerance: 16 * 1024 * 1024,
            lag_alert: LagAlertThresholds::DISABLED,
        }
    }
}

impl RouterConfig {
    /// Rejects configurations that cannot work, naming the field.
    pub fn validate(&self, nodes: &[NodeConfig]) -> Result<(), Error> {
        let bad = |what: &str| Err(Error::Config(what.to_string()));
        if nodes.is_empty() {
            return bad("no nodes configured");
        }
        let mut names = std::collections::HashSet::new();
        for n in nodes {
            if n.name.is_empty() {
                return bad("a node has an empty name");
            }
            if !names.insert(n.name.as_str()) {
                return Err(Error::Config(format!("duplicate node name {:?}", n.name)));
            }
            if n.url.expose().trim().is_empty() {
                return Err(Error::Config(format!("node {:?} has an empty URL", n.name)));
            }
            for (field, url) in [
                ("reader_url", &n.reader_url),
                ("monitor_url", &n.monitor_url),
            ] {
                if url.as_ref().is_some_and(|u| u.expose().trim().is_empty()) {
                    return Err(Error::Config(format!(
                        "node {:?} has an empty {field}",
                        n.name
                    )));
                }
            }
        }
        self.lag_alert.validate("lag_alert")?;
        for n in nodes {
            if let Some(t) = &n.lag_alert {
                t.validate(&format!("node {:?} lag_alert", n.name))?;
            }
        }
        let hour = Duration::from_secs(3600);
        let ranged = |name: &str, d: Duration, min: Duration, max: Duration| -> Result<(), Error> {
            if d < min || d > max {
                return Err(Error::Config(format!(
                    "{name} = {d:?} is outside {min:?}..={max:?}"
                )));
            }
            Ok(())
        };
        let ms = Duration::from_millis;
        ranged("probe_interval", self.probe_interval, ms(10), hour)?;
        ranged("probe_timeout", self.probe_timeout, ms(10), ms(60_000))?;
        ranged("write_deadline", self.write_deadline, ms(1), ms(600_000))?;
        ranged("wait_budget", self.wait_budget, Duration::ZERO, ms(60_000))?;
        ranged(
            "mark_ttl",
            self.mark_ttl,
            ms(1),
            Duration::from_secs(7 * 24 * 3600),
        )?;
        ranged("marks_timeout", self.marks_timeout, ms(1), ms(60_000))?;
        ranged(
            "pool.connect_timeout",
            self.pool.connect_timeout,
            ms(10),
            ms(600_000),
        )?;
        ranged("ban.base", self.ban.base, ms(1), hour)?;
        ranged("ban.max", self.ban.max, self.ban.base, 24 * hour)?;
        if self.pool.max_size == 0 || self.pool.max_size > 10_000 {
            return Err(Error::Config(format!(
                "pool.max_size = {} is outside 1..=10000",
                self.pool.max_size
            )));
        }
        if !(self.lag.readmit_ratio > 0.0 && self.lag.readmit_ratio <= 1.0) {
            return Err(Error::Config(format!(
                "lag.readmit_ratio = {} is outside (0, 1]",
                self.lag.readmit_ratio
            )));
        }
        if let Consistency::RecentWriterTtl { ttl } = self.default_consistency
            && ttl > self.mark_ttl
        {
            return Err(Error::Config(format!(
                "RecentWriterTtl ttl = {ttl:?} exceeds mark_ttl = {:?} (marks would expire first)",
                self.mark_ttl
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Access;

    #[test]
    fn each_access_logs_in_with_its_own_url() {
        let plain = NodeConfig::writer("n", "postgres://app@h/db");
        for access in [Access::ReadWrite, Access::ReadOnly, Access::Probe] {
            assert_eq!(plain.url_for(access).expose(), "postgres://app@h/db");
        }
        let split = plain
            .reader_url("postgres://reader@h/db")
            .monitor_url("postgres://monitor@h/db");
        assert_eq!(
            split.url_for(Access::ReadWrite).expose(),
            "postgres://app@h/db"
        );
        assert_eq!(
            split.url_for(Access::ReadOnly).expose(),
            "postgres://reader@h/db"
        );
        assert_eq!(
            split.url_for(Access::Probe).expose(),
            "postgres://monitor@h/db"
        );
        let monitor_only =
            NodeConfig::replica("r", "postgres://app@h/db").monitor_url("postgres://monitor@h/db");
        assert_eq!(
            monitor_only.url_for(Access::ReadOnly).expose(),
            "postgres://app@h/db"
        );
        assert_eq!(
            monitor_only.url_for(Access::Probe).expose(),
            "postgres://monitor@h/db"
        );
    }

    #[test]
    fn empty_optional_urls_are_config_errors() {
        let config = RouterConfig::default();
        let node = NodeConfig::writer("n", "postgres://app@h/db");
        assert!(config.validate(std::slice::from_ref(&node)).is_ok());
        for bad in [node.clone().monitor_url(" "), node.reader_url("")] {
            assert!(matches!(config.validate(&[bad]), Err(Error::Config(_))));
        }
    }
}
