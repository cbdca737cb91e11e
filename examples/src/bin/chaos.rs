//! `cargo xtask chaos [--json FILE] [--long] [--backend sqlx] [--scenario NAME]... [--mode NAME]...`
//!
//! Runs the consistency checker on real test-kit clusters and prints one line per
//! (scenario, mode). Exits non-zero when a protected mode read stale data or lost an
//! acknowledged write, or when the unprotected control saw no staleness under apply delay
//! (then the checker could not have seen it either).

use std::sync::Arc;
use std::time::Duration;

use routing_core::WriterMarks;
use routing_examples::chaos::{
    self, ChaosBackend, ChaosOptions, MarksFactory, Mode, RunReport, Scenario,
};

struct Sqlx;

impl ChaosBackend for Sqlx {
    type B = routing_sqlx::SqlxBackend;
    fn backend() -> Self::B {
        routing_sqlx::SqlxBackend::new()
    }
}

fn usage() -> ! {
    eprintln!(
        "usage: chaos [--json FILE] [--long] [--run-secs N] [--verbose] [--scenario NAME]... [--mode NAME]...\n  scenarios: {}\n  modes: {}",
        Scenario::ALL.map(|s| s.name()).join(", "),
        Mode::ALL.map(|m| m.name()).join(", ")
    );
    std::process::exit(2)
}

#[allow(clippy::print_stdout)]
fn main() {
    let mut args = std::env::args().skip(1);
    let mut opts = ChaosOptions::default();
    let mut json: Option<String> = None;
    let mut verbose = false;
    let (mut scenarios, mut modes) = (Vec::new(), Vec::new());
    while let Some(a) = args.next() {
        match a.as_str() {
            "--json" => json = Some(args.next().unwrap_or_else(|| usage())),
            "--verbose" => verbose = true,
            "--long" => opts.run_time = Duration::from_secs(20),
            "--run-secs" => {
                let n: u64 = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| usage());
                opts.run_time = Duration::from_secs(n.max(1));
            }
            "--scenario" => {
                let name = args.next().unwrap_or_else(|| usage());
                scenarios.push(
                    Scenario::ALL
                        .into_iter()
                        .find(|s| s.name() == name)
                        .unwrap_or_else(|| usage()),
                );
            }
            "--mode" => {
                let name = args.next().unwrap_or_else(|| usage());
                modes.push(
                    Mode::ALL
                        .into_iter()
                        .find(|m| m.name() == name)
                        .unwrap_or_else(|| usage()),
                );
            }
            "--backend" => {
                if args.next().as_deref() != Some("sqlx") {
                    eprintln!("only --backend sqlx is wired into the checker binary");
                    std::process::exit(2);
                }
            }
            _ => usage(),
        }
    }
    if !scenarios.is_empty() {
        opts.scenarios = scenarios;
    }
    if !modes.is_empty() {
        opts.modes = modes;
    }
    let marks: MarksFactory = Arc::new(|url: String| {
        Box::pin(async move {
            let m = routing_redis::RedisMarks::new(url.as_str())
                .expect("redis URL from the test kit is valid");
            Arc::new(m) as Arc<dyn WriterMarks>
        })
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    println!(
        "{:<18} {:<16} {:>7} {:>6} {:>7} {:>8} {:>5} {:>8}",
        "scenario", "mode", "ops", "stale", "failed", "replica%", "lost", "misroute"
    );
    let started = std::time::Instant::now();
    let result = rt.block_on(chaos::run::<Sqlx>(&opts, marks, |r: &RunReport| {
        println!(
            "{:<18} {:<16} {:>7} {:>6} {:>7} {:>7.1}% {:>5} {:>8}",
            r.scenario,
            r.mode,
            r.ops,
            r.stale_reads,
            r.failed_requests,
            r.replica_share * 100.0,
            r.lost_acked_writes,
            r.writes_through_reads
        );
        if r.acked_only_on_old_primary > 0 {
            println!(
                "    acknowledged only on the old primary: {}",
                r.acked_only_on_old_primary
            );
        }
        if verbose {
            println!("    {:?}", r.stats);
        }
    }));
    let reports = match result {
        Ok(r) => r,
        Err(e) => {
            eprintln!("chaos: {e}");
            std::process::exit(1);
        }
    };
    if let Some(path) = json {
        let text = serde_json::to_string_pretty(&reports).expect("reports serialize");
        if let Err(e) = std::fs::write(&path, text) {
            eprintln!("chaos: cannot write {path}: {e}");
            std::process::exit(1);
        }
    }
    let protected_pairs: u64 = reports
        .iter()
        .filter(|r| r.mode != "Eventual")
        .map(|r| r.ops)
        .sum();
    println!(
        "protected read-after-write pairs: {protected_pairs}; elapsed {:?}",
        started.elapsed()
    );
    let mut failed = false;
    for r in &reports {
        if r.mode != "Eventual" && (r.stale_reads > 0 || r.lost_acked_writes > 0) {
            println!(
                "FAIL: {} / {}: {} stale reads, {} lost acked writes",
                r.scenario, r.mode, r.stale_reads, r.lost_acked_writes
            );
            failed = true;
        }
        if r.acked_only_on_old_primary > 0 {
            println!(
                "FAIL: {} / {}: {} acknowledged writes landed only on the old primary",
                r.scenario, r.mode, r.acked_only_on_old_primary
            );
            failed = true;
        }
        if r.writes_through_reads > 0 {
            println!(
                "FAIL: {} / {}: {} writes went through read sessions",
                r.scenario, r.mode, r.writes_through_reads
            );
            failed = true;
        }
        if r.mode == "Eventual" && r.scenario.starts_with("apply_delay") && r.stale_reads == 0 {
            println!(
                "FAIL: the Eventual control saw no stale reads under {}: the checker is blind",
                r.scenario
            );
            failed = true;
        }
    }
    std::process::exit(i32::from(failed));
}
