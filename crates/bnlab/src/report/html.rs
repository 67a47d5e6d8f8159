//! The self-contained HTML report page.

use std::fmt::Write as _;
use std::path::Path;

use super::ReportError;

/// One part of a page, in order.
#[derive(Debug, Clone)]
enum Block {
    Heading(String),
    Paragraph(String),
    Settings {
        heading: String,
        rows: Vec<(String, String)>,
    },
    Figure {
        caption: String,
        svg: String,
    },
    Table {
        heading: String,
        header: Vec<String>,
        rows: Vec<Vec<String>>,
    },
}

/// A builder for `report.html`: one self-contained page (inline CSS, SVG figures inlined, no
/// scripts, no external URLs) with a title and, in the order added, headings, paragraphs,
/// settings tables, figures and tables. All text is HTML-escaped.
///
/// ```
/// # use bnlab::report::Page;
/// let mut page = Page::new("MNIST: with and without batch normalization");
/// page.paragraph("Test accuracy over training.")
///     .settings("Settings", &[("steps".to_string(), "50000".to_string())]);
/// let html = page.render();
/// assert!(html.starts_with("<!DOCTYPE html>"));
/// ```
#[derive(Debug, Clone)]
pub struct Page {
    title: String,
    blocks: Vec<Block>,
}

/// The page's style: system fonts, a readable measure, bordered zebra tables, figures centred.
const CSS: &str = r#"
:root { color-scheme: light; }
* { box-sizing: border-box; }
body {
  margin: 0; background: #f6f7f9; color: #1d232b;
  font-family: system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial,
    "Noto Sans", "DejaVu Sans", sans-serif;
  font-size: 16px; line-height: 1.55;
}
main {
  max-width: 960px; margin: 0 auto; padding: 32px 40px 56px; background: #fff;
  min-height: 100vh; box-shadow: 0 0 0 1px #e3e6ea;
}
h1 { font-size: 1.75rem; line-height: 1.25; margin: 0 0 0.4em; }
h2 { font-size: 1.25rem; margin: 1.8em 0 0.6em; padding-bottom: 0.25em; border-bottom: 1px solid #e3e6ea; }
p { margin: 0.6em 0; }
figure { margin: 1.6em 0; padding: 0; text-align: center; }
figure .plot { overflow-x: auto; }
figure svg { max-width: 100%; height: auto; display: inline-block; border: 1px solid #e3e6ea; background: #fff; }
figcaption { margin-top: 0.5em; font-size: 0.92rem; color: #46505c; text-align: left; }
figcaption b { color: #1d232b; }
.table-wrap { overflow-x: auto; margin: 0.8em 0 1.2em; }
table { border-collapse: collapse; font-size: 0.92rem; min-width: 40%; }
th, td { border: 1px solid #d5d9de; padding: 0.35em 0.75em; text-align: left; vertical-align: top; }
thead th { background: #eef1f4; font-weight: 600; }
tbody tr:nth-child(even) { background: #f7f8fa; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.settings th { background: #f7f8fa; font-weight: 600; white-space: nowrap; }
table.settings tbody tr:nth-child(even) { background: transparent; }
pre.bad-svg { white-space: pre-wrap; text-align: left; color: #a33; }
"#;

/// Escapes `&`, `<`, `>`, `"` and `'` for HTML text and attribute values.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}

/// Whether a cell reads as a number (right-aligned in tables).
fn is_numeric(cell: &str) -> bool {
    let t = cell.trim().trim_end_matches('%').trim();
    !t.is_empty() && t.parse::<f64>().is_ok()
}

/// The `<svg …>…</svg>` element of an SVG document (without an XML declaration or doctype), or
/// `None` if `svg` has no SVG element.
fn svg_element(svg: &str) -> Option<&str> {
    let start = svg.find("<svg")?;
    let end = svg.rfind("</svg>")? + "</svg>".len();
    (start < end).then(|| &svg[start..end])
}

impl Page {
    /// A new, empty page; `title` is both the browser tab's title and the top heading.
    pub fn new(title: &str) -> Self {
        Page {
            title: title.to_string(),
            blocks: Vec::new(),
        }
    }

    /// Adds a section heading.
    pub fn heading(&mut self, text: &str) -> &mut Self {
        self.blocks.push(Block::Heading(text.to_string()));
        self
    }

    /// Adds a paragraph of text (escaped; blank lines start new paragraphs).
    pub fn paragraph(&mut self, text: &str) -> &mut Self {
        self.blocks.push(Block::Paragraph(text.to_string()));
        self
    }

    /// Adds a key/value table under `heading` (e.g. an experiment's settings).
    pub fn settings(&mut self, heading: &str, rows: &[(String, String)]) -> &mut Self {
        self.blocks.push(Block::Settings {
            heading: heading.to_string(),
            rows: rows.to_vec(),
        });
        self
    }

    /// Adds a figure: `svg` (e.g. from [`super::line_plot_svg`]) inlined, numbered, with
    /// `caption` under it. A string without an `<svg>` element is shown as escaped text instead.
    pub fn figure(&mut self, caption: &str, svg: &str) -> &mut Self {
        self.blocks.push(Block::Figure {
            caption: caption.to_string(),
            svg: svg.to_string(),
        });
        self
    }

    /// Adds a table under `heading` (no heading if empty); numeric cells are right-aligned.
    /// Rows shorter than the header are padded with empty cells.
    pub fn table(&mut self, heading: &str, header: &[String], rows: &[Vec<String>]) -> &mut Self {
        self.blocks.push(Block::Table {
            heading: heading.to_string(),
            header: header.to_vec(),
            rows: rows.to_vec(),
        });
        self
    }

    /// The page as one self-contained HTML document.
    pub fn render(&self) -> String {
        let mut h = String::new();
        let title = escape(&self.title);
        h.push_str("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n");
        h.push_str("<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n");
        let _ = writeln!(h, "<title>{title}</title>");
        let _ = writeln!(h, "<style>{CSS}</style>\n</head>\n<body>\n<main>");
        let _ = writeln!(h, "<h1>{title}</h1>");
        let mut figure_no = 0;
        for block in &self.blocks {
            match block {
                Block::Heading(text) => {
                    let _ = writeln!(h, "<h2>{}</h2>", escape(text));
                }
                Block::Paragraph(text) => {
                    for para in text.split("\n\n").filter(|p| !p.trim().is_empty()) {
                        let _ = writeln!(h, "<p>{}</p>", escape(para.trim()));
                    }
                }
                Block::Settings { heading, rows } => {
                    if !heading.is_empty() {
                        let _ = writeln!(h, "<h2>{}</h2>", escape(heading));
                    }
                    h.push_str("<div class=\"table-wrap\"><table class=\"settings\"><tbody>\n");
                    for (key, value) in rows {
                        let _ = writeln!(
                            h,
                            "<tr><th scope=\"row\">{}</th><td>{}</td></tr>",
                            escape(key),
                            escape(value)
                        );
                    }
                    h.push_str("</tbody></table></div>\n");
                }
                Block::Figure { caption, svg } => {
                    figure_no += 1;
                    h.push_str("<figure>\n<div class=\"plot\">");
                    match svg_element(svg) {
                        Some(element) => h.push_str(element),
                        None => {
                            let _ = write!(h, "<pre class=\"bad-svg\">{}</pre>", escape(svg));
                        }
                    }
                    let _ = writeln!(
                        h,
                        "</div>\n<figcaption><b>Figure {figure_no}.</b> {}</figcaption>\n</figure>",
                        escape(caption)
                    );
                }
                Block::Table { heading, header, rows } => {
                    if !heading.is_empty() {
                        let _ = writeln!(h, "<h2>{}</h2>", escape(heading));
                    }
                    h.push_str("<div class=\"table-wrap\"><table>\n");
                    if !header.is_empty() {
                        h.push_str("<thead><tr>");
                        for cell in header {
                            let _ = write!(h, "<th scope=\"col\">{}</th>", escape(cell));
                        }
                        h.push_str("</tr></thead>\n");
                    }
                    h.push_str("<tbody>\n");
                    for row in rows {
                        h.push_str("<tr>");
                        let width = row.len().max(header.len());
                        for i in 0..width {
                            let cell = row.get(i).map(String::as_str).unwrap_or("");
                            let class = if is_numeric(cell) { " class=\"num\"" } else { "" };
                            let _ = write!(h, "<td{class}>{}</td>", escape(cell));
                        }
                        h.push_str("</tr>\n");
                    }
                    h.push_str("</tbody></table></div>\n");
                }
            }
        }
        h.push_str("</main>\n</body>\n</html>\n");
        h
    }

    /// Writes [`Page::render`] to `path`, creating its folder if needed.
    pub fn write(&self, path: &Path) -> Result<(), ReportError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| ReportError::io("create folder", dir, e))?;
        }
        std::fs::write(path, self.render()).map_err(|e| ReportError::io("write", path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Page {
        let mut page = Page::new("Report <1> & co");
        page.paragraph("Hello <script>alert('x')</script> world\n\nSecond paragraph.")
            .heading("Results")
            .settings(
                "Settings",
                &[("learning rate".into(), "0.01".into()), ("<k>".into(), "\"v\"".into())],
            )
            .figure(
                "A <b>plot</b>",
                "<?xml version=\"1.0\"?>\n<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"10\" height=\"10\"><rect width=\"5\" height=\"5\"/></svg>\n",
            )
            .figure("broken", "no svg here <script>")
            .table(
                "Accuracy",
                &["model".into(), "steps".into()],
                &[vec!["BN".into(), "13000".into()], vec!["<i>".into()]],
            );
        page
    }

    #[test]
    fn report_html_escapes_text() {
        let html = sample().render();
        assert!(!html.contains("<script>"), "{html}");
        assert!(html.contains("&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;"));
        assert!(html.contains("<title>Report &lt;1&gt; &amp; co</title>"));
        assert!(html.contains("<th scope=\"row\">&lt;k&gt;</th><td>&quot;v&quot;</td>"));
        assert!(html.contains("A &lt;b&gt;plot&lt;/b&gt;"));
        assert!(html.contains("<td>&lt;i&gt;</td><td></td>"));
        assert!(html.contains("<td class=\"num\">13000</td>"));
        assert!(html.contains("<p>Second paragraph.</p>"));
    }

    #[test]
    fn report_html_is_self_contained() {
        let html = sample().render();
        assert!(html.starts_with("<!DOCTYPE html>"));
        assert!(html.trim_end().ends_with("</html>"));
        for bad in ["<script", "<link", " src=", " href=", "@import", "url("] {
            assert!(!html.contains(bad), "page contains {bad:?}");
        }
        // SVG inlined without its XML declaration; figures numbered.
        assert!(html.contains("<div class=\"plot\"><svg xmlns="));
        assert!(!html.contains("<?xml"));
        assert!(html.contains("<b>Figure 1.</b>") && html.contains("<b>Figure 2.</b>"));
        assert!(html.contains("<pre class=\"bad-svg\">no svg here &lt;script&gt;</pre>"));
        assert!(html.contains("<style>") && html.contains("max-width"));
    }

    #[test]
    fn report_html_write_creates_folder() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out/report.html");
        sample().write(&path).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), sample().render());
        let e = sample().write(dir.path()).unwrap_err();
        assert!(e.to_string().contains(&dir.path().display().to_string()));
    }
}
