//! The fuzz targets' checks (`fuzz/fuzz_targets/common.rs`) run on the committed fixtures: every
//! `.ckpt` of `tests/fixtures/formats` is consistent and survives the writer, and every strategy
//! file of `tests/fixtures` gives each rank a box inside its tensors. This also keeps
//! `common.rs` compiling against the core's API: the fuzz crate is outside the workspace, and
//! its own dependencies are not fetched by the tests (it once stopped building unnoticed).
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

#[path = "../../../fuzz/fuzz_targets/common.rs"]
mod common;

use std::path::{Path, PathBuf};

use reshard_core::checkpoint::ReadOptions;
use reshard_core::ckpt;
use reshard_core::strategy::Strategy;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn files_under(dir: &Path, keep: &dyn Fn(&Path) -> bool, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            files_under(&p, keep, out);
        } else if keep(&p) {
            out.push(p);
        }
    }
}

#[test]
fn the_fuzz_checks_hold_for_the_checkpoint_fixtures() {
    let mut files = Vec::new();
    files_under(&fixtures().join("formats"), &|p| p.extension().is_some_and(|e| e == "ckpt"), &mut files);
    assert!(files.len() >= 3, "{files:?}");
    for f in files {
        let data = std::fs::read(&f).unwrap();
        let idx = ckpt::parse(&f, &data, ReadOptions { verify_crc: false })
            .unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        common::check_index(&data, &idx);
        for chunk in [ckpt::CHUNK_BYTES, 3] {
            let layout = ckpt::layout(&common::headers(&idx), chunk);
            let bytes = common::render(&layout, &data, &idx);
            let again = ckpt::parse(&f, &bytes, ReadOptions::default()).unwrap();
            common::check_index(&bytes, &again);
            common::assert_same_tensors(&data, &idx, &bytes, &again);
        }
    }
}

#[test]
fn the_fuzz_checks_hold_for_the_strategy_fixtures() {
    let mut files = Vec::new();
    let strategy = |p: &Path| {
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        !name.ends_with(".expected.json")
            && (p.extension().is_some_and(|e| e == "json")
                || (p.extension().is_some_and(|e| e == "ckpt") && name.contains("strategy")))
    };
    files_under(&fixtures().join("strategies"), &strategy, &mut files);
    files_under(&fixtures().join("conformance"), &strategy, &mut files);
    let mut loaded = 0;
    for f in &files {
        // Not every JSON under the fixtures is a strategy (manifests, expected outputs).
        if let Ok(s) = Strategy::load(f) {
            common::exercise_strategy(&s);
            loaded += 1;
        }
    }
    assert!(loaded >= 5, "{loaded} strategies loaded of {files:?}");
}
