#!/usr/bin/env bash
# With MindSpore installed: run reshard on every conformance case and load every output with
# mindspore.load_checkpoint (crc_check=True, outputs written with --crc), comparing it tensor
# for tensor with what mindspore.transform_checkpoints wrote. Cases with parameters that have a
# source layout but none in the destination strategy differ on purpose (README) and are listed.
#   tests/gen/check_with_mindspore.sh [PYTHON]    (default: /work/msvenv/bin/python)
set -uo pipefail
cd "$(dirname "$0")/../.."
py=${1:-/work/msvenv/bin/python}
cargo build --release -q -p reshard-cli || exit 1
bin=target/release/reshard
tmp=$(mktemp -d)
pass=0; fail=0
for c in tests/fixtures/conformance/*/; do
  name=$(basename "$c")
  get() { "$py" -c "import json,sys; v=json.load(open('$c/case.json')).get('$1'); print(v if v is not None else '')"; }
  src=$(get src_strategy); dst=$(get dst_strategy); fmt=$(get output_format)
  args=(transform -q --crc --src_ckpt_dir "$c/src" --dst_ckpt_dir "$tmp/$name" --output_format "$fmt")
  [ -n "$src" ] && args+=(--src_ckpt_strategy "$c/$src")
  [ -n "$dst" ] && args+=(--dst_ckpt_strategy "$c/$dst")
  if ! "$bin" "${args[@]}" 2>"$tmp/$name.log"; then
    echo "FAIL $name: reshard failed: $(cat "$tmp/$name.log")"; fail=$((fail+1)); continue
  fi
  rm -rf "$tmp/$name/merged_strategy"
  "$py" tests/gen/roundtrip_check.py "$tmp/$name" "$c/expected" --crc >"$tmp/$name.check" 2>&1
  rc=$?
  if [ $rc -eq 0 ]; then
    echo "ok   $name"; pass=$((pass+1))
  elif [ $rc -eq 1 ] && grep -q "none in the destination strategy" "$tmp/$name.log"; then
    echo "ok   $name (MindSpore loads every file; optimizer states differ on purpose: complete tensors)"; pass=$((pass+1))
  else
    echo "FAIL $name"; grep -v "^OK" "$tmp/$name.check" | head -5; fail=$((fail+1))
  fi
done
rm -rf "$tmp"
echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
