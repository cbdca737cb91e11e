//! Routing decisions with an in-memory fake backend (pure policy logic; real servers are
//! exercised by the conformance suite in the adapter crates).

mod fake;

use std::sync::Arc;
use std::time::{Duration, Instant};

use fake::{FakeBackend, FakeError, World, catch_up_after};
use routing_core::{
    Backend, CausalToken, Consistency, Error, ErrorKind, Lsn, Mark, MarksError, NodeConfig,
    RegionPolicy, RequestContext, Router, RouterConfig, TokenCodec, TokenError, TokenKey, UserKey,
    WriterMarks,
};

fn fast_config() -> RouterConfig {
    RouterConfig {
        probe_interval: Duration::from_millis(20),
        probe_timeout: Duration::from_millis(200),
        write_deadline: Duration::from_millis(800),
        wait_budget: Duration::from_millis(100),
        ..RouterConfig::default()
    }
}

fn codec() -> TokenCodec {
    TokenCodec::new(TokenKey::new(1, "test-key-0123456789abcdef").expect("key"))
}

async fn router(world: &World) -> Router<FakeBackend> {
    Router::builder(FakeBackend(world.clone()))
        .nodes(world.node_configs())
        .config(fast_config())
        .tokens(codec())
        .build()
        .await
        .expect("router")
}

async fn write_as(r: &Router<FakeBackend>, ctx: &RequestContext) -> routing_core::WriteReceipt {
    let mut w = r.write_with(ctx).await.expect("write conn");
    let done = FakeBackend::execute(w.pooled(), "INSERT x").await;
    w.check_backend(done).expect("insert");
    w.finish().await.expect("finish")
}

#[tokio::test]
async fn reads_go_to_replicas_and_writes_to_the_primary() {
    let world = World::new(2);
    let r = router(&world).await;
    assert_eq!(r.snapshot().writer, Some(0));
    let mut seen = [0usize; 3];
    for _ in 0..200 {
        let c = r
            .read_with(&RequestContext::new().consistency(Consistency::Eventual))
            .await
            .expect("read");
        seen[c.node_name()[1..].parse::<usize>().expect("n<i>")] += 1;
        assert!(!c.on_primary());
    }
    assert_eq!(seen[0], 0);
    assert!(seen[1] > 20 && seen[2] > 20, "spread: {seen:?}");
    let w = r.write().await.expect("write");
    assert_eq!(w.node_name(), "n0");
}

#[tokio::test]
async fn misrouted_writes_are_typed_on_replicas_and_primary_readers() {
    let world = World::new(1);
    let r = router(&world).await;
    for ctx in [
        RequestContext::new().consistency(Consistency::Eventual),
        RequestContext::new().force_primary(true),
    ] {
        let mut c = r.read_with(&ctx).await.expect("read");
        let done = FakeBackend::execute(c.pooled(), "INSERT x").await;
        let err = c.check_backend(done).expect_err("read-only");
        assert!(matches!(err, Error::MisroutedWrite { .. }), "{err:?}");
        let err = c
            .check::<()>(Err(FakeError(ErrorKind::ReadOnly)))
            .expect_err("read-only");
        assert!(matches!(err, Error::MisroutedWrite { .. }), "{err:?}");
    }
    assert_eq!(world.get(0).lsn, 1000, "nothing written");
}

#[tokio::test]
async fn regions_prefer_local_then_fallback_order_then_any_then_primary() {
    let world = World::new(3);
    let nodes: Vec<NodeConfig> = world
        .node_configs()
        .into_iter()
        .zip(["eu", "eu", "us", "ap"])
        .map(|(n, region)| n.region(region))
        .collect();
    let r = Router::builder(FakeBackend(world.clone()))
        .nodes(nodes)
        .config(fast_config())
        .regions(RegionPolicy::new().fallback("eu", ["ap".into(), "us".into()]))
        .build()
        .await
        .expect("router");
    let eu = RequestContext::new()
        .region("eu")
        .consistency(Consistency::Eventual);
    let name = |c: routing_core::ReadConn<FakeBackend>| c.node_name().to_string();
    for _ in 0..20 {
        assert_eq!(name(r.read_with(&eu).await.expect("read")), "n1");
    }
    world.set(1, |n| n.up = false);
    r.reprobe();
    assert!(r.topology_changed(Duration::from_secs(2)).await || !r.snapshot().nodes[1].reachable);
    tokio::time::sleep(Duration::from_millis(60)).await;
    for _ in 0..20 {
        assert_eq!(
            name(r.read_with(&eu).await.expect("read")),
            "n3",
            "fallback order says ap first"
        );
    }
    world.set(3, |n| n.up = false);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(name(r.read_with(&eu).await.expect("read")), "n2");
    let sa = RequestContext::new()
        .region("sa")
        .consistency(Consistency::Eventual);
    assert_eq!(
        name(r.read_with(&sa).await.expect("read")),
        "n2",
        "unknown region: any healthy replica"
    );
    world.set(2, |n| n.up = false);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let c = r.read_with(&eu).await.expect("read");
    assert!(c.on_primary(), "no replica: the primary serves the read");
    assert!(r.stats().reads_primary_fallback >= 1);
}

#[tokio::test]
async fn a_failing_replica_is_banned_and_reads_keep_succeeding() {
    let world = World::new(2);
    let r = router(&world).await;
    world.set(1, |n| n.up = false);
    // The first read may pick the dead node: the checkout fails, it is banned, the read goes elsewhere.
    for _ in 0..50 {
        let c = r
            .read_with(&RequestContext::new().consistency(Consistency::Eventual))
            .await
            .expect("read");
        assert_eq!(c.node_name(), "n2");
    }
    let s = r.snapshot();
    assert!(s.nodes[1].banned_until.is_some() && !s.nodes[1].reachable);
    world.set(1, |n| n.up = true);
    let deadline = Instant::now() + Duration::from_secs(3);
    while !r.snapshot().nodes[1].is_readable_replica(Instant::now()) {
        assert!(Instant::now() < deadline, "not readmitted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn read_your_writes_waits_for_a_replica_that_will_catch_up() {
    let world = World::new(2);
    let r = router(&world).await;
    let alice = RequestContext::new()
        .user("alice")
        .consistency(Consistency::ReadYourWrites);
    let receipt = write_as(&r, &alice).await;
    assert_eq!(receipt.lsn, Lsn(1100));
    catch_up_after(&world, Duration::from_millis(20));
    let c = r.read_with(&alice).await.expect("read");
    assert!(!c.on_primary(), "caught up within the budget");
    assert_eq!(r.stats().lsn_waits, 1);
    drop(c);
    // Another user is not pinned by alice's write.
    let bob = RequestContext::new()
        .user("bob")
        .consistency(Consistency::ReadYourWrites);
    assert!(!r.read_with(&bob).await.expect("read").on_primary());
}

#[tokio::test]
async fn read_your_writes_uses_the_primary_when_replicas_will_not_catch_up_in_time() {
    let world = World::new(2);
    let r = router(&world).await;
    let alice = RequestContext::new()
        .user("alice")
        .consistency(Consistency::ReadYourWrites);
    write_as(&r, &alice).await;
    let started = Instant::now();
    let c = r.read_with(&alice).await.expect("read");
    assert!(c.on_primary(), "replicas never replay the write");
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "bounded by the wait budget"
    );
    assert_eq!(r.stats().lsn_wait_timeouts, 1);
    drop(c);
    // A replica known to lag far beyond the budget is not even waited on.
    world.set(1, |n| n.replay_age_ms = 5_000);
    world.set(2, |n| n.replay_age_ms = 5_000);
    world.set(0, |n| n.lsn += 1);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let waits = r.stats().lsn_waits;
    assert!(r.read_with(&alice).await.expect("read").on_primary());
    assert_eq!(r.stats().lsn_waits, waits, "no futile wait");
}

#[tokio::test]
async fn recent_writer_ttl_pins_to_the_primary_until_the_ttl_passes() {
    let world = World::new(1);
    let r = router(&world).await;
    let ttl = Consistency::RecentWriterTtl {
        ttl: Duration::from_millis(150),
    };
    let ctx = RequestContext::new().user("carol").consistency(ttl);
    assert!(!r.read_with(&ctx).await.expect("read").on_primary());
    write_as(&r, &ctx).await;
    assert!(r.read_with(&ctx).await.expect("read").on_primary());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!r.read_with(&ctx).await.expect("read").on_primary());
}

#[tokio::test]
async fn causal_tokens_route_safely() {
    let world = World::new(1);
    let r = router(&world).await;
    let receipt = write_as(&r, &RequestContext::new()).await;
    let token_text = receipt.token.expect("signed");
    let token = r.verify_token(&token_text).expect("valid");
    assert_eq!(token.lsn, receipt.lsn);
    assert_eq!(token.system_id, 42);
    let causal = |t: CausalToken| {
        RequestContext::new()
            .token(t)
            .consistency(Consistency::Causal)
    };

    // Valid token, replica behind and never catching up: primary.
    assert!(
        r.read_with(&causal(token))
            .await
            .expect("read")
            .on_primary()
    );
    // Replica caught up: replica, no wait.
    world.set(1, |n| n.lsn = 1100);
    tokio::time::sleep(Duration::from_millis(80)).await;
    assert!(
        !r.read_with(&causal(token))
            .await
            .expect("read")
            .on_primary()
    );

    // Foreign cluster and old timeline: primary, counted.
    let foreign = CausalToken {
        system_id: 7,
        ..token
    };
    assert!(
        r.read_with(&causal(foreign))
            .await
            .expect("read")
            .on_primary()
    );
    let old_timeline = CausalToken {
        timeline: 0,
        ..token
    };
    assert!(
        r.read_with(&causal(old_timeline))
            .await
            .expect("read")
            .on_primary()
    );
    assert_eq!(r.stats().tokens_untrusted, 2);

    // Far future: rejected, not a primary storm.
    let future = CausalToken {
        lsn: Lsn(u64::MAX / 2),
        ..token
    };
    let err = r.read_with(&causal(future)).await.expect_err("future");
    assert!(
        matches!(err, Error::Token(TokenError::FromTheFuture { .. })),
        "{err:?}"
    );

    // Forged and garbage texts.
    let forged =
        TokenCodec::new(TokenKey::new(1, "attacker-key-0123456789").expect("key")).sign(&token);
    assert!(matches!(
        r.verify_token(&forged),
        Err(Error::Token(TokenError::BadSignature))
    ));
    assert!(matches!(
        r.verify_token("0/16B374D8"),
        Err(Error::Token(TokenError::Malformed))
    ));
}

#[tokio::test]
async fn failover_promotes_a_replica_and_writes_resume() {
    let world = World::new(2);
    let r = router(&world).await;
    let g0 = r.snapshot().generation;
    world.set(0, |n| n.up = false);
    world.set(1, |n| {
        n.in_recovery = false;
        n.timeline = 2;
    });
    let started = Instant::now();
    let w = r.write().await.expect("write after failover");
    assert_eq!(w.node_name(), "n1");
    assert!(r.snapshot().generation > g0);
    eprintln!("fake failover: write resumed after {:?}", started.elapsed());
    // The old primary comes back writable on the old timeline: fenced, never written.
    world.set(0, |n| n.up = true);
    tokio::time::sleep(Duration::from_millis(100)).await;
    for _ in 0..20 {
        assert_eq!(r.write().await.expect("write").node_name(), "n1");
    }
    assert_eq!(r.snapshot().nodes[0].role, routing_core::NodeRole::Fenced);
}

#[tokio::test]
async fn a_write_stuck_on_a_silent_primary_follows_the_failover() {
    let world = World::new(1);
    let r = router(&world).await;
    // The primary stops answering (a blackhole, not a refusal): checkouts on it never complete.
    world.set(0, |n| n.hang = true);
    let write = tokio::spawn({
        let r = r.clone();
        async move { r.write().await.map(|w| w.node_name().to_string()) }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        !write.is_finished(),
        "the write waits on the silent primary"
    );
    world.set(1, |n| {
        n.in_recovery = false;
        n.timeline = 2;
    });
    // Without giving up on the old writer's checkout it would wait out the deadline (NoPrimary).
    let node = write
        .await
        .expect("write task")
        .expect("the waiting write moves to the new primary");
    assert_eq!(node, "n1");
}

#[tokio::test]
async fn writes_fail_with_a_typed_error_when_no_primary_appears() {
    let world = World::new(1);
    let r = router(&world).await;
    world.set(0, |n| n.up = false);
    let started = Instant::now();
    let err = r.write().await.expect_err("no primary");
    assert!(matches!(err, Error::NoPrimary { .. }), "{err:?}");
    assert!(err.is_safe_to_retry());
    assert!(started.elapsed() < Duration::from_secs(2));
    // Reads still work from the replica.
    assert!(
        !r.read_with(&RequestContext::new().consistency(Consistency::Eventual))
            .await
            .expect("read")
            .on_primary()
    );
}

struct BrokenMarks;

#[routing_core::async_trait]
impl WriterMarks for BrokenMarks {
    async fn get(&self, _: &UserKey) -> Result<Option<Mark>, MarksError> {
        Err(MarksError::new("down"))
    }
    async fn set_max(&self, _: &UserKey, _: Lsn, _: Duration) -> Result<(), MarksError> {
        Err(MarksError::new("down"))
    }
}

#[tokio::test]
async fn a_failing_marks_store_sends_marked_reads_to_the_primary_and_never_fails_requests() {
    let world = World::new(1);
    let r = Router::builder(FakeBackend(world.clone()))
        .nodes(world.node_configs())
        .config(fast_config())
        .marks(Arc::new(BrokenMarks))
        .build()
        .await
        .expect("router");
    let ctx = RequestContext::new()
        .user("dave")
        .consistency(Consistency::ReadYourWrites);
    write_as(&r, &ctx).await;
    assert!(r.read_with(&ctx).await.expect("read").on_primary());
    let s = r.stats();
    assert_eq!((s.marks_errors, s.mark_update_failures), (1, 1));
    let mut w = r.write_with(&ctx).await.expect("write");
    let done = FakeBackend::execute(w.pooled(), "INSERT x").await;
    w.check_backend(done).expect("insert");
    assert_eq!(
        w.finish().await.expect("finish").mark_recorded,
        Some(false),
        "the receipt says the mark was lost"
    );
}

#[tokio::test]
async fn bad_configuration_is_a_typed_error() {
    let world = World::new(1);
    let build = |nodes: Vec<NodeConfig>, config: RouterConfig| {
        Router::builder(FakeBackend(world.clone()))
            .nodes(nodes)
            .config(config)
            .build()
    };
    let err = build(vec![], fast_config()).await.expect_err("empty");
    assert!(matches!(err, Error::Config(_)), "{err:?}");
    let dup = vec![
        NodeConfig::writer("n0", "x://a"),
        NodeConfig::replica("n0", "x://b"),
    ];
    assert!(
        matches!(build(dup, fast_config()).await, Err(Error::Config(m)) if m.contains("duplicate"))
    );
    for config in [
        RouterConfig {
            probe_interval: Duration::ZERO,
            ..fast_config()
        },
        RouterConfig {
            probe_interval: Duration::from_secs(1_000_000),
            ..fast_config()
        },
        RouterConfig {
            wait_budget: Duration::from_secs(3600),
            ..fast_config()
        },
        RouterConfig {
            write_deadline: Duration::ZERO,
            ..fast_config()
        },
    ] {
        assert!(matches!(
            build(world.node_configs(), config).await,
            Err(Error::Config(_))
        ));
    }
}

#[tokio::test]
async fn the_monitor_stops_with_the_router() {
    let world = World::new(1);
    let r = router(&world).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let probes = || world.1.load(std::sync::atomic::Ordering::Relaxed);
    assert!(probes() >= 4, "probing every 20 ms");
    drop(r);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let after_drop = probes();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(probes(), after_drop, "no probes after the router is gone");
}

/// A read guard dropped without its connection ever being handed out returns the session as it
/// came (no reset task, no round trip); one whose connection was used is reset before reuse.
#[tokio::test]
async fn only_sessions_that_were_used_are_reset() {
    let world = World::new(2);
    let r = router(&world).await;
    let eventual = RequestContext::new().consistency(Consistency::Eventual);
    for _ in 0..10 {
        let c = r.read_with(&eventual).await.expect("read");
        assert!(!c.on_primary());
        drop(c);
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let untouched = r.stats();
    assert_eq!(
        untouched.sessions_reset + untouched.sessions_discarded,
        0,
        "unused sessions go back untouched"
    );
    for _ in 0..10 {
        let mut c = r.read_with(&eventual).await.expect("read");
        let done = FakeBackend::query_text(c.pooled(), "SELECT 1").await;
        c.check_backend(done).expect("query");
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while r.stats().sessions_reset < 10 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(r.stats().sessions_reset, 10, "every used session is reset");
}

/// A probe whose connection is held (a proxy keeping it in connect retries while its backend
/// has no live server, modelled by a checkout that never completes) does not wait on it: a
/// fresh attempt started beside it reaches the node once it answers, so the monitor sees the
/// node within a fraction of the probe timeout, not after waiting the held attempt out.
#[tokio::test]
async fn a_held_probe_connection_is_made_again() {
    let world = World::new(1);
    let probe_timeout = Duration::from_secs(3);
    let r = Router::builder(FakeBackend(world.clone()))
        .nodes(world.node_configs())
        .config(RouterConfig {
            probe_timeout,
            ..fast_config()
        })
        .build()
        .await
        .expect("router");
    world.set(1, |n| n.hang = true);
    // Let a probe start and hang.
    tokio::time::sleep(Duration::from_millis(100)).await;
    world.set(1, |n| n.hang = false);
    let released = Instant::now();
    let deadline = released + probe_timeout / 2;
    loop {
        if r.snapshot().nodes[1]
            .last_probe
            .is_some_and(|t| t > released)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the held probe was waited out: no probe answered within half the probe timeout"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A write waiting for a writer whose connections are held (a proxy with no live server behind
/// it: a connection that arrives meanwhile reaches the server that comes up late, if at all) is
/// served about a connect step (a sixteenth of the probe timeout) after the node answers
/// again, not when the attempt the probe was waiting on gives up (up to half the probe timeout
/// later) nor at the next scheduled probe.
#[tokio::test]
async fn a_waiting_write_is_served_soon_after_a_held_writer_answers() {
    let world = World::new(1);
    let probe_timeout = Duration::from_millis(1600);
    let r = Router::builder(FakeBackend(world.clone()))
        .nodes(world.node_configs())
        .config(RouterConfig {
            probe_interval: Duration::from_secs(60),
            probe_timeout,
            write_deadline: Duration::from_secs(20),
            ..fast_config()
        })
        .build()
        .await
        .expect("router");
    // Every connection to the writer is held: its probe times out and it is no longer elected.
    world.set(0, |n| n.hang = true);
    r.reprobe();
    let lost = Instant::now() + probe_timeout * 3;
    while r.snapshot().writer.is_some() {
        assert!(Instant::now() < lost, "the held writer was never given up");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // A write now waits for a writer; it asks the monitor for a probe, which starts at once
    // (after the 10 ms re-probe gap) and whose connect attempts are held.
    let asked = Instant::now();
    let write = tokio::spawn({
        let r = r.clone();
        async move { r.write().await.map(|w| w.node_name().to_string()) }
    });
    // The node answers again 700 ms into that probe: past its third connect attempt's start
    // (at 3/8 of the timeout), which a probe that retried one attempt at a time with a doubling
    // limit would wait out until 7/8 of the timeout (1400 ms).
    tokio::time::sleep_until((asked + Duration::from_millis(710)).into()).await;
    assert!(!write.is_finished(), "the write waits for a writer");
    world.set(0, |n| n.hang = false);
    let answered = Instant::now();
    let node = write
        .await
        .expect("write task")
        .expect("the write is served once the writer answers");
    let waited = answered.elapsed();
    assert_eq!(node, "n0");
    eprintln!("write served {waited:?} after the writer answered again");
    assert!(
        waited < probe_timeout / 4,
        "the write waited {waited:?} after the writer answered (probe timeout {probe_timeout:?})"
    );
}

/// A write whose checkout on the writer is held (a stable endpoint whose old server went away)
/// is abandoned as soon as the monitor sees another server behind the same node (the
/// generation moved), not only when another node is elected: its session would be discarded
/// anyway, and waiting it out is the pool's whole connect timeout.
#[tokio::test]
async fn a_held_write_checkout_follows_a_new_server_behind_the_same_node() {
    let world = World::new(1);
    let r = Router::builder(FakeBackend(world.clone()))
        .nodes(world.node_configs())
        .config(RouterConfig {
            probe_interval: Duration::from_secs(60),
            probe_timeout: Duration::from_secs(1),
            write_deadline: Duration::from_secs(3),
            ..fast_config()
        })
        .build()
        .await
        .expect("router");
    let g0 = r.snapshot().generation;
    world.set(0, |n| n.hang = true);
    let write = tokio::spawn({
        let r = r.clone();
        async move { r.write().await.map(|w| w.node_name().to_string()) }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!write.is_finished(), "the write's checkout is held");
    // Another server answers behind the same node (a promoted replica behind the endpoint).
    world.set(0, |n| {
        n.hang = false;
        n.timeline = 2;
    });
    r.reprobe();
    let node = write
        .await
        .expect("write task")
        .expect("the held checkout is abandoned for the new server");
    assert_eq!(node, "n0");
    assert!(r.snapshot().generation > g0, "the generation moved");
}
