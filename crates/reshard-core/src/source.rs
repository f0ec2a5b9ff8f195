//! The source catalogue: for each source rank, the files that hold its tensors, found in
//! `SRC/rank_{i}/` folders (one checkpoint chosen per rank), and opened into one index per rank.
//!
//! The planner consults a [`Catalogue`], never the file system: a new source layout (several
//! files per rank, a store of objects) is a new way to fill one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::checkpoint::{CheckpointFile, CheckpointIndex, Format, ReadOptions, TensorInfo};
use crate::error::{Error, Result};
use crate::storage::{IoMode, Version};

/// The files of each source rank.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Catalogue {
    /// The source folder.
    pub dir: PathBuf,
    /// Rank -> its files (one or more; together they hold the rank's tensors, each once).
    pub files: BTreeMap<u32, Vec<PathBuf>>,
    /// Format of all the files.
    pub format: Format,
}

/// Threads that read the tables of contents of object sources at once.
pub const OBJECT_OPENERS: usize = 16;

/// Threads that read the tables of contents of local files at once. A cold `.ckpt` table of
/// contents is a chain of one-page reads (each header says where the next one starts), so one
/// file waits on the disk one read at a time: only several files read side by side keep the
/// disk busy. 8 -> 4 of the benchmark (8 files of 143 tensors) planned in 0.05 s cold on the
/// 2-thread pool (four files one after the other on each thread).
pub const LOCAL_OPENERS: usize = 8;

/// The name [`discover`] returned before the catalogue held several files per rank.
pub type SourceSet = Catalogue;

/// One source file as it was when planned.
#[derive(Debug, Clone)]
pub struct SourceFile {
    /// Its path (or URL).
    pub path: PathBuf,
    /// The version indexed (size and times, or ETag).
    pub version: Version,
    /// When its table of contents was taken from another object's with the check deferred
    /// (`PlanOptions::defer_toc_checks`): the bytes the executor still compares before any
    /// output read from it is committed.
    pub predicted: Option<std::sync::Arc<crate::toc_predict::PredictedBytes>>,
}

/// One source rank: its files and one table of contents over all of them (each tensor's
/// [`TensorInfo::file`] says which file holds it).
#[derive(Debug, Clone)]
pub struct Source {
    /// Global source rank.
    pub rank: u32,
    /// Its files.
    pub files: Vec<SourceFile>,
    /// The tensors of all its files, in file order.
    pub index: CheckpointIndex,
}

impl Source {
    /// The rank's (first) file, for messages about the rank as a whole.
    pub fn path(&self) -> &Path {
        self.files.first().map_or(Path::new(""), |f| f.path.as_path())
    }

    /// The file that holds `t`.
    pub fn file_of(&self, t: &TensorInfo) -> &SourceFile {
        &self.files[t.file as usize]
    }

    /// The file that holds parameter `name` (the rank's first when none does).
    pub fn path_of(&self, name: &str) -> &Path {
        self.index.get(name).map_or(self.path(), |t| self.file_of(t).path.as_path())
    }
}

impl Catalogue {
    /// A catalogue of one file per rank.
    pub fn single(dir: PathBuf, files: BTreeMap<u32, PathBuf>, format: Format) -> Self {
        Catalogue { dir, files: files.into_iter().map(|(r, f)| (r, vec![f])).collect(), format }
    }

    /// [`Catalogue::open_rank`] for each of `ranks`, side by side: on up to [`LOCAL_OPENERS`]
    /// threads for local files (or the worker pool, if larger), on up to [`OBJECT_OPENERS`]
    /// threads for objects, whose tables of contents are many small ranged GETs that wait on
    /// the network rather than on a core (600 MB bench model, 8 objects of 284 tensors on a
    /// loopback server: planning took 1.0 s on the 2-thread pool).
    pub fn open_ranks(&self, ranks: &[u32], io: IoMode, read: ReadOptions) -> Result<Vec<Source>> {
        self.open_ranks_deferring(ranks, io, read, false)
    }

    /// [`Catalogue::open_ranks`]; with `defer_toc_checks`, tables of contents of objects taken
    /// from an object of the same size are checked by the executor, in the copy's own GETs,
    /// rather than here (`toc_predict`).
    pub fn open_ranks_deferring(
        &self,
        ranks: &[u32],
        io: IoMode,
        read: ReadOptions,
        defer_toc_checks: bool,
    ) -> Result<Vec<Source>> {
        use rayon::prelude::*;
        let objects = crate::storage::is_url(&self.dir);
        let open = || -> Result<Vec<Source>> {
            if objects && ranks.len() >= 2 {
                if let Some(sources) = crate::toc_predict::open_ranks(self, ranks, read, defer_toc_checks)? {
                    return Ok(sources);
                }
            }
            ranks.par_iter().map(|&r| self.open_rank(r, io, read)).collect()
        };
        // Threads of their own, since the reads wait on the disk or the network rather than on a
        // core; on the worker pool when it is as large, or when they cannot be started.
        let openers = if objects { OBJECT_OPENERS } else { LOCAL_OPENERS };
        let pool = (ranks.len() >= 2 && openers > rayon::current_num_threads())
            .then(|| rayon::ThreadPoolBuilder::new().num_threads(ranks.len().min(openers)).build().ok())
            .flatten();
        match pool {
            Some(pool) => pool.install(open),
            None => open(),
        }
    }

    /// Opens and indexes every file of `rank` (reading only their tables of contents), and
    /// joins them into one index. A tensor held by two of them is refused, naming both.
    pub fn open_rank(&self, rank: u32, io: IoMode, read: ReadOptions) -> Result<Source> {
        let paths = self.files.get(&rank).ok_or_else(|| Error::Source {
            path: self.dir.clone(),
            detail: format!("source rank {rank} has no files"),
        })?;
        let mut files = Vec::with_capacity(paths.len());
        let mut indexes = Vec::with_capacity(paths.len());
        for p in paths {
            // An object's crc trailer is not verified here: that would fetch every byte of every
            // source; the ETag pins the version read, and `reshard verify` checks outputs.
            let mut read = read;
            if crate::storage::is_url(p) {
                read.verify_crc = false;
            }
            let (src, index) = CheckpointFile::open_with(p, read, io)?.into_parts();
            files.push(SourceFile { path: p.clone(), version: src.version().clone(), predicted: None });
            indexes.push(index);
        }
        if indexes.len() == 1 {
            let index = indexes.pop().unwrap_or_else(|| unreachable!());
            return Ok(Source { rank, files, index });
        }
        let format = indexes[0].format;
        let metadata = indexes[0].metadata.clone();
        let file_len = indexes.iter().map(|i| i.file_len).sum();
        let mut tensors = Vec::new();
        for (k, idx) in indexes.into_iter().enumerate() {
            for mut t in idx.tensors {
                t.file = k as u32;
                tensors.push(t);
            }
        }
        // A folder with a map (unified, Hugging Face index): MindSpore's loader takes the
        // tensors in the map's order, then the hyper-parameters.
        if let Some(order) = crate::source_unified::map_order(paths) {
            tensors.sort_by_key(|t| order.get(t.name().as_str()).copied().unwrap_or(usize::MAX));
        }
        let index = CheckpointIndex::new(format, tensors, file_len, None, metadata);
        if let Some((a, b)) = index.first_repeat() {
            let name = &index.tensors[a].name();
            return Err(Error::Source {
                path: self.dir.join(format!("rank_{rank}")),
                detail: format!(
                    "tensor '{name}' is in both {} and {}; a rank's files must hold each tensor once",
                    files[index.tensors[a].file as usize].path.display(),
                    files[index.tensors[b].file as usize].path.display()
                ),
            });
        }
        Ok(Source { rank, files, index })
    }
}

fn src_err(path: &Path, detail: impl Into<String>) -> Error {
    Error::Source { path: path.to_path_buf(), detail: detail.into() }
}

/// Parses `...-{epoch}_{step}.ckpt` into (epoch, step).
pub fn epoch_step(path: &Path) -> Option<(u64, u64)> {
    let stem = path.file_stem()?.to_str()?;
    let (_, tail) = stem.rsplit_once('-')?;
    let (e, s) = tail.split_once('_')?;
    Some((e.parse().ok()?, s.parse().ok()?))
}

/// Lists `rank_{i}` folders of `dir` and picks one checkpoint in each.
///
/// With one checkpoint per folder that is the one. With several, `choose` (a file name, where
/// `{rank}` stands for the rank number) picks; otherwise the newest `-{epoch}_{step}` present in
/// every rank is used, and anything ambiguous is refused with the candidates listed.
pub fn discover(dir: &Path, choose: Option<&str>) -> Result<Catalogue> {
    if crate::storage::is_url(dir) {
        return discover_objects(dir, choose);
    }
    if !dir.is_dir() {
        return Err(src_err(dir, "the source checkpoint folder does not exist or is not a folder"));
    }
    // A complete model as one folder with a map (MindSpore's unified folder, a Hugging Face
    // index folder): rank 0 is all of its files.
    if let Some(c) = crate::source_unified::complete_folder(dir)? {
        return Ok(c);
    }
    // Ranks whose checkpoint is several files (a map in the folder), and hyper-parameter files
    // joined to a rank's chosen checkpoint.
    let mut joined: BTreeMap<u32, Vec<PathBuf>> = BTreeMap::new();
    let mut hyper: BTreeMap<u32, PathBuf> = BTreeMap::new();
    let mut candidates: BTreeMap<u32, Vec<PathBuf>> = BTreeMap::new();
    // Each rank's folder name, and each folder's real path: `rank_0` and `rank_00` both
    // spell rank 0, and a `rank_1` that is a symlink to `rank_0` would feed rank 0's slices to
    // rank 1. Either is refused, naming both folders.
    let mut names: BTreeMap<u32, String> = BTreeMap::new();
    let mut real: std::collections::HashMap<PathBuf, String> = std::collections::HashMap::new();
    let rd = std::fs::read_dir(dir).map_err(|e| Error::io(dir, "read folder", e))?;
    for e in rd {
        let e = e.map_err(|e| Error::io(dir, "read folder", e))?;
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(num) = name.strip_prefix("rank_") else {
            continue;
        };
        let Ok(rank) = num.parse::<u32>() else {
            continue;
        };
        if !num.bytes().all(|b| b.is_ascii_digit()) || !e.path().is_dir() {
            continue;
        }
        if let Some(other) = names.insert(rank, name.to_string()) {
            let (a, b) = if other.as_str() < name { (other.as_str(), name) } else { (name, other.as_str()) };
            return Err(src_err(
                dir,
                format!("the rank folders {a} and {b} are both rank {rank}: which one is meant is ambiguous; keep one"),
            ));
        }
        let canonical = e.path().canonicalize().map_err(|err| Error::io(e.path(), "resolve", err))?;
        if let Some(other) = real.insert(canonical.clone(), name.to_string()) {
            let (a, b) = if other.as_str() < name { (other.as_str(), name) } else { (name, other.as_str()) };
            return Err(src_err(
                dir,
                format!(
                    "the rank folders {a} and {b} are the same folder ({}, through a symlink): each rank needs its \
                     own checkpoint",
                    canonical.display()
                ),
            ));
        }
        let mut files = Vec::new();
        let rd = std::fs::read_dir(e.path()).map_err(|err| Error::io(e.path(), "read folder", err))?;
        for f in rd {
            let f = f.map_err(|err| Error::io(e.path(), "read folder", err))?;
            let p = f.path();
            if Format::from_path(&p).is_some() {
                // A FIFO, device or dangling symlink named like a checkpoint is refused by name
                // rather than skipped (skipping it read as "no .ckpt file").
                if let Some(why) = crate::input::not_regular(&p) {
                    return Err(src_err(&p, format!("{why}; a rank folder's checkpoint must be a regular file")));
                }
                files.push(p);
            }
        }
        files.sort();
        let files = match crate::source_unified::rank_folder(&e.path(), files)? {
            crate::source_unified::RankFiles::Candidates(files, h) => {
                hyper.extend(h.map(|h| (rank, h)));
                files
            }
            crate::source_unified::RankFiles::Joined(all) => {
                // One candidate stands for them while one checkpoint per rank is chosen.
                let first = all.first().cloned().into_iter().collect();
                joined.insert(rank, all);
                first
            }
        };
        candidates.insert(rank, files);
    }
    let mut set = pick_files(dir, candidates, choose)?;
    for (rank, files) in set.files.iter_mut() {
        if let Some(all) = joined.remove(rank) {
            *files = all;
        }
        files.extend(hyper.remove(rank));
    }
    Ok(set)
}

/// [`discover`] on an object store: the objects under `dir/rank_N/` (one listing of the
/// prefix, no object read).
#[cfg(feature = "s3")]
fn discover_objects(dir: &Path, choose: Option<&str>) -> Result<Catalogue> {
    let base = dir.to_string_lossy().trim_end_matches('/').to_string();
    let mut candidates: BTreeMap<u32, Vec<PathBuf>> = BTreeMap::new();
    let mut names: BTreeMap<u32, String> = BTreeMap::new();
    for (url, _) in crate::storage::object::list(dir)? {
        let s = url.to_string_lossy();
        let Some(rel) = s.strip_prefix(&base).and_then(|r| r.strip_prefix('/')) else { continue };
        // rank_N/file directly: deeper objects are not a rank's checkpoint.
        let Some((folder, file)) = rel.split_once('/') else { continue };
        if file.contains('/') {
            continue;
        }
        let Some(num) = folder.strip_prefix("rank_") else { continue };
        let Ok(rank) = num.parse::<u32>() else { continue };
        if !num.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        if let Some(other) = names.insert(rank, folder.to_string()) {
            if other != folder {
                let (a, b) = if other.as_str() < folder { (other.as_str(), folder) } else { (folder, other.as_str()) };
                return Err(src_err(
                    dir,
                    format!(
                        "the rank folders {a} and {b} are both rank {rank}: which one is meant is ambiguous; keep one"
                    ),
                ));
            }
        }
        let files = candidates.entry(rank).or_default();
        if Format::from_path(&url).is_some() {
            files.push(url.clone());
        }
    }
    for files in candidates.values_mut() {
        files.sort();
    }
    if candidates.is_empty() {
        return Err(src_err(
            dir,
            "no objects under rank_N/ in this bucket prefix: a source folder holds rank_0/, rank_1/, ... each with a \
             checkpoint",
        ));
    }
    pick_files(dir, candidates, choose)
}

#[cfg(not(feature = "s3"))]
fn discover_objects(dir: &Path, _choose: Option<&str>) -> Result<Catalogue> {
    Err(crate::storage::no_object_storage(dir))
}

/// One checkpoint per rank out of each rank folder's candidates (see [`discover`]).
fn pick_files(dir: &Path, candidates: BTreeMap<u32, Vec<PathBuf>>, choose: Option<&str>) -> Result<Catalogue> {
    if candidates.is_empty() {
        return Err(src_err(
            dir,
            "no rank_N folders: a source folder holds rank_0/, rank_1/, ... each with a checkpoint",
        ));
    }
    let mut formats = std::collections::BTreeSet::new();
    for (rank, files) in &candidates {
        if files.is_empty() {
            return Err(src_err(
                &dir.join(format!("rank_{rank}")),
                "no .ckpt or .safetensors file in this rank folder",
            ));
        }
        for f in files {
            formats.extend(Format::from_path(f));
        }
    }
    if formats.len() > 1 {
        return Err(src_err(dir, "the source mixes .ckpt and .safetensors files; use one format"));
    }
    let format = *formats.iter().next().unwrap_or(&Format::Ckpt);
    let files = if let Some(pattern) = choose {
        let mut out = BTreeMap::new();
        for (rank, files) in &candidates {
            let want = pattern.replace("{rank}", &rank.to_string());
            let f = files.iter().find(|f| f.file_name().and_then(|n| n.to_str()) == Some(want.as_str()));
            let f = f.ok_or_else(|| {
                src_err(
                    &dir.join(format!("rank_{rank}")),
                    format!("no file named '{want}' (candidates: {})", list(files)),
                )
            })?;
            out.insert(*rank, f.clone());
        }
        out
    } else if candidates.values().all(|f| f.len() == 1) {
        candidates.iter().map(|(r, f)| (*r, f[0].clone())).collect()
    } else {
        pick_common_step(dir, &candidates)?
    };
    Ok(Catalogue::single(dir.to_path_buf(), files, format))
}

fn list(files: &[PathBuf]) -> String {
    files.iter().filter_map(|f| f.file_name()?.to_str()).collect::<Vec<_>>().join(", ")
}

fn pick_common_step(dir: &Path, candidates: &BTreeMap<u32, Vec<PathBuf>>) -> Result<BTreeMap<u32, PathBuf>> {
    let ambiguous = |rank: u32, files: &[PathBuf], why: &str| {
        src_err(
            &dir.join(format!("rank_{rank}")),
            format!(
                "several checkpoints and {why}: {}; name one with --src_ckpt_name (use {{rank}} for the rank number)",
                list(files)
            ),
        )
    };
    let mut common: Option<std::collections::BTreeSet<(u64, u64)>> = None;
    for (rank, files) in candidates {
        let mut steps = std::collections::BTreeSet::new();
        for f in files {
            let s = epoch_step(f).ok_or_else(|| ambiguous(*rank, files, "not all names end in -EPOCH_STEP"))?;
            if !steps.insert(s) {
                return Err(ambiguous(*rank, files, "two of them have the same epoch and step"));
            }
        }
        common = Some(match common {
            None => steps,
            Some(c) => c.intersection(&steps).copied().collect(),
        });
    }
    let Some(&best) = common.as_ref().and_then(|c| c.iter().next_back()) else {
        let (rank, files) = candidates.iter().next().map(|(r, f)| (*r, f.clone())).unwrap_or_default();
        return Err(ambiguous(rank, &files, "no epoch/step is present in every rank"));
    };
    Ok(candidates
        .iter()
        .filter_map(|(r, files)| files.iter().find(|f| epoch_step(f) == Some(best)).map(|f| (*r, f.clone())))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_step_names() {
        assert_eq!(epoch_step(Path::new("llama_rank_0-10_200.ckpt")), Some((10, 200)));
        assert_eq!(epoch_step(Path::new("checkpoint_0.ckpt")), None);
    }

    #[test]
    fn picks_the_newest_common_step_and_refuses_ambiguity() {
        let t = std::env::temp_dir().join(format!("reshard-src-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&t);
        for r in 0..2 {
            let d = t.join(format!("rank_{r}"));
            std::fs::create_dir_all(&d).unwrap();
            for s in [1, 2] {
                std::fs::write(d.join(format!("m_rank_{r}-1_{s}.ckpt")), b"").unwrap();
            }
        }
        std::fs::write(t.join("rank_1").join("m_rank_1-1_3.ckpt"), b"").unwrap();
        let s = discover(&t, None).unwrap();
        assert!(s.files[&1][0].ends_with("m_rank_1-1_2.ckpt"));
        std::fs::write(t.join("rank_1").join("other.ckpt"), b"").unwrap();
        let err = discover(&t, None).unwrap_err().to_string();
        assert!(err.contains("rank_1") && err.contains("other.ckpt"), "{err}");
        let s = discover(&t, Some("m_rank_{rank}-1_1.ckpt")).unwrap();
        assert!(s.files[&0][0].ends_with("m_rank_0-1_1.ckpt"));
        std::fs::write(t.join("rank_0").join("x.safetensors"), b"").unwrap();
        assert!(discover(&t, None).unwrap_err().to_string().contains("mixes"));
        std::fs::remove_dir_all(&t).unwrap();
    }
}
