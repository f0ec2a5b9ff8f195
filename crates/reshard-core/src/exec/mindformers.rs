//! Writing a plan's destination as a MindFormers Checkpoint 2.0 root, as MindFormers 2.1's
//! `save_checkpoint` lays it out: `ROOT/iteration_%08d/[{prefix}-]{model|opt}-%07d-%07d.safetensors`
//! (each rank's network parameters and optimizer states), `metadata.json` (compact JSON, as
//! `save_metadata` writes it: each tensor's properties, global shape, `axis_fragmentations`, the
//! destination layout as `Layout.to_dict()`, its chunks; `storage_data` keyed by `str((name,
//! (k,)))`), `common.json`, and `ROOT/latest_checkpointed_iteration.txt`, written last.
//!
//! With de-duplication, each chunk is written once, by the holder MindFormers' balanced
//! assignment (`distribute_shards`) picks, and files are numbered over the ranks that write one.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;

use rayon::prelude::*;

use super::{check_output, file_sink, pool, ExecuteOptions, Job, WrittenFile};
use crate::checkpoint::Format;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::formats::codec::codec_for;
use crate::formats::mindformers::{self as mf, chunk_index, shard_key, FileType, LayoutDict};
use crate::layout::ResolvedLayout;
use crate::plan::{Plan, RankPlan, TensorSource};
use crate::region::Region;

/// How to write the root.
#[derive(Debug, Clone, Default)]
pub struct MindFormersOptions {
    /// The iteration: files go to `iteration_%08d/`, and the tracker names it.
    pub iteration: u64,
    /// `user_prefix` of the file names (`{prefix}-model-...`).
    pub prefix: Option<String>,
    /// Write each chunk once (MindFormers' balanced de-duplicated saving).
    pub dedup: bool,
    /// `common.json` to write as it is (else one with the iteration as global step).
    pub common: Option<Vec<u8>>,
}

/// One tensor of the destination, as metadata.json describes it.
struct Described {
    name: String,
    dtype: DType,
    full: Vec<u64>,
    frag: Vec<u64>,
    layout: Option<LayoutDict>,
    replica_id: serde_json::Value,
    ftype: FileType,
    /// Slice index -> its shape and the ranks holding it (ascending).
    chunks: BTreeMap<u64, (Vec<u64>, Vec<u32>)>,
}

/// Whether a source file is a MindFormers optimizer file (`[{prefix}-]opt-%07d-%07d.safetensors`).
fn is_opt_file(p: &Path) -> Option<bool> {
    let name = p.file_name()?.to_str()?;
    let stem = name.strip_suffix(".safetensors")?;
    let parts: Vec<&str> = stem.rsplitn(4, '-').collect();
    if parts.len() < 3 || ![parts[0], parts[1]].iter().all(|x| x.len() == 7 && x.bytes().all(|b| b.is_ascii_digit())) {
        return None;
    }
    match parts[2] {
        "opt" => Some(true),
        "model" => Some(false),
        _ => None,
    }
}

/// Optimizer states of MindSpore's optimizers (and their scalars), for sources that do not say.
fn is_optimizer_name(name: &str) -> bool {
    const PREFIXES: [&str; 8] =
        ["adam_m.", "adam_v.", "moments.", "accu_grads.", "exp_avg", "muon_m.", "momentum.", "v."];
    const SCALARS: [&str; 5] = ["global_step", "learning_rate", "beta1_power", "beta2_power", "momentum"];
    PREFIXES.iter().any(|p| name.starts_with(p)) || SCALARS.contains(&name)
}

/// Which file a tensor goes to: the kind of file it came from when the source is a MindFormers
/// root, else by its name.
fn file_type(plan: &Plan, name: &str) -> FileType {
    let from = plan.sources.values().find_map(|s| s.index.get(name).map(|t| s.file_of(t).path.clone()));
    let opt = from.as_deref().and_then(is_opt_file).unwrap_or_else(|| is_optimizer_name(name));
    if opt {
        FileType::Optimizer
    } else {
        FileType::Model
    }
}

fn alias(i: usize) -> String {
    let letters = b"abcdefghijklmnopqrstuvwxyz";
    match letters.get(i) {
        Some(&c) => (c as char).to_string(),
        None => format!("a{i}"),
    }
}

/// The `Layout.to_dict()` of a destination layout on the ranks of `stage`, checked: for every
/// rank, MindFormers' reading of it (the slice index row-major over the axes each dim is split
/// by) must give the box reshard computed.
fn layout_dict(name: &str, rl: &ResolvedLayout, full: &[u64], stage: u32, frag: &[u64]) -> Result<LayoutDict> {
    let (dev, per_dim) = rl.nested_map();
    let n = dev.len();
    let devices: u64 = dev.iter().product();
    let cannot = |detail: String| Error::BadLayout {
        path: PathBuf::from("(destination layout)"),
        param: name.to_string(),
        detail: format!("cannot be written as a MindFormers layout: {detail}"),
    };
    for (d, axes) in per_dim.iter().enumerate() {
        let split: u64 = axes.iter().map(|&a| dev[n - 1 - a as usize]).product();
        if frag.get(d) != Some(&split) {
            return Err(cannot(format!("dim {d} is split {split} ways by its device axes but in {frag:?} slices")));
        }
    }
    for local in 0..devices {
        let mut c = vec![0u64; n];
        let mut r = local;
        for i in (0..n).rev() {
            c[i] = r % dev[i];
            r /= dev[i];
        }
        let mut k = 0u64;
        for (d, axes) in per_dim.iter().enumerate() {
            let idx = axes.iter().fold(0u64, |acc, &a| acc * dev[n - 1 - a as usize] + c[n - 1 - a as usize]);
            k = k * frag[d] + idx;
        }
        let b = rl.rank_box(local);
        if chunk_index(full, &b) != k {
            return Err(cannot(format!(
                "rank {local} of the stage holds the box at {:?}, which MindFormers' reading of device matrix {dev:?} \
                 and tensor map {per_dim:?} puts elsewhere",
                b.offset
            )));
        }
    }
    let tensor_map = per_dim
        .iter()
        .map(|axes| match axes.as_slice() {
            [] => serde_json::json!(-1),
            [a] => serde_json::json!(a),
            many => serde_json::json!(many),
        })
        .collect();
    let start = u64::from(stage) * devices;
    Ok(LayoutDict {
        device_matrix: dev,
        tensor_map,
        interleaved_parallel: false,
        alias_name: (0..n).map(alias).collect(),
        rank_list: (start..start + devices).collect(),
    })
}

/// The chunk a destination box is: its slice index and `axis_fragmentations`.
fn chunk_of(name: &str, full: &[u64], b: &Region) -> Result<(u64, Vec<u64>)> {
    let mut frag = Vec::with_capacity(full.len());
    for d in 0..full.len() {
        let (s, o) = (b.shape[d], b.offset[d]);
        let f = full[d].checked_div(s).unwrap_or(1);
        if s != 0 && (full[d] % s != 0 || o % s != 0) {
            return Err(Error::BadLayout {
                path: PathBuf::from("(destination layout)"),
                param: name.to_string(),
                detail: format!(
                    "the box at {:?} of shape {:?} in {full:?} is not one of equal slices, which MindFormers' chunks \
                     must be",
                    b.offset, b.shape
                ),
            });
        }
        frag.push(f);
    }
    Ok((chunk_index(full, b), frag))
}

/// Bits of one element, as MindFormers counts them for balancing (`MS_TYPE_TO_SIZE`).
fn bits(d: DType) -> u64 {
    match d {
        DType::Bool => 1,
        DType::Int4 => 4,
        DType::Str => 16,
        other => other.size() * 8,
    }
}

/// Writes the plan's destination under `root` as a Checkpoint 2.0 root (every destination rank).
pub fn execute_mindformers(
    plan: &Plan,
    root: &Path,
    opts: &ExecuteOptions,
    mfo: &MindFormersOptions,
) -> Result<Vec<WrittenFile>> {
    check_output(&plan.src_dir, root, mfo.prefix.as_deref().unwrap_or(""))?;
    let n = plan.dst_rank_count();
    let it_dir = root.join(mf::iteration_dir(mfo.iteration));
    // Into the same root is fine (a new iteration), over the source's own iteration is not.
    if super::resolved(&it_dir) == super::resolved(&plan.src_dir) {
        return Err(Error::Invalid(format!(
            "{} is the source's own iteration folder; write another iteration (--iteration) or to another folder",
            it_dir.display()
        )));
    }
    // Every rank's chunks, in order of first appearance.
    let mut described: Vec<Described> = Vec::new();
    let mut at: HashMap<String, usize> = HashMap::new();
    let mut rank_chunks: Vec<Vec<(usize, u64)>> = Vec::with_capacity(n as usize);
    for r in 0..n {
        let rp = plan.rank_plan(r)?;
        let mut mine = Vec::with_capacity(rp.tensors.len());
        for t in &rp.tensors {
            let (full, b, rl) = match &t.source {
                TensorSource::Pieces { dst_box, .. } => match plan.dst_layout(&t.name, rp.stage) {
                    Some((full, rl)) => (full.to_vec(), dst_box.clone(), rl),
                    None => (dst_box.shape.clone(), dst_box.clone(), None),
                },
                TensorSource::Raw { .. } => (t.dims.clone(), Region::full(&t.dims), None),
            };
            let (k, frag) = chunk_of(&t.name, &full, &b)?;
            let i = match at.get(&t.name) {
                Some(&i) => i,
                None => {
                    let layout = match rl {
                        Some(rl) => Some(layout_dict(&t.name, rl, &full, rp.stage, &frag)?),
                        None => None,
                    };
                    at.insert(t.name.clone(), described.len());
                    described.push(Described {
                        name: t.name.clone(),
                        dtype: t.dtype,
                        full: full.clone(),
                        frag: frag.clone(),
                        layout,
                        replica_id: serde_json::json!(0),
                        ftype: file_type(plan, &t.name),
                        chunks: BTreeMap::new(),
                    });
                    described.len() - 1
                }
            };
            let d = &mut described[i];
            if d.full != full || d.frag != frag {
                return Err(Error::BadLayout {
                    path: PathBuf::from("(destination layout)"),
                    param: t.name.clone(),
                    detail: format!(
                        "rank {r} holds it cut {frag:?} ways of {full:?}, other ranks {:?} of {:?}; MindFormers' \
                         metadata describes one cut per tensor",
                        d.frag, d.full
                    ),
                });
            }
            d.chunks.entry(k).or_insert_with(|| (b.shape.clone(), Vec::new())).1.push(r);
            mine.push((i, k));
        }
        rank_chunks.push(mine);
    }
    // Replica ids as MindFormers computes them: per rank of the layout's rank list, how many
    // earlier ranks hold the same slice.
    for d in described.iter_mut() {
        if let Some(l) = &d.layout {
            // Rank -> the slice it holds (linear in the holders, not in ranks x tensors).
            let held: HashMap<u32, u64> =
                d.chunks.iter().flat_map(|(k, (_, ranks))| ranks.iter().map(move |&r| (r, *k))).collect();
            let mut seen: HashMap<u64, u64> = HashMap::new();
            let ids: Vec<u64> = l
                .rank_list
                .iter()
                .map(|&r| {
                    let k = u32::try_from(r).ok().and_then(|r| held.get(&r)).copied().unwrap_or(0);
                    let e = seen.entry(k).or_insert(0);
                    *e += 1;
                    *e - 1
                })
                .collect();
            d.replica_id = serde_json::json!(ids);
        }
    }
    // Who stores each chunk, and each (rank, file type)'s file.
    let key_of = |d: &Described, k: u64| shard_key(&d.name, &[k]);
    let mut stores: HashMap<(usize, u64), u32> = HashMap::new();
    let mut file_ids: HashMap<(u32, bool), (u64, u64)> = HashMap::new();
    for opt in [false, true] {
        let mine = |d: &Described| (d.ftype == FileType::Optimizer) == opt;
        if mfo.dedup {
            let mut shards = Vec::new();
            let mut which = Vec::new();
            for (i, d) in described.iter().enumerate().filter(|(_, d)| mine(d)) {
                for (k, (shape, ranks)) in &d.chunks {
                    let size = shape.iter().product::<u64>() * bits(d.dtype);
                    shards.push((key_of(d, *k), ranks.iter().map(|&r| u64::from(r)).collect(), size));
                    which.push((i, *k));
                }
            }
            let chosen = mf::distribute_shards(&shards, u64::from(n));
            let mut writers: Vec<u32> = chosen.iter().map(|&r| r as u32).collect();
            writers.sort_unstable();
            writers.dedup();
            for (idx, r) in writers.iter().enumerate() {
                file_ids.insert((*r, opt), (idx as u64, writers.len() as u64));
            }
            for (w, r) in which.into_iter().zip(chosen) {
                stores.insert(w, r as u32);
            }
        } else {
            for r in 0..n {
                if rank_chunks[r as usize].iter().any(|(i, _)| mine(&described[*i])) {
                    file_ids.insert((r, opt), (u64::from(r), u64::from(n)));
                }
            }
        }
    }
    let fname = |r: u32, opt: bool| -> Option<String> {
        let (idx, count) = file_ids.get(&(r, opt))?;
        let kind = if opt { FileType::Optimizer } else { FileType::Model };
        Some(mf::file_name(mfo.prefix.as_deref(), kind, *idx, *count))
    };
    // The files: (rank, optimizer?, name, positions of the rank's plan written there).
    let mut files: Vec<(u32, String, Vec<usize>)> = Vec::new();
    for r in 0..n {
        for opt in [false, true] {
            let Some(name) = fname(r, opt) else { continue };
            let keep: Vec<usize> = rank_chunks[r as usize]
                .iter()
                .enumerate()
                .filter(|(_, (i, k))| {
                    (described[*i].ftype == FileType::Optimizer) == opt
                        && (!mfo.dedup || stores.get(&(*i, *k)) == Some(&r))
                })
                .map(|(pos, _)| pos)
                .collect();
            if !keep.is_empty() {
                files.push((r, name, keep));
            }
        }
    }
    // Write the data files. An earlier root at this iteration stops being loadable first: its
    // tracker (when it names this iteration) and metadata.json would otherwise describe files
    // being replaced, and a run stopped half-way would leave a root MindFormers loads wrongly
    // rather than one it refuses.
    let tracker = root.join(mf::TRACKER);
    let names_this = std::fs::read_to_string(&tracker).is_ok_and(|t| t.trim() == mfo.iteration.to_string());
    for old in [names_this.then_some(tracker), Some(it_dir.join(mf::METADATA))].into_iter().flatten() {
        match std::fs::remove_file(&old) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(Error::io(&old, "remove", e)),
            _ => {}
        }
    }
    std::fs::create_dir_all(&it_dir).map_err(|e| Error::io(&it_dir, "create folder", e))?;
    let exec = ExecuteOptions { format: Format::Safetensors, ..opts.clone() };
    let codec = codec_for(Format::Safetensors, exec.crc);
    let mut total = 0u64;
    for (r, _, keep) in &files {
        let rp = plan.rank_plan(*r)?;
        for &pos in keep {
            codec.check(&rp.tensors[pos])?;
            total += rp.tensors[pos].nbytes;
        }
    }
    let written = AtomicU64::new(0);
    let sources = super::sources::OpenSources::new(plan, exec.io);
    let fingerprint = plan.fingerprint(&format!(
        "mindformers iteration={} prefix={:?} dedup={} crc={}",
        mfo.iteration, mfo.prefix, mfo.dedup, exec.crc
    ));
    let pool = pool(super::workers(plan, exec.threads))?;
    let job = Job::new(&sources, &it_dir, &exec, &pool, &written, total, &fingerprint);
    let out = pool.install(|| {
        files
            .par_iter()
            .map(|(r, name, keep)| {
                let rp = plan.rank_plan(*r)?;
                let sub = RankPlan {
                    rank: rp.rank,
                    stage: rp.stage,
                    tensors: keep.iter().map(|&p| rp.tensors[p].clone()).collect(),
                };
                file_sink::write_file(&job, &*codec, &sub, it_dir.join(name), Some(sub.rank))
            })
            .collect::<Result<Vec<_>>>()
    })?;
    // metadata.json, compact, keys in the order save_metadata writes them.
    let mut m = String::from("{\"state_dict_metadata\":{");
    for (i, d) in described.iter().enumerate() {
        if i > 0 {
            m.push(',');
        }
        let meta = mf::TensorMeta {
            properties: mf::Properties {
                dtype: mf::ms_dtype_name(d.dtype).to_string(),
                replica_id: d.replica_id.clone(),
                allow_shape_mismatch: false,
                allow_to_save: true,
            },
            global_shape: d.full.clone(),
            axis_fragmentations: d.frag.clone(),
            layout: d.layout.clone(),
            chunk: d
                .chunks
                .iter()
                .map(|(k, (shape, _))| mf::Chunk { global_offset: vec![*k], local_shape: shape.clone() })
                .collect(),
        };
        m.push_str(&json(&d.name));
        m.push(':');
        m.push_str(&json(&meta));
    }
    m.push_str("},\"storage_data\":{");
    let mut first = true;
    for d in &described {
        let opt = d.ftype == FileType::Optimizer;
        for (k, (_, ranks)) in &d.chunks {
            let holders: Vec<u32> = match stores.get(&(at[&d.name], *k)) {
                Some(&r) if mfo.dedup => vec![r],
                _ => ranks.clone(),
            };
            let entries: Vec<mf::StorageEntry> = holders
                .iter()
                .filter_map(|&r| {
                    Some(mf::StorageEntry {
                        file_name: fname(r, opt)?,
                        storage_rank: u64::from(r),
                        rank_group: ranks.iter().map(|&x| u64::from(x)).collect(),
                    })
                })
                .collect();
            if !first {
                m.push(',');
            }
            first = false;
            m.push_str(&json(&key_of(d, *k)));
            m.push(':');
            m.push_str(&json(&entries));
        }
    }
    m.push_str("}}");
    crate::atomic::write_atomic(&it_dir.join(mf::METADATA), m.as_bytes(), exec.sync)?;
    let common = match &mfo.common {
        Some(c) => c.clone(),
        None => format!(
            "{{\n    \"epoch_num\": null,\n    \"step_num\": null,\n    \"global_step\": {},\n    \"loss_scale\": null,\n    \
             \"global_batch_size\": null,\n    \"consumed_samples\": null,\n    \"ckpt_status\": null\n}}",
            mfo.iteration
        )
        .into_bytes(),
    };
    crate::atomic::write_atomic(&it_dir.join(mf::COMMON), &common, exec.sync)?;
    crate::atomic::write_atomic(&root.join(mf::TRACKER), mfo.iteration.to_string().as_bytes(), exec.sync)?;
    Ok(out)
}

fn json<T: serde::Serialize + ?Sized>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_default()
}
