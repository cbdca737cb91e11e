//! Serving the router's metrics to Prometheus:
//! `cargo run -p routing-examples --example metrics [-- SECONDS [PORT]]`.
//!
//! Starts a throwaway primary and two replicas with the test kit, installs the
//! `metrics-exporter-prometheus` recorder, serves `GET /metrics` on 127.0.0.1:PORT (default
//! 9898), and sends reads and writes through the router for SECONDS (default 30) while
//! Prometheus (or `curl`) scrapes it. See `routing_core::telemetry` for every series.

#![allow(clippy::print_stdout)]

use std::time::{Duration, Instant};

use routing_examples::prometheus;
use routing_sqlx::{
    Consistency, LagAlertThresholds, RequestContext, Router, RouterConfig, SqlxBackend, sqlx,
};
use routing_testkit::ClusterBuilder;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), BoxError> {
    let mut args = std::env::args().skip(1);
    let seconds: u64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(30);
    let port: u16 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(9898);

    // Installed before the router is built, so the recorder sees the metric descriptions.
    let handle = prometheus::install_recorder()?;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    let addr = listener.local_addr()?;
    tokio::spawn(prometheus::serve(listener, handle));

    let cluster =
        tokio::task::spawn_blocking(|| ClusterBuilder::new().replicas(2).start()).await??;
    let router: Router = Router::builder(SqlxBackend::new())
        .nodes(cluster.node_configs())
        .config(RouterConfig {
            lag_alert: LagAlertThresholds::bytes(8 << 20).and_time(Duration::from_secs(5)),
            ..RouterConfig::default()
        })
        .build()
        .await?;
    let mut w = router.write().await?;
    let created = sqlx::query("CREATE TABLE IF NOT EXISTS hits (n bigint)")
        .execute(&mut *w)
        .await;
    w.check(created)?;
    w.finish().await?;

    println!("metrics on http://{addr}/metrics for {seconds} s");
    let until = Instant::now() + Duration::from_secs(seconds);
    let mut n: i64 = 0;
    while Instant::now() < until {
        n += 1;
        let user = RequestContext::new().user(format!("user-{}", n % 10));
        let mut w = router.write_with(&user).await?;
        let done = sqlx::query("INSERT INTO hits VALUES ($1)")
            .bind(n)
            .execute(&mut *w)
            .await;
        w.check(done)?;
        w.finish().await?;
        for mode in [Consistency::ReadYourWrites, Consistency::Eventual] {
            let mut r = router.read_with(&user.clone().consistency(mode)).await?;
            let seen = sqlx::query_scalar::<_, i64>("SELECT count(*) FROM hits")
                .fetch_one(&mut *r)
                .await;
            r.check(seen)?;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let body = prometheus::scrape(addr).await?;
    let series: std::collections::BTreeSet<&str> = body
        .lines()
        .filter(|l| l.starts_with("routing_"))
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    println!("{} requests; series served:", n * 3);
    for s in series {
        println!("  {s}");
    }
    router.shutdown();
    tokio::task::spawn_blocking(move || drop(cluster)).await?;
    Ok(())
}
