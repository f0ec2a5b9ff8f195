"""Tests of bindings/python/reshard.py (ctypes) on the MindSpore-made fixtures: outputs must be
byte for byte what mindspore.transform_checkpoints wrote; bad calls raise ReshardError."""

import filecmp
import json
import os
import re
import subprocess
import sys
import threading
import warnings

import pytest

import reshard
from conformance import CASES, FIXTURES, ROOT, HeldCall, in_threads
from reshard import ReshardError, Status


def case(name):
    d = os.path.join(FIXTURES, name)
    with open(os.path.join(d, "case.json")) as f:
        c = json.load(f)
    c["dir"] = d
    c["src"] = os.path.join(d, "src")
    for k in ("src_strategy", "dst_strategy", "src_strategy_stages", "dst_strategy_stages"):
        if c.get(k):
            c[k] = os.path.join(d, c[k])
    return c


def assert_same_outputs(c, dst, files=None):
    files = files if files is not None else c["expected_files"]
    assert files
    for rel in files:
        got, want = os.path.join(dst, rel), os.path.join(c["dir"], "expected", rel)
        assert os.path.isfile(got), f"missing output {got}"
        assert filecmp.cmp(got, want, shallow=False), f"{got} differs from MindSpore's {want}"


def test_status_codes_and_abi_match_the_header():
    with open(os.path.join(ROOT, "include", "reshard.h")) as f:
        header = f.read()
    codes = {m[0]: int(m[1]) for m in re.findall(r"RESHARD_STATUS_(\w+) = (\d+)", header)}
    assert codes == {s.name: s.value for s in Status}
    abi = re.search(r"#define RESHARD_ABI_VERSION (\d+)", header)
    assert int(abi.group(1)) == reshard.ABI_VERSION
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", reshard.version())


@pytest.mark.parametrize("io", ["auto", "pread"])
@pytest.mark.parametrize("name", CASES)
def test_transform_checkpoints_matches_mindspore(name, io, tmp_path):
    c = case(name)
    dst = tmp_path / "out"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reshard.transform_checkpoints(
            c["src"],
            str(dst),
            c["prefix"],
            c["src_strategy"],
            c["dst_strategy"],
            output_format=c["output_format"],
            io=io,
        )
    if not caught:
        assert_same_outputs(c, dst)
        return
    # reshard deliberately writes some parameters differently (complete instead of MindSpore's
    # raw slice) and says so; the core's conformance test compares those cases tensor by tensor.
    assert all("MindSpore would" in str(w.message) for w in caught), [str(w.message) for w in caught]
    for rel in c["expected_files"]:
        assert (dst / rel).is_file(), rel


def test_positional_arguments_in_mindspore_order(tmp_path):
    # MindSpore 2.10: (src, dst, prefix, src_strategy, dst_strategy, process_num, output_format)
    c = case("safetensors_dp2mp2_to_dp1mp4")
    reshard.transform_checkpoints(
        c["src"], str(tmp_path), "checkpoint_", c["src_strategy"], c["dst_strategy"], 1, "safetensors"
    )
    assert_same_outputs(c, tmp_path)


def test_strategy_folders_are_merged_in_memory(tmp_path):
    c = case("dp2mp2pp2_to_dp1mp2pp2")
    reshard.transform_checkpoints(
        c["src"], tmp_path, "checkpoint_", c["src_strategy_stages"], c["dst_strategy_stages"]
    )
    assert_same_outputs(c, tmp_path)


def test_merge_pipeline_strategys(tmp_path):
    c = case("dp2mp2pp2_to_dp1mp2pp2")
    for stages, merged in ((c["src_strategy_stages"], c["src_strategy"]), (c["dst_strategy_stages"], c["dst_strategy"])):
        out = tmp_path / "new" / "folder" / os.path.basename(merged)
        reshard.merge_pipeline_strategys(stages, str(out))
        assert filecmp.cmp(out, merged, shallow=False)
    # JSON stage files: the same JSON as MindSpore's merged file.
    j = case("json_dp2mp2pp2_opt_to_dp1mp4")
    out = tmp_path / "merged.json"
    reshard.merge_pipeline_strategys(j["src_strategy_stages"], out)
    with open(out) as a, open(j["src_strategy"]) as b:
        assert json.load(a) == json.load(b)


def test_merge_errors(tmp_path):
    with pytest.raises(ReshardError) as e:
        reshard.merge_pipeline_strategys(tmp_path / "nope", tmp_path / "m.ckpt")
    assert e.value.code == Status.IO and "nope" in str(e.value)
    with pytest.raises(ReshardError) as e:
        reshard.merge_pipeline_strategys(case("complete_to_dp2mp2")["dir"] + "/expected", tmp_path / "m.ckpt")
    assert e.value.code == Status.SOURCE and "no strategy files" in str(e.value)
    with pytest.raises(TypeError):
        reshard.merge_pipeline_strategys(None, tmp_path / "m.ckpt")
    assert not (tmp_path / "m.ckpt").exists()


def test_rank_list_for_transform():
    assert reshard.rank_list_for_transform(3) == [0]
    assert reshard.rank_list_for_transform(0, None, "whatever.ckpt") == [0]
    c = case("dp2mp2_to_complete")
    assert reshard.rank_list_for_transform(0, c["src_strategy"], None, src_checkpoints_dir=c["src"]) == [1, 0]
    # Where reshard reads the same ranks as MindSpore lists, the answers agree.
    for name in ("dp2mp2_to_dp4mp1", "dev222_opt_to_dp2mp2", "dp2mp2pp2_to_complete"):
        c = case(name)
        for rank, want in c["rank_lists"].items():
            got = reshard.rank_list_for_transform(
                int(rank), c["src_strategy"], c["dst_strategy"], src_checkpoints_dir=c["src"]
            )
            assert got == want, (name, rank)
    # Everywhere: highest first, no repeats, real source ranks.
    for name in CASES:
        c = case(name)
        if not c.get("rank_lists"):
            continue
        with reshard.Plan(c["src"], c["src_strategy"], c["dst_strategy"]) as plan:
            for r in range(plan.dst_rank_count):
                got = plan.src_ranks(r)
                assert got and got == sorted(set(got), reverse=True), (name, r, got)
                assert all(os.path.isdir(os.path.join(c["src"], f"rank_{s}")) for s in got)


def test_rank_list_for_transform_errors():
    c = case("dp2mp2_to_complete")
    with pytest.raises(ReshardError) as e:
        reshard.rank_list_for_transform(0, c["src_strategy"])
    assert e.value.code == Status.INVALID_ARGUMENT and "src_checkpoints_dir" in str(e.value)
    with pytest.raises(TypeError):
        reshard.rank_list_for_transform("0", c["src_strategy"], src_checkpoints_dir=c["src"])
    for bad in (-1, 1, 2**32):
        with pytest.raises(ReshardError) as e:
            reshard.rank_list_for_transform(bad, c["src_strategy"], src_checkpoints_dir=c["src"])
        assert e.value.code == Status.RANK_OUT_OF_RANGE, bad


def test_plan_queries_and_subsets(tmp_path):
    c = case("complete_to_dp2mp2")
    with reshard.Plan(c["src"], None, c["dst_strategy"]) as plan:
        assert plan.dst_rank_count == 4
        assert [plan.src_ranks(r) for r in range(4)] == [[0]] * 4
        summary = json.loads(plan.to_json())
        assert summary["dst_ranks"] == 4
        assert [r["output"] for r in summary["ranks"]] == [f"rank_{r}/checkpoint_{r}.ckpt" for r in range(4)]
        assert plan.warnings == []
        plan.execute(tmp_path, [3, 1], threads=1)
        assert sorted(os.listdir(tmp_path)) == ["rank_1", "rank_3"]
        assert_same_outputs(c, tmp_path, ["rank_1/checkpoint_1.ckpt", "rank_3/checkpoint_3.ckpt"])
        # Executing a rank again after the first call returned: a verified output is kept,
        # a damaged one rewritten, and resume=False always rewrites (atomically: new inode).
        out1 = tmp_path / "rank_1" / "checkpoint_1.ckpt"
        before = os.stat(out1).st_ino
        plan.execute(tmp_path, [1])
        assert os.stat(out1).st_ino == before
        plan.execute(tmp_path, [1], resume=False, sync=False)
        assert os.stat(out1).st_ino != before
        assert_same_outputs(c, tmp_path, ["rank_1/checkpoint_1.ckpt"])
        with open(out1, "r+b") as f:
            f.seek(100)
            f.write(b"damage")
        plan.execute(tmp_path, [1])
        assert_same_outputs(c, tmp_path, ["rank_1/checkpoint_1.ckpt"])
        # Another prefix only changes the name.
        plan.execute(tmp_path / "p", [2], prefix="ckpt_", crc=False)
        assert filecmp.cmp(
            tmp_path / "p" / "rank_2" / "ckpt_2.ckpt",
            os.path.join(c["dir"], "expected", "rank_2", "checkpoint_2.ckpt"),
            shallow=False,
        )
    with pytest.raises(ReshardError) as e:
        plan.dst_rank_count
    assert e.value.code == Status.NULL_ARGUMENT
    plan.close()  # idempotent


def test_progress(tmp_path):
    c = case("complete_to_dp2mp2")
    seen = []
    with reshard.Plan(c["src"], None, c["dst_strategy"]) as plan:
        plan.execute(tmp_path, progress=lambda done, total: seen.append((done, total)))
        assert seen and seen[-1][0] == seen[-1][1] > 0
        assert all(a[0] < b[0] for a, b in zip(seen, seen[1:]))

        def boom(done, total):
            raise KeyError("from the callback")

        with pytest.raises(KeyError):
            plan.execute(tmp_path / "b", [0], progress=boom)
        assert_same_outputs(c, tmp_path / "b", ["rank_0/checkpoint_0.ckpt"])


def _left_in(folder):
    """What a stopped run left in a rank folder (the manifest lock file may stay)."""
    return sorted(n for n in os.listdir(folder) if n != ".reshard_manifest.lock")


@pytest.mark.parametrize("kind", ["Cancel", "threading.Event"])
def test_another_thread_cancels(tmp_path, kind):
    """While rank 1 is being written (the progress callback holds the call), another thread
    sets the cancel object: the call raises CANCELLED and leaves neither the output nor a
    temporary file nor a manifest; the same plan then writes the rank whole."""
    c = case("complete_to_dp2mp2")
    cancel = reshard.Cancel() if kind == "Cancel" else threading.Event()

    with reshard.Plan(c["src"], None, c["dst_strategy"]) as plan:
        held = HeldCall(lambda hold: plan.execute(tmp_path, [1], threads=1, progress=hold, cancel=cancel))
        cancel.set()
        result = held.finish()
        assert isinstance(result, ReshardError), result
        assert result.code == Status.CANCELLED, result
        assert "cancelled" in str(result) and "checkpoint_1.ckpt" in str(result)
        assert _left_in(tmp_path / "rank_1") == []
        # Set before the call: nothing is written.
        with pytest.raises(ReshardError) as e:
            plan.execute(tmp_path, [2], cancel=cancel)
        assert e.value.code == Status.CANCELLED
        assert not (tmp_path / "rank_2").exists() or _left_in(tmp_path / "rank_2") == []
        plan.execute(tmp_path, [1, 2], cancel=reshard.Cancel() if kind == "Cancel" else threading.Event())
    assert_same_outputs(c, tmp_path, ["rank_1/checkpoint_1.ckpt", "rank_2/checkpoint_2.ckpt"])
    assert cancel.is_set()
    with pytest.raises(TypeError):
        reshard.Plan(c["src"], None, c["dst_strategy"]).execute(tmp_path, [0], cancel=object())


def test_threads_execute_disjoint_ranks(tmp_path):
    c = case("dp2mp2pp2_to_dp1mp2pp2")
    with reshard.Plan(c["src"], c["src_strategy"], c["dst_strategy"]) as plan:
        errors = in_threads(lambda r: plan.execute(tmp_path, [r], threads=1), range(plan.dst_rank_count))
    assert errors == []
    assert_same_outputs(c, tmp_path)


def test_same_rank_at_once_is_busy(tmp_path):
    c = case("complete_to_dp2mp2")
    with reshard.Plan(c["src"], None, c["dst_strategy"]) as plan:
        held = HeldCall(lambda hold: plan.execute(tmp_path, [0], progress=hold))
        try:
            with pytest.raises(ReshardError) as e:
                plan.execute(tmp_path, [0, 2])
            assert e.value.code == Status.BUSY and "rank(s) 0" in str(e.value)
            assert not (tmp_path / "rank_2").exists()
        finally:
            result = held.finish()
        assert result == "ok"
        plan.execute(tmp_path, [0])
    assert_same_outputs(c, tmp_path, ["rank_0/checkpoint_0.ckpt"])


def test_bad_calls_raise(tmp_path):
    c = case("complete_to_dp2mp2")
    with pytest.raises(ReshardError) as e:
        reshard.transform_checkpoints(tmp_path / "missing", tmp_path / "o", "checkpoint_")
    assert e.value.code == Status.SOURCE and "missing" in str(e.value)
    assert isinstance(e.value, ValueError)
    with pytest.raises(ReshardError) as e:
        reshard.Plan(c["src"], None, os.path.join(c["dir"], "nope.ckpt"))
    assert e.value.code == Status.IO and "nope.ckpt" in str(e.value)
    with pytest.raises(ReshardError) as e:  # a checkpoint given as a strategy
        reshard.Plan(c["src"], None, os.path.join(c["src"], "rank_0", "llama_tiny.ckpt"))
    assert e.value.code == Status.MALFORMED
    d = case("dp2mp2_to_complete")
    with pytest.raises(ReshardError) as e:  # the strategy of another job
        reshard.Plan(d["src"], case("dp2mp2pp2_to_dp1mp2pp2")["src_strategy"])
    assert e.value.code == Status.SOURCE and "missing" in str(e.value)
    with pytest.raises(TypeError):
        reshard.transform_checkpoints(c["src"], tmp_path, None, None, c["dst_strategy"])
    with pytest.raises(ValueError):
        reshard.transform_checkpoints(c["src"], tmp_path, "x", None, c["dst_strategy"], 0)
    with pytest.raises(ReshardError) as e:
        reshard.transform_checkpoints(c["src"], tmp_path, "x", None, c["dst_strategy"], output_format="npz")
    assert e.value.code == Status.INVALID_OPTIONS and "npz" in str(e.value)
    with pytest.raises(ReshardError) as e:
        reshard.Plan(c["src"], None, c["dst_strategy"], io="mapped")
    assert e.value.code == Status.INVALID_OPTIONS and "unknown io mode 'mapped'" in str(e.value)
    with pytest.raises(ReshardError) as e:
        reshard.transform_checkpoints(c["src"], os.path.join(c["src"], "out"), "x", None, c["dst_strategy"])
    assert e.value.code == Status.INVALID_ARGUMENT and "inside the source folder" in str(e.value)
    assert not os.path.exists(os.path.join(c["src"], "out"))
    with reshard.Plan(c["src"], None, c["dst_strategy"]) as plan:
        for ranks, code in (([4], Status.RANK_OUT_OF_RANGE), ([-1], Status.RANK_OUT_OF_RANGE), ([1, 1], Status.INVALID_ARGUMENT)):
            with pytest.raises(ReshardError) as e:
                plan.execute(tmp_path / "bad", ranks)
            assert e.value.code == code, ranks
        with pytest.raises(ReshardError) as e:
            plan.src_ranks(4)
        assert e.value.code == Status.RANK_OUT_OF_RANGE and "4 destination rank" in str(e.value)
        with pytest.raises(ReshardError) as e:
            plan.execute(tmp_path / "bad", prefix="a/b")
        assert e.value.code == Status.INVALID_OPTIONS
        with pytest.raises(TypeError):
            plan.execute(tmp_path / "bad", threads=-1)
    assert not (tmp_path / "bad").exists()
    assert list(os.listdir(tmp_path)) == []


# Where a child's `import reshard` finds the module under test: bindings/python in the
# checkout, site-packages for the installed package (tests/package).
MODULE_PARENT = os.path.dirname(os.path.abspath(reshard.__file__))
if os.path.basename(reshard.__file__) == "__init__.py":
    MODULE_PARENT = os.path.dirname(MODULE_PARENT)


def test_paths_with_a_nul_raise(tmp_path):
    # A C string ends at the NUL: "out\0x" used to be taken as "out", silently.
    c = case("complete_to_dp2mp2")
    out = str(tmp_path / "out")
    calls = [
        lambda: reshard.transform_checkpoints(c["src"], out + "\0x", "x", None, c["dst_strategy"]),
        lambda: reshard.transform_checkpoints(c["src"] + "\0x", out, "x", None, c["dst_strategy"]),
        lambda: reshard.transform_checkpoints(c["src"], out, "x", None, c["dst_strategy"] + "\0x"),
        lambda: reshard.Plan(os.fsencode(c["src"]) + b"\0x"),
        lambda: reshard.merge_pipeline_strategys(tmp_path, out + "\0.ckpt"),
        lambda: reshard.rank_list_for_transform(
            0, c["dst_strategy"] + "\0x", c["dst_strategy"], src_checkpoints_dir=c["src"]
        ),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="NUL"):
            call()
    with reshard.Plan(c["src"], None, c["dst_strategy"]) as plan:
        with pytest.raises(ValueError, match="NUL"):
            plan.execute(out + "\0x", [0])
    assert os.listdir(tmp_path) == []


def run_python(code, **env):
    e = dict(os.environ)
    e.update(env)
    return subprocess.run(
        [sys.executable, "-c", code],
        env=e,
        capture_output=True,
        text=True,
        cwd=MODULE_PARENT,
    )


def test_library_lookup():
    lib_dir = os.path.dirname(reshard.library_path())
    r = run_python("import reshard; print(reshard.library_path())", RESHARD_LIBRARY=lib_dir)
    assert r.returncode == 0 and r.stdout.strip() == os.path.join(lib_dir, "libreshard.so"), r.stderr
    r = run_python("import reshard; reshard.version()", RESHARD_LIBRARY="/nonexistent/libreshard.so")
    assert r.returncode != 0 and "cannot find libreshard.so" in r.stderr and "RESHARD_LIBRARY" in r.stderr
    # Importing never needs the library; only calls do.
    r = run_python("import reshard; print('imported')", RESHARD_LIBRARY="/nonexistent/libreshard.so")
    assert r.returncode == 0 and r.stdout.strip() == "imported"


ST_ERA = os.path.join(ROOT, "tests", "fixtures", "st_era")


@pytest.mark.parametrize("src,want", [("full", "unified_full"), ("rr", "unified_rr")])
def test_unified_safetensors_writes_mindspores_folder(src, want, tmp_path):
    c = os.path.join(ST_ERA, "dp2mp2")
    out = tmp_path / "unified"
    # MindSpore's signature, positionally; the files' remove_redundancy metadata wins.
    reshard.unified_safetensors(os.path.join(c, src), os.path.join(c, "src_strategy.ckpt"), str(out), True, None, 4)
    for name in ("param_name_map.json", "hyper_param.safetensors"):
        assert filecmp.cmp(out / name, os.path.join(c, want, name), shallow=False), name
    assert os.path.isfile(out / "part0.safetensors")
    # A reshard unified folder is a complete source again.
    with reshard.Plan(str(out), None, os.path.join(c, "dst_strategy.ckpt")) as plan:
        assert plan.dst_rank_count == 4


def test_unified_safetensors_refusals(tmp_path):
    c = os.path.join(ST_ERA, "dp2mp2")
    args = (os.path.join(c, "full"), os.path.join(c, "src_strategy.ckpt"), str(tmp_path / "o"))
    with pytest.raises(NotImplementedError):
        reshard.unified_safetensors(*args, choice_func=lambda n: True)
    with pytest.raises(ValueError):
        reshard.unified_safetensors(*args, split_dst_file=(3, 2))
    with pytest.raises(ValueError):
        reshard.unified_safetensors(os.path.join(c, "src_strategy.ckpt"), *args[1:])
    with pytest.raises(ReshardError) as e:
        reshard.unified_safetensors(os.path.join(c, "full"), os.path.join(c, "src_strategy.ckpt"),
                                    str(tmp_path / "o2"), file_suffix="_nope")
    assert "_nope.safetensors" in str(e.value)
    assert not os.path.exists(tmp_path / "o2" / "param_name_map.json")


LAUNCHER_VARS = (
    "RANK", "WORLD_SIZE", "MS_NODE_ID", "MS_WORKER_NUM", "MS_ROLE", "OMPI_COMM_WORLD_RANK",
    "OMPI_COMM_WORLD_SIZE", "PMI_RANK", "PMI_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "RANK_ID",
    "RANK_SIZE",
)


def test_transform_checkpoints_distributed_over_two_processes(tmp_path, monkeypatch):
    # Two processes of one job (threads here: the library releases the GIL), each its share.
    for v in LAUNCHER_VARS:
        monkeypatch.delenv(v, raising=False)
    c = case("complete_to_dp2mp2pp2_opt")
    dst = tmp_path / "out"

    def process(i):
        reshard.transform_checkpoints(
            c["src"], str(dst), c["prefix"], None, c["dst_strategy"],
            distributed=True, process_index=i, process_count=2, timeout=30,
        )

    errors = in_threads(process, range(2))
    assert not errors, errors
    assert_same_outputs(c, dst)
    assert sorted(p.name for p in dst.glob("reshard_share_*")) == [
        "reshard_share_0_of_2.json", "reshard_share_1_of_2.json"
    ]
    # No launcher in the environment and no index: refused, nothing written.
    with pytest.raises(ReshardError) as e:
        reshard.transform_checkpoints(c["src"], str(tmp_path / "x"), c["prefix"], None, c["dst_strategy"], distributed=True)
    assert e.value.code == Status.INVALID_OPTIONS and "OMPI_COMM_WORLD_RANK" in e.value.message
    assert not (tmp_path / "x").exists()
    # The other process never comes: this one gives up after the timeout, naming its share.
    with pytest.raises(ReshardError) as e:
        reshard.transform_checkpoints(
            c["src"], str(tmp_path / "y"), c["prefix"], None, c["dst_strategy"],
            distributed=True, process_index=0, process_count=2, timeout=1,
        )
    assert e.value.code == Status.DISTRIBUTED and "share 1 of 2" in e.value.message
