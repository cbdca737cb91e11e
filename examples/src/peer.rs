//! The router and pgpool-II side by side on one cluster and one mixed workload: 90 % reads and
//! 10 % writes, each read by a user who may just have written, from whatever session the client
//! pool hands out. Measured: throughput, latency, the replicas' share of reads, and stale reads
//! (a read older than the user's last acknowledged write).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rand::Rng;
use routing_core::{Consistency, InMemoryMarks, RequestContext, Router, RouterConfig};
use routing_sqlx::SqlxBackend;
use routing_testkit::{Cluster, WRITER_PASSWORD, WRITER_ROLE};
use serde::Serialize;
use sqlx::postgres::PgPoolOptions;

/// One system's figures on the mixed workload.
#[derive(Debug, Clone, Serialize)]
pub struct PeerRow {
    /// `router` (ReadYourWrites, in-memory marks) or `pgpool-II`.
    pub system: String,
    /// Replica apply delay during the run, milliseconds (0: natural lag).
    pub delay_ms: u64,
    /// Operations per second.
    pub throughput: f64,
    /// Median operation latency, milliseconds.
    pub p50_ms: f64,
    /// 99th percentile operation latency, milliseconds.
    pub p99_ms: f64,
    /// Share of reads a replica served.
    pub replica_share: f64,
    /// Reads older than the reading user's last acknowledged write.
    pub stale_reads: u64,
    /// Reads and writes done.
    pub reads: u64,
    /// Writes done.
    pub writes: u64,
    /// Operations that failed.
    pub failed: u64,
}

/// What one operation does, whatever the system.
trait System: Send + Sync + 'static {
    /// Increments the user's counter on the primary; the new value.
    fn write(&self, user: i64) -> futures_util::future::BoxFuture<'_, Result<i64, String>>;
    /// The user's counter and the port of the server that answered.
    fn read(&self, user: i64) -> futures_util::future::BoxFuture<'_, Result<(i64, i32), String>>;
}

const READ: &str = "SELECT val, pg_catalog.inet_server_port() FROM peer_kv WHERE id = $1";
const WRITE: &str = "UPDATE peer_kv SET val = val + 1 WHERE id = $1 RETURNING val";

struct Routed(Router<SqlxBackend>);

impl System for Routed {
    fn write(&self, user: i64) -> futures_util::future::BoxFuture<'_, Result<i64, String>> {
        Box::pin(async move {
            let ctx = RequestContext::new().user(user.to_string());
            let mut w = self.0.write_with(&ctx).await.map_err(|e| e.to_string())?;
            let v: i64 = sqlx::query_scalar(WRITE)
                .bind(user)
                .fetch_one(&mut *w)
                .await
                .map_err(|e| e.to_string())?;
            w.finish().await.map_err(|e| e.to_string())?;
            Ok(v)
        })
    }

    fn read(&self, user: i64) -> futures_util::future::BoxFuture<'_, Result<(i64, i32), String>> {
        Box::pin(async move {
            let ctx = RequestContext::new().user(user.to_string());
            let mut r = self.0.read_with(&ctx).await.map_err(|e| e.to_string())?;
            sqlx::query_as(READ)
                .bind(user)
                .fetch_one(&mut *r)
                .await
                .map_err(|e| e.to_string())
        })
    }
}

struct Pooled(sqlx::PgPool);

impl System for Pooled {
    fn write(&self, user: i64) -> futures_util::future::BoxFuture<'_, Result<i64, String>> {
        Box::pin(async move {
            sqlx::query_scalar(WRITE)
                .bind(user)
                .fetch_one(&self.0)
                .await
                .map_err(|e| e.to_string())
        })
    }

    fn read(&self, user: i64) -> futures_util::future::BoxFuture<'_, Result<(i64, i32), String>> {
        Box::pin(async move {
            sqlx::query_as(READ)
                .bind(user)
                .fetch_one(&self.0)
                .await
                .map_err(|e| e.to_string())
        })
    }
}

/// Settings of one comparison.
#[derive(Debug, Clone)]
pub struct PeerOptions {
    /// Length of each measured round.
    pub run_time: Duration,
    /// Concurrent clients (and pool size on either side).
    pub concurrency: usize,
    /// Rounds per system, interleaved (router, pgpool, router, ...); the median round is kept.
    pub rounds: usize,
    /// Replica apply delays to run at.
    pub delays: Vec<Duration>,
    /// Further routers to run beside the default one, each with this `wait_budget` (system
    /// `router wait=N ms`): the latency-first setting against pgpool-II.
    pub extra_wait_budgets: Vec<Duration>,
}

/// Runs the comparison on `cluster` (primary + replicas), starting pgpool-II in front of it.
pub async fn compare(cluster: &Cluster, opts: &PeerOptions) -> Result<Vec<PeerRow>, String> {
    let users = (opts.concurrency * 8) as i64;
    let primary = cluster.primary();
    cluster
        .psql(
            primary,
            &format!(
                "DROP TABLE IF EXISTS peer_kv; \
                 CREATE TABLE peer_kv (id bigint PRIMARY KEY, val bigint NOT NULL); \
                 INSERT INTO peer_kv SELECT g, 0 FROM generate_series(0, {users}) g; \
                 GRANT SELECT, UPDATE ON peer_kv TO {WRITER_ROLE}"
            ),
        )
        .map_err(|e| e.to_string())?;
    cluster
        .wait_replicated(Duration::from_secs(10))
        .map_err(|e| e.to_string())?;
    let pgpool = cluster
        .start_pgpool(opts.concurrency + 4)
        .map_err(|e| e.to_string())?;
    let primary_port = i32::from(cluster.node(primary).port());
    let build = |wait_budget: Option<Duration>| {
        let mut config = RouterConfig {
            default_consistency: Consistency::ReadYourWrites,
            pool: routing_core::PoolSettings {
                max_size: opts.concurrency as u32,
                ..routing_core::PoolSettings::default()
            },
            ..RouterConfig::default()
        };
        if let Some(b) = wait_budget {
            config.wait_budget = b;
        }
        Router::builder(SqlxBackend::new())
            .nodes(cluster.node_configs())
            .config(config)
            .marks(Arc::new(InMemoryMarks::default()))
            .build()
    };
    let router = build(None).await.map_err(|e| e.to_string())?;
    let mut systems: Vec<(String, Arc<dyn System>)> =
        vec![("router".into(), Arc::new(Routed(router.clone())))];
    let mut routers = vec![router];
    for &b in &opts.extra_wait_budgets {
        let r = build(Some(b)).await.map_err(|e| e.to_string())?;
        systems.push((
            format!("router wait={} ms", b.as_millis()),
            Arc::new(Routed(r.clone())),
        ));
        routers.push(r);
    }
    let pool = PgPoolOptions::new()
        .max_connections(opts.concurrency as u32)
        .connect(&pgpool.url(WRITER_ROLE, WRITER_PASSWORD))
        .await
        .map_err(|e| format!("connecting through pgpool: {e}"))?;
    systems.push(("pgpool-II".into(), Arc::new(Pooled(pool.clone()))));
    let mut rows = Vec::new();
    for &delay in &opts.delays {
        cluster
            .set_replicas_apply_delay(delay)
            .map_err(|e| e.to_string())?;
        let mut by_system: HashMap<&str, Vec<PeerRow>> = HashMap::new();
        for _ in 0..opts.rounds {
            for (name, system) in &systems {
                let row = round(name, system.clone(), opts, users, primary_port, delay).await;
                by_system.entry(name.as_str()).or_default().push(row);
            }
        }
        for (name, _) in &systems {
            let mut runs = by_system.remove(name.as_str()).unwrap_or_default();
            runs.sort_by(|a, b| a.throughput.total_cmp(&b.throughput));
            if let Some(median) = runs.get(runs.len() / 2) {
                rows.push(median.clone());
            }
        }
    }
    let _ = cluster.set_replicas_apply_delay(Duration::ZERO);
    pool.close().await;
    for r in routers {
        r.shutdown();
    }
    drop(pgpool);
    Ok(rows)
}

#[derive(Default)]
struct Tally {
    latencies: Vec<Duration>,
    reads: u64,
    writes: u64,
    on_replica: u64,
    stale: u64,
    failed: u64,
}

async fn round(
    name: &str,
    system: Arc<dyn System>,
    opts: &PeerOptions,
    users: i64,
    primary_port: i32,
    delay: Duration,
) -> PeerRow {
    let stop = Arc::new(AtomicBool::new(false));
    let per_worker = users / opts.concurrency as i64;
    let started = Instant::now();
    let workers: Vec<_> = (0..opts.concurrency as i64)
        .map(|w| {
            let (system, stop) = (system.clone(), stop.clone());
            tokio::spawn(async move {
                let mut t = Tally::default();
                // Each worker owns its users, so it knows their last acknowledged value.
                let mut acked: HashMap<i64, i64> = HashMap::new();
                let first = w * per_worker;
                while !stop.load(Ordering::Relaxed) {
                    let (user, write) = {
                        let mut rng = rand::rng();
                        (
                            first + rng.random_range(0..per_worker),
                            rng.random_bool(0.1),
                        )
                    };
                    let at = Instant::now();
                    if write {
                        match system.write(user).await {
                            Ok(v) => {
                                acked.insert(user, v);
                                t.writes += 1;
                            }
                            Err(_) => t.failed += 1,
                        }
                    } else {
                        let floor = acked.get(&user).copied().unwrap_or(i64::MIN);
                        match system.read(user).await {
                            Ok((v, port)) => {
                                t.reads += 1;
                                if port != primary_port {
                                    t.on_replica += 1;
                                }
                                if v < floor {
                                    t.stale += 1;
                                }
                            }
                            Err(_) => t.failed += 1,
                        }
                    }
                    t.latencies.push(at.elapsed());
                }
                t
            })
        })
        .collect();
    tokio::time::sleep(opts.run_time).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Tally::default();
    for w in workers {
        if let Ok(t) = w.await {
            all.latencies.extend(t.latencies);
            all.reads += t.reads;
            all.writes += t.writes;
            all.on_replica += t.on_replica;
            all.stale += t.stale;
            all.failed += t.failed;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.latencies.sort();
    let pct = |q: f64| crate::percentile_ms(&all.latencies, q);
    PeerRow {
        system: name.to_string(),
        delay_ms: delay.as_millis() as u64,
        throughput: (all.reads + all.writes) as f64 / elapsed,
        p50_ms: pct(0.5),
        p99_ms: pct(0.99),
        replica_share: all.on_replica as f64 / all.reads.max(1) as f64,
        stale_reads: all.stale,
        reads: all.reads,
        writes: all.writes,
        failed: all.failed,
    }
}
