//! Writing one destination rank to a file: the codec lays it out, the content is filled into
//! a [`FileSink`] over a temporary file, the codec finishes it (crc), and the file is synced,
//! renamed into place and recorded in the folder's manifest. A rank a previous run of the same
//! plan finished is kept (resume).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::fill::{fill, ContentSink};
use super::{output_path, Job, WrittenFile};
use crate::atomic::{remove_stale_temps, temp_path};
use crate::checkpoint::{FileLayout, TensorHeader};
use crate::error::{Error, Result};
use crate::formats::codec::{Codec, Finish, RunCrc};
use crate::manifest::{entry_matches, Manifest, ManifestEntry};
use crate::plan::{RankOrder, RankPlan, TensorPlan};

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

/// Where a laid-out output's bytes go: a local file ([`Output`]) or the parts of a multipart
/// upload (`object_sink`). Written from several workers at once, at disjoint offsets.
pub(crate) trait OutputBytes: Sync {
    /// Writes `data` (a run of a mapped source, or an assembled buffer) at `at`.
    fn write(&self, data: &[u8], at: u64) -> Result<()>;

    /// Writes a layout's fixed bytes (headers); returns the crc of each, by offset.
    fn write_fixed(&self, layout: &FileLayout) -> Result<Vec<RunCrc>> {
        let mut crcs = Vec::with_capacity(layout.fixed.len());
        for (off, bytes) in &layout.fixed {
            self.write(bytes, *off)?;
            crcs.push((*off, crc_of(bytes)));
        }
        Ok(crcs)
    }

    /// Reads a few bytes written before back (0-d values, for MindSpore's safetensors crc).
    fn read_back(&self, at: u64, buf: &mut [u8]) -> Result<()>;

    /// Writes `data` again over bytes written before (the codec's finish patching a header).
    fn rewrite(&self, data: &[u8], at: u64) -> Result<()> {
        self.write(data, at)
    }
}

impl OutputBytes for Output<'_> {
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

    fn write_fixed(&self, layout: &FileLayout) -> Result<Vec<RunCrc>> {
        let mut crcs = Vec::with_capacity(layout.fixed.len());
        for (off, bytes) in &layout.fixed {
            self.file.write_all_at(bytes, *off).map_err(|e| Error::io(self.path, "write", e))?;
            crcs.push((*off, crc_of(bytes)));
        }
        Ok(crcs)
    }

    fn read_back(&self, at: u64, buf: &mut [u8]) -> Result<()> {
        self.file.read_exact_at(buf, at).map_err(|e| Error::io(self.path, "read back", e))
    }
}

pub(crate) fn crc_of(bytes: &[u8]) -> crc32fast::Hasher {
    let mut h = crc32fast::Hasher::new();
    h.update(bytes);
    h
}

/// The file sink: content put into a laid-out output file, each run at its offsets, with its
/// crc kept so that the file's crc is known without reading it back.
struct FileSink<'a> {
    layout: &'a FileLayout,
    out: &'a dyn OutputBytes,
    crcs: Mutex<Vec<RunCrc>>,
}

impl ContentSink for FileSink<'_> {
    fn put(&self, tensor: usize, at: u64, data: &[u8]) -> Result<()> {
        for (foff, roff, n) in self.layout.place(tensor, at, data.len() as u64) {
            let part = &data[roff as usize..(roff + n) as usize];
            let h = crc_of(part);
            self.out.write(part, foff)?;
            self.crcs.lock().unwrap_or_else(|p| p.into_inner()).push((foff, h));
        }
        Ok(())
    }
}

/// Removes the temporary file on every way out, a panic included; after the rename into place
/// there is nothing left under that name.
struct RemoveTemp<'a>(&'a Path);

impl Drop for RemoveTemp<'_> {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.0);
    }
}

/// Writes destination rank `rp` to its file (or keeps the one a previous run finished).
pub(crate) fn write_rank(job: &Job<'_>, codec: &dyn Codec, rp: &RankPlan) -> Result<WrittenFile> {
    let final_path = output_path(job.plan, job.dst_dir, rp.rank, job.opts);
    write_file(job, codec, rp, final_path, Some(rp.rank))
}

/// Writes the tensors of `rp` to `final_path` (or keeps the file a previous run finished);
/// the manifest records it as destination rank `dst_rank` (`None`: a file of no rank, such as
/// a unified folder's part).
pub(crate) fn write_file(
    job: &Job<'_>,
    codec: &dyn Codec,
    rp: &RankPlan,
    final_path: PathBuf,
    dst_rank: Option<u32>,
) -> Result<WrittenFile> {
    let mut tensors: Vec<&TensorPlan> = rp.tensors.iter().collect();
    codec.order(&mut tensors);
    let what = Rank::of(codec, rp, &tensors)?;
    let windows = whole_windows(codec, &tensors);
    write_windows(job, codec, &what, &windows, &|| rp.src_ranks(), final_path, dst_rank)
}

/// The windows of a whole rank's `tensors` in the codec's order (the codec's window at a time).
pub(crate) fn whole_windows<'a, 't: 'a>(
    codec: &'a dyn Codec,
    tensors: &'a [&'t TensorPlan],
) -> impl Fn(&mut WindowFn<'_>) -> Result<()> + 'a {
    move |each: &mut WindowFn<'_>| -> Result<()> {
        // A rank with no tensors is still one (empty) window: a safetensors file has its header.
        if tensors.is_empty() {
            return each(&[]);
        }
        tensors.chunks(codec.window().max(1)).try_for_each(&mut *each)
    }
}

/// Writes destination rank `order` to its file as [`write_rank`] does, making its tensor plans
/// one window at a time (a codec whose order is the plan's, with windows smaller than the rank).
pub(crate) fn write_rank_windowed(job: &Job<'_>, codec: &dyn Codec, order: &RankOrder) -> Result<WrittenFile> {
    let n = codec.window().max(1);
    let windows = |each: &mut WindowFn<'_>| -> Result<()> {
        if order.tensors.is_empty() {
            return each(&[]);
        }
        for w in order.tensors.chunks(n) {
            let made = job.plan.tensor_plans(order, w)?;
            each(&made.iter().collect::<Vec<_>>())?;
        }
        Ok(())
    };
    // Windows are laid out one after the other, so the file is as long as they are together.
    let mut file_len = 0;
    windows(&mut |w| {
        file_len += codec.file_len(w)?;
        Ok(())
    })?;
    let what = Rank { rank: order.rank, count: order.tensors.len(), file_len, bytes_written: order.bytes_written };
    let final_path = output_path(job.plan, job.dst_dir, order.rank, job.opts);
    write_windows(job, codec, &what, &windows, &|| order.src_ranks.clone(), final_path, Some(order.rank))
}

/// What [`write_windows`] and [`write_content`] need to know of the rank they write.
pub(crate) struct Rank {
    rank: u32,
    /// Tensors.
    count: usize,
    /// The file's length as the codec lays it out (before any trailer).
    pub(crate) file_len: u64,
    /// Content bytes.
    bytes_written: u64,
}

impl Rank {
    /// A whole rank plan whose tensors are `tensors`, in the codec's order.
    pub(crate) fn of(codec: &dyn Codec, rp: &RankPlan, tensors: &[&TensorPlan]) -> Result<Rank> {
        let file_len = codec.file_len(tensors)?;
        Ok(Rank { rank: rp.rank, count: tensors.len(), file_len, bytes_written: rp.bytes_written() })
    }
}

/// What is done with each window of tensors.
pub(crate) type WindowFn<'w> = dyn FnMut(&[&TensorPlan]) -> Result<()> + 'w;

/// Windows of tensors, in file order: calls its argument with each.
pub(crate) type Windows<'a> = dyn Fn(&mut WindowFn<'_>) -> Result<()> + 'a;

fn write_windows(
    job: &Job<'_>,
    codec: &dyn Codec,
    rp: &Rank,
    windows: &Windows<'_>,
    src_ranks: &dyn Fn() -> Vec<u32>,
    final_path: PathBuf,
    dst_rank: Option<u32>,
) -> Result<WrittenFile> {
    let Job { opts, fingerprint, .. } = *job;
    let file_len = rp.file_len;
    let dir = final_path.parent().map(Path::to_path_buf).unwrap_or_default();
    let name = final_path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
    if opts.resume {
        if let Some(e) = Manifest::read(&dir)
            .and_then(|m| m.files.into_iter().find(|e| e.name == name && e.plan_fingerprint == fingerprint))
        {
            if entry_matches(&dir, &e) {
                job.advance(rp.bytes_written);
                return Ok(WrittenFile { rank: rp.rank, path: final_path, len: e.size, crc32: e.crc32, reused: true });
            }
        }
    }
    job.check_cancel(&final_path)?;
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, "create folder", e))?;
    remove_stale_temps(&dir, &name);
    let tmp_path = temp_path(&final_path);
    let _remove_temp = RemoveTemp(&tmp_path);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp_path)
        .map_err(|e| Error::io(&tmp_path, "create", e))?;
    file.set_len(file_len).map_err(|e| Error::io(&tmp_path, "resize", e))?;
    let out = Output { file: &file, path: &tmp_path, lock: Mutex::new(()), early_writeback: opts.sync };
    let (len, crc) = write_content(job, codec, rp, windows, src_ranks, &out, &final_path)?;
    commit(job, &file, &tmp_path, &final_path, dst_rank, len, crc)?;
    Ok(WrittenFile { rank: rp.rank, path: final_path, len, crc32: crc, reused: false })
}

/// Lays out the `windows` of `rp` (in the codec's order, `rp.file_len` bytes) one after the
/// other into `out`, fills their content, checks the sources `src_ranks` names, and writes what
/// the codec finishes with (a crc). Returns the output's length and crc32. `what` names the
/// output in messages.
pub(crate) fn write_content(
    job: &Job<'_>,
    codec: &dyn Codec,
    rp: &Rank,
    windows: &Windows<'_>,
    src_ranks: &dyn Fn() -> Vec<u32>,
    out: &dyn OutputBytes,
    what: &Path,
) -> Result<(u64, u32)> {
    let final_path = what;
    let file_len = rp.file_len;
    // The runs tile the file; combining their crcs in file order gives the file's crc without
    // reading it back. A codec that lays out whole files keeps every run for its finish.
    let whole = codec.window() >= rp.count;
    let mut kept: Vec<RunCrc> = Vec::new();
    let mut whole_layout: Option<(Vec<TensorHeader>, FileLayout)> = None;
    let mut file_crc = crc32fast::Hasher::new();
    let mut pos = 0;
    windows(&mut |window| {
        let headers: Vec<TensorHeader> = window.iter().map(|t| codec.header(t)).collect();
        let layout = codec.layout(&headers, pos)?;
        let sink = FileSink { layout: &layout, out, crcs: Mutex::new(out.write_fixed(&layout)?) };
        fill(job, window, &sink, final_path)?;
        let mut crcs = sink.crcs.into_inner().unwrap_or_else(|p| p.into_inner());
        // A window's runs tile its part of the file, which follows the previous one's.
        crcs.sort_by_key(|(off, _)| *off);
        pos = layout.len;
        if whole {
            kept = crcs;
            whole_layout = Some((headers, layout));
        } else {
            for (_, h) in &crcs {
                file_crc.combine(h);
            }
        }
        Ok(())
    })?;
    if pos != file_len {
        return Err(Error::Invalid(format!(
            "internal error: {} was laid out as {file_len} bytes but its windows took {pos}",
            final_path.display()
        )));
    }
    if whole {
        for (_, h) in &kept {
            file_crc.combine(h);
        }
    }
    // Every source this rank read still has the size and times it had when it was opened
    // (else what was read may mix two versions of it), and no read of one faulted.
    for r in src_ranks() {
        job.sources.check_rank(r)?;
    }
    job.check_cancel(final_path)?;
    let read_back = |at: u64, buf: &mut [u8]| out.read_back(at, buf);
    let (headers, layout) = match &whole_layout {
        Some((h, l)) => (h.as_slice(), Some(l)),
        None => (&[][..], None),
    };
    let finish =
        Finish { headers, layout, runs: &kept, file_crc: file_crc.clone().finalize(), file_len, read_back: &read_back };
    let mut len = file_len;
    for (at, bytes) in codec.finish(&finish)? {
        match at >= file_len {
            true => out.write(&bytes, at)?,
            false => out.rewrite(&bytes, at)?,
        }
        if at >= file_len {
            file_crc.combine(&crc_of(&bytes));
            len = len.max(at + bytes.len() as u64);
        } else {
            // A rewrite of a fixed run of the same length: the crc is combined again in order.
            let i = kept.iter().position(|(o, _)| *o == at).ok_or_else(|| {
                Error::Invalid(format!("internal error: {} patched at {at}, not a run start", final_path.display()))
            })?;
            kept[i] = (at, crc_of(&bytes));
            file_crc = crc32fast::Hasher::new();
            for (_, h) in &kept {
                file_crc.combine(h);
            }
        }
    }
    Ok((len, file_crc.finalize()))
}

/// Syncs the temporary file, renames it into place, syncs the folder and records the file in
/// the manifest.
fn commit(
    job: &Job<'_>,
    file: &File,
    tmp: &Path,
    final_path: &PathBuf,
    rank: Option<u32>,
    len: u64,
    crc: u32,
) -> Result<()> {
    let opts = job.opts;
    if opts.sync {
        file.sync_all().map_err(|e| Error::io(tmp, "sync", e))?;
    }
    std::fs::rename(tmp, final_path).map_err(|e| Error::io(final_path, "rename into place", e))?;
    let dir = final_path.parent().map(Path::to_path_buf).unwrap_or_default();
    if opts.sync {
        if let Ok(d) = File::open(&dir) {
            let _ = d.sync_all();
        }
    }
    let entry = ManifestEntry {
        name: final_path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string(),
        size: len,
        crc32: crc,
        plan_fingerprint: job.fingerprint.to_string(),
        dst_rank: rank,
        dst_rank_count: rank.map(|_| job.plan.dst_rank_count()),
    };
    Manifest::record(&dir, entry, opts.sync)
}
