//! Int4 (qint4x2) against MindSpore 2.10 (`tests/gen/make_int4.py`): complete -> rows split over
//! dev [2,2] -> columns split over dev [1,4] -> complete. MindSpore stores Int4 one byte per
//! element; its transform goes through numpy and labels the slices Int8, while reshard keeps Int4.
//! Every output equals MindSpore's byte for byte but for that label.
#![allow(clippy::unwrap_used)] // test helpers: a failed unwrap is a failed test

use std::path::{Path, PathBuf};

use reshard_core::checkpoint::{CheckpointFile, ReadOptions};
use reshard_core::execute::{execute, ExecuteOptions};
use reshard_core::plan::{Plan, PlanOptions};
use reshard_core::DType;

mod util;

fn fixtures() -> PathBuf {
    util::fixtures().join("int4")
}

fn transform(src: &Path, src_s: Option<&Path>, dst_s: Option<&Path>, out: &Path) {
    let plan = Plan::build(src, src_s, dst_s, &PlanOptions::default()).unwrap_or_else(|e| panic!("{e}"));
    let opts = ExecuteOptions { sync: false, ..ExecuteOptions::default() };
    execute(&plan, out, &[], &opts).unwrap_or_else(|e| panic!("{e}"));
}

/// `ours` (Int4) equals MindSpore's `theirs` (Int8) but for the dtype label.
fn same_but_label(ours: &Path, theirs: &Path) {
    let (a, b) = (std::fs::read(ours).unwrap(), std::fs::read(theirs).unwrap());
    let fa = CheckpointFile::open(ours, ReadOptions::default()).unwrap();
    let fb = CheckpointFile::open(theirs, ReadOptions::default()).unwrap();
    let q = fa.index().get("q.weight").unwrap();
    assert_eq!(q.dtype, DType::Int4, "{}", ours.display());
    assert_eq!(fb.index().get("q.weight").unwrap().dtype, DType::Int8, "{}", theirs.display());
    let at = a.windows(4).position(|w| w == b"Int4").unwrap();
    assert_eq!(a.windows(4).filter(|w| *w == b"Int4").count(), 1, "{}", ours.display());
    let mut relabelled = a.clone();
    relabelled[at + 3] = b'8';
    assert!(
        relabelled == b,
        "{} differs from MindSpore's {} beyond the Int4/Int8 label",
        ours.display(),
        theirs.display()
    );
}

#[test]
fn int4_round_trip_matches_mindspore_but_keeps_the_type() {
    let fx = fixtures();
    let scratch = util::Scratch::new("int4");
    let tmp = scratch.path();
    let (rows_s, cols_s) = (fx.join("rows.ckpt"), fx.join("cols.ckpt"));
    transform(&fx.join("complete"), None, Some(&rows_s), &tmp.join("rows"));
    transform(&tmp.join("rows"), Some(&rows_s), Some(&cols_s), &tmp.join("cols"));
    transform(&tmp.join("cols"), Some(&cols_s), None, &tmp.join("back"));
    for (step, n) in [("rows", 4), ("cols", 4), ("back", 1)] {
        for r in 0..n {
            let f = format!("{step}/rank_{r}/checkpoint_{r}.ckpt");
            same_but_label(&tmp.join(&f), &fx.join(&f));
        }
    }
    // And the round trip gives back the original tensors, type included.
    let orig = CheckpointFile::open(&fx.join("complete/rank_0/model.ckpt"), ReadOptions::default()).unwrap();
    let back = CheckpointFile::open(&tmp.join("back/rank_0/checkpoint_0.ckpt"), ReadOptions::default()).unwrap();
    for t in &orig.index().tensors {
        let u = back.index().get(t.name()).unwrap();
        assert_eq!((u.dtype, &u.shape()), (t.dtype, &t.shape()), "{}", t.name());
        assert_eq!(back.content(u), orig.content(t), "{}", t.name());
    }
}
