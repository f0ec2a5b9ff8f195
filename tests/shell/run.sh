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
passed=0
failed=0

ok() {
  passed=$((passed + 1))
}
fail() {
  failed=$((failed + 1))
  echo "FAIL: $*"
}

# same_as_expected CASE DST [EXT]: every expected file of the case, byte for byte.
same_as_expected() {
  local c=$1 dst=$2 n=0 f rel
  while IFS= read -r f; do
    rel=${f#"$fixtures/$c/expected/"}
    n=$((n + 1))
    if ! cmp -s "$f" "$dst/$rel"; then
      fail "$c: $dst/$rel differs from MindSpore's $f"
      return
    fi
  done < <(find "$fixtures/$c/expected" -type f | sort)
  if [ "$n" -eq 0 ]; then
    fail "$c: no expected files"
  else
    ok
  fi
}

# expect_status WANT NAME CMD...: runs CMD (output to $out/NAME.log), checks its exit status.
expect_status() {
  local want=$1 name=$2 got=0
  shift 2
  "$@" >"$out/$name.log" 2>&1 || got=$?
  if [ "$got" -eq "$want" ]; then
    ok
  else
    fail "$name: exit status $got, want $want"
    sed 's/^/    /' "$out/$name.log"
  fi
}

expect_log() { # NAME TEXT
  if grep -qF -- "$2" "$out/$1.log"; then ok; else fail "$1: log lacks '$2'"; fi
}

# 1. Complete -> dp2mp2, space-separated flags, MindFormers' log lines.
c=complete_to_dp2mp2
expect_status 0 c2d "$script" --src_ckpt_dir "$fixtures/$c/src" --dst_ckpt_dir "$out/c2d" \
  --dst_ckpt_strategy "$fixtures/$c/dst_strategy.ckpt" --prefix checkpoint_
same_as_expected "$c" "$out/c2d"
expect_log c2d "src_ckpt_strategy: None"
expect_log c2d "......Transform succeed!......"

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
expect_log dist_1 "process 1 of 2 (RANK/WORLD_SIZE (torchrun))"
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
expect_log env_bin "via RESHARD_BIN"
same_as_expected "$c" "$out/env_bin"
mkdir -p "$out/elsewhere"
cp "$script" "$out/elsewhere/transform_ckpt.sh"
expect_status 0 path_bin env -u CARGO_TARGET_DIR PATH="$bin_dir:$PATH" "$out/elsewhere/transform_ckpt.sh" \
  --src_ckpt_dir "$fixtures/$c/src" --dst_ckpt_dir "$out/path_bin" \
  --dst_ckpt_strategy "$fixtures/$c/dst_strategy.ckpt"
same_as_expected "$c" "$out/path_bin"
expect_status 127 no_bin env -u CARGO_TARGET_DIR PATH=/usr/bin:/bin "$out/elsewhere/transform_ckpt.sh" \
  --src_ckpt_dir "$fixtures/$c/src" --dst_ckpt_dir "$out/no_bin"
expect_log no_bin "cannot find the reshard binary"

# 6. Bad calls: usage errors (2), failing transforms (reshard's status, message on stderr).
expect_status 2 no_src "$script" --dst_ckpt_dir "$out/x"
expect_log no_src "--src_ckpt_dir is required"
expect_status 2 unknown_flag "$script" --src_ckpt_dir a --dst_ckpt_dir b --rank 3
expect_log unknown_flag "unknown option '--rank'"
expect_status 2 missing_value "$script" --src_ckpt_dir
expect_status 0 help "$script" --help
expect_log help "usage:"
expect_status 1 missing_src "$script" --src_ckpt_dir "$out/nope" --dst_ckpt_dir "$out/x"
expect_log missing_src "$out/nope"
expect_log missing_src "Transform failed"
if grep -q "Transform succeed" "$out/missing_src.log"; then fail "missing_src: claimed success"; else ok; fi
expect_status 1 missing_strategy "$script" --src_ckpt_dir "$fixtures/$c/src" --dst_ckpt_dir "$out/x" \
  --dst_ckpt_strategy "$fixtures/$c/nope.ckpt"
expect_log missing_strategy "nope.ckpt"
c=dp2mp2_to_complete
expect_status 1 wrong_strategy "$script" --src_ckpt_dir "$fixtures/$c/src" --dst_ckpt_dir "$out/x" \
  --src_ckpt_strategy "$fixtures/dp2mp2pp2_to_dp1mp2pp2/src_strategy.ckpt"
expect_log wrong_strategy "rank folders are missing"
expect_status 2 bad_format "$script" --src_ckpt_dir "$fixtures/$c/src" --dst_ckpt_dir "$out/x" \
  --src_ckpt_strategy "$fixtures/$c/src_strategy.ckpt" --output_format npz
expect_log bad_format "invalid value 'npz'"
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
expect_log auto_0 "reshard[rank 0]: destination: 2 rank(s)"
RESHARD_BIN=/nonexistent expect_status 127 auto_no_bin "$root/bindings/shell/auto_trans_ckpt.sh" --load_checkpoint x

echo "shell suite: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
