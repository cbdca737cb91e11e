//! Patroni discovery against a real Patroni cluster (etcd + Patroni-managed PostgreSQL, the test
//! kit's `HaStack`): the router is built from `GET /cluster`; a member Patroni starts while the
//! router runs is added and serves reads without a restart; a member whose Patroni dies drops
//! out of `/cluster` (its key expires after Patroni's TTL) and out of the router; the writer is
//! never removed and a discovery source that stops answering changes nothing.
//!
//! Skipped (with a note) when patroni, etcd or haproxy is not installed (`cargo xtask ha`
//! installs them). Takes about 40 s on two cores, most of it the stack's start, the fourth
//! member's base backup and Patroni's 10 s member TTL.

use std::sync::Arc;
use std::time::{Duration, Instant};

use routing_core::patroni::{PatroniDiscovery, PatroniTemplate};
use routing_core::{Consistency, Discoverer, DiscoverySettings, RequestContext, Router};
use routing_sqlx::{SqlxBackend, sqlx};
use routing_testkit::{
    HaStack, MONITOR_PASSWORD, MONITOR_ROLE, READER_PASSWORD, READER_ROLE, WRITER_PASSWORD,
    WRITER_ROLE,
};

const LIMIT: Duration = Duration::from_secs(90);

fn installed() -> bool {
    ["/usr/bin/patroni", "/usr/bin/etcd", "/usr/sbin/haproxy"]
        .iter()
        .all(|p| std::path::Path::new(p).exists())
}

fn kit<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

async fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let started = Instant::now();
    while !check() {
        assert!(started.elapsed() < LIMIT, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The port of the server behind an eventual read.
async fn read_port(r: &Router<SqlxBackend>) -> u16 {
    let ctx = RequestContext::new().consistency(Consistency::Eventual);
    let mut conn = r.read_with(&ctx).await.expect("read");
    let port: i32 = sqlx::query_scalar("SELECT inet_server_port()")
        .fetch_one(&mut *conn)
        .await
        .expect("inet_server_port");
    u16::try_from(port).expect("a port")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patroni_discovery_follows_members_joining_and_leaving() {
    if !installed() {
        eprintln!(
            "skipped: patroni, etcd-server or haproxy not installed (cargo xtask ha installs them)"
        );
        return;
    }
    let started = Instant::now();
    let ha = kit(|| HaStack::builder().members(3).spares(1).start()).expect("HA stack");
    let leader = kit(|| ha.wait_healthy(LIMIT)).expect("healthy");
    eprintln!("stack up in {:?}", started.elapsed());
    let template = PatroniTemplate::new(WRITER_ROLE, WRITER_PASSWORD, "postgres")
        .reader(READER_ROLE, READER_PASSWORD)
        .monitor(MONITOR_ROLE, MONITOR_PASSWORD);
    assert!(
        !format!("{template:?}").contains(WRITER_PASSWORD),
        "the template never shows a password"
    );
    // Every member's REST endpoint; the spare's answers nothing yet, the others do.
    let endpoints: Vec<String> = ha
        .members()
        .iter()
        .map(|m| format!("http://127.0.0.1:{}", m.rest_port()))
        .collect();
    let source = Arc::new(PatroniDiscovery::new(&endpoints, template).expect("endpoints"));
    let nodes = Discoverer::<SqlxBackend>::initial_nodes(source.as_ref(), Duration::from_secs(2))
        .await
        .expect("members from /cluster");
    let mut names: Vec<String> = nodes.iter().map(|n| n.name.clone()).collect();
    names.sort();
    assert_eq!(names, ["pg0", "pg1", "pg2"]);
    let r = Router::builder(SqlxBackend::new())
        .nodes(nodes)
        .config(routing_examples::ha::router_config())
        .build()
        .await
        .expect("router");
    wait_until("the leader elected", || {
        r.status().writer.as_deref() == Some(ha.members()[leader].name())
    })
    .await;
    let discoverer = Discoverer::new(
        r.clone(),
        source.clone(),
        DiscoverySettings::new(Duration::from_millis(200), Duration::from_secs(1)),
    );
    let task = discoverer.spawn();

    // A fourth member joins while the router runs.
    let added = kit(|| ha.add_member()).expect("start the spare");
    let name = ha.members()[added].name().to_string();
    let port = ha.members()[added].port();
    let asked = Instant::now();
    wait_until("Patroni to list the new member", || {
        ha.cluster()
            .is_some_and(|c| c.iter().any(|m| m.name == name))
    })
    .await;
    let listed = asked.elapsed();
    wait_until("the new member readable in the router", || {
        r.status().node(&name).is_some_and(|n| n.readable)
    })
    .await;
    let readable = asked.elapsed();
    let mut served = false;
    for _ in 0..40 {
        if read_port(&r).await == port {
            served = true;
            break;
        }
    }
    assert!(served, "the added member serves reads");
    eprintln!(
        "{name}: listed by Patroni {listed:?} after start, readable in the router {readable:?} after start"
    );

    // A replica's Patroni and PostgreSQL die: after Patroni's TTL its member key expires and
    // discovery removes it; the writer stays.
    let writer = r.status().writer.expect("a writer");
    let victim = (0..3)
        .find(|&i| ha.members()[i].name() != writer)
        .expect("a replica");
    let victim_name = ha.members()[victim].name().to_string();
    kit(|| ha.kill_member(victim)).expect("kill a replica member");
    let killed = Instant::now();
    wait_until("discovery to remove the dead member", || {
        !r.node_names().contains(&victim_name)
    })
    .await;
    eprintln!(
        "{victim_name}: removed {:?} after its kill",
        killed.elapsed()
    );
    assert!(r.node_names().contains(&writer), "the writer stays");
    assert!(r.status().node(&victim_name).is_none());
    drop(r.write().await.expect("writes go on"));

    // Patroni's REST API gone entirely: polls fail, the membership does not move.
    drop(task);
    let dead = Arc::new(
        PatroniDiscovery::new(["127.0.0.1:1"], PatroniTemplate::new("a", "b", "c"))
            .expect("endpoint"),
    );
    let mut blind = Discoverer::new(r.clone(), dead, DiscoverySettings::default());
    let before = r.node_names();
    assert!(blind.sync().await.is_err());
    assert_eq!(r.node_names(), before, "a failing source changes nothing");

    drop(r);
    kit(move || drop(ha));
    eprintln!("done in {:?}", started.elapsed());
}
