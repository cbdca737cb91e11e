//! The HA workload behind `cargo xtask ha`: the router on a real etcd + Patroni + HAProxy stack
//! ([`routing_testkit::HaStack`]).
//!
//! In each configuration ((a) HAProxy's writer and reader frontends, (b) the three members listed
//! directly, (c) the members discovered from Patroni's REST API, `GET /cluster`, kept in step
//! while the workload runs) workers write and make read-after-write pairs in `ReadYourWrites` and `Causal` (the
//! read by another client holding only the writer's token), with an `Eventual` control, while
//! the stack goes through a planned switchover, a crash of the leader's postmaster (Patroni
//! restarts it in place) and the loss of the whole leader (Patroni and PostgreSQL killed
//! together; restarted afterwards). Each round measures the time from the fault to the first
//! write a new primary accepts (a probe loop with connections of its own, straight to the
//! members), then to the router's first acknowledged write on that new server, and counts failed
//! requests, stale reads and acknowledged writes missing from the final primary.
//!
//! In (c) one more round adds a fourth member to the Patroni cluster while the workload runs
//! (`member_added`): it measures when Patroni first lists the member and when the router first
//! serves a read on it, without a restart.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use routing_core::{
    Backend, Consistency, RequestContext, Router, RouterConfig, TokenCodec, TokenKey,
};
use routing_sqlx::SqlxBackend;
use routing_testkit::HaStack;
use serde::Serialize;
use sqlx::Connection;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How the router reaches the stack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Config {
    /// (a) HAProxy's writer frontend and its reader frontend (a load-balanced replica node).
    Haproxy,
    /// (b) The three members listed directly; the monitor finds the primary.
    Direct,
    /// (c) The members Patroni's REST API lists, polled every 200 ms while the router runs
    /// ([`routing_core::Discoverer`] with [`routing_core::patroni::PatroniDiscovery`]).
    Discovery,
}

impl Config {
    /// Every one, in run order.
    pub const ALL: [Config; 3] = [Config::Haproxy, Config::Direct, Config::Discovery];

    /// Name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            Config::Haproxy => "haproxy",
            Config::Direct => "direct",
            Config::Discovery => "discovery",
        }
    }
}

/// A fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Round {
    /// `patronictl switchover --force` to Patroni's choice (the synchronous standby).
    Switchover,
    /// SIGKILL to the leader's postmaster; Patroni restarts it in place.
    PostmasterCrash,
    /// The leader's Patroni and every PostgreSQL process of it SIGKILLed together; the member is
    /// restarted after the round so the next one has three members again.
    LeaderLoss,
    /// Not a fault: a fourth member joins the Patroni cluster while the workload runs. Only in
    /// the `discovery` configuration, once per run (after its other rounds).
    MemberAdded,
}

impl Round {
    /// Every fault, in run order.
    pub const ALL: [Round; 3] = [Round::Switchover, Round::PostmasterCrash, Round::LeaderLoss];

    /// Name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            Round::Switchover => "switchover",
            Round::PostmasterCrash => "postmaster_crash",
            Round::LeaderLoss => "leader_loss",
            Round::MemberAdded => "member_added",
        }
    }
}

/// How big a run is.
#[derive(Debug, Clone)]
pub struct HaOptions {
    /// Configurations to run.
    pub configs: Vec<Config>,
    /// Faults, each run `repeats` times per configuration.
    pub rounds: Vec<Round>,
    /// Runs of each fault per configuration.
    pub repeats: usize,
    /// Workload before the fault.
    pub steady: Duration,
    /// Workload after the router's first write on the new primary.
    pub settle: Duration,
    /// Workers per mode (`ReadYourWrites`, `Causal`, `Eventual`), plus one that only writes.
    pub workers_per_mode: usize,
}

impl HaOptions {
    /// The full run: every fault twice per configuration.
    pub fn full() -> Self {
        HaOptions {
            configs: Config::ALL.to_vec(),
            rounds: Round::ALL.to_vec(),
            repeats: 2,
            steady: Duration::from_secs(3),
            settle: Duration::from_secs(2),
            workers_per_mode: 2,
        }
    }

    /// `--quick`: every fault once per configuration, shorter phases.
    pub fn quick() -> Self {
        HaOptions {
            repeats: 1,
            steady: Duration::from_millis(1500),
            settle: Duration::from_secs(1),
            ..Self::full()
        }
    }
}

/// One (configuration, round). Field names are the `--json` format.
#[derive(Debug, Clone, Serialize)]
pub struct RoundReport {
    /// `haproxy` or `direct`.
    pub config: String,
    /// `switchover`, `postmaster_crash` or `leader_loss`.
    pub round: String,
    /// 1-based repetition of this fault in this configuration.
    pub repeat: usize,
    /// Fault → the first write a new primary accepted (probed directly). `None`: none within
    /// the round's limit.
    pub primary_ready_ms: Option<u64>,
    /// Then → the router's first acknowledged write on that new primary (0 when the router got
    /// there first). `None`: none within the round's limit.
    pub router_write_ms: Option<u64>,
    /// Then → the first write HAProxy's writer frontend let through to the new primary (probed
    /// like `primary_ready_ms`, in every configuration): HAProxy's own switch, the bar for
    /// `router_write_ms` in the `haproxy` configuration.
    pub haproxy_switch_ms: Option<u64>,
    /// Requests (writes, pairs) that returned an error or took too long.
    pub failed_requests: u64,
    /// Stale reads in the protected modes (`ReadYourWrites`, `Causal`).
    pub stale_reads: u64,
    /// Stale reads in `ReadYourWrites`.
    pub stale_ryw: u64,
    /// Stale reads in `Causal`.
    pub stale_causal: u64,
    /// Stale reads in the unprotected `Eventual` control.
    pub eventual_stale_reads: u64,
    /// Reads made by the `Eventual` control.
    pub eventual_reads: u64,
    /// Acknowledged writes whose id is missing on the final primary.
    pub lost_acked_writes: u64,
    /// Acknowledged writes in the round.
    pub acked_writes: u64,
    /// Requests attempted.
    pub ops: u64,
    /// The leader before the fault and after it (Patroni member names).
    pub old_leader: String,
    /// The member that accepted the first probe write after the fault.
    pub new_leader: String,
    /// `member_added` rounds: the member's start → the first `/cluster` answer that lists it
    /// running (cloned from the leader, PostgreSQL up).
    pub member_listed_ms: Option<u64>,
    /// `member_added` rounds: Patroni listing it → the router's first read served by it (0 when
    /// the router got there first).
    pub member_serving_ms: Option<u64>,
    /// `member_added` rounds: the member's start → the router's first read served by it.
    pub member_first_read_ms: Option<u64>,
}

#[derive(Debug, Default)]
struct Counters {
    ops: AtomicU64,
    failed: AtomicU64,
    stale_ryw: AtomicU64,
    stale_causal: AtomicU64,
    stale_eventual: AtomicU64,
    eventual_reads: AtomicU64,
}

/// Acknowledged writes of a round: id, when the ack came, and the server (`port/start time`).
#[derive(Debug, Default)]
struct Acks(Mutex<Vec<(i64, Instant, String)>>);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    ReadYourWrites,
    Causal,
    Eventual,
    WriteOnly,
}

/// Direct probe writes waiting at once, per member.
const PROBES_PER_PORT: usize = 4;
/// Probe writes waiting at once through HAProxy's writer frontend: while no server is up,
/// HAProxy holds each connection for its connect timeout (2 s), so it takes this many to keep
/// trying every 20 ms or so (they wait in HAProxy, not in PostgreSQL).
const PROBES_VIA_HAPROXY: usize = 64;
const REQUEST_LIMIT: Duration = Duration::from_secs(10);
const READY_LIMIT: Duration = Duration::from_secs(60);
const HEALTHY_LIMIT: Duration = Duration::from_secs(120);
/// The server identity a write landed on: a switchover changes the port, a restart the start time.
const IDENTITY: &str = "inet_server_port()::text || '/' || pg_postmaster_start_time()::text";
/// The direct probe's write, returning [`IDENTITY`].
const PROBE_WRITE: &str = "INSERT INTO ha_probe DEFAULT VALUES \
     RETURNING inet_server_port()::text || '/' || pg_postmaster_start_time()::text";

/// Patroni's REST API on every member (spares included: they answer once started), with the
/// test kit's least-privilege roles.
fn patroni_source(ha: &HaStack) -> Result<routing_core::patroni::PatroniDiscovery, BoxError> {
    use routing_core::patroni::{PatroniDiscovery, PatroniTemplate};
    use routing_testkit::{
        MONITOR_PASSWORD, MONITOR_ROLE, READER_PASSWORD, READER_ROLE, WRITER_PASSWORD, WRITER_ROLE,
    };
    let template = PatroniTemplate::new(WRITER_ROLE, WRITER_PASSWORD, "postgres")
        .reader(READER_ROLE, READER_PASSWORD)
        .monitor(MONITOR_ROLE, MONITOR_PASSWORD);
    let endpoints = ha
        .members()
        .iter()
        .map(|m| format!("http://127.0.0.1:{}", m.rest_port()));
    Ok(PatroniDiscovery::new(endpoints, template)?)
}

/// The router's configuration: defaults, with a one-second lag bound.
pub fn router_config() -> RouterConfig {
    crate::chaos::checker_config()
}

/// [`router_config`] for `config`. Behind HAProxy, the probe gives up after 300 ms: a
/// connection that reaches HAProxy while its writer backend has no live server is held in
/// connect retries for seconds and reaches the server that comes up meanwhile late, if at all, so a
/// probe that waits out the default second notices the new primary up to a second late.
pub fn router_config_for(config: Config) -> RouterConfig {
    let mut c = router_config();
    if config == Config::Haproxy {
        c.probe_timeout = HAPROXY_PROBE_TIMEOUT;
    }
    c
}

/// See [`router_config_for`].
pub const HAPROXY_PROBE_TIMEOUT: Duration = Duration::from_millis(300);

/// Starts the stack, runs every configuration and round, stops the stack; `progress` is called
/// after each round.
pub async fn run(
    opts: &HaOptions,
    mut progress: impl FnMut(&RoundReport),
) -> Result<Vec<RoundReport>, BoxError> {
    let started = Instant::now();
    // A spare member for the discovery configuration's `member_added` round.
    let spares = usize::from(opts.configs.contains(&Config::Discovery));
    let ha = Arc::new(
        tokio::task::spawn_blocking(move || HaStack::builder().members(3).spares(spares).start())
            .await??,
    );
    println!(
        "HA stack up in {:.1} s: etcd :{}, members {}, HAProxy writer :{} reader :{} (dir {})",
        started.elapsed().as_secs_f64(),
        ha.etcd_port(),
        ha.members()
            .iter()
            .map(|m| format!("{} :{} (REST :{})", m.name(), m.port(), m.rest_port()))
            .collect::<Vec<_>>()
            .join(", "),
        ha.writer_port(),
        ha.reader_port(),
        ha.dir().display()
    );
    let result = run_on(&ha, opts, &mut progress).await;
    // HA_LOGS=DIR keeps the stack's logs (Patroni, etcd, HAProxy) for a look afterwards.
    if let Some(keep) = std::env::var_os("HA_LOGS") {
        let keep = std::path::PathBuf::from(keep);
        let _ = std::fs::create_dir_all(&keep);
        for e in std::fs::read_dir(ha.dir()).into_iter().flatten().flatten() {
            if e.path().extension().is_some_and(|x| x == "log") {
                let _ = std::fs::copy(e.path(), keep.join(e.file_name()));
            }
        }
    }
    let stack = ha.clone();
    drop(ha);
    // Stop everything before returning, whatever happened (drop does it too, but explicitly
    // here so the leftover check right after us finds nothing).
    tokio::task::spawn_blocking(move || stack.stop()).await?;
    result
}

async fn blocking<T: Send + 'static>(
    ha: &Arc<HaStack>,
    f: impl FnOnce(&HaStack) -> Result<T, routing_testkit::KitError> + Send + 'static,
) -> Result<T, BoxError> {
    let ha = ha.clone();
    Ok(tokio::task::spawn_blocking(move || f(&ha)).await??)
}

async fn run_on(
    ha: &Arc<HaStack>,
    opts: &HaOptions,
    progress: &mut impl FnMut(&RoundReport),
) -> Result<Vec<RoundReport>, BoxError> {
    let leader = blocking(ha, |h| h.wait_healthy(HEALTHY_LIMIT)).await?;
    blocking(ha, move |h| {
        h.psql(
            leader,
            "CREATE TABLE ha_log (id bigint PRIMARY KEY, user_id int NOT NULL, val bigint NOT NULL); \
             CREATE TABLE ha_users (user_id int PRIMARY KEY, val bigint NOT NULL); \
             CREATE TABLE ha_probe (id bigserial PRIMARY KEY, at timestamptz NOT NULL DEFAULT now())",
        )
    })
    .await?;
    let next_id = Arc::new(AtomicI64::new(1));
    let mut reports = Vec::new();
    let mut all_acked: Vec<i64> = Vec::new();
    let mut seq = 0i64;
    for &config in &opts.configs {
        let source = Arc::new(patroni_source(ha)?);
        let nodes = match config {
            Config::Haproxy => ha.haproxy_node_configs(),
            Config::Direct => ha.direct_node_configs(),
            Config::Discovery => {
                routing_core::Discoverer::<SqlxBackend>::initial_nodes(
                    source.as_ref(),
                    Duration::from_secs(2),
                )
                .await?
            }
        };
        let router = Router::builder(SqlxBackend::new())
            .nodes(nodes)
            .config(router_config_for(config))
            .tokens(
                TokenCodec::new(TokenKey::new(1, "ha-workload-key-0123456789abcdef")?)
                    .cluster(ha.scope()),
            )
            .build()
            .await?;
        // Kept while the configuration runs; dropped (polling stops) with it.
        let _discovery = (config == Config::Discovery).then(|| {
            routing_core::Discoverer::new(
                router.clone(),
                source.clone(),
                routing_core::DiscoverySettings::new(
                    Duration::from_millis(200),
                    Duration::from_secs(1),
                ),
            )
            .spawn()
        });
        let mut rounds: Vec<(usize, Round)> = (1..=opts.repeats)
            .flat_map(|repeat| opts.rounds.iter().map(move |&r| (repeat, r)))
            .collect();
        if config == Config::Discovery && ha.active() < ha.members().len() {
            rounds.push((1, Round::MemberAdded));
        }
        for (repeat, round) in rounds {
            seq += 1;
            let (report, acked) =
                run_round(ha, &router, opts, config, round, repeat, seq, &next_id).await?;
            all_acked.extend(acked);
            progress(&report);
            reports.push(report);
        }
        router.shutdown();
    }
    // Every acknowledged write of the whole run, on the final primary.
    let leader = blocking(ha, |h| h.wait_healthy(HEALTHY_LIMIT)).await?;
    let missing = missing_ids(ha.members()[leader].port(), &all_acked).await?;
    println!(
        "final check: {} acknowledged writes of the whole run, {} missing on the final primary {}",
        all_acked.len(),
        missing,
        ha.members()[leader].name()
    );
    if missing > 0 {
        return Err(format!("{missing} acknowledged writes missing on the final primary").into());
    }
    Ok(reports)
}

#[allow(clippy::too_many_arguments)]
async fn run_round(
    ha: &Arc<HaStack>,
    router: &Router<SqlxBackend>,
    opts: &HaOptions,
    config: Config,
    round: Round,
    repeat: usize,
    seq: i64,
    next_id: &Arc<AtomicI64>,
) -> Result<(RoundReport, Vec<i64>), BoxError> {
    let leader = blocking(ha, |h| h.wait_healthy(HEALTHY_LIMIT)).await?;
    let old_identity = blocking(ha, move |h| h.psql(leader, &format!("SELECT {IDENTITY}"))).await?;
    // The router must be writing before the fault, or the round measures its start-up.
    let deadline = Instant::now() + READY_LIMIT;
    while probe_router_write(router).await.is_err() {
        if Instant::now() > deadline {
            return Err(format!(
                "the router did not write before the fault: {}",
                describe(router)
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let counters = Arc::new(Counters::default());
    let acks: Arc<Acks> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    let modes = [Mode::ReadYourWrites, Mode::Causal, Mode::Eventual];
    for (w, mode) in (0i64..).zip(
        modes
            .iter()
            .flat_map(|m| std::iter::repeat_n(*m, opts.workers_per_mode))
            .chain([Mode::WriteOnly]),
    ) {
        let users: Vec<i64> = (0..8).map(|u| seq * 100_000 + w * 100 + u).collect();
        workers.push(tokio::spawn(worker(
            router.clone(),
            mode,
            users,
            next_id.clone(),
            counters.clone(),
            acks.clone(),
            stop.clone(),
        )));
    }
    if trace() {
        tokio::spawn(trace_topology(router.clone(), stop.clone()));
    }
    tokio::time::sleep(opts.steady).await;

    // The fault, with the direct write probe running from the moment it starts.
    let ports: Vec<u16> = ha.members().iter().map(|m| m.port()).collect();
    let fault_at = Instant::now();
    if trace() {
        eprintln!("  fault {} at {:?}", round.name(), since_start());
    }
    let mut member: (Option<Duration>, Option<Duration>, Option<Duration>) = (None, None, None);
    let ready = if round == Round::MemberAdded {
        member = add_member(ha, router).await?;
        Ready::default()
    } else {
        let probe = tokio::spawn(probe_new_primary(
            ports,
            ha.writer_port(),
            old_identity.clone(),
        ));
        match round {
            Round::Switchover => {
                blocking(ha, |h| h.switchover(None)).await?;
                if trace() {
                    eprintln!(
                        "  patronictl switchover returned after {:?}",
                        fault_at.elapsed()
                    );
                }
            }
            Round::PostmasterCrash => blocking(ha, move |h| h.crash_postmaster(leader)).await?,
            Round::LeaderLoss => blocking(ha, move |h| h.kill_member(leader)).await?,
            Round::MemberAdded => {}
        }
        probe.await?
    };
    let (primary_ready, new_identity) = match &ready.direct {
        Some((at, id)) => (Some(*at), id.clone()),
        None => (None, String::new()),
    };
    // The router's first acknowledged write on the new server.
    let mut router_write: Option<Instant> = None;
    if let Some(ready_at) = primary_ready {
        let deadline = ready_at + READY_LIMIT;
        while router_write.is_none() && Instant::now() < deadline {
            router_write = acks
                .0
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .filter(|(_, _, id)| *id == new_identity)
                .map(|(_, at, _)| *at)
                .min();
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    if router_write.is_none() && round != Round::MemberAdded {
        eprintln!(
            "{} {}: the router did not write on the new primary: {}",
            config.name(),
            round.name(),
            describe(router)
        );
    }
    tokio::time::sleep(opts.settle).await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await?;
    }
    if round == Round::LeaderLoss {
        blocking(ha, move |h| h.restart_member(leader)).await?;
    }
    let final_leader = blocking(ha, |h| h.wait_healthy(HEALTHY_LIMIT)).await?;
    let acked: Vec<i64> = acks
        .0
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .map(|(id, _, _)| *id)
        .collect();
    let lost = missing_ids(ha.members()[final_leader].port(), &acked).await?;
    let new_port: Option<u16> = new_identity.split('/').next().and_then(|p| p.parse().ok());
    let name_of = |port: Option<u16>| {
        ha.members()
            .iter()
            .find(|m| Some(m.port()) == port)
            .map(|m| m.name().to_string())
            .unwrap_or_default()
    };
    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    let c = &counters;
    let (ryw, causal) = (
        c.stale_ryw.load(Ordering::Relaxed),
        c.stale_causal.load(Ordering::Relaxed),
    );
    let report = RoundReport {
        config: config.name().into(),
        round: round.name().into(),
        repeat,
        primary_ready_ms: primary_ready.map(|t| ms(t - fault_at)),
        router_write_ms: match (primary_ready, router_write) {
            (Some(p), Some(r)) => Some(ms(r.saturating_duration_since(p))),
            _ => None,
        },
        haproxy_switch_ms: match (primary_ready, ready.haproxy) {
            (Some(p), Some(h)) => Some(ms(h.saturating_duration_since(p))),
            _ => None,
        },
        failed_requests: c.failed.load(Ordering::Relaxed),
        stale_reads: ryw + causal,
        stale_ryw: ryw,
        stale_causal: causal,
        eventual_stale_reads: c.stale_eventual.load(Ordering::Relaxed),
        eventual_reads: c.eventual_reads.load(Ordering::Relaxed),
        lost_acked_writes: lost,
        acked_writes: acked.len() as u64,
        ops: c.ops.load(Ordering::Relaxed),
        old_leader: ha.members()[leader].name().into(),
        new_leader: name_of(new_port),
        member_listed_ms: member.0.map(ms),
        member_serving_ms: member.1.map(ms),
        member_first_read_ms: member.2.map(ms),
    };
    Ok((report, acked))
}

/// Starts the stack's spare member and measures, from its start, when Patroni's `/cluster`
/// first lists it as running (Patroni lists a member from its first loop, while it still
/// clones the leader; only a running one can serve), then how long after that the router first serves an `Eventual` read on it
/// (the discoverer adds it, the monitor probes it; nothing restarts).
async fn add_member(
    ha: &Arc<HaStack>,
    router: &Router<SqlxBackend>,
) -> Result<(Option<Duration>, Option<Duration>, Option<Duration>), BoxError> {
    let started = Instant::now();
    let i = blocking(ha, |h| h.add_member()).await?;
    let name = ha.members()[i].name().to_string();
    let deadline = started + READY_LIMIT;
    let eventual = RequestContext::new().consistency(Consistency::Eventual);
    let (mut listed, mut serving) = (None, None);
    while (listed.is_none() || serving.is_none()) && Instant::now() < deadline {
        if listed.is_none() {
            let h = ha.clone();
            let n = name.clone();
            let seen = tokio::task::spawn_blocking(move || {
                h.cluster().is_some_and(|c| {
                    c.iter()
                        .any(|m| m.name == n && matches!(m.state.as_str(), "running" | "streaming"))
                })
            })
            .await?;
            if seen {
                listed = Some(Instant::now());
            }
        }
        if serving.is_none()
            && let Ok(Ok(conn)) =
                tokio::time::timeout(REQUEST_LIMIT, router.read_with(&eventual)).await
            && conn.node_name() == name
        {
            serving = Some(Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    if trace() || serving.is_none() {
        eprintln!(
            "  {name}: listed {:?}, serving {:?} after its start: {}",
            listed.map(|t| t - started),
            serving.map(|t| t - started),
            describe(router)
        );
    }
    Ok((
        listed.map(|t| t - started),
        listed
            .zip(serving)
            .map(|(l, s)| s.saturating_duration_since(l)),
        serving.map(|t| t - started),
    ))
}

/// When a write first committed on a server other than the one before the fault.
#[derive(Debug, Clone, Default)]
struct Ready {
    /// Straight to a member: when, and the server's identity.
    direct: Option<(Instant, String)>,
    /// Through HAProxy's writer frontend.
    haproxy: Option<Instant>,
}

/// Fresh connections to every member and to HAProxy's writer frontend, one write each, a new
/// attempt every 20 ms, until a write commits on a server other than `old` (another member, or
/// the same one restarted), both directly and through HAProxy. Attempts are not cut short: one
/// that waits (a synchronous commit before the new primary has a standby, a connection HAProxy
/// queues while no server is up) ends exactly when the server lets it, which is the moment
/// measured; at most [`PROBES_PER_PORT`] wait at once per member, [`PROBES_VIA_HAPROXY`]
/// through HAProxy.
async fn probe_new_primary(members: Vec<u16>, haproxy: u16, old: String) -> Ready {
    let found: Arc<Mutex<Ready>> = Arc::default();
    let deadline = Instant::now() + READY_LIMIT;
    let in_flight: Arc<Mutex<HashMap<u16, usize>>> = Arc::default();
    let ports: Vec<u16> = members.iter().copied().chain([haproxy]).collect();
    while Instant::now() < deadline {
        {
            let f = found.lock().unwrap_or_else(|e| e.into_inner());
            if f.direct.is_some() && f.haproxy.is_some() {
                return f.clone();
            }
        }
        for &port in &ports {
            {
                let mut busy = in_flight.lock().unwrap_or_else(|e| e.into_inner());
                let n = busy.entry(port).or_default();
                let cap = if port == haproxy {
                    PROBES_VIA_HAPROXY
                } else {
                    PROBES_PER_PORT
                };
                if *n >= cap {
                    continue;
                }
                *n += 1;
            }
            let (found, in_flight, old) = (found.clone(), in_flight.clone(), old.clone());
            tokio::spawn(async move {
                let began = since_start();
                // Through HAProxy, a connection that arrives while no server is up waits
                // there ~3 s and then fails, even if a server comes up meanwhile: give up on
                // it early (a login that HAProxy forwards takes milliseconds) and try again.
                let connect_limit = if port == haproxy {
                    Duration::from_millis(300)
                } else {
                    READY_LIMIT
                };
                let attempt = async {
                    let connect = sqlx::PgConnection::connect(&HaStack::superuser_url(port));
                    let mut conn = tokio::time::timeout(connect_limit, connect)
                        .await
                        .map_err(|_| "connect timed out".to_string())?
                        .map_err(|e| e.to_string())?;
                    let id: String = sqlx::query_scalar(PROBE_WRITE)
                        .fetch_one(&mut conn)
                        .await
                        .map_err(|e| e.to_string())?;
                    let _ = conn.close().await;
                    Ok::<String, String>(id)
                };
                let outcome = tokio::time::timeout(READY_LIMIT, attempt).await;
                if trace() && port == haproxy {
                    eprintln!(
                        "  probe via haproxy {began:?}..{:?}: {outcome:?}",
                        since_start()
                    );
                }
                if let Ok(Ok(id)) = outcome
                    && id != old
                {
                    let now = Instant::now();
                    let mut f = found.lock().unwrap_or_else(|e| e.into_inner());
                    if port == haproxy {
                        if f.haproxy.is_none_or(|at| now < at) {
                            f.haproxy = Some(now);
                        }
                    } else if f.direct.as_ref().is_none_or(|(at, _)| now < *at) {
                        f.direct = Some((now, id));
                    }
                }
                if let Some(n) = in_flight
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get_mut(&port)
                {
                    *n -= 1;
                }
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    found.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

async fn probe_router_write(router: &Router<SqlxBackend>) -> Result<(), routing_core::Error> {
    let mut w = router.write().await?;
    let done =
        <SqlxBackend as Backend>::execute(w.pooled(), "INSERT INTO ha_probe DEFAULT VALUES").await;
    w.check_backend(done)?;
    w.finish().await?;
    Ok(())
}

fn trace() -> bool {
    std::env::var_os("HA_TRACE").is_some()
}

fn since_start() -> Duration {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed()
}

/// With `HA_TRACE` set: prints every change of the router's view of its nodes.
async fn trace_topology(router: Router<SqlxBackend>, stop: Arc<AtomicBool>) {
    let mut last = String::new();
    while !stop.load(Ordering::Relaxed) {
        let now = describe(&router);
        if now != last {
            eprintln!("  topology at {:?}: {now}", since_start());
            last = now;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The router's view of its nodes, for error messages.
fn describe(router: &Router<SqlxBackend>) -> String {
    let snap = router.snapshot();
    snap.nodes
        .iter()
        .map(|n| {
            format!(
                "{} {:?} reachable={} timeline={:?} error={:?}",
                n.name, n.role, n.reachable, n.timeline, n.last_error
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// How many of `ids` are missing from `ha_log` on the server at `port`.
async fn missing_ids(port: u16, ids: &[i64]) -> Result<u64, BoxError> {
    let mut conn = sqlx::PgConnection::connect(&HaStack::superuser_url(port)).await?;
    let stored: Vec<i64> = sqlx::query_scalar("SELECT id FROM ha_log WHERE id = ANY($1)")
        .bind(ids)
        .fetch_all(&mut conn)
        .await?;
    let _ = conn.close().await;
    let stored: HashSet<i64> = stored.into_iter().collect();
    Ok(ids.iter().filter(|id| !stored.contains(id)).count() as u64)
}

async fn worker(
    router: Router<SqlxBackend>,
    mode: Mode,
    users: Vec<i64>,
    next_id: Arc<AtomicI64>,
    counters: Arc<Counters>,
    acks: Arc<Acks>,
    stop: Arc<AtomicBool>,
) {
    let mut vals = vec![0i64; users.len()];
    let mut i = 0usize;
    while !stop.load(Ordering::Relaxed) {
        let k = i % users.len();
        i += 1;
        vals[k] += 1;
        let (user, val) = (users[k], vals[k]);
        let id = next_id.fetch_add(1, Ordering::Relaxed);
        counters.ops.fetch_add(1, Ordering::Relaxed);
        let outcome =
            tokio::time::timeout(REQUEST_LIMIT, request(&router, mode, user, val, id, &acks)).await;
        if mode == Mode::Eventual && matches!(outcome, Ok(Ok(_))) {
            counters.eventual_reads.fetch_add(1, Ordering::Relaxed);
        }
        match outcome {
            Ok(Ok(true)) => {}
            Ok(Ok(false)) => {
                let c = match mode {
                    Mode::ReadYourWrites => &counters.stale_ryw,
                    Mode::Causal => &counters.stale_causal,
                    _ => &counters.stale_eventual,
                };
                c.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Err(_)) | Err(_) => {
                counters.failed.fetch_add(1, Ordering::Relaxed);
                // Don't spin while there is no primary.
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }
}

/// One write (id `id`, setting `user`'s value to `val`), then for the pair modes a read of that
/// value; `Ok(false)` when the read was stale.
async fn request(
    router: &Router<SqlxBackend>,
    mode: Mode,
    user: i64,
    val: i64,
    id: i64,
    acks: &Acks,
) -> Result<bool, routing_core::Error> {
    let writer_ctx = RequestContext::new()
        .user(user.to_string())
        .consistency(Consistency::ReadYourWrites);
    let mut w = router.write_with(&writer_ctx).await?;
    let sql = format!(
        "WITH l AS (INSERT INTO ha_log (id, user_id, val) VALUES ({id}, {user}, {val})), \
         u AS (INSERT INTO ha_users (user_id, val) VALUES ({user}, {val}) \
               ON CONFLICT (user_id) DO UPDATE SET val = EXCLUDED.val) \
         SELECT {IDENTITY} AS v"
    );
    let done = <SqlxBackend as Backend>::query_text(w.pooled(), &sql).await;
    let server = w.check_backend(done)?.unwrap_or_default();
    let receipt = w.finish().await?;
    acks.0
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push((id, Instant::now(), server));

    let reader_ctx = match mode {
        Mode::WriteOnly => return Ok(true),
        Mode::ReadYourWrites => writer_ctx,
        // Another client, holding only the token the writer handed out.
        Mode::Causal => {
            let text = receipt.token.as_deref().unwrap_or_default();
            RequestContext::new()
                .consistency(Consistency::Causal)
                .token(router.verify_token(text)?)
        }
        Mode::Eventual => RequestContext::new().consistency(Consistency::Eventual),
    };
    let mut r = router.read_with(&reader_ctx).await?;
    let select = format!(
        "SELECT coalesce((SELECT val FROM ha_users WHERE user_id = {user}), 0)::text \
         || ' ' || inet_server_port()::text || ' ' || pg_is_in_recovery()::text AS v"
    );
    let got = <SqlxBackend as Backend>::query_text(r.pooled(), &select).await;
    let got = r.check_backend(got)?.unwrap_or_default();
    let seen = got
        .split(' ')
        .next()
        .and_then(|s| s.parse::<i64>().ok())
        .unwrap_or(0);
    if seen < val && mode != Mode::Eventual && trace() {
        eprintln!(
            "  stale {mode:?} read at {:?}: user {user} wrote {val} on {:?}, read {got:?}; {}",
            crate::ha::since_start(),
            acks.0
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .last()
                .map(|a| a.2.clone()),
            describe(router)
        );
    }
    Ok(seen >= val)
}
