//! A source truncated or rewritten in place while a transform reads it: the run fails naming
//! the file, the process is not killed (SIGBUS), and nothing is left in the output folder.
//!
//! The change is made from the progress callback after the first block, with one worker and
//! small blocks, so it always lands in the middle of the reads.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test
#![allow(unsafe_code)] // fork, mmap and waitpid for the chaining test

mod util;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use reshard_core::checkpoint::{CheckpointFile, ReadOptions};
use reshard_core::execute::{execute, ExecuteOptions};
use reshard_core::plan::{Plan, PlanOptions};
use reshard_core::storage::IoMode;
use util::checkpoint::complete_source;
use util::{files_under, Scratch};

/// A complete 4 MiB fp32 tensor "w" split in 2 by rows (`tensor_map` [0, -1]: each rank's share
/// is one run, written straight from the source map with pwrite) or by columns ([-1, 0]: each
/// row's half is copied with memcpy into a buffer). Returns (source folder, source file,
/// destination strategy). The source's mtime is set an hour back, so a rewrite always moves it.
fn make_source(dir: &Path, tensor_map: [i64; 2]) -> (PathBuf, PathBuf, PathBuf) {
    complete_source(dir, 1024, tensor_map)
}

/// Runs rank 0 with one worker and 64 KiB blocks, reading the source as `io` says, calling
/// `change` once after the first block.
fn run_with_change(
    dir: &Path,
    tensor_map: [i64; 2],
    io: IoMode,
    change: impl Fn(&Path) + Send + Sync + 'static,
) -> (reshard_core::Result<Vec<reshard_core::WrittenFile>>, PathBuf) {
    let (src_dir, src, strategy) = make_source(dir, tensor_map);
    let plan = Plan::build(&src_dir, None, Some(&strategy), &PlanOptions { io, ..PlanOptions::default() }).unwrap();
    let done = AtomicBool::new(false);
    let victim = src.clone();
    let opts = ExecuteOptions {
        threads: 1,
        block_bytes: 64 << 10,
        sync: false,
        io,
        progress: Some(Arc::new(move |_, _| {
            if !done.swap(true, Ordering::SeqCst) {
                change(&victim);
            }
        })),
        ..ExecuteOptions::default()
    };
    (execute(&plan, &dir.join("out"), &[0], &opts), src)
}

fn truncate(path: &Path) {
    std::fs::File::options().write(true).open(path).unwrap().set_len(4096).unwrap();
}

/// Runs rank 0 with the source split by columns and by rows, read through a map and with pread,
/// `change` made to it after the first block: the run fails naming the source and saying `says`,
/// and leaves nothing in the output.
fn fails_naming_the_source(what: &str, change: fn(&Path), says: &str) {
    for (case, map, io) in [
        ("cols", [-1, 0], IoMode::Mmap),
        ("rows", [0, -1], IoMode::Mmap),
        ("cols-pread", [-1, 0], IoMode::Pread),
        ("rows-pread", [0, -1], IoMode::Pread),
    ] {
        let dir = Scratch::new(&format!("{what}-{case}"));
        let (r, src) = run_with_change(dir.path(), map, io, change);
        let err = r.expect_err(case).to_string();
        assert!(err.contains(&src.display().to_string()) && err.contains(says), "{case}: {err}");
        let left = files_under(&dir.join("out"));
        assert!(left.is_empty(), "{case}: left behind {left:?}");
    }
}

#[test]
fn a_source_truncated_during_a_run_fails_cleanly_naming_it() {
    // Columns: the copy reads the map with memcpy and, without the handler, dies of SIGBUS.
    // Rows: pwrite from the map fails with EFAULT, which must be reported as the source's fault.
    fails_naming_the_source("truncate", truncate, "truncated from");
}

#[test]
fn a_source_rewritten_in_place_during_a_run_fails_naming_it() {
    // Same size, other bytes, from the middle of the content to the end.
    let rewrite = |p: &Path| {
        let f = std::fs::File::options().write(true).open(p).unwrap();
        let len = f.metadata().unwrap().len();
        f.write_all_at(&vec![0x5a; (len / 2) as usize], len - len / 2).unwrap();
    };
    fails_naming_the_source("rewrite", rewrite, "changed while");
}

/// A source removed (or replaced by a folder) between the plan and the run keeps its kind:
/// an I/O error naming the file (`Io`, status IO through the C API), a folder `Unsupported`.
/// Both used to be flattened into a `Source` error holding the message as text.
#[test]
fn a_source_gone_after_the_plan_keeps_its_error_kind() {
    let dir = Scratch::new("gone");
    let (src_dir, src, strategy) = make_source(&dir.0, [0, -1]);
    let plan = Plan::build(&src_dir, None, Some(&strategy), &PlanOptions::default()).unwrap();
    std::fs::remove_file(&src).unwrap();
    let opts = ExecuteOptions { sync: false, ..ExecuteOptions::default() };
    let err = execute(&plan, &dir.0.join("out"), &[0, 1], &opts).unwrap_err();
    match &err {
        reshard_core::Error::Io { path, source, .. } => {
            assert_eq!(path, &src, "{err}");
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound, "{err}");
        }
        other => panic!("expected an I/O error naming {}, got {other:?}", src.display()),
    }
    std::fs::create_dir(&src).unwrap();
    let err = execute(&plan, &dir.0.join("out"), &[0], &opts).unwrap_err();
    assert!(matches!(&err, reshard_core::Error::Unsupported { path, .. } if path == &src), "{err:?}");
    let left = files_under(&dir.0.join("out"));
    assert!(left.is_empty(), "left behind {left:?}");
}

#[test]
fn an_untouched_source_still_converts() {
    let dir = Scratch::new("untouched");
    let (r, _) = run_with_change(&dir.0, [-1, 0], IoMode::Mmap, |_| {});
    let written = r.unwrap();
    CheckpointFile::open(&written[0].path, ReadOptions::default()).unwrap();
}

/// A SIGBUS that is not in one of reshard's maps still does what it did before: here, with
/// the default action behind the handler, it kills the process with SIGBUS.
#[test]
fn a_sigbus_outside_reshards_maps_is_not_swallowed() {
    let dir = Scratch::new("foreign");
    let (_, src, _) = make_source(&dir.0, [0, -1]);
    // Installs reshard's handler (a source is mapped).
    drop(CheckpointFile::open(&src, ReadOptions::default()).unwrap());
    let other = dir.0.join("other.bin");
    std::fs::write(&other, vec![1u8; 1 << 20]).unwrap();
    let f = std::fs::File::options().read(true).write(true).open(&other).unwrap();
    use std::os::fd::AsRawFd;
    // SAFETY: the child only makes system calls (mmap, ftruncate, a volatile read, _exit) on
    // memory and descriptors it owns; the parent waits for it.
    unsafe {
        let p = libc::mmap(std::ptr::null_mut(), 1 << 20, libc::PROT_READ, libc::MAP_SHARED, f.as_raw_fd(), 0);
        assert_ne!(p, libc::MAP_FAILED);
        let pid = libc::fork();
        assert!(pid >= 0);
        if pid == 0 {
            libc::ftruncate(f.as_raw_fd(), 0);
            let _ = std::ptr::read_volatile((p as *const u8).add(8192));
            libc::_exit(0);
        }
        let mut status = 0;
        assert_eq!(libc::waitpid(pid, &mut status, 0), pid);
        assert!(libc::WIFSIGNALED(status), "the child exited with status {status:#x} instead of dying of SIGBUS");
        assert_eq!(libc::WTERMSIG(status), libc::SIGBUS);
        libc::munmap(p, 1 << 20);
    }
}
