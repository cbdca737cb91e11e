//! What an adapter (diesel, sqlx, ...) teaches the router: how to pool, check out and query a
//! connection. No routing decision lives in an adapter.

use std::future::Future;
use std::ops::DerefMut;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::{BackendError, ErrorKind, Lsn, NodeConfig, PoolSettings};

/// What a pool's sessions are for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Access {
    /// Writes. At connect and at checkout the adapter runs [`sql::WRITER_CHECK`] and refuses a node
    /// that answers `true` (in recovery) with [`ErrorKind::NotWriter`].
    ReadWrite,
    /// Reads. Sessions are made read-only at the server (`default_transaction_read_only = on`).
    ReadOnly,
    /// The monitor's probes: read-only, one session at a time (a few connect attempts side by
    /// side while a connection is held), short statement timeout.
    Probe,
}

impl Access {
    /// The query that validates a session of this access, at connect and at checkout when
    /// pre-ping is on: writers must not be in recovery, readers must be read-only.
    pub fn check_sql(self) -> &'static str {
        match self {
            Access::ReadWrite => sql::WRITER_CHECK,
            Access::ReadOnly => sql::READ_ONLY_CHECK,
            Access::Probe => sql::PING,
        }
    }

    /// Judges the answer to [`Access::check_sql`]: `Ok`, or the kind of error to refuse the
    /// session with. [`ErrorKind::NotWriter`] for a writer session on a node in recovery, or on
    /// a server that is not the elected writer's (another timeline or cluster than `epoch`'s
    /// [`Epoch::writer_identity`]: a stable endpoint that points at an old primary still
    /// accepting writes); [`ErrorKind::Config`] for a reader session that is not read-only (the
    /// read-only default did not reach the server, for example through a pooler that drops
    /// startup options).
    pub fn judge_check(self, answer: Option<&str>, epoch: &Epoch) -> Result<(), ErrorKind> {
        match (self, answer) {
            (Access::ReadWrite, Some(answer)) => {
                let mut words = answer.split(' ');
                match words.next() {
                    Some("false") => {}
                    Some("true") => return Err(ErrorKind::NotWriter),
                    _ => return Err(ErrorKind::Query),
                }
                let timeline = words.next().and_then(|t| u32::from_str_radix(t, 16).ok());
                let system_id = words.next().and_then(|s| s.parse::<u64>().ok());
                match (epoch.writer_identity(), timeline, system_id) {
                    (Some(expected), Some(t), Some(s)) if expected != (t, s) => {
                        Err(ErrorKind::NotWriter)
                    }
                    _ => Ok(()),
                }
            }
            (Access::ReadWrite, None) => Err(ErrorKind::Query),
            (Access::ReadOnly, Some("on")) => Ok(()),
            (Access::ReadOnly, _) => Err(ErrorKind::Config),
            (Access::Probe, _) => Ok(()),
        }
    }

    /// Whether a new session of this access runs [`Access::check_sql`] before it is pooled.
    pub fn checks_at_connect(self) -> bool {
        matches!(self, Access::ReadWrite | Access::ReadOnly)
    }

    /// The batch that resets a returned session of this access (see [`sql::RESET`]).
    pub fn reset_sql(self) -> &'static str {
        match self {
            Access::ReadWrite => sql::RESET,
            Access::ReadOnly | Access::Probe => sql::RESET_READER,
        }
    }

    /// Why a session failed [`Access::judge_check`], for the error message.
    pub fn check_failure(self, answer: Option<&str>) -> String {
        match self {
            Access::ReadWrite if answer == Some("true") => {
                "node is in recovery (not the primary)".to_string()
            }
            Access::ReadWrite if answer.is_some_and(|a| a.starts_with("false ")) => format!(
                "the server (timeline and cluster {:?}) is not the elected writer's",
                answer.unwrap_or_default().trim_start_matches("false ")
            ),
            Access::ReadOnly => format!(
                "reader session is not read-only (default_transaction_read_only = {answer:?}): \
                 the startup option did not reach the server"
            ),
            _ => format!("unexpected session check answer {answer:?}"),
        }
    }
}

/// A pooled session idle for less than this is handed out without a validation round trip
/// (with [`PoolSettings::pre_ping`]; see [`Epoch::needs_check`]). A session returns to its pool
/// only through a reset that succeeded (itself a round trip that proves the connection alive,
/// and, for readers, read-only again) or untouched, and a session of an older topology
/// generation is refused without asking the server, so a recently used session is known good.
/// What the check can still find (the server process went away) shows on sessions that sat
/// idle, or after trouble the router saw; on a node that died within the threshold and nobody
/// noticed yet, the request's first query finds it (a connection error, which bans the node;
/// `Router::read_retrying` runs the work once more elsewhere).
pub const CHECK_IDLE_AFTER: Duration = Duration::from_millis(500);

impl PoolSettings {
    /// Has a pooled session outlived `max_lifetime` or `idle_timeout`? Checked at checkout, since
    /// pools enforce them only lazily.
    pub fn is_expired(&self, age: Duration, idle_for: Duration) -> bool {
        self.max_lifetime.is_some_and(|l| age >= l)
            || self.idle_timeout.is_some_and(|l| idle_for >= l)
    }
}

/// Queries the adapters run on the router's behalf. Every function and operator is
/// schema-qualified, so objects an attacker creates in `public` are never called (`COALESCE` and
/// `CASE` are syntax, not functions: `pg_catalog.coalesce` does not exist).
/// Queries (not batches) return one text column named `v`.
pub mod sql {
    /// Checkout/connect check of writer sessions: `true` on a node in recovery, else `false`,
    /// the timeline (hex, as in WAL file names) and the system identifier, which must match the
    /// elected writer's.
    pub const WRITER_CHECK: &str = "SELECT CASE WHEN pg_catalog.pg_is_in_recovery() THEN 'true' \
        ELSE pg_catalog.concat_ws(' ', 'false', \
            pg_catalog.substr(pg_catalog.pg_walfile_name(pg_catalog.pg_current_wal_lsn()), 1, 8), \
            (SELECT s.system_identifier FROM pg_catalog.pg_control_system() s)::pg_catalog.text) \
        END AS v";
    /// Connect/checkout check of reader sessions: must answer `on` (the read-only default that
    /// travels in the startup packet took effect; a pooler in between may have dropped it).
    pub const READ_ONLY_CHECK: &str =
        "SELECT pg_catalog.current_setting('default_transaction_read_only') AS v";
    /// Checkout ping of probe sessions.
    pub const PING: &str = "SELECT '1'::pg_catalog.text AS v";

    /// The WAL position that covers the session's last commit, as `pg_lsn`: the insert position
    /// (with `synchronous_commit = off` the write position can precede the commit record), moved
    /// back over a page header it points just past (a replica that replayed a record ending at
    /// a page boundary reports the boundary). NULL while a transaction that wrote is still open,
    /// since a position read then precedes its commit. PostgreSQL 14+ (`pg_lsn - numeric`).
    macro_rules! commit_lsn {
        ($cast:literal) => {
            concat!(
                "SELECT (CASE WHEN pg_catalog.pg_current_xact_id_if_assigned() IS NOT NULL THEN NULL \
                 WHEN p.o OPERATOR(pg_catalog.=) 24 \
                   OR (p.o OPERATOR(pg_catalog.=) 40 AND p.s OPERATOR(pg_catalog.=) 40) \
                 THEN p.i OPERATOR(pg_catalog.-) p.o ELSE p.i END)",
                $cast,
                " AS v FROM (SELECT l.i, \
                 (l.i OPERATOR(pg_catalog.-) '0/0'::pg_catalog.pg_lsn) OPERATOR(pg_catalog.%) \
                   pg_catalog.current_setting('wal_block_size')::pg_catalog.numeric AS o, \
                 (l.i OPERATOR(pg_catalog.-) '0/0'::pg_catalog.pg_lsn) OPERATOR(pg_catalog.%) \
                   pg_catalog.pg_size_bytes(pg_catalog.current_setting('wal_segment_size')) AS s \
                 FROM (SELECT pg_catalog.pg_current_wal_insert_lsn() AS i) AS l) AS p"
            )
        };
    }
    /// The commit LSN (see `commit_lsn!`) as text.
    pub const COMMIT_LSN: &str = commit_lsn!("::pg_catalog.text");
    /// The commit LSN as a `pg_lsn` value, for drivers with a native type.
    pub const COMMIT_LSN_TYPED: &str = commit_lsn!("");
    /// Starts a batch that ends in COMMIT or ROLLBACK: quiets the warning an idle session would
    /// get for it (a multi-statement batch runs as one implicit transaction, which `SET LOCAL`
    /// joins and the COMMIT/ROLLBACK ends). In an aborted transaction it fails with 25P02
    /// instead, which is how such a batch tells an aborted transaction apart.
    macro_rules! quiet {
        () => {
            "SET LOCAL client_min_messages = error; "
        };
    }
    /// Everything a returned session's reset does; see [`RESET`].
    macro_rules! reset {
        () => {
            concat!(
                quiet!(),
                "ROLLBACK; CLOSE ALL; SET SESSION AUTHORIZATION DEFAULT; RESET ALL; UNLISTEN *; ",
                "SELECT pg_catalog.pg_advisory_unlock_all(); DISCARD TEMP; DISCARD SEQUENCES"
            )
        };
    }
    /// Commits the open transaction. Fails (25P02) instead of answering `ROLLBACK` when the
    /// transaction was aborted by an earlier error, so such a COMMIT is never taken for success.
    pub const COMMIT: &str = concat!(quiet!(), "COMMIT");
    /// [`COMMIT`] and the commit LSN, in one simple-protocol round trip.
    pub const COMMIT_THEN_LSN: &str =
        concat!(quiet!(), "COMMIT; ", commit_lsn!("::pg_catalog.text"));
    /// Opens a transaction (the closure API's).
    pub const BEGIN: &str = "BEGIN";
    /// Ends whatever transaction is open, aborted or not (in an aborted one, the only way out).
    pub const ROLLBACK: &str = "ROLLBACK";
    /// Returns a session to the state it had after connect, whatever its last holder did: ends
    /// an open transaction, closes cursors, restores the login role and every setting to its
    /// connect-time value (so a reader's read-only default, sent in the startup packet, comes
    /// back), drops LISTENs, advisory locks, temporary tables and cached sequence values.
    /// Prepared statements stay: the drivers cache them by name.
    pub const RESET: &str = reset!();
    /// Makes the session refuse writes (for sessions whose startup packet could not carry it).
    pub const SET_READ_ONLY: &str = "SET default_transaction_read_only = on";
    /// [`RESET`] for reader sessions, which then re-asserts read-only: `RESET ALL` restores the
    /// startup value, but not every session could send one. The `SET` succeeding in the same
    /// batch is the proof that the session is read-only again; a failure discards it.
    pub const RESET_READER: &str = concat!(reset!(), "; SET default_transaction_read_only = on");
    /// A replica's replay position (NULL on a primary).
    pub const REPLAY_LSN: &str = "SELECT pg_catalog.pg_last_wal_replay_lsn()::pg_catalog.text AS v";
    /// [`REPLAY_LSN`] as a `pg_lsn` value, for drivers with a native type.
    pub const REPLAY_LSN_TYPED: &str = "SELECT pg_catalog.pg_last_wal_replay_lsn() AS v";
    /// The monitor's probe; parsed by `crate::probe::ProbeReport::parse`.
    pub const PROBE: &str = "SELECT pg_catalog.concat_ws(' ', \
        r::pg_catalog.text, \
        COALESCE((CASE WHEN r THEN pg_catalog.pg_last_wal_replay_lsn() ELSE pg_catalog.pg_current_wal_lsn() END)::pg_catalog.text, '-'), \
        COALESCE(pg_catalog.pg_last_wal_receive_lsn()::pg_catalog.text, '-'), \
        COALESCE(pg_catalog.round(pg_catalog.date_part('epoch', pg_catalog.clock_timestamp() OPERATOR(pg_catalog.-) pg_catalog.pg_last_xact_replay_timestamp()) OPERATOR(pg_catalog.*) 1000)::pg_catalog.int8::pg_catalog.text, '-'), \
        COALESCE(CASE WHEN r THEN (SELECT w.received_tli FROM pg_catalog.pg_stat_wal_receiver w)::pg_catalog.text \
            ELSE pg_catalog.substr(pg_catalog.pg_walfile_name(pg_catalog.pg_current_wal_lsn()), 1, 8) END, '-'), \
        COALESCE((SELECT s.system_identifier FROM pg_catalog.pg_control_system() s)::pg_catalog.text, '-'), \
        pg_catalog.round(pg_catalog.date_part('epoch', pg_catalog.pg_postmaster_start_time()) OPERATOR(pg_catalog.*) 1000000)::pg_catalog.int8::pg_catalog.text) AS v \
        FROM (SELECT pg_catalog.pg_is_in_recovery() AS r) AS probe";
    /// Session setting that makes a reader session refuse writes at the server. Adapters send
    /// it in the startup packet, so `RESET ALL` and `DISCARD ALL` restore it rather than undo it.
    pub const READ_ONLY_SETTING: (&str, &str) = ("default_transaction_read_only", "on");
}

/// The topology generation, shared by the router and every pool. Bumped when the writer becomes
/// another server (node, timeline, cluster or server instance) or a node shows another cluster;
/// a pooled connection made under an older generation is never handed out again.
#[derive(Debug, Clone)]
pub struct Epoch(Arc<EpochInner>);

#[derive(Debug)]
struct EpochInner {
    generation: AtomicU64,
    origin: Instant,
    /// When (nanos since `origin`) a node last failed a probe or a request, or the topology
    /// changed: sessions idle since before then are checked at their next checkout.
    trouble_at_nanos: AtomicU64,
    /// The elected writer's timeline (high 32 bits, 0 = unknown) and system identifier.
    writer_timeline: AtomicU64,
    writer_system_id: AtomicU64,
}

impl Default for Epoch {
    fn default() -> Self {
        Epoch(Arc::new(EpochInner {
            generation: AtomicU64::new(1),
            origin: Instant::now(),
            trouble_at_nanos: AtomicU64::new(0),
            writer_timeline: AtomicU64::new(0),
            writer_system_id: AtomicU64::new(0),
        }))
    }
}

impl Epoch {
    /// The current generation: stamp it on a connection when it is made.
    pub fn generation(&self) -> u64 {
        self.0.generation.load(Ordering::Acquire)
    }

    /// May a connection stamped with `generation` be handed out?
    pub fn admits(&self, generation: u64) -> bool {
        generation == self.generation()
    }

    /// Does a pooled session idle for `idle_for` need [`Access::check_sql`] at checkout? Only
    /// with `pre_ping`, and then always for a writer session: a write sent on a session whose
    /// server died is an unknown outcome, never retried, so a writer session is verified before
    /// it is handed out. A read session only when it has been idle for [`CHECK_IDLE_AFTER`], or
    /// since before the last trouble the router saw (a node failed a probe or a request, or the
    /// topology changed: a node that died and came back within the idle threshold left dead
    /// sessions in its pools); any other read session is known good and costs no round trip
    /// (a read that finds a dead one fails once and can be retried elsewhere).
    pub fn needs_check(&self, settings: &PoolSettings, access: Access, idle_for: Duration) -> bool {
        if !settings.pre_ping {
            return false;
        }
        if access == Access::ReadWrite || idle_for >= CHECK_IDLE_AFTER {
            return true;
        }
        let trouble = Duration::from_nanos(self.0.trouble_at_nanos.load(Ordering::Acquire));
        let since_trouble = self.0.origin.elapsed().saturating_sub(trouble);
        idle_for >= since_trouble
    }

    /// Records trouble (see [`Epoch::needs_check`]).
    pub(crate) fn trouble(&self) {
        let nanos = u64::try_from(self.0.origin.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.0.trouble_at_nanos.fetch_max(nanos, Ordering::AcqRel);
    }

    /// The elected writer's timeline and system identifier, once known: what a writer session's
    /// server must show ([`Access::judge_check`]).
    pub fn writer_identity(&self) -> Option<(u32, u64)> {
        let timeline = self.0.writer_timeline.load(Ordering::Acquire);
        let system_id = self.0.writer_system_id.load(Ordering::Acquire);
        (timeline != 0 && system_id != 0).then_some((timeline as u32, system_id))
    }

    /// Records the elected writer's identity (the router does, with every snapshot).
    pub(crate) fn set_writer_identity(&self, timeline: u32, system_id: u64) {
        // System id first: a reader that sees the new timeline sees the matching id.
        self.0.writer_system_id.store(system_id, Ordering::Release);
        self.0
            .writer_timeline
            .store(u64::from(timeline), Ordering::Release);
    }

    pub(crate) fn bump(&self) -> u64 {
        self.0.generation.fetch_add(1, Ordering::AcqRel) + 1
    }
}

/// Everything an adapter needs to build one node's pool.
#[derive(Debug, Clone)]
pub struct PoolSpec {
    /// The node.
    pub node: NodeConfig,
    /// What the sessions are for.
    pub access: Access,
    /// Sizes, timeouts, pre-ping.
    pub settings: PoolSettings,
    /// The topology generation to check at checkout.
    pub epoch: Epoch,
}

/// An adapter for one database driver. The router is generic over it; conformance tests run the
/// same suite on every implementation.
pub trait Backend: Send + Sync + 'static {
    /// A pool of sessions to one node for one [`Access`].
    type Pool: Send + Sync + 'static;
    /// A session checked out of a pool; returns to its pool when dropped.
    type Pooled: DerefMut<Target = Self::Connection> + Send + 'static;
    /// The driver's connection type that application code runs queries on.
    type Connection: Send + ?Sized;
    /// The driver's query error.
    type QueryError: std::error::Error + Send + Sync + 'static;

    /// Builds a pool without connecting (nodes may be down when the router starts). Readers must
    /// be read-only at the server; writers must verify the node is not in recovery; all must
    /// refuse connections from an older [`Epoch`] generation at checkout.
    fn build_pool(&self, spec: PoolSpec) -> Result<Self::Pool, BackendError>;

    /// Checks a session out (pre-ping and generation check included), within the pool's timeout.
    fn checkout(
        pool: &Self::Pool,
    ) -> impl Future<Output = Result<Self::Pooled, BackendError>> + Send + '_;

    /// Runs `sql` and returns the first column (named `v`) of the first row as text.
    fn query_text<'a>(
        pooled: &'a mut Self::Pooled,
        sql: &'a str,
    ) -> impl Future<Output = Result<Option<String>, BackendError>> + Send + 'a;

    /// Runs `sql` (no result rows) and returns the number of rows affected.
    fn execute<'a>(
        pooled: &'a mut Self::Pooled,
        sql: &'a str,
    ) -> impl Future<Output = Result<u64, BackendError>> + Send + 'a;

    /// Runs a batch of statements separated by `;` in one simple-protocol round trip, as one
    /// implicit transaction, discarding any rows. Used for the session reset and COMMIT.
    fn execute_batch<'a>(
        pooled: &'a mut Self::Pooled,
        sql: &'a str,
    ) -> impl Future<Output = Result<(), BackendError>> + Send + 'a;

    /// Marks a session so that it is closed when dropped, never returned to its pool: the
    /// router could not make it clean for the next holder.
    fn discard(pooled: &mut Self::Pooled);

    /// Whether the driver's own bookkeeping lets the session be reused after a reset (for
    /// example: no transaction the driver's transaction manager still believes open, which a
    /// server-side ROLLBACK would not tell it about). Costs no round trip.
    fn reusable(pooled: &mut Self::Pooled) -> bool {
        let _ = pooled;
        true
    }

    /// While no writer is elected, keeps one session connected to this writer pool's node, not
    /// yet checked and never handed out, so that the first write after the node is elected
    /// needs no connection setup (see `pool::StampedPool::hold_standby`). The default does
    /// nothing.
    fn hold_standby(pool: &Self::Pool) {
        let _ = pool;
    }

    /// Once the pool's node is the elected writer: checks the standby session as a new writer
    /// session is checked and pools it under the current generation; returns whether it did.
    /// The default has none.
    fn admit_standby(pool: &Self::Pool) -> impl Future<Output = bool> + Send + '_ {
        let _ = pool;
        async { false }
    }

    /// Closes the standby session, if any (another node was elected).
    fn release_standby(pool: &Self::Pool) {
        let _ = pool;
    }

    /// Classifies a driver error from application queries.
    fn classify(err: &Self::QueryError) -> ErrorKind;

    /// How full `pool` is, for [`crate::Router::status`] and metrics. `None` (the default):
    /// the adapter does not say.
    fn pool_state(pool: &Self::Pool) -> Option<crate::PoolState> {
        let _ = pool;
        None
    }

    /// The SQLSTATE of a driver error from application queries, when the driver kept it; the
    /// guards' `check` puts it in [`BackendError::sqlstate`] (so callers can tell, say, a unique
    /// violation `23505` from other query errors without knowing the driver).
    fn sqlstate(err: &Self::QueryError) -> Option<String> {
        let _ = err;
        None
    }

    /// The WAL position that covers the session's last commit ([`sql::COMMIT_LSN`]): run right
    /// after a COMMIT on the primary, the LSN a replica must replay to show that commit. `None`
    /// while a transaction that wrote is still open. The default reads it as text; drivers with
    /// a native `pg_lsn` type may read [`sql::COMMIT_LSN_TYPED`].
    fn current_wal_lsn(
        pooled: &mut Self::Pooled,
    ) -> impl Future<Output = Result<Option<Lsn>, BackendError>> + Send + '_ {
        async move { parse_lsn(Self::query_text(pooled, sql::COMMIT_LSN).await?) }
    }

    /// Commits the session's open transaction ([`sql::COMMIT`], which fails rather than
    /// answering ROLLBACK for an aborted transaction) and returns the commit LSN. The default
    /// takes two round trips; drivers that can send [`sql::COMMIT_THEN_LSN`] as one
    /// simple-protocol query and read its last row should override it to take one.
    fn commit_returning_lsn(
        pooled: &mut Self::Pooled,
    ) -> impl Future<Output = Result<Option<Lsn>, BackendError>> + Send + '_ {
        async move {
            Self::execute_batch(pooled, sql::COMMIT).await?;
            Self::current_wal_lsn(pooled).await
        }
    }
}

/// An LSN answer in PostgreSQL's text form (`None` stays `None`; anything else is a query error).
pub fn parse_lsn(text: Option<String>) -> Result<Option<Lsn>, BackendError> {
    text.map(|t| {
        t.parse::<Lsn>()
            .map_err(|e| BackendError::new(ErrorKind::Query, e.to_string()))
    })
    .transpose()
}
