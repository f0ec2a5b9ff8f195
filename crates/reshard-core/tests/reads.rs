//! Only needed bytes are read: converting one destination rank of a cold source brings exactly
//! the pages holding that rank's share into the page cache, read ahead rather than a page per
//! fault.
//!
//! The page cache is observed with mincore(2) after dropping the source's pages with
//! posix_fadvise(DONTNEED). On tmpfs, where pages cannot be dropped, the test says so and stops;
//! anywhere else, failing to drop them fails the test.
#![allow(clippy::unwrap_used)] // test helpers: a failed unwrap is a failed test
#![allow(unsafe_code)] // mmap + mincore, fadvise, statfs, getrusage

mod util;

use std::collections::BTreeSet;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

use reshard_core::checkpoint::{CheckpointFile, ReadOptions, TensorHeader};
use reshard_core::execute::{execute, ExecuteOptions};
use reshard_core::plan::{Plan, PlanOptions};
use reshard_core::{ckpt, DType};
use serde_json::json;
use util::Scratch;

fn page() -> u64 {
    // SAFETY: sysconf only reads a system constant.
    u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap()
}

/// Indices of the pages of `path` in the page cache.
fn resident(path: &Path) -> BTreeSet<u64> {
    let f = File::open(path).unwrap();
    let len = f.metadata().unwrap().len() as usize;
    let mut vec = vec![0u8; len.div_ceil(page() as usize)];
    // SAFETY: a read-only shared map of the whole file, unmapped before returning; mincore
    // writes one byte per page into `vec`, which has exactly that many.
    unsafe {
        let p = libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, f.as_raw_fd(), 0);
        assert_ne!(p, libc::MAP_FAILED);
        assert_eq!(libc::mincore(p, len, vec.as_mut_ptr()), 0);
        libc::munmap(p, len);
    }
    (0..vec.len() as u64).filter(|&i| vec[i as usize] & 1 == 1).collect()
}

fn drop_from_cache(path: &Path) {
    let f = File::open(path).unwrap();
    f.sync_all().unwrap();
    // SAFETY: plain system call on an open descriptor.
    unsafe {
        libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
    }
}

fn on_tmpfs(path: &Path) -> bool {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: statfs fills the zeroed struct it is given.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    rc == 0 && (st.f_type as i64 == 0x0102_1994 || st.f_type as i64 == 0x8584_58f6)
    // tmpfs, ramfs
}

fn major_faults() -> i64 {
    // SAFETY: getrusage fills the zeroed struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) }, 0);
    ru.ru_majflt
}

/// Pages overlapping the byte range [from, to) of the file.
fn pages(from: u64, to: u64) -> impl Iterator<Item = u64> {
    from / page()..to.div_ceil(page())
}

#[test]
fn one_rank_reads_exactly_its_share_of_a_cold_source() {
    let dir = Scratch::new("share");
    // "rows" is split by rows in 2: a rank's share is one 12 MiB run, more than one read-ahead
    // request of most devices. "cols" is split by
    // columns in 2: a rank's share is the 128 KiB left or right half of each 256 KiB row.
    let headers = vec![
        TensorHeader { name: "rows".into(), dtype: DType::Float32, dims: vec![6144, 1024], nbytes: 6144 * 1024 * 4 },
        TensorHeader { name: "cols".into(), dtype: DType::Float32, dims: vec![64, 65536], nbytes: 64 * 65536 * 4 },
        TensorHeader { name: "global_step".into(), dtype: DType::Int32, dims: vec![], nbytes: 4 },
    ];
    let contents: Vec<Vec<u8>> =
        headers.iter().enumerate().map(|(i, h)| (0..h.nbytes).map(|k| (k as u8) ^ (i as u8 * 29)).collect()).collect();
    let refs: Vec<&[u8]> = contents.iter().map(Vec::as_slice).collect();
    let src = dir.0.join("complete/rank_0/model.ckpt");
    std::fs::create_dir_all(src.parent().unwrap()).unwrap();
    std::fs::write(&src, ckpt::layout(&headers, ckpt::CHUNK_BYTES).render(&refs)).unwrap();
    let layout = |map: [i64; 2]| json!({"dev_matrix": [1, 2], "tensor_map": map, "field": 0, "opt_weight_shard_step": 0, "opt_weight_shard_size": 0});
    let strategy = dir.0.join("mp2.json");
    let v = json!({"current_stage": 0, "parallel_strategy_item": {"op": {"stage": 0, "parallel_strategy": [[1]]}},
                   "parallel_layout_item": {"rows": layout([0, -1]), "cols": layout([-1, 0])}});
    std::fs::write(&strategy, serde_json::to_vec(&v).unwrap()).unwrap();

    drop_from_cache(&src);
    let before = resident(&src);
    if !before.is_empty() {
        if on_tmpfs(&dir.0) {
            eprintln!("skipped: {} is on tmpfs, whose pages cannot be dropped", dir.0.display());
            return;
        }
        panic!("{} of the source's pages stay cached after POSIX_FADV_DONTNEED", before.len());
    }
    // Indexing reads the headers only: a page or two per tensor, no read-around.
    let plan = Plan::build(&dir.0.join("complete"), None, Some(&strategy), &PlanOptions::default()).unwrap();
    let indexed = resident(&src).len();
    assert!(indexed <= 8, "indexing 3 tensors read {indexed} pages of the source");

    // Rank 1: the second half of the rows, the right half of each row of "cols".
    let file = CheckpointFile::open(&src, ReadOptions::default()).unwrap();
    let data = |name: &str| file.index().get(name).unwrap().segments()[0].offset;
    let mut want = BTreeSet::new();
    want.extend(pages(data("rows") + 6144 * 1024 * 2, data("rows") + 6144 * 1024 * 4));
    for row in 0..64u64 {
        let at = data("cols") + row * 65536 * 4 + 65536 * 2;
        want.extend(pages(at, at + 65536 * 2));
    }
    let step = data("global_step");
    want.extend(pages(step, step + 4));
    drop(file);
    drop_from_cache(&src);

    let faults = major_faults();
    // Blocks larger than the read-ahead of most devices, so announcing a block takes several
    // MADV_WILLNEED calls (the kernel cuts each at the device's read-ahead size).
    let opts =
        ExecuteOptions { sync: false, block_bytes: 32 << 20, memory_budget: 1 << 30, ..ExecuteOptions::default() };
    let written = execute(&plan, &dir.0.join("out"), &[1], &opts).unwrap();
    let faults = major_faults() - faults;
    let got = resident(&src);

    let missing = want.difference(&got).count();
    let extra = got.difference(&want).count();
    eprintln!("share {} pages: {missing} missing, {extra} extra, {faults} major faults", want.len());
    assert_eq!(missing, 0, "{missing} pages of rank 1's share were not read (of {})", want.len());
    // A page or two around the scalar; nothing of the other rank's share.
    assert!(extra <= 4, "{extra} pages read beyond rank 1's share of {} pages", want.len());
    // Read ahead, not a page per fault (an uncut 12 MiB MADV_WILLNEED left the pages past the
    // device's read-ahead size to single-page faults).
    assert!(faults <= 16, "{faults} major faults while copying {} pages", want.len());

    // And what it wrote is its share.
    let out = CheckpointFile::open(&written[0].path, ReadOptions::default()).unwrap();
    let rows = out.index().get("rows").unwrap();
    assert_eq!(out.content(rows).as_ref(), &contents[0][6144 * 1024 * 2..]);
    let cols = out.content(out.index().get("cols").unwrap()).into_owned();
    let row = 65536 * 4;
    for r in 0..64 {
        assert_eq!(&cols[r * row / 2..(r + 1) * row / 2], &contents[1][r * row + row / 2..(r + 1) * row], "row {r}");
    }
}
