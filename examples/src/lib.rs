//! Runnable material: the consistency checker (`cargo xtask chaos`), the product tour
//! (`cargo xtask demo`), the web examples' service ([`web_service`]) with a minimal HTTP
//! client ([`http`]), benchmark workloads ([`offload`], [`peer`], [`failover`], [`scale`], [`decision`], drawn by [`chart`]; run together by `cargo xtask bench`) and the HA workload ([`ha`],
//! `cargo xtask ha`). Not published.

pub mod chaos;
pub mod chart;
pub mod decision;
pub mod failover;
pub mod ha;
pub mod http;
pub mod offload;
pub mod peer;
pub mod prometheus;
pub mod scale;
pub mod web_service;

/// The median of per-round figures (the mean of the middle two for an even count); NaN when
/// there are none.
pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The `q` quantile (0..=1) of sorted latencies, in milliseconds; 0 when there are none.
pub fn percentile_ms(sorted: &[std::time::Duration], q: f64) -> f64 {
    sorted
        .get(((sorted.len() as f64 - 1.0) * q).round() as usize)
        .map_or(0.0, |d| d.as_secs_f64() * 1e3)
}
