//! Fault injection against real servers; each test owns its cluster since it breaks it.

mod common;

use std::time::{Duration, Instant};

use common::*;
use routing_testkit::{ClusterBuilder, KitError};

const T: Duration = Duration::from_secs(10);

#[test]
fn startup_time_of_primary_and_two_replicas() {
    // Warm the template (initdb) so the number is what every later cluster pays.
    drop(ClusterBuilder::new().replicas(0).start().unwrap());
    let t = Instant::now();
    let c = ClusterBuilder::new().replicas(2).start().unwrap();
    let took = t.elapsed();
    eprintln!(
        "startup of primary + 2 replicas: {took:?} (in {})",
        c.dir().display()
    );
    let t = Instant::now();
    let c2 = ClusterBuilder::new()
        .replicas(2)
        .with_redis(true)
        .start()
        .unwrap();
    eprintln!("startup of primary + 2 replicas + redis: {:?}", t.elapsed());
    let t = Instant::now();
    drop(c);
    drop(c2);
    eprintln!("drop of both: {:?}", t.elapsed());
    assert!(took < Duration::from_secs(15), "start took {took:?}");
}

#[test]
fn apply_delay_hides_a_commit_until_it_elapses() {
    let c = ClusterBuilder::new().replicas(1).start().unwrap();
    c.psql(0, "CREATE TABLE d (x int)").unwrap();
    c.wait_replicated(T).unwrap();
    let delay = Duration::from_millis(300);
    c.set_apply_delay(1, delay).unwrap();
    assert_eq!(c.psql(1, "SHOW recovery_min_apply_delay").unwrap(), "300ms");

    let mut primary = RawSession::connect(c.node(0).port());
    let mut replica = RawSession::connect(c.node(1).port());
    primary.one("INSERT INTO d VALUES (1)");
    let committed = Instant::now();
    let right_after = replica.one("SELECT count(*) FROM d");
    let checked_within = committed.elapsed();
    assert!(
        checked_within < delay,
        "check itself took {checked_within:?}; machine too slow to judge"
    );
    assert_eq!(
        right_after, "0",
        "row visible {checked_within:?} after commit despite a {delay:?} delay"
    );
    while replica.one("SELECT count(*) FROM d") != "1" {
        assert!(committed.elapsed() < T, "delayed row never arrived");
        std::thread::sleep(Duration::from_millis(2));
    }
    let seen = committed.elapsed();
    eprintln!("delayed row visible after {seen:?}");
    assert!(
        seen >= delay - Duration::from_millis(50),
        "visible after {seen:?}, before the delay"
    );
    // wait_replicated must see the lag too.
    c.psql(0, "INSERT INTO d VALUES (2)").unwrap();
    assert!(matches!(
        c.wait_replicated(Duration::from_millis(100)),
        Err(KitError::Timeout { .. })
    ));

    c.clear_apply_delay(1).unwrap();
    c.psql(0, "INSERT INTO d VALUES (3)").unwrap();
    let t = Instant::now();
    c.wait_replicated(T).unwrap();
    assert_eq!(c.psql(1, "SELECT count(*) FROM d").unwrap(), "3");
    eprintln!("without delay replicated in {:?}", t.elapsed());
}

#[test]
fn paused_replica_stays_behind_until_resumed() {
    let c = ClusterBuilder::new().replicas(1).start().unwrap();
    c.psql(0, "CREATE TABLE p (x int)").unwrap();
    c.wait_replicated(T).unwrap();
    c.pause_replay(1).unwrap();
    assert_eq!(
        c.psql(1, "SELECT pg_get_wal_replay_pause_state()").unwrap(),
        "paused"
    );
    c.psql(0, "INSERT INTO p SELECT generate_series(1, 10)")
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(c.psql(1, "SELECT count(*) FROM p").unwrap(), "0");
    assert!(matches!(
        c.wait_replicated(Duration::from_millis(300)),
        Err(KitError::Timeout { .. })
    ));
    // The WAL did arrive; only replay is frozen.
    assert_eq!(
        c.psql(
            1,
            "SELECT pg_last_wal_receive_lsn() > pg_last_wal_replay_lsn()"
        )
        .unwrap(),
        "t"
    );
    c.resume_replay(1).unwrap();
    c.wait_replicated(T).unwrap();
    assert_eq!(c.psql(1, "SELECT count(*) FROM p").unwrap(), "10");
}

#[test]
fn failover_promotes_a_replica_and_the_other_follows() {
    let c = ClusterBuilder::new().replicas(2).start().unwrap();
    c.psql(0, "CREATE TABLE f (x int); INSERT INTO f VALUES (1)")
        .unwrap();
    c.wait_replicated(T).unwrap();

    c.kill(0).unwrap();
    assert!(!c.is_running(0));
    assert!(c.psql(0, "SELECT 1").is_err(), "killed node still answers");
    // A write on a replica is refused before promotion...
    assert!(c.psql(1, "INSERT INTO f VALUES (2)").is_err());
    let t = Instant::now();
    c.promote(1).unwrap();
    eprintln!("promote took {:?}", t.elapsed());
    assert_eq!(c.primary(), 1);
    assert_eq!(c.psql(1, "SELECT pg_is_in_recovery()").unwrap(), "f");
    // ...and accepted after it.
    c.psql(1, "INSERT INTO f VALUES (2)").unwrap();

    let t = Instant::now();
    c.follow(2, 1).unwrap();
    eprintln!("follow took {:?}", t.elapsed());
    c.psql(1, "INSERT INTO f VALUES (3)").unwrap();
    c.wait_replicated(T).unwrap();
    assert_eq!(
        c.psql(2, "SELECT string_agg(x::text, ',' ORDER BY x) FROM f")
            .unwrap(),
        "1,2,3"
    );
    assert_eq!(
        c.psql(1, "SELECT application_name FROM pg_stat_replication")
            .unwrap(),
        "pg2"
    );
    assert_eq!(
        c.psql(2, "SELECT received_tli FROM pg_stat_wal_receiver")
            .unwrap(),
        "2"
    );
}

#[test]
fn killed_replica_restarts_and_catches_up() {
    let c = ClusterBuilder::new().replicas(1).start().unwrap();
    let port = c.node(1).port();
    c.psql(0, "CREATE TABLE r (x int)").unwrap();
    c.kill(1).unwrap();
    assert!(!c.is_running(1));
    c.kill(1).unwrap(); // already down: fine
    c.psql(0, "INSERT INTO r VALUES (1)").unwrap();
    let t = Instant::now();
    c.restart(1).unwrap();
    eprintln!("replica restart took {:?}", t.elapsed());
    assert!(c.is_running(1));
    assert_eq!(c.node(1).port(), port);
    c.wait_replicated(T).unwrap();
    assert_eq!(c.psql(1, "SELECT count(*) FROM r").unwrap(), "1");
    assert_eq!(c.psql(1, "SELECT pg_is_in_recovery()").unwrap(), "t");
    // Restart of the primary too (crash recovery, same port).
    c.kill(0).unwrap();
    c.restart(0).unwrap();
    c.psql(0, "INSERT INTO r VALUES (2)").unwrap();
    c.wait_replicated(T).unwrap();
    assert_eq!(c.psql(1, "SELECT count(*) FROM r").unwrap(), "2");
}

#[test]
fn synchronous_commit_waits_for_a_standby() {
    let c = ClusterBuilder::new()
        .replicas(1)
        .synchronous(true)
        .start()
        .unwrap();
    assert_eq!(
        c.psql(0, "SHOW synchronous_standby_names").unwrap(),
        "ANY 1 (*)"
    );
    assert_eq!(
        c.psql(0, "SELECT sync_state FROM pg_stat_replication")
            .unwrap(),
        "quorum"
    );
    c.psql(0, "CREATE TABLE s (x int); INSERT INTO s VALUES (1)")
        .unwrap();
    // Without its standby a commit blocks in the SyncRep wait (until cancelled).
    c.kill(1).unwrap();
    std::thread::scope(|sc| {
        let insert = sc.spawn(|| c.psql(0, "INSERT INTO s VALUES (2)"));
        wait_for(
            &c,
            0,
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'SyncRep'",
            "1",
            T,
        );
        std::thread::sleep(Duration::from_millis(200));
        assert!(
            !insert.is_finished(),
            "commit returned without a synchronous standby"
        );
        c.psql(
            0,
            "SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE wait_event = 'SyncRep'",
        )
        .unwrap();
        insert.join().unwrap().unwrap();
    });
    // Back with its standby, commits go through again.
    c.restart(1).unwrap();
    c.psql(0, "INSERT INTO s VALUES (3)").unwrap();
    c.wait_replicated(T).unwrap();
    assert_eq!(c.psql(1, "SELECT count(*) FROM s").unwrap(), "3");
}
