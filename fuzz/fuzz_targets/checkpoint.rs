//! Fuzzes the checkpoint loader: any bytes are parsed and, when they parse, restored into the
//! paper's BN network (16 inputs, 4 classes); an error is fine, a panic is a finding.
#![no_main]

use bnlab::engine::checkpoint::Checkpoint;
use bnlab::engine::Sgd;
use bnlab::experiments::paper_mlp::{build, Variant};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(ck) = Checkpoint::from_bytes(data) {
        let (mut net, _) = build(Variant::Bn, 16, 4, 0.1, 1, batchnorm::BatchNormConfig::default()).expect("the network builds");
        let _ = ck.restore(&mut net, &mut Sgd::new(0.9, 0.0));
    }
});
