//! Run-time membership: a replica added to a running router serves reads once the monitor sees
//! it healthy; a removed one gets no new work, its sessions in use finish, then its pools close
//! (no connection of the router's roles is left on its server); the writer cannot be removed;
//! bad input is a typed error that changes nothing.

use std::time::Duration;

use routing_core::{Error, NodeConfig, Router};

use super::{
    Harness, codec, drop_cluster, eventual, kit, own_cluster_with, test_config, wait_until, whoami,
};

/// Connections the router's roles (writer, reader, monitor) hold on node `i` now.
fn router_connections(c: &routing_testkit::Cluster, i: usize) -> usize {
    use routing_testkit::{MONITOR_ROLE, READER_ROLE, WRITER_ROLE};
    let sql = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE usename IN \
         ('{WRITER_ROLE}', '{READER_ROLE}', '{MONITOR_ROLE}')"
    );
    kit(|| c.psql(i, &sql))
        .expect("count connections")
        .trim()
        .parse()
        .expect("a count")
}

/// Ports of the servers that served `rounds` pairs of overlapping eventual reads (the second
/// read of a pair is taken while the first is held, so the least-outstanding picker spreads
/// them over every eligible replica).
async fn read_ports<B: routing_core::Backend>(r: &Router<B>, rounds: usize) -> Vec<u16> {
    let mut ports = Vec::new();
    for _ in 0..rounds {
        let mut a = r.read_with(&eventual()).await.expect("read");
        let mut b = r.read_with(&eventual()).await.expect("read");
        for conn in [&mut a, &mut b] {
            let done = whoami::<B>(conn.pooled()).await;
            ports.push(conn.check_backend(done).expect("whoami").port);
        }
    }
    ports
}

/// A replica added at run time serves reads; one removed with a session in use gets no new
/// work, the session keeps working, and once it is back the node's pools close; the writer, a
/// duplicate, an empty URL and an unknown name are refused with typed errors.
pub async fn membership_adds_and_removes_replicas_at_run_time<H: Harness>() {
    let c = own_cluster_with(2);
    let configs = c.node_configs();
    let (p0, p1, p2) = (c.node(0).port(), c.node(1).port(), c.node(2).port());
    let r = Router::builder(H::backend())
        .nodes(configs[..2].iter().cloned())
        .config(test_config())
        .tokens(codec())
        .build()
        .await
        .expect("router");
    wait_until("node 1 readable", Duration::from_secs(10), || {
        r.status()
            .node(c.node(1).name())
            .is_some_and(|n| n.readable)
    })
    .await;
    assert!(
        read_ports(&r, 10).await.iter().all(|&p| p == p1),
        "before it is added, node 2 serves nothing"
    );

    // Bad input is a typed error and changes nothing.
    let dup = r.add_node(configs[1].clone()).await;
    assert!(matches!(dup, Err(Error::Config(_))), "duplicate: {dup:?}");
    let empty = r.add_node(NodeConfig::replica("blank", "  ")).await;
    assert!(
        matches!(empty, Err(Error::Config(_))),
        "empty URL: {empty:?}"
    );
    let unknown = r.remove_node("no-such-node");
    assert!(
        matches!(unknown, Err(Error::UnknownNode { .. })),
        "{unknown:?}"
    );
    assert_eq!(r.node_names(), [c.node(0).name(), c.node(1).name()]);

    // The writer cannot be removed; writes go on.
    let writer = r.remove_node(c.node(0).name());
    assert!(
        matches!(writer, Err(Error::RemoveWriter { .. })),
        "{writer:?}"
    );
    drop(r.write().await.expect("writes still work"));

    // Added at run time: probed, then serving reads, and in the status.
    r.add_node(configs[2].clone()).await.expect("add node 2");
    wait_until("node 2 readable", Duration::from_secs(10), || {
        r.status()
            .node(c.node(2).name())
            .is_some_and(|n| n.readable)
    })
    .await;
    let ports = read_ports(&r, 20).await;
    assert!(ports.contains(&p2), "the added replica serves reads");
    assert!(ports.contains(&p1), "the old one still does");

    // Removed with a session in use on it.
    let mut held = loop {
        let conn = r.read_with(&eventual()).await.expect("read");
        if conn.node_name() == c.node(1).name() {
            break conn;
        }
    };
    let removal = r.remove_node(c.node(1).name()).expect("remove node 1");
    assert!(!removal.is_drained(), "a session is still in use");
    assert!(r.status().node(c.node(1).name()).is_none());
    assert_eq!(r.node_names(), [c.node(0).name(), c.node(2).name()]);
    let ports = read_ports(&r, 20).await;
    assert!(
        ports.iter().all(|&p| p != p1),
        "no new work on a removed node: {ports:?}"
    );
    assert!(ports.iter().all(|&p| p == p2 || p == p0));
    // The session in use keeps working until it is dropped.
    let done = whoami::<H::B>(held.pooled()).await;
    assert_eq!(held.check_backend(done).expect("held session").port, p1);
    assert!(!removal.is_drained());
    drop(held);
    tokio::time::timeout(Duration::from_secs(10), removal.drained())
        .await
        .expect("the removed node drains once its last session is back");
    // Its pools are closed: the server sees no connection of the router's roles.
    wait_until(
        "the removed node's connections to close",
        Duration::from_secs(10),
        || router_connections(&c, 1) == 0,
    )
    .await;
    assert!(router_connections(&c, 2) > 0, "node 2 still has its pools");

    // The same name may come back (a new slot; the tombstone stays).
    r.add_node(configs[1].clone()).await.expect("re-add node 1");
    wait_until("node 1 readable again", Duration::from_secs(10), || {
        r.status()
            .node(c.node(1).name())
            .is_some_and(|n| n.readable)
    })
    .await;
    assert_eq!(r.snapshot().nodes.len(), 4, "indices never move");
    assert!(read_ports(&r, 20).await.contains(&p1));
    drop(r);
    drop_cluster(c);
}
