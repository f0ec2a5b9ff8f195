#!/usr/bin/env bash
# The seed workflow on a tiny llama-style model trained on 8 cards (pp2 x dp2 x mp2, optimizer
# shard) and resumed on 4 (pp2 x mp2):
#   1. the strategy files the training run wrote (one per pipeline stage),
#   2. reshard transform to the fine-tuning strategy,
#   3. load the result (reshard inspect; MindSpore's load_checkpoint when it is installed) and
#      compare with what mindspore.transform_checkpoints produced for the same job.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
out=${1:-$(mktemp -d)/transformed_checkpoint}
cargo build --release -q -p reshard-cli --manifest-path "$repo/Cargo.toml"
reshard="$repo/target/release/reshard"

echo "== 1. strategy files written by training (one per pipeline stage)"
"$reshard" inspect "$here/train/strategy" | head -8
echo "   ..."
echo
echo "== 2. plan: what each of the 4 new ranks reads"
"$reshard" plan --src_ckpt_dir "$here/train/checkpoint" --src_ckpt_strategy "$here/train/strategy" \
  --dst_ckpt_strategy "$here/finetune/strategy" --dst_ckpt_dir "$out"
echo
echo "== 3. transform"
"$reshard" transform --src_ckpt_dir "$here/train/checkpoint" --src_ckpt_strategy "$here/train/strategy" \
  --dst_ckpt_strategy "$here/finetune/strategy" --dst_ckpt_dir "$out"
echo
echo "== 4. load the result"
"$reshard" inspect "$out/rank_0/checkpoint_0.ckpt" | tail -4
status=0
for r in 0 1 2 3; do
  f="rank_$r/checkpoint_$r.ckpt"
  if cmp -s "$out/$f" "$here/mindspore_output/$f"; then
    echo "$f: identical to mindspore.transform_checkpoints' output"
  else
    echo "$f: DIFFERS from mindspore.transform_checkpoints' output"; status=1
  fi
done
if python3 -c "import mindspore" 2>/dev/null; then
  python3 - "$out" <<'PY'
import sys, mindspore as ms
d = ms.load_checkpoint(f"{sys.argv[1]}/rank_0/checkpoint_0.ckpt")
print(f"mindspore.load_checkpoint: {len(d)} parameters loaded from rank_0")
PY
fi
echo "output: $out"
exit $status
