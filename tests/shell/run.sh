#!/usr/bin/env bash
# Shell suite: bindings/shell/transform_ckpt.sh (MindFormers' transform_ckpt.py flags over the
# reshard CLI) on the MindSpore-made fixtures; outputs compared with `cmp` to MindSpore's.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
cd "$root" || exit 1
cargo build --release -p reshard-ffi -p reshard-cli || exit 1
script="$root/bindings/shell/transform_ckpt.sh"
fixtures="$root/tests/fixtures/conformance"
bin_dir="${CARGO_TARGET_DIR:-$root/target}/release"
out=$(mktemp -d "${TMPDIR:-/tmp}/reshard-shell.XXXXXX")
trap 'rm -rf "$out"' EXIT
# shellcheck source=tests/lib.sh
source "$root/tests/lib.sh"

# 1. Complete -> dp2mp2, space-separated flags, MindFormers' log lines.
c=complete_to_dp2mp2
expect_status 0 c2d "$script" --src_ckpt_dir "$fixtures/$c/src" --dst_ckpt_dir "$out/c2d" \
  --dst_ckpt_strategy "$fixtures/$c/dst_strategy.ckpt" --prefix checkpoint_
same_as_expected "$c" "$out/c2d"
expect_log "$out/c2d.log" "src_ckpt_strategy: None"
expect_log "$out/c2d.log" "......Transform succeed!......"

# 2. Pipeline stages given as strategy folders, --flag=value form.
c=dp2mp2pp2_to_dp1mp2pp2
expect_status 0 pp "$script" --src_ckpt_strategy="$fixtures/$c/src_strategy_stages" \
  --dst_ckpt_strategy="$fixtures/$c/dst_strategy_stages" --src_ckpt_dir="$fixtures/$c/src" \
  --dst_ckpt_dir="$out/pp"
same_as_expected "$c" "$out/pp"

# 3. Merge to complete, with transform_ckpt.py's "None" and "" for no strategy.
c=dp2mp2_to_complete
expect_status 0 d2c "$script" --src_ckpt_strategy "$fixtures/$c/src_strategy.ckpt" \
  --dst_ckpt_strategy None --src_ckpt_dir "$fixtures/$c/src" --dst_ckpt_dir "$out/d2c"
same_as_expected "$c" "$out/d2c"
expect_status 0 d2c_empty "$script" --src_ckpt_strategy "$fixtures/$c/src_strategy.ckpt" \
  --dst_ckpt_strategy "" --src_ckpt_dir "$fixtures/$c/src" --dst_ckpt_dir "$out/d2c_empty"
same_as_expected "$c" "$out/d2c_empty"

# 4. safetensors out.
c=safetensors_dp2mp2_to_dp1mp4
expect_status 0 st "$script" --src_ckpt_strategy "$fixtures/$c/src_strategy.ckpt" \
  --dst_ckpt_strategy "$fixtures/$c/dst_strategy.ckpt" --src_ckpt_dir "$fixtures/$c/src" \
  --dst_ckpt_dir "$out/st" --output_format safetensors
same_as_expected "$c" "$out/st"

# 4b. --distributed passed through: two processes with RANK/WORLD_SIZE (torchrun's), each its share.
c=complete_to_dp2mp2
for r in 0 1; do
  env -u OMPI_COMM_WORLD_RANK -u PMI_RANK -u SLURM_PROCID -u MS_NODE_ID -u MS_ROLE RANK=$r WORLD_SIZE=2 \
    "$script" --src_ckpt_dir "$fixtures/$c/src" --dst_ckpt_dir "$out/dist" \
    --dst_ckpt_strategy "$fixtures/$c/dst_strategy.ckpt" --distributed --timeout 30 >"$out/dist_$r.log" 2>&1 &
done
dist_ok=1
for job in $(jobs -p); do wait "$job" || dist_ok=0; done
if [ "$dist_ok" = 1 ]; then ok; else fail "transform_ckpt.sh --distributed failed"; cat "$out"/dist_*.log; fi
same_as_expected "$c" "$out/dist"
expect_log "$out/dist_1.log" "process 1 of 2 (RANK/WORLD_SIZE (torchrun))"
expect_status 0 dist_flags "$script" --src_ckpt_dir "$fixtures/$c/src" --dst_ckpt_dir "$out/dist_flags" \
  --dst_ckpt_strategy "$fixtures/$c/dst_strategy.ckpt" --distributed --process_index 0 --process_count 1
same_as_expected "$c" "$out/dist_flags"

# 5. Finding the binary: $RESHARD_BIN first, then PATH when the script is outside the tree.
c=complete_to_dp2mp2
cat >"$out/logging_reshard" <<WRAP
#!/usr/bin/env bash
echo "via RESHARD_BIN" >&2
exec "$bin_dir/reshard" "\$@"
WRAP
chmod +x "$out/logging_reshard"
expect_status 0 env_bin env RESHARD_BIN="$out/logging_reshard" "$script" \
  --src_ckpt_dir "$fixtures/$c/src" --dst_ckpt_dir "$out/env_bin" \
  --dst_ckpt_strategy "$fixtures/$c/dst_strategy.ckpt"
expect_log "$out/env_bin.log" "via RESHARD_BIN"
same_as_expected "$c" "$out/env_bin"
mkdir -p "$out/elsewhere"
cp "$script" "$out/elsewhere/transform_ckpt.sh"
expect_status 0 path_bin env -u CARGO_TARGET_DIR PATH="$bin_dir:$PATH" "$out/elsewhere/transform_ckpt.sh" \
  --src_ckpt_dir "$fixtures/$c/src" --dst_ckpt_dir "$out/path_bin" \
  --dst_ckpt_strategy "$fixtures/$c/dst_strategy.ckpt"
same_as_expected "$c" "$out/path_bin"
expect_status 127 no_bin env -u CARGO_TARGET_DIR PATH=/usr/bin:/bin "$out/elsewhere/transform_ckpt.sh" \
  --src_ckpt_dir "$fixtures/$c/src" --dst_ckpt_dir "$out/no_bin"
expect_log "$out/no_bin.log" "cannot find the reshard binary"

# 6. Bad calls: usage errors (2), failing transforms (reshard's status, message on stderr).
expect_status 2 no_src "$script" --dst_ckpt_dir "$out/x"
expect_log "$out/no_src.log" "--src_ckpt_dir is required"
expect_status 2 unknown_flag "$script" --src_ckpt_dir a --dst_ckpt_dir b --rank 3
expect_log "$out/unknown_flag.log" "unknown option '--rank'"
expect_status 2 missing_value "$script" --src_ckpt_dir
expect_status 0 help "$script" --help
expect_log "$out/help.log" "usage:"
expect_status 1 missing_src "$script" --src_ckpt_dir "$out/nope" --dst_ckpt_dir "$out/x"
expect_log "$out/missing_src.log" "$out/nope"
expect_log "$out/missing_src.log" "Transform failed"
if grep -q "Transform succeed" "$out/missing_src.log"; then fail "missing_src: claimed success"; else ok; fi
expect_status 1 missing_strategy "$script" --src_ckpt_dir "$fixtures/$c/src" --dst_ckpt_dir "$out/x" \
  --dst_ckpt_strategy "$fixtures/$c/nope.ckpt"
expect_log "$out/missing_strategy.log" "nope.ckpt"
c=dp2mp2_to_complete
expect_status 1 wrong_strategy "$script" --src_ckpt_dir "$fixtures/$c/src" --dst_ckpt_dir "$out/x" \
  --src_ckpt_strategy "$fixtures/dp2mp2pp2_to_dp1mp2pp2/src_strategy.ckpt"
expect_log "$out/wrong_strategy.log" "rank folders are missing"
expect_status 2 bad_format "$script" --src_ckpt_dir "$fixtures/$c/src" --dst_ckpt_dir "$out/x" \
  --src_ckpt_strategy "$fixtures/$c/src_strategy.ckpt" --output_format npz
expect_log "$out/bad_format.log" "invalid value 'npz'"
if [ -e "$out/x" ]; then fail "failed runs wrote $out/x"; else ok; fi

# auto_trans_ckpt.sh: two ranks launched at once (mp2 inference from a complete checkpoint), as
# a run_distribute.sh-style launcher would, after the runtime wrote its strategy files.
c=complete_to_mp2
auto_out="$out/auto/output"
mkdir -p "$auto_out/strategy"
for r in 0 1; do cp "$fixtures/$c/dst_strategy.ckpt" "$auto_out/strategy/ckpt_strategy_rank_$r.ckpt"; done
for r in 0 1; do
  RANK_ID=$r RANK_SIZE=2 "$root/bindings/shell/auto_trans_ckpt.sh" --load_checkpoint "$fixtures/$c/src" \
    --output_dir "$auto_out" --timeout 30 >"$out/auto_$r.path" 2>"$out/auto_$r.log" &
done
wait
for r in 0 1; do
  if [ "$(cat "$out/auto_$r.path")" = "$auto_out/transformed_checkpoint/rank_$r/checkpoint_$r.ckpt" ]; then ok
  else fail "auto_trans_ckpt.sh rank $r printed '$(cat "$out/auto_$r.path")'"; sed 's/^/    /' "$out/auto_$r.log"; fi
done
same_as_expected "$c" "$auto_out/transformed_checkpoint"
expect_log "$out/auto_0.log" "reshard[rank 0]: destination: 2 rank(s)"
RESHARD_BIN=/nonexistent expect_status 127 auto_no_bin "$root/bindings/shell/auto_trans_ckpt.sh" --load_checkpoint x

summary shell
