//! `cargo xtask bench [--quick] [--json FILE]`: what routing costs per request (issue #15 part 1-2,
//! issue #17), measured side by side with the plain driver pools on one test-kit cluster.
//!
//! - **Overhead**: the same point query (reads) and a one-row insert (writes) through the raw
//!   driver pool, through two hand-rolled pools (a writer pool on the primary and a reader pool
//!   on the replica, picked by hand per request: the cheat sheet's approach) and through the
//!   router, for sqlx (`PgPool`, its defaults but the router's pool
//!   size) and diesel-async (bb8 with diesel-async's manager defaults, same size), at
//!   concurrency 1 and 16. The three sides run in interleaved rounds (every order in turn) and
//!   each figure is the median over the rounds, so machine noise hits all three.
//!   The router is given the primary and the *same* replica the raw read pool uses.
//! - **Breakdown**: per request, the PostgreSQL round trips (ReadyForQuery messages counted by a
//!   small TCP proxy in front of the primary and the replica), Redis commands (Redis'
//!   `total_commands_processed`), marks-store calls, session resets (each a spawned task) and
//!   where the time goes (checkout, the work, the guard's drop), at concurrency 1.
//!
//! - **Decision** (`decision_ns`): the routing decision in-process on routing-core's fake
//!   backend, as its criterion bench does (`routing_examples::decision`).
//! - **Scale**: Eventual read throughput at concurrency 1/4/16/64 with 1, 2 (and in the full run
//!   4) replicas beside a raw pool, with the machine's CPU use (`routing_examples::scale`).
//! - **Offload**: the read-after-write workload per mode and apply delay, with the default wait
//!   budget and with others for ReadYourWrites/Causal (`routing_examples::offload`).
//! - **Peer**: pgpool-II beside the router on a 90/10 mixed workload (`routing_examples::peer`).
//! - **Failover**: promotion to first write, killed and blackholed primary, fresh clusters
//!   (`routing_examples::failover`).
//!
//! Writes the JSON (`--json`, default `target/bench/bench.json`), a markdown report and the
//! chart, as SVG and PNG (`routing_examples::chart`, drawn with plotters: the read latency
//! distribution per mode at 50 ms delay, replica share per mode by delay) next to it. `--quick` (about 40 s) is run by `examples/tests/bench_quick.rs`.

use routing_examples::median;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use routing_core::{
    CausalToken, Consistency, InMemoryMarks, Lsn, Mark, MarksError, NodeConfig, RequestContext,
    Router, RouterConfig, TokenCodec, TokenKey, UserKey, WriterMarks,
};
use routing_examples::failover::Fault;
use routing_examples::offload::OffloadOptions;
use routing_examples::peer::PeerOptions;
use routing_examples::scale::ScaleOptions;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

type Res = Result<(), String>;
/// One request of a scenario; the argument is the worker's index.
type Op = Arc<dyn Fn(usize) -> BoxFuture<'static, Res> + Send + Sync>;

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

#[derive(Clone)]
struct Settings {
    quick: bool,
    rounds: usize,
    round: Duration,
    breakdown_requests: usize,
    /// Offload: length of each (mode, delay) run, concurrency, delays, extra wait budgets.
    offload: routing_examples::offload::OffloadOptions,
    /// Peer: pgpool-II beside the router.
    peer: routing_examples::peer::PeerOptions,
    /// Failover runs per fault kind.
    failover_runs: usize,
    /// Scale on the main cluster (1 and 2 replicas) and, when `scale_four`, on a 4-replica one.
    scale: routing_examples::scale::ScaleOptions,
    scale_four: bool,
    /// Decision timing: rounds and calls per round.
    decision: (usize, usize),
}

const CONCURRENCY: [usize; 2] = [1, 16];
const POOL_SIZE: u32 = 16;
const ROWS: i32 = 1000;
const READ_SQL: &str = "SELECT v FROM bench_kv WHERE id = $1";
const INSERT_SQL: &str = "INSERT INTO bench_w (v) VALUES ($1)";

// ---------------------------------------------------------------------------------------------
// Counting: where round trips and time go.

/// Time spent per phase of a request (sums, ns), for the breakdown.
#[derive(Default)]
struct Phases {
    requests: AtomicU64,
    checkout: AtomicU64,
    work: AtomicU64,
    release: AtomicU64,
}

impl Phases {
    fn add(&self, checkout: Duration, work: Duration, release: Duration) {
        self.requests.fetch_add(1, Relaxed);
        self.checkout.fetch_add(checkout.as_nanos() as u64, Relaxed);
        self.work.fetch_add(work.as_nanos() as u64, Relaxed);
        self.release.fetch_add(release.as_nanos() as u64, Relaxed);
    }
    fn mean_us(&self) -> (f64, f64, f64) {
        let n = self.requests.load(Relaxed).max(1) as f64;
        let us = |a: &AtomicU64| a.load(Relaxed) as f64 / n / 1000.0;
        (us(&self.checkout), us(&self.work), us(&self.release))
    }
}

/// Times a request's phases when the scenario has a [`Phases`] to fill.
struct Clock(Instant, Vec<Duration>);
impl Clock {
    fn start() -> Self {
        Clock(Instant::now(), Vec::with_capacity(3))
    }
    fn lap(&mut self) {
        let now = Instant::now();
        self.1.push(now - self.0);
        self.0 = now;
    }
    fn record(self, phases: &Phases) {
        if let [a, b, c] = self.1[..] {
            phases.add(a, b, c);
        }
    }
}

/// A marks store that counts the calls made to the one it wraps.
struct CountingMarks {
    inner: Arc<dyn WriterMarks>,
    calls: AtomicU64,
}

#[routing_core::async_trait]
impl WriterMarks for CountingMarks {
    async fn get(&self, user: &UserKey) -> Result<Option<Mark>, MarksError> {
        self.calls.fetch_add(1, Relaxed);
        self.inner.get(user).await
    }
    async fn set_max(&self, user: &UserKey, lsn: Lsn, ttl: Duration) -> Result<(), MarksError> {
        self.calls.fetch_add(1, Relaxed);
        self.inner.set_max(user, lsn, ttl).await
    }
}

/// A TCP proxy that counts the ReadyForQuery messages PostgreSQL sends: one per round trip
/// (each simple query and each extended-protocol Sync ends with one).
struct CountingProxy {
    port: u16,
    ready: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl CountingProxy {
    async fn start(target: u16) -> Result<Self, String> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(err)?;
        let port = listener.local_addr().map_err(err)?.port();
        let ready = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (r, s) = (ready.clone(), stop.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if s.load(Relaxed) {
                    break;
                }
                let r = r.clone();
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                    else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let up = tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut cr, &mut sw).await;
                        let _ = sw.shutdown().await;
                    });
                    let mut parser = ZCounter::default();
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match sr.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        let z = parser.feed(&buf[..n]);
                        r.fetch_add(z, Relaxed);
                        if cw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    let _ = cw.shutdown().await;
                    up.abort();
                });
            }
        });
        Ok(CountingProxy { port, ready, stop })
    }
    fn count(&self) -> u64 {
        self.ready.load(Relaxed)
    }
}

impl Drop for CountingProxy {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
        // Wake the accept loop so it sees `stop`.
        let _ = std::net::TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// Parses the server-to-client message stream (type byte, 4-byte length) and counts `Z`.
#[derive(Default)]
struct ZCounter {
    started: bool,
    header: Vec<u8>,
    skip: usize,
}

impl ZCounter {
    fn feed(&mut self, mut data: &[u8]) -> u64 {
        let mut z = 0;
        if !self.started && !data.is_empty() {
            self.started = true;
            // An answer to SSLRequest is one byte without a length.
            if data[0] == b'N' || data[0] == b'S' {
                data = &data[1..];
            }
        }
        while !data.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(data.len());
                self.skip -= n;
                data = &data[n..];
                continue;
            }
            let need = 5 - self.header.len();
            let n = need.min(data.len());
            self.header.extend_from_slice(&data[..n]);
            data = &data[n..];
            if self.header.len() == 5 {
                if self.header[0] == b'Z' {
                    z += 1;
                }
                let len = u32::from_be_bytes([
                    self.header[1],
                    self.header[2],
                    self.header[3],
                    self.header[4],
                ]) as usize;
                self.skip = len.saturating_sub(4);
                self.header.clear();
            }
        }
        z
    }
}

async fn redis_commands(url: &str) -> Result<u64, String> {
    let client = redis::Client::open(url).map_err(err)?;
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .map_err(err)?;
    let info: String = redis::cmd("INFO")
        .arg("stats")
        .query_async(&mut conn)
        .await
        .map_err(err)?;
    info.lines()
        .find_map(|l| l.strip_prefix("total_commands_processed:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| "no total_commands_processed in INFO".to_string())
}

// ---------------------------------------------------------------------------------------------
// Measuring.

#[derive(Clone, Debug, Default)]
struct Sample {
    p50_us: f64,
    p99_us: f64,
    throughput: f64,
    ops: u64,
}

async fn measure(op: &Op, conc: usize, dur: Duration) -> Result<Sample, String> {
    let start = Instant::now();
    let deadline = start + dur;
    let mut tasks = Vec::with_capacity(conc);
    for w in 0..conc {
        let op = op.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat: Vec<u64> = Vec::with_capacity(8192);
            while Instant::now() < deadline {
                let t = Instant::now();
                op(w).await?;
                lat.push(t.elapsed().as_nanos() as u64);
            }
            Ok::<_, String>(lat)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.map_err(err)??);
    }
    let elapsed = start.elapsed();
    all.sort_unstable();
    let pct = |p: f64| {
        if all.is_empty() {
            0.0
        } else {
            all[((all.len() - 1) as f64 * p).round() as usize] as f64 / 1000.0
        }
    };
    Ok(Sample {
        p50_us: pct(0.50),
        p99_us: pct(0.99),
        throughput: all.len() as f64 / elapsed.as_secs_f64(),
        ops: all.len() as u64,
    })
}

/// A candidate and the baseline it is compared with.
struct Pair {
    backend: &'static str,
    path: &'static str,
    mode: &'static str,
    baseline_name: &'static str,
    baseline: Op,
    candidate: Op,
    /// The same request through two hand-rolled pools (a writer pool on the primary, a reader
    /// pool on the replica, picked by hand per request): a third side in the same rounds.
    two_pools: Option<Op>,
    /// Counts marks-store calls of the candidate's router.
    marks: Option<Arc<CountingMarks>>,
    /// `Some(url)`: the candidate uses Redis marks (count Redis commands).
    redis: Option<String>,
    phases: Arc<Phases>,
}

/// The order the sides run in, per round: every permutation of (raw pool, router, two pools)
/// in turn, so that no side is always first or last.
const ORDERS: [[usize; 3]; 6] = [
    [0, 1, 2],
    [2, 1, 0],
    [1, 2, 0],
    [0, 2, 1],
    [2, 0, 1],
    [1, 0, 2],
];

async fn run_pair(p: &Pair, conc: usize, s: &Settings) -> Result<Value, String> {
    // Warm-up: fill the pools to this concurrency and the statement caches.
    measure(&p.baseline, conc, s.round / 4).await?;
    measure(&p.candidate, conc, s.round / 4).await?;
    if let Some(two) = &p.two_pools {
        measure(two, conc, s.round / 4).await?;
    }
    let (mut base, mut cand, mut two) = (Vec::new(), Vec::new(), Vec::new());
    let (mut marks_calls, mut redis_cmds, mut cand_ops) = (0u64, 0u64, 0u64);
    for round in 0..s.rounds {
        let c0 = p.marks.as_ref().map_or(0, |m| m.calls.load(Relaxed));
        let r0 = match &p.redis {
            Some(url) => redis_commands(url).await?,
            None => 0,
        };
        // With two sides the order just flips every round, as before.
        let order = if p.two_pools.is_some() {
            ORDERS[round % ORDERS.len()]
        } else if round % 2 == 0 {
            [0, 1, 2]
        } else {
            [1, 0, 2]
        };
        let mut got: [Option<Sample>; 3] = [None, None, None];
        for side in order {
            let op = match side {
                0 => &p.baseline,
                1 => &p.candidate,
                _ => match &p.two_pools {
                    Some(op) => op,
                    None => continue,
                },
            };
            got[side] = Some(measure(op, conc, s.round).await?);
        }
        let [b, c, t] = got;
        let (b, c) = (b.unwrap_or_default(), c.unwrap_or_default());
        if let Some(url) = &p.redis {
            // Less the INFO that took the first reading.
            redis_cmds += redis_commands(url).await?.saturating_sub(r0 + 1);
        }
        marks_calls += p.marks.as_ref().map_or(0, |m| m.calls.load(Relaxed)) - c0;
        cand_ops += c.ops;
        base.push(b);
        cand.push(c);
        if let Some(t) = t {
            two.push(t);
        }
    }
    // Per-round ratios of `num` to `den`, then their median.
    let ratio = |num: &[Sample], den: &[Sample], f: fn(&Sample) -> f64| {
        median(num.iter().zip(den).map(|(n, d)| f(n) / f(d)).collect())
    };
    let abs = |v: &[Sample], f: fn(&Sample) -> f64| median(v.iter().map(f).collect());
    let ops = cand_ops.max(1) as f64;
    // Every call to the Redis store is one command round trip (RedisMarks: one EVALSHA per
    // get/set_max); the in-memory store makes none. Redis' own count of commands executed
    // (scripts' inner commands included) is reported beside it.
    let marks_rt = if p.redis.is_some() {
        marks_calls as f64 / ops
    } else {
        0.0
    };
    let mut row = json!({
        "backend": p.backend,
        "path": p.path,
        "mode": p.mode,
        "concurrency": conc,
        "baseline": p.baseline_name,
        "p50_ratio": ratio(&cand, &base, |s| s.p50_us),
        "p99_ratio": ratio(&cand, &base, |s| s.p99_us),
        "throughput_ratio": ratio(&cand, &base, |s| s.throughput),
        "marks_round_trips_per_request": marks_rt,
        "marks_calls_per_request": marks_calls as f64 / ops,
        "redis_commands_per_request": redis_cmds as f64 / ops,
        "baseline_p50_us": abs(&base, |s| s.p50_us),
        "baseline_p99_us": abs(&base, |s| s.p99_us),
        "baseline_throughput": abs(&base, |s| s.throughput),
        "p50_us": abs(&cand, |s| s.p50_us),
        "p99_us": abs(&cand, |s| s.p99_us),
        "throughput": abs(&cand, |s| s.throughput),
        "rounds": s.rounds,
        "round_ms": s.round.as_millis() as u64,
    });
    if !two.is_empty() {
        // The two hand-rolled pools: absolute figures, against the raw pool, and the router
        // against them (ratios per round, median over rounds, like the others).
        for (k, v) in [
            ("two_pools_p50_us", abs(&two, |s| s.p50_us)),
            ("two_pools_p99_us", abs(&two, |s| s.p99_us)),
            ("two_pools_throughput", abs(&two, |s| s.throughput)),
            ("two_pools_p50_ratio", ratio(&two, &base, |s| s.p50_us)),
            ("two_pools_p99_ratio", ratio(&two, &base, |s| s.p99_us)),
            (
                "two_pools_throughput_ratio",
                ratio(&two, &base, |s| s.throughput),
            ),
            (
                "router_vs_two_pools_p50_ratio",
                ratio(&cand, &two, |s| s.p50_us),
            ),
            (
                "router_vs_two_pools_p99_ratio",
                ratio(&cand, &two, |s| s.p99_us),
            ),
            (
                "router_vs_two_pools_throughput_ratio",
                ratio(&cand, &two, |s| s.throughput),
            ),
        ] {
            row[k] = json!(v);
        }
    }
    Ok(row)
}

// ---------------------------------------------------------------------------------------------
// The scenarios, per backend.

/// What a backend provides to the benchmark: raw pools and the requests run on them and on
/// a router.
trait BenchBackend: Sized + 'static {
    type B: routing_core::Backend;
    const NAME: &'static str;
    fn backend() -> Self::B;
    type RawPool: Send + Sync + 'static;
    async fn raw_pool(url: &str) -> Result<Self::RawPool, String>;
    /// Raw read: acquire, point query, release.
    fn raw_read(pool: Arc<Self::RawPool>, id: i32, ph: Arc<Phases>) -> BoxFuture<'static, Res>;
    /// Raw write: acquire, insert (autocommit) or BEGIN/insert/COMMIT, release.
    fn raw_write(pool: Arc<Self::RawPool>, tx: bool, ph: Arc<Phases>) -> BoxFuture<'static, Res>;
    /// Routed read with this context: read_with, point query, drop.
    fn routed_read(
        router: Router<Self::B>,
        ctx: Arc<RequestContext>,
        id: i32,
        ph: Arc<Phases>,
    ) -> BoxFuture<'static, Res>;
    /// Routed write: write_with, insert, finish(); or BEGIN, insert, commit().
    fn routed_write(
        router: Router<Self::B>,
        ctx: Arc<RequestContext>,
        tx: bool,
        ph: Arc<Phases>,
    ) -> BoxFuture<'static, Res>;
}

struct Sqlx;

impl BenchBackend for Sqlx {
    type B = routing_sqlx::SqlxBackend;
    const NAME: &'static str = "sqlx";
    fn backend() -> Self::B {
        routing_sqlx::SqlxBackend::new()
    }
    type RawPool = sqlx::PgPool;
    async fn raw_pool(url: &str) -> Result<sqlx::PgPool, String> {
        // sqlx's defaults (test_before_acquire on), the router's pool size.
        sqlx::postgres::PgPoolOptions::new()
            .max_connections(POOL_SIZE)
            .connect(url)
            .await
            .map_err(err)
    }
    fn raw_read(pool: Arc<sqlx::PgPool>, id: i32, ph: Arc<Phases>) -> BoxFuture<'static, Res> {
        Box::pin(async move {
            let mut clock = Clock::start();
            let mut c = pool.acquire().await.map_err(err)?;
            clock.lap();
            let _: String = sqlx::query_scalar(READ_SQL)
                .bind(id)
                .fetch_one(&mut *c)
                .await
                .map_err(err)?;
            clock.lap();
            drop(c);
            clock.lap();
            clock.record(&ph);
            Ok(())
        })
    }
    fn raw_write(pool: Arc<sqlx::PgPool>, tx: bool, ph: Arc<Phases>) -> BoxFuture<'static, Res> {
        Box::pin(async move {
            let mut clock = Clock::start();
            let mut c = pool.acquire().await.map_err(err)?;
            clock.lap();
            if tx {
                sqlx::raw_sql("BEGIN").execute(&mut *c).await.map_err(err)?;
            }
            sqlx::query(INSERT_SQL)
                .bind("x")
                .execute(&mut *c)
                .await
                .map_err(err)?;
            if tx {
                sqlx::raw_sql("COMMIT")
                    .execute(&mut *c)
                    .await
                    .map_err(err)?;
            }
            clock.lap();
            drop(c);
            clock.lap();
            clock.record(&ph);
            Ok(())
        })
    }
    fn routed_read(
        router: Router<Self::B>,
        ctx: Arc<RequestContext>,
        id: i32,
        ph: Arc<Phases>,
    ) -> BoxFuture<'static, Res> {
        Box::pin(async move {
            let mut clock = Clock::start();
            let mut c = router.read_with(&ctx).await.map_err(err)?;
            clock.lap();
            let _: String = sqlx::query_scalar(READ_SQL)
                .bind(id)
                .fetch_one(&mut *c)
                .await
                .map_err(err)?;
            clock.lap();
            drop(c);
            clock.lap();
            clock.record(&ph);
            Ok(())
        })
    }
    fn routed_write(
        router: Router<Self::B>,
        ctx: Arc<RequestContext>,
        tx: bool,
        ph: Arc<Phases>,
    ) -> BoxFuture<'static, Res> {
        Box::pin(async move {
            let mut clock = Clock::start();
            let mut c = router.write_with(&ctx).await.map_err(err)?;
            clock.lap();
            if tx {
                sqlx::raw_sql("BEGIN").execute(&mut *c).await.map_err(err)?;
            }
            sqlx::query(INSERT_SQL)
                .bind("x")
                .execute(&mut *c)
                .await
                .map_err(err)?;
            if tx {
                c.commit().await.map_err(err)?;
            } else {
                c.finish().await.map_err(err)?;
            }
            clock.lap();
            clock.lap();
            clock.record(&ph);
            Ok(())
        })
    }
}

struct Diesel;

#[derive(diesel::QueryableByName)]
struct VRow {
    #[diesel(sql_type = diesel::sql_types::Text)]
    #[allow(dead_code)]
    v: String,
}

type DieselRaw = bb8::Pool<
    diesel_async::pooled_connection::AsyncDieselConnectionManager<diesel_async::AsyncPgConnection>,
>;

impl BenchBackend for Diesel {
    type B = routing_diesel::DieselBackend;
    const NAME: &'static str = "diesel";
    fn backend() -> Self::B {
        routing_diesel::DieselBackend::new()
    }
    type RawPool = DieselRaw;
    async fn raw_pool(url: &str) -> Result<DieselRaw, String> {
        // bb8's and diesel-async's defaults (test_on_check_out, the Verified recycle check), the
        // router's pool size.
        let manager = diesel_async::pooled_connection::AsyncDieselConnectionManager::<
            diesel_async::AsyncPgConnection,
        >::new(url);
        bb8::Pool::builder()
            .max_size(POOL_SIZE)
            .build(manager)
            .await
            .map_err(err)
    }
    fn raw_read(pool: Arc<DieselRaw>, id: i32, ph: Arc<Phases>) -> BoxFuture<'static, Res> {
        use diesel_async::RunQueryDsl;
        Box::pin(async move {
            let mut clock = Clock::start();
            let mut c = pool.get().await.map_err(err)?;
            clock.lap();
            let _: VRow = diesel::sql_query(READ_SQL)
                .bind::<diesel::sql_types::Integer, _>(id)
                .get_result(&mut *c)
                .await
                .map_err(err)?;
            clock.lap();
            drop(c);
            clock.lap();
            clock.record(&ph);
            Ok(())
        })
    }
    fn raw_write(pool: Arc<DieselRaw>, tx: bool, ph: Arc<Phases>) -> BoxFuture<'static, Res> {
        use diesel_async::{RunQueryDsl, SimpleAsyncConnection};
        Box::pin(async move {
            let mut clock = Clock::start();
            let mut c = pool.get().await.map_err(err)?;
            clock.lap();
            if tx {
                c.batch_execute("BEGIN").await.map_err(err)?;
            }
            diesel::sql_query(INSERT_SQL)
                .bind::<diesel::sql_types::Text, _>("x")
                .execute(&mut *c)
                .await
                .map_err(err)?;
            if tx {
                c.batch_execute("COMMIT").await.map_err(err)?;
            }
            clock.lap();
            drop(c);
            clock.lap();
            clock.record(&ph);
            Ok(())
        })
    }
    fn routed_read(
        router: Router<Self::B>,
        ctx: Arc<RequestContext>,
        id: i32,
        ph: Arc<Phases>,
    ) -> BoxFuture<'static, Res> {
        use diesel_async::RunQueryDsl;
        Box::pin(async move {
            let mut clock = Clock::start();
            let mut c = router.read_with(&ctx).await.map_err(err)?;
            clock.lap();
            let _: VRow = diesel::sql_query(READ_SQL)
                .bind::<diesel::sql_types::Integer, _>(id)
                .get_result(&mut *c)
                .await
                .map_err(err)?;
            clock.lap();
            drop(c);
            clock.lap();
            clock.record(&ph);
            Ok(())
        })
    }
    fn routed_write(
        router: Router<Self::B>,
        ctx: Arc<RequestContext>,
        tx: bool,
        ph: Arc<Phases>,
    ) -> BoxFuture<'static, Res> {
        use diesel_async::{RunQueryDsl, SimpleAsyncConnection};
        Box::pin(async move {
            let mut clock = Clock::start();
            let mut c = router.write_with(&ctx).await.map_err(err)?;
            clock.lap();
            if tx {
                c.batch_execute("BEGIN").await.map_err(err)?;
            }
            diesel::sql_query(INSERT_SQL)
                .bind::<diesel::sql_types::Text, _>("x")
                .execute(&mut *c)
                .await
                .map_err(err)?;
            if tx {
                c.commit().await.map_err(err)?;
            } else {
                c.finish().await.map_err(err)?;
            }
            clock.lap();
            clock.lap();
            clock.record(&ph);
            Ok(())
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Setting up one backend's pools and routers (directly, or through counting proxies).

struct Ports {
    primary: u16,
    replica: u16,
}

struct Rig<K: BenchBackend> {
    raw_read: Arc<K::RawPool>,
    raw_write: Arc<K::RawPool>,
    mem: Router<K::B>,
    mem_marks: Arc<CountingMarks>,
    redis: Router<K::B>,
    redis_marks: Arc<CountingMarks>,
    token: CausalToken,
}

fn with_port(url: &str, from: u16, to: u16) -> String {
    url.replace(&format!("127.0.0.1:{from}/"), &format!("127.0.0.1:{to}/"))
}

async fn rig<K: BenchBackend>(
    c: &routing_testkit::Cluster,
    replica: usize,
    ports: &Ports,
) -> Result<Rig<K>, String> {
    let primary = c.primary();
    let real = |i: usize| c.node(i).port();
    let (pp, rp) = (real(primary), real(replica));
    let nodes: Vec<NodeConfig> = [primary, replica]
        .into_iter()
        .map(|i| {
            let name = c.node(i).name().to_string();
            let port = if i == primary {
                ports.primary
            } else {
                ports.replica
            };
            let url = with_port(&c.writer_url(i), real(i), port);
            let node = if i == primary {
                NodeConfig::writer(name, url)
            } else {
                NodeConfig::replica(name, url)
            };
            // Probes go straight to the node: they are not per-request work.
            node.reader_url(with_port(&c.reader_url(i), real(i), port))
                .monitor_url(c.monitor_url(i))
        })
        .collect();
    let raw_read =
        Arc::new(K::raw_pool(&with_port(&c.reader_url(replica), rp, ports.replica)).await?);
    let raw_write =
        Arc::new(K::raw_pool(&with_port(&c.writer_url(primary), pp, ports.primary)).await?);
    let config = RouterConfig {
        // Marks outlive the run, so every ReadYourWrites read has one to honour.
        mark_ttl: Duration::from_secs(3600),
        ..RouterConfig::default()
    };
    let codec = || {
        TokenCodec::new(TokenKey::new(1, "bench-secret-bench-secret-bench-secret").expect("key"))
            .cluster("bench")
    };
    let mem_marks = Arc::new(CountingMarks {
        inner: Arc::new(InMemoryMarks::default()),
        calls: AtomicU64::new(0),
    });
    let redis_url = c.redis_url().ok_or("the cluster has no Redis")?;
    let redis_store = routing_redis::RedisMarks::new(redis_url.as_str()).map_err(err)?;
    let redis_marks = Arc::new(CountingMarks {
        inner: Arc::new(redis_store),
        calls: AtomicU64::new(0),
    });
    let build = |marks: Arc<CountingMarks>| {
        Router::builder(K::backend())
            .nodes(nodes.clone())
            .config(config.clone())
            .marks(marks)
            .tokens(codec())
            .build()
    };
    let mem = build(mem_marks.clone()).await.map_err(err)?;
    let redis = build(redis_marks.clone()).await.map_err(err)?;
    for r in [&mem, &redis] {
        wait_readable(r).await?;
    }
    // Every worker's user has a mark in both stores; a token from a real write.
    let mut token = None;
    for w in 0..16 {
        for r in [&mem, &redis] {
            let receipt = r
                .write_with(&RequestContext::new().user(user(w)))
                .await
                .map_err(err)?
                .finish()
                .await
                .map_err(err)?;
            token = Some(receipt.causal);
        }
    }
    c.wait_replicated(Duration::from_secs(10)).map_err(err)?;
    Ok(Rig {
        raw_read,
        raw_write,
        mem,
        mem_marks,
        redis,
        redis_marks,
        token: token.expect("at least one write"),
    })
}

/// The cheat sheet's approach, without a router: the application keeps a writer pool on the
/// primary and a reader pool on the replica (the driver's defaults, the router's pool size) and
/// picks one by hand per request, reads to the reader pool and writes to the writer pool.
struct TwoPools<K: BenchBackend> {
    writer: Arc<K::RawPool>,
    reader: Arc<K::RawPool>,
}

impl<K: BenchBackend> TwoPools<K> {
    async fn new(c: &routing_testkit::Cluster, replica: usize) -> Result<Self, String> {
        Ok(TwoPools {
            writer: Arc::new(K::raw_pool(&c.writer_url(c.primary())).await?),
            reader: Arc::new(K::raw_pool(&c.reader_url(replica)).await?),
        })
    }
    /// The application's choice, made per request.
    fn pick(&self, write: bool) -> Arc<K::RawPool> {
        if write {
            self.writer.clone()
        } else {
            self.reader.clone()
        }
    }
}

fn user(w: usize) -> UserKey {
    UserKey::new(format!("bench-user-{w}"))
}

async fn wait_readable<B: routing_core::Backend>(r: &Router<B>) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let on_replica = matches!(r.read().await, Ok(c) if !c.on_primary());
        if on_replica {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err("the router never read from the replica".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The scenarios on `rig`; with `two`, each also runs through the two hand-rolled pools.
fn pairs<K: BenchBackend>(
    rig: &Rig<K>,
    redis_url: &str,
    two: Option<&Arc<TwoPools<K>>>,
) -> Vec<Pair> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let id = || (NEXT.fetch_add(7919, Relaxed) % ROWS as u64) as i32 + 1;
    let mut out = Vec::new();
    let untimed = Arc::new(Phases::default());
    let two_read_op = || -> Option<Op> {
        let (two, ph) = (two?.clone(), untimed.clone());
        Some(Arc::new(move |_w| {
            K::raw_read(two.pick(false), id(), ph.clone())
        }))
    };
    let two_write_op = |tx: bool| -> Option<Op> {
        let (two, ph) = (two?.clone(), untimed.clone());
        Some(Arc::new(move |_w| {
            K::raw_write(two.pick(true), tx, ph.clone())
        }))
    };
    let raw_read_op = |ph: Arc<Phases>| -> Op {
        let pool = rig.raw_read.clone();
        Arc::new(move |_w| K::raw_read(pool.clone(), id(), ph.clone()))
    };
    let raw_write_op = |tx: bool, ph: Arc<Phases>| -> Op {
        let pool = rig.raw_write.clone();
        Arc::new(move |_w| K::raw_write(pool.clone(), tx, ph.clone()))
    };
    let read_modes: [(&'static str, Consistency, bool, bool); 4] = [
        ("Eventual", Consistency::Eventual, false, false),
        ("Causal", Consistency::Causal, true, false),
        (
            "ReadYourWrites/memory",
            Consistency::ReadYourWrites,
            false,
            false,
        ),
        (
            "ReadYourWrites/redis",
            Consistency::ReadYourWrites,
            false,
            true,
        ),
    ];
    for (mode, consistency, with_token, redis) in read_modes {
        let router = if redis { &rig.redis } else { &rig.mem };
        let marks = if redis {
            &rig.redis_marks
        } else {
            &rig.mem_marks
        };
        let ctxs: Vec<Arc<RequestContext>> = (0..16)
            .map(|w| {
                let mut ctx = RequestContext::new().consistency(consistency);
                if consistency == Consistency::ReadYourWrites {
                    ctx = ctx.user(user(w));
                }
                if with_token {
                    ctx = ctx.token(rig.token);
                }
                Arc::new(ctx)
            })
            .collect();
        let phases = Arc::new(Phases::default());
        let (r, ph) = (router.clone(), phases.clone());
        let candidate: Op =
            Arc::new(move |w| K::routed_read(r.clone(), ctxs[w % 16].clone(), id(), ph.clone()));
        out.push(Pair {
            backend: K::NAME,
            path: "read",
            mode,
            baseline_name: "raw pool, point query",
            baseline: raw_read_op(Arc::new(Phases::default())),
            candidate,
            two_pools: two_read_op(),
            marks: Some(marks.clone()),
            redis: redis.then(|| redis_url.to_string()),
            phases,
        });
    }
    for (mode, tx, baseline_name) in [
        ("finish", false, "raw pool, autocommit INSERT"),
        ("commit", true, "raw pool, BEGIN; INSERT; COMMIT"),
    ] {
        let ctxs: Vec<Arc<RequestContext>> = (0..16)
            .map(|w| Arc::new(RequestContext::new().user(user(w))))
            .collect();
        let phases = Arc::new(Phases::default());
        let (r, ph) = (rig.mem.clone(), phases.clone());
        let candidate: Op =
            Arc::new(move |w| K::routed_write(r.clone(), ctxs[w % 16].clone(), tx, ph.clone()));
        out.push(Pair {
            backend: K::NAME,
            path: "write",
            mode,
            baseline_name,
            baseline: raw_write_op(tx, Arc::new(Phases::default())),
            candidate,
            two_pools: two_write_op(tx),
            marks: Some(rig.mem_marks.clone()),
            redis: None,
            phases,
        });
    }
    out
}

/// Round trips, Redis commands, marks calls and resets per request, at concurrency 1, through
/// counting proxies; then the phase times from the unproxied concurrency-1 runs.
async fn breakdown<K: BenchBackend>(
    c: &routing_testkit::Cluster,
    replica: usize,
    s: &Settings,
    timed: &[Pair],
) -> Result<Vec<Value>, String> {
    let redis_url = c.redis_url().ok_or("no redis")?;
    let pp = CountingProxy::start(c.node(c.primary()).port()).await?;
    let rp = CountingProxy::start(c.node(replica).port()).await?;
    let rig = rig::<K>(
        c,
        replica,
        &Ports {
            primary: pp.port,
            replica: rp.port,
        },
    )
    .await?;
    let n = s.breakdown_requests;
    let mut out = Vec::new();
    for (pair, timed) in pairs::<K>(&rig, &redis_url, None).iter().zip(timed) {
        for (side, op) in [("baseline", &pair.baseline), ("candidate", &pair.candidate)] {
            // Warm: a connection in each pool, statements prepared.
            for _ in 0..20 {
                op(0).await?;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            let router = match (side, pair.redis.is_some()) {
                ("baseline", _) => None,
                (_, true) => Some(&rig.redis),
                (_, false) => Some(&rig.mem),
            };
            let stats0 = router.map(|r| r.stats());
            let (p0, r0) = (pp.count(), rp.count());
            let m0 = pair.marks.as_ref().map_or(0, |m| m.calls.load(Relaxed));
            let redis0 = redis_commands(&redis_url).await?;
            for _ in 0..n {
                op(0).await?;
            }
            // Resets run after the request returned: let them land before counting.
            tokio::time::sleep(Duration::from_millis(200)).await;
            let redis1 = redis_commands(&redis_url).await?;
            let per = |x: u64| x as f64 / n as f64;
            let mut row = json!({
                "backend": pair.backend,
                "path": pair.path,
                "mode": pair.mode,
                "side": side,
                "requests": n,
                "primary_round_trips_per_request": per(pp.count() - p0),
                "replica_round_trips_per_request": per(rp.count() - r0),
                "redis_commands_per_request": if side == "candidate" && pair.redis.is_some() { per(redis1.saturating_sub(redis0 + 1)) } else { 0.0 },
            });
            if let (Some(r), Some(s0)) = (router, stats0) {
                let s1 = r.stats();
                let m1 = pair.marks.as_ref().map_or(0, |m| m.calls.load(Relaxed));
                row["marks_calls_per_request"] = json!(per(m1 - m0));
                row["session_resets_per_request"] = json!(per((s1.sessions_reset
                    + s1.sessions_discarded)
                    - (s0.sessions_reset + s0.sessions_discarded)));
                row["lsn_waits_per_request"] = json!(per(s1.lsn_waits - s0.lsn_waits));
                row["primary_reads_per_request"] = json!(per(s1.reads_primary - s0.reads_primary));
            }
            let phases = if side == "baseline" {
                None
            } else {
                Some(&timed.phases)
            };
            if let Some(ph) = phases {
                let (a, b, c) = ph.mean_us();
                row["checkout_us"] = json!(a);
                row["work_us"] = json!(b);
                row["release_us"] = json!(c);
            }
            out.push(row);
        }
    }
    for r in [&rig.mem, &rig.redis] {
        r.shutdown();
    }
    Ok(out)
}

/// The raw pools' own phase times (c=1) for the breakdown's baseline rows.
async fn baseline_phases<K: BenchBackend>(rig: &Rig<K>, n: usize) -> Result<Vec<Value>, String> {
    let mut out = Vec::new();
    for (path, tx) in [("read", false), ("write", false), ("write_tx", true)] {
        let ph = Arc::new(Phases::default());
        for i in 0..n {
            if path == "read" {
                K::raw_read(rig.raw_read.clone(), (i as i32 % ROWS) + 1, ph.clone()).await?;
            } else {
                K::raw_write(rig.raw_write.clone(), tx, ph.clone()).await?;
            }
        }
        let (a, b, c) = ph.mean_us();
        out.push(json!({"backend": K::NAME, "path": path, "side": "baseline",
            "checkout_us": a, "work_us": b, "release_us": c}));
    }
    Ok(out)
}

async fn bench_backend<K: BenchBackend>(
    c: &routing_testkit::Cluster,
    replica: usize,
    s: &Settings,
    overhead: &mut Vec<Value>,
    breakdown_rows: &mut Vec<Value>,
) -> Result<(), String> {
    let redis_url = c.redis_url().ok_or("no redis")?;
    let direct = Ports {
        primary: c.node(c.primary()).port(),
        replica: c.node(replica).port(),
    };
    let rig = rig::<K>(c, replica, &direct).await?;
    let two = Arc::new(TwoPools::<K>::new(c, replica).await?);
    let mut pairs = pairs::<K>(&rig, &redis_url, Some(&two));
    for &conc in &CONCURRENCY {
        for p in &pairs {
            let row = run_pair(p, conc, s).await?;
            let g = |k: &str| row[k].as_f64().unwrap_or(0.0);
            eprintln!(
                "{:<7} {:<5} {:<22} c={:<2} p50 {:>7.1}/{:>7.1}/{:>7.1} us ({:.2}x raw, {:.2}x two pools)  tput {:>8.0}/{:>8.0}/{:>8.0} ({:.2}x raw, {:.2}x two pools)",
                p.backend,
                p.path,
                p.mode,
                conc,
                g("p50_us"),
                g("baseline_p50_us"),
                g("two_pools_p50_us"),
                g("p50_ratio"),
                g("router_vs_two_pools_p50_ratio"),
                g("throughput"),
                g("baseline_throughput"),
                g("two_pools_throughput"),
                g("throughput_ratio"),
                g("router_vs_two_pools_throughput_ratio"),
            );
            overhead.push(row);
        }
        if conc == 1 {
            // The breakdown's phase times are the concurrency-1 runs': keep a copy of their sums
            // (the scenarios' closures go on adding to the originals).
            for p in &mut pairs {
                let keep = Phases::default();
                for (to, from) in [
                    (&keep.requests, &p.phases.requests),
                    (&keep.checkout, &p.phases.checkout),
                    (&keep.work, &p.phases.work),
                    (&keep.release, &p.phases.release),
                ] {
                    to.store(from.load(Relaxed), Relaxed);
                }
                p.phases = Arc::new(keep);
            }
        }
    }
    breakdown_rows.extend(baseline_phases::<K>(&rig, s.breakdown_requests).await?);
    for r in [&rig.mem, &rig.redis] {
        r.shutdown();
    }
    // Close the two pools before the breakdown opens its own (their ops hold them too).
    for p in &mut pairs {
        p.two_pools = None;
    }
    drop(two);
    drop(rig);
    breakdown_rows.extend(breakdown::<K>(c, replica, s, &pairs).await?);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Report.

fn markdown(doc: &Value) -> String {
    let mut md = String::new();
    let f = |v: &Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    md.push_str("# Benchmark report\n\n");
    md.push_str(&format!(
        "- date: {}\n- command: `{}`\n- machine: {}\n- load average (1, 5, 15 min): {} at the start, {} at the end\n- rounds: {} of {} ms per side, interleaved; figures are medians over rounds\n\n",
        doc["date"].as_str().unwrap_or(""),
        doc["command"].as_str().unwrap_or(""),
        doc["machine"].as_str().unwrap_or(""),
        doc["load_average"]["before"],
        doc["load_average"]["after"],
        doc["settings"]["rounds"],
        doc["settings"]["round_ms"],
    ));
    md.push_str("## Overhead against the raw driver pool\n\n");
    md.push_str("| backend | path | mode | c | p50 us (raw) | p50 ratio | p99 us (raw) | p99 ratio | req/s (raw) | throughput ratio | marks RT/req |\n|---|---|---|---|---|---|---|---|---|---|---|\n");
    for r in doc["overhead"].as_array().into_iter().flatten() {
        md.push_str(&format!(
            "| {} | {} | {} | {} | {:.0} ({:.0}) | {:.2} | {:.0} ({:.0}) | {:.2} | {:.0} ({:.0}) | {:.2} | {:.2} |\n",
            r["backend"].as_str().unwrap_or(""),
            r["path"].as_str().unwrap_or(""),
            r["mode"].as_str().unwrap_or(""),
            r["concurrency"],
            f(r, "p50_us"),
            f(r, "baseline_p50_us"),
            f(r, "p50_ratio"),
            f(r, "p99_us"),
            f(r, "baseline_p99_us"),
            f(r, "p99_ratio"),
            f(r, "throughput"),
            f(r, "baseline_throughput"),
            f(r, "throughput_ratio"),
            f(r, "marks_round_trips_per_request"),
        ));
    }
    md.push_str("\n## Against two hand-rolled pools (a writer pool on the primary, a reader pool on the replica, picked by hand)\n\n");
    md.push_str("Measured in the same interleaved rounds as the raw pool and the router (every order of the three sides in turn). Ratios are per round, median over rounds.\n\n");
    md.push_str("| backend | path | mode | c | p50 us raw / two pools / router | p99 us raw / two pools / router | req/s raw / two pools / router | two pools / raw: p50, throughput | router / two pools: p50, p99, throughput |\n|---|---|---|---|---|---|---|---|---|\n");
    for r in doc["overhead"].as_array().into_iter().flatten() {
        if r.get("two_pools_p50_us").is_none() {
            continue;
        }
        md.push_str(&format!(
            "| {} | {} | {} | {} | {:.0} / {:.0} / {:.0} | {:.0} / {:.0} / {:.0} | {:.0} / {:.0} / {:.0} | {:.2}, {:.2} | {:.2}, {:.2}, {:.2} |\n",
            r["backend"].as_str().unwrap_or(""),
            r["path"].as_str().unwrap_or(""),
            r["mode"].as_str().unwrap_or(""),
            r["concurrency"],
            f(r, "baseline_p50_us"),
            f(r, "two_pools_p50_us"),
            f(r, "p50_us"),
            f(r, "baseline_p99_us"),
            f(r, "two_pools_p99_us"),
            f(r, "p99_us"),
            f(r, "baseline_throughput"),
            f(r, "two_pools_throughput"),
            f(r, "throughput"),
            f(r, "two_pools_p50_ratio"),
            f(r, "two_pools_throughput_ratio"),
            f(r, "router_vs_two_pools_p50_ratio"),
            f(r, "router_vs_two_pools_p99_ratio"),
            f(r, "router_vs_two_pools_throughput_ratio"),
        ));
    }
    md.push_str(&format!(
        "\n## Routing decision (in-process, fake backend, 8 replicas)\n\n`decision_ns` = {:.0} ns (Eventual {:.0} ns, Causal with a token {:.0} ns, over a bare fake checkout of {:.0} ns); token verification {:.0} ns.\n",
        f(doc, "decision_ns"),
        f(&doc["decision"], "eventual_ns"),
        f(&doc["decision"], "causal_ns"),
        f(&doc["decision"], "baseline_checkout_ns"),
        f(&doc["decision"], "token_verify_ns"),
    ));
    md.push_str("\n## Scale (sqlx, Eventual reads; raw = a PgPool on one replica, interleaved)\n\n| replicas | c | router req/s | raw req/s | throughput ratio | router p50 ms | router p99 ms | CPU busy |\n|---|---|---|---|---|---|---|---|\n");
    for r in doc["scale"].as_array().into_iter().flatten() {
        md.push_str(&format!(
            "| {} | {} | {:.0} | {:.0} | {:.2} | {:.2} | {:.2} | {:.0} % |\n",
            r["replicas"],
            r["concurrency"],
            f(r, "throughput"),
            f(r, "baseline_throughput"),
            f(r, "throughput_ratio"),
            f(r, "p50_ms"),
            f(r, "p99_ms"),
            f(r, "cpu_busy") * 100.0,
        ));
    }
    md.push_str("\n## Offload under lag (read-after-write workload, sqlx)\n\n| mode | wait budget ms | delay ms | replica share | stale reads | read p50 ms | read p99 ms | reads/s | LSN waits | primary reads | failed |\n|---|---|---|---|---|---|---|---|---|---|---|\n");
    for r in doc["offload"].as_array().into_iter().flatten() {
        md.push_str(&format!(
            "| {} | {} | {} | {:.2} | {} | {:.2} | {:.2} | {:.0} | {} | {} | {} |\n",
            r["mode"].as_str().unwrap_or(""),
            r["wait_budget_ms"],
            r["delay_ms"],
            f(r, "replica_share"),
            r["stale_reads"],
            f(r, "read_p50_ms"),
            f(r, "read_p99_ms"),
            f(r, "read_throughput"),
            r["lsn_waits"],
            r["primary_reads"],
            r["failed"],
        ));
    }
    md.push_str("\n## Peer: pgpool-II beside the router (90 % reads, 10 % writes)\n\n| system | delay ms | ops/s | p50 ms | p99 ms | replica share | stale reads | failed |\n|---|---|---|---|---|---|---|---|\n");
    for r in doc["peer"].as_array().into_iter().flatten() {
        md.push_str(&format!(
            "| {} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {} | {} |\n",
            r["system"].as_str().unwrap_or(""),
            r["delay_ms"],
            f(r, "throughput"),
            f(r, "p50_ms"),
            f(r, "p99_ms"),
            f(r, "replica_share"),
            r["stale_reads"],
            r["failed"],
        ));
    }
    let fo = &doc["failover"];
    md.push_str(&format!(
        "\n## Failover (promotion to the router's first write)\n\nAll {} runs: p50 {:.0} ms, max {:.0} ms.\n\n| fault | runs | p50 ms | max ms | samples ms |\n|---|---|---|---|---|\n",
        fo["runs"], f(fo, "p50_ms"), f(fo, "max_ms"),
    ));
    for r in fo["by_fault"].as_array().into_iter().flatten() {
        let samples: Vec<String> = r["samples_ms"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|v| format!("{:.0}", v.as_f64().unwrap_or(f64::NAN)))
            .collect();
        md.push_str(&format!(
            "| {} | {} | {:.0} | {:.0} | {} |\n",
            r["fault"].as_str().unwrap_or(""),
            r["runs"],
            f(r, "p50_ms"),
            f(r, "max_ms"),
            samples.join(", "),
        ));
    }
    md.push_str("\n## Breakdown per request (concurrency 1)\n\n");
    md.push_str("Round trips are ReadyForQuery messages counted by a proxy; resets are the router's session resets (each one spawned task and one round trip after the request); times are means from the unproxied c=1 runs.\n\n");
    md.push_str("| backend | path | mode | side | primary RT | replica RT | Redis cmds | marks calls | resets | checkout us | work us | release us |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    let g = |v: &Value, k: &str| {
        v.get(k)
            .and_then(Value::as_f64)
            .map_or("-".to_string(), |x| format!("{x:.2}"))
    };
    for r in doc["breakdown"].as_array().into_iter().flatten() {
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r["backend"].as_str().unwrap_or(""),
            r["path"].as_str().unwrap_or(""),
            r["mode"].as_str().unwrap_or("raw"),
            r["side"].as_str().unwrap_or(""),
            g(r, "primary_round_trips_per_request"),
            g(r, "replica_round_trips_per_request"),
            g(r, "redis_commands_per_request"),
            g(r, "marks_calls_per_request"),
            g(r, "session_resets_per_request"),
            g(r, "checkout_us"),
            g(r, "work_us"),
            g(r, "release_us"),
        ));
    }
    md
}

/// Every field a consumer of the JSON relies on; `--quick` checks them.
fn check_fields(doc: &Value) -> Result<(), String> {
    const OVERHEAD: [&str; 23] = [
        "backend",
        "path",
        "mode",
        "concurrency",
        "p50_ratio",
        "p99_ratio",
        "throughput_ratio",
        "marks_round_trips_per_request",
        "p50_us",
        "p99_us",
        "throughput",
        "baseline_p50_us",
        "baseline_p99_us",
        "baseline_throughput",
        "two_pools_p50_us",
        "two_pools_p99_us",
        "two_pools_throughput",
        "two_pools_p50_ratio",
        "two_pools_p99_ratio",
        "two_pools_throughput_ratio",
        "router_vs_two_pools_p50_ratio",
        "router_vs_two_pools_p99_ratio",
        "router_vs_two_pools_throughput_ratio",
    ];
    let rows = doc["overhead"].as_array().ok_or("no overhead list")?;
    let mut seen = BTreeMap::new();
    for r in rows {
        for k in OVERHEAD {
            if r.get(k).is_none_or(Value::is_null) {
                return Err(format!("overhead row without {k}: {r}"));
            }
        }
        for k in [
            "p50_ratio",
            "p99_ratio",
            "throughput_ratio",
            "two_pools_p50_ratio",
            "two_pools_p99_ratio",
            "two_pools_throughput_ratio",
            "router_vs_two_pools_p50_ratio",
            "router_vs_two_pools_p99_ratio",
            "router_vs_two_pools_throughput_ratio",
        ] {
            let v = r[k].as_f64().unwrap_or(f64::NAN);
            if !(v.is_finite() && v > 0.0) {
                return Err(format!("overhead row with {k} = {v}: {r}"));
            }
        }
        *seen
            .entry((
                r["backend"].to_string(),
                r["path"].to_string(),
                r["concurrency"].to_string(),
            ))
            .or_insert(0) += 1;
    }
    // 2 backends x (read, write) x 2 concurrencies; 4 read modes and 2 write modes each.
    if seen.len() != 8 {
        return Err(format!(
            "expected 8 (backend, path, c) groups, got {seen:?}"
        ));
    }
    let num = |r: &Value, k: &str| -> Result<f64, String> {
        r.get(k)
            .and_then(Value::as_f64)
            .filter(|v| v.is_finite() && *v >= 0.0)
            .ok_or_else(|| format!("missing or bad {k}: {r}"))
    };
    let list = |k: &str| -> Result<&Vec<Value>, String> {
        doc[k]
            .as_array()
            .filter(|l| !l.is_empty())
            .ok_or_else(|| format!("no {k} list"))
    };
    if num(doc, "decision_ns")? <= 0.0 {
        return Err("decision_ns is 0".into());
    }
    for r in list("offload")? {
        r["mode"].as_str().ok_or("offload row without mode")?;
        for k in [
            "delay_ms",
            "stale_reads",
            "read_p50_ms",
            "read_p99_ms",
            "wait_budget_ms",
        ] {
            num(r, k)?;
        }
        let pcts = r["read_latency_percentiles_ms"]
            .as_array()
            .filter(|l| l.len() == routing_examples::offload::PERCENTILES.len())
            .ok_or_else(|| format!("offload row without read_latency_percentiles_ms: {r}"))?;
        for p in pcts {
            num(p, "p")?;
            num(p, "ms")?;
        }
        if !(0.0..=1.0).contains(&num(r, "replica_share")?) {
            return Err(format!("offload replica_share out of range: {r}"));
        }
    }
    let f = &doc["failover"];
    if num(f, "runs")? < 1.0 || num(f, "max_ms")? < num(f, "p50_ms")? {
        return Err(format!("bad failover: {f}"));
    }
    let peer = list("peer")?;
    for system in ["router", "pgpool-II"] {
        let r = peer
            .iter()
            .find(|r| r["system"] == system)
            .ok_or_else(|| format!("no peer row for {system}"))?;
        for k in [
            "throughput",
            "p50_ms",
            "p99_ms",
            "replica_share",
            "stale_reads",
        ] {
            num(r, k)?;
        }
    }
    let scale = list("scale")?;
    for r in scale {
        for k in [
            "replicas",
            "concurrency",
            "throughput",
            "baseline_throughput",
            "throughput_ratio",
            "p50_ms",
            "p99_ms",
            "cpu_busy",
        ] {
            num(r, k)?;
        }
    }
    for c in [1, 4, 16, 64] {
        if !scale.iter().any(|r| r["concurrency"] == c) {
            return Err(format!("no scale row at concurrency {c}"));
        }
    }
    let bd = doc["breakdown"].as_array().ok_or("no breakdown list")?;
    if bd.is_empty() {
        return Err("empty breakdown".into());
    }
    for r in bd.iter().filter(|r| r["side"] == "candidate") {
        for k in [
            "primary_round_trips_per_request",
            "replica_round_trips_per_request",
            "redis_commands_per_request",
            "marks_calls_per_request",
            "session_resets_per_request",
            "checkout_us",
            "work_us",
            "release_us",
        ] {
            if r.get(k).is_none_or(Value::is_null) {
                return Err(format!("breakdown row without {k}: {r}"));
            }
        }
    }
    Ok(())
}

/// What the sections of one run produce.
#[derive(Default)]
struct Sections {
    overhead: Vec<Value>,
    breakdown: Vec<Value>,
    decision: Value,
    scale: Value,
    offload: Value,
    peer: Value,
    failover: Value,
    chart: Option<routing_examples::chart::Chart>,
    elapsed: Vec<(&'static str, f64)>,
}

/// The sections, in the order they run; `--only` picks some (their JSON is then incomplete, and
/// not checked).
const SECTIONS: [&str; 6] = [
    "decision", "overhead", "scale", "offload", "peer", "failover",
];

/// The 1, 5 and 15 minute load averages.
fn loadavg() -> Vec<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .filter_map(|x| x.parse().ok())
        .collect()
}

fn usage() -> ! {
    eprintln!(
        "usage: bench [--quick] [--json FILE] [--only SECTION,...] [--backend sqlx|diesel]\n\
         \x20      bench --chart FILE   (redraw FILE's chart, .svg and .png beside it, from its offload rows)\n\
         sections: {}",
        SECTIONS.join(", ")
    );
    std::process::exit(2)
}

/// `--chart FILE`: draws the chart again from the offload rows of a JSON this binary wrote,
/// without running anything (to change the drawing, not the figures).
#[allow(clippy::print_stdout)]
fn redraw(json: &str) -> ! {
    let res = (|| -> Result<(String, String), String> {
        let doc: Value = serde_json::from_slice(&std::fs::read(json).map_err(err)?).map_err(err)?;
        let rows: Vec<routing_examples::offload::OffloadRow> =
            serde_json::from_value(doc["offload"].clone()).map_err(err)?;
        let chart = routing_examples::chart::draw(&rows, 50)?;
        let path = std::path::Path::new(json);
        let (svg, png) = (path.with_extension("svg"), path.with_extension("png"));
        std::fs::write(&svg, &chart.svg).map_err(err)?;
        std::fs::write(&png, &chart.png).map_err(err)?;
        Ok((svg.display().to_string(), png.display().to_string()))
    })();
    match res {
        Ok((svg, png)) => {
            println!("bench: wrote {svg} and {png}");
            std::process::exit(0)
        }
        Err(e) => {
            eprintln!("bench: cannot redraw the chart of {json}: {e}");
            std::process::exit(1)
        }
    }
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| s.lines().next().map(str::to_string))
        .unwrap_or_default();
    format!("{cpus} CPUs ({model}), {mem}; PostgreSQL, client and Redis share the machine")
}

fn now_utc() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

#[allow(clippy::print_stdout)]
fn main() {
    let mut args = std::env::args().skip(1);
    let mut quick = false;
    let mut json_path = String::from("target/bench/bench.json");
    let mut backends = vec!["sqlx".to_string(), "diesel".to_string()];
    let mut only: Vec<String> = SECTIONS.iter().map(|s| s.to_string()).collect();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => quick = true,
            "--chart" => redraw(&args.next().unwrap_or_else(|| usage())),
            "--json" => json_path = args.next().unwrap_or_else(|| usage()),
            "--backend" => {
                backends = vec![args.next().unwrap_or_else(|| usage())];
                if !["sqlx", "diesel"].contains(&backends[0].as_str()) {
                    usage()
                }
            }
            "--only" => {
                only = args
                    .next()
                    .unwrap_or_else(|| usage())
                    .split(',')
                    .map(str::to_string)
                    .collect();
                if only.iter().any(|s| !SECTIONS.contains(&s.as_str())) {
                    usage()
                }
            }
            _ => usage(),
        }
    }
    let ms = Duration::from_millis;
    let settings = if quick {
        Settings {
            quick,
            rounds: 2,
            round: ms(150),
            // Enough that the monitor's probes and a reconnect in the counting window (a few
            // round trips) stay well under the one per request that bench_quick looks for.
            breakdown_requests: 100,
            offload: OffloadOptions {
                run_time: ms(300),
                concurrency: 4,
                delays: vec![ms(0), ms(50)],
                wait_budget: None,
                extra_wait_budgets: vec![ms(0)],
            },
            peer: PeerOptions {
                run_time: ms(300),
                concurrency: 4,
                rounds: 1,
                delays: vec![ms(0)],
                extra_wait_budgets: vec![],
            },
            failover_runs: 1,
            scale: ScaleOptions {
                concurrency: vec![1, 4, 16, 64],
                replicas: vec![1, 2],
                rounds: 1,
                round: ms(150),
                pool_size: 32,
            },
            scale_four: false,
            decision: (3, 2_000),
        }
    } else {
        Settings {
            quick,
            rounds: 7,
            round: ms(1000),
            breakdown_requests: 300,
            offload: OffloadOptions {
                run_time: ms(3000),
                concurrency: 8,
                delays: vec![ms(0), ms(20), ms(50), ms(200)],
                wait_budget: None,
                extra_wait_budgets: vec![ms(0), ms(2), ms(200)],
            },
            peer: PeerOptions {
                run_time: ms(3000),
                concurrency: 8,
                rounds: 3,
                delays: vec![ms(0), ms(50)],
                extra_wait_budgets: vec![ms(0)],
            },
            failover_runs: 5,
            scale: ScaleOptions {
                concurrency: vec![1, 4, 16, 64],
                replicas: vec![1, 2, 4],
                rounds: 3,
                round: ms(1000),
                pool_size: 32,
            },
            scale_four: true,
            decision: (9, 50_000),
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let started = Instant::now();
    let cluster = routing_testkit::ClusterBuilder::new()
        .replicas(2)
        .with_redis(true)
        .start()
        .unwrap_or_else(|e| {
            eprintln!("bench: cannot start the cluster: {e}");
            std::process::exit(1)
        });
    let setup = format!(
        "CREATE TABLE bench_kv (id int PRIMARY KEY, v text NOT NULL); \
         INSERT INTO bench_kv SELECT g, md5(g::text) FROM generate_series(1, {ROWS}) g; \
         CREATE TABLE bench_w (id bigserial PRIMARY KEY, v text NOT NULL); \
         GRANT SELECT ON bench_kv, bench_w TO {r}; \
         GRANT SELECT, INSERT ON bench_kv, bench_w TO {w}; \
         GRANT USAGE ON SEQUENCE bench_w_id_seq TO {w}; \
         ANALYZE bench_kv",
        r = routing_testkit::READER_ROLE,
        w = routing_testkit::WRITER_ROLE,
    );
    if let Err(e) = cluster.psql(cluster.primary(), &setup) {
        eprintln!("bench: setup failed: {e}");
        std::process::exit(1);
    }
    let _ = cluster.wait_replicated(Duration::from_secs(10));
    let replica = (0..cluster.nodes().len())
        .find(|&i| i != cluster.primary())
        .expect("a replica");
    let load_before = loadavg();
    let result: Result<Sections, String> = rt.block_on(async {
        let mut out = Sections::default();
        let run = |name: &str| only.iter().any(|s| s == name);
        if run("decision") {
            let t = Instant::now();
            let d = routing_examples::decision::measure(settings.decision.0, settings.decision.1)
                .await?;
            eprintln!(
                "decision: Eventual {:.0} ns, Causal {:.0} ns, token verify {:.0} ns ({:.0} s)",
                d.eventual_ns,
                d.causal_ns,
                d.token_verify_ns,
                t.elapsed().as_secs_f64()
            );
            out.decision = json!(d);
        }
        if run("overhead") {
            let t = Instant::now();
            if backends.iter().any(|b| b == "sqlx") {
                let (ov, br) = (&mut out.overhead, &mut out.breakdown);
                bench_backend::<Sqlx>(&cluster, replica, &settings, ov, br).await?;
            }
            if backends.iter().any(|b| b == "diesel") {
                let (ov, br) = (&mut out.overhead, &mut out.breakdown);
                bench_backend::<Diesel>(&cluster, replica, &settings, ov, br).await?;
            }
            out.elapsed.push(("overhead", t.elapsed().as_secs_f64()));
        }
        if run("scale") {
            let t = Instant::now();
            let mut scale = routing_examples::scale::run(&cluster, &settings.scale).await?;
            if settings.scale_four {
                let four = tokio::task::spawn_blocking(|| {
                    routing_testkit::ClusterBuilder::new().replicas(4).start()
                })
                .await
                .map_err(err)?
                .map_err(err)?;
                let opts = ScaleOptions {
                    replicas: vec![4],
                    ..settings.scale.clone()
                };
                scale.extend(routing_examples::scale::run(&four, &opts).await?);
                tokio::task::spawn_blocking(move || drop(four))
                    .await
                    .map_err(err)?;
            }
            out.scale = json!(scale);
            out.elapsed.push(("scale", t.elapsed().as_secs_f64()));
        }
        if run("offload") {
            let t = Instant::now();
            let offload = routing_examples::offload::run(&cluster, &settings.offload).await?;
            for r in &offload {
                eprintln!(
                    "offload: {:>26} delay {:>3} ms: replica share {:.2}, stale {}, read p50 {:.2} ms p99 {:.2} ms, {:.0} reads/s",
                    r.mode, r.delay_ms, r.replica_share, r.stale_reads, r.read_p50_ms, r.read_p99_ms, r.read_throughput
                );
            }
            out.chart = Some(routing_examples::chart::draw(&offload, 50)?);
            out.offload = json!(offload);
            out.elapsed.push(("offload", t.elapsed().as_secs_f64()));
        }
        if run("peer") {
            let t = Instant::now();
            let peer = routing_examples::peer::compare(&cluster, &settings.peer).await?;
            for r in &peer {
                eprintln!(
                    "peer: {:<9} delay {:>3} ms: {:.0} ops/s, p50 {:.2} ms, p99 {:.2} ms, replica share {:.2}, stale {}",
                    r.system, r.delay_ms, r.throughput, r.p50_ms, r.p99_ms, r.replica_share, r.stale_reads
                );
            }
            out.peer = json!(peer);
            out.elapsed.push(("peer", t.elapsed().as_secs_f64()));
        }
        if run("failover") {
            let t = Instant::now();
            let mut faults = Vec::new();
            for fault in [Fault::Kill, Fault::Blackhole] {
                let row = routing_examples::failover::measure(fault, settings.failover_runs).await?;
                eprintln!(
                    "failover: {fault:?}: p50 {:.0} ms, max {:.0} ms over {} runs",
                    row.p50_ms, row.max_ms, row.runs
                );
                faults.push(row);
            }
            let mut all: Vec<f64> = faults.iter().flat_map(|r| r.samples_ms.clone()).collect();
            all.sort_by(f64::total_cmp);
            out.failover = json!({
                "runs": all.len(),
                "p50_ms": all.get(all.len() / 2).copied().unwrap_or(f64::NAN),
                "max_ms": all.last().copied().unwrap_or(f64::NAN),
                "by_fault": faults,
            });
            out.elapsed.push(("failover", t.elapsed().as_secs_f64()));
        }
        Ok(out)
    });
    drop(rt);
    drop(cluster);
    let load_after = loadavg();
    let out = result.unwrap_or_else(|e| {
        eprintln!("bench: {e}");
        std::process::exit(1)
    });
    // The arguments as given (`--only`, `--backend` say which part of a full run this is).
    let command = std::iter::once("cargo xtask bench".to_string())
        .chain(std::env::args().skip(1))
        .collect::<Vec<_>>()
        .join(" ");
    let doc = json!({
        "date": now_utc(),
        "command": command,
        "machine": machine(),
        "settings": {"quick": settings.quick, "rounds": settings.rounds,
            "round_ms": settings.round.as_millis() as u64,
            "breakdown_requests": settings.breakdown_requests,
            "pool_size": POOL_SIZE, "concurrency": CONCURRENCY},
        "load_average": {"before": load_before, "after": load_after},
        "overhead": out.overhead,
        "breakdown": out.breakdown,
        "decision_ns": out.decision["eventual_ns"].as_f64().unwrap_or(f64::NAN)
            .max(out.decision["causal_ns"].as_f64().unwrap_or(f64::NAN)),
        "decision": out.decision,
        "scale": out.scale,
        "offload": out.offload,
        "peer": out.peer,
        "failover": out.failover,
        "section_elapsed_s": out.elapsed.iter().map(|(k, v)| (k.to_string(), json!(v)))
            .collect::<serde_json::Map<_, _>>(),
        "elapsed_s": started.elapsed().as_secs_f64(),
    });
    let path = std::path::Path::new(&json_path);
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        let _ = std::fs::create_dir_all(dir);
    }
    let text = serde_json::to_string_pretty(&doc).expect("json");
    let md_path = path.with_extension("md");
    let (svg_path, png_path) = (path.with_extension("svg"), path.with_extension("png"));
    let mut written = vec![path.display().to_string(), md_path.display().to_string()];
    let mut res =
        std::fs::write(path, text).and_then(|()| std::fs::write(&md_path, markdown(&doc)));
    // The chart comes from the offload section.
    if let Some(chart) = &out.chart {
        res = res
            .and_then(|()| std::fs::write(&svg_path, &chart.svg))
            .and_then(|()| std::fs::write(&png_path, &chart.png));
        written.extend([
            svg_path.display().to_string(),
            png_path.display().to_string(),
        ]);
    }
    if let Err(e) = res {
        eprintln!("bench: cannot write {}: {e}", path.display());
        std::process::exit(1);
    }
    println!(
        "bench: wrote {} in {:.0} s",
        written.join(", "),
        started.elapsed().as_secs_f64()
    );
    if only.len() < SECTIONS.len() {
        println!(
            "bench: only {} ran; the JSON is not checked",
            only.join(", ")
        );
    } else if let Err(e) = check_fields(&doc) {
        eprintln!("bench: the JSON is incomplete: {e}");
        std::process::exit(1);
    }
}
