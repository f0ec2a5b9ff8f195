//! The only module of the core with `unsafe` code: read-only memory maps of source files, and
//! `sync_file_range(2)` to start write-back early.
#![allow(unsafe_code)]

use std::os::fd::AsRawFd;

use std::fs::File;
use std::ops::Deref;
use std::path::Path;

use crate::error::{Error, Result};

/// A read-only view of a whole file.
pub struct MappedFile {
    map: Option<memmap2::Mmap>,
}

impl MappedFile {
    /// Maps `path` read-only. An empty file gives an empty slice (mmap of 0 bytes is an error on Linux).
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, "open", e))?;
        let len = file.metadata().map_err(|e| Error::io(path, "stat", e))?.len();
        if len == 0 {
            return Ok(MappedFile { map: None });
        }
        // SAFETY: the map is read-only and lives as long as `self`. If another process truncates
        // or rewrites the file while it is mapped, reads may see changed bytes or raise SIGBUS;
        // reshard never writes to its sources and documents that sources must not change during
        // a run (the plan records each source's size and mtime and checks them before executing).
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, "mmap", e))?;
        // Tensors are copied in strided runs; tell the kernel to read ahead.
        let _ = map.advise(memmap2::Advice::WillNeed);
        Ok(MappedFile { map: Some(map) })
    }
}

impl Deref for MappedFile {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }
}

/// Starts write-back of `len` bytes of `file` at `off` without waiting for it
/// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`), so that the final fsync finds less to do.
pub fn start_writeback(file: &File, off: u64, len: u64) {
    // SAFETY: a plain system call on a descriptor borrowed for its duration; no memory is passed.
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            off as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}
