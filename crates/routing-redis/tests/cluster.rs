//! RedisMarks on a real local Redis Cluster (three masters), feature `cluster`.
#![cfg(feature = "cluster")]

mod support;

#[path = "support/redis_cluster.rs"]
mod redis_cluster;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use redis_cluster::RedisCluster;
use routing_redis::{Lsn, RedisMarks, RestartPolicy, UserKey, WriterMarks};
use support::{blocking, unique_prefix, until_ok};

const MIN: Duration = Duration::from_secs(60);
const TIMEOUT: Duration = Duration::from_millis(50);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn marks_on_a_redis_cluster() {
    let mut cluster = blocking(|| RedisCluster::start(3)).await;
    let urls = cluster.urls();
    let prefix = unique_prefix("cluster");
    let make = |policy| {
        RedisMarks::cluster_builder(urls.iter().map(String::as_str))
            .prefix(&prefix)
            .timeout(TIMEOUT)
            .restart_policy(policy)
            .build()
            .expect("build")
    };
    let a = make(RestartPolicy::Trust);
    let b = make(RestartPolicy::Trust);

    // Set / get / max-merge for users spread over every shard, across two instances.
    let users: Vec<UserKey> = (0..300u64).map(UserKey::from).collect();
    until_ok("first set", Duration::from_secs(10), || {
        a.set_max(&users[0], Lsn(1), MIN)
    })
    .await;
    let started = Instant::now();
    for (i, u) in users.iter().enumerate() {
        a.set_max(u, Lsn(1000 + i as u64), MIN).await.expect("set");
        b.set_max(u, Lsn(10 + i as u64), MIN)
            .await
            .expect("set lower");
    }
    for (i, u) in users.iter().enumerate() {
        let m = b.get(u).await.expect("get").expect("a mark");
        assert_eq!(m.lsn, Lsn(1000 + i as u64));
        assert!(m.expires_in <= MIN);
    }
    println!(
        "{} set_max + {} get on the cluster in {:?}",
        users.len() * 2,
        users.len(),
        started.elapsed()
    );
    // Hash tags spread marks over the shards, and each epoch sits in its mark's slot.
    let sizes: Vec<u64> = {
        let c = &cluster;
        (0..3).map(|i| c.dbsize(i)).collect()
    };
    assert!(sizes.iter().all(|&n| n > 20), "keys per shard: {sizes:?}");
    let groups: HashSet<String> = users.iter().map(|u| a.epoch_key_for(u)).collect();
    assert!(groups.len() > 100, "{} slot groups", groups.len());

    // Hostile ids round-trip in cluster mode too.
    let hostile = [
        UserKey::new(b""),
        UserKey::new(vec![b'x'; 100 * 1024]),
        UserKey::new(b"{a}"),
        UserKey::new(b"}{"),
        UserKey::new(b"*\n:"),
        UserKey::new([0xff, 0x00]),
    ];
    for (i, u) in hostile.iter().enumerate() {
        a.set_max(u, Lsn(i as u64 + 1), MIN)
            .await
            .expect("set hostile");
    }
    for (i, u) in hostile.iter().enumerate() {
        assert_eq!(
            b.get(u).await.unwrap().map(|m| m.lsn),
            Some(Lsn(i as u64 + 1))
        );
    }

    // One shard dies: its users' operations fail within the timeout; then it comes back empty.
    let port0 = cluster.ports()[0];
    // A plain connection to node 0 answers EXISTS for its own slots and MOVED for the others.
    let mut node0 = redis::Client::open(format!("redis://127.0.0.1:{port0}/"))
        .expect("client")
        .get_multiplexed_async_connection()
        .await
        .expect("node 0");
    let mut on_shard0: Vec<&UserKey> = Vec::new();
    for u in &users {
        let owned: redis::RedisResult<i64> = redis::cmd("EXISTS")
            .arg(a.key_for(u))
            .query_async(&mut node0)
            .await;
        if matches!(owned, Ok(1)) {
            on_shard0.push(u);
        }
        if on_shard0.len() == 5 {
            break;
        }
    }
    assert_eq!(on_shard0.len(), 5, "users whose mark lives on shard 0");
    cluster.kill(0);
    for u in &on_shard0 {
        let t = Instant::now();
        let r = tokio::time::timeout(Duration::from_secs(5), a.get(u))
            .await
            .expect("never hangs");
        let took = t.elapsed();
        assert!(r.is_err(), "shard down: {r:?}");
        assert!(took < TIMEOUT + Duration::from_millis(150), "{took:?}");
        println!("get on a dead shard failed in {took:?}");
    }
    let distrust = make(RestartPolicy::Distrust {
        window: Duration::from_secs(30),
    });
    let cluster = blocking(move || {
        cluster.restart(0);
        cluster
    })
    .await;
    // The restarted shard is empty: its users' marks are unknown (errors), detected through
    // that shard's own epoch keys, while users elsewhere keep theirs.
    let (err, took) = until_ok(
        "unknown after the shard restart",
        Duration::from_secs(10),
        || async {
            match distrust.get(on_shard0[0]).await {
                Err(e) if e.to_string().contains("old") => Ok(e),
                Err(e) => Err(e),
                Ok(m) => panic!("a lost mark was trusted as {m:?}"),
            }
        },
    )
    .await;
    println!("shard 0 answers again after {took:?}: {err}");
    let elsewhere = users
        .iter()
        .find(|u| !on_shard0.contains(u) && a.epoch_key_for(u) != a.epoch_key_for(on_shard0[0]))
        .expect("a user on another shard");
    let m = distrust
        .get(elsewhere)
        .await
        .expect("other shards keep marks");
    assert!(m.is_some());
    a.set_max(on_shard0[1], Lsn(7), MIN)
        .await
        .expect("set after restart");
    assert_eq!(
        distrust.get(on_shard0[1]).await.unwrap().map(|m| m.lsn),
        Some(Lsn(7))
    );
    drop(cluster);
}
