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

pub mod pattern;
pub mod rules;
mod show;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::atomic::write_atomic;
use crate::checkpoint::{CheckpointFile, ReadOptions};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::layout::ResolvedLayout;
use crate::strategy::{self, proto, ParamLayout};

pub use rules::{Axis, Rules, Split, SplitRule, StageRef, StageRule};
pub use show::{show, RankBox, ShowReport, ShowRow};

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

/// One parameter of the model: its name, full shape and (if known) element type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamInfo {
    /// Parameter name as in the checkpoint.
    pub name: String,
    /// Full (unsplit) shape.
    pub shape: Vec<u64>,
    /// Element type; used for the optimizer-shard size threshold (4 bytes when unknown).
    pub dtype: Option<DType>,
}

impl ParamInfo {
    /// A parameter of unknown element type.
    pub fn new(name: impl Into<String>, shape: Vec<u64>) -> ParamInfo {
        ParamInfo { name: name.into(), shape, dtype: None }
    }
}

/// The target layout.
#[derive(Debug, Clone)]
pub struct StrategySpec {
    /// Data-parallel size (left axis of the per-stage device matrix).
    pub dp: u32,
    /// Model-parallel size (right axis).
    pub mp: u32,
    /// Pipeline stages; each has `dp * mp` devices.
    pub pp: u32,
    /// Write optimizer-shard fields as MindSpore's `enable_parallel_optimizer` does.
    pub optimizer_shard: bool,
    /// `optimizer_weight_shard_size`: -1 (all replicas, MindSpore's default) or a size.
    pub opt_shard_size: i32,
    /// `parallel_optimizer_threshold` in KB: smaller parameters are not sharded (MindSpore: 64).
    pub opt_shard_threshold_kb: u64,
    /// Sharding and stage rules, first match wins.
    pub rules: Rules,
    /// Layers per stage, overriding MindFormers' default spreading of `layers.{i}`.
    pub layers_per_stage: Option<Vec<u32>>,
    /// The network name used in the node names of `parallel_strategy_item`.
    pub network_name: String,
}

impl StrategySpec {
    /// `dp x mp x pp` with the built-in `llama` rules, no optimizer shard.
    pub fn new(dp: u32, mp: u32, pp: u32) -> StrategySpec {
        StrategySpec {
            dp,
            mp,
            pp,
            optimizer_shard: false,
            opt_shard_size: -1,
            opt_shard_threshold_kb: 64,
            // The built-in text is covered by a unit test; an empty set would only mean no layouts.
            rules: Rules::builtin("llama").unwrap_or_default(),
            layers_per_stage: None,
            network_name: "LlamaForCausalLM".into(),
        }
    }

    /// Devices per stage.
    pub fn stage_devices(&self) -> u64 {
        u64::from(self.dp) * u64::from(self.mp)
    }

    /// The per-stage device matrix `[dp, mp]`.
    pub fn dev_matrix(&self) -> [u32; 2] {
        [self.dp, self.mp]
    }

    fn axis_size(&self, a: Axis) -> u64 {
        match a {
            Axis::Dp => u64::from(self.dp),
            Axis::Mp => u64::from(self.mp),
        }
    }

    fn validate(&self) -> Result<()> {
        if self.dp == 0 || self.mp == 0 || self.pp == 0 {
            return Err(Error::Invalid(format!(
                "dp, mp and pp must be at least 1 (dp*mp*pp >= 1); got dp {} mp {} pp {}",
                self.dp, self.mp, self.pp
            )));
        }
        if u32::try_from(self.stage_devices()).is_err()
            || self.stage_devices() * u64::from(self.pp) > u64::from(u32::MAX)
        {
            return Err(Error::Invalid(format!(
                "dp {} x mp {} x pp {} devices is too many",
                self.dp, self.mp, self.pp
            )));
        }
        if self.optimizer_shard && (self.opt_shard_size == 0 || self.opt_shard_size < -1) {
            return Err(Error::Invalid(format!(
                "optimizer shard size {} is invalid: use -1 (all replicas) or a positive size",
                self.opt_shard_size
            )));
        }
        if let Some(l) = &self.layers_per_stage {
            if l.len() != self.pp as usize {
                return Err(Error::Invalid(format!(
                    "layers per stage {l:?} gives {} stages but pp is {}",
                    l.len(),
                    self.pp
                )));
            }
        }
        Ok(())
    }
}

/// The layout chosen for one parameter.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ParamPlan {
    /// Parameter name.
    pub name: String,
    /// Full shape.
    pub shape: Vec<u64>,
    /// Per tensor dim, the device axes splitting it (outermost first); empty = not split.
    pub split: Vec<Vec<Axis>>,
    /// The stages holding it (several for a shared parameter).
    pub stages: Vec<u32>,
    /// `opt_weight_shard_step`.
    pub opt_shard_step: i32,
    /// `opt_weight_shard_size`.
    pub opt_shard_size: i32,
    /// The rule that chose the split (`file:line`).
    pub rule: String,
}

impl ParamPlan {
    /// The tensor map per dim (`[-1]` = not split), as MindSpore's parser yields it.
    pub fn tensor_map(&self) -> Vec<Vec<i32>> {
        self.split
            .iter()
            .map(|axes| if axes.is_empty() { vec![-1] } else { axes.iter().map(|a| a.map_value()).collect() })
            .collect()
    }

    /// Whether a dim is split over several axes (written as MindSpore's nested tensor map).
    pub fn nested(&self) -> bool {
        self.split.iter().any(|a| a.len() > 1)
    }

    /// The split as rule text, e.g. `[mp, 1]`.
    pub fn split_text(&self) -> String {
        Split::Dims(self.split.clone()).to_string()
    }

    /// The layout as the strategy parser yields it.
    pub fn param_layout(&self, dev: [u32; 2]) -> ParamLayout {
        ParamLayout {
            dev_matrix: dev.iter().map(|&d| u64::from(d)).collect(),
            tensor_map: self.tensor_map().into_iter().map(|v| v.into_iter().map(i64::from).collect()).collect(),
            nested: self.nested(),
            opt_shard_step: i64::from(self.opt_shard_step),
            opt_shard_size: i64::from(self.opt_shard_size),
            tensor_shape: None,
        }
    }
}

/// Why a parameter got no layout item.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Omitted {
    /// A 0-d tensor or step/learning-rate bookkeeping, as MindSpore.
    Scalar,
    /// A rule said `skip`.
    Skipped {
        /// The rule.
        rule: String,
    },
    /// No rule matched. Transforms then copy it whole to every rank (replicated in effect).
    Unmatched,
}

/// The decisions for every parameter.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Assignment {
    /// Parameters with a layout, in input order.
    pub layouts: Vec<ParamPlan>,
    /// Parameters without one, and why.
    pub omitted: Vec<(String, Omitted)>,
    /// Number of `layers.{i}` found (highest index + 1).
    pub layers: u32,
}

impl Assignment {
    /// Non-scalar parameters that matched no rule.
    pub fn unmatched(&self) -> Vec<&str> {
        self.omitted.iter().filter(|(_, o)| *o == Omitted::Unmatched).map(|(n, _)| n.as_str()).collect()
    }

    /// The layouts of one stage, sorted by name (the order of the written files).
    pub fn stage_layouts(&self, stage: u32) -> Vec<&ParamPlan> {
        let mut v: Vec<&ParamPlan> = self.layouts.iter().filter(|p| p.stages.contains(&stage)).collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }
}

/// The parameter name without an optimizer-state prefix, and whether it had one.
pub fn base_name(name: &str) -> (&str, bool) {
    for p in OPTIMIZER_PREFIXES {
        if let Some(rest) = name.strip_prefix(p) {
            return (rest, true);
        }
    }
    (name, false)
}

/// The `i` of a `layers.{i}.` (or `layer.{i}.` / `blocks.{i}.`) segment of a name.
pub fn layer_index(name: &str) -> Option<u32> {
    let segs: Vec<&str> = name.split('.').collect();
    segs.windows(2).find_map(|w| {
        (matches!(w[0], "layers" | "layer" | "blocks") && !w[1].is_empty() && w[1].bytes().all(|b| b.is_ascii_digit()))
            .then(|| w[1].parse().ok())
            .flatten()
    })
}

fn rules_path(origin: &str) -> PathBuf {
    PathBuf::from(origin)
}

/// Decides every parameter's split, stages and optimizer-shard fields, validating them.
pub fn assign(spec: &StrategySpec, params: &[ParamInfo]) -> Result<Assignment> {
    spec.validate()?;
    let mut seen = std::collections::HashSet::new();
    for p in params {
        if !seen.insert(p.name.as_str()) {
            return Err(Error::Invalid(format!("parameter '{}' appears twice in the input", p.name)));
        }
    }
    check_rules_match(spec, params)?;
    let layers =
        params.iter().filter_map(|p| layer_index(base_name(&p.name).0)).max().map_or(0, |m| m.saturating_add(1));
    let has_user_stage_rules = spec.rules.stages.iter().any(|r| r.strict);
    if spec.pp > 1 && spec.pp > layers && !(layers == 0 && has_user_stage_rules) {
        return Err(Error::Invalid(format!(
            "pp {} is larger than the number of layers ({layers}{}); use at most {} stages",
            spec.pp,
            if layers == 0 {
                ": no parameter name has a 'layers.{i}' part; assign stages with 'stage PATTERN = N' rules"
            } else {
                ", from the 'layers.{i}' parts of the names"
            },
            layers.max(1)
        )));
    }
    if let Some(l) = &spec.layers_per_stage {
        let sum: u64 = l.iter().map(|&x| u64::from(x)).sum();
        if sum != u64::from(layers) {
            return Err(Error::Invalid(format!(
                "layers per stage {l:?} add up to {sum}, but the checkpoint has {layers} layers"
            )));
        }
    }

    let mut out = Assignment { layers, ..Assignment::default() };
    // Weights first, so that optimizer states can take their weight's decisions.
    let mut decided: HashMap<String, ParamPlan> = HashMap::new();
    let order: Vec<&ParamInfo> =
        params.iter().filter(|p| !base_name(&p.name).1).chain(params.iter().filter(|p| base_name(&p.name).1)).collect();
    let mut omitted: HashMap<&str, Omitted> = HashMap::new();
    for p in order {
        let (base, is_state) = base_name(&p.name);
        if p.shape.is_empty() || BOOKKEEPING.contains(&base) {
            omitted.insert(&p.name, Omitted::Scalar);
            continue;
        }
        let Some(rule) = first_split_rule(spec, base)? else {
            omitted.insert(&p.name, Omitted::Unmatched);
            continue;
        };
        let split = choose_split(spec, rule, &p.name, &p.shape)?;
        let Some(split) = split else {
            omitted.insert(&p.name, Omitted::Skipped { rule: rule.origin.clone() });
            continue;
        };
        let stages = stages_of(spec, base, layers)?;
        let mut plan = ParamPlan {
            name: p.name.clone(),
            shape: p.shape.clone(),
            split,
            stages,
            opt_shard_step: 0,
            opt_shard_size: 0,
            rule: rule.origin.clone(),
        };
        let weight =
            if is_state { decided.get(base).filter(|w| w.split == plan.split && w.shape == plan.shape) } else { None };
        (plan.opt_shard_step, plan.opt_shard_size) = match weight {
            Some(w) => (w.opt_shard_step, w.opt_shard_size),
            None => opt_fields(spec, &plan, p.dtype),
        };
        // The same check the transform will do: every rank's box must exist.
        ResolvedLayout::new(&plan.param_layout(spec.dev_matrix()), &plan.shape, &plan.name, &rules_path(&rule.origin))?;
        decided.insert(p.name.clone(), plan);
    }
    for p in params {
        if let Some(plan) = decided.remove(&p.name) {
            out.layouts.push(plan);
        } else if let Some(o) = omitted.remove(p.name.as_str()) {
            out.omitted.push((p.name.clone(), o));
        }
    }
    if out.layouts.is_empty() {
        let unmatched = out.unmatched();
        return Err(Error::Invalid(format!(
            "no parameter got a layout: {} of {} parameters match no rule (e.g. {}); give rules with \
             --rules or a built-in set",
            unmatched.len(),
            params.len(),
            unmatched.iter().take(3).map(|n| format!("'{n}'")).collect::<Vec<_>>().join(", ")
        )));
    }
    for s in 0..spec.pp {
        if !out.layouts.iter().any(|p| p.stages.contains(&s)) {
            return Err(Error::Invalid(format!(
                "pipeline stage {s} of {} gets no parameter; MindSpore cannot merge an empty stage file \
                 (check the stage rules or --layers-per-stage)",
                spec.pp
            )));
        }
    }
    Ok(out)
}

/// Every user rule must match some parameter: a typo would otherwise silently do nothing.
fn check_rules_match(spec: &StrategySpec, params: &[ParamInfo]) -> Result<()> {
    let names: Vec<&str> = params.iter().map(|p| base_name(&p.name).0).collect();
    let check = |pattern: &pattern::Pattern, origin: &str| -> Result<()> {
        for n in &names {
            if pattern.matches(n).map_err(|e| Error::Invalid(format!("{origin}: {e}")))? {
                return Ok(());
            }
        }
        let hint = if ["adam_m", "adam_v", "accu_grads"].iter().any(|x| pattern.source.contains(x)) {
            "; rules see names without the optimizer prefixes (adam_m., adam_v., accu_grads.)"
        } else {
            ""
        };
        Err(Error::Invalid(format!(
            "{origin}: pattern '{}' matches no parameter of the checkpoint{hint}",
            pattern.source
        )))
    };
    for r in spec.rules.splits.iter().filter(|r| r.strict) {
        check(&r.pattern, &r.origin)?;
    }
    for r in spec.rules.stages.iter().filter(|r| r.strict) {
        check(&r.pattern, &r.origin)?;
    }
    Ok(())
}

fn first_split_rule<'a>(spec: &'a StrategySpec, base: &str) -> Result<Option<&'a SplitRule>> {
    for r in &spec.rules.splits {
        if r.pattern.matches(base).map_err(|e| Error::Invalid(format!("{}: {e}", r.origin)))? {
            return Ok(Some(r));
        }
    }
    Ok(None)
}

/// The first alternative of `rule` that fits `shape`; `None` for `skip`.
fn choose_split(spec: &StrategySpec, rule: &SplitRule, name: &str, shape: &[u64]) -> Result<Option<Vec<Vec<Axis>>>> {
    let mut first_err = None;
    for choice in &rule.choices {
        let dims = match choice {
            Split::Skip => return Ok(None),
            Split::Replicate => return Ok(Some(vec![Vec::new(); shape.len()])),
            Split::Dims(d) => d,
        };
        match fits(spec, dims, shape) {
            Ok(()) => return Ok(Some(dims.clone())),
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    let detail = first_err.unwrap_or_default();
    let choices: Vec<String> = rule.choices.iter().map(|c| c.to_string()).collect();
    Err(Error::BadLayout {
        path: rules_path(&rule.origin),
        param: name.to_string(),
        detail: format!("{detail} (rule '{} = {}')", rule.pattern.source, choices.join(" or ")),
    })
}

fn fits(spec: &StrategySpec, dims: &[Vec<Axis>], shape: &[u64]) -> Result<(), String> {
    if dims.len() != shape.len() {
        return Err(format!(
            "the split {} has {} entries but the parameter has {} dims (shape {shape:?})",
            Split::Dims(dims.to_vec()),
            dims.len(),
            shape.len()
        ));
    }
    for (i, (axes, &size)) in dims.iter().zip(shape).enumerate() {
        let ways: u64 = axes.iter().map(|&a| spec.axis_size(a)).product();
        if ways > 1 && size % ways != 0 {
            let by: Vec<String> = axes.iter().map(|&a| format!("{}={}", a.name(), spec.axis_size(a))).collect();
            return Err(format!("dim {i} of size {size} (shape {shape:?}) does not divide by {}", by.join("*")));
        }
    }
    Ok(())
}

fn stages_of(spec: &StrategySpec, base: &str, layers: u32) -> Result<Vec<u32>> {
    for r in &spec.rules.stages {
        if r.pattern.matches(base).map_err(|e| Error::Invalid(format!("{}: {e}", r.origin)))? {
            let mut out = Vec::new();
            for s in &r.stages {
                let n = match *s {
                    StageRef::First => 0,
                    StageRef::Last => spec.pp - 1,
                    StageRef::Num(n) if n < spec.pp => n,
                    StageRef::Num(n) => {
                        return Err(Error::Invalid(format!(
                            "{}: stage {n} for '{base}' does not exist with pp {} (stages 0..{})",
                            r.origin,
                            spec.pp,
                            spec.pp - 1
                        )))
                    }
                };
                out.push(n);
            }
            out.sort_unstable();
            out.dedup();
            return Ok(out);
        }
    }
    Ok(vec![layer_index(base).map_or(0, |i| layer_stage(spec, i, layers))])
}

/// MindFormers' `layer_compute_dtype`: `min(i // max((layers + 1) // pp, 1), pp - 1)`.
fn layer_stage(spec: &StrategySpec, i: u32, layers: u32) -> u32 {
    if let Some(per) = &spec.layers_per_stage {
        let mut end = 0u64;
        for (s, &n) in per.iter().enumerate() {
            end += u64::from(n);
            if u64::from(i) < end {
                return s as u32;
            }
        }
        return spec.pp - 1;
    }
    let per = (layers.saturating_add(1) / spec.pp).max(1);
    (i / per).min(spec.pp - 1)
}

/// `(opt_weight_shard_step, opt_weight_shard_size)` as MindSpore saves them.
fn opt_fields(spec: &StrategySpec, plan: &ParamPlan, dtype: Option<DType>) -> (i32, i32) {
    if !spec.optimizer_shard || plan.stages.len() > 1 || plan.shape.is_empty() {
        return (0, 0);
    }
    // OptParamMgr::SplitParam: parameters under the threshold (KB, full size) are not sharded.
    let numel: u64 = plan.shape.iter().product();
    let bytes = numel as f64 * dtype.map_or(4, DType::size) as f64;
    if bytes / 1024.0 < spec.opt_shard_threshold_kb as f64 {
        return (0, 0);
    }
    let dev = spec.dev_matrix();
    let n = dev.len();
    let mapped: Vec<usize> =
        plan.tensor_map().iter().flatten().filter(|&&m| m >= 0).map(|&m| n - 1 - m as usize).collect();
    let unmapped: Vec<usize> = (0..n).filter(|i| !mapped.contains(i)).collect();
    let replicas: u64 = unmapped.iter().map(|&i| u64::from(dev[i])).product();
    if replicas <= 1 {
        return (0, 0); // "The dev size is 1, no need to create group"
    }
    let size = i64::from(spec.opt_shard_size);
    let eff = if size == -1 { replicas } else { size as u64 };
    if size != -1 && replicas % eff != 0 {
        return (0, 0); // "optimizer_weight_shard_size can not be applied"
    }
    let strategy0: u64 = plan.split[0].iter().map(|&a| spec.axis_size(a)).product();
    if plan.shape[0] % (strategy0 * eff) != 0 {
        return (0, 0); // "Tensor could not be shard on the first dimension"
    }
    // step = (last - first) / (count - 1) over the ranks that differ only on replicated axes.
    let stride = |i: usize| -> u64 { dev[i + 1..].iter().map(|&d| u64::from(d)).product() };
    let last: u64 = unmapped.iter().map(|&i| (u64::from(dev[i]) - 1) * stride(i)).sum();
    let step = last / (replicas - 1);
    (i32::try_from(step).unwrap_or(i32::MAX), spec.opt_shard_size)
}

/// The node items of a stage: one per (non-optimizer) parameter, named as MindSpore names
/// operators, each carrying the stage. MindSpore's tools only read the stage from them.
fn strategy_items(spec: &StrategySpec, stage: u32, plans: &[&ParamPlan]) -> Vec<(String, Vec<Vec<u32>>)> {
    let weights: Vec<&&ParamPlan> = plans.iter().filter(|p| !base_name(&p.name).1).collect();
    let chosen: Vec<&&ParamPlan> = if weights.is_empty() { plans.iter().collect() } else { weights };
    chosen
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let st: Vec<u32> =
                p.split.iter().map(|axes| axes.iter().map(|&a| spec.axis_size(a) as u32).product()).collect();
            let op = if p.name.contains("embedding") {
                "Gather"
            } else if p.shape.len() == 1 {
                "Mul"
            } else {
                "MatMul"
            };
            let scope = p.name.rsplit_once('.').map_or(p.name.as_str(), |(a, _)| a);
            let node = format!(
                "Default/network-{}/{}/{op}-op{}",
                spec.network_name,
                scope.replace('.', "-"),
                100 * stage as usize + i
            );
            let mut input = vec![spec.dp];
            input.resize(st.len().max(1), 1);
            (node, vec![input, st])
        })
        .collect()
}

/// The protobuf strategy of each stage, as MindSpore writes `ckpt_strategy_rank_{r}.ckpt`.
pub fn stage_maps(spec: &StrategySpec, a: &Assignment) -> Vec<(u32, proto::ParallelStrategyMap)> {
    let dev = spec.dev_matrix();
    (0..spec.pp)
        .map(|stage| {
            let plans = a.stage_layouts(stage);
            let mut m = proto::ParallelStrategyMap { current_stage: 1, ..Default::default() };
            for (node, strategies) in strategy_items(spec, stage, &plans) {
                m.parallel_strategy_item.push(proto::ParallelStrategyItem {
                    node_name: node,
                    parallel_strategys: proto::ParallelStrategys {
                        stage,
                        parallel_strategy: strategies.into_iter().map(|dim| proto::ParallelStrategy { dim }).collect(),
                    },
                });
            }
            m.parallel_strategy_item.sort_by(|x, y| x.node_name.cmp(&y.node_name));
            for p in plans {
                let tm = p.tensor_map();
                let tensor_map = if p.nested() {
                    let mut v: Vec<proto::TensorMap> = tm.into_iter().map(|dim| proto::TensorMap { dim }).collect();
                    if v.len() == 1 {
                        // MindSpore's layout path adds an empty map for 1-D tensors
                        v.push(proto::TensorMap::default());
                    }
                    v
                } else {
                    vec![proto::TensorMap { dim: tm.into_iter().flatten().collect() }]
                };
                m.parallel_layout_item.push(proto::ParallelLayoutItem {
                    param_name: p.name.clone(),
                    parallel_layouts: proto::ParallelLayouts {
                        dev_matrix: vec![proto::DevMatrix { dim: dev.to_vec() }],
                        tensor_map,
                        param_split_shape: vec![proto::ParamSplitShape::default()],
                        indices_offset: vec![proto::IndicesOffset::default()],
                        field: 0,
                        opt_weight_shard_step: p.opt_shard_step,
                        opt_weight_shard_size: p.opt_shard_size,
                    },
                });
            }
            (stage, m)
        })
        .collect()
}

/// The JSON strategy of one stage (MindSpore's JSON form, with `tensor_shape`).
pub fn stage_json(spec: &StrategySpec, a: &Assignment, stage: u32) -> Result<Value> {
    let plans = a.stage_layouts(stage);
    let mut items = Map::new();
    let mut nodes = strategy_items(spec, stage, &plans);
    nodes.sort_by(|x, y| x.0.cmp(&y.0));
    for (node, strategies) in nodes {
        items.insert(node, serde_json::json!({"stage": stage, "parallel_strategy": strategies}));
    }
    let mut layouts = Map::new();
    for p in plans {
        if p.nested() {
            return Err(Error::BadLayout {
                path: rules_path(&p.rule),
                param: p.name.clone(),
                detail: format!(
                    "the split {} puts several axes on one dim, which MindSpore's JSON strategy reader \
                     cannot express; write protobuf files (without --json)",
                    p.split_text()
                ),
            });
        }
        let tm: Vec<i32> = p.tensor_map().into_iter().flatten().collect();
        layouts.insert(
            p.name.clone(),
            serde_json::json!({
                "dev_matrix": spec.dev_matrix(),
                "tensor_map": tm,
                "tensor_shape": p.shape,
                "field": 0,
                "opt_weight_shard_step": p.opt_shard_step,
                "opt_weight_shard_size": p.opt_shard_size,
            }),
        );
    }
    let mut obj = Map::new();
    obj.insert("current_stage".into(), Value::from(1));
    obj.insert("parallel_strategy_item".into(), Value::Object(items));
    obj.insert("parallel_layout_item".into(), Value::Object(layouts));
    Ok(Value::Object(obj))
}

/// Per-stage strategy maps for `params` (name, full shape), as MindSpore writes them.
pub fn generate(spec: &StrategySpec, params: &[(String, Vec<u64>)]) -> Result<Vec<(u32, proto::ParallelStrategyMap)>> {
    let infos: Vec<ParamInfo> = params.iter().map(|(n, s)| ParamInfo::new(n.clone(), s.clone())).collect();
    let a = assign(spec, &infos)?;
    Ok(stage_maps(spec, &a))
}

/// The file name MindSpore gives the strategy of `stage`: `ckpt_strategy_rank_{first rank}`.
pub fn stage_file_name(spec: &StrategySpec, stage: u32, json: bool) -> String {
    let first = u64::from(stage) * spec.stage_devices();
    format!("ckpt_strategy_rank_{first}.{}", if json { "json" } else { "ckpt" })
}

/// The name of the merged file (MindFormers': inside the strategy folder).
pub fn merged_file_name(json: bool) -> String {
    format!("merged_ckpt_strategy.{}", if json { "json" } else { "ckpt" })
}

/// All settings of `reshard strategy new`, deserialisable from JSON for the C ABI
/// (`reshard_strategy_new(options_json, ...)`): `{"from", "dp", "mp", "pp", "optimizer_shard",
/// "opt_shard_size", "opt_shard_threshold_kb", "rules" (file), "rules_text", "preset",
/// "layers_per_stage", "out", "json"}`; only `from`, `dp`, `mp` and `out` are required.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct NewOptions {
    /// Complete checkpoint (see [`complete_checkpoint`]).
    pub from: PathBuf,
    /// Data-parallel size.
    pub dp: u32,
    /// Model-parallel size.
    pub mp: u32,
    /// Pipeline stages.
    #[serde(default = "default_pp")]
    pub pp: u32,
    /// Write optimizer-shard fields.
    #[serde(default)]
    pub optimizer_shard: bool,
    /// `optimizer_weight_shard_size` (-1 = all replicas).
    #[serde(default = "default_opt_size")]
    pub opt_shard_size: i32,
    /// `parallel_optimizer_threshold` in KB.
    #[serde(default = "default_threshold")]
    pub opt_shard_threshold_kb: u64,
    /// A rules file, tried before the preset.
    #[serde(default)]
    pub rules: Option<PathBuf>,
    /// Rules text, tried before the rules file.
    #[serde(default)]
    pub rules_text: Option<String>,
    /// Built-in rule set after the user rules (`llama`, `llama-vocab-dp`, or `none`).
    #[serde(default = "default_preset")]
    pub preset: String,
    /// Layers per stage instead of MindFormers' spreading.
    #[serde(default)]
    pub layers_per_stage: Option<Vec<u32>>,
    /// Output folder.
    pub out: PathBuf,
    /// Write JSON strategy files.
    #[serde(default)]
    pub json: bool,
}

fn default_pp() -> u32 {
    1
}
fn default_opt_size() -> i32 {
    -1
}
fn default_threshold() -> u64 {
    64
}
fn default_preset() -> String {
    "llama".into()
}

impl NewOptions {
    /// Parses the JSON form.
    pub fn from_json(text: &str) -> Result<NewOptions> {
        serde_json::from_str(text).map_err(|e| Error::Invalid(format!("bad strategy-new options: {e}")))
    }

    /// The rules: inline text, then the file, then the preset.
    pub fn rules(&self) -> Result<Rules> {
        let mut all = Rules::new();
        if let Some(t) = &self.rules_text {
            all.extend(Rules::parse(t, "rules_text", true)?);
        }
        if let Some(f) = &self.rules {
            let text = std::fs::read_to_string(f).map_err(|e| Error::io(f, "read", e))?;
            all.extend(Rules::parse(&text, &f.display().to_string(), true)?);
        }
        if self.preset != "none" {
            all.extend(Rules::builtin(&self.preset)?);
        }
        Ok(all)
    }

    /// The layout to make.
    pub fn spec(&self) -> Result<StrategySpec> {
        let mut spec = StrategySpec::new(self.dp, self.mp, self.pp);
        spec.rules = self.rules()?;
        spec.optimizer_shard = self.optimizer_shard;
        spec.opt_shard_size = self.opt_shard_size;
        spec.opt_shard_threshold_kb = self.opt_shard_threshold_kb;
        spec.layers_per_stage = self.layers_per_stage.clone();
        Ok(spec)
    }

    /// Reads the checkpoint and writes the strategy files.
    pub fn run(&self) -> Result<Written> {
        let spec = self.spec()?;
        let params = read_params(&self.from)?;
        write(&spec, &params, &self.out, self.json)
    }
}

/// What [`write()`] wrote.
#[derive(Debug, Clone)]
pub struct Written {
    /// One file per stage, in stage order.
    pub stage_files: Vec<PathBuf>,
    /// The merged file.
    pub merged: PathBuf,
    /// The decisions.
    pub assignment: Assignment,
}

fn json_bytes(v: &Value) -> Result<Vec<u8>> {
    use serde::Serialize;
    let mut out = Vec::new();
    let fmt = serde_json::ser::PrettyFormatter::with_indent(b" ");
    let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
    v.serialize(&mut ser).map_err(|e| Error::Invalid(format!("cannot serialise the strategy: {e}")))?;
    out.push(b'\n');
    Ok(out)
}

/// Writes `out_dir/ckpt_strategy_rank_{r}.ckpt` per stage (`.json` with `json`) and
/// `out_dir/merged_ckpt_strategy.ckpt`, merged as MindSpore's `merge_pipeline_strategys`.
///
/// The folder may not hold other strategy files: MindSpore, MindFormers and reshard merge every
/// `*.ckpt`/`*.json` of a strategy folder, so stale files would join the layout.
pub fn write(spec: &StrategySpec, params: &[ParamInfo], out_dir: &Path, json: bool) -> Result<Written> {
    let a = assign(spec, params)?;
    let stage_names: Vec<String> = (0..spec.pp).map(|s| stage_file_name(spec, s, json)).collect();
    let merged_name = merged_file_name(json);
    let mut contents = Vec::new();
    if json {
        for s in 0..spec.pp {
            contents.push(json_bytes(&stage_json(spec, &a, s)?)?);
        }
    } else {
        for (_, m) in stage_maps(spec, &a) {
            contents.push(prost::Message::encode_to_vec(&m));
        }
    }
    std::fs::create_dir_all(out_dir).map_err(|e| Error::io(out_dir, "create folder", e))?;
    let rd = std::fs::read_dir(out_dir).map_err(|e| Error::io(out_dir, "read folder", e))?;
    let mut stale = Vec::new();
    for e in rd {
        let e = e.map_err(|e| Error::io(out_dir, "read folder", e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let is_strategy = name.ends_with(".ckpt") || name.ends_with(".json");
        if is_strategy && !stage_names.contains(&name) && name != merged_name {
            stale.push(name);
        }
    }
    if !stale.is_empty() {
        stale.sort();
        return Err(Error::Source {
            path: out_dir.to_path_buf(),
            detail: format!(
                "the folder already holds other strategy files ({}); MindSpore and reshard merge every \
                 strategy file of a folder, so write into an empty folder",
                stale.join(", ")
            ),
        });
    }
    let mut stage_files = Vec::new();
    for (name, bytes) in stage_names.iter().zip(&contents) {
        let p = out_dir.join(name);
        // The temporary name (`.{name}.reshard-{pid}-{n}.tmp`) does not end in .ckpt/.json, so a
        // folder merge running meanwhile never sees a half-written file.
        write_atomic(&p, bytes, true)?;
        stage_files.push(p);
    }
    let merged = strategy::merge_files(&stage_files, json)?;
    let merged_path = out_dir.join(&merged_name);
    write_atomic(&merged_path, &merged.to_bytes(), true)?;
    Ok(Written { stage_files, merged: merged_path, assignment: a })
}

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
        .map(|t| ParamInfo { name: t.name.clone(), shape: t.shape.clone(), dtype: Some(t.dtype) })
        .collect())
}

/// Full shapes by name, for [`show`].
pub fn shapes_of(params: &[ParamInfo]) -> BTreeMap<String, Vec<u64>> {
    params.iter().map(|p| (p.name.clone(), p.shape.clone())).collect()
}

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
