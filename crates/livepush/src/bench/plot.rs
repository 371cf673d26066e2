//! Plots of bench runs, as SVG: where people would rather look than read a table.
//!
//! One figure, two panels side by side:
//!
//! - **Latency distribution** (left): for every run, the fraction of samples at or below each
//!   latency (a CDF), on a log-scale x axis in ms, because latencies spread over decades and
//!   the tail is where servers differ. Each run's p50 and p99 are marked on its curve (dots)
//!   and given in the legend; faint guides run at 50 % and 99 %.
//! - **Rate over time** (right): events (deliveries, connects) per second since the start,
//!   one step per bucket (10 ms, merged into wider steps past 400 of them): a slow start, a
//!   stall or a tail of stragglers shows here
//!   and not in one average rate.
//!
//! `--plot FILE.svg` (`bench fanout`, `bench connections`; `bench publish`: one curve per
//! durability policy) draws its own run; `bench plot`
//! draws several `--json` reports on the same axes (`bench/compare.sh` draws livepush beside
//! the peers). Both go through the report's JSON, so one run looks the same either way. A
//! report without the distribution (one from before the plots) is drawn from its percentiles
//! (p50, p90, p99, p99.9, max), and said so in the legend.
//!
//! plotters' SVG backend writes text as `<text>` elements and, without its `ttf` feature,
//! lays text out by estimate: no font file is read, so this runs on a machine without fonts.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Args;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use serde::Serialize;
use serde_json::Value;

use super::note;
use super::report::Rates;

/// What a bench's JSON report holds for the plots, by its `bench` field.
#[derive(Debug)]
struct Kind {
    bench: &'static str,
    /// The percentile summary (the fallback for a report without `cdf`).
    summary: &'static str,
    cdf: &'static str,
    rates: &'static str,
    latency: &'static str,
    rate: &'static str,
}

const KINDS: [Kind; 2] = [
    Kind {
        bench: "fanout",
        summary: "latency",
        cdf: "latency_cdf",
        rates: "deliveries_over_time",
        latency: "publish → receive latency",
        rate: "deliveries/s since the first publish",
    },
    Kind {
        bench: "connections",
        summary: "handshake",
        cdf: "handshake_cdf",
        rates: "connects_over_time",
        latency: "handshake (TCP connect → joined)",
        rate: "connects/s since the first connect",
    },
];

/// One run on the plot.
#[derive(Debug, Clone)]
pub struct Series {
    pub label: String,
    /// `[ms, fraction at or below]`, rising.
    pub cdf: Vec<[f64; 2]>,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub rates: Option<Rates>,
    /// The distribution is only the report's percentiles.
    pub coarse: bool,
}

/// A figure: the title, what the two panels show, and the runs.
#[derive(Debug, Clone)]
pub struct Figure {
    pub title: String,
    pub latency: String,
    pub rate: String,
    pub runs: Vec<Series>,
}

/// `--plot FILE.svg` of the benches that draw their run.
#[derive(Debug, Clone, Args)]
pub struct PlotArg {
    /// Also draw the run as SVG: the latency distribution (log scale) beside the rate over
    /// time.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
}

impl PlotArg {
    /// Draw `report` (a bench's report, as `--json` prints it) if `--plot` was given.
    pub fn draw<T: Serialize>(&self, report: &T) -> anyhow::Result<()> {
        let Some(path) = &self.plot else {
            return Ok(());
        };
        let v = serde_json::to_value(report)?;
        let label = v["target"].as_str().unwrap_or("run").to_owned();
        write(path, &figure(vec![(label, v)], None)?)
    }

    /// Draw the figure `f` makes if `--plot` was given (benches whose report is not one run).
    pub fn draw_figure(&self, f: impl FnOnce() -> Figure) -> anyhow::Result<()> {
        match &self.plot {
            Some(path) => write(path, &f()),
            None => Ok(()),
        }
    }
}

/// `livepush bench plot`: several runs' reports on the same axes.
#[derive(Debug, Args)]
pub struct PlotBench {
    /// Reports (`livepush bench fanout|connections --json` output) as `FILE` (labelled by the
    /// file name) or `LABEL=FILE`. A `bench/compare.sh` file (`compare-DATE.json`, reports
    /// keyed `TARGET-LOAD`) gives one run per target of `--load`.
    #[arg(required = true, value_name = "[LABEL=]FILE")]
    inputs: Vec<String>,
    /// The load to take from `compare-DATE.json` files: idle, burst or paced.
    #[arg(long)]
    load: Option<String>,
    /// The SVG to write.
    #[arg(long, value_name = "FILE.svg")]
    out: PathBuf,
    /// The figure's title (default: from the first report).
    #[arg(long)]
    title: Option<String>,
}

pub fn run(a: PlotBench) -> anyhow::Result<()> {
    let mut reports = Vec::new();
    for input in &a.inputs {
        let (label, file) = match input.split_once('=') {
            Some((l, f)) => (Some(l.to_owned()), f),
            None => (None, input.as_str()),
        };
        let text = std::fs::read_to_string(file).with_context(|| format!("read {file}"))?;
        let v: Value = serde_json::from_str(&text).with_context(|| format!("parse {file}"))?;
        if v.get("bench").is_some() {
            let stem = Path::new(file).file_stem().and_then(|s| s.to_str());
            reports.push((label.or(stem.map(str::to_owned)).unwrap_or_default(), v));
            continue;
        }
        // compare-DATE.json: {"TARGET-LOAD": report, …}
        let Some(load) = &a.load else {
            bail!("{file} holds several reports: say which load with --load");
        };
        let Some(map) = v.as_object() else {
            bail!("{file} is neither a bench report nor a compare.sh file");
        };
        let mut runs: Vec<_> = map
            .iter()
            .filter_map(|(key, r)| Some((key.strip_suffix(&format!("-{load}"))?, r)))
            .map(|(target, r)| (target.to_owned(), r.clone()))
            .collect();
        // livepush first (the first colour), the peers in the file's order.
        runs.sort_by_key(|(target, _)| target != "livepush");
        reports.extend(runs);
    }
    if reports.is_empty() {
        bail!("no report to draw (check --load)");
    }
    write(&a.out, &figure(reports, a.title)?)
}

/// The figure of labelled JSON reports, all of one bench.
fn figure(reports: Vec<(String, Value)>, title: Option<String>) -> anyhow::Result<Figure> {
    let first = &reports[0].1;
    let bench = first["bench"].as_str().unwrap_or_default();
    let Some(kind) = KINDS.iter().find(|k| k.bench == bench) else {
        bail!("no plot for bench {bench:?} (only fanout and connections)");
    };
    let mut runs = Vec::new();
    for (label, r) in &reports {
        if r["bench"] != first["bench"] {
            bail!("{label} is a {} report, not {bench}", r["bench"]);
        }
        runs.push(series(label, r, kind)?);
    }
    Ok(Figure {
        title: title.unwrap_or_else(|| title_of(first)),
        latency: kind.latency.to_owned(),
        rate: kind.rate.to_owned(),
        runs,
    })
}

fn series(label: &str, r: &Value, kind: &Kind) -> anyhow::Result<Series> {
    let summary = &r[kind.summary];
    let p = |k: &str| summary[k].as_f64();
    let (Some(p50_ms), Some(p99_ms)) = (p("p50_ms"), p("p99_ms")) else {
        bail!("{label}: no {} percentiles in the report", kind.summary);
    };
    let (cdf, coarse) = match r.get(kind.cdf) {
        Some(c) => (serde_json::from_value(c.clone())?, false),
        None => {
            let points = [("p50_ms", 0.5), ("p90_ms", 0.9), ("p99_ms", 0.99)];
            let tail = [("p999_ms", 0.999), ("max_ms", 1.0)];
            let cdf = points
                .iter()
                .chain(&tail)
                .filter_map(|(k, f)| Some([p(k)?, *f]))
                .collect();
            (cdf, true)
        }
    };
    let rates = match r.get(kind.rates) {
        Some(t) => Some(serde_json::from_value(t.clone())?),
        None => None,
    };
    Ok(Series {
        label: label.to_owned(),
        cdf,
        p50_ms,
        p99_ms,
        rates,
        coarse,
    })
}

/// "bench fanout: 2,000 subscribers × 200 messages of 64 B" and the like.
fn title_of(r: &Value) -> String {
    let n = |k: &str| r[k].as_u64().map(thousands).unwrap_or_else(|| "?".into());
    match r["bench"].as_str() {
        Some("fanout") => format!(
            "bench fanout: {} subscribers × {} messages of {} B{}",
            n("subscribers"),
            n("messages"),
            n("size_bytes"),
            r["rate"]
                .as_f64()
                .map(|x| format!(", {x}/s"))
                .unwrap_or_default()
        ),
        Some(b) => format!("bench {b}: {} connections", n("requested")),
        None => "bench".into(),
    }
}

/// `12,345`.
fn thousands(v: u64) -> String {
    super::report::count(v).replace(' ', ",")
}

/// Render and write the SVG (creating its directory).
pub fn write(path: &Path, fig: &Figure) -> anyhow::Result<()> {
    let svg = render(fig)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    std::fs::write(path, svg).with_context(|| format!("write {}", path.display()))?;
    note(format!("plot: wrote {}", path.display()));
    Ok(())
}

/// The figure without its legend: title and the two panels.
const SIZE: (u32, u32) = (1200, 480);
/// The legend under the panels: this many runs a row, each row this high.
const LEGEND_COLUMNS: usize = 2;
const LEGEND_ROW: u32 = 24;
/// Tableau 10's first colours: told apart by most eyes, and in print.
const COLOURS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];
const FONT: &str = "sans-serif";
/// At most this many steps on the rate panel, shared by its runs (longer runs are merged into
/// wider buckets, the same width for every run): a few runs of spiky paced deliveries on top
/// of each other are read only when their steps are wide.
const MAX_STEPS: usize = 200;

fn colour(i: usize) -> RGBColor {
    COLOURS[i % COLOURS.len()]
}

/// The figure as an SVG document.
pub fn render(fig: &Figure) -> anyhow::Result<String> {
    let mut svg = String::new();
    {
        // Under the panels, not over the curves: a legend inside a CDF panel hides a tail.
        let legend_h = LEGEND_ROW * fig.runs.len().div_ceil(LEGEND_COLUMNS) as u32 + 12;
        let size = (SIZE.0, SIZE.1 + legend_h);
        let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let (panels, legend_area) = root.split_vertically(SIZE.1);
        let panels = panels.titled(&fig.title, (FONT, 22)).map_err(plot_err)?;
        let (left, right) = panels.split_horizontally(SIZE.0 / 2);
        latency_panel(&left, fig).map_err(plot_err)?;
        rate_panel(&right, fig).map_err(plot_err)?;
        legend(&legend_area, fig).map_err(plot_err)?;
        root.present().map_err(plot_err)?;
    }
    Ok(svg)
}

/// plotters' errors borrow nothing but are not all `Send + Sync` over every backend.
fn plot_err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("plot: {e}")
}

type Area<'a> = DrawingArea<SVGBackend<'a>, plotters::coord::Shift>;
type DrawResult = Result<(), DrawingAreaErrorKind<std::io::Error>>;

fn latency_panel(area: &Area<'_>, fig: &Figure) -> DrawResult {
    let xs = || fig.runs.iter().flat_map(|r| r.cdf.iter().map(|p| p[0]));
    let lo = xs().filter(|x| *x > 0.0).fold(f64::INFINITY, f64::min);
    let hi = xs().fold(0.0, f64::max);
    let (lo, hi) = if lo.is_finite() && hi > 0.0 {
        let lo = decade_below(lo);
        (lo, decade_above(hi).max(lo * 10.0))
    } else {
        (0.1, 1000.0)
    };
    let mut chart = ChartBuilder::on(area)
        .caption(&fig.latency, (FONT, 17))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(60)
        // A hair wider than the decades, so that rounding keeps both ends' labels.
        .build_cartesian_2d((lo * 0.999..hi * 1.001).log_scale(), 0.0..1.0)?;
    chart
        .configure_mesh()
        .x_desc("ms (log scale)")
        .y_desc("fraction of samples at or below")
        .x_label_formatter(&|v| ms_label(*v))
        .y_label_formatter(&|v| format!("{:.0} %", v * 100.0))
        .y_labels(11)
        .label_style((FONT, 13))
        .axis_desc_style((FONT, 14))
        .light_line_style(RGBColor(240, 240, 240))
        .draw()?;
    for (f, name) in [(0.5, "p50"), (0.99, "p99")] {
        let guide = RGBColor(150, 150, 150).stroke_width(1);
        chart.draw_series(DashedLineSeries::new([(lo, f), (hi, f)], 4, 4, guide))?;
        chart.draw_series(std::iter::once(Text::new(
            name,
            (lo * 1.1, f - 0.015),
            (FONT, 12).into_font().color(&RGBColor(110, 110, 110)),
        )))?;
    }
    for (i, run) in fig.runs.iter().enumerate() {
        let c = colour(i);
        // From 0 at the first point (a curve of percentiles only starts at its p50).
        let start = run
            .cdf
            .first()
            .filter(|_| !run.coarse)
            .map(|p| (p[0].max(lo), 0.0));
        let line = start
            .into_iter()
            .chain(run.cdf.iter().map(|p| (p[0].max(lo), p[1])));
        chart.draw_series(LineSeries::new(line, c.stroke_width(2)))?;
        let marks = [(run.p50_ms, 0.5), (run.p99_ms, 0.99)];
        chart.draw_series(
            marks
                .into_iter()
                .filter(|(x, _)| *x > 0.0)
                .map(|(x, y)| Circle::new((x, y), 4, c.filled())),
        )?;
    }
    Ok(())
}

fn rate_panel(area: &Area<'_>, fig: &Figure) -> DrawResult {
    let with_rates = fig.runs.iter().filter_map(|r| r.rates.as_ref());
    let longest = with_rates
        .clone()
        .map(|r| r.bucket_ms * r.counts.len() as f64)
        .fold(0.0, f64::max);
    let finest = with_rates
        .map(|r| r.bucket_ms)
        .fold(f64::INFINITY, f64::min);
    let budget = (MAX_STEPS / fig.runs.len().max(1)).max(25);
    // The step: whole buckets, so that the longest run has at most `budget` steps.
    let step_ms = finest * (longest / finest / budget as f64).ceil().max(1.0);
    let steps: Vec<(usize, Vec<(f64, f64)>)> = fig
        .runs
        .iter()
        .enumerate()
        .filter_map(|(i, r)| Some((i, steps(r.rates.as_ref()?, step_ms))))
        .filter(|(_, s)| !s.is_empty())
        .collect();
    let t_max = steps
        .iter()
        .flat_map(|(_, s)| s.last().map(|p| p.0))
        .fold(0.0, f64::max);
    let r_max = steps
        .iter()
        .flat_map(|(_, s)| s.iter().map(|p| p.1))
        .fold(0.0, f64::max);
    let caption = if steps.is_empty() {
        fig.rate.clone()
    } else {
        format!("{} ({} ms steps)", fig.rate, tick(step_ms))
    };
    let mut chart = ChartBuilder::on(area)
        .caption(caption, (FONT, 17))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..nice_ceiling(t_max), 0.0..nice_ceiling(r_max * 1.05))?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc("per second")
        .y_label_formatter(&|v| si(*v))
        .x_label_formatter(&|v| tick(*v))
        .label_style((FONT, 13))
        .axis_desc_style((FONT, 14))
        .light_line_style(RGBColor(240, 240, 240))
        .draw()?;
    if steps.is_empty() {
        let (w, h) = area.dim_in_pixel();
        area.draw(&Text::new(
            "no time series in these reports",
            (w as i32 / 2 - 110, h as i32 / 2),
            (FONT, 15).into_font().color(&RGBColor(110, 110, 110)),
        ))?;
        return Ok(());
    }
    for (i, s) in steps {
        chart.draw_series(LineSeries::new(s, colour(i).stroke_width(2)))?;
    }
    Ok(())
}

/// One entry per run, in columns under the panels: its colour, label, p50 and p99.
fn legend(area: &Area<'_>, fig: &Figure) -> DrawResult {
    let column = (SIZE.0 as usize / LEGEND_COLUMNS) as i32;
    for (i, run) in fig.runs.iter().enumerate() {
        let x = 80 + (i % LEGEND_COLUMNS) as i32 * column;
        let y = 14 + (i / LEGEND_COLUMNS) as i32 * LEGEND_ROW as i32;
        let c = colour(i);
        area.draw(&PathElement::new([(x, y), (x + 28, y)], c.stroke_width(4)))?;
        let text = format!(
            "{}: p50 {} ms, p99 {} ms{}",
            run.label,
            super::report::ms(run.p50_ms),
            super::report::ms(run.p99_ms),
            if run.coarse {
                " (percentiles only)"
            } else {
                ""
            }
        );
        let style = (FONT, 15).into_font().color(&BLACK);
        let style = style.pos(Pos::new(HPos::Left, VPos::Center));
        area.draw(&Text::new(text, (x + 38, y), style))?;
    }
    Ok(())
}

/// The rate as a step line: `(seconds, per second)` at both ends of every (merged) bucket.
fn steps(r: &Rates, step_ms: f64) -> Vec<(f64, f64)> {
    let k = ((step_ms / r.bucket_ms).round() as usize).max(1);
    let width = r.bucket_ms * k as f64 / 1000.0;
    let mut out = Vec::with_capacity(2 * r.counts.len().div_ceil(k));
    for (i, chunk) in r.counts.chunks(k).enumerate() {
        let rate = chunk.iter().sum::<u64>() as f64 / width;
        let t = i as f64 * width;
        out.push((t, rate));
        out.push((t + width, rate));
    }
    out
}

fn decade_below(v: f64) -> f64 {
    10f64.powf(v.log10().floor())
}

fn decade_above(v: f64) -> f64 {
    10f64.powf(v.log10().ceil())
}

/// The next 1, 2 or 5 × 10^k at or above `v` (an axis end).
fn nice_ceiling(v: f64) -> f64 {
    if v <= 0.0 {
        return 1.0;
    }
    let d = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * d)
        .find(|x| *x >= v)
        .unwrap_or(10.0 * d)
}

/// Tick labels on the log axis: `0.01`, `0.1`, `1`, `10`, `100`, `1000`.
fn ms_label(v: f64) -> String {
    if v >= 1.0 {
        format!("{v:.0}")
    } else {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').to_owned()
    }
}

/// A linear axis' tick: `0`, `0.2`, `1.5`, `12` (no binary noise like `0.30000000000000004`).
fn tick(v: f64) -> String {
    let s = format!("{v:.2}");
    s.trim_end_matches('0').trim_end_matches('.').to_owned()
}

/// `950`, `12k`, `1.5M`.
fn si(v: f64) -> String {
    let a = v.abs();
    let (x, unit) = if a >= 1e6 {
        (v / 1e6, "M")
    } else if a >= 1e3 {
        (v / 1e3, "k")
    } else {
        (v, "")
    };
    if x.fract().abs() < 1e-9 {
        format!("{x:.0}{unit}")
    } else {
        format!("{x:.1}{unit}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::report::{Histogram, Timeline};
    use std::time::Duration;

    /// A fan-out report as `--json` prints it, with a known distribution and rate: latency
    /// 1..=`top` ms, one sample each; 10 deliveries per 100 ms for `secs` seconds.
    fn report(target: &str, top: u64, secs: u64) -> Value {
        let h = Histogram::default();
        for ms in 1..=top {
            h.record(ms * 1000);
        }
        let t = Timeline::new(Duration::from_millis(100), Duration::from_secs(60));
        t.start(1);
        for i in 0..secs * 10 {
            t.add(1 + i * 100_000, 10);
        }
        serde_json::json!({
            "bench": "fanout", "target": target, "subscribers": 2000, "messages": 200,
            "size_bytes": 64, "rate": null, "latency": h.summary_ms(),
            "latency_cdf": h.cdf_ms(), "deliveries_over_time": t.rates(),
        })
    }

    fn texts(doc: &roxmltree::Document<'_>) -> Vec<String> {
        doc.descendants()
            .filter(|n| n.has_tag_name("text"))
            .map(|n| n.text().unwrap_or_default().trim().to_owned())
            .collect()
    }

    #[test]
    fn two_runs_give_a_well_formed_svg_with_both_series_in_both_panels() {
        let fig = figure(
            vec![
                ("livepush".into(), report("livepush", 100, 2)),
                ("ws".into(), report("ws", 1000, 5)),
            ],
            None,
        )
        .unwrap();
        let svg = render(&fig).unwrap();
        let doc = roxmltree::Document::parse(&svg).expect("well-formed SVG");
        assert!(doc.root_element().has_tag_name("svg"));
        let texts = texts(&doc);
        let has = |s: &str| texts.iter().any(|t| t == s);
        assert!(
            has("bench fanout: 2,000 subscribers × 200 messages of 64 B"),
            "{texts:?}"
        );
        // The percentiles in the legend: 1..=100 ms → p50 50, p99 99 (bucket middles).
        assert!(has("livepush: p50 50.0 ms, p99 99.1 ms"), "{texts:?}");
        assert!(
            texts.iter().any(|t| t == "ws: p50 501 ms, p99 989 ms"),
            "{texts:?}"
        );
        assert!(has("ms (log scale)") && has("1000"), "log axis: {texts:?}");
        assert!(
            !has("10000"),
            "the axis ends at the decade above the max: {texts:?}"
        );
        // Per run: a CDF line, and a rate line; the legend's samples are paths too.
        let lines: Vec<_> = doc
            .descendants()
            .filter(|n| n.has_tag_name("polyline"))
            .collect();
        let blue = lines
            .iter()
            .filter(|n| n.attribute("stroke") == Some("#1F77B4"))
            .count();
        let orange = lines
            .iter()
            .filter(|n| n.attribute("stroke") == Some("#FF7F0E"))
            .count();
        assert_eq!((blue, orange), (3, 3), "CDF + rate + legend sample each");
        // The rate line of `ws`: 5 s of 100 deliveries/s, as steps (2 points per bucket), flat.
        let points = |n: &roxmltree::Node<'_, '_>| -> Vec<(String, String)> {
            let p = n.attribute("points").unwrap_or_default();
            p.split_whitespace()
                .filter_map(|xy| xy.split_once(','))
                .map(|(x, y)| (x.to_owned(), y.to_owned()))
                .collect()
        };
        let mut sizes: Vec<_> = lines
            .iter()
            .filter(|n| n.attribute("stroke") == Some("#FF7F0E"))
            .map(points)
            .collect();
        sizes.sort_by_key(Vec::len);
        let lens: Vec<_> = sizes.iter().map(Vec::len).collect();
        assert_eq!(&lens[..2], &[2, 100], "{lens:?}");
        assert!(sizes[1].iter().all(|p| p.1 == sizes[1][0].1), "flat rate");
        // p50 and p99 dots, two per run.
        let dots = doc
            .descendants()
            .filter(|n| n.has_tag_name("circle"))
            .count();
        assert_eq!(dots, 4);
    }

    #[test]
    fn a_report_without_the_distribution_is_drawn_from_its_percentiles() {
        let mut old = report("nchan", 100, 1);
        let o = old.as_object_mut().unwrap();
        o.remove("latency_cdf");
        o.remove("deliveries_over_time");
        let fig = figure(vec![("nchan".into(), old)], Some("t".into())).unwrap();
        let run = &fig.runs[0];
        assert!(run.coarse && run.rates.is_none());
        assert_eq!(run.cdf.len(), 5);
        assert_eq!(run.cdf[4], [100.0, 1.0]);
        let svg = render(&fig).unwrap();
        let doc = roxmltree::Document::parse(&svg).unwrap();
        let texts = texts(&doc);
        assert!(texts.iter().any(|t| t.ends_with("(percentiles only)")));
        assert!(texts.iter().any(|t| t == "no time series in these reports"));
    }

    #[test]
    fn reports_of_other_benches_are_refused() {
        let resume = serde_json::json!({"bench": "resume"});
        assert!(figure(vec![("r".into(), resume)], None).is_err());
        let mixed = vec![
            ("a".into(), report("livepush", 10, 1)),
            ("b".into(), serde_json::json!({"bench": "connections"})),
        ];
        assert!(figure(mixed, None).is_err());
    }

    #[test]
    fn axis_helpers() {
        assert_eq!((decade_below(0.35), decade_above(0.35)), (0.1, 1.0));
        assert_eq!((decade_below(1.0), decade_above(1.0)), (1.0, 1.0));
        assert_eq!(decade_above(1.5), 10.0);
        assert_eq!(nice_ceiling(3.2), 5.0);
        assert_eq!(nice_ceiling(0.0), 1.0);
        assert_eq!(nice_ceiling(1200.0), 2000.0);
        assert_eq!(ms_label(0.1), "0.1");
        assert_eq!(ms_label(100.0), "100");
        assert_eq!(si(1_500_000.0), "1.5M");
        assert_eq!(si(12_000.0), "12k");
        assert_eq!(si(950.0), "950");
        assert_eq!(tick(0.1 + 0.2), "0.3");
        assert_eq!(tick(2.0), "2");
        assert_eq!(tick(0.0), "0");
        let r = Rates {
            bucket_ms: 10.0,
            counts: vec![1, 2, 3, 4, 5],
            late: 0,
        };
        assert_eq!(
            steps(&r, 20.0),
            [
                (0.0, 150.0),
                (0.02, 150.0),
                (0.02, 350.0),
                (0.04, 350.0),
                (0.04, 250.0),
                (0.06, 250.0)
            ]
        );
    }
}
