//! Executing a plan: memory-mapped sources, strided copies into bounded buffers, outputs written
//! at precomputed offsets under a temporary name, synced, then renamed.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use rayon::prelude::*;

use crate::atomic::{remove_stale_temps, temp_path};
use crate::checkpoint::{FileLayout, Format, Segment, TensorHeader};
use crate::error::{Error, Result};
use crate::manifest::{entry_matches, Manifest, ManifestEntry};
use crate::plan::{Plan, RankPlan, TensorSource};
use crate::region::copy_box;
use crate::sys::MappedFile;
use crate::{ckpt, safetensors};

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
    /// threads)` when that is below `block_bytes`. Source files are memory-mapped, so the page
    /// cache holds them, not this budget.
    pub memory_budget: u64,
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

/// The fingerprint a job's manifest entries carry: the plan and the options that shape the files.
pub fn job_fingerprint(plan: &Plan, opts: &ExecuteOptions) -> String {
    plan.fingerprint(&format!("{:?} {} crc={}", opts.format, opts.prefix, opts.crc))
}

/// Lazily mapped source files, checked against what the plan saw.
struct SourceMaps<'p> {
    plan: &'p Plan,
    /// The first attempt's error is kept as it was (an I/O error stays `Io`, a file that is
    /// not a regular file stays `Unsupported`), and every later caller gets a copy of it.
    maps: BTreeMap<u32, OnceLock<Result<Arc<MappedFile>>>>,
}

impl<'p> SourceMaps<'p> {
    fn new(plan: &'p Plan) -> Self {
        SourceMaps { plan, maps: plan.sources.keys().map(|&r| (r, OnceLock::new())).collect() }
    }

    fn get(&self, rank: u32) -> Result<Arc<MappedFile>> {
        let src = &self.plan.sources[&rank];
        let cell = &self.maps[&rank];
        let r = cell.get_or_init(|| {
            let map = MappedFile::open(&src.path)?;
            // The size and mtime of the file mapped (not of the path a moment before).
            let planned = src.mtime.and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map(|d| d.as_nanos());
            let now = map.opened();
            if now.len != src.len || planned.is_some_and(|p| i128::try_from(p).ok() != Some(now.mtime_ns)) {
                return Err(Error::Source {
                    path: src.path.clone(),
                    detail: "the file changed after the plan was made; make the plan again".into(),
                });
            }
            Ok(Arc::new(map))
        });
        r.clone()
    }

    /// The map of `rank` if it was opened.
    fn opened(&self, rank: u32) -> Option<&MappedFile> {
        self.maps.get(&rank)?.get()?.as_ref().ok().map(|m| &**m)
    }

    /// After a block of `t`: fails, naming the file, if a read of one of its sources faulted
    /// (the file was truncated under its map; the block then holds zeros).
    fn check_faults(&self, t: &crate::plan::TensorPlan) -> Result<()> {
        if crate::sys::faults_absorbed() == 0 {
            return Ok(());
        }
        let ranks: Vec<u32> = match &t.source {
            TensorSource::Raw { src_rank } => vec![*src_rank],
            TensorSource::Pieces { pieces, .. } => pieces.iter().map(|p| p.src_rank).collect(),
        };
        for r in ranks {
            if let Some(m) = self.opened(r).filter(|m| m.faulted()) {
                m.check()?;
            }
        }
        Ok(())
    }

    /// The error to report for a failed write of bytes taken from the map of `rank`: a `pwrite`
    /// from a page beyond the end of a truncated source fails with EFAULT (it raises no
    /// SIGBUS), so a source that changed is named rather than the output.
    fn explain(&self, rank: u32, e: Error) -> Error {
        match self.opened(rank).map(MappedFile::check) {
            Some(Err(changed)) => changed,
            _ => e,
        }
    }
}

/// Reads logical content ranges of a tensor stored in segments.
struct SegReader<'a> {
    bytes: &'a [u8],
    segs: &'a [Segment],
    starts: Vec<u64>,
}

impl<'a> SegReader<'a> {
    fn new(bytes: &'a [u8], segs: &'a [Segment]) -> Self {
        let mut starts = Vec::with_capacity(segs.len());
        let mut acc = 0;
        for s in segs {
            starts.push(acc);
            acc += s.len;
        }
        SegReader { bytes, segs, starts }
    }

    fn read(&self, mut off: u64, out: &mut [u8]) {
        let mut done = 0usize;
        let mut i = self.starts.partition_point(|&s| s <= off).saturating_sub(1);
        while done < out.len() {
            let s = &self.segs[i];
            let within = off - self.starts[i];
            let n = ((s.len - within) as usize).min(out.len() - done);
            let at = (s.offset + within) as usize;
            out[done..done + n].copy_from_slice(&self.bytes[at..at + n]);
            done += n;
            off += n as u64;
            i += 1;
        }
    }
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

/// Runs the plan for `ranks` (all destination ranks when empty), writing into `dst_dir`.
pub fn execute(plan: &Plan, dst_dir: &Path, ranks: &[u32], opts: &ExecuteOptions) -> Result<Vec<WrittenFile>> {
    check_output(&plan.src_dir, dst_dir, &opts.prefix)?;
    let ranks: Vec<u32> = if ranks.is_empty() {
        (0..plan.dst_rank_count()).collect()
    } else {
        let mut r = ranks.to_vec();
        r.sort_unstable();
        r.dedup();
        r
    };
    // Rank plans are made again by the worker that writes the rank rather than kept for every
    // rank: with many small tensors they are most of the memory (300,000 tensors: about 100 MB
    // per rank).
    let mut total = 0u64;
    let mut most_tensors = 0;
    for &r in &ranks {
        let rp = plan.rank_plan(r)?;
        most_tensors = most_tensors.max(rp.tensors.len());
        if opts.format == Format::Safetensors {
            if let Some(t) = rp.tensors.iter().find(|t| t.dtype.safetensors_name().is_none()) {
                return Err(Error::Invalid(format!(
                    "parameter '{}' is a {} and cannot be written to safetensors; use --output_format ckpt",
                    t.name, t.dtype
                )));
            }
        }
        total += rp.bytes_written();
    }
    // The rank plans just counted are freed; the workers' own heaps would not reuse them.
    if plan.param_count() >= crate::plan::TRIM_HEAP_PARAMS {
        crate::sys::trim_heap();
    }
    let written = AtomicU64::new(0);
    let maps = SourceMaps::new(plan);
    let fingerprint = job_fingerprint(plan, opts);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(opts.threads)
        .build()
        .map_err(|e| Error::Invalid(format!("cannot start worker threads: {e}")))?;
    let block_bytes = opts.block_bytes.min(opts.memory_budget / (2 * pool.current_num_threads() as u64).max(1)).max(1);
    let job =
        Job { plan, maps: &maps, dst_dir, opts, block_bytes, written: &written, total, fingerprint: &fingerprint };
    let one_rank = |r: u32| write_rank(&job, &plan.rank_plan(r)?);
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

/// Fails with [`Error::Cancelled`] when the run was asked to stop.
fn check_cancel(opts: &ExecuteOptions, output: &Path) -> Result<()> {
    match &opts.cancel {
        Some(c) if c.load(Ordering::Acquire) => Err(Error::Cancelled { path: output.to_path_buf() }),
        _ => Ok(()),
    }
}

/// Above this many tensors in a rank, ranks are written one at a time rather than side by side.
const RANK_AT_A_TIME_TENSORS: usize = 20_000;

/// What every rank of one `execute` call shares.
struct Job<'a> {
    plan: &'a Plan,
    maps: &'a SourceMaps<'a>,
    dst_dir: &'a Path,
    opts: &'a ExecuteOptions,
    block_bytes: u64,
    written: &'a AtomicU64,
    total: u64,
    fingerprint: &'a str,
}

/// Lays out an output file for the given tensors.
pub fn file_layout(headers: &[TensorHeader], format: Format) -> Result<FileLayout> {
    match format {
        Format::Ckpt => Ok(ckpt::layout(headers, ckpt::CHUNK_BYTES)),
        Format::Safetensors => safetensors::layout(headers, &safetensors_metadata(None)),
    }
}

/// MindSpore's safetensors metadata; with `crc`, its `crc_num`. The crc is only known after
/// the data is written, so the header is first laid out with the widest value ("4294967295")
/// and rewritten, padded with spaces to the same length, at the end.
fn safetensors_metadata(crc: Option<u32>) -> BTreeMap<String, String> {
    let mut m = BTreeMap::from([("format".to_string(), "ms".to_string())]);
    if let Some(c) = crc {
        m.insert("crc_num".to_string(), c.to_string());
    }
    m
}

/// The output file being written, with a lock that lets one thread write to it at a time.
///
/// The kernel serialises buffered writes to one file anyway (ext4 holds the inode lock for
/// each), and threads waiting for that lock spin on the CPU: on 8 -> complete (one 606 MB output,
/// 2 threads) 29% of the samples were `rwsem_spin_on_owner`. Waiting here sleeps instead, and the
/// other thread checksums or assembles its next block meanwhile.
struct Output<'a> {
    file: &'a File,
    path: &'a Path,
    lock: Mutex<()>,
    /// Start write-back of each written range at once (when the output will be fsynced): the
    /// disk then works while the rest is copied, and the final fsync has little left to do.
    early_writeback: bool,
}

impl Output<'_> {
    /// Writes `data` (a run of a mapped source, or an assembled buffer) at `at`.
    fn write(&self, data: &[u8], at: u64) -> Result<()> {
        {
            let _held = self.lock.lock().unwrap_or_else(|p| p.into_inner());
            self.file.write_all_at(data, at).map_err(|e| Error::io(self.path, "write", e))?;
        }
        if self.early_writeback {
            // Whole pages only: a page shared with a neighbour written later would go out twice.
            let page = crate::sys::page_size();
            let (from, to) = (at.div_ceil(page) * page, (at + data.len() as u64) / page * page);
            if to > from {
                crate::sys::start_writeback(self.file, from, to - from);
            }
        }
        Ok(())
    }
}

thread_local! {
    /// Each worker's assembly buffer, kept from block to block rather than allocated and
    /// zeroed for each.
    static BLOCK_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A unit of work: one block of one tensor.
struct Block {
    tensor: usize,
    /// A sub-box of the destination box (relative to it) that is one contiguous byte range of
    /// the tensor: single indices on the outer dims, a range on one dim, whole inner dims.
    offset: Vec<u64>,
    shape: Vec<u64>,
    /// Its byte range in the tensor's content.
    start: u64,
    len: u64,
}

impl Block {
    /// The block as a box in full-tensor coordinates, given the destination box it lies in.
    fn region(&self, dst_box: &crate::region::Region) -> crate::region::Region {
        crate::region::Region {
            offset: dst_box.offset.iter().zip(&self.offset).map(|(a, b)| a + b).collect(),
            shape: self.shape.clone(),
        }
    }
}

/// Cuts a tensor into blocks of at most `max` bytes (one element at least).
fn blocks_for(tensor: usize, t: &crate::plan::TensorPlan, max: u64, out: &mut Vec<Block>) {
    let dims: &[u64] = match &t.source {
        TensorSource::Pieces { dst_box, .. } => &dst_box.shape,
        // Raw copies are byte ranges: treat the content as one dim of bytes.
        TensorSource::Raw { .. } => &[],
    };
    if dims.is_empty() || t.nbytes == 0 {
        let mut start = 0;
        loop {
            let len = (t.nbytes - start).min(max.max(1));
            out.push(Block { tensor, offset: vec![0; dims.len()], shape: dims.to_vec(), start, len });
            start += len;
            if start >= t.nbytes {
                return;
            }
        }
    }
    let elem = t.dtype.size();
    let nd = dims.len();
    // inner[k] = bytes of one index of dim k-1, i.e. of dims k.. together.
    let mut inner = vec![elem; nd + 1];
    for k in (0..nd).rev() {
        inner[k] = inner[k + 1] * dims[k];
    }
    // The outermost dim whose one-index slab fits in a block is cut in ranges.
    let d = (0..nd).find(|&k| inner[k + 1] <= max).unwrap_or(nd - 1);
    let per = (max / inner[d + 1]).max(1);
    let mut idx = vec![0u64; d];
    loop {
        let base: u64 = (0..d).map(|k| idx[k] * inner[k + 1]).sum();
        let mut r = 0;
        while r < dims[d] {
            let e = (r + per).min(dims[d]);
            let mut offset = idx.clone();
            offset.push(r);
            offset.resize(nd, 0);
            let mut shape = vec![1; d];
            shape.push(e - r);
            shape.extend_from_slice(&dims[d + 1..]);
            out.push(Block { tensor, offset, shape, start: base + r * inner[d + 1], len: (e - r) * inner[d + 1] });
            r = e;
        }
        if !crate::region::next_index(&mut idx, &dims[..d]) {
            return;
        }
    }
}

fn write_rank(job: &Job<'_>, rp: &RankPlan) -> Result<WrittenFile> {
    let Job { plan, maps, dst_dir, opts, block_bytes: _, written, total, fingerprint } = *job;
    let mut tensors: Vec<&crate::plan::TensorPlan> = rp.tensors.iter().collect();
    if opts.format == Format::Safetensors {
        tensors.sort_by(|a, b| safetensors::data_order(a.dtype, &a.name, b.dtype, &b.name));
    }
    let want_st_crc = opts.crc && opts.format == Format::Safetensors;
    // A safetensors header names every tensor, so the file is laid out whole. A `.ckpt` file's
    // values follow one another: it is laid out and written a window of tensors at a time, and
    // only its length is computed up front (a whole layout, its headers and blocks took about
    // 500 bytes per tensor: 150 MB for a rank of 300,000 small tensors).
    let whole = match opts.format {
        Format::Safetensors => {
            let headers = headers_of(&tensors);
            let layout = match want_st_crc {
                true => safetensors::layout(&headers, &safetensors_metadata(Some(u32::MAX)))?,
                false => file_layout(&headers, opts.format)?,
            };
            Some((headers, layout))
        }
        Format::Ckpt => None,
    };
    let file_len = match &whole {
        Some((_, layout)) => layout.len,
        None => tensors.iter().map(|t| ckpt::tensor_len(&t.name, t.dtype, &t.dims, t.nbytes, ckpt::CHUNK_BYTES)).sum(),
    };
    let final_path = output_path(plan, dst_dir, rp.rank, opts);
    let dir = final_path.parent().map(Path::to_path_buf).unwrap_or_default();
    let name = final_path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
    if opts.resume {
        if let Some(e) = Manifest::read(&dir)
            .and_then(|m| m.files.into_iter().find(|e| e.name == name && e.plan_fingerprint == fingerprint))
        {
            if entry_matches(&dir, &e) {
                let n = rp.bytes_written();
                let done = written.fetch_add(n, Ordering::Relaxed) + n;
                if let Some(p) = &opts.progress {
                    p(done, total);
                }
                return Ok(WrittenFile { rank: rp.rank, path: final_path, len: e.size, crc32: e.crc32, reused: true });
            }
        }
    }
    check_cancel(opts, &final_path)?;
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, "create folder", e))?;
    remove_stale_temps(&dir, &name);
    remove_stale_temps(&dir, crate::manifest::MANIFEST_NAME);
    let tmp_path = temp_path(&final_path);
    // Removes the temporary file on every way out, a panic included; after the rename into
    // place there is nothing left under that name.
    struct RemoveTemp<'a>(&'a Path);
    impl Drop for RemoveTemp<'_> {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(self.0);
        }
    }
    let _remove_temp = RemoveTemp(&tmp_path);
    (|| {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp_path)
            .map_err(|e| Error::io(&tmp_path, "create", e))?;
        file.set_len(file_len).map_err(|e| Error::io(&tmp_path, "resize", e))?;
        let out = Output { file: &file, path: &tmp_path, lock: Mutex::new(()), early_writeback: opts.sync };
        // The runs tile the file; combining their crcs in file order gives the file's crc
        // without reading it back.
        let mut file_crc = crc32fast::Hasher::new();
        match &whole {
            Some((headers, layout)) => {
                let mut crcs = write_fixed(layout, &out)?;
                crcs.extend(write_window(job, &tensors, layout, &out, &final_path)?);
                crcs.sort_by_key(|(off, _)| *off);
                if want_st_crc {
                    let st_crc = safetensors_crc(headers, layout, &crcs, &file, &tmp_path)?;
                    let real = safetensors::layout(headers, &safetensors_metadata(Some(st_crc)))?;
                    // Same header length as laid out (the first 8 bytes say it): pad the JSON with spaces.
                    let old = &layout.fixed[0].1;
                    let text = std::str::from_utf8(&real.fixed[0].1[8..]).unwrap_or_default().trim_end();
                    let mut head = old[..8].to_vec();
                    head.extend_from_slice(text.as_bytes());
                    head.resize(old.len(), b' ');
                    file.write_all_at(&head, 0).map_err(|e| Error::io(&tmp_path, "write", e))?;
                    let mut h = crc32fast::Hasher::new();
                    h.update(&head);
                    crcs[0] = (0, h);
                }
                for (_, h) in &crcs {
                    file_crc.combine(h);
                }
            }
            None => {
                let mut pos = 0;
                for window in tensors.chunks(WINDOW_TENSORS) {
                    let layout = ckpt::layout_at(&headers_of(window), ckpt::CHUNK_BYTES, pos);
                    let mut crcs = write_fixed(&layout, &out)?;
                    crcs.extend(write_window(job, window, &layout, &out, &final_path)?);
                    // A window's runs tile its part of the file, which follows the previous one's.
                    crcs.sort_by_key(|(off, _)| *off);
                    for (_, h) in &crcs {
                        file_crc.combine(h);
                    }
                    pos = layout.len;
                }
                if pos != file_len {
                    return Err(Error::Invalid(format!(
                        "internal error: {} was laid out as {file_len} bytes but its windows took {pos}",
                        final_path.display()
                    )));
                }
            }
        }
        // Every source this rank read still has the size and times it had when it was mapped
        // (else what was read may mix two versions of it), and no read of one faulted.
        for r in rp.src_ranks() {
            maps.get(r)?.check()?;
        }
        check_cancel(opts, &final_path)?;
        let mut len = file_len;
        let mut crc = file_crc.finalize();
        if opts.crc && opts.format == Format::Ckpt {
            let trailer = ckpt::crc_trailer(crc);
            file.write_all_at(&trailer, file_len).map_err(|e| Error::io(&tmp_path, "write", e))?;
            let mut h = crc32fast::Hasher::new_with_initial(crc);
            h.update(&trailer);
            crc = h.finalize();
            len += trailer.len() as u64;
        }
        if opts.sync {
            file.sync_all().map_err(|e| Error::io(&tmp_path, "sync", e))?;
        }
        drop(file);
        std::fs::rename(&tmp_path, &final_path).map_err(|e| Error::io(&final_path, "rename into place", e))?;
        if opts.sync {
            if let Ok(d) = File::open(&dir) {
                let _ = d.sync_all();
            }
        }
        let entry = ManifestEntry {
            name: name.clone(),
            size: len,
            crc32: crc,
            plan_fingerprint: fingerprint.to_string(),
            dst_rank: Some(rp.rank),
            dst_rank_count: Some(plan.dst_rank_count()),
        };
        Manifest::record(&dir, entry, opts.sync)?;
        Ok(WrittenFile { rank: rp.rank, path: final_path.clone(), len, crc32: crc, reused: false })
    })()
}

/// Above this many tensors, a `.ckpt` rank is laid out and written in windows of this many.
const WINDOW_TENSORS: usize = 8192;

/// The headers of tensors to be written.
fn headers_of(tensors: &[&crate::plan::TensorPlan]) -> Vec<TensorHeader> {
    // 0-d tensors stay 0-d (shape []) in safetensors too, as MindSpore writes them.
    tensors
        .iter()
        .map(|t| TensorHeader { name: t.name.clone(), dtype: t.dtype, dims: t.dims.clone(), nbytes: t.nbytes })
        .collect()
}

/// Writes a layout's fixed bytes; returns the crc of each, by offset.
fn write_fixed(layout: &FileLayout, out: &Output<'_>) -> Result<Vec<(u64, crc32fast::Hasher)>> {
    let mut crcs = Vec::with_capacity(layout.fixed.len());
    for (off, bytes) in &layout.fixed {
        out.file.write_all_at(bytes, *off).map_err(|e| Error::io(out.path, "write", e))?;
        let mut h = crc32fast::Hasher::new();
        h.update(bytes);
        crcs.push((*off, h));
    }
    Ok(crcs)
}

/// Writes the content of `tensors` (laid out by `layout`, in the same order) with all workers;
/// returns the crc of each run written, by offset.
fn write_window(
    job: &Job<'_>,
    tensors: &[&crate::plan::TensorPlan],
    layout: &FileLayout,
    out: &Output<'_>,
    final_path: &Path,
) -> Result<Vec<(u64, crc32fast::Hasher)>> {
    let Job { plan, maps, opts, block_bytes, written, total, .. } = *job;
    // Blocks of bounded size: the memory a worker holds at once.
    let mut blocks = Vec::with_capacity(tensors.len());
    for (i, t) in tensors.iter().enumerate() {
        blocks_for(i, t, block_bytes, &mut blocks);
    }
    // Block i + ahead is announced when block i is taken (the first ones now).
    let ahead = usize::try_from(READ_AHEAD_BYTES / block_bytes).unwrap_or(usize::MAX).max(1);
    for b in blocks.iter().take(ahead) {
        announce_block(plan, maps, tensors[b.tensor], b)?;
    }
    // Workers take the blocks in file order from one counter, so the file is written front
    // to back (a parallel iterator would split it into halves written from two fronts).
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let block_crcs: Vec<Vec<(u64, crc32fast::Hasher)>> = (0..rayon::current_num_threads().min(blocks.len()))
        .into_par_iter()
        .map(|_| {
            let mut mine = Vec::new();
            while !failed.load(Ordering::Relaxed) {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(b) = blocks.get(i) else {
                    break;
                };
                let step = || -> Result<_> {
                    check_cancel(opts, final_path)?;
                    if let Some(a) = blocks.get(i.saturating_add(ahead)) {
                        announce_block(plan, maps, tensors[a.tensor], a)?;
                    }
                    let r = write_block(plan, maps, tensors[b.tensor], b, layout, b.tensor, out)?;
                    maps.check_faults(tensors[b.tensor])?;
                    Ok(r)
                };
                let (n, crcs) = step().inspect_err(|_| failed.store(true, Ordering::Relaxed))?;
                mine.extend(crcs);
                let done = written.fetch_add(n, Ordering::Relaxed) + n;
                if let Some(p) = &opts.progress {
                    p(done, total);
                }
            }
            Ok(mine)
        })
        .collect::<Result<_>>()?;
    Ok(block_crcs.into_iter().flatten().collect())
}

#[allow(clippy::too_many_arguments)]
fn write_block(
    plan: &Plan,
    maps: &SourceMaps<'_>,
    t: &crate::plan::TensorPlan,
    b: &Block,
    layout: &FileLayout,
    ti: usize,
    out: &Output<'_>,
) -> Result<(u64, Vec<(u64, crc32fast::Hasher)>)> {
    let (start, len) = (b.start, b.len);
    if len == 0 {
        return Ok((0, Vec::new()));
    }
    let mut crcs = Vec::new();
    // `data` is the content for tensor bytes [at, at + len): a run of a mapped source, written
    // straight from the map, or an assembled buffer.
    let mut write = |data: &[u8], at: u64| -> Result<()> {
        for (foff, roff, n) in layout.place(ti, at, data.len() as u64) {
            let part = &data[roff as usize..(roff + n) as usize];
            let mut h = crc32fast::Hasher::new();
            h.update(part);
            crcs.push((foff, h));
            out.write(part, foff)?;
        }
        Ok(())
    };
    match &t.source {
        TensorSource::Raw { src_rank } => {
            let info = plan.tensor_info(*src_rank, &t.name)?;
            let map = maps.get(*src_rank)?;
            // Straight from the map to the file: no intermediate buffer.
            for (at, from, n) in segment_runs(&info.segments, start, start + len) {
                write(&map[from as usize..(from + n) as usize], at).map_err(|e| maps.explain(*src_rank, e))?;
            }
        }
        TensorSource::Pieces { dst_box, pieces } => {
            let elem = t.dtype.size();
            let nd = dst_box.shape.len();
            let block = b.region(dst_box);
            // The pieces' parts inside this block.
            let parts: Vec<_> = pieces.iter().filter_map(|p| p.region.intersect(&block).map(|r| (p, r))).collect();
            // When every part is one contiguous run both in its source and in the block (row
            // splits), write straight from the source maps with no buffer.
            let mut direct = Vec::new();
            for (p, region) in &parts {
                let src_off = contiguous_offset(&p.src_box, region, elem);
                let dst_off = contiguous_offset(&block, region, elem);
                let info = plan.tensor_info(p.src_rank, &t.name)?;
                match (src_off, dst_off, info.segments.as_slice()) {
                    (Some(so), Some(dof), [seg]) => {
                        direct.push((p.src_rank, seg.offset + so, dof, region.numel() * elem))
                    }
                    _ => {
                        direct.clear();
                        break;
                    }
                }
            }
            if !direct.is_empty() {
                for (rank, from, dof, n) in direct {
                    let map = maps.get(rank)?;
                    write(&map[from as usize..(from + n) as usize], start + dof).map_err(|e| maps.explain(rank, e))?;
                }
                return Ok((len, crcs));
            }
            // The pieces tile the block (the plan guarantees it; checked here because the
            // reused buffer would otherwise carry bytes of an earlier block).
            let covered: u64 = parts.iter().map(|(_, r)| r.numel()).sum();
            if covered * elem != len {
                return Err(Error::Invalid(format!(
                    "internal error: the plan for '{}' covers {} of the {} bytes of a block",
                    t.name,
                    covered * elem,
                    len
                )));
            }
            BLOCK_BUF.with_borrow_mut(|buf| {
                if buf.len() < len as usize {
                    buf.resize(len as usize, 0);
                }
                let buf = &mut buf[..len as usize];
                for (p, region) in &parts {
                    let info = plan.tensor_info(p.src_rank, &t.name)?;
                    let map = maps.get(p.src_rank)?;
                    let reader = SegReader::new(&map, &info.segments);
                    let src_origin: Vec<u64> = (0..nd).map(|d| region.offset[d] - p.src_box.offset[d]).collect();
                    let dst_origin: Vec<u64> = (0..nd).map(|d| region.offset[d] - block.offset[d]).collect();
                    let mut read = |off: u64, out: &mut [u8]| reader.read(off, out);
                    copy_box(
                        &mut read,
                        &p.src_box.shape,
                        &src_origin,
                        buf,
                        &block.shape,
                        &dst_origin,
                        &region.shape,
                        elem,
                    );
                }
                write(buf, start)
            })?;
        }
    }
    Ok((len, crcs))
}

/// The parts of content bytes [from, to) of a tensor stored in `segments`: (content offset,
/// file offset, length) for each segment it overlaps.
fn segment_runs(segments: &[Segment], from: u64, to: u64) -> impl Iterator<Item = (u64, u64, u64)> + '_ {
    segments
        .iter()
        .scan(0u64, |seg_start, s| {
            let start = *seg_start;
            *seg_start += s.len;
            Some((start, s))
        })
        .filter_map(move |(seg_start, s)| {
            let (a, e) = (from.max(seg_start), to.min(seg_start + s.len));
            (a < e).then(|| (a, s.offset + (a - seg_start), e - a))
        })
}

/// How far ahead of the block being written its source bytes are announced: a cold source is
/// then read in large requests while earlier blocks are copied, and a rank larger than memory is
/// not pulled into the page cache all at once.
const READ_AHEAD_BYTES: u64 = 64 << 20;

/// Tells the kernel which source bytes block `b` will read (`MADV_WILLNEED` on exactly those
/// ranges, merged where less than a page apart). Source maps do no read-around, so nothing
/// else of a source is read: one rank of complete -> 8 read 88 MB of the 578 MB source (its
/// share and the headers), in 0.10 s instead of 0.34 s.
fn announce_block(plan: &Plan, maps: &SourceMaps<'_>, t: &crate::plan::TensorPlan, b: &Block) -> Result<()> {
    let page = crate::sys::page_size();
    // (source rank, start, end) in the source tensor's content.
    let mut runs: Vec<(u32, u64, u64)> = Vec::new();
    match &t.source {
        TensorSource::Raw { src_rank } => runs.push((*src_rank, b.start, b.start + b.len)),
        TensorSource::Pieces { dst_box, pieces } => {
            let elem = t.dtype.size();
            let nd = dst_box.shape.len();
            let block = b.region(dst_box);
            for p in pieces {
                let Some(r) = p.region.intersect(&block).filter(|r| r.numel() > 0) else {
                    continue;
                };
                let src = &p.src_box;
                // Dims k.. are whole in the source box, so each index of dims ..k-1 is one
                // contiguous run of r.shape[k-1] rows of the inner dims.
                let mut k = nd;
                while k > 0 && r.shape[k - 1] == src.shape[k - 1] {
                    k -= 1;
                }
                let stride = crate::region::strides(&src.shape, 1);
                let (outer, run) = if k == 0 { (0, r.numel()) } else { (k - 1, r.shape[k - 1] * stride[k - 1]) };
                let mut idx = vec![0u64; outer];
                let mut cur: Option<(u64, u64)> = None;
                loop {
                    let first: u64 = (0..nd)
                        .map(|d| (r.offset[d] - src.offset[d] + if d < outer { idx[d] } else { 0 }) * stride[d])
                        .sum();
                    let (s, e) = (first * elem, (first + run) * elem);
                    cur = match cur {
                        Some((cs, ce)) if s <= ce + page => Some((cs, ce.max(e))),
                        Some((cs, ce)) => {
                            runs.push((p.src_rank, cs, ce));
                            Some((s, e))
                        }
                        None => Some((s, e)),
                    };
                    if !crate::region::next_index(&mut idx, &r.shape[..outer]) {
                        break;
                    }
                }
                if let Some((cs, ce)) = cur {
                    runs.push((p.src_rank, cs, ce));
                }
            }
        }
    }
    for (rank, from, to) in runs {
        let map = maps.get(rank)?;
        for (_, at, n) in segment_runs(&plan.tensor_info(rank, &t.name)?.segments, from, to) {
            map.will_need(at, n);
        }
    }
    Ok(())
}

/// MindSpore's safetensors crc (see [`safetensors`]): crc32 chained over each name, then its
/// data, names sorted; computed from the crcs of the runs written.
fn safetensors_crc(
    headers: &[TensorHeader],
    layout: &FileLayout,
    runs: &[(u64, crc32fast::Hasher)],
    file: &File,
    path: &Path,
) -> Result<u32> {
    let mut order: Vec<usize> = (0..headers.len()).collect();
    order.sort_by(|&a, &b| headers[a].name.cmp(&headers[b].name));
    let mut h = crc32fast::Hasher::new();
    for i in order {
        h.update(headers[i].name.as_bytes());
        let (start, len) = layout.content[i].first().map_or((0, 0), |r| (r.file_offset, r.len));
        // A 0-d integer counts as that many zero bytes (MindSpore's `bytes(ndarray)`): read its
        // few bytes back from the output.
        if headers[i].dims.is_empty() && len <= 8 {
            let mut raw = vec![0u8; len as usize];
            file.read_exact_at(&mut raw, start).map_err(|e| Error::io(path, "read back", e))?;
            if let Some(n) = safetensors::scalar_int_value(headers[i].dtype, &[], &raw) {
                safetensors::update_zeros(&mut h, n);
                continue;
            }
        }
        // Runs are sorted by offset; those inside this tensor's data are its content.
        let from = runs.partition_point(|(o, _)| *o < start);
        for (o, rh) in &runs[from..] {
            if *o >= start + len {
                break;
            }
            h.combine(rh);
        }
    }
    Ok(h.finalize())
}

/// Byte offset of `region` inside a C-order array holding `outer`, if the region is one
/// contiguous run there.
fn contiguous_offset(outer: &crate::region::Region, region: &crate::region::Region, elem: u64) -> Option<u64> {
    let nd = outer.shape.len();
    // After the first dim with extent > 1, every dim must be whole.
    let first = (0..nd).find(|&d| region.shape[d] > 1).unwrap_or(nd);
    if (first + 1..nd).any(|d| region.shape[d] != outer.shape[d]) {
        return None;
    }
    let mut off = 0;
    for d in 0..nd {
        off = off * outer.shape[d] + (region.offset[d] - outer.offset[d]);
    }
    Some(off * elem)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::TensorPlan;

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
    use crate::region::Region;
    use crate::DType;

    fn pieces_tensor(shape: &[u64]) -> TensorPlan {
        let n: u64 = shape.iter().product();
        TensorPlan {
            name: "t".into(),
            dtype: DType::Float32,
            dims: shape.to_vec(),
            nbytes: n * 4,
            source: TensorSource::Pieces { dst_box: Region::full(shape), pieces: vec![] },
        }
    }

    /// Blocks are within the size bound, contiguous, and tile the tensor in order.
    fn check(shape: &[u64], max: u64) {
        let t = pieces_tensor(shape);
        let mut blocks = Vec::new();
        blocks_for(0, &t, max, &mut blocks);
        let mut at = 0;
        for b in &blocks {
            assert_eq!(b.start, at, "{shape:?} {max}");
            assert_eq!(b.len, b.shape.iter().product::<u64>() * 4);
            assert!(b.len <= max.max(4), "{shape:?}: block of {} over {max}", b.len);
            at += b.len;
        }
        assert_eq!(at, t.nbytes);
    }

    #[test]
    fn blocks_respect_the_bound_even_when_one_row_is_larger() {
        check(&[8, 4], 16);
        check(&[2, 3, 1000], 64);
        check(&[3, 5], 1);
        check(&[1000], 1 << 20);
        check(&[7, 9, 11], 100);
    }
}
