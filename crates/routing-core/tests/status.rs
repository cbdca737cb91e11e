//! `Router::status()`: the typed snapshot an operator or a health endpoint reads, and its JSON.

mod fake;

use std::time::Duration;

use fake::{FakeBackend, World};
use routing_core::{LagAlertThresholds, NodeRole, RoleHint, Router, RouterConfig};

async fn router(world: &World) -> Router<FakeBackend> {
    Router::builder(FakeBackend(world.clone()))
        .nodes(world.node_configs())
        .config(RouterConfig {
            probe_interval: Duration::from_millis(20),
            probe_timeout: Duration::from_millis(200),
            write_deadline: Duration::from_millis(800),
            lag_alert: LagAlertThresholds::bytes(500),
            ..RouterConfig::default()
        })
        .build()
        .await
        .expect("router")
}

async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..200 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{what} never happened");
}

#[tokio::test]
async fn status_shows_roles_lag_alerts_bans_and_pools() {
    let world = World::new(2);
    let r = router(&world).await;
    let s = r.status();
    assert_eq!(s.writer.as_deref(), Some("n0"));
    assert_eq!(s.generation, r.snapshot().generation);
    assert_eq!(s.system_id.as_deref(), Some("42"));
    assert_eq!(s.nodes.len(), 3);
    let n0 = s.node("n0").unwrap();
    assert_eq!(
        (n0.hint, n0.role),
        (RoleHint::WriterCandidate, NodeRole::Primary)
    );
    let n1 = s.node("n1").unwrap();
    assert_eq!(
        (n1.role, n1.reachable, n1.readable),
        (NodeRole::Replica, true, true)
    );
    assert_eq!(n1.lag_bytes, Some(0));
    assert!(n1.ban.is_none() && !n1.lag_alert);
    assert!(s.marks.healthy);
    assert_eq!(n1.pool.max_size, RouterConfig::default().pool.max_size);
    assert_eq!(
        n1.pool.writer, None,
        "the fake adapter does not report its pools"
    );

    // A session in use shows in the node's occupancy.
    let w = r.write().await.expect("write");
    assert_eq!(r.status().node("n0").unwrap().pool.in_use, 1);
    drop(w);

    // n1 falls 1000 bytes behind (n2 keeps up): over its alert threshold of 500.
    world.set(0, |n| n.lsn = 2000);
    world.set(1, |n| n.lsn = 1000);
    world.set(2, |n| n.lsn = 2000);
    eventually("n1's lag alert", || {
        r.status().node("n1").unwrap().lag_alert
    })
    .await;
    assert_eq!(r.status().node("n1").unwrap().lag_bytes, Some(1000));
    assert!(!r.status().node("n2").unwrap().lag_alert);

    // n2 goes down: banned, with an expiry in the future.
    world.set(2, |n| n.up = false);
    eventually("n2's ban", || r.status().node("n2").unwrap().ban.is_some()).await;
    let n2 = r.status().node("n2").unwrap().clone();
    let ban = n2.ban.unwrap();
    assert!(!n2.reachable && !n2.readable);
    assert!(ban.remaining_ms <= 30_000, "{ban:?}");
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    assert!(
        ban.expires_at_unix_ms + 1000 >= now_ms,
        "{ban:?} vs {now_ms}"
    );
    assert!(n2.last_error.is_some());
}

#[tokio::test]
async fn status_serializes_to_json() {
    let world = World::new(1);
    let r = router(&world).await;
    let json = serde_json::to_value(r.status()).expect("serializes");
    assert_eq!(json["writer"], "n0");
    assert_eq!(json["system_id"], "42");
    assert_eq!(json["nodes"][0]["role"], "primary");
    assert_eq!(json["nodes"][0]["hint"], "writer_candidate");
    assert_eq!(json["nodes"][1]["role"], "replica");
    assert_eq!(json["nodes"][1]["lag_bytes"], 0);
    assert_eq!(json["nodes"][1]["ban"], serde_json::Value::Null);
    assert_eq!(json["marks"]["healthy"], true);
    assert!(json["counters"]["reads_replica"].is_u64());
    assert!(json["nodes"][1]["pool"]["in_use"].is_u64());
    let text = serde_json::to_string(&r.status()).unwrap();
    assert!(
        !text.contains("u:pw@"),
        "no connection string in the status: {text}"
    );
}
