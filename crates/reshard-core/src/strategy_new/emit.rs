//! Writing what was assigned as MindSpore writes it: per-stage maps and JSON, file names, and the
//! files themselves (`write`).

#![allow(unused_imports)] // one import list for the split files of strategy_new
use super::*;

/// `(opt_weight_shard_step, opt_weight_shard_size)` as MindSpore saves them.
pub(super) fn opt_fields(spec: &StrategySpec, plan: &ParamPlan, dtype: Option<DType>) -> (i32, i32) {
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
pub(super) fn strategy_items(spec: &StrategySpec, stage: u32, plans: &[&ParamPlan]) -> Vec<(String, Vec<Vec<u32>>)> {
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

pub(super) fn json_bytes(v: &Value) -> Result<Vec<u8>> {
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
