//! Failover and health under real faults: a killed or blackholed primary followed by a
//! promotion, measured through a continuous request load with the default configuration; a
//! promotion while the old primary stays up; a replica killed under a read load; lag past the
//! bound (apply delay, paused replay) without flapping; and the typed outcomes callers act on.
//!
//! The load is open-loop, like web traffic: a new request every few milliseconds, each in its own
//! task and bounded only by the router's own deadline, so a request stuck on a dead node does not
//! hold back the ones after it. Every request records when its router call (`write`,
//! `read_with`, `read_retrying_backend`) returned, which node served it and how it ended.

use std::collections::BTreeMap;
use std::sync::Mutex;

use routing_testkit::ProxyMode;
use tokio::task::JoinSet;

use super::*;

/// Slack over `write_deadline` allowed for a router call to return (scheduling on a busy machine).
const MARGIN: Duration = Duration::from_millis(500);

/// At most this many requests in flight; the load skips ticks beyond it (a dead node would
/// otherwise pile up tasks).
const MAX_IN_FLIGHT: usize = 64;

/// Failover rounds per fault, each on a fresh cluster.
const ROUNDS: usize = 5;

/// A read that takes 50 ms on the server (so some are in flight when a node dies) and answers
/// the server's port.
const SLOW_PORT: &str = "SELECT pg_catalog.inet_server_port()::pg_catalog.text AS v \
                         FROM pg_catalog.pg_sleep(0.05)";

/// What each request of a load does.
#[derive(Debug, Clone, Copy)]
enum Work {
    /// `router.write()`, then one INSERT into the load's table (the request's id as the key).
    Write,
    /// `router.read_with(ctx)` in this mode, then [`SLOW_PORT`].
    Read(Consistency),
    /// [`SLOW_PORT`] through `router.read_retrying_backend` (Eventual).
    ReadRetrying,
}

/// How a request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Done,
    NoPrimary,
    NoReader,
    WriteUnknown,
    /// A read's connection broke under it (`Error::Backend` of kind `Connection`).
    ConnectionLost,
    Failed(String),
}

fn outcome_of(e: &Error) -> Outcome {
    match e {
        Error::NoPrimary { .. } => Outcome::NoPrimary,
        Error::NoReader { .. } => Outcome::NoReader,
        Error::WriteOutcomeUnknown { .. } => Outcome::WriteUnknown,
        Error::Backend { source, .. } if source.kind == ErrorKind::Connection => {
            Outcome::ConnectionLost
        }
        other => Outcome::Failed(other.to_string()),
    }
}

#[derive(Debug, Clone)]
struct Request {
    id: u64,
    started: Instant,
    /// When the router call returned (for retrying reads: the whole call, both runs).
    returned: Instant,
    ended: Instant,
    /// The node that served it, when it got that far.
    node: Option<String>,
    outcome: Outcome,
    /// How often the work ran (2 when a retrying read was retried).
    runs: u32,
}

impl Request {
    fn done_on(&self, node: &str) -> bool {
        self.outcome == Outcome::Done && self.node.as_deref() == Some(node)
    }
}

/// An open-loop request load on a router; see the module docs.
struct Load {
    stop: Arc<AtomicBool>,
    /// Last request id handed out (ids grow with start time).
    ids: Arc<AtomicU64>,
    /// Requests whose router call has not returned yet.
    calling: Arc<AtomicUsize>,
    log: Arc<Mutex<Vec<Request>>>,
    driver: tokio::task::JoinHandle<JoinSet<()>>,
}

/// Node names by server port, to name the node a retrying read's answer came from.
fn names_by_port(c: &Cluster) -> Arc<BTreeMap<String, String>> {
    Arc::new(
        c.nodes()
            .iter()
            .map(|n| (n.port().to_string(), n.name().to_string()))
            .collect(),
    )
}

fn start_load<B: Backend>(
    r: &Router<B>,
    c: &Cluster,
    work: Work,
    table: &str,
    every: Duration,
) -> Load {
    let stop = Arc::new(AtomicBool::new(false));
    let ids = Arc::new(AtomicU64::new(0));
    let calling = Arc::new(AtomicUsize::new(0));
    let log = Arc::new(Mutex::new(Vec::new()));
    let (r, s, i, k, l) = (
        r.clone(),
        stop.clone(),
        ids.clone(),
        calling.clone(),
        log.clone(),
    );
    let table: Arc<str> = Arc::from(table);
    let names = names_by_port(c);
    let driver = tokio::spawn(async move {
        let mut set = JoinSet::new();
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if s.load(Ordering::SeqCst) {
                return set;
            }
            while let Some(done) = set.try_join_next() {
                done.expect("request task");
            }
            if set.len() >= MAX_IN_FLIGHT {
                continue;
            }
            let id = i.fetch_add(1, Ordering::SeqCst) + 1;
            k.fetch_add(1, Ordering::SeqCst);
            set.spawn(request(
                r.clone(),
                work,
                table.clone(),
                id,
                names.clone(),
                k.clone(),
                l.clone(),
            ));
        }
    });
    Load {
        stop,
        ids,
        calling,
        log,
        driver,
    }
}

async fn request<B: Backend>(
    r: Router<B>,
    work: Work,
    table: Arc<str>,
    id: u64,
    names: Arc<BTreeMap<String, String>>,
    calling: Arc<AtomicUsize>,
    log: Arc<Mutex<Vec<Request>>>,
) {
    let started = Instant::now();
    let mut runs = 1;
    let returned_now = || {
        calling.fetch_sub(1, Ordering::SeqCst);
        Instant::now()
    };
    let (returned, node, outcome) = match work {
        Work::Write => {
            let got = r.write().await;
            let returned = returned_now();
            match got {
                Err(e) => (returned, None, outcome_of(&e)),
                Ok(mut w) => {
                    let node = w.node_name().to_string();
                    let done = insert(&mut w, &table, id).await;
                    let outcome = done.map_or_else(|e| outcome_of(&e), |_| Outcome::Done);
                    (returned, Some(node), outcome)
                }
            }
        }
        Work::Read(mode) => {
            let got = r.read_with(&RequestContext::new().consistency(mode)).await;
            let returned = returned_now();
            match got {
                Err(e) => (returned, None, outcome_of(&e)),
                Ok(mut conn) => {
                    let node = conn.node_name().to_string();
                    let done = B::query_text(conn.pooled(), SLOW_PORT).await;
                    let outcome = conn
                        .check_backend(done)
                        .map_or_else(|e| outcome_of(&e), |_| Outcome::Done);
                    (returned, Some(node), outcome)
                }
            }
        }
        Work::ReadRetrying => {
            runs = 0;
            let got = r
                .read_retrying_backend(&eventual(), |pooled| {
                    runs += 1;
                    Box::pin(B::query_text(pooled, SLOW_PORT))
                })
                .await;
            let returned = returned_now();
            match got {
                Ok(port) => {
                    let node = port.and_then(|p| names.get(&p).cloned());
                    (returned, node, Outcome::Done)
                }
                Err(e) => (returned, None, outcome_of(&e)),
            }
        }
    };
    let done = Request {
        id,
        started,
        returned,
        ended: Instant::now(),
        node,
        outcome,
        runs,
    };
    log.lock().unwrap_or_else(|e| e.into_inner()).push(done);
}

impl Load {
    fn any(&self, f: impl Fn(&Request) -> bool) -> bool {
        self.log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(f)
    }

    fn count(&self, f: impl Fn(&Request) -> bool) -> usize {
        self.log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|q| f(q))
            .count()
    }

    /// The id of the last request started so far.
    fn last_id(&self) -> u64 {
        self.ids.load(Ordering::SeqCst)
    }

    /// Stops starting requests; waits (asserting) until every router call in flight returned
    /// within `limit`; gives the work still running a moment, then abandons it (a statement on a
    /// blackholed node has no client-side timeout). Returns the log by start time and how many
    /// requests were abandoned.
    async fn finish(self, limit: Duration) -> (Vec<Request>, usize) {
        self.stop.store(true, Ordering::SeqCst);
        let mut set = self.driver.await.expect("load driver");
        let calling = self.calling.clone();
        wait_until("every router call in flight to return", limit, || {
            calling.load(Ordering::SeqCst) == 0
        })
        .await;
        let grace = tokio::time::Instant::now() + Duration::from_millis(300);
        while let Ok(Some(done)) = tokio::time::timeout_at(grace, set.join_next()).await {
            done.expect("request task");
        }
        let abandoned = set.len();
        set.shutdown().await;
        let mut log = std::mem::take(&mut *self.log.lock().unwrap_or_else(|e| e.into_inner()));
        log.sort_by_key(|q| q.started);
        (log, abandoned)
    }
}

/// Asserts no router call took longer than `limit`; returns the slowest.
fn assert_calls_bounded(what: &str, log: &[Request], limit: Duration) -> Duration {
    let slowest = log
        .iter()
        .map(|q| q.returned - q.started)
        .max()
        .unwrap_or_default();
    for q in log {
        let took = q.returned - q.started;
        assert!(
            took <= limit,
            "{what}: request {} waited {took:?} for the router, more than {limit:?} ({:?})",
            q.id,
            q.outcome
        );
    }
    slowest
}

/// `outcome: count` for a log line.
fn tally(log: &[Request]) -> String {
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for q in log {
        let key = match &q.outcome {
            Outcome::Failed(_) => "Failed".to_string(),
            o => format!("{o:?}"),
        };
        *counts.entry(key).or_default() += 1;
    }
    counts
        .iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

// ---------------------------------------------------------------------------------------------
// Primary failover, default configuration
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// `Cluster::kill`: immediate stop, connections refused.
    Kill,
    /// The router reaches the primary through a fault proxy that starts forwarding nothing;
    /// the server itself stays up.
    Blackhole,
}

/// Time from the fault and from the promotion to the first write that succeeded on the new
/// primary.
struct Round {
    from_fault: Duration,
    from_promotion: Duration,
}

/// One round on a fresh primary + 1 replica: a write load (and, for the blackhole, a primary
/// read load) through a router with `RouterConfig::default()`; the fault on node 0, then
/// `promote(1)`; until a write succeeds on node 1, plus a little.
async fn failover_round<H: Harness>(fault: Fault, round: usize) -> Round {
    let c = own_cluster_with(1);
    let (old, new) = (0, 1);
    let (old_name, new_name) = (c.node(old).name(), c.node(new).name());
    let proxy = (fault == Fault::Blackhole).then(|| kit(|| c.proxy(old)).expect("fault proxy"));
    let mut nodes = c.node_configs();
    if let Some(p) = &proxy {
        nodes[old] = node_at(true, old_name, p.port());
    }
    let config = RouterConfig::default();
    let deadline = config.write_deadline;
    let r = Router::builder(H::backend())
        .nodes(nodes)
        .config(config)
        .build()
        .await
        .expect("build router");
    let t = table("failover_round");
    create_table(&r, &t).await;

    let writes = start_load(&r, &c, Work::Write, &t, Duration::from_millis(10));
    let reads = (fault == Fault::Blackhole).then(|| {
        start_load(
            &r,
            &c,
            Work::Read(Consistency::Primary),
            &t,
            Duration::from_millis(20),
        )
    });
    wait_until(
        "writes to flow on the primary",
        Duration::from_secs(10),
        || writes.count(|q| q.done_on(old_name)) >= 10,
    )
    .await;

    let fault_at = Instant::now();
    match (&proxy, fault) {
        (Some(p), Fault::Blackhole) => p.set_mode(ProxyMode::Blackhole),
        _ => kit(|| c.kill(old)).expect("kill the primary"),
    }
    let faulted = Instant::now();
    kit(|| c.promote(new)).expect("promote");
    let promoted_at = Instant::now();
    wait_until(
        "a write to succeed on the new primary",
        deadline * 3,
        || writes.any(|q| q.done_on(new_name)),
    )
    .await;
    // Keep the load on a little longer: later requests must keep landing on the new primary.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let limit = deadline + MARGIN;
    let (log, abandoned) = writes.finish(limit).await;

    let what = format!("{fault:?} round {round}");
    let slowest = assert_calls_bounded(&what, &log, limit);
    let first = log
        .iter()
        .filter(|q| q.done_on(new_name))
        .map(|q| q.ended)
        .min()
        .expect("a write on the new primary");
    for q in &log {
        match &q.outcome {
            Outcome::Done => assert!(
                q.node.as_deref() == Some(new_name) || q.started < faulted,
                "{what}: request {} started after the fault yet wrote on {:?}",
                q.id,
                q.node
            ),
            // Nothing was sent: safe to retry.
            Outcome::NoPrimary => {}
            // A session on the old primary when it died: the only writes allowed to fail so.
            Outcome::WriteUnknown => assert!(
                q.node.as_deref() == Some(old_name) && q.returned < faulted,
                "{what}: outcome unknown for request {} on {:?}, which got its session after the fault",
                q.id,
                q.node
            ),
            other => panic!("{what}: request {} ended {other:?}", q.id),
        }
    }
    if fault == Fault::Kill {
        assert_eq!(abandoned, 0, "{what}: nothing hangs on a killed node");
    }
    let from_fault = first - fault_at;
    let from_promotion = first.saturating_duration_since(promoted_at);
    let since_promotion = if first >= promoted_at {
        format!("{from_promotion:?} after")
    } else {
        format!("{:?} before", promoted_at - first)
    };
    eprintln!(
        "[conformance] {what}: promote() took {:?}; first write on the new primary {since_promotion} promote() returned, {from_fault:?} after the fault; {} writes ({}), {abandoned} abandoned in a hung statement; slowest write() call {slowest:?}",
        promoted_at - faulted,
        log.len(),
        tally(&log),
    );

    if let Some(reads) = reads {
        let (log, abandoned) = reads.finish(limit).await;
        let slowest = assert_calls_bounded(&format!("{what} reads"), &log, limit);
        for q in &log {
            assert!(
                matches!(q.outcome, Outcome::Done | Outcome::NoReader),
                "{what}: read {} ended {:?}",
                q.id,
                q.outcome
            );
        }
        assert!(
            log.iter().any(|q| q.done_on(new_name)),
            "{what}: primary reads resumed on the new primary"
        );
        eprintln!(
            "[conformance] {what}: {} primary reads ({}), {abandoned} abandoned in a hung statement; slowest read_with() call {slowest:?}",
            log.len(),
            tally(&log)
        );
    }
    drop(r);
    drop(proxy);
    drop_cluster(c);
    Round {
        from_fault,
        from_promotion,
    }
}

fn report(fault: Fault, rounds: &[Round]) {
    let stats = |mut v: Vec<Duration>| {
        v.sort();
        (v[v.len() / 2], v[v.len() - 1], v)
    };
    let (p50_p, max_p, all_p) = stats(rounds.iter().map(|r| r.from_promotion).collect());
    let (p50_f, max_f, _) = stats(rounds.iter().map(|r| r.from_fault).collect());
    eprintln!(
        "[conformance] {fault:?} then promote, default RouterConfig, {} rounds: first write on the new primary after promote() returned p50 {p50_p:?} max {max_p:?} (all {all_p:?}; 0 = before it returned); after the fault p50 {p50_f:?} max {max_f:?}",
        rounds.len()
    );
}

/// The primary is killed (immediate stop) and the replica promoted, under a continuous write
/// load through a router with the default configuration, five times on fresh clusters. Every
/// `write()` returns within its deadline, only writes holding a session on the old primary when
/// it died end `WriteOutcomeUnknown`, the rest succeed or fail `NoPrimary`, and writes resume on
/// the new primary. Prints the time to the first write there, from the promotion and from the
/// kill (p50 and max).
pub async fn failover_after_kill_with_defaults<H: Harness>() {
    let mut rounds = Vec::new();
    for round in 1..=ROUNDS {
        rounds.push(failover_round::<H>(Fault::Kill, round).await);
    }
    report(Fault::Kill, &rounds);
}

/// As [`failover_after_kill_with_defaults`], but the primary stays up and its network goes
/// silent (a fault proxy that forwards nothing), with primary reads running too: no `write()`
/// or `read_with()` call hangs past the write deadline, and writes resume on the new primary.
/// Prints the same timings.
pub async fn failover_after_blackhole_with_defaults<H: Harness>() {
    let mut rounds = Vec::new();
    for round in 1..=ROUNDS {
        rounds.push(failover_round::<H>(Fault::Blackhole, round).await);
    }
    report(Fault::Blackhole, &rounds);
}

/// A replica is promoted while the old primary stays up and writable (split brain), under a
/// continuous write load through a router with the default configuration. Once the router has
/// seen the promotion, no write reaches the old primary: checked on the old primary's own table.
/// Prints how many writes landed on the old primary between the promotion and the router
/// noticing it (the exposure window, at most about one probe interval).
pub async fn promotion_with_the_old_primary_up_never_writes_it<H: Harness>() {
    let c = own_cluster_with(1);
    let (old, new) = (0, 1);
    let (old_name, new_name) = (c.node(old).name(), c.node(new).name());
    let config = RouterConfig::default();
    let limit = config.write_deadline + MARGIN;
    let r = router::<H>(&c, config).await;
    let t = table("split_brain");
    create_table(&r, &t).await;
    let writes = start_load(&r, &c, Work::Write, &t, Duration::from_millis(10));
    wait_until(
        "writes to flow on the primary",
        Duration::from_secs(10),
        || writes.count(|q| q.done_on(old_name)) >= 10,
    )
    .await;

    let before_promotion = writes.last_id();
    kit(|| c.promote(new)).expect("promote");
    let noticed = wait_until(
        "the router to elect the promoted node",
        Duration::from_secs(10),
        || r.snapshot().writer == Some(new),
    )
    .await;
    // Every request from here on started after the router saw the promotion.
    let first_after = writes.last_id() + 1;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (log, abandoned) = writes.finish(limit).await;
    assert_eq!(abandoned, 0);
    assert_calls_bounded("split brain", &log, limit);

    let psql = |i: usize, sql: String| kit(|| c.psql(i, &sql)).expect("psql");
    assert_eq!(
        psql(old, "SELECT pg_is_in_recovery()".into()),
        "f",
        "the old primary is still up and writable"
    );
    assert_eq!(r.snapshot().nodes[old].role, NodeRole::Fenced);
    let on_old_after = psql(
        old,
        format!("SELECT count(*) FROM {t} WHERE id >= {first_after}"),
    );
    assert_eq!(
        on_old_after, "0",
        "no write reached the old primary after the router saw the promotion"
    );
    let done_after: Vec<&Request> = log
        .iter()
        .filter(|q| q.id >= first_after && q.outcome == Outcome::Done)
        .collect();
    assert!(done_after.len() >= 20, "writes kept succeeding");
    assert!(done_after.iter().all(|q| q.done_on(new_name)));
    let on_new_after = psql(
        new,
        format!("SELECT count(*) FROM {t} WHERE id >= {first_after}"),
    );
    assert_eq!(on_new_after, done_after.len().to_string());
    let exposed = psql(
        old,
        format!("SELECT count(*) FROM {t} WHERE id > {before_promotion}"),
    );
    eprintln!(
        "[conformance] split brain: the router's writer was the promoted node {noticed:?} after promote() returned (0 = already before); {exposed} writes started after promote() was called reached the old primary before that, none after; {} writes on the new primary since ({}; {} total)",
        done_after.len(),
        tally(&log),
        log.len()
    );
    drop(r);
    drop_cluster(c);
}

// ---------------------------------------------------------------------------------------------
// Replica health
// ---------------------------------------------------------------------------------------------

/// Runs `work` reads on `r` until `victim` has served a few, kills it, keeps reading half a
/// second, and returns the log and when the kill returned.
async fn kill_under_reads<B: Backend>(
    r: &Router<B>,
    c: &Cluster,
    work: Work,
    victim: usize,
) -> (Vec<Request>, Instant, Instant) {
    let name = c.node(victim).name();
    let reads = start_load(r, c, work, "", Duration::from_millis(5));
    wait_until(
        "reads to be served by the victim",
        Duration::from_secs(10),
        || reads.count(|q| q.done_on(name)) >= 5,
    )
    .await;
    let kill_started = Instant::now();
    kit(|| c.kill(victim)).expect("kill replica");
    let killed = Instant::now();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (log, abandoned) = reads.finish(r.config().write_deadline + MARGIN).await;
    assert_eq!(abandoned, 0, "no read hangs on a killed replica");
    (log, kill_started, killed)
}

/// Waits until the restarted `victim` is back in rotation and serves reads again.
async fn back_in_rotation<B: Backend>(r: &Router<B>, c: &Cluster, victim: usize) -> Duration {
    let restarted = Instant::now();
    kit(|| c.restart(victim)).expect("restart replica");
    wait_until(
        "the restarted replica to be readable",
        Duration::from_secs(10),
        || r.snapshot().nodes[victim].is_readable_replica(Instant::now()),
    )
    .await;
    let reads = start_load(
        r,
        c,
        Work::Read(Consistency::Eventual),
        "",
        Duration::from_millis(5),
    );
    let name = c.node(victim).name();
    wait_until(
        "the restarted replica to serve reads",
        Duration::from_secs(10),
        || reads.any(|q| q.done_on(name)),
    )
    .await;
    let (log, _) = reads.finish(r.config().write_deadline + MARGIN).await;
    assert!(
        log.iter().all(|q| q.outcome == Outcome::Done),
        "{}",
        tally(&log)
    );
    restarted.elapsed()
}

/// A replica is killed under a concurrent read load (reads take 50 ms, several in flight). With
/// plain reads, the only failures are reads whose session was on that replica when it died;
/// with `read_retrying_backend` not one read fails (those are run once more on another node).
/// After each restart the replica serves reads again.
pub async fn killed_replica_under_read_load_fails_only_in_flight_reads<H: Harness>() {
    let c = own_cluster();
    let r = router::<H>(&c, test_config()).await;
    let victim = 2;
    let name = c.node(victim).name();

    // Plain reads: failures only among the reads in flight on the victim at the kill.
    let (log, kill_started, killed) =
        kill_under_reads(&r, &c, Work::Read(Consistency::Eventual), victim).await;
    let failed: Vec<&Request> = log.iter().filter(|q| q.outcome != Outcome::Done).collect();
    let in_flight = log
        .iter()
        .filter(|q| {
            q.node.as_deref() == Some(name) && q.returned < killed && q.ended > kill_started
        })
        .count();
    for q in &failed {
        assert_eq!(
            q.outcome,
            Outcome::ConnectionLost,
            "read {} failed otherwise",
            q.id
        );
        assert_eq!(
            q.node.as_deref(),
            Some(name),
            "read {} failed elsewhere",
            q.id
        );
        assert!(
            q.returned < killed,
            "read {} got its session on the victim after the kill, and failed",
            q.id
        );
    }
    let after: Vec<&Request> = log.iter().filter(|q| q.started >= killed).collect();
    assert!(!after.is_empty());
    assert!(
        after
            .iter()
            .all(|q| q.outcome == Outcome::Done && q.node.as_deref() != Some(name)),
        "reads started after the kill all succeed elsewhere"
    );
    eprintln!(
        "[conformance] replica killed under plain reads: {} reads, {} failed, all {} of them in flight on the victim ({in_flight} were); {} started after the kill, all served elsewhere",
        log.len(),
        failed.len(),
        failed.len(),
        after.len()
    );
    let back = back_in_rotation(&r, &c, victim).await;
    eprintln!("[conformance] restarted replica serving reads again {back:?} after restart() began");

    // Retrying reads: zero failures; the ones in flight on the victim ran again elsewhere.
    let retries_before = r.stats().read_retries;
    let (log, _, _) = kill_under_reads(&r, &c, Work::ReadRetrying, victim).await;
    let failed = log.iter().filter(|q| q.outcome != Outcome::Done).count();
    let retried = log.iter().filter(|q| q.runs > 1).count();
    assert_eq!(failed, 0, "retrying reads never fail: {}", tally(&log));
    assert!(log.iter().all(|q| q.runs <= 2), "retried at most once");
    assert_eq!(
        r.stats().read_retries - retries_before,
        retried as u64,
        "the router counts its retries"
    );
    eprintln!(
        "[conformance] replica killed under read_retrying: {} reads, 0 failed, {retried} run again on another node",
        log.len()
    );
    let back = back_in_rotation(&r, &c, victim).await;
    eprintln!("[conformance] restarted replica serving reads again {back:?} after restart() began");
    drop(r);
    drop_cluster(c);
}

/// Records every change of `victim`'s read eligibility seen in the router's snapshots.
struct Eligibility {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Vec<(Instant, bool)>>,
}

fn watch_eligibility<B: Backend>(r: &Router<B>, victim: usize) -> Eligibility {
    let stop = Arc::new(AtomicBool::new(false));
    let (r, s) = (r.clone(), stop.clone());
    let task = tokio::spawn(async move {
        let mut changes = Vec::new();
        let mut last = None;
        while !s.load(Ordering::SeqCst) {
            let now = Instant::now();
            let readable = r.snapshot().nodes[victim].is_readable_replica(now);
            if last != Some(readable) {
                changes.push((now, readable));
                last = Some(readable);
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        changes
    });
    Eligibility { stop, task }
}

/// `count` Eventual reads; asserts none is served by `victim`.
async fn reads_avoid<B: Backend>(r: &Router<B>, c: &Cluster, victim: usize, count: usize) {
    for _ in 0..count {
        let mut conn = r.read_with(&eventual()).await.expect("read");
        let port = whoami::<B>(conn.pooled()).await.expect("whoami").port;
        assert_ne!(
            index_of(c, port),
            victim,
            "an excluded replica served a read"
        );
    }
}

/// A replica lagging past the bound, first by an apply delay, then by paused replay, under a
/// steady write load: it is excluded (Eventual reads avoid it) and stays excluded while the
/// fault lasts, then is re-admitted and stays in once the fault is cleared. Its eligibility,
/// sampled from the router's snapshots throughout, changes exactly four times (out, in, out, in):
/// no flapping.
pub async fn lag_exclusion_has_hysteresis<H: Harness>() {
    let bound = Duration::from_millis(300);
    let (c, r, t) = lag_setup::<H>("hysteresis", bound).await;
    let victim = 1;
    wait_until("the replica to be readable", Duration::from_secs(5), || {
        r.snapshot().nodes[victim].is_readable_replica(Instant::now())
    })
    .await;
    let churn = churn(&r, t.clone());
    let watch = watch_eligibility(&r, victim);
    let hold = Duration::from_secs(1);
    let settle = Duration::from_millis(500);

    for paused in [false, true] {
        let what = if paused {
            "paused replay"
        } else {
            "apply delay 1 s"
        };
        kit(|| {
            if paused {
                c.pause_replay(victim)
            } else {
                c.set_apply_delay(victim, Duration::from_secs(1))
            }
        })
        .expect(what);
        let out = wait_until(
            "the lagging replica to be excluded",
            Duration::from_secs(10),
            || !r.snapshot().nodes[victim].is_readable_replica(Instant::now()),
        )
        .await;
        let lag = r.snapshot().nodes[victim].lag;
        reads_avoid::<H::B>(&r, &c, victim, 20).await;
        tokio::time::sleep(hold).await;
        assert!(
            r.snapshot().nodes[victim].lag_excluded,
            "{what}: still excluded while the fault lasts"
        );
        kit(|| {
            if paused {
                c.resume_replay(victim)
            } else {
                c.clear_apply_delay(victim)
            }
        })
        .expect("clear the fault");
        let back = wait_until(
            "the replica to be re-admitted",
            Duration::from_secs(10),
            || r.snapshot().nodes[victim].is_readable_replica(Instant::now()),
        )
        .await;
        tokio::time::sleep(settle).await;
        eprintln!(
            "[conformance] {what}: excluded {out:?} after the fault (lag seen {lag:?}, bound {bound:?}), re-admitted {back:?} after it was cleared"
        );
    }
    let mut served = 0;
    for _ in 0..40 {
        let mut conn = r.read_with(&eventual()).await.expect("read");
        if index_of(
            &c,
            whoami::<H::B>(conn.pooled()).await.expect("whoami").port,
        ) == victim
        {
            served += 1;
        }
    }
    assert!(served > 0, "the re-admitted replica serves reads again");

    watch.stop.store(true, Ordering::SeqCst);
    let changes = watch.task.await.expect("eligibility watcher");
    let start = changes[0].0;
    let seen: Vec<String> = changes
        .iter()
        .map(|(at, ok)| format!("{:?} {}", *at - start, if *ok { "in" } else { "out" }))
        .collect();
    eprintln!("[conformance] replica eligibility over time: {seen:?}");
    let states: Vec<bool> = changes.iter().map(|(_, ok)| *ok).collect();
    assert_eq!(
        states,
        [true, false, true, false, true],
        "out once and in once per fault, no flapping: {seen:?}"
    );
    churn.finish().await;
    drop(r);
    drop_cluster(c);
}

// ---------------------------------------------------------------------------------------------
// Typed outcomes
// ---------------------------------------------------------------------------------------------

/// Commits the write session's open transaction and maps the result with `check_backend`.
async fn commit<B: Backend>(w: &mut WriteConn<B>) -> Result<u64, Error> {
    let done = B::execute(w.pooled(), "COMMIT").await;
    w.check_backend(done)
}

/// Opens a transaction on a fresh write session and inserts row `id` in it.
async fn open_write<B: Backend>(r: &Router<B>, t: &str, id: u64) -> WriteConn<B> {
    let mut w = r.write().await.expect("write session");
    let begun = B::execute(w.pooled(), "BEGIN").await;
    w.check_backend(begun).expect("BEGIN");
    insert(&mut w, t, id).await.expect("insert");
    w
}

fn assert_outcome_unknown(what: &str, result: Result<u64, Error>) {
    match result {
        Err(e @ Error::WriteOutcomeUnknown { .. }) => {
            assert!(!e.is_safe_to_retry(), "{what}: not safe to retry");
            eprintln!("[conformance] {what}: {e}");
        }
        other => panic!("{what}: expected WriteOutcomeUnknown, got {other:?}"),
    }
}

/// A write whose connection is lost during the transaction (its server session terminated by an
/// administrator; then the primary killed) ends `Error::WriteOutcomeUnknown`, not safe to retry,
/// and the router retries nothing (no new write session is taken). With no primary at all, a
/// write fails `Error::NoPrimary` by its deadline, safe to retry, nothing sent; retried once the
/// primary is back, it succeeds, and the server holds exactly that row.
pub async fn lost_writes_and_a_missing_primary_have_typed_outcomes<H: Harness>() {
    let c = own_cluster_with(1);
    let config = RouterConfig {
        write_deadline: Duration::from_secs(1),
        ..test_config()
    };
    let deadline = config.write_deadline;
    let r = router::<H>(&c, config).await;
    let t = table("outcomes");
    create_table(&r, &t).await;

    // 1. The session terminated by the server mid-transaction.
    let mut w = open_write(&r, &t, 1).await;
    let pid = whoami::<H::B>(w.pooled()).await.expect("whoami").pid;
    let sessions = r.stats().writes;
    let killed = kit(|| c.psql(0, &format!("SELECT pg_terminate_backend({pid})")));
    assert_eq!(killed.expect("psql"), "t");
    assert_outcome_unknown("session terminated before COMMIT", commit(&mut w).await);
    drop(w);
    assert_eq!(r.stats().writes, sessions, "no automatic retry");

    // 2. The primary killed mid-transaction.
    let mut w = open_write(&r, &t, 2).await;
    let sessions = r.stats().writes;
    kit(|| c.kill(0)).expect("kill the primary");
    assert_outcome_unknown("primary killed before COMMIT", commit(&mut w).await);
    drop(w);
    assert_eq!(r.stats().writes, sessions, "no automatic retry");

    // 3. No primary: NoPrimary by the deadline, nothing sent.
    let started = Instant::now();
    let err = r.write().await.expect_err("no primary");
    let waited = started.elapsed();
    assert!(matches!(err, Error::NoPrimary { .. }), "{err:?}");
    assert!(err.is_safe_to_retry());
    assert!(
        waited <= deadline + MARGIN,
        "write() returned {waited:?} after the call, deadline {deadline:?}"
    );
    eprintln!("[conformance] no primary: {err} (returned after {waited:?})");

    // 4. Retrying is safe: once the primary is back the write goes through.
    kit(|| c.restart(0)).expect("restart the primary");
    let restarted = Instant::now();
    let mut w = loop {
        match r.write().await {
            Ok(w) => break w,
            Err(e) if e.is_safe_to_retry() && restarted.elapsed() < Duration::from_secs(10) => {}
            Err(e) => panic!("write after the primary came back: {e}"),
        }
    };
    insert(&mut w, &t, 3).await.expect("insert");
    drop(w);
    let rows = kit(|| c.psql(0, &format!("SELECT string_agg(id::text, ',') FROM {t}")));
    assert_eq!(
        rows.expect("psql"),
        "3",
        "neither lost transaction committed, nothing was sent twice"
    );
    drop(r);
    drop_cluster(c);
}
