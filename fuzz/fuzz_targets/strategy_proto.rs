//! The protobuf strategy reader: prost decode of `ParallelStrategyMap`, then
//! `Strategy::from_proto`, then what the plan computes from the layouts (stage and device
//! counts, each rank's box).
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use prost::Message;
use reshard_core::strategy::{proto::ParallelStrategyMap, Strategy};

mod common;

fuzz_target!(|data: &[u8]| {
    let Ok(m) = ParallelStrategyMap::decode(data) else {
        return;
    };
    match Strategy::from_proto(Path::new("fuzz_strategy.ckpt"), &m) {
        Ok(s) => common::exercise_strategy(&s),
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
