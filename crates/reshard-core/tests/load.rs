//! Loading ranks into memory (`load_rank`): sources truncated after the plan (before or during
//! the load) fail cleanly in both io modes, naming the file; skipped tensors; ranks of one plan
//! loaded from 8 threads at once give the bytes `execute` writes.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod util;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use reshard_core::checkpoint::{CheckpointFile, ReadOptions};
use reshard_core::execute::{execute, ExecuteOptions};
use reshard_core::plan::{Plan, PlanOptions};
use reshard_core::storage::IoMode;
use reshard_core::{load_rank, LoadOptions, TensorMeta};
use util::checkpoint::complete_source;
use util::{fixtures, Scratch};

/// A complete 8 MiB fp32 tensor "w" split in 2 by rows ([0, -1]) or columns ([-1, 0]).
fn make_source(dir: &Path, tensor_map: [i64; 2]) -> (PathBuf, PathBuf, PathBuf) {
    complete_source(dir, 2048, tensor_map)
}

fn truncate(path: &Path) {
    std::fs::File::options().write(true).open(path).unwrap().set_len(4096).unwrap();
}

/// Loads rank 0 into one buffer with one worker, `when` deciding where the truncation lands:
/// after the plan ("before"), or from the progress callback after the first block ("during").
fn load_truncated(dir: &Path, map: [i64; 2], io: IoMode, during: bool) -> (reshard_core::Result<()>, PathBuf) {
    let (src_dir, src, strategy) = make_source(dir, map);
    let plan = Plan::build(&src_dir, None, Some(&strategy), &PlanOptions::default()).unwrap();
    if !during {
        truncate(&src);
    }
    let done = AtomicBool::new(false);
    let victim = src.clone();
    let opts = LoadOptions {
        threads: 1,
        io,
        progress: during.then(|| {
            Arc::new(move |_: u64, _: u64| {
                if !done.swap(true, Ordering::SeqCst) {
                    truncate(&victim);
                }
            }) as Arc<reshard_core::execute::ProgressFn>
        }),
        ..LoadOptions::default()
    };
    let mut buf = vec![0u8; 4 << 20];
    let mut lend = Some(buf.as_mut_slice());
    let r = load_rank(&plan, 0, &opts, &mut |m: &TensorMeta<'_>| {
        assert_eq!(m.nbytes, 4 << 20);
        Ok(lend.take())
    });
    (r, src)
}

#[test]
fn a_source_truncated_after_the_plan_fails_cleanly_in_both_io_modes() {
    for io in [IoMode::Mmap, IoMode::Pread] {
        for (case, map) in [("cols", [-1, 0]), ("rows", [0, -1])] {
            for during in [false, true] {
                let tag = format!("trunc-{io:?}-{case}-{during}");
                let dir = Scratch::new(&tag);
                let (r, src) = load_truncated(&dir.0, map, io, during);
                let err = r.expect_err(&tag).to_string();
                assert!(err.contains(&src.display().to_string()), "{tag}: {err}");
                let says = if during { "truncated from" } else { "changed after the plan" };
                assert!(err.contains(says), "{tag}: {err}");
            }
        }
    }
}

/// The bytes of every tensor of a written file, by name.
fn file_tensors(path: &Path) -> Vec<(String, Vec<u8>)> {
    let f = CheckpointFile::open(path, ReadOptions::default()).unwrap();
    f.index().tensors.iter().map(|t| (t.name().to_string(), f.content(t).into_owned())).collect()
}

/// Loads `rank` into vectors, skipping the tensors `skip` says; (name, bytes) of the kept ones.
fn load_all(plan: &Plan, rank: u32, io: IoMode, skip: impl Fn(usize) -> bool) -> Vec<(String, Vec<u8>)> {
    let rp = plan.rank_plan(rank).unwrap();
    let mut storage: Vec<Vec<u8>> = rp.tensors.iter().map(|t| vec![0xA5; t.nbytes as usize]).collect();
    let names: Vec<String> = rp.tensors.iter().map(|t| t.name.clone()).collect();
    let mut kept = Vec::new();
    {
        let mut lend = storage.iter_mut().enumerate();
        let opts = LoadOptions { io, threads: 2, ..LoadOptions::default() };
        load_rank(plan, rank, &opts, &mut |m: &TensorMeta<'_>| {
            let (i, b) = lend.next().unwrap();
            assert_eq!(m.name, names[i]);
            if skip(i) {
                return Ok(None);
            }
            kept.push(i);
            Ok(Some(b.as_mut_slice()))
        })
        .unwrap_or_else(|e| panic!("rank {rank}: {e}"));
    }
    kept.into_iter().map(|i| (names[i].clone(), std::mem::take(&mut storage[i]))).collect()
}

#[test]
fn eight_threads_load_different_ranks_of_one_plan_at_once() {
    let case = fixtures().join("conformance/complete_to_dp2mp1pp4_opt");
    let plan =
        Plan::build(&case.join("src"), None, Some(&case.join("dst_strategy.ckpt")), &PlanOptions::default()).unwrap();
    assert_eq!(plan.dst_rank_count(), 8);
    let dir = Scratch::new("eight");
    let written = execute(&plan, &dir.0, &[], &ExecuteOptions { sync: false, ..ExecuteOptions::default() }).unwrap();
    let loaded: Vec<Vec<(String, Vec<u8>)>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8u32)
            .map(|r| {
                let plan = &plan;
                let io = if r % 2 == 0 { IoMode::Mmap } else { IoMode::Pread };
                s.spawn(move || load_all(plan, r, io, |_| false))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for w in &written {
        assert_eq!(loaded[w.rank as usize], file_tensors(&w.path), "rank {}", w.rank);
    }
}

#[test]
fn a_tensor_the_callback_skips_is_not_filled_and_the_rest_are() {
    let case = fixtures().join("conformance/complete_to_dp2mp2");
    let plan =
        Plan::build(&case.join("src"), None, Some(&case.join("dst_strategy.ckpt")), &PlanOptions::default()).unwrap();
    let full = load_all(&plan, 1, IoMode::Mmap, |_| false);
    let half = load_all(&plan, 1, IoMode::Pread, |i| i % 2 == 1);
    let want: Vec<_> = full.into_iter().enumerate().filter(|(i, _)| i % 2 == 0).map(|(_, t)| t).collect();
    assert!(want.len() > 1);
    assert_eq!(half, want);
}

/// `rank_reads` says what a load reads: a row split reads the rank's bytes as one run; a column
/// split reads half of every row, joined into one run over the whole tensor (its pages are all
/// touched: twice the bytes loaded).
#[test]
fn rank_reads_are_the_runs_a_load_touches() {
    for (map, run_bytes) in [([0, -1], 4u64 << 20), ([-1, 0], (8 << 20) - 2048)] {
        let s = Scratch::new("rank_reads");
        let (src_dir, src, strategy) = make_source(s.path(), map);
        let plan = Plan::build(&src_dir, None, Some(&strategy), &PlanOptions::default()).unwrap();
        let reads = reshard_core::rank_reads(&plan, 0).unwrap();
        assert_eq!(reads.len(), 1, "{map:?}: {reads:?}");
        assert_eq!(reads[0].path, src);
        assert_eq!(reads[0].runs.len(), 1, "{map:?}: {reads:?}");
        assert_eq!(reads[0].bytes(), run_bytes, "{map:?}");
        let pages = reads[0].page_bytes(4096);
        assert!(pages >= run_bytes && pages <= run_bytes + 8192, "{map:?}: {pages} bytes of pages");
    }
}
