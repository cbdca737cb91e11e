//! Lag alerts against a real cluster: injected apply delay and paused replay, under a steady
//! write load, raise exactly one alert when a replica crosses above its threshold and one when
//! it comes back, however many probes see it behind, both as callbacks and as log events.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use routing_sqlx::sqlx::{self, Connection};
use routing_sqlx::{LagAlert, LagAlertKind, LagAlertThresholds, Router, RouterConfig, SqlxBackend};
use routing_testkit::{Cluster, ClusterBuilder};

fn kit<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// Every line the process logs, for counting the alert events.
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
    /// Lines that contain every one of `needles`.
    fn count(&self, needles: &[&str]) -> usize {
        let text = String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned();
        text.lines()
            .filter(|l| needles.iter().all(|n| l.contains(n)))
            .count()
    }
}

type Seen = Arc<Mutex<Vec<(String, LagAlertKind)>>>;

async fn wait_for(seen: &Seen, want: (&str, LagAlertKind), within: Duration) {
    let t = Instant::now();
    while t.elapsed() < within {
        if seen
            .lock()
            .unwrap()
            .iter()
            .any(|(n, k)| n == want.0 && *k == want.1)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!(
        "no {want:?} within {within:?}; saw {:?}",
        seen.lock().unwrap()
    );
}

/// Commits ~20 kB of WAL every 50 ms until `stop` (lag needs a primary that moves).
fn write_load(
    c: &Cluster,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    let url = c.url(c.primary());
    tokio::spawn(async move {
        let mut conn = sqlx::PgConnection::connect(&url).await.expect("connect");
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            sqlx::query(
                "INSERT INTO lag_load (payload) \
                 SELECT md5(random()::text) || md5(random()::text) FROM generate_series(1, 200)",
            )
            .execute(&mut conn)
            .await
            .expect("insert");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_alert_up_and_one_down_per_crossing_under_real_lag() {
    let logs = Logs::default();
    let sink = logs.clone();
    tracing_subscriber::fmt()
        .with_writer(move || sink.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .init();

    let c = kit(|| ClusterBuilder::new().replicas(2).start()).expect("cluster");
    kit(|| {
        c.psql(
            0,
            "CREATE TABLE lag_load (id bigserial PRIMARY KEY, payload text)",
        )
    })
    .expect("table");
    kit(|| c.wait_replicated(Duration::from_secs(10))).expect("replicated");

    // The router alerts above 1 s of lag (clearing below 500 ms); pg2 overrides it with a
    // byte threshold only: 512 kB, clearing below 128 kB.
    let mut nodes = c.node_configs();
    nodes[2] = nodes[2]
        .clone()
        .lag_alert(LagAlertThresholds::bytes(512 * 1024).clear_ratio(0.25));
    let seen: Seen = Arc::default();
    let record = seen.clone();
    let r = Router::builder(SqlxBackend::new())
        .nodes(nodes)
        .config(RouterConfig {
            probe_interval: Duration::from_millis(50),
            probe_timeout: Duration::from_millis(500),
            lag_alert: LagAlertThresholds::time(Duration::from_secs(1)).clear_ratio(0.5),
            ..RouterConfig::default()
        })
        .on_lag_alert(move |a: &LagAlert| {
            record.lock().unwrap().push((a.node.to_string(), a.kind));
        })
        .build()
        .await
        .expect("router");

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = write_load(&c, stop.clone());
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        seen.lock().unwrap().is_empty(),
        "healthy replicas under load raise nothing: {:?}",
        seen.lock().unwrap()
    );

    // Crossing 1: a 3 s apply delay on pg1 (time lag); held for ~40 probes above the line.
    kit(|| c.set_apply_delay(1, Duration::from_secs(3))).expect("delay");
    wait_for(
        &seen,
        ("pg1", LagAlertKind::Raised),
        Duration::from_secs(10),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    kit(|| c.clear_apply_delay(1)).expect("clear delay");
    wait_for(
        &seen,
        ("pg1", LagAlertKind::Cleared),
        Duration::from_secs(10),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Crossing 2: replay paused on pg2 (byte lag grows with the load), then resumed.
    kit(|| c.pause_replay(2)).expect("pause");
    wait_for(
        &seen,
        ("pg2", LagAlertKind::Raised),
        Duration::from_secs(10),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    kit(|| c.resume_replay(2)).expect("resume");
    wait_for(
        &seen,
        ("pg2", LagAlertKind::Cleared),
        Duration::from_secs(10),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    load.await.expect("load");
    let got = seen.lock().unwrap().clone();
    use LagAlertKind::{Cleared, Raised};
    assert_eq!(
        got,
        [
            ("pg1".to_string(), Raised),
            ("pg1".to_string(), Cleared),
            ("pg2".to_string(), Raised),
            ("pg2".to_string(), Cleared),
        ],
        "exactly one up and one down per crossing, from the right node"
    );
    for node in ["node=pg1", "node=pg2"] {
        for (event, level) in [
            ("replica lag above the alert threshold", "WARN"),
            ("replica lag back below the alert threshold", "INFO"),
        ] {
            assert_eq!(
                logs.count(&[event, node, level]),
                1,
                "one {level} {event:?} for {node}"
            );
        }
    }
    drop(r);
    kit(|| drop(c));
}
