//! Local files: memory-mapped ([`MmapSource`]) or read with `pread` ([`PreadSource`]).

use std::fs::{File, Metadata};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::{beyond_end, ByteSource, Version};
use crate::error::{Error, Result};
use crate::sys::{MappedFile, Stamp};

/// A local file read through a read-only memory map (see [`MappedFile`]: no read-around, page-
/// exact `MADV_WILLNEED` read-ahead, and a SIGBUS handler for a file truncated under the map).
pub struct MmapSource {
    map: MappedFile,
    version: Version,
}

impl MmapSource {
    /// Maps an opened regular file.
    pub fn new(path: &Path, file: File, meta: &Metadata) -> Result<Self> {
        let map = MappedFile::from_file(path, file, meta)?;
        let version = Version::Local(*map.opened());
        Ok(MmapSource { map, version })
    }
}

impl ByteSource for MmapSource {
    fn path(&self) -> &Path {
        self.map.path()
    }
    fn len(&self) -> u64 {
        self.map.len() as u64
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let v = self
            .view(offset, buf.len() as u64)
            .ok_or_else(|| beyond_end(self.path(), offset, buf.len(), self.len()))?;
        buf.copy_from_slice(v);
        Ok(())
    }
    fn view(&self, offset: u64, len: u64) -> Option<&[u8]> {
        let end = offset.checked_add(len).filter(|&e| e <= self.len())?;
        Some(&self.map[offset as usize..end as usize])
    }
    fn prefetch(&self, offset: u64, len: u64) {
        self.map.will_need(offset, len);
    }
    fn will_read_all(&self) {
        crate::sys::will_read_sequentially(&self.map);
    }
    fn version(&self) -> &Version {
        &self.version
    }
    fn check(&self) -> Result<()> {
        self.map.check()
    }
    fn faulted(&self) -> bool {
        self.map.faulted()
    }
}

/// A local file read with positioned reads into the caller's buffers: no map, so no page faults
/// (slow on network filesystems) and no SIGBUS if the file is truncated during a run (a short
/// read is reported instead).
pub struct PreadSource {
    path: PathBuf,
    file: File,
    opened: Stamp,
    version: Version,
}

impl PreadSource {
    /// Wraps an opened regular file.
    pub fn new(path: &Path, file: File, meta: &Metadata) -> Self {
        let opened = Stamp::of(meta);
        PreadSource { path: path.to_path_buf(), file, opened, version: Version::Local(opened) }
    }
}

impl ByteSource for PreadSource {
    fn path(&self) -> &Path {
        &self.path
    }
    fn len(&self) -> u64 {
        self.opened.len
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        if offset.checked_add(buf.len() as u64).is_none_or(|e| e > self.opened.len) {
            return Err(beyond_end(&self.path, offset, buf.len(), self.opened.len));
        }
        match self.file.read_exact_at(buf, offset) {
            Ok(()) => Ok(()),
            // Shorter than when it was opened: say what changed rather than "unexpected EOF".
            Err(e) => Err(self.check().err().unwrap_or_else(|| Error::io(&self.path, "read", e))),
        }
    }
    fn prefetch(&self, offset: u64, len: u64) {
        crate::sys::fadvise_willneed(&self.file, offset, len);
    }
    fn will_read_all(&self) {
        crate::sys::fadvise_sequential(&self.file);
    }
    fn version(&self) -> &Version {
        &self.version
    }
    fn check(&self) -> Result<()> {
        let Ok(now) = self.file.metadata().map(|m| Stamp::of(&m)) else {
            return Ok(());
        };
        let detail = if now.len < self.opened.len {
            format!(
                "the file was truncated from {} to {} bytes while reshard was reading it; nothing read from it \
                 was kept",
                self.opened.len, now.len
            )
        } else {
            match self.opened.change(&now) {
                Some(what) => format!(
                    "the file changed while reshard was reading it ({what}); what was read may mix two versions, \
                     nothing read from it was kept"
                ),
                None => return Ok(()),
            }
        };
        Err(Error::Source { path: self.path.clone(), detail })
    }
}
