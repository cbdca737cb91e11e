//! RedisMarks when Redis fails: killed, restarted empty, down at start-up, blackholed. Each test
//! has its own Redis (from the test kit), since they break it.

mod support;

use std::time::{Duration, Instant};

use routing_redis::{Lsn, RedisMarks, RestartPolicy, UserKey, WriterMarks};
use routing_testkit::{Cluster, ClusterBuilder, FaultProxy, ProxyMode};
use support::{blocking, unique_prefix, until_ok};

const TIMEOUT: Duration = routing_redis::DEFAULT_TIMEOUT;
const UPDATE_TIMEOUT: Duration = routing_redis::DEFAULT_UPDATE_TIMEOUT;
/// Allowed on top of the configured timeout before we call it a hang: a loaded 2-core machine
/// (other test binaries compiling and running) can delay a timer wake-up.
const SLACK: Duration = Duration::from_millis(150);

async fn cluster_with_redis() -> std::sync::Arc<Cluster> {
    blocking(|| {
        std::sync::Arc::new(
            ClusterBuilder::new()
                .replicas(0)
                .with_redis(true)
                .start()
                .expect("cluster with redis"),
        )
    })
    .await
}

/// Runs `op` a few times against a dead store: it must fail, and within the timeout.
async fn assert_fails_fast<T: std::fmt::Debug, F, Fut>(
    what: &str,
    budget: Duration,
    mut op: F,
) -> Vec<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, routing_redis::MarksError>>,
{
    let mut times = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        // A hang would show up as this outer timeout firing.
        let r = tokio::time::timeout(Duration::from_secs(5), op())
            .await
            .unwrap_or_else(|_| panic!("{what} hung"));
        let took = t.elapsed();
        let err = r.expect_err("the store is down: must be an error");
        assert!(
            took <= budget + SLACK,
            "{what} took {took:?} (timeout {budget:?}): {err}"
        );
        times.push(took);
    }
    println!("{what} failed in {times:?} (timeout {budget:?})");
    times
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_fails_fast_then_recovers_and_an_empty_restart_is_detected() {
    let cluster = cluster_with_redis().await;
    let url = cluster.redis_url().expect("redis url");
    let prefix = unique_prefix("kill");
    let window = Duration::from_secs(2);
    let ttl = window;
    let make = || {
        RedisMarks::builder(url.as_str())
            .prefix(&prefix)
            .timeout(TIMEOUT)
            .restart_policy(RestartPolicy::Distrust { window })
            .build()
            .expect("build")
    };
    let marks = make();
    let alice = UserKey::from("alice");
    let bob = UserKey::from("bob");
    let carol = UserKey::from("carol");
    until_ok("first set", Duration::from_secs(5), || {
        marks.set_max(&alice, Lsn(100), ttl)
    })
    .await;
    marks.set_max(&carol, Lsn(100), ttl).await.expect("set");
    assert_eq!(
        marks.get(&alice).await.expect("get").map(|m| m.lsn),
        Some(Lsn(100))
    );

    // Killed: every operation fails, within the timeout, never hangs.
    let c = cluster.clone();
    blocking(move || c.kill_redis().expect("kill redis")).await;
    assert_fails_fast("get", TIMEOUT, || marks.get(&alice)).await;
    assert_fails_fast("set_max", UPDATE_TIMEOUT, || {
        marks.set_max(&alice, Lsn(150), ttl)
    })
    .await;
    assert_fails_fast("ping", TIMEOUT, || marks.ping()).await;
    let s = marks.stats();
    assert!(s.errors + s.timeouts >= 15, "{s:?}");

    // Restarted (empty, no persistence): the same RedisMarks works again by itself.
    let c = cluster.clone();
    blocking(move || c.restart_redis().expect("restart redis")).await;
    let ((), recovery) = until_ok("set_max after restart", Duration::from_secs(5), || {
        marks.set_max(&bob, Lsn(500), ttl)
    })
    .await;
    println!("first successful operation {recovery:?} after Redis accepted connections again");
    assert_eq!(
        marks.get(&bob).await.expect("get").map(|m| m.lsn),
        Some(Lsn(500))
    );
    // Alice's update that failed during the outage was retried in the background and landed in
    // the new Redis: every process sees it.
    let other = make();
    let (landed, _) = until_ok("alice's retried update", Duration::from_secs(2), || async {
        match other.get(&alice).await {
            Ok(Some(m)) => Ok(m),
            Ok(None) => panic!("alice's mark cannot be 'none' within the window"),
            Err(e) => Err(e),
        }
    })
    .await;
    assert_eq!(landed.lsn, Lsn(150));
    assert!(marks.stats().updates_retried >= 1, "{:?}", marks.stats());

    // Carol's mark died with the old Redis. Her lookup is "unknown" (an error: the router reads
    // on the primary), not "no mark", until every mark set before the restart would have expired.
    let err = marks
        .get(&carol)
        .await
        .expect_err("carol's mark is unknown");
    assert!(err.to_string().contains("old"), "{err}");
    let s = marks.stats();
    assert!(
        s.epochs_started >= 2,
        "epoch at first use and after the restart: {s:?}"
    );
    assert!(s.unknown_after_data_loss >= 1, "{s:?}");
    // Another process, started after the restart, agrees (the epoch lives in Redis).
    let err = other
        .get(&carol)
        .await
        .expect_err("unknown for other processes too");
    assert!(err.to_string().contains("old"), "{err}");
    println!("after the restart, an unmarked user is reported as: {err}");

    // Once the window has passed, a missing mark means "no recent write" again.
    let (none, waited) = until_ok("window end", window + Duration::from_secs(3), || {
        marks.get(&carol)
    })
    .await;
    assert_eq!(none, None);
    assert!(
        waited >= window - recovery - Duration::from_millis(500),
        "{waited:?}"
    );
    println!("unmarked users trusted again {waited:?} after the first post-restart operation");
    println!("stats: {:?}", marks.stats());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_while_redis_is_down() {
    let cluster = cluster_with_redis().await;
    let url = cluster.redis_url().expect("redis url");
    let c = cluster.clone();
    blocking(move || c.kill_redis().expect("kill redis")).await;
    let t = Instant::now();
    let marks = RedisMarks::builder(url.as_str())
        .prefix(unique_prefix("down"))
        .timeout(TIMEOUT)
        .build()
        .expect("building does not need Redis");
    println!("built in {:?} with Redis down", t.elapsed());
    let u = UserKey::from("u");
    assert_fails_fast("get (never connected)", TIMEOUT, || marks.get(&u)).await;
    assert_fails_fast("set_max (never connected)", UPDATE_TIMEOUT, || {
        marks.set_max(&u, Lsn(1), Duration::from_secs(30))
    })
    .await;
    let c = cluster.clone();
    blocking(move || c.restart_redis().expect("start redis")).await;
    let (rtt, took) = until_ok("ping", Duration::from_secs(5), || marks.ping()).await;
    println!("connected {took:?} after Redis came up (ping {rtt:?})");
    marks
        .set_max(&u, Lsn(1), Duration::from_secs(30))
        .await
        .expect("set");
    assert_eq!(
        marks.get(&u).await.expect("get").map(|m| m.lsn),
        Some(Lsn(1))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blackholed_redis_times_out_and_the_store_recovers_when_it_heals() {
    let cluster = cluster_with_redis().await;
    let port = cluster.redis_port().expect("redis port");
    let proxy = blocking(move || {
        FaultProxy::start(std::net::SocketAddr::from(([127, 0, 0, 1], port))).expect("proxy")
    })
    .await;
    let marks = RedisMarks::builder(format!("redis://127.0.0.1:{}/", proxy.port()).as_str())
        .prefix(unique_prefix("hole"))
        .timeout(TIMEOUT)
        .stuck_after(Duration::from_millis(200))
        .restart_policy(RestartPolicy::Trust)
        .build()
        .expect("build");
    let u = UserKey::from("u");
    until_ok("first set", Duration::from_secs(5), || {
        marks.set_max(&u, Lsn(9), Duration::from_secs(60))
    })
    .await;

    // Packets vanish: answers never come. Operations give up at the timeout.
    proxy.set_mode(ProxyMode::Blackhole);
    assert_fails_fast("get (blackholed)", TIMEOUT, || marks.get(&u)).await;
    // Keep failing past `stuck_after`: the store replaces its connection.
    let t = Instant::now();
    while t.elapsed() < Duration::from_millis(600) {
        let r = marks.get(&u).await;
        assert!(r.is_err());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let s = marks.stats();
    assert!(s.timeouts >= 5, "{s:?}");
    assert!(s.reconnects_forced >= 1, "{s:?}");
    assert_fails_fast("set_max (blackholed)", UPDATE_TIMEOUT, || {
        marks.set_max(&u, Lsn(10), Duration::from_secs(60))
    })
    .await;

    proxy.set_mode(ProxyMode::Pass);
    let (m, took) = until_ok("get after healing", Duration::from_secs(5), || {
        marks.get(&u)
    })
    .await;
    println!(
        "answers again {took:?} after the path healed; stats {:?}",
        marks.stats()
    );
    // The update that failed in the blackhole counts in this process at once, and lands in
    // Redis through the background retry.
    assert_eq!(m.map(|m| m.lsn), Some(Lsn(10)));
    let (retried, took) = until_ok("retry landed", Duration::from_secs(5), || async {
        match marks.stats().updates_retried {
            0 => Err(routing_redis::MarksError::new("not yet")),
            n => Ok(n),
        }
    })
    .await;
    println!("{retried} failed update(s) landed {took:?} later");
    let mut raw = support::raw(&cluster.redis_url().expect("url")).await;
    let stored: String = redis::AsyncCommands::get(&mut raw, marks.key_for(&u))
        .await
        .expect("GET");
    assert_eq!(stored, "000000000000000a");
}
