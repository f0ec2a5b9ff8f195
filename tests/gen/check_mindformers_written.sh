#!/usr/bin/env bash
# Roots written by reshard (--output_format mindformers), loaded by MindFormers 2.1's own
# load_checkpoint and ReshardLoader (tests/gen/check_mindformers.py); each checked root's
# metadata.json is kept as tests/fixtures/mindformers/written/<case>.metadata.json, which
# crates/reshard-core/tests/mindformers.rs compares with what reshard writes now.
#
#   PYTHONPATH=PKG:DEPS tests/gen/check_mindformers_written.sh   (PKG, DEPS: see make_mindformers.py)
set -euo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
R=${RESHARD:-$here/target/release/reshard}
PY=${PYTHON:-/work/msvenv/bin/python}
F=$here/tests/fixtures/mindformers
C=$here/tests/fixtures/conformance/complete_to_dp2mp2_opt
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# case | reshard arguments | expected full tensors
cases=(
  "dp2mp2_legacy_opt|--src_ckpt_dir $F/dp2mp2/root --dst_ckpt_strategy $F/written/legacy_dp2mp2_opt.json|$F/dp2mp2/expected.safetensors"
  "dp2mp2_dedup|--src_ckpt_dir $F/dp2mp2/root --dst_ckpt_layout $F/dp2mp2/root --dedup|$F/dp2mp2/expected.safetensors"
  "pp2_dedup|--src_ckpt_dir $F/pp2_balanced/root --dst_ckpt_layout $F/pp2_balanced/root --dedup|$F/pp2_balanced/expected.safetensors"
  "single_complete|--src_ckpt_dir $F/single/root|$F/single/expected.safetensors"
  "legacy_dp2mp2_opt|--src_ckpt_dir $C/expected --src_ckpt_strategy $C/dst_strategy.ckpt --dst_ckpt_strategy $C/dst_strategy.ckpt --iteration 5|$C/src/rank_0/llama_tiny.ckpt"
)
for c in "${cases[@]}"; do
  IFS='|' read -r name args expected <<<"$c"
  # shellcheck disable=SC2086
  "$R" transform $args --dst_ckpt_dir "$tmp/$name" --output_format mindformers -q
  # (Run inside the scratch folder: MindFormers writes its logs to ./output.)
  out=$(cd "$tmp" && "$PY" "$here/tests/gen/check_mindformers.py" "$tmp/$name" "$expected" 2>/dev/null | grep MINDFORMERS || true)
  echo "$name: $out"
  case $out in MINDFORMERS-OK*) ;; *) exit 1 ;; esac
  it=$(cat "$tmp/$name/latest_checkpointed_iteration.txt")
  cp "$tmp/$name/iteration_$(printf %08d "$it")/metadata.json" "$F/written/$name.metadata.json"
done
