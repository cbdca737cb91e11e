//! Stable endpoints (HAProxy, a cloud's writer endpoint): one URL whose server changes under us.

use std::net::SocketAddr;
use std::time::Duration;

use routing_core::Router;
use routing_testkit::FaultProxy;

use super::{
    Harness, create_table, drop_cluster, insert, kit, node_at, own_cluster, table, test_config,
    wait_until, whoami,
};

/// The router knows the writer only as an endpoint (a proxy in front of node 0) and one replica.
/// The writer's pool holds idle sessions to node 0. Node 1 is promoted while node 0 stays up and
/// writable (the dangerous case: pre-ping alone would pass), and the endpoint is retargeted to
/// node 1 without cutting old sessions, as a load balancer does. The endpoint's new timeline
/// counts as a role change: no session to node 0 is handed out again, every write lands on node 1.
pub async fn stable_endpoint_follows_a_failover_and_drops_old_sessions<H: Harness>() {
    let c = own_cluster();
    let at = |i: usize| SocketAddr::from(([127, 0, 0, 1], c.node(i).port()));
    let endpoint = kit(|| FaultProxy::start(at(0))).expect("writer endpoint");
    let nodes = vec![
        node_at(true, "writer-endpoint", endpoint.port()),
        node_at(false, "pg2", c.node(2).port()),
    ];
    let r = Router::builder(H::backend())
        .nodes(nodes)
        .config(test_config())
        .build()
        .await
        .expect("router");
    let t = table("endpoint");
    create_table(&r, &t).await;

    // Fill the writer pool with idle sessions to node 0.
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut w = r.write().await.expect("write session");
        let me = whoami::<H::B>(w.pooled()).await.expect("whoami");
        assert_eq!(
            me.port,
            c.node(0).port(),
            "the endpoint reaches node 0 first"
        );
        held.push(w);
    }
    drop(held);

    kit(|| {
        c.wait_replicated(Duration::from_secs(10))?;
        c.promote(1)?;
        c.follow(2, 1)
    })
    .expect("promote node 1 with node 0 still up");
    endpoint.retarget(at(1));
    let waited = wait_until(
        "the endpoint's new timeline",
        Duration::from_secs(5),
        || r.snapshot().timeline == Some(2),
    )
    .await;
    eprintln!("[conformance] endpoint: router saw the new timeline {waited:?} after the retarget");

    for id in 0..20 {
        let mut w = r.write().await.expect("write session");
        let me = whoami::<H::B>(w.pooled()).await.expect("whoami");
        assert_eq!(
            me.port,
            c.node(1).port(),
            "write {id} reached the old primary through an old session"
        );
        insert(&mut w, &t, id)
            .await
            .expect("insert on the new primary");
    }
    let on_old = kit(|| c.psql(0, &format!("SELECT count(*) FROM {t}"))).expect("count on node 0");
    assert_eq!(on_old, "0", "no write reached node 0 after the failover");
    drop(r);
    drop(endpoint);
    drop_cluster(c);
}
