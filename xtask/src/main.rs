//! `cargo xtask`: the project's build and test driver.
//!
//! `cargo xtask test` is the one test command (README, CI); `cargo xtask demo` and
//! `cargo xtask chaos` shell out to the routing-examples package. Std only, so it builds in
//! seconds on a fresh machine.

mod deny;
mod features;
mod leftovers;
mod prereq;
mod util;

use std::process::ExitCode;
use std::time::Instant;

use util::{Fail, cargo, run, step, workspace_root};

const USAGE: &str = "\
usage: cargo xtask <command>

commands:
  test                      the project's full check, as CI runs it: prerequisites (PostgreSQL,
                            redis-server, pgpool2), cargo-deny, rustfmt, clippy, cargo doc (broken
                            intra-doc links denied), cargo test --workspace, and a check that
                            the tests left no server or cluster behind
  demo                      check prerequisites, then run the guided tour
                            (cargo run -p routing-examples --example tour)
  chaos [--json FILE] [--long]
                            check prerequisites, then run the chaos harness; arguments are passed
                            through (cargo run --release -p routing-examples --bin chaos -- ARGS)
  bench [--quick] [--json FILE]
                            check prerequisites, then measure what routing costs per request
                            against the raw driver pools, the decision cost, scale, offload under
                            lag, pgpool-II side by side and failover (cargo run --release -p
                            routing-examples --bin bench -- ARGS); writes FILE (default
                            target/bench/bench.json), a markdown report and the chart (SVG and
                            PNG) beside it. --quick: short rounds (about 40 s), fails on a missing field
  ha [--json FILE] [--quick]
                            install patroni, etcd-server and haproxy when missing, then run the
                            HA workload on a real etcd + Patroni + HAProxy stack (switchover,
                            postmaster crash, leader loss; through HAProxy and direct), and check
                            that nothing was left running
                            (cargo run --release -p routing-examples --bin ha -- ARGS)
  help                      this text

environment:
  ROUTING_ADVISORY_DB       offline RustSec advisory-db copy for `test`
                            (default: ../shared/advisory-db beside the workspace)";

/// The package that holds the demo and the chaos harness (written elsewhere; may not exist yet).
const EXAMPLES_PACKAGE: &str = "routing-examples";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (command, rest) = match args.split_first() {
        Some((c, rest)) => (c.as_str(), rest),
        None => ("help", &[][..]),
    };
    let result = match command {
        "test" if rest.is_empty() => test(),
        "demo" if rest.is_empty() => demo(),
        "chaos" => chaos(rest),
        "bench" => bench(rest),
        "ha" => ha(rest),
        "help" | "-h" | "--help" => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        _ => {
            eprintln!(
                "xtask: unknown command or arguments: {}\n\n{USAGE}",
                args.join(" ")
            );
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Fail(msg)) => {
            eprintln!("\nxtask: FAILED: {msg}");
            ExitCode::FAILURE
        }
    }
}

/// `cargo xtask test`: every step must pass; stops at the first failure.
fn test() -> Result<(), Fail> {
    let started = Instant::now();
    let root = workspace_root();

    prerequisites()?;
    step("cargo-deny: bans, licenses, sources", || {
        deny::ensure_installed()?;
        deny::check_bans_licenses_sources(&root)
    })?;
    step("cargo-deny: advisories (offline database)", || {
        deny::check_advisories(&root)
    })?;
    step("rustfmt: cargo fmt --all -- --check", || {
        run(cargo()
            .args(["fmt", "--all", "--", "--check"])
            .current_dir(&root))
    })?;
    step(
        "clippy: cargo clippy --workspace --all-targets --all-features -- -D warnings",
        || {
            run(cargo()
                .args([
                    "clippy",
                    "--workspace",
                    "--all-targets",
                    "--all-features",
                    "--",
                    "-D",
                    "warnings",
                ])
                .current_dir(&root))
        },
    )?;

    step(
        "features: pg-routing builds with each feature alone and pulls in nothing else",
        || features::check(&root),
    )?;
    step(
        "rustdoc: cargo doc --workspace --no-deps --all-features (broken intra-doc links denied)",
        || {
            run(cargo()
                .args(["doc", "--workspace", "--no-deps", "--all-features"])
                .env("RUSTDOCFLAGS", "-D rustdoc::broken_intra_doc_links")
                .current_dir(&root))
        },
    )?;

    // The leftover check looks only at what this run created: other processes on a shared
    // machine (or a cluster dir left by an earlier, killed run) are reported but not blamed.
    let before = leftovers::Snapshot::take();
    let tests = step("tests: cargo test --workspace --all-features", || {
        util::cargo_test(&root)
    });
    let left = step("leftovers: testkit servers and cluster dirs", || {
        leftovers::check(&before)
    });
    let counts = tests?;
    left?;

    println!(
        "\nxtask test: all steps passed in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    // A plain closing line: "tests: N passed, N failed, N skipped".
    println!(
        "tests: {} passed, {} failed, {} skipped",
        counts.passed, counts.failed, counts.ignored
    );
    Ok(())
}

/// `cargo xtask demo`: the guided tour, once the examples package exists.
fn demo() -> Result<(), Fail> {
    prerequisites()?;
    let root = workspace_root();
    if !util::has_package(&root, EXAMPLES_PACKAGE)? {
        println!(
            "The demo is not built yet: package `{EXAMPLES_PACKAGE}` is not in the workspace."
        );
        return Ok(());
    }
    step("demo: cargo run -p routing-examples --example tour", || {
        run(cargo()
            .args(["run", "-p", EXAMPLES_PACKAGE, "--example", "tour"])
            .current_dir(&root))
    })
}

/// The step that runs `bin` of the examples package in a release build with `args`.
fn release_bin(root: &std::path::Path, bin: &str, args: &[String]) -> Result<(), Fail> {
    step(
        &format!("{bin}: cargo run --release -p {EXAMPLES_PACKAGE} --bin {bin}"),
        || {
            run(cargo()
                .args([
                    "run",
                    "--release",
                    "-p",
                    EXAMPLES_PACKAGE,
                    "--bin",
                    bin,
                    "--",
                ])
                .args(args)
                .current_dir(root))
        },
    )
}

/// `cargo xtask chaos [ARGS]`: pass-through to the chaos binary (release build).
fn chaos(args: &[String]) -> Result<(), Fail> {
    prerequisites()?;
    let root = workspace_root();
    if !util::has_package(&root, EXAMPLES_PACKAGE)? {
        return Err(Fail(format!(
            "the chaos harness is not built yet: package `{EXAMPLES_PACKAGE}` is not in the workspace"
        )));
    }
    release_bin(&root, "chaos", args)
}

/// `cargo xtask bench [--quick] [--json FILE]`: pass-through to the benchmark (release build):
/// every section of issue #15 in one run, one JSON, one report, one chart.
fn bench(args: &[String]) -> Result<(), Fail> {
    prerequisites()?;
    release_bin(&workspace_root(), "bench", args)
}

/// The servers the test suite, chaos and bench start: PostgreSQL, Redis and pgpool-II.
fn prerequisites() -> Result<(), Fail> {
    step(
        "prerequisites: PostgreSQL server binaries, redis-server, pgpool-II",
        prereq::ensure,
    )
}

/// `cargo xtask ha [ARGS]`: the HA workload (release build), then the leftover check.
fn ha(args: &[String]) -> Result<(), Fail> {
    step(
        "prerequisites: PostgreSQL, redis-server, patroni, etcd-server, haproxy",
        prereq::ensure_ha,
    )?;
    let root = workspace_root();
    let before = leftovers::Snapshot::take();
    let run = release_bin(&root, "ha", args);
    let left = step("leftovers: HA stack processes and dirs", || {
        leftovers::check(&before)
    });
    run?;
    left
}
