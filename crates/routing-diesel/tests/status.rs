//! `Router::status()` over bb8 pools: pool occupancy as the diesel adapter reports it.

use std::time::Duration;

use routing_diesel::{Router, RouterConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reports_bb8_pool_occupancy() {
    let c = tokio::task::block_in_place(routing_testkit::shared);
    let r: Router = routing_diesel::builder()
        .nodes(c.node_configs())
        .config(RouterConfig {
            probe_interval: Duration::from_millis(50),
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
    let pool = node.pool.writer.expect("bb8 reports its pools");
    assert!(pool.connections >= 1, "{pool:?}");
    assert!(
        pool.idle < pool.connections,
        "the held session is not idle: {pool:?}"
    );
    drop(held);
}
