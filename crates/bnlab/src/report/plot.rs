//! Line plots and band panels drawn with `plotters` into SVG, and SVG rasterised into PNG with
//! `resvg`.

use std::fmt::Display;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use plotters::coord::Shift;
use plotters::prelude::*;
use resvg::{tiny_skia, usvg};

use super::ReportError;

/// The font file used to draw text into PNGs, when present.
pub const FONT_PATH: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
/// The Debian package that provides [`FONT_PATH`].
pub const FONT_PACKAGE: &str = "fonts-dejavu-core";

/// One line on a [`LinePlot`]: a name for the legend and its `(x, y)` points, in drawing order.
///
/// Points with a non-finite coordinate are skipped.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Series {
    /// The legend entry; an empty name gets no legend entry.
    pub name: String,
    /// The `(x, y)` points, joined in this order.
    pub points: Vec<(f64, f64)>,
}

impl Series {
    /// A series from a name and its points.
    pub fn new(name: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Series {
            name: name.into(),
            points,
        }
    }
}

/// One panel of [`BandPanels`]: a middle line and a shaded band between a lower and an upper
/// line, over common steps, e.g. the 15th, 50th and 85th percentiles of a sigmoid's input over
/// training (the paper's Figure 1b,c).
///
/// The four vectors are read up to the shortest one's length; a step where any value is
/// non-finite is skipped.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Band {
    /// The panel's title.
    pub name: String,
    /// The x values (e.g. training steps).
    pub steps: Vec<f64>,
    /// The band's lower edge at each step.
    pub lower: Vec<f64>,
    /// The middle line at each step.
    pub middle: Vec<f64>,
    /// The band's upper edge at each step.
    pub upper: Vec<f64>,
}

/// A plot's title and its axes' labels.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PlotLabels<'a> {
    /// The title above the plot; empty for none.
    pub title: &'a str,
    /// The x axis' label.
    pub x: &'a str,
    /// The y axis' label.
    pub y: &'a str,
}

impl<'a> PlotLabels<'a> {
    /// The title `title`, the x axis labelled `x`, the y axis `y`.
    pub const fn new(title: &'a str, x: &'a str, y: &'a str) -> Self {
        PlotLabels { title, x, y }
    }
}

/// A line plot with one line per [`Series`], drawn ~800×500 px by [`line_plot_svg`].
#[derive(Debug, Clone, Copy)]
pub struct LinePlot<'a> {
    /// The title above the plot (empty for none) and the axes' labels.
    pub labels: PlotLabels<'a>,
    /// The lines, drawn in distinct colours in this order.
    pub series: &'a [Series],
    /// A fixed y range `(low, high)`; lines are clipped to it. `None` fits the data. A range that
    /// is not finite and increasing is ignored.
    pub y_range: Option<(f64, f64)>,
}

/// Panels side by side, one per [`Band`], drawn by [`band_panels_svg`].
#[derive(Debug, Clone, Copy)]
pub struct BandPanels<'a> {
    /// The title above all panels (empty for none), each panel's x axis label and the y axis
    /// label (on the first panel only when `shared_y`).
    pub labels: PlotLabels<'a>,
    /// One panel per band, left to right.
    pub panels: &'a [Band],
    /// Whether all panels use one y range (so that they can be compared by eye).
    pub shared_y: bool,
}

/// Size of a line plot in pixels.
const LINE_SIZE: (u32, u32) = (800, 500);
/// Size of one band panel in pixels.
const PANEL_SIZE: (u32, u32) = (440, 460);
/// More points than this per line are thinned (keeping each bucket's extremes) before drawing:
/// the figure is under 1000 px wide, and the SVG stays small.
const MAX_POINTS: usize = 2000;
/// Values beyond this magnitude are treated like non-finite ones (they break tick placement).
const MAX_ABS: f64 = 1e300;

/// `plotters` writes `font-size = size / 1.24` into SVG; sizes here are in SVG pixels.
const PT_PER_PX: f64 = 1.24;
const TITLE_PX: f64 = 18.0;
const PANEL_TITLE_PX: f64 = 15.0;
const AXIS_DESC_PX: f64 = 14.0;
const TICK_PX: f64 = 12.0;
const LEGEND_PX: f64 = 13.0;

/// Tableau's ten colours: distinct, and familiar from papers' figures.
const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];
const GRID: RGBColor = RGBColor(225, 225, 225);
const AXIS: RGBColor = RGBColor(40, 40, 40);

fn font(px: f64) -> TextStyle<'static> {
    ("sans-serif", px * PT_PER_PX).into_font().color(&AXIS)
}

fn plot_err<E: Display>(title: &str) -> impl Fn(E) -> ReportError + '_ {
    move |e| ReportError::Plot {
        title: title.to_string(),
        message: e.to_string(),
    }
}

fn usable(v: f64) -> bool {
    v.is_finite() && v.abs() <= MAX_ABS
}

/// The finite minimum and maximum of `values`, if any.
fn extent(values: impl IntoIterator<Item = f64>) -> Option<(f64, f64)> {
    values
        .into_iter()
        .filter(|v| usable(*v))
        .fold(None, |acc, v| match acc {
            None => Some((v, v)),
            Some((lo, hi)) => Some((lo.min(v), hi.max(v))),
        })
}

/// An axis range from a data extent: `pad` of the span added on each side, a degenerate
/// (empty or all-equal) extent widened so that the axis has a length.
fn axis_range(extent: Option<(f64, f64)>, pad: f64) -> (f64, f64) {
    let Some((lo, hi)) = extent else {
        return (0.0, 1.0);
    };
    let scale = lo.abs().max(hi.abs());
    // `hi * pad - lo * pad` cannot overflow, unlike `(hi - lo) * pad`.
    let half_span = hi * 0.5 - lo * 0.5;
    if half_span > scale * 1e-12 && half_span > 1e-300 {
        let p = hi * pad - lo * pad;
        (lo - p, hi + p)
    } else {
        let mid = lo * 0.5 + hi * 0.5;
        let p = if mid.abs() > 1e-12 { mid.abs() * 0.1 } else { 1.0 };
        (mid - p, mid + p)
    }
}

/// `ys` if it is a usable range, else `None`.
fn fixed_range(ys: Option<(f64, f64)>) -> Option<(f64, f64)> {
    ys.filter(|&(lo, hi)| usable(lo) && usable(hi) && lo < hi)
}

/// Formats a tick value short and without float noise; `span` is the axis' length, below whose
/// billionth a value counts as zero.
fn fmt_tick(v: f64, span: f64) -> String {
    if v == 0.0 || v.abs() < span.abs() * 1e-9 {
        return "0".to_string();
    }
    let a = v.abs();
    if !(1e-4..1e6).contains(&a) {
        let s = format!("{v:.2e}");
        match s.split_once('e') {
            Some((mantissa, exp)) => {
                let m = mantissa.trim_end_matches('0').trim_end_matches('.');
                format!("{m}e{exp}")
            }
            None => s,
        }
    } else {
        // Six significant digits at most, trailing zeros trimmed.
        let decimals = (5 - a.log10().floor() as i32).clamp(0, 10) as usize;
        let s = format!("{v:.decimals$}");
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s
        }
    }
}

/// Thins a long line to about `max` points by keeping, per bucket of consecutive points, the
/// lowest and highest (in their order), plus the first and last point.
fn decimate(points: Vec<(f64, f64)>, max: usize) -> Vec<(f64, f64)> {
    let n = points.len();
    if n <= max || max < 4 {
        return points;
    }
    let buckets = (max - 2) / 2;
    let mut out = Vec::with_capacity(max);
    out.push(points[0]);
    for b in 0..buckets {
        let start = b * n / buckets;
        let end = ((b + 1) * n / buckets).max(start + 1).min(n);
        let chunk = &points[start..end];
        let (mut imin, mut imax) = (0, 0);
        for (i, p) in chunk.iter().enumerate() {
            if p.1 < chunk[imin].1 {
                imin = i;
            }
            if p.1 > chunk[imax].1 {
                imax = i;
            }
        }
        let (first, second) = if imin <= imax { (imin, imax) } else { (imax, imin) };
        out.push(chunk[first]);
        if second != first {
            out.push(chunk[second]);
        }
    }
    out.push(points[n - 1]);
    out.dedup();
    out
}

/// Clips segment `a`–`b` to the rectangle `xs` × `ys` (Liang–Barsky).
fn clip_segment(a: (f64, f64), b: (f64, f64), xs: (f64, f64), ys: (f64, f64)) -> Option<((f64, f64), (f64, f64))> {
    let (dx, dy) = (b.0 - a.0, b.1 - a.1);
    let (mut t0, mut t1) = (0.0f64, 1.0f64);
    for (p, q) in [(-dx, a.0 - xs.0), (dx, xs.1 - a.0), (-dy, a.1 - ys.0), (dy, ys.1 - a.1)] {
        if p == 0.0 {
            if q < 0.0 {
                return None;
            }
        } else {
            let r = q / p;
            if p < 0.0 {
                t0 = t0.max(r);
            } else {
                t1 = t1.min(r);
            }
        }
    }
    if t0 > t1 {
        return None;
    }
    let at = |t: f64| {
        if t == 0.0 {
            a
        } else if t == 1.0 {
            b
        } else {
            (a.0 + t * dx, a.1 + t * dy)
        }
    };
    Some((at(t0), at(t1)))
}

/// Splits a line into the pieces that lie inside `xs` × `ys`.
fn clip_polyline(points: &[(f64, f64)], xs: (f64, f64), ys: (f64, f64)) -> Vec<Vec<(f64, f64)>> {
    let inside = |p: &(f64, f64)| p.0 >= xs.0 && p.0 <= xs.1 && p.1 >= ys.0 && p.1 <= ys.1;
    if points.len() == 1 {
        return if inside(&points[0]) {
            vec![points.to_vec()]
        } else {
            Vec::new()
        };
    }
    let mut pieces = Vec::new();
    let mut current: Vec<(f64, f64)> = Vec::new();
    for w in points.windows(2) {
        match clip_segment(w[0], w[1], xs, ys) {
            Some((a, b)) => {
                if current.last() != Some(&a) {
                    if !current.is_empty() {
                        pieces.push(std::mem::take(&mut current));
                    }
                    current.push(a);
                }
                current.push(b);
            }
            None => {
                if !current.is_empty() {
                    pieces.push(std::mem::take(&mut current));
                }
            }
        }
    }
    if !current.is_empty() {
        pieces.push(current);
    }
    pieces
}

/// Where the legend goes, and whether the y range needs headroom above the data to keep the
/// legend off the lines.
fn place_legend(
    lines: &[Vec<(f64, f64)>],
    xs: (f64, f64),
    ys: (f64, f64),
    legend_frac: (f64, f64),
) -> (SeriesLabelPosition, bool) {
    use SeriesLabelPosition::*;
    let (fw, fh) = (legend_frac.0.min(1.0), legend_frac.1.min(1.0));
    // Corner boxes in normalised coordinates (0..1, y up).
    let corners = [
        (UpperRight, (1.0 - fw, 1.0), (1.0 - fh, 1.0)),
        (UpperLeft, (0.0, fw), (1.0 - fh, 1.0)),
        (LowerRight, (1.0 - fw, 1.0), (0.0, fh)),
        (LowerLeft, (0.0, fw), (0.0, fh)),
    ];
    let norm = |p: (f64, f64)| ((p.0 - xs.0) / (xs.1 - xs.0), (p.1 - ys.0) / (ys.1 - ys.0));
    let mut hits = [0usize; 4];
    let mut count = |u: f64, v: f64| {
        for (k, (_, cu, cv)) in corners.iter().enumerate() {
            if u >= cu.0 && u <= cu.1 && v >= cv.0 && v <= cv.1 {
                hits[k] += 1;
            }
        }
    };
    for line in lines {
        if line.len() == 1 {
            let (u, v) = norm(line[0]);
            count(u, v);
        }
        for w in line.windows(2) {
            let (a, b) = (norm(w[0]), norm(w[1]));
            let len = ((b.0 - a.0).powi(2) + (b.1 - a.1).powi(2)).sqrt();
            let steps = (len * 100.0).ceil().clamp(1.0, 100.0) as usize;
            for s in 0..=steps {
                let t = s as f64 / steps as f64;
                count(a.0 + t * (b.0 - a.0), a.1 + t * (b.1 - a.1));
            }
        }
    }
    let best = (0..4).min_by_key(|&k| hits[k]).unwrap_or(0);
    let crowded = hits[best] > 0;
    let position = corners.into_iter().nth(best).map_or(UpperRight, |c| c.0);
    (position, crowded)
}

/// A legend's size as a fraction of the plotting area, the way `plotters` lays it out (text
/// width estimated at 0.7 em per byte, 30 px for the swatch, 10 px margins, 5 px off the edge).
fn legend_fraction(names: &[&str], area_px: (u32, u32)) -> (f64, f64) {
    let longest = names.iter().map(|n| n.len()).max().unwrap_or(0) as f64;
    let w = longest * 0.7 * LEGEND_PX + 30.0 + 20.0 + 10.0;
    let h = names.len() as f64 * LEGEND_PX * 1.3 + 20.0 + 10.0;
    (w / f64::from(area_px.0.max(1)), h / f64::from(area_px.1.max(1)))
}

/// Draws `plot` as an SVG document of about 800×500 px: title, axes with labels and ticks, a
/// light grid, one coloured line per series (single points as dots) and a legend in the corner
/// that the lines leave free (with headroom added above the data if none is free and the y
/// range is not fixed).
pub fn line_plot_svg(plot: &LinePlot) -> Result<String, ReportError> {
    let err = plot_err(plot.labels.title);
    // Usable points per series, thinned.
    let lines: Vec<Vec<(f64, f64)>> = plot
        .series
        .iter()
        .map(|s| {
            let pts = s
                .points
                .iter()
                .copied()
                .filter(|&(x, y)| usable(x) && usable(y))
                .collect();
            decimate(pts, MAX_POINTS)
        })
        .collect();
    let all = || lines.iter().flatten();
    let has_data = all().next().is_some();
    let xs = axis_range(extent(all().map(|p| p.0)), 0.0);
    let fixed_y = fixed_range(plot.y_range);
    let mut ys = fixed_y.unwrap_or_else(|| axis_range(extent(all().map(|p| p.1)), 0.05));

    // Clip to the axes (only a fixed y range can leave points outside).
    let pieces: Vec<Vec<Vec<(f64, f64)>>> = lines
        .iter()
        .map(|l| match fixed_y {
            Some(_) => clip_polyline(l, xs, ys),
            None if l.is_empty() => Vec::new(),
            None => vec![l.clone()],
        })
        .collect();

    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, LINE_SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(&err)?;
        let area = titled(&root, plot.labels.title).map_err(&err)?;

        let (margin, margin_right, x_area, y_area) = (12u32, 28u32, 50u32, 78u32);
        let (aw, ah) = area.dim_in_pixel();
        let plot_px = (
            aw.saturating_sub(margin + margin_right + y_area),
            ah.saturating_sub(2 * margin + x_area),
        );
        let labelled: Vec<(usize, &Series)> = plot
            .series
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.name.is_empty())
            .collect();
        let names: Vec<&str> = labelled.iter().map(|(_, s)| s.name.as_str()).collect();
        let frac = legend_fraction(&names, plot_px);
        let flat: Vec<Vec<(f64, f64)>> = pieces.iter().flatten().cloned().collect();
        let (mut position, crowded) = place_legend(&flat, xs, ys, frac);
        if crowded && fixed_y.is_none() && !names.is_empty() && frac.1 < 0.6 {
            ys.1 = ys.0 + (ys.1 - ys.0) / (1.0 - frac.1);
            position = SeriesLabelPosition::UpperRight;
        }

        let mut chart = ChartBuilder::on(&area)
            .margin(margin)
            .margin_right(margin_right)
            .x_label_area_size(x_area)
            .y_label_area_size(y_area)
            .build_cartesian_2d(xs.0..xs.1, ys.0..ys.1)
            .map_err(&err)?;
        draw_mesh(&mut chart, (xs, ys), (plot.labels.x, plot.labels.y), 9).map_err(&err)?;

        for (i, (series, parts)) in plot.series.iter().zip(&pieces).enumerate() {
            let color = PALETTE[i % PALETTE.len()];
            let style = color.stroke_width(2);
            for part in parts {
                if part.len() == 1 {
                    chart
                        .draw_series(std::iter::once(Circle::new(part[0], 4, color.filled())))
                        .map_err(&err)?;
                } else {
                    chart
                        .draw_series(LineSeries::new(part.iter().copied(), style))
                        .map_err(&err)?;
                }
            }
            if !series.name.is_empty() {
                // An empty series still gets its legend entry, so that the legend lists them all.
                chart
                    .draw_series(std::iter::empty::<Circle<(f64, f64), i32>>())
                    .map_err(&err)?
                    .label(series.name.as_str())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 22, y)], color.stroke_width(3)));
            }
        }
        if !has_data {
            no_data(&chart, xs, ys).map_err(&err)?;
        }
        if !names.is_empty() {
            chart
                .configure_series_labels()
                .position(position)
                .background_style(WHITE.mix(0.9))
                .border_style(GRID)
                .label_font(font(LEGEND_PX))
                .draw()
                .map_err(&err)?;
        }
        root.present().map_err(&err)?;
    }
    Ok(svg)
}

/// The area under a title (the whole area for an empty title).
fn titled<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    title: &str,
) -> Result<DrawingArea<DB, Shift>, DrawingAreaErrorKind<DB::ErrorType>> {
    if title.trim().is_empty() {
        Ok(root.clone())
    } else {
        root.titled(title, font(TITLE_PX))
    }
}

/// Draws a chart's axes described `descs` (x, y), about `x_labels` x ticks and 8 y ticks
/// (labels rounded to the spans of the ranges `xs`, `ys`) and the grid.
fn draw_mesh<DB: DrawingBackend>(
    chart: &mut ChartContext<
        DB,
        Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
    >,
    (xs, ys): ((f64, f64), (f64, f64)),
    (x_desc, y_desc): (&str, &str),
    x_labels: usize,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let (x_span, y_span) = (xs.1 - xs.0, ys.1 - ys.0);
    let x_fmt = move |v: &f64| fmt_tick(*v, x_span);
    let y_fmt = move |v: &f64| fmt_tick(*v, y_span);
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .x_labels(x_labels)
        .y_labels(8)
        .x_label_formatter(&x_fmt)
        .y_label_formatter(&y_fmt)
        .label_style(font(TICK_PX))
        .axis_desc_style(font(AXIS_DESC_PX))
        .light_line_style(TRANSPARENT)
        .bold_line_style(GRID)
        .axis_style(AXIS)
        .draw()
}

/// Writes "no data" in the middle of an empty chart.
fn no_data<DB: DrawingBackend>(
    chart: &ChartContext<
        DB,
        Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
    >,
    xs: (f64, f64),
    ys: (f64, f64),
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let style = font(AXIS_DESC_PX)
        .color(&RGBColor(150, 150, 150))
        .pos(plotters::style::text_anchor::Pos::new(
            plotters::style::text_anchor::HPos::Center,
            plotters::style::text_anchor::VPos::Center,
        ));
    chart
        .plotting_area()
        .draw(&Text::new("no data", ((xs.0 + xs.1) / 2.0, (ys.0 + ys.1) / 2.0), style))
}

/// A band's usable steps: `(step, lower, middle, upper)`, thinned to about [`MAX_POINTS`].
fn band_rows(band: &Band) -> Vec<(f64, f64, f64, f64)> {
    let rows: Vec<_> = band
        .steps
        .iter()
        .zip(&band.lower)
        .zip(&band.middle)
        .zip(&band.upper)
        .map(|(((&s, &l), &m), &u)| (s, l, m, u))
        .filter(|&(s, l, m, u)| usable(s) && usable(l) && usable(m) && usable(u))
        .collect();
    if rows.len() <= MAX_POINTS {
        return rows;
    }
    let stride = rows.len().div_ceil(MAX_POINTS);
    let last = rows.len() - 1;
    rows.iter()
        .enumerate()
        .filter(|(i, _)| i % stride == 0 || *i == last)
        .map(|(_, r)| *r)
        .collect()
}

/// Draws `plot` as an SVG document with one panel per band, side by side (about 440×460 px per
/// panel): the band's name as the panel's title, the band between lower and upper shaded, its
/// edges thin, the middle line bold. With `shared_y` all panels use one y range.
pub fn band_panels_svg(plot: &BandPanels) -> Result<String, ReportError> {
    let err = plot_err(plot.labels.title);
    let rows: Vec<_> = plot.panels.iter().map(band_rows).collect();
    let y_extent = |r: &[(f64, f64, f64, f64)]| extent(r.iter().flat_map(|&(_, l, m, u)| [l, m, u]));
    let shared = axis_range(
        extent(rows.iter().filter_map(|r| y_extent(r)).flat_map(|(lo, hi)| [lo, hi])),
        0.05,
    );
    let n = plot.panels.len().max(1);
    let size = (PANEL_SIZE.0 * n as u32, PANEL_SIZE.1);

    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
        root.fill(&WHITE).map_err(&err)?;
        let area = titled(&root, plot.labels.title).map_err(&err)?;
        let cells = area.split_evenly((1, n));
        if plot.panels.is_empty() {
            let chart = ChartBuilder::on(&cells[0])
                .margin(12)
                .x_label_area_size(50)
                .y_label_area_size(72)
                .build_cartesian_2d(0.0..1.0, 0.0..1.0)
                .map_err(&err)?;
            no_data(&chart, (0.0, 1.0), (0.0, 1.0)).map_err(&err)?;
        }
        for (k, ((cell, band), rows)) in cells.iter().zip(plot.panels).zip(&rows).enumerate() {
            let color = PALETTE[k % PALETTE.len()];
            let xs = axis_range(extent(rows.iter().map(|r| r.0)), 0.0);
            let ys = if plot.shared_y {
                shared
            } else {
                axis_range(y_extent(rows), 0.05)
            };
            let mut chart = ChartBuilder::on(cell)
                .caption(&band.name, font(PANEL_TITLE_PX))
                .margin(12)
                .margin_right(20)
                .x_label_area_size(50)
                .y_label_area_size(72)
                .build_cartesian_2d(xs.0..xs.1, ys.0..ys.1)
                .map_err(&err)?;
            let y_desc = if plot.shared_y && k > 0 { "" } else { plot.labels.y };
            draw_mesh(&mut chart, (xs, ys), (plot.labels.x, y_desc), 6).map_err(&err)?;
            if rows.is_empty() {
                no_data(&chart, xs, ys).map_err(&err)?;
                continue;
            }
            if rows.len() == 1 {
                let (s, l, m, u) = rows[0];
                chart
                    .draw_series(std::iter::once(PathElement::new(
                        vec![(s, l), (s, u)],
                        color.mix(0.5).stroke_width(6),
                    )))
                    .map_err(&err)?;
                chart
                    .draw_series(std::iter::once(Circle::new((s, m), 4, color.filled())))
                    .map_err(&err)?;
                continue;
            }
            let outline: Vec<(f64, f64)> = rows
                .iter()
                .map(|r| (r.0, r.3))
                .chain(rows.iter().rev().map(|r| (r.0, r.1)))
                .collect();
            chart
                .draw_series(std::iter::once(Polygon::new(outline, color.mix(0.22).filled())))
                .map_err(&err)?;
            for edge in [
                rows.iter().map(|r| (r.0, r.1)).collect::<Vec<_>>(),
                rows.iter().map(|r| (r.0, r.3)).collect(),
            ] {
                chart
                    .draw_series(LineSeries::new(edge, color.mix(0.55).stroke_width(1)))
                    .map_err(&err)?;
            }
            chart
                .draw_series(LineSeries::new(rows.iter().map(|r| (r.0, r.2)), color.stroke_width(2)))
                .map_err(&err)?;
        }
        root.present().map_err(&err)?;
    }
    Ok(svg)
}

/// The fonts for rasterising: DejaVu Sans from [`FONT_PATH`] (and its bold face) when present,
/// else every font in the system font folders. Loaded once per process.
fn font_db() -> &'static Arc<usvg::fontdb::Database> {
    static DB: OnceLock<Arc<usvg::fontdb::Database>> = OnceLock::new();
    DB.get_or_init(|| {
        let mut db = usvg::fontdb::Database::new();
        if db.load_font_file(FONT_PATH).is_ok() {
            let bold = FONT_PATH.replace("DejaVuSans.ttf", "DejaVuSans-Bold.ttf");
            let _ = db.load_font_file(bold);
        } else {
            db.load_system_fonts();
        }
        let family = db
            .faces()
            .flat_map(|f| f.families.iter().map(|(name, _)| name.clone()))
            .find(|name| name == "DejaVu Sans")
            .or_else(|| db.faces().find_map(|f| f.families.first().map(|(n, _)| n.clone())));
        if let Some(family) = family {
            db.set_sans_serif_family(family.clone());
            db.set_serif_family(family.clone());
            db.set_monospace_family(family);
        }
        Arc::new(db)
    })
}

/// Rasterises `svg` into a PNG file at `path`, at the SVG's own size, on white.
///
/// Text is drawn with DejaVu Sans ([`FONT_PATH`], Debian package [`FONT_PACKAGE`]) or, without
/// it, any system font. With no font at all this returns [`ReportError::Render`] (and writes
/// nothing) rather than a PNG without text.
pub fn svg_to_png(svg: &str, path: &Path) -> Result<(), ReportError> {
    let render_err = |message: String| ReportError::Render {
        path: path.to_path_buf(),
        message,
    };
    let fonts = font_db();
    if fonts.is_empty() {
        return Err(render_err(format!(
            "no font found for the text: install the Debian package {FONT_PACKAGE} ({FONT_PATH})"
        )));
    }
    let options = usvg::Options {
        fontdb: Arc::clone(fonts),
        font_family: "sans-serif".to_string(),
        ..usvg::Options::default()
    };
    let tree = usvg::Tree::from_str(svg, &options).map_err(|e| render_err(format!("invalid SVG: {e}")))?;
    let size = tree.size().to_int_size();
    let mut pixmap = tiny_skia::Pixmap::new(size.width(), size.height())
        .ok_or_else(|| render_err(format!("bad image size {}x{}", size.width(), size.height())))?;
    pixmap.fill(tiny_skia::Color::WHITE);
    resvg::render(&tree, tiny_skia::Transform::default(), &mut pixmap.as_mut());
    let data = pixmap
        .encode_png()
        .map_err(|e| render_err(format!("PNG encoding failed: {e}")))?;
    std::fs::write(path, data).map_err(|e| ReportError::io("write", path, e))
}

/// Writes `svg` as `dir/stem.svg` and, rasterised, as `dir/stem.png`, creating `dir` if needed.
pub fn write_plot(dir: &Path, stem: &str, svg: &str) -> Result<(), ReportError> {
    std::fs::create_dir_all(dir).map_err(|e| ReportError::io("create folder", dir, e))?;
    let svg_path = dir.join(format!("{stem}.svg"));
    std::fs::write(&svg_path, svg).map_err(|e| ReportError::io("write", &svg_path, e))?;
    svg_to_png(svg, &dir.join(format!("{stem}.png")))
}

/// Draws `plot` ([`line_plot_svg`]), writes it into `dir` as `stem`.svg and `stem`.png
/// ([`write_plot`]) and returns the SVG (for a report page).
pub fn write_line_plot(dir: &Path, stem: &str, plot: &LinePlot) -> Result<String, ReportError> {
    let svg = line_plot_svg(plot)?;
    write_plot(dir, stem, &svg)?;
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two_series() -> Vec<Series> {
        let xs: Vec<f64> = (0..200).map(f64::from).collect();
        vec![
            Series::new(
                "Baseline",
                xs.iter().map(|&x| (x * 250.0, 0.9 - 0.5 * (-x / 40.0).exp())).collect(),
            ),
            Series::new(
                "BN <fast> & \"stable\"",
                xs.iter()
                    .map(|&x| (x * 250.0, 0.98 - 0.5 * (-x / 10.0).exp()))
                    .collect(),
            ),
        ]
    }

    fn line(series: &[Series], y_range: Option<(f64, f64)>) -> LinePlot<'_> {
        LinePlot {
            labels: PlotLabels::new("Test accuracy", "Training steps", "Accuracy"),
            series,
            y_range,
        }
    }

    fn panels(panels: &[Band], shared_y: bool) -> BandPanels<'_> {
        BandPanels {
            labels: PlotLabels::new("Sigmoid input percentiles", "Steps", "Input"),
            panels,
            shared_y,
        }
    }

    fn band(name: &str, n: usize, offset: f64) -> Band {
        let steps: Vec<f64> = (0..n).map(|i| i as f64 * 100.0).collect();
        let middle: Vec<f64> = steps.iter().map(|s| offset + (s / 2000.0).sin()).collect();
        Band {
            name: name.to_string(),
            lower: middle.iter().map(|m| m - 1.0).collect(),
            upper: middle.iter().map(|m| m + 1.2).collect(),
            middle,
            steps,
        }
    }

    /// The SVG parses as SVG (with fonts available or not).
    fn assert_valid_svg(svg: &str) {
        let options = usvg::Options::default();
        usvg::Tree::from_str(svg, &options).expect("valid SVG");
    }

    #[test]
    fn report_line_plot_has_names_and_labels() {
        let series = two_series();
        let svg = line_plot_svg(&line(&series, None)).unwrap();
        assert!(svg.starts_with("<svg"));
        assert!(svg.contains("width=\"800\"") && svg.contains("height=\"500\""));
        for text in ["Test accuracy", "Training steps", "Accuracy", "Baseline"] {
            assert!(svg.contains(text), "missing {text:?}");
        }
        // Text is escaped inside the SVG.
        assert!(svg.contains("BN &lt;fast&gt; &amp;"));
        assert!(!svg.contains("<fast>"));
        // Two colours for the two lines.
        assert!(svg.contains("#1F77B4") || svg.contains("#1f77b4"));
        assert!(svg.contains("#FF7F0E") || svg.contains("#ff7f0e"));
        assert_valid_svg(&svg);
    }

    #[test]
    fn report_band_panels_have_titles_and_bands() {
        let bands = [band("Without BN", 50, 0.0), band("With BN", 50, 0.5)];
        for shared_y in [false, true] {
            let svg = band_panels_svg(&panels(&bands, shared_y)).unwrap();
            for text in ["Sigmoid input percentiles", "Without BN", "With BN", "Steps", "Input"] {
                assert!(svg.contains(text), "missing {text:?}");
            }
            assert!(svg.contains("<polygon"), "band not shaded");
            assert!(svg.contains("width=\"880\""));
            assert_valid_svg(&svg);
        }
    }

    #[test]
    fn report_line_plot_edge_cases_do_not_panic() {
        let cases: Vec<(Vec<Series>, Option<(f64, f64)>)> = vec![
            (vec![], None),
            (vec![Series::new("empty", vec![])], None),
            (vec![Series::new("one", vec![(3.0, 4.0)])], None),
            (vec![Series::new("zero", vec![(0.0, 0.0)])], None),
            (
                vec![Series::new("flat", vec![(0.0, 2.0), (1.0, 2.0), (2.0, 2.0)])],
                None,
            ),
            (vec![Series::new("vertical", vec![(1.0, 0.0), (1.0, 5.0)])], None),
            (
                vec![Series::new(
                    "bad",
                    vec![
                        (f64::NAN, 1.0),
                        (0.0, f64::INFINITY),
                        (1.0, f64::NEG_INFINITY),
                        (f64::NAN, f64::NAN),
                    ],
                )],
                None,
            ),
            (
                vec![Series::new("mixed", vec![(0.0, 1.0), (1.0, f64::NAN), (2.0, 3.0)])],
                None,
            ),
            (vec![Series::new("huge", vec![(0.0, -1e300), (1.0, 1e300)])], None),
            (vec![Series::new("tiny", vec![(0.0, 1e-310), (1e-300, 2e-310)])], None),
            (vec![Series::new("big x", vec![(1e12, 1.0), (1e12 + 1.0, 1.0)])], None),
            (two_series(), Some((f64::NAN, 1.0))),
            (two_series(), Some((1.0, 0.0))),
            (two_series(), Some((0.5, 0.6))),
            (two_series(), Some((10.0, 20.0))),
            (vec![Series::new("", vec![(0.0, 1.0), (1.0, 0.0)])], None),
        ];
        for (series, y_range) in &cases {
            let svg = line_plot_svg(&line(series, *y_range)).unwrap_or_else(|e| panic!("{series:?} {y_range:?}: {e}"));
            assert_valid_svg(&svg);
        }
        let svg = line_plot_svg(&line(&cases[0].0, None)).unwrap();
        assert!(svg.contains("no data"));
        // An empty title and labels are fine too.
        let svg = line_plot_svg(&LinePlot {
            labels: PlotLabels::new("", "", ""),
            series: &cases[2].0,
            y_range: None,
        })
        .unwrap();
        assert_valid_svg(&svg);
    }

    #[test]
    fn report_band_edge_cases_do_not_panic() {
        let mut ragged = band("ragged", 30, 0.0);
        ragged.upper.truncate(10);
        ragged.lower[3] = f64::NAN;
        ragged.steps[5] = f64::INFINITY;
        let flat = Band {
            name: "flat".into(),
            steps: vec![0.0, 1.0, 2.0],
            lower: vec![1.0; 3],
            middle: vec![1.0; 3],
            upper: vec![1.0; 3],
        };
        let single = Band {
            name: "single".into(),
            steps: vec![5.0],
            lower: vec![-1.0],
            middle: vec![0.0],
            upper: vec![1.0],
        };
        let cases: Vec<Vec<Band>> = vec![
            vec![],
            vec![Band::default()],
            vec![ragged, flat, single],
            vec![band("long", 20_000, 0.0)],
        ];
        for panels in &cases {
            for shared_y in [false, true] {
                let svg = band_panels_svg(&BandPanels {
                    labels: PlotLabels::new("", "x", "y"),
                    panels,
                    shared_y,
                })
                .unwrap();
                assert_valid_svg(&svg);
            }
        }
    }

    #[test]
    fn report_long_series_are_thinned() {
        let points: Vec<(f64, f64)> = (0..100_000)
            .map(|i| (f64::from(i), (f64::from(i) / 50.0).sin()))
            .collect();
        let thin = decimate(points.clone(), MAX_POINTS);
        assert!(thin.len() <= MAX_POINTS + 2, "{}", thin.len());
        assert_eq!(thin.first(), points.first());
        assert_eq!(thin.last(), points.last());
        // Extremes survive.
        let max = thin.iter().map(|p| p.1).fold(f64::MIN, f64::max);
        assert!(max > 0.9999);
        let series = [Series::new("long", points)];
        let svg = line_plot_svg(&line(&series, None)).unwrap();
        assert!(svg.len() < 400_000, "SVG is {} bytes", svg.len());
    }

    #[test]
    fn report_ticks_are_short() {
        assert_eq!(fmt_tick(0.30000000000000004, 1.0), "0.3");
        assert_eq!(fmt_tick(-1.3e-17, 1.0), "0");
        assert_eq!(fmt_tick(50000.0, 1e5), "50000");
        assert_eq!(fmt_tick(2.5e-6, 1e-5), "2.5e-6");
        assert_eq!(fmt_tick(3e7, 1e8), "3e7");
        assert_eq!(fmt_tick(1.0, 2.0), "1");
        assert_eq!(fmt_tick(0.125, 1.0), "0.125");
    }

    #[test]
    fn report_clipping_keeps_lines_inside() {
        let line = [(0.0, 0.0), (1.0, 2.0), (2.0, 0.0), (3.0, 0.5)];
        let pieces = clip_polyline(&line, (0.0, 3.0), (0.0, 1.0));
        assert_eq!(pieces.len(), 2);
        for p in pieces.iter().flatten() {
            assert!(p.1 >= 0.0 && p.1 <= 1.0 + 1e-12, "{p:?}");
        }
        assert_eq!(pieces[1].last(), Some(&(3.0, 0.5)));
        assert!(clip_polyline(&[(5.0, 5.0)], (0.0, 1.0), (0.0, 1.0)).is_empty());
    }

    #[test]
    fn report_legend_avoids_lines() {
        // A line rising to the upper right leaves the upper left free.
        let rising = vec![(0.0, 0.0), (1.0, 1.0)];
        let (pos, crowded) = place_legend(&[rising], (0.0, 1.0), (0.0, 1.0), (0.3, 0.2));
        assert!(!crowded);
        assert!(matches!(pos, SeriesLabelPosition::UpperLeft));
        // Lines through every corner: crowded.
        let lines = vec![vec![(0.0, 0.0), (1.0, 1.0)], vec![(0.0, 1.0), (1.0, 0.0)]];
        let (_, crowded) = place_legend(&lines, (0.0, 1.0), (0.0, 1.0), (0.3, 0.2));
        assert!(crowded);
    }

    /// Decodes a PNG into (width, height, RGBA pixels).
    fn decode_png(path: &Path) -> (u32, u32, Vec<[u8; 4]>) {
        let decoder = png::Decoder::new(std::fs::File::open(path).unwrap());
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!(info.bit_depth, png::BitDepth::Eight);
        let channels = info.color_type.samples();
        let pixels = buf[..info.buffer_size()]
            .chunks(channels)
            .map(|c| match channels {
                4 => [c[0], c[1], c[2], c[3]],
                3 => [c[0], c[1], c[2], 255],
                _ => [c[0], c[0], c[0], 255],
            })
            .collect();
        (info.width, info.height, pixels)
    }

    fn non_white(pixels: &[[u8; 4]]) -> usize {
        pixels.iter().filter(|p| p[0] < 250 || p[1] < 250 || p[2] < 250).count()
    }

    #[test]
    fn report_png_is_written_and_not_blank() {
        if std::fs::metadata(FONT_PATH).is_err() && font_db().is_empty() {
            eprintln!("no font installed ({FONT_PACKAGE}): checking the error instead");
            let dir = tempfile::tempdir().unwrap();
            let e = write_plot(dir.path(), "x", "<svg/>").unwrap_err();
            assert!(e.to_string().contains(FONT_PACKAGE));
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let series = two_series();
        let svg = line_plot_svg(&line(&series, None)).unwrap();
        write_plot(dir.path(), "accuracy", &svg).unwrap();
        assert!(dir.path().join("accuracy.svg").is_file());
        let (w, h, pixels) = decode_png(&dir.path().join("accuracy.png"));
        assert_eq!((w, h), LINE_SIZE);
        let distinct: std::collections::HashSet<[u8; 4]> = pixels.iter().copied().collect();
        assert!(distinct.len() >= 8, "only {} colours", distinct.len());
        let frac = non_white(&pixels) as f64 / pixels.len() as f64;
        assert!(frac > 0.01 && frac < 0.6, "non-white fraction {frac}");
        // Both line colours are there.
        for c in [PALETTE[0], PALETTE[1]] {
            assert!(
                pixels.iter().any(|p| p[0] == c.0 && p[1] == c.1 && p[2] == c.2),
                "colour {c:?} missing"
            );
        }

        let bands = [band("a", 40, 0.0), band("b", 40, 1.0)];
        let svg = band_panels_svg(&panels(&bands, true)).unwrap();
        write_plot(&dir.path().join("nested"), "bands", &svg).unwrap();
        let (w, _, pixels) = decode_png(&dir.path().join("nested/bands.png"));
        assert_eq!(w, 2 * PANEL_SIZE.0);
        assert!(non_white(&pixels) > 1000);
    }

    #[test]
    fn report_png_draws_text() {
        if font_db().is_empty() {
            eprintln!("no font installed ({FONT_PACKAGE}): skipping");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("text.png");
        let svg = r##"<svg width="200" height="50" xmlns="http://www.w3.org/2000/svg"><text x="10" y="35" font-family="sans-serif" font-size="24" fill="#000">Accuracy</text></svg>"##;
        svg_to_png(svg, &path).unwrap();
        let (_, _, pixels) = decode_png(&path);
        assert!(non_white(&pixels) > 100, "text was not drawn");
    }

    #[test]
    fn report_errors_name_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let e = svg_to_png("not svg", &dir.path().join("bad.png")).unwrap_err();
        if !font_db().is_empty() {
            assert!(e.to_string().contains("bad.png"), "{e}");
        }
        let blocker = dir.path().join("file");
        std::fs::write(&blocker, "x").unwrap();
        let e = write_plot(&blocker.join("sub"), "p", "<svg/>").unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("file") && !msg.contains('\n'), "{msg}");
    }
}
