//! `reshard`: convert MindSpore distributed checkpoints between parallel layouts.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

mod auto_cmd;
mod mindformers_cmd;
mod progress;
mod signals;
mod strategy_cmd;
mod unify_cmd;
use reshard_core::checkpoint::{CheckpointFile, Format, ReadOptions};
use reshard_core::execute::{execute, resolved, ExecuteOptions};
use reshard_core::plan::{Plan, PlanOptions};
use reshard_core::storage::{is_url, IoMode};
use reshard_core::strategy::{self, Strategy};
use reshard_core::{report, Error};

/// Prints to stdout; a closed pipe (`reshard inspect f | head`) is not an error.
macro_rules! outln {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($t)*);
    }};
}

macro_rules! out {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stdout().lock(), $($t)*);
    }};
}

#[derive(Parser)]
#[command(
    name = "reshard",
    version,
    about = "Convert MindSpore distributed checkpoints between parallel layouts",
    long_about = "Convert MindSpore distributed checkpoints between parallel layouts (data, model, pipeline and \
                  optimizer parallel), bit for bit as mindspore.transform_checkpoints does, in bounded memory.\n\n\
                  Exit status: 0 on success, 1 when the input or the job fails (the message names the file, rank and \
                  parameter), 2 for a bad command line, 128 + the signal when SIGINT or SIGTERM stopped a transform \
                  or auto (its unfinished outputs removed)."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// List the tensors of a checkpoint, or the layouts of a strategy file or folder.
    Inspect {
        /// A .ckpt/.safetensors checkpoint, a strategy file (.ckpt protobuf or .json), or a folder of stage files.
        file: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Merge one strategy file per pipeline stage into one, as MindSpore's merge_pipeline_strategys.
    MergeStrategy {
        /// Folder with the stage files (all *.ckpt or all *.json).
        src_dir: PathBuf,
        /// The merged file to write.
        dst_file: PathBuf,
    },
    /// Transform checkpoints to another parallel strategy (flags as MindFormers' transform_ckpt.py).
    Transform {
        #[command(flatten)]
        job: JobArgs,
        /// Folder to write rank_{r}/{prefix}{r}.ckpt into.
        #[arg(long = "dst_ckpt_dir", visible_alias = "dst-ckpt-dir")]
        dst_ckpt_dir: PathBuf,
        #[command(flatten)]
        out: OutArgs,
        /// Transform only these destination ranks (comma separated); default all.
        #[arg(long, value_delimiter = ',')]
        ranks: Vec<u32>,
        /// Append MindSpore's crc32 trailer to every output.
        #[arg(long)]
        crc: bool,
        #[command(flatten)]
        write: WriteArgs,
        /// Seconds between progress lines when stderr is not a terminal (on a terminal a bar
        /// shows progress, rate and ETA).
        #[arg(long = "progress-interval", default_value_t = 5.0)]
        progress_interval: f64,
        #[command(flatten)]
        mf: mindformers_cmd::MfArgs,
        #[command(flatten)]
        dist: DistArgs,
    },
    /// Show what a transform would read and write, without moving data.
    Plan {
        #[command(flatten)]
        job: JobArgs,
        /// Output folder the plan is for (only used to print output paths).
        #[arg(long = "dst_ckpt_dir", visible_alias = "dst-ckpt-dir", default_value = "output")]
        dst_ckpt_dir: PathBuf,
        #[command(flatten)]
        out: OutArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// With --json, include every tensor and copy piece.
        #[arg(long)]
        detail: bool,
    },
    /// Automatic transform at start-up: convert what this rank needs from `--load_checkpoint`
    /// into the strategy the runtime wrote in output/strategy/, into
    /// output/transformed_checkpoint/rank_{r}/. Run once per rank (W processes at once need no
    /// coordination beyond a shared filesystem). Prints the checkpoint to load on stdout.
    Auto(auto_cmd::AutoArgs),
    /// Write strategy files for a target layout without MindSpore, or show what a strategy does.
    Strategy {
        #[command(subcommand)]
        cmd: strategy_cmd::StrategyCmd,
    },
    /// Check an output folder: every file listed in a reshard manifest has its size and crc32
    /// and parses; checkpoints no manifest lists, and ranks of the job with no output, are
    /// reported too. Exit 1 naming each bad file and missing rank folder.
    Verify {
        /// The output folder (as given to --dst_ckpt_dir), or one rank folder.
        dir: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Merge distributed safetensors into a unified folder, as mindspore.parallel.unified_safetensors:
    /// part{i}.safetensors (complete tensors), hyper_param.safetensors and param_name_map.json.
    Unify(unify_cmd::UnifyArgs),
    /// List the source ranks a destination rank needs (like rank_list_for_transform).
    RankList {
        /// Destination rank.
        #[arg(long)]
        rank: u32,
        #[command(flatten)]
        job: JobArgs,
    },
}

/// `transform --distributed`: one job spread over the processes of a launcher.
#[derive(Args)]
struct DistArgs {
    /// Run as one of several processes sharing this job, started by mpirun, srun, torchrun or msrun.
    ///
    /// Every process runs the same command line (one per node, threads inside) and must see the
    /// same output folder. Each writes a disjoint share of the destination ranks, balanced by
    /// bytes and derived from the plan (the processes need not talk), records its result in
    /// DST/reshard_share_I_of_N.json, waits for every other share, and exits 0 only when every
    /// rank is written and verified. A failing share makes every process fail with its error; a
    /// rerun keeps the ranks that verify. The process index and count come from the launcher:
    /// RANK/WORLD_SIZE (torchrun), MS_NODE_ID/MS_WORKER_NUM (msrun; its scheduler process takes
    /// no share), OMPI_COMM_WORLD_RANK/SIZE (Open MPI), PMI_RANK/PMI_SIZE (MPICH),
    /// SLURM_PROCID/SLURM_NTASKS (srun), then RANK_ID/RANK_SIZE: the first pair set wins. None set
    /// is an error (not a one-process run).
    #[arg(long, help_heading = "Distributed")]
    distributed: bool,
    /// This process's index, 0-based [default: from the launcher's environment].
    #[arg(long = "process-index", requires = "distributed", help_heading = "Distributed")]
    process_index: Option<u32>,
    /// Number of processes [default: from the launcher's environment].
    #[arg(long = "process-count", requires = "distributed", help_heading = "Distributed")]
    process_count: Option<u32>,
    /// Seconds a share may stay silent (no record, or one that stops changing: a working process
    /// rewrites its record several times per timeout) before the other processes give up on it,
    /// naming it [default: 600].
    #[arg(long, requires = "distributed", help_heading = "Distributed")]
    timeout: Option<f64>,
}

impl DistArgs {
    /// This process's coordinator, started (its first record written) before the job is
    /// planned, so that a failure to plan is recorded for the others too; `None` without
    /// `--distributed`.
    fn start(&self, dst_dir: &Path) -> Result<Option<reshard_core::distributed::Coordinator>, Error> {
        if !self.distributed {
            return Ok(None);
        }
        let process = reshard_core::distributed::process_from_env(self.process_index, self.process_count)?;
        let secs = self.timeout.unwrap_or(600.0);
        let timeout = std::time::Duration::try_from_secs_f64(secs)
            .ok()
            .filter(|t| *t >= std::time::Duration::from_secs(1))
            .ok_or_else(|| Error::Invalid(format!("--timeout {secs}: expected seconds, 1 or more")))?;
        let d = reshard_core::distributed::DistributedOptions { process, timeout };
        let c = reshard_core::distributed::Coordinator::start(dst_dir, &d)?;
        let _ = FAILURE_ACK.set(c.failure_ack());
        Ok(Some(c))
    }
}

/// The distributed job's last step when it fails, run by `main` once the error is printed.
static FAILURE_ACK: std::sync::OnceLock<reshard_core::distributed::FailureAck> = std::sync::OnceLock::new();

/// After a failed `--distributed` job has printed its error: marks this process's record and
/// (unless stopped by a signal) waits for every other process to have printed its own, so that
/// mpirun, which kills the others when one exits non-zero, kills none before it has said why.
fn acknowledge_failure(wait: bool) {
    if let Some(a) = FAILURE_ACK.get() {
        a.acknowledge(wait, &|| signals::received().is_some());
    }
}

#[derive(Args)]
struct JobArgs {
    /// Source folder with rank_0/, rank_1/, ... each holding a checkpoint.
    #[arg(long = "src_ckpt_dir", visible_alias = "src-ckpt-dir")]
    src_ckpt_dir: PathBuf,
    /// Source strategy file or folder of stage files; omit for complete weights.
    #[arg(long = "src_ckpt_strategy", visible_alias = "src-ckpt-strategy")]
    src_ckpt_strategy: Option<PathBuf>,
    /// Destination strategy file or folder of stage files; omit for one complete checkpoint.
    #[arg(long = "dst_ckpt_strategy", visible_alias = "dst-ckpt-strategy")]
    dst_ckpt_strategy: Option<PathBuf>,
    /// With several checkpoints per rank folder, the file to use ({rank} = rank number).
    #[arg(long = "src_ckpt_name", visible_alias = "src-ckpt-name")]
    src_ckpt_name: Option<String>,
    /// Do not verify crc trailers of the sources.
    #[arg(long = "no-crc-check")]
    no_crc_check: bool,
    /// The destination layouts of a MindFormers Checkpoint 2.0 checkpoint (its root, iteration
    /// folder or metadata.json), instead of --dst_ckpt_strategy.
    #[arg(long = "dst_ckpt_layout", visible_alias = "dst-ckpt-layout", conflicts_with = "dst_ckpt_strategy")]
    dst_ckpt_layout: Option<PathBuf>,
}

#[derive(Args)]
struct OutArgs {
    /// Output file name prefix.
    #[arg(long, default_value = "checkpoint_")]
    prefix: String,
    /// Output format.
    #[arg(long = "output_format", visible_alias = "output-format", default_value = "ckpt",
          value_parser = ["ckpt", "safetensors", "mindformers"])]
    output_format: String,
    /// Worker threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Bound, in MiB, on the buffers all workers hold at once (mapped sources stay in the page
    /// cache, outside this budget).
    #[arg(long = "memory-budget", default_value_t = 256)]
    memory_budget: u64,
    /// How source files are read: mmap (memory maps: zero-copy, fastest on local disks), pread
    /// (positioned reads into bounded buffers: no page faults on network filesystems, and a
    /// source truncated during a run is a clean error), or auto (pread on NFS, SMB/CIFS, Lustre,
    /// GPFS, CephFS, 9p and FUSE; mmap elsewhere).
    #[arg(long, default_value = "auto", value_parser = ["mmap", "pread", "auto"])]
    io: String,
}

/// How a command that writes outputs writes them, and what it prints: the flags of transform and
/// unify (which words their help for its files with `mut_arg`).
#[derive(Args)]
struct WriteArgs {
    /// Do not fsync outputs before renaming them into place (faster; a power loss may then
    /// leave a complete-looking but unwritten file).
    #[arg(long = "no-sync")]
    no_sync: bool,
    /// Rewrite every output, even those a previous run of the same plan finished (by
    /// default they are kept when their manifest entry, size and crc32 still match).
    #[arg(long)]
    force: bool,
    /// Print nothing on stderr but warnings, unless the job fails (no progress, notes or summary).
    #[arg(long, short)]
    quiet: bool,
}

impl JobArgs {
    fn plan(&self, io: IoMode) -> Result<Plan, Error> {
        self.plan_deferring(io, false)
    }

    /// The plan; with `defer`, tables of contents of objects taken from another object of the
    /// same size are checked during the execution (`reshard_core::toc_predict::on_mismatch`).
    fn plan_deferring(&self, io: IoMode, defer: bool) -> Result<Plan, Error> {
        let opts = PlanOptions {
            src_ckpt_name: self.src_ckpt_name.clone(),
            skip_crc: self.no_crc_check,
            io,
            defer_toc_checks: defer,
        };
        if let Some(l) = &self.dst_ckpt_layout {
            let dst = reshard_core::mindformers::strategy_from_metadata(l)?;
            return Plan::build_to(&self.src_ckpt_dir, self.src_ckpt_strategy.as_deref(), Some(dst), &opts);
        }
        Plan::build(&self.src_ckpt_dir, self.src_ckpt_strategy.as_deref(), self.dst_ckpt_strategy.as_deref(), &opts)
    }
}

impl OutArgs {
    fn exec_options(&self) -> Result<ExecuteOptions, Error> {
        Ok(ExecuteOptions {
            prefix: self.prefix.clone(),
            // A MindFormers root's files are safetensors.
            format: Format::parse(if self.output_format == "mindformers" {
                "safetensors"
            } else {
                &self.output_format
            })?,
            threads: self.threads,
            memory_budget: self.memory_budget << 20,
            io: IoMode::parse(&self.io)?,
            ..ExecuteOptions::default()
        })
    }
}

fn main() -> ExitCode {
    // A file-size limit (`ulimit -f`) or a full disk must fail the write with an error, not kill
    // the process with SIGXFSZ before it can clean up its temporary file.
    // SAFETY: setting a signal's disposition to SIG_IGN installs no handler code; it is done
    // before any thread starts.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
    // Large blocks in maps of their own, whatever was freed before (many small tensors); not
    // when an object store is involved, whose GET responses and upload parts are fresh blocks
    // freed after use: there freed memory is kept for the next ones instead (in maps of their
    // own every one was faulted in anew: 8 -> 4 of the bench model from SeaweedFS, 180,000 page
    // faults; with glibc's defaults 85,000-102,000; kept, about 50,000).
    let objects = std::env::args_os().any(|a| {
        let a = a.to_string_lossy();
        a.contains("s3://") || a.contains("obs://")
    });
    match objects {
        true => reshard_core::reuse_freed_memory(),
        false => reshard_core::map_large_allocations(),
    }
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("reshard: error: {e}");
            // Stopped by SIGINT/SIGTERM (its temporary files removed): the conventional status.
            if let Some(sig) = signals::received() {
                eprintln!("reshard: stopped by signal {sig}; files under their final names are complete, a rerun finishes the job");
                acknowledge_failure(false);
                return ExitCode::from(128u8.saturating_add(u8::try_from(sig).unwrap_or(0)));
            }
            acknowledge_failure(true);
            ExitCode::from(1)
        }
    }
}

fn run(cli: Cli) -> Result<(), Error> {
    match cli.cmd {
        Cmd::Inspect { file, json } => inspect(&file, json),
        Cmd::MergeStrategy { src_dir, dst_file } => {
            let merged = strategy::merge_dir(&src_dir)?;
            reshard_core::atomic::write_atomic(&dst_file, &merged.to_bytes(), true)?;
            eprintln!("merged {} into {}", src_dir.display(), dst_file.display());
            Ok(())
        }
        Cmd::Plan { job, dst_ckpt_dir, out, json, detail } => {
            let opts = out.exec_options()?;
            let plan = job.plan(opts.io)?;
            if json {
                let v = report::plan_json(&plan, &dst_ckpt_dir, &opts, detail)?;
                outln!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            } else {
                out!("{}", report::plan_text(&plan, &dst_ckpt_dir, &opts)?);
            }
            Ok(())
        }
        Cmd::Auto(args) => auto_cmd::run(args),
        Cmd::Strategy { cmd } => strategy_cmd::run(cmd),
        Cmd::Unify(args) => unify_cmd::run(args),
        Cmd::Verify { dir, json } => {
            if let Some(done) = mindformers_cmd::verify(&dir, json)? {
                return Ok(done);
            }
            let r = reshard_core::manifest::verify(&dir)?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
            } else {
                for p in &r.ok {
                    outln!("ok   {}", p.display());
                }
                for (p, why) in &r.bad {
                    outln!("BAD  {}: {why}", p.display());
                }
                for m in &r.missing {
                    outln!("MISSING {m}");
                }
                for (p, why) in &r.skipped {
                    outln!("SKIP {}: {why}", p.display());
                }
            }
            if r.bad.is_empty() && r.missing.is_empty() {
                eprintln!("reshard: {} file(s) verified in {} manifest(s)", r.ok.len(), r.manifests);
                Ok(())
            } else if r.bad.is_empty() {
                Err(Error::Invalid(r.missing.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")))
            } else {
                Err(Error::Invalid(format!(
                    "{} bad file(s) under {}: {}{}",
                    r.bad.len(),
                    dir.display(),
                    r.bad.iter().map(|(p, _)| p.display().to_string()).collect::<Vec<_>>().join(", "),
                    r.missing.iter().map(|m| format!("; {m}")).collect::<String>()
                )))
            }
        }
        Cmd::RankList { rank, job } => {
            let plan = job.plan(IoMode::Auto)?;
            let ranks = plan.src_ranks_for(rank)?;
            outln!("{}", serde_json::to_string(&ranks).unwrap_or_default());
            Ok(())
        }
        Cmd::Transform { job, dst_ckpt_dir, out, ranks, crc, write, progress_interval, mf, dist } => {
            let WriteArgs { no_sync, force, quiet } = write;
            // Before anything is written (strategy merges go into the output folder too).
            reshard_core::execute::check_output(&job.src_ckpt_dir, &dst_ckpt_dir, &out.prefix)?;
            mindformers_cmd::check_ranks(&out.output_format, &ranks)?;
            let mut opts = out.exec_options()?;
            let src_ckpt_dir = job.src_ckpt_dir.clone();
            let coordinator = dist.start(&dst_ckpt_dir)?;
            // The tables of contents taken from a sibling object are checked in the copy's own
            // GETs (one process writing checkpoint files: the executor below falls back).
            let defer = coordinator.is_none() && out.output_format != "mindformers";
            let (plan, job) = match merge_strategies_and_plan(job, &dst_ckpt_dir, quiet, opts.io, defer) {
                Ok(planned) => planned,
                Err(e) => {
                    return Err(match coordinator {
                        Some(c) => c.fail(e),
                        None => e,
                    })
                }
            };
            for w in &plan.warnings {
                eprintln!("reshard: warning: {w}");
            }
            opts.crc = crc;
            opts.sync = !no_sync;
            opts.resume = !force;
            let interval = std::time::Duration::try_from_secs_f64(progress_interval).map_err(|_| {
                Error::Invalid(format!("--progress-interval {progress_interval}: expected seconds, 0 or more"))
            })?;
            let progress = (!quiet).then(|| progress::Progress::new(std::io::stderr().is_terminal(), interval));
            opts.progress = progress.as_ref().map(progress::Progress::callback);
            opts.cancel = Some(signals::cancel_on_signals());
            let start = std::time::Instant::now();
            let (files, report) = match coordinator {
                _ if out.output_format == "mindformers" && dist.distributed => (
                    Err(Error::Invalid(
                        "--distributed with --output_format mindformers is not supported: its metadata.json \
                         describes every rank at once; run it in one process"
                            .into(),
                    )),
                    None,
                ),
                None if out.output_format == "mindformers" => {
                    (mindformers_cmd::write(&plan, &src_ckpt_dir, &dst_ckpt_dir, &ranks, &opts, &mf), None)
                }
                None => (
                    reshard_core::toc_predict::on_mismatch(
                        &plan,
                        || job.plan(opts.io),
                        |e| {
                            eprintln!(
                                "reshard: warning: {e}; planning again with every table of contents checked \
                                 first, and writing every output again"
                            )
                        },
                        // The outputs the first run committed are written again, not resumed.
                        |p, first| {
                            let opts = ExecuteOptions { resume: opts.resume && first, ..opts.clone() };
                            execute(p, &dst_ckpt_dir, &ranks, &opts)
                        },
                    ),
                    None,
                ),
                Some(c) => match c.run(&plan, &ranks, &opts) {
                    Ok(r) => (Ok(r.files.clone()), Some(r)),
                    Err(e) => (Err(e), None),
                },
            };
            if let Some(p) = &progress {
                p.finish();
            }
            let files = files?;
            if let (Some(r), false) = (&report, quiet) {
                let p = &r.process;
                let who = p.index.map_or("msrun's scheduler".to_string(), |i| format!("process {i} of {}", p.count));
                let mine = r.mine();
                eprintln!(
                    "reshard: {who} ({}): {}; all {} share(s) done and verified, {} rank(s) (split {:.4}s, waited {:.4}s)",
                    p.from,
                    if mine.is_empty() { "no ranks of its own".to_string() } else { reshard_core::plan::fmt_rank_folders(mine) },
                    p.count,
                    r.shares.ranks.iter().map(Vec::len).sum::<usize>(),
                    r.split_time.as_secs_f64(),
                    r.wait_time.as_secs_f64()
                );
            }
            if !quiet {
                // What was written and what was kept, each with its own bytes (a resumed run
                // used to say "wrote 0 file(s), 32144 bytes").
                let (kept, wrote): (Vec<_>, Vec<_>) = files.iter().partition(|f| f.reused);
                let bytes = |v: &[&reshard_core::execute::WrittenFile]| v.iter().map(|f| f.len).sum::<u64>();
                if !kept.is_empty() {
                    eprintln!(
                        "reshard: kept {} file(s), {} bytes, that a previous run of the same plan finished (verified by \
                         {})",
                        kept.len(),
                        bytes(&kept),
                        if is_url(&dst_ckpt_dir) { "size and ETag" } else { "crc32" }
                    );
                }
                eprintln!(
                    "reshard: wrote {} file(s), {} bytes, to {} in {:.2}s",
                    wrote.len(),
                    bytes(&wrote),
                    dst_ckpt_dir.display(),
                    start.elapsed().as_secs_f64()
                );
                let fetched = reshard_core::storage::bytes_fetched();
                if fetched > 0 {
                    let (ahead, on_demand) = reshard_core::storage::gets_made();
                    eprintln!(
                        "reshard: fetched {fetched} bytes from the object store ({ahead} ranged GETs ahead of the copy, \
                         {on_demand} on demand)"
                    );
                }
            }
            Ok(())
        }
    }
}

/// Merges strategy folders into `DST/merged_strategy/` and makes the plan (see
/// `reshard_core::toc_predict::plan_deferring` for `defer`); returns the job naming the merged
/// strategies.
fn merge_strategies_and_plan(
    job: JobArgs,
    dst_ckpt_dir: &Path,
    quiet: bool,
    io: IoMode,
    defer: bool,
) -> Result<(Plan, JobArgs), Error> {
    let mut job = job;
    // Strategy folders are merged into the output folder, never into the source nor into
    // a strategy input: both merges are made before anything is written, and a strategy
    // folder that is OUT/merged_strategy (or a file written there) is refused (the merged
    // source strategy used to be written into it and read back as the destination).
    let merge_dir = dst_ckpt_dir.join("merged_strategy");
    let mut merges = Vec::new();
    for (p, name) in [(&job.src_ckpt_strategy, "src"), (&job.dst_ckpt_strategy, "dst")] {
        // Into an object store nothing is merged to a file: the plan merges strategy
        // folders in memory.
        if let Some(p) = p.as_ref().filter(|p| p.is_dir() && !is_url(dst_ckpt_dir)) {
            let merged = strategy::merge_dir(p)?;
            let f = merge_dir.join(format!("{name}_merged_ckpt_strategy.{}", merged.extension()));
            merges.push((name, p.clone(), f, merged));
        }
    }
    let same = |a: &Path, b: &Path| resolved(a) == resolved(b);
    for (p, name) in [(&job.src_ckpt_strategy, "source"), (&job.dst_ckpt_strategy, "destination")] {
        let Some(p) = p else { continue };
        let what = if same(p, &merge_dir) {
            format!("is the folder {}", merge_dir.display())
        } else if let Some((_, _, f, _)) = merges.iter().find(|(_, _, f, _)| same(p, f)) {
            format!("is {}, which this job rewrites", f.display())
        } else {
            continue;
        };
        return Err(Error::Invalid(format!(
            "the {name} strategy {} {what}, where this job writes the merged strategies of strategy \
             folders; give the stage files' folder (or a merged file) from somewhere else",
            p.display()
        )));
    }
    for (name, p, f, merged) in merges {
        reshard_core::atomic::write_atomic(&f, &merged.to_bytes(), true)?;
        if !quiet {
            eprintln!("merged {} into {}", p.display(), f.display());
        }
        match name {
            "src" => job.src_ckpt_strategy = Some(f),
            _ => job.dst_ckpt_strategy = Some(f),
        }
    }
    let plan = reshard_core::toc_predict::plan_deferring(defer, |defer| job.plan_deferring(io, defer))?;
    Ok((plan, job))
}

fn looks_like_strategy(path: &Path) -> bool {
    if path.is_dir() || path.to_string_lossy().ends_with(".json") {
        return true;
    }
    if is_url(path) {
        let mut first = [0u8; 1];
        return reshard_core::storage::open(path, IoMode::Pread).is_ok_and(|s| s.read_at(0, &mut first).is_ok())
            && first[0] == 0x08;
    }
    // A checkpoint starts with field 1 (length-delimited, 0x0a); a strategy map with field 1
    // as a varint (current_stage, 0x08).
    let mut first = [0u8; 1];
    reshard_core::input::open_regular(path)
        .ok()
        .and_then(|(mut f, _)| std::io::Read::read_exact(&mut f, &mut first).ok())
        .is_some()
        && first[0] == 0x08
}

/// Width of a table's name column: the longest name, at least 4, at most 80 (longer names
/// overflow their column; a width of 65,536 or more made `format!` panic).
fn name_column<'a>(names: impl Iterator<Item = &'a str>) -> usize {
    names.map(str::len).max().unwrap_or(4).clamp(4, 80)
}

/// What `inspect` shows: a checkpoint, or a strategy with at least one layout.
enum Inspected {
    Checkpoint(CheckpointFile),
    Strategy(Strategy),
}

/// Reads `path` as what it looks like. A `.ckpt` starting like a strategy map (0x08) that is
/// not a usable strategy is tried as a checkpoint too: protobuf reads any well-formed fields as
/// either message, so the first byte alone does not tell, and when neither reading works the
/// message says what each found.
fn inspected(path: &Path) -> Result<Inspected, Error> {
    if Format::from_path(path) == Some(Format::Safetensors) || !looks_like_strategy(path) {
        return Ok(Inspected::Checkpoint(CheckpointFile::open(path, ReadOptions::default())?));
    }
    let as_strategy = Strategy::load(path).and_then(|s| s.stage_device_num().map(|_| s));
    match as_strategy {
        Ok(s) => Ok(Inspected::Strategy(s)),
        Err(e) if path.is_dir() || path.to_string_lossy().ends_with(".json") => Err(e),
        Err(se) => match CheckpointFile::open(path, ReadOptions::default()) {
            Ok(f) => Ok(Inspected::Checkpoint(f)),
            Err(ce) => {
                let detail = |e: &Error| match e {
                    Error::Malformed { detail, .. } => detail.clone(),
                    other => other.to_string(),
                };
                Err(Error::Malformed {
                    path: path.to_path_buf(),
                    kind: "checkpoint or strategy",
                    detail: format!("as a checkpoint: {}; as a strategy: {}", detail(&ce), detail(&se)),
                })
            }
        },
    }
}

fn inspect(path: &Path, json: bool) -> Result<(), Error> {
    if let Some(done) = mindformers_cmd::inspect(path, json)? {
        return Ok(done);
    }
    let s = match inspected(path)? {
        Inspected::Strategy(s) => s,
        Inspected::Checkpoint(f) => return inspect_checkpoint(&f, json),
    };
    inspect_strategy(&s, json)
}

fn inspect_checkpoint(f: &CheckpointFile, json: bool) -> Result<(), Error> {
    let idx = f.index();
    // A string's dims are what the file says ([0] as MindSpore writes them), not a shape.
    let shape = |t: &reshard_core::checkpoint::TensorInfo| {
        if t.dtype == reshard_core::DType::Str {
            t.raw_dims().to_vec()
        } else {
            t.shape().to_vec()
        }
    };
    if json {
        let tensors: Vec<_> = idx
            .tensors
            .iter()
            .map(|t| serde_json::json!({"name": t.name(), "dtype": t.dtype.ckpt_name(), "shape": shape(t), "bytes": t.nbytes()}))
            .collect();
        outln!("{}", serde_json::to_string_pretty(&serde_json::json!({ "tensors": tensors })).unwrap_or_default());
    } else {
        let w = name_column(idx.tensors.iter().map(|t| t.name().as_str()));
        outln!("{:<w$}  {:<9}  {:<20}  {:>12}", "name", "dtype", "shape", "bytes");
        for t in &idx.tensors {
            outln!(
                "{:<w$}  {:<9}  {:<20}  {:>12}",
                t.name(),
                t.dtype.ckpt_name(),
                format!("{:?}", shape(t)),
                t.nbytes()
            );
        }
        let total: u64 = idx.tensors.iter().map(|t| t.nbytes()).sum();
        let crc = idx.crc.map(|c| format!(", crc32 {c:#010x} verified")).unwrap_or_default();
        outln!("{} tensors, {} bytes of content, file {} bytes{}", idx.tensors.len(), total, idx.file_len, crc);
    }
    Ok(())
}

fn inspect_strategy(s: &Strategy, json: bool) -> Result<(), Error> {
    if json {
        let params: Vec<_> = s
            .params()
            .map(|(n, e)| {
                serde_json::json!({"name": n, "layouts": e.map(|x| serde_json::json!({
                "stage": x.stage, "dev_matrix": x.layout.dev_matrix, "tensor_map": x.layout.tensor_map,
                "opt_weight_shard_step": x.layout.opt_shard_step, "opt_weight_shard_size": x.layout.opt_shard_size}))
                .collect::<Vec<_>>()})
            })
            .collect();
        let v = serde_json::json!({"stages": s.stage_num()?, "stage_devices": s.stage_device_num()?, "params": params});
        outln!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    } else {
        outln!("{} stage(s) x {} devices", s.stage_num()?, s.stage_device_num()?);
        let w = name_column(s.params().map(|(n, _)| n));
        outln!(
            "{:<w$}  {:>5}  {:<14}  {:<18}  {:>8}  {:>8}",
            "name",
            "stage",
            "dev_matrix",
            "tensor_map",
            "opt_step",
            "opt_size"
        );
        for (n, e) in s.params() {
            for x in e {
                let tm: Vec<String> = x
                    .layout
                    .tensor_map
                    .iter()
                    .map(|a| if a.len() == 1 { a[0].to_string() } else { format!("{a:?}") })
                    .collect();
                outln!(
                    "{:<w$}  {:>5}  {:<14}  {:<18}  {:>8}  {:>8}",
                    n,
                    x.stage,
                    format!("{:?}", x.layout.dev_matrix),
                    format!("[{}]", tm.join(", ")),
                    x.layout.opt_shard_step,
                    x.layout.opt_shard_size
                );
            }
        }
    }
    Ok(())
}
