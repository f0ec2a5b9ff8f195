//! `--output_format mindformers`: writing a MindFormers Checkpoint 2.0 root.

use std::path::Path;

use clap::Args;
use reshard_core::execute::mindformers::{execute_mindformers, MindFormersOptions};
use reshard_core::execute::{ExecuteOptions, WrittenFile};
use reshard_core::plan::Plan;
use reshard_core::Error;

/// Options of a MindFormers Checkpoint 2.0 destination.
#[derive(Args, Debug, Default)]
pub struct MfArgs {
    /// With --output_format mindformers: the iteration written (iteration_%08d/ and the tracker);
    /// default the source's when it is a Checkpoint 2.0 root, else 0.
    #[arg(long)]
    iteration: Option<u64>,
    /// With --output_format mindformers: MindFormers' user_prefix of the file names
    /// ({user_prefix}-model-0000000-0000008.safetensors).
    #[arg(long = "user_prefix", visible_alias = "user-prefix")]
    user_prefix: Option<String>,
    /// With --output_format mindformers: write each chunk once (MindFormers' balanced
    /// de-duplicated saving; fewer files than ranks).
    #[arg(long)]
    dedup: bool,
}

/// Writes the plan's every destination rank as a Checkpoint 2.0 root under `dst`.
pub fn write(
    plan: &Plan,
    src: &Path,
    dst: &Path,
    ranks: &[u32],
    opts: &ExecuteOptions,
    mf: &MfArgs,
) -> Result<Vec<WrittenFile>, Error> {
    if !ranks.is_empty() {
        return Err(Error::Invalid(
            "--ranks cannot be used with --output_format mindformers: metadata.json describes every rank, so all are \
             written"
                .into(),
        ));
    }
    if let Some(p) = &mf.user_prefix {
        if p.is_empty() || p.contains('/') || p.contains('\0') {
            return Err(Error::Invalid(format!("--user_prefix '{p}' must be a non-empty file name prefix")));
        }
    }
    // The source's iteration and common.json carry over when it is a Checkpoint 2.0 root.
    let root = reshard_core::mindformers::detect(src)?;
    let common_path = root.as_ref().map(|r| r.dir.join(reshard_core::formats::mindformers::COMMON));
    let common = match common_path.filter(|p| p.is_file()) {
        Some(p) => Some(reshard_core::input::read_capped(&p, 1 << 20, "common.json")?),
        None => None,
    };
    let iteration = mf.iteration.or(root.and_then(|r| r.iteration)).unwrap_or(0);
    let mfo = MindFormersOptions { iteration, prefix: mf.user_prefix.clone(), dedup: mf.dedup, common };
    execute_mindformers(plan, dst, opts, &mfo)
}
