//! The JSON strategy reader: `serde_json` then `Strategy::from_json`, then what the plan
//! computes from the layouts (stage and device counts, each rank's box).
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use reshard_core::strategy::Strategy;

mod common;

fuzz_target!(|data: &[u8]| {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    match Strategy::from_json(Path::new("fuzz_strategy.json"), &v) {
        Ok(s) => common::exercise_strategy(&s),
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
