//! Two routers (two "processes") sharing RedisMarks, over sqlx, on a primary with two delayed
//! replicas: Redis is killed in the middle of a write-then-read workload and restarted empty.
//! No request may fail, no marked user may read older data than their own write, reads fall back
//! to the primary while marks cannot be read, and go back to replicas once Redis is back.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use routing_redis::{Lsn, Mark, MarksError, RedisMarks, RestartPolicy, UserKey, WriterMarks};
use routing_sqlx::sqlx;
use routing_sqlx::{Consistency, RequestContext, Router, RouterConfig, SqlxBackend};
use routing_testkit::{Cluster, ClusterBuilder};
use support::{blocking, unique_prefix};

/// Replicas apply each commit this long after it happened: a read right after a write on a
/// replica would be stale.
const APPLY_DELAY: Duration = Duration::from_millis(300);
/// Router mark TTL and RedisMarks restart window (short, so the test sees the window end).
const MARK_TTL: Duration = Duration::from_secs(2);
const HOT_USERS: usize = 4;
const COLD_USERS: usize = 4;

/// RedisMarks as a router sees it, with every call recorded: on a stale read the test prints
/// what the marks store answered for that user.
#[derive(Debug, Clone)]
struct Traced {
    inner: RedisMarks,
    name: &'static str,
    t0: Instant,
    trace: Arc<Mutex<Vec<(UserKey, String)>>>,
}

impl Traced {
    fn note(&self, user: &UserKey, what: String) {
        let at = self.t0.elapsed();
        self.trace
            .lock()
            .push((user.clone(), format!("{at:.3?} {}: {what}", self.name)));
    }
}

#[routing_core::async_trait]
impl WriterMarks for Traced {
    async fn get(&self, user: &UserKey) -> Result<Option<Mark>, MarksError> {
        let t = Instant::now();
        let r = self.inner.get(user).await;
        let shown = match &r {
            Ok(m) => format!("get -> {:?}", m.map(|m| m.lsn)),
            Err(e) => format!("get -> error {e}"),
        };
        self.note(user, format!("{shown} in {:.1?}", t.elapsed()));
        r
    }

    async fn set_max(&self, user: &UserKey, lsn: Lsn, ttl: Duration) -> Result<(), MarksError> {
        let t = Instant::now();
        self.note(user, format!("set_max {lsn} starts"));
        let r = self.inner.set_max(user, lsn, ttl).await;
        self.note(
            user,
            format!(
                "set_max {lsn} -> {:?} in {:.1?}",
                r.as_ref().map_err(|e| e.to_string()),
                t.elapsed()
            ),
        );
        r
    }
}

#[derive(Debug, Clone)]
struct Read {
    at: Instant,
    /// Read right after the user's own write (a replica cannot have it yet).
    fresh: bool,
    /// A user whose only write is long past (no live mark).
    cold: bool,
    on_primary: bool,
}

#[derive(Default)]
struct Log {
    reads: Vec<Read>,
    failures: Vec<String>,
    stale: Vec<String>,
    writes: u64,
}

async fn router(c: &Cluster, marks: Traced) -> Router {
    Router::builder(SqlxBackend::new())
        .nodes(c.node_configs())
        .config(RouterConfig {
            default_consistency: Consistency::ReadYourWrites,
            probe_interval: Duration::from_millis(50),
            probe_timeout: Duration::from_millis(500),
            mark_ttl: MARK_TTL,
            marks_timeout: Duration::from_millis(50),
            ..RouterConfig::default()
        })
        .marks(Arc::new(marks))
        .build()
        .await
        .expect("router builds")
}

fn uid(kind: &str, i: usize) -> String {
    format!("{kind}-{i}")
}

/// One write (through `writer`) of user `id`'s counter; returns the committed value.
async fn write(writer: &Router, id: &str) -> Result<i64, String> {
    let ctx = RequestContext::new().user(id);
    let mut w = writer.write_with(&ctx).await.map_err(|e| e.to_string())?;
    let n = sqlx::query_scalar::<_, i64>("UPDATE kv SET n = n + 1 WHERE id = $1 RETURNING n")
        .bind(id)
        .fetch_one(&mut *w)
        .await;
    let n = w.check(n).map_err(|e| e.to_string())?;
    w.finish().await.map_err(|e| e.to_string())?;
    Ok(n)
}

/// One read (through `reader`) of user `id`'s counter: (value, served by the primary).
async fn read(reader: &Router, id: &str) -> Result<(i64, bool), String> {
    let ctx = RequestContext::new().user(id);
    let mut r = reader.read_with(&ctx).await.map_err(|e| e.to_string())?;
    let n = sqlx::query_scalar::<_, i64>("SELECT n FROM kv WHERE id = $1")
        .bind(id)
        .fetch_one(&mut *r)
        .await;
    let n = r.check(n).map_err(|e| e.to_string())?;
    Ok((n, r.on_primary()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_dies_mid_workload_without_failed_requests_or_stale_reads() {
    let cluster = blocking(|| {
        Arc::new(
            ClusterBuilder::new()
                .replicas(2)
                .with_redis(true)
                .start()
                .expect("cluster"),
        )
    })
    .await;
    let url = cluster.redis_url().expect("redis");
    let c = cluster.clone();
    blocking(move || {
        let mut sql = String::from("CREATE TABLE kv (id text PRIMARY KEY, n bigint NOT NULL);");
        for kind in ["hot", "cold"] {
            for i in 0..HOT_USERS.max(COLD_USERS) {
                sql.push_str(&format!("INSERT INTO kv VALUES ('{}', 0);", uid(kind, i)));
            }
        }
        c.psql(c.primary(), &sql).expect("schema");
        c.wait_replicated(Duration::from_secs(10))
            .expect("replicated");
        for i in 0..c.nodes().len() {
            if i != c.primary() {
                c.set_apply_delay(i, APPLY_DELAY).expect("apply delay");
            }
        }
    })
    .await;

    // Two processes: each with its own router and its own RedisMarks on the shared Redis.
    let prefix = unique_prefix("router");
    let marks = || {
        RedisMarks::builder(url.as_str())
            .prefix(&prefix)
            .restart_policy(RestartPolicy::Distrust { window: MARK_TTL })
            .build()
            .expect("marks")
    };
    let (marks_a, marks_b) = (marks(), marks());
    let trace = Arc::new(Mutex::new(Vec::new()));
    let t0 = Instant::now();
    let traced = |inner: &RedisMarks, name| Traced {
        inner: inner.clone(),
        name,
        t0,
        trace: trace.clone(),
    };
    let a = router(&cluster, traced(&marks_a, "A")).await;
    let b = router(&cluster, traced(&marks_b, "B")).await;
    // Cold users wrote once, long ago (their marks expire before the workload starts).
    for i in 0..COLD_USERS {
        write(&a, &uid("cold", i)).await.expect("cold write");
    }
    // The store's first use opened a restart window: let it pass (and the cold marks expire).
    tokio::time::sleep(MARK_TTL + Duration::from_millis(500)).await;
    let workload_began = Instant::now();
    println!(
        "workload begins {:?} after the routers were built",
        t0.elapsed()
    );

    let log = Arc::new(Mutex::new(Log::default()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for i in 0..HOT_USERS {
        let (a, b, log, stop) = (a.clone(), b.clone(), log.clone(), stop.clone());
        // Half the users write through one process and read through the other, half the reverse.
        let (w, r) = if i % 2 == 0 { (a, b) } else { (b, a) };
        tasks.push(tokio::spawn(async move {
            let id = uid("hot", i);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let written = match write(&w, &id).await {
                    Ok(n) => n,
                    Err(e) => {
                        log.lock().failures.push(format!("write {id}: {e}"));
                        continue;
                    }
                };
                log.lock().writes += 1;
                // Right after the write, then once the replicas have had time to apply it.
                for fresh in [true, false] {
                    if !fresh {
                        tokio::time::sleep(APPLY_DELAY + Duration::from_millis(150)).await;
                    }
                    let at = Instant::now();
                    match read(&r, &id).await {
                        Ok((n, on_primary)) => {
                            let mut l = log.lock();
                            if n < written {
                                l.stale.push(format!(
                                    "{id} wrote {written}, read {n} (fresh: {fresh}, primary: \
                                     {on_primary}) at {:?}",
                                    t0.elapsed()
                                ));
                            }
                            l.reads.push(Read {
                                at,
                                fresh,
                                cold: false,
                                on_primary,
                            });
                        }
                        Err(e) => log.lock().failures.push(format!("read {id}: {e}")),
                    }
                }
            }
        }));
    }
    for i in 0..COLD_USERS {
        let (r, log, stop) = (b.clone(), log.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let id = uid("cold", i);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let at = Instant::now();
                match read(&r, &id).await {
                    Ok((n, on_primary)) => {
                        let mut l = log.lock();
                        if n < 1 {
                            l.stale.push(format!("{id} wrote 1, read {n}"));
                        }
                        l.reads.push(Read {
                            at,
                            fresh: false,
                            cold: true,
                            on_primary,
                        });
                    }
                    Err(e) => log.lock().failures.push(format!("read {id}: {e}")),
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }));
    }

    // Healthy for a while, then Redis dies, then it comes back empty.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before_kill = (a.stats(), b.stats());
    let c = cluster.clone();
    let killed_at = blocking(move || {
        c.kill_redis().expect("kill redis");
        Instant::now()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let down = (a.stats(), b.stats());
    let c = cluster.clone();
    println!("killed Redis at {:?}", killed_at - t0);
    let (restart_began, restarted_at) = blocking(move || {
        let began = Instant::now();
        c.restart_redis().expect("restart redis");
        (began, Instant::now())
    })
    .await;
    println!(
        "restarted Redis {:?}..{:?}",
        restart_began - t0,
        restarted_at - t0
    );
    // The restart window (MARK_TTL, from the first operation after the restart), then some
    // more healthy time.
    tokio::time::sleep(MARK_TTL + Duration::from_millis(2500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in tasks {
        t.await.expect("workload task");
    }
    let end = (a.stats(), b.stats());
    let log = log.lock();

    let margin = Duration::from_millis(100);
    let phase = |from: Instant, to: Instant, pick: &dyn Fn(&Read) -> bool| {
        let rs: Vec<&Read> = log
            .reads
            .iter()
            .filter(|r| r.at >= from && r.at < to && pick(r))
            .collect();
        let primary = rs.iter().filter(|r| r.on_primary).count();
        (rs.len(), primary)
    };
    let settled = |r: &Read| !r.fresh;
    let healthy = phase(workload_began, killed_at, &settled);
    let outage = phase(killed_at + margin, restart_began, &|_| true);
    let window = phase(
        restarted_at + margin,
        restarted_at + MARK_TTL - margin,
        &|r| r.cold,
    );
    let recovered = phase(
        restarted_at + MARK_TTL + Duration::from_millis(1000),
        Instant::now(),
        &settled,
    );
    println!(
        "{} writes, {} reads in {:?}; (reads, on primary): healthy settled {healthy:?}, \
         outage all {outage:?}, restart window cold {window:?}, recovered settled {recovered:?}",
        log.writes,
        log.reads.len(),
        workload_began.elapsed()
    );
    println!("router A stats at end: {:?}", end.0);
    println!("router B stats at end: {:?}", end.1);
    println!(
        "marks A {:?}\nmarks B {:?}",
        marks_a.stats(),
        marks_b.stats()
    );

    assert!(
        log.failures.is_empty(),
        "failed requests: {:?}",
        log.failures
    );
    if !log.stale.is_empty() {
        let trace = trace.lock();
        for line in &log.stale {
            let id = line.split(' ').next().unwrap_or_default();
            let user = UserKey::from(id);
            println!("marks calls for {id}:");
            let calls: Vec<&String> = trace
                .iter()
                .filter(|(u, _)| *u == user)
                .map(|(_, w)| w)
                .collect();
            for what in &calls[calls.len().saturating_sub(16)..] {
                println!("  {what}");
            }
        }
    }
    assert!(log.stale.is_empty(), "stale reads: {:?}", log.stale);
    assert!(log.writes >= 10, "the workload ran: {} writes", log.writes);

    // Healthy: settled reads (marked users whose write has been replayed, and cold users) are
    // served by replicas.
    assert!(healthy.0 >= 10, "{healthy:?}");
    assert!(
        healthy.1 * 5 <= healthy.0,
        "healthy reads mostly on replicas: {healthy:?}"
    );
    // Redis down: every user read goes to the primary, counted as marks errors; lost mark
    // updates are counted too.
    assert!(outage.0 >= 10, "{outage:?}");
    assert_eq!(
        outage.1, outage.0,
        "outage reads all on the primary: {outage:?}"
    );
    let marks_errors = (down.0.marks_errors + down.1.marks_errors)
        - (before_kill.0.marks_errors + before_kill.1.marks_errors);
    assert!(marks_errors > 0, "marks errors during the outage");
    let lost_updates = (down.0.mark_update_failures + down.1.mark_update_failures)
        - (before_kill.0.mark_update_failures + before_kill.1.mark_update_failures);
    assert!(lost_updates > 0, "lost mark updates during the outage");
    // Restarted empty: users without a mark are unknown for one mark TTL, so on the primary.
    assert!(window.0 >= 5, "{window:?}");
    assert_eq!(
        window.1, window.0,
        "restart window: cold reads on the primary: {window:?}"
    );
    // Then back to replicas.
    assert!(recovered.0 >= 10, "{recovered:?}");
    assert!(
        recovered.1 * 5 <= recovered.0,
        "recovered reads mostly on replicas: {recovered:?}"
    );
}
