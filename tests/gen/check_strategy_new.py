#!/usr/bin/env python3
"""Check `reshard strategy new` against real MindSpore: MindSpore accepts the generated strategy
files and its transform_checkpoints writes exactly what `reshard transform` writes.

Usage (with the MindSpore venv, from the repository root):
  /work/msvenv/bin/python tests/gen/check_strategy_new.py [--reshard BIN] [--reshard-new BIN]
                                                          [--work DIR] [--keep] [CASE ...]
  /work/msvenv/bin/python tests/gen/check_strategy_new.py --strategy-dir DIR --src SRC_DIR [--reshard BIN]

--reshard BIN      the reshard binary used for `transform` (default target/debug/reshard)
--reshard-new BIN  the binary used for `strategy new` (default: the same; lets the check run with a
                   test harness before the subcommand is wired into the main binary)
--strategy-dir DIR check an already generated strategy folder (ckpt_strategy_rank_*.{ckpt,json}
                   and merged_ckpt_strategy.*) against the complete checkpoint in SRC_DIR/rank_0
CASE               names of built-in cases to run (default all; see CASES below)

For every case:
  1. `reshard strategy new --from SRC ... --out WORK/<case>/strategy`
  2. MindSpore's merge_pipeline_strategys on the stage files gives the same layouts as our merged file
  3. mindspore.transform_checkpoints(SRC, WORK/<case>/ms, "checkpoint_", None, merged) succeeds
  4. `reshard transform` with the same strategy writes the same files, tensor for tensor (name, dtype,
     shape, bytes)
  5. mindspore.transform_checkpoints back to one complete checkpoint (src strategy = ours) gives the
     original weights (lossless)
Exit status: 0 = all equal, 1 = a mismatch, 2 = a tool failed.
"""
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import traceback

os.environ.setdefault("GLOG_v", "3")

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)

import mindspore as ms  # noqa: E402
from mindspore.train import node_strategy_pb2 as spb  # noqa: E402

import make_fixtures  # noqa: E402  (the MindSpore fixes it makes its fixtures with)
import roundtrip_check  # noqa: E402  (compare(): tensors by name, dtype, shape and bytes)

CONF = os.path.join(REPO, "tests", "fixtures", "conformance")
PREFIX = "checkpoint_"

# name -> (source folder with rank_0/, extra `strategy new` arguments, rules text or None, format)
CASES = {
    "dp2mp2": ("complete_to_dp2mp2/src", ["--dp", "2", "--mp", "2"], None, "ckpt"),
    "dp2mp2pp2_opt_adam": ("complete_to_dp2mp2_opt/src",
                           ["--dp", "2", "--mp", "2", "--pp", "2", "--optimizer-shard",
                            "--opt-shard-threshold-kb", "0"], None, "ckpt"),
    "dp2mp2pp2_json_4layers": ("complete_to_dp2mp1pp4_opt/src",
                               ["--dp", "2", "--mp", "2", "--pp", "2", "--json"], None, "ckpt"),
    "dp1mp4pp4_opt": ("complete_to_dp2mp1pp4_opt/src",
                      ["--dp", "1", "--mp", "4", "--pp", "4", "--optimizer-shard",
                       "--opt-shard-threshold-kb", "0"], None, "ckpt"),
    "dp4mp2_nested_opt2": ("complete_to_dp2mp2/src",
                           ["--dp", "4", "--mp", "2", "--optimizer-shard", "--opt-shard-size", "2",
                            "--opt-shard-threshold-kb", "0"],
                           "*.feed_forward.w1.weight = [dp*mp, 1]\n", "ckpt"),
    "pp2_tied_vocab_dp_bf16_adam": ("complete_to_dp2mp2pp2_opt/src",
                                    ["--dp", "2", "--mp", "2", "--pp", "2", "--preset", "llama-vocab-dp",
                                     "--optimizer-shard", "--opt-shard-threshold-kb", "0"],
                                    "stage *tok_embeddings* = first, last\n", "ckpt"),
    "safetensors_dp2mp2_opt": ("safetensors_complete_to_dp2mp2_opt/src",
                               ["--dp", "2", "--mp", "2", "--optimizer-shard", "--opt-shard-threshold-kb", "0"],
                               None, "safetensors"),
}


@contextlib.contextmanager
def mindspore_fixes():
    """make_fixtures.py's two fixes: sorted glob in merge_pipeline_strategys, contiguous arrays for
    safetensors.save_file (safetensors >= 0.6 ignores the strides of the views MindSpore passes)."""
    with make_fixtures.sorted_glob(), make_fixtures.contiguous_safetensors_save():
        yield


def run(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError("%s failed (%d):\n%s%s" % (" ".join(cmd), r.returncode, r.stdout, r.stderr))
    return r


def ckpt_files(root):
    return sorted(roundtrip_check.ckpt_files(root))


def layouts(path):
    """{param: (dev_matrix, tensor_maps, step, size)} of a protobuf strategy file."""
    m = spb.ParallelStrategyMap()
    with open(path, "rb") as f:
        m.ParseFromString(f.read())
    out = {}
    for it in m.parallel_layout_item:
        pl = it.parallel_layouts
        out[it.param_name] = (list(pl.dev_matrix[0].dim), [list(t.dim) for t in pl.tensor_map],
                              pl.opt_weight_shard_step, pl.opt_weight_shard_size)
    return out


def compare_dirs(got_dir, exp_dir):
    errors = []
    got, exp = ckpt_files(got_dir), ckpt_files(exp_dir)
    if not exp:
        errors.append("MindSpore wrote no checkpoint into %s" % exp_dir)
    if got != exp:
        errors.append("file lists differ: reshard %s, MindSpore %s" % (got, exp))
    for rel in sorted(set(got) & set(exp)):
        for e in roundtrip_check.compare(os.path.join(got_dir, rel), os.path.join(exp_dir, rel), False, False):
            errors.append("%s: %s" % (rel, e))
    return errors


def check_strategy(sdir, src, reshard, work, fmt):
    """Steps 2-5 for a generated strategy folder. Returns a list of errors."""
    errors = []
    stage_files = sorted(f for f in os.listdir(sdir) if f.startswith("ckpt_strategy_rank_"))
    merged = [f for f in os.listdir(sdir) if f.startswith("merged_ckpt_strategy.")]
    if not stage_files or len(merged) != 1:
        return ["%s: expected ckpt_strategy_rank_*.* and one merged_ckpt_strategy.*" % sdir]
    merged = os.path.join(sdir, merged[0])
    ext = os.path.splitext(merged)[1]

    # 2. MindSpore's own merge of the stage files
    stages = os.path.join(work, "stages_only")
    os.makedirs(stages)
    for f in stage_files:
        shutil.copy(os.path.join(sdir, f), stages)
    ms_merged = os.path.join(work, "ms_merged" + ext)
    with mindspore_fixes():
        ms.merge_pipeline_strategys(stages, ms_merged)
    if ext == ".ckpt":
        if layouts(ms_merged) != layouts(merged):
            errors.append("merge_pipeline_strategys gives other layouts than %s" % merged)
    else:
        import json
        with open(ms_merged) as a, open(merged) as b:
            if json.load(a) != json.load(b):
                errors.append("merge_pipeline_strategys gives another JSON than %s" % merged)

    # 3. MindSpore transforms with it, 4. reshard writes the same
    ms_out, rs_out = os.path.join(work, "ms"), os.path.join(work, "rs")
    with mindspore_fixes():
        ms.transform_checkpoints(src, ms_out, PREFIX, None, merged, output_format=fmt)
    run([reshard, "transform", "--src_ckpt_dir", src, "--dst_ckpt_strategy", merged,
         "--dst_ckpt_dir", rs_out, "--output_format", fmt, "--quiet"])
    errors += ["reshard vs MindSpore: " + e for e in compare_dirs(rs_out, ms_out)]

    # 5. back to complete with MindSpore: lossless
    back = os.path.join(work, "ms_back")
    with mindspore_fixes():
        ms.transform_checkpoints(ms_out, back, PREFIX, merged, None, output_format=fmt)
    (orig,) = [os.path.join(src, "rank_0", f) for f in os.listdir(os.path.join(src, "rank_0"))]
    got = os.path.join(back, "rank_0", PREFIX + "0." + fmt)
    for e in roundtrip_check.compare(got, orig, False, False):
        errors.append("complete -> strategy -> complete: " + e)
    return errors


def main(argv):
    args = list(argv)

    def opt(name, default=None):
        if name in args:
            i = args.index(name)
            val = args[i + 1]
            del args[i:i + 2]
            return val
        return default

    reshard = os.path.abspath(opt("--reshard", os.path.join(REPO, "target", "debug", "reshard")))
    reshard_new = os.path.abspath(opt("--reshard-new", reshard))
    sdir, src = opt("--strategy-dir"), opt("--src")
    work_root = opt("--work")
    keep = "--keep" in args
    args = [a for a in args if a != "--keep"]
    if any(a.startswith("--") for a in args) or (sdir is None) != (src is None):
        sys.stderr.write(__doc__)
        return 2
    names = args or list(CASES)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        sys.stderr.write("unknown case(s) %s; cases: %s\n" % (unknown, ", ".join(CASES)))
        return 2
    root = work_root or tempfile.mkdtemp(prefix="reshard_sn_check_")
    status = 0
    try:
        if sdir is not None:
            jobs = [("given", None)]
        else:
            jobs = [(n, CASES[n]) for n in names]
        for name, spec in jobs:
            work = os.path.join(root, name)
            shutil.rmtree(work, ignore_errors=True)
            os.makedirs(work)
            try:
                if spec is None:
                    case_src, case_sdir, fmt = os.path.abspath(src), os.path.abspath(sdir), "ckpt"
                    if any(f.endswith(".safetensors") for _, _, fs in os.walk(case_src) for f in fs):
                        fmt = "safetensors"
                else:
                    rel_src, extra, rules, fmt = spec
                    case_src = os.path.join(CONF, rel_src)
                    case_sdir = os.path.join(work, "strategy")
                    cmd = [reshard_new, "strategy", "new", "--from", case_src, "--out", case_sdir] + extra
                    if rules:
                        rules_file = os.path.join(work, "case.rules")
                        with open(rules_file, "w") as f:
                            f.write(rules)
                        cmd += ["--rules", rules_file]
                    run(cmd)
                errors = check_strategy(case_sdir, case_src, reshard, work, fmt)
            except Exception as e:  # noqa: BLE001
                print("ERROR %s: %s" % (name, e))
                traceback.print_exc()
                status = max(status, 2)
                continue
            if errors:
                status = max(status, 1)
                print("FAIL  %s" % name)
                for e in errors:
                    print("  " + e)
            else:
                print("OK    %s" % name)
    finally:
        if keep or work_root:
            print("work folder: %s" % root)
        else:
            shutil.rmtree(root, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
