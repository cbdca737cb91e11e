//! `cargo xtask bench --quick` in the test suite: the benchmark binary runs its quick version on
//! a real test-kit cluster (plus pgpool-II and two failover clusters) and writes a JSON with
//! every field issue #15 lists, a markdown report and the chart (SVG and PNG). Checked here: the fields are
//! there and sane (finite, ratios positive, shares within 0..1, the protected modes read nothing
//! stale). No figure is compared with a time: the machine is shared.

use std::process::Command;

use serde_json::Value;

fn num(row: &Value, key: &str) -> f64 {
    let v = row
        .get(key)
        .and_then(Value::as_f64)
        .unwrap_or_else(|| panic!("{key} missing or not a number in {row}"));
    assert!(v.is_finite() && v >= 0.0, "{key} = {v} in {row}");
    v
}

#[test]
fn quick_bench_writes_every_field() {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("bench-quick");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let json = dir.join("bench.json");
    let out = Command::new(env!("CARGO_BIN_EXE_bench"))
        .args(["--quick", "--json"])
        .arg(&json)
        .output()
        .expect("run the bench binary");
    assert!(
        out.status.success(),
        "bench --quick failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: Value =
        serde_json::from_slice(&std::fs::read(&json).expect("json written")).expect("valid JSON");

    let overhead = doc["overhead"].as_array().expect("overhead");
    for backend in ["sqlx", "diesel"] {
        for path in ["read", "write"] {
            for c in [1, 16] {
                assert!(
                    overhead.iter().any(|r| r["backend"] == backend
                        && r["path"] == path
                        && r["concurrency"] == c),
                    "no overhead row for {backend} {path} c={c}"
                );
            }
        }
    }
    for r in overhead {
        assert!(r["mode"].is_string());
        // The router against the raw pool; the two hand-rolled pools, measured in the same
        // rounds: absolute figures, against the raw pool, and the router against them.
        for k in [
            "p50_ratio",
            "p99_ratio",
            "throughput_ratio",
            "two_pools_p50_us",
            "two_pools_p99_us",
            "two_pools_throughput",
            "two_pools_p50_ratio",
            "two_pools_p99_ratio",
            "two_pools_throughput_ratio",
            "router_vs_two_pools_p50_ratio",
            "router_vs_two_pools_p99_ratio",
            "router_vs_two_pools_throughput_ratio",
        ] {
            assert!(num(r, k) > 0.0, "{k} in {r}");
        }
        let marks = num(r, "marks_round_trips_per_request");
        // In memory: none. Redis: one EVALSHA per read, one per write (never more).
        assert!(marks <= 1.01, "marks round trips {marks} in {r}");
    }

    // Round trips are counted, not timed: a routed read makes no more than the plain pool's
    // (sqlx: query and reset against ping, query and release ping; diesel: the same four). An
    // adapter that pinged twice (the driver's ping beside the router's reset) adds one per
    // request; the monitor's probes and a reconnect inside the counting window add a few in
    // all (up to 0.3 per request seen with 30 requests), hence the half-trip margins.
    let breakdown = doc["breakdown"].as_array().expect("breakdown");
    for backend in ["sqlx", "diesel"] {
        let trips = |side: &str, mode: &str| {
            breakdown
                .iter()
                .find(|r| {
                    r["backend"] == backend
                        && r["path"] == "read"
                        && r["side"] == side
                        && r["mode"] == mode
                })
                .map(|r| {
                    num(r, "replica_round_trips_per_request")
                        + num(r, "primary_round_trips_per_request")
                })
                .unwrap_or_else(|| panic!("no {backend} {side} {mode} read breakdown"))
        };
        for mode in ["Eventual", "Causal", "ReadYourWrites/memory"] {
            let (routed, raw) = (trips("candidate", mode), trips("baseline", mode));
            assert!(
                routed <= raw + 0.5,
                "{backend} {mode}: {routed} round trips per routed read, {raw} raw"
            );
            if backend == "sqlx" {
                assert!(
                    routed < raw - 0.5,
                    "sqlx {mode}: {routed} vs {raw}: a second ping?"
                );
            }
        }
    }

    let offload = doc["offload"].as_array().expect("offload");
    assert!(!offload.is_empty());
    for r in offload {
        let mode = r["mode"].as_str().expect("mode");
        num(r, "delay_ms");
        num(r, "read_p50_ms");
        num(r, "read_p99_ms");
        // The latency distribution the chart draws: p10 ... p99.9, non-decreasing.
        let pcts = r["read_latency_percentiles_ms"]
            .as_array()
            .unwrap_or_else(|| panic!("no read_latency_percentiles_ms in {r}"));
        assert_eq!(pcts.len(), 8, "{r}");
        let ms: Vec<f64> = pcts.iter().map(|p| num(p, "ms")).collect();
        assert!(ms.windows(2).all(|w| w[0] <= w[1]), "{r}");
        let share = num(r, "replica_share");
        assert!(share <= 1.0, "{r}");
        if mode.starts_with("ReadYourWrites") || mode.starts_with("Causal") || mode == "Primary" {
            assert_eq!(
                num(r, "stale_reads"),
                0.0,
                "a protected mode read stale data: {r}"
            );
        }
        if mode == "Primary" {
            assert_eq!(share, 0.0, "{r}");
        }
    }

    let failover = &doc["failover"];
    assert!(num(failover, "runs") >= 2.0, "{failover}");
    assert!(
        num(failover, "max_ms") >= num(failover, "p50_ms"),
        "{failover}"
    );

    let peer = doc["peer"].as_array().expect("peer");
    for system in ["router", "pgpool-II"] {
        let r = peer
            .iter()
            .find(|r| r["system"] == system)
            .unwrap_or_else(|| panic!("no peer row for {system}"));
        assert!(num(r, "throughput") > 0.0, "{r}");
        num(r, "p50_ms");
        num(r, "p99_ms");
        assert!(num(r, "replica_share") <= 1.0, "{r}");
        num(r, "stale_reads");
    }
    let router = peer
        .iter()
        .find(|r| r["system"] == "router")
        .expect("router");
    assert_eq!(num(router, "stale_reads"), 0.0, "{router}");

    assert!(num(&doc, "decision_ns") > 0.0);

    let scale = doc["scale"].as_array().expect("scale");
    for c in [1, 4, 16, 64] {
        let r = scale
            .iter()
            .find(|r| r["concurrency"] == c)
            .unwrap_or_else(|| panic!("no scale row at c={c}"));
        assert!(
            num(r, "throughput") > 0.0 && num(r, "throughput_ratio") > 0.0,
            "{r}"
        );
        assert!(
            num(r, "replicas") >= 1.0 && num(r, "cpu_busy") <= 1.0,
            "{r}"
        );
    }

    let md = std::fs::read_to_string(json.with_extension("md")).expect("report written");
    for section in [
        "## Overhead",
        "## Offload",
        "## Peer",
        "## Failover",
        "## Scale",
    ] {
        assert!(md.contains(section), "report without {section}");
    }
    let svg = std::fs::read_to_string(json.with_extension("svg")).expect("chart written");
    assert!(svg.starts_with("<svg") && svg.contains("<polyline"));
    let png = std::fs::read(json.with_extension("png")).expect("PNG chart written");
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
}
