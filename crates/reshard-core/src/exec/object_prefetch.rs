//! Read-ahead for object sources: the plan knows every run a fill will read, so before the first
//! block is copied the runs of all its blocks are joined, per source object, into ranged GETs of
//! up to [`GET_BYTES`] (consecutive runs less than [`GAP_BYTES`] apart: a `.ckpt` tensor follows
//! the previous one after a header of a few dozen bytes), and the GETs are started in block order,
//! [`AHEAD_BYTES`] of blocks ahead of the block being copied, so that the store is kept busy by
//! large requests the whole time. Per-block announcements (as for local files) would make one GET
//! per tensor and source: on the bench model's 8 -> 4 about 1,000 GETs of 256 KiB, whose latency,
//! not the bytes, set the pace.

use std::collections::HashMap;
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
}

impl ObjectPrefetch {
    /// Joins the runs of `blocks` (in order) into GETs.
    pub(crate) fn new(job: &Job<'_>, tensors: &[&TensorPlan], blocks: &[Block]) -> Result<ObjectPrefetch> {
        let mut gets = Vec::new();
        let mut open: HashMap<(u32, u32), Get> = HashMap::new();
        let mut block_at = Vec::with_capacity(blocks.len());
        let mut at = 0u64;
        for b in blocks {
            block_at.push(at);
            block_file_runs(job, tensors[b.tensor], b, &mut |src, key, from, n, read| {
                match open.get_mut(&key) {
                    Some(g) if from >= g.end && from - g.end <= GAP_BYTES && from + n - g.start <= GET_BYTES => {
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
        Ok(ObjectPrefetch { gets, block_at, next: Mutex::new(0) })
    }

    /// Block `i` is being taken: starts every GET whose first block begins less than
    /// [`AHEAD_BYTES`] after it.
    pub(crate) fn advance(&self, i: usize) {
        let Some(&here) = self.block_at.get(i) else {
            return;
        };
        let horizon = here.saturating_add(AHEAD_BYTES);
        let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(g) = self.gets.get(*next).filter(|g| g.first <= horizon) {
            g.src.prefetch_joined(g.start, g.end - g.start, g.read);
            *next += 1;
        }
    }
}
