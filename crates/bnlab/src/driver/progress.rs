//! Progress display of a training run: a bar on a terminal, plain log lines otherwise.

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use std::io::IsTerminal;

/// Progress of one training run.
pub struct Progress {
    bar: Option<ProgressBar>,
    name: String,
    quiet: bool,
}

impl Progress {
    /// A bar over `steps` steps when stderr is a terminal and `quiet` is false; log lines otherwise.
    pub fn new(name: &str, steps: u64, quiet: bool) -> Self {
        let bar = (!quiet && std::io::stderr().is_terminal()).then(|| {
            let bar = ProgressBar::new(steps);
            let style = ProgressStyle::with_template("{prefix:>10} [{bar:30}] {pos}/{len} {per_sec} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> ");
            bar.set_style(style);
            bar.set_prefix(name.to_string());
            bar
        });
        Progress {
            bar,
            name: name.to_string(),
            quiet,
        }
    }

    /// As [`Progress::new`], the bar drawn as one line of `group`, so that runs training side by
    /// side each keep their own line.
    pub fn in_group(group: &MultiProgress, name: &str, steps: u64, quiet: bool) -> Self {
        let mut p = Progress::new(name, steps, quiet);
        p.bar = p.bar.map(|b| group.add(b));
        p
    }

    /// Advances to `step` (cheap; call every step).
    pub fn step(&self, step: u64) {
        if let Some(b) = &self.bar {
            b.set_position(step);
        }
    }

    /// Reports an evaluation.
    pub fn eval(&self, step: u64, steps: u64, loss: f64, acc: f64, steps_per_sec: f64) {
        let msg = format!("loss {loss:.4} acc {:.2}%", acc * 100.0);
        match &self.bar {
            Some(b) => b.set_message(msg),
            None if self.quiet => {}
            None => eprintln!("{}: step {step}/{steps} {msg} ({steps_per_sec:.0} steps/s)", self.name),
        }
    }

    /// Reports that training diverged (the loss is not finite) at `step`.
    pub fn diverged(&self, step: u64, loss: f32) {
        let msg = format!("diverged at step {step} (loss {loss})");
        match &self.bar {
            Some(b) => b.set_message(msg),
            None if self.quiet => {}
            None => eprintln!("{}: {msg}", self.name),
        }
    }

    /// Ends the bar.
    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish();
        }
    }
}
