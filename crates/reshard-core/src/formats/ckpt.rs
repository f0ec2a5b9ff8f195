//! MindSpore `.ckpt` files: a protobuf `Checkpoint` of `Value {tag, TensorProto}` entries,
//! optionally followed by a 17-byte `crc_num` trailer.

use std::path::Path;

use crate::checkpoint::{
    CheckpointIndex, ContentRun, Dims, FileLayout, Format, ReadOptions, Segment, TableBuilder, TensorHeader, TensorInfo,
};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::storage::{ByteReader, ByteSource, MemSource};
use crate::wire::{put_bytes, put_field, varint_len, Cursor, WT_I32, WT_I64, WT_LEN, WT_VARINT};

/// MindSpore cuts tensors into values of at most this many content bytes (`1024 * SLICE_SIZE`).
pub const CHUNK_BYTES: u64 = 512 << 20;

/// `b"crc_num"` + 10 big-endian bytes.
pub const CRC_TRAILER_LEN: usize = 17;
const CRC_MAGIC: &[u8] = b"crc_num";

/// Magic numbers at the start of MindSpore's encrypted checkpoints (AES-GCM, AES-CBC, SM4-CBC).
const CIPHER_MAGICS: [u32; 3] = [0x7F3A_5ED8, 0x7F3A_5ED9, 0x7F3A_5EDA];

/// The crc trailer MindSpore appends with `crc_check=True`.
pub fn crc_trailer(crc: u32) -> [u8; CRC_TRAILER_LEN] {
    let mut t = [0u8; CRC_TRAILER_LEN];
    t[..7].copy_from_slice(CRC_MAGIC);
    t[13..].copy_from_slice(&crc.to_be_bytes());
    t
}

fn malformed(path: &Path, detail: String) -> Error {
    Error::Malformed { path: path.to_path_buf(), kind: "checkpoint", detail }
}

fn bad_tensor(path: &Path, tensor: &str, detail: String) -> Error {
    Error::BadTensor { path: path.to_path_buf(), tensor: tensor.to_string(), detail }
}

/// The reads of a table of contents go through the source in chunks of this size (the `pread`
/// path; maps are read in place).
const TOC_CHUNK: usize = 256 << 10;

/// Reads a crc trailer at the end of `src`, if its last bytes are one: the crc it holds.
fn trailer_crc(path: &Path, r: &mut ByteReader<'_>) -> Result<Option<u32>> {
    let n = r.source().len();
    if n < CRC_TRAILER_LEN as u64 {
        return Ok(None);
    }
    r.keep(n - CRC_TRAILER_LEN as u64, CRC_TRAILER_LEN)?;
    let t = r.get(n - CRC_TRAILER_LEN as u64, CRC_TRAILER_LEN)?;
    if &t[..7] != CRC_MAGIC {
        return Ok(None);
    }
    let stored = &t[7..];
    if stored[..6].iter().any(|&b| b != 0) {
        return Err(malformed(path, "crc_num trailer holds a value wider than 32 bits".into()));
    }
    Ok(Some(u32::from_be_bytes([stored[6], stored[7], stored[8], stored[9]])))
}

/// crc32 of the first `len` bytes of `src`, read front to back.
pub(crate) fn crc_of_prefix(src: &dyn ByteSource, len: u64) -> Result<u32> {
    src.will_read_all();
    if let Some(v) = src.view(0, len) {
        return Ok(crc32fast::hash(v));
    }
    let mut h = crc32fast::Hasher::new();
    let mut buf = vec![0u8; (4 << 20).min(len as usize)];
    let mut at = 0;
    while at < len {
        let n = ((len - at) as usize).min(buf.len());
        src.read_at(at, &mut buf[..n])?;
        h.update(&buf[..n]);
        at += n as u64;
    }
    Ok(h.finalize())
}

/// Indexes a `.ckpt` file held in `bytes`. No tensor content is copied.
pub fn parse(path: &Path, bytes: &[u8], opts: ReadOptions) -> Result<CheckpointIndex> {
    parse_source(&MemSource::new(path, bytes), opts)
}

/// Indexes a `.ckpt` file through a byte source: only the protobuf keys, names, dims and types
/// are read, never tensor content (unless the crc trailer is verified, which reads the file once).
pub fn parse_source(src: &dyn ByteSource, opts: ReadOptions) -> Result<CheckpointIndex> {
    parse_reader(&mut ByteReader::new(src, TOC_CHUNK), opts)
}

/// Bytes a parse used, by offset.
pub type UsedBytes = Vec<(u64, Vec<u8>)>;

/// [`parse_source`], also returning every byte the parse used, by offset (the protobuf keys,
/// lengths, names, dims and types; never content): the index is a function of those bytes and
/// of the source's length only, so another object of the same length with the same bytes there
/// has the same index (`toc_predict`).
pub fn parse_source_recorded(src: &dyn ByteSource, opts: ReadOptions) -> Result<(CheckpointIndex, UsedBytes)> {
    let mut r = ByteReader::new(src, TOC_CHUNK);
    r.record();
    let index = parse_reader(&mut r, opts)?;
    Ok((index, r.take_kept()))
}

fn parse_reader(r: &mut ByteReader<'_>, opts: ReadOptions) -> Result<CheckpointIndex> {
    let src = r.source();
    let path = src.path();
    let len = src.len();
    if len >= 4 {
        r.keep(0, 4)?;
        let b = r.get(0, 4)?;
        let head = [b[0], b[1], b[2], b[3]];
        if CIPHER_MAGICS.contains(&u32::from_be_bytes(head)) || CIPHER_MAGICS.contains(&u32::from_le_bytes(head)) {
            return Err(Error::Unsupported {
                path: path.to_path_buf(),
                detail: "the checkpoint is encrypted (MindSpore enc_key/enc_mode); decrypt it with MindSpore first, \
                         reshard does not handle encrypted checkpoints"
                    .into(),
            });
        }
    }
    if len == 0 {
        return Err(malformed(path, "the file is empty (0 bytes)".into()));
    }
    // A trailer is b"crc_num" + 10 bytes at the end. Tensor content can end with the same
    // bytes by chance; a real trailer never parses as protobuf (0x63 is field 12 with wire type
    // 3, which checkpoints never use), so when the whole file parses, there is no trailer.
    let (mut tensors, crc) = match parse_values(path, r, len) {
        Ok(t) => (t, None),
        Err(e) => match trailer_crc(path, r)? {
            Some(expected) => {
                let body = len - CRC_TRAILER_LEN as u64;
                let tensors = parse_values(path, r, body)?;
                if opts.verify_crc {
                    let actual = crc_of_prefix(src, body)?;
                    if actual != expected {
                        return Err(Error::CrcMismatch { path: path.to_path_buf(), expected, actual });
                    }
                }
                (tensors, Some(expected))
            }
            None => return Err(e),
        },
    };
    if tensors.is_empty() {
        // Protobuf reads any run of well-formed fields as a message, so a stray file (a strategy
        // file, 4 bytes of `08 05 08 07`) parses as a checkpoint without a single value.
        return Err(malformed(path, format!("no tensors: the {len} bytes hold no Value (field 1) of a Checkpoint")));
    }
    for t in &mut tensors {
        if checked_shape(path, t)? {
            t.set_shape_empty();
        }
    }
    let index = CheckpointIndex::new(Format::Ckpt, tensors, len, crc, Default::default());
    if let Some((a, b)) = index.first_repeat() {
        let at = |i: usize| index.tensors[i].offset();
        return Err(bad_tensor(
            path,
            index.tensors[b].name(),
            format!("appears twice, not consecutively (content at bytes {} and {})", at(a), at(b)),
        ));
    }
    Ok(index)
}

/// Walks the protobuf `Checkpoint` in bytes [0, end) of the source, joining consecutive values
/// of one tag.
fn parse_values(path: &Path, r: &mut ByteReader<'_>, end: u64) -> Result<Vec<TensorInfo>> {
    let mut tensors: Vec<TensorInfo> = Vec::new();
    let mut table = TableBuilder::new();
    let mut cur = SrcCursor { pos: 0, end };
    // The lengths of the values walked so far, and their names with the layer numbers left
    // out, for guessing where the next headers are.
    let mut lens: Vec<u64> = Vec::new();
    let mut kinds: Vec<String> = Vec::new();
    let mut prev: Option<u64> = None;
    while !cur.is_empty() {
        let at = cur.pos;
        if r.exact() {
            lens.extend(prev.map(|p| at - p));
            prev = Some(at);
            // Only the last lengths are looked at: a file of many tiny fields must not make
            // this list several times its own size.
            if lens.len() > 2 * LENGTHS_KEPT {
                lens.drain(..lens.len() - LENGTHS_KEPT);
            }
            if kinds.len() > 2 * LENGTHS_KEPT {
                kinds.drain(..kinds.len() - LENGTHS_KEPT);
            }
            if !r.has(at, 10) {
                let mut offsets = vec![at];
                let named = named_period(&kinds);
                offsets.extend(next_headers(&lens, at, SPECULATED_HEADERS, named).into_iter().filter(|&o| o < end));
                // A failed guess is no reason to fail: the next header alone, then.
                if r.speculate(&offsets).is_err() {
                    r.speculate(&offsets[..1])?;
                }
            }
        }
        let (field, wt) = cur.key(r)?;
        if field != 1 || wt != WT_LEN {
            if r.exact() {
                kinds.push(String::new());
            }
            cur.skip(r, wt).map_err(|e| match e {
                Error::Malformed { detail, .. } => {
                    malformed(path, format!("{detail} (unknown field {field} at byte {at})"))
                }
                e => e,
            })?;
            continue;
        }
        let value = cur.len_delimited(r)?;
        let (name, dtype, dims, seg) = parse_value(path, r, value)?;
        if r.exact() {
            kinds.push(layer_kind(&name));
        }
        match tensors.last_mut() {
            Some(last) if table.name(last) == name => {
                if last.dtype != dtype || table.raw_dims(last) != dims.as_slice() {
                    return Err(bad_tensor(
                        path,
                        &name,
                        format!(
                            "consecutive values disagree: {} {:?} then {} {:?}",
                            last.dtype,
                            table.raw_dims(last),
                            dtype,
                            dims
                        ),
                    ));
                }
                table.add_segment(path, last, seg)?;
            }
            // A name seen before, not just now, is refused once the index is sorted by name
            // (`parse_source`): a set of every name here took 21 MB for 300,000 tensors.
            _ => {
                // Grown by a quarter at a time rather than doubled: at its last doubling the
                // vector and its earlier capacity took up to three times what is kept (the
                // index is trimmed to its length once the file is read).
                if tensors.len() == tensors.capacity() {
                    tensors.reserve_exact((tensors.len() / 4).max(64));
                }
                tensors.push(table.push(path, &name, dtype, &dims, seg)?);
            }
        }
    }
    table.finish(&mut tensors);
    Ok(tensors)
}

/// How many headers past the next one a walk over an object store fetches at once, when the
/// lengths of the values before repeat (the layers of a model: their tensors have the same
/// sizes): a header is a round trip. On the S3 bench model a walk of 141 headers made 141 round
/// trips; with guesses it makes 38-40 (and about 60 GETs more, of 1 KiB, for wrong guesses).
const SPECULATED_HEADERS: usize = 16;

/// The longest period [`next_headers`] looks for.
const MAX_PERIOD: usize = 64;
/// How many lengths one period apart it compares at most.
const MAX_MATCH: usize = 16;
/// The lengths a walk keeps (at least what [`next_headers`] reads).
const LENGTHS_KEPT: usize = MAX_PERIOD + MAX_MATCH + 1;

/// A value's name with its layer numbers (dotted parts all digits) as `#`: the same for a
/// layer's tensor in every layer (`model.layers.#.attention.wq.weight`).
fn layer_kind(name: &str) -> String {
    let parts: Vec<&str> =
        name.split('.').map(|p| if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) { "#" } else { p }).collect();
    parts.join(".")
}

/// How many values before the last one (`kinds`, in order) its kind was last seen, if it was:
/// the last value is then the same tensor of the next layer, and the values after it are taken
/// to follow as they did then.
fn named_period(kinds: &[String]) -> Option<usize> {
    // Fields other than values have no name.
    let (last, before) = kinds.split_last().filter(|(k, _)| !k.is_empty())?;
    let reach = before.len().saturating_sub(MAX_PERIOD);
    before[reach..].iter().rev().position(|k| k == last).map(|i| i + 1)
}

/// Where up to `k` values after the one at `at` start, guessed from the lengths walked so far
/// (`lens`, in order). With `named` (the period [`named_period`] found), `k` guesses follow
/// that period, shifted by the shift of the last length (when it is a few bytes). Else the
/// period whose copy reaches furthest back (the last `m` lengths equal those one period before,
/// give or take the same few bytes: layer 10's names are a byte longer than layer 9's; the
/// shortest period among equals, then the one with no shift) is taken to go on, for `m` values
/// at most, so that a poor match risks few fetches. A guess is never trusted: a walk takes a
/// header fetched ahead only when the chain of lengths reaches its offset. No guess unless a
/// name or two lengths or more match.
fn next_headers(lens: &[u64], at: u64, k: usize, named: Option<usize>) -> Vec<u64> {
    const MAX_SHIFT: i128 = 4;
    let n = lens.len();
    // In i128: lengths come from the file and may be anything up to u64::MAX.
    let shift = |t: usize, p: usize| lens[n - 1 - t] as i128 - lens[n - 1 - t - p] as i128;
    let matched = |p: usize| {
        let d = shift(0, p);
        let m = (0..(n - p).min(MAX_MATCH)).take_while(|&t| shift(t, p) == d).count();
        // Lengths that grow value after value are no layer of a model (a period of 1 takes no
        // shift).
        (if d == 0 || (p > 1 && d.abs() <= MAX_SHIFT) { m } else { 0 }, d)
    };
    // A period of 1 takes no shift (each guess would move further).
    let (m, d, p) = match named.filter(|&p| p < n && (p > 1 || shift(0, p) == 0)) {
        Some(p) => (k, Some(shift(0, p)).filter(|d| d.abs() <= MAX_SHIFT).unwrap_or(0), p),
        None => {
            let best = (1..=MAX_PERIOD.min(n.saturating_sub(1)))
                .map(|p| (matched(p), p))
                .max_by_key(|&((m, d), p)| (m, d == 0, std::cmp::Reverse(p)));
            let Some(((m, d), p)) = best.filter(|&((m, _), _)| m >= 2) else {
                return Vec::new();
            };
            (m, d, p)
        }
    };
    // Each guess past the previous one (a length and a shift of 0 or less guess nothing).
    let mut o = at as i128;
    let mut out = Vec::with_capacity(k.min(m));
    for j in 0..k.min(m) {
        let next = o + lens[n - p + j % p] as i128 + d;
        let Some(g) = u64::try_from(next).ok().filter(|_| next > o) else { break };
        out.push(g);
        o = next;
    }
    out
}

/// A protobuf cursor over bytes [pos, end) of a source, reading keys and small fields through a
/// [`ByteReader`] and skipping large ones (tensor content) without reading them.
struct SrcCursor {
    pos: u64,
    end: u64,
}

impl SrcCursor {
    fn is_empty(&self) -> bool {
        self.pos >= self.end
    }

    fn varint(&mut self, r: &mut ByteReader<'_>) -> Result<u64> {
        let path = r.source().path();
        let avail = (self.end - self.pos).min(10) as usize;
        // A read error stays an I/O error; only what the bytes say is "malformed".
        let b = r.get(self.pos, avail)?;
        let mut c = Cursor::new(b, self.pos);
        let v = c.varint();
        // The bytes the varint took, or on an error all those looked at.
        let used = match &v {
            Ok(_) => (c.offset() - self.pos) as usize,
            Err(_) => avail,
        };
        let next = c.offset();
        r.keep(self.pos, used)?;
        let v = v.map_err(|e| malformed(path, e))?;
        self.pos = next;
        Ok(v)
    }

    fn key(&mut self, r: &mut ByteReader<'_>) -> Result<(u64, u8)> {
        let at = self.pos;
        let k = self.varint(r)?;
        let field = k >> 3;
        if field == 0 {
            return Err(malformed(r.source().path(), format!("field number 0 at byte {at}")));
        }
        Ok((field, (k & 7) as u8))
    }

    /// Skips a length-delimited payload; returns its range.
    fn len_delimited(&mut self, r: &mut ByteReader<'_>) -> Result<SrcCursor> {
        let len = self.varint(r)?;
        let avail = self.end - self.pos;
        if len > avail {
            return Err(malformed(
                r.source().path(),
                format!("length {len} at byte {} runs past the end ({avail} bytes left)", self.pos),
            ));
        }
        let inner = SrcCursor { pos: self.pos, end: self.pos + len };
        self.pos += len;
        Ok(inner)
    }

    fn skip(&mut self, r: &mut ByteReader<'_>, wt: u8) -> Result<()> {
        let n = match wt {
            WT_VARINT => return self.varint(r).map(drop),
            WT_LEN => return self.len_delimited(r).map(drop),
            WT_I64 => 8,
            WT_I32 => 4,
            _ => return Err(malformed(r.source().path(), format!("unsupported wire type {wt} at byte {}", self.pos))),
        };
        if self.end - self.pos < n {
            return Err(malformed(r.source().path(), format!("truncated fixed field at byte {}", self.pos)));
        }
        self.pos += n;
        Ok(())
    }
}

/// The bytes of a small field (names, type names, packed dims).
fn field_bytes<'r>(path: &Path, r: &'r mut ByteReader<'_>, f: &SrcCursor) -> Result<&'r [u8]> {
    // A name or a list of dims larger than this is not a checkpoint's.
    const MAX_FIELD: u64 = 64 << 20;
    let n = f.end - f.pos;
    if n > MAX_FIELD {
        return Err(malformed(path, format!("a {n}-byte name or dims field at byte {}", f.pos)));
    }
    r.keep(f.pos, n as usize)?;
    r.get(f.pos, n as usize)
}

fn parse_value(path: &Path, r: &mut ByteReader<'_>, mut cur: SrcCursor) -> Result<(String, DType, Dims, Segment)> {
    let base = cur.pos;
    let mut tag: Option<String> = None;
    let mut tensor: Option<SrcCursor> = None;
    while !cur.is_empty() {
        let (field, wt) = cur.key(r)?;
        match (field, wt) {
            (1, WT_LEN) => {
                let f = cur.len_delimited(r)?;
                let at = f.pos;
                let b = field_bytes(path, r, &f)?;
                let s =
                    std::str::from_utf8(b).map_err(|_| malformed(path, format!("tag at byte {at} is not UTF-8")))?;
                tag = Some(s.to_string());
            }
            (2, WT_LEN) => tensor = Some(cur.len_delimited(r)?),
            (3, _) => {
                return Err(Error::Unsupported {
                    path: path.to_path_buf(),
                    detail: format!(
                        "value '{}' is a MapTensor (MapParameter); reshard only handles dense tensors",
                        tag.unwrap_or_default()
                    ),
                })
            }
            _ => cur.skip(r, wt)?,
        }
    }
    let tag = tag.ok_or_else(|| malformed(path, format!("value at byte {base} has no tag")))?;
    let mut cur = tensor.ok_or_else(|| malformed(path, format!("value '{tag}' at byte {base} has no tensor")))?;
    let mut dims = Dims::new();
    let mut dtype: Option<String> = None;
    let mut content: Option<Segment> = None;
    let dim = |v: u64, dims: &mut Dims| -> Result<()> {
        if (v as i64) < 0 {
            return Err(bad_tensor(path, &tag, format!("negative dim {}", v as i64)));
        }
        dims.push(v);
        Ok(())
    };
    while !cur.is_empty() {
        let (field, wt) = cur.key(r)?;
        match (field, wt) {
            (1, WT_VARINT) => dim(cur.varint(r)?, &mut dims)?,
            (1, WT_LEN) => {
                let f = cur.len_delimited(r)?;
                let at = f.pos;
                let packed = field_bytes(path, r, &f)?;
                let mut p = Cursor::new(packed, at);
                while !p.is_empty() {
                    dim(p.varint().map_err(|e| malformed(path, e))?, &mut dims)?;
                }
            }
            (2, WT_LEN) => {
                let f = cur.len_delimited(r)?;
                dtype = Some(String::from_utf8_lossy(field_bytes(path, r, &f)?).into_owned());
            }
            (3, WT_LEN) => {
                let f = cur.len_delimited(r)?;
                content = Some(Segment { offset: f.pos, len: f.end - f.pos });
            }
            _ => cur.skip(r, wt)?,
        }
    }
    let dtype = dtype.ok_or_else(|| bad_tensor(path, &tag, "no tensor_type".into()))?;
    let dtype = DType::from_ckpt_name(&dtype)
        .ok_or_else(|| bad_tensor(path, &tag, format!("unknown tensor_type {dtype:?}")))?;
    let content = content.ok_or_else(|| bad_tensor(path, &tag, "no tensor_content".into()))?;
    Ok((tag, dtype, dims, content))
}

/// Checks content size against dims x dtype size; returns whether the shape is empty whatever
/// the dims written (strings, and `[0]` read as a scalar), else the shape is the dims.
fn checked_shape(path: &Path, t: &TensorInfo) -> Result<bool> {
    let size = t.dtype.size();
    let (nbytes, raw_dims) = (t.nbytes(), t.raw_dims());
    if t.dtype == DType::Str {
        if nbytes % 4 != 0 {
            return Err(bad_tensor(path, t.name(), format!("string content of {nbytes} bytes is not UTF-32")));
        }
        return Ok(true);
    }
    // MindSpore's loader reads dims == [0] as a scalar.
    if raw_dims == [0] && nbytes == size {
        return Ok(true);
    }
    let numel = raw_dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d));
    let expected = numel.and_then(|n| n.checked_mul(size));
    match expected {
        Some(e) if e == nbytes => Ok(false),
        Some(e) => Err(bad_tensor(
            path,
            t.name(),
            format!(
                "content is {} bytes but dims {:?} x {} ({} bytes each) need {}",
                nbytes, raw_dims, t.dtype, size, e
            ),
        )),
        None => Err(bad_tensor(path, t.name(), format!("dims {raw_dims:?} overflow 64 bits"))),
    }
}

/// The protobuf bytes that precede `content_len` bytes of content in one value, as MindSpore's
/// protobuf serializer writes them (fields in number order, dims unpacked).
fn value_prefix(h: &TensorHeader, content_len: u64) -> Vec<u8> {
    let type_name = h.dtype.ckpt_name().as_bytes();
    let dims_len: u64 = h.dims.iter().map(|&d| 1 + varint_len(d)).sum();
    let tp_len = dims_len
        + 1
        + varint_len(type_name.len() as u64)
        + type_name.len() as u64
        + 1
        + varint_len(content_len)
        + content_len;
    let name = h.name.as_bytes();
    let value_len = 1 + varint_len(name.len() as u64) + name.len() as u64 + 1 + varint_len(tp_len) + tp_len;
    let mut out = Vec::with_capacity(32 + name.len() + h.dims.len() * 4);
    put_field(&mut out, 1, WT_LEN, value_len);
    put_bytes(&mut out, 1, name);
    put_field(&mut out, 2, WT_LEN, tp_len);
    for &d in &h.dims {
        put_field(&mut out, 1, WT_VARINT, d);
    }
    put_bytes(&mut out, 2, type_name);
    // The content follows: only its length is written here.
    put_field(&mut out, 3, WT_LEN, content_len);
    out
}

/// The bytes one tensor takes in a `.ckpt` file (its values, headers and content), as
/// [`layout`] lays it out, computed without building the headers.
pub fn tensor_len(name: &str, dtype: DType, dims: &[u64], nbytes: u64, chunk: u64) -> u64 {
    let chunk = chunk.max(1);
    let type_name = dtype.ckpt_name().len() as u64;
    let dims_len: u64 = dims.iter().map(|&d| 1 + varint_len(d)).sum();
    let name = name.len() as u64;
    let mut total = 0;
    let mut start = 0u64;
    loop {
        let len = (nbytes - start).min(chunk);
        let tp_len = dims_len + 1 + varint_len(type_name) + type_name + 1 + varint_len(len) + len;
        let value_len = 1 + varint_len(name) + name + 1 + varint_len(tp_len) + tp_len;
        total += 1 + varint_len(value_len) + value_len;
        start += len;
        if start >= nbytes {
            return total;
        }
    }
}

/// Lays out a `.ckpt` file: tensors in the given order, each cut into values of at most
/// `chunk` content bytes (MindSpore uses [`CHUNK_BYTES`]).
pub fn layout(tensors: &[TensorHeader], chunk: u64) -> FileLayout {
    layout_at(tensors, chunk, 0)
}

/// [`layout`] for a run of consecutive tensors of a file that starts at file offset `base`
/// (the values are laid out one after the other, so a run's offsets follow from where it
/// starts): a file of many tensors can be laid out and written a window at a time. The
/// returned `len` is the offset where the run ends.
pub fn layout_at(tensors: &[TensorHeader], chunk: u64, base: u64) -> FileLayout {
    let chunk = chunk.max(1);
    let mut fixed = Vec::new();
    let mut content = Vec::with_capacity(tensors.len());
    let mut pos = base;
    for h in tensors {
        let mut runs = Vec::new();
        let mut start = 0u64;
        loop {
            let len = (h.nbytes - start).min(chunk);
            let prefix = value_prefix(h, len);
            let plen = prefix.len() as u64;
            fixed.push((pos, prefix));
            pos += plen;
            runs.push(ContentRun { start, file_offset: pos, len });
            pos += len;
            start += len;
            if start >= h.nbytes {
                break;
            }
        }
        content.push(runs);
    }
    FileLayout { fixed, content, len: pos }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(name: &str, dtype: DType, dims: &[u64]) -> TensorHeader {
        let n: u64 = dims.iter().product::<u64>() * dtype.size();
        TensorHeader { name: name.into(), dtype, dims: dims.to_vec(), nbytes: n }
    }

    fn render(l: &FileLayout, contents: &[Vec<u8>]) -> Vec<u8> {
        l.render(&contents.iter().map(Vec::as_slice).collect::<Vec<_>>())
    }

    /// Guesses follow the period that matches furthest back, as far as it matched, shifted by
    /// a few bytes when the names grew, and none is made without two matching lengths.
    #[test]
    fn next_headers_follow_the_repeating_lengths() {
        // A layer of four values (10, 10, 20, 30), twice, and the first value of a third.
        let lens = [5, 10, 10, 20, 30, 10, 10, 20, 30, 10];
        assert_eq!(next_headers(&lens, 1000, 4, None), [1010, 1030, 1060, 1070]);
        // Matched for 5 lengths: at most 5 guesses.
        assert_eq!(next_headers(&lens, 1000, 16, None).len(), 5);
        assert!(next_headers(&[5, 10], 1000, 8, None).is_empty());
        assert!(next_headers(&[5, 90, 7, 300], 1000, 8, None).is_empty());
        // Lengths growing by one: no period of 1 with a shift.
        assert!(next_headers(&[5, 6, 7], 1000, 8, None).is_empty());
        // Lengths from a hostile file: no overflow, no guess behind the previous one.
        assert!(next_headers(&[u64::MAX, 3, u64::MAX, 3], 1000, 8, None).iter().all(|&g| g > 1000));
        assert!(next_headers(&[0, 0, 0, 0], 1000, 8, None).is_empty());
        // Equal lengths: period 1.
        assert_eq!(next_headers(&[7, 7, 7], 0, 3, None), [7, 14]);
        // Layer 10 after layer 9: its names a byte longer, the sizes the same.
        let lens = [5, 10, 10, 20, 30, 11, 11];
        assert_eq!(next_headers(&lens, 1000, 2, None), [1021, 1052]);
    }

    /// A layer's tensor has the same kind in every layer, and the last value's kind seen before
    /// gives the period: the values after it guessed as many as asked, although the lengths
    /// matched too briefly to guess any (the tensor before the layer was of another size).
    #[test]
    fn names_give_the_period_of_the_layers() {
        assert_eq!(layer_kind("model.layers.12.attention.wq.weight"), "model.layers.#.attention.wq.weight");
        assert_eq!(layer_kind("model.layers.3.feed_forward.w1.weight"), "model.layers.#.feed_forward.w1.weight");
        assert_eq!(layer_kind("adam_m.0"), "adam_m.#");
        let kinds: Vec<String> = ["emb", "l.0.a", "l.0.b", "l.0.c", "l.1.a"].iter().map(|n| layer_kind(n)).collect();
        assert_eq!(named_period(&kinds), Some(3));
        assert_eq!(named_period(&kinds[..4]), None);
        // Fields other than values (no name) give no period.
        assert_eq!(named_period(&[String::new(), String::new()]), None);
        // Lengths into values 1..=4 (the first after a value of 500 bytes), the walk at value 5.
        let lens = [500, 10, 20, 30, 10];
        assert!(next_headers(&lens, 1000, 4, None).is_empty());
        assert_eq!(next_headers(&lens, 1000, 4, Some(3)), [1020, 1050, 1060, 1080]);
    }

    /// A walk that guesses (an object store's exact reads) indexes a file as one that does not,
    /// whether the guesses are right or wrong, and waits for fewer fetches one after the other
    /// (reads and batches of reads, counted alike).
    #[test]
    fn a_walk_with_guesses_indexes_as_one_without() {
        // Twelve layers of the same sizes, then tensors of other sizes (guesses go wrong there).
        let mut headers = Vec::new();
        for l in 0..12 {
            for (n, rows) in [("q", 300u64), ("k", 300), ("ffn", 900), ("norm", 1)] {
                headers.push(header(&format!("layers.{l:02}.{n}"), DType::Float32, &[rows, 16]));
            }
        }
        for (k, rows) in [7u64, 300, 11, 900, 2].into_iter().enumerate() {
            headers.push(header(&format!("z.{k}"), DType::Float32, &[rows, 16]));
        }
        let l = layout(&headers, CHUNK_BYTES);
        let contents: Vec<Vec<u8>> = headers.iter().map(|h| vec![7u8; h.nbytes as usize]).collect();
        let bytes = render(&l, &contents);
        let plain = parse(Path::new("a.ckpt"), &bytes, ReadOptions::default()).unwrap();
        let src = crate::storage::RecordingSource::new("s3://b/a.ckpt", &bytes, true);
        let guessed = parse_source(&src, ReadOptions::default()).unwrap();
        assert_eq!(format!("{:?}", guessed.tensors), format!("{:?}", plain.tensors));
        let rounds = src.calls().len();
        // 39 without guesses, 12 with guesses from the lengths alone.
        assert!(rounds <= 10, "{rounds} round trips for {} headers", headers.len());
    }

    #[test]
    fn write_then_read_with_chunks() {
        let hs = vec![header("a", DType::Float32, &[3, 5]), header("s", DType::Int32, &[])];
        let contents: Vec<Vec<u8>> = hs.iter().map(|h| (0..h.nbytes).map(|i| i as u8).collect()).collect();
        let l = layout(&hs, 16);
        let bytes = render(&l, &contents);
        let idx = parse(Path::new("t.ckpt"), &bytes, ReadOptions::default()).unwrap();
        assert_eq!(idx.tensors.len(), 2);
        assert_eq!(idx.tensors[0].segments().len(), 4);
        assert_eq!(idx.tensors[0].shape(), [3, 5]);
        assert!(idx.tensors[1].shape().is_empty());
        let got = crate::checkpoint::content_of(&bytes, &idx.tensors[0]);
        assert_eq!(&*got, &contents[0][..]);
    }

    #[test]
    fn windows_and_lengths_agree_with_the_whole_layout() {
        let hs = vec![
            header("a", DType::Float32, &[3, 5]),
            header("s", DType::Int32, &[]),
            header(&"long".repeat(40), DType::UInt8, &[300]),
            header("e", DType::Float16, &[0, 4]),
        ];
        for chunk in [16, 128, CHUNK_BYTES] {
            let whole = layout(&hs, chunk);
            let lens: u64 = hs.iter().map(|h| tensor_len(&h.name, h.dtype, &h.dims, h.nbytes, chunk)).sum();
            assert_eq!(lens, whole.len, "chunk {chunk}");
            let first = layout_at(&hs[..2], chunk, 0);
            let second = layout_at(&hs[2..], chunk, first.len);
            assert_eq!(second.len, whole.len);
            let fixed: Vec<_> = first.fixed.iter().chain(&second.fixed).cloned().collect();
            let content: Vec<_> = first.content.iter().chain(&second.content).cloned().collect();
            assert_eq!((fixed, content), (whole.fixed, whole.content), "chunk {chunk}");
        }
    }

    #[test]
    fn crc_trailer_is_verified() {
        let hs = vec![header("a", DType::UInt8, &[4])];
        let l = layout(&hs, CHUNK_BYTES);
        let mut bytes = render(&l, &[vec![1, 2, 3, 4]]);
        let crc = crc32fast::hash(&bytes);
        bytes.extend_from_slice(&crc_trailer(crc));
        let idx = parse(Path::new("c.ckpt"), &bytes, ReadOptions::default()).unwrap();
        assert_eq!(idx.crc, Some(crc));
        let n = bytes.len();
        bytes[n - 20] ^= 1;
        let err = parse(Path::new("c.ckpt"), &bytes, ReadOptions::default()).unwrap_err();
        assert!(matches!(err, Error::CrcMismatch { .. }), "{err}");
        assert!(err.to_string().contains("c.ckpt") && err.to_string().contains("crc"));
    }

    #[test]
    fn a_small_tensor_is_indexed_without_allocations_of_its_own() {
        // An index keeps one record per tensor for the whole job (300,000 in the benchmark's
        // many small tensors): 48 bytes (104 with its dims and segment inline, before that
        // three allocations and a name of its own), the names, dims and the segments of
        // tensors of several values in a table the file's tensors share.
        let hs = vec![
            header("w", DType::Float32, &[2, 3]),
            header("b", DType::Float32, &[3]),
            header("s", DType::Str, &[0]),
            header("big", DType::UInt8, &[40]),
            header("z", DType::Int32, &[0]),
            header("e", DType::Int32, &[0, 3]),
        ];
        let mut hs = hs;
        hs[2].nbytes = 8;
        hs[4].nbytes = 4;
        let contents: Vec<Vec<u8>> = hs.iter().map(|h| vec![1; h.nbytes as usize]).collect();
        // Values of at most 16 bytes: "big" is stored in three.
        let bytes = render(&layout(&hs, 16), &contents);
        let idx = parse(Path::new("s.ckpt"), &bytes, ReadOptions::default()).unwrap();
        for t in &idx.tensors {
            assert!(t.name().shares_buffer_with(idx.tensors[0].name()), "{t:?}");
        }
        // (name, shape, raw dims, segments, bytes)
        type Row<'a> = (&'a str, &'a [u64], &'a [u64], usize, u64);
        let got: Vec<Row<'_>> = idx
            .tensors
            .iter()
            .map(|t| (t.name().as_str(), t.shape(), t.raw_dims(), t.segments().len(), t.nbytes()))
            .collect();
        let want: Vec<Row<'_>> = vec![
            ("w", &[2, 3], &[2, 3], 2, 24),
            ("b", &[3], &[3], 1, 12),
            ("s", &[], &[0], 1, 8),
            ("big", &[40], &[40], 3, 40),
            ("z", &[], &[0], 1, 4),
            ("e", &[0, 3], &[0, 3], 1, 0),
        ];
        assert_eq!(got, want);
        for t in &idx.tensors {
            assert_eq!(&*crate::checkpoint::content_of(&bytes, t), &vec![1; t.nbytes() as usize][..], "{t:?}");
        }
        assert_eq!(idx.get("b").map(|t| t.shape().to_vec()), Some(vec![3]));
        assert!(std::mem::size_of::<TensorInfo>() <= 48, "{}", std::mem::size_of::<TensorInfo>());
    }

    #[test]
    fn a_tensor_of_more_dims_than_a_record_counts_is_refused() {
        // A record counts its dims in 16 bits: 65,536 dims of 1 are refused, naming the file
        // and the tensor, rather than read as fewer.
        let many = vec![1u64; 65_536];
        let hs = vec![header("ok", DType::UInt8, &[1]), header("deep", DType::UInt8, &many)];
        let bytes = render(&layout(&hs, CHUNK_BYTES), &[vec![0], vec![0]]);
        let err = parse(Path::new("d.ckpt"), &bytes, ReadOptions::default()).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("d.ckpt") && msg.contains("'deep'") && msg.contains("65536 dims"), "{msg}");
        let idx = parse(Path::new("d.ckpt"), &render(&layout(&hs[..1], CHUNK_BYTES), &[vec![0]]), Default::default());
        assert_eq!(idx.unwrap().tensors[0].shape(), [1]);
    }

    #[test]
    fn size_mismatch_and_repeats_are_refused() {
        let mut h = header("a", DType::Float32, &[2]);
        h.nbytes = 4;
        let l = layout(&[h], CHUNK_BYTES);
        let bytes = render(&l, &[vec![0; 4]]);
        let err = parse(Path::new("x.ckpt"), &bytes, ReadOptions::default()).unwrap_err();
        assert!(err.to_string().contains("need 8"), "{err}");

        let hs =
            vec![header("a", DType::UInt8, &[1]), header("b", DType::UInt8, &[1]), header("a", DType::UInt8, &[1])];
        let l = layout(&hs, CHUNK_BYTES);
        let bytes = render(&l, &[vec![0], vec![0], vec![0]]);
        let err = parse(Path::new("x.ckpt"), &bytes, ReadOptions::default()).unwrap_err();
        assert!(err.to_string().contains("not consecutively"), "{err}");
    }

    #[test]
    fn truncated_files_are_refused() {
        let hs = vec![header("weight", DType::Float32, &[8, 8])];
        let l = layout(&hs, CHUNK_BYTES);
        let bytes = render(&l, &[vec![7; 256]]);
        for cut in [1, 5, bytes.len() / 2, bytes.len() - 1] {
            assert!(parse(Path::new("t.ckpt"), &bytes[..cut], ReadOptions::default()).is_err(), "cut {cut}");
        }
    }

    #[test]
    fn content_that_ends_like_a_crc_trailer_is_content() {
        // Found by fuzzing: the last tensor's bytes end with b"crc_num" + 10 bytes.
        let mut content = vec![1u8; 8];
        content.extend_from_slice(b"crc_num");
        content.extend_from_slice(&[0xc0, 0x3f, 9, 9, 9, 9, 9, 9, 9, 9]);
        content.truncate(24);
        let hs = vec![header("w", DType::UInt8, &[content.len() as u64])];
        let bytes = render(&layout(&hs, CHUNK_BYTES), &[content.clone()]);
        let idx = parse(Path::new("c.ckpt"), &bytes, ReadOptions::default()).unwrap();
        assert_eq!(idx.crc, None);
        assert_eq!(&*crate::checkpoint::content_of(&bytes, &idx.tensors[0]), &content[..]);
        // A real trailer after it is still found and checked.
        let mut with = bytes.clone();
        with.extend_from_slice(&crc_trailer(crc32fast::hash(&bytes)));
        assert!(parse(Path::new("c.ckpt"), &with, ReadOptions::default()).unwrap().crc.is_some());
    }

    #[test]
    fn encrypted_files_are_refused() {
        let mut bytes = 0x7F3A_5ED8u32.to_be_bytes().to_vec();
        bytes.extend_from_slice(&[0; 40]);
        let err = parse(Path::new("e.ckpt"), &bytes, ReadOptions::default()).unwrap_err();
        assert!(err.to_string().contains("encrypted"), "{err}");
    }
}
