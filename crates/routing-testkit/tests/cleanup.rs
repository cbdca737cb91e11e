//! Nothing outlives a cluster: not on drop, not on panic, not when the test process is SIGKILLed.

mod common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use routing_testkit::{Cluster, ClusterBuilder};

/// Every process of the cluster: postmasters with all their children, and Redis.
fn all_pids(c: &Cluster) -> Vec<u32> {
    let mut pids = with_descendants(&c.server_pids());
    pids.extend(procs_mentioning(&c.dir().to_string_lossy()));
    pids.sort();
    pids.dedup();
    pids
}

fn assert_gone(dir: &std::path::Path, pids: &[u32], within: Duration) {
    let t = Instant::now();
    loop {
        let alive: Vec<u32> = pids.iter().copied().filter(|p| alive(*p)).collect();
        if alive.is_empty() && !dir.exists() {
            return;
        }
        assert!(
            t.elapsed() < within,
            "after {within:?}: live pids {alive:?}, dir exists: {}",
            dir.exists()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn drop_stops_every_process_and_removes_the_dir() {
    let c = ClusterBuilder::new()
        .replicas(2)
        .with_redis(true)
        .start()
        .unwrap();
    let dir = c.dir().to_path_buf();
    let pids = all_pids(&c);
    // 3 postmasters with their aux processes and walsenders/receivers, plus redis.
    assert!(pids.len() > 10, "suspiciously few processes: {pids:?}");
    assert!(c.server_pids().iter().all(|p| alive(*p)));
    drop(c);
    // Drop itself waits for the servers, so this must hold at once.
    assert_gone(&dir, &pids, Duration::ZERO);
    assert!(procs_mentioning(&dir.to_string_lossy()).is_empty());
}

#[test]
fn a_panicking_test_still_cleans_up() {
    let seen = std::sync::Mutex::new((PathBuf::new(), Vec::new()));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let c = ClusterBuilder::new()
            .replicas(1)
            .with_redis(true)
            .start()
            .unwrap();
        *seen.lock().unwrap() = (c.dir().to_path_buf(), all_pids(&c));
        panic!("test failure inside a cluster's scope");
    }));
    assert!(r.is_err());
    let (dir, pids) = seen.into_inner().unwrap();
    assert!(!pids.is_empty());
    assert_gone(&dir, &pids, Duration::ZERO);
}

/// Not a test on its own: the body of the SIGKILL test's child process.
#[test]
fn watchdog_helper() {
    if std::env::var_os("RTK_WATCHDOG_HELPER").is_none() {
        return;
    }
    let c = ClusterBuilder::new()
        .replicas(1)
        .with_redis(true)
        .start()
        .unwrap();
    println!("DIR={}", c.dir().display());
    println!(
        "PIDS={}",
        all_pids(&c)
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(",")
    );
    std::thread::sleep(Duration::from_secs(60));
}

/// Kills the helper process even when the test fails half-way.
struct KillOnDrop(std::process::Child);
impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn sigkilled_test_process_is_cleaned_by_the_watchdog() {
    let mut child = KillOnDrop(
        Command::new(std::env::current_exe().unwrap())
            .args([
                "watchdog_helper",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("RTK_WATCHDOG_HELPER", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut dir = None;
    let mut pids = Vec::new();
    for line in BufReader::new(child.0.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        // The harness prints "test watchdog_helper ... " on the same line.
        if let Some((_, d)) = line.split_once("DIR=") {
            dir = Some(PathBuf::from(d));
        }
        if let Some(p) = line.strip_prefix("PIDS=") {
            pids = p.split(',').map(|p| p.parse().unwrap()).collect();
            break;
        }
    }
    let dir = dir.expect("helper printed no dir");
    assert!(dir.exists() && pids.len() > 5, "{dir:?} {pids:?}");
    drop(child); // SIGKILL: no Drop, no unwinding in the helper
    let t = Instant::now();
    assert_gone(&dir, &pids, Duration::from_secs(15));
    eprintln!(
        "watchdog cleaned up {} processes in {:?}",
        pids.len(),
        t.elapsed()
    );
}

#[test]
fn stale_dirs_of_dead_processes_are_swept() {
    let base = scratch("rtk-sweep");
    // A pid that is certainly dead: a child we already reaped.
    let mut t = Command::new("true").spawn().unwrap();
    let dead = t.id();
    t.wait().unwrap();
    let stale = base.join(format!("c-{dead}-0"));
    std::fs::create_dir_all(stale.join("pg0")).unwrap();
    std::fs::write(stale.join("pg0/postmaster.pid"), format!("{dead}\n")).unwrap();
    // Our own live dir must survive.
    let live = base.join(format!("c-{}-999", std::process::id()));
    std::fs::create_dir_all(&live).unwrap();
    let c = ClusterBuilder::new()
        .replicas(0)
        .base_dir(&base)
        .start()
        .unwrap();
    assert!(!stale.exists(), "stale dir was not swept");
    assert!(live.exists(), "a live process's dir was swept");
    drop(c);
    std::fs::remove_dir_all(&base).unwrap();
}
