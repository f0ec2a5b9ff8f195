//! A readable view of a strategy: per parameter, its split, stage, each rank's slice and how
//! many ranks hold the same slice.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::error::Result;
use crate::layout::{effective_opt_size, tensor_strategy, ResolvedLayout};
use crate::region::Region;
use crate::strategy::{ParamLayout, Strategy};

/// The ranks holding one slice.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RankBox {
    /// Global ranks (stage * devices per stage + local rank).
    pub ranks: Vec<u64>,
    /// Offset of the slice in the full tensor.
    pub offset: Vec<u64>,
    /// Shape of the slice.
    pub shape: Vec<u64>,
}

/// One layout item of one parameter.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ShowRow {
    /// Parameter name.
    pub name: String,
    /// Pipeline stage.
    pub stage: u32,
    /// The split per dim, e.g. `[mp(2), 1]` (axis names assume a `[dp, mp]` device matrix).
    pub split: String,
    /// Device matrix.
    pub dev_matrix: Vec<u64>,
    /// Tensor map per dim.
    pub tensor_map: Vec<Vec<i64>>,
    /// How many ways each dim is split by the tensor map.
    pub ways: Vec<u64>,
    /// `opt_weight_shard_step`.
    pub opt_shard_step: i64,
    /// `opt_weight_shard_size` (-1 = all replicas).
    pub opt_shard_size: i64,
    /// Full shape, when known.
    pub shape: Option<Vec<u64>>,
    /// The slice each rank stores, when all slices have one shape.
    pub slice_shape: Option<Vec<u64>>,
    /// How many ranks hold each slice, when it is the same for all slices.
    pub replicas: Option<u64>,
    /// Every distinct slice with its ranks (empty without a shape).
    pub boxes: Vec<RankBox>,
    /// Why the shape does not fit the layout, if it does not.
    pub error: Option<String>,
    /// The layout may be in MindSpore's flattened JSON form (see [`ParamLayout::is_flattened`])
    /// and no checkpoint shape was given to undo it: `shape`, `slice_shape` and `boxes` are
    /// then those of the flattened dims, not the tensor's.
    pub maybe_flattened: bool,
}

/// The whole strategy.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ShowReport {
    /// Pipeline stages.
    pub stages: u32,
    /// Devices per stage.
    pub stage_devices: u64,
    /// One row per layout item.
    pub rows: Vec<ShowRow>,
    /// Notes on how to read the rows (flattened JSON layouts).
    pub notes: Vec<String>,
}

fn axis_label(dev_len: usize, k: i64) -> String {
    match (dev_len, k) {
        (2, 0) => "mp".into(),
        (2, 1) => "dp".into(),
        _ => format!("axis{k}"),
    }
}

fn split_text(l: &ParamLayout) -> String {
    let n = l.dev_matrix.len() as i64;
    let parts: Vec<String> = l
        .tensor_map
        .iter()
        .map(|axes| {
            let used: Vec<i64> = axes.iter().copied().filter(|&a| a >= 0 && a < n).collect();
            if used.is_empty() {
                return "1".to_string();
            }
            used.iter()
                .map(|&a| {
                    let size = l.dev_matrix[(n - 1 - a) as usize];
                    format!("{}({size})", axis_label(l.dev_matrix.len(), a))
                })
                .collect::<Vec<_>>()
                .join("*")
        })
        .collect();
    format!("[{}]", parts.join(", "))
}

/// Describes `strategy`. Full shapes come from the file (`tensor_shape` of JSON strategies) or
/// from `shapes` (e.g. a complete checkpoint); optimizer states without their own entry use
/// their parameter's. Without a shape a row has the split only.
pub fn show(strategy: &Strategy, shapes: Option<&BTreeMap<String, Vec<u64>>>) -> Result<ShowReport> {
    let stage_devices = strategy.stage_device_num()?;
    let stages = strategy.stage_num()?;
    let mut rows = Vec::new();
    for (name, items) in strategy.params() {
        for item in items {
            let given = shapes.and_then(|s| s.get(name).or_else(|| s.get(super::base_name(name).0)));
            // MindSpore's JSON writer lists a dim split over several device axes as one dim per
            // axis: with the checkpoint's shape that is undone, as a transform does.
            let unflattened = match given {
                Some(full) if item.layout.is_flattened(full.len()) => {
                    let what = format!("the checkpoint's shape {full:?}");
                    Some(item.layout.unflatten(full.len(), &what, |j, prod, _| prod == full[j]))
                }
                _ => None,
            };
            let l = match &unflattened {
                Some(Ok(n)) => n,
                _ => &item.layout,
            };
            let shape = match &unflattened {
                Some(_) => given.cloned(),
                None => l.tensor_shape.clone().or_else(|| given.cloned()),
            };
            let mut row = ShowRow {
                name: name.to_string(),
                stage: item.stage,
                split: split_text(l),
                dev_matrix: l.dev_matrix.clone(),
                tensor_map: l.tensor_map.clone(),
                ways: tensor_strategy(&l.dev_matrix, &l.tensor_map),
                opt_shard_step: l.opt_shard_step,
                opt_shard_size: l.opt_shard_size,
                shape: shape.clone(),
                slice_shape: None,
                replicas: None,
                boxes: Vec::new(),
                error: None,
                maybe_flattened: given.is_none() && maybe_flattened(l),
            };
            if let Some(Err(e)) = &unflattened {
                row.error = Some(format!("{}: parameter '{name}': {e}", strategy.path.display()));
            } else if let Some(full) = &shape {
                match ResolvedLayout::new(l, full, name, &strategy.path) {
                    Err(e) => row.error = Some(e.to_string()),
                    Ok(r) => {
                        let base = u64::from(item.stage) * stage_devices;
                        let mut by_box: Vec<(Region, Vec<u64>)> = Vec::new();
                        for local in 0..l.device_num() {
                            let b = r.rank_box(local);
                            match by_box.iter_mut().find(|(x, _)| *x == b) {
                                Some((_, ranks)) => ranks.push(base + local),
                                None => by_box.push((b, vec![base + local])),
                            }
                        }
                        let first_shape = by_box.first().map(|(b, _)| b.shape.clone());
                        if by_box.iter().all(|(b, _)| Some(&b.shape) == first_shape.as_ref()) {
                            row.slice_shape = first_shape;
                        }
                        let first_count = by_box.first().map(|(_, r)| r.len() as u64);
                        if by_box.iter().all(|(_, r)| Some(r.len() as u64) == first_count) {
                            row.replicas = first_count;
                        }
                        row.boxes = by_box
                            .into_iter()
                            .map(|(b, ranks)| RankBox { ranks, offset: b.offset, shape: b.shape })
                            .collect();
                    }
                }
            }
            rows.push(row);
        }
    }
    let mut flat: Vec<&str> = rows.iter().filter(|r| r.maybe_flattened).map(|r| r.name.as_str()).collect();
    flat.dedup();
    let mut notes = Vec::new();
    if !flat.is_empty() {
        const MAX: usize = 8;
        let more = flat.len().saturating_sub(MAX);
        notes.push(format!(
            "{} parameter(s) may be in the flattened form of MindSpore's JSON strategy writer, which lists a dim \
             split over several device axes as one dim per axis (a [32, 64] weight with dim 1 over axes (1, 0) is \
             written tensor_shape [32, 2, 32], tensor_map [-1, 1, 0]): {}{}. Their shape, split and slice above are \
             the file's flattened dims, not the tensor's; give --from CKPT (a complete checkpoint) to see them merged \
             back into the tensor's dims, as a transform does",
            flat.len(),
            flat[..flat.len().min(MAX)].join(", "),
            if more > 0 { format!(", ... ({more} more)") } else { String::new() }
        ));
    }
    Ok(ShowReport { stages, stage_devices, rows, notes })
}

/// Whether a layout may be MindSpore's flattened JSON form: it comes with a `tensor_shape` (JSON)
/// and two neighbouring dims are both split, which is what a dim split over several device axes
/// becomes in that form. (A real tensor may have such a layout too: only the checkpoint's shape
/// tells.)
fn maybe_flattened(l: &ParamLayout) -> bool {
    let split = |axes: &Vec<i64>| axes.len() == 1 && axes[0] >= 0;
    !l.nested
        && l.tensor_shape.as_ref().is_some_and(|ts| ts.len() == l.tensor_map.len())
        && l.tensor_map.windows(2).any(|w| split(&w[0]) && split(&w[1]))
}

fn dims(v: &[u64]) -> String {
    let s: Vec<String> = v.iter().map(u64::to_string).collect();
    format!("[{}]", s.join(", "))
}

impl ShowReport {
    /// A table: name, stage, split, optimizer shard, full shape, slice shape, replicas.
    pub fn to_text(&self) -> String {
        let header = ["name", "stage", "split", "opt shard", "shape", "slice", "replicas"];
        let mut table: Vec<[String; 7]> = Vec::new();
        for r in &self.rows {
            let opt = if r.opt_shard_size == 0 || r.opt_shard_step == 0 {
                "-".to_string()
            } else {
                let l = ParamLayout {
                    dev_matrix: r.dev_matrix.clone(),
                    tensor_map: r.tensor_map.clone(),
                    nested: false,
                    opt_shard_step: r.opt_shard_step,
                    opt_shard_size: r.opt_shard_size,
                    tensor_shape: None,
                };
                let eff = effective_opt_size(&l);
                if r.opt_shard_size == -1 {
                    format!("{eff} (size -1, step {})", r.opt_shard_step)
                } else {
                    format!("{eff} (step {})", r.opt_shard_step)
                }
            };
            let (slice, replicas) = match (&r.error, &r.shape) {
                (Some(_), _) => ("does not fit".to_string(), String::new()),
                (None, None) => ("?".to_string(), String::new()),
                (None, Some(_)) => (
                    r.slice_shape.as_deref().map_or("(varies)".into(), dims),
                    r.replicas.map_or("(varies)".into(), |x| x.to_string()),
                ),
            };
            table.push([
                r.name.clone(),
                r.stage.to_string(),
                r.split.clone(),
                opt,
                r.shape.as_deref().map_or("?".into(), dims),
                slice,
                replicas,
            ]);
        }
        let mut width = header.map(str::len);
        for row in &table {
            for (w, c) in width.iter_mut().zip(row) {
                *w = (*w).max(c.chars().count());
            }
        }
        let mut out = format!(
            "{} stage(s) x {} devices = {} ranks\n",
            self.stages,
            self.stage_devices,
            u64::from(self.stages) * self.stage_devices
        );
        let line = |cells: &[String]| -> String {
            let mut s = String::new();
            for (i, c) in cells.iter().enumerate() {
                let pad = width[i].saturating_sub(c.chars().count());
                if i == 1 || i == 6 {
                    s.push_str(&" ".repeat(pad));
                    s.push_str(c);
                } else {
                    s.push_str(c);
                    if i + 1 < cells.len() {
                        s.push_str(&" ".repeat(pad));
                    }
                }
                if i + 1 < cells.len() {
                    s.push_str("  ");
                }
            }
            s.trim_end().to_string() + "\n"
        };
        out.push_str(&line(&header.map(String::from)));
        for row in &table {
            out.push_str(&line(row));
        }
        for r in self.rows.iter().filter(|r| r.error.is_some()) {
            out.push_str(&format!("error: {}\n", r.error.as_deref().unwrap_or_default()));
        }
        for n in &self.notes {
            out.push_str(&format!("note: {n}\n"));
        }
        out
    }

    /// The report as JSON.
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }
}
