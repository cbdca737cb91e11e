//! Scale: read throughput through the router (`Eventual`, sqlx) as concurrency grows and as
//! replicas are added, each figure beside a raw sqlx `PgPool` on one replica measured in
//! interleaved rounds (the order flips every round). The machine's CPU use during the router's
//! rounds (`/proc/stat`) is recorded with each row: when it is near 1.0, the machine, not the
//! library, is the limit (PostgreSQL, the client and every replica share the same cores).

use crate::median;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use routing_core::{Consistency, PoolSettings, RequestContext, Router, RouterConfig};
use routing_sqlx::SqlxBackend;
use routing_testkit::{Cluster, READER_ROLE, WRITER_ROLE};
use serde::Serialize;
use sqlx::postgres::PgPoolOptions;

/// One (replicas, concurrency) point.
#[derive(Debug, Clone, Serialize)]
pub struct ScaleRow {
    /// Replicas the router was given (the raw pool always uses one).
    pub replicas: usize,
    /// Concurrent clients.
    pub concurrency: usize,
    /// Router reads per second (median over rounds).
    pub throughput: f64,
    /// Router read p50, milliseconds.
    pub p50_ms: f64,
    /// Router read p99, milliseconds.
    pub p99_ms: f64,
    /// Raw pool reads per second on one replica (median over rounds).
    pub baseline_throughput: f64,
    /// Median of the per-round router / raw throughput ratios.
    pub throughput_ratio: f64,
    /// Share of the machine's CPU time busy during the router's rounds (0..1, median).
    pub cpu_busy: f64,
    /// Rounds per side.
    pub rounds: usize,
}

/// Settings of a scale run.
#[derive(Debug, Clone)]
pub struct ScaleOptions {
    /// Concurrency levels.
    pub concurrency: Vec<usize>,
    /// Replica counts to give the router (at most the cluster's).
    pub replicas: Vec<usize>,
    /// Rounds per side.
    pub rounds: usize,
    /// Length of a round.
    pub round: Duration,
    /// Pool size per node, both sides.
    pub pool_size: u32,
}

const READ: &str = "SELECT v FROM scale_kv WHERE id = $1";
const ROWS: i32 = 1000;

type Op = Arc<dyn Fn(usize, u64) -> BoxFuture<'static, Result<(), String>> + Send + Sync>;

struct Sample {
    throughput: f64,
    p50_ms: f64,
    p99_ms: f64,
    cpu_busy: f64,
}

/// (busy, total) jiffies of the whole machine.
fn cpu_times() -> (u64, u64) {
    let Ok(s) = std::fs::read_to_string("/proc/stat") else {
        return (0, 0);
    };
    let v: Vec<u64> = s
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

async fn measure(op: &Op, conc: usize, dur: Duration) -> Result<Sample, String> {
    let (b0, t0) = cpu_times();
    let start = Instant::now();
    let deadline = start + dur;
    let tasks: Vec<_> = (0..conc)
        .map(|w| {
            let op = op.clone();
            tokio::spawn(async move {
                let mut lat = Vec::with_capacity(4096);
                let mut i = w as u64;
                while Instant::now() < deadline {
                    let t = Instant::now();
                    op(w, i).await?;
                    lat.push(t.elapsed());
                    i = i.wrapping_add(7919);
                }
                Ok::<_, String>(lat)
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.map_err(|e| e.to_string())??);
    }
    let elapsed = start.elapsed().as_secs_f64();
    let (b1, t1) = cpu_times();
    all.sort();
    Ok(Sample {
        throughput: all.len() as f64 / elapsed,
        p50_ms: crate::percentile_ms(&all, 0.5),
        p99_ms: crate::percentile_ms(&all, 0.99),
        cpu_busy: (b1 - b0) as f64 / (t1 - t0).max(1) as f64,
    })
}

/// Runs every (replicas, concurrency) point of `opts` on `cluster` whose replica count the
/// cluster has.
pub async fn run(cluster: &Cluster, opts: &ScaleOptions) -> Result<Vec<ScaleRow>, String> {
    let primary = cluster.primary();
    cluster
        .psql(
            primary,
            &format!(
                "DROP TABLE IF EXISTS scale_kv; \
                 CREATE TABLE scale_kv (id int PRIMARY KEY, v text NOT NULL); \
                 INSERT INTO scale_kv SELECT g, md5(g::text) FROM generate_series(0, {ROWS}) g; \
                 GRANT SELECT ON scale_kv TO {READER_ROLE}, {WRITER_ROLE}; ANALYZE scale_kv"
            ),
        )
        .map_err(|e| e.to_string())?;
    cluster
        .wait_replicated(Duration::from_secs(10))
        .map_err(|e| e.to_string())?;
    let replicas: Vec<usize> = (0..cluster.nodes().len())
        .filter(|&i| i != primary)
        .collect();
    let raw = PgPoolOptions::new()
        .max_connections(opts.pool_size)
        .connect(&cluster.url(replicas[0]))
        .await
        .map_err(|e| e.to_string())?;
    let raw = Arc::new(raw);
    let base_op: Op = Arc::new(move |_, i| {
        let raw = raw.clone();
        Box::pin(async move {
            sqlx::query_scalar::<_, String>(READ)
                .bind((i % ROWS as u64) as i32)
                .fetch_one(&*raw)
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        })
    });
    let mut rows = Vec::new();
    for &n in opts.replicas.iter().filter(|&&n| n <= replicas.len()) {
        let configs = cluster.node_configs();
        let nodes: Vec<_> = configs
            .into_iter()
            .enumerate()
            .filter(|(i, _)| *i == primary || replicas[..n].contains(i))
            .map(|(_, c)| c)
            .collect();
        let router = Router::builder(SqlxBackend::new())
            .nodes(nodes)
            .config(RouterConfig {
                default_consistency: Consistency::Eventual,
                pool: PoolSettings {
                    max_size: opts.pool_size,
                    ..PoolSettings::default()
                },
                ..RouterConfig::default()
            })
            .build()
            .await
            .map_err(|e| e.to_string())?;
        // Every replica readable before measuring.
        let deadline = Instant::now() + Duration::from_secs(10);
        while router.status().nodes.iter().filter(|s| s.readable).count() < n
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let ctx = Arc::new(RequestContext::new());
        let r2 = router.clone();
        let cand_op: Op = Arc::new(move |_, i| {
            let (router, ctx) = (r2.clone(), ctx.clone());
            Box::pin(async move {
                let mut conn = router.read_with(&ctx).await.map_err(|e| e.to_string())?;
                sqlx::query_scalar::<_, String>(READ)
                    .bind((i % ROWS as u64) as i32)
                    .fetch_one(&mut *conn)
                    .await
                    .map(drop)
                    .map_err(|e| e.to_string())
            })
        });
        for &conc in &opts.concurrency {
            measure(&base_op, conc, opts.round / 4).await?;
            measure(&cand_op, conc, opts.round / 4).await?;
            let (mut base, mut cand) = (Vec::new(), Vec::new());
            for round in 0..opts.rounds {
                if round % 2 == 0 {
                    base.push(measure(&base_op, conc, opts.round).await?);
                    cand.push(measure(&cand_op, conc, opts.round).await?);
                } else {
                    cand.push(measure(&cand_op, conc, opts.round).await?);
                    base.push(measure(&base_op, conc, opts.round).await?);
                }
            }
            let row = ScaleRow {
                replicas: n,
                concurrency: conc,
                throughput: median(cand.iter().map(|s| s.throughput).collect()),
                p50_ms: median(cand.iter().map(|s| s.p50_ms).collect()),
                p99_ms: median(cand.iter().map(|s| s.p99_ms).collect()),
                baseline_throughput: median(base.iter().map(|s| s.throughput).collect()),
                throughput_ratio: median(
                    base.iter()
                        .zip(&cand)
                        .map(|(b, c)| c.throughput / b.throughput.max(1e-9))
                        .collect(),
                ),
                cpu_busy: median(cand.iter().map(|s| s.cpu_busy).collect()),
                rounds: opts.rounds,
            };
            eprintln!(
                "scale: {} replica(s) c={:<2} router {:>6.0}/s raw {:>6.0}/s ({:.2}x) p50 {:.2} ms cpu {:.0} %",
                row.replicas,
                row.concurrency,
                row.throughput,
                row.baseline_throughput,
                row.throughput_ratio,
                row.p50_ms,
                row.cpu_busy * 100.0
            );
            rows.push(row);
        }
        router.shutdown();
    }
    Ok(rows)
}
