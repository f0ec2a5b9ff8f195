//! Writing destination ranks to an object store (`--dst_ckpt_dir s3://bucket/prefix`).
//!
//! Each rank is streamed as a multipart upload: the file sink's code lays it out and fills it
//! (the codec's layout, crc: the same code path as local outputs) into a [`PartWindow`] of
//! 8 MiB parts in memory, and a part is sent as soon as all its bytes are written, so memory
//! stays bounded by the parts in flight and those being filled, whatever the size of the output,
//! and nothing is written to local disk. The upload is completed only when the whole object is
//! in (S3 makes an object visible under its key only then); any failure or a cancel aborts it.
//! Then the rank folder's manifest object is rewritten with the object's size, crc32 and ETag:
//! that write is the commit. A rerun of the same plan keeps an object whose manifest entry, size
//! and ETag still match.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Mutex;

use super::{file_sink, output_path, Job, WrittenFile};
use crate::error::{Error, Result};
use crate::formats::codec::Codec;
use crate::manifest::{ManifestEntry, VerifyReport, MANIFEST_NAME, MANIFEST_VERSION};
use crate::plan::{RankPlan, TensorPlan};
use crate::storage::object;

/// A manifest entry of an object output: the local entry plus the object's ETag.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct ObjectEntry {
    #[serde(flatten)]
    entry: ManifestEntry,
    /// The ETag the store gave the object when its upload completed.
    #[serde(default)]
    etag: String,
}

/// The manifest object of a rank folder (the local manifest's format, with ETags).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct ObjectManifest {
    version: u32,
    files: Vec<ObjectEntry>,
}

/// Manifest objects are read, changed and written back by one thread of this process at a time.
static MANIFEST_LOCK: Mutex<()> = Mutex::new(());

/// The manifest object of `dir`, or None when there is none (or it does not parse: it then lists
/// nothing that can be trusted).
fn read_manifest(dir: &Path) -> Result<Option<ObjectManifest>> {
    let url = dir.join(MANIFEST_NAME);
    if object::head(&url)?.is_none() {
        return Ok(None);
    }
    let bytes = object::read_all(&url, 64 << 20, "manifest")?;
    Ok(serde_json::from_slice(&bytes).ok())
}

fn record(dir: &Path, entry: ObjectEntry) -> Result<()> {
    let _held = MANIFEST_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let mut m = read_manifest(dir)?.unwrap_or(ObjectManifest { version: MANIFEST_VERSION, files: Vec::new() });
    m.version = MANIFEST_VERSION;
    m.files.retain(|e| e.entry.name != entry.entry.name);
    m.files.push(entry);
    m.files.sort_by(|a, b| a.entry.name.cmp(&b.entry.name));
    let bytes = serde_json::to_vec_pretty(&m).map_err(|e| Error::Invalid(e.to_string()))?;
    object::put(&dir.join(MANIFEST_NAME), bytes)?;
    Ok(())
}

/// One part being filled: its bytes and how many of them were written.
struct Part {
    buf: Vec<u8>,
    filled: u64,
}

/// The parts of an output being filled, in memory: a part is allocated when the first write
/// reaches it (with every earlier part not allocated yet: those hold only headers by then, as
/// blocks are filled in file order) and sent as soon as all its bytes are written, so memory is
/// the parts in flight plus the few the workers are filling. The parts holding the file's first
/// fixed run (its header) and the last part are kept until the end: the codec may rewrite the
/// header (a safetensors header carrying the crc, which spans several parts when it is longer
/// than a part) and append to the last (a `.ckpt` crc trailer).
struct PartWindow<'a> {
    upload: &'a object::Upload,
    path: &'a Path,
    file_len: u64,
    /// Whether runs of at most 8 bytes are kept for `read_back` (only a codec whose finish
    /// reads back, safetensors with its crc, needs them).
    keep_small: bool,
    state: Mutex<WindowState>,
}

#[derive(Default)]
struct WindowState {
    /// Parts allocated and not yet sent, by index.
    open: BTreeMap<usize, Part>,
    /// Parts below this are allocated (or sent).
    next: usize,
    /// Header bytes whose part is not allocated yet, by file offset.
    pending: BTreeMap<u64, Vec<u8>>,
    /// Runs of at most 8 bytes written (0-d values), by offset, for `read_back`.
    small: BTreeMap<u64, Vec<u8>>,
    /// Bytes appended after `file_len` (a trailer).
    tail: Vec<u8>,
    /// Parts starting below this offset are kept to the end: the end of the fixed run written at
    /// offset 0 (the header the codec's finish may rewrite). Always at least part 0.
    held_to: u64,
}

const PART: u64 = object::PART_BYTES as u64;

impl PartWindow<'_> {
    fn last(&self) -> usize {
        (self.file_len.saturating_sub(1) / PART) as usize
    }

    fn span(&self, k: usize) -> (u64, u64) {
        let start = k as u64 * PART;
        (start, (start + PART).min(self.file_len))
    }

    /// Copies `data` (at file offset `at`) into part `k`, which is open; returns whether it is
    /// now complete.
    fn place(&self, st: &mut WindowState, k: usize, data: &[u8], at: u64) -> Result<bool> {
        let (start, end) = self.span(k);
        let part = st.open.get_mut(&k).ok_or_else(|| self.internal(at, "its part was already sent"))?;
        let (from, to) = (at.max(start), (at + data.len() as u64).min(end));
        part.buf[(from - start) as usize..(to - start) as usize]
            .copy_from_slice(&data[(from - at) as usize..(to - at) as usize]);
        part.filled += to - from;
        Ok(part.filled == end - start)
    }

    /// Allocates the parts up to `k`, with the header bytes waiting for them; returns those
    /// already complete.
    fn open_to(&self, st: &mut WindowState, k: usize, done: &mut Vec<usize>) -> Result<()> {
        while st.next <= k {
            let i = st.next;
            let (start, end) = self.span(i);
            st.open.insert(i, Part { buf: vec![0; (end - start) as usize], filled: 0 });
            st.next += 1;
            let waiting: Vec<u64> = st.pending.range(..end).map(|(&o, _)| o).collect();
            for o in waiting {
                let bytes = st.pending.remove(&o).unwrap_or_default();
                let o_end = o + bytes.len() as u64;
                if o_end > end {
                    // The rest belongs to the next part.
                    st.pending.insert(end, bytes[(end - o) as usize..].to_vec());
                }
                if o_end > start && self.place(st, i, &bytes, o)? {
                    done.push(i);
                }
            }
        }
        Ok(())
    }

    /// Sends the complete parts in `done` (the header's parts and the last wait for the end).
    fn send(&self, done: Vec<usize>) -> Result<()> {
        for k in done {
            if k == 0 || k == self.last() {
                continue;
            }
            let part = {
                let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
                if self.span(k).0 < st.held_to {
                    continue;
                }
                st.open.remove(&k)
            };
            if let Some(p) = part {
                self.upload.send(k, p.buf)?;
            }
        }
        Ok(())
    }

    fn internal(&self, at: u64, why: &str) -> Error {
        Error::Invalid(format!("internal error: {} written at {at} after {why}", self.path.display()))
    }

    /// Sends what is left once everything is written: returns the number of parts, or None
    /// when the object is one part, which is then returned whole for a plain PUT.
    fn close(&self) -> Result<(usize, Option<Vec<u8>>)> {
        let mut done = Vec::new();
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        self.open_to(&mut st, self.last(), &mut done)?;
        let tail = std::mem::take(&mut st.tail);
        let mut open = std::mem::take(&mut st.open);
        drop(st);
        for (&k, p) in &open {
            let (start, end) = self.span(k);
            if p.filled != end - start {
                return Err(Error::Invalid(format!(
                    "internal error: {}: {} of the {} bytes at {start} were written",
                    self.path.display(),
                    p.filled,
                    end - start
                )));
            }
        }
        let last = self.last();
        if let Some(p) = open.get_mut(&last) {
            p.buf.extend_from_slice(&tail);
        }
        if last == 0 {
            return Ok((1, open.remove(&0).map(|p| p.buf)));
        }
        for (k, p) in open {
            self.upload.send(k, p.buf)?;
        }
        Ok((last + 1, None))
    }
}

impl file_sink::OutputBytes for PartWindow<'_> {
    fn write(&self, data: &[u8], at: u64) -> Result<()> {
        let end = at + data.len() as u64;
        let mut done = Vec::new();
        {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            if self.keep_small && data.len() <= 8 {
                st.small.insert(at, data.to_vec());
            }
            if at >= self.file_len {
                if at != self.file_len + st.tail.len() as u64 {
                    return Err(self.internal(at, "the end of the laid-out file"));
                }
                st.tail.extend_from_slice(data);
                return Ok(());
            }
            if data.is_empty() {
                return Ok(());
            }
            let (first, last) = ((at / PART) as usize, ((end - 1) / PART) as usize);
            self.open_to(&mut st, last, &mut done)?;
            for k in first..=last {
                if self.place(&mut st, k, data, at)? {
                    done.push(k);
                }
            }
        }
        self.send(done)
    }

    fn write_fixed(&self, layout: &crate::checkpoint::FileLayout) -> Result<Vec<crate::formats::codec::RunCrc>> {
        let mut crcs = Vec::with_capacity(layout.fixed.len());
        let mut done = Vec::new();
        {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            for (off, bytes) in &layout.fixed {
                crcs.push((*off, file_sink::crc_of(bytes)));
                if bytes.is_empty() {
                    continue;
                }
                if *off == 0 {
                    st.held_to = st.held_to.max(bytes.len() as u64);
                }
                // Headers of parts not reached yet wait for them (a window's headers span its
                // whole part of the file).
                let (first, last) = ((off / PART) as usize, ((off + bytes.len() as u64 - 1) / PART) as usize);
                let mut placed_to = *off;
                for k in first..=last.min(st.next.saturating_sub(1)) {
                    if st.next > k {
                        if self.place(&mut st, k, bytes, *off)? {
                            done.push(k);
                        }
                        placed_to = self.span(k).1;
                    }
                }
                if placed_to < off + bytes.len() as u64 {
                    st.pending.insert(placed_to, bytes[(placed_to - off) as usize..].to_vec());
                }
            }
        }
        self.send(done)?;
        Ok(crcs)
    }

    fn rewrite(&self, data: &[u8], at: u64) -> Result<()> {
        // Only the parts kept to the end can be rewritten; their bytes are counted already.
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let end = at + data.len() as u64;
        for k in (at / PART) as usize..=(end.saturating_sub(1) / PART) as usize {
            let (start, stop) = self.span(k);
            let part = st.open.get_mut(&k).ok_or_else(|| self.internal(at, "its part was already sent"))?;
            let (from, to) = (at.max(start), end.min(stop));
            part.buf[(from - start) as usize..(to - start) as usize]
                .copy_from_slice(&data[(from - at) as usize..(to - at) as usize]);
        }
        Ok(())
    }

    fn read_back(&self, at: u64, buf: &mut [u8]) -> Result<()> {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match st.small.get(&at).filter(|b| b.len() >= buf.len()) {
            Some(b) => {
                buf.copy_from_slice(&b[..buf.len()]);
                Ok(())
            }
            None => Err(self.internal(at, "no such run was kept to be read back")),
        }
    }
}

/// Writes destination rank `rp` to its object (or keeps the one a previous run finished).
pub(crate) fn write_rank(job: &Job<'_>, codec: &dyn Codec, rp: &RankPlan) -> Result<WrittenFile> {
    write_object(job, codec, rp, output_path(job.plan, job.dst_dir, rp.rank, job.opts), Some(rp.rank))
}

/// Writes the tensors of `rp` to the object `final_url` (or keeps the one a previous run
/// finished); the manifest records it as destination rank `dst_rank` (`None`: an object of no
/// rank, such as a unified folder's part), as `file_sink::write_file` does for files.
pub(crate) fn write_object(
    job: &Job<'_>,
    codec: &dyn Codec,
    rp: &RankPlan,
    final_url: PathBuf,
    dst_rank: Option<u32>,
) -> Result<WrittenFile> {
    let dir = final_url.parent().map(Path::to_path_buf).unwrap_or_default();
    let name = final_url.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
    if job.opts.resume {
        if let Some(e) = read_manifest(&dir)?.and_then(|m| {
            m.files.into_iter().find(|e| e.entry.name == name && e.entry.plan_fingerprint == job.fingerprint)
        }) {
            if object::head(&final_url)?.is_some_and(|(size, etag)| size == e.entry.size && etag == e.etag) {
                job.advance(rp.bytes_written());
                return Ok(WrittenFile {
                    rank: rp.rank,
                    path: final_url,
                    len: e.entry.size,
                    crc32: e.entry.crc32,
                    reused: true,
                });
            }
        }
    }
    job.check_cancel(&final_url)?;
    let mut tensors: Vec<&TensorPlan> = rp.tensors.iter().collect();
    codec.order(&mut tensors);
    let what = file_sink::Rank::of(codec, rp, &tensors)?;
    let windows = file_sink::whole_windows(codec, &tensors);
    // Dropped unfinished (an error, a cancel), the upload is aborted.
    let upload = object::Upload::new(&final_url)?;
    let window = PartWindow {
        upload: &upload,
        path: &final_url,
        file_len: what.file_len,
        keep_small: codec.reads_back(),
        state: Mutex::default(),
    };
    let (len, crc) = file_sink::write_content(job, codec, &what, &windows, &|| rp.src_ranks(), &window, &final_url)?;
    let cancelled = || job.opts.cancel.as_ref().is_some_and(|c| c.load(Ordering::Acquire));
    let etag = match window.close()? {
        (_, Some(whole)) => {
            if cancelled() {
                return Err(Error::Cancelled { path: final_url });
            }
            object::put(&final_url, whole)?
        }
        (parts, None) => upload.finish(parts, &cancelled)?,
    };
    let entry = ManifestEntry {
        name,
        size: len,
        crc32: crc,
        plan_fingerprint: job.fingerprint.to_string(),
        dst_rank,
        dst_rank_count: dst_rank.map(|_| job.plan.dst_rank_count()),
    };
    record(&dir, ObjectEntry { entry, etag })?;
    Ok(WrittenFile { rank: rp.rank, path: final_url, len, crc32: crc, reused: false })
}

/// crc32 and size of an object, fetched in 8 MiB ranges.
fn object_crc(url: &Path) -> Result<(u64, u32)> {
    let src = object::ObjectSource::open(url)?;
    let src: &dyn crate::storage::ByteSource = &src;
    let mut h = crc32fast::Hasher::new();
    let mut buf = vec![0u8; (8usize << 20).min(src.len() as usize)];
    let mut at = 0;
    while at < src.len() {
        let n = ((src.len() - at) as usize).min(buf.len());
        src.read_at(at, &mut buf[..n])?;
        h.update(&buf[..n]);
        at += n as u64;
    }
    Ok((src.len(), h.finalize()))
}

/// `verify` on an object store: every manifest object under `root`, each listed object's size,
/// ETag and crc32 (the object is fetched once), and its table of contents; checkpoints no
/// manifest lists and missing ranks are reported as for a local folder.
pub(crate) fn verify(root: &Path) -> Result<VerifyReport> {
    use std::collections::HashSet;
    let mut report = VerifyReport::default();
    let objects = object::list(root)?;
    let mut listed: HashSet<PathBuf> = HashSet::new();
    let mut jobs = crate::manifest::JobRanks::new();
    for (url, _) in objects.iter().filter(|(u, _)| u.file_name().and_then(|n| n.to_str()) == Some(MANIFEST_NAME)) {
        let dir = url.parent().map(Path::to_path_buf).unwrap_or_default();
        let Some(m) = read_manifest(&dir)? else {
            report.bad.push((url.clone(), "the manifest is not readable JSON".into()));
            continue;
        };
        report.manifests += 1;
        for e in &m.files {
            if !crate::manifest::is_plain_name(&e.entry.name) {
                report
                    .bad
                    .push((url.clone(), format!("lists {:?}, which is not a file name in this folder", e.entry.name)));
                continue;
            }
            let p = dir.join(&e.entry.name);
            listed.insert(p.clone());
            if let (Some(rank), Some(job)) = (e.entry.dst_rank, dir.parent()) {
                let slot = jobs.entry((job.to_path_buf(), e.entry.plan_fingerprint.clone())).or_default();
                slot.0 = slot.0.max(e.entry.dst_rank_count.unwrap_or(0));
                slot.1.insert(rank);
            }
            let problem = match object::head(&p) {
                Err(err) => Some(err.to_string()),
                Ok(None) => Some("no such object".into()),
                Ok(Some((size, _))) if size != e.entry.size => {
                    Some(format!("size {size}, the manifest says {}", e.entry.size))
                }
                Ok(Some((_, etag))) if !e.etag.is_empty() && etag != e.etag => {
                    Some(format!("ETag {etag}, the manifest says {}: the object was replaced", e.etag))
                }
                Ok(Some(_)) => match object_crc(&p) {
                    Err(err) => Some(err.to_string()),
                    Ok((_, crc)) if crc != e.entry.crc32 => Some(format!(
                        "crc32 {crc:#010x}, the manifest says {:#010x}: the object changed or is damaged",
                        e.entry.crc32
                    )),
                    Ok(_) => crate::checkpoint::CheckpointFile::open(&p, crate::checkpoint::ReadOptions::default())
                        .err()
                        .map(|err| err.to_string()),
                },
            };
            match problem {
                Some(why) => report.bad.push((p, why)),
                None => report.ok.push(p),
            }
        }
    }
    for (url, _) in &objects {
        let in_merged = url.parent().and_then(|d| d.file_name()).is_some_and(|n| n == "merged_strategy");
        if crate::checkpoint::Format::from_path(url).is_some() && !listed.contains(url) && !in_merged {
            report.bad.push((
                url.clone(),
                "not listed in any reshard manifest (not written by reshard, or its run did not finish)".into(),
            ));
        }
    }
    crate::manifest::finish_report(report, jobs, root, "prefix")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::codec::codec_for;
    use file_sink::OutputBytes;

    /// Only a codec that reads bytes back at the end gets its runs of 8 bytes or less kept: a
    /// `.ckpt` output never reads them (a rank of many 0-d values kept them all until its end).
    #[test]
    fn small_runs_are_kept_only_for_a_codec_that_reads_them_back() {
        // No request is made: the upload starts with its first part sent, and the one part of
        // this object is only sent by `close`.
        for (k, v) in [("AWS_ACCESS_KEY_ID", "k"), ("AWS_SECRET_ACCESS_KEY", "s"), ("AWS_REGION", "us-east-1")] {
            if std::env::var_os(k).is_none() {
                std::env::set_var(k, v);
            }
        }
        let url = PathBuf::from("s3://reshard-unit/out/rank_0/checkpoint_0.ckpt");
        let upload = object::Upload::new(&url).unwrap();
        for (format, crc, kept) in [
            (crate::checkpoint::Format::Ckpt, true, false),
            (crate::checkpoint::Format::Ckpt, false, false),
            (crate::checkpoint::Format::Safetensors, false, false),
            (crate::checkpoint::Format::Safetensors, true, true),
        ] {
            let codec = codec_for(format, crc);
            let window = PartWindow {
                upload: &upload,
                path: &url,
                file_len: 100,
                keep_small: codec.reads_back(),
                state: Mutex::default(),
            };
            for at in [0u64, 10, 20] {
                window.write(&[7u8; 8], at).unwrap();
            }
            window.write(&[1u8; 40], 40).unwrap();
            let small = window.state.lock().unwrap().small.len();
            assert_eq!(small, if kept { 3 } else { 0 }, "{format:?} crc {crc}");
            let mut b = [0u8; 8];
            assert_eq!(window.read_back(10, &mut b).is_ok(), kept, "{format:?} crc {crc}");
        }
    }
}
