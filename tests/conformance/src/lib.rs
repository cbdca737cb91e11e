//! # routing-conformance
//!
//! The behaviour every routing-core backend must show on real servers, written once, generic over
//! the [`Backend`]. A backend crate runs the whole suite with one line in an integration test:
//!
//! ```ignore
//! struct MyHarness;
//! impl routing_conformance::Harness for MyHarness {
//!     type B = my_backend::MyBackend;
//!     fn backend() -> Self::B { my_backend::MyBackend::new() }
//! }
//! routing_conformance::conformance_tests!(MyHarness);
//! ```
//!
//! (The calling crate needs `tokio` with `macros` and `rt-multi-thread` as a dev-dependency.)
//!
//! The suite uses only routing-core's public API, [`Backend::execute`] and [`Backend::query_text`]
//! on a guard's [`pooled`](routing_core::ReadConn::pooled) session, and the test kit, so it needs
//! nothing driver-specific. It identifies the server behind a session with
//! `inet_server_port()` and compares it with the kit's ports.
//!
//! Clusters:
//! - [`routing_testkit::shared`] (primary + 2 replicas) for tests that change nothing cluster-wide;
//!   each uses its own tables, so they can run in parallel;
//! - one cluster per process with a 300 ms apply delay on both replicas, started on first use and
//!   shared by the staleness tests (which only read and insert into their own tables);
//! - a cluster of its own for every test that pauses, kills or promotes a node (dropped, and so
//!   cleaned up, even when the test fails).
//!
//! The failover and health tests under real faults (killed or blackholed primary then a
//! promotion, split primaries, a replica killed under reads, lag hysteresis, typed outcomes of
//! lost writes) live in `failover.rs`; they drive the router with an open-loop request load and
//! print failover timings measured with `RouterConfig::default()`.
//!
//! Every function must run on a multi-thread tokio runtime: the kit's blocking calls run through
//! [`tokio::task::block_in_place`]. Timings worth knowing are printed with `eprintln!` (run with
//! `--nocapture` to see them).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use routing_core::{
    Access, Backend, BackendError, BanPolicy, Consistency, Epoch, Error, ErrorKind, LagBounds,
    NodeConfig, NodeRole, PoolSettings, PoolSpec, ReadConn, RequestContext, Router, RouterConfig,
    TokenCodec, TokenKey, WriteConn,
};
use routing_testkit::{Cluster, ClusterBuilder};

mod failover;
pub use failover::{
    failover_after_blackhole_with_defaults, failover_after_kill_with_defaults,
    killed_replica_under_read_load_fails_only_in_flight_reads, lag_exclusion_has_hysteresis,
    lost_writes_and_a_missing_primary_have_typed_outcomes,
    promotion_with_the_old_primary_up_never_writes_it,
};

mod commit;
pub use commit::explicit_commit_returns_the_lsn_after_commit;
mod standby;
pub use standby::{
    a_standby_writer_session_is_pooled_only_after_the_writer_check,
    the_first_write_after_a_promotion_uses_the_standby_session,
};
mod security;
pub use security::probes_ignore_functions_planted_in_the_search_path;
mod endpoint;
pub use endpoint::{
    a_stable_endpoint_pointing_back_at_the_old_primary_gets_no_writes,
    stable_endpoint_follows_a_failover_and_drops_old_sessions,
};
mod busy;
pub use busy::{
    a_missed_probe_or_a_broken_session_keeps_the_generation,
    busy_pools_never_ban_or_unseat_a_healthy_node, waiting_reads_do_not_pin_replica_sessions,
};
mod reads;
pub use reads::{
    a_load_balanced_endpoint_is_verified_on_the_session,
    a_replica_on_the_old_timeline_serves_no_read,
    guarded_reads_use_a_caught_up_replica_in_a_fallback_region,
};
mod membership;
pub use membership::membership_adds_and_removes_replicas_at_run_time;
mod roles;
pub use roles::least_privilege_monitor_sees_timelines_and_system_id;
mod clones;
pub use clones::tokens_from_a_cloned_cluster_are_not_trusted;
mod web;
pub use web::{
    web_a_user_created_by_a_write_is_marked, web_anonymous_signup_then_login_reads_its_own_account,
    web_bad_tokens_are_answered_400, web_force_primary_and_method_defaults,
    web_region_header_is_trusted_only_from_proxies, web_status_handler_serves_the_router_status,
    web_tokens_round_trip_through_header_and_cookie,
    web_transactions_commit_on_success_and_roll_back_otherwise,
};
mod hygiene;
pub use hygiene::{
    a_cancelled_commit_still_records_the_mark, commit_lsn_covers_asynchronous_commits,
    commit_reports_what_the_server_did, dead_sessions_are_caught_without_a_ping_per_checkout,
    open_transactions_never_reach_the_next_reader, open_transactions_never_reach_the_next_writer,
    read_sessions_refuse_every_write, session_state_never_reaches_the_next_request,
    transaction_closure_commits_only_on_success,
};

/// What a backend crate provides to run the suite.
pub trait Harness: Send + Sync + 'static {
    /// The backend under test.
    type B: Backend;
    /// A fresh backend value (one per router).
    fn backend() -> Self::B;
}

/// Expands to one `#[tokio::test]` per conformance behaviour, for the given [`Harness`].
#[macro_export]
macro_rules! conformance_tests {
    ($h:ty) => {
        $crate::conformance_tests!(@each $h;
            reads_go_to_replicas_and_spread,
            writes_go_to_the_primary,
            misrouted_writes_fail_with_a_typed_error,
            pools_enforce_access_mode_and_lifetime,
            eventual_reads_observe_replication_lag,
            recent_writer_ttl_never_reads_stale,
            read_your_writes_never_reads_stale,
            a_replica_that_keeps_lagging_is_not_waited_on_in_vain,
            causal_tokens_never_read_stale,
            lagging_replica_is_excluded_and_readmitted,
            killed_replica_stops_receiving_reads,
            failover_resumes_writes_and_never_uses_the_old_primary,
            transactions_never_change_node,
            bad_url_is_a_typed_config_error,
            wrong_password_is_a_typed_auth_error,
            unreachable_host_is_a_typed_connection_error,
            explicit_commit_returns_the_lsn_after_commit,
            probes_ignore_functions_planted_in_the_search_path,
            stable_endpoint_follows_a_failover_and_drops_old_sessions,
            failover_after_kill_with_defaults,
            failover_after_blackhole_with_defaults,
            promotion_with_the_old_primary_up_never_writes_it,
            killed_replica_under_read_load_fails_only_in_flight_reads,
            lag_exclusion_has_hysteresis,
            lost_writes_and_a_missing_primary_have_typed_outcomes,
            open_transactions_never_reach_the_next_writer,
            open_transactions_never_reach_the_next_reader,
            session_state_never_reaches_the_next_request,
            read_sessions_refuse_every_write,
            commit_reports_what_the_server_did,
            transaction_closure_commits_only_on_success,
            commit_lsn_covers_asynchronous_commits,
            a_cancelled_commit_still_records_the_mark,
            dead_sessions_are_caught_without_a_ping_per_checkout,
            a_cancelled_router_statement_never_reaches_the_next_holder,
            a_replica_on_the_old_timeline_serves_no_read,
            guarded_reads_use_a_caught_up_replica_in_a_fallback_region,
            a_load_balanced_endpoint_is_verified_on_the_session,
            a_stable_endpoint_pointing_back_at_the_old_primary_gets_no_writes,
            busy_pools_never_ban_or_unseat_a_healthy_node,
            waiting_reads_do_not_pin_replica_sessions,
            a_missed_probe_or_a_broken_session_keeps_the_generation,
            least_privilege_monitor_sees_timelines_and_system_id,
            tokens_from_a_cloned_cluster_are_not_trusted,
            web_tokens_round_trip_through_header_and_cookie,
            web_anonymous_signup_then_login_reads_its_own_account,
            web_a_user_created_by_a_write_is_marked,
            web_region_header_is_trusted_only_from_proxies,
            web_bad_tokens_are_answered_400,
            web_transactions_commit_on_success_and_roll_back_otherwise,
            web_force_primary_and_method_defaults,
            web_status_handler_serves_the_router_status,
            membership_adds_and_removes_replicas_at_run_time,
            a_standby_writer_session_is_pooled_only_after_the_writer_check,
            the_first_write_after_a_promotion_uses_the_standby_session,
        );
    };
    (@each $h:ty; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let started = ::std::time::Instant::now();
                $crate::$name::<$h>().await;
                eprintln!(
                    "[conformance] {} passed in {:?}",
                    stringify!($name),
                    started.elapsed()
                );
            }
        )*
    };
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Runs a blocking test-kit call from an async test.
fn kit<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

fn own_cluster() -> Cluster {
    own_cluster_with(2)
}

/// A cluster of its own with this many replicas (fewer start faster).
fn own_cluster_with(replicas: usize) -> Cluster {
    kit(|| {
        let started = Instant::now();
        let c = ClusterBuilder::new()
            .replicas(replicas)
            .start()
            .expect("start a test cluster");
        eprintln!(
            "[conformance] own cluster (primary + {replicas}) up in {:?}",
            started.elapsed()
        );
        c
    })
}

/// Drops a cluster outside the async context (stopping servers blocks).
fn drop_cluster(c: Cluster) {
    kit(move || drop(c));
}

/// Replica apply delay of the staleness cluster.
const APPLY_DELAY: Duration = Duration::from_millis(300);

/// Primary + 2 replicas, both applying every commit [`APPLY_DELAY`] late. Started once per
/// process; its state never changes after that.
fn delayed_cluster() -> &'static Cluster {
    static DELAYED: OnceLock<Cluster> = OnceLock::new();
    kit(|| {
        DELAYED.get_or_init(|| {
            let c = ClusterBuilder::new()
                .replicas(2)
                .start()
                .expect("start the delayed cluster");
            for i in 1..=2 {
                c.set_apply_delay(i, APPLY_DELAY).expect("set apply delay");
            }
            c
        })
    })
}

fn shared_cluster() -> &'static Cluster {
    kit(routing_testkit::shared)
}

/// Monitor settings short enough for tests.
fn test_config() -> RouterConfig {
    RouterConfig {
        default_consistency: Consistency::Eventual,
        probe_interval: Duration::from_millis(100),
        probe_timeout: Duration::from_secs(1),
        write_deadline: Duration::from_secs(5),
        wait_budget: Duration::from_millis(50),
        ban: BanPolicy {
            base: Duration::from_millis(100),
            max: Duration::from_secs(1),
        },
        pool: PoolSettings {
            max_size: 4,
            connect_timeout: Duration::from_secs(2),
            ..PoolSettings::default()
        },
        ..RouterConfig::default()
    }
}

/// The suite's token key (every router's, so tokens from one router verify on another unless
/// their cluster names differ).
fn token_key() -> TokenKey {
    TokenKey::new(1, "conformance-test-key-0123456789").expect("token key")
}

fn codec() -> TokenCodec {
    TokenCodec::new(token_key()).cluster("conformance")
}

async fn router<H: Harness>(c: &Cluster, config: RouterConfig) -> Router<H::B> {
    Router::builder(H::backend())
        .nodes(c.node_configs())
        .config(config)
        .tokens(codec())
        .build()
        .await
        .expect("build router")
}

/// A node reached at `port` (a kit node, or a proxy in front of one), logging in with the kit's
/// least-privilege roles as [`Cluster::node_configs`] does: writes as the application's writer
/// role, reads as the read-only role, probes as the monitoring role.
fn node_at(writer: bool, name: &str, port: u16) -> NodeConfig {
    use routing_testkit::{
        MONITOR_PASSWORD, MONITOR_ROLE, READER_PASSWORD, READER_ROLE, WRITER_PASSWORD, WRITER_ROLE,
    };
    let url = |role: &str, password: &str| {
        format!("postgres://{role}:{password}@127.0.0.1:{port}/postgres")
    };
    let node = if writer {
        NodeConfig::writer(name, url(WRITER_ROLE, WRITER_PASSWORD))
    } else {
        NodeConfig::replica(name, url(WRITER_ROLE, WRITER_PASSWORD))
    };
    node.reader_url(url(READER_ROLE, READER_PASSWORD))
        .monitor_url(url(MONITOR_ROLE, MONITOR_PASSWORD))
}

/// A table name no other test (or process) uses.
fn table(tag: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "conf_{tag}_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// The server behind a session: port and backend pid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Server {
    port: u16,
    pid: u32,
}

const WHOAMI: &str = "SELECT pg_catalog.inet_server_port()::pg_catalog.text || ':' || \
                      pg_catalog.pg_backend_pid()::pg_catalog.text AS v";

async fn whoami<B: Backend>(pooled: &mut B::Pooled) -> Result<Server, BackendError> {
    let text = B::query_text(pooled, WHOAMI).await?.unwrap_or_default();
    let (port, pid) = text.split_once(':').expect("port:pid");
    Ok(Server {
        port: port.parse().expect("port"),
        pid: pid.parse().expect("pid"),
    })
}

/// Node index of a kit port.
fn index_of(c: &Cluster, port: u16) -> usize {
    (0..c.nodes().len())
        .find(|&i| c.node(i).port() == port)
        .unwrap_or_else(|| panic!("port {port} is not a node of the cluster"))
}

async fn create_table<B: Backend>(r: &Router<B>, name: &str) {
    let mut w = r.write().await.expect("write session");
    let done = B::execute(
        w.pooled(),
        &format!("CREATE TABLE {name} (id bigint PRIMARY KEY, note text)"),
    )
    .await;
    w.check_backend(done).expect("create table");
}

async fn insert<B: Backend>(w: &mut WriteConn<B>, table: &str, id: u64) -> Result<u64, Error> {
    let done = B::execute(
        w.pooled(),
        &format!("INSERT INTO {table} (id, note) VALUES ({id}, 'x')"),
    )
    .await;
    w.check_backend(done)
}

async fn count_id<B: Backend>(r: &mut ReadConn<B>, table: &str, id: u64) -> u64 {
    let sql =
        format!("SELECT pg_catalog.count(*)::pg_catalog.text AS v FROM {table} WHERE id = {id}");
    let done = B::query_text(r.pooled(), &sql).await;
    r.check_backend(done)
        .expect("count query")
        .and_then(|t| t.parse().ok())
        .expect("a count")
}

async fn setting<B: Backend>(pooled: &mut B::Pooled, name: &str) -> String {
    B::query_text(
        pooled,
        &format!("SELECT pg_catalog.current_setting('{name}') AS v"),
    )
    .await
    .expect("current_setting")
    .unwrap_or_default()
}

fn eventual() -> RequestContext {
    RequestContext::new().consistency(Consistency::Eventual)
}

async fn wait_until(what: &str, limit: Duration, mut check: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !check() {
        assert!(
            started.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    started.elapsed()
}

/// Inserts a row every few milliseconds through the router so a paused replica falls behind.
struct Churn {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<Result<(), String>>,
}

fn churn<B: Backend>(r: &Router<B>, table: String) -> Churn {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let (r, s, d) = (r.clone(), stop.clone(), done.clone());
    let task = tokio::spawn(async move {
        let mut id = 1_000_000;
        while !s.load(Ordering::Relaxed) {
            id += 1;
            let mut w = r.write().await.map_err(|e| e.to_string())?;
            insert(&mut w, &table, id)
                .await
                .map_err(|e| e.to_string())?;
            drop(w);
            d.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    });
    Churn { stop, done, task }
}

impl Churn {
    async fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.task
            .await
            .expect("churn task")
            .expect("background writes keep succeeding");
        self.done.load(Ordering::Relaxed)
    }
}

/// Asserts `text` does not contain the password (raw or percent-encoded).
fn assert_no_password(what: &str, text: &str, password: &str) {
    assert!(
        !text.contains(password),
        "{what} leaks the password: {text}"
    );
}

// ---------------------------------------------------------------------------------------------
// Routing
// ---------------------------------------------------------------------------------------------

/// `Eventual` reads are served by replicas, both of them, never by the primary; the guard's node
/// name is the node whose port answered.
pub async fn reads_go_to_replicas_and_spread<H: Harness>() {
    let c = shared_cluster();
    let r = router::<H>(c, test_config()).await;
    let mut per_node = [0usize; 3];
    for _ in 0..60 {
        let mut conn = r.read_with(&eventual()).await.expect("read");
        let me = whoami::<H::B>(conn.pooled()).await.expect("whoami");
        let i = index_of(c, me.port);
        assert_eq!(conn.node_name(), c.node(i).name(), "guard names its node");
        assert!(!conn.on_primary());
        per_node[i] += 1;
    }
    eprintln!("[conformance] 60 eventual reads per node: {per_node:?}");
    assert_eq!(per_node[0], 0, "no eventual read on the primary");
    assert!(
        per_node[1] >= 10 && per_node[2] >= 10,
        "reads spread over both replicas: {per_node:?}"
    );
    let stats = r.stats();
    assert_eq!(stats.reads_replica, 60);
    assert_eq!(stats.reads_primary, 0);
}

/// Write sessions run on the primary, and `finish` returns increasing commit LSNs.
pub async fn writes_go_to_the_primary<H: Harness>() {
    let c = shared_cluster();
    let r = router::<H>(c, test_config()).await;
    let t = table("writes");
    create_table(&r, &t).await;
    let mut last = None;
    for id in 0..10 {
        let mut w = r.write().await.expect("write");
        let me = whoami::<H::B>(w.pooled()).await.expect("whoami");
        assert_eq!(me.port, c.node(0).port(), "write on the primary");
        assert_eq!(w.node_name(), c.node(0).name());
        assert_eq!(
            setting::<H::B>(w.pooled(), "default_transaction_read_only").await,
            "off"
        );
        assert_eq!(insert(&mut w, &t, id).await.expect("insert"), 1);
        let receipt = w.finish().await.expect("finish");
        assert!(Some(receipt.lsn) > last, "commit LSNs increase");
        assert!(receipt.token.is_some(), "a signed token with a key");
        last = Some(receipt.lsn);
    }
    let primary_lsn = kit(|| c.psql(0, "SELECT pg_current_wal_lsn()")).expect("psql");
    let primary_lsn: routing_core::Lsn = primary_lsn.parse().expect("lsn");
    assert!(last <= Some(primary_lsn));
    let rows = kit(|| c.psql(0, &format!("SELECT count(*) FROM {t}"))).expect("psql");
    assert_eq!(rows, "10");
}

/// A write through a read session fails with `Error::MisroutedWrite`, on a replica and on the
/// primary's read-only fallback sessions alike, and nothing is written.
pub async fn misrouted_writes_fail_with_a_typed_error<H: Harness>() {
    let c = shared_cluster();
    let r = router::<H>(c, test_config()).await;
    let t = table("misrouted");
    create_table(&r, &t).await;
    kit(|| c.wait_replicated(Duration::from_secs(10))).expect("replicated");

    let cases = [
        ("replica (Eventual)", eventual(), false),
        (
            "primary (Consistency::Primary)",
            RequestContext::new().consistency(Consistency::Primary),
            true,
        ),
        (
            "primary (force_primary)",
            RequestContext::new().force_primary(true),
            true,
        ),
    ];
    for (what, ctx, on_primary) in cases {
        let mut conn = r.read_with(&ctx).await.expect("read");
        assert_eq!(conn.on_primary(), on_primary, "{what}");
        let me = whoami::<H::B>(conn.pooled()).await.expect("whoami");
        assert_eq!(
            me.port == c.node(0).port(),
            on_primary,
            "{what}: served by {me:?}"
        );
        assert_eq!(
            setting::<H::B>(conn.pooled(), "default_transaction_read_only").await,
            "on",
            "{what}: read sessions are read-only at the server"
        );
        let done = H::B::execute(
            conn.pooled(),
            &format!("INSERT INTO {t} (id, note) VALUES (1, 'misrouted')"),
        )
        .await;
        match &done {
            Err(e) => assert_eq!(e.kind, ErrorKind::ReadOnly, "{what}: {e:?}"),
            Ok(n) => panic!("{what}: the write went through ({n} rows)"),
        }
        match conn.check_backend(done) {
            Err(Error::MisroutedWrite { node }) => assert_eq!(node, conn.node_name()),
            other => panic!("{what}: expected MisroutedWrite, got {other:?}"),
        }
        // The session is still usable for reads afterwards.
        assert_eq!(count_id(&mut conn, &t, 1).await, 0, "{what}");
    }
    let rows = kit(|| c.psql(0, &format!("SELECT count(*) FROM {t}"))).expect("psql");
    assert_eq!(rows, "0", "nothing was written");
}

/// The backend contract below the router: a writer pool refuses a node in recovery
/// (`NotWriter`, at once), reader and probe sessions are read-only at the server even on the
/// primary, probe sessions carry their statement timeout, idle sessions are reused, and sessions
/// older than `max_lifetime` are not.
pub async fn pools_enforce_access_mode_and_lifetime<H: Harness>() {
    let c = shared_cluster();
    let replica = NodeConfig::replica(c.node(1).name(), c.writer_url(1));
    let pool = H::backend()
        .build_pool(spec(replica, Access::ReadWrite))
        .expect("pool");
    let started = Instant::now();
    let err = checkout_error::<H::B>(&pool, "a writer pool on a replica").await;
    assert_eq!(err.kind, ErrorKind::NotWriter, "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "NotWriter after {:?}",
        started.elapsed()
    );
    assert!(err.to_string().contains(c.node(1).name()), "{err}");

    let primary = NodeConfig::writer(c.node(0).name(), c.writer_url(0));
    for (access, read_only) in [
        (Access::ReadWrite, "off"),
        (Access::ReadOnly, "on"),
        (Access::Probe, "on"),
    ] {
        let mut settings = spec(primary.clone(), access).settings;
        if access == Access::Probe {
            settings.statement_timeout = Some(Duration::from_millis(1500));
        }
        let pool = H::backend()
            .build_pool(PoolSpec {
                settings,
                ..spec(primary.clone(), access)
            })
            .expect("pool");
        let mut s = H::B::checkout(&pool)
            .await
            .expect("checkout on the primary");
        assert_eq!(
            setting::<H::B>(&mut s, "default_transaction_read_only").await,
            read_only,
            "{access:?}"
        );
        if access == Access::Probe {
            assert_eq!(setting::<H::B>(&mut s, "statement_timeout").await, "1500ms");
        }
    }

    let lifetime = Duration::from_millis(300);
    let pool = H::backend()
        .build_pool(PoolSpec {
            settings: PoolSettings {
                max_size: 1,
                max_lifetime: Some(lifetime),
                ..spec(primary.clone(), Access::ReadOnly).settings
            },
            ..spec(primary, Access::ReadOnly)
        })
        .expect("pool");
    let mut s = H::B::checkout(&pool).await.expect("checkout");
    let first = whoami::<H::B>(&mut s).await.expect("whoami").pid;
    drop(s);
    let mut s = H::B::checkout(&pool).await.expect("checkout");
    assert_eq!(
        whoami::<H::B>(&mut s).await.expect("whoami").pid,
        first,
        "an idle session is reused"
    );
    drop(s);
    tokio::time::sleep(lifetime + Duration::from_millis(100)).await;
    let mut s = H::B::checkout(&pool).await.expect("checkout");
    assert_ne!(
        whoami::<H::B>(&mut s).await.expect("whoami").pid,
        first,
        "a session past max_lifetime is not handed out"
    );
}

// ---------------------------------------------------------------------------------------------
// Staleness (300 ms apply delay on both replicas)
// ---------------------------------------------------------------------------------------------

/// How many write-then-read pairs each staleness test runs.
const PAIRS: u64 = 20;

struct PairOutcome {
    stale: u64,
    on_primary: u64,
    on_replica: u64,
}

/// Writes row `id` through `wctx`, then at once reads it back through `rctx(receipt)`.
async fn write_then_read<B: Backend>(
    r: &Router<B>,
    t: &str,
    wctx: &RequestContext,
    rctx: impl Fn(&routing_core::WriteReceipt) -> RequestContext,
) -> PairOutcome {
    let mut out = PairOutcome {
        stale: 0,
        on_primary: 0,
        on_replica: 0,
    };
    let started = Instant::now();
    for id in 0..PAIRS {
        let mut w = r.write_with(wctx).await.expect("write");
        insert(&mut w, t, id).await.expect("insert");
        let receipt = w.finish().await.expect("finish");
        let mut conn = r.read_with(&rctx(&receipt)).await.expect("read");
        if conn.on_primary() {
            out.on_primary += 1;
        } else {
            out.on_replica += 1;
        }
        if count_id(&mut conn, t, id).await == 0 {
            out.stale += 1;
        }
    }
    eprintln!(
        "[conformance]   {PAIRS} pairs in {:?}: {} stale, {} on replicas, {} on the primary",
        started.elapsed(),
        out.stale,
        out.on_replica,
        out.on_primary
    );
    out
}

async fn staleness_setup<H: Harness>(tag: &str, config: RouterConfig) -> (Router<H::B>, String) {
    ready_setup::<H>(delayed_cluster(), tag, config).await
}

/// A router on `c`, a fresh table every replica has, and both replicas readable in the monitor's
/// view.
async fn ready_setup<H: Harness>(
    c: &Cluster,
    tag: &str,
    config: RouterConfig,
) -> (Router<H::B>, String) {
    let r = router::<H>(c, config).await;
    let t = table(tag);
    create_table(&r, &t).await;
    kit(|| c.wait_replicated(Duration::from_secs(10))).expect("replicated");
    // The monitor must see both replicas as readable before the test means anything.
    wait_until("both replicas readable", Duration::from_secs(5), || {
        let s = r.snapshot();
        let now = Instant::now();
        s.nodes[1].is_readable_replica(now) && s.nodes[2].is_readable_replica(now)
    })
    .await;
    (r, t)
}

/// A replica the probe shows caught up (its last probe compared it with the primary's position
/// at the primary's last probe, before the writes) but that stays 300 ms behind: the first
/// guarded read waits on it and runs out of budget; after that the router remembers what the
/// wait took and sends the next reads straight to the primary instead of waiting in vain each
/// time (the planner's `CatchUp`; before it, every one of these reads waited out the budget).
pub async fn a_replica_that_keeps_lagging_is_not_waited_on_in_vain<H: Harness>() {
    let config = RouterConfig {
        // No probe while the pairs run: the snapshot keeps showing the replicas caught up.
        probe_interval: Duration::from_secs(30),
        wait_budget: Duration::from_millis(200),
        ..test_config()
    };
    let (r, t) = staleness_setup::<H>("futile_waits", config).await;
    kit(|| delayed_cluster().wait_replicated(Duration::from_secs(10))).expect("replicated");
    r.reprobe();
    wait_until(
        "both replicas shown caught up",
        Duration::from_secs(5),
        || {
            let s = r.snapshot();
            s.nodes[1..].iter().all(|n| n.lag == Some(Duration::ZERO))
        },
    )
    .await;
    let user = RequestContext::new().user("futile-waits");
    let read = user.clone().consistency(Consistency::ReadYourWrites);
    let before = r.stats();
    let started = Instant::now();
    let out = write_then_read(&r, &t, &user, |_| read.clone()).await;
    let elapsed = started.elapsed();
    let after = r.stats();
    let (waits, timeouts) = (
        after.lsn_waits - before.lsn_waits,
        after.lsn_wait_timeouts - before.lsn_wait_timeouts,
    );
    eprintln!("[conformance]   {waits} LSN waits, {timeouts} ran out, in {elapsed:?}");
    assert_eq!(out.stale, 0, "never stale");
    assert!(
        waits >= 1,
        "the snapshot invited a wait: the test shows nothing otherwise"
    );
    // One wait per replica, then one more per replica each time the estimate is forgotten.
    let allowed = 2 * (elapsed.as_secs() + 1);
    assert!(
        timeouts <= allowed,
        "{timeouts} of {PAIRS} reads waited out the budget in {elapsed:?} (at most {allowed})"
    );
    assert!(
        out.on_primary >= PAIRS - allowed,
        "the rest went to the primary at once"
    );
}

/// The control: with replicas 300 ms behind, an `Eventual` read right after a write misses it.
/// (If this fails, the other staleness tests prove nothing.)
pub async fn eventual_reads_observe_replication_lag<H: Harness>() {
    let (r, t) = staleness_setup::<H>("eventual", test_config()).await;
    eprintln!("[conformance] Eventual with {APPLY_DELAY:?} apply delay:");
    let out = write_then_read(&r, &t, &RequestContext::new(), |_| eventual()).await;
    assert_eq!(out.on_primary, 0, "Eventual reads stay on replicas");
    assert!(
        out.stale >= PAIRS / 2,
        "stale reads must be observable: {} of {PAIRS}",
        out.stale
    );
}

/// `RecentWriterTtl`: after a write the user reads on the primary until the TTL passes.
pub async fn recent_writer_ttl_never_reads_stale<H: Harness>() {
    let ttl = Duration::from_secs(1);
    let (r, t) = staleness_setup::<H>("ttl", test_config()).await;
    let user = RequestContext::new().user("ttl-user");
    let read = user
        .clone()
        .consistency(Consistency::RecentWriterTtl { ttl });
    eprintln!("[conformance] RecentWriterTtl {{ ttl: {ttl:?} }}:");
    let out = write_then_read(&r, &t, &user, |_| read.clone()).await;
    assert_eq!(out.stale, 0, "RecentWriterTtl never reads stale");
    assert_eq!(
        out.on_primary, PAIRS,
        "pinned to the primary within the TTL"
    );
    tokio::time::sleep(ttl + Duration::from_millis(100)).await;
    let conn = r.read_with(&read).await.expect("read");
    assert!(
        !conn.on_primary(),
        "after the TTL the user reads on replicas again"
    );
}

/// `ReadYourWrites` with the user's mark: a replica that has replayed the user's commit (waiting
/// for it within the budget), else the primary; never stale.
pub async fn read_your_writes_never_reads_stale<H: Harness>() {
    let user = RequestContext::new().user("ryw-user");
    let read = user.clone().consistency(Consistency::ReadYourWrites);
    // Budget shorter than the lag: the primary serves.
    let (r, t) = staleness_setup::<H>("ryw_short", test_config()).await;
    eprintln!("[conformance] ReadYourWrites, wait budget 50 ms:");
    let out = write_then_read(&r, &t, &user, |_| read.clone()).await;
    assert_eq!(
        out.stale, 0,
        "ReadYourWrites never reads stale (short budget)"
    );
    // Budget longer than the lag: replicas serve after waiting for replay.
    let config = RouterConfig {
        wait_budget: Duration::from_secs(2),
        ..test_config()
    };
    let (r, t) = staleness_setup::<H>("ryw_long", config).await;
    eprintln!("[conformance] ReadYourWrites, wait budget 2 s:");
    let out = write_then_read(&r, &t, &user, |_| read.clone()).await;
    assert_eq!(
        out.stale, 0,
        "ReadYourWrites never reads stale (long budget)"
    );
    assert!(
        out.on_replica > 0,
        "with a budget above the lag, replicas serve after waiting (all {PAIRS} went to the primary)"
    );
    assert!(r.stats().lsn_waits > 0, "reads waited for replay");
    // Once replicas have replayed the mark, the user reads on replicas without waiting.
    tokio::time::sleep(APPLY_DELAY * 2).await;
    let conn = r.read_with(&read).await.expect("read");
    assert!(!conn.on_primary(), "caught-up replicas serve marked users");
}

/// `Causal` with the signed token from `WriteConn::finish` (verified with `Router::verify_token`,
/// as a web layer would): never stale, and no user mark involved.
pub async fn causal_tokens_never_read_stale<H: Harness>() {
    let config = RouterConfig {
        wait_budget: Duration::from_secs(2),
        ..test_config()
    };
    let (r, t) = staleness_setup::<H>("causal", config).await;
    let verifier = r.clone();
    let ctx_for = move |receipt: &routing_core::WriteReceipt| {
        let text = receipt.token.as_deref().expect("signed token");
        let token = verifier.verify_token(text).expect("own token verifies");
        assert_eq!(token, receipt.causal);
        RequestContext::new()
            .consistency(Consistency::Causal)
            .token(token)
    };
    eprintln!("[conformance] Causal tokens, wait budget 2 s:");
    let out = write_then_read(&r, &t, &RequestContext::new(), &ctx_for).await;
    assert_eq!(out.stale, 0, "Causal never reads stale");
    assert!(
        out.on_replica > 0,
        "replicas serve once they replayed the token's LSN"
    );
    // Without a token the same read is eventual (the control for "the token did it").
    let mut w = r.write().await.expect("write");
    insert(&mut w, &t, 9_999).await.expect("insert");
    let receipt = w.finish().await.expect("finish");
    let mut plain = r
        .read_with(&RequestContext::new().consistency(Consistency::Causal))
        .await
        .expect("read");
    assert_eq!(
        count_id(&mut plain, &t, 9_999).await,
        0,
        "no token: stale read"
    );
    drop(plain);
    let mut with = r.read_with(&ctx_for(&receipt)).await.expect("read");
    assert_eq!(count_id(&mut with, &t, 9_999).await, 1, "token: fresh read");
}

// ---------------------------------------------------------------------------------------------
// Health: lag, death, failover
// ---------------------------------------------------------------------------------------------

/// An own cluster, a router whose replicas are excluded past `bound` of time lag (readmitted
/// below half of it), and a fresh table replicated everywhere.
async fn lag_setup<H: Harness>(tag: &str, bound: Duration) -> (Cluster, Router<H::B>, String) {
    let c = own_cluster();
    let config = RouterConfig {
        lag: LagBounds {
            max_bytes: None,
            max_time: Some(bound),
            readmit_ratio: 0.5,
        },
        ..test_config()
    };
    let r = router::<H>(&c, config).await;
    let t = table(tag);
    create_table(&r, &t).await;
    kit(|| c.wait_replicated(Duration::from_secs(10))).expect("replicated");
    (c, r, t)
}

/// A replica whose replay is paused is excluded once its lag passes the bound, and re-admitted
/// after replay resumes.
pub async fn lagging_replica_is_excluded_and_readmitted<H: Harness>() {
    let bound = Duration::from_millis(400);
    let (c, r, t) = lag_setup::<H>("lag", bound).await;
    let churn = churn(&r, t.clone());

    let victim = 1;
    let victim_port = c.node(victim).port();
    kit(|| c.pause_replay(victim)).expect("pause replay");
    let paused_at = Instant::now();
    let excluded = wait_until(
        "the paused replica to be excluded",
        Duration::from_secs(10),
        || r.snapshot().nodes[victim].lag_excluded,
    )
    .await;
    eprintln!(
        "[conformance] paused replica excluded {excluded:?} after pause (bound {bound:?}, lag seen {:?})",
        r.snapshot().nodes[victim].lag
    );
    // (The kit returns a little after replay stopped, hence the slack.)
    assert!(
        excluded + Duration::from_millis(150) >= bound,
        "excluded after {excluded:?}, before its lag could reach the bound {bound:?}"
    );
    let mut on_victim = 0;
    for _ in 0..40 {
        let mut conn = r.read_with(&eventual()).await.expect("read");
        if whoami::<H::B>(conn.pooled()).await.expect("whoami").port == victim_port {
            on_victim += 1;
        }
    }
    assert_eq!(on_victim, 0, "no read on the excluded replica");

    assert!(
        r.snapshot().nodes[victim].lag_excluded,
        "still excluded while paused"
    );
    let resumed_at = Instant::now();
    kit(|| c.resume_replay(victim)).expect("resume replay");
    wait_until(
        "the replica to be re-admitted",
        Duration::from_secs(10),
        || r.snapshot().nodes[victim].is_readable_replica(Instant::now()),
    )
    .await;
    eprintln!(
        "[conformance] replica re-admitted {:?} after the resume call (paused for {:?})",
        resumed_at.elapsed(),
        resumed_at - paused_at
    );
    let mut back = 0;
    for _ in 0..60 {
        let mut conn = r.read_with(&eventual()).await.expect("read");
        if whoami::<H::B>(conn.pooled()).await.expect("whoami").port == victim_port {
            back += 1;
        }
    }
    assert!(back > 0, "the re-admitted replica serves reads again");
    let writes = churn.finish().await;
    eprintln!("[conformance] {writes} background writes, all succeeded");
    drop(r);
    drop_cluster(c);
}

/// A killed replica stops receiving reads within about one monitor interval (the monitor alone
/// notices); reads keep succeeding when one lands on a replica that just died (at most one failed
/// checkout or query, retried on another replica); once restarted it serves again (its dead
/// sessions are checked and dropped at checkout: the monitor saw the node fail).
pub async fn killed_replica_stops_receiving_reads<H: Harness>() {
    let c = own_cluster();
    let config = test_config();
    let interval = config.probe_interval;
    let victim = 2;
    let victim_port = c.node(victim).port();
    // Prefer the victim whenever it is eligible, so reads deterministically try it.
    let prefer_victim = move |cands: &[routing_core::Candidate<'_>]| {
        cands.iter().position(|x| x.node == victim).unwrap_or(0)
    };
    let r = Router::builder(H::backend())
        .nodes(c.node_configs())
        .config(config)
        .picker(prefer_victim)
        .build()
        .await
        .expect("build router");
    let read_port = |r: Router<H::B>| async move {
        let mut conn = r
            .read_with(&eventual())
            .await
            .expect("reads keep succeeding");
        whoami::<H::B>(conn.pooled()).await.expect("whoami").port
    };
    for _ in 0..5 {
        assert_eq!(
            read_port(r.clone()).await,
            victim_port,
            "warm-up on the victim"
        );
    }

    // 1. The monitor alone takes the dead replica out of rotation.
    kit(|| c.kill(victim)).expect("kill replica");
    let detected = wait_until(
        "the monitor to notice the kill",
        Duration::from_secs(5),
        || !r.snapshot().nodes[victim].is_readable_replica(Instant::now()),
    )
    .await;
    eprintln!(
        "[conformance] monitor took a killed replica out of rotation after {detected:?} (probe interval {interval:?})"
    );
    assert!(
        detected <= interval * 3,
        "detection took {detected:?}, more than ~one monitor interval ({interval:?})"
    );
    let failures_before = r.stats().checkout_failures;
    for _ in 0..50 {
        assert_eq!(
            index_of(&c, read_port(r.clone()).await),
            1,
            "only the live replica serves"
        );
    }
    assert_eq!(
        r.stats().checkout_failures,
        failures_before,
        "the dead replica is not even tried any more"
    );

    // 2. Restarted, it comes back.
    kit(|| c.restart(victim)).expect("restart replica");
    let back = wait_until(
        "the restarted replica to be readable",
        Duration::from_secs(10),
        || r.snapshot().nodes[victim].is_readable_replica(Instant::now()),
    )
    .await;
    eprintln!("[conformance] restarted replica back in rotation after {back:?}");
    assert_eq!(
        read_port(r.clone()).await,
        victim_port,
        "the restarted replica serves again"
    );

    // 3. Killed again, under a router whose monitor is too slow to notice in time: reads right
    //    away still succeed, at the cost of exactly one failure on the dead node. A session used
    //    moments ago is handed out without a round trip (see `CHECK_IDLE_AFTER`): the failure
    //    is a failed checkout where the driver already saw the socket close, else the read's
    //    first query, which `read_retrying` runs once more elsewhere.
    let slow = Router::builder(H::backend())
        .nodes(c.node_configs())
        .config(RouterConfig {
            probe_interval: Duration::from_secs(30),
            ..test_config()
        })
        .picker(prefer_victim)
        .build()
        .await
        .expect("build router");
    assert_eq!(
        read_port(slow.clone()).await,
        victim_port,
        "warm-up on the victim"
    );
    kit(|| c.kill(victim)).expect("kill replica again");
    let killed_at = Instant::now();
    for _ in 0..20 {
        let server = slow
            .read_retrying_backend(&eventual(), |p| Box::pin(whoami::<H::B>(p)))
            .await
            .expect("reads keep succeeding");
        assert_eq!(
            index_of(&c, server.port),
            1,
            "reads move to the live replica"
        );
    }
    let stats = slow.stats();
    eprintln!(
        "[conformance] 20 reads right after a kill (monitor asleep) all succeeded in {:?} ({} failure on the dead node, {} retried read)",
        killed_at.elapsed(),
        stats.request_failures,
        stats.read_retries
    );
    // `request_failures` counts every failure seen on the request path: a failed checkout, or
    // the failed query of a session handed out before anyone noticed the kill.
    assert_eq!(
        stats.request_failures, 1,
        "the dead replica is tried once, then banned"
    );
    assert!(stats.read_retries <= 1, "at most that one read is retried");
    drop(slow);
    drop(r);
    drop_cluster(c);
}

/// Primary killed, a replica promoted, the other replica follows it: writes succeed again through
/// the same router, and no session (write or read) is ever handed out on the old primary, even
/// when it comes back up writable on the old timeline. Pre-ping is off, so only the generation
/// check keeps old sessions out.
pub async fn failover_resumes_writes_and_never_uses_the_old_primary<H: Harness>() {
    let c = own_cluster();
    let config = RouterConfig {
        write_deadline: Duration::from_secs(10),
        pool: PoolSettings {
            pre_ping: false,
            ..test_config().pool
        },
        ..test_config()
    };
    let r = router::<H>(&c, config).await;
    let t = table("failover");
    create_table(&r, &t).await;
    for id in 0..5 {
        let mut w = r.write().await.expect("write");
        insert(&mut w, &t, id).await.expect("insert");
    }
    // Sessions on every pool, made under the first generation.
    for ctx in [eventual(), RequestContext::new().force_primary(true)] {
        let mut conn = r.read_with(&ctx).await.expect("read");
        whoami::<H::B>(conn.pooled()).await.expect("whoami");
    }
    let generation = r.snapshot().generation;
    let (old, new, other) = (0, 1, 2);
    let old_port = c.node(old).port();
    let new_port = c.node(new).port();

    kit(|| c.kill(old)).expect("kill primary");
    let killed_at = Instant::now();
    kit(|| c.promote(new)).expect("promote");
    let promoted_at = Instant::now();
    eprintln!(
        "[conformance] promotion took {:?} after the kill",
        promoted_at - killed_at
    );
    let mut failed_attempts = 0;
    let mut id = 100;
    let first_write = loop {
        id += 1;
        let attempt = async {
            let mut w = r.write().await?;
            let me = whoami::<H::B>(w.pooled())
                .await
                .map_err(|source| Error::Backend {
                    node: w.node_name().to_string(),
                    source,
                })?;
            insert(&mut w, &t, id).await?;
            Ok::<_, Error>(me)
        }
        .await;
        match attempt {
            Ok(me) => {
                assert_eq!(
                    me.port, new_port,
                    "the first write after failover is on the new primary"
                );
                break promoted_at.elapsed();
            }
            Err(e) => {
                failed_attempts += 1;
                assert!(
                    promoted_at.elapsed() < Duration::from_secs(15),
                    "writes did not resume: {e}"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    eprintln!(
        "[conformance] first successful write {first_write:?} after promotion ({:?} after the kill, {failed_attempts} failed attempts)",
        killed_at.elapsed()
    );
    assert!(
        first_write < Duration::from_secs(3),
        "writes resumed only {first_write:?} after promotion"
    );
    assert!(
        r.snapshot().generation > generation,
        "the role change bumped the generation"
    );

    kit(|| c.follow(other, new)).expect("follow");
    // The old primary comes back writable on the old timeline: two primaries.
    kit(|| c.restart(old)).expect("restart the old primary");
    let fenced = wait_until(
        "the old primary to be seen and fenced",
        Duration::from_secs(10),
        || {
            let s = r.snapshot();
            s.nodes[old].reachable && s.nodes[old].role == NodeRole::Fenced
        },
    )
    .await;
    eprintln!("[conformance] old primary back up and fenced after {fenced:?}");
    wait_until(
        "the follower to be readable",
        Duration::from_secs(10),
        || r.snapshot().nodes[other].is_readable_replica(Instant::now()),
    )
    .await;

    for round in 0..20 {
        let mut w = r.write().await.expect("write after failover");
        let me = whoami::<H::B>(w.pooled()).await.expect("whoami");
        assert_eq!(me.port, new_port, "write {round} on the new primary");
        id += 1;
        insert(&mut w, &t, id).await.expect("insert after failover");
        drop(w);
        let mut p = r
            .read_with(&RequestContext::new().consistency(Consistency::Primary))
            .await
            .expect("primary read");
        assert_eq!(
            whoami::<H::B>(p.pooled()).await.expect("whoami").port,
            new_port
        );
        drop(p);
        let mut e = r.read_with(&eventual()).await.expect("eventual read");
        let port = whoami::<H::B>(e.pooled()).await.expect("whoami").port;
        assert_ne!(port, old_port, "no read on the old primary");
    }
    let on_old = kit(|| c.psql(old, &format!("SELECT count(*) FROM {t} WHERE id > 100")))
        .expect("psql old primary");
    assert_eq!(
        on_old, "0",
        "nothing written to the old primary after the failover"
    );
    drop(r);
    drop_cluster(c);
}

/// A transaction on a read session stays on its node, even when that node is paused and
/// excluded from routing mid-transaction.
pub async fn transactions_never_change_node<H: Harness>() {
    let c = own_cluster();
    let config = RouterConfig {
        lag: LagBounds {
            max_bytes: None,
            max_time: Some(Duration::from_millis(300)),
            readmit_ratio: 0.5,
        },
        ..test_config()
    };
    let r = router::<H>(&c, config).await;
    let t = table("txn");
    create_table(&r, &t).await;
    kit(|| c.wait_replicated(Duration::from_secs(10))).expect("replicated");

    let mut conn = r.read_with(&eventual()).await.expect("read");
    let begun = H::B::execute(conn.pooled(), "BEGIN ISOLATION LEVEL REPEATABLE READ").await;
    conn.check_backend(begun).expect("BEGIN");
    let first = whoami::<H::B>(conn.pooled()).await.expect("whoami");
    let node = index_of(&c, first.port);
    assert_ne!(node, 0, "an eventual read session is on a replica");

    let churn = churn(&r, t.clone());
    kit(|| c.pause_replay(node)).expect("pause replay");
    wait_until(
        "the session's replica to be excluded",
        Duration::from_secs(10),
        || r.snapshot().nodes[node].lag_excluded,
    )
    .await;
    // New reads now go elsewhere...
    let mut other = r.read_with(&eventual()).await.expect("read");
    let elsewhere = whoami::<H::B>(other.pooled()).await.expect("whoami");
    assert_ne!(
        elsewhere.port, first.port,
        "new sessions avoid the excluded replica"
    );
    drop(other);
    // ...but the open transaction stays where it began.
    for _ in 0..5 {
        let now = whoami::<H::B>(conn.pooled())
            .await
            .expect("whoami in transaction");
        assert_eq!(now, first, "the transaction never changes node");
        assert_eq!(count_id(&mut conn, &t, 1).await, 0);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let committed = H::B::execute(conn.pooled(), "COMMIT").await;
    conn.check_backend(committed).expect("COMMIT");
    drop(conn);
    kit(|| c.resume_replay(node)).expect("resume replay");
    churn.finish().await;
    drop(r);
    drop_cluster(c);
}

// ---------------------------------------------------------------------------------------------
// Bad input
// ---------------------------------------------------------------------------------------------

/// A password no test cluster accepts, looked for in every error text.
const WRONG_PASSWORD: &str = "Wr0ng-Pa55word-do-not-print";

/// A router statement (a probe, a commit position, a reset) cut short leaves an answer on the
/// way: that session is closed when it returns, never handed to the next holder, while one whose
/// statement finished goes back as it is (`routing_core::pool::PooledSession::run`).
pub async fn a_cancelled_router_statement_never_reaches_the_next_holder<H: Harness>() {
    let c = shared_cluster();
    let primary = NodeConfig::writer(c.node(0).name(), c.writer_url(0));
    let pool = H::backend()
        .build_pool(spec(primary, Access::Probe))
        .expect("pool");
    let pid_sql = "SELECT pg_catalog.pg_backend_pid()::pg_catalog.text AS v";
    let pid = |answer: Result<Option<String>, BackendError>| -> String {
        answer.expect("pid query").expect("a pid")
    };

    let mut s = H::B::checkout(&pool).await.expect("checkout");
    let first = pid(H::B::query_text(&mut s, pid_sql).await);
    drop(s);
    let mut s = H::B::checkout(&pool).await.expect("checkout");
    assert_eq!(
        pid(H::B::query_text(&mut s, pid_sql).await),
        first,
        "a session whose statement finished is reused"
    );

    let slow = H::B::query_text(
        &mut s,
        "SELECT pg_catalog.pg_sleep(0.5)::pg_catalog.text AS v",
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(50), slow)
            .await
            .is_err(),
        "the sleep was cut short"
    );
    drop(s);
    let mut s = H::B::checkout(&pool).await.expect("checkout");
    let t = Instant::now();
    let next = pid(H::B::query_text(&mut s, pid_sql).await);
    assert_ne!(
        next, first,
        "the session with a cancelled statement was handed out again"
    );
    assert!(
        t.elapsed() < Duration::from_millis(300),
        "the next holder waited {:?} for the cancelled statement's answer",
        t.elapsed()
    );
}

fn spec(node: NodeConfig, access: Access) -> PoolSpec {
    PoolSpec {
        node,
        access,
        settings: PoolSettings {
            max_size: 2,
            connect_timeout: Duration::from_secs(2),
            ..PoolSettings::default()
        },
        epoch: Epoch::default(),
    }
}

async fn checkout_error<B: Backend>(pool: &B::Pool, what: &str) -> BackendError {
    match B::checkout(pool).await {
        Ok(_) => panic!("a checkout with {what} succeeded"),
        Err(e) => e,
    }
}

fn check_error_text(what: &str, node: &str, display: &str, debug: &str) {
    eprintln!("[conformance] {what} error: {display}");
    assert!(
        display.contains(node),
        "{what}: the error names node {node}: {display}"
    );
    assert_no_password(what, display, WRONG_PASSWORD);
    assert_no_password(what, debug, WRONG_PASSWORD);
}

/// A connection string that does not parse: `Router::build` fails with a `Config` error naming
/// the node, without the password.
pub async fn bad_url_is_a_typed_config_error<H: Harness>() {
    let url = format!("postgres://app:{WRONG_PASSWORD}@127.0.0.1:notaport/postgres");
    let node = NodeConfig::writer("bad-url-node", url.as_str());
    for access in [Access::ReadWrite, Access::ReadOnly, Access::Probe] {
        let err = match H::backend().build_pool(spec(node.clone(), access)) {
            Err(e) => e,
            Ok(pool) => match H::B::checkout(&pool).await {
                Err(e) => e,
                Ok(_) => panic!("a bad URL connected"),
            },
        };
        assert_eq!(err.kind, ErrorKind::Config, "{access:?}: {err:?}");
        check_error_text(
            "backend",
            "bad-url-node",
            &err.to_string(),
            &format!("{err:?}"),
        );
    }
    let built = Router::builder(H::backend())
        .node(node)
        .config(test_config())
        .build()
        .await;
    match built {
        Err(Error::Backend { node, source }) => {
            assert_eq!(node, "bad-url-node");
            assert_eq!(source.kind, ErrorKind::Config);
            let err = Error::Backend { node, source };
            check_error_text(
                "router",
                "bad-url-node",
                &err.to_string(),
                &format!("{err:?}"),
            );
        }
        other => panic!("expected Error::Backend with a Config error, got {other:?}"),
    }
}

/// A wrong password: checkouts fail at once with an `Auth` error naming the node, and so do the
/// router's writes and reads (rather than waiting out the write deadline). The right password
/// works (the control).
pub async fn wrong_password_is_a_typed_auth_error<H: Harness>() {
    let c = shared_cluster();
    let good = NodeConfig::writer("auth-good", c.writer_url(0));
    let pool = H::backend()
        .build_pool(spec(good, Access::ReadOnly))
        .expect("pool");
    let mut s = H::B::checkout(&pool)
        .await
        .expect("the right password connects");
    assert_eq!(
        whoami::<H::B>(&mut s).await.expect("whoami").port,
        c.node(0).port()
    );

    let bad = NodeConfig::writer("auth-bad-node", c.app_url(0, WRONG_PASSWORD));
    for access in [Access::ReadWrite, Access::ReadOnly, Access::Probe] {
        let pool = H::backend()
            .build_pool(spec(bad.clone(), access))
            .expect("pools are built without connecting");
        let started = Instant::now();
        let err = checkout_error::<H::B>(&pool, "a wrong password").await;
        assert_eq!(err.kind, ErrorKind::Auth, "{access:?}: {err:?}");
        if let Some(code) = &err.sqlstate {
            assert_eq!(code, "28P01");
        }
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{access:?}: the auth error came after {:?}, not at once",
            started.elapsed()
        );
        check_error_text(
            "backend",
            "auth-bad-node",
            &err.to_string(),
            &format!("{err:?}"),
        );
    }

    let r = Router::builder(H::backend())
        .node(bad)
        .node(NodeConfig::replica(
            "auth-bad-replica",
            c.app_url(1, WRONG_PASSWORD),
        ))
        .config(test_config())
        .build()
        .await
        .expect("a router builds without connecting");
    let started = Instant::now();
    let err = r.write().await.expect_err("write with a wrong password");
    let waited = started.elapsed();
    match &err {
        Error::Backend { node, source } => {
            assert_eq!(node, "auth-bad-node");
            assert_eq!(source.kind, ErrorKind::Auth);
        }
        other => panic!("expected Error::Backend with an Auth error, got {other:?}"),
    }
    assert!(
        waited < Duration::from_secs(1),
        "write failed after {waited:?}"
    );
    check_error_text(
        "router write",
        "auth-bad-node",
        &err.to_string(),
        &format!("{err:?}"),
    );
    let err = r
        .read_with(&eventual())
        .await
        .expect_err("read with a wrong password");
    assert!(
        matches!(&err, Error::Backend { source, .. } if source.kind == ErrorKind::Auth),
        "{err:?}"
    );
    check_error_text(
        "router read",
        "auth-bad-node",
        &err.to_string(),
        &format!("{err:?}"),
    );
    let debug = format!("{r:?} {:?}", r.snapshot());
    assert_no_password("router and snapshot Debug", &debug, WRONG_PASSWORD);
}

/// An unreachable host (a closed port): backend checkouts fail with a `Connection` (or, where
/// the driver retries refused connects, `Timeout`) error naming the node; routing-core's own
/// checkout, the same for every backend, learns of the refusal at once (the monitor's first
/// probe reports `Connection` well within the probe timeout); writes fail with `NoPrimary` after
/// the deadline (safe to retry) and reads with `NoReader` naming the node; no password anywhere.
pub async fn unreachable_host_is_a_typed_connection_error<H: Harness>() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let url = format!("postgres://app:{WRONG_PASSWORD}@127.0.0.1:{port}/postgres");
    let node = NodeConfig::writer("unreachable-node", url.as_str());
    for access in [Access::ReadWrite, Access::ReadOnly, Access::Probe] {
        let pool = H::backend()
            .build_pool(spec(node.clone(), access))
            .expect("pools are built without connecting");
        let err = checkout_error::<H::B>(&pool, "a closed port").await;
        assert!(
            matches!(err.kind, ErrorKind::Connection | ErrorKind::Timeout),
            "{access:?}: {err:?}"
        );
        check_error_text(
            "backend",
            "unreachable-node",
            &err.to_string(),
            &format!("{err:?}"),
        );
    }
    let deadline = Duration::from_millis(500);
    let built = Instant::now();
    let r = Router::builder(H::backend())
        .node(node)
        .config(RouterConfig {
            write_deadline: deadline,
            ..test_config()
        })
        .build()
        .await
        .expect("a router builds without connecting");
    let snap = r.snapshot();
    assert_eq!(snap.nodes[0].last_error_kind, Some(ErrorKind::Connection));
    assert!(
        built.elapsed() < Duration::from_millis(800),
        "the first probe saw the refusal at once, not after the probe timeout: {:?}",
        built.elapsed()
    );
    let started = Instant::now();
    let err = r.write().await.expect_err("no primary");
    assert!(matches!(err, Error::NoPrimary { .. }), "{err:?}");
    assert!(err.is_safe_to_retry());
    assert!(
        started.elapsed() >= deadline,
        "waited for a primary up to the deadline"
    );
    assert_no_password("write error", &format!("{err} {err:?}"), WRONG_PASSWORD);
    let err = r.read_with(&eventual()).await.expect_err("no reader");
    assert!(matches!(err, Error::NoReader { .. }), "{err:?}");
    check_error_text(
        "router read",
        "unreachable-node",
        &err.to_string(),
        &format!("{err:?}"),
    );
    let snap = r.snapshot();
    assert_eq!(snap.nodes[0].last_error_kind, Some(ErrorKind::Connection));
    assert_no_password("snapshot", &format!("{snap:?}"), WRONG_PASSWORD);
}
