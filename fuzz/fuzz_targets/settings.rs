//! Fuzzes `settings.json` as a resumed run reads it: any bytes are parsed as either experiment's
//! settings and, when they parse, checked as the driver checks them before a run; an error is
//! fine, a panic is a finding.
#![no_main]

use bnlab::driver::settings::parse_settings;
use bnlab::driver::{check_settings, Settings};
use bnlab::experiments::accelerate::{Accelerate, AccelerateSettings};
use bnlab::experiments::paper_mlp::{PaperMlp, PaperMlpSettings};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(s) = parse_settings::<PaperMlpSettings>(text) {
        let s: Settings<PaperMlpSettings> = s;
        let _ = check_settings(&PaperMlp, &s);
    }
    if let Ok(s) = parse_settings::<AccelerateSettings>(text) {
        let _ = check_settings(&Accelerate, &s);
    }
});
