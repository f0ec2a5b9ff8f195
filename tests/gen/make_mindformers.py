"""Checkpoint 2.0 fixtures made with MindFormers 2.1's own code (tests/fixtures/mindformers/).

Run with MindSpore 2.10 and MindFormers 2.1.0 importable, e.g.

    pip download mindformers==2.1.0 --no-deps && unzip it to PKG, pip install --target DEPS
    pyyaml deprecated regex requests jieba rouge_chinese datasets tokenizers sentencepiece
    tiktoken mindpet tensorboardX (what `import mindformers.checkpoint.checkpoint` asks for), then
    PYTHONPATH=PKG:DEPS /work/msvenv/bin/python tests/gen/make_mindformers.py

Cases (each folder holds `root/` and `expected.safetensors`, the full tensors the root was made
from, written by `mindspore.save_checkpoint`):
- single: a single-card save by MindFormers' `save_checkpoint` (a tiny network and its Adam
  optimizer on CPU): model and opt files, common.json, no metadata.json.
- dp2mp2: 4 ranks, layouts from `mindspore.parallel.Layout` (a dim split over two axes, a
  replicated tensor, a layout-less tensor, optimizer states in opt files), metadata.json from
  `_build_all_sharded_tensor_from_layout_index` + `get_total_params_file_mapping_info` +
  `save_metadata`; each rank's files written with `mindspore.save_checkpoint`.
- pp2_balanced: 8 ranks in two pipeline stages (rank_list 0-3 and 4-7), saved with balanced
  de-duplication (`_compute_balanced_assignment_on_rank0`, `save_balanced_metadata`): fewer
  files than ranks, each chunk stored once.
Deterministic (fixed seeds): a rerun gives the same bytes. Then rerun
tests/gen/check_mindformers_written.sh (roots reshard writes, loaded by MindFormers).
"""
import json
import os
import shutil
import sys
import types

import tempfile

# MindFormers writes its logs to ./output: keep them out of the checkout.
os.chdir(tempfile.mkdtemp(prefix="reshard-mf-gen-"))

import numpy as np
import mindspore as ms
from mindspore import Tensor, Parameter, nn
from mindspore.parallel import Layout

import mindformers.checkpoint.metadata as mf_metadata
import mindformers.checkpoint.sharded_tensor as mf_sharded
import mindformers.checkpoint.fully_parallel as mf_fp
import mindformers.checkpoint.checkpoint as mf_ckpt
from mindformers.checkpoint.utils import FileType, get_checkpoint_name, get_sharded_tensor_shard_id
from mindformers_chunks import chunk_slices

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "mindformers")


def ms_dtype(name):
    return {"float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16, "int32": ms.int32}[name]


def make_tensor(rng, shape, dtype):
    a = (rng.standard_normal(shape) * 10).astype(np.float32)
    if dtype == "int32":
        a = a.astype(np.int32)
    return a


def to_ms(a, dtype):
    return Tensor(a, dtype=ms_dtype(dtype))


def patch_world(size, rank=0):
    mf_sharded.get_real_group_size = lambda: size
    mf_metadata.get_group_size = lambda: size
    mf_fp.get_real_rank = lambda: rank


def write_expected(case_dir, full):
    ms.save_checkpoint([{"name": n, "data": to_ms(a, d)} for n, (a, d) in full.items()],
                       os.path.join(case_dir, "expected.safetensors"), format="safetensors")


def sharded_case(name, world, params, model_keys, balanced, iteration):
    """params: {name: (shape, dtype, layout or None, [ranks owning it])}."""
    rng = np.random.default_rng(len(name) * 7 + world)
    case_dir = os.path.join(OUT, name)
    root = os.path.join(case_dir, "root")
    it_dir = os.path.join(root, "iteration_%08d" % iteration)
    os.makedirs(it_dir)
    full = {}
    param_layouts = {}
    rank_param_names = {r: [] for r in range(world)}
    for pname, (shape, dtype, layout, ranks) in params.items():
        full[pname] = (make_tensor(rng, shape, dtype), dtype)
        param_layouts[pname] = [layout, ms_dtype(dtype), shape]
        for r in ranks:
            rank_param_names[r].append(pname)
    patch_world(world)
    metas = mf_sharded._build_all_sharded_tensor_from_layout_index(param_layouts, rank_param_names)

    def save_file(path, names_to_st):
        items = []
        for pname, st in names_to_st:
            a, d = full[pname]
            items.append({"name": pname, "data": to_ms(np.ascontiguousarray(a[chunk_slices(st)]), d)})
        if items:
            ms.save_checkpoint(items, path, format="safetensors")

    if not balanced:
        for r in range(world):
            for ftype in (FileType.MODEL, FileType.OPTIMIZER):
                sel = [(n, st) for n, st in metas[r].items() if (n in model_keys) == (ftype == FileType.MODEL)]
                save_file(os.path.join(it_dir, get_checkpoint_name(None, None, r, world, ftype) + ".safetensors"), sel)
        mappings = mf_metadata.get_total_params_file_mapping_info(metas, None, model_keys)
        mf_metadata.save_metadata(metas, mappings, os.path.join(it_dir, "metadata.json"))
    else:
        plans = []
        for ftype in (FileType.MODEL, FileType.OPTIMIZER):
            side = {r: {n: st for n, st in m.items() if (n in model_keys) == (ftype == FileType.MODEL)}
                    for r, m in metas.items()}
            _, full_assignment = mf_fp._compute_balanced_assignment_on_rank0(side, world)
            total = len(full_assignment)
            for file_id, (r, shard_groups) in enumerate(full_assignment.items()):
                sel = []
                for shard_id in shard_groups:
                    pname, _ = mf_fp._reverse_sharded_tensor_shard_id(shard_id)
                    sel.append((pname, side[r][pname]))
                save_file(os.path.join(it_dir, get_checkpoint_name(None, None, file_id, total, ftype) + ".safetensors"), sel)
            plans.append((types.SimpleNamespace(full_assignment=full_assignment, total_files_num=total), ftype, None))
        mf_fp.save_balanced_metadata(root, iteration, None, plans, metas)
    mf_ckpt.CommonInfo(epoch_num=1, step_num=iteration, global_step=iteration, loss_scale=1.0,
                       global_batch_size=8).save_common(os.path.join(it_dir, "common.json"))
    with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write(str(iteration))
    write_expected(case_dir, full)


class Tiny(nn.Cell):
    def __init__(self):
        super().__init__()
        rng = np.random.default_rng(3)
        self.w = Parameter(Tensor(rng.standard_normal((4, 6)).astype(np.float32)), name="w")
        self.b = Parameter(Tensor(rng.standard_normal((6,)).astype(np.float16)), name="b")

    def construct(self, x):
        return x


def single_case():
    case_dir = os.path.join(OUT, "single")
    root = os.path.join(case_dir, "root")
    os.makedirs(root)
    net = Tiny()
    opt = nn.Adam(net.trainable_params(), learning_rate=0.01)
    mf_ckpt.save_checkpoint(iteration=3, network=net, optimizer=opt,
                            common_info=mf_ckpt.CommonInfo(global_step=3), save_checkpoint_path=root)
    full = {}
    for p in list(net.get_parameters()) + list(opt.get_parameters()):
        if p.name in full:
            continue
        a = p.asnumpy()
        full[p.name] = (a, {np.float32: "float32", np.float16: "float16", np.int32: "int32"}[a.dtype.type])
    write_expected(case_dir, full)


def main():
    # The cases are remade; written/ (check_mindformers_written.sh's) is kept.
    for case in ("single", "dp2mp2", "pp2_balanced"):
        if os.path.exists(os.path.join(OUT, case)):
            shutil.rmtree(os.path.join(OUT, case))
    os.makedirs(OUT, exist_ok=True)
    ms.set_context(device_target="CPU", mode=ms.GRAPH_MODE)
    # MindSpore 2.10 on CPU still reports PyNative here, where MindFormers' saver wants the
    # hyper_parallel DTensor package; the graph-mode path saves the Cell as it is.
    mf_ckpt.LayoutAdapter.is_pynative_mode = staticmethod(lambda: False)
    single_case()

    l4 = Layout((2, 2), ("dp", "mp"))
    dp2mp2 = {
        "model.embed": ((8, 6), "float32", l4("mp", "None"), range(4)),
        "model.w1": ((4, 8), "float16", l4(("dp", "mp"), "None"), range(4)),
        "model.w2": ((6, 4), "float16", l4("dp", "mp"), range(4)),
        "model.norm": ((6,), "float32", l4("None"), range(4)),
        "model.count": ((2,), "int32", None, range(4)),
        "adam_m.model.embed": ((8, 6), "float32", l4(("mp", "dp"), "None"), range(4)),
        "adam_v.model.w2": ((6, 4), "float32", l4("dp", "mp"), range(4)),
    }
    model_keys = {n for n in dp2mp2 if not n.startswith("adam_")}
    sharded_case("dp2mp2", 4, dp2mp2, model_keys, balanced=False, iteration=20)

    s0 = Layout((2, 2), ("dp", "mp"), [0, 1, 2, 3])
    s1 = Layout((2, 2), ("dp", "mp"), [4, 5, 6, 7])
    pp2 = {
        "layers.0.w": ((8, 4), "float32", s0("mp", "None"), range(0, 4)),
        "layers.0.n": ((4,), "float32", s0("None"), range(0, 4)),
        "layers.1.w": ((4, 8), "float32", s1("None", ("dp", "mp")), range(4, 8)),
        "layers.1.n": ((8,), "float16", s1("dp"), range(4, 8)),
        "adam_m.layers.0.w": ((8, 4), "float32", s0(("dp", "mp"), "None"), range(0, 4)),
        "adam_m.layers.1.w": ((4, 8), "float32", s1("None", ("dp", "mp")), range(4, 8)),
    }
    model_keys = {n for n in pp2 if not n.startswith("adam_")}
    sharded_case("pp2_balanced", 8, pp2, model_keys, balanced=True, iteration=7)
    with open(os.path.join(OUT, "README.md"), "w") as f:
        f.write("# MindFormers Checkpoint 2.0 fixtures\n\nMade by `tests/gen/make_mindformers.py` with MindFormers "
                "2.1.0's own checkpoint code and MindSpore 2.10.0 (CPU); see its docstring for the cases and how to "
                "rerun it. Each case holds `root/` (latest_checkpointed_iteration.txt, iteration_*/ with "
                "metadata.json, common.json and the model/opt safetensors files) and `expected.safetensors`, the "
                "full tensors the root was made from. No bfloat16: this MindSpore build cannot write bf16 "
                "safetensors with numpy 2.\n")
    print("wrote", os.path.abspath(OUT))


if __name__ == "__main__":
    sys.exit(main())
