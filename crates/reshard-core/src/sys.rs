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
    /// The most one `MADV_WILLNEED` reads (the kernel caps each call at the device's read-ahead).
    readahead: u64,
}

/// The system's page size.
pub fn page_size() -> u64 {
    static PAGE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *PAGE.get_or_init(|| {
        // SAFETY: sysconf only reads a system constant.
        let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        u64::try_from(n).ok().filter(|&n| n > 0).unwrap_or(4096)
    })
}

/// The read-ahead of the device holding a file (`/sys/class/bdi/MAJ:MIN/read_ahead_kb`): the
/// kernel reads at most that much (or the device's optimal I/O size, if larger) for one
/// `MADV_WILLNEED`. 128 KiB, Linux's default, when it cannot be found or is 0.
fn device_readahead(meta: &std::fs::Metadata) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let dev = meta.dev();
    let path = format!("/sys/class/bdi/{}:{}/read_ahead_kb", libc::major(dev), libc::minor(dev));
    let kb = std::fs::read_to_string(path).ok().and_then(|s| s.trim().parse::<u64>().ok()).unwrap_or(0);
    if kb == 0 {
        128 << 10
    } else {
        kb << 10
    }
}

impl MappedFile {
    /// Maps `path` read-only. An empty file gives an empty slice (mmap of 0 bytes is an error on Linux).
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, "open", e))?;
        let meta = file.metadata().map_err(|e| Error::io(path, "stat", e))?;
        let readahead = device_readahead(&meta);
        if meta.len() == 0 {
            return Ok(MappedFile { map: None, readahead });
        }
        // SAFETY: the map is read-only and lives as long as `self`. If another process truncates
        // or rewrites the file while it is mapped, reads may see changed bytes or raise SIGBUS;
        // reshard never writes to its sources and documents that sources must not change during
        // a run (the plan records each source's size and mtime and checks them before executing).
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, "mmap", e))?;
        // No read-around on faults: with the device read-ahead of this project's machine (8 MiB)
        // indexing a cold 578 MB checkpoint read 439 MB of it, and converting one rank of
        // complete -> 8 read 470 MB. What the executor needs it announces with `will_need`.
        let _ = map.advise(memmap2::Advice::Random);
        Ok(MappedFile { map: Some(map), readahead })
    }

    /// Asks the kernel to start reading `len` bytes at `offset` (`MADV_WILLNEED`) without
    /// waiting for them, in calls no larger than the kernel reads for one (larger requests are
    /// cut short, and the rest would then be read a page per fault). Out-of-range requests and
    /// errors are ignored: it is a hint.
    pub fn will_need(&self, offset: u64, len: u64) {
        let Some(map) = &self.map else {
            return;
        };
        let Some(end) = offset.checked_add(len).filter(|&e| e <= map.len() as u64) else {
            return;
        };
        let mut at = offset;
        while at < end {
            let n = (end - at).min(self.readahead);
            let _ = map.advise_range(memmap2::Advice::WillNeed, at as usize, n as usize);
            at += n;
        }
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

/// Tells the kernel that `data` (usually part of a map) is about to be read front to back once,
/// as a checksum pass over a whole file does (`MADV_SEQUENTIAL`: large read-ahead). Maps are
/// made with no read-around, and a cold 606 MB source with a crc trailer took 3.2 s to check
/// page by page. A hint: errors are ignored.
pub fn will_read_sequentially(data: &[u8]) {
    if data.is_empty() {
        return;
    }
    let page = page_size() as usize;
    let start = data.as_ptr() as usize & !(page - 1);
    let len = data.as_ptr() as usize + data.len() - start;
    // SAFETY: MADV_SEQUENTIAL only changes read-ahead for pages of memory we hold a shared
    // reference to (from the start of its first page); it never changes their contents.
    unsafe {
        libc::madvise(start as *mut libc::c_void, len, libc::MADV_SEQUENTIAL);
    }
}

/// Gives the memory freed so far back to the system (`malloc_trim`, glibc only). glibc keeps a
/// heap per thread: what the main thread frees after a phase (the strategies once the plan is
/// built, the rank plans counted before executing) is not reused by the worker threads, and
/// would otherwise stay resident for the whole job.
pub fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap memory to the system; it touches no live
    // allocation.
    unsafe {
        libc::malloc_trim(0);
    }
}
