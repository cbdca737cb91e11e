//! Load is not failure: full pools, replay waits and one missed probe must not change the
//! topology. Each test holds real sessions (or stalls a real connection) on real servers and
//! checks that no healthy node is banned or unseated and that pools keep their sessions.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use routing_core::{
    Backend, Consistency, Error, NodeConfig, PoolSettings, RequestContext, Router, RouterConfig,
};
use routing_testkit::{FaultProxy, ProxyMode};

use super::{
    Harness, count_id, create_table, delayed_cluster, drop_cluster, eventual, index_of, insert,
    kit, own_cluster_with, ready_setup, router, shared_cluster, table, test_config, wait_until,
    whoami,
};

/// Pools of two sessions per node, and a pool wait short enough to run into often.
fn small_pools(max_size: u32, connect_timeout: Duration) -> RouterConfig {
    RouterConfig {
        pool: PoolSettings {
            max_size,
            connect_timeout,
            ..test_config().pool
        },
        ..test_config()
    }
}

/// Every replica session and every writer session is held (the pools are full, the nodes
/// answer), and more checkouts than the pools hold arrive at once. Reads go to the primary or
/// get `PoolExhausted`; writes get `PoolExhausted` (typed, safe to retry), never `NoPrimary`.
/// No replica is banned or marked unreachable, the primary stays the elected writer, the
/// generation does not move and hardly any re-probe is asked for. Once the sessions are
/// released everything serves as before.
pub async fn busy_pools_never_ban_or_unseat_a_healthy_node<H: Harness>() {
    let c = shared_cluster();
    let config = RouterConfig {
        write_deadline: Duration::from_secs(3),
        ..small_pools(2, Duration::from_millis(300))
    };
    let r = router::<H>(c, config).await;
    wait_until("both replicas readable", Duration::from_secs(5), || {
        let s = r.snapshot();
        let now = Instant::now();
        s.writer == Some(0)
            && s.nodes[1].is_readable_replica(now)
            && s.nodes[2].is_readable_replica(now)
    })
    .await;
    let generation = r.snapshot().generation;

    // Fill both replicas' pools and the writer's pool.
    let mut reads = Vec::new();
    let mut per_node = [0usize; 3];
    for _ in 0..4 {
        let mut conn = r.read_with(&eventual()).await.expect("read");
        let me = whoami::<H::B>(conn.pooled()).await.expect("whoami");
        per_node[index_of(c, me.port)] += 1;
        reads.push(conn);
    }
    assert_eq!(per_node, [0, 2, 2], "two sessions held on each replica");
    // Open the primary's two read sessions too, so the burst below waits only for sessions.
    let primary = RequestContext::new().consistency(Consistency::Primary);
    let warm = (r.read_with(&primary).await, r.read_with(&primary).await);
    drop(warm);
    let writes = vec![
        r.write().await.expect("write 1"),
        r.write().await.expect("write 2"),
    ];
    let before = r.stats();

    let started = Instant::now();
    let read_burst: Vec<_> = (0..6)
        .map(|_| {
            let r = r.clone();
            tokio::spawn(async move { r.read_with(&eventual()).await.map(|c| c.on_primary()) })
        })
        .collect();
    let write_burst: Vec<_> = (0..4)
        .map(|_| {
            let r = r.clone();
            tokio::spawn(async move { r.write().await.map(|w| w.node_name().to_string()) })
        })
        .collect();
    let mut on_primary = 0;
    for t in read_burst {
        match t.await.expect("read task") {
            Ok(true) => on_primary += 1,
            Ok(false) => panic!("a read was served by a replica whose pool is full"),
            Err(Error::PoolExhausted { .. }) => {}
            Err(e) => panic!("a read behind full replica pools failed with {e:?}"),
        }
    }
    for t in write_burst {
        match t.await.expect("write task") {
            Err(e @ Error::PoolExhausted { .. }) => {
                assert!(e.is_safe_to_retry(), "{e}");
                let text = e.to_string();
                assert!(text.contains(c.node(0).name()), "names the primary: {text}");
            }
            other => panic!("a write to a full writer pool must be PoolExhausted, got {other:?}"),
        }
    }
    eprintln!(
        "[conformance] busy pools: burst answered in {:?}, {on_primary} of 6 reads on the primary",
        started.elapsed()
    );

    let s = r.snapshot();
    let now = Instant::now();
    assert_eq!(s.writer, Some(0), "the primary stays the elected writer");
    assert_eq!(s.generation, generation, "no generation bump");
    for i in 1..=2 {
        let n = &s.nodes[i];
        assert!(n.reachable, "{}: a busy replica is not unreachable", n.name);
        assert!(
            n.banned_until.is_none_or(|t| t <= now),
            "{}: a busy replica is not banned",
            n.name
        );
        assert!(n.is_readable_replica(now), "{} stays eligible", n.name);
    }
    let after = r.stats();
    let reprobes = after.reprobes_requested - before.reprobes_requested;
    // Before, every busy checkout asked for one (and writes kept asking until NoPrimary).
    assert!(
        reprobes <= 4,
        "a busy pool asks for no re-probes: {reprobes}"
    );
    assert_eq!(
        after.checkout_failures, before.checkout_failures,
        "a busy pool is not a failed node"
    );
    assert_eq!(after.request_failures, before.request_failures);
    assert!(
        after.checkouts_busy >= before.checkouts_busy + 6,
        "each read of the burst found both replica pools busy: {} -> {}",
        before.checkouts_busy,
        after.checkouts_busy
    );

    drop(reads);
    drop(writes);
    let t = table("busy");
    create_table(&r, &t).await;
    let mut w = r.write().await.expect("write after the burst");
    insert(&mut w, &t, 1).await.expect("insert");
    w.finish().await.expect("finish");
    for _ in 0..6 {
        let conn = r
            .read_with(&eventual())
            .await
            .expect("read after the burst");
        assert!(
            !conn.on_primary(),
            "replicas serve again once sessions are free"
        );
    }
}

/// With a replica apply delay and pools of one session, a burst of `ReadYourWrites` reads that
/// must wait for replay all get a replica session (none waits out the pool, none falls back to
/// the primary) and none is stale: waiting does not pin the only session.
pub async fn waiting_reads_do_not_pin_replica_sessions<H: Harness>() {
    let c = delayed_cluster();
    let config = RouterConfig {
        wait_budget: Duration::from_secs(2),
        // Shorter than the apply delay: a waiter pinning the session would starve the others.
        ..small_pools(1, Duration::from_millis(150))
    };
    let (r, t) = ready_setup::<H>(c, "pinned", config).await;
    // Open each replica's one session now, so the burst only waits for sessions.
    for _ in 0..4 {
        drop(r.read_with(&eventual()).await.expect("warm-up read"));
    }
    let user = RequestContext::new().user("pinned-user");
    let read = user.clone().consistency(Consistency::ReadYourWrites);
    let before = r.stats();
    for round in 0..3u64 {
        let mut w = r.write_with(&user).await.expect("write");
        insert(&mut w, &t, round).await.expect("insert");
        w.finish().await.expect("finish");
        let started = Instant::now();
        let burst: Vec<_> = (0..6)
            .map(|_| {
                let (r, read, t) = (r.clone(), read.clone(), t.clone());
                tokio::spawn(async move {
                    let mut conn = r.read_with(&read).await?;
                    let seen = count_id(&mut conn, &t, round).await;
                    Ok::<_, Error>((conn.on_primary(), seen))
                })
            })
            .collect();
        for task in burst {
            let (on_primary, seen) = task.await.expect("read task").expect("read");
            assert_eq!(seen, 1, "round {round}: a ReadYourWrites read was stale");
            assert!(
                !on_primary,
                "round {round}: a waiting read fell back to the primary: {:?}",
                r.stats()
            );
        }
        eprintln!(
            "[conformance] 6 waiting reads on pools of one answered in {:?}",
            started.elapsed()
        );
    }
    let after = r.stats();
    assert!(
        after.lsn_waits > before.lsn_waits,
        "the reads waited for replay"
    );
    assert_eq!(after.lsn_wait_timeouts, before.lsn_wait_timeouts);
    assert_eq!(after.checkout_failures, before.checkout_failures);
    assert_eq!(after.reads_primary, before.reads_primary);
}

/// The generation (which empties every pool) stays put when (a) the writer misses probes (its
/// endpoint stalls for longer than the probe timeout) and answers again as the same server, and
/// (b) a session on the writer breaks on the request path (its backend is terminated): the
/// writer's pooled session is still the same backend afterwards. The control: a promotion moves
/// the generation and writes follow it.
pub async fn a_missed_probe_or_a_broken_session_keeps_the_generation<H: Harness>() {
    let c = own_cluster_with(1);
    let at = |i: usize| SocketAddr::from(([127, 0, 0, 1], c.node(i).port()));
    let endpoint = kit(|| FaultProxy::start(at(0))).expect("writer endpoint");
    let url = format!("postgres://postgres@127.0.0.1:{}/postgres", endpoint.port());
    let nodes = vec![
        NodeConfig::writer("pg0-endpoint", url),
        NodeConfig::replica("pg1", c.url(1)),
    ];
    let config = RouterConfig {
        probe_interval: Duration::from_millis(100),
        probe_timeout: Duration::from_millis(300),
        ..small_pools(1, Duration::from_secs(2))
    };
    let r: Router<H::B> = Router::builder(H::backend())
        .nodes(nodes)
        .config(config)
        .build()
        .await
        .expect("router");
    assert_eq!(r.snapshot().writer, Some(0));
    let generation = r.snapshot().generation;
    let writer_pid = {
        let mut w = r.write().await.expect("write session");
        whoami::<H::B>(w.pooled()).await.expect("whoami").pid
    };

    // (a) The endpoint stalls past the probe timeout: the writer misses probes, then answers
    // again as the same server.
    endpoint.set_mode(ProxyMode::Blackhole);
    let missed = wait_until("a failed writer probe", Duration::from_secs(5), || {
        !r.snapshot().nodes[0].reachable
    })
    .await;
    endpoint.set_mode(ProxyMode::Pass);
    let back = wait_until("the writer answering again", Duration::from_secs(5), || {
        r.snapshot().writer == Some(0)
    })
    .await;
    eprintln!("[conformance] writer missed a probe after {missed:?}, back after {back:?}");
    assert_eq!(
        r.snapshot().generation,
        generation,
        "a missed probe moved the generation"
    );
    {
        let mut w = r.write().await.expect("write session after the stall");
        let me = whoami::<H::B>(w.pooled()).await.expect("whoami");
        assert_eq!(me.pid, writer_pid, "the pooled writer session was dropped");
    }

    // (b) A session on the writer breaks under a request.
    let primary_read = RequestContext::new().consistency(Consistency::Primary);
    let mut conn = r
        .read_with(&primary_read)
        .await
        .expect("read on the primary");
    let victim = whoami::<H::B>(conn.pooled()).await.expect("whoami").pid;
    kit(|| c.psql(0, &format!("SELECT pg_terminate_backend({victim})"))).expect("terminate");
    let mut broke = false;
    for _ in 0..50 {
        let answer = H::B::query_text(conn.pooled(), "SELECT '1'::pg_catalog.text AS v").await;
        if let Err(e) = conn.check_backend(answer) {
            eprintln!("[conformance] broken writer session: {e}");
            broke = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(broke, "the terminated session kept answering");
    assert_eq!(
        r.snapshot().writer,
        Some(0),
        "one broken session unseated the writer"
    );
    drop(conn);
    // Let the re-probe it asked for run.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let s = r.snapshot();
    assert_eq!(s.writer, Some(0));
    assert_eq!(
        s.generation, generation,
        "a request-path error moved the generation"
    );
    {
        let mut w = r
            .write()
            .await
            .expect("write session after the broken read");
        let me = whoami::<H::B>(w.pooled()).await.expect("whoami");
        assert_eq!(me.pid, writer_pid, "the pooled writer session was dropped");
    }

    // The control: a promotion is another server, and moves the generation.
    kit(|| {
        c.wait_replicated(Duration::from_secs(10))?;
        c.promote(1)
    })
    .expect("promote node 1");
    wait_until("the promoted writer", Duration::from_secs(10), || {
        r.snapshot().writer == Some(1)
    })
    .await;
    assert!(
        r.snapshot().generation > generation,
        "a promotion must move the generation"
    );
    let mut w = r.write().await.expect("write on the new primary");
    let me = whoami::<H::B>(w.pooled()).await.expect("whoami");
    assert_eq!(me.port, c.node(1).port(), "writes follow the promotion");
    drop(w);
    drop(r);
    drop(endpoint);
    drop_cluster(c);
}
