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

/// A tensor's dims, as a tensor made on its own takes them (up to two inline).
pub type Dims = smallvec::SmallVec<[u64; 2]>;

/// A tensor's segments: one inline, without an allocation of its own.
pub type Segments = smallvec::SmallVec<[Segment; 1]>;

/// What the records of one file's tensors point into: the file's names one after the other,
/// their dims, and the segments of the tensors stored in several values (a record holds one
/// segment itself). Shared by every tensor of the file.
struct FileTable {
    names: String,
    dims: Vec<u64>,
    segments: Vec<Segment>,
}

impl FileTable {
    fn empty() -> Arc<FileTable> {
        Arc::new(FileTable { names: String::new(), dims: Vec::new(), segments: Vec::new() })
    }
}

/// A tensor's name: a range of its file's buffer of names, which every name of the file shares
/// (16 bytes and no allocation of its own, where a `String` was 24 bytes and a 32-48 byte
/// chunk). Reads as a `&str` (`Deref`, [`Name::as_str`]).
#[derive(Clone)]
pub struct Name {
    table: Arc<FileTable>,
    start: u32,
    len: u32,
}

impl Name {
    /// The name.
    pub fn as_str(&self) -> &str {
        let start = self.start as usize;
        // Ranges are made by `TableBuilder::push` on char boundaries; never panics.
        self.table.names.get(start..start + self.len as usize).unwrap_or("")
    }

    /// Whether two names are ranges of the same buffer.
    pub fn shares_buffer_with(&self, other: &Name) -> bool {
        Arc::ptr_eq(&self.table, &other.table)
    }
}

impl From<String> for Name {
    fn from(s: String) -> Name {
        // Only a name made on its own (tests, deserialization) has a buffer of its own; a length
        // past u32 is cut to nothing rather than panicking (no reader makes one: see TableBuilder).
        let len = u32::try_from(s.len()).unwrap_or(0);
        Name { table: Arc::new(FileTable { names: s, dims: Vec::new(), segments: Vec::new() }), start: 0, len }
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

/// Reading a file's index: its names, dims and segments appended to one table as the tensors
/// are read, then shared by every tensor of the file ([`TableBuilder::finish`]).
pub(crate) struct TableBuilder {
    names: String,
    dims: Vec<u64>,
    segments: Vec<Segment>,
    pending: Arc<FileTable>,
}

/// [`TensorInfo::flags`]: the shape is empty (a string, or MindSpore's `[0]` scalar); the dims
/// are only the ones written.
const SHAPE_EMPTY: u8 = 1;
/// [`TensorInfo::flags`]: the segments are `nsegs` in the table from `first` on.
const SEGS_IN_TABLE: u8 = 2;

impl TableBuilder {
    pub(crate) fn new() -> Self {
        TableBuilder { names: String::new(), dims: Vec::new(), segments: Vec::new(), pending: FileTable::empty() }
    }

    fn too_large(path: &Path, what: String) -> Error {
        Error::Malformed {
            path: path.to_path_buf(),
            kind: if Format::from_path(path) == Some(Format::Safetensors) { "safetensors" } else { "checkpoint" },
            detail: what,
        }
    }

    /// A new tensor of one segment; its name and dims read through [`TableBuilder::name`] and
    /// [`TableBuilder::raw_dims`] until `finish`.
    pub(crate) fn push(
        &mut self,
        path: &Path,
        name: &str,
        dtype: DType,
        dims: &[u64],
        seg: Segment,
    ) -> Result<TensorInfo> {
        let end = self.names.len().checked_add(name.len()).and_then(|e| u32::try_from(e).ok());
        let (Some(_), Ok(start), Ok(len)) = (end, u32::try_from(self.names.len()), u32::try_from(name.len())) else {
            return Err(Self::too_large(
                path,
                format!(
                    "its tensor names take more than 4 GiB (at '{}', after {} bytes of names)",
                    name.chars().take(80).collect::<String>(),
                    self.names.len()
                ),
            ));
        };
        let Ok(ndims) = u16::try_from(dims.len()) else {
            return Err(Self::too_large(
                path,
                format!(
                    "tensor '{}' has {} dims; at most {} are read",
                    name.chars().take(80).collect::<String>(),
                    dims.len(),
                    u16::MAX
                ),
            ));
        };
        let dims_at = u32::try_from(self.dims.len())
            .ok()
            .filter(|&at| u32::try_from(dims.len()).ok().and_then(|n| at.checked_add(n)).is_some());
        let Some(dims_at) = dims_at else {
            return Err(Self::too_large(
                path,
                format!(
                    "its tensors have more than {} dims together (at '{}')",
                    u32::MAX,
                    name.chars().take(80).collect::<String>()
                ),
            ));
        };
        self.names.push_str(name);
        self.dims.extend_from_slice(dims);
        Ok(TensorInfo {
            name: Name { table: self.pending.clone(), start, len },
            first: seg.offset,
            nbytes: seg.len,
            file: 0,
            dims_at,
            nsegs: 1,
            ndims,
            dtype,
            flags: 0,
        })
    }

    /// Adds a segment to `t`, the last tensor pushed (a tensor stored in several consecutive
    /// values).
    pub(crate) fn add_segment(&mut self, path: &Path, t: &mut TensorInfo, seg: Segment) -> Result<()> {
        let nbytes = t.nbytes.checked_add(seg.len);
        let at = u32::try_from(self.segments.len()).ok();
        let (Some(nbytes), Some(at), Some(nsegs)) = (nbytes, at, t.nsegs.checked_add(1)) else {
            return Err(Self::too_large(
                path,
                format!("tensor '{}' has more values or content than can be indexed", self.name(t)),
            ));
        };
        if t.flags & SEGS_IN_TABLE == 0 {
            // Its first segment moves to the table; the following ones come next to it, as no
            // other tensor is pushed in between.
            self.segments.push(Segment { offset: t.first, len: t.nbytes });
            t.first = u64::from(at);
            t.flags |= SEGS_IN_TABLE;
        }
        if u32::try_from(self.segments.len()).is_err() {
            return Err(Self::too_large(
                path,
                format!("tensor '{}' has more values than can be indexed", self.name(t)),
            ));
        }
        self.segments.push(seg);
        t.nsegs = nsegs;
        t.nbytes = nbytes;
        Ok(())
    }

    /// The name of a tensor pushed here.
    pub(crate) fn name<'a>(&'a self, t: &TensorInfo) -> &'a str {
        let start = t.name.start as usize;
        self.names.get(start..start + t.name.len as usize).unwrap_or("")
    }

    /// The dims, as written, of a tensor pushed here.
    pub(crate) fn raw_dims<'a>(&'a self, t: &TensorInfo) -> &'a [u64] {
        let at = t.dims_at as usize;
        self.dims.get(at..at + usize::from(t.ndims)).unwrap_or(&[])
    }

    /// Points every tensor of `tensors` (all pushed here) at the finished table.
    pub(crate) fn finish(self, tensors: &mut [TensorInfo]) {
        let TableBuilder { mut names, mut dims, mut segments, .. } = self;
        names.shrink_to_fit();
        dims.shrink_to_fit();
        segments.shrink_to_fit();
        let table = Arc::new(FileTable { names, dims, segments });
        for t in tensors {
            t.name.table = table.clone();
        }
    }
}

/// One tensor of a checkpoint file: its header and where its bytes are.
///
/// An index keeps one per tensor for the whole job: with many small tensors (300,000 in the
/// benchmark) it is 48 bytes without an allocation of its own. The name, the dims and the
/// segments of a tensor stored in several values are in a table its file's tensors share
/// (the name's); the one segment most tensors have is in the record.
#[derive(Clone)]
pub struct TensorInfo {
    name: Name,
    /// The one segment's offset, or with [`SEGS_IN_TABLE`] the first segment's index in the
    /// table.
    first: u64,
    /// Total content bytes (the one segment's length, when it has one).
    nbytes: u64,
    /// Which of its rank's files holds it (0 when a rank is one file).
    pub file: u32,
    dims_at: u32,
    nsegs: u32,
    ndims: u16,
    /// Element type.
    pub dtype: DType,
    flags: u8,
}

impl TensorInfo {
    /// A tensor record of its own (tests, tools; the readers share one table per file): `dims`
    /// as written, which are its shape, and its content's segments.
    pub fn new(name: &str, dtype: DType, dims: &[u64], segments: &[Segment]) -> TensorInfo {
        let nbytes = segments.iter().map(|s| s.len).fold(0u64, u64::saturating_add);
        let one = segments.len() == 1;
        let first = if one { segments[0].offset } else { 0 };
        let table = FileTable {
            names: name.to_string(),
            dims: dims.to_vec(),
            segments: if one { Vec::new() } else { segments.to_vec() },
        };
        TensorInfo {
            name: Name { table: Arc::new(table), start: 0, len: u32::try_from(name.len()).unwrap_or(0) },
            first,
            nbytes,
            file: 0,
            dims_at: 0,
            nsegs: u32::try_from(segments.len()).unwrap_or(0),
            ndims: u16::try_from(dims.len()).unwrap_or(0),
            dtype,
            flags: if one { 0 } else { SEGS_IN_TABLE },
        }
    }

    /// The tag (parameter name).
    pub fn name(&self) -> &Name {
        &self.name
    }

    /// Shape as stored (scalars and strings: empty).
    pub fn shape(&self) -> &[u64] {
        match self.flags & SHAPE_EMPTY {
            0 => self.raw_dims(),
            _ => &[],
        }
    }

    /// The dims exactly as written in the file (MindSpore writes `[0]` for strings).
    pub fn raw_dims(&self) -> &[u64] {
        let at = self.dims_at as usize;
        self.name.table.dims.get(at..at + usize::from(self.ndims)).unwrap_or(&[])
    }

    /// Content, possibly split over several consecutive values.
    pub fn segments(&self) -> Segments {
        match (self.flags & SEGS_IN_TABLE, self.nsegs) {
            (0, 0) => Segments::new(),
            (0, _) => Segments::from_buf([Segment { offset: self.first, len: self.nbytes }]),
            _ => {
                let at = usize::try_from(self.first).unwrap_or(usize::MAX);
                let all = &self.name.table.segments;
                all.get(at..at.saturating_add(self.nsegs as usize)).unwrap_or(&[]).iter().copied().collect()
            }
        }
    }

    /// Total content bytes.
    pub fn nbytes(&self) -> u64 {
        self.nbytes
    }

    /// Where its content starts in the file (its first segment's offset; 0 without content).
    pub fn offset(&self) -> u64 {
        self.segments().first().map_or(0, |s| s.offset)
    }

    /// Its shape is empty, whatever dims were written (strings, MindSpore's `[0]` scalars).
    pub(crate) fn set_shape_empty(&mut self) {
        self.flags |= SHAPE_EMPTY;
    }

    /// Number of elements.
    pub fn numel(&self) -> u64 {
        self.shape().iter().product()
    }
}

impl PartialEq for TensorInfo {
    fn eq(&self, o: &TensorInfo) -> bool {
        (self.name(), self.dtype, self.shape(), self.raw_dims(), self.nbytes, self.file)
            == (o.name(), o.dtype, o.shape(), o.raw_dims(), o.nbytes, o.file)
            && self.segments() == o.segments()
    }
}

impl Eq for TensorInfo {}

/// [`TensorInfo`] as its fields read: what `Debug` and serde show.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct TensorFields {
    name: String,
    dtype: DType,
    shape: Vec<u64>,
    raw_dims: Vec<u64>,
    segments: Vec<Segment>,
    nbytes: u64,
    #[serde(default)]
    file: u32,
}

impl TensorInfo {
    fn fields(&self) -> TensorFields {
        TensorFields {
            name: self.name.to_string(),
            dtype: self.dtype,
            shape: self.shape().to_vec(),
            raw_dims: self.raw_dims().to_vec(),
            segments: self.segments().to_vec(),
            nbytes: self.nbytes,
            file: self.file,
        }
    }
}

impl std::fmt::Debug for TensorInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let TensorFields { name, dtype, shape, raw_dims, segments, nbytes, file } = self.fields();
        f.debug_struct("TensorInfo")
            .field("name", &name)
            .field("dtype", &dtype)
            .field("shape", &shape)
            .field("raw_dims", &raw_dims)
            .field("segments", &segments)
            .field("nbytes", &nbytes)
            .field("file", &file)
            .finish()
    }
}

impl serde::Serialize for TensorInfo {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        self.fields().serialize(s)
    }
}

impl<'de> serde::Deserialize<'de> for TensorInfo {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<TensorInfo, D::Error> {
        use serde::de::Error as _;
        let f = TensorFields::deserialize(d)?;
        if !(f.shape == f.raw_dims || f.shape.is_empty()) {
            return Err(D::Error::custom(format!(
                "tensor '{}': shape {:?} is neither its dims {:?} nor empty",
                f.name, f.shape, f.raw_dims
            )));
        }
        if f.nbytes != f.segments.iter().map(|s| s.len).fold(0u64, u64::saturating_add) && !f.segments.is_empty() {
            return Err(D::Error::custom(format!(
                "tensor '{}': {} bytes, but its segments hold {}",
                f.name,
                f.nbytes,
                f.segments.iter().map(|s| s.len).fold(0u64, u64::saturating_add)
            )));
        }
        let mut t = TensorInfo::new(&f.name, f.dtype, &f.raw_dims, &f.segments);
        t.nbytes = f.nbytes;
        t.file = f.file;
        if f.shape.is_empty() && !f.raw_dims.is_empty() {
            t.set_shape_empty();
        }
        Ok(t)
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
        let segments = t.segments();
        if let [s] = segments.as_slice() {
            if let Some(v) = self.src.view(s.offset, s.len) {
                return Ok(std::borrow::Cow::Borrowed(v));
            }
        }
        let mut out = vec![0u8; t.nbytes as usize];
        let mut at = 0usize;
        for s in &segments {
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
    let segments = t.segments();
    if segments.len() == 1 {
        std::borrow::Cow::Borrowed(seg(&segments[0]))
    } else {
        std::borrow::Cow::Owned(segments.iter().flat_map(|s| seg(s).iter().copied()).collect())
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
        let t = |name: &str, n: u64| TensorInfo::new(name, DType::Float32, &[n], &[]);
        let names = ["w", "b", "a.b", "a", "w", "", "zz"];
        let tensors: Vec<TensorInfo> = names.iter().enumerate().map(|(i, n)| t(n, i as u64)).collect();
        let idx = CheckpointIndex::new(Format::Ckpt, tensors, 0, None, BTreeMap::new());
        assert_eq!(idx.first_position("w"), Some(0));
        for (want, n) in [(1, "b"), (2, "a.b"), (3, "a"), (4, "w"), (5, ""), (6, "zz")] {
            assert_eq!(idx.position(n), Some(want), "{n:?}");
            assert_eq!(idx.first_position(n), Some(if n == "w" { 0 } else { want }), "{n:?}");
            assert_eq!(idx.get(n).map(|x| x.shape()[0]), Some(want as u64));
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
        let t = |name: String| TensorInfo::new(&name, DType::Float32, &[], &[]);
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
