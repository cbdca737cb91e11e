//! Which replica may serve a guarded read: one on the writer's timeline, caught up, in the best
//! region that has one, and behind a load-balancing endpoint only after checking the session.

use std::time::Duration;

use routing_core::{Consistency, NodeConfig, Region, RegionPolicy, RequestContext, Router};

use super::{
    Harness, codec, count_id, create_table, drop_cluster, insert, kit, own_cluster_with, table,
    test_config, wait_until, whoami,
};

/// After a promotion with the old primary left up, a replica that keeps streaming from the old
/// primary replays a dead branch whose LSNs run ahead of the new primary's. It must serve no
/// read: every read-your-writes read after a write on the new primary finds the row, and none is
/// served by that replica, although its LSN is past the user's mark (which is what made the old
/// comparison call it caught up).
pub async fn a_replica_on_the_old_timeline_serves_no_read<H: Harness>() {
    let c = own_cluster_with(2);
    let r = Router::builder(H::backend())
        .nodes(c.node_configs())
        .config(test_config())
        .tokens(codec())
        .build()
        .await
        .expect("router");
    let t = table("branch");
    create_table(&r, &t).await;
    kit(|| {
        c.wait_replicated(Duration::from_secs(10))?;
        // Node 2 becomes the primary; node 0 stays up and writable; node 1 still follows node 0.
        c.promote(2)
    })
    .expect("promote node 2");
    wait_until("node 2 elected", Duration::from_secs(5), || {
        r.snapshot().writer == Some(2)
    })
    .await;
    // The old branch runs far ahead: several MB of WAL on node 0, replayed by node 1.
    kit(|| {
        c.psql(
            0,
            "CREATE TABLE dead_branch AS SELECT g FROM generate_series(1, 300000) g",
        )
    })
    .expect("write on the old primary");
    wait_until(
        "node 1 to replay the old branch",
        Duration::from_secs(10),
        || {
            let s = r.snapshot();
            s.nodes[1].lsn > s.primary_lsn.map(|l| routing_core::Lsn(l.0 + 1_000_000))
        },
    )
    .await;

    let user = RequestContext::new().user("branch-user");
    let ryw = user.clone().consistency(Consistency::ReadYourWrites);
    let (mut passed_mark, mut on_node1, mut stale) = (0, 0, 0);
    for id in 0..20 {
        let mut w = r.write_with(&user).await.expect("write");
        assert_eq!(
            w.node_name(),
            c.node(2).name(),
            "writes go to the new primary"
        );
        insert(&mut w, &t, id).await.expect("insert");
        let receipt = w.finish().await.expect("finish");
        if r.snapshot().nodes[1].lsn >= Some(receipt.lsn) {
            passed_mark += 1;
        }
        let eventual = RequestContext::new().consistency(Consistency::Eventual);
        for (guarded, ctx) in [(true, &ryw), (false, &eventual)] {
            let mut conn = r.read_with(ctx).await.expect("read");
            if conn.node_name() == c.node(1).name() {
                on_node1 += 1;
            }
            if guarded && count_id(&mut conn, &t, id).await == 0 {
                stale += 1;
            }
        }
    }
    eprintln!(
        "[conformance] dead branch: node 1 past the mark {passed_mark}/20, reads on it \
         {on_node1}, stale {stale}"
    );
    assert!(passed_mark > 0, "the dead branch's LSN looked caught up");
    assert_eq!(on_node1, 0, "no read on a replica of the old timeline");
    assert_eq!(stale, 0, "read-your-writes holds");
    let s = r.snapshot();
    assert_ne!(
        s.nodes[1].timeline, s.timeline,
        "node 1 is on another timeline"
    );
    drop(r);
    drop_cluster(c);
}

/// A read-your-writes read from a region whose replica lags goes to a caught-up replica in the
/// configured fallback region, not to the primary.
pub async fn guarded_reads_use_a_caught_up_replica_in_a_fallback_region<H: Harness>() {
    let c = own_cluster_with(2);
    kit(|| c.set_apply_delay(1, Duration::from_secs(2))).expect("delay node 1");
    let mut nodes = c.node_configs();
    nodes[1] = nodes[1].clone().region("eu");
    nodes[2] = nodes[2].clone().region("us");
    let r = Router::builder(H::backend())
        .nodes(nodes)
        .config(test_config())
        .regions(RegionPolicy::new().fallback("eu", [Region::new("us")]))
        .build()
        .await
        .expect("router");
    let t = table("regions");
    create_table(&r, &t).await;
    kit(|| c.wait_replicated(Duration::from_secs(10))).expect("replicated");
    let user = RequestContext::new().user("eu-user").region("eu");
    let ryw = user.clone().consistency(Consistency::ReadYourWrites);
    let mut served = std::collections::HashMap::<String, u32>::new();
    for id in 0..10 {
        let mut w = r.write_with(&user).await.expect("write");
        insert(&mut w, &t, id).await.expect("insert");
        let receipt = w.finish().await.expect("finish");
        // Read once the monitor has seen the us replica pass the write (it has no delay).
        wait_until(
            "the us replica to pass the write",
            Duration::from_secs(2),
            || r.snapshot().nodes[2].lsn >= Some(receipt.lsn),
        )
        .await;
        let mut conn = r.read_with(&ryw).await.expect("read");
        assert_eq!(
            count_id(&mut conn, &t, id).await,
            1,
            "read-your-writes holds"
        );
        *served.entry(conn.node_name().to_string()).or_default() += 1;
    }
    eprintln!("[conformance] eu reads with the eu replica 2 s behind: {served:?}");
    assert_eq!(
        served.get(c.node(2).name()).copied().unwrap_or(0),
        10,
        "the caught-up replica in the fallback region serves every read: {served:?}"
    );
    drop(r);
    drop_cluster(c);
}

/// A reader endpoint that load-balances: the monitor's probe reached a caught-up replica
/// (node 2), the session a read gets is on a replica 2 s behind (node 1). Here the node's probe
/// URL goes to node 2 and its read sessions, through their own URL, to node 1, which is what a
/// load balancer does to two connections. A guarded read verifies the session's replay
/// position, so it is never stale: it goes to the primary instead.
pub async fn a_load_balanced_endpoint_is_verified_on_the_session<H: Harness>() {
    let c = own_cluster_with(2);
    kit(|| c.set_apply_delay(1, Duration::from_secs(2))).expect("delay node 1");
    let configs = c.node_configs();
    let reader = NodeConfig::replica("reader-endpoint", c.writer_url(2))
        .monitor_url(c.monitor_url(2))
        .reader_url(c.reader_url(1))
        .load_balanced();
    let r = Router::builder(H::backend())
        .nodes([configs[0].clone(), reader])
        .config(test_config())
        .build()
        .await
        .expect("router");
    let t = table("lb");
    create_table(&r, &t).await;
    kit(|| c.wait_replicated(Duration::from_secs(10))).expect("replicated");
    let user = RequestContext::new().user("lb-user");
    let ryw = user.clone().consistency(Consistency::ReadYourWrites);
    let (mut stale, mut on_lagging) = (0, 0);
    for id in 0..10 {
        let mut w = r.write_with(&user).await.expect("write");
        insert(&mut w, &t, id).await.expect("insert");
        let receipt = w.finish().await.expect("finish");
        wait_until("the probe to see the write", Duration::from_secs(2), || {
            r.snapshot().nodes[1].lsn >= Some(receipt.lsn)
        })
        .await;
        let mut conn = r.read_with(&ryw).await.expect("read");
        if !conn.on_primary() {
            let me = whoami::<H::B>(conn.pooled()).await.expect("whoami");
            assert_eq!(me.port, c.node(1).port(), "read sessions reach node 1");
            on_lagging += 1;
        }
        if count_id(&mut conn, &t, id).await == 0 {
            stale += 1;
        }
    }
    eprintln!(
        "[conformance] load-balanced endpoint (snapshot caught up every time): served by the \
         lagging replica {on_lagging}, stale {stale}"
    );
    assert_eq!(
        stale, 0,
        "a guarded read behind an endpoint checks the session it got"
    );
    drop(r);
    drop_cluster(c);
}
