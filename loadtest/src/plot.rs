//! PNG plots with `plotters`' bitmap backend. Text is drawn with `ab_glyph`
//! from DejaVu Sans embedded by the `dejavu` crate, so nothing depends on
//! system font libraries.

use std::path::Path;

use plotters::prelude::*;

use crate::report::ScenarioReport;

const W: u32 = 900;
const H: u32 = 520;

fn fonts() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            dejavu::sans::regular(),
        );
    });
}

fn color(i: usize) -> RGBColor {
    const C: [RGBColor; 8] = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(127, 127, 127),
    ];
    C[i % C.len()]
}

type PlotResult = Result<(), Box<dyn std::error::Error>>;

/// A line chart: `series` of `(label, points)`.
pub fn lines(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[(String, Vec<(f64, f64)>)],
    log_x: bool,
) -> PlotResult {
    fonts();
    let pts = series.iter().flat_map(|(_, p)| p.iter());
    let (mut x0, mut x1, mut y1) = (f64::MAX, f64::MIN, f64::MIN);
    for (x, y) in pts {
        x0 = x0.min(*x);
        x1 = x1.max(*x);
        y1 = y1.max(*y);
    }
    if x0 > x1 {
        return Ok(());
    }
    let root = BitMapBackend::new(path, (W, H)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut b = ChartBuilder::on(&root);
    b.caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60);
    let y_range = 0.0..(y1 * 1.05).max(1e-9);
    if log_x {
        let x = (x0.max(1e-3) * 0.9)..(x1 * 1.1).max(x0.max(1e-3) * 1.01);
        let mut chart = b.build_cartesian_2d(x.log_scale(), y_range)?;
        chart
            .configure_mesh()
            .x_desc(x_label)
            .y_desc(y_label)
            .label_style(("sans-serif", 13))
            .draw()?;
        for (i, (label, p)) in series.iter().enumerate() {
            let c = color(i);
            chart
                .draw_series(LineSeries::new(
                    p.iter().map(|(x, y)| (x.max(1e-3), *y)),
                    c.stroke_width(2),
                ))?
                .label(label.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 13))
            .position(SeriesLabelPosition::LowerRight)
            .draw()?;
    } else {
        let x = x0..x1.max(x0 + 1e-9);
        let mut chart = b.build_cartesian_2d(x, y_range)?;
        chart
            .configure_mesh()
            .x_desc(x_label)
            .y_desc(y_label)
            .label_style(("sans-serif", 13))
            .draw()?;
        for (i, (label, p)) in series.iter().enumerate() {
            let c = color(i);
            chart
                .draw_series(LineSeries::new(p.iter().copied(), c.stroke_width(2)))?
                .label(label.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 13))
            .position(SeriesLabelPosition::UpperRight)
            .draw()?;
    }
    root.present()?;
    Ok(())
}

/// A horizontal bar chart of `(label, value)`.
pub fn bars(path: &Path, title: &str, x_label: &str, bars: &[(String, f64)]) -> PlotResult {
    fonts();
    if bars.is_empty() {
        return Ok(());
    }
    let max = bars.iter().map(|b| b.1).fold(0.0, f64::max).max(1e-9);
    let h = (80 + 34 * bars.len() as u32).max(200);
    let root = BitMapBackend::new(path, (W, h)).into_drawing_area();
    root.fill(&WHITE)?;
    let n = bars.len() as i32;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(330)
        .build_cartesian_2d(0.0..max * 1.1, (0..n).into_segmented())?;
    let labels: Vec<String> = bars.iter().map(|b| b.0.clone()).collect();
    chart
        .configure_mesh()
        .disable_y_mesh()
        .x_desc(x_label)
        .y_labels(bars.len())
        .y_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => labels.get(*i as usize).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .label_style(("sans-serif", 13))
        .draw()?;
    for (i, (label, v)) in bars.iter().enumerate() {
        let c = if label.starts_with("devmesh") {
            color(0)
        } else {
            color(7)
        };
        chart.draw_series(std::iter::once(Rectangle::new(
            [
                (0.0, SegmentValue::Exact(i as i32)),
                (*v, SegmentValue::Exact(i as i32 + 1)),
            ],
            c.filled(),
        )))?;
    }
    root.present()?;
    Ok(())
}

/// The CDF points of ascending `sorted`, thinned to at most ~400.
pub fn cdf(sorted: &[f64]) -> Vec<(f64, f64)> {
    let n = sorted.len();
    if n == 0 {
        return Vec::new();
    }
    let step = (n / 400).max(1);
    let mut v: Vec<(f64, f64)> = (0..n)
        .step_by(step)
        .map(|i| (sorted[i], (i + 1) as f64 / n as f64))
        .collect();
    if v.last().map(|p| p.1) != Some(1.0) {
        v.push((sorted[n - 1], 1.0));
    }
    v
}

/// Draws what a scenario's data allows: latency CDFs per case, throughput
/// bars, RSS over time. Returns the file names written.
pub fn scenario(dir: &Path, s: &ScenarioReport) -> Vec<String> {
    let mut written = Vec::new();
    let mut cases: Vec<&str> = Vec::new();
    for r in &s.rows {
        if !cases.contains(&r.case.as_str()) {
            cases.push(&r.case);
        }
    }
    let slug = |t: &str| {
        t.chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect::<String>()
    };
    if s.rows.iter().any(|r| r.sorted_ms.len() >= 20) {
        for case in &cases {
            let series: Vec<(String, Vec<(f64, f64)>)> = s
                .rows
                .iter()
                .filter(|r| r.case == *case && r.sorted_ms.len() >= 20)
                .map(|r| (r.target.clone(), cdf(&r.sorted_ms)))
                .collect();
            if series.is_empty() {
                continue;
            }
            let name = format!("{}-cdf-{}.png", s.name, slug(case));
            if lines(
                &dir.join(&name),
                &format!("{}: latency CDF, {case}", s.name),
                "latency (ms, log)",
                "fraction of requests",
                &series,
                true,
            )
            .is_ok()
            {
                written.push(name);
            }
        }
    }
    let tput: Vec<(String, f64)> = s
        .rows
        .iter()
        .filter_map(|r| Some((format!("{} · {}", r.case, r.target), r.summary.mib_per_s?)))
        .collect();
    if !tput.is_empty() {
        let name = format!("{}-throughput.png", s.name);
        if bars(
            &dir.join(&name),
            &format!("{}: throughput", s.name),
            "MiB/s",
            &tput,
        )
        .is_ok()
        {
            written.push(name);
        }
    }
    let rss: Vec<(String, Vec<(f64, f64)>)> = s
        .processes
        .iter()
        .filter(|p| p.rss_series.len() >= 2)
        .map(|p| (p.name.clone(), p.rss_series.clone()))
        .collect();
    if !rss.is_empty()
        && matches!(
            // An included file's scenarios are named `<part>.<name>`.
            s.name.rsplit('.').next().unwrap_or_default(),
            "slow_reader" | "websockets" | "agents" | "failover" | "soak"
        )
    {
        let name = format!("{}-rss.png", s.name);
        if lines(
            &dir.join(&name),
            &format!("{}: RSS over time", s.name),
            "seconds",
            "RSS (MiB)",
            &rss,
            false,
        )
        .is_ok()
        {
            written.push(name);
        }
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cdf_ends_at_one_and_is_thinned() {
        let v: Vec<f64> = (0..10_000).map(f64::from).collect();
        let c = cdf(&v);
        assert!(c.len() <= 402);
        assert_eq!(c.last().unwrap(), &(9999.0, 1.0));
        assert!(c.windows(2).all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1));
        assert!(cdf(&[]).is_empty());
    }

    #[test]
    fn draws_pngs_without_system_fonts() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("l.png");
        lines(
            &p,
            "t",
            "x",
            "y",
            &[("a".into(), vec![(1.0, 0.1), (10.0, 1.0)])],
            true,
        )
        .unwrap();
        assert!(std::fs::metadata(&p).unwrap().len() > 1000);
        let p = dir.path().join("b.png");
        bars(
            &p,
            "t",
            "MiB/s",
            &[("devmesh".into(), 3.0), ("direct".into(), 9.0)],
        )
        .unwrap();
        assert!(std::fs::metadata(&p).unwrap().len() > 1000);
    }
}
