//! Loading one destination rank into caller memory: the same plan and the same byte moves as
//! writing its file, into buffers the caller allocates ([`MemorySink`]). Nothing goes to disk.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};

use super::fill::{fill, ContentSink, FillPart};
use super::sources::OpenSources;
use super::{ExecuteOptions, Job, ProgressFn};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::plan::{Plan, TensorPlan};
use crate::storage::IoMode;

/// Settings for [`load_rank`].
#[derive(Clone, Default)]
pub struct LoadOptions {
    /// Worker threads (0 = all cores).
    pub threads: usize,
    /// Load only these parameters (all of the rank's when `None`); a name the rank lacks is an
    /// error naming it.
    pub names: Option<Vec<String>>,
    /// How source files are read.
    pub io: IoMode,
    /// Progress reports: (bytes filled, total).
    pub progress: Option<Arc<ProgressFn>>,
    /// Set it to stop the load ([`Error::Cancelled`]).
    pub cancel: Option<Arc<AtomicBool>>,
}

/// What the allocation callback learns of a tensor before any data moves.
#[derive(Debug, Clone, Copy)]
pub struct TensorMeta<'a> {
    /// Parameter name.
    pub name: &'a str,
    /// Element type.
    pub dtype: DType,
    /// The rank's shape, as in the file `execute` would write.
    pub shape: &'a [u64],
    /// Bytes the buffer must hold.
    pub nbytes: u64,
}

/// Caller buffers as a sink: tensor `i` of the list being filled goes to `buffers[i]`.
///
/// Each buffer is cut into [`SINK_CHUNK`]-byte chunks, each behind its own lock: the blocks of
/// one tensor are filled by different workers at once (disjoint ranges), and a lock per tensor
/// made their copies into a large tensor (an embedding, its optimizer states) take turns.
pub struct MemorySink<'b> {
    /// Per tensor: its buffer's length, and the buffer in chunks.
    buffers: Vec<(usize, Vec<Mutex<&'b mut [u8]>>)>,
}

/// Bytes of a caller buffer behind one lock of a [`MemorySink`] (blocks are at most 1 MiB, so a
/// block's copy takes a few chunks' locks in turn and two workers rarely meet at one).
const SINK_CHUNK: usize = 256 << 10;

impl<'b> MemorySink<'b> {
    /// A sink over these buffers (one per tensor, each at least the tensor's size).
    pub fn new(buffers: Vec<&'b mut [u8]>) -> Self {
        MemorySink {
            buffers: buffers
                .into_iter()
                .map(|b| (b.len(), b.chunks_mut(SINK_CHUNK).map(Mutex::new).collect()))
                .collect(),
        }
    }
}

impl MemorySink<'_> {
    /// Calls `f(offset in the run, part)` for the parts of bytes [at, at + len) of `tensor`'s
    /// buffer, chunk by chunk, each under its chunk's lock; refuses a run beyond the buffer
    /// before touching any byte.
    fn parts(&self, tensor: usize, at: u64, len: u64, f: &mut FillPart<'_>) -> Result<()> {
        let beyond = || {
            Error::Invalid(format!(
                "internal error: tensor {tensor}'s buffer was given {len} bytes at {at}, beyond its end"
            ))
        };
        let (size, chunks) = self.buffers.get(tensor).ok_or_else(beyond)?;
        let mut pos = usize::try_from(at).map_err(|_| beyond())?;
        let end =
            usize::try_from(len).ok().and_then(|l| pos.checked_add(l)).filter(|e| e <= size).ok_or_else(beyond)?;
        let mut done = 0u64;
        while pos < end {
            let (k, within) = (pos / SINK_CHUNK, pos % SINK_CHUNK);
            let mut chunk = chunks.get(k).ok_or_else(beyond)?.lock().unwrap_or_else(|p| p.into_inner());
            let n = chunk.len().saturating_sub(within).min(end - pos);
            if n == 0 {
                return Err(beyond());
            }
            f(done, &mut chunk[within..within + n])?;
            pos += n;
            done += n as u64;
        }
        Ok(())
    }
}

impl ContentSink for MemorySink<'_> {
    fn fill_in_place(&self, tensor: usize, at: u64, len: u64, fill: &mut FillPart<'_>) -> Result<bool> {
        self.parts(tensor, at, len, fill)?;
        Ok(true)
    }

    fn put(&self, tensor: usize, at: u64, data: &[u8]) -> Result<()> {
        self.parts(tensor, at, data.len() as u64, &mut |k, part| {
            part.copy_from_slice(&data[k as usize..k as usize + part.len()]);
            Ok(())
        })
    }
}

/// Loads destination rank `rank` of `plan` into caller memory. `alloc` is called on this thread
/// once per tensor, in the order the rank's `.ckpt` file would hold them, before any data moves;
/// it returns a buffer of at least `nbytes` bytes, or `None` to skip the tensor. The buffers are
/// then filled by worker threads, each with exactly the bytes `execute` writes for the tensor.
pub fn load_rank<'b>(
    plan: &Plan,
    rank: u32,
    opts: &LoadOptions,
    alloc: &mut dyn FnMut(&TensorMeta<'_>) -> Result<Option<&'b mut [u8]>>,
) -> Result<()> {
    let rp = plan.rank_plan(rank)?;
    let mut chosen: Vec<&TensorPlan> = match &opts.names {
        None => rp.tensors.iter().collect(),
        Some(names) => {
            let missing: Vec<&str> =
                names.iter().filter(|n| !rp.tensors.iter().any(|t| &t.name == *n)).map(String::as_str).collect();
            if !missing.is_empty() {
                return Err(Error::Invalid(format!(
                    "destination rank {rank} has no parameter named {}; it has {} parameter(s)",
                    missing.iter().map(|n| format!("'{n}'")).collect::<Vec<_>>().join(", "),
                    rp.tensors.len()
                )));
            }
            rp.tensors.iter().filter(|t| names.contains(&t.name)).collect()
        }
    };
    let mut buffers = Vec::with_capacity(chosen.len());
    let mut kept = Vec::with_capacity(chosen.len());
    for t in chosen.drain(..) {
        let meta = TensorMeta { name: &t.name, dtype: t.dtype, shape: &t.dims, nbytes: t.nbytes };
        if let Some(buf) = alloc(&meta)? {
            if (buf.len() as u64) < t.nbytes {
                return Err(Error::Invalid(format!(
                    "the buffer for parameter '{}' holds {} bytes; it needs {}",
                    t.name,
                    buf.len(),
                    t.nbytes
                )));
            }
            buffers.push(buf);
            kept.push(t);
        }
    }
    let total = kept.iter().map(|t| t.nbytes).sum();
    let exec = ExecuteOptions {
        threads: opts.threads,
        io: opts.io,
        progress: opts.progress.clone(),
        cancel: opts.cancel.clone(),
        ..ExecuteOptions::default()
    };
    // Objects get the same workers as a transform of them (`workers`), not just the cores.
    let pool = super::pool(super::workers(plan, exec.threads))?;
    let sources = OpenSources::new(plan, exec.io);
    let written = AtomicU64::new(0);
    let job = Job::new(&sources, Path::new(""), &exec, &pool, &written, total, "");
    let sink = MemorySink::new(buffers);
    let what = Path::new("").join(format!("destination rank {rank} (in memory)"));
    pool.install(|| fill(&job, &kept, &sink, &what))?;
    for r in rp.src_ranks() {
        sources.check_rank(r)?;
    }
    Ok(())
}

/// The bytes of one source file that loading a rank reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileReads {
    /// The source file.
    pub path: PathBuf,
    /// (offset, length) runs in file order, joined where less than a page apart (the bytes
    /// between joined runs are counted in, as the page cache reads them).
    pub runs: Vec<(u64, u64)>,
}

impl FileReads {
    /// Bytes of the runs.
    pub fn bytes(&self) -> u64 {
        self.runs.iter().map(|r| r.1).sum()
    }

    /// Bytes of the pages the runs touch (each run widened to whole pages, overlaps counted once).
    pub fn page_bytes(&self, page: u64) -> u64 {
        let (mut total, mut last_end) = (0u64, 0u64);
        for &(at, n) in &self.runs {
            let (a, e) = ((at / page * page).max(last_end), (at + n).div_ceil(page) * page);
            total += e.saturating_sub(a);
            last_end = last_end.max(e);
        }
        total
    }
}

/// What [`load_rank`] of destination rank `rank` reads from each source file: the runs its copy
/// announces to the kernel (`MADV_WILLNEED`), gathered over all its tensors, in file order.
/// Nothing is read; the source files are opened (and checked against the plan) to find their
/// sizes. For measuring the limit of a load: with a strided share (a column slice) the pages
/// touched exceed the bytes loaded.
pub fn rank_reads(plan: &Plan, rank: u32) -> Result<Vec<FileReads>> {
    let rp = plan.rank_plan(rank)?;
    let tensors: Vec<&TensorPlan> = rp.tensors.iter().collect();
    let exec = ExecuteOptions { threads: 1, io: IoMode::Mmap, ..ExecuteOptions::default() };
    let pool = super::pool(1)?;
    let sources = OpenSources::new(plan, exec.io);
    let written = AtomicU64::new(0);
    let job = Job::new(&sources, Path::new(""), &exec, &pool, &written, 0, "");
    let mut blocks = Vec::new();
    for (i, t) in tensors.iter().enumerate() {
        super::fill::blocks_for(i, t, job.block_bytes, &mut blocks);
    }
    let mut runs: BTreeMap<(u32, u32), Vec<(u64, u64)>> = BTreeMap::new();
    for b in &blocks {
        super::fill::block_file_runs(&job, tensors[b.tensor], b, crate::sys::page_size(), &mut |_, key, at, n, _| {
            runs.entry(key).or_default().push((at, n));
            Ok(())
        })?;
    }
    let page = crate::sys::page_size();
    Ok(runs
        .into_iter()
        .map(|((r, f), mut v)| {
            v.sort_unstable();
            let mut joined: Vec<(u64, u64)> = Vec::with_capacity(v.len());
            for (at, n) in v {
                match joined.last_mut() {
                    Some((s, len)) if at <= *s + *len + page => *len = (*len).max(at + n - *s),
                    _ => joined.push((at, n)),
                }
            }
            FileReads { path: plan.sources[&r].files[f as usize].path.clone(), runs: joined }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs across chunk boundaries land where they belong; a run beyond the buffer is an error
    /// and writes nothing past it.
    #[test]
    fn puts_cross_chunks_and_stop_at_the_end() {
        let n = 2 * SINK_CHUNK + 100;
        let mut a = vec![0u8; n];
        let mut b = vec![0u8; 10];
        {
            let sink = MemorySink::new(vec![a.as_mut_slice(), b.as_mut_slice()]);
            let data: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
            let cut = [0, 7, SINK_CHUNK - 3, SINK_CHUNK + 1, 2 * SINK_CHUNK, n];
            for w in cut.windows(2).rev() {
                sink.put(0, w[0] as u64, &data[w[0]..w[1]]).unwrap();
            }
            sink.put(1, 2, &[9; 8]).unwrap();
            assert!(sink.put(1, 3, &[1; 8]).is_err());
            assert!(sink.put(2, 0, &[1]).is_err());
            assert!(sink.put(0, u64::MAX, &[1]).is_err());
        }
        assert!(a.iter().enumerate().all(|(i, &x)| x == (i % 251) as u8));
        // In place: the parts of a run, in order, with their offsets in the run.
        let mut c = vec![0u8; n];
        {
            let sink = MemorySink::new(vec![c.as_mut_slice()]);
            let at = SINK_CHUNK - 5;
            let mut seen = Vec::new();
            let lent = sink
                .fill_in_place(0, at as u64, (SINK_CHUNK + 10) as u64, &mut |k, part| {
                    seen.push((k, part.len()));
                    part.iter_mut().enumerate().for_each(|(j, x)| *x = ((at + k as usize + j) % 251) as u8);
                    Ok(())
                })
                .unwrap();
            assert!(lent);
            assert_eq!(seen, vec![(0, 5), (5, SINK_CHUNK), (SINK_CHUNK as u64 + 5, 5)]);
            assert!(sink.fill_in_place(0, n as u64 - 1, 2, &mut |_, _| Ok(())).is_err());
        }
        let at = SINK_CHUNK - 5;
        assert!(c[at..at + SINK_CHUNK + 10].iter().enumerate().all(|(j, &x)| x == ((at + j) % 251) as u8));
        assert!(c[..at].iter().chain(&c[at + SINK_CHUNK + 10..]).all(|&x| x == 0));
        assert_eq!(&b[..2], &[0, 0]);
        assert_eq!(&b[2..], &[9; 8]);
    }
}
