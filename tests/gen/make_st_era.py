#!/usr/bin/env python3
"""Fixtures of MindSpore's safetensors era, made by MindSpore 2.10 (issue 15).

Run:  /work/msvenv/bin/python tests/gen/make_st_era.py      (from anywhere)

Deletes and recreates tests/fixtures/st_era/.  For each case (a tiny llama, helpers and model
from make_fixtures.py):

  <case>/src_strategy.ckpt        the source strategy (merged for pipeline cases)
  <case>/dst_strategy.ckpt        a destination strategy
  <case>/full/rank_{i}/           distributed safetensors with every replica (transform_checkpoints
                                  of a complete checkpoint)
  <case>/rr/rank_{i}/             the same saved with save_checkpoint(..., format="safetensors",
                                  remove_redundancy=True), each rank keeping the slices that
                                  remove_param_redundancy(get_parameter_redundancy(strategy)) gives
                                  it (what ModelCheckpoint(remove_redundancy=True) keeps), plus the
                                  parameters without a layout
  <case>/unified_full/            unified_safetensors(full, strategy, merge_with_redundancy=True)
  <case>/unified_3parts/          unified_safetensors(full, ...) asked for 3 parts (MindSpore makes
                                  ceil(total / 3 GiB) parts; the tiny model gets 3 by a patched ceil)
  <case>/unified_rr/              unified_safetensors(rr, strategy, merge_with_redundancy=False)
  <case>/load_dst/rank_{r}/net.safetensors
                                  load_distributed_checkpoint(None, predict_strategy=dst,
                                  unified_safetensors_dir=unified_full, dst_safetensors_dir=...,
                                  rank_id=r): what MindSpore loads on destination rank r
  <case>/load_dst_ckpt/rank_{r}/net.ckpt, <case>/load_complete_ckpt/rank_0/net.ckpt
                                  the same from unified_3parts as .ckpt, with and without a
                                  destination strategy (the order of the tensors is the loader's)
  <case>/case.json                the redundancy groups and each rank's kept parameters

  hf/model-0000k-of-00002.safetensors + model.safetensors.index.json
                                  a Hugging Face style index folder of the complete model (split
                                  by the generator; HF writers are not MindSpore), and
  hf/expected_dp2mp2/rank_{r}/    transform_checkpoints of the same complete model to dp2 mp2

The safetensors stride caution of make_fixtures.py applies (contiguous_safetensors_save).
"""
import contextlib
import json
import math
import os
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import make_fixtures as mf  # noqa: E402
import numpy as np  # noqa: E402
import mindspore as ms  # noqa: E402
import mindspore.parallel.transform_safetensors as ms_ts  # noqa: E402
from mindspore.train._utils import get_parameter_redundancy, remove_param_redundancy  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

class ThreeParts:
    """math for transform_safetensors, but ceil() of the size in units of 3 GiB is 3."""

    def __getattr__(self, name):
        return getattr(math, name)

    @staticmethod
    def ceil(x):
        return 3 if x < 1 else math.ceil(x)


OUT = os.path.join(mf.FIX, "st_era")
PREFIX = mf.PREFIX


def read_sf(path):
    with safe_open(path, framework="np") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


@contextlib.contextmanager
def sorted_listdir(fn):
    """unified_safetensors and load_distributed_checkpoint take rank folders (glob) and files
    (os.listdir) in directory order, and the order decides which of several equal-sized tensors
    comes first: sort both, so the fixtures do not depend on the file system."""
    real_listdir, real_glob = os.listdir, ms_ts.glob.glob

    def listdir(p="."):
        return sorted(real_listdir(p))

    def glob(*a, **k):
        return sorted(real_glob(*a, **k))

    with mf.patched(os, "listdir", listdir), mf.patched(ms_ts.glob, "glob", glob):
        yield


def make_case(name, dev, pp, seed, adam, opt_size, dst_dev, dst_pp=1):
    cdir = mf.mkdirs(os.path.join(OUT, name))
    tmp = tempfile.mkdtemp(prefix="reshard_st_")
    try:
        stages = mf.llama_strategy(dev, 0, pp=pp, opt_size=opt_size, adam=adam, layers=2)
        src_path = mf.write_strategy(cdir, "src", stages)
        dst_path = mf.write_strategy(cdir, "dst", mf.llama_strategy(dst_dev, 0, pp=dst_pp, adam=adam, layers=2))
        complete = os.path.join(tmp, "complete")
        mf.make_complete(os.path.join(complete, "rank_0", "llama_tiny.safetensors"), seed, adam=adam,
                         fmt="safetensors", layers=2)
        full = os.path.join(cdir, "full")
        with mf.contiguous_safetensors_save():
            ms.transform_checkpoints(complete, full, PREFIX, None, src_path, output_format="safetensors")
        # Each rank's ModelCheckpoint sees its own stage's layouts, numbered from the stage's
        # first rank (get_parameter_redundancy's initial_rank).
        stage_files = [src_path]
        if pp > 1:
            sdir = os.path.join(cdir, "src_strategy_stages")
            stage_files = [os.path.join(sdir, f) for f in sorted(os.listdir(sdir),
                                                                  key=lambda f: int(f.split("_")[-1].split(".")[0]))]
        stage_dev = mf.prod(dev)
        redundancy, single = {}, {}
        for s, sf in enumerate(stage_files):
            red = get_parameter_redundancy(sf, initial_rank=s * stage_dev)
            redundancy.update(red)
            for r, names in remove_param_redundancy(red).items():
                single.setdefault(r, set()).update(names)
        layout_names = set(redundancy)
        rr = os.path.join(cdir, "rr")
        kept = {}
        for rank_dir in sorted(os.listdir(full)):
            rank = int(rank_dir.split("_")[1])
            fname = "%s%d.safetensors" % (PREFIX, rank)
            tensors, _ = read_sf(os.path.join(full, rank_dir, fname))
            mine = single.get(rank, set())
            keep = [k for k in tensors if k not in layout_names or k in mine]
            kept[rank] = sorted(keep)
            items = [{"name": k, "data": ms.Tensor(tensors[k])} for k in keep]
            mf.save_ckpt(items, os.path.join(rr, rank_dir, fname), format="safetensors", remove_redundancy=True)
        with mf.contiguous_safetensors_save(), sorted_listdir(None):
            ms.parallel.unified_safetensors(full, src_path, os.path.join(cdir, "unified_full"),
                                            merge_with_redundancy=True, max_process_num=1)
            ms.parallel.unified_safetensors(rr, src_path, os.path.join(cdir, "unified_rr"),
                                            merge_with_redundancy=False, max_process_num=1)
            # Several parts: MindSpore splits into ceil(total / 3 GiB) parts; ask it for 3.
            with mf.patched(ms_ts, "math", ThreeParts()):
                ms.parallel.unified_safetensors(full, src_path, os.path.join(cdir, "unified_3parts"),
                                                merge_with_redundancy=True, max_process_num=1)
        load_dst = os.path.join(cdir, "load_dst")
        ndst = mf.device_num(dst_path)
        with mf.contiguous_safetensors_save(), sorted_listdir(None):
            for r in range(ndst):
                ms.load_distributed_checkpoint(None, predict_strategy=dst_path,
                                               unified_safetensors_dir=os.path.join(cdir, "unified_full"),
                                               dst_safetensors_dir=load_dst, rank_id=r,
                                               format="safetensors", max_process_num=1)
        # The same from the three-part folder, as .ckpt (whose tensor order is the loader's: the
        # destination strategy's parameters, then the hyper-parameters), and as one complete
        # checkpoint without a destination strategy (the map's order, then the hyper-parameters).
        with mf.contiguous_safetensors_save(), sorted_listdir(None):
            for r in range(ndst):
                ms.load_distributed_checkpoint(None, predict_strategy=dst_path,
                                               unified_safetensors_dir=os.path.join(cdir, "unified_3parts"),
                                               dst_safetensors_dir=os.path.join(cdir, "load_dst_ckpt"), rank_id=r,
                                               format="safetensors", output_format="ckpt", max_process_num=1)
            ms.load_distributed_checkpoint(None, predict_strategy=None,
                                           unified_safetensors_dir=os.path.join(cdir, "unified_3parts"),
                                           dst_safetensors_dir=os.path.join(cdir, "load_complete_ckpt"), rank_id=0,
                                           format="safetensors", output_format="ckpt", max_process_num=1)
        info = {
            "src_strategy": os.path.basename(src_path),
            "dst_strategy": os.path.basename(dst_path),
            "src_device_num": len(os.listdir(full)),
            "dst_device_num": ndst,
            "redundancy": {k: [list(g) for g in v] for k, v in sorted(redundancy.items())},
            "kept": {str(r): v for r, v in sorted(kept.items())},
            "load_dst_order": {str(r): list(read_sf(os.path.join(load_dst, "rank_%d" % r, "net.safetensors"))[0])
                               for r in range(ndst)},
        }
        mf.jdump(os.path.join(cdir, "case.json"), info)
    finally:
        mf.rm_tree(tmp)


def make_hf(seed):
    hdir = mf.mkdirs(os.path.join(OUT, "hf"))
    tmp = tempfile.mkdtemp(prefix="reshard_hf_")
    try:
        complete = os.path.join(tmp, "complete")
        mf.make_complete(os.path.join(complete, "rank_0", "llama_tiny.safetensors"), seed, adam=False,
                         fmt="safetensors", layers=2)
        tensors, _ = read_sf(os.path.join(complete, "rank_0", "llama_tiny.safetensors"))
        names = [n for n, _, _, _ in mf.model_params(2)] + ["global_step", "learning_rate"]
        half = len(names) // 2
        weight_map = {}
        total = 0
        for k, part in enumerate((names[:half], names[half:])):
            fname = "model-%05d-of-00002.safetensors" % (k + 1)
            save_file({n: tensors[n] for n in part}, os.path.join(hdir, fname), metadata={"format": "pt"})
            for n in part:
                weight_map[n] = fname
                total += tensors[n].nbytes
        with open(os.path.join(hdir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        dst_path = mf.write_strategy(hdir, "dst", mf.llama_strategy([2, 2], 0, adam=False, layers=2))
        with mf.contiguous_safetensors_save():
            ms.transform_checkpoints(complete, os.path.join(hdir, "expected_dp2mp2"), PREFIX, None, dst_path,
                                     output_format="safetensors")
    finally:
        mf.rm_tree(tmp)


def main():
    mf.rm_tree(OUT)
    mf.mkdirs(OUT)
    make_case("dp2mp2", [2, 2], 1, 21, adam=False, opt_size=0, dst_dev=[1, 4])
    make_case("dp4mp2pp2_opt2", [4, 2], 2, 22, adam=True, opt_size=2, dst_dev=[2, 2])
    make_hf(23)
    mf.normalize_modes(OUT)
    for root, _, files in sorted(os.walk(OUT)):
        for f in sorted(files):
            print(os.path.relpath(os.path.join(root, f), OUT))


if __name__ == "__main__":
    main()
