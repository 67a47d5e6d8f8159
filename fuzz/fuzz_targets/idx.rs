//! Fuzzes the IDX reader: any bytes, as images and as labels (raw or gzip), must give a dataset or
//! a `DataError`, never a panic or an allocation beyond the decode cap.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let path = Path::new("fuzz-input");
    let _ = bnlab::data::parse_images(data, path);
    let _ = bnlab::data::parse_labels(data, path);
});
