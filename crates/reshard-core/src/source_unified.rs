//! Sources of several files with a map: a complete model given as one folder, either
//! MindSpore's unified folder (`part{i}.safetensors`, `hyper_param.safetensors`,
//! `param_name_map.json`, written by `unified_safetensors`) or a Hugging Face index folder
//! (`model-0000k-of-0000n.safetensors`, `model.safetensors.index.json`), and rank folders that
//! hold one checkpoint in several files (a map, or a checkpoint plus a `hyper_param` file).
//!
//! Each becomes an ordinary [`Catalogue`]: one rank's files, joined into one index by
//! [`Catalogue::open_rank`]. The map is checked against the files when they are found: a tensor
//! the map puts in a file that lacks it, a tensor in a file the map does not list it for, and a
//! tensor in two files are refused, naming the files and the tensor.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::checkpoint::{CheckpointFile, Format, ReadOptions};
use crate::error::{Error, Result};
use crate::source::Catalogue;
use crate::storage::IoMode;

/// The map `mindspore.parallel.unified_safetensors` writes.
pub const UNIFIED_MAP: &str = "param_name_map.json";
/// The map of a Hugging Face sharded safetensors folder.
pub const HF_INDEX: &str = "model.safetensors.index.json";
/// The tensors without a layout that `unified_safetensors` writes apart from the parts
/// (`global_step`, `learning_rate`, ...). MindSpore's loader adds all of them to what it loads.
pub const HYPER_PARAM: &str = "hyper_param.safetensors";
/// The `.ckpt` counterpart of [`HYPER_PARAM`] beside a rank's `.ckpt` checkpoint.
pub const HYPER_PARAM_CKPT: &str = "hyper_param.ckpt";

/// A parsed weight map: tensor name -> file name, in the map's order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightMap {
    /// The map file.
    pub path: PathBuf,
    /// (tensor, file name) in the map's order.
    pub entries: Vec<(String, String)>,
    /// The files the map names, in order of first appearance.
    pub files: Vec<String>,
}

impl WeightMap {
    /// Reads `{"metadata": ..., "weight_map": {name: file}}` (or a bare `{name: file}`, which
    /// MindSpore's loader also accepts).
    pub fn read(path: &Path) -> Result<WeightMap> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, "read", e))?;
        let bad = |detail: String| Error::Malformed { path: path.to_path_buf(), kind: "weight map", detail };
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
        let obj = v.as_object().ok_or_else(|| bad("not a JSON object".into()))?;
        let map = match obj.get("weight_map") {
            Some(m) => m.as_object().ok_or_else(|| bad("\"weight_map\" is not an object".into()))?,
            None => obj,
        };
        let mut entries = Vec::with_capacity(map.len());
        let mut files: Vec<String> = Vec::new();
        for (name, file) in map {
            let file =
                file.as_str().ok_or_else(|| bad(format!("tensor '{name}': the file is not a string but {file}")))?;
            let plain = !file.is_empty()
                && !file.contains('/')
                && !file.contains('\\')
                && file != "."
                && file != ".."
                && !file.contains('\0');
            if !plain || Format::from_path(Path::new(file)) != Some(Format::Safetensors) {
                return Err(bad(format!("tensor '{name}': '{file}' is not a .safetensors file name of this folder")));
            }
            if !files.iter().any(|f| f == file) {
                files.push(file.to_string());
            }
            entries.push((name.clone(), file.to_string()));
        }
        Ok(WeightMap { path: path.to_path_buf(), entries, files })
    }
}

/// The map file of a folder, if it has one (both kinds at once is refused).
pub fn map_of(dir: &Path) -> Result<Option<PathBuf>> {
    let unified = dir.join(UNIFIED_MAP);
    let hf = dir.join(HF_INDEX);
    match (unified.is_file(), hf.is_file()) {
        (true, true) => Err(Error::Source {
            path: dir.to_path_buf(),
            detail: format!(
                "the folder has both {UNIFIED_MAP} and {HF_INDEX}: which map is meant is ambiguous; keep one"
            ),
        }),
        (true, false) => Ok(Some(unified)),
        (false, true) => Ok(Some(hf)),
        (false, false) => Ok(None),
    }
}

/// The files of a folder with a map: the map's files in order, then `hyper_param.safetensors`
/// when present. The map is checked against the files' tables of contents.
pub fn files_with_map(dir: &Path, map_path: &Path) -> Result<Vec<PathBuf>> {
    let map = WeightMap::read(map_path)?;
    let mut files: Vec<PathBuf> = map.files.iter().map(|f| dir.join(f)).collect();
    let hyper = dir.join(HYPER_PARAM);
    if hyper.is_file() && !map.files.iter().any(|f| f == HYPER_PARAM) {
        files.push(hyper);
    }
    check_map(&map, &files)?;
    Ok(files)
}

/// Checks a map against its files: every tensor it lists is in the file it names, every tensor
/// of a listed file is listed for that file, and no tensor is in two files.
pub fn check_map(map: &WeightMap, files: &[PathBuf]) -> Result<()> {
    // Each file's tensor names (only the table of contents is read).
    let mut holder: BTreeMap<String, usize> = BTreeMap::new();
    for (k, f) in files.iter().enumerate() {
        if let Some(why) = crate::input::not_regular(f) {
            return Err(Error::Source {
                path: f.clone(),
                detail: format!("{why}; {} names it as a file of the checkpoint", map.path.display()),
            });
        }
        let idx = CheckpointFile::open_with(f, ReadOptions { verify_crc: false }, IoMode::Pread)?.into_index();
        for t in &idx.tensors {
            if let Some(other) = holder.insert(t.name().to_string(), k) {
                return Err(Error::Source {
                    path: map.path.clone(),
                    detail: format!(
                        "tensor '{}' is in both {} and {}; the files of one checkpoint must hold each tensor once",
                        t.name(),
                        files[other].display(),
                        f.display()
                    ),
                });
            }
        }
    }
    let mut listed: BTreeMap<&str, &str> = BTreeMap::new();
    for (name, file) in &map.entries {
        listed.insert(name, file);
        let want = files.iter().position(|f| f.file_name().and_then(|n| n.to_str()) == Some(file.as_str()));
        match holder.get(name.as_str()) {
            Some(&k) if Some(k) == want => {}
            Some(&k) => {
                return Err(Error::Source {
                    path: map.path.clone(),
                    detail: format!("the map puts tensor '{name}' in {file}, but it is in {}", files[k].display()),
                })
            }
            None => {
                let elsewhere = other_holder(map, files, name)
                    .map(|p| format!("; it is in {}, which the map does not name", p.display()))
                    .unwrap_or_default();
                return Err(Error::Source {
                    path: map.path.clone(),
                    detail: format!(
                        "the map puts tensor '{name}' in {file}, but {} does not contain it{elsewhere}",
                        want.map_or_else(|| file.clone(), |k| files[k].display().to_string())
                    ),
                });
            }
        }
    }
    for (name, &k) in &holder {
        let file = files[k].file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if file == HYPER_PARAM && !map.files.iter().any(|f| f == HYPER_PARAM) {
            continue;
        }
        if !listed.contains_key(name.as_str()) {
            return Err(Error::Source {
                path: map.path.clone(),
                detail: format!(
                    "tensor '{name}' is in {} but the map does not list it; the map and the files disagree",
                    files[k].display()
                ),
            });
        }
    }
    Ok(())
}

/// For a message: another safetensors file beside the map (not one of `files`) that holds
/// `name`.
fn other_holder(map: &WeightMap, files: &[PathBuf], name: &str) -> Option<PathBuf> {
    let dir = map.path.parent()?;
    let mut others: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| Format::from_path(p) == Some(Format::Safetensors) && !files.contains(p) && p.is_file())
        .collect();
    others.sort();
    others.into_iter().find(|p| {
        CheckpointFile::open_with(p, ReadOptions { verify_crc: false }, IoMode::Pread)
            .is_ok_and(|f| f.index().get(name).is_some())
    })
}

/// A complete model given as a folder with a map (MindSpore's unified folder or a Hugging
/// Face index folder): a catalogue whose rank 0 is all of its files. `None` for any other
/// folder.
pub fn complete_folder(dir: &Path) -> Result<Option<Catalogue>> {
    let Some(map) = map_of(dir)? else {
        return Ok(None);
    };
    let files = files_with_map(dir, &map)?;
    Ok(Some(Catalogue { dir: dir.to_path_buf(), files: BTreeMap::from([(0, files)]), format: Format::Safetensors }))
}

/// Whether `file` is a hyper-parameter file that joins a rank's checkpoint rather than being one.
pub fn is_hyper_param(file: &Path) -> bool {
    matches!(file.file_name().and_then(|n| n.to_str()), Some(HYPER_PARAM | HYPER_PARAM_CKPT))
}

/// What a rank folder holds besides its candidate checkpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RankFiles {
    /// Candidates to choose one from (the usual case), and a hyper-parameter file to join to
    /// the chosen one.
    Candidates(Vec<PathBuf>, Option<PathBuf>),
    /// A map: the rank's checkpoint is all these files.
    Joined(Vec<PathBuf>),
}

/// Sorts a rank folder's checkpoint files (`files`, sorted) into candidates, or one checkpoint
/// of several files when the folder has a map. With a map, a checkpoint file the map does not
/// name is refused (which checkpoint is meant would be ambiguous).
pub fn rank_folder(folder: &Path, files: Vec<PathBuf>) -> Result<RankFiles> {
    if let Some(map) = map_of(folder)? {
        let joined = files_with_map(folder, &map)?;
        if let Some(extra) = files.iter().find(|f| !joined.contains(f)) {
            return Err(Error::Source {
                path: extra.clone(),
                detail: format!(
                    "this checkpoint file is not named by {}; with a map, a rank folder holds one checkpoint (its \
                     files are the map's); move the others away",
                    map.display()
                ),
            });
        }
        return Ok(RankFiles::Joined(joined));
    }
    let (hyper, candidates): (Vec<PathBuf>, Vec<PathBuf>) = files.into_iter().partition(|f| is_hyper_param(f));
    if hyper.len() > 1 {
        return Err(Error::Source {
            path: folder.to_path_buf(),
            detail: format!("both {HYPER_PARAM} and {HYPER_PARAM_CKPT}: keep one hyper-parameter file"),
        });
    }
    Ok(RankFiles::Candidates(candidates, hyper.into_iter().next()))
}

/// The order in which MindSpore's loader takes the tensors of a folder with a map: the map's
/// order, then the rest (hyper-parameters) as the files hold them. `None` when the files are
/// not a folder with a map.
pub fn map_order(paths: &[PathBuf]) -> Option<std::collections::HashMap<String, usize>> {
    let dir = paths.first()?.parent()?;
    let map = WeightMap::read(&map_of(dir).ok()??).ok()?;
    Some(map.entries.into_iter().enumerate().map(|(i, (name, _))| (name, i)).collect())
}
