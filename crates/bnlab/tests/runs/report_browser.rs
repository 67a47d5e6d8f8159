//! Renders a report page in headless Chromium and checks that it shows: a screenshot that is not
//! blank, the inlined SVG figures in the DOM, and no console errors.
//!
//! Needs the Debian package `chromium`. Without it the test prints a note and passes, unless
//! `BNLAB_REQUIRE_BROWSER=1` is set (as in CI), when it fails. Set `BNLAB_REPORT_TEST_OUT=DIR` to
//! keep the page, the plots and the screenshot in `DIR` for a look.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common;
use bnlab::report::{band_panels_svg, line_plot_svg, write_plot, Band, BandPanels, LinePlot, Page, PlotLabels, Series};

/// How long one Chromium run may take before it is killed.
const BROWSER_TIMEOUT: Duration = Duration::from_secs(60);

/// The Chromium binary, if installed.
fn find_chromium() -> Option<PathBuf> {
    let fixed = Path::new("/usr/bin/chromium");
    if fixed.is_file() {
        return Some(fixed.to_path_buf());
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("chromium"))
            .find(|p| p.is_file())
    })
}

/// A `file://` URL for an absolute path, percent-encoding all but unreserved characters and `/`.
fn file_url(path: &Path) -> String {
    let mut url = String::from("file://");
    for b in path.to_string_lossy().bytes() {
        if b.is_ascii_alphanumeric() || b"/-_.~".contains(&b) {
            url.push(char::from(b));
        } else {
            url.push_str(&format!("%{b:02X}"));
        }
    }
    url
}

/// What a Chromium run printed.
struct Output {
    stdout: String,
    stderr: String,
}

/// Runs headless Chromium with `args` then `url`, in a fresh profile, killing it after
/// [`BROWSER_TIMEOUT`]. Output goes to files (not pipes) so that a chatty browser cannot block.
fn run_chromium(chromium: &Path, work: &Path, args: &[String], url: &str) -> Output {
    let profile = tempfile::tempdir_in(work).expect("profile dir");
    let stdout_path = work.join("chromium.stdout");
    let stderr_path = work.join("chromium.stderr");
    let mut child = Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-extensions",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout_path).unwrap())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .expect("start chromium");
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for chromium") {
            break status;
        }
        if start.elapsed() > BROWSER_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "chromium did not finish within {BROWSER_TIMEOUT:?}; stderr:\n{}",
                std::fs::read_to_string(&stderr_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let out = Output {
        stdout: std::fs::read_to_string(&stdout_path).unwrap_or_default(),
        stderr: std::fs::read_to_string(&stderr_path).unwrap_or_default(),
    };
    assert!(status.success(), "chromium failed ({status}); stderr:\n{}", out.stderr);
    out
}

/// Chromium, or `None` (with a note) when it is absent and `BNLAB_REQUIRE_BROWSER=1` is not set.
fn chromium_or_skip() -> Option<PathBuf> {
    let found = find_chromium();
    if found.is_none() {
        assert!(
            std::env::var("BNLAB_REQUIRE_BROWSER").as_deref() != Ok("1"),
            "chromium is not installed and BNLAB_REQUIRE_BROWSER=1: \
             install the Debian package `chromium` (apt-get install chromium)"
        );
        eprintln!("note: chromium not found (Debian package `chromium`); skipping the browser check");
    }
    found
}

/// The DOM of `url` once loaded; asserts that the console reported nothing. Chromium logs the
/// page's console as `INFO:CONSOLE:…`; report pages have no script, so any console line (an
/// uncaught error, a failed load) is a fault.
fn dom_without_console_errors(chromium: &Path, work: &Path, url: &str) -> String {
    let dom = run_chromium(
        chromium,
        work,
        &[
            "--dump-dom".to_string(),
            "--enable-logging=stderr".to_string(),
            "--v=0".to_string(),
        ],
        url,
    );
    for bad in [":CONSOLE", "Uncaught", "Failed to load"] {
        assert!(!dom.stderr.contains(bad), "browser reported {bad:?}:\n{}", dom.stderr);
    }
    dom.stdout
}

/// A 1200×1600 screenshot of `url` as (width, height, RGB pixels).
fn screenshot(chromium: &Path, work: &Path, shot: &Path, url: &str) -> (u32, u32, Vec<[u8; 3]>) {
    let _ = std::fs::remove_file(shot);
    run_chromium(
        chromium,
        work,
        &[
            format!("--screenshot={}", shot.display()),
            "--window-size=1200,1600".to_string(),
        ],
        url,
    );
    decode_png(shot)
}

/// Decodes a PNG into (width, height, RGB pixels).
fn decode_png(path: &Path) -> (u32, u32, Vec<[u8; 3]>) {
    let decoder = png::Decoder::new(std::fs::File::open(path).expect("screenshot written"));
    let mut reader = decoder.read_info().expect("PNG header");
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).expect("PNG data");
    assert_eq!(info.bit_depth, png::BitDepth::Eight);
    let channels = info.color_type.samples();
    let pixels = buf[..info.buffer_size()]
        .chunks(channels)
        .map(|c| {
            if channels >= 3 {
                [c[0], c[1], c[2]]
            } else {
                [c[0], c[0], c[0]]
            }
        })
        .collect();
    (info.width, info.height, pixels)
}

/// A page like an experiment's: settings, a line plot with two series, band panels with two
/// bands, and a table.
fn sample_page(plots_dir: &Path) -> Page {
    let steps: Vec<f64> = (0..=100).map(|i| f64::from(i) * 500.0).collect();
    let series = [
        Series::new(
            "Without BN",
            steps.iter().map(|&s| (s, 0.97 - 0.6 * (-s / 12_000.0).exp())).collect(),
        ),
        Series::new(
            "With BN",
            steps.iter().map(|&s| (s, 0.99 - 0.6 * (-s / 3_000.0).exp())).collect(),
        ),
    ];
    let line_svg = line_plot_svg(&LinePlot {
        labels: PlotLabels::new("MNIST test accuracy", "Training steps", "Test accuracy"),
        series: &series,
        y_range: None,
    })
    .expect("line plot");

    let band = |name: &str, drift: f64, spread: f64| {
        let middle: Vec<f64> = steps.iter().map(|&s| drift * s / 50_000.0).collect();
        Band {
            name: name.to_string(),
            steps: steps.clone(),
            lower: middle
                .iter()
                .zip(&steps)
                .map(|(m, s)| m - spread * (1.0 + s / 50_000.0))
                .collect(),
            upper: middle
                .iter()
                .zip(&steps)
                .map(|(m, s)| m + spread * (1.0 + s / 50_000.0))
                .collect(),
            middle,
        }
    };
    let bands = [band("Without BN", 1.5, 1.0), band("With BN", 0.0, 0.8)];
    let band_svg = band_panels_svg(&BandPanels {
        labels: PlotLabels::new("Sigmoid input: 15th, 50th, 85th percentiles", "Training steps", "Input"),
        panels: &bands,
        shared_y: true,
    })
    .expect("band panels");

    write_plot(plots_dir, "accuracy", &line_svg).expect("accuracy plot files");
    write_plot(plots_dir, "percentiles", &band_svg).expect("percentile plot files");

    let mut page = Page::new("Batch normalization on MNIST");
    page.paragraph("A 3-layer sigmoid network trained with and without batch normalization.")
        .settings(
            "Settings",
            &[
                ("batch size".to_string(), "60".to_string()),
                ("steps".to_string(), "50000".to_string()),
            ],
        )
        .figure("Test accuracy over training.", &line_svg)
        .figure(
            "The input of a last-layer sigmoid over training, without and with BN.",
            &band_svg,
        )
        .table(
            "Results",
            &["model".to_string(), "final accuracy".to_string()],
            &[
                vec!["Without BN".to_string(), "0.97".to_string()],
                vec!["With BN".to_string(), "0.99".to_string()],
            ],
        );
    page
}

#[test]
fn report_page_renders_in_chromium() {
    let Some(chromium) = chromium_or_skip() else { return };

    let temp = tempfile::tempdir().expect("temp dir");
    let keep = std::env::var_os("BNLAB_REPORT_TEST_OUT").map(PathBuf::from);
    let dir = keep.clone().unwrap_or_else(|| temp.path().to_path_buf());
    std::fs::create_dir_all(&dir).expect("output dir");
    let dir = dir.canonicalize().expect("absolute output dir");

    let page = sample_page(&dir);
    let html_path = dir.join("report.html");
    page.write(&html_path).expect("write report.html");
    let url = file_url(&html_path);

    // The DOM holds the two figures' SVG, the lines, the shaded bands and the table; the console
    // reports no error.
    let html = &dom_without_console_errors(&chromium, temp.path(), &url);
    assert_eq!(html.matches("<svg").count(), 2, "expected two SVG figures");
    assert!(html.contains("<polyline"), "no lines in the DOM");
    assert!(html.contains("<polygon"), "no shaded band in the DOM");
    assert!(html.contains("<table"), "no table in the DOM");
    for text in ["MNIST test accuracy", "Without BN", "With BN", "Training steps"] {
        assert!(html.contains(text), "{text:?} missing from the DOM");
    }

    // The screenshot shows a page: many colours, a fair share of non-white pixels.
    let (w, h, pixels) = screenshot(&chromium, temp.path(), &dir.join("screenshot.png"), &url);
    assert!(w >= 1000 && h >= 1000, "screenshot is {w}x{h}");
    let distinct: HashSet<[u8; 3]> = pixels.iter().copied().collect();
    assert!(distinct.len() >= 20, "screenshot has only {} colours", distinct.len());
    let non_white = pixels.iter().filter(|p| p.iter().any(|&c| c < 245)).count();
    let frac = non_white as f64 / pixels.len() as f64;
    assert!(
        (0.03..0.95).contains(&frac),
        "screenshot has {:.1}% non-white pixels",
        frac * 100.0
    );
    // The line colours of the plot (blue, orange) are on screen.
    let near = |p: &[u8; 3], c: [u8; 3]| p.iter().zip(c).all(|(&a, b)| a.abs_diff(b) <= 12);
    for colour in [[31, 119, 180], [255, 127, 14]] {
        assert!(
            pixels.iter().filter(|p| near(p, colour)).count() > 200,
            "plot colour {colour:?} not on screen"
        );
    }
    if let Some(keep) = keep {
        eprintln!("kept the page and screenshot in {}", keep.display());
    }
}

/// The page `bnlab accelerate` writes (tiny run on synthetic images) renders: its table, the
/// accuracy plot with every variant, no console errors, a screenshot that is not blank.
#[test]
fn accelerate_report_renders_in_chromium() {
    let Some(chromium) = chromium_or_skip() else { return };
    let temp = tempfile::tempdir().expect("temp dir");
    let data = common::synthetic_data(temp.path());
    let out = temp.path().join("out");
    let variants = ["baseline", "bn-baseline", "bn-x5", "bn-x5-sigmoid"];
    let args = common::accelerate_tiny_args(
        &data,
        &out,
        &["--variants", &variants.join(","), "--steps", "20", "--eval-every", "5"],
    );
    common::bnlab_ok(temp.path(), &args.iter().map(String::as_str).collect::<Vec<_>>());
    let out = out.canonicalize().expect("absolute output dir");
    let url = file_url(&out.join("report.html"));
    let html = &dom_without_console_errors(&chromium, temp.path(), &url);
    assert_eq!(html.matches("<svg").count(), 1, "expected one SVG figure");
    assert!(html.contains("<polyline"), "no lines in the DOM");
    assert_eq!(html.matches("<table").count(), 3, "Figure 3 table, runs and settings");
    for text in variants.iter().copied().chain(["steps to baseline", "Test accuracy"]) {
        assert!(html.contains(text), "{text:?} missing from the DOM");
    }
    let (_, _, pixels) = screenshot(&chromium, temp.path(), &temp.path().join("screenshot.png"), &url);
    let distinct: HashSet<[u8; 3]> = pixels.iter().copied().collect();
    assert!(distinct.len() >= 20, "screenshot has only {} colours", distinct.len());
}
