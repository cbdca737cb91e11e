//! The metrics example's recipe against a real cluster: every series the library documents is
//! served to a Prometheus scrape, the exercised ones with the labels that say why, no label
//! holds a password, and a healthy service logs nothing at info per request.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use routing_core::telemetry;
use routing_core::{Lsn, Mark, MarksError, UserKey, WriterMarks, async_trait};
use routing_examples::prometheus;
use routing_sqlx::{
    Consistency, LagAlertThresholds, PoolSettings, RequestContext, Router, RouterConfig,
    SqlxBackend, sqlx,
};
use routing_testkit::ClusterBuilder;

fn kit<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// A marks store slower than any `marks_timeout`.
#[derive(Debug)]
struct StuckMarks;

#[async_trait]
impl WriterMarks for StuckMarks {
    async fn get(&self, _: &UserKey) -> Result<Option<Mark>, MarksError> {
        tokio::time::sleep(Duration::from_secs(5)).await;
        Ok(None)
    }
    async fn set_max(&self, _: &UserKey, _: Lsn, _: Duration) -> Result<(), MarksError> {
        tokio::time::sleep(Duration::from_secs(5)).await;
        Ok(())
    }
}

async fn write(router: &Router, ctx: &RequestContext, n: i64) -> Lsn {
    let mut w = router.write_with(ctx).await.expect("write");
    let done = sqlx::query("INSERT INTO m VALUES ($1)")
        .bind(n)
        .execute(&mut *w)
        .await;
    w.check(done).expect("insert");
    w.finish().await.expect("finish").lsn
}

async fn read(router: &Router, ctx: &RequestContext) -> (String, bool) {
    let mut r = router.read_with(ctx).await.expect("read");
    let n = sqlx::query_scalar::<_, i64>("SELECT count(*) FROM m")
        .fetch_one(&mut *r)
        .await;
    r.check(n).expect("count");
    (r.node_name().to_string(), r.on_primary())
}

/// Whether `body` has a sample of series `name` whose labels include every one of `labels`,
/// with a value above zero when `nonzero` (series are registered at zero when the router is
/// built, so presence alone would not show that anything was recorded).
fn has(body: &str, name: &str, labels: &[&str], nonzero: bool) -> bool {
    body.lines().any(|l| {
        l.strip_prefix(name)
            .is_some_and(|rest| rest.starts_with(['{', ' ']))
            && labels.iter().all(|f| l.contains(f))
            && (!nonzero
                || l.rsplit(' ')
                    .next()
                    .and_then(|v| v.parse::<f64>().ok())
                    .is_some_and(|v| v > 0.0))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prometheus_scrape_finds_every_series() {
    let logs = Logs::default();
    let sink = logs.clone();
    tracing_subscriber::fmt()
        .with_writer(move || sink.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .init();
    let handle = prometheus::install_recorder().expect("recorder");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(prometheus::serve(listener, handle));

    let c = kit(|| ClusterBuilder::new().replicas(2).start()).expect("cluster");
    kit(|| {
        c.psql(
            0,
            "CREATE TABLE m (n bigint); GRANT SELECT, INSERT ON m TO routing_app",
        )
    })
    .expect("table");
    kit(|| c.wait_replicated(Duration::from_secs(10))).expect("replicated");
    let router: Router = Router::builder(SqlxBackend::new())
        .nodes(c.node_configs())
        .config(RouterConfig {
            probe_interval: Duration::from_millis(50),
            probe_timeout: Duration::from_millis(500),
            wait_budget: Duration::from_millis(800),
            lag_alert: LagAlertThresholds::time(Duration::from_secs(10)),
            pool: PoolSettings {
                max_size: 1,
                connect_timeout: Duration::from_millis(200),
                ..PoolSettings::default()
            },
            ..RouterConfig::default()
        })
        .build()
        .await
        .expect("router");

    // A healthy service: writes and reads of every kind log nothing at info.
    let user = RequestContext::new().user("u1");
    let before = logs.text().len();
    for n in 0..20 {
        write(&router, &user, n).await;
        read(
            &router,
            &user.clone().consistency(Consistency::ReadYourWrites),
        )
        .await;
        read(&router, &user.clone().consistency(Consistency::Eventual)).await;
        read(&router, &user.clone().consistency(Consistency::Primary)).await;
    }
    // Once the monitor has seen both replicas past the write, a guarded read needs no wait.
    let lsn = write(&router, &user, 99).await;
    for _ in 0..200 {
        if router.snapshot().nodes[1..]
            .iter()
            .all(|n| n.lsn >= Some(lsn))
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (_, on_primary) = read(
        &router,
        &user.clone().consistency(Consistency::ReadYourWrites),
    )
    .await;
    assert!(!on_primary);
    let during = logs.text()[before..].to_string();
    assert!(during.is_empty(), "82 healthy requests logged: {during}");

    // Replicas 150 ms behind: a read-your-writes read waits for one to catch up.
    for i in [1, 2] {
        kit(|| c.set_apply_delay(i, Duration::from_millis(150))).expect("delay");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    for n in 20..30 {
        write(&router, &user, n).await;
        read(
            &router,
            &user.clone().consistency(Consistency::ReadYourWrites),
        )
        .await;
    }
    // Replay paused everywhere: read-your-writes falls back to the primary.
    for i in [1, 2] {
        kit(|| c.clear_apply_delay(i)).expect("clear");
        kit(|| c.pause_replay(i)).expect("pause");
    }
    write(&router, &user, 30).await;
    let (_, on_primary) = read(
        &router,
        &user.clone().consistency(Consistency::ReadYourWrites),
    )
    .await;
    assert!(on_primary, "no replica has the write");
    for i in [1, 2] {
        kit(|| c.resume_replay(i)).expect("resume");
    }
    kit(|| c.wait_replicated(Duration::from_secs(10))).expect("replicated");
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Both replica pools (one session each) held: the next read finds them busy.
    let eventual = RequestContext::new().consistency(Consistency::Eventual);
    let held_a = router.read_with(&eventual).await.expect("a");
    let held_b = router.read_with(&eventual).await.expect("b");
    assert_ne!(held_a.node_name(), held_b.node_name());
    let (_, on_primary) = read(&router, &eventual).await;
    assert!(on_primary, "busy replicas: the primary serves");
    drop((held_a, held_b));

    // A marks store that never answers in time. Node names label the metrics, so a second
    // router in the process names its nodes apart (else its empty pools overwrite the gauges).
    let mut stuck_nodes = c.node_configs();
    for n in &mut stuck_nodes {
        n.name = format!("stuck-{}", n.name);
    }
    let stuck: Router = Router::builder(SqlxBackend::new())
        .nodes(stuck_nodes)
        .config(RouterConfig {
            probe_interval: Duration::from_millis(50),
            marks_timeout: Duration::from_millis(20),
            ..RouterConfig::default()
        })
        .marks(Arc::new(StuckMarks))
        .build()
        .await
        .expect("router");
    read(
        &stuck,
        &user.clone().consistency(Consistency::ReadYourWrites),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(600)).await; // a pool gauge refresh

    let body = prometheus::scrape(addr).await.expect("scrape");
    let primary = c.node(c.primary()).name().to_string();
    let node = |n: &str| format!("node=\"{n}\"");
    let p = node(&primary);
    // (series, labels, must be above zero): every exercised series counted something; gauges
    // that may legitimately read zero (lag, alert state, failovers) need only be present.
    let expect: Vec<(&str, Vec<&str>, bool)> = vec![
        (telemetry::READS, vec!["reason=\"eventual\""], true),
        (telemetry::READS, vec!["reason=\"caught_up\""], true),
        (telemetry::READS, vec!["reason=\"waited\""], true),
        (telemetry::READS, vec!["reason=\"mode\"", &p], true),
        (telemetry::READS, vec!["reason=\"fallback\"", &p], true),
        (telemetry::WRITES, vec![&p], true),
        (telemetry::PRIMARY_FALLBACKS, vec![], true),
        (telemetry::LSN_WAITS, vec!["outcome=\"caught_up\""], true),
        ("routing_lsn_wait_seconds_count", vec![], true),
        ("routing_marks_seconds_count", vec!["op=\"get\""], true),
        ("routing_marks_seconds_count", vec!["op=\"set\""], true),
        (
            telemetry::MARKS_FAILURES,
            vec!["op=\"get\"", "kind=\"timeout\""],
            true,
        ),
        (
            "routing_checkout_seconds_count",
            vec!["access=\"read\""],
            true,
        ),
        (
            "routing_checkout_seconds_count",
            vec!["access=\"write\"", &p],
            true,
        ),
        (
            telemetry::CHECKOUT_FAILURES,
            vec!["access=\"read\"", "kind=\"pool_busy\""],
            true,
        ),
        (telemetry::SESSIONS_IN_USE, vec![&p], false),
        (
            telemetry::POOL_CONNECTIONS,
            vec!["access=\"write\"", &p],
            true,
        ),
        (telemetry::POOL_IDLE, vec!["access=\"read\""], true),
        (telemetry::LAG_BYTES, vec!["node=\"pg1\""], false),
        (telemetry::LAG_SECONDS, vec!["node=\"pg2\""], false),
        (telemetry::LAG_ALERT, vec!["node=\"pg1\""], false),
        (telemetry::GENERATION, vec![], true),
        (telemetry::FAILOVERS, vec![], false),
    ];
    let missing: Vec<_> = expect
        .iter()
        .filter(|(name, labels, nonzero)| !has(&body, name, labels, *nonzero))
        .collect();
    assert!(missing.is_empty(), "missing {missing:?} in\n{body}");
    for secret in [
        routing_testkit::WRITER_PASSWORD,
        routing_testkit::READER_PASSWORD,
        routing_testkit::MONITOR_PASSWORD,
        "postgres://",
    ] {
        assert!(!body.contains(secret), "{secret} in the metrics");
    }
    drop((router, stuck));
    kit(|| drop(c));
}
