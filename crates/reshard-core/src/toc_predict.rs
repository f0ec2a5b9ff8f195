//! Tables of contents of `.ckpt` objects predicted from a sibling object, and checked.
//!
//! A `.ckpt` is a protobuf stream: each tensor's header says where the next one starts, so its
//! table of contents costs one dependent ranged GET per tensor (141 per object of the bench
//! model), and on a loopback SeaweedFS each GET costs the server 1.5-4 ms of CPU, on S3 or OBS a
//! round trip of tens of milliseconds. The ranks of one stage usually have byte-identical
//! layouts (same names, dtypes, dims and offsets). So of the objects of one size, the first is
//! walked, recording every byte the walk used (keys, lengths, names, dims, types: never content,
//! `ckpt::parse_source_recorded`); for each other object of that size those same bytes are
//! fetched, all at once (joined into one GET where less than [`JOIN_GAP`] apart), and compared.
//! The walk's result depends on those bytes and the object's length only, so when they are equal
//! the object's table of contents is the first one's, exactly; when any differs (another stage
//! of the same size, a damaged or hostile object) the object is walked itself. Nothing is taken
//! on prediction alone: every byte the index rests on is read from the object itself.
//!
//! Bytes fetched: the used bytes are about 100 per tensor (the walk's 1 KiB reads fetched 1 KiB
//! per tensor), plus the content of tensors of less than [`JOIN_GAP`] between two headers.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rayon::prelude::*;

use crate::checkpoint::{CheckpointIndex, Format, ReadOptions};
use crate::error::Result;
use crate::source::{Catalogue, Source, SourceFile};
use crate::storage::{ByteSource, IoMode};

/// Used bytes less than this far apart are fetched in one GET (the bytes between, a small
/// tensor's content, are fetched and not used).
const JOIN_GAP: u64 = 4 << 10;

/// Objects whose table of contents was predicted and checked, and those walked after a
/// mismatch, in this process.
static PREDICTED: AtomicU64 = AtomicU64::new(0);
static MISMATCHED: AtomicU64 = AtomicU64::new(0);

/// (tables of contents predicted from a sibling and found equal, predictions refused and walked).
pub fn predictions() -> (u64, u64) {
    (PREDICTED.load(Ordering::Relaxed), MISMATCHED.load(Ordering::Relaxed))
}

/// Opens `ranks` of an object catalogue of one `.ckpt` object per rank, predicting tables of
/// contents where objects share a size; `None` when the catalogue is of another kind.
pub(crate) fn open_ranks(cat: &Catalogue, ranks: &[u32], read: ReadOptions) -> Result<Option<Vec<Source>>> {
    let mut paths = Vec::with_capacity(ranks.len());
    for &r in ranks {
        match cat.files.get(&r).map(Vec::as_slice) {
            Some([p]) if crate::storage::is_url(p) && Format::from_path(p) != Some(Format::Safetensors) => {
                paths.push(p.clone())
            }
            _ => return Ok(None),
        }
    }
    // An object's crc trailer is not verified (see `Catalogue::open_rank`).
    let mut read = read;
    read.verify_crc = false;
    let srcs: Vec<Arc<dyn ByteSource>> =
        paths.par_iter().map(|p| crate::storage::open(p, IoMode::Auto)).collect::<Result<_>>()?;
    let mut by_len: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
    for (i, s) in srcs.iter().enumerate() {
        by_len.entry(s.len()).or_default().push(i);
    }
    let leaders: Vec<usize> = by_len.values().map(|v| v[0]).collect();
    let walked: Vec<(CheckpointIndex, crate::ckpt::UsedBytes)> = leaders
        .par_iter()
        .map(|&i| {
            let got = crate::ckpt::parse_source_recorded(&*srcs[i], read);
            srcs[i].check()?;
            got
        })
        .collect::<Result<_>>()?;
    let leader_of: BTreeMap<u64, usize> = leaders.iter().enumerate().map(|(k, &i)| (srcs[i].len(), k)).collect();
    let indexes: Vec<CheckpointIndex> = (0..srcs.len())
        .into_par_iter()
        .map(|i| {
            let k = leader_of[&srcs[i].len()];
            let (index, used) = &walked[k];
            if leaders[k] == i {
                return Ok(index.clone());
            }
            // A crc trailer differs from rank to rank: such objects are walked.
            if index.crc.is_none() && same_bytes(&*srcs[i], used)? {
                PREDICTED.fetch_add(1, Ordering::Relaxed);
                srcs[i].check()?;
                return Ok(index.clone());
            }
            MISMATCHED.fetch_add(index.crc.is_none() as u64, Ordering::Relaxed);
            let got = crate::ckpt::parse_source(&*srcs[i], read);
            srcs[i].check()?;
            got
        })
        .collect::<Result<_>>()?;
    Ok(Some(
        ranks
            .iter()
            .zip(paths)
            .zip(srcs.iter().zip(indexes))
            .map(|((&rank, path), (src, index))| Source {
                rank,
                files: vec![SourceFile { path, version: src.version().clone() }],
                index,
            })
            .collect(),
    ))
}

/// Whether `src` holds `used` (bytes by offset, in increasing order) at the same offsets.
fn same_bytes(src: &dyn ByteSource, used: &[(u64, Vec<u8>)]) -> Result<bool> {
    let mut used: Vec<&(u64, Vec<u8>)> = used.iter().collect();
    used.sort_by_key(|(at, b)| (*at, b.len()));
    let mut gets: Vec<(u64, u64)> = Vec::new();
    for &&(at, ref b) in &used {
        let end = at + b.len() as u64;
        match gets.last_mut() {
            Some((s, n)) if at >= *s + *n && at - (*s + *n) < JOIN_GAP => *n = end - *s,
            Some((s, n)) if at < *s + *n => *n = (*s + *n).max(end) - *s,
            _ => gets.push((at, b.len() as u64)),
        }
    }
    if gets.iter().any(|&(s, n)| s.checked_add(n).is_none_or(|e| e > src.len())) {
        return Ok(false);
    }
    let got = src.read_ranges(&gets)?;
    let mut g = 0;
    for &&(at, ref b) in &used {
        while g < gets.len() && gets[g].0 + gets[g].1 < at + b.len() as u64 {
            g += 1;
        }
        let Some(from) = gets.get(g).and_then(|&(s, _)| at.checked_sub(s)) else { return Ok(false) };
        let from = from as usize;
        if got[g].get(from..from + b.len()) != Some(b.as_slice()) {
            return Ok(false);
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::TensorHeader;
    use crate::storage::MemSource;
    use crate::DType;
    use std::path::Path;

    /// A `.ckpt` of three tensors (one small, between two larger), content filled with `fill`.
    fn ckpt(names: [&str; 3], fill: u8) -> Vec<u8> {
        let headers: Vec<TensorHeader> = names
            .iter()
            .zip([64u64, 1, 64])
            .map(|(n, rows)| TensorHeader {
                name: n.to_string(),
                dtype: DType::Float32,
                dims: vec![rows, 64],
                nbytes: rows * 64 * 4,
            })
            .collect();
        let layout = crate::ckpt::layout(&headers, crate::ckpt::CHUNK_BYTES);
        let mut bytes = vec![fill; layout.len as usize];
        for (off, b) in &layout.fixed {
            bytes[*off as usize..*off as usize + b.len()].copy_from_slice(b);
        }
        bytes
    }

    /// The bytes a walk used tell objects of the same table of contents (whatever their content)
    /// from those of another (a name of the same length changed), and never include content.
    #[test]
    fn the_used_bytes_tell_same_tables_of_contents_apart() {
        let a = ckpt(["a.weight", "b.weight", "c.weight"], 1);
        let (index, used) =
            crate::ckpt::parse_source_recorded(&MemSource::new(Path::new("a.ckpt"), &a), ReadOptions::default())
                .unwrap();
        let used_len: usize = used.iter().map(|(_, b)| b.len()).sum();
        assert!(used_len < 200, "{used_len} bytes used for 3 headers");
        for t in &index.tensors {
            for s in &t.segments() {
                assert!(used.iter().all(|(at, b)| at + b.len() as u64 <= s.offset || *at >= s.offset + s.len));
            }
        }
        let same = ckpt(["a.weight", "b.weight", "c.weight"], 2);
        assert!(same_bytes(&MemSource::new(Path::new("b.ckpt"), &same), &used).unwrap());
        let renamed = ckpt(["a.weight", "b.weight", "d.weight"], 1);
        assert_eq!(renamed.len(), a.len());
        assert!(!same_bytes(&MemSource::new(Path::new("c.ckpt"), &renamed), &used).unwrap());
        // Objects of another length are never compared: they are grouped by length.
    }
}
