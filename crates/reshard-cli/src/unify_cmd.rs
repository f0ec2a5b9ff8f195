//! `reshard unify`: MindSpore's `unified_safetensors` (part files, `hyper_param.safetensors`,
//! `param_name_map.json`) from distributed safetensors and their strategy.

use std::io::IsTerminal;
use std::path::PathBuf;

use clap::Args;
use reshard_core::execute::ExecuteOptions;
use reshard_core::plan::PlanOptions;
use reshard_core::storage::IoMode;
use reshard_core::unify::{unify, UnifyOptions, PART_BYTES};
use reshard_core::Error;

use crate::{progress, signals, WriteArgs};

#[derive(Args)]
// Transform's flags, with unify's help (clap drops a doc comment's final period, so these have none).
#[command(
    mut_arg("no_sync", |a| a.help("Do not fsync outputs before renaming them into place")),
    mut_arg("force", |a| a.help("Rewrite every file, even those a previous run of the same job finished")),
    mut_arg("quiet", |a| a.help("Print nothing on stderr but warnings, unless the job fails")),
)]
pub struct UnifyArgs {
    /// Source folder with rank_0/, rank_1/, ... each holding safetensors (with or without
    /// redundancy removed); or an s3:// (obs://) prefix of such objects.
    #[arg(long = "src_ckpt_dir", visible_alias = "src-ckpt-dir")]
    src_ckpt_dir: PathBuf,
    /// The sources' strategy: a merged file, or a folder of stage files (either may be a URL).
    #[arg(long = "src_ckpt_strategy", visible_alias = "src-ckpt-strategy")]
    src_ckpt_strategy: PathBuf,
    /// Folder to write part{i}.safetensors, hyper_param.safetensors and param_name_map.json into
    /// (an s3:// or obs:// prefix: each is uploaded, the map last).
    #[arg(long = "dst_dir", visible_alias = "dst-dir")]
    dst_dir: PathBuf,
    /// Whether the sources hold every replica (true) or were saved with remove_redundancy
    /// (false). Default: what the files' metadata says (MindSpore follows it too), else true.
    #[arg(long = "merge_with_redundancy", visible_alias = "merge-with-redundancy",
          value_parser = clap::value_parser!(bool))]
    merge_with_redundancy: Option<bool>,
    /// Only the files whose names end in SUFFIX.safetensors (one per rank folder).
    #[arg(long = "file_suffix", visible_alias = "file-suffix")]
    file_suffix: Option<String>,
    /// MindSpore's split_dst_file: CURRENT,TOTAL (from 1) writes only this task's share of the
    /// parts; task 1 also writes hyper_param.safetensors and the map.
    #[arg(
        long = "split_dst_file",
        visible_alias = "split-dst-file",
        value_delimiter = ',',
        value_name = "CURRENT,TOTAL"
    )]
    split_dst_file: Vec<u32>,
    /// Bytes per part file: the tensors are split into ceil(total / this) parts, as MindSpore
    /// does with 3 GiB.
    #[arg(long = "part-bytes", default_value_t = PART_BYTES, hide = true)]
    part_bytes: u64,
    /// Worker threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// How source files are read: mmap, pread or auto (see `reshard help transform`).
    #[arg(long, default_value = "auto", value_parser = ["mmap", "pread", "auto"])]
    io: String,
    /// Do not verify crc of the sources.
    #[arg(long = "no-crc-check")]
    no_crc_check: bool,
    #[command(flatten)]
    write: WriteArgs,
}

pub fn run(a: UnifyArgs) -> Result<(), Error> {
    let io = IoMode::parse(&a.io)?;
    let progress = (!a.write.quiet)
        .then(|| progress::Progress::new(std::io::stderr().is_terminal(), std::time::Duration::from_secs(5)));
    let opts = UnifyOptions {
        merge_with_redundancy: a.merge_with_redundancy,
        file_suffix: a.file_suffix,
        part_bytes: a.part_bytes,
        split: match a.split_dst_file.as_slice() {
            [] => None,
            [c, t] => Some((*c, *t)),
            other => {
                return Err(Error::Invalid(format!(
                    "--split_dst_file takes CURRENT,TOTAL (two numbers), got {} value(s)",
                    other.len()
                )))
            }
        },
        plan: PlanOptions { skip_crc: a.no_crc_check, io, ..PlanOptions::default() },
        exec: ExecuteOptions {
            threads: a.threads,
            io,
            sync: !a.write.no_sync,
            resume: !a.write.force,
            progress: progress.as_ref().map(progress::Progress::callback),
            cancel: Some(signals::cancel_on_signals()),
            ..ExecuteOptions::default()
        },
    };
    let start = std::time::Instant::now();
    let r = unify(&a.src_ckpt_dir, &a.src_ckpt_strategy, &a.dst_dir, &opts);
    if let Some(p) = &progress {
        p.finish();
    }
    let r = r?;
    for w in &r.warnings {
        eprintln!("reshard: warning: {w}");
    }
    if !a.write.quiet {
        let bytes: u64 = r.files.iter().map(|f| f.len).sum();
        let kept = r.files.iter().filter(|f| f.reused).count();
        eprintln!(
            "reshard: unified {} parameter(s){} into {} file(s) and {} in {:.2}s ({bytes} bytes{})",
            r.params,
            if r.deduplicated { " from sources saved with remove_redundancy" } else { "" },
            r.files.len(),
            r.map.display(),
            start.elapsed().as_secs_f64(),
            if kept > 0 { format!(", {kept} kept from a previous run") } else { String::new() }
        );
    }
    Ok(())
}
