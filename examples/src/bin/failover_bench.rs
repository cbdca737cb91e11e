//! Failover time, promotion to the router's first write (see `routing_examples::failover`).
//!
//! Run: `cargo run --release -p routing-examples --bin failover_bench -- [RUNS]`.

use routing_examples::failover::{Fault, measure};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let runs: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(5);
    let mut rows = Vec::new();
    for fault in [Fault::Kill, Fault::Blackhole] {
        let row = measure(fault, runs).await?;
        eprintln!(
            "{fault:?}: p50 {:.0} ms, max {:.0} ms over {} runs ({:?})",
            row.p50_ms, row.max_ms, row.runs, row.samples_ms
        );
        rows.push(row);
    }
    println!("{}", serde_json::to_string_pretty(&rows)?);
    Ok(())
}
