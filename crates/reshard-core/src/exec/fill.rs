//! Moving bytes: destination tensors cut into bounded blocks, each filled from its source
//! ranges (straight from a view where the source is a map and the run is contiguous, else
//! assembled in a reused buffer) and handed to a [`ContentSink`]. The executor does not know
//! what the sink is: a file laid out by a format codec, or caller memory.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use rayon::prelude::*;

use super::sources::{ContentReader, OpenSources};
use super::Job;
use crate::checkpoint::Segment;
use crate::error::{Error, Result};
use crate::plan::{TensorPlan, TensorSource};
use crate::region::{copy_box, Region};

/// Where filled content goes: bytes [at, at + data.len()) of tensor `tensor`'s content (its
/// index in the list being filled). Called from several worker threads at once, for disjoint
/// ranges.
pub trait ContentSink: Sync {
    /// Stores a run of a tensor's content.
    fn put(&self, tensor: usize, at: u64, data: &[u8]) -> Result<()>;

    /// For a sink that holds content in memory: lends bytes [at, at + len) of `tensor` to
    /// `fill`, in one or more consecutive parts (`fill(offset in the run, part)`), so that a
    /// source without views reads straight into them instead of into a buffer that is then
    /// put. Returns `Ok(false)` (and calls nothing) when the sink has no such memory.
    fn fill_in_place(&self, tensor: usize, at: u64, len: u64, fill: &mut FillPart<'_>) -> Result<bool> {
        let _ = (tensor, at, len, fill);
        Ok(false)
    }
}

/// What [`ContentSink::fill_in_place`] calls for each part it lends: `(offset in the run, part)`.
pub type FillPart<'f> = dyn FnMut(u64, &mut [u8]) -> Result<()> + 'f;

thread_local! {
    /// Each worker's assembly buffer, kept from block to block rather than allocated and
    /// zeroed for each.
    static BLOCK_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A unit of work: one block of one tensor.
pub(crate) struct Block {
    pub(crate) tensor: usize,
    /// A sub-box of the destination box (relative to it) that is one contiguous byte range of
    /// the tensor: single indices on the outer dims, a range on one dim, whole inner dims.
    offset: Vec<u64>,
    shape: Vec<u64>,
    /// Its byte range in the tensor's content.
    start: u64,
    pub(crate) len: u64,
}

impl Block {
    /// The block as a box in full-tensor coordinates, given the destination box it lies in.
    fn region(&self, dst_box: &Region) -> Region {
        Region {
            offset: dst_box.offset.iter().zip(&self.offset).map(|(a, b)| a + b).collect(),
            shape: self.shape.clone(),
        }
    }
}

/// Cuts a tensor into blocks of at most `max` bytes (one element at least).
pub(crate) fn blocks_for(tensor: usize, t: &TensorPlan, max: u64, out: &mut Vec<Block>) {
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

/// How far ahead of the block being written its source bytes are announced: a cold source is
/// then read in large requests while earlier blocks are copied, and a rank larger than memory is
/// not pulled into the page cache all at once.
const READ_AHEAD_BYTES: u64 = 64 << 20;

/// Fills `tensors` into `sink` with all workers of the current pool: blocks are taken in order
/// from one counter (so a file sink is written front to back), their source bytes announced
/// [`READ_AHEAD_BYTES`] ahead. `what` names the output in a cancellation.
pub(crate) fn fill(
    job: &Job<'_>,
    tensors: &[&TensorPlan],
    sink: &dyn ContentSink,
    what: &std::path::Path,
) -> Result<()> {
    let block_bytes = job.block_bytes;
    // Blocks of bounded size: the memory a worker holds at once.
    let mut blocks = Vec::with_capacity(tensors.len());
    for (i, t) in tensors.iter().enumerate() {
        blocks_for(i, t, block_bytes, &mut blocks);
    }
    // Block i + ahead is announced when block i is taken (the first ones now). Object sources
    // get their runs joined across blocks into large GETs instead (object_prefetch).
    let ahead = usize::try_from(READ_AHEAD_BYTES / block_bytes).unwrap_or(usize::MAX).max(1);
    let objects = match crate::storage::is_url(&job.plan.src_dir) {
        true => Some(super::object_prefetch::ObjectPrefetch::new(job, tensors, &blocks)?),
        false => None,
    };
    match &objects {
        Some(p) => p.advance(0, 1),
        None => {
            for b in blocks.iter().take(ahead) {
                announce_block(job, tensors[b.tensor], b)?;
            }
        }
    }
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    (0..rayon::current_num_threads().min(blocks.len())).into_par_iter().try_for_each(|_| {
        while !failed.load(Ordering::Relaxed) {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some(b) = blocks.get(i) else {
                break;
            };
            let step = || -> Result<u64> {
                job.check_cancel(what)?;
                match &objects {
                    Some(p) => p.advance(i, next.load(Ordering::Relaxed)),
                    None => {
                        if let Some(a) = blocks.get(i.saturating_add(ahead)) {
                            announce_block(job, tensors[a.tensor], a)?;
                        }
                    }
                }
                let n = fill_block(job.sources, tensors[b.tensor], b, sink)?;
                job.sources.check_faults(tensors[b.tensor])?;
                Ok(n)
            };
            let n = step().inspect_err(|_| failed.store(true, Ordering::Relaxed))?;
            job.advance(n);
        }
        Ok(())
    })
}

/// Fills one block; returns the bytes it holds.
fn fill_block(sources: &OpenSources<'_>, t: &TensorPlan, b: &Block, sink: &dyn ContentSink) -> Result<u64> {
    let (start, len) = (b.start, b.len);
    if len == 0 {
        return Ok(0);
    }
    let plan = sources.plan();
    match &t.source {
        TensorSource::Raw { src_rank } => {
            let info = plan.tensor_info(*src_rank, &t.name)?;
            let src = sources.get(*src_rank, info)?;
            for (at, from, n) in segment_runs(&info.segments(), start, start + len) {
                match src.view(from, n) {
                    // Straight from the map to the sink: no intermediate buffer.
                    Some(v) => sink.put(b.tensor, at, v).map_err(|e| sources.explain(*src_rank, e))?,
                    // Read straight into caller memory.
                    None if sink.fill_in_place(b.tensor, at, n, &mut |k, part| src.read_at(from + k, part))? => {}
                    None => BLOCK_BUF.with_borrow_mut(|buf| {
                        buf.resize(buf.len().max(n as usize), 0);
                        src.read_at(from, &mut buf[..n as usize])?;
                        sink.put(b.tensor, at, &buf[..n as usize])
                    })?,
                }
            }
        }
        TensorSource::Pieces { dst_box, pieces } => {
            let elem = t.dtype.size();
            let nd = dst_box.shape.len();
            let block = b.region(dst_box);
            // The pieces' parts inside this block.
            let parts: Vec<_> = pieces.iter().filter_map(|p| p.region.intersect(&block).map(|r| (p, r))).collect();
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
            // When every part is one contiguous run both in its source and in the block (row
            // splits), each is one read: from a map straight to the sink, with no buffer.
            let mut direct = Vec::new();
            for (p, region) in &parts {
                let src_off = contiguous_offset(&p.src_box, region, elem);
                let dst_off = contiguous_offset(&block, region, elem);
                let info = plan.tensor_info(p.src_rank, &t.name)?;
                match (src_off, dst_off, info.segments().as_slice()) {
                    (Some(so), Some(dof), [seg]) => {
                        direct.push((p.src_rank, info, seg.offset + so, dof, region.numel() * elem))
                    }
                    _ => {
                        direct.clear();
                        break;
                    }
                }
            }
            let mut viewed = true;
            for &(rank, info, from, _, n) in &direct {
                viewed &= sources.get(rank, info)?.view(from, n).is_some();
            }
            if !direct.is_empty() && viewed {
                for (rank, info, from, dof, n) in direct {
                    let src = sources.get(rank, info)?;
                    let v = src.view(from, n).unwrap_or_default();
                    sink.put(b.tensor, start + dof, v).map_err(|e| sources.explain(rank, e))?;
                }
                return Ok(len);
            }
            if !direct.is_empty() {
                // Each part read straight into caller memory, where the sink has it.
                let mut in_place = true;
                for &(rank, info, from, dof, n) in &direct {
                    let src = sources.get(rank, info)?;
                    in_place = in_place
                        && sink.fill_in_place(b.tensor, start + dof, n, &mut |k, part| src.read_at(from + k, part))?;
                }
                if in_place {
                    return Ok(len);
                }
            }
            BLOCK_BUF.with_borrow_mut(|buf| {
                if buf.len() < len as usize {
                    buf.resize(len as usize, 0);
                }
                let buf = &mut buf[..len as usize];
                if !direct.is_empty() {
                    for (rank, info, from, dof, n) in direct {
                        sources.get(rank, info)?.read_at(from, &mut buf[dof as usize..(dof + n) as usize])?;
                    }
                    return sink.put(b.tensor, start, buf);
                }
                for (p, region) in &parts {
                    let info = plan.tensor_info(p.src_rank, &t.name)?;
                    let src = sources.get(p.src_rank, info)?;
                    let segments = info.segments();
                    let mut reader = ContentReader::new(&*src, &segments);
                    let src_origin: Vec<u64> = (0..nd).map(|d| region.offset[d] - p.src_box.offset[d]).collect();
                    let dst_origin: Vec<u64> = (0..nd).map(|d| region.offset[d] - block.offset[d]).collect();
                    let mut failed = None;
                    let mut read = |off: u64, out: &mut [u8]| {
                        if failed.is_none() {
                            failed = reader.read(off, out).err();
                        }
                    };
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
                    if let Some(e) = failed {
                        return Err(e);
                    }
                }
                sink.put(b.tensor, start, buf)
            })?;
        }
    }
    Ok(len)
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

/// Tells the sources which bytes block `b` will read (exactly those ranges, merged where less
/// than a page apart): `MADV_WILLNEED` on a map, `POSIX_FADV_WILLNEED` for `pread`. Source maps
/// do no read-around, so nothing else of a source is read: one rank of complete -> 8 read 88 MB
/// of the 578 MB source (its share and the headers), in 0.10 s instead of 0.34 s.
fn announce_block(job: &Job<'_>, t: &TensorPlan, b: &Block) -> Result<()> {
    block_file_runs(job, t, b, crate::sys::page_size(), &mut |src, _, at, n, _| {
        src.prefetch(at, n);
        Ok(())
    })
}

/// Called with each file run of a block: (source, (source rank, its file), file offset, length,
/// bytes of it read).
pub(crate) type FileRunFn<'a> =
    dyn FnMut(&std::sync::Arc<dyn crate::storage::ByteSource>, (u32, u32), u64, u64, u64) -> Result<()> + 'a;

/// The source file runs block `b` reads, as `each(source, (source rank, its file), file offset,
/// length, bytes of it read)`: per piece, the runs of its rows, joined where at most `join`
/// bytes apart (each read of the block stays inside one run; the bytes between rows are not
/// read). `join` is a page for read-ahead of pages; 0 gives the exact runs read, as object
/// read-ahead needs (a run across the edge of another rank's prefetched range is charged to
/// neither: joined column slices of a column split each crossed it).
pub(crate) fn block_file_runs(
    job: &Job<'_>,
    t: &TensorPlan,
    b: &Block,
    join: u64,
    each: &mut FileRunFn<'_>,
) -> Result<()> {
    let plan = job.sources.plan();
    // (source rank, (start, end, bytes read in it)) in the source tensor's content.
    let mut runs: Vec<(u32, (u64, u64, u64))> = Vec::new();
    match &t.source {
        TensorSource::Raw { src_rank } => runs.push((*src_rank, (b.start, b.start + b.len, b.len))),
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
                let mut cur: Option<(u64, u64, u64)> = None;
                loop {
                    let first: u64 = (0..nd)
                        .map(|d| (r.offset[d] - src.offset[d] + if d < outer { idx[d] } else { 0 }) * stride[d])
                        .sum();
                    let (s, e) = (first * elem, (first + run) * elem);
                    cur = match cur {
                        Some((cs, ce, read)) if s <= ce + join => Some((cs, ce.max(e), read + (e - s))),
                        Some(done) => {
                            runs.push((p.src_rank, done));
                            Some((s, e, e - s))
                        }
                        None => Some((s, e, e - s)),
                    };
                    if !crate::region::next_index(&mut idx, &r.shape[..outer]) {
                        break;
                    }
                }
                if let Some(done) = cur {
                    runs.push((p.src_rank, done));
                }
            }
        }
    }
    for (rank, (from, to, mut read)) in runs {
        let info = plan.tensor_info(rank, &t.name)?;
        let src = job.sources.get(rank, info)?;
        for (_, at, n) in segment_runs(&info.segments(), from, to) {
            // A run split over segments: its read bytes counted against the first ones.
            let here = read.min(n);
            read -= here;
            each(&src, (rank, info.file), at, n, here)?;
        }
    }
    Ok(())
}

/// Byte offset of `region` inside a C-order array holding `outer`, if the region is one
/// contiguous run there.
fn contiguous_offset(outer: &Region, region: &Region, elem: u64) -> Option<u64> {
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
