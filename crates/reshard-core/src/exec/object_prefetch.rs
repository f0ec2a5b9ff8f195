//! Read-ahead for object sources: the plan knows every run a fill will read, so before the first
//! block is copied the runs of all its blocks are joined, per source object, into ranged GETs of
//! up to [`GET_BYTES`] at multiples of their size (consecutive runs at most [`GAP_BYTES`] apart:
//! a `.ckpt` tensor follows the previous one after a header of a few dozen bytes), and the GETs
//! are started in block order, [`AHEAD_BYTES`] of blocks ahead of the block being copied, so
//! that the store is kept busy by large requests the whole time. Per-block announcements (as for local files) would make one GET
//! per tensor and source: on the bench model's 8 -> 4 about 1,000 GETs of 256 KiB, whose latency,
//! not the bytes, set the pace.
//!
//! The bytes fetched ahead and not yet copied, of all fills of a job together (each job counts
//! its own: two jobs in one process do not share a budget), stay within half the job's
//! `memory_budget` (the blocks' buffers have the other half, see `block_bytes`): a GET that would
//! go beyond waits until copies free bytes (a later block starts it), and GETs shrink with a small
//! budget (the power of two at most an eighth of the read-ahead), so that several are still in
//! flight.

use std::any::Any;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::fill::{block_file_runs, Block};
use super::Job;
use crate::error::Result;
use crate::plan::TensorPlan;
use crate::storage::ByteSource;

/// The largest GET made by joining runs.
const GET_BYTES: u64 = 8 << 20;
/// Runs at most this far apart are joined (the bytes between them are fetched and not used; in
/// practice a few dozen bytes of header per tensor).
const GAP_BYTES: u64 = 4 << 10;
/// How far ahead of the block being copied the GETs are started: the memory of one fill's
/// fetched but not yet copied bytes is about this plus one GET.
const AHEAD_BYTES: u64 = 64 << 20;
/// The smallest GET made by joining runs, however small the budget.
pub(crate) const MIN_GET_BYTES: u64 = 64 << 10;

/// The bytes the read-ahead of a job may hold (fetched or on their way, not yet copied): half its
/// memory budget.
pub(crate) fn read_ahead_budget(memory_budget: u64) -> u64 {
    (memory_budget / 2).max(MIN_GET_BYTES)
}

/// Serializes the budget check and the start of a GET across the fills of all jobs, so that two
/// fills of a job never both take the last bytes of its budget.
static STARTING: Mutex<()> = Mutex::new(());

/// One joined GET.
struct Get {
    src: Arc<dyn ByteSource>,
    /// Its runs, back to back (the bytes between read runs are runs read by none): (start, end,
    /// bytes the blocks read in it), ascending.
    runs: Vec<(u64, u64, u64)>,
    /// The block of each run (ascending).
    blocks: Vec<usize>,
    /// Where its first block starts, in bytes of the fill (blocks in order).
    first: u64,
}

impl Get {
    /// The bytes of runs `r` (back to back).
    fn span(&self, r: std::ops::Range<usize>) -> (u64, u64) {
        (self.runs[r.start].0, self.runs[r.end - 1].1)
    }

    /// Where it ends.
    fn end(&self) -> u64 {
        self.span(0..self.runs.len()).1
    }
}

/// The GETs of one fill, started as its blocks are taken.
pub(crate) struct ObjectPrefetch {
    gets: Vec<Get>,
    /// Each block's start, in bytes of the fill.
    block_at: Vec<u64>,
    /// The next GET to start, and the holds of those started: dropped with the fill (read,
    /// failed or cancelled), they free what it left unread.
    next: Mutex<(usize, Vec<Box<dyn Any + Send + Sync>>)>,
    /// How far ahead of the block being copied GETs are started.
    ahead: u64,
    /// The most bytes the read-ahead of the job may hold ([`read_ahead_budget`]).
    limit: u64,
    /// The bytes it holds: the job's count, shared by its fills.
    held: Arc<AtomicU64>,
}

/// One run a block reads, as [`join`] takes it.
struct Run<'s> {
    src: &'s Arc<dyn ByteSource>,
    from: u64,
    n: u64,
    read: u64,
    /// Where its block starts, in bytes of the fill, and the block.
    at: u64,
    block: usize,
}

/// Adds `run` of the object `key` to its open GETs, which never cross a multiple of `align`
/// bytes of the object: the run (with the bytes before it, when at most [`GAP_BYTES`] after the
/// open GET) is cut there, each piece joins the open GET when it follows it right after and
/// within the same `align` bytes, else closes that GET (into `gets`) and opens a new one.
///
/// A store keeps an object in chunks from its start (SeaweedFS 4 MiB, a multipart upload its
/// parts), and serves a range by the chunks it touches: the bench's 8 objects read in ranges of
/// 8 MiB at multiples of 8 MiB took SeaweedFS 0.73 s of CPU, in ranges of 8,000,000 bytes (as
/// tensor edges cut them) 0.87-0.98 s.
fn join(open: &mut HashMap<(u32, u32), Get>, gets: &mut Vec<Get>, key: (u32, u32), run: Run<'_>, align: u64) {
    let Run { src, from, n, mut read, at, block } = run;
    debug_assert!(read <= n, "a run reads {read} of its {n} bytes");
    // The bytes just before the run (a `.ckpt` header), when less than a gap after the open GET
    // of this object or after the object's start, come with it, not read: a table of contents
    // taken from another object is checked in them (`toc_predict`) rather than by a GET per
    // header (61 on the bench's 8 -> 4).
    let lead = match open.get(&key) {
        Some(g) if from >= g.end() && from - g.end() <= GAP_BYTES => g.end(),
        None if from <= GAP_BYTES => 0,
        _ => from,
    };
    let mut piece = |a: u64, b: u64, read: u64| match open.get_mut(&key) {
        Some(g) if a == g.end() && g.runs[0].0 / align == (b - 1) / align => {
            g.runs.push((a, b, read));
            g.blocks.push(block);
        }
        _ => {
            let g = Get { src: src.clone(), runs: vec![(a, b, read)], blocks: vec![block], first: at };
            if let Some(done) = open.insert(key, g) {
                gets.push(done);
            }
        }
    };
    let (mut a, end) = (lead, from + n);
    while a < end {
        // The lead ends where the run starts; every piece ends by the next multiple of `align`.
        let stop = if a < from { from } else { end };
        let b = stop.min((a / align + 1).saturating_mul(align));
        // The lead is not read; a run cut in pieces counts its read bytes against the first.
        let here = if a < from { 0 } else { read.min(b - a) };
        read -= here;
        piece(a, b, here);
        a = b;
    }
}

impl ObjectPrefetch {
    /// Joins the runs of `blocks` (in order) into GETs.
    pub(crate) fn new(job: &Job<'_>, tensors: &[&TensorPlan], blocks: &[Block]) -> Result<ObjectPrefetch> {
        let limit = read_ahead_budget(job.opts.memory_budget);
        // GETs of `get_bytes` at most, at multiples of it (a power of two).
        let get_bytes = 1u64 << GET_BYTES.min(limit / 8).max(MIN_GET_BYTES).ilog2();
        let mut gets = Vec::new();
        let mut open: HashMap<(u32, u32), Get> = HashMap::new();
        let mut block_at = Vec::with_capacity(blocks.len());
        let mut at = 0u64;
        for (bi, b) in blocks.iter().enumerate() {
            block_at.push(at);
            block_file_runs(job, tensors[b.tensor], b, 0, &mut |src, key, from, n, read| {
                let run = Run { src, from, n, read, at, block: bi };
                join(&mut open, &mut gets, key, run, get_bytes);
                Ok(())
            })?;
            at += b.len;
        }
        gets.extend(open.into_values());
        gets.sort_by_key(|g| g.first);
        // A quarter of the budget per fill, less the GET that starts at the horizon: the 4
        // ranks of an 8 -> 4 written side by side fit it (with 64 MiB each they did not, and a
        // GET that waited for the budget until its first block was taken became one GET per
        // block: 80 more GETs on the bench; 45 with a quarter).
        let ahead = AHEAD_BYTES.min((limit / 4).saturating_sub(get_bytes).max(get_bytes));
        let held = job.read_ahead.clone();
        Ok(ObjectPrefetch { gets, block_at, next: Mutex::new((0, Vec::new())), ahead, limit, held })
    }

    /// Block `i` is being taken, and blocks `..taken` are (by this or other workers): starts
    /// every GET whose first block begins less than the read-ahead after block `i`, as far as
    /// the budget allows.
    pub(crate) fn advance(&self, i: usize, taken: usize) {
        let Some(&here) = self.block_at.get(i) else {
            return;
        };
        let horizon = here.saturating_add(self.ahead);
        let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
        let (next, holds) = &mut *next;
        while let Some(g) = self.gets.get(*next).filter(|g| g.first <= horizon) {
            // The runs of blocks taken already (by this worker earlier, when the budget held the
            // GET back, or by others whose `advance` comes later) are read by their blocks on
            // their own: the GET is made for the runs of this block and for those of the blocks
            // not taken yet, apart when blocks between are being read. (It was skipped whole: a
            // fill that started with the budget taken by the other fills read its first 8 MiB of
            // each object in 75 GETs of a tensor each.)
            let mine = g.blocks.partition_point(|&b| b < i)..g.blocks.partition_point(|&b| b <= i);
            let rest = g.blocks.partition_point(|&b| b < taken.max(i + 1))..g.runs.len();
            let parts: Vec<std::ops::Range<usize>> = match (mine.is_empty(), rest.is_empty()) {
                (false, false) if mine.end == rest.start => std::iter::once(mine.start..rest.end).collect(),
                _ => [mine, rest].into_iter().filter(|r| !r.is_empty()).collect(),
            };
            if parts.is_empty() {
                *next += 1;
                continue;
            }
            let bytes: u64 = parts.iter().map(|r| g.span(r.clone())).map(|(a, e)| e - a).sum();
            let _one = STARTING.lock().unwrap_or_else(|p| p.into_inner());
            let held = self.held.load(Ordering::Relaxed);
            if held > 0 && held + bytes > self.limit {
                break;
            }
            for r in parts {
                let (start, end) = g.span(r.clone());
                holds.extend(g.src.prefetch_runs(start, end, &g.runs[r], &self.held));
            }
            *next += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// A source recording the ranges announced to it.
    struct Recorder(Mutex<Vec<u64>>, crate::storage::Version);

    impl ByteSource for Recorder {
        fn path(&self) -> &Path {
            Path::new("s3://b/k")
        }
        fn len(&self) -> u64 {
            1 << 20
        }
        fn read_at(&self, _: u64, _: &mut [u8]) -> Result<()> {
            Ok(())
        }
        fn prefetch_runs(
            &self,
            start: u64,
            _: u64,
            _: &[(u64, u64, u64)],
            _: &Arc<AtomicU64>,
        ) -> Option<Box<dyn Any + Send + Sync>> {
            self.0.lock().unwrap().push(start);
            None
        }
        fn version(&self) -> &crate::storage::Version {
            &self.1
        }
        fn check(&self) -> Result<()> {
            Ok(())
        }
    }

    /// A recorder, and the same as a source.
    fn recorder() -> (Arc<Recorder>, Arc<dyn ByteSource>) {
        let rec = Arc::new(Recorder(
            Mutex::new(Vec::new()),
            crate::storage::Version::Remote { len: 1 << 20, etag: String::new() },
        ));
        let src: Arc<dyn ByteSource> = rec.clone();
        (rec, src)
    }

    /// A GET of the given blocks of 100 bytes, each one run.
    fn get_of(src: &Arc<dyn ByteSource>, blocks: &[u64]) -> Get {
        Get {
            src: src.clone(),
            runs: blocks.iter().map(|&b| (b * 100, b * 100 + 100, 100)).collect(),
            blocks: blocks.iter().map(|&b| b as usize).collect(),
            first: blocks[0] * 100,
        }
    }

    /// The read-ahead of `gets` over `blocks` blocks of 100 bytes.
    fn prefetch(gets: Vec<Get>, blocks: u64, limit: u64, held: Arc<AtomicU64>) -> ObjectPrefetch {
        ObjectPrefetch {
            gets,
            block_at: (0..blocks).map(|b| b * 100).collect(),
            next: Mutex::new((0, Vec::new())),
            ahead: 1000,
            limit,
            held,
        }
    }

    /// Consecutive tensors of one object (64-byte headers between them) joined into GETs within
    /// aligned 1024 bytes: a GET also fetches the header before its first tensor (from the
    /// object's start, or from where the previous GET ended), so that no header is left between
    /// two GETs (a table of contents taken from another object is checked in them); a tensor
    /// across a multiple of 1024 is cut there, and only the tensors' bytes count as read.
    #[test]
    fn gets_take_the_header_before_their_first_run_and_end_at_aligned_offsets() {
        let (_, src) = recorder();
        let (mut open, mut gets) = (HashMap::new(), Vec::new());
        for t in 0..6u64 {
            let from = 64 + t * (300 + 64);
            join(&mut open, &mut gets, (0, 0), Run { src: &src, from, n: 300, read: 300, at: t * 300, block: 0 }, 1024);
        }
        // A run far from the others starts a GET of its own, without a header.
        join(&mut open, &mut gets, (0, 0), Run { src: &src, from: 9000, n: 100, read: 100, at: 1800, block: 1 }, 1024);
        gets.extend(open.into_values());
        let spans: Vec<(u64, u64)> = gets.iter().map(|g| g.span(0..g.runs.len())).collect();
        assert_eq!(spans, [(0, 1024), (1024, 2048), (2048, 2184), (9000, 9100)]);
        assert_eq!(gets.iter().flat_map(|g| &g.runs).map(|r| r.2).sum::<u64>(), 1900);
        assert_eq!(gets[0].runs[0], (0, 64, 0));
        // The third tensor [792, 1092) is cut at 1024; the fourth's header [1092, 1156) follows.
        assert_eq!(gets[1].runs[..2], [(1024, 1092, 68), (1092, 1156, 0)]);
        for g in &gets {
            // The runs tile the GET.
            assert!(g.runs.windows(2).all(|w| w[0].1 == w[1].0), "{:?}", g.runs);
        }
    }

    #[test]
    fn a_late_advance_skips_gets_of_blocks_taken_by_others() {
        // Blocks of 100 bytes, one GET each. Workers took blocks 0..3 (fetch_add) before the
        // one with block 0 advances: the GETs of blocks 1 and 2, being read already, are not
        // started (a GET started now would be read in part and hold the rest).
        let (rec, src) = recorder();
        let gets = (0..5).map(|b| get_of(&src, &[b])).collect();
        prefetch(gets, 5, u64::MAX, Arc::default()).advance(0, 3);
        assert_eq!(*rec.0.lock().unwrap(), [0, 300, 400]);
    }

    /// A GET held back by the budget when its first block was taken is made later for the runs
    /// of the blocks not taken yet (it was skipped, and its blocks read every run on their own).
    #[test]
    fn a_get_held_back_by_the_budget_is_made_for_the_blocks_left() {
        let (rec, src) = recorder();
        let held = Arc::new(AtomicU64::new(1000));
        let p = prefetch(vec![get_of(&src, &[0, 1, 2, 3])], 4, 1000, held.clone());
        // The other fills hold the budget: nothing starts.
        p.advance(0, 1);
        assert!(rec.0.lock().unwrap().is_empty());
        // Freed while blocks 0 and 1 were taken (this worker has block 1): from block 1 on.
        held.store(0, Ordering::Relaxed);
        p.advance(1, 2);
        assert_eq!(*rec.0.lock().unwrap(), [100]);
        // A GET of blocks 0..3 when this worker has block 1 and another one took block 2: the
        // runs of block 1 and of block 3, not those of block 2 (being read on their own).
        prefetch(vec![get_of(&src, &[0, 1, 2, 3])], 4, 1000, Arc::default()).advance(1, 3);
        assert_eq!(rec.0.lock().unwrap()[1..], [100, 300]);
        rec.0.lock().unwrap().truncate(1);
        // A GET of blocks 0, 2 and 3 when this worker has block 1 and others took 0..3: the
        // run of block 3 alone (block 2 is being read by another worker).
        prefetch(vec![get_of(&src, &[0, 2, 3])], 4, 1000, Arc::default()).advance(1, 3);
        assert_eq!(*rec.0.lock().unwrap(), [100, 300]);
    }
}
