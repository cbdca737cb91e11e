//! What only the diesel backend does: multi-host writer URLs and typed `pg_lsn` helpers.

use std::time::Duration;

use routing_diesel::diesel_async::RunQueryDsl;
use routing_diesel::{
    Consistency, NodeConfig, RequestContext, Router, RouterConfig, commit_lsn, diesel, replay_lsn,
};
use routing_testkit::{Cluster, WRITER_PASSWORD, WRITER_ROLE};

fn cluster() -> &'static Cluster {
    tokio::task::block_in_place(routing_testkit::shared)
}

fn config() -> RouterConfig {
    RouterConfig {
        default_consistency: Consistency::Eventual,
        probe_interval: Duration::from_millis(100),
        ..RouterConfig::default()
    }
}

#[derive(diesel::QueryableByName)]
struct Port {
    #[diesel(sql_type = diesel::sql_types::Integer)]
    port: i32,
}

async fn port_of(conn: &mut routing_diesel::AsyncPgConnection) -> u16 {
    let row: Port = diesel::sql_query("SELECT pg_catalog.inet_server_port() AS port")
        .get_result(conn)
        .await
        .expect("port");
    u16::try_from(row.port).expect("port")
}

/// A writer endpoint listing a replica first and the primary second, with
/// `target_session_attrs=read-write`: tokio-postgres skips the replica at connect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_host_writer_urls_reach_the_writable_host() {
    let c = cluster();
    let (p0, p1) = (c.node(0).port(), c.node(1).port());
    let endpoint = format!(
        "postgres://{WRITER_ROLE}:{WRITER_PASSWORD}@127.0.0.1:{p1},127.0.0.1:{p0}/postgres?target_session_attrs=read-write"
    );
    let r: Router = routing_diesel::builder()
        .node(NodeConfig::writer("writer-endpoint", endpoint))
        .node(NodeConfig::replica("r1", c.writer_url(1)))
        .node(NodeConfig::replica("r2", c.writer_url(2)))
        .config(config())
        .build()
        .await
        .expect("router");
    assert_eq!(
        r.snapshot().writer,
        Some(0),
        "the endpoint probes as the primary"
    );
    for _ in 0..5 {
        let mut w = r.write().await.expect("write");
        assert_eq!(w.node_name(), "writer-endpoint");
        assert_eq!(port_of(&mut w).await, p0, "the writable host of the list");
    }
    let mut p = r
        .read_with(&RequestContext::new().force_primary(true))
        .await
        .expect("primary read");
    assert_eq!(port_of(&mut p).await, p0);
}

/// `current_wal_lsn` / `replay_lsn` read diesel's binary `PgLsn` and agree with the router's text
/// path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_lsn_helpers_agree_with_the_commit_lsn() {
    let c = cluster();
    let r: Router = routing_diesel::builder()
        .nodes([
            NodeConfig::writer("p", c.writer_url(0)),
            NodeConfig::replica("r1", c.writer_url(1)),
        ])
        .config(config())
        .build()
        .await
        .expect("router");
    let mut w = r.write().await.expect("write");
    let before = commit_lsn(&mut w)
        .await
        .expect("typed lsn")
        .expect("no open transaction");
    let receipt = w.finish().await.expect("finish");
    assert!(receipt.lsn >= before, "{} >= {before}", receipt.lsn);
    let mut w = r.write().await.expect("write");
    let after = commit_lsn(&mut w)
        .await
        .expect("typed lsn")
        .expect("no open transaction");
    assert!(after >= receipt.lsn);
    assert_eq!(
        replay_lsn(&mut w).await.expect("replay lsn"),
        None,
        "a primary replays nothing"
    );
    drop(w);
    let mut read = r
        .read_with(&RequestContext::new().consistency(Consistency::Eventual))
        .await
        .expect("read");
    assert!(!read.on_primary());
    assert!(replay_lsn(&mut read).await.expect("replay lsn").is_some());
}

/// The path applications take: diesel's own query API on the guard, mapped with `check`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diesel_query_errors_map_to_typed_router_errors() {
    let c = cluster();
    let r: Router = routing_diesel::builder()
        .nodes([
            NodeConfig::writer("p", c.writer_url(0)),
            NodeConfig::replica("r1", c.writer_url(1)),
            NodeConfig::replica("r2", c.writer_url(2)),
        ])
        .config(config())
        .build()
        .await
        .expect("router");
    let table = format!("diesel_check_{}", std::process::id());
    let mut w = r.write().await.expect("write");
    let made = diesel::sql_query(format!("CREATE TABLE {table} (id int PRIMARY KEY)"))
        .execute(&mut *w)
        .await;
    w.check(made).expect("create");
    let first = diesel::sql_query(format!("INSERT INTO {table} VALUES (1)"))
        .execute(&mut *w)
        .await;
    assert_eq!(w.check(first).expect("insert"), 1);
    let again = diesel::sql_query(format!("INSERT INTO {table} VALUES (1)"))
        .execute(&mut *w)
        .await;
    match w.check(again) {
        Err(routing_diesel::Error::Backend { node, source }) => {
            assert_eq!(node, "p");
            assert_eq!(source.kind, routing_diesel::ErrorKind::Query);
            assert_eq!(source.sqlstate.as_deref(), Some("23505"));
        }
        other => panic!("expected a typed unique violation, got {other:?}"),
    }
    drop(w);
    for ctx in [
        RequestContext::new().consistency(Consistency::Eventual),
        RequestContext::new().force_primary(true),
    ] {
        let mut conn = r.read_with(&ctx).await.expect("read");
        let done = diesel::sql_query(format!("INSERT INTO {table} VALUES (2)"))
            .execute(&mut *conn)
            .await;
        match conn.check(done) {
            Err(routing_diesel::Error::MisroutedWrite { node }) => {
                assert_eq!(node, conn.node_name())
            }
            other => panic!("expected MisroutedWrite, got {other:?}"),
        }
    }
    let rows = tokio::task::block_in_place(|| c.psql(0, &format!("SELECT count(*) FROM {table}")))
        .expect("psql");
    assert_eq!(rows, "1");
}

/// `?` without `check`: the router's errors and diesel's both become `DbError`, a write through
/// a read session is still recognised, and diesel's error (its constraint) is still reachable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_errors_fit_the_question_mark_and_keep_the_driver_error() {
    use routing_diesel::{DbError, ErrorClass, RoutedError};
    let c = cluster();
    let r: Router = routing_diesel::builder()
        .nodes(c.node_configs())
        .config(config())
        .build()
        .await
        .expect("router");
    let table = format!("diesel_qm_{}", std::process::id());
    async fn write(r: &Router, sql: String) -> Result<usize, DbError> {
        let mut w = r.write().await?;
        let n = diesel::sql_query(sql).execute(&mut *w).await?;
        w.finish().await?;
        Ok(n)
    }
    async fn read_write(r: &Router, ctx: RequestContext, sql: String) -> Result<usize, DbError> {
        let mut conn = r.read_with(&ctx).await?;
        Ok(diesel::sql_query(sql).execute(&mut *conn).await?)
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
    assert!(matches!(
        dup.as_diesel(),
        Some(diesel::result::Error::DatabaseError(
            diesel::result::DatabaseErrorKind::UniqueViolation,
            _
        ))
    ));
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
