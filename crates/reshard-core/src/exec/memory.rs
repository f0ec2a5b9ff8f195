//! Loading one destination rank into caller memory: the same plan and the same byte moves as
//! writing its file, into buffers the caller allocates ([`MemorySink`]). Nothing goes to disk.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};

use super::fill::{fill, ContentSink};
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
pub struct MemorySink<'b> {
    buffers: Vec<Mutex<&'b mut [u8]>>,
}

impl<'b> MemorySink<'b> {
    /// A sink over these buffers (one per tensor, each at least the tensor's size).
    pub fn new(buffers: Vec<&'b mut [u8]>) -> Self {
        MemorySink { buffers: buffers.into_iter().map(Mutex::new).collect() }
    }
}

impl ContentSink for MemorySink<'_> {
    fn put(&self, tensor: usize, at: u64, data: &[u8]) -> Result<()> {
        let mut buf = self.buffers[tensor].lock().unwrap_or_else(|p| p.into_inner());
        let end = at as usize + data.len();
        let dst = buf.get_mut(at as usize..end).ok_or_else(|| {
            Error::Invalid(format!("internal error: a {}-byte buffer was given bytes up to {end}", data.len()))
        })?;
        dst.copy_from_slice(data);
        Ok(())
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
    let pool = super::pool(exec.threads)?;
    let sources = OpenSources::new(plan, exec.io);
    let written = AtomicU64::new(0);
    let job = Job {
        plan,
        sources: &sources,
        dst_dir: Path::new(""),
        opts: &exec,
        block_bytes: super::block_bytes(&exec, pool.current_num_threads()),
        written: &written,
        total,
        fingerprint: "",
    };
    let sink = MemorySink::new(buffers);
    let what = Path::new("").join(format!("destination rank {rank} (in memory)"));
    pool.install(|| fill(&job, &kept, &sink, &what))?;
    for r in rp.src_ranks() {
        sources.check_rank(r)?;
    }
    Ok(())
}
