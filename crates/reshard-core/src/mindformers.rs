//! MindFormers Checkpoint 2.0 roots as sources: a root (or one of its `iteration_*` folders)
//! becomes a [`Catalogue`] whose ranks are the storage ranks of `metadata.json` (each with its
//! model and optimizer files) and a [`ChunkTable`] saying which box of which tensor each rank's
//! file holds. The planner fills destination boxes from those chunks; no strategy file is needed.
//!
//! A folder without `metadata.json` (a single-card save) is complete weights spread over its
//! safetensors files, as MindFormers' `generate_default_metadata_from_checkpoint` reads it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use crate::checkpoint::Format;
use crate::error::{Error, Result};
use crate::formats::mindformers::{self as mf, shard_key};
use crate::plan::{Plan, PlanOptions};
use crate::region::Region;
use crate::source::{Catalogue, Source};
use crate::strategy::Strategy;

/// The most a `metadata.json` may hold (4,096 ranks x 3,000 tensors of chunks stay far below).
const MAX_METADATA_BYTES: u64 = 4 << 30;

/// A Checkpoint 2.0 checkpoint found at a path.
#[derive(Debug, Clone)]
pub struct Root {
    /// The folder given.
    pub given: PathBuf,
    /// The iteration folder that holds the files.
    pub dir: PathBuf,
    /// Its iteration, when a tracker named it.
    pub iteration: Option<u64>,
    /// `metadata.json`, absent for a single-card save.
    pub metadata: Option<mf::Metadata>,
}

impl Root {
    /// `metadata.json`'s path.
    pub fn metadata_path(&self) -> PathBuf {
        self.dir.join(mf::METADATA)
    }
}

fn bad_meta(path: &Path, detail: String) -> Error {
    Error::Malformed { path: path.to_path_buf(), kind: "MindFormers metadata.json", detail }
}

/// Whether `name` looks like a file MindFormers names (`[{prefix}-]{model|opt}-%07d-%07d.safetensors`).
fn mf_file_name(name: &str) -> bool {
    let Some(stem) = name.strip_suffix(".safetensors") else { return false };
    let parts: Vec<&str> = stem.rsplitn(4, '-').collect();
    parts.len() >= 3
        && [parts[0], parts[1]].iter().all(|p| p.len() == 7 && p.bytes().all(|b| b.is_ascii_digit()))
        && matches!(parts[2], "model" | "opt")
}

/// Finds a Checkpoint 2.0 checkpoint at `path`: a root with `latest_checkpointed_iteration.txt`,
/// an iteration folder with `metadata.json`, or a folder of MindFormers-named safetensors files
/// without `rank_*` folders (a single-card save). `None` for anything else (rank folders).
pub fn detect(path: &Path) -> Result<Option<Root>> {
    if !path.is_dir() {
        return Ok(None);
    }
    let tracker = path.join(mf::TRACKER);
    let (dir, iteration) = if tracker.exists() {
        let text = crate::input::read_capped(&tracker, 4096, "iteration tracker")?;
        let text = String::from_utf8_lossy(&text);
        let it: u64 = text.trim().parse().map_err(|_| Error::Source {
            path: tracker.clone(),
            detail: format!("holds {:?}, not an iteration number", text.trim()),
        })?;
        let dir = path.join(mf::iteration_dir(it));
        if !dir.is_dir() {
            return Err(Error::Source {
                path: tracker,
                detail: format!("names iteration {it}, but {} is not a folder", dir.display()),
            });
        }
        (dir, Some(it))
    } else if path.join(mf::METADATA).exists() {
        (path.to_path_buf(), None)
    } else {
        let rd = std::fs::read_dir(path).map_err(|e| Error::io(path, "read folder", e))?;
        let mut mf_files = false;
        let mut iterations = Vec::new();
        for e in rd {
            let e = e.map_err(|e| Error::io(path, "read folder", e))?;
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name.starts_with("rank_") {
                return Ok(None);
            }
            mf_files |= mf_file_name(&name);
            if name.strip_prefix("iteration_").is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())) {
                iterations.push(name.into_owned());
            }
        }
        if !mf_files && !iterations.is_empty() {
            // A root whose tracker is missing: which iteration is meant is not for reshard to guess.
            iterations.sort();
            return Err(Error::Source {
                path: path.to_path_buf(),
                detail: format!(
                    "a MindFormers checkpoint root without {}: give one of its iteration folders ({}) as the source",
                    mf::TRACKER,
                    iterations.join(", ")
                ),
            });
        }
        if !mf_files {
            return Ok(None);
        }
        (path.to_path_buf(), None)
    };
    let mpath = dir.join(mf::METADATA);
    let metadata = if mpath.exists() {
        let bytes = crate::input::read_capped(&mpath, MAX_METADATA_BYTES, "metadata.json")?;
        crate::input::check_unique_json_keys(&bytes).map_err(|d| bad_meta(&mpath, d))?;
        Some(mf::parse_metadata(&bytes).map_err(|d| bad_meta(&mpath, d))?)
    } else {
        None
    };
    Ok(Some(Root { given: path.to_path_buf(), dir, iteration, metadata }))
}

/// One chunk of a tensor: its slice index, its box and the (rank, file) pairs that store it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkAt {
    /// Slice index (`global_offset[0]`).
    pub k: u64,
    /// The box in the full tensor.
    pub region: Region,
    /// Storage ranks and the file name each stores it in.
    pub holders: Vec<(u32, String)>,
}

/// A tensor of `metadata.json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkedTensor {
    /// `properties.dtype`.
    pub dtype: String,
    /// The full shape.
    pub global_shape: Vec<u64>,
    /// Its chunks, by slice index.
    pub chunks: Vec<ChunkAt>,
}

/// Every tensor of `metadata.json`, checked for coverage and storage.
#[derive(Debug, Clone, Default)]
pub struct ChunkTable {
    /// `metadata.json`, for messages.
    pub path: PathBuf,
    /// Tensors by name.
    pub tensors: HashMap<String, ChunkedTensor>,
}

impl ChunkTable {
    /// Reads the table out of `metadata.json`: each chunk's box, every chunk of each tensor
    /// present (the slice indices cover `axis_fragmentations` exactly once), each stored by at
    /// least one file. Refusals name the tensor, the chunk and the file.
    pub fn from_metadata(path: &Path, m: &mf::Metadata) -> Result<ChunkTable> {
        let mut tensors = HashMap::with_capacity(m.state_dict_metadata.len());
        for (name, v) in &m.state_dict_metadata {
            let t = mf::parse_tensor_meta(v).map_err(|d| bad_meta(path, format!("tensor '{name}': {d}")))?;
            let count = t.axis_fragmentations.iter().try_fold(1u64, |a, &f| a.checked_mul(f));
            let count = count.filter(|&c| c > 0 && c <= 1 << 24).ok_or_else(|| {
                bad_meta(path, format!("tensor '{name}': axis_fragmentations {:?}", t.axis_fragmentations))
            })?;
            // Every size below fits in 64 bits, with room for 8-byte elements.
            if t.global_shape.iter().try_fold(8u64, |a, &d| a.checked_mul(d)).is_none() {
                return Err(bad_meta(
                    path,
                    format!("tensor '{name}': global_shape {:?} is too large to address", t.global_shape),
                ));
            }
            let mut chunks: BTreeMap<u64, ChunkAt> = BTreeMap::new();
            for c in &t.chunk {
                let k = match c.global_offset.as_slice() {
                    [k] => *k,
                    other => {
                        return Err(bad_meta(
                            path,
                            format!("tensor '{name}': chunk global_offset {other:?} is not one slice index [k]"),
                        ))
                    }
                };
                let region = mf::chunk_box(&t.global_shape, &t.axis_fragmentations, &c.local_shape, k)
                    .map_err(|d| bad_meta(path, format!("tensor '{name}' chunk {k}: {d}")))?;
                let key = shard_key(name, &[k]);
                let entries = match m.storage_data.get(&key) {
                    Some(v) => mf::parse_storage(v).map_err(|d| {
                        bad_meta(path, format!("storage_data[{key:?}] (tensor '{name}' chunk {k}): {d}"))
                    })?,
                    None => Vec::new(),
                };
                if entries.is_empty() {
                    return Err(bad_meta(
                        path,
                        format!(
                            "tensor '{name}' chunk {k} (offset {:?}, shape {:?}) is stored nowhere: storage_data has no \
                             file for {key}",
                            region.offset, region.shape
                        ),
                    ));
                }
                let mut holders = Vec::with_capacity(entries.len());
                for e in entries {
                    let plain = !e.file_name.is_empty()
                        && !e.file_name.contains('/')
                        && e.file_name != "."
                        && e.file_name != ".."
                        && e.file_name.ends_with(".safetensors");
                    let rank = u32::try_from(e.storage_rank).ok().filter(|_| plain).ok_or_else(|| {
                        bad_meta(
                            path,
                            format!(
                                "tensor '{name}' chunk {k}: storage entry file '{}' rank {}: expected a .safetensors \
                                 file name of the iteration folder and a rank below 2^32",
                                e.file_name, e.storage_rank
                            ),
                        )
                    })?;
                    holders.push((rank, e.file_name));
                }
                if let Some(old) = chunks.get(&k) {
                    if old.region != region {
                        return Err(bad_meta(
                            path,
                            format!(
                                "tensor '{name}' chunk {k} is described twice, with shapes {:?} and {:?}",
                                old.region.shape, region.shape
                            ),
                        ));
                    }
                    continue;
                }
                chunks.insert(k, ChunkAt { k, region, holders });
            }
            if (chunks.len() as u64) != count {
                let missing: Vec<u64> = (0..count).filter(|k| !chunks.contains_key(k)).take(8).collect();
                return Err(bad_meta(
                    path,
                    format!(
                        "tensor '{name}' (global_shape {:?}, axis_fragmentations {:?}) has {} of its {count} chunks; \
                         missing chunk(s) {missing:?}",
                        t.global_shape,
                        t.axis_fragmentations,
                        chunks.len()
                    ),
                ));
            }
            let chunks = chunks.into_values().collect();
            tensors.insert(
                name.clone(),
                ChunkedTensor { dtype: t.properties.dtype, global_shape: t.global_shape, chunks },
            );
        }
        Ok(ChunkTable { path: path.to_path_buf(), tensors })
    }

    /// The catalogue of the files the table names: storage rank -> its files (model, opt).
    pub fn catalogue(&self, dir: &Path) -> Result<Catalogue> {
        let mut files: BTreeMap<u32, BTreeSet<String>> = BTreeMap::new();
        let mut owner: HashMap<&str, u32> = HashMap::new();
        let mut names: Vec<&String> = self.tensors.keys().collect();
        names.sort();
        for name in names {
            for c in &self.tensors[name].chunks {
                for (rank, file) in &c.holders {
                    if let Some(&other) = owner.get(file.as_str()).filter(|&&o| o != *rank) {
                        return Err(bad_meta(
                            &self.path,
                            format!(
                                "file '{file}' is given storage ranks {other} and {rank} (tensor '{name}' chunk {}); a \
                                 file is written by one rank",
                                c.k
                            ),
                        ));
                    }
                    owner.insert(file, *rank);
                    files.entry(*rank).or_default().insert(file.clone());
                }
            }
        }
        for f in owner.keys() {
            let p = dir.join(f);
            if let Some(why) = crate::input::not_regular(&p) {
                return Err(Error::Source {
                    path: p,
                    detail: format!("{why}; metadata.json {} names this file", self.path.display()),
                });
            }
        }
        Ok(Catalogue {
            dir: dir.to_path_buf(),
            files: files.into_iter().map(|(r, fs)| (r, fs.into_iter().map(|f| dir.join(f)).collect())).collect(),
            format: Format::Safetensors,
        })
    }

    /// A text that changes when the table does, for the plan's fingerprint.
    pub fn fingerprint_text(&self) -> String {
        let mut names: Vec<&String> = self.tensors.keys().collect();
        names.sort();
        let mut s = String::new();
        for n in names {
            s.push_str(&format!("{n}:{:?}\n", self.tensors[n]));
        }
        s
    }
}

/// A tensor's full shape and its chunks with their holders (catalogue ranks), checked against
/// what the files hold.
#[derive(Debug, Clone)]
pub struct ResolvedChunks {
    /// The full shape.
    pub full: Vec<u64>,
    /// Each chunk's box and the ranks whose files hold it.
    pub slices: Vec<(Region, Vec<u32>)>,
}

/// Checks every chunk of the table against the opened sources: each named file holds the tensor,
/// with the chunk's shape and the table's dtype. Refusals name the tensor, the chunk and the file.
pub fn resolve_all(table: &ChunkTable, sources: &BTreeMap<u32, Source>) -> Result<HashMap<String, ResolvedChunks>> {
    let mut out = HashMap::with_capacity(table.tensors.len());
    for (name, t) in &table.tensors {
        let mut slices = Vec::with_capacity(t.chunks.len());
        // A rank's files hold one slice of a tensor: two chunks stored by one rank would be read
        // from the same bytes.
        let mut chunk_of_rank: HashMap<u32, u64> = HashMap::new();
        for c in &t.chunks {
            let mut ranks = Vec::with_capacity(c.holders.len());
            for (rank, file) in &c.holders {
                if let Some(&other) = chunk_of_rank.get(rank).filter(|&&o| o != c.k) {
                    return Err(Error::Source {
                        path: table.path.with_file_name(file),
                        detail: format!(
                            "metadata.json says storage rank {rank} stores chunks {other} and {} of tensor '{name}', but \
                             a rank's files hold the tensor once",
                            c.k
                        ),
                    });
                }
                chunk_of_rank.insert(*rank, c.k);
                let src =
                    sources.get(rank).ok_or_else(|| Error::Invalid(format!("storage rank {rank} is not opened")))?;
                let path = src.files.iter().find(|f| f.path.file_name().is_some_and(|n| n == file.as_str()));
                let path = path.map_or_else(|| table.path.with_file_name(file), |f| f.path.clone());
                let what = format!(
                    "metadata.json says this file holds chunk {} of tensor '{name}' (offset {:?}, shape {:?}, dtype {})",
                    c.k, c.region.offset, c.region.shape, t.dtype
                );
                let info = src.index.get(name).filter(|i| src.file_of(i).path == path);
                let Some(info) = info else {
                    return Err(Error::Source {
                        path,
                        detail: format!("{what}, but the file does not hold that tensor"),
                    });
                };
                if info.shape() != c.region.shape.as_slice() {
                    return Err(Error::ShapeMismatch {
                        path,
                        rank: *rank,
                        param: name.clone(),
                        detail: format!("{what}, but the file holds shape {:?}", info.shape()),
                    });
                }
                if !info.dtype.ckpt_name().eq_ignore_ascii_case(&t.dtype) {
                    return Err(Error::ShapeMismatch {
                        path,
                        rank: *rank,
                        param: name.clone(),
                        detail: format!("{what}, but the file holds dtype {}", info.dtype.ckpt_name()),
                    });
                }
                ranks.push(*rank);
            }
            ranks.sort_unstable();
            ranks.dedup();
            slices.push((c.region.clone(), ranks));
        }
        out.insert(name.clone(), ResolvedChunks { full: t.global_shape.clone(), slices });
    }
    Ok(out)
}

/// The catalogue of a single-card save: rank 0 holds every safetensors file of the folder.
pub fn single_card_catalogue(dir: &Path) -> Result<Catalogue> {
    let mut files = Vec::new();
    let rd = std::fs::read_dir(dir).map_err(|e| Error::io(dir, "read folder", e))?;
    for e in rd {
        let e = e.map_err(|e| Error::io(dir, "read folder", e))?;
        let p = e.path();
        if p.extension().is_some_and(|x| x == "safetensors") {
            if let Some(why) = crate::input::not_regular(&p) {
                return Err(Error::Source {
                    path: p,
                    detail: format!("{why}; a checkpoint file must be a regular file"),
                });
            }
            files.push(p);
        }
    }
    if files.is_empty() {
        return Err(Error::Source {
            path: dir.to_path_buf(),
            detail: "a MindFormers checkpoint folder without metadata.json and without .safetensors files".into(),
        });
    }
    files.sort();
    let mut m = BTreeMap::new();
    m.insert(0u32, files);
    Ok(Catalogue { dir: dir.to_path_buf(), files: m, format: Format::Safetensors })
}

/// Builds a plan from a Checkpoint 2.0 root to `dst` (a legacy strategy, or `None` for one
/// complete checkpoint).
pub fn plan(root: &Root, dst: Option<Strategy>, opts: &PlanOptions) -> Result<Plan> {
    match &root.metadata {
        None => Plan::from_parts(single_card_catalogue(&root.dir)?, None, dst, opts),
        Some(m) => {
            let table = ChunkTable::from_metadata(&root.metadata_path(), m)?;
            let set = table.catalogue(&root.dir)?;
            Plan::from_chunks(set, &table, dst, opts)
        }
    }
}

/// The destination layouts of another Checkpoint 2.0 checkpoint (a root, an iteration folder, or
/// its `metadata.json`) as a strategy: each tensor's `device_matrix` and `tensor_map` on the
/// pipeline stage its `rank_list` is. Tensors without a layout are left out (written complete to
/// every rank, as MindFormers holds them).
pub fn strategy_from_metadata(path: &Path) -> Result<Strategy> {
    let mpath = if path.is_dir() {
        match detect(path)? {
            Some(r) => r.metadata_path(),
            None => path.join(mf::METADATA),
        }
    } else {
        path.to_path_buf()
    };
    let bytes = crate::input::read_capped(&mpath, MAX_METADATA_BYTES, "metadata.json")?;
    crate::input::check_unique_json_keys(&bytes).map_err(|d| bad_meta(&mpath, d))?;
    let m = mf::parse_metadata(&bytes).map_err(|d| bad_meta(&mpath, d))?;
    let mut items = Vec::new();
    for (name, v) in &m.state_dict_metadata {
        let t = mf::parse_tensor_meta(v).map_err(|d| bad_meta(&mpath, format!("tensor '{name}': {d}")))?;
        let Some(l) = t.layout else { continue };
        let bad = |d: String| Error::BadLayout { path: mpath.clone(), param: name.clone(), detail: d };
        if l.interleaved_parallel {
            return Err(bad("interleaved_parallel layouts are not supported".into()));
        }
        let devices = l.device_matrix.iter().try_fold(1u64, |a, &d| a.checked_mul(d)).unwrap_or(0);
        let start = l.rank_list.first().copied().unwrap_or(0);
        let contiguous = devices > 0
            && l.rank_list.len() as u64 == devices
            && start % devices == 0
            && l.rank_list.iter().enumerate().all(|(i, &r)| r == start + i as u64);
        if !contiguous {
            return Err(bad(format!(
                "rank_list {:?} is not one pipeline stage's ranks (stage * {devices} onwards, in order) of device \
                 matrix {:?}",
                l.rank_list, l.device_matrix
            )));
        }
        let stage = u32::try_from(start / devices).map_err(|_| bad(format!("rank_list starts at {start}")))?;
        let axis = |x: &serde_json::Value| -> Result<i64> {
            x.as_i64()
                .filter(|&a| a >= -1 && a < l.device_matrix.len() as i64)
                .ok_or_else(|| bad(format!("tensor_map entry {x} is not a device axis of {:?}", l.device_matrix)))
        };
        let mut tensor_map = Vec::with_capacity(l.tensor_map.len());
        for e in &l.tensor_map {
            tensor_map.push(match e.as_array() {
                Some(list) => list.iter().map(&axis).collect::<Result<Vec<_>>>()?,
                None => vec![axis(e)?],
            });
        }
        if tensor_map.len() != t.global_shape.len() {
            return Err(bad(format!(
                "tensor_map {:?} has {} entries for global_shape {:?}",
                l.tensor_map,
                tensor_map.len(),
                t.global_shape
            )));
        }
        let layout = crate::strategy::ParamLayout {
            dev_matrix: l.device_matrix.clone(),
            tensor_map,
            nested: true,
            opt_shard_step: 0,
            opt_shard_size: 0,
            tensor_shape: Some(t.global_shape.clone()),
        };
        items.push((stage, name.clone(), layout));
    }
    Strategy::from_layouts(&mpath, items)
}

/// The catalogue of a root's files (storage ranks, or rank 0 for a single-card save).
pub fn catalogue_of(root: &Root) -> Result<Catalogue> {
    match &root.metadata {
        None => single_card_catalogue(&root.dir),
        Some(m) => ChunkTable::from_metadata(&root.metadata_path(), m)?.catalogue(&root.dir),
    }
}

/// One tensor of a checked root.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TensorSummary {
    /// Its name.
    pub name: String,
    /// Its dtype (`Float32`...).
    pub dtype: String,
    /// The full shape.
    pub global_shape: Vec<u64>,
    /// How many distinct chunks.
    pub chunks: usize,
    /// How many (rank, file) copies of chunks the files hold.
    pub copies: usize,
}

/// What [`check`] found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CheckReport {
    /// The iteration folder.
    pub dir: PathBuf,
    /// Its iteration, when a tracker named it.
    pub iteration: Option<u64>,
    /// Whether `metadata.json` is there (not a single-card save).
    pub has_metadata: bool,
    /// Every file read (each parsed, crc verified where it has one).
    pub files: Vec<PathBuf>,
    /// The tensors, by name.
    pub tensors: Vec<TensorSummary>,
}

/// Reads every file of a root (tables of contents, crc where present) and checks `metadata.json`
/// against them, as planning from it would.
pub fn check(root: &Root) -> Result<CheckReport> {
    let set = catalogue_of(root)?;
    let read = crate::checkpoint::ReadOptions::default();
    let mut sources = BTreeMap::new();
    for &r in set.files.keys() {
        sources.insert(r, set.open_rank(r, crate::storage::IoMode::Auto, read)?);
    }
    let files: Vec<PathBuf> = set.files.values().flatten().cloned().collect();
    let mut tensors = Vec::new();
    match &root.metadata {
        None => {
            for s in sources.values() {
                for t in &s.index.tensors {
                    tensors.push(TensorSummary {
                        name: t.name().to_string(),
                        dtype: t.dtype.ckpt_name().to_string(),
                        global_shape: t.shape().to_vec(),
                        chunks: 1,
                        copies: 1,
                    });
                }
            }
        }
        Some(m) => {
            let table = ChunkTable::from_metadata(&root.metadata_path(), m)?;
            resolve_all(&table, &sources)?;
            for name in m.state_dict_metadata.keys() {
                if let Some(t) = table.tensors.get(name) {
                    tensors.push(TensorSummary {
                        name: name.clone(),
                        dtype: t.dtype.clone(),
                        global_shape: t.global_shape.clone(),
                        chunks: t.chunks.len(),
                        copies: t.chunks.iter().map(|c| c.holders.len()).sum(),
                    });
                }
            }
        }
    }
    Ok(CheckReport {
        dir: root.dir.clone(),
        iteration: root.iteration,
        has_metadata: root.metadata.is_some(),
        files,
        tensors,
    })
}
