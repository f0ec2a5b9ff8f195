//! The `.ckpt` reader: `reshard_core::ckpt::parse` on arbitrary bytes, with and without crc
//! verification. Whatever it accepts must be consistent and survive the writer (`ckpt::layout`)
//! and a second read unchanged.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use reshard_core::checkpoint::ReadOptions;
use reshard_core::ckpt;

mod common;

fuzz_target!(|data: &[u8]| {
    let path = Path::new("fuzz.ckpt");
    for verify_crc in [false, true] {
        let r = ckpt::parse(path, data, ReadOptions { verify_crc });
        let idx = match r {
            Ok(idx) => idx,
            Err(e) => {
                let _ = e.to_string();
                continue;
            }
        };
        common::check_index(data, &idx);
        // Small chunks exercise the consecutive-values path of the reader too.
        for chunk in [ckpt::CHUNK_BYTES, 3] {
            let layout = ckpt::layout(&common::headers(&idx), chunk);
            let bytes = common::render(&layout, data, &idx);
            let again = ckpt::parse(path, &bytes, ReadOptions::default())
                .unwrap_or_else(|e| panic!("reshard cannot read what it wrote: {e}"));
            common::check_index(&bytes, &again);
            common::assert_same_tensors(data, &idx, &bytes, &again);
        }
    }
});
