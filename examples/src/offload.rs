//! Offload and read latency under lag: each user writes, then reads its value a few times
//! (twice as itself, once as another client carrying its token). Per consistency mode and
//! replica apply delay: the replicas' share of reads, stale reads, and read latency. `Primary`
//! is the baseline (every read on the primary) and `Eventual` the unprotected control.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use routing_core::{
    Consistency, InMemoryMarks, RequestContext, Router, RouterConfig, TokenCodec, TokenKey,
};
use routing_sqlx::SqlxBackend;
use routing_testkit::{Cluster, WRITER_ROLE};
use serde::{Deserialize, Serialize};

/// One mode at one delay.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OffloadRow {
    /// Consistency mode (`RecentWriterTtl(2s)` etc.).
    pub mode: String,
    /// Replica apply delay, milliseconds (0: natural lag).
    pub delay_ms: u64,
    /// Share of reads served by a replica.
    pub replica_share: f64,
    /// Reads older than the write they follow.
    pub stale_reads: u64,
    /// Median read latency, milliseconds.
    pub read_p50_ms: f64,
    /// 99th percentile read latency, milliseconds.
    pub read_p99_ms: f64,
    /// The read latency distribution: the latency at each of [`PERCENTILES`], in that order.
    pub read_latency_percentiles_ms: Vec<Percentile>,
    /// Reads done.
    pub reads: u64,
    /// Reads per second.
    pub read_throughput: f64,
    /// The router's wait budget for this row, milliseconds.
    pub wait_budget_ms: u64,
    /// Reads that waited for a replica to replay the LSN.
    pub lsn_waits: u64,
    /// Reads the primary served (fallbacks included).
    pub primary_reads: u64,
    /// Requests that failed.
    pub failed: u64,
}

/// The percentiles of read latency each row keeps (the chart draws them).
pub const PERCENTILES: [f64; 8] = [10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.9];

/// One point of a latency distribution.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Percentile {
    /// The percentile, 0-100 (`99.9`).
    pub p: f64,
    /// The latency at it, milliseconds.
    pub ms: f64,
}

/// Settings of an offload run.
#[derive(Debug, Clone)]
pub struct OffloadOptions {
    /// Length of each (mode, delay) run.
    pub run_time: Duration,
    /// Concurrent users writing and reading.
    pub concurrency: usize,
    /// Apply delays to run at.
    pub delays: Vec<Duration>,
    /// The router's wait budget (`RouterConfig::wait_budget`); `None` keeps the default.
    pub wait_budget: Option<Duration>,
    /// Further wait budgets to run `ReadYourWrites` and `Causal` with (named
    /// `ReadYourWrites wait=N ms`), to show what waiting for a replica costs against falling
    /// back to the primary (0: never wait).
    pub extra_wait_budgets: Vec<Duration>,
}

/// The modes compared, by name.
pub fn modes() -> Vec<(String, Consistency)> {
    vec![
        ("Primary".into(), Consistency::Primary),
        ("Eventual".into(), Consistency::Eventual),
        (
            "RecentWriterTtl(2s)".into(),
            Consistency::RecentWriterTtl {
                ttl: Duration::from_secs(2),
            },
        ),
        (
            "RecentWriterTtl(5s)".into(),
            Consistency::RecentWriterTtl {
                ttl: Duration::from_secs(5),
            },
        ),
        ("ReadYourWrites".into(), Consistency::ReadYourWrites),
        ("Causal".into(), Consistency::Causal),
    ]
}

const READ: &str = "SELECT val, pg_catalog.inet_server_port() FROM offload_kv WHERE id = $1";
const WRITE: &str = "UPDATE offload_kv SET val = val + 1 WHERE id = $1 RETURNING val";

/// Runs every mode at every delay on `cluster`.
pub async fn run(cluster: &Cluster, opts: &OffloadOptions) -> Result<Vec<OffloadRow>, String> {
    let primary = cluster.primary();
    let users = opts.concurrency as i64;
    cluster
        .psql(
            primary,
            &format!(
                "DROP TABLE IF EXISTS offload_kv; \
                 CREATE TABLE offload_kv (id bigint PRIMARY KEY, val bigint NOT NULL); \
                 INSERT INTO offload_kv SELECT g, 0 FROM generate_series(0, {users}) g; \
                 GRANT SELECT, UPDATE ON offload_kv TO {WRITER_ROLE}"
            ),
        )
        .map_err(|e| e.to_string())?;
    cluster
        .wait_replicated(Duration::from_secs(10))
        .map_err(|e| e.to_string())?;
    let primary_port = i32::from(cluster.node(primary).port());
    let mut rows = Vec::new();
    for &delay in &opts.delays {
        cluster
            .set_replicas_apply_delay(delay)
            .map_err(|e| e.to_string())?;
        let mut runs: Vec<(String, Consistency, Option<Duration>)> = modes()
            .into_iter()
            .map(|(name, mode)| (name, mode, opts.wait_budget))
            .collect();
        for &budget in &opts.extra_wait_budgets {
            for (name, mode) in modes() {
                if matches!(mode, Consistency::ReadYourWrites | Consistency::Causal) {
                    let name = format!("{name} wait={} ms", budget.as_millis());
                    runs.push((name, mode, Some(budget)));
                }
            }
        }
        for (name, mode, budget) in runs {
            let mut config = RouterConfig {
                default_consistency: mode,
                ..RouterConfig::default()
            };
            if let Some(budget) = budget {
                config.wait_budget = budget;
            }
            let budget_ms = config.wait_budget.as_millis() as u64;
            let router = Router::builder(SqlxBackend::new())
                .nodes(cluster.node_configs())
                .config(config)
                .marks(Arc::new(InMemoryMarks::default()))
                .tokens(TokenCodec::new(
                    TokenKey::new(1, "offload-benchmark-key-0123456789")
                        .map_err(|e| format!("{e:?}"))?,
                ))
                .build()
                .await
                .map_err(|e| e.to_string())?;
            let before = router.stats();
            let mut row = one(&router, &name, opts, primary_port, delay).await;
            let after = router.stats();
            row.wait_budget_ms = budget_ms;
            row.lsn_waits = after.lsn_waits - before.lsn_waits;
            row.primary_reads = after.reads_primary - before.reads_primary;
            rows.push(row);
            router.shutdown();
        }
    }
    let _ = cluster.set_replicas_apply_delay(Duration::ZERO);
    Ok(rows)
}

#[derive(Default)]
struct Tally {
    latencies: Vec<Duration>,
    on_replica: u64,
    stale: u64,
    failed: u64,
}

async fn one(
    router: &Router<SqlxBackend>,
    name: &str,
    opts: &OffloadOptions,
    primary_port: i32,
    delay: Duration,
) -> OffloadRow {
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let workers: Vec<_> = (0..opts.concurrency as i64)
        .map(|user| {
            let (router, stop) = (router.clone(), stop.clone());
            tokio::spawn(async move {
                let mut t = Tally::default();
                let me = RequestContext::new().user(user.to_string());
                while !stop.load(Ordering::Relaxed) {
                    let written = async {
                        let mut w = router.write_with(&me).await.ok()?;
                        let v: i64 = sqlx::query_scalar(WRITE)
                            .bind(user)
                            .fetch_one(&mut *w)
                            .await
                            .ok()?;
                        let receipt = w.finish().await.ok()?;
                        Some((v, receipt.causal))
                    }
                    .await;
                    let Some((value, causal)) = written else {
                        t.failed += 1;
                        continue;
                    };
                    // Twice as the user (carrying its token, as a client would), once as
                    // another client that got only the token.
                    for ctx in [
                        me.clone().token(causal),
                        me.clone().token(causal),
                        RequestContext::new().token(causal),
                    ] {
                        let at = Instant::now();
                        let read = async {
                            let mut r = router.read_with(&ctx).await.ok()?;
                            sqlx::query_as::<_, (i64, i32)>(READ)
                                .bind(user)
                                .fetch_one(&mut *r)
                                .await
                                .ok()
                        }
                        .await;
                        match read {
                            Some((v, port)) => {
                                t.latencies.push(at.elapsed());
                                if port != primary_port {
                                    t.on_replica += 1;
                                }
                                if v < value {
                                    t.stale += 1;
                                }
                            }
                            None => t.failed += 1,
                        }
                    }
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
            all.on_replica += t.on_replica;
            all.stale += t.stale;
            all.failed += t.failed;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.latencies.sort();
    let pct = |q: f64| crate::percentile_ms(&all.latencies, q);
    let reads = all.latencies.len() as u64;
    OffloadRow {
        mode: name.to_string(),
        delay_ms: delay.as_millis() as u64,
        replica_share: all.on_replica as f64 / reads.max(1) as f64,
        stale_reads: all.stale,
        read_p50_ms: pct(0.5),
        read_p99_ms: pct(0.99),
        read_latency_percentiles_ms: PERCENTILES
            .iter()
            .map(|&p| Percentile {
                p,
                ms: pct(p / 100.0),
            })
            .collect(),
        reads,
        read_throughput: reads as f64 / elapsed,
        wait_budget_ms: 0,
        lsn_waits: 0,
        primary_reads: 0,
        failed: all.failed,
    }
}
