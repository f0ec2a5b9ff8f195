//! The only module of the core with `unsafe` code: read-only memory maps of source files, and
//! `copy_file_range(2)` with explicit offsets (file-to-file copies inside the kernel, as `cp`
//! does, safe to call from several threads on one file).
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

/// Copies up to `len` bytes from `src` at `src_off` to `dst` at `dst_off` without moving either
/// file's position. Returns the bytes copied (short counts and errors are the caller's to
/// handle, e.g. by writing the rest itself).
pub fn copy_file_range(src: &File, mut src_off: u64, dst: &File, mut dst_off: u64, len: u64) -> std::io::Result<u64> {
    let mut done = 0u64;
    while done < len {
        let want = usize::try_from(len - done).unwrap_or(usize::MAX).min(1 << 30);
        let (mut si, mut di) = (src_off as libc::loff_t, dst_off as libc::loff_t);
        // SAFETY: both descriptors are open for the duration of the call (borrowed Files), and
        // the offset pointers point to live stack variables the kernel updates; no memory of
        // ours is read or written by the copy itself.
        let n = unsafe { libc::copy_file_range(src.as_raw_fd(), &mut si, dst.as_raw_fd(), &mut di, want, 0) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if n == 0 {
            break;
        }
        done += n as u64;
        src_off += n as u64;
        dst_off += n as u64;
    }
    Ok(done)
}
