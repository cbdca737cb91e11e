//! The consistency checker behind `cargo xtask chaos`.
//!
//! Simulated users write a value and read it back through the router (read-after-write pairs);
//! in `Causal` mode the read is made by another client that holds only the writer's token (a
//! cross-client causal chain). Every read is checked against the value the reader must see. Each
//! mode runs in each scenario on a real test-kit cluster with real faults; the unprotected
//! `Eventual` control shows that the checker does see stale reads when they happen.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use routing_core::{
    Backend, Consistency, LagBounds, RequestContext, Router, RouterConfig, TokenCodec, TokenKey,
    WriterMarks,
};
use routing_testkit::{Cluster, ClusterBuilder};
use serde::Serialize;

use self::acked::Acked;

/// A fault (or none) applied during a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    /// No fault: natural replication lag only.
    Steady,
    /// 50 ms `recovery_min_apply_delay` on both replicas.
    ApplyDelay50ms,
    /// 500 ms `recovery_min_apply_delay` on both replicas.
    ApplyDelay500ms,
    /// Replay paused on one replica for the whole run.
    PausedReplica,
    /// One replica killed (immediate stop) a third of the way in.
    ReplicaKilled,
    /// Redis killed a third of the way in, restarted (empty) at two thirds.
    RedisKilled,
    /// Synchronous replication; the primary killed a third of the way in, the most advanced
    /// replica promoted, the other repointed to it.
    PrimaryFailover,
    /// No fault, but handlers misbehave between the pairs: they leave write transactions and
    /// REPEATABLE READ snapshots open, turn read-only off and change settings on read sessions
    /// and then try to write through one, handle an error inside a transaction and commit it
    /// anyway, and are cancelled in the middle of a commit.
    MisbehavingHandlers,
    /// Synchronous replication to every replica; a third of the way in, replica 2 is promoted
    /// while the old primary stays up and writable and replica 1 keeps following it (a split
    /// primary). Reports acknowledged writes that landed only on the old primary.
    SplitPrimary,
    /// Pools of 4 with a 250 ms checkout timeout, and a hog that keeps every replica's and the
    /// writer's pool full for 600 ms at a time: busy pools, not dead nodes.
    BusyPools,
}

impl Scenario {
    /// Every scenario, in run order.
    pub const ALL: [Scenario; 10] = [
        Scenario::Steady,
        Scenario::ApplyDelay50ms,
        Scenario::ApplyDelay500ms,
        Scenario::PausedReplica,
        Scenario::ReplicaKilled,
        Scenario::RedisKilled,
        Scenario::PrimaryFailover,
        Scenario::MisbehavingHandlers,
        Scenario::SplitPrimary,
        Scenario::BusyPools,
    ];

    /// Name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Steady => "steady",
            Scenario::ApplyDelay50ms => "apply_delay_50ms",
            Scenario::ApplyDelay500ms => "apply_delay_500ms",
            Scenario::PausedReplica => "paused_replica",
            Scenario::ReplicaKilled => "replica_killed",
            Scenario::RedisKilled => "redis_killed",
            Scenario::PrimaryFailover => "primary_failover",
            Scenario::MisbehavingHandlers => "misbehaving",
            Scenario::SplitPrimary => "split_primary",
            Scenario::BusyPools => "busy_pools",
        }
    }
}

impl Scenario {
    /// Runs on a cluster of its own (it promotes a replica).
    fn destroys_its_cluster(self) -> bool {
        matches!(self, Scenario::PrimaryFailover | Scenario::SplitPrimary)
    }
}

/// A consistency mode under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The user's mark (commit LSN) decides.
    ReadYourWrites,
    /// A signed token carried by another client decides.
    Causal,
    /// TTL pinning to the primary after a write.
    RecentWriterTtl,
    /// Unprotected control.
    Eventual,
}

impl Mode {
    /// Every mode, protected ones first.
    pub const ALL: [Mode; 4] = [
        Mode::ReadYourWrites,
        Mode::Causal,
        Mode::RecentWriterTtl,
        Mode::Eventual,
    ];

    /// Name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            Mode::ReadYourWrites => "ReadYourWrites",
            Mode::Causal => "Causal",
            Mode::RecentWriterTtl => "RecentWriterTtl",
            Mode::Eventual => "Eventual",
        }
    }

    /// Must this mode never read stale data?
    pub fn protected(self) -> bool {
        self != Mode::Eventual
    }

    fn consistency(self) -> Consistency {
        match self {
            Mode::ReadYourWrites => Consistency::ReadYourWrites,
            Mode::Causal => Consistency::Causal,
            Mode::RecentWriterTtl => Consistency::RecentWriterTtl { ttl: TTL_PIN },
            Mode::Eventual => Consistency::Eventual,
        }
    }
}

/// `RecentWriterTtl` pins for this long; it is only safe while every replica serving reads lags
/// less than that, so the checker's lag bound (below) is tighter.
const TTL_PIN: Duration = Duration::from_secs(2);
const MAX_LAG: Duration = Duration::from_secs(1);

/// One (scenario, mode) run. Field names are the `--json` format.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    /// Scenario name.
    pub scenario: String,
    /// Mode name.
    pub mode: String,
    /// Read-after-write pairs attempted.
    pub ops: u64,
    /// Reads that returned a value older than the reader must see.
    pub stale_reads: u64,
    /// Pairs whose write or read returned an error.
    pub failed_requests: u64,
    /// Fraction of reads served by replicas.
    pub replica_share: f64,
    /// Writes acknowledged (committed and finished) but missing from the primary after the run.
    pub lost_acked_writes: u64,
    /// Writes that a read session let through (committed rows in the misroute table).
    pub writes_through_reads: u64,
    /// Misbehaving handlers run (`misbehaving` scenario only).
    pub misbehaviors: u64,
    /// Acknowledged writes missing from the new primary but present on the old one
    /// (`split_primary` only): what a split primary cost.
    pub acked_only_on_old_primary: u64,
    /// The router's own counters for the run (not part of the JSON format).
    #[serde(skip)]
    pub stats: routing_core::RouterStats,
}

/// How big a run is.
#[derive(Debug, Clone)]
pub struct ChaosOptions {
    /// Length of each (scenario, mode) run.
    pub run_time: Duration,
    /// Concurrent workers (each owns its users, so per-user values only grow).
    pub workers: usize,
    /// Users per worker.
    pub users_per_worker: usize,
    /// Scenarios to run.
    pub scenarios: Vec<Scenario>,
    /// Modes to run.
    pub modes: Vec<Mode>,
}

impl Default for ChaosOptions {
    fn default() -> Self {
        ChaosOptions {
            run_time: Duration::from_secs(3),
            workers: 8,
            users_per_worker: 16,
            scenarios: Scenario::ALL.to_vec(),
            modes: Mode::ALL.to_vec(),
        }
    }
}

/// Which backend the checker drives.
pub trait ChaosBackend: Send + Sync + 'static {
    /// The adapter.
    type B: Backend;
    /// A fresh adapter.
    fn backend() -> Self::B;
}

/// Builds the marks store for a run from the cluster's Redis URL.
pub type MarksFactory =
    Arc<dyn Fn(String) -> BoxFuture<'static, Arc<dyn WriterMarks>> + Send + Sync>;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Runs every (scenario, mode) pair and returns one report each, calling `progress` as each ends.
pub async fn run<H: ChaosBackend>(
    opts: &ChaosOptions,
    marks: MarksFactory,
    mut progress: impl FnMut(&RunReport),
) -> Result<Vec<RunReport>, BoxError> {
    let mut reports = Vec::new();
    let needs_shared = opts.scenarios.iter().any(|s| !s.destroys_its_cluster());
    let shared = if needs_shared {
        Some(Arc::new(start_cluster(false).await?))
    } else {
        None
    };
    for &scenario in &opts.scenarios {
        for &mode in &opts.modes {
            let cluster = match (scenario, &shared) {
                (Scenario::PrimaryFailover | Scenario::SplitPrimary, _) => {
                    Arc::new(start_cluster(true).await?)
                }
                (_, Some(c)) => c.clone(),
                (_, None) => unreachable_cluster()?,
            };
            let report = run_one::<H>(opts, &cluster, scenario, mode, &marks).await?;
            progress(&report);
            reports.push(report);
        }
    }
    Ok(reports)
}

fn unreachable_cluster() -> Result<Arc<Cluster>, BoxError> {
    Err("internal: no shared cluster".into())
}

async fn start_cluster(synchronous: bool) -> Result<Cluster, BoxError> {
    let c = tokio::task::spawn_blocking(move || {
        ClusterBuilder::new()
            .replicas(2)
            .with_redis(true)
            .synchronous(synchronous)
            .start()
    })
    .await??;
    Ok(c)
}

async fn blocking<T: Send + 'static>(
    cluster: &Arc<Cluster>,
    f: impl FnOnce(&Cluster) -> Result<T, routing_testkit::KitError> + Send + 'static,
) -> Result<T, BoxError> {
    let c = cluster.clone();
    Ok(tokio::task::spawn_blocking(move || f(&c)).await??)
}

/// The router configuration the checker uses: defaults, with a lag bound tighter than the TTL pin.
pub fn checker_config() -> RouterConfig {
    RouterConfig {
        lag: LagBounds {
            max_time: Some(MAX_LAG),
            ..LagBounds::default()
        },
        ..RouterConfig::default()
    }
}

fn scenario_config(scenario: Scenario) -> RouterConfig {
    let mut config = checker_config();
    if scenario == Scenario::BusyPools {
        config.pool.max_size = 4;
        config.pool.connect_timeout = BUSY_CHECKOUT_TIMEOUT;
    }
    config
}

/// Checkout timeout in the busy-pools scenario: shorter than the hog holds its sessions, long
/// enough to open a connection (SCRAM and the session checks) on a loaded machine.
const BUSY_CHECKOUT_TIMEOUT: Duration = Duration::from_millis(250);
/// A request that takes longer than this counts as failed (a write stuck behind a synchronous
/// commit that no standby will confirm, say).
const REQUEST_LIMIT: Duration = Duration::from_secs(3);

async fn run_one<H: ChaosBackend>(
    opts: &ChaosOptions,
    cluster: &Arc<Cluster>,
    scenario: Scenario,
    mode: Mode,
    marks: &MarksFactory,
) -> Result<RunReport, BoxError> {
    let table = format!("chaos_{}_{}", scenario.name(), mode.name().to_lowercase());
    let create = format!(
        "DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (user_id int PRIMARY KEY, val bigint NOT NULL); \
         DROP TABLE IF EXISTS {table}_misroute; CREATE TABLE {table}_misroute (note text)"
    );
    blocking(cluster, move |c| {
        c.psql(c.primary(), &create)?;
        c.wait_replicated(Duration::from_secs(10))
    })
    .await?;

    let redis = cluster.redis_url().ok_or("the cluster has no Redis")?;
    let router = Router::builder(H::backend())
        .nodes(cluster.node_configs())
        .config(scenario_config(scenario))
        .consistency(mode.consistency())
        .marks(marks(redis).await)
        .tokens(
            TokenCodec::new(TokenKey::new(1, "chaos-checker-key-0123456789")?)
                .cluster("chaos-checker"),
        )
        .build()
        .await?;

    // Faults that hold for the whole run.
    match scenario {
        Scenario::ApplyDelay50ms | Scenario::ApplyDelay500ms => {
            let d = if scenario == Scenario::ApplyDelay50ms {
                50
            } else {
                500
            };
            blocking(cluster, move |c| {
                c.set_apply_delay(1, Duration::from_millis(d))?;
                c.set_apply_delay(2, Duration::from_millis(d))
            })
            .await?;
        }
        Scenario::PausedReplica => blocking(cluster, |c| c.pause_replay(1)).await?,
        // Every replica must confirm a commit: once replica 2 is promoted, the old primary
        // can acknowledge nothing more.
        Scenario::SplitPrimary => {
            blocking(cluster, |c| {
                c.psql(
                    0,
                    "ALTER SYSTEM SET synchronous_standby_names = 'ANY 2 (*)'",
                )?;
                c.psql(0, "SELECT pg_reload_conf()")
            })
            .await?;
        }
        _ => {}
    }

    let counters = Arc::new(Counters::default());
    let acked: Arc<Acked> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for w in 0..opts.workers {
        let users: Vec<i64> = (0..opts.users_per_worker)
            .map(|u| (w * opts.users_per_worker + u) as i64)
            .collect();
        workers.push(tokio::spawn(worker::<H>(
            router.clone(),
            mode,
            scenario,
            table.clone(),
            users,
            counters.clone(),
            acked.clone(),
            stop.clone(),
        )));
    }

    let hog = (scenario == Scenario::BusyPools)
        .then(|| tokio::spawn(hog::<H>(router.clone(), stop.clone())));

    // Faults injected mid-run.
    let third = opts.run_time / 3;
    tokio::time::sleep(third).await;
    match scenario {
        Scenario::ReplicaKilled => blocking(cluster, |c| c.kill(1)).await?,
        Scenario::RedisKilled => blocking(cluster, |c| c.kill_redis()).await?,
        Scenario::PrimaryFailover => blocking(cluster, fail_over).await?,
        Scenario::SplitPrimary => blocking(cluster, |c| c.promote(2)).await?,
        _ => {}
    }
    tokio::time::sleep(third).await;
    if scenario == Scenario::RedisKilled {
        blocking(cluster, |c| c.restart_redis()).await?;
    }
    tokio::time::sleep(opts.run_time - 2 * third).await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await?;
    }
    if let Some(hog) = hog {
        hog.await?;
    }

    let lost = lost_acked_writes::<H>(&router, &table, &acked).await?;
    let acked_only_on_old_primary = if scenario == Scenario::SplitPrimary {
        let select =
            format!("SELECT coalesce(string_agg(user_id || ':' || val, ','), '') FROM {table}");
        let (old, new) = blocking(cluster, move |c| {
            Ok((c.psql(0, &select)?, c.psql(2, &select)?))
        })
        .await?;
        let (old, new) = (parse_values(&old), parse_values(&new));
        let acked = acked.0.lock().unwrap_or_else(|e| e.into_inner());
        acked
            .iter()
            .filter(|(u, v)| {
                new.get(u).copied().unwrap_or(0) < **v && old.get(u).copied().unwrap_or(0) >= **v
            })
            .count() as u64
    } else {
        0
    };
    let misrouted = format!("SELECT count(*) FROM {table}_misroute");
    let writes_through_reads: u64 = blocking(cluster, move |c| c.psql(c.primary(), &misrouted))
        .await?
        .parse()
        .unwrap_or(u64::MAX);
    let stats = router.stats();
    drop(router);

    // Heal what this run broke (the shared cluster is reused).
    match scenario {
        Scenario::ApplyDelay50ms | Scenario::ApplyDelay500ms => {
            blocking(cluster, |c| {
                c.clear_apply_delay(1)?;
                c.clear_apply_delay(2)
            })
            .await?
        }
        Scenario::PausedReplica => blocking(cluster, |c| c.resume_replay(1)).await?,
        Scenario::ReplicaKilled => blocking(cluster, |c| c.restart(1)).await?,
        _ => {}
    }

    Ok(RunReport {
        scenario: scenario.name().into(),
        mode: mode.name().into(),
        ops: counters.ops.load(Ordering::Relaxed),
        stale_reads: counters.stale.load(Ordering::Relaxed),
        failed_requests: counters.failed.load(Ordering::Relaxed),
        replica_share: stats.replica_share(),
        lost_acked_writes: lost,
        writes_through_reads,
        misbehaviors: counters.misbehaviors.load(Ordering::Relaxed),
        acked_only_on_old_primary,
        stats,
    })
}

/// Kill the primary, promote the replica that received the most WAL (it holds every write a
/// synchronous commit acknowledged), repoint the other replica.
fn fail_over(c: &Cluster) -> Result<(), routing_testkit::KitError> {
    let received = |i: usize| -> u64 {
        c.psql(
            i,
            "SELECT (pg_catalog.pg_last_wal_receive_lsn() - '0/0'::pg_lsn)::bigint",
        )
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
    };
    c.kill(0)?;
    let (best, other) = if received(2) > received(1) {
        (2, 1)
    } else {
        (1, 2)
    };
    c.promote(best)?;
    c.follow(other, best)
}

#[derive(Debug, Default)]
struct Counters {
    ops: AtomicU64,
    stale: AtomicU64,
    failed: AtomicU64,
    misbehaviors: AtomicU64,
}

/// Last acknowledged value per user, shared by workers.
mod acked {
    use std::collections::HashMap;
    use std::sync::Mutex;

    #[derive(Debug, Default)]
    pub struct Acked(pub Mutex<HashMap<i64, i64>>);

    impl Acked {
        pub fn record(&self, user: i64, val: i64) {
            let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
            let e = m.entry(user).or_insert(val);
            *e = (*e).max(val);
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn worker<H: ChaosBackend>(
    router: Router<H::B>,
    mode: Mode,
    scenario: Scenario,
    table: String,
    users: Vec<i64>,
    counters: Arc<Counters>,
    acked: Arc<Acked>,
    stop: Arc<AtomicBool>,
) {
    let mut next: HashMap<i64, i64> = users.iter().map(|u| (*u, 0)).collect();
    // Users whose last commit was cancelled: it may or may not have happened.
    let mut uncertain: HashMap<i64, ()> = HashMap::new();
    let mut i = 0usize;
    while !stop.load(Ordering::Relaxed) {
        let user = users[i % users.len()];
        i += 1;
        let mut val = {
            let v = next.entry(user).or_insert(0);
            *v += 1;
            *v
        };
        counters.ops.fetch_add(1, Ordering::Relaxed);
        let mut outcome = Ok(true);
        if scenario == Scenario::MisbehavingHandlers {
            if uncertain.remove(&user).is_some() && mode.uses_marks() {
                outcome = after_cancelled_commit::<H>(&router, &table, user).await;
            }
            if i.is_multiple_of(2) && outcome.is_ok() {
                counters.misbehaviors.fetch_add(1, Ordering::Relaxed);
                let kind = Misbehavior::ALL[(i / 2) % Misbehavior::ALL.len()];
                match misbehave::<H>(&router, kind, &table, user, val, &acked).await {
                    Ok(MisbehaviorEnd::Done) => {}
                    Ok(MisbehaviorEnd::Uncertain) => {
                        uncertain.insert(user, ());
                    }
                    Err(e) => outcome = Err(e),
                }
                // The pair below writes a newer value than the misbehaving handler tried.
                val = {
                    let v = next.entry(user).or_insert(0);
                    *v += 1;
                    *v
                };
            }
        }
        if matches!(outcome, Ok(true)) && !uncertain.contains_key(&user) {
            let limited = tokio::time::timeout(
                REQUEST_LIMIT,
                pair::<H>(&router, mode, &table, user, val, &acked),
            );
            outcome = limited.await.unwrap_or_else(|_| {
                Err(routing_core::Error::NoReader {
                    reason: format!("the pair took longer than {REQUEST_LIMIT:?}"),
                })
            });
        }
        match outcome {
            Ok(true) => {}
            Ok(false) => {
                counters.stale.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                counters.failed.fetch_add(1, Ordering::Relaxed);
                // Don't spin while a node is down.
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }
}

impl Mode {
    /// Does this mode read through the user's mark (which a cancelled commit must still set)?
    fn uses_marks(self) -> bool {
        matches!(self, Mode::ReadYourWrites | Mode::RecentWriterTtl)
    }
}

/// A handler that misuses its session.
#[derive(Debug, Clone, Copy)]
enum Misbehavior {
    /// `BEGIN`, a write, then the guard is dropped (an early return).
    LeaveWriteOpen,
    /// A REPEATABLE READ snapshot taken on a read session and left open.
    LeaveSnapshotOpen,
    /// Read-only turned off and settings changed on read sessions, then writes through them.
    WriteThroughReads,
    /// An error inside the transaction, handled, then `commit()` anyway.
    CommitAfterError,
    /// `commit()` cancelled after a random fraction of a millisecond or two.
    CancelledCommit,
}

impl Misbehavior {
    const ALL: [Misbehavior; 5] = [
        Misbehavior::LeaveWriteOpen,
        Misbehavior::LeaveSnapshotOpen,
        Misbehavior::WriteThroughReads,
        Misbehavior::CommitAfterError,
        Misbehavior::CancelledCommit,
    ];
}

enum MisbehaviorEnd {
    Done,
    /// A commit was cancelled: it may or may not have happened.
    Uncertain,
}

/// Runs one misbehaving handler for `user`, which writes `val` where it writes. Errors the
/// misbehavior itself causes are expected and swallowed; only a router that refuses to work
/// afterwards is an error.
async fn misbehave<H: ChaosBackend>(
    router: &Router<H::B>,
    kind: Misbehavior,
    table: &str,
    user: i64,
    val: i64,
    acked: &Acked,
) -> Result<MisbehaviorEnd, routing_core::Error> {
    let ctx = RequestContext::new().user(user.to_string());
    let upsert = upsert(table, user, val);
    match kind {
        Misbehavior::LeaveWriteOpen => {
            let mut w = router.write_with(&ctx).await?;
            let _ = <H::B as Backend>::execute_batch(w.pooled(), "BEGIN").await;
            let _ = <H::B as Backend>::execute(w.pooled(), &upsert).await;
        }
        Misbehavior::LeaveSnapshotOpen => {
            let mut r = router
                .read_with(&RequestContext::new().consistency(Consistency::Eventual))
                .await?;
            let p = r.pooled();
            let _ =
                <H::B as Backend>::execute_batch(p, "BEGIN ISOLATION LEVEL REPEATABLE READ").await;
            let _ = <H::B as Backend>::query_text(
                p,
                &format!("SELECT count(*)::text AS v FROM {table}"),
            )
            .await;
        }
        Misbehavior::WriteThroughReads => {
            let misroute = format!("INSERT INTO {table}_misroute (note) VALUES ('{user}')");
            let attempts = [
                "SET default_transaction_read_only = off; \
                 SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE; SET search_path = nowhere"
                    .to_string(),
                misroute.clone(),
                format!("BEGIN READ WRITE; {misroute}; COMMIT"),
                format!("BEGIN; SET transaction_read_only = off; {misroute}; COMMIT"),
            ];
            for (n, sql) in attempts.iter().enumerate() {
                let ctx = if n % 2 == 0 {
                    RequestContext::new().force_primary(true)
                } else {
                    RequestContext::new().consistency(Consistency::Eventual)
                };
                let mut r = router.read_with(&ctx).await?;
                let _ = <H::B as Backend>::execute_batch(r.pooled(), sql).await;
            }
        }
        Misbehavior::CommitAfterError => {
            let mut w = router.write_with(&ctx).await?;
            let _ = <H::B as Backend>::execute_batch(w.pooled(), "BEGIN").await;
            let _ = <H::B as Backend>::execute(w.pooled(), &upsert).await;
            let _ = <H::B as Backend>::execute(w.pooled(), "SELECT 1/0").await;
            if w.commit().await.is_ok() {
                // A COMMIT the server turned into a rollback, taken for success: acknowledged,
                // and the lost-writes check will find it missing.
                acked.record(user, val);
            }
        }
        Misbehavior::CancelledCommit => {
            let mut w = router.write_with(&ctx).await?;
            let _ = <H::B as Backend>::execute_batch(w.pooled(), "BEGIN").await;
            let done = <H::B as Backend>::execute(w.pooled(), &upsert).await;
            w.check_backend(done)?;
            let cut = Duration::from_micros(rand::random_range(0..2_000));
            match tokio::time::timeout(cut, w.commit()).await {
                Ok(Ok(_)) => acked.record(user, val),
                Ok(Err(e)) => return Err(e),
                Err(_) => return Ok(MisbehaviorEnd::Uncertain),
            }
        }
    }
    Ok(MisbehaviorEnd::Done)
}

/// The user's first request after a cancelled commit: a read through their mark must show what
/// the primary has, whether or not the commit happened.
async fn after_cancelled_commit<H: ChaosBackend>(
    router: &Router<H::B>,
    table: &str,
    user: i64,
) -> Result<bool, routing_core::Error> {
    let select = format!("SELECT val::text AS v FROM {table} WHERE user_id = {user}");
    let read = |ctx: RequestContext| {
        let select = select.clone();
        async move {
            let mut r = router.read_with(&ctx).await?;
            let got = <H::B as Backend>::query_text(r.pooled(), &select).await;
            let got = r.check_backend(got)?;
            Ok::<i64, routing_core::Error>(got.and_then(|s| s.parse().ok()).unwrap_or(0))
        }
    };
    let seen = read(RequestContext::new().user(user.to_string())).await?;
    let truth = read(RequestContext::new().force_primary(true)).await?;
    Ok(seen >= truth)
}

/// One write-then-read pair; `Ok(false)` when the read was stale.
async fn pair<H: ChaosBackend>(
    router: &Router<H::B>,
    mode: Mode,
    table: &str,
    user: i64,
    val: i64,
    acked: &Acked,
) -> Result<bool, routing_core::Error> {
    let writer_ctx = RequestContext::new().user(user.to_string());
    let mut w = router.write_with(&writer_ctx).await?;
    let sql = upsert(table, user, val);
    let done = <H::B as Backend>::execute(w.pooled(), &sql).await;
    w.check_backend(done)?;
    let receipt = w.finish().await?;
    acked.record(user, val);

    let reader_ctx = match mode {
        // Another client, holding only the token the writer handed out.
        Mode::Causal => {
            let text = receipt.token.as_deref().unwrap_or_default();
            RequestContext::new().token(router.verify_token(text)?)
        }
        _ => writer_ctx,
    };
    let mut r = router.read_with(&reader_ctx).await?;
    let select = format!("SELECT val::text AS v FROM {table} WHERE user_id = {user}");
    let got = <H::B as Backend>::query_text(r.pooled(), &select).await;
    let got = r.check_backend(got)?;
    let seen = got.and_then(|s| s.parse::<i64>().ok()).unwrap_or(0);
    Ok(seen >= val)
}

async fn lost_acked_writes<H: ChaosBackend>(
    router: &Router<H::B>,
    table: &str,
    acked: &Acked,
) -> Result<u64, BoxError> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut w = loop {
        match router.write().await {
            Ok(w) => break w,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => return Err(e.into()),
        }
    };
    let sql =
        format!("SELECT coalesce(string_agg(user_id || ':' || val, ','), '') AS v FROM {table}");
    let text = <H::B as Backend>::query_text(w.pooled(), &sql)
        .await?
        .unwrap_or_default();
    let stored = parse_values(&text);
    let acked = acked.0.lock().unwrap_or_else(|e| e.into_inner());
    Ok(acked
        .iter()
        .filter(|(u, v)| stored.get(u).copied().unwrap_or(0) < **v)
        .count() as u64)
}

/// `user:val,user:val` as a map.
fn parse_values(text: &str) -> HashMap<i64, i64> {
    text.split(',')
        .filter_map(|kv| kv.split_once(':'))
        .filter_map(|(k, v)| Some((k.trim().parse().ok()?, v.trim().parse().ok()?)))
        .collect()
}

/// Keeps every pool full for 600 ms at a time (Eventual reads spread over the replicas, writes on
/// the primary, each sleeping on the server), then lets go for 300 ms.
async fn hog<H: ChaosBackend>(router: Router<H::B>, stop: Arc<AtomicBool>) {
    let eventual = RequestContext::new().consistency(Consistency::Eventual);
    while !stop.load(Ordering::Relaxed) {
        let mut held = Vec::new();
        for _ in 0..8 {
            let router = router.clone();
            let ctx = eventual.clone();
            held.push(tokio::spawn(async move {
                if let Ok(mut r) = router.read_with(&ctx).await {
                    let _ =
                        <H::B as Backend>::execute_batch(r.pooled(), "SELECT pg_sleep(0.6)").await;
                }
            }));
        }
        for _ in 0..4 {
            let router = router.clone();
            held.push(tokio::spawn(async move {
                if let Ok(mut w) = router.write().await {
                    let _ =
                        <H::B as Backend>::execute_batch(w.pooled(), "SELECT pg_sleep(0.6)").await;
                }
            }));
        }
        for h in held {
            let _ = h.await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Sets `user`'s value (the checker's only write).
fn upsert(table: &str, user: i64, val: i64) -> String {
    format!(
        "INSERT INTO {table} (user_id, val) VALUES ({user}, {val}) \
         ON CONFLICT (user_id) DO UPDATE SET val = EXCLUDED.val"
    )
}
