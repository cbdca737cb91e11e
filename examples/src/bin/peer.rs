//! The router and pgpool-II side by side (see `routing_examples::peer`).
//!
//! Run: `cargo run --release -p routing-examples --bin peer -- [SECONDS] [CONCURRENCY]`
//! (needs the Debian package `pgpool2`). Prints a JSON list of rows.

use std::time::Duration;

use routing_examples::peer::{PeerOptions, compare};
use routing_testkit::ClusterBuilder;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let secs: f64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(5.0);
    let concurrency: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(8);
    let cluster =
        tokio::task::spawn_blocking(|| ClusterBuilder::new().replicas(2).start()).await??;
    let opts = PeerOptions {
        run_time: Duration::from_secs_f64(secs),
        concurrency,
        rounds: 3,
        delays: vec![Duration::ZERO, Duration::from_millis(50)],
        extra_wait_budgets: vec![Duration::ZERO],
    };
    let rows = compare(&cluster, &opts).await?;
    println!("{}", serde_json::to_string_pretty(&rows)?);
    tokio::task::spawn_blocking(move || drop(cluster)).await?;
    Ok(())
}
