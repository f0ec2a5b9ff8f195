#!/usr/bin/env python3
"""Generate tests/fixtures/flat_json: JSON twins, in MindSpore's flattened form, of the nested
(one TensorMap per tensor dim) protobuf strategies of two conformance cases.

Run:  /work/msvenv/bin/python tests/gen/make_flat_json.py      (from anywhere)

MindSpore's JSON strategy writer lists a tensor dim split over several device axes as several
dims, one per axis: a [32, 64] weight whose dim 1 is split over axes (1, 0) is written
"tensor_shape": [32, 2, 32], "tensor_map": [-1, 1, 0] where the protobuf writer gives the nested
[[-1], [1, 0]]. The flattened dims are those of MindSpore's own expansion of a nested map
(`_expand_layout`): for axes [a1, ..., ak] the sizes dev(a1), ..., dev(a(k-1)), then the rest.
Producing such files with MindSpore needs its parallel compiler (semi_auto_parallel compiles on
CPU only for the GPU target, with stub CUDA libraries and MS_SIMULATION_LEVEL=1), so they are
written here from that rule, from the cases' protobuf files and the model's shapes.

The test (crates/reshard-core/tests/conformance.rs) runs each case with the JSON twin in place of
the protobuf file and checks reshard's output against what MindSpore wrote for the protobuf form,
byte for byte. MindSpore's own transform refuses the JSON twins; this script records its message
in notes.json.
"""
import json
import os
import shutil
import sys
import tempfile

os.environ.setdefault("GLOG_v", "3")  # keep MindSpore quiet

import mindspore as ms  # noqa: E402
from mindspore.train import node_strategy_pb2 as spb  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import make_fixtures as mf  # noqa: E402

OUT = os.path.join(mf.FIX, "flat_json")

# (conformance case, which strategy has the nested layouts)
CASES = [("nested_to_dp2mp2", "src"), ("dp1mp4_to_nested_opt", "dst")]


def flatten(dev, tmaps, shape):
    """MindSpore's JSON form of a nested layout: (tensor_shape, tensor_map)."""
    flat_shape, flat_map = [], []
    for axes, size in zip(tmaps, shape):
        rest = size
        for a in axes[:-1]:
            d = dev[len(dev) - 1 - a]
            flat_shape.append(d)
            flat_map.append(a)
            assert rest % d == 0, (axes, size, dev)
            rest //= d
        flat_shape.append(rest)
        flat_map.append(axes[-1])
    return flat_shape, flat_map


def json_twin(proto_path, shapes):
    m = spb.ParallelStrategyMap()
    with open(proto_path, "rb") as f:
        m.ParseFromString(f.read())
    obj = {"current_stage": m.current_stage, "parallel_strategy_item": {}, "parallel_layout_item": {}}
    for it in m.parallel_strategy_item:
        obj["parallel_strategy_item"][it.node_name] = {
            "stage": it.parallel_strategys.stage,
            "parallel_strategy": [list(s.dim) for s in it.parallel_strategys.parallel_strategy]}
    flattened = 0
    for it in m.parallel_layout_item:
        pl = it.parallel_layouts
        dev = list(pl.dev_matrix[0].dim)
        shape = list(shapes[it.param_name])
        if len(pl.tensor_map) > 1:
            tmaps = [list(t.dim) for t in pl.tensor_map if t.dim]
        else:
            tmaps = [[d] for d in pl.tensor_map[0].dim]
        tensor_shape, tensor_map = flatten(dev, tmaps, shape)
        flattened += len(tensor_map) > len(shape)
        obj["parallel_layout_item"][it.param_name] = {
            "dev_matrix": dev, "tensor_map": tensor_map, "tensor_shape": tensor_shape, "field": pl.field,
            "opt_weight_shard_step": pl.opt_weight_shard_step, "opt_weight_shard_size": pl.opt_weight_shard_size}
    assert flattened > 0, proto_path
    return json.dumps(obj, indent=1).encode() + b"\n"


def mindspore_says(case_dir, role, twin):
    """What MindSpore's transform_checkpoints does with the JSON twin in place of the protobuf file."""
    spec = json.load(open(os.path.join(case_dir, "case.json")))
    strat = {k: spec[k + "_strategy"] and os.path.join(case_dir, spec[k + "_strategy"]) for k in ("src", "dst")}
    strat[role] = twin
    out = tempfile.mkdtemp(prefix="reshard_flat_")
    try:
        ms.transform_checkpoints(os.path.join(case_dir, "src"), out, spec["prefix"], strat["src"], strat["dst"])
        return "accepted"
    except Exception as e:  # noqa: BLE001
        return "refused: " + str(e).strip().splitlines()[0]
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main():
    mf.rm_tree(OUT)
    os.makedirs(OUT)
    notes = {}
    for case, role in CASES:
        case_dir = os.path.join(mf.CONF, case)
        spec = json.load(open(os.path.join(case_dir, "case.json")))
        layers = spec["model"]["layers"]
        shapes = {}
        for name, shape, _, _ in mf.model_params(layers):
            for pre in ("", "adam_m.", "adam_v."):
                shapes[pre + name] = shape
        twin = os.path.join(OUT, case, role + "_strategy.json")
        os.makedirs(os.path.dirname(twin))
        with open(twin, "wb") as f:
            f.write(json_twin(os.path.join(case_dir, spec[role + "_strategy"]), shapes))
        notes["%s/%s_strategy.json" % (case, role)] = mindspore_says(case_dir, role, twin)
    mf.jdump(os.path.join(OUT, "notes.json"), notes)
    with open(os.path.join(OUT, "README.md"), "w") as f:
        f.write("# Flattened JSON strategies\n\nWritten by `tests/gen/make_flat_json.py` (see its docstring): "
                "`<case>/<role>_strategy.json` is the protobuf strategy of `../conformance/<case>` in the "
                "form MindSpore's JSON writer gives a dim split over several device axes (one dim per axis). "
                "`crates/reshard-core/tests/conformance.rs` runs the case with it and compares with "
                "MindSpore's output for the protobuf form. `notes.json`: what MindSpore's own transform "
                "says of each file.\n")
    mf.normalize_modes(OUT)
    print("wrote", OUT, json.dumps(notes, indent=1))


if __name__ == "__main__":
    main()
