//! Heap kept per tensor with many small tensors (issue 13: 300,000 tensors of 8 floats once took
//! 415 MB). A counting allocator measures the live heap of each structure the job keeps; the
//! bounds are bytes per tensor, a few times what the structures need, far below what they took.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod util;

use std::alloc::{GlobalAlloc, Layout, System};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicIsize, Ordering};

use reshard_core::checkpoint::TensorHeader;
use reshard_core::strategy::Strategy;
use reshard_core::{ckpt, DType};
use util::Scratch;

/// The system allocator, counting the bytes live.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);
static PEAK: AtomicIsize = AtomicIsize::new(0);

fn grew(n: isize) {
    let now = LIVE.fetch_add(n, Ordering::Relaxed) + n;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

// SAFETY: every call is passed on to the system allocator unchanged; only a counter is kept.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        grew(l.size() as isize);
        // SAFETY: the caller's layout, as GlobalAlloc::alloc requires.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Ordering::Relaxed);
        // SAFETY: `p` came from `alloc` with layout `l`.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        grew(new as isize - l.size() as isize);
        // SAFETY: `p` came from `alloc` with layout `l`, as the caller guarantees.
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;

fn live() -> isize {
    LIVE.load(Ordering::Relaxed)
}

/// Above the 20,000 tensors a rank from which ranks are written one at a time.
const N: usize = 24_000;

/// The benchmark's case, scaled down: tensors of 8 floats, every other one split over mp2 of
/// dp2 x mp2.
fn many_small(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let names: Vec<String> = (0..N).map(|i| format!("model.layers.{}.p{}.weight", i / 100, i % 100)).collect();
    let headers: Vec<TensorHeader> = names
        .iter()
        .map(|n| TensorHeader { name: n.clone(), dtype: DType::Float32, dims: vec![8], nbytes: 32 })
        .collect();
    let layout = ckpt::layout(&headers, ckpt::CHUNK_BYTES);
    let src = dir.join("src");
    std::fs::create_dir_all(src.join("rank_0")).unwrap();
    let f = std::fs::File::create(src.join("rank_0/model.ckpt")).unwrap();
    for (off, b) in &layout.fixed {
        f.write_all_at(b, *off).unwrap();
    }
    for run in layout.content.iter().flatten() {
        f.write_all_at(&vec![7u8; run.len as usize], run.file_offset).unwrap();
    }
    let items: serde_json::Map<String, serde_json::Value> = names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let map = if i % 2 == 0 { 0 } else { -1 };
            let item = serde_json::json!({"dev_matrix": [2, 2], "tensor_map": [map], "tensor_shape": [8], "field": 0,
                                          "opt_weight_shard_step": 0, "opt_weight_shard_size": 0});
            (n.clone(), item)
        })
        .collect();
    let strategy = dir.join("strategy.json");
    let v = serde_json::json!({"current_stage": 0, "parallel_layout_item": items});
    std::fs::write(&strategy, serde_json::to_vec(&v).unwrap()).unwrap();
    (src, strategy)
}

/// One test, so that nothing else allocates while it measures.
#[test]
fn many_small_tensors_keep_few_bytes_each() {
    let scratch = Scratch::new("memory");
    let (src, strategy) = many_small(scratch.path());
    let before = live();
    let s = Strategy::load(&strategy).unwrap();
    let kept = (live() - before) as usize / N;
    assert!(s.contains("model.layers.199.p99.weight"));
    // Names of 28 bytes, a 16-byte record and the lookup table: about 70. It was 603 (each
    // name in three maps, each layout item in five allocations of its own).
    eprintln!("strategy: {kept} bytes per parameter");
    assert!(kept <= 120, "the strategy keeps {kept} bytes per parameter");
    drop(s);

    // The plan keeps the checkpoint's index and a record per parameter (the strategy is
    // dropped once it is built): 453 bytes per parameter before the records lost their
    // allocations for one holder and one stage, 381 after, 219 with index records of 104
    // bytes and parameter records of 80, 139 with 48 and 48.
    let before = live();
    let plan = reshard_core::Plan::build(&src, None, Some(&strategy), &Default::default()).unwrap();
    let kept = (live() - before) as usize / N;
    eprintln!("plan: {kept} bytes per parameter");
    assert_eq!(plan.param_count(), N);
    assert!(kept <= 180, "the plan keeps {kept} bytes per parameter");

    // Writing the 4 ranks: tensor plans are made a window at a time, not a rank's at once (508
    // bytes per tensor at the peak that way, 291 windowed).
    let out = scratch.join("out");
    let before = live();
    PEAK.store(before, Ordering::Relaxed);
    let opts = reshard_core::ExecuteOptions { sync: false, ..Default::default() };
    let written = reshard_core::execute(&plan, &out, &[], &opts).unwrap();
    let peak = (PEAK.load(Ordering::Relaxed) - before) as usize / N;
    eprintln!("writing: {peak} bytes per tensor at the peak");
    assert_eq!(written.len(), 4);
    assert!(peak <= 350, "writing took {peak} bytes per tensor at its peak");
}
