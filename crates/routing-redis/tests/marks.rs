//! RedisMarks against a real redis-server (the test kit's shared one): set/get, max-merge, TTL,
//! two instances sharing marks, concurrent writers, hostile ids, values and configuration.

mod support;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::AsyncCommands;
use routing_redis::{BuildError, Lsn, RedisMarks, RestartPolicy, UserKey, WriterMarks};
use support::{builder, raw, shared_redis_url, unique_prefix};

const MIN: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_get_and_max_merge() {
    let url = shared_redis_url().await;
    let marks = builder(&url, "merge").build().expect("build");
    let alice = UserKey::from("alice");

    assert_eq!(marks.get(&alice).await.expect("get"), None);
    marks.set_max(&alice, Lsn(100), MIN).await.expect("set");
    marks
        .set_max(&alice, Lsn(50), MIN)
        .await
        .expect("set lower");
    let m = marks.get(&alice).await.expect("get").expect("a mark");
    assert_eq!(m.lsn, Lsn(100), "a lower LSN must not lower the mark");
    assert!(
        m.expires_in <= MIN && m.expires_in > MIN - Duration::from_secs(5),
        "{m:?}"
    );
    marks
        .set_max(&alice, Lsn(200), MIN)
        .await
        .expect("set higher");
    assert_eq!(
        marks.get(&alice).await.expect("get").map(|m| m.lsn),
        Some(Lsn(200))
    );

    // What Redis holds: the LSN itself (not "1"), with a TTL.
    let mut r = raw(&url).await;
    let key = marks.key_for(&alice);
    let stored: String = r.get(&key).await.expect("GET");
    assert_eq!(stored, "00000000000000c8");
    let pttl: i64 = r.pttl(&key).await.expect("PTTL");
    assert!(pttl > 55_000 && pttl <= 60_000, "pttl {pttl}");

    // The TTL restarts on every update, even when the LSN does not move.
    marks
        .set_max(&alice, Lsn(1), Duration::from_secs(120))
        .await
        .expect("set");
    let m = marks.get(&alice).await.expect("get").expect("a mark");
    assert_eq!(m.lsn, Lsn(200));
    assert!(m.expires_in > MIN, "TTL restarted: {m:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lsns_beyond_double_precision_compare_exactly() {
    let url = shared_redis_url().await;
    let marks = builder(&url, "wide").build().expect("build");
    let u = UserKey::from("wide");
    let big = 1u64 << 53;
    marks.set_max(&u, Lsn(big + 1), MIN).await.expect("set");
    marks.set_max(&u, Lsn(big), MIN).await.expect("set");
    assert_eq!(
        marks.get(&u).await.unwrap().map(|m| m.lsn),
        Some(Lsn(big + 1))
    );
    // Same high half, low halves differ.
    marks
        .set_max(&u, Lsn(u64::MAX - 1), MIN)
        .await
        .expect("set");
    marks
        .set_max(&u, Lsn(u64::MAX - 2), MIN)
        .await
        .expect("set");
    assert_eq!(
        marks.get(&u).await.unwrap().map(|m| m.lsn),
        Some(Lsn(u64::MAX - 1))
    );
    marks.set_max(&u, Lsn(u64::MAX), MIN).await.expect("set");
    assert_eq!(
        marks.get(&u).await.unwrap().map(|m| m.lsn),
        Some(Lsn(u64::MAX))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn marks_expire_with_their_ttl() {
    let url = shared_redis_url().await;
    // The default policy, with a window shorter than the marks' TTL: once the mark has expired,
    // the window (widened to the TTL used) has passed too, and "no mark" is trusted again.
    let marks = builder(&url, "ttl")
        .restart_policy(RestartPolicy::Distrust {
            window: Duration::from_millis(100),
        })
        .build()
        .expect("build");
    let u = UserKey::from("short-lived");
    let t0 = Instant::now();
    marks
        .set_max(&u, Lsn(7), Duration::from_millis(300))
        .await
        .expect("set");
    assert_eq!(marks.restart_window(), Some(Duration::from_millis(300)));
    let m = marks
        .get(&u)
        .await
        .expect("get")
        .expect("a mark before expiry");
    assert!(m.expires_in <= Duration::from_millis(300));
    tokio::time::sleep(Duration::from_millis(450).saturating_sub(t0.elapsed())).await;
    assert_eq!(marks.get(&u).await.expect("get after expiry"), None);
    let mut r = raw(&url).await;
    let exists: bool = r.exists(marks.key_for(&u)).await.expect("EXISTS");
    assert!(!exists, "Redis dropped the key itself");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_marks() {
    let url = shared_redis_url().await;
    let prefix = unique_prefix("two");
    let a = builder(&url, "two").prefix(&prefix).build().expect("a");
    let b = builder(&url, "two").prefix(&prefix).build().expect("b");
    // Two "processes": two builds, two separate connections.
    a.ping().await.expect("a ping");
    b.ping().await.expect("b ping");

    let u = UserKey::from("bob");
    a.set_max(&u, Lsn(10), MIN).await.expect("a set");
    assert_eq!(b.get(&u).await.unwrap().map(|m| m.lsn), Some(Lsn(10)));
    b.set_max(&u, Lsn(30), MIN).await.expect("b set");
    a.set_max(&u, Lsn(20), MIN).await.expect("a set lower");
    assert_eq!(a.get(&u).await.unwrap().map(|m| m.lsn), Some(Lsn(30)));
    assert_eq!(b.get(&u).await.unwrap().map(|m| m.lsn), Some(Lsn(30)));
    // Through the trait object, as the router holds it.
    let dynamic: Arc<dyn WriterMarks> = Arc::new(b.clone());
    assert_eq!(dynamic.get(&u).await.unwrap().map(|m| m.lsn), Some(Lsn(30)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_on_two_instances_never_move_a_mark_backwards() {
    let url = shared_redis_url().await;
    let prefix = unique_prefix("race");
    let a = builder(&url, "race").prefix(&prefix).build().expect("a");
    let b = builder(&url, "race").prefix(&prefix).build().expect("b");
    let u = UserKey::from("carol");
    const TASKS: u64 = 8;
    const ROUNDS: u64 = 150;
    let started = Instant::now();
    let mut handles = Vec::new();
    for t in 0..TASKS {
        let marks = if t % 2 == 0 { a.clone() } else { b.clone() };
        let u = u.clone();
        handles.push(tokio::spawn(async move {
            let mut last_seen = Lsn(0);
            for i in 0..ROUNDS {
                // Interleaved LSNs, each task's increasing; tasks race on one key.
                let lsn = Lsn(i * TASKS + t + 1);
                marks.set_max(&u, lsn, MIN).await.expect("set_max");
                let seen = marks.get(&u).await.expect("get").expect("a mark").lsn;
                assert!(seen >= lsn, "mark {seen} below this task's own write {lsn}");
                assert!(
                    seen >= last_seen,
                    "mark went backwards: {last_seen} then {seen}"
                );
                last_seen = seen;
            }
        }));
    }
    for h in handles {
        h.await.expect("task");
    }
    let fin = a.get(&u).await.unwrap().map(|m| m.lsn);
    assert_eq!(fin, Some(Lsn((ROUNDS - 1) * TASKS + TASKS)));
    println!(
        "{} set_max + {} get on two instances in {:?}",
        TASKS * ROUNDS,
        TASKS * ROUNDS,
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_ids_get_distinct_well_formed_keys_and_round_trip() {
    let url = shared_redis_url().await;
    let prefix = unique_prefix("hostile");
    let marks = builder(&url, "hostile")
        .prefix(&prefix)
        .build()
        .expect("build");
    let ids: Vec<Vec<u8>> = vec![
        b"".to_vec(),
        vec![b'a'; 100 * 1024],
        vec![b'a'; 100 * 1024 - 1],
        b":".to_vec(),
        b"::".to_vec(),
        b"a:b".to_vec(),
        b"*".to_vec(),
        b"a*".to_vec(),
        b"?[]".to_vec(),
        b"\n".to_vec(),
        b"a\r\nSET x y\r\n".to_vec(),
        b"\0".to_vec(),
        vec![0xff, 0xfe, 0x00, 0x80],
        vec![0xc3, 0x28],
        b"{tag}".to_vec(),
        b"}{".to_vec(),
        b" ".to_vec(),
        b"epoch".to_vec(),
        prefix.as_bytes().to_vec(),
        format!("{prefix}epoch").into_bytes(),
        "\u{1F600}".as_bytes().to_vec(),
    ];
    let users: Vec<UserKey> = ids.iter().map(UserKey::new).collect();
    let mut keys = HashSet::new();
    let epoch = marks.epoch_key_for(&users[0]);
    for u in &users {
        let key = marks.key_for(u);
        let hex = key.strip_prefix(&prefix).expect("namespaced");
        assert_eq!(hex.len(), 64, "{key}");
        assert!(
            hex.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')),
            "{key}"
        );
        assert_ne!(key, epoch);
        assert!(keys.insert(key), "two ids share a key");
    }
    for (i, u) in users.iter().enumerate() {
        marks.set_max(u, Lsn(i as u64 + 1), MIN).await.expect("set");
    }
    for (i, u) in users.iter().enumerate() {
        let got = marks.get(u).await.expect("get").map(|m| m.lsn);
        assert_eq!(got, Some(Lsn(i as u64 + 1)), "id #{i}");
    }
    // Exactly one key per id, plus the epoch key, and nothing outside the namespace.
    let mut r = raw(&url).await;
    let pattern = format!("{prefix}*");
    let stored: Vec<String> = r.keys(&pattern).await.expect("KEYS");
    let stored: HashSet<String> = stored.into_iter().collect();
    let mut expected = keys.clone();
    expected.insert(epoch);
    assert_eq!(stored, expected);
    let stray: bool = r.exists("x").await.expect("EXISTS");
    assert!(!stray, "an id must never be interpreted as a command");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_values_are_errors_and_updates_repair_them() {
    let url = shared_redis_url().await;
    let marks = builder(&url, "foreign").build().expect("build");
    let u = UserKey::from("dave");
    let key = marks.key_for(&u);
    let mut r = raw(&url).await;
    // A TTL-only writer's "1" (or anything else) is not a mark: say so rather than guess.
    let _: () = r.set_ex(&key, "1", 60).await.expect("SET");
    let err = marks
        .get(&u)
        .await
        .expect_err("a foreign value is not a mark");
    assert!(err.to_string().contains("not a mark"), "{err}");
    marks.set_max(&u, Lsn(5), MIN).await.expect("set over it");
    assert_eq!(marks.get(&u).await.unwrap().map(|m| m.lsn), Some(Lsn(5)));
    assert!(marks.stats().errors >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configuration_errors_are_typed_and_never_show_passwords() {
    // Outside a runtime.
    let err = std::thread::spawn(|| RedisMarks::new("redis://127.0.0.1:6379/").map(|_| ()))
        .join()
        .expect("thread")
        .expect_err("no runtime");
    assert!(matches!(err, BuildError::NoRuntime), "{err}");
    for prefix in ["", "a{b}", "a b"] {
        let err = RedisMarks::builder("redis://127.0.0.1:6379/")
            .prefix(prefix)
            .build()
            .expect_err("bad prefix");
        assert!(matches!(err, BuildError::Config(_)), "{err}");
    }
    let err = RedisMarks::builder("redis://127.0.0.1:6379/")
        .timeout(Duration::ZERO)
        .build()
        .expect_err("zero timeout");
    assert!(matches!(err, BuildError::Config(_)), "{err}");
    let err = RedisMarks::new("http://nope").expect_err("bad url");
    assert!(matches!(err, BuildError::Connection(_)), "{err}");

    // A password in the URL reaches neither Debug nor errors. Port 1: nothing listens.
    let marks = RedisMarks::builder("redis://user:s3cret-pw@127.0.0.1:1/")
        .timeout(Duration::from_millis(50))
        .build()
        .expect("builds without connecting");
    let shown = format!("{marks:?}");
    assert!(!shown.contains("s3cret"), "{shown}");
    let err = marks
        .get(&UserKey::from("x"))
        .await
        .expect_err("nothing listens");
    let mut text = err.to_string();
    let mut source = std::error::Error::source(&err);
    while let Some(s) = source {
        text.push_str(&format!(" / {s} / {s:?}"));
        source = s.source();
    }
    assert!(!text.contains("s3cret"), "{text}");
    assert!(
        text.contains("127.0.0.1:1"),
        "errors name the server: {text}"
    );
}
