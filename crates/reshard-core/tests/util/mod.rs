//! Helpers shared by the core's integration tests, in ripgrep's `tests/util.rs` habit: the
//! fixtures' path, scratch folders, and listing what a run left.
#![allow(dead_code)] // each test binary uses its own subset
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::path::{Path, PathBuf};

pub mod checkpoint;
mod scratch;
pub use scratch::Scratch;

/// `tests/fixtures` of the repository (files made by MindSpore).
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

impl Scratch {
    /// A new scratch folder under target/ (on the project's filesystem, not a tmpfs: `reads.rs`
    /// needs a page cache it can drop).
    pub fn new(tag: &str) -> Self {
        Scratch::in_folder(Path::new(env!("CARGO_TARGET_TMPDIR")), tag)
    }
}

/// Every regular file under `dir`, recursively, sorted; empty when `dir` does not exist.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.file_type().unwrap().is_dir() {
                todo.push(e.path());
            } else {
                out.push(e.path());
            }
        }
    }
    out.sort();
    out
}
