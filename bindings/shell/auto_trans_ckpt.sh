#!/usr/bin/env bash
# Automatic checkpoint transform for launch scripts in the style of run_distribute.sh.
# Call it once per rank, after the runtime has written output/strategy/ckpt_strategy_rank_{r}.ckpt
# and before the training or inference process loads weights:
#
#   export RANK_ID=$i RANK_SIZE=8            # or RANK/WORLD_SIZE, OMPI_*, PMI_*, SLURM_*
#   ckpt=$(bindings/shell/auto_trans_ckpt.sh --load_checkpoint /data/llama_8p \
#            --src_strategy_path_or_dir /data/llama_8p_strategy --output_dir output) || exit 1
#   python run_mindformer.py --load_checkpoint "$(dirname "$(dirname "$ckpt")")" ...
#
# Every flag is passed to `reshard auto` (see `reshard auto --help`); the checkpoint this rank
# should load is printed on stdout, the log goes to stderr.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# The same lookup as transform_ckpt.sh: $RESHARD_BIN, this tree's build, then PATH.
bin=${RESHARD_BIN:-}
if [ -z "$bin" ]; then
  tree="${CARGO_TARGET_DIR:-$here/../../target}/release/reshard"
  if [ -x "$tree" ]; then bin=$tree; else bin=$(command -v reshard || true); fi
fi
if [ -z "$bin" ] || [ ! -x "$bin" ]; then
  echo "auto_trans_ckpt.sh: cannot find the reshard binary (set RESHARD_BIN, build it with" \
    "'cargo build --release -p reshard-cli', or put it on PATH)" >&2
  exit 127
fi
exec "$bin" auto "$@"
