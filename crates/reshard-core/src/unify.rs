//! `reshard unify`: what `mindspore.parallel.unified_safetensors` writes, from distributed
//! sources and their strategy, streamed from the sources into the part files in bounded memory.
//!
//! MindSpore's folder (`parallel/transform_safetensors.py`, 2.10):
//! - `part{i}.safetensors`: the complete tensors of every parameter that has a layout in the
//!   strategy and is in some source file (`accu_grads*` excepted), split into
//!   `min(ceil(total / 3 GiB), count)` parts: largest first, each to the part with the fewest
//!   bytes so far (ties to the lowest part; equal sizes in order of first appearance, rank
//!   folders in name order). Metadata `{"format": "ms"}` plus every source file's metadata,
//!   with `remove_redundancy` set to `"False"` when present.
//! - `hyper_param.safetensors`: rank 0's tensors that are not in a part (no layout, or
//!   `accu_grads*`, copied as rank 0 holds them), metadata `{"format": "ms"}`; absent when none.
//! - `param_name_map.json`: `{"metadata": {"total_size": N}, "weight_map": {name: part}}`,
//!   Python's `json.dumps(indent=4)`, parts in order, each in the order it was filled.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use crate::checkpoint::{Format, TensorInfo};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::exec::named::{execute_named, NamedOutput};
use crate::exec::{ExecuteOptions, WrittenFile};
use crate::plan::{Plan, PlanOptions, TensorPlan, TensorSource};
use crate::source::{discover, Catalogue};
use crate::source_unified::{HYPER_PARAM, UNIFIED_MAP};
use crate::storage::IoMode;
use crate::strategy::Strategy;

/// MindSpore's part size: `ceil(total / 1024 / 1024 / 1024 / 3)` parts.
pub const PART_BYTES: u64 = 3 << 30;

/// Settings of a unify job.
#[derive(Debug, Clone)]
pub struct UnifyOptions {
    /// `merge_with_redundancy`: `Some(false)` reads the sources as saved with
    /// `remove_redundancy`; `None` follows the files' metadata (as MindSpore does whatever is
    /// given, when the files say).
    pub merge_with_redundancy: Option<bool>,
    /// Only files whose names end in `{suffix}.safetensors` (one per rank folder).
    pub file_suffix: Option<String>,
    /// Bytes per part (MindSpore: 3 GiB); the number of parts is `ceil(total / part_bytes)`.
    pub part_bytes: u64,
    /// `split_dst_file` `(current, total)`: write only this task's share of the parts
    /// (MindSpore's split into `total` tasks, numbered from 1); task 1 also writes
    /// `hyper_param.safetensors` and the map (the whole map).
    pub split: Option<(u32, u32)>,
    /// How the sources are indexed.
    pub plan: PlanOptions,
    /// How the files are written (threads, io, sync, resume, progress, cancel; `format`,
    /// `prefix` and `crc` are not used).
    pub exec: ExecuteOptions,
}

impl Default for UnifyOptions {
    fn default() -> Self {
        UnifyOptions {
            merge_with_redundancy: None,
            file_suffix: None,
            part_bytes: PART_BYTES,
            split: None,
            plan: PlanOptions::default(),
            exec: ExecuteOptions::default(),
        }
    }
}

/// What a unify job wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct UnifyReport {
    /// The part files, in order, then `hyper_param.safetensors` if written.
    pub files: Vec<WrittenFile>,
    /// `param_name_map.json`.
    pub map: PathBuf,
    /// The map's `total_size`.
    pub total_size: u64,
    /// Parameters in the parts.
    pub params: usize,
    /// Whether the sources were read as saved with `remove_redundancy`.
    pub deduplicated: bool,
    /// Things the user should know.
    pub warnings: Vec<String>,
}

/// The parts of a unified folder: for each part, its parameters in the order MindSpore fills
/// it, and the total size.
pub fn split_parts(sizes: &[(String, u64)], part_bytes: u64) -> (Vec<Vec<String>>, u64) {
    let total: u64 = sizes.iter().map(|(_, s)| s).sum();
    let n = total.div_ceil(part_bytes.max(1)).min(sizes.len() as u64) as usize;
    let n = if n == 0 && !sizes.is_empty() { 1 } else { n };
    let mut order: Vec<&(String, u64)> = sizes.iter().collect();
    // Python's sorted() is stable: equal sizes keep their order.
    order.sort_by_key(|x| std::cmp::Reverse(x.1));
    let mut groups: Vec<Vec<String>> = vec![Vec::new(); n];
    let mut bytes = vec![0u64; n];
    for (name, size) in order {
        // `total_bytes.index(min(total_bytes))`: the first part with the fewest bytes.
        let Some((i, _)) = bytes.iter().enumerate().min_by_key(|&(i, b)| (*b, i)) else { break };
        groups[i].push(name.clone());
        bytes[i] += size;
    }
    (groups, total)
}

/// The parts task `current` of `total` writes (MindSpore's `split_dst_file`).
pub fn split_range(parts: usize, current: u32, total: u32) -> Result<std::ops::Range<usize>> {
    if total == 0 || current == 0 || current > total {
        return Err(Error::Invalid(format!(
            "split_dst_file ({current}, {total}): the task number must be from 1 to the number of tasks"
        )));
    }
    let (cur, total) = (current as usize, total as usize);
    let (avg, rem) = (parts / total, parts % total);
    let start = avg * (cur - 1) + (cur - 1).min(rem);
    let end = start + avg + usize::from(cur <= rem);
    Ok(start..end)
}

/// Python's `json.dumps(s)` of a string (ASCII only, `\uXXXX` escapes).
fn py_json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            ' '..='~' => out.push(c),
            _ => {
                let mut buf = [0u16; 2];
                for u in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{u:04x}"));
                }
            }
        }
    }
    out.push('"');
    out
}

/// `param_name_map.json` exactly as MindSpore's `json.dumps(output_dict, indent=4)` writes it.
pub fn map_json(parts: &[Vec<String>], total_size: u64) -> String {
    let mut out =
        format!("{{\n    \"metadata\": {{\n        \"total_size\": {total_size}\n    }},\n    \"weight_map\": ");
    let entries: Vec<String> = parts
        .iter()
        .enumerate()
        .flat_map(|(i, names)| {
            names
                .iter()
                .map(move |n| format!("        {}: {}", py_json_str(n), py_json_str(&format!("part{i}.safetensors"))))
        })
        .collect();
    if entries.is_empty() {
        out.push_str("{}");
    } else {
        out.push_str("{\n");
        out.push_str(&entries.join(",\n"));
        out.push_str("\n    }");
    }
    out.push_str("\n}");
    out
}

/// The rank folders with a file ending in `{suffix}.safetensors` (exactly one each).
fn discover_with_suffix(dir: &Path, suffix: &str) -> Result<Catalogue> {
    let want = format!("{suffix}.safetensors");
    let mut files = BTreeMap::new();
    for (rank, (folder, all)) in rank_files(dir)? {
        let mut found: Vec<PathBuf> = all
            .into_iter()
            .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.ends_with(&want)))
            .collect();
        found.sort();
        match found.len() {
            1 => {
                files.insert(rank, found.remove(0));
            }
            0 => {
                return Err(Error::Source {
                    path: folder,
                    detail: format!("no file whose name ends in '{want}' (file_suffix '{suffix}')"),
                })
            }
            _ => {
                let names: Vec<String> =
                    found.iter().filter_map(|f| Some(f.file_name()?.to_str()?.to_string())).collect();
                return Err(Error::Source {
                    path: folder,
                    detail: format!(
                        "several files end in '{want}': {}; give a longer file_suffix that names one",
                        names.join(", ")
                    ),
                });
            }
        }
    }
    Ok(Catalogue::single(dir.to_path_buf(), files, Format::Safetensors))
}

/// Each `rank_{i}` folder of `dir` and the files in it (in an object store: the objects directly
/// under `rank_{i}/`, from one listing of the prefix).
fn rank_files(dir: &Path) -> Result<BTreeMap<u32, (PathBuf, Vec<PathBuf>)>> {
    let rank_of = |folder: &str| {
        let num = folder.strip_prefix("rank_")?;
        if num.is_empty() || !num.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        num.parse::<u32>().ok()
    };
    let mut out: BTreeMap<u32, (PathBuf, Vec<PathBuf>)> = BTreeMap::new();
    let mut add = |rank: u32, folder: PathBuf, file: Option<PathBuf>| -> Result<()> {
        let slot = out.entry(rank).or_insert_with(|| (folder.clone(), Vec::new()));
        if slot.0 != folder {
            return Err(Error::Source {
                path: dir.to_path_buf(),
                detail: format!("two rank folders are rank {rank}; keep one"),
            });
        }
        slot.1.extend(file);
        Ok(())
    };
    if crate::storage::is_url(dir) {
        #[cfg(feature = "s3")]
        {
            let base = dir.to_string_lossy().trim_end_matches('/').to_string();
            for (url, _) in crate::storage::object::list(dir)? {
                let s = url.to_string_lossy();
                let Some(rel) = s.strip_prefix(&base).and_then(|r| r.strip_prefix('/')) else { continue };
                let Some((folder, file)) = rel.split_once('/') else { continue };
                let Some(rank) = rank_of(folder).filter(|_| !file.contains('/')) else { continue };
                add(rank, PathBuf::from(format!("{base}/{folder}")), Some(url.clone()))?;
            }
            return Ok(out);
        }
        #[cfg(not(feature = "s3"))]
        return Err(crate::storage::no_object_storage(dir));
    }
    let rd = std::fs::read_dir(dir).map_err(|e| Error::io(dir, "read folder", e))?;
    for e in rd.flatten() {
        let Some(rank) = e.file_name().to_str().and_then(rank_of) else { continue };
        let folder = e.path();
        if !folder.is_dir() {
            continue;
        }
        add(rank, folder.clone(), None)?;
        for f in std::fs::read_dir(&folder).map_err(|e| Error::io(&folder, "read folder", e))?.flatten() {
            add(rank, folder.clone(), Some(f.path()))?;
        }
    }
    Ok(out)
}

/// The stored tensor `t` of source rank 0 copied as it is.
fn raw_from_rank0(t: &TensorInfo) -> TensorPlan {
    let dims = if t.dtype == DType::Str { t.raw_dims().to_vec() } else { t.shape().to_vec() };
    TensorPlan {
        name: t.name().to_string(),
        dtype: t.dtype,
        dims,
        nbytes: t.nbytes(),
        source: TensorSource::Raw { src_rank: 0 },
    }
}

/// Writes the unified folder of the distributed checkpoint in `src_dir` (strategy
/// `src_strategy`) into `dst_dir`. Each of the three may be an `s3://`/`obs://` URL: the sources
/// are then read with ranged GETs, and the files are uploaded by the object sink (the map last).
pub fn unify(src_dir: &Path, src_strategy: &Path, dst_dir: &Path, opts: &UnifyOptions) -> Result<UnifyReport> {
    let strategy = Strategy::load(src_strategy)?;
    let set = match &opts.file_suffix {
        Some(s) => discover_with_suffix(src_dir, s)?,
        None => discover(src_dir, opts.plan.src_ckpt_name.as_deref())?,
    };
    let assume_sparse = opts.merge_with_redundancy == Some(false);
    let plan = Plan::from_parts_with(set, Some(strategy.clone()), None, &opts.plan, assume_sparse)?;
    let mut warnings = plan.warnings.clone();
    // MindSpore follows the files' flag whatever merge_with_redundancy says.
    let flags: Vec<&str> =
        plan.sources.values().flat_map(|s| s.index.metadata.get("remove_redundancy").map(String::as_str)).collect();
    let deduplicated = match flags.first() {
        Some(f) => f.eq_ignore_ascii_case("true"),
        None => assume_sparse,
    };
    if let (Some(m), Some(f)) = (opts.merge_with_redundancy, flags.first()) {
        if m == f.eq_ignore_ascii_case("true") {
            warnings.push(format!(
                "merge_with_redundancy is {m} but the source files say remove_redundancy \"{f}\"; following the files \
                 (as MindSpore does)"
            ));
        }
    }
    // The complete tensors, and the parameters of the parts in order of first appearance
    // (rank folders in name order, as a sorted glob lists them; each file in header order).
    let complete = plan.rank_plan(0)?;
    let mut full: HashMap<&str, &TensorPlan> = complete.tensors.iter().map(|t| (t.name.as_str(), t)).collect();
    let mut folders: Vec<u32> = plan.sources.keys().copied().collect();
    folders.sort_by_key(|r| format!("rank_{r}"));
    let mut sizes: Vec<(String, u64)> = Vec::new();
    let mut in_parts: std::collections::HashSet<String> = std::collections::HashSet::new();
    for r in &folders {
        for t in &plan.sources[r].index.tensors {
            if in_parts.contains(t.name().as_str())
                || !strategy.contains(t.name())
                || t.name().starts_with("accu_grads")
            {
                continue;
            }
            let Some(ft) = full.get(t.name().as_str()) else { continue };
            in_parts.insert(t.name().to_string());
            sizes.push((t.name().to_string(), ft.nbytes));
        }
    }
    let (parts, total_size) = split_parts(&sizes, opts.part_bytes);
    // Part metadata: {"format": "ms"} updated with every source file's (a stale crc_num of a
    // source would not be this file's: left out), remove_redundancy "False".
    let mut meta = BTreeMap::from([("format".to_string(), "ms".to_string())]);
    for r in &folders {
        for (k, v) in &plan.sources[r].index.metadata {
            meta.insert(k.clone(), v.clone());
        }
    }
    if meta.remove("crc_num").is_some() {
        warnings.push(
            "the sources carry crc_num metadata; the parts are written without it (MindSpore copies the \
                       sources' crc_num, which does not match the part)"
                .into(),
        );
    }
    if meta.contains_key("remove_redundancy") {
        meta.insert("remove_redundancy".into(), "False".into());
    }
    let mine = match opts.split {
        Some((c, t)) => split_range(parts.len(), c, t)?,
        None => 0..parts.len(),
    };
    let first_task = opts.split.is_none_or(|(c, _)| c == 1);
    let mut outputs: Vec<NamedOutput> = Vec::with_capacity(parts.len() + 1);
    for (i, names) in parts.iter().enumerate().filter(|(i, _)| mine.contains(i)) {
        let tensors = names.iter().filter_map(|n| full.remove(n.as_str()).cloned()).collect();
        outputs.push(NamedOutput { name: format!("part{i}.safetensors"), tensors, metadata: meta.clone() });
    }
    let rank0 = plan.sources.get(&0).ok_or_else(|| Error::Source {
        path: src_dir.to_path_buf(),
        detail: "no rank_0: MindSpore's unified folder takes its hyper-parameters from rank 0".into(),
    })?;
    let hyper: Vec<TensorPlan> =
        rank0.index.tensors.iter().filter(|t| !in_parts.contains(t.name().as_str())).map(raw_from_rank0).collect();
    if !hyper.is_empty() && first_task {
        outputs.push(NamedOutput {
            name: HYPER_PARAM.into(),
            tensors: hyper,
            metadata: BTreeMap::from([("format".to_string(), "ms".to_string())]),
        });
    }
    // An object store has no folders to make: the prefix is the folder.
    if !crate::storage::is_url(dst_dir) {
        std::fs::create_dir_all(dst_dir).map_err(|e| Error::io(dst_dir, "create folder", e))?;
    }
    let tag = format!("unify part_bytes={} dedup={deduplicated} split={:?}", opts.part_bytes, opts.split);
    // Unify moves whole tensors front to back into a few large files, where positioned reads
    // beat faulting maps in (600 MB bench model, 8 ranks -> unified, warm, --no-sync: 0.19 s
    // with pread against 0.23 s with maps, `cp -r` 0.19 s), so `auto` means pread here.
    let mut exec = opts.exec.clone();
    if exec.io == IoMode::Auto {
        exec.io = IoMode::Pread;
    }
    let files = execute_named(&plan, dst_dir, &outputs, &exec, &tag)?;
    let map = dst_dir.join(UNIFIED_MAP);
    if first_task {
        crate::storage::small::write(&map, map_json(&parts, total_size).as_bytes(), opts.exec.sync)?;
    }
    Ok(UnifyReport { files, map, total_size, params: sizes.len(), deduplicated, warnings })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_are_filled_largest_first_into_the_lightest() {
        let s = |v: &[(&str, u64)]| v.iter().map(|(n, b)| (n.to_string(), *b)).collect::<Vec<_>>();
        let (p, t) = split_parts(&s(&[("a", 4), ("b", 8), ("c", 4), ("d", 2), ("e", 4)]), 8);
        assert_eq!(t, 22);
        assert_eq!(p, vec![vec!["b".to_string()], vec!["a".into(), "e".into()], vec!["c".into(), "d".into()]]);
        let (p, _) = split_parts(&s(&[("a", 1), ("b", 1)]), 1 << 30);
        assert_eq!(p, vec![vec!["a".to_string(), "b".into()]]);
        assert!(split_parts(&[], 8).0.is_empty());
    }

    #[test]
    fn split_dst_file_shares_parts_as_mindspore() {
        // _transform_safetensors' split: 3 parts over 2 tasks are [0, 1] and [2].
        assert_eq!(split_range(3, 1, 2).unwrap(), 0..2);
        assert_eq!(split_range(3, 2, 2).unwrap(), 2..3);
        assert_eq!(split_range(2, 3, 3).unwrap(), 2..2);
        assert_eq!(split_range(7, 2, 3).unwrap(), 3..5);
        assert!(split_range(3, 0, 2).is_err() && split_range(3, 3, 2).is_err());
    }

    #[test]
    fn the_map_is_pythons_json_dumps_indent_4() {
        let parts = vec![vec!["w\u{e9}\"x".to_string(), "b".into()], vec!["\u{1f600}".into()]];
        assert_eq!(
            map_json(&parts, 12),
            "{\n    \"metadata\": {\n        \"total_size\": 12\n    },\n    \"weight_map\": {\n        \"w\\u00e9\\\"x\": \
             \"part0.safetensors\",\n        \"b\": \"part0.safetensors\",\n        \"\\ud83d\\ude00\": \
             \"part1.safetensors\"\n    }\n}"
        );
        assert_eq!(
            map_json(&[], 0),
            "{\n    \"metadata\": {\n        \"total_size\": 0\n    },\n    \"weight_map\": {}\n}"
        );
    }
}
