//! Where source bytes come from: the [`ByteSource`] trait and its implementations.
//!
//! The planner and the executor never touch a file directly: they ask a byte source for its
//! length, read exact byte ranges at offsets, borrow a zero-copy view where the source is a
//! memory map, announce the ranges they will read next (`prefetch`), and check before an output
//! is committed that the source is still the version they planned with. A new backend (object
//! storage, say) implements [`ByteSource`] and is opened by [`open`]; nothing else changes.
//!
//! Implementations: [`MmapSource`] (read-only memory map; zero-copy, page-exact read-ahead),
//! [`PreadSource`] (positioned reads into the caller's buffers; no SIGBUS when a source is
//! truncated under it, and no page faults on network filesystems) and [`MemSource`] (bytes
//! already in memory: tests, fuzzing).

mod local;
#[cfg(feature = "s3")]
pub mod object;
pub mod small;

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use crate::sys::Stamp;
pub use local::{MmapSource, PreadSource};

use crate::error::{Error, Result};

/// Which version of a source was read: what says its bytes are still the ones planned with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Version {
    /// A local file: size, modification and change times, device and inode.
    Local(Stamp),
    /// An object: size and entity tag.
    Remote {
        /// Size in bytes.
        len: u64,
        /// The store's ETag.
        etag: String,
    },
    /// Bytes in memory (never change).
    Memory {
        /// Size in bytes.
        len: u64,
    },
}

impl Version {
    /// The size this version has.
    pub fn len(&self) -> u64 {
        match self {
            Version::Local(s) => s.len,
            Version::Remote { len, .. } | Version::Memory { len } => *len,
        }
    }

    /// Whether the source is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How `now` differs from `self`, in words, or None when it is the same version. For a
    /// local file only size and modification time are compared (a plan saved earlier and reloaded
    /// has those); the executor's own checks while reading also compare change time and inode.
    pub fn change(&self, now: &Version) -> Option<String> {
        match (self, now) {
            (Version::Local(a), Version::Local(b)) => {
                let mut what = Vec::new();
                if a.len != b.len {
                    what.push(format!("its size went from {} to {} bytes", a.len, b.len));
                }
                if a.mtime_ns != b.mtime_ns {
                    what.push("its modification time changed".to_string());
                }
                (!what.is_empty()).then(|| what.join(", "))
            }
            (Version::Remote { len: la, etag: ea }, Version::Remote { len: lb, etag: eb }) => {
                (la != lb || ea != eb).then(|| format!("its size or ETag went from {la} {ea} to {lb} {eb}"))
            }
            (a, b) if a == b => None,
            _ => Some("it is another kind of source".into()),
        }
    }

    /// A stable text for fingerprints.
    pub fn fingerprint_text(&self) -> String {
        match self {
            Version::Local(s) => format!("{}|{}", s.len, s.mtime_ns),
            Version::Remote { len, etag } => format!("{len}|{etag}"),
            Version::Memory { len } => format!("{len}|mem"),
        }
    }
}

/// A readable run of bytes with a length and a version: a local file (mapped or read with
/// `pread`), an object in a store, or a buffer in memory.
pub trait ByteSource: Send + Sync {
    /// The path or URL it was opened from, for messages.
    fn path(&self) -> &Path;

    /// Its length in bytes when it was opened.
    fn len(&self) -> u64;

    /// Whether it is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Fills `buf` with the bytes at `offset`; a range beyond the end is an error naming the
    /// source.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()>;

    /// The bytes at `offset` borrowed without a copy, when the source is a memory map (or in
    /// memory); `None` otherwise, and for a range beyond the end.
    fn view(&self, offset: u64, len: u64) -> Option<&[u8]> {
        let _ = (offset, len);
        None
    }

    /// A hint that these exact bytes will be read soon (read-ahead of exactly them). Errors and
    /// out-of-range requests are ignored.
    fn prefetch(&self, offset: u64, len: u64) {
        let _ = (offset, len);
    }

    /// A hint that `runs` (start, end, bytes read in it; ascending, inside [start, end)) will be
    /// read soon, each byte once (the rest are small gaps between them, fetched so that the
    /// whole range is one request). The bytes fetched ahead are added to `count` until read;
    /// what the returned hold still has unread stops counting when it is dropped (the fill
    /// ended, read or not). By default the same as [`prefetch`](Self::prefetch) of the range.
    fn prefetch_runs(
        &self,
        start: u64,
        end: u64,
        runs: &[(u64, u64, u64)],
        count: &std::sync::Arc<std::sync::atomic::AtomicU64>,
    ) -> Option<Box<dyn std::any::Any + Send + Sync>> {
        let _ = (runs, count);
        self.prefetch(start, end.saturating_sub(start));
        None
    }

    /// A hint that the whole source is about to be read front to back once (a checksum pass).
    fn will_read_all(&self) {}

    /// The bytes of each of `ranges` (start, length), read side by side where the source can
    /// (an object store: one ranged GET each, all in flight at once); by default one after the
    /// other.
    fn read_ranges(&self, ranges: &[(u64, u64)]) -> Result<Vec<Vec<u8>>> {
        ranges
            .iter()
            .map(|&(at, n)| {
                let mut b =
                    vec![0u8; usize::try_from(n).map_err(|_| beyond_end(self.path(), at, usize::MAX, self.len()))?];
                self.read_at(at, &mut b)?;
                Ok(b)
            })
            .collect()
    }

    /// The version that was opened.
    fn version(&self) -> &Version;

    /// Fails, naming the source and what changed, when its bytes may no longer be those of the
    /// version opened (or a read of a map faulted): what was read may then mix two versions.
    fn check(&self) -> Result<()>;

    /// Whether a read faulted and was replaced by zeros (maps only; `check` then fails).
    fn faulted(&self) -> bool {
        false
    }

    /// Takes charge of `check`: compare the bytes it expects whenever this source fetches bytes
    /// covering them, and make [`check`](Self::check) fetch and compare the rest (and fail when
    /// any differs). Returns false when the source does not (the default): the caller then runs
    /// the check at once. A source takes one check, before anything is read.
    fn check_predicted(&self, check: Arc<crate::toc_predict::PredictCheck>) -> bool {
        let _ = check;
        false
    }

    /// Whether every byte read costs a request and a transfer (an object store): readers then
    /// ask for exactly the bytes they need rather than reading ahead.
    fn exact_reads(&self) -> bool {
        false
    }
}

/// How local source files are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IoMode {
    /// Memory maps: zero-copy, page-exact read-ahead (fastest on local disks).
    Mmap,
    /// Positioned reads (`pread`) into bounded buffers: no page faults (network filesystems),
    /// and a source truncated during a run is a read error, never a SIGBUS.
    Pread,
    /// `pread` on network and FUSE filesystems (NFS, SMB/CIFS, Lustre, GPFS, CephFS, 9p, FUSE),
    /// maps elsewhere.
    #[default]
    Auto,
}

impl IoMode {
    /// Parses `mmap` / `pread` / `auto`.
    pub fn parse(s: &str) -> Result<IoMode> {
        match s {
            "mmap" => Ok(IoMode::Mmap),
            "pread" => Ok(IoMode::Pread),
            "auto" => Ok(IoMode::Auto),
            other => Err(Error::Invalid(format!("unknown io mode '{other}': expected 'mmap', 'pread' or 'auto'"))),
        }
    }

    /// The name `parse` takes.
    pub fn name(self) -> &'static str {
        match self {
            IoMode::Mmap => "mmap",
            IoMode::Pread => "pread",
            IoMode::Auto => "auto",
        }
    }
}

/// Whether `path` is an object URL (`s3://` or `obs://`) rather than a local path.
pub fn is_url(path: &Path) -> bool {
    path.to_str().is_some_and(|s| s.starts_with("s3://") || s.starts_with("obs://"))
}

/// Bytes this process has fetched from object stores so far (0 without object storage).
pub fn bytes_fetched() -> u64 {
    #[cfg(feature = "s3")]
    return object::bytes_fetched();
    #[cfg(not(feature = "s3"))]
    0
}

/// Bytes prefetched from object stores and not yet read (or still on their way), in this
/// process (0 without object storage).
pub fn prefetched_bytes() -> u64 {
    #[cfg(feature = "s3")]
    return object::prefetched_bytes();
    #[cfg(not(feature = "s3"))]
    0
}

/// Ranged GETs this process has made so far: (started ahead of the copy by a prefetch, made by
/// a read on demand: tables of contents, reads no prefetch covered). (0, 0) without object
/// storage.
pub fn gets_made() -> (u64, u64) {
    #[cfg(feature = "s3")]
    return object::gets_made();
    #[cfg(not(feature = "s3"))]
    (0, 0)
}

/// The error for an object URL in a build without object storage.
#[cfg(not(feature = "s3"))]
pub(crate) fn no_object_storage(path: &Path) -> Error {
    Error::Unsupported {
        path: path.to_path_buf(),
        detail: "this build of reshard has no object storage support (cargo feature 's3')".into(),
    }
}

/// Opens a source for reading with the given mode (an `s3://` or `obs://` URL opens an object,
/// read with ranged GETs whatever the mode).
pub fn open(path: &Path, mode: IoMode) -> Result<Arc<dyn ByteSource>> {
    if is_url(path) {
        #[cfg(feature = "s3")]
        return object::open(path);
        #[cfg(not(feature = "s3"))]
        return Err(no_object_storage(path));
    }
    let (file, meta) = crate::input::open_regular(path)?;
    let pread = match mode {
        IoMode::Mmap => false,
        IoMode::Pread => true,
        IoMode::Auto => crate::sys::is_network_fs(&file),
    };
    Ok(if pread {
        Arc::new(PreadSource::new(path, file, &meta))
    } else {
        Arc::new(MmapSource::new(path, file, &meta)?)
    })
}

/// Bytes in memory as a source (tests, fuzzing, and the parsers' `&[u8]` entry points).
pub struct MemSource<'a> {
    path: PathBuf,
    bytes: &'a [u8],
    version: Version,
}

impl<'a> MemSource<'a> {
    /// `bytes` under the name `path`.
    pub fn new(path: &Path, bytes: &'a [u8]) -> Self {
        MemSource { path: path.to_path_buf(), bytes, version: Version::Memory { len: bytes.len() as u64 } }
    }
}

impl ByteSource for MemSource<'_> {
    fn path(&self) -> &Path {
        &self.path
    }
    fn len(&self) -> u64 {
        self.bytes.len() as u64
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let v =
            self.view(offset, buf.len() as u64).ok_or_else(|| beyond_end(&self.path, offset, buf.len(), self.len()))?;
        buf.copy_from_slice(v);
        Ok(())
    }
    fn view(&self, offset: u64, len: u64) -> Option<&[u8]> {
        let end = offset.checked_add(len).filter(|&e| e <= self.len())?;
        Some(&self.bytes[offset as usize..end as usize])
    }
    fn version(&self) -> &Version {
        &self.version
    }
    fn check(&self) -> Result<()> {
        Ok(())
    }
}

/// Bytes in memory as a source that records every read it is asked for, one batch per call (a
/// `read_at` is a batch of one range), with exact reads (an object store's) or not: the tests
/// of walks, guesses and deferred checks count fetches with it.
#[cfg(test)]
pub(crate) struct RecordingSource<'a> {
    mem: MemSource<'a>,
    exact: bool,
    calls: std::sync::Mutex<Vec<Vec<(u64, u64)>>>,
}

#[cfg(test)]
impl<'a> RecordingSource<'a> {
    pub(crate) fn new(path: &str, bytes: &'a [u8], exact: bool) -> Self {
        RecordingSource { mem: MemSource::new(Path::new(path), bytes), exact, calls: Default::default() }
    }

    /// The ranges asked for, a batch per call.
    pub(crate) fn calls(&self) -> Vec<Vec<(u64, u64)>> {
        self.calls.lock().unwrap().clone()
    }

    /// The ranges asked for, in order.
    pub(crate) fn ranges(&self) -> Vec<(u64, u64)> {
        self.calls().concat()
    }
}

#[cfg(test)]
impl ByteSource for RecordingSource<'_> {
    fn path(&self) -> &Path {
        self.mem.path()
    }
    fn len(&self) -> u64 {
        self.mem.len()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.calls.lock().unwrap().push(vec![(offset, buf.len() as u64)]);
        self.mem.read_at(offset, buf)
    }
    fn read_ranges(&self, ranges: &[(u64, u64)]) -> Result<Vec<Vec<u8>>> {
        self.calls.lock().unwrap().push(ranges.to_vec());
        self.mem.read_ranges(ranges)
    }
    fn version(&self) -> &Version {
        self.mem.version()
    }
    fn check(&self) -> Result<()> {
        Ok(())
    }
    fn exact_reads(&self) -> bool {
        self.exact
    }
}

/// The error for a read past the end of a source.
pub(crate) fn beyond_end(path: &Path, offset: u64, len: usize, have: u64) -> Error {
    Error::Source {
        path: path.to_path_buf(),
        detail: format!(
            "a read of {len} bytes at byte {offset} runs past the end of the file ({have} bytes): the file is \
             shorter than its table of contents says, or it was truncated while reshard was reading it"
        ),
    }
}

/// The refill size of a [`ByteReader`] over a source with exact reads: a tensor's key, name,
/// dims and type take about 100 bytes, so one refill per tensor; 4 KiB refills fetched 6% more
/// than an 8 -> 4 rank's share of 16 tensors of 2 MiB per file (1 KiB: 2.5%).
const EXACT_READ_CHUNK: usize = 1 << 10;
/// How far before a guessed header [`ByteReader::speculate`] fetches.
const GUESS_SLACK: u64 = 256;
/// Guessed refills at most this far apart are fetched as one range.
const JOIN_REFILLS: u64 = 256;
/// The most refills fetched ahead a [`ByteReader`] keeps (the nearest).
const MAX_SPARES: usize = 64;

/// Whether `n` bytes from `start` hold `len` bytes at `offset`.
fn covers(start: u64, n: usize, offset: u64, len: usize) -> bool {
    offset >= start && offset + len as u64 <= start + n as u64
}

/// Sequential reads of small pieces (headers, tables of contents) from a source: borrowed from
/// a view when the source has one, else served from a buffer refilled by large reads.
pub struct ByteReader<'s> {
    src: &'s dyn ByteSource,
    buf: Vec<u8>,
    buf_start: u64,
    chunk: usize,
    /// When recording: the bytes a parser said it used ([`ByteReader::keep`]), by offset.
    kept: Option<Vec<(u64, Vec<u8>)>>,
    /// Refills fetched ahead ([`ByteReader::speculate`]), by offset: taken when a read needs them.
    spare: Vec<(u64, Vec<u8>)>,
}

impl<'s> ByteReader<'s> {
    /// A reader that refills `chunk` bytes at a time.
    pub fn new(src: &'s dyn ByteSource, chunk: usize) -> Self {
        // From an object store a refill is a request: small refills fetch little beyond the
        // keys and names of a table of contents (a 256 KiB refill per tensor would fetch more
        // than the tensors of a small model).
        let chunk = if src.exact_reads() { chunk.min(EXACT_READ_CHUNK) } else { chunk };
        ByteReader { src, buf: Vec::new(), buf_start: 0, chunk: chunk.max(1), kept: None, spare: Vec::new() }
    }

    /// Whether the bytes at `offset` come in one request each ([`ByteSource::exact_reads`]).
    pub fn exact(&self) -> bool {
        self.src.exact_reads()
    }

    /// Whether `len` bytes at `offset` are in hand (no read needed).
    pub fn has(&self, offset: u64, len: usize) -> bool {
        self.in_buf(offset, len) || self.spare_for(offset, len).is_some()
    }

    /// Whether the buffer holds `len` bytes at `offset`.
    fn in_buf(&self, offset: u64, len: usize) -> bool {
        covers(self.buf_start, self.buf.len(), offset, len)
    }

    /// The refill fetched ahead that holds `len` bytes at `offset`, if one does.
    fn spare_for(&self, offset: u64, len: usize) -> Option<usize> {
        self.spare.iter().position(|(s, b)| covers(*s, b.len(), offset, len))
    }

    /// Fetches the refill at `offsets[0]` and the guessed ones at the rest all at once (ranged
    /// GETs in flight together, from an object store): a walk that can guess where the next
    /// headers are makes one round trip for several of them. A guessed refill starts
    /// [`GUESS_SLACK`] bytes before its guess (a header a few bytes off is in it: layer 10's
    /// names are longer than layer 9's), refills less than [`JOIN_REFILLS`] apart are one GET
    /// (a norm's header follows the previous one after about 1 KiB), and refills fetched
    /// before and still ahead are kept (those behind are dropped), not fetched again.
    pub fn speculate(&mut self, offsets: &[u64]) -> Result<()> {
        let total = self.src.len();
        let Some(&first) = offsets.first() else { return Ok(()) };
        self.spare.retain(|(s, b)| s + b.len() as u64 > first);
        let mut want: Vec<(u64, u64)> = offsets
            .iter()
            .enumerate()
            .filter(|&(_, &o)| o < total && !self.has(o, GUESS_SLACK.min(total - o) as usize))
            .map(|(i, &o)| {
                let at = if i == 0 { o } else { o.saturating_sub(GUESS_SLACK).max(first) };
                (at, (at + self.chunk as u64).min(total))
            })
            .collect();
        want.sort_unstable();
        let mut ranges: Vec<(u64, u64)> = Vec::with_capacity(want.len());
        for (s, e) in want {
            match ranges.last_mut() {
                Some(r) if s <= r.0 + r.1 + JOIN_REFILLS => r.1 = r.1.max(e - r.0),
                _ => ranges.push((s, e - s)),
            }
        }
        let got = self.src.read_ranges(&ranges)?;
        self.spare.extend(ranges.iter().map(|r| r.0).zip(got));
        // Wrong guesses far ahead would otherwise stay until the walk passed them.
        if self.spare.len() > MAX_SPARES {
            self.spare.sort_unstable_by_key(|(s, _)| *s);
            self.spare.truncate(MAX_SPARES);
        }
        Ok(())
    }

    /// Records from now on the bytes [`keep`](Self::keep) is told of (a table of contents that
    /// depends on those bytes only can then be checked against another object's same bytes).
    pub fn record(&mut self) {
        self.kept = Some(Vec::new());
    }

    /// Notes that the parser used the `len` bytes at `offset` (nothing unless recording).
    pub fn keep(&mut self, offset: u64, len: usize) -> Result<()> {
        if self.kept.is_some() && len > 0 {
            let b = self.get(offset, len)?.to_vec();
            if let Some(k) = self.kept.as_mut() {
                k.push((offset, b));
            }
        }
        Ok(())
    }

    /// The bytes kept while recording, by offset in the order they were used.
    pub fn take_kept(&mut self) -> Vec<(u64, Vec<u8>)> {
        self.kept.take().unwrap_or_default()
    }

    /// The source.
    pub fn source(&self) -> &'s dyn ByteSource {
        self.src
    }

    /// Up to `len` bytes at `offset` (fewer only at the end of the source).
    pub fn get(&mut self, offset: u64, len: usize) -> Result<&[u8]> {
        let total = self.src.len();
        let len = (len as u64).min(total.saturating_sub(offset)) as usize;
        if let Some(v) = self.src.view(offset, len as u64) {
            return Ok(v);
        }
        let have = self.in_buf(offset, len);
        if let Some(k) = (!have).then(|| self.spare_for(offset, len)).flatten() {
            (self.buf_start, self.buf) = self.spare.swap_remove(k);
        } else if !have {
            let n = (len.max(self.chunk) as u64).min(total - offset) as usize;
            self.buf.resize(n, 0);
            self.src.read_at(offset, &mut self.buf)?;
            self.buf_start = offset;
        }
        let at = (offset - self.buf_start) as usize;
        Ok(&self.buf[at..at + len])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A guess is fetched from a little before it (a header a few bytes later is in it), guesses
    /// close together are one range, and refills still ahead of the walk are kept, not fetched
    /// again; those behind it are dropped.
    #[test]
    fn speculation_joins_close_guesses_and_keeps_the_refills_ahead() {
        let bytes: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let src = RecordingSource::new("s3://b/k", &bytes, true);
        let mut r = ByteReader::new(&src, 1 << 20);
        let chunk = EXACT_READ_CHUNK as u64;
        r.speculate(&[0, 10_000, 10_000 + chunk + 100, 50_000]).unwrap();
        let first = src.calls()[0].clone();
        assert_eq!(first, [(0, chunk), (10_000 - GUESS_SLACK, 2 * chunk + 100), (50_000 - GUESS_SLACK, chunk)]);
        // A header 3 bytes after its guess is in hand.
        assert!(r.has(50_003, 100));
        assert_eq!(r.get(50_003, 100).unwrap(), &bytes[50_003..50_103]);
        // The walk moved past the first two: a new round keeps the one still ahead and does not
        // fetch it again.
        r.speculate(&[20_000, 50_000]).unwrap();
        assert_eq!(src.calls()[1], [(20_000, chunk)]);
        assert!(r.has(50_000, 10) && r.has(20_000, 10));
        assert!(!r.has(10_000, 10), "a refill behind the walk was kept");
    }
}
