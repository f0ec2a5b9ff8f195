#!/usr/bin/env bash
# A/B timings behind the executor's commit messages: alternates reshard builds (and cp) on one of
# the bench's cases, N rounds, and prints the median wall and CPU time of each.
#
#   benches/ab.sh [--dir DIR] [--cold] [--sync] N CASE NAME=BIN|cp ...
#
#   DIR   a folder left by `reshard-bench --dir DIR` (complete/, sharded8/, strategy/); default bench-out
#   CASE  c8 (complete -> 8), 84 (8 -> 4) or 8c (8 -> complete)
#   NAME=BIN   a reshard binary to time under NAME; NAME=cp times `cp -r` of the same source
#   --sync     reshard with its default fsync and `cp -r && sync` (default: --no-sync and plain cp)
#   --cold     drop the source files from the page cache before every run
#
# Example (two builds against cp):
#   git worktree add /tmp/old be64bb4~ && (cd /tmp/old && cargo build --release -p reshard-cli)
#   benches/ab.sh 7 8c old=/tmp/old/target/release/reshard new=target/release/reshard cp=cp
set -euo pipefail
dir=bench-out cold=0 sync=0
while [[ $# -gt 0 && $1 == --* ]]; do
  case $1 in
    --dir) dir=$2; shift 2 ;;
    --cold) cold=1; shift ;;
    --sync) sync=1; shift ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
[[ $# -ge 3 ]] || { sed -n 2,16p "$0"; exit 2; }
n=$1 case=$2; shift 2
cd "$dir"
case $case in
  c8) src=complete; args=(--dst_ckpt_strategy strategy/train_dp2mp2pp2.merged.json) ;;
  84) src=sharded8; args=(--src_ckpt_strategy strategy/train_dp2mp2pp2.merged.json
                          --dst_ckpt_strategy strategy/finetune_dp1mp2pp2.merged.json) ;;
  8c) src=sharded8; args=(--src_ckpt_strategy strategy/train_dp2mp2pp2.merged.json) ;;
  *) echo "unknown case $case (c8, 84, 8c)" >&2; exit 2 ;;
esac
(( sync )) || args+=(--no-sync)
log=$(mktemp -d)
trap 'rm -rf "$log" out' EXIT
for ((i = 0; i < n; i++)); do
  for spec in "$@"; do
    name=${spec%%=*} bin=${spec#*=}
    rm -rf out && sync && sleep 0.2
    if (( cold )); then
      python3 - "$src" <<'EOF'
import glob, os, sys
for f in glob.glob(os.path.join(sys.argv[1], "rank_*", "*")):
    fd = os.open(f, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
EOF
    fi
    if [[ $bin == cp ]]; then
      if (( sync )); then cmd=(sh -c 'cp -r "$0" out && sync' "$src"); else cmd=(cp -r "$src" out); fi
    else
      cmd=("$bin" transform -q --src_ckpt_dir "$src" "${args[@]}" --dst_ckpt_dir out)
    fi
    /usr/bin/time -a -o "$log/$name" -f "%e %U %S" "${cmd[@]}"
  done
done
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
for spec in "$@"; do
  name=${spec%%=*}
  printf '%-10s wall %s s  cpu %s s  walls %s\n' "$name" \
    "$(awk '{print $1}' "$log/$name" | median)" "$(awk '{print $2+$3}' "$log/$name" | median)" \
    "$(awk '{print $1}' "$log/$name" | sort -n | tr '\n' ' ')"
done
