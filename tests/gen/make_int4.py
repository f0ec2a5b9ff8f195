#!/usr/bin/env python3
"""Generate tests/fixtures/int4 with real MindSpore: an Int4 (qint4x2) parameter through
complete -> dev [2,2] (rows split) -> dev [1,4] (columns split) -> complete.

Run:  /work/msvenv/bin/python tests/gen/make_int4.py      (from anywhere)

MindSpore stores Int4 with one byte per element. Its transform_checkpoints goes through numpy,
which has no int4, and writes the slices labelled Int8; reshard keeps the stored type. The test
(crates/reshard-core/tests/int4.rs) checks that reshard's outputs equal these, byte for byte,
except for that label.
"""
import os
import shutil
import sys

os.environ.setdefault("GLOG_v", "3")  # keep MindSpore quiet

import numpy as np  # noqa: E402
import mindspore as ms  # noqa: E402
from mindspore import Tensor  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import make_fixtures as mf  # noqa: E402

OUT = os.path.join(mf.FIX, "int4")


def main():
    mf.rm_tree(OUT)
    os.makedirs(OUT)
    rng = np.random.default_rng(7)
    items = [
        {"name": "q.weight", "data": Tensor(rng.integers(-8, 8, size=(8, 8)).astype(np.int8), ms.qint4x2)},
        {"name": "f.weight", "data": Tensor(rng.standard_normal((8, 8)).astype(np.float32))},
    ]
    os.makedirs(os.path.join(OUT, "complete", "rank_0"))
    ms.save_checkpoint(items, os.path.join(OUT, "complete", "rank_0", "model.ckpt"))
    rows = {n: mf.Layout([2, 2], [0, -1], (8, 8)) for n in ("q.weight", "f.weight")}
    cols = {n: mf.Layout([1, 4], [-1, 0], (8, 8)) for n in ("q.weight", "f.weight")}
    mf.write_strategy_file(os.path.join(OUT, "rows.ckpt"), 0, rows)
    mf.write_strategy_file(os.path.join(OUT, "cols.ckpt"), 0, cols)
    d = lambda *p: os.path.join(OUT, *p)  # noqa: E731
    ms.transform_checkpoints(d("complete"), d("rows"), mf.PREFIX, None, d("rows.ckpt"))
    ms.transform_checkpoints(d("rows"), d("cols"), mf.PREFIX, d("rows.ckpt"), d("cols.ckpt"))
    ms.transform_checkpoints(d("cols"), d("back"), mf.PREFIX, d("cols.ckpt"), None)
    for sub in ("rows", "cols", "back"):
        strategy_dir = d(sub, "merged_strategy")
        if os.path.isdir(strategy_dir):
            shutil.rmtree(strategy_dir)
    mf.normalize_modes(OUT)
    print("wrote", OUT)


if __name__ == "__main__":
    main()
