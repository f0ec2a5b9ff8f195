//! The executor's view of the sources: each source file opened once, lazily, as a byte source,
//! and checked against the version the plan indexed.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use crate::checkpoint::{Segment, TensorInfo};
use crate::error::{Error, Result};
use crate::plan::{Plan, TensorPlan, TensorSource};
use crate::storage::{ByteSource, IoMode};
use crate::toc_predict::PredictCheck;

/// A source file opened on first use (or the error opening it).
type Lazy = OnceLock<Result<Arc<dyn ByteSource>>>;

/// Source files opened on first use, by (rank, file).
pub(crate) struct OpenSources<'p> {
    plan: &'p Plan,
    io: IoMode,
    /// The first attempt's error is kept as it was (an I/O error stays `Io`, a file that is
    /// not a regular file stays `Unsupported`), and every later caller gets a copy of it.
    files: BTreeMap<u32, Vec<Lazy>>,
}

impl<'p> OpenSources<'p> {
    pub(crate) fn new(plan: &'p Plan, io: IoMode) -> Self {
        let files = plan.sources.iter().map(|(&r, s)| (r, s.files.iter().map(|_| OnceLock::new()).collect())).collect();
        OpenSources { plan, io, files }
    }

    /// The source file holding `t` in source rank `rank`.
    pub(crate) fn get(&self, rank: u32, t: &TensorInfo) -> Result<Arc<dyn ByteSource>> {
        self.file(rank, t.file as usize)
    }

    fn file(&self, rank: u32, k: usize) -> Result<Arc<dyn ByteSource>> {
        let planned = &self.plan.sources[&rank].files[k];
        let cell = &self.files[&rank][k];
        cell.get_or_init(|| {
            let src = crate::storage::open(&planned.path, self.io)?;
            // The version of the file opened (not of the path a moment before).
            if let Some(what) = planned.version.change(src.version()) {
                return Err(Error::Source {
                    path: planned.path.clone(),
                    detail: format!("the file changed after the plan was made ({what}); make the plan again"),
                });
            }
            // A table of contents taken from another object: its bytes are compared as the copy
            // fetches them, the rest before an output that read it is committed (`check`).
            if let Some(expected) = &planned.predicted {
                let check = Arc::new(PredictCheck::new(planned.path.clone(), expected.clone()));
                if !src.check_predicted(check.clone()) {
                    check.finish(&*src)?;
                }
            }
            Ok(src)
        })
        .clone()
    }

    /// The opened files of `rank` (those not opened are skipped).
    fn opened(&self, rank: u32) -> impl Iterator<Item = &Arc<dyn ByteSource>> {
        self.files.get(&rank).into_iter().flatten().filter_map(|c| c.get()?.as_ref().ok())
    }

    /// Every file of `rank` that was read is still the version opened (before an output that
    /// read it is committed); a file that failed to open fails here too. A file whose table of
    /// contents was taken from another object is checked even if nothing was read from it (an
    /// output may take only empty tensors from it, whose names, dtypes and shapes rest on that
    /// table of contents).
    pub(crate) fn check_rank(&self, rank: u32) -> Result<()> {
        for (k, cell) in self.files.get(&rank).into_iter().flatten().enumerate() {
            match cell.get() {
                Some(r) => r.as_ref().map_err(Clone::clone)?.check()?,
                None if self.plan.sources[&rank].files[k].predicted.is_some() => self.file(rank, k)?.check()?,
                None => {}
            }
        }
        Ok(())
    }

    /// Opens and checks every file of the ranks not in `read` whose table of contents was taken
    /// from another object with its check deferred (`toc_predict`): the plan rests on those
    /// tables of contents too, and no copy will fetch their bytes.
    pub(crate) fn check_unread(&self, read: &std::collections::BTreeSet<u32>) -> Result<()> {
        use rayon::prelude::*;
        let unread: Vec<(u32, usize)> = self
            .plan
            .sources
            .iter()
            .filter(|(r, _)| !read.contains(r))
            .flat_map(|(&r, s)| {
                s.files.iter().enumerate().filter(|(_, f)| f.predicted.is_some()).map(move |(k, _)| (r, k))
            })
            .collect();
        unread.par_iter().try_for_each(|&(r, k)| self.file(r, k)?.check())
    }

    /// The plan.
    pub(crate) fn plan(&self) -> &'p Plan {
        self.plan
    }

    /// After a block of `t`: fails, naming the file, if a read of one of its sources faulted
    /// (the file was truncated under its map; the block then holds zeros).
    pub(crate) fn check_faults(&self, t: &TensorPlan) -> Result<()> {
        if crate::sys::faults_absorbed() == 0 {
            return Ok(());
        }
        let ranks: Vec<u32> = match &t.source {
            TensorSource::Raw { src_rank } => vec![*src_rank],
            TensorSource::Pieces { pieces, .. } => pieces.iter().map(|p| p.src_rank).collect(),
        };
        for r in ranks {
            for f in self.opened(r).filter(|f| f.faulted()) {
                f.check()?;
            }
        }
        Ok(())
    }

    /// The error to report for a failed write of bytes taken from a view of `rank`'s files: a
    /// `pwrite` from a page beyond the end of a truncated source fails with EFAULT (it raises no
    /// SIGBUS), so a source that changed is named rather than the output.
    pub(crate) fn explain(&self, rank: u32, e: Error) -> Error {
        for f in self.opened(rank) {
            if let Err(changed) = f.check() {
                return changed;
            }
        }
        e
    }
}

/// Reads logical content ranges of a tensor stored in segments of a source: copied from a
/// view when the source has one, else served from a window of the source read ahead in large
/// `read_at` calls (a strided copy asks for many short runs, front to back).
pub(crate) struct ContentReader<'a> {
    src: &'a dyn ByteSource,
    segs: &'a [Segment],
    starts: Vec<u64>,
    /// File bytes [win_start, win_start + win.len()) for sources without views.
    win: Vec<u8>,
    win_start: u64,
}

/// The most a [`ContentReader`] reads ahead at once.
const READER_WINDOW: u64 = 1 << 20;

impl<'a> ContentReader<'a> {
    pub(crate) fn new(src: &'a dyn ByteSource, segs: &'a [Segment]) -> Self {
        let mut starts = Vec::with_capacity(segs.len());
        let mut acc = 0;
        for s in segs {
            starts.push(acc);
            acc += s.len;
        }
        ContentReader { src, segs, starts, win: Vec::new(), win_start: 0 }
    }

    /// Content bytes [off, off + out.len()) into `out`.
    pub(crate) fn read(&mut self, mut off: u64, out: &mut [u8]) -> Result<()> {
        let mut done = 0usize;
        let mut i = self.starts.partition_point(|&s| s <= off).saturating_sub(1);
        while done < out.len() {
            let s = self.segs[i];
            let within = off - self.starts[i];
            let n = ((s.len - within) as usize).min(out.len() - done);
            let at = s.offset + within;
            self.read_file(at, &mut out[done..done + n], s.offset + s.len)?;
            done += n;
            off += n as u64;
            i += 1;
        }
        Ok(())
    }

    /// File bytes at `at` into `out`, reading ahead no further than `limit` (the segment's end).
    fn read_file(&mut self, at: u64, out: &mut [u8], limit: u64) -> Result<()> {
        let n = out.len() as u64;
        if let Some(v) = self.src.view(at, n) {
            out.copy_from_slice(v);
            return Ok(());
        }
        // An object store fetches what is asked: no read-ahead beyond the bytes needed (the
        // executor's prefetch already asked for exactly the runs of this block).
        if n >= READER_WINDOW || self.src.exact_reads() {
            return self.src.read_at(at, out);
        }
        let end = self.win_start + self.win.len() as u64;
        if at < self.win_start || at + n > end {
            let len = READER_WINDOW.min(limit - at).max(n);
            self.win.resize(len as usize, 0);
            self.src.read_at(at, &mut self.win)?;
            self.win_start = at;
        }
        let from = (at - self.win_start) as usize;
        out.copy_from_slice(&self.win[from..from + out.len()]);
        Ok(())
    }
}
