//! Offload and read latency per consistency mode under replica lag (see
//! `routing_examples::offload`).
//!
//! Run: `cargo run --release -p routing-examples --bin offload -- [SECONDS] [CONCURRENCY] [WAIT_BUDGET_MS]`.
//! Prints a JSON list of rows.

use std::time::Duration;

use routing_examples::offload::{OffloadOptions, run};
use routing_testkit::ClusterBuilder;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let secs: f64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(3.0);
    let concurrency: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(8);
    let wait_budget = args
        .next()
        .and_then(|a| a.parse().ok())
        .map(Duration::from_millis);
    let cluster =
        tokio::task::spawn_blocking(|| ClusterBuilder::new().replicas(2).start()).await??;
    let opts = OffloadOptions {
        run_time: Duration::from_secs_f64(secs),
        concurrency,
        delays: [0, 20, 50, 200].map(Duration::from_millis).to_vec(),
        wait_budget,
        extra_wait_budgets: vec![Duration::ZERO],
    };
    let rows = run(&cluster, &opts).await?;
    for r in &rows {
        eprintln!(
            "{:>20} delay {:>3} ms: replica share {:.2}, stale {:>4}, read p50 {:.2} ms p99 {:.2} ms, {:.0} reads/s, failed {}",
            r.mode,
            r.delay_ms,
            r.replica_share,
            r.stale_reads,
            r.read_p50_ms,
            r.read_p99_ms,
            r.read_throughput,
            r.failed
        );
    }
    println!("{}", serde_json::to_string_pretty(&rows)?);
    tokio::task::spawn_blocking(move || drop(cluster)).await?;
    Ok(())
}
