//! The sqlx pools against a real cluster from the test kit: read-only sessions, misrouted writes,
//! writer checks, typed configuration and auth errors, and generation checks across a promotion.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use routing_sqlx::sqlx::{self, Row};
use routing_sqlx::{
    Access, Backend, BackendError, Consistency, Epoch, Error, ErrorKind, NodeConfig, PoolSettings,
    PoolSpec, RequestContext, Router, RouterConfig, SqlxBackend,
};
use routing_testkit::{APP_PASSWORD, Cluster, ClusterBuilder};

fn fast_config() -> RouterConfig {
    RouterConfig {
        probe_interval: Duration::from_millis(50),
        probe_timeout: Duration::from_millis(500),
        write_deadline: Duration::from_secs(3),
        ..RouterConfig::default()
    }
}

async fn router(c: &Cluster) -> Router {
    Router::builder(SqlxBackend::new())
        .nodes(c.node_configs())
        .config(fast_config())
        .build()
        .await
        .expect("router builds")
}

async fn text(conn: &mut sqlx::PgConnection, sql: &'static str) -> String {
    sqlx::query_scalar::<_, String>(sql)
        .fetch_one(conn)
        .await
        .expect(sql)
}

/// `(pg_backend_pid(), inet_server_port())` of a session.
async fn whoami(conn: &mut sqlx::PgConnection) -> (i32, i32) {
    let row = sqlx::query("SELECT pg_backend_pid(), inet_server_port()")
        .fetch_one(conn)
        .await
        .expect("whoami");
    (row.get(0), row.get(1))
}

/// `inet_server_port()` of a session, as a driver result.
async fn server_port(conn: &mut sqlx::PgConnection) -> Result<i32, sqlx::Error> {
    let row = sqlx::query("SELECT inet_server_port()")
        .fetch_one(conn)
        .await?;
    Ok(row.get(0))
}

fn port(c: &Cluster, i: usize) -> i32 {
    i32::from(c.node(i).port())
}

fn spec(url: String, access: Access) -> PoolSpec {
    PoolSpec {
        node: NodeConfig::writer("target", url),
        access,
        settings: PoolSettings {
            connect_timeout: Duration::from_secs(2),
            ..PoolSettings::default()
        },
        epoch: Epoch::default(),
    }
}

/// Checks out of a fresh pool to `url`, which must fail within `limit` (not after the pool's
/// 2 s timeout).
async fn failed_checkout(url: String, access: Access, limit: Duration) -> BackendError {
    let pool = SqlxBackend::new().build_pool(spec(url, access)).unwrap();
    let t = Instant::now();
    let err = SqlxBackend::checkout(&pool).await.unwrap_err();
    assert!(
        t.elapsed() < limit,
        "{access:?} took {:?}: {err}",
        t.elapsed()
    );
    err
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reader_sessions_are_read_only_at_the_server() {
    let c = routing_testkit::shared();
    let r = router(c).await;

    let mut replica = r
        .read_with(&RequestContext::new().consistency(Consistency::Eventual))
        .await
        .unwrap();
    assert!(!replica.on_primary(), "{replica:?}");
    assert_eq!(
        text(&mut replica, "SHOW default_transaction_read_only").await,
        "on"
    );

    let mut primary = r
        .read_with(&RequestContext::new().force_primary(true))
        .await
        .unwrap();
    assert!(primary.on_primary());
    assert_eq!(
        text(&mut primary, "SHOW default_transaction_read_only").await,
        "on"
    );
    assert_eq!(text(&mut primary, "SHOW transaction_read_only").await, "on");

    let mut w = r.write().await.unwrap();
    assert_eq!(
        text(&mut w, "SHOW default_transaction_read_only").await,
        "off"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_through_a_read_guard_is_a_misrouted_write() {
    let c = routing_testkit::shared();
    let r = router(c).await;
    for ctx in [
        RequestContext::new().consistency(Consistency::Eventual),
        // On the primary the session is read-only too: the server refuses, not the router.
        RequestContext::new().force_primary(true),
    ] {
        let mut g = r.read_with(&ctx).await.unwrap();
        let node = g.node_name().to_string();
        let res = sqlx::query("CREATE TABLE sqlx_misrouted (x int)")
            .execute(&mut *g)
            .await;
        match g.check(res) {
            Err(Error::MisroutedWrite { node: n }) => assert_eq!(n, node),
            other => panic!("expected MisroutedWrite on {node}, got {other:?}"),
        }
    }
    // Nothing was created.
    assert_eq!(
        c.psql(
            0,
            "SELECT count(*) FROM pg_class WHERE relname = 'sqlx_misrouted'"
        )
        .unwrap(),
        "0"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_writer_pool_refuses_a_node_in_recovery() {
    let c = routing_testkit::shared();
    let replica = (0..c.nodes().len()).find(|&i| i != c.primary()).unwrap();

    // The pool itself: the connect-time check fails fast with NotWriter.
    // (The pool's timeout is 2 s.)
    let err = failed_checkout(
        c.writer_url(replica),
        Access::ReadWrite,
        Duration::from_secs(1),
    )
    .await;
    assert_eq!(err.kind, ErrorKind::NotWriter, "{err}");
    // The same node serves read-only sessions.
    let readers = SqlxBackend::new()
        .build_pool(spec(c.writer_url(replica), Access::ReadOnly))
        .unwrap();
    let mut s = SqlxBackend::checkout(&readers).await.unwrap();
    let v = SqlxBackend::query_text(&mut s, routing_sqlx::sql::WRITER_CHECK)
        .await
        .unwrap();
    assert_eq!(v.as_deref(), Some("true"));

    // A router whose only writer candidate is a replica never sends a write: typed error.
    let r = Router::builder(SqlxBackend::new())
        .node(NodeConfig::writer("not-a-primary", c.writer_url(replica)))
        .config(RouterConfig {
            write_deadline: Duration::from_millis(500),
            ..fast_config()
        })
        .build()
        .await
        .unwrap();
    match r.write().await {
        Err(Error::NoPrimary { .. }) => {}
        other => panic!("expected NoPrimary, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multi_host_url_is_a_typed_config_error() {
    let url =
        "postgres://app:s3cret@127.0.0.1:5432,127.0.0.1:5433/db?target_session_attrs=read-write";
    let err = Router::builder(SqlxBackend::new())
        .node(NodeConfig::writer("pg-ha", url))
        .build()
        .await
        .unwrap_err();
    match &err {
        Error::Backend { node, source } => {
            assert_eq!(node, "pg-ha");
            assert_eq!(source.kind, ErrorKind::Config);
            assert!(source.message.contains("pg-ha"), "{}", source.message);
        }
        other => panic!("expected a Config backend error, got {other:?}"),
    }
    for shown in [err.to_string(), format!("{err:?}")] {
        assert!(!shown.contains("s3cret"), "{shown}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_password_is_an_auth_error_without_the_password() {
    let c = routing_testkit::shared();
    let wrong = "Wr0ng-passw0rd-xyz";
    let url = c.app_url(c.primary(), wrong);

    let pool = SqlxBackend::new()
        .build_pool(spec(url.clone(), Access::ReadWrite))
        .unwrap();
    let err = SqlxBackend::checkout(&pool).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Auth, "{err}");
    assert_eq!(err.sqlstate.as_deref(), Some("28P01"));
    let mut shown = vec![err.to_string(), format!("{err:?}")];
    let mut source = std::error::Error::source(&err);
    while let Some(s) = source {
        shown.push(s.to_string());
        source = s.source();
    }

    // Through a router: the monitor's view and the write's error.
    let r = Router::builder(SqlxBackend::new())
        .node(NodeConfig::writer("app-db", url))
        .config(RouterConfig {
            write_deadline: Duration::from_millis(300),
            ..fast_config()
        })
        .build()
        .await
        .unwrap();
    let snap = r.snapshot();
    let probe_error = snap.nodes[0].last_error.clone().unwrap_or_default();
    assert!(
        probe_error.contains("password authentication failed"),
        "{probe_error}"
    );
    shown.push(probe_error);
    shown.push(format!("{r:?}"));
    shown.push(format!("{:?}", r.write().await.unwrap_err()));
    for s in &shown {
        assert!(!s.contains(wrong), "password leaked: {s}");
    }

    // The right password works (the role is real).
    let ok = SqlxBackend::new()
        .build_pool(spec(
            c.app_url(c.primary(), APP_PASSWORD),
            Access::ReadWrite,
        ))
        .unwrap();
    SqlxBackend::checkout(&ok).await.unwrap();
}

/// A promotion bumps the topology generation: writes move to the new primary at once, and the
/// connections pooled to the promoted node while it was a replica are never handed out again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generation_bump_discards_old_pooled_connections() {
    let c = ClusterBuilder::new().replicas(1).start().unwrap();
    let r = router(&c).await;
    let eventual = RequestContext::new().consistency(Consistency::Eventual);

    // Fill node 1's reader pool with a few connections (held at once, so they are distinct).
    let mut old_reader_pids = HashSet::new();
    {
        let mut held = Vec::new();
        for _ in 0..3 {
            let mut g = r.read_with(&eventual).await.unwrap();
            let (pid, p) = whoami(&mut g).await;
            assert_eq!(p, port(&c, 1));
            old_reader_pids.insert(pid);
            held.push(g);
        }
    }
    // They are reused while nothing changes (sqlx returns a dropped connection to its pool from
    // a spawned task: give it a moment).
    tokio::time::sleep(Duration::from_millis(100)).await;
    let generation = r.snapshot().generation;
    {
        let mut g = r.read_with(&eventual).await.unwrap();
        assert!(old_reader_pids.contains(&whoami(&mut g).await.0));
    }
    let mut w = r.write().await.unwrap();
    assert_eq!(whoami(&mut w).await.1, port(&c, 0));
    drop(w);
    assert_eq!(
        r.snapshot().generation,
        generation,
        "topology changed by itself"
    );

    // Promote node 1 while node 0 is still up and writable (two primaries): the newer timeline
    // wins and the old primary is fenced.
    let promoted = Instant::now();
    c.promote(1).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while r.snapshot().writer != Some(1) {
        assert!(
            Instant::now() < deadline,
            "no re-election: {:?}",
            r.snapshot()
        );
        r.topology_changed(Duration::from_millis(100)).await;
    }
    let elected = promoted.elapsed();
    assert!(r.snapshot().generation > generation);

    for _ in 0..10 {
        let mut w = r.write().await.unwrap();
        assert_eq!(
            whoami(&mut w).await.1,
            port(&c, 1),
            "write on the old primary"
        );
        // Node 1 has no replica now: reads go to it, read-only, on fresh connections.
        let mut g = r.read_with(&eventual).await.unwrap();
        let (pid, p) = whoami(&mut g).await;
        assert_eq!(p, port(&c, 1));
        assert!(
            !old_reader_pids.contains(&pid),
            "a connection from before the promotion was handed out again"
        );
        assert_eq!(text(&mut g, "SHOW transaction_read_only").await, "on");
    }
    eprintln!("re-elected {elected:?} after the promotion returned");
}

/// A replica that dies under warm pools: reads move on at once (the one that finds it dead is
/// retried; ban + primary fallback), and come back to the replica when it is restarted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_replica_is_left_at_once_and_readmitted() {
    let c = ClusterBuilder::new().replicas(1).start().unwrap();
    // Probes far apart: the request path alone must notice the dead replica.
    let r = Router::builder(SqlxBackend::new())
        .node(NodeConfig::writer("n0", c.writer_url(0)))
        .node(NodeConfig::replica("n1", c.writer_url(1)))
        .config(RouterConfig {
            probe_interval: Duration::from_secs(30),
            ..fast_config()
        })
        .build()
        .await
        .unwrap();
    let eventual = RequestContext::new().consistency(Consistency::Eventual);
    let mut g = r.read_with(&eventual).await.unwrap();
    assert_eq!(whoami(&mut g).await.1, port(&c, 1));
    drop(g);
    tokio::time::sleep(Duration::from_millis(50)).await;

    c.kill(1).unwrap();
    let t = Instant::now();
    // The session used moments ago is handed out without a round trip (known good, see
    // routing_core::CHECK_IDLE_AFTER): the first query finds the replica dead, which bans it,
    // and read_retrying runs the work once more, on the primary.
    let p = r
        .read_retrying(&eventual, |conn| Box::pin(server_port(conn)))
        .await
        .unwrap();
    let took = t.elapsed();
    assert_eq!(p, port(&c, 0));
    assert!(took < Duration::from_millis(500), "read took {took:?}");
    assert!(r.stats().read_retries <= 1, "{:?}", r.stats());
    // Left at once: the next plain read goes straight to the primary.
    let mut g = r.read_with(&eventual).await.unwrap();
    assert!(g.on_primary());
    assert_eq!(whoami(&mut g).await.1, port(&c, 0));
    drop(g);

    c.restart(1).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut g = r.read_with(&eventual).await.unwrap();
        if whoami(&mut g).await.1 == port(&c, 1) {
            break;
        }
        assert!(Instant::now() < deadline, "replica not readmitted");
        r.reprobe();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Application queries through sqlx's own API on the guards: the SQLSTATE reaches the caller.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_keep_their_sqlstate_through_check() {
    let c = routing_testkit::shared();
    let r = router(c).await;
    let mut w = r.write().await.unwrap();
    let created = sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS sqlx_unique (id int PRIMARY KEY);
         INSERT INTO sqlx_unique VALUES (1) ON CONFLICT DO NOTHING",
    )
    .execute(&mut *w)
    .await;
    w.check(created).unwrap();
    let dup = sqlx::query("INSERT INTO sqlx_unique VALUES ($1)")
        .bind(1_i32)
        .execute(&mut *w)
        .await;
    match w.check(dup) {
        Err(Error::Backend { source, .. }) => {
            assert_eq!(source.kind, ErrorKind::Query);
            assert_eq!(source.sqlstate.as_deref(), Some("23505"), "{source}");
        }
        other => panic!("expected a unique violation, got {other:?}"),
    }
}

/// `?` without `check`: the router's errors and sqlx's both become `DbError`, a write through a
/// read session is still recognised, and sqlx's error (its constraint) is still reachable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_errors_fit_the_question_mark_and_keep_the_driver_error() {
    use routing_sqlx::{DbError, ErrorClass, RoutedError};
    let c = tokio::task::block_in_place(routing_testkit::shared);
    let r = router(c).await;
    let table = format!("sqlx_qm_{}", std::process::id());
    async fn write(r: &Router, sql: String) -> Result<u64, DbError> {
        let mut w = r.write().await?;
        let n = sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(&mut *w)
            .await?
            .rows_affected();
        w.finish().await?;
        Ok(n)
    }
    async fn read_write(r: &Router, ctx: RequestContext, sql: String) -> Result<u64, DbError> {
        let mut conn = r.read_with(&ctx).await?;
        Ok(sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(&mut *conn)
            .await?
            .rows_affected())
    }
    write(&r, format!("CREATE TABLE {table} (id int PRIMARY KEY)"))
        .await
        .expect("create");
    write(&r, format!("INSERT INTO {table} VALUES (1)"))
        .await
        .expect("insert");
    // The read sessions below must meet the table on whichever replica serves them.
    for i in (0..c.nodes().len()).filter(|&i| i != c.primary()) {
        let visible = format!("SELECT pg_catalog.to_regclass('{table}') IS NOT NULL");
        while tokio::task::block_in_place(|| c.psql(i, &visible)).expect("psql") != "t" {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let dup = write(&r, format!("INSERT INTO {table} VALUES (1)"))
        .await
        .expect_err("duplicate");
    assert_eq!(dup.sqlstate(), Some("23505"));
    assert_eq!(dup.constraint(), Some(format!("{table}_pkey").as_str()));
    assert!(matches!(dup.as_sqlx(), Some(sqlx::Error::Database(_))));
    assert_eq!(dup.class(), ErrorClass::Other);
    for ctx in [
        RequestContext::new().consistency(Consistency::Eventual),
        RequestContext::new().force_primary(true),
    ] {
        let e = read_write(&r, ctx, format!("INSERT INTO {table} VALUES (2)"))
            .await
            .expect_err("refused");
        assert!(e.is_misrouted_write(), "{e:?}");
        assert_eq!(e.class(), ErrorClass::MisroutedWrite);
    }
}
