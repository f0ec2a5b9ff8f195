//! MindSpore `.ckpt` files: a protobuf `Checkpoint` of `Value {tag, TensorProto}` entries,
//! optionally followed by a 17-byte `crc_num` trailer.

use std::path::Path;

use crate::checkpoint::{
    CheckpointIndex, ContentRun, FileLayout, Format, ReadOptions, Segment, TensorHeader, TensorInfo,
};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::wire::{put_key, put_varint, varint_len, Cursor, WT_LEN, WT_VARINT};

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

/// Splits off and checks a crc trailer. Returns the protobuf body and the crc if there was one.
fn split_crc<'a>(path: &Path, bytes: &'a [u8], opts: ReadOptions) -> Result<(&'a [u8], Option<u32>)> {
    let n = bytes.len();
    if n < CRC_TRAILER_LEN || &bytes[n - CRC_TRAILER_LEN..n - 10] != CRC_MAGIC {
        return Ok((bytes, None));
    }
    let body = &bytes[..n - CRC_TRAILER_LEN];
    let stored = &bytes[n - 10..];
    if stored[..6].iter().any(|&b| b != 0) {
        return Err(malformed(path, "crc_num trailer holds a value wider than 32 bits".into()));
    }
    let expected = u32::from_be_bytes([stored[6], stored[7], stored[8], stored[9]]);
    if opts.verify_crc {
        crate::sys::will_read_sequentially(body);
        let actual = crc32fast::hash(body);
        if actual != expected {
            return Err(Error::CrcMismatch { path: path.to_path_buf(), expected, actual });
        }
    }
    Ok((body, Some(expected)))
}

/// Indexes a `.ckpt` file held in `bytes` (usually a memory map). No tensor content is copied.
pub fn parse(path: &Path, bytes: &[u8], opts: ReadOptions) -> Result<CheckpointIndex> {
    if bytes.len() >= 4 {
        let head = [bytes[0], bytes[1], bytes[2], bytes[3]];
        if CIPHER_MAGICS.contains(&u32::from_be_bytes(head)) || CIPHER_MAGICS.contains(&u32::from_le_bytes(head)) {
            return Err(Error::Unsupported {
                path: path.to_path_buf(),
                detail: "the checkpoint is encrypted (MindSpore enc_key/enc_mode); decrypt it with MindSpore first, \
                         reshard does not handle encrypted checkpoints"
                    .into(),
            });
        }
    }
    if bytes.is_empty() {
        return Err(malformed(path, "the file is empty (0 bytes)".into()));
    }
    // A trailer is b"crc_num" + 10 bytes at the end. Tensor content can end with the same
    // bytes by chance; a real trailer never parses as protobuf (0x63 is field 12 with wire type
    // 3, which checkpoints never use), so when the whole file parses, there is no trailer.
    let has_trailer = bytes.len() >= CRC_TRAILER_LEN
        && &bytes[bytes.len() - CRC_TRAILER_LEN..bytes.len() - 10] == CRC_MAGIC
        && parse_values(path, bytes).is_err();
    let (body, crc) = if has_trailer { split_crc(path, bytes, opts)? } else { (bytes, None) };
    let mut tensors = parse_values(path, body)?;
    if tensors.is_empty() {
        // Protobuf reads any run of well-formed fields as a message, so a stray file (a strategy
        // file, 4 bytes of `08 05 08 07`) parses as a checkpoint without a single value.
        return Err(malformed(
            path,
            format!("no tensors: the {} bytes hold no Value (field 1) of a Checkpoint", bytes.len()),
        ));
    }
    for t in &mut tensors {
        t.shape = checked_shape(path, t)?;
    }
    Ok(CheckpointIndex::new(Format::Ckpt, tensors, bytes.len() as u64, crc, Default::default()))
}

/// Walks the protobuf `Checkpoint` in `body`, joining consecutive values of one tag.
fn parse_values(path: &Path, body: &[u8]) -> Result<Vec<TensorInfo>> {
    let mut tensors: Vec<TensorInfo> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut cur = Cursor::new(body, 0);
    while !cur.is_empty() {
        let at = cur.offset();
        let (field, wt) = cur.key().map_err(|e| malformed(path, e))?;
        if field != 1 || wt != WT_LEN {
            cur.skip(wt).map_err(|e| malformed(path, format!("{e} (unknown field {field} at byte {at})")))?;
            continue;
        }
        let (value, base) = cur.len_delimited().map_err(|e| malformed(path, e))?;
        let (name, dtype, dims, seg) = parse_value(path, value, base)?;
        match tensors.last_mut() {
            Some(last) if last.name == name => {
                if last.dtype != dtype || last.raw_dims != dims {
                    return Err(bad_tensor(
                        path,
                        &name,
                        format!(
                            "consecutive values disagree: {} {:?} then {} {:?}",
                            last.dtype, last.raw_dims, dtype, dims
                        ),
                    ));
                }
                last.nbytes += seg.len;
                last.segments.push(seg);
            }
            _ => {
                if !seen.insert(name.clone()) {
                    return Err(bad_tensor(
                        path,
                        &name,
                        format!("appears twice, not consecutively (second time at byte {at})"),
                    ));
                }
                tensors.push(TensorInfo {
                    name,
                    dtype,
                    shape: dims.clone(),
                    raw_dims: dims,
                    nbytes: seg.len,
                    segments: vec![seg],
                });
            }
        }
    }
    Ok(tensors)
}

/// Checks content size against dims x dtype size and returns the logical shape.
fn checked_shape(path: &Path, t: &TensorInfo) -> Result<Vec<u64>> {
    let size = t.dtype.size();
    if t.dtype == DType::Str {
        if t.nbytes % 4 != 0 {
            return Err(bad_tensor(path, &t.name, format!("string content of {} bytes is not UTF-32", t.nbytes)));
        }
        return Ok(Vec::new());
    }
    // MindSpore's loader reads dims == [0] as a scalar.
    if t.raw_dims == [0] && t.nbytes == size {
        return Ok(Vec::new());
    }
    let numel = t.raw_dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d));
    let expected = numel.and_then(|n| n.checked_mul(size));
    match expected {
        Some(e) if e == t.nbytes => Ok(t.raw_dims.clone()),
        Some(e) => Err(bad_tensor(
            path,
            &t.name,
            format!(
                "content is {} bytes but dims {:?} x {} ({} bytes each) need {}",
                t.nbytes, t.raw_dims, t.dtype, size, e
            ),
        )),
        None => Err(bad_tensor(path, &t.name, format!("dims {:?} overflow 64 bits", t.raw_dims))),
    }
}

fn parse_value(path: &Path, value: &[u8], base: u64) -> Result<(String, DType, Vec<u64>, Segment)> {
    let mut cur = Cursor::new(value, base);
    let mut tag: Option<String> = None;
    let mut tensor: Option<(&[u8], u64)> = None;
    while !cur.is_empty() {
        let (field, wt) = cur.key().map_err(|e| malformed(path, e))?;
        match (field, wt) {
            (1, WT_LEN) => {
                let (b, at) = cur.len_delimited().map_err(|e| malformed(path, e))?;
                let s =
                    std::str::from_utf8(b).map_err(|_| malformed(path, format!("tag at byte {at} is not UTF-8")))?;
                tag = Some(s.to_string());
            }
            (2, WT_LEN) => tensor = Some(cur.len_delimited().map_err(|e| malformed(path, e))?),
            (3, _) => {
                return Err(Error::Unsupported {
                    path: path.to_path_buf(),
                    detail: format!(
                        "value '{}' is a MapTensor (MapParameter); reshard only handles dense tensors",
                        tag.unwrap_or_default()
                    ),
                })
            }
            _ => cur.skip(wt).map_err(|e| malformed(path, e))?,
        }
    }
    let tag = tag.ok_or_else(|| malformed(path, format!("value at byte {base} has no tag")))?;
    let (tp, tp_base) = tensor.ok_or_else(|| malformed(path, format!("value '{tag}' at byte {base} has no tensor")))?;
    let mut cur = Cursor::new(tp, tp_base);
    let mut dims = Vec::new();
    let mut dtype: Option<String> = None;
    let mut content: Option<Segment> = None;
    let dim = |v: u64, dims: &mut Vec<u64>| -> Result<()> {
        if (v as i64) < 0 {
            return Err(bad_tensor(path, &tag, format!("negative dim {}", v as i64)));
        }
        dims.push(v);
        Ok(())
    };
    while !cur.is_empty() {
        let (field, wt) = cur.key().map_err(|e| malformed(path, e))?;
        match (field, wt) {
            (1, WT_VARINT) => dim(cur.varint().map_err(|e| malformed(path, e))?, &mut dims)?,
            (1, WT_LEN) => {
                let (packed, at) = cur.len_delimited().map_err(|e| malformed(path, e))?;
                let mut p = Cursor::new(packed, at);
                while !p.is_empty() {
                    dim(p.varint().map_err(|e| malformed(path, e))?, &mut dims)?;
                }
            }
            (2, WT_LEN) => {
                let (b, _) = cur.len_delimited().map_err(|e| malformed(path, e))?;
                dtype = Some(String::from_utf8_lossy(b).into_owned());
            }
            (3, WT_LEN) => {
                let (b, at) = cur.len_delimited().map_err(|e| malformed(path, e))?;
                content = Some(Segment { offset: at, len: b.len() as u64 });
            }
            _ => cur.skip(wt).map_err(|e| malformed(path, e))?,
        }
    }
    let dtype = dtype.ok_or_else(|| bad_tensor(path, &tag, "no tensor_type".into()))?;
    let dtype = DType::from_ckpt_name(&dtype)
        .ok_or_else(|| bad_tensor(path, &tag, format!("unknown tensor_type {dtype:?}")))?;
    let content = content.ok_or_else(|| bad_tensor(path, &tag, "no tensor_content".into()))?;
    Ok((tag, dtype, dims, content))
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
    put_key(&mut out, 1, WT_LEN);
    put_varint(&mut out, value_len);
    put_key(&mut out, 1, WT_LEN);
    put_varint(&mut out, name.len() as u64);
    out.extend_from_slice(name);
    put_key(&mut out, 2, WT_LEN);
    put_varint(&mut out, tp_len);
    for &d in &h.dims {
        put_key(&mut out, 1, WT_VARINT);
        put_varint(&mut out, d);
    }
    put_key(&mut out, 2, WT_LEN);
    put_varint(&mut out, type_name.len() as u64);
    out.extend_from_slice(type_name);
    put_key(&mut out, 3, WT_LEN);
    put_varint(&mut out, content_len);
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

    #[test]
    fn write_then_read_with_chunks() {
        let hs = vec![header("a", DType::Float32, &[3, 5]), header("s", DType::Int32, &[])];
        let contents: Vec<Vec<u8>> = hs.iter().map(|h| (0..h.nbytes).map(|i| i as u8).collect()).collect();
        let l = layout(&hs, 16);
        let bytes = render(&l, &contents);
        let idx = parse(Path::new("t.ckpt"), &bytes, ReadOptions::default()).unwrap();
        assert_eq!(idx.tensors.len(), 2);
        assert_eq!(idx.tensors[0].segments.len(), 4);
        assert_eq!(idx.tensors[0].shape, vec![3, 5]);
        assert_eq!(idx.tensors[1].shape, Vec::<u64>::new());
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
