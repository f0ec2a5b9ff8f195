//! Read-ahead for object sources: the plan knows every run a fill will read, so before the first
//! block is copied the runs of all its blocks are joined, per source object, into ranged GETs of
//! up to [`GET_BYTES`] (consecutive runs less than [`GAP_BYTES`] apart: a `.ckpt` tensor follows
//! the previous one after a header of a few dozen bytes), and the GETs are started in block order,
//! [`AHEAD_BYTES`] of blocks ahead of the block being copied, so that the store is kept busy by
//! large requests the whole time. Per-block announcements (as for local files) would make one GET
//! per tensor and source: on the bench model's 8 -> 4 about 1,000 GETs of 256 KiB, whose latency,
//! not the bytes, set the pace.
//!
//! The bytes fetched ahead and not yet copied, of all fills together, stay within half the job's
//! `memory_budget` (the blocks' buffers have the other half, see `block_bytes`): a GET that would
//! go beyond waits until copies free bytes (a later block starts it), and GETs shrink with a small
//! budget (an eighth of the read-ahead), so that several are still in flight.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::storage::prefetched_bytes;

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
const MIN_GET_BYTES: u64 = 64 << 10;

/// The bytes the read-ahead of a job may hold (fetched or on their way, not yet copied): half its
/// memory budget.
pub(crate) fn read_ahead_budget(memory_budget: u64) -> u64 {
    (memory_budget / 2).max(MIN_GET_BYTES)
}

/// Serializes the budget check and the start of a GET across the fills of all jobs, so that two
/// fills never both take the last bytes of the budget.
static STARTING: Mutex<()> = Mutex::new(());

/// One joined GET.
struct Get {
    src: Arc<dyn ByteSource>,
    start: u64,
    end: u64,
    /// The bytes of it the blocks read.
    read: u64,
    /// Where its first block starts, in bytes of the fill (blocks in order).
    first: u64,
}

/// The GETs of one fill, started as its blocks are taken.
pub(crate) struct ObjectPrefetch {
    gets: Vec<Get>,
    /// Each block's start, in bytes of the fill.
    block_at: Vec<u64>,
    /// The next GET to start.
    next: Mutex<usize>,
    /// How far ahead of the block being copied GETs are started.
    ahead: u64,
    /// The most bytes the read-ahead of the process may hold ([`read_ahead_budget`]).
    limit: u64,
}

impl ObjectPrefetch {
    /// Joins the runs of `blocks` (in order) into GETs.
    pub(crate) fn new(job: &Job<'_>, tensors: &[&TensorPlan], blocks: &[Block]) -> Result<ObjectPrefetch> {
        let limit = read_ahead_budget(job.opts.memory_budget);
        let get_bytes = GET_BYTES.min(limit / 8).max(MIN_GET_BYTES);
        let mut gets = Vec::new();
        let mut open: HashMap<(u32, u32), Get> = HashMap::new();
        let mut block_at = Vec::with_capacity(blocks.len());
        let mut at = 0u64;
        for b in blocks {
            block_at.push(at);
            block_file_runs(job, tensors[b.tensor], b, &mut |src, key, from, n, read| {
                match open.get_mut(&key) {
                    Some(g) if from >= g.end && from - g.end <= GAP_BYTES && from + n - g.start <= get_bytes => {
                        g.end = from + n;
                        g.read += read;
                    }
                    _ => {
                        let g = Get { src: src.clone(), start: from, end: from + n, read, first: at };
                        if let Some(done) = open.insert(key, g) {
                            gets.push(done);
                        }
                    }
                }
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
        Ok(ObjectPrefetch { gets, block_at, next: Mutex::new(0), ahead, limit })
    }

    /// Block `i` is being taken: starts every GET whose first block begins less than the
    /// read-ahead after it, as far as the budget allows.
    pub(crate) fn advance(&self, i: usize) {
        let Some(&here) = self.block_at.get(i) else {
            return;
        };
        let horizon = here.saturating_add(self.ahead);
        let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(g) = self.gets.get(*next).filter(|g| g.first <= horizon) {
            // A GET whose first block was taken already (it waited for the budget) would only
            // be read in part, and what it holds never freed: those blocks read their own bytes.
            if g.first < here {
                *next += 1;
                continue;
            }
            let _one = STARTING.lock().unwrap_or_else(|p| p.into_inner());
            let held = prefetched_bytes();
            if held > 0 && held + (g.end - g.start) > self.limit {
                break;
            }
            g.src.prefetch_joined(g.start, g.end - g.start, g.read);
            *next += 1;
        }
    }
}
