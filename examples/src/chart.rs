//! The benchmark chart, drawn with plotters and written as SVG and PNG: (a) the read latency
//! distribution per consistency mode at one apply delay (the latency at p10 ... p99.9, log
//! scale), (b) the replicas' share of reads per mode as the apply delay grows. One legend on the
//! right names the modes for both panels.
//!
//! Text goes through plotters' `ab_glyph` renderer with DejaVu Sans embedded from the `dejavu`
//! crate, so the PNG needs no system font (nor fontconfig) and looks the same on any machine;
//! the SVG names `sans-serif` and is laid out with the same font's metrics.

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::offload::{OffloadRow, PERCENTILES};

/// Size of both images, pixels.
pub const SIZE: (u32, u32) = (1200, 1000);
/// Width of the legend column on the right.
const LEGEND_W: u32 = 290;

/// One colour per mode, in the order the modes first appear (the offload section's order: the
/// six modes with the default budget, then the wait-budget variants), chosen so that no two
/// are alike.
const COLORS: [RGBColor; 12] = [
    RGBColor(0x4e, 0x79, 0xa7), // blue
    RGBColor(0xf2, 0x8e, 0x2b), // orange
    RGBColor(0xe1, 0x57, 0x59), // red
    RGBColor(0x8c, 0x56, 0x4b), // brown
    RGBColor(0x59, 0xa1, 0x4f), // green
    RGBColor(0xb0, 0x7a, 0xa1), // purple
    RGBColor(0xc9, 0xa0, 0x00), // gold
    RGBColor(0xe3, 0x77, 0xc2), // pink
    RGBColor(0x7f, 0x7f, 0x7f), // grey
    RGBColor(0x22, 0x22, 0x22), // black
    RGBColor(0x17, 0xbe, 0xcf), // cyan
    RGBColor(0x6a, 0x3d, 0x9a), // dark violet
];

/// The chart in both formats.
#[derive(Debug, Clone)]
pub struct Chart {
    /// The SVG document.
    pub svg: String,
    /// The PNG file's bytes.
    pub png: Vec<u8>,
}

fn register_fonts() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // The bytes are a valid TrueType file shipped by the crate: registering cannot fail but
        // on a broken build, where a chart without text would be the least of the problems.
        let _ = plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            dejavu::sans::regular(),
        );
        let _ = plotters::style::register_font("sans-serif", FontStyle::Bold, dejavu::sans::bold());
    });
}

/// Draws both panels from the offload rows; `delay_ms` picks the delay of the latency panel.
pub fn draw(rows: &[OffloadRow], delay_ms: u64) -> Result<Chart, String> {
    register_fonts();
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        panels(&root, rows, delay_ms)?;
        root.present().map_err(|e| e.to_string())?;
    }
    let (w, h) = SIZE;
    let mut rgb = vec![0u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, SIZE).into_drawing_area();
        panels(&root, rows, delay_ms)?;
        root.present().map_err(|e| e.to_string())?;
    }
    let mut png_bytes = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut png_bytes, w, h);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc.write_header().map_err(|e| e.to_string())?;
        writer.write_image_data(&rgb).map_err(|e| e.to_string())?;
        writer.finish().map_err(|e| e.to_string())?;
    }
    Ok(Chart {
        svg,
        png: png_bytes,
    })
}

/// The modes (in the order they first appear) and the delays (ascending).
fn modes_and_delays(rows: &[OffloadRow]) -> (Vec<&str>, Vec<u64>) {
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
    delays.sort_unstable();
    (modes, delays)
}

/// A mode's line: the modes run with the default wait budget are drawn thick, the variants with
/// another budget (`... wait=N ms`) thin, so the defaults stand out.
fn style(modes: &[&str], mode: &str) -> (ShapeStyle, bool) {
    let i = modes.iter().position(|m| *m == mode).unwrap_or(0);
    let variant = mode.contains("wait=");
    let color = COLORS[i % COLORS.len()];
    (color.stroke_width(if variant { 1 } else { 3 }), variant)
}

/// The category at an x axis position, if the position is one (the x axes are categorical:
/// percentiles, delays, drawn at 0, 1, 2 ...).
fn category<T: Copy>(x: f64, list: &[T]) -> Option<T> {
    if (x - x.round()).abs() > 1e-6 || x < -0.5 {
        return None;
    }
    list.get(x.round() as usize).copied()
}

/// A small sideways shift per mode, so that modes with equal values (ReadYourWrites and Causal
/// often are) stay visible side by side instead of one hiding the other.
fn dodge(modes: &[&str], mode: &str) -> f64 {
    let i = modes.iter().position(|m| *m == mode).unwrap_or(0) as f64;
    (i - (modes.len() as f64 - 1.0) / 2.0) * 0.015
}

type DrawResult = Result<(), String>;

/// One mode's line with a marker at each point, in the mode's style (smaller markers for the
/// thin variants), on either panel.
fn mode_line<DB: DrawingBackend, CT: CoordTranslate<From = (f64, f64)>>(
    chart: &mut ChartContext<'_, DB, CT>,
    points: Vec<(f64, f64)>,
    modes: &[&str],
    mode: &str,
) -> DrawResult {
    let (line, variant) = style(modes, mode);
    let radius = if variant { 2 } else { 4 };
    let markers: Vec<_> = points
        .iter()
        .map(|&pt| Circle::new(pt, radius, line.filled()))
        .collect();
    chart
        .draw_series(LineSeries::new(points, line))
        .map_err(e)?;
    chart.draw_series(markers).map_err(e)?;
    Ok(())
}

fn e<E: std::fmt::Display>(x: E) -> String {
    x.to_string()
}

fn panels<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    rows: &[OffloadRow],
    delay_ms: u64,
) -> DrawResult {
    root.fill(&WHITE).map_err(e)?;
    let (modes, delays) = modes_and_delays(rows);
    let (w, _) = root.dim_in_pixel();
    let (plots, legend_area) = root.split_horizontally(w.saturating_sub(LEGEND_W));
    let (top, bottom) = plots.split_vertically(SIZE.1 / 2);
    latency_panel(&top, rows, &modes, delay_ms)?;
    share_panel(&bottom, rows, &modes, &delays)?;
    legend(&legend_area, &modes)
}

fn latency_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    rows: &[OffloadRow],
    modes: &[&str],
    delay_ms: u64,
) -> DrawResult {
    let at: Vec<&OffloadRow> = rows.iter().filter(|r| r.delay_ms == delay_ms).collect();
    let values = at
        .iter()
        .flat_map(|r| r.read_latency_percentiles_ms.iter().map(|p| p.ms))
        .filter(|v| *v > 0.0);
    let (lo, hi) = values.fold((f64::INFINITY, 0.0_f64), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    let (lo, hi) = if lo.is_finite() && hi > lo {
        (lo * 0.8, hi * 1.25)
    } else {
        (0.1, 10.0)
    };
    let n = PERCENTILES.len();
    let mut chart = ChartBuilder::on(area)
        .caption(
            format!("Read latency distribution per mode, {delay_ms} ms apply delay"),
            ("sans-serif", 22).into_font().style(FontStyle::Bold),
        )
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(-0.4..n as f64 - 0.6, (lo..hi).log_scale())
        .map_err(e)?;
    let label = |x: &f64| category(*x, &PERCENTILES).map_or(String::new(), |p| format!("p{p}"));
    chart
        .configure_mesh()
        .x_labels(n + 1)
        .x_label_formatter(&label)
        .y_label_formatter(&|v| {
            if *v >= 10.0 {
                format!("{v:.0}")
            } else if *v >= 1.0 {
                format!("{v:.1}")
            } else {
                format!("{v:.2}")
            }
        })
        .x_desc("percentile of reads")
        .y_desc("read latency, ms (log scale)")
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 16))
        .light_line_style(TRANSPARENT)
        .draw()
        .map_err(e)?;
    for mode in modes {
        let Some(r) = at.iter().find(|r| r.mode == *mode) else {
            continue;
        };
        let dx = dodge(modes, mode);
        let points = r
            .read_latency_percentiles_ms
            .iter()
            .enumerate()
            .filter(|(_, p)| p.ms > 0.0)
            .map(|(i, p)| (i as f64 + dx, p.ms))
            .collect();
        mode_line(&mut chart, points, modes, mode)?;
    }
    Ok(())
}

fn share_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    rows: &[OffloadRow],
    modes: &[&str],
    delays: &[u64],
) -> DrawResult {
    let n = delays.len();
    let mut chart = ChartBuilder::on(area)
        .caption(
            "Replica share of reads per mode, by apply delay",
            ("sans-serif", 22).into_font().style(FontStyle::Bold),
        )
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(-0.4..n as f64 - 0.6, -0.03..1.05)
        .map_err(e)?;
    let label = |x: &f64| category(*x, delays).map_or(String::new(), |d| format!("{d} ms"));
    chart
        .configure_mesh()
        .x_labels(n + 1)
        .x_label_formatter(&label)
        .y_labels(11)
        .y_label_formatter(&|v| format!("{v:.1}"))
        .x_desc("replica apply delay")
        .y_desc("share of reads served by a replica")
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 16))
        .light_line_style(TRANSPARENT)
        .draw()
        .map_err(e)?;
    for mode in modes {
        let dx = dodge(modes, mode);
        let points = delays
            .iter()
            .enumerate()
            .filter_map(|(i, d)| {
                let r = rows.iter().find(|r| r.mode == *mode && r.delay_ms == *d)?;
                Some((i as f64 + dx, r.replica_share))
            })
            .collect();
        mode_line(&mut chart, points, modes, mode)?;
    }
    Ok(())
}

fn legend<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, modes: &[&str]) -> DrawResult {
    let title = ("sans-serif", 18).into_font().style(FontStyle::Bold);
    let text = ("sans-serif", 15).into_font();
    let note = ("sans-serif", 13)
        .into_font()
        .color(&RGBColor(0x55, 0x55, 0x55));
    area.draw(&Text::new("Mode", (10, 60), title)).map_err(e)?;
    let mut y = 95;
    for mode in modes {
        let (line, _) = style(modes, mode);
        area.draw(&PathElement::new(vec![(10, y), (45, y)], line))
            .map_err(e)?;
        area.draw(&Circle::new((27, y), 3, line.filled()))
            .map_err(e)?;
        area.draw(&Text::new(mode.to_string(), (55, y - 8), text.clone()))
            .map_err(e)?;
        y += 26;
    }
    y += 10;
    let default_budget = routing_core::RouterConfig::default()
        .wait_budget
        .as_millis();
    for l in [
        format!("Thick: the default wait budget ({default_budget} ms)."),
        "Thin: another wait budget.".into(),
        "Primary: every read on the".into(),
        "  primary (the baseline).".into(),
        "Eventual: unprotected control.".into(),
        "Lines are shifted sideways a".into(),
        "  little, so equal values show.".into(),
    ] {
        area.draw(&Text::new(l, (10, y), note.clone())).map_err(e)?;
        y += 20;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::offload::Percentile;

    #[test]
    fn draws_every_mode_and_delay() {
        let row = |mode: &str, delay_ms, share| OffloadRow {
            mode: mode.into(),
            delay_ms,
            replica_share: share,
            stale_reads: 0,
            read_p50_ms: 0.3,
            read_p99_ms: 1.2,
            read_latency_percentiles_ms: PERCENTILES
                .iter()
                .map(|&p| Percentile {
                    p,
                    ms: 0.1 + p / 50.0,
                })
                .collect(),
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
        let chart = draw(&rows, 50).expect("chart");
        assert!(chart.svg.starts_with("<svg") && chart.svg.trim_end().ends_with("</svg>"));
        // Each mode's name (in the legend), the delays' labels, the percentiles' labels: plotters
        // writes each text on a line of its own.
        for s in ["Causal", "Eventual", "50 ms", "0 ms", "p99.9", "p50"] {
            assert!(
                chart.svg.lines().any(|l| l.trim() == s),
                "no {s} in the SVG"
            );
        }
        assert!(chart.svg.contains("<polyline"));
        assert!(chart.png.starts_with(b"\x89PNG\r\n\x1a\n"));
    }
}
