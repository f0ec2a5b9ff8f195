//! Only needed bytes are read: converting one destination rank that needs an eighth of a cold
//! source file brings (about) an eighth of it into the page cache, not the whole file.
//!
//! The page cache is observed with mincore(2) after dropping the source's pages with
//! posix_fadvise(DONTNEED); where that cannot drop them (tmpfs), the test says so and stops.
#![allow(clippy::unwrap_used)] // test helpers: a failed unwrap is a failed test
#![allow(unsafe_code)] // mmap + mincore to see which pages of the source are cached

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use reshard_core::checkpoint::TensorHeader;
use reshard_core::execute::{execute, ExecuteOptions};
use reshard_core::plan::{Plan, PlanOptions};
use reshard_core::{ckpt, DType};
use serde_json::json;

const PAGE: usize = 4096;

fn scratch(name: &str) -> PathBuf {
    // Under target/, on the project's filesystem (the system temp folder may be tmpfs).
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("reshard-reads-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Pages of `path` in the page cache.
fn resident_pages(path: &Path) -> usize {
    let f = File::open(path).unwrap();
    let len = f.metadata().unwrap().len() as usize;
    let pages = len.div_ceil(PAGE);
    let mut vec = vec![0u8; pages];
    // SAFETY: a read-only private map of the whole file, unmapped before returning; mincore
    // writes one byte per page into `vec`, which has exactly that many.
    unsafe {
        let p = libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, f.as_raw_fd(), 0);
        assert_ne!(p, libc::MAP_FAILED);
        assert_eq!(libc::mincore(p, len, vec.as_mut_ptr()), 0);
        libc::munmap(p, len);
    }
    vec.iter().filter(|&&b| b & 1 == 1).count()
}

fn drop_from_cache(path: &Path) {
    let f = File::open(path).unwrap();
    f.sync_all().unwrap();
    // SAFETY: plain system call on an open descriptor.
    unsafe {
        libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
    }
}

#[test]
fn one_rank_reads_its_share_of_a_cold_source() {
    let dir = scratch("share");
    // Four 4 MiB tensors and a scalar, rows split 8 ways: each rank needs 2 MiB of 16 MiB.
    let (rows, cols) = (1024u64, 1024u64);
    let mut headers: Vec<TensorHeader> = (0..4)
        .map(|i| TensorHeader {
            name: format!("w{i}"),
            dtype: DType::Float32,
            dims: vec![rows, cols],
            nbytes: rows * cols * 4,
        })
        .collect();
    headers.push(TensorHeader { name: "global_step".into(), dtype: DType::Int32, dims: vec![], nbytes: 4 });
    let contents: Vec<Vec<u8>> =
        headers.iter().enumerate().map(|(i, h)| (0..h.nbytes).map(|k| (k as u8) ^ (i as u8 * 29)).collect()).collect();
    let refs: Vec<&[u8]> = contents.iter().map(Vec::as_slice).collect();
    let src = dir.join("complete/rank_0/model.ckpt");
    std::fs::create_dir_all(src.parent().unwrap()).unwrap();
    std::fs::write(&src, ckpt::layout(&headers, ckpt::CHUNK_BYTES).render(&refs)).unwrap();
    let items: serde_json::Map<String, serde_json::Value> = (0..4)
        .map(|i| {
            (
                format!("w{i}"),
                json!({"dev_matrix": [1, 8], "tensor_map": [0, -1], "field": 0,
                                     "opt_weight_shard_step": 0, "opt_weight_shard_size": 0}),
            )
        })
        .collect();
    let strategy = dir.join("mp8.json");
    let v = json!({"current_stage": 0, "parallel_strategy_item": {"op": {"stage": 0, "parallel_strategy": [[1]]}},
                   "parallel_layout_item": items});
    std::fs::write(&strategy, serde_json::to_vec(&v).unwrap()).unwrap();

    drop_from_cache(&src);
    let total = std::fs::metadata(&src).unwrap().len() as usize / PAGE;
    let before = resident_pages(&src);
    if before > total / 10 {
        eprintln!(
            "skipped: the page cache of {} cannot be dropped here ({before} of {total} pages stay)",
            dir.display()
        );
        std::fs::remove_dir_all(&dir).ok();
        return;
    }
    let plan = Plan::build(&dir.join("complete"), None, Some(&strategy), &PlanOptions::default()).unwrap();
    let opts = ExecuteOptions { sync: false, ..ExecuteOptions::default() };
    let written = execute(&plan, &dir.join("out"), &[3], &opts).unwrap();
    assert_eq!(written.len(), 1);

    let read = resident_pages(&src) - before;
    let share = (4 * rows * cols * 4 / 8) as usize / PAGE; // 512 pages
                                                           // Its share, plus the pages holding the headers (one or two per tensor) and the scalar.
    let slack = 16;
    assert!(read >= share, "read {read} pages, less than the {share} pages rank 3 needs");
    assert!(
        read <= share + slack,
        "read {read} of {total} pages of the source for a rank that needs {share} (+{slack} for headers)"
    );
    // And what it wrote is its share: rows 384..512 of each tensor.
    let out = reshard_core::CheckpointFile::open(&written[0].path, Default::default()).unwrap();
    let t = out.index().get("w2").unwrap();
    let row = (cols * 4) as usize;
    assert_eq!(out.content(t).as_ref(), &contents[2][3 * 128 * row..4 * 128 * row]);
    std::fs::remove_dir_all(&dir).ok();
}
