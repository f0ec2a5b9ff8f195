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
//!
//! Deferred checks (`PlanOptions::defer_toc_checks`): those checks are ~141 small GETs per
//! object, made before the plan, and on a loopback SeaweedFS they cost the server more CPU than
//! the copy's large GETs. Deferred, a follower takes its leader's table of contents at once and
//! its [`SourceFile`] carries the bytes still to compare ([`PredictedBytes`]); the executor hands
//! them to the object it opens ([`ByteSource::check_predicted`]), which compares them inside the
//! GETs the copy makes anyway (a header lies between two tensors a fill reads, inside one joined
//! GET), and `ByteSource::check`, called before every output that read the object is committed,
//! fetches whatever is still unchecked (one joined `read_ranges`) and fails with
//! [`Error::PredictionMismatch`] if any byte differs: nothing built on a wrong prediction is
//! committed. Whoever defers makes the plan again without deferring on that error.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rayon::prelude::*;

use crate::checkpoint::{CheckpointIndex, Format, ReadOptions};
use crate::error::{Error, Result};
use crate::source::{Catalogue, Source, SourceFile};
use crate::storage::{ByteSource, IoMode};

/// Used bytes less than this far apart are fetched in one GET (the bytes between, a small
/// tensor's content, are fetched and not used).
const JOIN_GAP: u64 = 4 << 10;

/// Objects whose table of contents was predicted and checked, and those walked after a
/// mismatch, in this process.
static PREDICTED: AtomicU64 = AtomicU64::new(0);
static MISMATCHED: AtomicU64 = AtomicU64::new(0);
/// Predictions whose check was deferred to the execution, and deferred checks that failed.
static DEFERRED: AtomicU64 = AtomicU64::new(0);
static DEFERRED_FAILED: AtomicU64 = AtomicU64::new(0);

/// (tables of contents taken from a sibling with their check deferred to the execution, deferred
/// checks that found a byte differing), in this process.
pub fn deferred() -> (u64, u64) {
    (DEFERRED.load(Ordering::Relaxed), DEFERRED_FAILED.load(Ordering::Relaxed))
}

/// The plan made by `make(defer)`, for the one-shot callers that plan and execute together
/// (the CLI's `transform`, `auto`). An error of a plan with deferred checks is not trusted (a
/// table of contents taken from a sibling may be what made it fail): the plan is made again
/// without deferring, and that one's answer stands.
pub fn plan_deferring<P>(defer: bool, mut make: impl FnMut(bool) -> Result<P>) -> Result<P> {
    let before = deferred().0;
    match make(defer) {
        Err(_) if defer && deferred().0 > before => make(false),
        r => r,
    }
}

/// `run(plan, true)`; when an object's deferred check fails (`Error::PredictionMismatch`, raised
/// before any output read from that object is committed), tells `say`, makes the plan again with
/// `replan` (every table of contents checked first) and runs that one with `run(plan, false)`.
/// An output committed before the mismatch read no byte of that object, but the plan it was made
/// from rests on every table of contents (which parameters a rank holds, where a tensor that is
/// in no strategy is read from): a caller that may have committed some (more than one output)
/// must not resume from them in the second run.
pub fn on_mismatch<T>(
    plan: &crate::plan::Plan,
    replan: impl FnOnce() -> Result<crate::plan::Plan>,
    say: impl FnOnce(&Error),
    run: impl Fn(&crate::plan::Plan, bool) -> Result<T>,
) -> Result<T> {
    match run(plan, true) {
        Err(e @ Error::PredictionMismatch { .. }) => {
            say(&e);
            run(&replan()?, false)
        }
        r => r,
    }
}

/// (tables of contents predicted from a sibling and found equal, predictions refused and walked).
pub fn predictions() -> (u64, u64) {
    (PREDICTED.load(Ordering::Relaxed), MISMATCHED.load(Ordering::Relaxed))
}

/// Opens `ranks` of an object catalogue of one `.ckpt` object per rank, predicting tables of
/// contents where objects share a size; `None` when the catalogue is of another kind. With
/// `defer`, a prediction is not checked here: its source file carries the bytes to check.
pub(crate) fn open_ranks(
    cat: &Catalogue,
    ranks: &[u32],
    read: ReadOptions,
    defer: bool,
) -> Result<Option<Vec<Source>>> {
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
    // The bytes each leader's walk used, as the deferred checks take them (merged, shared).
    let expected: Vec<Option<Arc<PredictedBytes>>> = match defer {
        true => leaders
            .iter()
            .zip(&walked)
            .map(|(&i, (_, used))| Some(Arc::new(PredictedBytes::new(srcs[i].path().to_path_buf(), used))))
            .collect(),
        false => vec![None; leaders.len()],
    };
    let indexes: Vec<(CheckpointIndex, Option<Arc<PredictedBytes>>)> = (0..srcs.len())
        .into_par_iter()
        .map(|i| {
            let k = leader_of[&srcs[i].len()];
            let (index, used) = &walked[k];
            if leaders[k] == i {
                return Ok((index.clone(), None));
            }
            // A crc trailer differs from rank to rank: such objects are walked.
            if let (None, Some(expected)) = (&index.crc, &expected[k]) {
                DEFERRED.fetch_add(1, Ordering::Relaxed);
                return Ok((index.clone(), Some(expected.clone())));
            }
            if index.crc.is_none() && same_bytes(&*srcs[i], used)? {
                PREDICTED.fetch_add(1, Ordering::Relaxed);
                srcs[i].check()?;
                return Ok((index.clone(), None));
            }
            MISMATCHED.fetch_add(index.crc.is_none() as u64, Ordering::Relaxed);
            let got = crate::ckpt::parse_source(&*srcs[i], read);
            srcs[i].check()?;
            Ok((got?, None))
        })
        .collect::<Result<_>>()?;
    Ok(Some(
        ranks
            .iter()
            .zip(paths)
            .zip(srcs.iter().zip(indexes))
            .map(|((&rank, path), (src, (index, predicted)))| Source {
                rank,
                files: vec![SourceFile { path, version: src.version().clone(), predicted }],
                index,
            })
            .collect(),
    ))
}

/// The bytes a follower's predicted table of contents rests on: those its leader's walk used,
/// to be found at the same offsets of the follower.
#[derive(Debug)]
pub struct PredictedBytes {
    /// The object whose walk the table of contents was taken from.
    pub leader: PathBuf,
    /// The used bytes as disjoint runs (start, bytes), ascending.
    runs: Vec<(u64, Vec<u8>)>,
}

impl PredictedBytes {
    /// The used bytes of `leader`'s walk (by offset, in the order used, overlaps allowed) as
    /// disjoint runs.
    pub fn new(leader: PathBuf, used: &[(u64, Vec<u8>)]) -> PredictedBytes {
        let mut used: Vec<&(u64, Vec<u8>)> = used.iter().collect();
        used.sort_by_key(|(at, b)| (*at, b.len()));
        let mut runs: Vec<(u64, Vec<u8>)> = Vec::new();
        for &(at, ref b) in used {
            let end = at + b.len() as u64;
            match runs.last_mut() {
                Some((s, r)) if at <= *s + r.len() as u64 => {
                    // Overlapping or adjacent: the walk read one source, so overlaps agree.
                    let have = *s + r.len() as u64;
                    if end > have {
                        r.extend_from_slice(&b[(have - at) as usize..]);
                    }
                }
                _ => runs.push((at, b.clone())),
            }
        }
        PredictedBytes { leader, runs }
    }

    /// How many bytes are to be checked.
    pub fn len(&self) -> u64 {
        self.runs.iter().map(|(_, b)| b.len() as u64).sum()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }
}

/// The deferred check of one opened object against [`PredictedBytes`]: every run is compared
/// with the object's bytes when bytes covering it are fetched ([`PredictCheck::see`]), and
/// [`PredictCheck::finish`] fetches the runs no read covered.
pub struct PredictCheck {
    path: PathBuf,
    expected: Arc<PredictedBytes>,
    /// Per run: how many of its first bytes were compared and found equal (all: checked). A
    /// response arrives in chunks, in order: a run across two of them is checked by both.
    checked: Vec<AtomicU64>,
    /// The first offset found differing (`u64::MAX`: none yet).
    differs: AtomicU64,
    /// One `finish` fetches at a time (the others then find everything checked).
    finishing: Mutex<()>,
    /// The failure was counted ([`deferred`]).
    counted: AtomicBool,
}

impl PredictCheck {
    /// The check of the object `path` against `expected`.
    pub fn new(path: PathBuf, expected: Arc<PredictedBytes>) -> PredictCheck {
        let checked = expected.runs.iter().map(|_| AtomicU64::new(0)).collect();
        PredictCheck {
            path,
            expected,
            checked,
            differs: AtomicU64::new(u64::MAX),
            finishing: Mutex::new(()),
            counted: AtomicBool::new(false),
        }
    }

    /// The object's bytes at `start` were fetched: compares every expected run meeting them
    /// (a run is checked once its bytes were all compared, in one piece or in pieces in order).
    pub fn see(&self, start: u64, bytes: &[u8]) {
        let end = start.saturating_add(bytes.len() as u64);
        let runs = &self.expected.runs;
        let mut k = runs.partition_point(|(s, b)| s + b.len() as u64 <= start);
        while let Some((s, b)) = runs.get(k).filter(|(s, _)| *s < end) {
            let (from, to) = ((*s).max(start), (s + b.len() as u64).min(end));
            let want = &b[(from - s) as usize..(to - s) as usize];
            let got = &bytes[(from - start) as usize..(to - start) as usize];
            match want.iter().zip(got).position(|(a, b)| a != b) {
                Some(d) => {
                    self.differs.fetch_min(from + d as u64, Ordering::Relaxed);
                }
                // Equal, and on from the part compared before: the compared prefix grows.
                None if from - s <= self.checked[k].load(Ordering::Relaxed) => {
                    self.checked[k].fetch_max(to - s, Ordering::Relaxed);
                }
                None => {}
            }
            k += 1;
        }
    }

    /// The error for a byte found differing, if one was.
    fn failure(&self) -> Result<()> {
        let at = self.differs.load(Ordering::Relaxed);
        if at == u64::MAX {
            return Ok(());
        }
        if !self.counted.swap(true, Ordering::Relaxed) {
            DEFERRED_FAILED.fetch_add(1, Ordering::Relaxed);
        }
        Err(Error::PredictionMismatch { path: self.path.clone(), leader: self.expected.leader.clone(), offset: at })
    }

    /// Compares the runs not compared yet, fetched from `src` in one `read_ranges` (runs less
    /// than [`JOIN_GAP`] apart in one range), and fails if any byte differs.
    pub fn finish(&self, src: &dyn ByteSource) -> Result<()> {
        self.failure()?;
        let _one = self.finishing.lock().unwrap_or_else(|p| p.into_inner());
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for ((s, b), done) in self.expected.runs.iter().zip(&self.checked) {
            if done.load(Ordering::Relaxed) == b.len() as u64 {
                continue;
            }
            let end = s + b.len() as u64;
            match ranges.last_mut() {
                Some((rs, n)) if *s - (*rs + *n) < JOIN_GAP => *n = end - *rs,
                _ => ranges.push((*s, b.len() as u64)),
            }
        }
        if ranges.is_empty() {
            return Ok(());
        }
        // A run beyond the object's end cannot be there: the sizes are equal, so this is an
        // internal error rather than a mismatch; reported as one all the same.
        if let Some(&(s, _)) = ranges.iter().find(|&&(s, n)| s.checked_add(n).is_none_or(|e| e > src.len())) {
            self.differs.fetch_min(s, Ordering::Relaxed);
            return self.failure();
        }
        for ((at, _), got) in ranges.iter().zip(src.read_ranges(&ranges)?) {
            self.see(*at, &got);
        }
        self.failure()?;
        if let Some(k) = self.unchecked() {
            // Every run lies inside one of the ranges just fetched.
            self.differs.fetch_min(self.expected.runs[k].0, Ordering::Relaxed);
            return self.failure();
        }
        Ok(())
    }

    /// Whether every run was compared and found equal.
    pub fn done(&self) -> bool {
        self.differs.load(Ordering::Relaxed) == u64::MAX && self.unchecked().is_none()
    }

    /// The first run not compared whole.
    fn unchecked(&self) -> Option<usize> {
        self.expected.runs.iter().zip(&self.checked).position(|((_, b), c)| c.load(Ordering::Relaxed) < b.len() as u64)
    }
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

    /// A deferred check compares the expected bytes inside whatever is fetched, and `finish`
    /// fetches only the runs no fetch covered; a follower with the same bytes passes.
    #[test]
    fn a_deferred_check_fetches_only_what_the_copy_did_not() {
        let a = ckpt(["a.weight", "b.weight", "c.weight"], 1);
        let (index, used) =
            crate::ckpt::parse_source_recorded(&MemSource::new(Path::new("a.ckpt"), &a), ReadOptions::default())
                .unwrap();
        let expected = Arc::new(PredictedBytes::new("s3://b/rank_0/a.ckpt".into(), &used));
        assert!(expected.len() < 200 && !expected.is_empty());
        let same = ckpt(["a.weight", "b.weight", "c.weight"], 2);
        let src = crate::storage::RecordingSource::new("s3://b/rank_1/b.ckpt", &same, false);
        let check = PredictCheck::new(src.path().to_path_buf(), expected.clone());
        // The copy fetched everything from the first tensor's content to the end: only the
        // headers before it are left.
        let first = index.tensors[0].segments()[0].offset;
        check.see(first, &same[first as usize..]);
        assert!(!check.done());
        check.finish(&src).unwrap();
        assert!(check.done());
        let asked = src.ranges();
        assert_eq!(asked.len(), 1, "{asked:?}");
        assert!(asked[0].0 + asked[0].1 <= first, "{asked:?} reaches the content at {first}");
        // Everything checked: a second finish fetches nothing.
        check.finish(&src).unwrap();
        assert_eq!(src.ranges().len(), 1);
    }

    /// A response arrives in chunks: every run is checked when the chunks come in order, whatever
    /// byte they split at (a run across two was left to `finish`, a GET of its own); pieces out of
    /// order check nothing they do not continue.
    #[test]
    fn a_response_in_chunks_checks_the_runs_across_them() {
        let a = ckpt(["a.weight", "b.weight", "c.weight"], 1);
        let (_, used) =
            crate::ckpt::parse_source_recorded(&MemSource::new(Path::new("a.ckpt"), &a), ReadOptions::default())
                .unwrap();
        let expected = Arc::new(PredictedBytes::new("s3://b/rank_0/a.ckpt".into(), &used));
        let same = ckpt(["a.weight", "b.weight", "c.weight"], 2);
        for chunk in [1, 3, 7, 64, 1000] {
            let check = PredictCheck::new("s3://b/rank_1/b.ckpt".into(), expected.clone());
            for (k, piece) in same.chunks(chunk).enumerate() {
                check.see((k * chunk) as u64, piece);
            }
            assert!(check.done(), "chunks of {chunk} bytes");
        }
        let check = PredictCheck::new("s3://b/rank_1/b.ckpt".into(), expected.clone());
        let pieces: Vec<(usize, &[u8])> = same.chunks(5).enumerate().collect();
        for (k, piece) in pieces.iter().rev() {
            check.see((k * 5) as u64, piece);
        }
        assert!(!check.done(), "pieces seen backwards cannot add up");
    }

    /// A follower whose header differs (a name of the same length) fails its deferred check,
    /// naming the object, the leader and the first differing byte, whether the bytes came with
    /// the copy's fetches or with `finish`.
    #[test]
    fn a_deferred_check_refuses_a_differing_follower() {
        let a = ckpt(["a.weight", "b.weight", "c.weight"], 1);
        let (_, used) =
            crate::ckpt::parse_source_recorded(&MemSource::new(Path::new("a.ckpt"), &a), ReadOptions::default())
                .unwrap();
        let expected = Arc::new(PredictedBytes::new("s3://b/rank_0/a.ckpt".into(), &used));
        let renamed = ckpt(["a.weight", "b.weight", "d.weight"], 1);
        let at = renamed.windows(8).position(|w| w == b"d.weight").unwrap() as u64;
        let (_, failed_before) = deferred();
        for seen in [false, true] {
            let src = MemSource::new(Path::new("s3://b/rank_1/b.ckpt"), &renamed);
            let check = PredictCheck::new(src.path().to_path_buf(), expected.clone());
            if seen {
                check.see(0, &renamed);
            }
            let err = check.finish(&src).unwrap_err();
            let Error::PredictionMismatch { path, leader, offset } = &err else { panic!("{err}") };
            assert_eq!(
                (path.to_str(), leader.to_str(), *offset),
                (Some("s3://b/rank_1/b.ckpt"), Some("s3://b/rank_0/a.ckpt"), at)
            );
            let text = err.to_string();
            assert!(text.contains("rank_1/b.ckpt") && text.contains("rank_0/a.ckpt") && text.contains(&at.to_string()));
            // Every later check fails the same way.
            assert!(check.finish(&src).is_err());
        }
        assert_eq!(deferred().1 - failed_before, 2);
    }
}
