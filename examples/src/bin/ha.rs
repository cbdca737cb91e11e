//! `cargo xtask ha [--json FILE] [--quick] [--config haproxy|direct|discovery]... [--round NAME]...`
//!
//! Runs the HA workload on a real etcd + Patroni + HAProxy stack and prints one line per
//! (configuration, round). Exits non-zero when a protected mode read stale data, an
//! acknowledged write was lost, a round saw no new primary, or the router took 1 s or more to
//! write on a new primary it reaches directly, or (configuration `discovery`) a member added to
//! the Patroni cluster did not serve reads within a few probe intervals of Patroni listing it.

use std::time::Instant;

use routing_examples::ha::{self, Config, HaOptions, Round, RoundReport};

fn usage() -> ! {
    eprintln!(
        "usage: ha [--json FILE] [--quick] [--config NAME]... [--round NAME]...\n  configs: {}\n  rounds: {}",
        Config::ALL.map(|c| c.name()).join(", "),
        Round::ALL.map(|r| r.name()).join(", ")
    );
    std::process::exit(2)
}

fn opt(v: Option<u64>) -> String {
    v.map_or_else(|| "-".into(), |v| v.to_string())
}

fn line(r: &RoundReport) -> String {
    format!(
        "{:<8} {:<17} #{} {:>5}->{:<5} primary_ready_ms {:>6} router_write_ms {:>5} haproxy_switch_ms {:>5} failed {:>4} stale(RYW/Causal) {}/{} eventual_stale {}/{} lost {} acked {}",
        r.config,
        r.round,
        r.repeat,
        r.old_leader,
        r.new_leader,
        opt(r.primary_ready_ms),
        opt(r.router_write_ms),
        opt(r.haproxy_switch_ms),
        r.failed_requests,
        r.stale_ryw,
        r.stale_causal,
        r.eventual_stale_reads,
        r.eventual_reads,
        r.lost_acked_writes,
        r.acked_writes,
    ) + &match (r.member_listed_ms, r.member_serving_ms) {
        (None, None) => String::new(),
        (l, s) => format!(
            " member_listed_ms {} member_serving_ms {} member_first_read_ms {}",
            opt(l),
            opt(s),
            opt(r.member_first_read_ms)
        ),
    }
}

#[allow(clippy::print_stdout)]
fn main() {
    let mut args = std::env::args().skip(1);
    let mut opts = HaOptions::full();
    let mut json: Option<String> = None;
    let (mut configs, mut rounds) = (Vec::new(), Vec::new());
    while let Some(a) = args.next() {
        match a.as_str() {
            "--json" => json = Some(args.next().unwrap_or_else(|| usage())),
            "--quick" => opts = HaOptions::quick(),
            "--config" => {
                let name = args.next().unwrap_or_else(|| usage());
                configs.push(
                    Config::ALL
                        .into_iter()
                        .find(|c| c.name() == name)
                        .unwrap_or_else(|| usage()),
                );
            }
            "--round" => {
                let name = args.next().unwrap_or_else(|| usage());
                rounds.push(
                    Round::ALL
                        .into_iter()
                        .find(|r| r.name() == name)
                        .unwrap_or_else(|| usage()),
                );
            }
            _ => usage(),
        }
    }
    if !configs.is_empty() {
        opts.configs = configs;
    }
    if !rounds.is_empty() {
        opts.rounds = rounds;
    }
    let started = Instant::now();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = rt.block_on(ha::run(&opts, |r| println!("{}", line(r))));
    // Let spawned probe attempts and pool tasks end before the runtime goes.
    rt.shutdown_timeout(std::time::Duration::from_secs(2));
    let reports = match result {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ha: FAILED: {e}");
            std::process::exit(1);
        }
    };
    if let Some(path) = json {
        let text = serde_json::to_string_pretty(&reports).expect("reports serialize");
        if let Err(e) = std::fs::write(&path, text + "\n") {
            eprintln!("ha: cannot write {path}: {e}");
            std::process::exit(1);
        }
        println!("wrote {path}");
    }
    let mut problems = Vec::new();
    for r in &reports {
        let what = format!("{} {} #{}", r.config, r.round, r.repeat);
        if r.stale_reads > 0 {
            problems.push(format!("{what}: {} stale protected reads", r.stale_reads));
        }
        if r.lost_acked_writes > 0 {
            problems.push(format!(
                "{what}: {} lost acknowledged writes",
                r.lost_acked_writes
            ));
        }
        if r.round == Round::MemberAdded.name() {
            // A few probe intervals (defaults: 1 s probes) of Patroni listing the member, plus
            // the discoverer's 200 ms poll.
            if r.member_serving_ms.is_none_or(|ms| ms >= 5000) {
                problems.push(format!(
                    "{what}: the added member did not serve reads within 5 s of Patroni listing it ({:?} ms)",
                    r.member_serving_ms
                ));
            }
        } else if r.primary_ready_ms.is_none() || r.router_write_ms.is_none() {
            problems.push(format!(
                "{what}: no new primary, or the router never wrote on it"
            ));
        }
        if (r.config == "direct" || r.config == "discovery")
            && r.router_write_ms.is_some_and(|ms| ms >= 1000)
        {
            problems.push(format!(
                "{what}: router_write_ms {:?} >= 1000",
                r.router_write_ms
            ));
        }
    }
    let eventual: u64 = reports.iter().map(|r| r.eventual_stale_reads).sum();
    println!(
        "ha: {} rounds in {:.0} s; Eventual control: {eventual} stale reads",
        reports.len(),
        started.elapsed().as_secs_f64()
    );
    if !problems.is_empty() {
        for p in &problems {
            eprintln!("ha: {p}");
        }
        std::process::exit(1);
    }
}
