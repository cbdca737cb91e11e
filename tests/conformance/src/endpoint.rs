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

    let waited = fail_over_behind(&c, &endpoint, &r).await;
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

/// The endpoint moved to the new primary (node 1, timeline 2) and the router follows it; then
/// the endpoint points back at the old primary, which is still up and writable (a load balancer
/// whose health check flips, DNS that reverts). New writer sessions through it land on node 0,
/// which answers "not in recovery" like any primary; checked against the elected writer's
/// timeline and cluster, they are refused, and no write reaches node 0.
pub async fn a_stable_endpoint_pointing_back_at_the_old_primary_gets_no_writes<H: Harness>() {
    let c = own_cluster();
    let at = |i: usize| SocketAddr::from(([127, 0, 0, 1], c.node(i).port()));
    let endpoint = kit(|| FaultProxy::start(at(0))).expect("writer endpoint");
    let mut config = test_config();
    config.write_deadline = Duration::from_millis(300);
    let r = Router::builder(H::backend())
        .nodes(vec![
            node_at(true, "writer-endpoint", endpoint.port()),
            node_at(false, "pg2", c.node(2).port()),
        ])
        .config(config)
        .build()
        .await
        .expect("router");
    let t = table("flipback");
    create_table(&r, &t).await;
    fail_over_behind(&c, &endpoint, &r).await;
    let mut w = r.write().await.expect("write on the new primary");
    insert(&mut w, &t, 1).await.expect("insert");
    drop(w);

    // The endpoint flips back. Cut the writer sessions the pool holds to node 1 (not the
    // monitor's probe session, whose last query is the probe), so writes need new sessions.
    endpoint.retarget(at(0));
    kit(|| {
        c.psql(
            1,
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE backend_type = 'client backend' AND pid <> pg_backend_pid() \
             AND query NOT LIKE '%concat_ws%'",
        )
    })
    .expect("cut writer sessions");
    let (mut ok, mut refused) = (0, 0);
    for id in 100..110 {
        match r.write().await {
            Ok(mut w) => {
                let me = whoami::<H::B>(w.pooled()).await;
                if me.ok().map(|m| m.port) == Some(c.node(0).port()) {
                    // Counted below, on node 0 itself.
                    let _ = insert(&mut w, &t, id).await;
                } else if insert(&mut w, &t, id).await.is_ok() {
                    ok += 1;
                }
            }
            Err(_) => refused += 1,
        }
    }
    let on_old = kit(|| c.psql(0, &format!("SELECT count(*) FROM {t}"))).expect("count on node 0");
    eprintln!(
        "[conformance] endpoint flipped back to the old primary: {ok} writes on the new primary, \
         {refused} refused, rows on the old primary: {on_old}"
    );
    assert_eq!(
        on_old, "0",
        "no write reached the old primary through the endpoint"
    );
    drop(r);
    drop(endpoint);
    drop_cluster(c);
}

/// Promotes node 1 while node 0 stays up and writable, repoints node 2 to it, retargets the
/// endpoint to node 1 (old sessions stay open, as a load balancer leaves them) and waits until
/// the router sees the new timeline; returns how long that took.
async fn fail_over_behind<B: routing_core::Backend>(
    c: &routing_testkit::Cluster,
    endpoint: &FaultProxy,
    r: &Router<B>,
) -> Duration {
    kit(|| {
        c.wait_replicated(Duration::from_secs(10))?;
        c.promote(1)?;
        c.follow(2, 1)
    })
    .expect("promote node 1 with node 0 still up");
    endpoint.retarget(SocketAddr::from(([127, 0, 0, 1], c.node(1).port())));
    wait_until(
        "the endpoint's new timeline",
        Duration::from_secs(5),
        || r.snapshot().timeline == Some(2),
    )
    .await
}
