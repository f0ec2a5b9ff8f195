"""Loads a Checkpoint 2.0 root with MindFormers 2.1's own code and compares with the full tensors.

    PYTHONPATH=PKG:DEPS python tests/gen/check_mindformers.py ROOT EXPECTED.safetensors|EXPECTED.ckpt

(PKG, DEPS: see make_mindformers.py.) Two loads:
1. `mindformers.checkpoint.checkpoint.load_checkpoint(ROOT, network)` on one card, into a network
   whose parameters have the expected names and shapes (zeros before the load);
2. `ReshardLoader` into a 2-card layout (dim 0 split over a `tp` axis where it divides), once per
   target rank, with the root's own metadata (`get_metadata_of_checkpoint`).
Each loaded tensor must equal the expected one (its slice, for 2). Prints MINDFORMERS-OK.
"""
import sys

import numpy as np
import mindspore as ms
from mindspore import Tensor, Parameter, nn
from mindspore.parallel import Layout

import mindformers.checkpoint.checkpoint as mf_ckpt
import mindformers.checkpoint.reshard as mf_reshard
import mindformers.checkpoint.sharded_tensor as mf_sharded
from mindformers.checkpoint.metadata import get_metadata_of_checkpoint
from mindformers_chunks import chunk_slices



class Holder(nn.Cell):
    def __init__(self, expected):
        super().__init__()
        for name, p in expected.items():
            z = Parameter(Tensor(np.zeros(p.shape, dtype=np.float32), dtype=p.dtype), name=name)
            self.insert_param_to_cell(name.replace(".", "_"), z)

    def construct(self, x):
        return x


def main():
    root, expected_path = sys.argv[1], sys.argv[2]
    ms.set_context(device_target="CPU")
    fmt = "safetensors" if expected_path.endswith(".safetensors") else "ckpt"
    expected = ms.load_checkpoint(expected_path, format=fmt)
    bad = []

    # 1. load_checkpoint on one card.
    net = Holder(expected)
    mf_ckpt.load_checkpoint(root, net)
    for p in net.get_parameters():
        want = expected[p.name].asnumpy()
        if p.shape != expected[p.name].shape or not np.array_equal(p.asnumpy(), want):
            bad.append(f"load_checkpoint: {p.name}")

    # 2. ReshardLoader into 2 cards.
    ckpt_dir = mf_ckpt.get_checkpoint_path(root)
    tp = Layout((2,), ("tp",))
    for rank in range(2):
        mf_reshard.get_real_rank = lambda rank=rank: rank
        infos = {}
        for name, p in expected.items():
            shape = tuple(p.shape)
            if shape and shape[0] % 2 == 0:
                layout = tp("tp", *(["None"] * (len(shape) - 1)))
            else:
                layout = None
            infos[name] = [layout, p.dtype, shape]
        dst = mf_sharded.get_sharded_tensor_from_strategy_metadata(infos, rank)
        src, mappings = get_metadata_of_checkpoint(ckpt_dir)
        loaded = mf_reshard.ReshardLoader(ckpt_dir, dst, src, mappings).load()
        for name, st in dst.items():
            want = expected[name].asnumpy()[chunk_slices(st)]
            got = loaded.get(name)
            if got is None:
                bad.append(f"ReshardLoader rank {rank}: {name} not loaded")
                continue
            got = got.asnumpy() if hasattr(got, "asnumpy") else np.asarray(got)
            if got.shape != want.shape or not np.array_equal(got, want):
                bad.append(f"ReshardLoader rank {rank}: {name} differs")
    if bad:
        print("MINDFORMERS-BAD", bad)
        return 1
    print("MINDFORMERS-OK", len(expected), "tensors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
