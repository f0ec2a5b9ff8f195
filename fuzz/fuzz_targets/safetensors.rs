//! The safetensors reader: `reshard_core::safetensors::parse` on arbitrary bytes. Whatever it
//! accepts must be consistent and survive the writer (`safetensors::layout`) and a second read.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use reshard_core::checkpoint::ReadOptions;
use reshard_core::safetensors;

mod common;

fuzz_target!(|data: &[u8]| {
    let path = Path::new("fuzz.safetensors");
    for verify_crc in [false, true] {
        let idx = match safetensors::parse(path, data, ReadOptions { verify_crc }) {
            Ok(idx) => idx,
            Err(e) => {
                let _ = e.to_string();
                continue;
            }
        };
        common::check_index(data, &idx);
        let mut meta = idx.metadata.clone();
        meta.remove("crc_num");
        let Ok(layout) = safetensors::layout(&common::headers(&idx), &meta) else {
            continue;
        };
        let bytes = common::render(&layout, data, &idx);
        let again = safetensors::parse(path, &bytes, ReadOptions::default())
            .unwrap_or_else(|e| panic!("reshard cannot read what it wrote: {e}"));
        common::check_index(&bytes, &again);
        common::assert_same_tensors(data, &idx, &bytes, &again);
    }
});
