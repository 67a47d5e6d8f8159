//! Plots (SVG and PNG) and the self-contained HTML report.
//!
//! Every experiment reports through the same three pieces:
//! - [`line_plot_svg`] draws a [`LinePlot`]: one line per [`Series`] (e.g. test accuracy against
//!   training steps, with and without batch normalization), with axis labels and a legend.
//! - [`band_panels_svg`] draws [`BandPanels`]: one panel per [`Band`], side by side, each a middle
//!   line with a shaded band between a lower and an upper line (e.g. the 15th, 50th and 85th
//!   percentiles of a sigmoid's input over training, the paper's Figure 1b,c).
//! - [`Page`] builds one self-contained `report.html` with settings, figures (the SVGs inlined)
//!   and tables.
//!
//! [`write_plot`] stores a figure as `stem.svg` and `stem.png`; the PNG is the same SVG rasterised
//! by [`svg_to_png`] (pure Rust, `resvg`). Text in the PNG needs a font file: the DejaVu Sans of
//! the Debian package `fonts-dejavu-core` is used when present, otherwise any font found in the
//! system font folders; with no font at all, [`svg_to_png`] returns [`ReportError::Render`]
//! rather than writing a PNG without text.
//!
//! Drawing is forgiving: non-finite values are skipped, empty inputs give empty axes, a single
//! value or all-equal values get a padded range, and nothing here panics on data.

mod html;
mod plot;

use std::path::PathBuf;

pub use html::Page;
pub use plot::{
    band_panels_svg, line_plot_svg, svg_to_png, write_line_plot, write_plot, Band, BandPanels, LinePlot, PlotLabels,
    Series, FONT_PACKAGE, FONT_PATH,
};

/// A fraction as a percentage with two decimals (`0.9123` → `91.23%`), or a dash for `None`.
pub fn percent(a: Option<f64>) -> String {
    a.map_or("–".into(), |a| format!("{:.2}%", a * 100.0))
}

/// A table as Markdown: the `header` row (the first column left-aligned, the others
/// right-aligned), then `rows`, each line ending in a newline.
pub fn markdown_table(header: &[String], rows: &[Vec<String>]) -> String {
    let mut s = format!("| {} |\n", header.join(" | "));
    s.push_str(&format!("|---|{}\n", "---:|".repeat(header.len().saturating_sub(1))));
    for r in rows {
        s.push_str(&format!("| {} |\n", r.join(" | ")));
    }
    s
}

/// Why a plot or a report could not be made or written. Each message is one line.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// Reading or writing a file or folder failed.
    #[error("cannot {action} {}: {error}", path.display())]
    Io {
        /// What was being done, e.g. "write" or "create folder".
        action: &'static str,
        /// The file or folder concerned.
        path: PathBuf,
        /// The underlying error.
        error: std::io::Error,
    },
    /// The plotting library failed to draw a figure.
    #[error("cannot draw plot {title:?}: {message}")]
    Plot {
        /// The figure's title.
        title: String,
        /// What went wrong.
        message: String,
    },
    /// Rasterising an SVG into a PNG failed.
    #[error("cannot render {}: {message}", path.display())]
    Render {
        /// The PNG that was to be written.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
}

impl ReportError {
    pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>, error: std::io::Error) -> Self {
        ReportError::Io {
            action,
            path: path.into(),
            error,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    /// A Markdown table is the header row, the alignment row (the first column left, the others
    /// right) and the rows; a percentage has two decimals, a missing one is a dash.
    #[test]
    fn markdown_table_and_percent() {
        let table = markdown_table(&strings(&["a", "b", "c"]), &[strings(&["x", "1", "2"])]);
        assert_eq!(table, "| a | b | c |\n|---|---:|---:|\n| x | 1 | 2 |\n");
        assert_eq!(percent(Some(0.91234)), "91.23%");
        assert_eq!(percent(None), "–");
    }
}
