//! Plots (SVG and PNG) and the self-contained HTML report.
