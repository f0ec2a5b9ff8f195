//! `.safetensors` files: 8-byte little-endian header length, a JSON header, then data.
//! MindSpore adds `__metadata__ = {"format": "ms"}`, optionally `crc_num` and, for Int4
//! tensors, `{name: "Int4"}`.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{Map, Value};

use crate::checkpoint::{
    CheckpointIndex, ContentRun, FileLayout, Format, ReadOptions, Segment, TableBuilder, TensorHeader, TensorInfo,
};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::storage::{ByteSource, MemSource};

/// Headers larger than this are refused before parsing (the safetensors crate uses 100 MB).
pub const MAX_HEADER: u64 = 100_000_000;

fn malformed(path: &Path, detail: String) -> Error {
    Error::Malformed { path: path.to_path_buf(), kind: "safetensors", detail }
}

/// Indexes a `.safetensors` file held in `bytes`.
pub fn parse(path: &Path, bytes: &[u8], opts: ReadOptions) -> Result<CheckpointIndex> {
    parse_source(&MemSource::new(path, bytes), opts)
}

/// Indexes a `.safetensors` file through a byte source: the 8-byte length and the JSON header
/// are read, never tensor data (unless a `crc_num` is verified, which reads the data once).
pub fn parse_source(src: &dyn ByteSource, opts: ReadOptions) -> Result<CheckpointIndex> {
    let path = src.path();
    let file_len = src.len();
    if file_len < 8 {
        return Err(malformed(path, format!("file is {file_len} bytes, shorter than the 8-byte header length")));
    }
    let mut len8 = [0u8; 8];
    src.read_at(0, &mut len8)?;
    let n = u64::from_le_bytes(len8);
    let avail = file_len - 8;
    if n > avail || n > MAX_HEADER {
        return Err(malformed(path, format!("header length {n} exceeds the file ({avail} bytes after it)")));
    }
    let owned;
    let header: &[u8] = match src.view(8, n) {
        Some(v) => v,
        None => {
            let mut b = vec![0u8; n as usize];
            src.read_at(8, &mut b)?;
            owned = b;
            &owned
        }
    };
    let data_start = 8 + n;
    let data_len = avail - n;
    let json: Map<String, Value> =
        serde_json::from_slice(header).map_err(|e| malformed(path, format!("header is not a JSON object: {e}")))?;
    crate::input::check_unique_json_keys(header).map_err(|e| malformed(path, format!("header: {e}")))?;
    let mut metadata = BTreeMap::new();
    if let Some(m) = json.get("__metadata__") {
        let m = m.as_object().ok_or_else(|| malformed(path, "__metadata__ is not an object".into()))?;
        for (k, v) in m {
            let v = v.as_str().ok_or_else(|| malformed(path, format!("__metadata__['{k}'] is not a string")))?;
            metadata.insert(k.clone(), v.to_string());
        }
    }
    let mut tensors = Vec::new();
    let mut table = TableBuilder::new();
    for (name, info) in &json {
        if name == "__metadata__" {
            continue;
        }
        let bad = |detail: String| Error::BadTensor { path: path.to_path_buf(), tensor: name.clone(), detail };
        let dt = info.get("dtype").and_then(Value::as_str).ok_or_else(|| bad("no dtype".into()))?;
        let mut dtype = DType::from_safetensors_name(dt).ok_or_else(|| bad(format!("unknown dtype {dt:?}")))?;
        if metadata.get(name).is_some_and(|v| v.to_ascii_lowercase().contains("int4")) {
            dtype = DType::Int4;
        }
        let shape: Vec<u64> = info
            .get("shape")
            .and_then(Value::as_array)
            .and_then(|a| a.iter().map(Value::as_u64).collect::<Option<Vec<_>>>())
            .ok_or_else(|| bad("shape is not a list of non-negative integers".into()))?;
        let offs: Vec<u64> = info
            .get("data_offsets")
            .and_then(Value::as_array)
            .and_then(|a| a.iter().map(Value::as_u64).collect::<Option<Vec<_>>>())
            .filter(|v| v.len() == 2)
            .ok_or_else(|| bad("data_offsets is not [begin, end]".into()))?;
        let (b, e) = (offs[0], offs[1]);
        if b > e || e > data_len {
            return Err(bad(format!("data_offsets [{b}, {e}] outside the {data_len} data bytes")));
        }
        let need = shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d)).and_then(|n| n.checked_mul(dtype.size()));
        if need != Some(e - b) {
            return Err(bad(format!(
                "data is {} bytes but shape {shape:?} x {dtype} needs {}",
                e - b,
                need.map_or("more than 2^64".to_string(), |n| n.to_string())
            )));
        }
        tensors.push(table.push(path, name, dtype, &shape, Segment { offset: data_start + b, len: e - b })?);
    }
    table.finish(&mut tensors);
    if tensors.is_empty() {
        return Err(malformed(path, "no tensors: the header lists none".into()));
    }
    tensors.sort_by_key(|t| t.segments()[0].offset);
    for w in tensors.windows(2) {
        let (a, b) = (&w[0].segments()[0], &w[1].segments()[0]);
        if a.offset + a.len > b.offset {
            return Err(malformed(path, format!("tensors '{}' and '{}' overlap", w[0].name(), w[1].name())));
        }
    }
    // As the safetensors library requires: the tensors tile the data, no gap, nothing after.
    let mut at = 0u64;
    for t in &tensors {
        let b = t.segments()[0].offset - data_start;
        if b != at {
            return Err(malformed(
                path,
                format!("data bytes [{at}, {b}) before tensor '{}' belong to no tensor", t.name()),
            ));
        }
        at = b + t.segments()[0].len;
    }
    if at != data_len {
        return Err(malformed(
            path,
            format!(
                "{} trailing data bytes after the last tensor (data is {data_len} bytes, tensors end at {at})",
                data_len - at
            ),
        ));
    }
    let mut crc = None;
    if let Some(c) = metadata.get("crc_num") {
        let expected: u32 = c.parse().map_err(|_| malformed(path, format!("crc_num '{c}' is not a 32-bit number")))?;
        if opts.verify_crc {
            let actual = content_crc(src, &tensors)?;
            if actual != expected {
                return Err(Error::CrcMismatch { path: path.to_path_buf(), expected, actual });
            }
        }
        crc = Some(expected);
    }
    Ok(CheckpointIndex::new(Format::Safetensors, tensors, file_len, crc, metadata))
}

/// MindSpore's safetensors crc: crc32 chained over each name then `bytes(ndarray)`, names
/// sorted. Python's `bytes()` of a 0-d integer array is *value* zero bytes, not the raw bytes,
/// and MindSpore's crc inherits that.
fn content_crc(src: &dyn ByteSource, tensors: &[TensorInfo]) -> Result<u32> {
    src.will_read_all();
    let mut sorted: Vec<&TensorInfo> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.name().cmp(b.name()));
    let mut h = crc32fast::Hasher::new();
    let mut buf = Vec::new();
    for t in sorted {
        h.update(t.name().as_bytes());
        let first = t.segments().first().copied().unwrap_or(Segment { offset: 0, len: 0 });
        if t.shape().is_empty() && first.len <= 8 {
            let mut raw = [0u8; 8];
            src.read_at(first.offset, &mut raw[..first.len as usize])?;
            if let Some(n) = scalar_int_value(t.dtype, t.shape(), &raw[..first.len as usize]) {
                update_zeros(&mut h, n);
                continue;
            }
        }
        for seg in &t.segments() {
            if let Some(v) = src.view(seg.offset, seg.len) {
                h.update(v);
                continue;
            }
            let mut at = 0;
            while at < seg.len {
                let n = (seg.len - at).min(4 << 20) as usize;
                buf.resize(n, 0);
                src.read_at(seg.offset + at, &mut buf)?;
                h.update(&buf);
                at += n as u64;
            }
        }
    }
    Ok(h.finalize())
}

/// The value of a 0-d integer or bool tensor (negative values count as 0): the number of zero
/// bytes MindSpore's crc takes for it. `None` for any other tensor, whose raw bytes count.
pub(crate) fn scalar_int_value(dtype: DType, shape: &[u64], raw: &[u8]) -> Option<u64> {
    if !shape.is_empty() || raw.len() as u64 != dtype.size() {
        return None;
    }
    let mut b = [0u8; 8];
    b[..raw.len()].copy_from_slice(raw);
    let u = u64::from_le_bytes(b);
    let bits = raw.len() * 8;
    let signed = |u: u64| {
        let v = ((u << (64 - bits)) as i64) >> (64 - bits);
        v.max(0) as u64
    };
    let n = match dtype {
        DType::UInt8 | DType::UInt16 | DType::UInt32 | DType::UInt64 | DType::Bool => u,
        DType::Int8 | DType::Int16 | DType::Int32 | DType::Int64 => signed(u),
        _ => return None,
    };
    // Python cannot make `bytes(n)` for huge n, so no MindSpore file has such a crc; the raw
    // bytes are hashed instead and the check fails as it should.
    (n <= 1 << 40).then_some(n)
}

/// Feeds `n` zero bytes to `h` in O(log n) using crc combination.
pub(crate) fn update_zeros(h: &mut crc32fast::Hasher, mut n: u64) {
    let mut block = crc32fast::Hasher::new();
    block.update(&[0]);
    while n > 0 {
        if n & 1 == 1 {
            h.combine(&block);
        }
        n >>= 1;
        if n > 0 {
            let b = block.clone();
            block.combine(&b);
        }
    }
}

/// The order the `safetensors` library writes data in: dtype descending (in its `Dtype` enum
/// order), then name. Writing the same order makes our files match MindSpore's.
pub fn data_order(a: DType, an: &str, b: DType, bn: &str) -> std::cmp::Ordering {
    fn rank(d: DType) -> u8 {
        match d {
            DType::Bool => 0,
            DType::UInt8 => 4,
            DType::Int8 | DType::Int4 => 5,
            DType::Int16 => 9,
            DType::UInt16 => 10,
            DType::Float16 => 11,
            DType::BFloat16 => 12,
            DType::Int32 => 13,
            DType::UInt32 => 14,
            DType::Float32 => 15,
            DType::Float64 => 17,
            DType::Int64 => 18,
            DType::UInt64 => 19,
            DType::Str => 20,
        }
    }
    rank(b).cmp(&rank(a)).then_with(|| an.cmp(bn))
}

/// Lays out a safetensors file: tensors in the given order, header with `metadata` first.
/// `Str` tensors cannot be stored and are refused.
pub fn layout(tensors: &[TensorHeader], metadata: &BTreeMap<String, String>) -> Result<FileLayout> {
    let mut header = Map::new();
    let mut meta: Map<String, Value> = metadata.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect();
    let mut pos = 0u64;
    let mut content = Vec::with_capacity(tensors.len());
    let mut entries = Vec::with_capacity(tensors.len());
    for h in tensors {
        let dt = h.dtype.safetensors_name().ok_or_else(|| {
            Error::Invalid(format!("tensor '{}' of type {} cannot be stored in safetensors", h.name, h.dtype))
        })?;
        if h.dtype == DType::Int4 {
            meta.insert(h.name.clone(), Value::String("Int4".into()));
        }
        let mut e = Map::new();
        e.insert("dtype".into(), Value::String(dt.into()));
        e.insert("shape".into(), Value::from(h.dims.clone()));
        e.insert("data_offsets".into(), Value::from(vec![pos, pos + h.nbytes]));
        entries.push((h.name.clone(), Value::Object(e)));
        content.push(vec![ContentRun { start: 0, file_offset: pos, len: h.nbytes }]);
        pos += h.nbytes;
    }
    if !meta.is_empty() {
        header.insert("__metadata__".into(), Value::Object(meta));
    }
    for (k, v) in entries {
        header.insert(k, v);
    }
    let mut text = serde_json::to_vec(&Value::Object(header)).map_err(|e| Error::Invalid(e.to_string()))?;
    while (text.len() + 8) % 8 != 0 {
        text.push(b' ');
    }
    let data_start = 8 + text.len() as u64;
    let mut head = (text.len() as u64).to_le_bytes().to_vec();
    head.extend_from_slice(&text);
    for runs in &mut content {
        for r in runs.iter_mut() {
            r.file_offset += data_start;
        }
    }
    Ok(FileLayout { fixed: vec![(0, head)], content, len: data_start + pos })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_then_parse() {
        let hs = vec![
            TensorHeader { name: "b".into(), dtype: DType::BFloat16, dims: vec![2, 2], nbytes: 8 },
            TensorHeader { name: "a".into(), dtype: DType::Int32, dims: vec![], nbytes: 4 },
        ];
        let meta = BTreeMap::from([("format".to_string(), "ms".to_string())]);
        let l = layout(&hs, &meta).unwrap();
        let mut bytes = vec![0u8; l.len as usize];
        for (o, b) in &l.fixed {
            bytes[*o as usize..*o as usize + b.len()].copy_from_slice(b);
        }
        let idx = parse(Path::new("x.safetensors"), &bytes, ReadOptions::default()).unwrap();
        assert_eq!(idx.metadata.get("format").map(String::as_str), Some("ms"));
        assert_eq!(idx.tensors[0].name(), "b");
        assert!(idx.tensors[1].name().shares_buffer_with(idx.tensors[0].name()));
        assert_eq!(idx.tensors[0].dtype, DType::BFloat16);
        assert!(idx.tensors[1].shape().is_empty());
    }

    #[test]
    fn zero_runs_match_plain_crc() {
        let mut huge = crc32fast::Hasher::new();
        update_zeros(&mut huge, 1 << 40); // no overflow in the running length
        for n in [0u64, 1, 2, 3, 7, 100, 1000] {
            let mut a = crc32fast::Hasher::new();
            a.update(b"x");
            update_zeros(&mut a, n);
            let mut b = crc32fast::Hasher::new();
            b.update(b"x");
            b.update(&vec![0u8; n as usize]);
            assert_eq!(a.finalize(), b.finalize(), "{n}");
        }
    }

    #[test]
    fn huge_scalar_under_crc_is_a_mismatch_not_a_panic() {
        // Found by fuzzing: a 0-d U64 of 2^64-1 under a crc_num made the zero-run length overflow.
        let h = br#"{"__metadata__":{"crc_num":"1"},"s":{"dtype":"U64","shape":[],"data_offsets":[0,8]}}"#;
        let mut b = (h.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(h);
        b.extend_from_slice(&u64::MAX.to_le_bytes());
        let err = parse(Path::new("s.safetensors"), &b, ReadOptions::default()).unwrap_err();
        assert!(matches!(err, Error::CrcMismatch { .. }), "{err}");
    }

    #[test]
    fn hostile_headers_are_refused() {
        let p = Path::new("h.safetensors");
        assert!(parse(p, b"1234", ReadOptions::default()).is_err());
        let mut b = u64::MAX.to_le_bytes().to_vec();
        b.extend_from_slice(b"{}");
        assert!(parse(p, &b, ReadOptions::default()).is_err());
        let h = br#"{"x":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,4]}}"#;
        let mut b = (h.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(h);
        b.extend_from_slice(&[0; 4]);
        let err = parse(p, &b, ReadOptions::default()).unwrap_err();
        assert!(err.to_string().contains("'x'"), "{err}");
    }
}
