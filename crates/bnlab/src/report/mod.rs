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
    band_panels_svg, line_plot_svg, svg_to_png, write_plot, Band, BandPanels, LinePlot, Series, FONT_PACKAGE, FONT_PATH,
};

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
