//! The benchmark chart, as a plain SVG (no plotting dependency): read latency per consistency
//! mode under lag, and the replicas' share of reads per mode as the apply delay grows.

use std::fmt::Write as _;

use crate::offload::OffloadRow;

const W: f64 = 960.0;
const PANEL: f64 = 340.0;
const LEFT: f64 = 70.0;
const COLORS: [&str; 10] = [
    "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#b07aa1", "#edc948", "#ff9da7",
    "#9c755f", "#bab0ac",
];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Draws both panels from the offload rows; `delay_ms` picks the delay of the latency panel.
pub fn svg(rows: &[OffloadRow], delay_ms: u64) -> String {
    let mut modes: Vec<&str> = Vec::new();
    let mut delays: Vec<u64> = Vec::new();
    for r in rows {
        if !modes.contains(&r.mode.as_str()) {
            modes.push(&r.mode);
        }
        if !delays.contains(&r.delay_ms) {
            delays.push(r.delay_ms);
        }
    }
    let height = 2.0 * PANEL + 160.0;
    let mut out = String::new();
    let _ = write!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{height}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
"#
    );
    latency_panel(&mut out, rows, &modes, delay_ms, 30.0);
    share_panel(&mut out, rows, &modes, &delays, PANEL + 130.0);
    out.push_str("</svg>\n");
    out
}

fn axis(out: &mut String, top: f64, max: f64, unit: &str, title: &str) {
    let bottom = top + PANEL - 40.0;
    let _ = writeln!(
        out,
        r#"<text x="{LEFT}" y="{}" font-size="15" font-weight="bold">{}</text>"#,
        top - 8.0,
        esc(title)
    );
    let _ = writeln!(
        out,
        r##"<line x1="{LEFT}" y1="{top}" x2="{LEFT}" y2="{bottom}" stroke="#333"/><line x1="{LEFT}" y1="{bottom}" x2="{}" y2="{bottom}" stroke="#333"/>"##,
        W - 20.0
    );
    for i in 0..=4 {
        let v = max * f64::from(i) / 4.0;
        let y = bottom - (bottom - top) * f64::from(i) / 4.0;
        let _ = writeln!(
            out,
            r##"<line x1="{LEFT}" y1="{y}" x2="{}" y2="{y}" stroke="#ddd"/><text x="{}" y="{}" text-anchor="end">{v:.2}{unit}</text>"##,
            W - 20.0,
            LEFT - 6.0,
            y + 4.0
        );
    }
}

fn latency_panel(out: &mut String, rows: &[OffloadRow], modes: &[&str], delay_ms: u64, top: f64) {
    let at: Vec<&OffloadRow> = rows.iter().filter(|r| r.delay_ms == delay_ms).collect();
    let max = at.iter().map(|r| r.read_p99_ms).fold(0.1_f64, f64::max) * 1.1;
    axis(
        out,
        top,
        max,
        " ms",
        &format!("Read latency per mode, {delay_ms} ms apply delay (light: p50, dark: p99)"),
    );
    let bottom = top + PANEL - 40.0;
    let slot = (W - 20.0 - LEFT) / modes.len().max(1) as f64;
    let scale = |v: f64| (bottom - top) * v / max;
    for (i, mode) in modes.iter().enumerate() {
        let Some(r) = at.iter().find(|r| r.mode == *mode) else {
            continue;
        };
        let x = LEFT + slot * i as f64;
        let color = COLORS[i % COLORS.len()];
        for (j, (v, opacity)) in [(r.read_p50_ms, 0.45), (r.read_p99_ms, 1.0)]
            .into_iter()
            .enumerate()
        {
            let bx = x + slot * (0.15 + 0.35 * j as f64);
            let h = scale(v);
            let _ = writeln!(
                out,
                r#"<rect x="{bx:.1}" y="{:.1}" width="{:.1}" height="{h:.1}" fill="{color}" fill-opacity="{opacity}"><title>{} {}: {v:.2} ms</title></rect>"#,
                bottom - h,
                slot * 0.33,
                esc(mode),
                if j == 0 { "p50" } else { "p99" }
            );
        }
        // Slanted, so that long mode names (`ReadYourWrites wait=200 ms`) do not overlap.
        let (lx, ly) = (x + slot / 2.0, bottom + 14.0);
        let _ = writeln!(
            out,
            r#"<text x="{lx:.1}" y="{ly}" text-anchor="end" font-size="10" transform="rotate(-25 {lx:.1} {ly})">{}</text>"#,
            esc(mode)
        );
    }
}

fn share_panel(out: &mut String, rows: &[OffloadRow], modes: &[&str], delays: &[u64], top: f64) {
    axis(
        out,
        top,
        1.0,
        "",
        "Replica share of reads per mode, by apply delay",
    );
    let bottom = top + PANEL - 40.0;
    let step = (W - 220.0 - LEFT) / (delays.len().max(2) - 1) as f64;
    let x_of = |i: usize| LEFT + 20.0 + step * i as f64;
    for (i, d) in delays.iter().enumerate() {
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{}" text-anchor="middle">{d} ms</text>"#,
            x_of(i),
            bottom + 16.0
        );
    }
    for (m, mode) in modes.iter().enumerate() {
        let color = COLORS[m % COLORS.len()];
        let points: Vec<String> = delays
            .iter()
            .enumerate()
            .filter_map(|(i, d)| {
                let r = rows.iter().find(|r| r.mode == *mode && r.delay_ms == *d)?;
                let y = bottom - (bottom - top) * r.replica_share;
                Some(format!("{:.1},{y:.1}", x_of(i)))
            })
            .collect();
        let _ = writeln!(
            out,
            r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"/>"#,
            points.join(" ")
        );
        let ly = top + 14.0 + 18.0 * m as f64;
        let _ = writeln!(
            out,
            r#"<line x1="{}" y1="{ly}" x2="{}" y2="{ly}" stroke="{color}" stroke-width="3"/><text x="{}" y="{}">{}</text>"#,
            W - 190.0,
            W - 165.0,
            W - 160.0,
            ly + 4.0,
            esc(mode)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_every_mode_and_delay() {
        let row = |mode: &str, delay_ms, share| OffloadRow {
            mode: mode.into(),
            delay_ms,
            replica_share: share,
            stale_reads: 0,
            read_p50_ms: 0.3,
            read_p99_ms: 1.2,
            reads: 10,
            read_throughput: 100.0,
            wait_budget_ms: 50,
            lsn_waits: 0,
            primary_reads: 0,
            failed: 0,
        };
        let rows = vec![
            row("Eventual", 0, 1.0),
            row("Eventual", 50, 1.0),
            row("Causal", 0, 0.9),
            row("Causal", 50, 0.2),
        ];
        let svg = svg(&rows, 50);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("Causal p99: 1.20 ms"));
        assert!(svg.contains(">50 ms</text>"));
    }
}
