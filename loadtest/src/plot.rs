//! The latency distribution as an SVG percentile plot (HdrHistogram style:
//! the x axis spreads the tail, 0 % … 99.999 %; the y axis is milliseconds
//! on a log scale), written by hand so the harness needs no plotting crate.

use std::fmt::Write as _;

use crate::report::ScenarioReport;

const W: f64 = 900.0;
const H: f64 = 520.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 250.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 60.0;
const COLORS: [&str; 8] = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"];

/// x position of a percentile: log10(1 / (1 − p)), capped at 99.999 %.
fn x_of(pct: f64) -> f64 {
    let tail = (1.0 - pct / 100.0).max(1e-5);
    -tail.log10()
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// An SVG with one curve per report that has latencies.
pub fn percentile_svg(title: &str, reports: &[ScenarioReport]) -> String {
    let series: Vec<(String, &Vec<(f64, f64)>)> = reports
        .iter()
        .filter(|r| !r.latency_curve.is_empty())
        .map(|r| (format!("{} / {}", r.scenario, r.target), &r.latency_curve))
        .collect();
    let (mut lo, mut hi) = (f64::MAX, f64::MIN);
    for (_, pts) in &series {
        for &(_, ms) in pts.iter() {
            lo = lo.min(ms.max(0.001));
            hi = hi.max(ms.max(0.001));
        }
    }
    if series.is_empty() {
        (lo, hi) = (0.01, 1.0);
    }
    let (ylo, yhi) = (lo.log10().floor(), hi.log10().ceil().max(lo.log10().floor() + 1.0));
    let xmax = 5.0;
    let pw = W - LEFT - RIGHT;
    let ph = H - TOP - BOTTOM;
    let px = |x: f64| LEFT + x / xmax * pw;
    let py = |ms: f64| TOP + ph - (ms.max(0.001).log10() - ylo) / (yhi - ylo) * ph;

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="24" font-size="16" text-anchor="middle">{}</text>"#,
        LEFT + pw / 2.0,
        esc(title)
    );
    for (i, label) in ["0%", "90%", "99%", "99.9%", "99.99%", "99.999%"].iter().enumerate() {
        let x = px(i as f64);
        let _ = writeln!(s, r##"<line x1="{x}" y1="{TOP}" x2="{x}" y2="{}" stroke="#ddd"/>"##, TOP + ph);
        let _ = writeln!(s, r#"<text x="{x}" y="{}" text-anchor="middle">{label}</text>"#, TOP + ph + 18.0);
    }
    let _ = writeln!(s, r#"<text x="{}" y="{}" text-anchor="middle">percentile</text>"#, LEFT + pw / 2.0, H - 14.0);
    let mut e = ylo;
    while e <= yhi {
        let ms = 10f64.powf(e);
        let y = py(ms);
        let _ = writeln!(s, r##"<line x1="{LEFT}" y1="{y}" x2="{}" y2="{y}" stroke="#ddd"/>"##, LEFT + pw);
        let label = if ms >= 1.0 { format!("{ms:.0}") } else { format!("{ms}") };
        let _ = writeln!(s, r#"<text x="{}" y="{}" text-anchor="end">{label}</text>"#, LEFT - 6.0, y + 4.0);
        e += 1.0;
    }
    let _ = writeln!(
        s,
        r#"<text x="18" y="{}" text-anchor="middle" transform="rotate(-90 18 {})">latency (ms, log)</text>"#,
        TOP + ph / 2.0,
        TOP + ph / 2.0
    );
    let _ = writeln!(s, r#"<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="black"/>"#);
    for (i, (name, pts)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let path: Vec<String> =
            pts.iter().map(|&(p, ms)| format!("{:.1},{:.1}", px(x_of(p).min(xmax)), py(ms))).collect();
        let _ = writeln!(s, r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#, path.join(" "));
        let ly = TOP + 10.0 + i as f64 * 20.0;
        let lx = LEFT + pw + 12.0;
        let _ = writeln!(
            s,
            r#"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{color}" stroke-width="3"/>"#,
            lx + 20.0
        );
        let _ = writeln!(s, r#"<text x="{}" y="{}">{}</text>"#, lx + 26.0, ly + 4.0, esc(name));
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn svg_has_one_line_per_series() {
        let r = ScenarioReport {
            scenario: "fanout".into(),
            target: "daisi".into(),
            latency_curve: vec![(0.0, 0.2), (50.0, 0.5), (99.0, 2.0), (100.0, 9.0)],
            ..Default::default()
        };
        let svg = percentile_svg("t <1>", &[r.clone(), ScenarioReport { target: "nats-ws".into(), ..r }]);
        assert!(svg.starts_with("<svg"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("t &lt;1&gt;"));
        assert!(!svg.contains("NaN"));
    }
}
