//! Reading parameter names, shapes and types from a complete checkpoint (`--from`).

#![allow(unused_imports)] // one import list for the split files of strategy_new
use super::*;

/// The checkpoint file a `--from` argument names: a file, a folder with one checkpoint, or a
/// source folder whose only rank folder is `rank_0` (complete weights).
pub fn complete_checkpoint(path: &Path) -> Result<PathBuf> {
    if path.is_file() {
        return Ok(path.to_path_buf());
    }
    if !path.is_dir() {
        return Err(Error::Source { path: path.to_path_buf(), detail: "no such checkpoint file or folder".into() });
    }
    let has_ranks = std::fs::read_dir(path)
        .map_err(|e| Error::io(path, "read folder", e))?
        .filter_map(|e| e.ok())
        .any(|e| e.file_name().to_string_lossy().starts_with("rank_") && e.path().is_dir());
    if has_ranks {
        let set = crate::source::discover(path, None)?;
        if set.files.len() != 1 {
            return Err(Error::Source {
                path: path.to_path_buf(),
                detail: format!(
                    "holds {} rank folders; full shapes come from complete weights: give a complete \
                     checkpoint (or merge this one first with `reshard transform` without a destination strategy)",
                    set.files.len()
                ),
            });
        }
        return set
            .files
            .into_values()
            .flatten()
            .next()
            .ok_or_else(|| Error::Source { path: path.to_path_buf(), detail: "no checkpoint found".into() });
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|e| Error::io(path, "read folder", e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && crate::checkpoint::Format::from_path(p).is_some())
        .collect();
    files.sort();
    match files.len() {
        1 => Ok(files.remove(0)),
        0 => Err(Error::Source {
            path: path.to_path_buf(),
            detail: "no .ckpt or .safetensors file and no rank_0 folder".into(),
        }),
        n => Err(Error::Source { path: path.to_path_buf(), detail: format!("{n} checkpoint files; name one") }),
    }
}

/// Names, full shapes and types of the tensors of a complete checkpoint (see
/// [`complete_checkpoint`] for what `path` may be). String tensors are left out.
pub fn read_params(path: &Path) -> Result<Vec<ParamInfo>> {
    let file = complete_checkpoint(path)?;
    let f = CheckpointFile::open(&file, ReadOptions::default())?;
    Ok(f.index()
        .tensors
        .iter()
        .filter(|t| t.dtype != DType::Str)
        .map(|t| ParamInfo { name: t.name().to_string(), shape: t.shape().to_vec(), dtype: Some(t.dtype) })
        .collect())
}

/// Full shapes by name, for [`show`].
pub fn shapes_of(params: &[ParamInfo]) -> BTreeMap<String, Vec<u64>> {
    params.iter().map(|p| (p.name.clone(), p.shape.clone())).collect()
}
