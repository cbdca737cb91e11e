//! The consistency checker at a small size, so CI catches a regression in any protected mode.
//! (`cargo xtask chaos` runs the full-size version.)

use std::sync::Arc;
use std::time::Duration;

use routing_core::WriterMarks;
use routing_examples::chaos::{self, ChaosBackend, ChaosOptions, MarksFactory, Mode, Scenario};

struct Sqlx;

impl ChaosBackend for Sqlx {
    type B = routing_sqlx::SqlxBackend;
    fn backend() -> Self::B {
        routing_sqlx::SqlxBackend::new()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protected_modes_never_read_stale_data_under_faults_and_the_control_does() {
    let opts = ChaosOptions {
        run_time: Duration::from_millis(2400),
        workers: 4,
        users_per_worker: 8,
        scenarios: vec![
            Scenario::Steady,
            Scenario::ApplyDelay50ms,
            Scenario::PausedReplica,
            Scenario::RedisKilled,
            Scenario::PrimaryFailover,
            Scenario::MisbehavingHandlers,
            Scenario::SplitPrimary,
            // BusyPools needs timing a debug build on a loaded 2-core machine cannot keep (its
            // 250 ms checkout timeout also bounds new connections): it runs in `cargo xtask
            // chaos` (release), and the conformance suite covers busy pools deterministically.
        ],
        modes: Mode::ALL.to_vec(),
    };
    let marks: MarksFactory = Arc::new(|url: String| {
        Box::pin(async move {
            Arc::new(routing_redis::RedisMarks::new(url.as_str()).expect("url"))
                as Arc<dyn WriterMarks>
        })
    });
    let reports = chaos::run::<Sqlx>(&opts, marks, |r| {
        eprintln!(
            "{:<18} {:<16} ops={:<6} stale={:<5} failed={:<4} replica_share={:.2} lost={}\n    {:?}",
            r.scenario, r.mode, r.ops, r.stale_reads, r.failed_requests, r.replica_share, r.lost_acked_writes, r.stats
        )
    })
    .await
    .expect("checker runs");
    assert_eq!(reports.len(), 28);
    for r in &reports {
        assert!(
            r.ops > 50,
            "{}/{} made too little progress: {r:?}",
            r.scenario,
            r.mode
        );
        assert_eq!(r.lost_acked_writes, 0, "{r:?}");
        assert_eq!(
            r.writes_through_reads, 0,
            "a read session let a write through: {r:?}"
        );
        if r.scenario == "misbehaving" {
            assert!(r.misbehaviors > 20, "handlers misbehaved: {r:?}");
        }
        if r.mode != "Eventual" {
            assert_eq!(r.stale_reads, 0, "protected mode read stale data: {r:?}");
        }
    }
    let control = reports
        .iter()
        .find(|r| r.scenario == "apply_delay_50ms" && r.mode == "Eventual")
        .expect("control ran");
    assert!(
        control.stale_reads > 0,
        "the unprotected control must see stale reads: {control:?}"
    );
    let share = |mode: &str| {
        reports
            .iter()
            .find(|r| r.scenario == "steady" && r.mode == mode)
            .map(|r| r.replica_share)
            .unwrap_or(0.0)
    };
    // The full-size run (`cargo xtask chaos`) is where the 0.9 target is measured; this short,
    // CI-sized run keeps a margin for a loaded machine while still catching a regression (TTL
    // pinning, the comparison, stays near 0).
    assert!(
        share("ReadYourWrites") >= 0.8,
        "LSN routing keeps writers on replicas: {}",
        share("ReadYourWrites")
    );
    assert!(share("Causal") >= 0.8, "{}", share("Causal"));
    assert!(
        share("RecentWriterTtl") < 0.5,
        "TTL pinning sends recent writers to the primary"
    );
    // Redis down must not fail requests: reads fall back to the primary.
    let redis = reports
        .iter()
        .find(|r| r.scenario == "redis_killed" && r.mode == "ReadYourWrites")
        .expect("ran");
    assert_eq!(redis.failed_requests, 0, "{redis:?}");
    assert!(
        redis.stats.marks_errors > 0,
        "Redis was really down: {redis:?}"
    );
}
