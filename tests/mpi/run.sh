#!/usr/bin/env bash
# MPI suite: `reshard transform --distributed` under Open MPI's mpirun (Debian's openmpi-bin,
# installed when missing) for 1, 2, 3 and 5 processes, under a torchrun-style and an msrun-style
# environment set by hand, with a broken source, a failing share, and a process killed (the
# others time out naming it; a rerun completes). Outputs are compared with `cmp` to the files
# MindSpore made for the conformance fixtures. The failure cases run their processes by hand, as
# torchrun or srun would, and under mpirun (which kills the other processes when one exits
# non-zero: every process's own output must still name the failure).
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
cd "$root" || exit 1
if ! command -v mpirun >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  { apt-get update -qq && apt-get install -y -qq openmpi-bin >/dev/null; } || {
    echo "mpi suite: cannot install openmpi-bin (apt-get install -y openmpi-bin)"
    exit 1
  }
fi
cargo build --release -p reshard-cli || exit 1
bin="${CARGO_TARGET_DIR:-$root/target}/release/reshard"
fixtures="$root/tests/fixtures/conformance"
out=$(mktemp -d "${TMPDIR:-/tmp}/reshard-mpi.XXXXXX")
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null; done
  rm -rf "$out"
}
trap cleanup EXIT
# shellcheck source=tests/lib.sh
source "$root/tests/lib.sh"

# Every launcher variable removed, so that the suite's own environment (a CI job under Slurm)
# does not pick the process index.
clean_env=(env -u RANK -u WORLD_SIZE -u MS_NODE_ID -u MS_WORKER_NUM -u MS_ROLE -u OMPI_COMM_WORLD_RANK
  -u OMPI_COMM_WORLD_SIZE -u PMI_RANK -u PMI_SIZE -u SLURM_PROCID -u SLURM_NTASKS -u RANK_ID -u RANK_SIZE)
mpi=(mpirun --allow-run-as-root --oversubscribe)

# The job's arguments for a case: its strategies as stage folders where it has them.
job_args() { # CASE DST [TIMEOUT]
  local c=$1
  local a=(transform --distributed --src_ckpt_dir "$fixtures/$c/src" --dst_ckpt_dir "$2" --timeout "${3:-30}")
  [ -d "$fixtures/$c/src_strategy_stages" ] && a+=(--src_ckpt_strategy "$fixtures/$c/src_strategy_stages")
  [ -d "$fixtures/$c/dst_strategy_stages" ] && a+=(--dst_ckpt_strategy "$fixtures/$c/dst_strategy_stages")
  printf '%s\0' "${a[@]}"
}

# Each process's stderr in its own file: DST.log.I.
per_process_log='exec "$0" "$@" 2>"$RESHARD_LOG.$OMPI_COMM_WORLD_RANK"'

# 1. mpirun -np N for N = 1, 2, 3 (3 divides neither 8 nor 4 ranks) and 5 (more processes than
#    the 4 ranks of 8 -> 4: one idle).
for c in complete_to_dp2mp2pp2_opt dp2mp2pp2_to_dp1mp2pp2; do
  for n in 1 2 3 5; do
    [ "$c" = complete_to_dp2mp2pp2_opt ] && [ "$n" = 5 ] && continue
    dst="$out/$c-np$n"
    mapfile -d '' args < <(job_args "$c" "$dst")
    expect_status 0 "$c-np$n" "${clean_env[@]}" RESHARD_LOG="$dst.log" "${mpi[@]}" -x RESHARD_LOG -np "$n" \
      bash -c "$per_process_log" "$bin" "${args[@]}"
    same_as_expected "$c" "$dst"
    for ((i = 0; i < n; i++)); do
      expect_log "$dst.log.$i" "reshard: process $i of $n (OMPI_COMM_WORLD_RANK/OMPI_COMM_WORLD_SIZE (Open MPI))"
      expect_log "$dst.log.$i" "all $n share(s) done and verified"
    done
    expect_status 0 "$c-np$n-verify" "$bin" verify "$dst"
  done
done
expect_log "$out/dp2mp2pp2_to_dp1mp2pp2-np5.log.4" "no ranks of its own"

# 2. torchrun's environment (RANK/WORLD_SIZE) set by hand, 3 processes started at once.
c=complete_to_dp2mp2pp2_opt
dst="$out/torchrun"
mapfile -d '' args < <(job_args "$c" "$dst")
for r in 0 1 2; do
  "${clean_env[@]}" RANK=$r WORLD_SIZE=3 LOCAL_RANK=0 "$bin" "${args[@]}" >"$out/torchrun.$r.log" 2>&1 &
  pids+=($!)
done
for r in 0 1 2; do
  if wait "${pids[$r]}"; then ok; else fail "torchrun-style process $r failed"; sed 's/^/    /' "$out/torchrun.$r.log"; fi
  expect_log "$out/torchrun.$r.log" "process $r of 3 (RANK/WORLD_SIZE (torchrun))"
done
pids=()
same_as_expected "$c" "$dst"

# 3. msrun's environment: two workers (MS_NODE_ID/MS_WORKER_NUM) and its scheduler, which runs
#    the command too and takes no share.
dst="$out/msrun"
mapfile -d '' args < <(job_args "$c" "$dst")
for r in 0 1 sched; do
  if [ "$r" = sched ]; then
    "${clean_env[@]}" MS_ROLE=MS_SCHED MS_WORKER_NUM=2 RANK_ID=0 "$bin" "${args[@]}" >"$out/msrun.$r.log" 2>&1 &
  else
    "${clean_env[@]}" MS_ROLE=MS_WORKER MS_NODE_ID=$r MS_WORKER_NUM=2 RANK_ID=$r "$bin" "${args[@]}" \
      >"$out/msrun.$r.log" 2>&1 &
  fi
  pids+=($!)
done
for i in 0 1 2; do
  if wait "${pids[$i]}"; then ok; else fail "msrun-style process $i failed"; fi
done
pids=()
same_as_expected "$c" "$dst"
expect_log "$out/msrun.sched.log" "msrun's scheduler"
if [ -e "$dst/reshard_share_2_of_2.json" ] || ls "$dst" | grep -q "_of_3"; then fail "msrun's scheduler took a share"; else ok; fi

# by_hand NAME N ARGS...: N processes started at once with torchrun's environment (a launcher
# that, unlike mpirun, does not kill the others when one fails); their statuses in NAME.status.I.
by_hand() {
  local name=$1 n=$2 r
  shift 2
  local ps=()
  for ((r = 0; r < n; r++)); do
    "${clean_env[@]}" RANK=$r WORLD_SIZE=$n "$bin" "$@" >"$out/$name.log.$r" 2>&1 &
    ps+=($!)
  done
  for ((r = 0; r < n; r++)); do
    local st=0
    wait "${ps[$r]}" || st=$?
    echo "$st" >"$out/$name.status.$r"
  done
}

# 4. A broken source file: every process fails and names it; no output is written. Under
#    mpirun too, which kills the other processes when one exits non-zero: each process, once it
#    has printed its error, waits until every other one has printed its own (its record's
#    failure_seen mark) before it exits, so every process's output names the file.
c=dp2mp2pp2_to_dp1mp2pp2
cp -r "$fixtures/$c/src" "$out/broken_src"
broken=$(find "$out/broken_src/rank_5" -type f | head -1)
truncate -s 100 "$broken"
dst="$out/broken"
mapfile -d '' args < <(job_args "$c" "$dst")
args[3]="$out/broken_src"
by_hand broken 3 "${args[@]}"
for i in 0 1 2; do
  if [ "$(cat "$out/broken.status.$i")" = 1 ]; then ok; else fail "broken: process $i exit status $(cat "$out/broken.status.$i")"; fi
  expect_log "$out/broken.log.$i" "$broken"
done
if find "$dst" -name '*.ckpt' -path '*rank_*' | grep -q .; then fail "broken: outputs were written"; else ok; fi
dst="$out/broken_mpi"
mapfile -d '' args < <(job_args "$c" "$dst")
args[3]="$out/broken_src"
expect_status 1 broken_mpi "${clean_env[@]}" RESHARD_LOG="$dst.log" "${mpi[@]}" -x RESHARD_LOG -np 3 \
  bash -c "$per_process_log" "$bin" "${args[@]}"
for i in 0 1 2; do expect_log "$dst.log.$i" "$broken"; done

# 5. A share that fails while writing (rank_3's folder cannot be made): its process names its
#    own error, the others fail quoting it and naming the share.
dst="$out/failing_share"
mkdir -p "$dst" && echo "not a folder" >"$dst/rank_3"
mapfile -d '' args < <(job_args "$c" "$dst")
by_hand failing_share 2 "${args[@]}"
for i in 0 1; do
  if [ "$(cat "$out/failing_share.status.$i")" = 1 ]; then ok; else fail "failing_share: process $i exit status $(cat "$out/failing_share.status.$i")"; fi
done
expect_log "$out/failing_share.log.1" "$dst/rank_3"
expect_log "$out/failing_share.log.0" "share 1 of 2 (rank_2..rank_3 (2 ranks)"
expect_log "$out/failing_share.log.0" "failed, so the job cannot complete"
expect_log "$out/failing_share.log.0" "$dst/rank_3"
# The same under mpirun: process 1 fails at once and waits; process 0 writes its share, finds
# the failure, prints it and only then do both exit.
dst="$out/failing_share_mpi"
mkdir -p "$dst" && echo "not a folder" >"$dst/rank_3"
mapfile -d '' args < <(job_args "$c" "$dst")
expect_status 1 failing_share_mpi "${clean_env[@]}" RESHARD_LOG="$dst.log" "${mpi[@]}" -x RESHARD_LOG -np 2 \
  bash -c "$per_process_log" "$bin" "${args[@]}"
for i in 0 1; do expect_log "$dst.log.$i" "$dst/rank_3"; done
expect_log "$dst.log.0" "failed, so the job cannot complete"

# 6. A process killed: process 1 (torchrun-style environment) is stopped inside its share by
#    holding rank_3's manifest lock, then killed with SIGKILL; process 0 gives up after the
#    timeout naming share 1; a rerun of both completes, keeping process 0's ranks.
dst="$out/killed"
mkdir -p "$dst/rank_3"
# The lock is held by the process that is killed below: `flock FILE sleep 600` would leave it
# with `sleep`, which outlives a killed `flock` and kept the rerun waiting for 10 minutes.
( exec 9>>"$dst/rank_3/.reshard_manifest.lock" && flock 9 && exec sleep 600 ) &
holder=$!
pids+=($holder)
mapfile -d '' args < <(job_args "$c" "$dst" 3)
"${clean_env[@]}" RANK=1 WORLD_SIZE=2 "$bin" "${args[@]}" >"$out/killed.1.log" 2>&1 &
victim=$!
pids+=($victim)
for _ in $(seq 100); do
  grep -q '"state": "running"' "$dst/reshard_share_1_of_2.json" 2>/dev/null && break
  sleep 0.1
done
expect_log "$dst/reshard_share_1_of_2.json" '"state": "running"'
{ kill -9 "$victim" && wait "$victim"; } 2>/dev/null
expect_status 1 killed.0 "${clean_env[@]}" RANK=0 WORLD_SIZE=2 "$bin" "${args[@]}"
expect_log "$out/killed.0.log" "gave up after 3s without news from 1 share(s)"
expect_log "$out/killed.0.log" "share 1 of 2 (rank_2..rank_3 (2 ranks)): running on host"
{ kill -9 "$holder" && wait "$holder"; } 2>/dev/null
pids=()
for r in 0 1; do
  "${clean_env[@]}" RANK=$r WORLD_SIZE=2 "$bin" "${args[@]}" >"$out/rerun.$r.log" 2>&1 &
  pids+=($!)
done
for r in 0 1; do
  if wait "${pids[$r]}"; then ok; else fail "rerun process $r failed"; sed 's/^/    /' "$out/rerun.$r.log"; fi
done
pids=()
expect_log "$out/rerun.0.log" "kept 2 file(s)"
same_as_expected "$c" "$dst"
expect_status 0 killed-verify "$bin" verify "$dst"

summary mpi
