//! `reshard strategy new|show`: write strategy files for a target layout without MindSpore, and
//! look at what a strategy does to each parameter.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use reshard_core::strategy::Strategy;
use reshard_core::strategy_new::{self, NewOptions, Omitted, StrategySpec};
use reshard_core::Error;

const NEW_ABOUT: &str = "\
Write the strategy files MindSpore would write for a dp x mp x pp layout, without MindSpore.

Reads parameter names and full shapes from a complete checkpoint, decides each parameter's split
from sharding rules, and writes into --out one file per pipeline stage,
ckpt_strategy_rank_{first rank of the stage}.ckpt, plus merged_ckpt_strategy.ckpt (merged as
mindspore.merge_pipeline_strategys does). Give the merged file (or the folder) as the destination
strategy to `reshard transform`, MindSpore's transform_checkpoints or MindFormers (which, like
reshard, ignores or rebuilds the merged file when given the folder; MindSpore's own
merge_pipeline_strategys would read it as one more stage file, so give it the merged file).

Layout: each stage has the device matrix [dp, mp]; global rank = stage * dp * mp + local rank.
`mp` is the right axis (tensor_map 0), `dp` the left (tensor_map 1), as in MindFormers.

Rules (--rules FILE, first match wins, tried before the --preset rules):
    *.attention.wq.weight      = [mp, 1]      # split dim 0 by mp
    *.attention.wo.weight      = [1, mp]
    re:\\.w(1|3)\\.weight$       = [mp, 1]      # 're:' = regular expression, searched in the name
    *tok_embeddings*           = [mp, 1] or replicate   # first alternative that divides
    my_table                   = [dp*mp, 1]   # one dim over both axes (nested tensor map)
    *norm*                     = replicate
    debug_buffer               = skip         # no layout item
    stage *.lm_head*           = last         # pipeline stage: number, first, last
    stage *tok_embeddings*     = first, last  # shared (tied) embedding
Globs (* and ?) match the whole name. Rules see names without the optimizer-state prefixes
(adam_m., adam_v., accu_grads.): states take their parameter's layout. A rule of --rules that
matches no parameter is an error.

Defaults: the built-in 'llama' preset covers MindFormers llama-style names (wq/wk/wv/w1/w3
[mp, 1], wo/w2 [1, mp], embedding and lm_head [mp, 1] or replicate, norms replicated); layers.{i}
are spread over stages as MindFormers does (i // max((layers + 1) // pp, 1)), embeddings go to the
first stage, the final norm and lm_head to the last. Scalars, global_step and learning_rate get
no layout (MindSpore copies them whole). Parameters no rule matches get none either; they are
listed as a warning.

Optimizer shard (--optimizer-shard) is written as MindSpore's enable_parallel_optimizer writes it:
opt_weight_shard_size = --opt-shard-size, opt_weight_shard_step = stride of the replica group,
and only for parameters of at least --opt-shard-threshold-kb whose dim 0 divides.";

const SHOW_ABOUT: &str = "\
Show what a strategy does to each parameter: split, pipeline stage, the slice each rank stores
and how many ranks hold the same slice.

Full shapes come from the strategy (JSON files carry tensor_shape) or from --from (a complete
checkpoint); without them only the split is shown. MindSpore's JSON writer flattens a dim split
over several device axes into one dim per axis (tensor_shape [32, 2, 32], tensor_map [-1, 1, 0]
for a [32, 64] weight): only the checkpoint's shapes tell, so with --from such layouts are merged
back into the tensor's dims, and without it a note names the parameters that may be flattened
(their shapes and slices are then the file's flattened dims). FILE_OR_DIR is a strategy file (.ckpt
protobuf or .json) or a folder of per-stage files. --json adds every distinct slice with its
global ranks (stage * devices per stage + local rank), offset and shape.";

/// `reshard strategy ...`
#[derive(Subcommand, Debug)]
pub enum StrategyCmd {
    /// Write strategy files for a dp x mp x pp layout, without MindSpore.
    #[command(long_about = NEW_ABOUT)]
    New {
        #[command(flatten)]
        args: NewArgs,
        /// Print the layout table of what was written.
        #[arg(long)]
        show: bool,
    },
    /// Show each parameter's split, stage, per-rank slice shape and replica count.
    #[command(long_about = SHOW_ABOUT)]
    Show {
        /// Strategy file (.ckpt protobuf or .json) or folder of per-stage files.
        #[arg(value_name = "FILE_OR_DIR")]
        path: PathBuf,
        /// Print JSON (with every slice and its ranks).
        #[arg(long)]
        json: bool,
        /// Complete checkpoint to take full shapes from.
        #[arg(long, value_name = "CKPT")]
        from: Option<PathBuf>,
    },
}

/// The options of `reshard strategy new` (all but `--show`), as the core takes them.
#[derive(Args, Debug)]
pub struct NewArgs {
    /// Complete checkpoint: a .ckpt/.safetensors file, a folder with one, or a source folder with only rank_0/.
    #[arg(long, value_name = "CKPT_OR_DIR")]
    from: PathBuf,
    /// Data-parallel size (left axis of each stage's device matrix).
    #[arg(long, value_name = "D")]
    dp: u32,
    /// Model-parallel size (right axis; the axis the rules call mp).
    #[arg(long, value_name = "M")]
    mp: u32,
    /// Pipeline stages; each stage has dp x mp devices.
    #[arg(long, value_name = "P", default_value_t = 1)]
    pp: u32,
    /// Write optimizer-shard fields (MindSpore's enable_parallel_optimizer).
    #[arg(long)]
    optimizer_shard: bool,
    /// optimizer_weight_shard_size: -1 shards over all replicas (MindSpore's default).
    #[arg(long, value_name = "N", default_value_t = -1, allow_negative_numbers = true)]
    opt_shard_size: i32,
    /// parallel_optimizer_threshold: parameters smaller than this many KB are not sharded (MindSpore: 64).
    #[arg(long, value_name = "KB", default_value_t = 64)]
    opt_shard_threshold_kb: u64,
    /// Rules file (see above); its rules come before the preset's.
    #[arg(long, value_name = "FILE")]
    rules: Option<PathBuf>,
    /// Built-in rule set after --rules: llama (vocab-parallel embedding), llama-vocab-dp (replicated embedding, MindFormers' vocab_emb_dp default), or none.
    #[arg(long, value_name = "NAME", default_value = "llama")]
    preset: String,
    /// Layers per stage, e.g. 3,3,2 (default: MindFormers' spreading).
    #[arg(long, value_name = "N,N,...", value_delimiter = ',')]
    layers_per_stage: Vec<u32>,
    /// Output folder (created; must not hold other strategy files).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Write the JSON form (ckpt_strategy_rank_{r}.json) instead of protobuf.
    #[arg(long)]
    json: bool,
}

impl From<NewArgs> for NewOptions {
    fn from(a: NewArgs) -> Self {
        NewOptions {
            from: a.from,
            dp: a.dp,
            mp: a.mp,
            pp: a.pp,
            optimizer_shard: a.optimizer_shard,
            opt_shard_size: a.opt_shard_size,
            opt_shard_threshold_kb: a.opt_shard_threshold_kb,
            rules: a.rules,
            rules_text: None,
            preset: a.preset,
            layers_per_stage: (!a.layers_per_stage.is_empty()).then_some(a.layers_per_stage),
            out: a.out,
            json: a.json,
        }
    }
}

/// Runs a `strategy` subcommand.
pub fn run(cmd: StrategyCmd) -> Result<(), Error> {
    match cmd {
        StrategyCmd::New { args, show } => {
            let opts = NewOptions::from(args);
            let spec = opts.spec()?;
            let params = strategy_new::read_params(&opts.from)?;
            let written = strategy_new::write(&spec, &params, &opts.out, opts.json)?;
            report_new(&spec, &written);
            if show {
                let s = Strategy::load(&written.merged)?;
                let shapes = strategy_new::shapes_of(&params);
                print!("{}", strategy_new::show(&s, Some(&shapes))?.to_text());
            }
            Ok(())
        }
        StrategyCmd::Show { path, json, from } => {
            let s = Strategy::load(&path)?;
            let shapes =
                from.as_deref().map(strategy_new::read_params).transpose()?.map(|p| strategy_new::shapes_of(&p));
            let report = strategy_new::show(&s, shapes.as_ref())?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report.to_json()).unwrap_or_default());
            } else {
                print!("{}", report.to_text());
            }
            Ok(())
        }
    }
}

fn report_new(spec: &StrategySpec, w: &strategy_new::Written) {
    let a = &w.assignment;
    let devices = spec.stage_devices();
    for (s, f) in w.stage_files.iter().enumerate() {
        let s = s as u32;
        let first = u64::from(s) * devices;
        eprintln!(
            "stage {s}: ranks {first}-{}, {} layouts -> {}",
            first + devices - 1,
            a.stage_layouts(s).len(),
            f.display()
        );
    }
    eprintln!("merged: {}", w.merged.display());
    let scalars = a.omitted.iter().filter(|(_, o)| *o == Omitted::Scalar).count();
    let skipped: Vec<&str> =
        a.omitted.iter().filter(|(_, o)| matches!(o, Omitted::Skipped { .. })).map(|(n, _)| n.as_str()).collect();
    if scalars > 0 {
        eprintln!("{scalars} scalar/bookkeeping parameter(s) have no layout (copied whole, as MindSpore)");
    }
    if !skipped.is_empty() {
        eprintln!("skipped by rule: {}", list(&skipped));
    }
    let unmatched = a.unmatched();
    if !unmatched.is_empty() {
        eprintln!(
            "reshard: warning: {} parameter(s) matched no rule and have no layout (a transform copies them \
             whole to every rank): {}; add rules such as 'NAME = replicate' or 'NAME = skip'",
            unmatched.len(),
            list(&unmatched)
        );
    }
    eprintln!(
        "use it with: reshard transform --src_ckpt_dir SRC --dst_ckpt_strategy {} --dst_ckpt_dir OUT",
        w.merged.display()
    );
}

fn list(names: &[&str]) -> String {
    const MAX: usize = 8;
    if names.len() <= MAX {
        names.join(", ")
    } else {
        format!("{}, ... ({} more)", names[..MAX].join(", "), names.len() - MAX)
    }
}
