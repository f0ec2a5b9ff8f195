//! What the readers produce and the writers consume, whatever the file format.

use std::collections::BTreeMap;
use std::path::Path;

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::storage::{ByteSource, IoMode};
use crate::{ckpt, safetensors};
use std::sync::Arc;

/// Checkpoint file formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// MindSpore protobuf `.ckpt`.
    Ckpt,
    /// `.safetensors`.
    Safetensors,
}

impl Format {
    /// The file extension, without the dot.
    pub fn extension(self) -> &'static str {
        match self {
            Format::Ckpt => "ckpt",
            Format::Safetensors => "safetensors",
        }
    }

    /// Parses `ckpt` / `safetensors`.
    pub fn parse(s: &str) -> Result<Format> {
        match s {
            "ckpt" => Ok(Format::Ckpt),
            "safetensors" => Ok(Format::Safetensors),
            other => Err(Error::Invalid(format!("unknown output format '{other}': expected 'ckpt' or 'safetensors'"))),
        }
    }

    /// The format a path's extension names, if any.
    pub fn from_path(path: &Path) -> Option<Format> {
        match path.extension()?.to_str()? {
            "ckpt" => Some(Format::Ckpt),
            "safetensors" => Some(Format::Safetensors),
            _ => None,
        }
    }
}

/// A contiguous run of a tensor's content inside its file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Segment {
    /// Byte offset in the file.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

/// A tensor's dims: up to two inline, without an allocation of their own.
pub type Dims = smallvec::SmallVec<[u64; 2]>;

/// A tensor's segments: one inline, without an allocation of its own.
pub type Segments = smallvec::SmallVec<[Segment; 1]>;

/// A tensor's name: a range of its file's name buffer, which every name of the file shares
/// (16 bytes and no allocation of its own, where a `String` was 24 bytes and a 32-48 byte
/// chunk). Reads as a `&str` (`Deref`, [`Name::as_str`]).
#[derive(Clone)]
pub struct Name {
    buf: Arc<String>,
    start: u32,
    len: u32,
}

impl Name {
    /// The name.
    pub fn as_str(&self) -> &str {
        let start = self.start as usize;
        // Ranges are made by `NameBuffer::push` on char boundaries; never panics.
        self.buf.get(start..start + self.len as usize).unwrap_or("")
    }

    /// Whether two names are ranges of the same buffer.
    pub fn shares_buffer_with(&self, other: &Name) -> bool {
        Arc::ptr_eq(&self.buf, &other.buf)
    }
}

impl From<String> for Name {
    fn from(s: String) -> Name {
        // Only a name made on its own (tests, deserialization) has a buffer of its own; a length
        // past u32 is cut to nothing rather than panicking (no reader makes one: see NameBuffer).
        let len = u32::try_from(s.len()).unwrap_or(0);
        Name { buf: Arc::new(s), start: 0, len }
    }
}

impl From<&str> for Name {
    fn from(s: &str) -> Name {
        Name::from(s.to_string())
    }
}

impl std::ops::Deref for Name {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for Name {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl std::borrow::Borrow<str> for Name {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

impl std::fmt::Debug for Name {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl std::fmt::Display for Name {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self.as_str(), f)
    }
}

impl PartialEq for Name {
    fn eq(&self, other: &Name) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for Name {}

impl PartialOrd for Name {
    fn partial_cmp(&self, other: &Name) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Name {
    fn cmp(&self, other: &Name) -> std::cmp::Ordering {
        self.as_str().cmp(other.as_str())
    }
}

impl std::hash::Hash for Name {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.as_str().hash(h)
    }
}

impl PartialEq<str> for Name {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for Name {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl PartialEq<String> for Name {
    fn eq(&self, other: &String) -> bool {
        self.as_str() == other.as_str()
    }
}

impl serde::Serialize for Name {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for Name {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Name, D::Error> {
        String::deserialize(d).map(Name::from)
    }
}

/// A file's names, appended one after the other while its index is read, then shared by every
/// tensor of the file ([`NameBuffer::finish`]).
pub(crate) struct NameBuffer {
    buf: String,
    pending: Arc<String>,
}

impl NameBuffer {
    pub(crate) fn new() -> Self {
        NameBuffer { buf: String::new(), pending: Arc::new(String::new()) }
    }

    /// Appends a name; it reads as itself through [`NameBuffer::get`] until `finish`.
    pub(crate) fn push(&mut self, path: &Path, name: &str) -> Result<Name> {
        let end = self.buf.len().checked_add(name.len()).and_then(|e| u32::try_from(e).ok());
        let (Some(_), Ok(start), Ok(len)) = (end, u32::try_from(self.buf.len()), u32::try_from(name.len())) else {
            return Err(Error::Malformed {
                path: path.to_path_buf(),
                kind: if Format::from_path(path) == Some(Format::Safetensors) { "safetensors" } else { "checkpoint" },
                detail: format!(
                    "its tensor names take more than 4 GiB (at '{}', after {} bytes of names)",
                    name.chars().take(80).collect::<String>(),
                    self.buf.len()
                ),
            });
        };
        self.buf.push_str(name);
        Ok(Name { buf: self.pending.clone(), start, len })
    }

    /// A name pushed here.
    pub(crate) fn get<'a>(&'a self, name: &Name) -> &'a str {
        let start = name.start as usize;
        self.buf.get(start..start + name.len as usize).unwrap_or("")
    }

    /// Points every name of `tensors` (all pushed here) at the finished buffer.
    pub(crate) fn finish(mut self, tensors: &mut [TensorInfo]) {
        self.buf.shrink_to_fit();
        let buf = Arc::new(self.buf);
        for t in tensors {
            t.name.buf = buf.clone();
        }
    }
}

/// One tensor of a checkpoint file: its header and where its bytes are.
///
/// An index keeps one per tensor for the whole job: with many small tensors (300,000 in the
/// benchmark) the dims and segments are inline rather than three allocations of their own, and
/// the name is a range of the file's one buffer of names.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TensorInfo {
    /// The tag (parameter name).
    pub name: Name,
    /// Element type.
    pub dtype: DType,
    /// Shape as stored (scalars: empty).
    pub shape: Dims,
    /// The dims exactly as written in the file (MindSpore writes `[0]` for strings).
    pub raw_dims: Dims,
    /// Content, possibly split over several consecutive values.
    pub segments: Segments,
    /// Total content bytes.
    pub nbytes: u64,
    /// Which of its rank's files holds it (0 when a rank is one file).
    #[serde(default)]
    pub file: u32,
}

impl TensorInfo {
    /// Number of elements.
    pub fn numel(&self) -> u64 {
        self.shape.iter().product()
    }
}

/// The parsed table of contents of a checkpoint file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointIndex {
    /// The format.
    pub format: Format,
    /// Tensors in file order.
    pub tensors: Vec<TensorInfo>,
    /// Size of the file.
    pub file_len: u64,
    /// Whether a crc (trailer or metadata) was present and verified.
    pub crc: Option<u32>,
    /// safetensors `__metadata__`.
    pub metadata: BTreeMap<String, String>,
    /// Positions sorted by name (a name repeated: the later position last), for binary search:
    /// 4 bytes per tensor where a map by name held a second copy of every name.
    by_name: Vec<u32>,
}

impl CheckpointIndex {
    /// Builds an index over `tensors` (names must be unique).
    pub fn new(
        format: Format,
        tensors: Vec<TensorInfo>,
        file_len: u64,
        crc: Option<u32>,
        metadata: BTreeMap<String, String>,
    ) -> Self {
        let mut tensors = tensors;
        // The readers grow it by doubling; the index is kept for the whole job.
        tensors.shrink_to_fit();
        let mut by_name: Vec<u32> = (0..tensors.len() as u32).collect();
        // Unstable (no buffer of half the positions), with ties by position as a stable sort:
        // a repeated name's later position last.
        by_name.sort_unstable_by(|&a, &b| tensors[a as usize].name.cmp(&tensors[b as usize].name).then(a.cmp(&b)));
        CheckpointIndex { format, tensors, file_len, crc, metadata, by_name }
    }

    /// Finds a tensor by name.
    pub fn get(&self, name: &str) -> Option<&TensorInfo> {
        self.position(name).map(|i| &self.tensors[i])
    }

    /// Two positions holding the same name, if any (the first such pair by name).
    pub fn first_repeat(&self) -> Option<(usize, usize)> {
        self.by_name.windows(2).find_map(|w| {
            let (a, b) = (w[0] as usize, w[1] as usize);
            (self.tensors[a].name == self.tensors[b].name).then_some((a.min(b), a.max(b)))
        })
    }

    /// The first position holding `name`, in file order (where [`CheckpointIndex::position`]
    /// gives the last).
    pub fn first_position(&self, name: &str) -> Option<usize> {
        let start = self.by_name.partition_point(|&i| self.tensors[i as usize].name.as_str() < name);
        let i = *self.by_name.get(start)? as usize;
        (self.tensors[i].name == name).then_some(i)
    }

    /// Position of a tensor in file order.
    pub fn position(&self, name: &str) -> Option<usize> {
        // The last of the positions with this name, as a map filled in file order would keep.
        let end = self.by_name.partition_point(|&i| self.tensors[i as usize].name.as_str() <= name);
        let i = *self.by_name.get(end.checked_sub(1)?)? as usize;
        (self.tensors[i].name == name).then_some(i)
    }
}

/// How to open a checkpoint.
#[derive(Debug, Clone, Copy)]
pub struct ReadOptions {
    /// Verify a crc trailer or `crc_num` metadata when present.
    pub verify_crc: bool,
}

impl Default for ReadOptions {
    fn default() -> Self {
        ReadOptions { verify_crc: true }
    }
}

/// An open checkpoint file (a byte source) with its index.
pub struct CheckpointFile {
    src: Arc<dyn ByteSource>,
    index: CheckpointIndex,
}

impl CheckpointFile {
    /// Opens (memory-mapped) and indexes a `.ckpt` or `.safetensors` file (the extension
    /// decides; anything but `.safetensors` is read as `.ckpt`).
    pub fn open(path: &Path, opts: ReadOptions) -> Result<Self> {
        Self::open_with(path, opts, IoMode::Mmap)
    }

    /// [`CheckpointFile::open`] with the given way of reading.
    pub fn open_with(path: &Path, opts: ReadOptions, io: IoMode) -> Result<Self> {
        Self::from_source(crate::storage::open(path, io)?, opts)
    }

    /// Indexes an opened byte source (its path's extension picks the format).
    pub fn from_source(src: Arc<dyn ByteSource>, opts: ReadOptions) -> Result<Self> {
        let index = parse_source(&*src, opts);
        // A file truncated or rewritten while it was parsed (and its crc checked) is reported
        // as such, rather than as the damage that reading a mix of versions looks like.
        src.check()?;
        Ok(CheckpointFile { src, index: index? })
    }

    /// The path it was opened from.
    pub fn path(&self) -> &Path {
        self.src.path()
    }

    /// The index.
    pub fn index(&self) -> &CheckpointIndex {
        &self.index
    }

    /// The byte source.
    pub fn source(&self) -> &Arc<dyn ByteSource> {
        &self.src
    }

    /// A tensor's content: borrowed when the source has a view of it in one segment, else read.
    pub fn content(&self, t: &TensorInfo) -> std::borrow::Cow<'_, [u8]> {
        self.try_content(t).unwrap_or_default()
    }

    /// A tensor's content, or the error reading it.
    pub fn try_content(&self, t: &TensorInfo) -> Result<std::borrow::Cow<'_, [u8]>> {
        if let [s] = t.segments.as_slice() {
            if let Some(v) = self.src.view(s.offset, s.len) {
                return Ok(std::borrow::Cow::Borrowed(v));
            }
        }
        let mut out = vec![0u8; t.nbytes as usize];
        let mut at = 0usize;
        for s in &t.segments {
            self.src.read_at(s.offset, &mut out[at..at + s.len as usize])?;
            at += s.len as usize;
        }
        Ok(std::borrow::Cow::Owned(out))
    }

    /// Consumes self, returning the index.
    pub fn into_index(self) -> CheckpointIndex {
        self.index
    }

    /// Consumes self, returning the source and the index.
    pub fn into_parts(self) -> (Arc<dyn ByteSource>, CheckpointIndex) {
        (self.src, self.index)
    }
}

/// Indexes a byte source in the format its path's extension names (`.ckpt` otherwise).
pub fn parse_source(src: &dyn ByteSource, opts: ReadOptions) -> Result<CheckpointIndex> {
    match Format::from_path(src.path()) {
        Some(Format::Safetensors) => safetensors::parse_source(src, opts),
        _ => ckpt::parse_source(src, opts),
    }
}

/// A tensor's content within `bytes`.
pub fn content_of<'a>(bytes: &'a [u8], t: &TensorInfo) -> std::borrow::Cow<'a, [u8]> {
    let seg = |s: &Segment| &bytes[s.offset as usize..(s.offset + s.len) as usize];
    if t.segments.len() == 1 {
        std::borrow::Cow::Borrowed(seg(&t.segments[0]))
    } else {
        std::borrow::Cow::Owned(t.segments.iter().flat_map(|s| seg(s).iter().copied()).collect())
    }
}

/// A tensor to be written: header fields and content size.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TensorHeader {
    /// The tag.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// The dims to write.
    pub dims: Vec<u64>,
    /// Content bytes.
    pub nbytes: u64,
}

/// Where a tensor's content goes in an output file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContentRun {
    /// Offset within the tensor's content.
    pub start: u64,
    /// Offset in the file.
    pub file_offset: u64,
    /// Length.
    pub len: u64,
}

/// The byte layout of an output file, computed before anything is written, so that headers and
/// content can be written at known offsets in any order and by several threads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileLayout {
    /// Fixed bytes (protobuf headers, safetensors header) and their offsets.
    pub fixed: Vec<(u64, Vec<u8>)>,
    /// Per tensor (same order as the input), where its content runs go.
    pub content: Vec<Vec<ContentRun>>,
    /// Total file size, excluding a crc trailer.
    pub len: u64,
}

impl FileLayout {
    /// The whole file in memory, given each tensor's content (for small files and tests; the
    /// executor writes runs at their offsets instead).
    pub fn render(&self, contents: &[&[u8]]) -> Vec<u8> {
        let mut out = vec![0u8; self.len as usize];
        for (off, b) in &self.fixed {
            out[*off as usize..*off as usize + b.len()].copy_from_slice(b);
        }
        for (runs, data) in self.content.iter().zip(contents) {
            for r in runs {
                out[r.file_offset as usize..(r.file_offset + r.len) as usize]
                    .copy_from_slice(&data[r.start as usize..(r.start + r.len) as usize]);
            }
        }
        out
    }

    /// Maps a range of a tensor's content to file runs: (file offset, offset within range, len).
    pub fn place(&self, tensor: usize, start: u64, len: u64) -> Vec<(u64, u64, u64)> {
        let end = start + len;
        self.content[tensor]
            .iter()
            .filter_map(|r| {
                let a = start.max(r.start);
                let b = end.min(r.start + r.len);
                (a < b).then(|| (r.file_offset + (a - r.start), a - start, b - a))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_by_name_finds_each_name_and_the_last_of_a_repeated_one() {
        let t = |name: &str, n: u64| TensorInfo {
            name: name.into(),
            dtype: DType::Float32,
            shape: Dims::from_slice(&[n]),
            raw_dims: Dims::from_slice(&[n]),
            segments: Segments::new(),
            nbytes: 4 * n,
            file: 0,
        };
        let names = ["w", "b", "a.b", "a", "w", "", "zz"];
        let tensors: Vec<TensorInfo> = names.iter().enumerate().map(|(i, n)| t(n, i as u64)).collect();
        let idx = CheckpointIndex::new(Format::Ckpt, tensors, 0, None, BTreeMap::new());
        assert_eq!(idx.first_position("w"), Some(0));
        for (want, n) in [(1, "b"), (2, "a.b"), (3, "a"), (4, "w"), (5, ""), (6, "zz")] {
            assert_eq!(idx.position(n), Some(want), "{n:?}");
            assert_eq!(idx.first_position(n), Some(if n == "w" { 0 } else { want }), "{n:?}");
            assert_eq!(idx.get(n).map(|x| x.shape[0]), Some(want as u64));
        }
        for n in ["x", "a.", "ww", "z", "aa", "B"] {
            assert_eq!(idx.position(n), None, "{n:?}");
            assert_eq!(idx.first_position(n), None, "{n:?}");
        }
        let empty = CheckpointIndex::new(Format::Ckpt, vec![], 0, None, BTreeMap::new());
        assert_eq!(empty.position("w"), None);
    }

    #[test]
    fn many_repeats_keep_their_file_order_in_the_unstable_sort() {
        // Enough positions for the unstable sort to partition rather than insert: ties must
        // still come in file order (first_position the first, position the last).
        let t = |name: String| TensorInfo {
            name: name.into(),
            dtype: DType::Float32,
            shape: Dims::new(),
            raw_dims: Dims::new(),
            segments: Segments::new(),
            nbytes: 0,
            file: 0,
        };
        let tensors: Vec<TensorInfo> = (0..2000).map(|i| t(format!("n{}", (i * 7919) % 13))).collect();
        let idx = CheckpointIndex::new(Format::Ckpt, tensors, 0, None, BTreeMap::new());
        for k in 0..13 {
            let name = format!("n{k}");
            let all: Vec<usize> = (0..2000).filter(|i| (i * 7919) % 13 == k).collect();
            assert_eq!(idx.first_position(&name), all.first().copied(), "{name}");
            assert_eq!(idx.position(&name), all.last().copied(), "{name}");
        }
        assert!(idx.by_name.windows(2).all(|w| {
            let (a, b) = (&idx.tensors[w[0] as usize].name, &idx.tensors[w[1] as usize].name);
            a < b || (a == b && w[0] < w[1])
        }));
    }
}
