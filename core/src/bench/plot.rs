//! `--plot FILE.png`: latency against throughput, one line per run (report), one point per
//! step, p50 solid with circles and p99 thin with triangles, both axes logarithmic (peers
//! differ by orders of magnitude).
//!
//! Pure Rust: plotters draws into a bitmap and encodes the PNG; text is rendered with
//! ab_glyph from a font embedded in the binary (DejaVu Sans Mono, `core/assets/`), so no
//! system font library or fontconfig is needed.

use std::path::Path;
use std::sync::Once;

use anyhow::{Context as _, anyhow};
use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};

use crate::bench::report::Report;

static FONT: &[u8] = include_bytes!("../../assets/DejaVuSansMono.ttf");
const FAMILY: &str = "sans-serif";
const SIZE: (u32, u32) = (1100, 650);

/// Colours of successive runs (a colour-blind-safe palette).
const PALETTE: [RGBColor; 8] = [
    RGBColor(0, 114, 178),
    RGBColor(213, 94, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(230, 159, 0),
    RGBColor(86, 180, 233),
    RGBColor(100, 100, 100),
    RGBColor(240, 228, 66),
];

fn register_embedded_font() -> anyhow::Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = register_font(FAMILY, FontStyle::Normal, FONT)
            .map_err(|_| anyhow!("the embedded chart font is not a valid TrueType font"));
    });
    result
}

/// One step on the chart: (throughput in answered req/s, p50 ms, p99 ms).
type Point = (f64, f64, f64);

/// One run's points, steps with answers only.
fn points(report: &Report) -> Vec<Point> {
    report
        .steps
        .iter()
        .filter(|s| s.ok > 0 && s.ok_per_s > 0.0)
        .map(|s| {
            (
                s.ok_per_s,
                s.latency_us.p50_us.max(1) as f64 / 1e3,
                s.latency_us.p99_us.max(1) as f64 / 1e3,
            )
        })
        .collect()
}

/// Axis range covering `values` with some room, on a log scale.
fn log_range(values: impl Iterator<Item = f64>) -> std::ops::Range<f64> {
    let (lo, hi) = values.fold((f64::INFINITY, 0.0f64), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if !lo.is_finite() || hi <= 0.0 {
        return 0.1..10.0;
    }
    (lo / 1.5)..(hi * 1.5)
}

/// Draws `reports` into a PNG at `path`.
pub fn plot(reports: &[Report], title: &str, path: &Path) -> anyhow::Result<()> {
    register_embedded_font()?;
    let series: Vec<(&str, Vec<Point>)> = reports
        .iter()
        .map(|r| (r.label.as_str(), points(r)))
        .collect();
    let all = || series.iter().flat_map(|(_, p)| p.iter());
    let x = log_range(all().map(|p| p.0));
    let y = log_range(all().flat_map(|p| [p.1, p.2]));

    let draw = || -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let root = BitMapBackend::new(path, SIZE).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, (FAMILY, 22))
            .margin(20)
            .x_label_area_size(50)
            .y_label_area_size(70)
            .build_cartesian_2d(x.clone().log_scale(), y.clone().log_scale())?;
        chart
            .configure_mesh()
            .x_desc("throughput (answered requests/s)")
            .y_desc("latency (ms): p50 solid, p99 thin")
            .label_style((FAMILY, 14))
            .axis_desc_style((FAMILY, 16))
            .draw()?;
        for (i, (label, pts)) in series.iter().enumerate() {
            let color = PALETTE[i % PALETTE.len()];
            chart
                .draw_series(LineSeries::new(
                    pts.iter().map(|p| (p.0, p.1)),
                    color.stroke_width(3),
                ))?
                .label(*label)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(3))
                });
            chart.draw_series(
                pts.iter()
                    .map(|p| Circle::new((p.0, p.1), 5, color.filled())),
            )?;
            chart.draw_series(LineSeries::new(
                pts.iter().map(|p| (p.0, p.2)),
                color.stroke_width(1),
            ))?;
            chart.draw_series(
                pts.iter()
                    .map(|p| TriangleMarker::new((p.0, p.2), 6, color.filled())),
            )?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .label_font((FAMILY, 15))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()?;
        root.present()?;
        Ok(())
    };
    draw()
        .map_err(|e| anyhow!("{e}"))
        .with_context(|| format!("drawing the chart {}", path.display()))
}
