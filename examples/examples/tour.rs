//! The product tour: `cargo xtask demo` (or `cargo run -p routing-examples --example tour`).
//!
//! Starts a throwaway primary, two streaming replicas and Redis with the test kit, then shows the
//! router at work with the sqlx backend: the topology it discovers, reads on replicas, a misrouted
//! write caught, read-your-writes under replication lag, a causal token handed to another client,
//! and a failover.

#![allow(clippy::print_stdout)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use routing_core::{
    Consistency, Error, RequestContext, RouterConfig, Snapshot, TokenCodec, TokenKey,
};
use routing_redis::RedisMarks;
use routing_sqlx::{Router, SqlxBackend};
use routing_testkit::ClusterBuilder;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn print_topology(s: &Snapshot) {
    println!("  generation {}  timeline {:?}", s.generation, s.timeline);
    for n in &s.nodes {
        println!(
            "  {:<4} {:<8} reachable={:<5} lsn={:<12} lag={:>10} lag_bytes={}",
            n.name,
            format!("{:?}", n.role),
            n.reachable,
            n.lsn.map(|l| l.to_string()).unwrap_or_else(|| "-".into()),
            n.lag
                .map(|d| format!("{d:?}"))
                .unwrap_or_else(|| "-".into()),
            n.lag_bytes
                .map(|b| b.to_string())
                .unwrap_or_else(|| "-".into()),
        );
    }
}

async fn read_value(
    router: &Router,
    ctx: &RequestContext,
    id: i64,
) -> Result<(Option<String>, String), BoxError> {
    let mut conn = router.read_with(ctx).await?;
    let row: Option<(String,)> = sqlx::query_as("SELECT body FROM notes WHERE id = $1")
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?;
    Ok((row.map(|r| r.0), conn.node_name().to_string()))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), BoxError> {
    println!("== Starting a local primary, two streaming replicas and Redis (routing-testkit)");
    let started = Instant::now();
    let cluster = Arc::new(
        tokio::task::spawn_blocking(|| ClusterBuilder::new().replicas(2).with_redis(true).start())
            .await??,
    );
    println!(
        "  up in {:?} under {}",
        started.elapsed(),
        cluster.dir().display()
    );
    cluster.psql(
        0,
        "CREATE TABLE notes (id bigint PRIMARY KEY, body text NOT NULL)",
    )?;

    let marks = RedisMarks::new(cluster.redis_url().ok_or("no redis")?.as_str())?;
    let router: Router = Router::builder(SqlxBackend::new())
        .nodes(cluster.node_configs())
        .config(RouterConfig {
            default_consistency: Consistency::ReadYourWrites,
            ..RouterConfig::default()
        })
        .marks(Arc::new(marks))
        .tokens(TokenCodec::new(TokenKey::new(1, "demo-key-change-me-0123456789")?).cluster("tour"))
        .build()
        .await?;

    println!("\n== The monitor probed every node and elected the writer");
    print_topology(&router.snapshot());

    println!("\n== Writes go to the primary; finish() returns the commit LSN and a signed token");
    let alice = RequestContext::new().user("alice");
    let mut w = router.write_with(&alice).await?;
    sqlx::query("INSERT INTO notes VALUES (1, 'hello from alice')")
        .execute(&mut *w)
        .await?;
    let node = w.node_name().to_string();
    let receipt = w.finish().await?;
    println!(
        "  wrote on {node}; commit LSN {}; token {}",
        receipt.lsn,
        receipt.token.as_deref().unwrap_or("-")
    );

    println!("\n== Reads go to replicas (Eventual), spread by least-outstanding");
    let mut tally = std::collections::BTreeMap::<String, usize>::new();
    for _ in 0..20 {
        let (_, node) = read_value(
            &router,
            &RequestContext::new().consistency(Consistency::Eventual),
            1,
        )
        .await?;
        *tally.entry(node).or_default() += 1;
    }
    println!("  20 reads served by {tally:?}");

    println!(
        "\n== A write on a read connection fails loudly (the session is read-only at the server)"
    );
    let conn = router.read().await?;
    let mut conn = conn;
    let attempt = sqlx::query("DELETE FROM notes").execute(&mut *conn).await;
    match conn.check(attempt) {
        Err(e @ Error::MisroutedWrite { .. }) => println!("  {e}"),
        other => println!("  unexpected: {other:?}"),
    }
    drop(conn);

    println!("\n== Replication lag: 500 ms apply delay on both replicas");
    cluster.set_apply_delay(1, Duration::from_millis(500))?;
    cluster.set_apply_delay(2, Duration::from_millis(500))?;
    let mut w = router.write_with(&alice).await?;
    sqlx::query("UPDATE notes SET body = 'edited by alice' WHERE id = 1")
        .execute(&mut *w)
        .await?;
    let receipt = w.finish().await?;
    let (eventual, node) = read_value(
        &router,
        &RequestContext::new().consistency(Consistency::Eventual),
        1,
    )
    .await?;
    println!(
        "  Eventual read on {node}:        {eventual:?}   <- stale: the replica has not replayed the edit"
    );
    let (ryw, node) = read_value(&router, &alice, 1).await?;
    println!(
        "  ReadYourWrites for alice on {node}: {ryw:?}   <- her mark (commit LSN) in Redis routes around the lag"
    );
    let bob = RequestContext::new()
        .token(router.verify_token(receipt.token.as_deref().unwrap_or_default())?)
        .consistency(Consistency::Causal);
    let (causal, node) = read_value(&router, &bob, 1).await?;
    println!("  Causal read by bob with alice's token on {node}: {causal:?}");
    tokio::time::sleep(Duration::from_millis(700)).await;
    let (later, node) = read_value(&router, &alice, 1).await?;
    println!(
        "  700 ms later alice reads on {node}: {later:?}   <- back on a replica once it caught up"
    );
    cluster.clear_apply_delay(1)?;
    cluster.clear_apply_delay(2)?;
    println!("  router counters: {:?}", router.stats());

    println!("\n== Failover: kill the primary, promote pg1, repoint pg2");
    cluster.wait_replicated(Duration::from_secs(10))?;
    let c = cluster.clone();
    tokio::task::spawn_blocking(move || c.kill(0)).await??;
    let promoted = Instant::now();
    let c = cluster.clone();
    tokio::task::spawn_blocking(move || {
        c.promote(1)?;
        c.follow(2, 1)
    })
    .await??;
    let mut w = router.write_with(&alice).await?;
    sqlx::query("INSERT INTO notes VALUES (2, 'after failover')")
        .execute(&mut *w)
        .await?;
    let node = w.node_name().to_string();
    w.finish().await?;
    println!(
        "  first write after the promotion succeeded on {node}, {:?} after promote started",
        promoted.elapsed()
    );
    print_topology(&router.snapshot());

    println!("\n== Done: dropping the router and the cluster removes every process and directory.");
    Ok(())
}
