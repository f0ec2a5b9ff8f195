//! MindFormers "Checkpoint 2.0" (`use_legacy_format: False`), as MindFormers 2.1 defines it
//! (`mindformers/checkpoint/`): `ROOT/latest_checkpointed_iteration.txt`, `ROOT/iteration_%08d/`
//! holding `metadata.json`, `common.json` and `[{prefix}-]{model|opt}-%07d-%07d.safetensors`.
//!
//! This module is the format only: the metadata's types, the chunk arithmetic and the names.
//! Turning a root into what the planner consumes is [`crate::mindformers`].

use serde::{Deserialize, Serialize};

use crate::region::Region;

/// The file naming the latest iteration, in a root.
pub const TRACKER: &str = "latest_checkpointed_iteration.txt";
/// The chunk table of an iteration folder.
pub const METADATA: &str = "metadata.json";
/// Training state of an iteration folder (global step, loss scale...).
pub const COMMON: &str = "common.json";

/// `metadata.json`: every tensor's description and where each chunk is stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metadata {
    /// Tensor name -> its description, in the order MindFormers wrote them.
    pub state_dict_metadata: serde_json::Map<String, serde_json::Value>,
    /// Shard key (`str((name, (k,)))`) -> the files that hold that chunk.
    pub storage_data: serde_json::Map<String, serde_json::Value>,
}

/// One tensor of `state_dict_metadata` (field order as `save_metadata` writes it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorMeta {
    /// dtype, replica id and flags.
    pub properties: Properties,
    /// The full tensor's shape.
    pub global_shape: Vec<u64>,
    /// How many slices each dim is cut into.
    pub axis_fragmentations: Vec<u64>,
    /// `mindspore.parallel.Layout.to_dict()`, `None` for a tensor that is not sharded.
    pub layout: Option<LayoutDict>,
    /// The distinct chunks.
    pub chunk: Vec<Chunk>,
}

/// `properties` of a tensor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Properties {
    /// `str(mindspore dtype)`: `Float32`, `BFloat16`...
    pub dtype: String,
    /// Replica ids (an int, or one per rank of the layout).
    pub replica_id: serde_json::Value,
    /// MindFormers' flag, carried.
    pub allow_shape_mismatch: bool,
    /// MindFormers' flag, carried.
    pub allow_to_save: bool,
}

/// `Layout.to_dict()` (field order as MindSpore writes it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayoutDict {
    /// Devices per axis.
    pub device_matrix: Vec<u64>,
    /// Per tensor dim: a device axis counted from the right, -1, or a list of axes.
    pub tensor_map: Vec<serde_json::Value>,
    /// Whether an axis is named `interleaved_parallel`.
    pub interleaved_parallel: bool,
    /// A name per device axis.
    pub alias_name: Vec<String>,
    /// The global ranks of the layout, in device-matrix order.
    pub rank_list: Vec<u64>,
}

/// One chunk: its slice index and shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunk {
    /// `[k]`: the slice index in row-major order over `axis_fragmentations` (not an element
    /// offset).
    pub global_offset: Vec<u64>,
    /// The chunk's shape.
    pub local_shape: Vec<u64>,
}

/// One holder of a chunk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StorageEntry {
    /// The file, relative to the iteration folder.
    pub file_name: String,
    /// The rank that wrote it.
    pub storage_rank: u64,
    /// Every rank whose slice this chunk is.
    pub rank_group: Vec<u64>,
}

/// The box of chunk `k` of a tensor of `global_shape` cut `frag` ways per dim into chunks of
/// `local_shape`, or why there is none. The chunk index is row-major over `frag`.
pub fn chunk_box(global_shape: &[u64], frag: &[u64], local_shape: &[u64], k: u64) -> Result<Region, String> {
    if frag.len() != global_shape.len() || local_shape.len() != global_shape.len() {
        return Err(format!(
            "global_shape {global_shape:?}, axis_fragmentations {frag:?} and local_shape {local_shape:?} differ in rank"
        ));
    }
    let mut count: u64 = 1;
    for d in 0..frag.len() {
        if frag[d] == 0 || frag[d].checked_mul(local_shape[d]) != Some(global_shape[d]) {
            return Err(format!(
                "local_shape {local_shape:?} times axis_fragmentations {frag:?} is not global_shape {global_shape:?}"
            ));
        }
        count = count.checked_mul(frag[d]).ok_or_else(|| format!("axis_fragmentations {frag:?} overflow"))?;
    }
    if k >= count {
        return Err(format!("slice index {k} is beyond the {count} slice(s) of axis_fragmentations {frag:?}"));
    }
    let mut offset = vec![0; frag.len()];
    let mut rest = k;
    for d in (0..frag.len()).rev() {
        offset[d] = (rest % frag[d]) * local_shape[d];
        rest /= frag[d];
    }
    Ok(Region { offset, shape: local_shape.to_vec() })
}

/// The slice index of `b` in a tensor cut into boxes of `b.shape` (the inverse of [`chunk_box`]).
pub fn chunk_index(global_shape: &[u64], b: &Region) -> u64 {
    let mut k = 0;
    for ((&g, &s), &o) in global_shape.iter().zip(&b.shape).zip(&b.offset) {
        let frag = g.checked_div(s).unwrap_or(1);
        let idx = o.checked_div(s).unwrap_or(0);
        k = k * frag + idx;
    }
    k
}

/// Python's `repr(str)`, as `str(tuple)` writes a name in a shard key.
pub fn py_repr_str(s: &str) -> String {
    let quote = if s.contains('\'') && !s.contains('"') { '"' } else { '\'' };
    let mut out = String::with_capacity(s.len() + 2);
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => out.push_str(&format!("\\x{:02x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

/// The `storage_data` key of chunk `offset` of `name`: Python's `str((name, tuple(offset)))`.
pub fn shard_key(name: &str, offset: &[u64]) -> String {
    let inner = match offset {
        [] => "()".to_string(),
        [x] => format!("({x},)"),
        xs => format!("({})", xs.iter().map(u64::to_string).collect::<Vec<_>>().join(", ")),
    };
    format!("({}, {inner})", py_repr_str(name))
}

/// Which of the two files of a rank a tensor goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileType {
    /// Network parameters.
    Model,
    /// Optimizer states.
    Optimizer,
}

impl FileType {
    /// `model` or `opt`.
    pub fn as_str(self) -> &'static str {
        match self {
            FileType::Model => "model",
            FileType::Optimizer => "opt",
        }
    }
}

/// `get_checkpoint_name` + `.safetensors`: `[{prefix}-]{model|opt}-{idx:07}-{count:07}.safetensors`.
pub fn file_name(prefix: Option<&str>, kind: FileType, idx: u64, count: u64) -> String {
    let base = format!("{}-{idx:07}-{count:07}.safetensors", kind.as_str());
    match prefix {
        Some(p) => format!("{p}-{base}"),
        None => base,
    }
}

/// The iteration folder's name: `iteration_%08d`.
pub fn iteration_dir(iteration: u64) -> String {
    format!("iteration_{iteration:08}")
}

/// A dtype as `str(mindspore dtype)` writes it (`Float32`, `BFloat16`...).
pub fn ms_dtype_name(d: crate::dtype::DType) -> &'static str {
    d.ckpt_name()
}

/// Parses `metadata.json`'s bytes; `None` with the reason when they are not its form.
pub fn parse_metadata(bytes: &[u8]) -> Result<Metadata, String> {
    serde_json::from_slice(bytes).map_err(|e| e.to_string())
}

/// One tensor's description, parsed.
pub fn parse_tensor_meta(v: &serde_json::Value) -> Result<TensorMeta, String> {
    TensorMeta::deserialize(v).map_err(|e| e.to_string())
}

/// One chunk's holders, parsed.
pub fn parse_storage(v: &serde_json::Value) -> Result<Vec<StorageEntry>, String> {
    Vec::<StorageEntry>::deserialize(v).map_err(|e| e.to_string())
}

/// Balanced de-duplication as MindFormers' `distribute_shards` does it: shards with fewer
/// holders first, then larger ones (sizes in bits), then by shard key; each goes to the least
/// loaded of its holders (ties to the lowest rank). Returns, per shard (in the input order),
/// the rank that stores it.
pub fn distribute_shards(shards: &[(String, Vec<u64>, u64)], total_ranks: u64) -> Vec<u64> {
    let mut loads: std::collections::BTreeMap<u64, u64> = (0..total_ranks).map(|r| (r, 0)).collect();
    let mut order: Vec<usize> = (0..shards.len()).collect();
    order.sort_by(|&a, &b| {
        let (ka, ra, sa) = &shards[a];
        let (kb, rb, sb) = &shards[b];
        (ra.len(), std::cmp::Reverse(*sa), ka.as_str()).cmp(&(rb.len(), std::cmp::Reverse(*sb), kb.as_str()))
    });
    let mut chosen = vec![0; shards.len()];
    for i in order {
        let mut ranks = shards[i].1.clone();
        ranks.sort_unstable();
        // `min` keeps the first of equal loads: the lowest rank.
        let pick = ranks.iter().copied().min_by_key(|r| loads.get(r).copied().unwrap_or(0)).unwrap_or(0);
        *loads.entry(pick).or_insert(0) += shards[i].2;
        chosen[i] = pick;
    }
    chosen
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_boxes_are_row_major_slice_indices() {
        // A [4, 6] tensor cut 2 x 3: slice 4 is row 1, column 1.
        let b = chunk_box(&[4, 6], &[2, 3], &[2, 2], 4).unwrap();
        assert_eq!(b, Region { offset: vec![2, 2], shape: vec![2, 2] });
        assert_eq!(chunk_index(&[4, 6], &b), 4);
        assert!(chunk_box(&[4, 6], &[2, 3], &[2, 2], 6).unwrap_err().contains("beyond"));
        assert!(chunk_box(&[4, 6], &[2, 3], &[2, 3], 0).unwrap_err().contains("not global_shape"));
    }

    #[test]
    fn shard_keys_are_python_str_of_tuples() {
        assert_eq!(shard_key("model.w", &[3]), "('model.w', (3,))");
        assert_eq!(shard_key("it's", &[0]), "(\"it's\", (0,))");
        assert_eq!(shard_key("a'b\"c", &[0]), "('a\\'b\"c', (0,))");
        assert_eq!(shard_key("x", &[1, 2]), "('x', (1, 2))");
    }

    #[test]
    fn file_names_follow_get_checkpoint_name() {
        assert_eq!(file_name(None, FileType::Model, 3, 8), "model-0000003-0000008.safetensors");
        assert_eq!(file_name(Some("llama"), FileType::Optimizer, 0, 2), "llama-opt-0000000-0000002.safetensors");
    }

    #[test]
    fn balanced_assignment_prefers_rare_then_large_then_lowest_rank() {
        let shards = vec![
            ("('a', (0,))".to_string(), vec![0, 1], 64),
            ("('b', (0,))".to_string(), vec![0, 1], 32),
            ("('c', (0,))".to_string(), vec![1], 8),
        ];
        // c first (one holder) -> 1; a (larger) -> 0 (load 0 < 8); b -> 1 (8 < 64).
        assert_eq!(distribute_shards(&shards, 2), vec![0, 1, 1]);
    }
}
