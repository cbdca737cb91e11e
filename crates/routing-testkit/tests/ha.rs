//! The HA stack itself (feature `ha`): it starts, Patroni switches over, restarts a crashed
//! postmaster in place, fails over when the leader dies, and nothing is left behind.
//! Skipped (with a note) when patroni, etcd or haproxy is not installed: `cargo xtask ha`
//! installs them.
#![cfg(feature = "ha")]

use std::time::{Duration, Instant};

use routing_testkit::{HaStack, KitError};

const T: Duration = Duration::from_secs(90);

fn installed() -> bool {
    ["/usr/bin/patroni", "/usr/bin/etcd", "/usr/sbin/haproxy"]
        .iter()
        .all(|p| std::path::Path::new(p).exists())
}

#[test]
fn stack_survives_switchover_crash_and_leader_loss() -> Result<(), KitError> {
    if !installed() {
        eprintln!(
            "skipped: patroni, etcd-server or haproxy not installed (cargo xtask ha installs them)"
        );
        return Ok(());
    }
    let started = Instant::now();
    let ha = HaStack::builder().members(3).start()?;
    let dir = ha.dir().to_path_buf();
    let leader = ha.wait_healthy(T)?;
    eprintln!("up in {:?}, leader {leader}", started.elapsed());
    ha.psql(leader, "CREATE TABLE t (x int); INSERT INTO t VALUES (1)")?;
    // The roles a router uses exist on every member (created once on the leader).
    for i in 0..3 {
        let roles = ha.psql(
            i,
            "SELECT count(*) FROM pg_roles WHERE rolname IN ('routing_app','routing_reader','routing_monitor') AND NOT rolsuper",
        )?;
        assert_eq!(roles, "3", "member {i}");
    }

    ha.switchover(None)?;
    let deadline = Instant::now() + T;
    let new_leader = loop {
        match ha.leader() {
            Some(l) if l != leader => break l,
            _ if Instant::now() > deadline => panic!("no new leader after switchover"),
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    ha.wait_healthy(T)?;
    eprintln!(
        "switchover {leader} -> {new_leader} at {:?}",
        started.elapsed()
    );

    let before = ha.postmaster_pid(new_leader);
    ha.crash_postmaster(new_leader)?;
    std::thread::sleep(Duration::from_millis(200));
    let l = ha.wait_healthy(T)?;
    assert_ne!(ha.postmaster_pid(l), before);
    eprintln!(
        "postmaster restart done at {:?}, leader {l}",
        started.elapsed()
    );

    ha.kill_member(l)?;
    let deadline = Instant::now() + T;
    let after = loop {
        match ha.leader() {
            Some(n) if n != l => break n,
            _ if Instant::now() > deadline => panic!("no failover after leader loss"),
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    eprintln!("leader loss {l} -> {after} at {:?}", started.elapsed());
    ha.restart_member(l)?;
    ha.wait_healthy(T)?;
    assert_eq!(ha.psql(after, "SELECT x FROM t")?, "1");
    eprintln!("healthy again at {:?}", started.elapsed());

    drop(ha);
    assert!(!dir.exists(), "the stack's directory is gone");
    Ok(())
}
