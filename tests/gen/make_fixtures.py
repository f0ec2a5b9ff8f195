#!/usr/bin/env python3
"""Generate reshard's test fixtures with real MindSpore.

Run:  /work/msvenv/bin/python tests/gen/make_fixtures.py      (from anywhere)

Deletes and recreates tests/fixtures/{formats,strategies,conformance} (plus
tests/fixtures/README.md).  Everything is deterministic: fixed numpy seeds,
sorted file lists, no timestamps.  MindSpore writes its files with mode 0400
and its folders with 0700; this script resets them to 0644/0755 at the end so
that the fixtures are easy to handle (git does not keep modes anyway).

Ground truth always comes from MindSpore itself:
  * formats/*.expected.json      <- mindspore.load_checkpoint (+ raw protobuf)
  * strategies/*.expected.json   <- MindSpore's _build_searched_strategy/_convert_to_list
  * conformance/<case>/expected/ <- mindspore.transform_checkpoints
"""
import binascii
import contextlib
import glob as _glob
import json
import math
import os
import re
import shutil
import struct
import tempfile
import traceback

os.environ.setdefault("GLOG_v", "3")  # keep MindSpore quiet

import numpy as np  # noqa: E402
import mindspore as ms  # noqa: E402
from mindspore import Parameter, Tensor  # noqa: E402
from mindspore.train import serialization as ms_ser  # noqa: E402
from mindspore.train import node_strategy_pb2 as spb  # noqa: E402
from mindspore.train.checkpoint_pb2 import Checkpoint  # noqa: E402
from mindspore.parallel import _parallel_serialization as ms_ps  # noqa: E402
import mindspore.parallel.checkpoint_transform as ms_ct  # noqa: E402
import mindspore.parallel.transform_safetensors as ms_ts  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
FIX = os.path.join(REPO, "tests", "fixtures")
FORMATS = os.path.join(FIX, "formats")
STRATS = os.path.join(FIX, "strategies")
CONF = os.path.join(FIX, "conformance")
PREFIX = "checkpoint_"


# ----------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------
def log(*a):
    print(*a, flush=True)


def rm_tree(path):
    if not os.path.lexists(path):
        return
    for root, dirs, files in os.walk(path):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o755)
        for f in files:
            p = os.path.join(root, f)
            if not os.path.islink(p):
                os.chmod(p, 0o644)
    os.chmod(path, 0o755)
    shutil.rmtree(path)


def normalize_modes(path):
    for root, dirs, files in os.walk(path):
        os.chmod(root, 0o755)
        for f in files:
            os.chmod(os.path.join(root, f), 0o644)


def mkdirs(p):
    os.makedirs(p, exist_ok=True)
    return p


_NUM_LIST = re.compile(r"\[\s+(-?[0-9.]+(?:,\s+-?[0-9.]+)*)\s+\]")


def jdump(path, obj):
    """Indented JSON with lists of plain numbers kept on one line."""
    text = json.dumps(obj, indent=1)
    text = _NUM_LIST.sub(lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text + "\n")


def rel(path, start):
    return os.path.relpath(path, start).replace(os.sep, "/")


def prod(xs):
    r = 1
    for x in xs:
        r *= int(x)
    return r


def to_py(x):
    """numpy scalars / tuples -> plain JSON-able python."""
    if isinstance(x, (list, tuple)):
        return [to_py(i) for i in x]
    if isinstance(x, dict):
        return {k: to_py(v) for k, v in x.items()}
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating):
        return float(x)
    return x


@contextlib.contextmanager
def patched(obj, attr, value):
    old = getattr(obj, attr)
    setattr(obj, attr, value)
    try:
        yield
    finally:
        setattr(obj, attr, old)


@contextlib.contextmanager
def contiguous_safetensors_save():
    """MindSpore's safetensors transform hands numpy VIEWS (e.g. a column slice) to
    safetensors.numpy.save_file.  safetensors >= 0.6 (0.8.0 in /work/msvenv) writes such arrays from
    their data pointer without honouring strides (older releases used tobytes()), so the written data
    are wrong for every tensor split on a non-leading dim.  Make the arrays contiguous first, which is
    what MindSpore gets with the safetensors releases it was written against."""
    real = ms_ts.save_file

    def save_file(tensor_dict, filename, metadata=None):
        # Only the views: np.ascontiguousarray turns a 0-d array into a 1-d one of shape [1].
        arrays = {k: v if v.flags["C_CONTIGUOUS"] else np.ascontiguousarray(v) for k, v in tensor_dict.items()}
        return real(arrays, filename, metadata=metadata)

    with patched(ms_ts, "save_file", save_file):
        yield


@contextlib.contextmanager
def sorted_glob():
    """merge_pipeline_strategys uses glob.glob (directory order, not portable); sort it."""
    real = _glob.glob

    def sglob(*a, **k):
        return sorted(real(*a, **k))

    with patched(ms_ct.glob, "glob", sglob):
        yield


def wait_async_save():
    ms_ser._wait_async_thread_save_ckpt()


def error_text(e, path=None):
    """First line of an exception (and of its cause), without machine-specific paths."""
    def first(x):
        t = str(x).strip().splitlines()[0] if str(x).strip() else type(x).__name__
        if path:
            t = t.replace(os.path.abspath(path), os.path.basename(path)).replace(path, os.path.basename(path))
        return t.replace(REPO + os.sep, "")
    out = first(e)
    if e.__cause__ is not None:
        out += " [cause: %s]" % first(e.__cause__)
    return out


def tensor(arr, dtype=None):
    """numpy array -> MindSpore Tensor (dtype 'bfloat16' goes through fp32)."""
    if dtype == "bfloat16":
        return Tensor(np.asarray(arr, dtype=np.float32), ms.bfloat16)
    if dtype is not None:
        arr = np.asarray(arr).astype(dtype)
    return Tensor(arr)


def tensor_bytes(t):
    """Raw little-endian C-order content as MindSpore holds it (works for bf16 too)."""
    return bytes(t.get_bytes())


def save_ckpt(items, path, **kw):
    mkdirs(os.path.dirname(path))
    ms.save_checkpoint(items, path, **kw)
    if kw.get("async_save"):
        wait_async_save()


# ----------------------------------------------------------------------------
# raw checkpoint reading (protobuf) and expected-json description
# ----------------------------------------------------------------------------
def read_raw_ckpt(path):
    data = open(path, "rb").read()
    crc = None
    body = data
    if data[-17:-10] == b"crc_num":
        crc = int.from_bytes(data[-10:], "big")
        body = data[:-17]
    c = Checkpoint()
    c.ParseFromString(body)
    groups = []  # consecutive same-tag Values
    for v in c.value:
        if groups and groups[-1][0] == v.tag:
            groups[-1][1].append(v)
        else:
            groups.append((v.tag, [v]))
    return groups, crc, body


def describe_ckpt(path, crc_check=None):
    groups, crc, body = read_raw_ckpt(path)
    if crc_check is None:
        crc_check = crc is not None
    loaded = ms.load_checkpoint(path, crc_check=crc_check)
    names = [g[0] for g in groups]
    assert list(loaded.keys()) == names, (list(loaded.keys()), names)
    tensors = []
    for tag, vals in groups:
        v = loaded[tag]
        raw_type = vals[0].tensor.tensor_type
        raw_content = b"".join(x.tensor.tensor_content for x in vals)
        entry = {"name": tag}
        if isinstance(v, str):
            assert raw_type == "str"
            content = v.encode("utf-32-le")
            assert content == raw_content
            entry.update(dtype="str", shape=list(vals[0].tensor.dims), hex=content.hex(), value=v)
        else:
            dtype = str(v.dtype)
            assert dtype == raw_type, (tag, dtype, raw_type)
            content = tensor_bytes(v)
            assert content == raw_content, tag
            entry.update(dtype=dtype, shape=[int(d) for d in v.shape], hex=content.hex())
        entry["raw_dims"] = [int(d) for d in vals[0].tensor.dims]
        entry["chunks"] = len(vals)
        if len(vals) > 1:
            entry["chunk_bytes"] = [len(x.tensor.tensor_content) for x in vals]
        tensors.append(entry)
    out = {"file": os.path.basename(path), "format": "ckpt", "tensors": tensors}
    if crc is not None:
        out["crc"] = {"stored": crc, "computed": binascii.crc32(body)}
    return out


def safetensors_header(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n))


def describe_safetensors(path, crc_check=None):
    header = safetensors_header(path)
    meta = header.get("__metadata__", {})
    if crc_check is None:
        crc_check = "crc_num" in meta
    loaded = ms.load_checkpoint(path, format="safetensors", crc_check=crc_check)
    tensors = []
    for name, v in loaded.items():
        h = header[name]
        tensors.append({"name": name, "dtype": str(v.dtype), "shape": [int(d) for d in v.shape],
                        "hex": tensor_bytes(v).hex(), "safetensors_dtype": h["dtype"]})
    out = {"file": os.path.basename(path), "format": "safetensors",
           "order": "as mindspore.load_checkpoint returns them (sorted by name)",
           "header_order": [k for k in header if k != "__metadata__"],
           "metadata": meta, "tensors": tensors}
    if "crc_num" in meta:
        # MindSpore: crc32 chained over (name utf-8, tensor bytes) for the names in sorted order
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            f.seek(8 + n)
            blob = f.read()
        crc = 0
        for name in sorted(k for k in header if k != "__metadata__"):
            h = header[name]
            a, b = h["data_offsets"]
            data = blob[a:b]
            if h["shape"] == [] and h["dtype"][0] in "IU":
                # MindSpore hashes bytes(ndarray); for a 0-d INTEGER array that is bytes(int(value)),
                # i.e. `value` zero bytes (negative values make saving fail)
                data = b"\0" * int.from_bytes(data, "little", signed=h["dtype"][0] == "I")
            crc = binascii.crc32(name.encode("utf-8"), crc)
            crc = binascii.crc32(data, crc)
        out["crc"] = {"stored": int(meta["crc_num"]), "computed": crc,
                      "rule": "crc32 chained over name (utf-8) then bytes(ndarray) for names in sorted order; "
                              "bytes() of a 0-d integer array is N zero bytes where N is its value"}
    return out


# ----------------------------------------------------------------------------
# 1. formats
# ----------------------------------------------------------------------------
def basic_items(rng):
    f32 = rng.standard_normal((4, 3)).astype(np.float32)
    f32[0, 0] = -0.0
    f32[0, 1] = np.inf
    return [
        {"name": "model.fp32_weight", "data": Parameter(tensor(f32), name="model.fp32_weight")},
        {"name": "model.fp16_bias",
         "data": tensor(np.array([0.5, -1.25, 65504.0, 6.1e-5, -0.0], dtype=np.float16))},
        {"name": "model.bf16_weight", "data": tensor(rng.standard_normal((2, 3)), "bfloat16")},
        {"name": "model.fp64", "data": tensor(np.array([math.pi, -1e300], dtype=np.float64))},
        {"name": "ints.int8", "data": tensor(np.array([-128, -1, 0, 127], dtype=np.int8))},
        {"name": "ints.uint8", "data": tensor(np.array([0, 1, 255], dtype=np.uint8))},
        {"name": "ints.int16", "data": tensor(np.array([-32768, 2, 32767], dtype=np.int16))},
        {"name": "ints.uint16", "data": tensor(np.array([0, 65535], dtype=np.uint16))},
        {"name": "ints.int32", "data": tensor(np.array([-(2 ** 31), 7, 2 ** 31 - 1], dtype=np.int32))},
        {"name": "ints.uint32", "data": tensor(np.array([0, 2 ** 32 - 1], dtype=np.uint32))},
        {"name": "ints.int64", "data": tensor(np.array([-(2 ** 63), 3, 2 ** 63 - 1], dtype=np.int64))},
        {"name": "ints.uint64", "data": tensor(np.array([0, 2 ** 64 - 1], dtype=np.uint64))},
        {"name": "mask.bool", "data": tensor(np.array([True, False, True]))},
        {"name": "loss_scale", "data": tensor(np.array(1024.0, dtype=np.float32))},
        {"name": "global_step", "data": tensor(np.array(1000, dtype=np.int32))},
    ]


def make_formats():
    log("== formats")
    d = mkdirs(FORMATS)
    notes = {}

    # basic.ckpt (+ append_dict: a str, an int -> Int64 scalar, a float -> Float32 scalar)
    rng = np.random.default_rng(101)
    p = os.path.join(d, "basic.ckpt")
    save_ckpt(basic_items(rng), p, append_dict={"note": "hello", "epoch_num": 3, "lr": 0.25})
    jdump(p + ".expected.json", describe_ckpt(p))

    # chunked.ckpt: bytes path (Tensor data): raw 1 KiB chunks (SLICE_SIZE is in KiB)
    rng = np.random.default_rng(102)
    chunk_items = [
        {"name": "chunked.fp32", "data": tensor(rng.standard_normal((64, 16)).astype(np.float32))},
        {"name": "chunked.odd_rows", "data": tensor(rng.standard_normal((10, 100)).astype(np.float32))},
        {"name": "chunked.fp16", "data": tensor(rng.standard_normal((40, 20)).astype(np.float16))},
        {"name": "chunked.vec", "data": tensor(rng.standard_normal(300).astype(np.float32))},
        {"name": "small", "data": tensor(np.arange(3, dtype=np.int32))},
        {"name": "global_step", "data": tensor(np.array(7, dtype=np.int32))},
    ]
    chunk_bf16 = {"name": "chunked.bf16", "data": tensor(rng.standard_normal((40, 20)), "bfloat16")}
    with patched(ms_ser, "SLICE_SIZE", 1):
        p = os.path.join(d, "chunked.ckpt")
        save_ckpt(chunk_items[:3] + [chunk_bf16] + chunk_items[3:], p)
        exp = describe_ckpt(p)
        exp["writer"] = ("save_checkpoint with serialization.SLICE_SIZE=1 (KiB): Tensor data goes through "
                         "_write_parameter_bytes_data = raw byte chunks of 1024 bytes (may cut inside a row)")
        jdump(p + ".expected.json", exp)
        chunked = {t["name"]: t["chunks"] for t in exp["tensors"]}
        assert chunked["chunked.fp32"] == 4 and chunked["chunked.odd_rows"] == 4, chunked
        notes["chunked.ckpt"] = chunked

        # chunked_numpy.ckpt: async_save='thread' hands numpy arrays to _write_parameter_data,
        # which uses np.array_split along axis 0 (uneven row chunks).
        p = os.path.join(d, "chunked_numpy.ckpt")
        save_ckpt(chunk_items, p, async_save="thread")
        exp = describe_ckpt(p)
        exp["writer"] = ("save_checkpoint(async_save='thread') with SLICE_SIZE=1: numpy data goes through "
                         "_write_parameter_data = np.array_split(axis 0) into ceil(KiB) pieces; each piece "
                         "repeats the FULL dims")
        jdump(p + ".expected.json", exp)
        chunked = {t["name"]: t["chunks"] for t in exp["tensors"]}
        assert chunked["chunked.fp32"] == 4 and chunked["chunked.odd_rows"] == 4, chunked
        notes["chunked_numpy.ckpt"] = chunked

    # crc.ckpt / crc_bad.ckpt
    rng = np.random.default_rng(103)
    p = os.path.join(d, "crc.ckpt")
    save_ckpt(basic_items(rng)[:4] + basic_items(rng)[-2:], p, crc_check=True,
              append_dict={"note": "crc"})
    exp = describe_ckpt(p)
    assert exp["crc"]["stored"] == exp["crc"]["computed"]
    jdump(p + ".expected.json", exp)

    bad = os.path.join(d, "crc_bad.ckpt")
    data = bytearray(open(p, "rb").read())
    groups, _, _ = read_raw_ckpt(p)
    content = groups[0][1][0].tensor.tensor_content
    off = bytes(data).find(content)
    assert off > 0 and bytes(data).count(content) == 1
    data[off + 5] ^= 0xFF
    with open(bad, "wb") as f:
        f.write(bytes(data))
    try:
        ms.load_checkpoint(bad, crc_check=True)
        raise SystemExit("MindSpore accepted crc_bad.ckpt with crc_check=True")
    except ValueError as e:
        err = error_text(e, bad)
    exp = describe_ckpt(bad, crc_check=False)
    exp["crc_check_error"] = err
    exp["flipped_byte_offset"] = off + 5
    exp["note"] = ("copy of crc.ckpt with one byte of the first tensor's content flipped (trailer kept). "
                   "load_checkpoint(crc_check=True) raises; with crc_check=False MindSpore strips the "
                   "trailer without checking and loads the damaged data listed below.")
    assert exp["crc"]["stored"] != exp["crc"]["computed"]
    jdump(bad + ".expected.json", exp)
    notes["crc_bad.ckpt"] = err

    # safetensors (no bf16: this MindSpore build cannot convert bf16 to numpy with numpy 2.x)
    rng = np.random.default_rng(104)
    st_items = [
        {"name": "model.fp32_weight", "data": tensor(rng.standard_normal((4, 3)).astype(np.float32))},
        {"name": "model.fp16_bias", "data": tensor(rng.standard_normal(5).astype(np.float16))},
        {"name": "model.fp64", "data": tensor(np.array([math.e, -2.5], dtype=np.float64))},
        {"name": "ints.int8", "data": tensor(np.array([-128, 5, 127], dtype=np.int8))},
        {"name": "ints.uint8", "data": tensor(np.array([0, 200], dtype=np.uint8))},
        {"name": "ints.int16", "data": tensor(np.array([-300, 300], dtype=np.int16))},
        {"name": "ints.int32", "data": tensor(np.array([[1, -2], [3, -4]], dtype=np.int32))},
        {"name": "ints.int64", "data": tensor(np.array([-(2 ** 40), 2 ** 40], dtype=np.int64))},
        {"name": "ints.uint64", "data": tensor(np.array([2 ** 64 - 1], dtype=np.uint64))},
        {"name": "mask.bool", "data": tensor(np.array([False, True]))},
        {"name": "global_step", "data": tensor(np.array(1000, dtype=np.int32))},
        {"name": "learning_rate", "data": tensor(np.array(0.001, dtype=np.float32))},
    ]
    p = os.path.join(d, "basic.safetensors")
    save_ckpt(st_items, p, format="safetensors")
    jdump(p + ".expected.json", describe_safetensors(p))
    p = os.path.join(d, "crc.safetensors")
    # safetensors (Rust HashMap) writes the __metadata__ keys in random order; save again until they
    # come out sorted so that the file is reproducible byte for byte
    for _ in range(200):
        save_ckpt(st_items, p, format="safetensors", crc_check=True)
        keys = list(safetensors_header(p)["__metadata__"])
        if keys == sorted(keys):
            break
    else:
        raise SystemExit("could not get a reproducible crc.safetensors")
    exp = describe_safetensors(p)
    assert exp["crc"]["stored"] == exp["crc"]["computed"], exp["crc"]
    jdump(p + ".expected.json", exp)

    bad = os.path.join(d, "crc_bad.safetensors")
    data = bytearray(open(p, "rb").read())
    hlen = struct.unpack("<Q", bytes(data[:8]))[0]
    start = safetensors_header(p)["model.fp32_weight"]["data_offsets"][0]
    data[8 + hlen + start + 1] ^= 0xFF  # inside model.fp32_weight's first float
    with open(bad, "wb") as f:
        f.write(bytes(data))
    try:
        ms.load_checkpoint(bad, format="safetensors", crc_check=True)
        raise SystemExit("MindSpore accepted crc_bad.safetensors with crc_check=True")
    except ValueError as e:
        err = error_text(e, bad)
    exp = describe_safetensors(bad, crc_check=False)
    exp["crc_check_error"] = err
    exp["note"] = ("copy of crc.safetensors with one byte of model.fp32_weight flipped; rejected with "
                   "crc_check=True, loads (damaged, listed below) with crc_check=False")
    jdump(bad + ".expected.json", exp)

    # 0-d negative integer with crc_check: bytes(ndarray) -> bytes(-5) -> ValueError
    try:
        save_ckpt([{"name": "neg", "data": tensor(np.array(-5, dtype=np.int32))}],
                  os.path.join(tempfile.mkdtemp(), "neg.safetensors"), format="safetensors", crc_check=True)
        notes["negative 0-d int, safetensors crc"] = "saved"
    except Exception as e:  # noqa: BLE001
        notes["negative 0-d int, safetensors crc"] = "refused: " + error_text(e)

    # bf16 in safetensors: record what MindSpore does in this environment
    try:
        save_ckpt([{"name": "w", "data": tensor(np.ones((2, 2)), "bfloat16")}],
                  os.path.join(tempfile.mkdtemp(), "bf16.safetensors"), format="safetensors")
        notes["bf16.safetensors"] = "saved"
    except Exception as e:  # noqa: BLE001
        notes["bf16.safetensors"] = "refused: " + str(e).strip().splitlines()[0]
    jdump(os.path.join(d, "mindspore_notes.json"), notes)
    normalize_modes(d)
    return notes


# ----------------------------------------------------------------------------
# strategy files
# ----------------------------------------------------------------------------
def is_nested(tmap):
    return any(isinstance(t, (list, tuple)) for t in tmap)


def tensor_strategy(dev, tmap):
    out = []
    for t in tmap:
        ts = t if isinstance(t, (list, tuple)) else [t]
        out.append(prod(dev[len(dev) - 1 - k] for k in ts if k != -1))
    return out


def opt_fields(dev, tmap, shape, size):
    """(opt_weight_shard_step, opt_weight_shard_size) for optimizer sharding over the replicated axes.

    The shard group uses the replicated device axes rightmost first; step = stride (product of the
    axes to the right) of the rightmost axis in the group.  (0, 0) when nothing is replicated or the
    first dim does not divide."""
    used = set()
    for t in tmap:
        for k in (t if isinstance(t, (list, tuple)) else [t]):
            if k != -1:
                used.add(len(dev) - 1 - k)
    rep = [i for i, v in enumerate(dev) if v > 1 and i not in used]
    if not rep or size == 0:
        return 0, 0
    eff = prod(dev[i] for i in rep) if size == -1 else size
    rem, group = eff, []
    for i in reversed(rep):
        if rem == 1:
            break
        group.append(i)
        if dev[i] <= rem:
            assert rem % dev[i] == 0
            rem //= dev[i]
        else:
            assert dev[i] % rem == 0
            rem = 1
    assert rem == 1, (dev, tmap, size)
    if shape[0] % (tensor_strategy(dev, tmap)[0] * eff) != 0:
        return 0, 0
    return prod(dev[max(group) + 1:]), size


class Layout:
    def __init__(self, dev, tmap, shape, step=0, size=0):
        self.dev, self.tmap, self.shape, self.step, self.size = list(dev), list(tmap), list(shape), step, size


def strategy_proto(stage, layouts, nodes, current_stage=None):
    m = spb.ParallelStrategyMap()
    m.current_stage = stage if current_stage is None else current_stage
    for node in sorted(nodes):
        it = m.parallel_strategy_item.add()
        it.node_name = node
        it.parallel_strategys.stage = stage
        for dims in nodes[node]:
            it.parallel_strategys.parallel_strategy.add().dim.extend(dims)
    for name in sorted(layouts):
        lay = layouts[name]
        it = m.parallel_layout_item.add()
        it.param_name = name
        pl = it.parallel_layouts
        pl.dev_matrix.add().dim.extend(lay.dev)
        if is_nested(lay.tmap):
            # layout-process params: one TensorMap per tensor dim, plus an empty one for 1-D tensors
            for t in lay.tmap:
                pl.tensor_map.add().dim.extend(t if isinstance(t, (list, tuple)) else [t])
            if len(lay.tmap) == 1:
                pl.tensor_map.add()
        else:
            pl.tensor_map.add().dim.extend(lay.tmap)
        pl.param_split_shape.add()
        pl.indices_offset.add()
        pl.field = 0
        pl.opt_weight_shard_step = lay.step
        pl.opt_weight_shard_size = lay.size
    return m.SerializeToString()


def strategy_json(stage, layouts, nodes, current_stage=None):
    obj = {"current_stage": stage if current_stage is None else current_stage,
           "parallel_strategy_item": {n: {"stage": stage, "parallel_strategy": nodes[n]} for n in sorted(nodes)},
           "parallel_layout_item": {}}
    for name in sorted(layouts):
        lay = layouts[name]
        assert not is_nested(lay.tmap), "MindSpore's JSON reader takes flat tensor maps only"
        obj["parallel_layout_item"][name] = {
            "dev_matrix": lay.dev, "tensor_map": lay.tmap, "tensor_shape": lay.shape, "field": 0,
            "opt_weight_shard_step": lay.step, "opt_weight_shard_size": lay.size}
    return json.dumps(obj, indent=1).encode() + b"\n"


def node_items(stage, layouts):
    """Fake-but-plausible operator strategies (only their 'stage' matters to MindSpore's tools)."""
    nodes = {}
    for i, name in enumerate(sorted(n for n in layouts if not n.startswith(("adam_", "accu_")))):
        lay = layouts[name]
        st = tensor_strategy(lay.dev, lay.tmap)
        op = "Gather" if "embedding" in name else ("Mul" if len(lay.shape) == 1 else "MatMul")
        base = "Default/network-LlamaForCausalLM/" + name.rsplit(".", 1)[0].replace(".", "-") + "/"
        nodes[base + "%s-op%d" % (op, 100 * stage + i)] = [[lay.dev[0]] + [1] * (len(st) - 1), st]
    return nodes


def write_strategy_file(path, stage, layouts, current_stage=None):
    mkdirs(os.path.dirname(path))
    nodes = node_items(stage, layouts)
    if path.endswith(".json"):
        data = strategy_json(stage, layouts, nodes, current_stage)
    else:
        data = strategy_proto(stage, layouts, nodes, current_stage)
    with open(path, "wb") as f:
        f.write(data)


def merge_stages(stage_dir, merged_path):
    with sorted_glob():
        ms.merge_pipeline_strategys(stage_dir, merged_path)


def convert_to_list_fixed(strategy):
    """MindSpore's _convert_to_list (rank_id=None) except that only a leading '<digits>-' is taken as
    the merged-file stage prefix (MindSpore does param_name.split('-') and breaks on names with '-')."""
    train_map = {}
    for param_name in strategy.keys():
        layout = strategy.get(param_name)
        dev_mat = list(layout.dev_matrix[0].dim)
        if len(layout.tensor_map) > 1:
            tensor_map = [list(t.dim) for t in layout.tensor_map if list(t.dim)]
        else:
            tensor_map = list(layout.tensor_map[0].dim)
        entry = [dev_mat, tensor_map, list(layout.param_split_shape[0].dim), int(layout.field),
                 int(layout.opt_weight_shard_step), int(layout.opt_weight_shard_size)]
        stage, origin = 0, param_name
        head, sep, tail = param_name.partition("-")
        if sep and head.isdigit():
            stage, origin = int(head), tail
        if origin not in train_map:
            train_map[origin] = entry + [[stage]]
        else:
            stages = train_map[origin][6] + [stage]
            if all(stage <= s for s in stages):
                train_map[origin] = entry + [stages]
            else:
                train_map[origin][6] = stages
    return train_map


def layout_list_to_json(lmap):
    return {name: {"dev_matrix": v[0], "tensor_map": v[1], "param_split_shape": v[2], "field": v[3],
                   "opt_weight_shard_step": v[4], "opt_weight_shard_size": v[5], "stages": v[6]}
            for name, v in lmap.items()}


def describe_strategy(path):
    out = {"file": os.path.basename(path)}
    strategy = ms_ps._build_searched_strategy(path)
    try:
        lmap = to_py(ms_ps._convert_to_list(strategy))
        stage_num = int(ms_ps._extract_pipeline_stage_num(path))
        out["parser"] = "mindspore._build_searched_strategy + _convert_to_list"
        fixed = to_py(convert_to_list_fixed(strategy))
        assert fixed == lmap, "fixed parser disagrees with MindSpore"
    except Exception as e:  # noqa: BLE001
        out["mindspore_error"] = "%s: %s" % (type(e).__name__, str(e).splitlines()[0])
        lmap = to_py(convert_to_list_fixed(strategy))
        stages = sorted({s for v in lmap.values() for s in v[6]})
        assert stages == list(range(len(stages)))
        stage_num = len(stages)
        out["parser"] = ("MindSpore's parser fails on names containing '-' (see mindspore_error); params below "
                         "come from the same algorithm with the stage prefix split only on a leading "
                         "'<digits>-'. For the params without '-' it was checked to agree with MindSpore.")
        no_dash = {k: v for k, v in strategy.items()
                   if "-" not in (k.partition("-")[2] if k.partition("-")[0].isdigit() else k)}
        assert to_py(ms_ps._convert_to_list(no_dash)) == to_py(convert_to_list_fixed(no_dash))
    out["stage_num"] = stage_num
    out["params"] = layout_list_to_json(lmap)
    # raw info MindSpore does not use for layouts but which readers may want to check
    if path.endswith(".json"):
        raw = json.load(open(path, encoding="utf-8"))
        out["current_stage"] = raw["current_stage"]
        out["strategy_item_stages"] = sorted({v["stage"] for v in raw["parallel_strategy_item"].values()})
    else:
        m = spb.ParallelStrategyMap()
        m.ParseFromString(open(path, "rb").read())
        out["current_stage"] = m.current_stage
        out["strategy_item_stages"] = sorted({it.parallel_strategys.stage for it in m.parallel_strategy_item})
    return out


# ----------------------------------------------------------------------------
# the tiny llama model
# ----------------------------------------------------------------------------
H, V, FFN, LAYERS = 16, 32, 32, 4
LAYER_PARAMS = [("attention.wq.weight", (H, H), "col"), ("attention.wk.weight", (H, H), "col"),
                ("attention.wv.weight", (H, H), "col"), ("attention.wo.weight", (H, H), "row"),
                ("feed_forward.w1.weight", (FFN, H), "col"), ("feed_forward.w2.weight", (H, FFN), "row"),
                ("feed_forward.w3.weight", (FFN, H), "col"), ("attention_norm.weight", (H,), "norm"),
                ("ffn_norm.weight", (H,), "norm")]


def model_params(layers=LAYERS):
    """[(name, shape, kind, layer or None)] in network order."""
    out = [("model.tok_embeddings.embedding_weight", (V, H), "emb", None)]
    for i in range(layers):
        for suffix, shape, kind in LAYER_PARAMS:
            out.append(("model.layers.%d.%s" % (i, suffix), shape, kind, i))
    out.append(("model.norm_out.weight", (H,), "norm_out", None))
    out.append(("lm_head.weight", (V, H), "head", None))
    return out


def make_complete(path, seed, layer_dtype="float32", other_dtype="float32", adam=True, fmt="ckpt",
                  layers=LAYERS):
    """Complete (unsharded) llama checkpoint: standard-normal weights (rng seeded with `seed`), adam_m/adam_v
    (fp32) for every param when adam=True, then global_step (int32, 0-d, 1000) and learning_rate (fp32, 0-d)."""
    rng = np.random.default_rng(seed)
    items, adam_m, adam_v = [], [], []
    for name, shape, kind, layer in model_params(layers):
        w = rng.standard_normal(shape).astype(np.float32)
        dt = layer_dtype if layer is not None else other_dtype
        items.append({"name": name, "data": tensor(w, None if dt == "float32" else dt)})
        if adam:
            adam_m.append({"name": "adam_m." + name,
                           "data": tensor((0.01 * rng.standard_normal(shape)).astype(np.float32))})
            adam_v.append({"name": "adam_v." + name,
                           "data": tensor((1e-4 * rng.random(shape)).astype(np.float32))})
    items += adam_m + adam_v
    items.append({"name": "global_step", "data": tensor(np.array(1000, dtype=np.int32))})
    items.append({"name": "learning_rate", "data": tensor(np.array(3e-4, dtype=np.float32))})
    if fmt == "safetensors":
        save_ckpt(items, path, format="safetensors")
    else:
        save_ckpt(items, path)


def llama_strategy(dev, mp_k=0, pp=1, opt_size=0, adam_opt_size=None, emb="vocab", adam=True,
                   shared_embedding=False, nested=None, layers=LAYERS):
    """Per-stage {param: Layout}.

    dev: per-stage device matrix; mp_k: tensor-map value of the model-parallel axis (counts from the
    right); opt_size: opt_weight_shard_size for params (0 = off, -1 = all replicas, n);
    adam_opt_size: same for adam states (default = opt_size); nested: {kind: tensor_map} overrides.
    """
    adam_opt_size = opt_size if adam_opt_size is None else adam_opt_size
    per_stage = layers // pp
    stages = [dict() for _ in range(pp)]
    for name, shape, kind, layer in model_params(layers):
        if kind == "col" or kind == "head":
            tmap = [mp_k, -1]
        elif kind == "row":
            tmap = [-1, mp_k]
        elif kind == "emb":
            tmap = [mp_k, -1] if emb == "vocab" else [-1, -1]
        else:
            tmap = [-1]
        if nested and kind in nested:
            tmap = nested[kind]
        if kind == "emb":
            st = [0] + ([pp - 1] if shared_embedding and pp > 1 else [])
        elif kind in ("norm_out", "head"):
            st = [pp - 1]
        else:
            st = [layer // per_stage]
        for s in st:
            step, size = opt_fields(dev, tmap, shape, opt_size)
            stages[s][name] = Layout(dev, tmap, shape, step, size)
            if adam:
                step, size = opt_fields(dev, tmap, shape, adam_opt_size)
                for pre in ("adam_m.", "adam_v."):
                    stages[s][pre + name] = Layout(dev, tmap, shape, step, size)
    return stages


def write_strategy(case_dir, role, stages, fmt="ckpt", stage_file_only=None):
    """Write <role>_strategy.<ext> (merged for pp) and <role>_strategy_stages/ for pp. Returns path."""
    ext = "json" if fmt == "json" else "ckpt"
    pp = len(stages)
    if pp == 1:
        path = os.path.join(case_dir, "%s_strategy.%s" % (role, ext))
        write_strategy_file(path, 0, stages[0])
        return path
    sdir = os.path.join(case_dir, "%s_strategy_stages" % role)
    for s, lays in enumerate(stages):
        stage_dev = prod(next(iter(lays.values())).dev)
        write_strategy_file(os.path.join(sdir, "ckpt_strategy_rank_%d.%s" % (s * stage_dev, ext)), s, lays)
    if stage_file_only is not None:
        return os.path.join(sdir, "ckpt_strategy_rank_%d.%s" % (stage_file_only * stage_dev, ext))
    path = os.path.join(case_dir, "%s_strategy.%s" % (role, ext))
    merge_stages(sdir, path)
    return path


# ----------------------------------------------------------------------------
# 2. strategies
# ----------------------------------------------------------------------------
def pp2_stage_layouts():
    dev = [2, 2]
    emb = "model.tok_embeddings.embedding_weight"
    s0 = {
        emb: Layout(dev, [0, -1], [V, H], *opt_fields(dev, [0, -1], [V, H], -1)),
        "model.layers.0.attention.wq.weight": Layout(dev, [0, -1], [H, H], 2, 2),
        "model.layers.0.attention.wo.weight": Layout(dev, [-1, 0], [H, H], 0, 0),
        "model.layers.0.attention-norm.weight": Layout(dev, [-1], [H], 1, -1),
        "adam_m.model.layers.0.attention.wq.weight": Layout(dev, [0, -1], [H, H], 2, 2),
        "adam_v.model.layers.0.attention.wq.weight": Layout(dev, [0, -1], [H, H], 2, 2),
    }
    s1 = {
        emb: Layout(dev, [0, -1], [V, H], *opt_fields(dev, [0, -1], [V, H], -1)),
        "model.layers.1.feed_forward.w1.weight": Layout(dev, [0, -1], [FFN, H], 2, -1),
        "model.layers.1.feed_forward.w2.weight": Layout(dev, [-1, 0], [H, FFN], 2, -1),
        "model.norm_out.weight": Layout(dev, [-1], [H], 0, 0),
        "lm_head.weight": Layout(dev, [0, -1], [V, H], 0, 0),
        "adam_m.lm_head.weight": Layout(dev, [0, -1], [V, H], 0, 0),
    }
    return s0, s1


def make_strategies():
    log("== strategies")
    mkdirs(STRATS)
    s0, s1 = pp2_stage_layouts()
    for fmt in ("proto", "json"):
        ext = "ckpt" if fmt == "proto" else "json"
        sdir = os.path.join(STRATS, "pp2_%s" % fmt)
        write_strategy_file(os.path.join(sdir, "ckpt_strategy_rank_0.%s" % ext), 0, s0)
        write_strategy_file(os.path.join(sdir, "ckpt_strategy_rank_4.%s" % ext), 1, s1)
        shutil.copyfile(os.path.join(sdir, "ckpt_strategy_rank_0.%s" % ext),
                        os.path.join(sdir, "ckpt_strategy_rank_1.%s" % ext))
        merged = os.path.join(STRATS, "pp2_%s.merged.%s" % (fmt, ext))
        merge_stages(sdir, merged)
        for f in sorted(_glob.glob(os.path.join(sdir, "*." + ext))) + [merged]:
            jdump(f + ".expected.json", describe_strategy(f))

    # nested layouts (layout-process params), one file, dev [2,2,2]
    dev = [2, 2, 2]
    lays = {
        "model.layers.0.attention.wq.weight": Layout(dev, [[2, 1], [-1]], [H, H], 0, 0),
        "model.layers.0.attention.wo.weight": Layout(dev, [[-1], [2, 1]], [H, H], 0, 0),
        "model.layers.0.feed_forward.w1.weight": Layout(dev, [[2, 1], [0]], [FFN, H], 0, 0),
        "model.layers.0.attention_norm.weight": Layout(dev, [[2, 1]], [H], 1, -1),
        "model.norm_out.weight": Layout(dev, [[1, 0]], [H], 0, 0),
        "adam_m.model.layers.0.attention.wq.weight": Layout(dev, [[2, 1], [-1]], [H, H], 1, -1),
        "adam_v.model.layers.0.attention.wq.weight": Layout(dev, [[2, 1], [-1]], [H, H], 1, 2),
        "model.tok_embeddings.embedding_weight": Layout(dev, [2, -1], [V, H], 1, 4),
        "lm_head.weight": Layout(dev, [1, -1], [V, H], 1, -1),
    }
    p = os.path.join(STRATS, "nested.ckpt")
    write_strategy_file(p, 0, lays)
    jdump(p + ".expected.json", describe_strategy(p))
    normalize_modes(STRATS)


# ----------------------------------------------------------------------------
# 3. conformance
# ----------------------------------------------------------------------------
def device_num(strategy_path):
    if strategy_path is None:
        return 1
    return int(ms_ps._get_device_num_from_strategy(strategy_path)) * \
        int(ms_ps._extract_pipeline_stage_num(strategy_path))


def list_files(d):
    out = []
    for root, _, files in os.walk(d):
        for f in files:
            out.append(rel(os.path.join(root, f), d))
    return sorted(out)


def resave_chunked_crc(src_dir, numpy_path_ranks=()):
    """Re-save every source rank file with crc_check=True and SLICE_SIZE=1 (KiB)."""
    with patched(ms_ser, "SLICE_SIZE", 1):
        for f in sorted(_glob.glob(os.path.join(src_dir, "rank_*", "*.ckpt"))):
            rank = int(os.path.basename(os.path.dirname(f)).split("_")[1])
            loaded = ms.load_checkpoint(f)
            items = [{"name": k, "data": v} for k, v in loaded.items()]
            os.chmod(f, 0o644)
            save_ckpt(items, f, crc_check=True, async_save="thread" if rank in numpy_path_ranks else False)
            groups, crc, body = read_raw_ckpt(f)
            assert crc == binascii.crc32(body)


CASES = []


def case(fn):
    CASES.append(fn)
    return fn


def S(dev, mp_k=0, fmt="ckpt", stage_only=None, **kw):
    """Strategy spec for build_case: llama_strategy(dev, mp_k, **kw) written as fmt ('ckpt'|'json').
    stage_only=s: point the case at the UNMERGED file of stage s instead of the merged file."""
    return {"dev": dev, "mp_k": mp_k, "fmt": fmt, "stage_only": stage_only, "kw": kw}


def build_case(name, description, seed, src=None, dst=None, fmt="ckpt", layer_dtype="float32",
               other_dtype="float32", adam=False, layers=2, post_src=None, extra=None):
    """src/dst: S(...) specs or None (complete)."""
    cdir = os.path.join(CONF, name)
    mkdirs(cdir)
    tmp = tempfile.mkdtemp(prefix="reshard_fix_")

    def stages_of(spec):
        kw = dict(spec["kw"])
        kw.setdefault("adam", adam)
        return llama_strategy(spec["dev"], spec["mp_k"], layers=layers, **kw)

    try:
        src_path = dst_path = None
        if src:
            src_path = write_strategy(cdir, "src", stages_of(src), src["fmt"], src["stage_only"])
        if dst:
            dst_path = write_strategy(cdir, "dst", stages_of(dst), dst["fmt"], dst["stage_only"])
        ext = "safetensors" if fmt == "safetensors" else "ckpt"
        src_dir = os.path.join(cdir, "src")
        if src_path is None:
            make_complete(os.path.join(src_dir, "rank_0", "llama_tiny." + ext), seed, layer_dtype,
                          other_dtype, adam, ext, layers)
        else:
            complete_dir = os.path.join(tmp, "complete")
            make_complete(os.path.join(complete_dir, "rank_0", "llama_tiny." + ext), seed, layer_dtype,
                          other_dtype, adam, ext, layers)
            # the source checkpoints are MindSpore's own sharding of the complete one
            full_src = src_path
            if src["stage_only"] is not None:  # shard all stages with the merged strategy
                full_src = write_strategy(tmp, "full", stages_of(src), src["fmt"])
            with contiguous_safetensors_save():
                ms.transform_checkpoints(complete_dir, src_dir, PREFIX, None, full_src, output_format=ext)
        if post_src:
            post_src(src_dir)
        exp_dir = os.path.join(cdir, "expected")
        with contiguous_safetensors_save():
            ms.transform_checkpoints(src_dir, exp_dir, PREFIX, src_path, dst_path, output_format=ext)
        info = {"description": description,
                "src_strategy": rel(src_path, cdir) if src_path else None,
                "dst_strategy": rel(dst_path, cdir) if dst_path else None,
                "prefix": PREFIX, "output_format": ext}
        for role in ("src", "dst"):
            sdir = os.path.join(cdir, role + "_strategy_stages")
            if os.path.isdir(sdir):
                info[role + "_strategy_stages"] = rel(sdir, cdir)
        info["src_device_num"] = len([d for d in os.listdir(src_dir) if d.startswith("rank_")])
        info["dst_device_num"] = device_num(dst_path)
        if src_path is not None:
            info["rank_lists"] = {str(r): [int(x) for x in ms.rank_list_for_transform(r, src_path, dst_path)]
                                  for r in range(info["dst_device_num"])}
        info["model"] = {"layers": layers, "hidden": H, "vocab": V, "ffn": FFN, "adam": adam,
                         "layer_dtype": layer_dtype, "other_dtype": other_dtype, "seed": seed}
        info["src_files"] = list_files(src_dir)
        info["expected_files"] = list_files(exp_dir)
        if extra:
            info.update(extra)
        jdump(os.path.join(cdir, "case.json"), info)
        return info
    finally:
        rm_tree(tmp)


@case
def a_complete_to_dp2mp2():
    return build_case("complete_to_dp2mp2", "complete -> dev [2,2] (dp2 mp2), 4 ranks; fp32 weights, "
                      "int32 global_step + fp32 learning_rate scalars", 1, None, S([2, 2]))


@case
def b_dp2mp2_to_complete():
    return build_case("dp2mp2_to_complete", "dev [2,2] -> complete (merge); bf16 layer weights, fp32 "
                      "embedding/norm_out/lm_head, scalars", 2, S([2, 2]), None, layer_dtype="bfloat16")


@case
def c_dp2mp2_to_dp1mp4():
    return build_case("dp2mp2_to_dp1mp4", "mp change: dev [2,2] -> [1,4]; bf16 layer weights, fp32 rest",
                      3, S([2, 2]), S([1, 4]), layer_dtype="bfloat16")


@case
def d_dp2mp2_to_dp4mp1():
    return build_case("dp2mp2_to_dp4mp1", "dp change: dev [2,2] -> [4,1]; fp16 layer weights, fp32 rest",
                      4, S([2, 2]), S([4, 1]), layer_dtype="float16")


@case
def e_dp1mp4_to_dp4mp2():
    return build_case("dp1mp4_to_dp4mp2", "4 -> 8 cards: dev [1,4] -> [4,2] (mp 4 -> 2); embedding "
                      "replicated ([-1,-1]) in src, vocab-parallel ([0,-1]) in dst; bf16 layer weights",
                      5, S([1, 4], emb="replicated"), S([4, 2]), layer_dtype="bfloat16")


@case
def f_complete_to_dp2mp2_opt():
    return build_case("complete_to_dp2mp2_opt", "complete -> dev [2,2] with optimizer shard: params "
                      "opt_weight_shard_size -1, adam states size 2 (step 2 for mp-split tensors, 1 for the "
                      "fully replicated norms); fp32 with adam", 6, None, S([2, 2], opt_size=-1, adam_opt_size=2),
                      adam=True)


@case
def g_dp2mp2_opt_to_dp2mp2():
    return build_case("dp2mp2_opt_to_dp2mp2", "opt shard off: dev [2,2] opt size -1 -> dev [2,2] without "
                      "opt shard; bf16 layer weights", 7, S([2, 2], opt_size=-1), S([2, 2]),
                      layer_dtype="bfloat16")


@case
def h_dp2mp2_to_dp2mp2_opt():
    return build_case("dp2mp2_to_dp2mp2_opt", "opt shard on: dev [2,2] -> dev [2,2] opt size 2 (=dp); fp32",
                      8, S([2, 2]), S([2, 2], opt_size=2))


@case
def i_dev222_opt_to_dp2mp2():
    return build_case("dev222_opt_to_dp2mp2", "3-axis dev [2,2,2] with mp on the MIDDLE axis (tensor_map "
                      "[1,-1]/[-1,1]) and opt shard (params size -1 = axes 2 and 0, adam states size 2 = "
                      "axis 2 only; norms fully replicated, size -1 = 8) -> dev [2,2]; exercises "
                      "_construct_tensor_layout_helper; fp32 with adam", 9,
                      S([2, 2, 2], 1, opt_size=-1, adam_opt_size=2), S([2, 2]), adam=True)


@case
def i2_complete_to_mp2dp4_opt2():
    return build_case("complete_to_mp2dp4_opt2", "complete -> dev [2,4] with mp on the FIRST axis "
                      "(tensor_map [1,-1]) and opt shard size 2 on the 4-way replicated last axis (that "
                      "axis is split (2,2) by _construct_tensor_layout_helper); fp32", 10, None,
                      S([2, 4], 1, opt_size=2))


@case
def j_complete_to_dp2mp2pp2_opt():
    return build_case("complete_to_dp2mp2pp2_opt", "complete -> pp2 x dev [2,2] (8 ranks) with opt shard "
                      "size -1; layer 0 stage 0, layer 1 stage 1; embedding shared by both stages (same "
                      "layout); bf16 layer weights, fp32 adam", 11, None,
                      S([2, 2], pp=2, opt_size=-1, shared_embedding=True), layer_dtype="bfloat16",
                      adam=True)


@case
def k_dp2mp2pp2_to_dp1mp2pp2():
    return build_case("dp2mp2pp2_to_dp1mp2pp2", "pp2 x [2,2] opt size -1 (8 ranks) -> pp2 x [1,2] "
                      "(4 ranks); 4 layers (0-1 stage 0, 2-3 stage 1); shared embedding in both stages; "
                      "bf16 layer weights", 12, S([2, 2], pp=2, opt_size=-1, shared_embedding=True),
                      S([1, 2], pp=2, shared_embedding=True), layer_dtype="bfloat16", layers=4)


@case
def l_dp2mp2pp2_to_complete():
    return build_case("dp2mp2pp2_to_complete", "pp2 x [2,2] (8 ranks, opt size -1) -> complete; fp32",
                      13, S([2, 2], pp=2, opt_size=-1), None)


@case
def m_dp2mp2pp2_to_mp2():
    return build_case("dp2mp2pp2_to_mp2", "predict-style: pp2 x [2,2] (8 ranks, training, with adam) -> "
                      "dev [1,2] without pipeline and WITHOUT adam layouts (a predict strategy): adam "
                      "states are then copied as the raw source slice; bf16 layer weights", 14,
                      S([2, 2], pp=2), S([1, 2], adam=False), layer_dtype="bfloat16", adam=True)


@case
def n_complete_to_mp2():
    return build_case("complete_to_mp2", "predict: complete weights (no adam) -> dev [1,2]; fp16 layer "
                      "weights and fp16 embedding/norm_out/lm_head", 15, None, S([1, 2]),
                      layer_dtype="float16", other_dtype="float16")


@case
def o_complete_to_dp2mp1pp4_opt():
    return build_case("complete_to_dp2mp1pp4_opt", "complete -> pp4 x dev [2,1] (8 ranks), 4 layers, one "
                      "per stage, embedding in stage 0, norm_out/lm_head in stage 3, opt shard size -1 "
                      "(step 1); fp32", 16, None, S([2, 1], pp=4, opt_size=-1), layers=4)


NESTED = {"col": [[2, 1], [-1]], "row": [[-1], [2, 1]], "norm": [[2, 1]]}


@case
def p1_nested_to_dp2mp2():
    return build_case("nested_to_dp2mp2", "nested layout (one TensorMap per tensor dim): dev [2,2,2], "
                      "wq/wk/wv/w1/w3 [[2,1],[-1]] (dim 0 split 4 ways), wo/w2 [[-1],[2,1]], layer norms "
                      "[[2,1]] (+ the empty TensorMap MindSpore adds for 1-D tensors), embedding/lm_head/"
                      "norm_out flat -> dev [2,2]; fp32", 17, S([2, 2, 2], 1, nested=NESTED), S([2, 2]))


@case
def p2_dp1mp4_to_nested_opt():
    return build_case("dp1mp4_to_nested_opt", "dev [1,4] -> nested layout dev [2,2,2] (as in "
                      "nested_to_dp2mp2) with opt shard size 2 on the free axis; fp32", 18,
                      S([1, 4]), S([2, 2, 2], 1, nested=NESTED, opt_size=2))


@case
def q_json_pp2_opt_to_dp1mp4():
    return build_case("json_dp2mp2pp2_opt_to_dp1mp4", "JSON strategies: src pp2 x [2,2] opt size 2 (stage "
                      "files merged by MindSpore's JSON merge) -> dst [1,4] JSON; fp32", 19,
                      S([2, 2], fmt="json", pp=2, opt_size=2), S([1, 4], fmt="json"))


@case
def s_chunked_crc_src():
    return build_case("chunked_crc_dp2mp1_to_dp1mp2", "source rank files re-saved via load_checkpoint + "
                      "save_checkpoint(crc_check=True) with SLICE_SIZE=1 KiB: rank_0 through the raw-bytes "
                      "path (1024-byte chunks), rank_1 through the numpy path (async_save='thread', "
                      "np.array_split along axis 0); dev [2,1] -> [1,2]; fp32 (2 KiB tensors -> 2 chunks)",
                      20, S([2, 1]), S([1, 2]), post_src=lambda d: resave_chunked_crc(d, numpy_path_ranks=(1,)))


@case
def t_safetensors():
    return build_case("safetensors_dp2mp2_to_dp1mp4", "safetensors in and out (source sharded by "
                      "MindSpore's safetensors transform from a complete .safetensors): dev [2,2] -> [1,4]; "
                      "fp16 layer weights, fp32 rest (no bf16: MindSpore's safetensors path needs numpy "
                      "bfloat16, unavailable with numpy 2.x)", 21, S([2, 2]), S([1, 4]),
                      fmt="safetensors", layer_dtype="float16")


@case
def t2_safetensors_opt():
    return build_case("safetensors_complete_to_dp2mp2_opt", "safetensors: complete .safetensors -> dev "
                      "[2,2] opt size -1, output safetensors; fp32", 22, None, S([2, 2], opt_size=-1),
                      fmt="safetensors")


@case
def u_stage_part():
    return build_case("pp_stage1_to_mp2_part", "special path: src_strategy is the UNMERGED stage-1 file of "
                      "pp2 x [2,2] (only stage-1 params, parallel_strategy_item stage 1) and dst a single-"
                      "stage dev [1,2] strategy with all params; src params are a strict subset of dst -> "
                      "MindSpore uses _transform_checkpoint_by_stage and writes rank_{r}/checkpoint_{r}_part1"
                      ".ckpt; source = all 8 ranks of the pp2 run; fp32", 23,
                      S([2, 2], pp=2, stage_only=1), S([1, 2]),
                      extra={"rank_lists_note": "rank_list_for_transform sees an unmerged file (no stage "
                             "prefix, so every param in stage 0) and answers with local ranks; "
                             "_transform_checkpoint_by_stage really reads src ranks stage*4 + 0..3 = 4..7 "
                             "(stage from parallel_strategy_item) and names outputs by LOCAL dst rank",
                             "src_ranks_read": [4, 5, 6, 7]})


def make_conformance():
    log("== conformance")
    mkdirs(CONF)
    skipped, done = [], []
    for fn in CASES:
        name = fn.__name__
        log("  case", name)
        try:
            info = fn()
            done.append((name, info))
        except Exception as e:  # noqa: BLE001
            msg = "%s: %s" % (type(e).__name__, str(e).strip().splitlines()[0] if str(e).strip() else "")
            log("    SKIPPED:", msg)
            tb = traceback.format_exc().strip().splitlines()
            skipped.append((name, msg, tb[-6:]))
            # remove the partial case folder
            for d in os.listdir(CONF):
                p = os.path.join(CONF, d)
                if os.path.isdir(p) and not os.path.exists(os.path.join(p, "case.json")):
                    rm_tree(p)
    with open(os.path.join(CONF, "SKIPPED.md"), "w") as f:
        f.write("# Conformance cases MindSpore refused\n\n")
        if not skipped:
            f.write("None: every planned case ran through `mindspore.transform_checkpoints`.\n")
        for name, msg, tb in skipped:
            f.write("## %s\n\n%s\n\n```\n%s\n```\n\n" % (name, msg, "\n".join(tb)))
    normalize_modes(CONF)
    return done, skipped


README = """# reshard test fixtures

Generated by `tests/gen/make_fixtures.py` with real MindSpore 2.10.0 (CPU). Regenerate with

    /work/msvenv/bin/python tests/gen/make_fixtures.py

(deletes and recreates `formats/`, `strategies/`, `conformance/` and this README; deterministic).
Check a checkpoint written by reshard against MindSpore with

    /work/msvenv/bin/python tests/gen/roundtrip_check.py OUT.ckpt EXPECTED.json|REFERENCE.ckpt

## formats/
Files written by `mindspore.save_checkpoint`, each with `<file>.expected.json`:
`{"tensors": [{"name", "dtype" (ckpt tensor_type: Float32, BFloat16, Int32, str, ...), "shape",
"hex" (raw little-endian C-order bytes; str = UTF-32LE), "raw_dims" (dims of the first protobuf
Value), "chunks" (consecutive Values with that tag), "chunk_bytes"}], "crc": {"stored", "computed"}}`
in file order (safetensors: in the order MindSpore loads them, sorted by name).
`crc_bad.*` are damaged copies that MindSpore rejects with `crc_check=True` (`crc_check_error`).
`chunked*.ckpt` were written with `serialization.SLICE_SIZE = 1` (KiB) so that tensors span several
consecutive Values with the same tag. `mindspore_notes.json`: chunk counts and what MindSpore refused.

## strategies/
Strategy files written with `node_strategy_pb2` / JSON, merged files from
`mindspore.merge_pipeline_strategys`, and `<file>.expected.json` = what MindSpore's parser
(`_build_searched_strategy` + `_convert_to_list`) yields: `{"stage_num", "params": {name:
{"dev_matrix", "tensor_map", "param_split_shape", "field", "opt_weight_shard_step",
"opt_weight_shard_size", "stages"}}}`. Where MindSpore's parser crashes (names containing `-`)
the file has `mindspore_error` and params from the same algorithm with a correct name split.

## conformance/<case>/
- `case.json`: `{"description", "src_strategy" (path relative to the case dir, or null = complete
  source in src/rank_0), "dst_strategy" (or null = complete output), "prefix", "output_format"
  ("ckpt"|"safetensors"), "rank_lists" ({dst rank: mindspore.rank_list_for_transform(...)}, only
  with a src strategy), "src_strategy_stages"/"dst_strategy_stages" (per-stage files of pipeline
  strategies; the strategy paths point to MindSpore's merged file), "src_device_num",
  "dst_device_num", "model" (tiny llama config: layers, hidden 16, vocab 32, ffn 32, adam states
  or not, dtypes, seed), "src_files", "expected_files"}`. Model params: tok_embeddings [32,16],
  per layer wq/wk/wv/wo [16,16], w1/w3 [32,16], w2 [16,32], attention_norm/ffn_norm [16],
  norm_out [16], lm_head [32,16], optional adam_m./adam_v. (fp32), global_step (int32 0-d),
  learning_rate (fp32 0-d).
- `src/rank_{i}/...`: source checkpoints (sharded ones made by `transform_checkpoints` from a
  complete checkpoint).
- `expected/rank_{r}/...`: exactly what `mindspore.transform_checkpoints(src, expected, prefix,
  src_strategy, dst_strategy, output_format=...)` wrote.
- `SKIPPED.md`: planned cases MindSpore refused, with the error.

Safetensors cases: MindSpore's safetensors transform hands numpy views to `safetensors.numpy.save_file`,
which (safetensors >= 0.6, 0.8.0 here) ignores strides and writes wrong data for tensors split on a
non-leading dim; the generator makes those arrays contiguous first (see `contiguous_safetensors_save`).

File modes are reset to 0644 (MindSpore itself writes 0400 files in 0700 folders).

`st_era/` (issue 15: remove_redundancy sources, `unified_safetensors` folders, their loads by
`load_distributed_checkpoint`, a Hugging Face index folder) is made by `tests/gen/make_st_era.py`,
whose docstring lists its contents; `make_fixtures.py` leaves it alone.
"""


def main():
    for d in (FORMATS, STRATS, CONF):
        rm_tree(d)
    mkdirs(FIX)
    notes = make_formats()
    make_strategies()
    done, skipped = make_conformance()
    with open(os.path.join(FIX, "README.md"), "w") as f:
        f.write(README)
    log("== summary")
    log(json.dumps(notes, indent=1))
    for name, info in done:
        log("  ok  %-40s %s" % (name, info["expected_files"][:2]))
    for name, msg, _ in skipped:
        log("  SKIP %-40s %s" % (name, msg))


if __name__ == "__main__":
    main()
