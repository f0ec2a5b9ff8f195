//! `reshard auto`: the automatic transform at start-up (`reshard_core::auto`), one process per
//! rank.

use std::io::Write as _;
use std::path::PathBuf;

use clap::Args;
use reshard_core::auto::{auto, rank_from_env, AutoOptions};
use reshard_core::storage::IoMode;
use reshard_core::Error;

use crate::{signals, OutArgs};

#[derive(Args)]
pub struct AutoArgs {
    /// A folder with rank_* subfolders (distributed), a folder with only rank_0 or loose
    /// checkpoint files, or one checkpoint file (complete).
    #[arg(long = "load_checkpoint", visible_alias = "load-checkpoint")]
    load_checkpoint: PathBuf,
    /// Strategy of a distributed source: a merged file, one stage's file, or a folder.
    #[arg(long = "src_strategy_path_or_dir", visible_alias = "src-strategy-path-or-dir")]
    src_strategy_path_or_dir: Option<PathBuf>,
    /// The run's output folder.
    #[arg(long = "output_dir", visible_alias = "output-dir", default_value = "output")]
    output_dir: PathBuf,
    /// Where the runtime writes ckpt_strategy_rank_{r}.ckpt [default: OUTPUT_DIR/strategy].
    #[arg(long = "dst_strategy_dir", visible_alias = "dst-strategy-dir")]
    dst_strategy_dir: Option<PathBuf>,
    /// This rank [default: RANK_ID, RANK, OMPI_COMM_WORLD_RANK, PMI_RANK or SLURM_PROCID].
    #[arg(long)]
    rank: Option<u32>,
    /// Number of ranks [default: RANK_SIZE, WORLD_SIZE, OMPI_COMM_WORLD_SIZE, PMI_SIZE or SLURM_NTASKS].
    #[arg(long = "world_size", visible_alias = "world-size")]
    world_size: Option<u32>,
    #[command(flatten)]
    out: OutArgs,
    /// Seconds to wait for the other ranks' strategy files.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
}

pub fn run(a: AutoArgs) -> Result<(), Error> {
    let o = AutoOptions {
        load_checkpoint: a.load_checkpoint,
        src_strategy_path_or_dir: a.src_strategy_path_or_dir,
        output_dir: a.output_dir,
        dst_strategy_dir: a.dst_strategy_dir,
        rank: a.rank,
        world_size: a.world_size,
        prefix: a.out.prefix,
        output_format: a.out.output_format,
        timeout: a.timeout,
        threads: a.out.threads,
        io: IoMode::parse(&a.out.io)?,
        cancel: Some(signals::cancel_on_signals()),
    };
    let tag = o.rank.or_else(|| rank_from_env().map(|x| x.0)).unwrap_or(0);
    match auto(&o) {
        Ok(r) => {
            // One write per line, so that the logs of concurrent ranks do not interleave.
            let text: String = r.log.iter().map(|l| format!("reshard[rank {tag}]: {l}\n")).collect();
            for line in text.split_inclusive('\n') {
                let _ = std::io::stderr().write_all(line.as_bytes());
            }
            // A closed pipe is not an error (as `outln!` in main.rs).
            let _ = writeln!(std::io::stdout().lock(), "{}", r.load_path.display());
            Ok(())
        }
        Err(e) => Err(Error::Invalid(format!("[rank {tag}] {e}"))),
    }
}
