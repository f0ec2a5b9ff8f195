//! Plan summaries for people and for JSON consumers.

use serde_json::{json, Value};

use crate::error::Result;
use crate::execute::{output_path, ExecuteOptions};
use crate::plan::{Plan, RankPlan, TensorSource};

/// The file of source rank `rank` that holds tensor `name` (the rank's first file when none
/// does).
fn src_file<'a>(plan: &'a Plan, rank: u32, name: &str) -> (u32, &'a std::path::Path) {
    match plan.sources.get(&rank) {
        Some(s) => (s.index.get(name).map_or(0, |t| t.file), s.path_of(name)),
        None => (0, std::path::Path::new("")),
    }
}

/// Content bytes read from each file, by (source rank, file index): which file each slice comes
/// from, for sources of several files per rank.
fn bytes_read_by_file(plan: &Plan, rp: &RankPlan) -> std::collections::BTreeMap<(u32, u32), u64> {
    let mut m = std::collections::BTreeMap::new();
    for t in &rp.tensors {
        match &t.source {
            TensorSource::Raw { src_rank } => {
                *m.entry((*src_rank, src_file(plan, *src_rank, &t.name).0)).or_insert(0) += t.nbytes
            }
            TensorSource::Pieces { pieces, .. } => {
                for p in pieces {
                    let k = (p.src_rank, src_file(plan, p.src_rank, &t.name).0);
                    *m.entry(k).or_insert(0) += p.region.numel() * t.dtype.size();
                }
            }
        }
    }
    m
}

/// What the rank reads from each source rank: (source rank, bytes, each file read with its
/// bytes). Several files for a rank of several files: a unified or index folder, a map in a
/// rank folder.
type SourceRead<'a> = (u32, u64, Vec<(&'a std::path::Path, u64)>);

/// [`SourceRead`] for every source rank the rank reads, in rank order.
fn sources_read<'a>(plan: &'a Plan, rp: &RankPlan) -> Vec<SourceRead<'a>> {
    let by_file = bytes_read_by_file(plan, rp);
    let file = |s: u32, f: u32| plan.sources[&s].files[f as usize].path.as_path();
    rp.bytes_read()
        .into_iter()
        .map(|(s, b)| (s, b, by_file.range((s, 0)..=(s, u32::MAX)).map(|(&(_, f), &fb)| (file(s, f), fb)).collect()))
        .collect()
}

/// The rank plan's tensors as JSON, each copy piece (and raw copy) with the file it reads.
fn tensors_json(plan: &Plan, rp: &RankPlan) -> Value {
    let mut v = serde_json::to_value(&rp.tensors).unwrap_or(Value::Null);
    if let Value::Array(ts) = &mut v {
        for (tv, t) in ts.iter_mut().zip(&rp.tensors) {
            match &t.source {
                TensorSource::Raw { src_rank } => {
                    tv["source"]["src_file"] = json!(src_file(plan, *src_rank, &t.name).1);
                }
                TensorSource::Pieces { pieces, .. } => {
                    if let Some(Value::Array(pv)) = tv["source"].get_mut("pieces") {
                        for (p, piece) in pv.iter_mut().zip(pieces) {
                            p["src_file"] = json!(src_file(plan, piece.src_rank, &t.name).1);
                        }
                    }
                }
            }
        }
    }
    v
}

/// A JSON summary of the plan: per destination rank, the source files and bytes it reads and the
/// bytes it writes. With `detail`, every tensor and copy piece too.
pub fn plan_json(plan: &Plan, dst_dir: &std::path::Path, opts: &ExecuteOptions, detail: bool) -> Result<Value> {
    use rayon::prelude::*;
    let ranks: Vec<Value> = (0..plan.dst_rank_count())
        .into_par_iter()
        .map(|r| -> Result<Value> {
            let rp = plan.rank_plan(r)?;
            let sources: Vec<Value> = sources_read(plan, &rp)
                .into_iter()
                .map(|(s, b, files)| {
                    let files: Vec<Value> = files.iter().map(|(p, fb)| json!({"path": p, "bytes": fb})).collect();
                    json!({"rank": s, "path": plan.sources[&s].path(), "bytes": b, "files": files})
                })
                .collect();
            let fetched: u64 = rp.bytes_read().values().sum();
            let mut v = json!({
                "rank": r,
                "bytes_fetched": fetched,
                "stage": rp.stage,
                "output": output_path(plan, dst_dir, r, opts),
                "tensors": rp.tensors.len(),
                "bytes_written": rp.bytes_written(),
                "sources": sources,
            });
            if detail {
                v["plan"] = tensors_json(plan, &rp);
            }
            Ok(v)
        })
        .collect::<Result<_>>()?;
    Ok(json!({
        "src_dir": plan.src_dir,
        "src_format": plan.src_format,
        "src_ranks": plan.src_rank_count(),
        "src_stage_devices": plan.src_stage_devices,
        "src_stages": plan.src_stages,
        "dst_ranks": plan.dst_rank_count(),
        "dst_stage_devices": plan.dst_stage_devices,
        "dst_stages": plan.dst_stages,
        "warnings": plan.warnings,
        "ranks": ranks,
    }))
}

/// A readable table of the same summary.
pub fn plan_text(plan: &Plan, dst_dir: &std::path::Path, opts: &ExecuteOptions) -> Result<String> {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "source: {} rank(s) ({} stage(s) x {} devices), destination: {} rank(s) ({} stage(s) x {} devices)",
        plan.src_rank_count(),
        plan.src_stages,
        plan.src_stage_devices,
        plan.dst_rank_count(),
        plan.dst_stages,
        plan.dst_stage_devices
    );
    let _ = writeln!(
        out,
        "{:>6} {:>6} {:>8} {:>14}  sources read (rank: bytes)",
        "rank", "stage", "tensors", "bytes written"
    );
    for r in 0..plan.dst_rank_count() {
        let rp = plan.rank_plan(r)?;
        let reads: Vec<String> = sources_read(plan, &rp)
            .into_iter()
            .map(|(s, b, files)| {
                let files: Vec<String> = files
                    .iter()
                    .map(|(p, fb)| {
                        let name =
                            p.file_name().map_or_else(|| p.display().to_string(), |n| n.to_string_lossy().into());
                        format!("{name} {fb}")
                    })
                    .collect();
                if plan.sources[&s].files.len() > 1 {
                    format!("{s}: {b} ({})", files.join(", "))
                } else {
                    format!("{s}: {b}")
                }
            })
            .collect();
        let _ = writeln!(
            out,
            "{:>6} {:>6} {:>8} {:>14}  {}\n{:>39}<- {}",
            r,
            rp.stage,
            rp.tensors.len(),
            rp.bytes_written(),
            output_path(plan, dst_dir, r, opts).display(),
            "",
            reads.join(", ")
        );
    }
    if crate::storage::is_url(&plan.src_dir) {
        // From an object store each destination rank fetches exactly its runs (ranged GETs),
        // not whole objects: its share of the sources.
        let total: u64 = plan.sources.values().map(|s| s.index.file_len).sum();
        let _ = writeln!(
            out,
            "object store: the sources hold {total} bytes; tables of contents fetched while planning: {} bytes",
            crate::storage::bytes_fetched()
        );
        for r in 0..plan.dst_rank_count() {
            let fetched: u64 = plan.rank_plan(r)?.bytes_read().values().sum();
            let share = if total == 0 { 0.0 } else { 100.0 * fetched as f64 / total as f64 };
            let _ = writeln!(out, "  rank {r}: fetches {fetched} bytes ({share:.1}% of the sources)");
        }
    }
    for w in &plan.warnings {
        let _ = writeln!(out, "warning: {w}");
    }
    Ok(out)
}
