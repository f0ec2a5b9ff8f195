//! Executing a plan. The data path:
//!
//! ```text
//!  sources (storage::ByteSource: mmap | pread | ...)      plan (plan::Plan -> RankPlan)
//!        \                                                   /
//!         '--> exec::sources::OpenSources  <-- exec::fill: blocks, strided copies, prefetch
//!                                                     |
//!                                          exec::fill::ContentSink
//!                                          /                     \
//!      exec::file_sink (formats::codec::Codec: layout,      exec::memory::MemorySink
//!      order, crc; temp file, fsync, rename, manifest)      (caller buffers: load_rank)
//! ```
//!
//! The executor only moves bytes: where they come from is a byte source, what surrounds them in
//! a file is the codec's, and where they go is the sink's.

mod file_sink;
pub mod fill;
pub mod memory;
pub mod mindformers;
pub mod named;
mod object_prefetch;
#[cfg(feature = "s3")]
pub(crate) mod object_sink;
mod sources;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use rayon::prelude::*;

use crate::checkpoint::Format;
use crate::error::{Error, Result};
use crate::formats::codec::codec_for;
pub use crate::formats::codec::file_layout;
use crate::plan::Plan;
use crate::storage::IoMode;
use sources::OpenSources;

/// Progress callback: (bytes written so far, total bytes to write).
pub type ProgressFn = dyn Fn(u64, u64) + Send + Sync;

/// Settings for writing outputs.
#[derive(Clone)]
pub struct ExecuteOptions {
    /// File name prefix: outputs are `rank_{r}/{prefix}{r}.{ext}`.
    pub prefix: String,
    /// Output format.
    pub format: Format,
    /// Worker threads (0 = all cores).
    pub threads: usize,
    /// Largest buffer one worker assembles at a time.
    pub block_bytes: u64,
    /// Bound on the buffers of all workers together: blocks shrink to `memory_budget / (2 x
    /// threads)` when that is below `block_bytes`. Mapped source files are in the page cache,
    /// not this budget.
    pub memory_budget: u64,
    /// How source files are read (`mmap`, `pread`, or `auto`: pread on network filesystems).
    pub io: IoMode,
    /// Append MindSpore's crc trailer to `.ckpt` outputs (`crc_num` metadata for safetensors).
    pub crc: bool,
    /// fsync each output before renaming it into place (on by default: a file under its final
    /// name is complete even after a power loss).
    pub sync: bool,
    /// Keep outputs that a previous run of the same plan finished (its manifest lists them
    /// with the same plan fingerprint, size and crc32) instead of writing them again.
    pub resume: bool,
    /// Progress reports.
    pub progress: Option<Arc<ProgressFn>>,
    /// Set it (from any thread, or a signal handler) to stop the run: the executor looks at it
    /// between blocks, removes the temporary files of the outputs in flight and returns
    /// [`Error::Cancelled`]; outputs already renamed into place stay (they are complete).
    pub cancel: Option<Arc<AtomicBool>>,
}

impl Default for ExecuteOptions {
    fn default() -> Self {
        ExecuteOptions {
            prefix: "checkpoint_".into(),
            format: Format::Ckpt,
            threads: 0,
            // Measured on the bench model (medians of 9, --no-sync): 1 MiB blocks stay in the
            // cache between the checksum and the write; 16 MiB blocks were slower and erratic
            // (8 -> complete 0.21 vs 0.31 s, complete -> 8 0.12 vs 0.13 s, 8 -> 4 0.10 vs 0.11 s,
            // with runs up to 2x slower), 256 KiB blocks cost more calls (0.26 s on 8 -> complete).
            block_bytes: 1 << 20,
            memory_budget: 256 << 20,
            io: IoMode::Auto,
            crc: false,
            sync: true,
            resume: true,
            progress: None,
            cancel: None,
        }
    }
}

impl std::fmt::Debug for ExecuteOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecuteOptions")
            .field("prefix", &self.prefix)
            .field("format", &self.format)
            .field("threads", &self.threads)
            .field("block_bytes", &self.block_bytes)
            .field("memory_budget", &self.memory_budget)
            .field("io", &self.io)
            .field("crc", &self.crc)
            .field("sync", &self.sync)
            .field("resume", &self.resume)
            .field("cancel", &self.cancel)
            .finish()
    }
}

/// What one written file looks like.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct WrittenFile {
    /// Destination rank.
    pub rank: u32,
    /// Final path.
    pub path: PathBuf,
    /// Size in bytes.
    pub len: u64,
    /// crc32 of the whole file.
    pub crc32: u32,
    /// Kept from a previous run of the same plan rather than written again.
    pub reused: bool,
}

/// The output path of destination rank `rank`.
pub fn output_path(plan: &Plan, dst_dir: &Path, rank: u32, opts: &ExecuteOptions) -> PathBuf {
    dst_dir.join(plan.output_name(rank, &opts.prefix, opts.format))
}

/// The absolute path `p` names, with symlinks resolved as far as the path exists and the rest
/// (not created yet) normalised lexically, so `src/x/../out` and `link_to_src/out` are caught.
pub fn resolved(p: &Path) -> PathBuf {
    use std::path::Component;
    let abs = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir().map(|c| c.join(p)).unwrap_or_else(|_| p.to_path_buf())
    };
    let comps: Vec<Component<'_>> = abs.components().collect();
    for split in (1..=comps.len()).rev() {
        let head: PathBuf = comps[..split].iter().collect();
        if let Ok(mut base) = head.canonicalize() {
            for c in &comps[split..] {
                match c {
                    Component::ParentDir => {
                        base.pop();
                    }
                    Component::Normal(n) => base.push(n),
                    _ => {}
                }
            }
            return base;
        }
    }
    abs
}

/// Refuses an output folder inside the source folder (outputs would replace or join the
/// sources that other ranks still read) and prefixes that would leave the rank folder.
pub fn check_output(src_dir: &Path, dst_dir: &Path, prefix: &str) -> Result<()> {
    if resolved(dst_dir).starts_with(resolved(src_dir)) {
        return Err(Error::Invalid(format!(
            "the output folder {} is inside the source folder {}; choose another output folder",
            dst_dir.display(),
            src_dir.display()
        )));
    }
    if prefix.contains('/') || prefix.contains('\0') {
        return Err(Error::Invalid(format!(
            "the prefix '{prefix}' contains '/' or NUL; it must be a file name prefix"
        )));
    }
    Ok(())
}

/// The fingerprint a job's manifest entries carry: the plan and the options that shape the files.
pub fn job_fingerprint(plan: &Plan, opts: &ExecuteOptions) -> String {
    plan.fingerprint(&format!("{:?} {} crc={}", opts.format, opts.prefix, opts.crc))
}

/// Runs the plan for `ranks` (all destination ranks when empty), writing into `dst_dir`.
pub fn execute(plan: &Plan, dst_dir: &Path, ranks: &[u32], opts: &ExecuteOptions) -> Result<Vec<WrittenFile>> {
    check_output(&plan.src_dir, dst_dir, &opts.prefix)?;
    let ranks = job_ranks(plan, ranks);
    let codec = codec_for(opts.format, opts.crc);
    // Rank plans are made again by the worker that writes the rank rather than kept for every
    // rank: with many small tensors they are most of the memory (300,000 tensors: about 100 MB
    // per rank).
    let mut total = 0u64;
    let mut most_tensors = 0;
    let mut read_ranks = std::collections::BTreeSet::new();
    for &r in &ranks {
        // Checked a window of tensor plans at a time, as the largest ranks are written.
        let order = plan.rank_order(r)?;
        read_ranks.extend(order.src_ranks.iter().copied());
        most_tensors = most_tensors.max(order.tensors.len());
        for w in order.tensors.chunks(WINDOW_TENSORS) {
            for t in &plan.tensor_plans(&order, w)? {
                codec.check(t)?;
            }
        }
        total += order.bytes_written;
    }
    // The rank plans just counted are freed; the workers' own heaps would not reuse them.
    if plan.param_count() >= crate::plan::TRIM_HEAP_PARAMS {
        crate::sys::trim_heap();
    }
    let written = AtomicU64::new(0);
    let sources = OpenSources::new(plan, opts.io);
    let fingerprint = job_fingerprint(plan, opts);
    let pool = pool(workers(plan, opts.threads))?;
    // Tables of contents taken from a sibling, of objects no output reads (the others are
    // checked by the reads): checked before anything is written.
    pool.install(|| sources.check_unread(&read_ranks))?;
    let job = Job::new(&sources, dst_dir, opts, &pool, &written, total, &fingerprint);
    let to_store = crate::storage::is_url(dst_dir);
    #[cfg(not(feature = "s3"))]
    if to_store {
        return Err(crate::storage::no_object_storage(dst_dir));
    }
    // A rank of many tensors written to files by a codec that keeps the plan's order: its
    // tensor plans are made a window at a time rather than all at once (300,000 small tensors:
    // 110 MB for a rank's plan).
    let windowed = most_tensors > RANK_AT_A_TIME_TENSORS && codec.keeps_plan_order() && !to_store;
    let one_rank = |r: u32| {
        if windowed {
            return file_sink::write_rank_windowed(&job, &*codec, &plan.rank_order(r)?);
        }
        let rp = plan.rank_plan(r)?;
        #[cfg(feature = "s3")]
        if to_store {
            return object_sink::write_rank(&job, &*codec, &rp);
        }
        file_sink::write_rank(&job, &*codec, &rp)
    };
    pool.install(|| {
        if most_tensors > RANK_AT_A_TIME_TENSORS {
            // Many tensors per rank: a rank's plan, file layout and blocks take a few hundred
            // bytes per tensor (about 450 MB for 300,000), so ranks go one at a time, each
            // still written by all workers (its blocks are many).
            ranks.iter().map(|&r| one_rank(r)).collect::<Result<Vec<_>>>()
        } else {
            ranks.par_iter().map(|&r| one_rank(r)).collect::<Result<Vec<_>>>()
        }
    })
}

/// The workers of a job: `threads`, or when 0 all cores, and at least [`OBJECT_WORKERS`] when
/// the sources are objects (a worker then mostly waits for a GET: more of them keep more ranks'
/// GETs in flight).
fn workers(plan: &Plan, threads: usize) -> usize {
    match (threads, crate::storage::is_url(&plan.src_dir)) {
        (0, true) => std::thread::available_parallelism().map_or(1, |n| n.get()).max(OBJECT_WORKERS),
        _ => threads,
    }
}

/// The fewest workers of a job whose sources are objects (unless `threads` says otherwise).
const OBJECT_WORKERS: usize = 8;

/// The worker pool of one job.
fn pool(threads: usize) -> Result<rayon::ThreadPool> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| Error::Invalid(format!("cannot start worker threads: {e}")))
}

/// The block size: `block_bytes` (at least [`OBJECT_BLOCK_BYTES`] when the sources are objects),
/// smaller when the memory budget shared by `threads` workers (two buffers each) asks for it.
/// Every sink (files, memory, unify's parts, MindFormers roots) takes its blocks from here.
fn block_bytes(plan: &Plan, opts: &ExecuteOptions, threads: usize) -> u64 {
    // From an object store each block is a ranged GET: larger blocks, fewer requests.
    let wanted = match crate::storage::is_url(&plan.src_dir) {
        true => opts.block_bytes.max(OBJECT_BLOCK_BYTES),
        false => opts.block_bytes,
    };
    let budget = blocks_budget(opts.memory_budget, crate::storage::is_url(&plan.src_dir));
    wanted.min(budget / (2 * threads as u64).max(1)).max(1)
}

/// The part of `memory_budget` the blocks' buffers have. Objects: the read-ahead of their GETs
/// has half (`object_prefetch`), and the blocks at least as much as its smallest GET, however
/// small the budget (below 128 KiB the read-ahead's minimum left them 0: 1-byte blocks).
fn blocks_budget(memory_budget: u64, objects: bool) -> u64 {
    match objects {
        true => memory_budget
            .saturating_sub(object_prefetch::read_ahead_budget(memory_budget))
            .max(object_prefetch::MIN_GET_BYTES),
        false => memory_budget,
    }
}

/// The destination ranks of a job: `ranks` sorted without repeats, or every rank when empty.
pub fn job_ranks(plan: &Plan, ranks: &[u32]) -> Vec<u32> {
    if ranks.is_empty() {
        return (0..plan.dst_rank_count()).collect();
    }
    let mut r = ranks.to_vec();
    r.sort_unstable();
    r.dedup();
    r
}

/// The smallest block when the sources are objects (still bounded by the memory budget): a
/// block is one ranged GET per source run, and requests, not bytes, cost the time.
const OBJECT_BLOCK_BYTES: u64 = 8 << 20;

/// Tensor plans made at once when a rank's are checked a window at a time.
const WINDOW_TENSORS: usize = 8192;

/// Above this many tensors in a rank, ranks are written one at a time rather than side by side.
const RANK_AT_A_TIME_TENSORS: usize = 20_000;

/// The context every rank of one job shares: the plan, the opened sources, the options, and
/// the progress counters.
pub(crate) struct Job<'a> {
    plan: &'a Plan,
    sources: &'a OpenSources<'a>,
    dst_dir: &'a Path,
    opts: &'a ExecuteOptions,
    block_bytes: u64,
    written: &'a AtomicU64,
    total: u64,
    fingerprint: &'a str,
    /// Bytes the job's object read-ahead holds (fetched or on their way, not yet copied), kept
    /// within its own budget whatever other jobs of the process hold (`object_prefetch`).
    read_ahead: Arc<AtomicU64>,
}

impl<'a> Job<'a> {
    /// A job writing `total` bytes from the plan behind `sources` into `dst_dir`, its blocks
    /// sized for `pool`'s workers; `fingerprint` marks its manifest entries.
    fn new(
        sources: &'a OpenSources<'a>,
        dst_dir: &'a Path,
        opts: &'a ExecuteOptions,
        pool: &rayon::ThreadPool,
        written: &'a AtomicU64,
        total: u64,
        fingerprint: &'a str,
    ) -> Self {
        let plan = sources.plan();
        let block_bytes = block_bytes(plan, opts, pool.current_num_threads());
        let read_ahead = Arc::new(AtomicU64::new(0));
        Job { plan, sources, dst_dir, opts, block_bytes, written, total, fingerprint, read_ahead }
    }
}

impl Job<'_> {
    /// Fails with [`Error::Cancelled`] when the run was asked to stop.
    fn check_cancel(&self, output: &Path) -> Result<()> {
        match &self.opts.cancel {
            Some(c) if c.load(Ordering::Acquire) => Err(Error::Cancelled { path: output.to_path_buf() }),
            _ => Ok(()),
        }
    }

    /// Counts `n` more bytes done and reports progress.
    fn advance(&self, n: u64) {
        let done = self.written.fetch_add(n, Ordering::Relaxed) + n;
        if let Some(p) = &self.opts.progress {
            p(done, self.total);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_inside_source_is_caught_through_dotdot_and_symlinks() {
        let tmp = std::env::temp_dir().join(format!("reshard-inside-{}", std::process::id()));
        let src = tmp.join("src");
        std::fs::create_dir_all(src.join("rank_0")).unwrap();
        std::os::unix::fs::symlink(&src, tmp.join("link")).unwrap();
        for dst in
            [src.join("out"), src.join("new/../out"), tmp.join("other/../src/out"), tmp.join("link/out"), src.clone()]
        {
            assert!(check_output(&src, &dst, "c_").is_err(), "{}", dst.display());
        }
        for dst in [tmp.join("out"), tmp.join("src/../out"), tmp.join("srcx")] {
            assert!(check_output(&src, &dst, "c_").is_ok(), "{}", dst.display());
        }
        assert!(check_output(&src, &tmp.join("out"), "../c_").is_err());
        std::fs::remove_dir_all(&tmp).unwrap();
    }
}

#[cfg(test)]
mod budget_tests {
    #[test]
    fn a_small_budget_leaves_the_blocks_of_objects_room() {
        for budget in [0, 1, 64 << 10, (128 << 10) - 1] {
            assert_eq!(super::blocks_budget(budget, true), 64 << 10, "{budget}");
        }
        assert_eq!(super::blocks_budget(256 << 20, true), 128 << 20);
        assert_eq!(super::blocks_budget(1000, false), 1000);
    }
}
