//! The report as a picture: one hand-written SVG (no plotting library, no fonts, no system
//! libraries) with three panels: throughput per second, p50/p99 latency per second, and the
//! latency distribution (percentile spectrum, HdrHistogram style) of each op.

use std::fmt::Write as _;

use crate::report::{Point, Report};
use crate::workload::Op;

const WIDTH: f64 = 960.0;
const PANEL_HEIGHT: f64 = 300.0;
const MARGIN_LEFT: f64 = 80.0;
const MARGIN_RIGHT: f64 = 170.0;
const MARGIN_TOP: f64 = 70.0;
const PANEL_GAP: f64 = 70.0;
const COLORS: [&str; 9] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
    "#7f7f7f",
];

/// A line: points may be missing (no data that second), which breaks the line.
struct Series {
    name: String,
    color: &'static str,
    dashed: bool,
    points: Vec<Option<(f64, f64)>>,
}

#[derive(Clone, Copy)]
enum Scale {
    Linear { max: f64 },
    Log { min: f64, max: f64 },
}

impl Scale {
    /// Fraction 0..1 of the axis for `v`.
    fn frac(self, v: f64) -> f64 {
        match self {
            Scale::Linear { max } => (v / max).clamp(0.0, 1.0),
            Scale::Log { min, max } => {
                ((v.max(min).log10() - min.log10()) / (max.log10() - min.log10())).clamp(0.0, 1.0)
            }
        }
    }

    fn ticks(self) -> Vec<f64> {
        match self {
            Scale::Linear { max } => (0..=4).map(|i| max * i as f64 / 4.0).collect(),
            Scale::Log { min, max } => {
                let mut t = Vec::new();
                let mut v = min;
                while v <= max * 1.0001 {
                    t.push(v);
                    v *= 10.0;
                }
                t
            }
        }
    }

    /// A log scale over whole decades covering `values`, or a linear one from zero.
    fn fit(values: impl Iterator<Item = f64>, log: bool) -> Scale {
        let (mut lo, mut hi) = (f64::INFINITY, 0.0f64);
        for v in values.filter(|v| v.is_finite() && *v > 0.0) {
            lo = lo.min(v);
            hi = hi.max(v);
        }
        if !lo.is_finite() {
            (lo, hi) = (1.0, 1.0);
        }
        if log {
            Scale::Log {
                min: 10f64.powf(lo.log10().floor()),
                max: 10f64.powf(hi.log10().ceil().max(lo.log10().floor() + 1.0)),
            }
        } else {
            Scale::Linear {
                max: nice_ceiling(hi),
            }
        }
    }
}

/// 1, 2 or 5 times a power of ten, at least `v`.
fn nice_ceiling(v: f64) -> f64 {
    if v <= 0.0 {
        return 1.0;
    }
    let p = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * p)
        .find(|&c| c >= v)
        .unwrap_or(10.0 * p)
}

fn label(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v >= 1000.0 {
        format!("{}", v.round())
    } else if v >= 1.0 {
        format!("{}", (v * 10.0).round() / 10.0)
    } else {
        format!("{}", (v * 1000.0).round() / 1000.0)
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// One panel: where it sits, what it says, and its axes.
struct Panel<'a> {
    /// Vertical offset of the plot area.
    top: f64,
    title: &'a str,
    x_label: &'a str,
    y_label: &'a str,
    x_max: f64,
    /// `(value, label)`.
    x_ticks: &'a [(f64, String)],
    y: Scale,
}

/// Left edge, width and height of every panel's plot area.
const PLOT_LEFT: f64 = MARGIN_LEFT;
const PLOT_WIDTH: f64 = WIDTH - MARGIN_LEFT - MARGIN_RIGHT;
const PLOT_HEIGHT: f64 = PANEL_HEIGHT;

impl Panel<'_> {
    fn px(&self, x: f64) -> f64 {
        PLOT_LEFT + (x / self.x_max).clamp(0.0, 1.0) * PLOT_WIDTH
    }

    fn py(&self, v: f64) -> f64 {
        self.top + PLOT_HEIGHT - self.y.frac(v) * PLOT_HEIGHT
    }

    /// Draws the panel and `series` (each with its legend entry) into `out`.
    fn draw(&self, out: &mut String, series: &[Series]) {
        self.frame(out);
        self.grid(out);
        self.axis_names(out);
        for (n, s) in series.iter().enumerate() {
            self.line(out, s);
            self.legend(out, n, s);
        }
    }

    /// The title and the plot area's border.
    fn frame(&self, out: &mut String) {
        let (left, top, w, h) = (PLOT_LEFT, self.top, PLOT_WIDTH, PLOT_HEIGHT);
        let _ = writeln!(
            out,
            r#"<text x="{left}" y="{}" font-size="15" font-weight="bold">{}</text>"#,
            top - 12.0,
            esc(self.title)
        );
        let _ = writeln!(
            out,
            "<rect x=\"{left}\" y=\"{top}\" width=\"{w}\" height=\"{h}\" fill=\"none\" stroke=\"#444\"/>"
        );
    }

    /// Grid lines and tick labels, of the y axis then the x axis.
    fn grid(&self, out: &mut String) {
        let (left, top, w, h) = (PLOT_LEFT, self.top, PLOT_WIDTH, PLOT_HEIGHT);
        for t in self.y.ticks() {
            let yy = self.py(t);
            let _ = writeln!(
                out,
                "<line x1=\"{left}\" y1=\"{yy:.1}\" x2=\"{:.1}\" y2=\"{yy:.1}\" stroke=\"#ddd\"/>\
                 <text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\" text-anchor=\"end\">{}</text>",
                left + w,
                left - 6.0,
                yy + 4.0,
                label(t)
            );
        }
        for (x, text) in self.x_ticks {
            let xx = self.px(*x);
            let _ = writeln!(
                out,
                "<line x1=\"{xx:.1}\" y1=\"{top}\" x2=\"{xx:.1}\" y2=\"{:.1}\" stroke=\"#eee\"/>\
                 <text x=\"{xx:.1}\" y=\"{:.1}\" font-size=\"11\" text-anchor=\"middle\">{}</text>",
                top + h,
                top + h + 16.0,
                esc(text)
            );
        }
    }

    /// The axes' names: the x axis's below, the y axis's sideways on the left.
    fn axis_names(&self, out: &mut String) {
        let (left, top, w, h) = (PLOT_LEFT, self.top, PLOT_WIDTH, PLOT_HEIGHT);
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{:.1}" font-size="12" text-anchor="middle">{}</text>"#,
            left + w / 2.0,
            top + h + 34.0,
            esc(self.x_label)
        );
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{:.1}" font-size="12" text-anchor="middle" transform="rotate(-90 {:.1} {:.1})">{}</text>"#,
            left - 55.0,
            top + h / 2.0,
            left - 55.0,
            top + h / 2.0,
            esc(self.y_label)
        );
    }

    /// `s` as polylines broken where points are missing (a lone point is a dot).
    fn line(&self, out: &mut String, s: &Series) {
        for run in s.points.split(Option::is_none) {
            let pts: Vec<String> = run
                .iter()
                .flatten()
                .map(|&(x, v)| format!("{:.1},{:.1}", self.px(x), self.py(v)))
                .collect();
            match pts.len() {
                0 => {}
                1 => {
                    let (x, y) = pts[0].split_once(',').unwrap();
                    let _ = writeln!(
                        out,
                        r#"<circle cx="{x}" cy="{y}" r="2.5" fill="{}"/>"#,
                        s.color
                    );
                }
                _ => {
                    let _ = writeln!(
                        out,
                        r#"<polyline fill="none" stroke="{}" stroke-width="1.8"{} points="{}"/>"#,
                        s.color,
                        dash(s),
                        pts.join(" ")
                    );
                }
            }
        }
    }

    /// The legend entry of series number `n`, right of the plot area.
    fn legend(&self, out: &mut String, n: usize, s: &Series) {
        let ly = self.top + 14.0 + n as f64 * 18.0;
        let lx = PLOT_LEFT + PLOT_WIDTH + 12.0;
        let _ = writeln!(
            out,
            r#"<line x1="{lx}" y1="{ly}" x2="{:.1}" y2="{ly}" stroke="{}" stroke-width="2"{}/><text x="{:.1}" y="{:.1}" font-size="12">{}</text>"#,
            lx + 24.0,
            s.color,
            dash(s),
            lx + 30.0,
            ly + 4.0,
            esc(&s.name)
        );
    }
}

/// The stroke attribute of a dashed series.
fn dash(s: &Series) -> &'static str {
    if s.dashed {
        r#" stroke-dasharray="6 4""#
    } else {
        ""
    }
}

/// `-log10(1 - p/100)`: the "number of nines" axis of a percentile spectrum (max at 5 nines).
fn nines(percentile: f64) -> f64 {
    if percentile >= 100.0 {
        5.0
    } else {
        (-(1.0 - percentile / 100.0).log10()).min(5.0)
    }
}

/// Time ticks for `seconds` seconds.
fn time_ticks(seconds: f64) -> Vec<(f64, String)> {
    let step = nice_ceiling((seconds / 8.0).max(1.0));
    let mut t = Vec::new();
    let mut x = 0.0;
    while x <= seconds + 1e-9 {
        t.push((x, format!("{x}")));
        x += step;
    }
    t
}

/// The SVG document for `report`.
pub fn svg(report: &Report) -> String {
    let c = &report.config;
    let mut out = String::new();
    header(&mut out, report);
    // Only whole seconds of the measured period: the last partial second holds only the requests
    // that were still running at the end, which would read as a drop.
    let seconds = c.duration_s.min(report.elapsed_s).floor().max(1.0);
    let timeline: Vec<(&String, Vec<&Point>)> = report
        .timeline
        .iter()
        .map(|(op, points)| {
            let full = points.iter().filter(|p| (p.t as f64) < seconds).collect();
            (op, full)
        })
        .collect();
    let time = time_ticks(seconds);

    // 1. Throughput per second.
    let thr = throughput(&timeline);
    let top = MARGIN_TOP + 30.0;
    Panel {
        top,
        title: "Throughput (successful requests per second)",
        x_label: "seconds since the warm-up ended",
        y_label: "ops/s",
        x_max: seconds,
        x_ticks: &time,
        y: fit(&thr, false),
    }
    .draw(&mut out, &thr);

    // 2. p50 (solid) and p99 (dashed) per second.
    let lat = latencies(&timeline);
    let top = top + PANEL_HEIGHT + PANEL_GAP;
    Panel {
        top,
        title: "Latency per second: p50 (solid) and p99 (dashed)",
        x_label: "seconds since the warm-up ended",
        y_label: "latency, ms (log)",
        x_max: seconds,
        x_ticks: &time,
        y: fit(&lat, true),
    }
    .draw(&mut out, &lat);

    // 3. The latency distribution of the whole run.
    let dist = distribution(report);
    let x_ticks: Vec<(f64, String)> = [
        (0.0, "0%"),
        (1.0, "90%"),
        (2.0, "99%"),
        (3.0, "99.9%"),
        (4.0, "99.99%"),
        (5.0, "max"),
    ]
    .into_iter()
    .map(|(x, l)| (x, l.to_string()))
    .collect();
    let corrected = if c.rate_ops_s.is_some() {
        " (from intended start)"
    } else {
        ""
    };
    Panel {
        top: top + PANEL_HEIGHT + PANEL_GAP,
        title: &format!("Latency distribution over the whole run{corrected}"),
        x_label: "percentile",
        y_label: "latency, ms (log)",
        x_max: 5.0,
        x_ticks: &x_ticks,
        y: fit(&dist, true),
    }
    .draw(&mut out, &dist);
    out.push_str("</svg>\n");
    out
}

/// The document's opening tag, background and title lines.
fn header(out: &mut String, report: &Report) {
    let c = &report.config;
    let height = MARGIN_TOP + 3.0 * (PANEL_HEIGHT + PANEL_GAP);
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif">"#
    );
    let _ = writeln!(
        out,
        "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{MARGIN_LEFT}\" y=\"28\" font-size=\"18\" font-weight=\"bold\">ordo-bench: \
         workload {} against {}</text>\n<text x=\"{MARGIN_LEFT}\" y=\"48\" font-size=\"12\">{}</text>",
        esc(&c.workload),
        esc(&c.target),
        esc(&format!(
            "{} ({}), {}, {:.1} s measured, mix {}, {} records, {}-byte values",
            match c.rate_ops_s {
                Some(r) => format!("open loop {r} ops/s"),
                None => "closed loop".to_string(),
            },
            c.clients,
            c.distribution,
            report.elapsed_s,
            c.mix,
            c.records,
            c.value_size
        ))
    );
}

/// One colour per op, the same in every panel; `all` is black.
fn color(op: &str) -> &'static str {
    match Op::from_name(op) {
        Some(op) => {
            let i = Op::ALL.iter().position(|o| *o == op).unwrap_or(0);
            COLORS[i % COLORS.len()]
        }
        None => "#000000",
    }
}

/// Where second `t` is drawn: the middle of it.
fn x_of(t: u64) -> f64 {
    t as f64 + 0.5
}

/// A scale that fits every point of `series`.
fn fit(series: &[Series], log: bool) -> Scale {
    Scale::fit(
        series
            .iter()
            .flat_map(|s| s.points.iter().flatten().map(|p| p.1)),
        log,
    )
}

/// Successful requests per second, one series per op.
fn throughput(timeline: &[(&String, Vec<&Point>)]) -> Vec<Series> {
    timeline
        .iter()
        .map(|(op, points)| Series {
            name: op.to_string(),
            color: color(op),
            dashed: false,
            points: points
                .iter()
                .map(|p| Some((x_of(p.t), p.ops as f64)))
                .collect(),
        })
        .collect()
}

/// p50 (solid) and p99 (dashed) per second, two series per op.
fn latencies(timeline: &[(&String, Vec<&Point>)]) -> Vec<Series> {
    let mut lat = Vec::new();
    for (op, points) in timeline {
        for (dashed, name, pick) in [
            (false, "p50", (|p: &Point| p.p50_ms) as fn(&_) -> _),
            (true, "p99", |p: &Point| p.p99_ms),
        ] {
            lat.push(Series {
                name: format!("{op} {name}"),
                color: color(op),
                dashed,
                points: points
                    .iter()
                    .map(|p| pick(p).map(|v| (x_of(p.t), v)))
                    .collect(),
            });
        }
    }
    lat
}

/// The percentile spectrum of each op over the whole run (`all` dashed).
fn distribution(report: &Report) -> Vec<Series> {
    report
        .results
        .iter()
        .filter(|r| !r.percentiles.is_empty())
        .map(|r| Series {
            name: r.op.clone(),
            color: color(&r.op),
            dashed: r.op == "all",
            points: r
                .percentiles
                .iter()
                .map(|p| Some((nines(p.percentile), p.ms)))
                .collect(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{CpuInfo, Recorder, RunInfo, Timeline};
    use std::time::Duration;

    #[test]
    fn the_svg_has_every_op_in_every_panel() {
        let mut rec = Recorder::default();
        let mut timeline = Timeline::default();
        for i in 0..300u64 {
            let op = if i % 3 == 0 {
                Op::OrderCreate
            } else {
                Op::OrderRead
            };
            let d = Duration::from_micros(500 + i * 10);
            rec.op(op).record_ok(d, d);
            timeline.record(i / 100, op, Some(d));
        }
        let info = RunInfo {
            workload: "orders".into(),
            mix: "order_create=1,order_read=2".into(),
            distribution: "latest".into(),
            target: "ordo-playground".into(),
            endpoints: vec!["127.0.0.1:1".into()],
            clients: 4,
            pacing: "closed".into(),
            rate_ops_s: None,
            duration_s: 3.0,
            warmup_s: 0.0,
            value_size: 8,
            records: 10,
            items_per_shard: 1,
            order_items: 2,
            order_prefix: "r1-".into(),
            seed: 1,
        };
        let report = Report::new(
            info,
            Duration::from_secs(3),
            &rec,
            &timeline,
            CpuInfo::default(),
            0,
        );
        let svg = svg(&report);
        assert!(svg.starts_with("<svg ") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 2 + 4 + 3, "{svg}");
        for name in ["order_create p99", "order_read p50", ">all<", "Throughput"] {
            assert!(svg.contains(name), "{name} missing");
        }
        assert_eq!(svg.matches("<svg").count(), 1);
    }

    #[test]
    fn scales_and_ticks_are_sane() {
        assert_eq!(nice_ceiling(7.0), 10.0);
        assert_eq!(nice_ceiling(1234.0), 2000.0);
        assert_eq!(nice_ceiling(0.0), 1.0);
        let log = Scale::fit([0.35, 42.0].into_iter(), true);
        assert_eq!(log.ticks(), [0.1, 1.0, 10.0, 100.0]);
        assert_eq!(log.frac(0.1), 0.0);
        assert_eq!(log.frac(100.0), 1.0);
        let lin = Scale::fit([3.0, 17.0].into_iter(), false);
        assert_eq!(lin.ticks(), [0.0, 5.0, 10.0, 15.0, 20.0]);
        assert_eq!(nines(0.0), 0.0);
        assert!((nines(99.0) - 2.0).abs() < 1e-9);
        assert_eq!(nines(100.0), 5.0);
        assert_eq!(time_ticks(20.0).len(), 5);
        assert_eq!(esc("a<b&\"c\""), "a&lt;b&amp;&quot;c&quot;");
    }
}
