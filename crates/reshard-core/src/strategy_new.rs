//! Making strategy files without MindSpore: from parameter names and shapes, sharding rules and
//! `dp x mp x pp`, the per-stage files MindSpore would write for that layout, plus the merged file.
//!
//! An inference runtime (C++, a custom launcher) that loads MindSpore-trained weights on N cards
//! has no MindSpore to compile the network and save a strategy; this writes one that MindSpore's
//! `transform_checkpoints` (and reshard) accept.
//!
//! What is written, per stage, mirrors MindSpore's `StrategyCheckpoint::Save`:
//! - `dev_matrix [dp, mp]` (MindFormers' convention: tensor_map value 0 is mp, the rightmost
//!   device axis, 1 is dp); one `TensorMap` per layout (one per tensor dim for `dp*mp` splits,
//!   MindSpore's nested form); `param_split_shape` and `indices_offset` one empty entry each;
//!   `field` 0;
//! - with optimizer shard, `opt_weight_shard_size` = the configured size (-1 = all replicas,
//!   MindSpore's default) and `opt_weight_shard_step` = the rank stride of the replica group
//!   (`OperatorInfo::CreateGroupForOptShard`), for parameters MindSpore would shard: at least
//!   `opt_shard_threshold_kb` big, not shared between stages, with a replicated axis whose size
//!   divides by the shard size and a dim 0 that divides; 0/0 otherwise;
//! - `current_stage` 1 (MindSpore's save counter after one compile), and one
//!   `parallel_strategy_item` per parameter, carrying the stage (the only thing MindSpore's
//!   tools read from them; node names follow MindSpore's `Default/network-...` scheme);
//! - layout items sorted by name; optimizer states (`adam_m.X`, `adam_v.X`, `accu_grads.X`)
//!   take X's layout; scalars and step/learning-rate bookkeeping get no layout item.
//!
//! ```no_run
//! use reshard_core::strategy_new::{read_params, write, StrategySpec};
//! # fn main() -> reshard_core::Result<()> {
//! let params = read_params("llama_7b/rank_0".as_ref())?;
//! let mut spec = StrategySpec::new(2, 4, 2); // dp 2, mp 4, pp 2: 16 ranks
//! spec.optimizer_shard = true;
//! let out = write(&spec, &params, "strategy".as_ref(), false)?;
//! println!("{}", out.merged.display()); // strategy/merged_ckpt_strategy.ckpt
//! # Ok(()) }
//! ```

mod assign;
mod emit;
mod inputs;
pub mod pattern;
pub mod rules;
mod show;
mod spec;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::atomic::write_atomic;
use crate::checkpoint::{CheckpointFile, ReadOptions};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::layout::ResolvedLayout;
use crate::strategy::{self, proto, ParamLayout};

pub use assign::*;
pub use emit::*;
pub use inputs::*;
pub use rules::{Axis, Rules, Split, SplitRule, StageRef, StageRule};
pub use show::{show, RankBox, ShowReport, ShowRow};
pub use spec::*;

/// Prefixes of optimizer states; a state takes the layout of the parameter it belongs to.
pub const OPTIMIZER_PREFIXES: &[&str] = &["adam_m.", "adam_v.", "accu_grads."];

/// Training bookkeeping that MindSpore never lays out (besides every 0-d tensor).
pub const BOOKKEEPING: &[&str] = &[
    "global_step",
    "learning_rate",
    "scale_sense",
    "loss_scale",
    "current_iterator_step",
    "last_overflow_iterator_step",
    "epoch_num",
    "step_num",
    "beta1_power",
    "beta2_power",
];

#[cfg(test)]
mod tests {
    use super::*;

    fn p(n: &str, s: &[u64]) -> ParamInfo {
        ParamInfo::new(n, s.to_vec())
    }

    /// The strategy writer used its own `write_atomic` whose temporary name was per process
    /// (`{file}.reshard-{pid}.tmp`), so a second write of the same file in flight in this process
    /// (another thread) was truncated and renamed away under it. It now uses `atomic::write_atomic`,
    /// whose temporary name is unique per call: the other write's file is left alone.
    #[test]
    fn a_write_leaves_another_write_in_flight_alone() {
        let d = std::env::temp_dir().join(format!("reshard-strategy-new-atomic-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        let spec = StrategySpec::new(1, 2, 1);
        let params = [p("model.layers.0.attention.wq.weight", &[8, 4])];
        let name = stage_file_name(&spec, 0, false);
        let in_flight = d.join(format!("{name}.reshard-{}.tmp", std::process::id()));
        std::fs::write(&in_flight, b"another write's bytes").unwrap();
        let w = write(&spec, &params, &d, false).unwrap();
        assert_eq!(std::fs::read(&in_flight).unwrap(), b"another write's bytes");
        assert!(crate::strategy::Strategy::load(&w.stage_files[0]).is_ok());
        let left: Vec<String> = std::fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.'))
            .collect();
        assert!(left.is_empty(), "temporary files left: {left:?}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn layer_indices() {
        assert_eq!(layer_index("model.layers.12.attention.wq.weight"), Some(12));
        assert_eq!(layer_index("layers.3.w"), Some(3));
        assert_eq!(layer_index("model.layersx.1.w"), None);
        assert_eq!(layer_index("model.norm_out.weight"), None);
    }

    #[test]
    fn mindformers_stage_spread() {
        let spec = StrategySpec::new(1, 1, 2);
        let st: Vec<u32> = (0..4).map(|i| layer_stage(&spec, i, 4)).collect();
        assert_eq!(st, vec![0, 0, 1, 1]);
        let spec = StrategySpec::new(1, 1, 4);
        let st: Vec<u32> = (0..6).map(|i| layer_stage(&spec, i, 6)).collect();
        assert_eq!(st, vec![0, 1, 2, 3, 3, 3]); // pp_dis = 7 // 4 = 1
        let mut spec = StrategySpec::new(1, 1, 3);
        spec.layers_per_stage = Some(vec![1, 3, 2]);
        let st: Vec<u32> = (0..6).map(|i| layer_stage(&spec, i, 6)).collect();
        assert_eq!(st, vec![0, 1, 1, 1, 2, 2]);
    }

    #[test]
    fn optimizer_fields_follow_mindspore() {
        let mut spec = StrategySpec::new(2, 4, 1);
        spec.optimizer_shard = true;
        spec.opt_shard_threshold_kb = 0;
        let params = [
            p("model.layers.0.attention.wq.weight", &[64, 16]),
            p("model.layers.0.attention.wo.weight", &[16, 64]),
            p("model.layers.0.attention_norm.weight", &[16]),
            p("model.layers.0.ffn_norm.weight", &[6]),
        ];
        let a = assign(&spec, &params).unwrap();
        let f: Vec<(i32, i32)> = a.layouts.iter().map(|l| (l.opt_shard_step, l.opt_shard_size)).collect();
        // [mp,1]: replicas along dp, stride mp; [1,mp]: dim 0 = 16 % (1*2) ok;
        // replicated norm: all 8 ranks, stride 1; 6 % 8 != 0: not sharded
        assert_eq!(f, vec![(4, -1), (4, -1), (1, -1), (0, 0)]);
        spec.opt_shard_size = 2;
        let a = assign(&spec, &params).unwrap();
        assert_eq!((a.layouts[3].opt_shard_step, a.layouts[3].opt_shard_size), (1, 2));
        spec.opt_shard_size = 3; // divides no replica group
        let a = assign(&spec, &params).unwrap();
        assert!(a.layouts.iter().all(|l| l.opt_shard_size == 0));
        spec.opt_shard_size = -1;
        spec.opt_shard_threshold_kb = 64; // all these are tiny
        let a = assign(&spec, &params).unwrap();
        assert!(a.layouts.iter().all(|l| l.opt_shard_size == 0));
    }

    #[test]
    fn states_follow_their_weight_and_scalars_are_left_out() {
        let mut spec = StrategySpec::new(2, 2, 1);
        spec.optimizer_shard = true;
        spec.opt_shard_threshold_kb = 0;
        let mut params = vec![
            p("adam_m.model.layers.0.feed_forward.w2.weight", &[16, 32]),
            p("model.layers.0.feed_forward.w2.weight", &[16, 32]),
            p("global_step", &[]),
            p("learning_rate", &[1]),
            p("model.odd.thing", &[3, 3]),
        ];
        params[1].dtype = Some(DType::BFloat16);
        let a = assign(&spec, &params).unwrap();
        assert_eq!(a.layouts.len(), 2);
        assert_eq!(a.layouts[0].name, "adam_m.model.layers.0.feed_forward.w2.weight");
        assert_eq!(a.layouts[0].split, a.layouts[1].split);
        assert_eq!(a.layouts[0].opt_shard_step, a.layouts[1].opt_shard_step);
        assert_eq!(a.unmatched(), vec!["model.odd.thing"]);
        assert_eq!(a.omitted[0], ("global_step".to_string(), Omitted::Scalar));
    }
}
