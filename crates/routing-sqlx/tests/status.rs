//! `Router::status()` over real sqlx pools: pool occupancy as the adapter reports it.

use std::time::Duration;

use routing_sqlx::{Consistency, RequestContext, Router, RouterConfig, SqlxBackend};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reports_sqlx_pool_occupancy() {
    let c = routing_testkit::shared();
    let r = Router::builder(SqlxBackend::new())
        .nodes(c.node_configs())
        .config(RouterConfig {
            probe_interval: Duration::from_millis(50),
            probe_timeout: Duration::from_secs(2),
            ..RouterConfig::default()
        })
        .build()
        .await
        .expect("router");
    // Under load the first probe round may time out: give the monitor a few seconds.
    for _ in 0..100 {
        if r.status().writer.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let writer = r.status().writer.expect("a writer");
    let held = r.write().await.expect("write");
    let s = r.status();
    let node = s.node(&writer).expect("writer node");
    assert_eq!(node.pool.in_use, 1);
    let pool = node.pool.writer.expect("sqlx reports its pools");
    assert!(pool.connections >= 1, "{pool:?}");
    assert!(
        pool.idle < pool.connections,
        "the held session is not idle: {pool:?}"
    );
    drop(held);
    let read = r
        .read_with(&RequestContext::new().consistency(Consistency::Eventual))
        .await
        .expect("read");
    let name = read.node_name().to_string();
    let s = r.status();
    assert!(s.node(&name).unwrap().pool.reader.unwrap().connections >= 1);
    drop(read);
    let json = serde_json::to_value(r.status()).expect("json");
    assert!(
        json["nodes"][0]["pool"]["writer"]["connections"].is_u64(),
        "{json}"
    );
}
