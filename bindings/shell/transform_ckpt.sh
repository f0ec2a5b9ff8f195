#!/usr/bin/env bash
# Drop-in for MindFormers' `python mindformers/tools/transform_ckpt.py`: same flags, same log
# lines, but the work is done by the reshard CLI (`reshard transform`).
#
#   transform_ckpt.sh --src_ckpt_dir DIR --dst_ckpt_dir DIR
#                     [--src_ckpt_strategy FILE|DIR] [--dst_ckpt_strategy FILE|DIR]
#                     [--prefix checkpoint_] [--output_format ckpt|safetensors]
#                     [--distributed [--process_index I --process_count N] [--timeout SECS]]
#
# --distributed (a flag, no value) runs the transform as one process of a job spread over the
# processes of mpirun, srun, torchrun or msrun (`reshard transform --distributed`); the index
# and count come from the launcher's environment unless given.
#
# Flags may also be written --flag=value. An empty strategy or "None" means complete weights,
# as in transform_ckpt.py. A strategy folder (one file per pipeline stage) is merged by reshard
# into DST/merged_strategy/ (transform_ckpt.py writes merged_ckpt_strategy.ckpt into the
# strategy folder itself; reshard leaves its inputs alone).
#
# The reshard binary: $RESHARD_BIN if set, else target/release/reshard of the source tree this
# script lives in, else `reshard` on PATH. Exit status: 0 on success, 2 for a bad command line,
# otherwise reshard's (1 when the transform fails; its message names file, rank and parameter).
set -euo pipefail

prog=$(basename "$0")

usage() {
  cat <<USAGE
usage: $prog --src_ckpt_dir DIR --dst_ckpt_dir DIR [--src_ckpt_strategy FILE|DIR]
       [--dst_ckpt_strategy FILE|DIR] [--prefix PREFIX] [--output_format ckpt|safetensors]
       [--distributed [--process_index I --process_count N] [--timeout SECS]]
USAGE
}

die_usage() {
  echo "$prog: $1" >&2
  usage >&2
  exit 2
}

src_ckpt_strategy=""
dst_ckpt_strategy=""
src_ckpt_dir=""
dst_ckpt_dir=""
prefix="checkpoint_"
output_format="ckpt"
distributed=()

while [ $# -gt 0 ]; do
  arg=$1
  case "$arg" in
    -h | --help)
      usage
      exit 0
      ;;
    --distributed)
      distributed+=(--distributed)
      shift
      continue
      ;;
    --*=*)
      name=${arg%%=*}
      value=${arg#*=}
      ;;
    --*)
      name=$arg
      [ $# -ge 2 ] || die_usage "$name needs a value"
      value=$2
      shift
      ;;
    *) die_usage "unexpected argument '$arg'" ;;
  esac
  shift
  case "$name" in
    --src_ckpt_strategy) src_ckpt_strategy=$value ;;
    --dst_ckpt_strategy) dst_ckpt_strategy=$value ;;
    --src_ckpt_dir) src_ckpt_dir=$value ;;
    --dst_ckpt_dir) dst_ckpt_dir=$value ;;
    --prefix) prefix=$value ;;
    --output_format) output_format=$value ;;
    --process_index | --process-index) distributed+=(--process-index "$value") ;;
    --process_count | --process-count) distributed+=(--process-count "$value") ;;
    --timeout) distributed+=(--timeout "$value") ;;
    *) die_usage "unknown option '$name'" ;;
  esac
done

[ -n "$src_ckpt_dir" ] || die_usage "--src_ckpt_dir is required"
[ -n "$dst_ckpt_dir" ] || die_usage "--dst_ckpt_dir is required"

find_reshard() {
  if [ -n "${RESHARD_BIN:-}" ]; then
    echo "$RESHARD_BIN"
    return
  fi
  local here tree
  here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
  tree="${CARGO_TARGET_DIR:-$here/../../target}/release/reshard"
  if [ -x "$tree" ]; then
    echo "$tree"
    return
  fi
  command -v reshard || true
}

bin=$(find_reshard)
if [ -z "$bin" ] || [ ! -x "$bin" ]; then
  echo "$prog: cannot find the reshard binary (set RESHARD_BIN, build it with" \
    "'cargo build --release -p reshard-cli', or put it on PATH)" >&2
  exit 127
fi

args=(transform --src_ckpt_dir "$src_ckpt_dir" --dst_ckpt_dir "$dst_ckpt_dir"
  --prefix "$prefix" --output_format "$output_format" ${distributed[@]+"${distributed[@]}"})
shown_src=None
shown_dst=None
if [ -n "$src_ckpt_strategy" ] && [ "$src_ckpt_strategy" != "None" ]; then
  args+=(--src_ckpt_strategy "$src_ckpt_strategy")
  shown_src=$src_ckpt_strategy
fi
if [ -n "$dst_ckpt_strategy" ] && [ "$dst_ckpt_strategy" != "None" ]; then
  args+=(--dst_ckpt_strategy "$dst_ckpt_strategy")
  shown_dst=$dst_ckpt_strategy
fi

echo "src_ckpt_strategy: $shown_src"
echo "dst_ckpt_strategy: $shown_dst"
echo "src_ckpt_dir: $src_ckpt_dir"
echo "dst_ckpt_dir: $dst_ckpt_dir"
echo "prefix: $prefix"
echo "......Start transform......"
status=0
"$bin" "${args[@]}" || status=$?
if [ "$status" -ne 0 ]; then
  echo "......Transform failed (reshard exit status $status)......" >&2
  exit "$status"
fi
echo "......Transform succeed!......"
