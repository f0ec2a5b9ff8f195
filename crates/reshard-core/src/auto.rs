//! Automatic transform at start-up: each rank's process calls [`auto`] before loading weights.
//! It finds what the user pointed `load_checkpoint` at, waits for the strategy files the
//! runtime writes, merges pipeline stages, and converts exactly this rank's checkpoint into
//! `output/transformed_checkpoint/rank_{r}/`. Processes coordinate only through files: every
//! output appears atomically, so W processes on one or several machines sharing a filesystem
//! need nothing else.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use crate::atomic::write_atomic;
use crate::checkpoint::Format;
use crate::error::{Error, Result};
use crate::execute::{execute, ExecuteOptions};
use crate::plan::{Plan, PlanOptions};
use crate::source::{discover, epoch_step, SourceSet};
use crate::strategy::{self, Strategy};

/// Settings of an automatic transform (the JSON keys of `reshard_auto` have the same names).
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AutoOptions {
    /// A folder with `rank_*` subfolders (distributed), a folder with only `rank_0` or loose
    /// checkpoint files, or one checkpoint file (complete).
    pub load_checkpoint: PathBuf,
    /// Source strategy of a distributed checkpoint: a merged file, one stage's file, or a folder.
    pub src_strategy_path_or_dir: Option<PathBuf>,
    /// The run's output folder.
    pub output_dir: PathBuf,
    /// Where the runtime writes `ckpt_strategy_rank_{r}.ckpt` (default `output_dir/strategy`).
    pub dst_strategy_dir: Option<PathBuf>,
    /// This process's rank (default: from the environment).
    pub rank: Option<u32>,
    /// Number of ranks (default: from the environment).
    pub world_size: Option<u32>,
    /// Output file prefix.
    pub prefix: String,
    /// Output format: "ckpt" or "safetensors".
    pub output_format: String,
    /// Seconds to wait for the other ranks' strategy files.
    pub timeout: u64,
    /// Worker threads (0 = all cores).
    pub threads: usize,
    /// How source files are read.
    #[serde(default)]
    pub io: crate::storage::IoMode,
    /// Set it to stop: the wait for strategy files ends and the transform stops as with
    /// `ExecuteOptions::cancel` ([`Error::Cancelled`]). Not a JSON key.
    #[serde(skip)]
    pub cancel: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

impl Default for AutoOptions {
    fn default() -> Self {
        AutoOptions {
            load_checkpoint: PathBuf::new(),
            src_strategy_path_or_dir: None,
            output_dir: PathBuf::from("output"),
            dst_strategy_dir: None,
            rank: None,
            world_size: None,
            prefix: "checkpoint_".into(),
            output_format: "ckpt".into(),
            timeout: 600,
            threads: 0,
            io: crate::storage::IoMode::Auto,
            cancel: None,
        }
    }
}

/// What an automatic transform did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AutoResult {
    /// The checkpoint this rank should load.
    pub load_path: PathBuf,
    /// What was detected and done, one line each.
    pub log: Vec<String>,
}

/// Environment variables that name the rank and world size, in the order they are tried.
pub const RANK_ENV: [(&str, &str); 5] = [
    ("RANK_ID", "RANK_SIZE"),
    ("RANK", "WORLD_SIZE"),
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
    ("PMI_RANK", "PMI_SIZE"),
    ("SLURM_PROCID", "SLURM_NTASKS"),
];

/// Rank and world size from the environment (MindSpore, torchrun, Open MPI, PMI, Slurm).
pub fn rank_from_env() -> Option<(u32, u32, &'static str)> {
    RANK_ENV.iter().find_map(|(r, w)| {
        let rank = std::env::var(r).ok()?.trim().parse().ok()?;
        let world = std::env::var(w).ok()?.trim().parse().ok()?;
        Some((rank, world, *r))
    })
}

/// Runs the automatic transform for one rank.
pub fn auto(o: &AutoOptions) -> Result<AutoResult> {
    let mut log = Vec::new();
    let (rank, world) = match (o.rank, o.world_size) {
        (Some(r), Some(w)) => (r, w),
        (r, w) => {
            let env = rank_from_env();
            let (er, ew, var) = env.unwrap_or((0, 1, ""));
            if env.is_none() && (r.is_none() || w.is_none()) {
                log.push("no rank in the environment (RANK_ID, RANK, OMPI_COMM_WORLD_RANK, PMI_RANK, SLURM_PROCID): rank 0 of 1".into());
            } else if env.is_some() {
                log.push(format!("rank and world size from {var}"));
            }
            (r.unwrap_or(er), w.unwrap_or(ew))
        }
    };
    if world == 0 || rank >= world {
        return Err(Error::Invalid(format!("rank {rank} is not below world size {world}")));
    }
    let format = Format::parse(&o.output_format)?;
    let strategy_dir = o.dst_strategy_dir.clone().unwrap_or_else(|| o.output_dir.join("strategy"));
    let out_root = o.output_dir.join("transformed_checkpoint");
    // Before anything is read, waited for or removed: every rank refuses the same way.
    check_inputs_outside_outputs(o, &strategy_dir, &out_root)?;
    // A MindFormers Checkpoint 2.0 root carries its layouts: no source strategy.
    let mf_root = crate::mindformers::detect(&o.load_checkpoint)?;
    let (set, distributed) = match &mf_root {
        Some(r) => (crate::mindformers::catalogue_of(r)?, false),
        None => find_source(&o.load_checkpoint)?,
    };
    // Rank folders or files may be symlinks into the output folder: resolved one by one.
    let out = crate::execute::resolved(&out_root);
    if let Some(f) = set.files.values().flatten().find(|f| crate::execute::resolved(f).starts_with(&out)) {
        return Err(inside_output(
            o,
            f,
            "this source file of load_checkpoint is (through a symlink)",
            &strategy_dir,
            &out_root,
        ));
    }
    log.push(format!(
        "source {}: {} ({} rank folder(s), {})",
        o.load_checkpoint.display(),
        if mf_root.is_some() {
            "MindFormers Checkpoint 2.0 (layouts from its metadata.json)"
        } else if distributed {
            "distributed checkpoint"
        } else {
            "complete checkpoint"
        },
        set.files.len(),
        set.format.extension()
    ));
    let src_strategy = if distributed {
        let p = o.src_strategy_path_or_dir.as_ref().ok_or_else(|| {
            Error::Invalid(format!(
                "{} holds a distributed checkpoint ({} rank folders): give its strategy with src_strategy_path_or_dir \
                 (a merged file, one stage's file, or the folder of strategy files)",
                o.load_checkpoint.display(),
                set.files.len()
            ))
        })?;
        let s = Strategy::load(p)?;
        log.push(format!(
            "source strategy {}: {} stage(s) x {} devices",
            p.display(),
            s.stage_num()?,
            s.stage_device_num()?
        ));
        Some(s)
    } else {
        None
    };
    let cancel = o.cancel.as_deref();
    let dst_strategy =
        wait_for_strategies(&strategy_dir, rank, world, Duration::from_secs(o.timeout), cancel, &mut log)?;
    if let Some(d) = &dst_strategy {
        let n = d.rank_num()?;
        if n != u64::from(world) {
            return Err(Error::Invalid(format!(
                "the strategy files in {} describe {} ranks ({} stage(s) x {} devices) but the world size is {world}",
                strategy_dir.display(),
                n,
                d.stage_num()?,
                d.stage_device_num()?
            )));
        }
    }
    if rank == 0 {
        remove_ranks_beyond(&out_root, world, &mut log);
    }
    let popts = PlanOptions { io: o.io, ..PlanOptions::default() };
    // Objects in a store: tables of contents taken from a sibling object are checked in the
    // copy's own GETs (`toc_predict`); when one differs (or the plan fails), the plan is made
    // again with every table of contents checked first, from these copies.
    let objects = mf_root.is_none() && crate::storage::is_url(&set.dir);
    let (mut parts, mindformers_plan) = match &mf_root {
        Some(r) => (None, Some(crate::mindformers::plan(r, dst_strategy, &popts)?)),
        None => (Some((set, src_strategy, dst_strategy)), None),
    };
    // The parts of the plan: a deferred plan takes a copy, kept for the plan made again.
    let mut make = |defer: bool| {
        let (set, src, dst) = match defer {
            true => parts.clone(),
            false => parts.take(),
        }
        .ok_or_else(|| Error::Invalid("internal error: the plan was made again twice".into()))?;
        Plan::from_parts(set, src, dst, &PlanOptions { defer_toc_checks: defer, ..popts.clone() })
    };
    let plan = match mindformers_plan {
        Some(p) => p,
        None => crate::toc_predict::plan_deferring(objects, &mut make)?,
    };
    let my_rank = if plan.dst_rank_count() == 1 { 0 } else { rank };
    if plan.dst_rank_count() == 1 && world > 1 {
        return Err(Error::Invalid(format!(
            "no strategy files in {} but the world size is {world}: the runtime must write \
             ckpt_strategy_rank_{{r}}.ckpt before reshard runs",
            strategy_dir.display()
        )));
    }
    log.push(format!(
        "destination: {} rank(s) ({} stage(s) x {} devices); rank {rank} is in stage {} and reads source rank(s) {:?}",
        plan.dst_rank_count(),
        plan.dst_stages,
        plan.dst_stage_devices,
        u64::from(my_rank) / plan.dst_stage_devices,
        plan.src_ranks_for(my_rank)?
    ));
    for w in &plan.warnings {
        log.push(format!("warning: {w}"));
    }
    let opts = ExecuteOptions {
        prefix: o.prefix.clone(),
        format,
        threads: o.threads,
        io: o.io,
        cancel: o.cancel.clone(),
        ..ExecuteOptions::default()
    };
    // One rank, committed only after every object the plan took a table of contents for is
    // checked (`check_unread`): nothing to write again, the resume stays.
    let written = crate::toc_predict::on_mismatch(
        &plan,
        || make(false),
        |e| log.push(format!("{e}; planning again with every table of contents checked first")),
        |p, _| execute(p, &out_root, &[my_rank], &opts),
    )?;
    let load_path = written.first().map(|w| w.path.clone()).unwrap_or_default();
    remove_other_checkpoints(&load_path, &mut log);
    log.push(format!(
        "{} {}; load it (or the folder {})",
        if written.first().is_some_and(|w| w.reused) { "kept the finished" } else { "wrote" },
        load_path.display(),
        out_root.display()
    ));
    Ok(AutoResult { load_path, log })
}

/// The refusal of a source inside `OUT/transformed_checkpoint`, which a relaunch replaces (it
/// used to delete the source rank folders beyond the new world size, then fail on them).
fn inside_output(o: &AutoOptions, path: &Path, what: &str, strategy_dir: &Path, out_root: &Path) -> Error {
    Error::Source {
        path: path.to_path_buf(),
        detail: format!(
            "{what} inside {}, which this launch replaces (an earlier launch's result?); move it aside first, for \
             example `mv {} {}` (and copy its strategy out of {}), and give that as load_checkpoint",
            out_root.display(),
            out_root.display(),
            o.output_dir.join("previous_checkpoint").display(),
            strategy_dir.display()
        ),
    }
}

/// Refuses a source that this launch would delete or overwrite: `load_checkpoint` inside (or
/// holding) `OUT/transformed_checkpoint`, which rank 0 clears of an earlier launch's ranks and
/// every rank writes into, and a source strategy inside the folder where the runtime writes this
/// launch's strategy files and reshard merges them. A relaunch from an earlier launch's result
/// used to delete the source rank folders beyond the new world size, then fail on them.
fn check_inputs_outside_outputs(o: &AutoOptions, strategy_dir: &Path, out_root: &Path) -> Result<()> {
    use crate::execute::resolved;
    let (load, out) = (resolved(&o.load_checkpoint), resolved(out_root));
    if load.starts_with(&out) {
        return Err(inside_output(o, &o.load_checkpoint, "load_checkpoint is", strategy_dir, out_root));
    }
    if o.load_checkpoint.is_dir() && out.starts_with(&load) {
        return Err(Error::Source {
            path: o.load_checkpoint.clone(),
            detail: format!(
                "load_checkpoint holds this launch's output folder {}; reshard never writes inside a source: choose \
                 an output_dir outside it",
                out_root.display()
            ),
        });
    }
    if let Some(src) = &o.src_strategy_path_or_dir {
        if resolved(src).starts_with(resolved(strategy_dir)) {
            return Err(Error::Source {
                path: src.clone(),
                detail: format!(
                    "the source strategy is inside {}, where the runtime writes this launch's strategy files and \
                     reshard merges them into merged_ckpt_strategy.ckpt; copy it elsewhere first and give that as \
                     src_strategy_path_or_dir",
                    strategy_dir.display()
                ),
            });
        }
    }
    Ok(())
}

/// Classifies `load_checkpoint`: (sources, distributed?).
fn find_source(path: &Path) -> Result<(SourceSet, bool)> {
    // An object URL: one checkpoint object (complete), or a prefix holding rank_N/ objects.
    if crate::storage::is_url(path) {
        if let Some(format) = Format::from_path(path) {
            let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
            return Ok((SourceSet::single(dir, BTreeMap::from([(0, path.to_path_buf())]), format), false));
        }
        let set = discover(path, None)?;
        let distributed = set.files.len() > 1;
        return Ok((set, distributed));
    }
    if path.is_file() {
        let format = Format::from_path(path).ok_or_else(|| Error::Source {
            path: path.to_path_buf(),
            detail: "not a .ckpt or .safetensors file".into(),
        })?;
        let files = BTreeMap::from([(0, path.to_path_buf())]);
        let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        return Ok((SourceSet::single(dir, files, format), false));
    }
    if !path.is_dir() {
        return Err(Error::Source { path: path.to_path_buf(), detail: "load_checkpoint does not exist".into() });
    }
    if let Some(set) = crate::source_unified::complete_folder(path)? {
        return Ok((set, false));
    }
    let has_rank_dirs = std::fs::read_dir(path)
        .map_err(|e| Error::io(path, "read folder", e))?
        .flatten()
        .any(|e| e.file_name().to_string_lossy().starts_with("rank_") && e.path().is_dir());
    if has_rank_dirs {
        let set = discover(path, None)?;
        let distributed = set.files.len() > 1;
        return Ok((set, distributed));
    }
    // Loose checkpoint files: one, or the newest -EPOCH_STEP among several.
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|e| Error::io(path, "read folder", e))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file() && Format::from_path(p).is_some())
        .collect();
    files.sort();
    let chosen = match files.as_slice() {
        [] => {
            return Err(Error::Source {
                path: path.to_path_buf(),
                detail: "no rank_* folders and no .ckpt/.safetensors files".into(),
            })
        }
        [one] => one.clone(),
        many => {
            let mut steps: Vec<(u64, u64, &PathBuf)> =
                many.iter().filter_map(|f| epoch_step(f).map(|(e, s)| (e, s, f))).collect();
            steps.sort();
            match steps.last() {
                Some((e, s, f)) if steps.len() == many.len() && steps.iter().filter(|x| (x.0, x.1) == (*e, *s)).count() == 1 => {
                    (*f).clone()
                }
                _ => {
                    return Err(Error::Source {
                        path: path.to_path_buf(),
                        detail: format!(
                            "several checkpoints and no unique newest -EPOCH_STEP among them: {}; point load_checkpoint at one file",
                            many.iter().filter_map(|f| f.file_name()?.to_str()).collect::<Vec<_>>().join(", ")
                        ),
                    })
                }
            }
        }
    };
    find_source(&chosen)
}

/// Waits for `ckpt_strategy_rank_{r}.ckpt` (or `.json`) of every rank, then merges them into
/// `merged_ckpt_strategy.ckpt`. `None` when there are none and the world is one rank.
fn wait_for_strategies(
    dir: &Path,
    rank: u32,
    world: u32,
    timeout: Duration,
    cancel: Option<&std::sync::atomic::AtomicBool>,
    log: &mut Vec<String>,
) -> Result<Option<Strategy>> {
    let name = |r: u32, ext: &str| dir.join(format!("ckpt_strategy_rank_{r}.{ext}"));
    // A rank's strategy file, if there is one yet. The runtime writes regular files: anything
    // else under that name (a FIFO, a folder, a device, a dangling symlink) will not become one
    // by waiting, and is refused at once rather than waited for until the timeout.
    let find = |r: u32| -> Result<Option<PathBuf>> {
        for p in [name(r, "ckpt"), name(r, "json")] {
            if std::fs::symlink_metadata(&p).is_err() {
                continue;
            }
            return match crate::input::not_regular(&p) {
                None => Ok(Some(p)),
                Some(what) => Err(Error::Unsupported {
                    path: p,
                    detail: format!(
                        "rank {r}'s strategy file is {what}; the runtime writes its strategy there as a regular \
                         file: remove this one and relaunch"
                    ),
                }),
            };
        }
        Ok(None)
    };
    if world == 1 && find(0)?.is_none() {
        log.push(format!("no strategy file in {} and world size 1: writing one complete checkpoint", dir.display()));
        return Ok(None);
    }
    // Files older than our own rank's by more than the timeout are from an earlier launch.
    let start = Instant::now();
    let fresh_after = |own: Option<SystemTime>| own.and_then(|t| t.checked_sub(timeout));
    let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    loop {
        let own = find(rank)?.as_deref().and_then(mtime);
        let after = fresh_after(own);
        let mut missing = Vec::new();
        let mut files = Vec::new();
        for r in 0..world {
            match find(r)? {
                Some(p) if after.is_none_or(|a| mtime(&p).is_some_and(|m| m >= a)) && own.is_some() => {
                    // A file still being written may not parse yet: wait for it like a missing one.
                    match Strategy::load(&p) {
                        Ok(_) => files.push(p),
                        Err(_) => missing.push(r),
                    }
                }
                _ => missing.push(r),
            }
        }
        if missing.is_empty() {
            let json = files.iter().all(|p| p.extension().is_some_and(|e| e == "json"));
            let merged = strategy::merge_files(&files, json)?;
            let out = dir.join(format!("merged_ckpt_strategy.{}", merged.extension()));
            write_atomic(&out, &merged.to_bytes(), true)?;
            let s = Strategy::load(&out)?;
            log.push(format!(
                "destination strategy: {} rank file(s) in {} merged into {} ({} stage(s) x {} devices)",
                files.len(),
                dir.display(),
                out.display(),
                s.stage_num()?,
                s.stage_device_num()?
            ));
            return Ok(Some(s));
        }
        if start.elapsed() >= timeout {
            let shown: Vec<String> = missing.iter().take(16).map(|r| format!("ckpt_strategy_rank_{r}.ckpt")).collect();
            return Err(Error::Source {
                path: dir.to_path_buf(),
                detail: format!(
                    "timed out after {}s waiting for the strategy files of {} rank(s): {}{}",
                    timeout.as_secs(),
                    missing.len(),
                    shown.join(", "),
                    if missing.len() > 16 { ", ..." } else { "" }
                ),
            });
        }
        if cancel.is_some_and(|c| c.load(std::sync::atomic::Ordering::Acquire)) {
            return Err(Error::Cancelled { path: dir.join("merged_ckpt_strategy.ckpt") });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Rank 0 removes `rank_{r}` folders of an earlier, larger launch.
fn remove_ranks_beyond(root: &Path, world: u32, log: &mut Vec<String>) {
    let Ok(rd) = std::fs::read_dir(root) else {
        return;
    };
    for e in rd.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if let Some(r) = n.strip_prefix("rank_").and_then(|x| x.parse::<u32>().ok()) {
            if r >= world && std::fs::remove_dir_all(e.path()).is_ok() {
                log.push(format!("removed {} left by an earlier launch with more ranks", e.path().display()));
            }
        }
    }
}

/// Removes checkpoints of an earlier launch (another prefix or format) next to ours.
fn remove_other_checkpoints(ours: &Path, log: &mut Vec<String>) {
    let Some(dir) = ours.parent() else { return };
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    let mut removed = false;
    for e in rd.flatten() {
        let p = e.path();
        if p != ours && Format::from_path(&p).is_some() && std::fs::remove_file(&p).is_ok() {
            log.push(format!("removed {} left by an earlier launch", p.display()));
            removed = true;
        }
    }
    if removed {
        let _ = crate::manifest::Manifest::prune(dir, true);
    }
}
