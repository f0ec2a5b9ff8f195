//! Checkpoints the tests make and read back.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use reshard_core::checkpoint::{CheckpointFile, ReadOptions, TensorHeader};
use reshard_core::{ckpt, DType};
use serde_json::json;

/// The tensors of a checkpoint file: name -> (dtype, shape, bytes).
pub fn tensors(path: &Path) -> BTreeMap<String, (String, Vec<u64>, Vec<u8>)> {
    let f = CheckpointFile::open(path, ReadOptions::default()).unwrap();
    f.index()
        .tensors
        .iter()
        .map(|t| (t.name().to_string(), (t.dtype.to_string(), t.shape().to_vec(), f.content(t).into_owned())))
        .collect()
}

/// A complete fp32 tensor "w" of `rows` x 1024 (`rows` * 4 KiB) in `dir/complete/rank_0/model.ckpt`,
/// and a destination strategy `dir/mp2.json` that splits it in 2 by rows (`tensor_map` [0, -1]) or
/// by columns ([-1, 0]). Returns (source folder, source file, destination strategy). The
/// source's mtime is set an hour back, so a rewrite always moves it.
pub fn complete_source(dir: &Path, rows: u64, tensor_map: [i64; 2]) -> (PathBuf, PathBuf, PathBuf) {
    let nbytes = rows * 4096;
    let headers = vec![TensorHeader { name: "w".into(), dtype: DType::Float32, dims: vec![rows, 1024], nbytes }];
    let content: Vec<u8> = (0..nbytes).map(|k| (k as u8).wrapping_mul(13)).collect();
    let src = dir.join("complete/rank_0/model.ckpt");
    std::fs::create_dir_all(src.parent().unwrap()).unwrap();
    std::fs::write(&src, ckpt::layout(&headers, ckpt::CHUNK_BYTES).render(&[&content])).unwrap();
    let f = std::fs::File::options().write(true).open(&src).unwrap();
    f.set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(3600)).unwrap();
    let strategy = dir.join("mp2.json");
    let v = json!({"current_stage": 0, "parallel_strategy_item": {"op": {"stage": 0, "parallel_strategy": [[1]]}},
                   "parallel_layout_item": {"w": {"dev_matrix": [1, 2], "tensor_map": tensor_map, "field": 0,
                   "opt_weight_shard_step": 0, "opt_weight_shard_size": 0}}});
    std::fs::write(&strategy, serde_json::to_vec(&v).unwrap()).unwrap();
    (dir.join("complete"), src, strategy)
}
