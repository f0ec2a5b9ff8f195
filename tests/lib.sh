# shellcheck shell=bash
# What the shell-driven suites (tests/shell/run.sh, tests/mpi/run.sh) share, sourced by them:
# counting checks, comparing outputs with the files MindSpore made, checking a command's exit
# status and a log's lines. The suite sets `fixtures` (tests/fixtures/conformance) and `out`
# (its scratch folder) before it calls these.
passed=0
failed=0

ok() {
  passed=$((passed + 1))
}

fail() {
  failed=$((failed + 1))
  echo "FAIL: $*"
}

# same_as_expected CASE DST: every expected file of the case, byte for byte.
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

# expect_status WANT NAME CMD...: runs CMD with its output in $out/NAME.log and checks its exit
# status.
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

# expect_log FILE TEXT: FILE has a line containing TEXT (shown when it has not).
expect_log() {
  if grep -qF -- "$2" "$1"; then ok; else
    fail "$1 lacks '$2'"
    sed 's/^/    /' "$1"
  fi
}

# summary SUITE: the last line, and the suite's status.
summary() {
  echo "$1 suite: $passed passed, $failed failed"
  [ "$failed" -eq 0 ]
}
