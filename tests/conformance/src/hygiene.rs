//! Session hygiene: what one request leaves on a pooled session never reaches the next, read-only
//! holds on every read session, and commits report what the server really did.
//!
//! The pools here hold one session per node and access, so the next request gets the very
//! session the misbehaving one used; each test checks (by backend pid) that it did, so a pass
//! cannot come from a fresh connection by chance.

use std::sync::Arc;
use std::time::Duration;

use routing_core::{
    Backend, BackendError, BoxFuture, Consistency, Error, InMemoryMarks, Lsn, Mark, MarksError,
    RequestContext, Router, RouterConfig, UserKey, WriterMarks,
};
use routing_testkit::{Cluster, READER_ROLE, WRITER_ROLE};

/// A NOLOGIN role the writer role is granted, created by the session-state test.
const TENANT_ROLE: &str = "conf_tenant";

use super::{
    Harness, Server, codec, count_id, create_table, eventual, insert, kit, shared_cluster, table,
    test_config, wait_until, whoami,
};

/// One session per pool, so a misbehaving request's session is the next request's.
fn one_session_config() -> RouterConfig {
    let mut config = test_config();
    config.pool.max_size = 1;
    config
}

/// A router over the primary and replica 1 only (a read on a replica has one place to go).
async fn router_1r<H: Harness>(c: &Cluster, config: RouterConfig) -> Router<H::B> {
    router_1r_with::<H>(c, config, Arc::new(InMemoryMarks::default())).await
}

/// [`router_1r`] with the marks store given.
async fn router_1r_with<H: Harness>(
    c: &Cluster,
    config: RouterConfig,
    marks: Arc<dyn WriterMarks>,
) -> Router<H::B> {
    let nodes = c.node_configs().into_iter().take(2);
    Router::builder(H::backend())
        .nodes(nodes)
        .config(config)
        .marks(marks)
        .tokens(codec())
        .build()
        .await
        .expect("build router")
}

async fn batch<B: Backend>(pooled: &mut B::Pooled, sql: &str) -> Result<(), BackendError> {
    B::execute_batch(pooled, sql).await
}

async fn text<B: Backend>(pooled: &mut B::Pooled, sql: &str) -> String {
    B::query_text(pooled, sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .unwrap_or_default()
}

/// Rows of `table` with this id, counted by the superuser on the primary (committed only).
fn committed_rows(c: &Cluster, table: &str, id: u64) -> u64 {
    kit(|| c.psql(0, &format!("SELECT count(*) FROM {table} WHERE id = {id}")))
        .expect("psql")
        .parse()
        .expect("a count")
}

/// What the server says the backend with this pid is doing (`idle`, `idle in transaction`...),
/// asked from another session.
fn backend_state(c: &Cluster, pid: u32) -> String {
    kit(|| {
        c.psql(
            0,
            &format!("SELECT state FROM pg_stat_activity WHERE pid = {pid}"),
        )
    })
    .expect("psql")
}

/// Ways a request leaves a transaction open on its session.
#[derive(Debug, Clone, Copy)]
enum Leak {
    /// `BEGIN`, a statement, then the guard is dropped (an early return on error).
    Open,
    /// `BEGIN`, a statement that fails: the transaction is aborted, and still open.
    Aborted,
    /// `BEGIN`, a savepoint, a statement: nested, still open.
    Savepoint,
    /// `BEGIN`, a statement, then the request's future is cancelled mid-statement.
    Cancelled,
}

const LEAKS: [Leak; 4] = [Leak::Open, Leak::Aborted, Leak::Savepoint, Leak::Cancelled];

/// Leaves the transaction open on `pooled` (already begun) in the way `leak` names; `nested`
/// runs inside the savepoint.
async fn leave_open<B: Backend>(pooled: &mut B::Pooled, leak: Leak, nested: &str) {
    match leak {
        Leak::Open => {}
        Leak::Aborted => {
            let failed = batch::<B>(pooled, "SELECT 1/0").await;
            assert!(failed.is_err(), "{leak:?}: division by zero fails");
        }
        Leak::Savepoint => {
            batch::<B>(pooled, "SAVEPOINT s1").await.expect("savepoint");
            batch::<B>(pooled, nested)
                .await
                .expect("inside the savepoint");
        }
        Leak::Cancelled => {
            let slow = B::execute(pooled, "SELECT pg_catalog.pg_sleep(0.3)");
            let cut = tokio::time::timeout(Duration::from_millis(50), slow).await;
            assert!(cut.is_err(), "{leak:?}: the statement was cut off");
        }
    }
}

/// A guard dropped inside a transaction, in each way one can be left open, never hands that
/// transaction to the next request: on the write side the next request's write commits on its
/// own (`finish` reports it, and it is on the server) and the leaked row never commits.
pub async fn open_transactions_never_reach_the_next_writer<H: Harness>() {
    let c = shared_cluster();
    let r = router_1r::<H>(c, one_session_config()).await;
    let t = table("leak_w");
    create_table(&r, &t).await;
    for (n, leak) in LEAKS.into_iter().enumerate() {
        let (leaked, next) = (100 + n as u64, 200 + n as u64);
        let mut w = r.write().await.expect("write");
        let leaker = whoami::<H::B>(w.pooled()).await.expect("whoami");
        batch::<H::B>(w.pooled(), "BEGIN").await.expect("begin");
        insert(&mut w, &t, leaked).await.expect("insert");
        let nested = format!("INSERT INTO {t} (id, note) VALUES ({}, 'x')", leaked + 1000);
        leave_open::<H::B>(w.pooled(), leak, &nested).await;
        drop(w);

        let mut w = r.write().await.expect("write");
        let me = whoami::<H::B>(w.pooled()).await.expect("whoami");
        if !matches!(leak, Leak::Cancelled) {
            assert_eq!(
                me, leaker,
                "{leak:?}: the same session is reused after a reset"
            );
        }
        assert_eq!(
            backend_state(c, me.pid),
            "idle",
            "{leak:?}: the next writer starts outside any transaction"
        );
        insert(&mut w, &t, next).await.expect("insert");
        w.finish().await.expect("finish");
        assert_eq!(
            committed_rows(c, &t, next),
            1,
            "{leak:?}: the next write committed"
        );
        assert_eq!(
            committed_rows(c, &t, leaked),
            0,
            "{leak:?}: the leaked row never commits"
        );
    }
}

/// The read side of the same: a REPEATABLE READ snapshot (or any transaction) left open on a
/// replica session never hides a user's newer write from the next reader of that session.
pub async fn open_transactions_never_reach_the_next_reader<H: Harness>() {
    let c = shared_cluster();
    let r = router_1r::<H>(c, one_session_config()).await;
    let t = table("leak_r");
    create_table(&r, &t).await;
    kit(|| c.wait_replicated(Duration::from_secs(10))).expect("replicated");
    let user = RequestContext::new().user("leak-reader");
    let ryw = user.clone().consistency(Consistency::ReadYourWrites);
    for (n, leak) in LEAKS.into_iter().enumerate() {
        let id = 300 + n as u64;
        let mut conn = r.read_with(&ryw).await.expect("read");
        assert!(!conn.on_primary(), "{leak:?}: served by the replica");
        let leaker = whoami::<H::B>(conn.pooled()).await.expect("whoami");
        batch::<H::B>(conn.pooled(), "BEGIN ISOLATION LEVEL REPEATABLE READ")
            .await
            .expect("begin");
        assert_eq!(count_id(&mut conn, &t, id).await, 0, "{leak:?}");
        leave_open::<H::B>(conn.pooled(), leak, "SELECT 1").await;
        drop(conn);

        let mut w = r.write_with(&user).await.expect("write");
        insert(&mut w, &t, id).await.expect("insert");
        let receipt = w.finish().await.expect("finish");
        // Wait until the replica has replayed the write: then it must show it.
        kit(|| c.wait_replicated(Duration::from_secs(10))).expect("replicated");
        wait_until(
            "the snapshot to show the replica past the mark",
            Duration::from_secs(5),
            || r.snapshot().nodes[1].lsn >= Some(receipt.lsn),
        )
        .await;
        let mut conn = r.read_with(&ryw).await.expect("read");
        assert!(!conn.on_primary(), "{leak:?}: a caught-up replica serves");
        let me = whoami::<H::B>(conn.pooled()).await.expect("whoami");
        if !matches!(leak, Leak::Cancelled) {
            assert_eq!(
                me, leaker,
                "{leak:?}: the same session is reused after a reset"
            );
        }
        assert_eq!(
            count_id(&mut conn, &t, id).await,
            1,
            "{leak:?}: the user sees their own write"
        );
    }
}

/// Ways a request changes its session's state: what it runs, the query that shows it, and the
/// value a fresh session shows (empty: ask a fresh session). A writer is made read-only, a
/// reader read-write: each is the harmful direction for that side.
fn settings_misuse(
    login: &str,
    other_role: &str,
    writer: bool,
) -> Vec<(&'static str, String, String, String)> {
    let show = |name: &str| format!("SELECT pg_catalog.current_setting('{name}') AS v");
    let (flip, characteristics) = if writer {
        ("on", "READ ONLY")
    } else {
        ("off", "READ WRITE")
    };
    vec![
        (
            "default_transaction_read_only",
            format!("SET default_transaction_read_only = {flip}"),
            show("default_transaction_read_only"),
            String::new(),
        ),
        (
            "session characteristics",
            format!("SET SESSION CHARACTERISTICS AS TRANSACTION {characteristics}"),
            show("default_transaction_read_only"),
            String::new(),
        ),
        (
            "search_path",
            "SET search_path = attacker, public".into(),
            show("search_path"),
            String::new(),
        ),
        (
            "role",
            format!("SET ROLE {other_role}"),
            "SELECT current_user::pg_catalog.text AS v".into(),
            login.to_string(),
        ),
        (
            "statement_timeout",
            "SET statement_timeout = 12345".into(),
            show("statement_timeout"),
            String::new(),
        ),
        (
            "tenant setting",
            "SET app.tenant = 'tenant-a'".into(),
            "SELECT COALESCE(pg_catalog.current_setting('app.tenant', true), '') AS v".into(),
            String::new(),
        ),
        (
            "advisory lock",
            "SELECT pg_catalog.pg_advisory_lock(4242)".into(),
            "SELECT pg_catalog.count(*)::pg_catalog.text AS v FROM pg_catalog.pg_locks \
             WHERE locktype = 'advisory' AND pid OPERATOR(pg_catalog.=) pg_catalog.pg_backend_pid()"
                .into(),
            "0".into(),
        ),
    ]
}

/// Every class of session state a request can change (read-only default, transaction
/// characteristics, search_path, role, timeouts, custom settings, advisory locks) is back to its
/// connect-time value for the next request, on reader sessions on a replica, reader sessions on
/// the primary and writer sessions; and a read session on the primary after such a request still
/// refuses writes.
pub async fn session_state_never_reaches_the_next_request<H: Harness>() {
    let c = shared_cluster();
    let r = router_1r::<H>(c, one_session_config()).await;
    let t = table("settings");
    create_table(&r, &t).await;
    // A role the (least-privilege) writer may switch to, as an application does per tenant;
    // readers switch to `pg_read_all_data`, a role they are members of.
    kit(|| {
        c.psql(
            0,
            &format!(
                "DO $$BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{TENANT_ROLE}') \
                 THEN CREATE ROLE {TENANT_ROLE} NOLOGIN; END IF; END$$; \
                 GRANT {TENANT_ROLE} TO {WRITER_ROLE}"
            ),
        )
    })
    .expect("a tenant role");
    kit(|| c.wait_replicated(Duration::from_secs(10))).expect("replicated");
    let replica = RequestContext::new().consistency(Consistency::Eventual);
    let primary = RequestContext::new().force_primary(true);
    for side in ["replica reader", "primary reader", "writer"] {
        let (login, other_role) = if side == "writer" {
            (WRITER_ROLE, TENANT_ROLE)
        } else {
            (READER_ROLE, "pg_read_all_data")
        };
        for (what, misuse, probe, fresh) in settings_misuse(login, other_role, side == "writer") {
            // What a fresh session shows, when it depends on the server's defaults.
            let expected = if fresh.is_empty() {
                match side {
                    "writer" => {
                        let mut w = r.write().await.expect("write");
                        text::<H::B>(w.pooled(), &probe).await
                    }
                    _ => {
                        let ctx = if side == "replica reader" {
                            &replica
                        } else {
                            &primary
                        };
                        let mut conn = r.read_with(ctx).await.expect("read");
                        text::<H::B>(conn.pooled(), &probe).await
                    }
                }
            } else {
                fresh.clone()
            };
            let (before, after) = if side == "writer" {
                let mut w = r.write().await.expect("write");
                let before = whoami::<H::B>(w.pooled()).await.expect("whoami");
                batch::<H::B>(w.pooled(), &misuse).await.expect("misuse");
                assert_ne!(
                    text::<H::B>(w.pooled(), &probe).await,
                    expected,
                    "{side}/{what}"
                );
                drop(w);
                let mut w = r.write().await.expect("write");
                let me = whoami::<H::B>(w.pooled()).await.expect("whoami");
                (before, (me, text::<H::B>(w.pooled(), &probe).await))
            } else {
                let ctx = if side == "replica reader" {
                    &replica
                } else {
                    &primary
                };
                let mut conn = r.read_with(ctx).await.expect("read");
                let before = whoami::<H::B>(conn.pooled()).await.expect("whoami");
                batch::<H::B>(conn.pooled(), &misuse).await.expect("misuse");
                assert_ne!(
                    text::<H::B>(conn.pooled(), &probe).await,
                    expected,
                    "{side}/{what}"
                );
                drop(conn);
                let mut conn = r.read_with(ctx).await.expect("read");
                let me = whoami::<H::B>(conn.pooled()).await.expect("whoami");
                let shown = text::<H::B>(conn.pooled(), &probe).await;
                if side == "primary reader" {
                    let write = H::B::execute(
                        conn.pooled(),
                        &format!("INSERT INTO {t} (id, note) VALUES (1, 'after {what}')"),
                    )
                    .await;
                    assert!(
                        matches!(conn.check_backend(write), Err(Error::MisroutedWrite { .. })),
                        "{side}/{what}: the next read session still refuses writes"
                    );
                }
                (before, (me, shown))
            };
            assert_eq!(after.0, before, "{side}/{what}: the same session is reused");
            assert_eq!(
                after.1, expected,
                "{side}/{what}: reset for the next request"
            );
        }
    }
    assert_eq!(
        committed_rows(c, &t, 1),
        0,
        "nothing was written through a read session"
    );
}

/// Every way to turn read-only off inside a read session fails with `MisroutedWrite`, on a
/// replica and on the primary (where only the reader role's missing privileges stop it), and
/// nothing is written.
pub async fn read_sessions_refuse_every_write<H: Harness>() {
    let c = shared_cluster();
    let r = router_1r::<H>(c, one_session_config()).await;
    let t = table("rw_bypass");
    create_table(&r, &t).await;
    kit(|| c.wait_replicated(Duration::from_secs(10))).expect("replicated");
    let bypasses = [
        format!("BEGIN READ WRITE; INSERT INTO {t} (id, note) VALUES (1, 'x'); COMMIT"),
        format!(
            "BEGIN; SET transaction_read_only = off; INSERT INTO {t} (id, note) VALUES (2, 'x'); COMMIT"
        ),
        format!(
            "SET default_transaction_read_only = off; INSERT INTO {t} (id, note) VALUES (3, 'x')"
        ),
        format!(
            "SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE; \
             INSERT INTO {t} (id, note) VALUES (4, 'x')"
        ),
        format!("START TRANSACTION READ WRITE; DELETE FROM {t}; COMMIT"),
    ];
    let sides = [
        (
            "replica",
            RequestContext::new().consistency(Consistency::Eventual),
        ),
        ("primary", RequestContext::new().force_primary(true)),
    ];
    for (side, ctx) in &sides {
        for sql in &bypasses {
            let mut conn = r.read_with(ctx).await.expect("read");
            assert_eq!(conn.on_primary(), *side == "primary");
            let done = batch::<H::B>(conn.pooled(), sql).await;
            match conn.check_backend(done) {
                Err(Error::MisroutedWrite { node }) => assert_eq!(node, conn.node_name()),
                other => panic!("{side}: {sql}: expected MisroutedWrite, got {other:?}"),
            }
        }
    }
    let rows = kit(|| c.psql(0, &format!("SELECT count(*) FROM {t}"))).expect("psql");
    assert_eq!(rows, "0", "nothing was written");
}

/// A COMMIT that PostgreSQL turns into a ROLLBACK (an error earlier in the transaction that the
/// application handled) is `Error::NotCommitted`, not a receipt; `finish` with a transaction
/// still open is too; and neither sets a mark.
pub async fn commit_reports_what_the_server_did<H: Harness>() {
    let c = shared_cluster();
    let marks = Arc::new(InMemoryMarks::default());
    let r = router_1r_with::<H>(c, one_session_config(), marks.clone()).await;
    let t = table("commit_truth");
    create_table(&r, &t).await;
    let user = RequestContext::new().user("commit-truth");
    let key = UserKey::from("commit-truth");

    // commit() of an aborted transaction.
    let mut w = r.write_with(&user).await.expect("write");
    batch::<H::B>(w.pooled(), "BEGIN").await.expect("begin");
    insert(&mut w, &t, 1).await.expect("insert");
    assert!(insert(&mut w, &t, 1).await.is_err(), "duplicate key fails");
    match w.commit().await {
        Err(Error::NotCommitted { .. }) => {}
        other => panic!("commit of an aborted transaction: {other:?}"),
    }
    assert_eq!(committed_rows(c, &t, 1), 0);

    // finish() with a transaction that wrote still open.
    let mut w = r.write_with(&user).await.expect("write");
    batch::<H::B>(w.pooled(), "BEGIN").await.expect("begin");
    insert(&mut w, &t, 2).await.expect("insert");
    match w.finish().await {
        Err(Error::NotCommitted { .. }) => {}
        other => panic!("finish inside an open transaction: {other:?}"),
    }
    assert_eq!(
        committed_rows(c, &t, 2),
        0,
        "the open transaction was rolled back"
    );

    // finish() after an aborted transaction.
    let mut w = r.write_with(&user).await.expect("write");
    batch::<H::B>(w.pooled(), "BEGIN").await.expect("begin");
    assert!(batch::<H::B>(w.pooled(), "SELECT 1/0").await.is_err());
    assert!(
        matches!(w.finish().await, Err(Error::NotCommitted { .. })),
        "finish in an aborted transaction"
    );
    assert_eq!(
        marks.get_now(&key, std::time::Instant::now()),
        None,
        "no mark was set"
    );

    // A real commit sets the mark.
    let mut w = r.write_with(&user).await.expect("write");
    batch::<H::B>(w.pooled(), "BEGIN").await.expect("begin");
    insert(&mut w, &t, 3).await.expect("insert");
    let receipt = w.commit().await.expect("commit");
    assert_eq!(receipt.mark_recorded, Some(true));
    assert_eq!(committed_rows(c, &t, 3), 1);
    let mark = marks
        .get_now(&key, std::time::Instant::now())
        .expect("a mark");
    assert_eq!(mark.lsn, receipt.lsn);
}

/// The closure API: `Ok` commits (and only then sets the mark and signs a token), `Err` rolls
/// back, a dropped future rolls back, and an `Ok` after a handled error inside the transaction
/// is `NotCommitted`.
pub async fn transaction_closure_commits_only_on_success<H: Harness>() {
    let c = shared_cluster();
    let marks = Arc::new(InMemoryMarks::default());
    let r = router_1r_with::<H>(c, one_session_config(), marks.clone()).await;
    let t = table("closure");
    create_table(&r, &t).await;
    let user = RequestContext::new().user("closure-user");
    let key = UserKey::from("closure-user");
    let now = std::time::Instant::now;
    let insert_sql = |id: u64| format!("INSERT INTO {t} (id, note) VALUES ({id}, 'x')");

    // Ok: committed, receipt, mark.
    let sql = insert_sql(1);
    let w = r.write_with(&user).await.expect("write");
    let (rows, receipt) = w
        .transaction_backend(
            |s: &mut <H::B as Backend>::Pooled| -> BoxFuture<'_, Result<u64, Error>> {
                Box::pin(async move { H::B::execute(s, &sql).await.map_err(backend) })
            },
        )
        .await
        .expect("transaction");
    assert_eq!(rows, 1);
    assert!(receipt.token.is_some());
    assert_eq!(committed_rows(c, &t, 1), 1);
    assert_eq!(marks.get_now(&key, now()).map(|m| m.lsn), Some(receipt.lsn));

    // Err: rolled back, no receipt.
    let sql = insert_sql(2);
    let w = r.write_with(&user).await.expect("write");
    let failed = w
        .transaction_backend(
            |s: &mut <H::B as Backend>::Pooled| -> BoxFuture<'_, Result<u64, Error>> {
                Box::pin(async move {
                    H::B::execute(s, &sql).await.map_err(backend)?;
                    Err(Error::Config("the handler gave up".into()))
                })
            },
        )
        .await;
    assert!(matches!(failed, Err(Error::Config(_))), "{failed:?}");
    assert_eq!(committed_rows(c, &t, 2), 0, "Err rolls back");

    // A handled error inside, then Ok: the server rolled back, so NotCommitted.
    let sql = insert_sql(3);
    let w = r.write_with(&user).await.expect("write");
    let handled = w
        .transaction_backend(
            |s: &mut <H::B as Backend>::Pooled| -> BoxFuture<'_, Result<u64, Error>> {
                Box::pin(async move {
                    H::B::execute(s, &sql).await.map_err(backend)?;
                    let _ignored = H::B::execute(s, "SELECT 1/0").await;
                    Ok(1)
                })
            },
        )
        .await;
    assert!(
        matches!(handled, Err(Error::NotCommitted { .. })),
        "{handled:?}"
    );
    assert_eq!(committed_rows(c, &t, 3), 0);

    // Dropped mid-way: rolled back, and the next transaction is clean.
    let sql = insert_sql(4);
    let w = r.write_with(&user).await.expect("write");
    let cut = tokio::time::timeout(
        Duration::from_millis(100),
        w.transaction_backend(
            |s: &mut <H::B as Backend>::Pooled| -> BoxFuture<'_, Result<u64, Error>> {
                Box::pin(async move {
                    H::B::execute(s, &sql).await.map_err(backend)?;
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    Ok(1)
                })
            },
        ),
    )
    .await;
    assert!(cut.is_err(), "the transaction was cancelled");
    let sql = insert_sql(5);
    let w = r.write_with(&user).await.expect("write");
    w.transaction_backend(
        |s: &mut <H::B as Backend>::Pooled| -> BoxFuture<'_, Result<u64, Error>> {
            Box::pin(async move { H::B::execute(s, &sql).await.map_err(backend) })
        },
    )
    .await
    .expect("the next transaction");
    assert_eq!(
        committed_rows(c, &t, 4),
        0,
        "a cancelled transaction never commits"
    );
    assert_eq!(committed_rows(c, &t, 5), 1);
}

fn backend(source: BackendError) -> Error {
    Error::Backend {
        node: "primary".into(),
        source,
    }
}

/// The commit LSN covers the commit record even with `synchronous_commit = off`, where the WAL
/// write position lags it: a replica that replayed up to the receipt's LSN shows the row. The
/// control takes `pg_current_wal_lsn()` right after the commit, which a replica passes before it
/// has the row.
pub async fn commit_lsn_covers_asynchronous_commits<H: Harness>() {
    let c = shared_cluster();
    let r = router_1r::<H>(c, test_config()).await;
    let t = table("async_commit");
    create_table(&r, &t).await;
    const ROUNDS: u64 = 20;
    let (mut stale, mut control_stale) = (0, 0);
    for id in 0..ROUNDS {
        let mut w = r.write().await.expect("write");
        batch::<H::B>(w.pooled(), "SET synchronous_commit = off")
            .await
            .expect("set");
        insert(&mut w, &t, id).await.expect("insert");
        let naive: Lsn = text::<H::B>(
            w.pooled(),
            "SELECT pg_catalog.pg_current_wal_lsn()::pg_catalog.text AS v",
        )
        .await
        .parse()
        .expect("lsn");
        let receipt = w.finish().await.expect("finish");
        let mut conn = r
            .read_with(&RequestContext::new().consistency(Consistency::Eventual))
            .await
            .expect("read");
        for (lsn, misses) in [(naive, &mut control_stale), (receipt.lsn, &mut stale)] {
            loop {
                let replayed = text::<H::B>(conn.pooled(), routing_core::sql::REPLAY_LSN).await;
                if replayed.parse::<Lsn>().ok() >= Some(lsn) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            if count_id(&mut conn, &t, id).await == 0 {
                *misses += 1;
            }
        }
    }
    eprintln!(
        "[conformance] synchronous_commit = off: {stale} of {ROUNDS} rows missing at the receipt's \
         LSN; control (pg_current_wal_lsn after COMMIT): {control_stale} missing"
    );
    assert_eq!(stale, 0, "the receipt's LSN covers the commit");
    assert!(
        control_stale > 0,
        "the write position precedes an asynchronous commit record"
    );
}

/// A marks store whose updates take a while, so a caller can give up during one.
#[derive(Debug)]
struct SlowMarks(InMemoryMarks, Duration);

#[routing_core::async_trait]
impl WriterMarks for SlowMarks {
    async fn get(&self, user: &UserKey) -> Result<Option<Mark>, MarksError> {
        self.0.get(user).await
    }

    async fn set_max(&self, user: &UserKey, lsn: Lsn, ttl: Duration) -> Result<(), MarksError> {
        tokio::time::sleep(self.1).await;
        self.0.set_max(user, lsn, ttl).await
    }
}

/// A `commit()` or `finish()` whose future is dropped after the COMMIT (here: while the marks
/// store is updating) still records the user's mark, at or past the commit's LSN.
pub async fn a_cancelled_commit_still_records_the_mark<H: Harness>() {
    let c = shared_cluster();
    let marks = Arc::new(SlowMarks(
        InMemoryMarks::default(),
        Duration::from_millis(200),
    ));
    let mut config = test_config();
    config.marks_timeout = Duration::from_secs(2);
    let r = router_1r_with::<H>(c, config, marks.clone()).await;
    let t = table("cancel_commit");
    create_table(&r, &t).await;
    for (id, via_commit) in [(1, true), (2, false)] {
        let name = format!("cancelled-{id}");
        let user = RequestContext::new().user(name.as_str());
        let mut w = r.write_with(&user).await.expect("write");
        if via_commit {
            batch::<H::B>(w.pooled(), "BEGIN").await.expect("begin");
        }
        insert(&mut w, &t, id).await.expect("insert");
        let ending: BoxFuture<'_, _> = if via_commit {
            Box::pin(w.commit())
        } else {
            Box::pin(w.finish())
        };
        let cut = tokio::time::timeout(Duration::from_millis(100), ending).await;
        assert!(cut.is_err(), "cancelled while the mark was being written");
        assert_eq!(committed_rows(c, &t, id), 1, "the COMMIT happened");
        let committed: Lsn = kit(|| c.psql(0, "SELECT pg_current_wal_insert_lsn()"))
            .expect("psql")
            .parse()
            .expect("lsn");
        let key = UserKey::from(name.as_str());
        let waited = Duration::from_secs(3);
        let started = std::time::Instant::now();
        let mark = loop {
            if let Some(m) = marks.0.get_now(&key, std::time::Instant::now()) {
                break m;
            }
            assert!(
                started.elapsed() < waited,
                "commit={via_commit}: the mark of a cancelled commit was never recorded"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        // The row's commit is at or before the insert position read after it.
        assert!(
            mark.lsn > Lsn::ZERO && mark.lsn <= committed,
            "{mark:?} vs {committed}"
        );
        let mut conn = r
            .read_with(&user.clone().consistency(Consistency::ReadYourWrites))
            .await
            .expect("read");
        assert_eq!(
            count_id(&mut conn, &t, id).await,
            1,
            "the user sees the write"
        );
    }
}

/// A checkout runs no check query on a session used moments ago (it came back through a reset
/// that succeeded, itself a round trip on it, or untouched); only a session idle for
/// [`routing_core::CHECK_IDLE_AFTER`] is checked. The fault the check on every checkout used to
/// catch, a pooled session whose server process is gone, is still caught: after an idle spell by
/// the checkout (the read gets a working session at once); right after use by the checkout when
/// the driver already saw the socket close, else by the request's own query, which
/// `read_retrying_backend` runs once more on a fresh session. The dead session is never reused.
pub async fn dead_sessions_are_caught_without_a_ping_per_checkout<H: Harness>() {
    let c = shared_cluster();
    let r = router_1r::<H>(c, one_session_config()).await;
    // Another router's session terminates the victim: a role may signal its own sessions.
    let killer = router_1r::<H>(c, test_config()).await;
    let terminate = |victim: Server, on_primary: bool| {
        let killer = killer.clone();
        async move {
            let ctx = eventual().force_primary(on_primary);
            for _ in 0..50 {
                let mut conn = killer.read_with(&ctx).await.expect("killer read");
                let me = whoami::<H::B>(conn.pooled()).await.expect("killer whoami");
                if me.port != victim.port {
                    drop(conn);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                let sql = format!(
                    "SELECT pg_catalog.pg_terminate_backend({})::pg_catalog.text AS v",
                    victim.pid
                );
                assert_eq!(
                    text::<H::B>(conn.pooled(), &sql).await,
                    "true",
                    "terminated"
                );
                return;
            }
            panic!("no killer session on the victim's node");
        }
    };

    // Idle past the threshold: the checkout's check finds the session dead and connects anew.
    let (first, on_primary) = {
        let mut conn = r.read().await.expect("read");
        let me = whoami::<H::B>(conn.pooled()).await.expect("whoami");
        (me, conn.on_primary())
    };
    terminate(first, on_primary).await;
    tokio::time::sleep(routing_core::CHECK_IDLE_AFTER + Duration::from_millis(200)).await;
    let retries = r.stats().read_retries;
    let (second, on_primary) = {
        let mut conn = r.read().await.expect("read after an idle spell");
        let me = whoami::<H::B>(conn.pooled())
            .await
            .expect("the checkout never hands out the dead idle session");
        (me, conn.on_primary())
    };
    assert_ne!(second.pid, first.pid, "a fresh session");

    // Used moments ago: caught at checkout or by the first query, then one retry.
    terminate(second, on_primary).await;
    let third = r
        .read_retrying_backend(&eventual(), |p| Box::pin(whoami::<H::B>(p)))
        .await
        .expect("the read succeeds on a fresh session");
    assert_ne!(third.pid, second.pid, "the dead session is not reused");
    let retried = r.stats().read_retries - retries;
    assert!(retried <= 1, "at most the one retry ({retried})");
    let again = {
        let mut conn = r.read().await.expect("read");
        whoami::<H::B>(conn.pooled()).await.expect("whoami")
    };
    assert_ne!(again.pid, second.pid, "the dead session never comes back");
}
