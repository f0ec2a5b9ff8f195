#!/usr/bin/env python3
"""Writes the bad-input corpus of reshard (issue 7) next to this script.

Standard library only and deterministic: running it twice gives the same bytes. It deletes and
recreates ckpt/, safetensors/, strategy/, sources/, good/ and README.md here, then the tests in
crates/reshard-cli/tests/cli.rs run the real `reshard` binary on every entry.

    python3 tests/corpus/make_corpus.py

Every entry is listed in ENTRIES below with what it is and what the error message must name;
README.md is generated from that list.
"""

import hashlib
import json
import os
import shutil
import struct
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))

# ---------------------------------------------------------------- protobuf wire format


def varint(v):
    v &= (1 << 64) - 1  # negative int32/int64 are 10-byte varints
    out = bytearray()
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


def key(field, wt):
    return varint((field << 3) | wt)


def ld(field, payload):
    """A length-delimited field."""
    return key(field, 2) + varint(len(payload)) + payload


def vint(field, v):
    return key(field, 0) + varint(v)


# ---------------------------------------------------------------- .ckpt


def tensor_proto(dims, dtype, content):
    """TensorProto{repeated int64 dims = 1 (unpacked); string tensor_type = 2; bytes tensor_content = 3}."""
    return b"".join(vint(1, d) for d in dims) + ld(2, dtype.encode()) + ld(3, content)


def value(tag, tp):
    """Checkpoint.Value{string tag = 1; TensorProto tensor = 2} as field 1 of Checkpoint."""
    return ld(1, ld(1, tag.encode()) + ld(2, tp))


def f32(values):
    return b"".join(struct.pack("<f", v) for v in values)


def tiny_tensors(rows=4, cols=4, rank=0):
    """The tiny model every sound checkpoint here holds: w [rows, cols] f32, b [4] f32,
    global_step int32 scalar. Values depend on the rank so slices differ."""
    w = f32([rank * 100 + i for i in range(rows * cols)])
    b = f32([0.5 * i for i in range(4)])
    return [
        ("w", [rows, cols], "Float32", w),
        ("b", [4], "Float32", b),
        ("global_step", [], "Int32", struct.pack("<i", 7)),
    ]


def ckpt(tensors):
    return b"".join(value(n, tensor_proto(d, t, c)) for n, d, t, c in tensors)


def crc_trailer(crc):
    return b"crc_num" + crc.to_bytes(10, "big")


def noise(seed, n):
    """Deterministic pseudo-random bytes (sha256 in counter mode)."""
    out = bytearray()
    i = 0
    while len(out) < n:
        out += hashlib.sha256(f"{seed}:{i}".encode()).digest()
        i += 1
    return bytes(out[:n])


# ---------------------------------------------------------------- .safetensors


def safetensors(header, data, pad=True):
    h = json.dumps(header, separators=(",", ":")).encode()
    if pad:
        h += b" " * ((8 - len(h) % 8) % 8)
    return struct.pack("<Q", len(h)) + h + data


def good_safetensors(rank=0):
    return st_file(tiny_tensors(rank=rank))


# ---------------------------------------------------------------- strategy (node_strategy.proto)


def layout_item(name, dev, tensor_map, opt_step=0, opt_size=0):
    dm = ld(1, b"".join(vint(1, d) for d in dev))
    tm = ld(2, b"".join(vint(1, m) for m in tensor_map))
    layouts = dm + tm + vint(5, 0) + vint(6, opt_step) + vint(7, opt_size)
    return ld(3, ld(1, name.encode()) + ld(2, layouts))


def strategy_item(node, stage, dims):
    strat = ld(2, b"".join(vint(1, d) for d in dims))
    return ld(2, ld(1, node.encode()) + ld(2, vint(1, stage) + strat))


def strategy(layouts, stage=0):
    """ParallelStrategyMap{current_stage = 1; parallel_strategy_item = 2; parallel_layout_item = 3}."""
    items = strategy_item("Default/network-Tiny/MatMul-op0", stage, [1, 1])
    return vint(1, 1) + items + b"".join(layout_item(*l) for l in layouts)


def dp_strategy(n, w_map=(0, -1), names=("w", "b")):
    """n devices in one axis; w split on dim 0 (by default), b replicated."""
    out = []
    if "w" in names:
        out.append(("w", [n], list(w_map)))
    if "b" in names:
        out.append(("b", [n], [-1]))
    for extra in names:
        if extra not in ("w", "b"):
            out.append((extra, [n], [0, -1]))
    return strategy(out)


def shard_rows(n, rank, rows=4, cols=4):
    """Rank `rank`'s slice of a w of [rows, cols] split n ways on dim 0, b and global_step whole."""
    full = tiny_tensors(rows, cols)
    w = full[0][3]
    per = rows // n
    part = w[rank * per * cols * 4:(rank + 1) * per * cols * 4]
    return [("w", [per, cols], "Float32", part)] + full[1:]


# ---------------------------------------------------------------- the corpus

ENTRIES = []  # (path relative to tests/corpus, what it is, what the refusal must name)


def write(rel, data, what, names):
    path = os.path.join(HERE, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    if what:
        ENTRIES.append((rel, what, names))


def entry(rel, what, names):
    ENTRIES.append((rel, what, names))


def make_ckpt_files():
    good = ckpt(tiny_tensors())
    # Cut inside the content of the first tensor: the length prefix runs past the end.
    write("ckpt/truncated.ckpt", good[: len(good) * 2 // 5], "a sound checkpoint cut at 40% of its bytes",
          "file, 'runs past the end'")
    garbage = noise("garbage.ckpt", 512)
    write("ckpt/garbage.ckpt", garbage, "512 pseudo-random bytes", "file, 'malformed checkpoint'")
    body = bytearray(good)
    crc = zlib.crc32(bytes(body))
    body[40] ^= 0x01  # a content byte of w, after the crc was taken
    write("ckpt/crc_mismatch.ckpt", bytes(body) + crc_trailer(crc),
          "crc_num trailer that does not match the content (one content bit flipped)", "file, 'crc'")
    write("ckpt/size_mismatch.ckpt",
          ckpt([("w", [4, 4], "Float32", f32(range(15)))] + tiny_tensors()[1:]),
          "w says dims [4, 4] Float32 (64 bytes) but holds 60 bytes", "file, tensor w, 60, [4, 4], 64")
    write("ckpt/dims_overflow.ckpt",
          ckpt([("w", [1 << 32, 1 << 32, 2], "Float32", f32(range(4)))]),
          "dims [2^32, 2^32, 2] whose product overflows 64 bits", "file, tensor w, 'overflow'")
    write("ckpt/dims_absurd.ckpt",
          ckpt([("w", [1 << 40, 1024], "Float32", f32(range(4)))]),
          "dims [2^40, 1024] (16 PiB of Float32) with 16 bytes of content", "file, tensor w, 16")
    write("ckpt/dims_negative.ckpt",
          ckpt([("w", [-1, 4], "Float32", f32(range(4)))]),
          "a negative dim (-1 as an int64 varint)", "file, tensor w, 'negative'")
    write("ckpt/unknown_dtype.ckpt",
          ckpt([("w", [2], "Float128", b"\0" * 32)]),
          "tensor_type 'Float128'", "file, tensor w, Float128")
    write("ckpt/encrypted.ckpt",
          struct.pack("<I", 0x7F3A5ED8) + noise("encrypted.ckpt", 124),
          "MindSpore encrypted checkpoint: magic 0x7F3A5ED8 (AES-GCM) then ciphertext", "file, 'encrypted'")
    ts = tiny_tensors()
    write("ckpt/repeated_tag.ckpt", ckpt([ts[0], ts[1], ts[0]]),
          "tag w, then b, then w again (not consecutive)", "file, tensor w, 'not consecutively'")
    map_value = ld(1, ld(1, b"embedding_table") + ld(3, ld(1, tensor_proto([2], "Int64", b"\0" * 16))
                                                        + ld(1, tensor_proto([2, 4], "Float32", f32(range(8))))))
    write("ckpt/maptensor.ckpt", ckpt(ts[:1]) + map_value,
          "a Value holding a MapTensorProto (MapParameter 'embedding_table')", "file, embedding_table, 'MapTensor'")
    write("ckpt/empty.ckpt", b"", "an empty (0-byte) .ckpt file", "file")
    write("ckpt/no_tensors.ckpt", b"\x08\x05\x08\x07",
          "4 bytes 08 05 08 07: well-formed protobuf (field 1 as a varint, twice) with no Value; all 48 fuzz "
          "artifacts were this file, which used to be accepted and written as 0-byte outputs",
          "file, 'no tensors' (inspect: not 'malformed strategy' alone)")
    write("ckpt/dtype_with_nul.ckpt", ckpt([("w", [4], "Float32\0", f32(range(4)))]),
          "tensor_type 'Float32' followed by a NUL byte", "file, tensor w, the type escaped (\\0 shows)")
    # Found by fuzzing (ckpt target, round trip): MindSpore detects a crc trailer by the bytes
    # alone, so content that ends the file with b"crc_num" + 10 bytes looks like one. Not bad
    # input: reshard must read it as content (a real trailer never parses as protobuf).
    tail = b"crc_num" + bytes([0xC0, 0x3F, 1, 2, 3, 4, 5, 6, 7, 8])
    write("ckpt/content_ends_like_crc_trailer.ckpt",
          ckpt(tiny_tensors()[:2] + [("bytes", [len(tail)], "UInt8", tail)]),
          "SOUND file, no trailer, but the last tensor's content ends with b'crc_num' + 10 bytes, which "
          "MindSpore's rule reads as a crc trailer; found by fuzzing",
          "accepted: 3 tensors, and a transform writes it back byte for byte")


def make_safetensors_files():
    data = f32(range(8))
    write("safetensors/header_past_eof.safetensors",
          struct.pack("<Q", 4096) + b'{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}' + data,
          "8-byte header length 4096 in a 96-byte file", "file, 4096")
    write("safetensors/overlapping_offsets.safetensors",
          safetensors({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                       "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, f32(range(6))),
          "tensors a [0, 16) and b [8, 24) share bytes", "file, a, b, 'overlap'")
    text = b"this header is not JSON at all!!"
    write("safetensors/header_not_json.safetensors", struct.pack("<Q", len(text)) + text + data,
          "a header of plain text", "file, 'JSON'")
    write("safetensors/offsets_past_eof.safetensors",
          safetensors({"w": {"dtype": "F32", "shape": [16], "data_offsets": [0, 64]}}, f32(range(4))),
          "data_offsets [0, 64] with 16 data bytes", "file, tensor w, 64")
    write("safetensors/size_mismatch.safetensors",
          safetensors({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 16]}}, f32(range(4))),
          "shape [4, 4] F32 (64 bytes) with data_offsets [0, 16]", "file, tensor w, 16, [4, 4]")
    write("safetensors/unknown_dtype.safetensors",
          safetensors({"w": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}, b"\0" * 16),
          "dtype 'F128'", "file, tensor w, F128")
    # Found by fuzzing (safetensors target): MindSpore's crc counts a 0-d integer as that many
    # zero bytes; 2^64 - 1 of them overflowed a length inside crc32fast (overflow checks on).
    header = {"__metadata__": {"format": "ms", "crc_num": "0"},
              "step": {"dtype": "U64", "shape": [], "data_offsets": [0, 8]}}
    write("safetensors/scalar_u64_max_crc.safetensors", safetensors(header, b"\xff" * 8),
          "crc_num and a 0-d U64 of 2^64 - 1 (MindSpore's crc counts it as that many zero bytes); found by fuzzing",
          "file, 'crc'")
    write("safetensors/no_tensors.safetensors", safetensors({"__metadata__": {"format": "ms"}}, b""),
          "a header with __metadata__ and no tensor", "file, 'no tensors'")
    dup = b'{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"w":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}'
    dup += b" " * ((8 - len(dup) % 8) % 8)
    write("safetensors/duplicate_key.safetensors", struct.pack("<Q", len(dup)) + dup + f32(range(4)),
          "tensor w listed twice in the header (JSON readers keep one of them silently)", "file, 'w', 'twice'")
    write("safetensors/data_gap.safetensors",
          safetensors({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                       "b": {"dtype": "F32", "shape": [2], "data_offsets": [16, 24]}}, f32(range(6))),
          "tensors a [0, 8) and b [16, 24): bytes [8, 16) belong to no tensor", "file, b, [8, 16)")
    write("safetensors/trailing_bytes.safetensors",
          safetensors({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, f32(range(5))),
          "w [0, 16) and 20 data bytes: 4 trailing bytes", "file, 'trailing', 4")
    header = {"__metadata__": {"format": "ms", "crc_num": "12345"},
              "w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}
    write("safetensors/crc_mismatch.safetensors", safetensors(header, f32(range(4))),
          "__metadata__ crc_num 12345 that the content does not give", "file, 'crc'")


def make_strategy_files():
    write("strategy/garbage.ckpt", noise("garbage_strategy", 256),
          "256 pseudo-random bytes given as a (protobuf) strategy", "file, 'strategy'")
    write("strategy/empty.ckpt", b"", "an empty strategy file", "file, 'empty'")
    write("strategy/garbage.json", b'{"parallel_layout_item": {"w": [1, 2,,]}',
          "a .json strategy that is not JSON", "file, 'JSON'")
    write("strategy/no_layouts.ckpt", vint(1, 1),
          "a valid ParallelStrategyMap with no layout items", "file, 'no parameter layouts'")

    def json_strategy(items):
        full = {}
        for name, dev, tmap, step, size in items:
            full[name] = {"dev_matrix": dev, "tensor_map": tmap, "field": 0,
                          "opt_weight_shard_step": step, "opt_weight_shard_size": size}
        return json.dumps({"current_stage": 0, "parallel_layout_item": full}, indent=1).encode()

    # Found by fuzzing (strategy_json / strategy_proto targets).
    write("strategy/opt_shard_size_negative.json",
          json_strategy([("w", [2], [-1, -1], 1, -2), ("b", [2], [-1], 0, 0)]),
          "opt_weight_shard_size -2 (only -1, 0 or a positive size mean something); found by fuzzing",
          "file, w, opt_weight_shard_size, -2")
    w_layout = '{"dev_matrix": [2], "tensor_map": [%s], "field": 0, "opt_weight_shard_step": 0, "opt_weight_shard_size": 0}'
    write("strategy/duplicate_key.json",
          ('{"current_stage": 0, "parallel_layout_item": {"w": %s, "b": %s, "w": %s}}'
           % (w_layout % "0, -1", w_layout % "-1", w_layout % "-1, -1")).encode(),
          "layout item w given twice (split, then replicated); JSON readers keep one silently",
          "file, 'w', 'twice'")
    write("strategy/tensor_shape_negative.json",
          json.dumps({"current_stage": 0, "parallel_layout_item": {
              "w": {"dev_matrix": [2], "tensor_map": [0, -1], "tensor_shape": [-4, 4], "field": 0,
                    "opt_weight_shard_step": 0, "opt_weight_shard_size": 0},
              "b": {"dev_matrix": [2], "tensor_map": [-1], "tensor_shape": [4], "field": 0,
                    "opt_weight_shard_step": 0, "opt_weight_shard_size": 0}}}, indent=1).encode(),
          "tensor_shape [-4, 4] for w (it used to be read as [0, 4])", "file, w, tensor_shape, 'negative'")
    big = [65536, 65536, 65536, 65536]
    huge = [1 << 30]
    write("strategy/dev_matrix_huge.json",
          json_strategy([("w", huge, [-1, -1], 0, 0), ("b", huge, [-1], 0, 0)]),
          "dev_matrix [2^30]: a billion destination ranks, whose per-rank plans do not fit in memory",
          "file, w, dev_matrix (no allocation failure)")
    write("strategy/dev_matrix_overflow.json",
          json_strategy([("w", big, [-1, -1], 0, 0), ("b", big, [-1], 0, 0)]),
          "dev_matrix [65536, 65536, 65536, 65536]: 2^64 devices, the product wraps to 0; found by fuzzing",
          "file, w, dev_matrix")
    write("strategy/devices_differ_in_stage.ckpt", strategy([("w", [2], [0, -1]), ("b", [4], [-1])]),
          "one stage, w on 2 devices and b on 4: the ranks are numbered over 2 (the first parameter's)",
          "file, b, 4, w, 2")
    write("strategy/stage_devices_differ.ckpt", strategy([("0-w", [2], [0, -1]), ("1-b", [4], [-1])]),
          "merged pipeline strategy whose stage 0 has 2 devices and stage 1 has 4",
          "file, b, stage 1, 4, stage 0, 2")
    # MindSpore's JSON writer flattens a dim split over several device axes into one dim per
    # axis; these dims cannot be merged back: no run of [2, 3, 4] multiplies to w's 4 (or to 2,
    # the rows rank_0 of good/dp2 stores).
    write("strategy/flattened_unmergeable.json", json.dumps({
        "current_stage": 0,
        "parallel_layout_item": {
            "w": {"dev_matrix": [2, 1], "tensor_map": [1, 0, -1], "tensor_shape": [2, 3, 4], "field": 0,
                  "opt_weight_shard_step": 0, "opt_weight_shard_size": 0},
            "b": {"dev_matrix": [2, 1], "tensor_map": [-1], "tensor_shape": [4], "field": 0,
                  "opt_weight_shard_step": 0, "opt_weight_shard_size": 0}}}, indent=1).encode(),
          "JSON strategy in MindSpore's flattened form (tensor_map [1, 0, -1], tensor_shape [2, 3, 4]) for w "
          "[4, 4], whose dims cannot be merged back", "file, w, [2, 3, 4], the checkpoint's shape")
    # b in every one of 256 stages of 2^24 devices (each within the per-stage limit): 2^32
    # ranks, which wrapped to 0 in 32 bits ("wrote 0 file(s)", exit 0).
    d24 = [1 << 24]
    write("strategy/ranks_2pow32.json",
          json_strategy([("0-w", d24, [-1, -1], 0, 0)] + [(f"{k}-b", d24, [-1], 0, 0) for k in range(256)]),
          "256 pipeline stages of 2^24 devices: 2^32 ranks, a count that wrapped to 0",
          "file, 4294967296")

    stages = [(f"{st}-w", [1 << 24], [-1, -1], 0, 0) for st in range(256)]
    write("strategy/stage_name_spelled_twice.json",
          json_strategy([("0-w", [2], [0, -1], 0, 0), ("00-w", [2], [-1, 0], 0, 0), ("0-b", [2], [-1], 0, 0)]),
          "merged layout items '0-w' and '00-w': two layouts of w for stage 0", "file, w, '0-w', '00-w'")
    os.makedirs(os.path.join(HERE, "strategy/two_files_for_one_stage"), exist_ok=True)
    write("strategy/two_files_for_one_stage/stage0_a.ckpt", dp_strategy(2), None, None)
    write("strategy/two_files_for_one_stage/stage0_b.ckpt", dp_strategy(2, w_map=(-1, 0)), None, None)
    entry("strategy/two_files_for_one_stage", "a strategy folder with two files for stage 0 whose layouts of w "
          "differ (MindSpore takes the first)", "both files, 'stage 0'")
    write("strategy/rank_count_overflow.json", json_strategy(stages),
          "256 stages of 2^24 devices: 2^32 ranks, which wrapped to a destination of 0 ranks (transform wrote "
          "nothing and exited 0)", "file, '256 stage(s)', 16777216")


def rank_files(base, files):
    """files: {rank: [(name, bytes)]}."""
    for r, fs in files.items():
        for name, data in fs:
            write(f"{base}/src/rank_{r}/{name}", data, None, None)


def make_source_folders():
    s = "sources"
    # Sound inputs for tests that need one (output-folder tests, strategy tests, fuzz seeds).
    write("good/complete/rank_0/model.ckpt", ckpt(tiny_tensors()), None, None)
    write("good/dp2/src_strategy.ckpt", dp_strategy(2), None, None)
    write("good/dp2/dst_strategy.ckpt", dp_strategy(4), None, None)
    for r in range(2):
        write(f"good/dp2/src/rank_{r}/model.ckpt", ckpt(shard_rows(2, r)), None, None)
    write("good/model.safetensors", good_safetensors(), None, None)
    write("good/strategy.json", json.dumps({
        "current_stage": 0,
        "parallel_strategy_item": {"Default/MatMul-op0": {"stage": 0, "parallel_strategy": [[2, 1]]}},
        "parallel_layout_item": {
            "w": {"dev_matrix": [2], "tensor_map": [0, -1], "tensor_shape": [4, 4], "field": 0,
                  "opt_weight_shard_step": 0, "opt_weight_shard_size": 0},
            "b": {"dev_matrix": [2], "tensor_map": [-1], "tensor_shape": [4], "field": 0,
                  "opt_weight_shard_step": 0, "opt_weight_shard_size": 0}}},
        indent=1).encode(), None, None)

    d = f"{s}/missing_rank_folder"
    write(f"{d}/src_strategy.ckpt", dp_strategy(4), None, None)
    rank_files(d, {r: [("model.ckpt", ckpt(shard_rows(4, r)))] for r in (0, 1, 2)})
    entry(d, "strategy of 4 devices, rank_3 missing", "src folder, rank_0..rank_3, 'missing: rank_3'")

    d = f"{s}/noncontiguous_rank_folders"
    write(f"{d}/src_strategy.ckpt", dp_strategy(4), None, None)
    rank_files(d, {r: [("model.ckpt", ckpt(shard_rows(4, r % 4)))] for r in (0, 1, 3, 5)})
    entry(d, "strategy of 4 devices, folders rank_0, rank_1, rank_3, rank_5", "src folder, 'missing: rank_2'")

    d = f"{s}/many_missing_rank_folders"
    write(f"{d}/src_strategy.ckpt", dp_strategy(65536), None, None)
    rank_files(d, {r: [("model.ckpt", ckpt(shard_rows(2, r)))] for r in (0, 1)})
    entry(d, "strategy of 65536 devices, folders rank_0 and rank_1 only", "src folder, 'missing', in a short line")

    d = f"{s}/rank_folder_spelled_twice"
    write(f"{d}/src_strategy.ckpt", dp_strategy(2), None, None)
    rank_files(d, {r: [("model.ckpt", ckpt(shard_rows(2, r)))] for r in (0, 1)})
    write(f"{d}/src/rank_00/model.ckpt", ckpt(shard_rows(2, 1)), None, None)
    entry(d, "rank_0, rank_00 and rank_1: two folders for rank 0", "src folder, rank_0, rank_00")

    d = f"{s}/rank_folder_symlink"
    write(f"{d}/src_strategy.ckpt", dp_strategy(2), None, None)
    rank_files(d, {0: [("model.ckpt", ckpt(shard_rows(2, 0)))]})
    os.symlink("rank_0", os.path.join(HERE, d, "src/rank_1"))
    entry(d, "rank_1 is a symlink to rank_0 (rank 1 would get rank 0's slices)", "src folder, rank_0, rank_1, symlink")

    d = f"{s}/no_rank_folders"
    write(f"{d}/src/model.ckpt", ckpt(tiny_tensors()), None, None)
    entry(d, "a complete checkpoint directly in the source folder, no rank_N folder", "src folder, 'rank_'")

    d = f"{s}/empty_rank_folder"
    write(f"{d}/src_strategy.ckpt", dp_strategy(2), None, None)
    rank_files(d, {0: [("model.ckpt", ckpt(shard_rows(2, 0)))]})
    # git keeps no empty folder: a file that is not a checkpoint keeps rank_1 there.
    write(f"{d}/src/rank_1/.gitkeep", b"", None, None)
    entry(d, "strategy of 2 devices; rank_1 holds no checkpoint (only .gitkeep)", "rank_1, 'no .ckpt'")

    d = f"{s}/ambiguous_candidates"
    rank_files(d, {0: [("model_a.ckpt", ckpt(tiny_tensors())), ("model_b.ckpt", ckpt(tiny_tensors()))]})
    entry(d, "complete source, rank_0 holds model_a.ckpt and model_b.ckpt", "rank_0, both names, --src_ckpt_name")

    d = f"{s}/ambiguous_no_common_step"
    write(f"{d}/src_strategy.ckpt", dp_strategy(2), None, None)
    rank_files(d, {
        0: [("tiny_rank_0-1_10.ckpt", ckpt(shard_rows(2, 0))), ("tiny_rank_0-1_20.ckpt", ckpt(shard_rows(2, 0)))],
        1: [("tiny_rank_1-1_30.ckpt", ckpt(shard_rows(2, 1))), ("tiny_rank_1-1_40.ckpt", ckpt(shard_rows(2, 1)))],
    })
    entry(d, "two checkpoints per rank, no -EPOCH_STEP common to both ranks", "rank folder, names, --src_ckpt_name")

    d = f"{s}/mixed_formats"
    write(f"{d}/src_strategy.ckpt", dp_strategy(2), None, None)
    rank_files(d, {0: [("model.ckpt", ckpt(shard_rows(2, 0)))], 1: [("model.safetensors", good_safetensors(1))]})
    entry(d, "rank_0/model.ckpt and rank_1/model.safetensors", "src folder, 'mixes'")

    d = f"{s}/strategy_shape_mismatch"
    write(f"{d}/src_strategy.ckpt", dp_strategy(2), None, None)
    r1 = shard_rows(2, 1)
    r1[0] = ("w", [3, 4], "Float32", f32(range(12)))
    rank_files(d, {0: [("model.ckpt", ckpt(shard_rows(2, 0)))], 1: [("model.ckpt", ckpt(r1))]})
    entry(d, "strategy splits w [4, 4] 2 ways on dim 0; rank_1 stores w as [3, 4]",
          "rank_1 file, rank 1, w, [3, 4], [2, 4]")

    d = f"{s}/strategy_ndim_mismatch"
    write(f"{d}/src_strategy.ckpt", dp_strategy(2, w_map=(0, -1, -1)), None, None)
    rank_files(d, {r: [("model.ckpt", ckpt(shard_rows(2, r)))] for r in (0, 1)})
    entry(d, "strategy's tensor_map for w has 3 dims, the checkpoints store w with 2", "rank_0 file, w, [2, 4], 3")

    d = f"{s}/strategy_missing_param"
    write(f"{d}/src_strategy.ckpt", dp_strategy(2), None, None)
    rank_files(d, {0: [("model.ckpt", ckpt(shard_rows(2, 0)))], 1: [("model.ckpt", ckpt(shard_rows(2, 1)[1:]))]})
    entry(d, "strategy has w; rank_1's checkpoint lacks it", "rank_1 file, rank 1, w, 'missing'")

    d = f"{s}/strategy_wrong_model"
    write(f"{d}/src_strategy.ckpt", strategy([("other.weight", [2], [0, -1])]), None, None)
    rank_files(d, {r: [("model.ckpt", ckpt(shard_rows(2, r)))] for r in (0, 1)})
    entry(d, "strategy of another model: none of its parameters is in the checkpoints", "src folder, strategy file")

    d = f"{s}/strategy_axis_twice"
    write(f"{d}/src_strategy.ckpt", strategy([("w", [2], [0, 0]), ("b", [2], [-1])]), None, None)
    rank_files(d, {r: [("model.ckpt", ckpt([("w", [2, 2], "Float32", f32([r * 10 + i + 1 for i in range(4)]))]
                                           + tiny_tensors()[1:]))] for r in (0, 1)})
    entry(d, "tensor_map [0, 0]: device axis 0 splits both dims of w, so the two ranks hold only the diagonal "
             "blocks of a [4, 4]; found by fuzzing", "src strategy file, w, tensor_map")

    d = f"{s}/slice_dim_overflow"
    write(f"{d}/src_strategy.ckpt", strategy([("w", [4], [-1, 0]), ("b", [4], [-1])]), None, None)
    rank_files(d, {r: [("model.ckpt", ckpt([("w", [0, 1 << 62], "Float32", b"")] + tiny_tensors()[1:]))]
                   for r in range(4)})
    entry(d, "w stored as [0, 2^62] (no content, so the file is sound) split 4 ways on dim 1: the full dim "
             "2^64 overflows", "w, '4 ways' (and not a wrapped full shape [0, 0])")

    d = f"{s}/stage_file_rank_overflow"
    # A single stage's file (stage 2^31 of 2 devices) whose parameters are a strict subset of
    # the destination's: MindSpore's by-stage mode reads ranks 2^32..2^32+1, which wrapped to 0, 1.
    write(f"{d}/src_strategy.ckpt", strategy([("w", [2], [0, -1])], stage=1 << 31), None, None)
    write(f"{d}/dst_strategy.ckpt", dp_strategy(2), None, None)
    rank_files(d, {r: [("model.ckpt", ckpt(shard_rows(2, r)))] for r in (0, 1)})
    entry(d, "source strategy: the file of stage 2^31 (2 devices), by-stage mode; its ranks pass 2^32",
          "src strategy file, stage 2147483648 rank, 4294967295")

    d = f"{s}/dst_tensor_shape_mismatch"
    write(f"{d}/dst_strategy.json", json.dumps({"current_stage": 0, "parallel_layout_item": {
        "w": {"dev_matrix": [2], "tensor_map": [0, -1], "tensor_shape": [8, 4], "field": 0,
              "opt_weight_shard_step": 0, "opt_weight_shard_size": 0},
        "b": {"dev_matrix": [2], "tensor_map": [-1], "tensor_shape": [4], "field": 0,
              "opt_weight_shard_step": 0, "opt_weight_shard_size": 0}}}, indent=1).encode(), None, None)
    rank_files(d, {0: [("model.ckpt", ckpt(tiny_tensors()))]})
    entry(d, "complete w [4, 4] to a JSON destination strategy whose tensor_shape for w is [8, 4]",
          "dst strategy file, w, [8, 4], [4, 4]")

    d = f"{s}/dst_strategy_indivisible"
    write(f"{d}/dst_strategy.ckpt", dp_strategy(8), None, None)
    rank_files(d, {0: [("model.ckpt", ckpt(tiny_tensors()))]})
    entry(d, "complete w [4, 4] to a destination strategy that splits dim 0 8 ways", "dst strategy file, w, [4, 4], 8")

    make_safetensors_era_folders()


def st_file(tensors, metadata=None):
    """A safetensors file of [(name, dims, dtype, content)] with `metadata` ({"format": "ms"})."""
    header = {"__metadata__": metadata or {"format": "ms"}}
    data = b""
    for name, dims, dtype, content in tensors:
        st = {"Float32": "F32", "Int32": "I32"}[dtype]
        header[name] = {"dtype": st, "shape": dims, "data_offsets": [len(data), len(data) + len(content)]}
        data += content
    return safetensors(header, data)


def weight_map(entries):
    return json.dumps({"metadata": {"total_size": 0}, "weight_map": dict(entries)}, indent=4).encode()


def mapped_folder(folder, files, map_name, entries):
    """`folder` holding the safetensors files {name: tensors} and the map `map_name` (a
    param_name_map.json or a Hugging Face index) of `entries` [(tensor, file)]."""
    for name, tensors in files.items():
        write(f"{folder}/{name}", st_file(tensors), None, None)
    write(f"{folder}/{map_name}", weight_map(entries), None, None)


def make_safetensors_era_folders():
    """Issue 15: unified / index folders whose map disagrees with the files, rank folders of
    several files, and a remove_redundancy source missing a slice."""
    s = "sources"
    w, b, step = tiny_tensors()
    unified, index = "param_name_map.json", "model.safetensors.index.json"

    d = f"{s}/unified_map_lists_absent_tensor"
    mapped_folder(f"{d}/src", {"part0.safetensors": [w, b], "hyper_param.safetensors": [step]}, unified,
                  [("w", "part0.safetensors"), ("b", "part0.safetensors"), ("c", "part0.safetensors")])
    entry(d, "a unified folder whose param_name_map.json lists a tensor 'c' that part0.safetensors lacks",
          "param_name_map.json, 'c', part0.safetensors, 'does not contain'")

    d = f"{s}/unified_map_wrong_file"
    mapped_folder(f"{d}/src", {"part0.safetensors": [w], "part1.safetensors": [b, step]}, unified,
                  [("w", "part1.safetensors"), ("b", "part1.safetensors"), ("global_step", "part1.safetensors")])
    entry(d, "a unified folder whose map puts 'w' in part1.safetensors; it is in part0.safetensors",
          "param_name_map.json, 'w', part1.safetensors, part0.safetensors")

    d = f"{s}/index_tensor_in_two_files"
    one, two = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    mapped_folder(f"{d}/src", {one: [w, b], two: [b, step]}, index, [("w", one), ("b", one), ("global_step", two)])
    entry(d, "a Hugging Face index folder whose two files both hold 'b'",
          "model.safetensors.index.json, 'b', both files")

    d = f"{s}/index_unlisted_tensor"
    only = "model-00001-of-00001.safetensors"
    mapped_folder(f"{d}/src", {only: [w, b, step]}, index, [("w", only), ("b", only)])
    entry(d, "an index folder whose file holds 'global_step', which the map does not list",
          "model.safetensors.index.json, 'global_step', 'does not list'")

    d = f"{s}/index_names_a_path"
    mapped_folder(f"{d}/src", {"model.safetensors": [w, b, step]}, index, [("w", "../model.safetensors")])
    entry(d, "an index whose weight_map names '../model.safetensors' (outside the folder)",
          "model.safetensors.index.json, 'w', '../model.safetensors'")

    d = f"{s}/rank_map_with_stray_file"
    write(f"{d}/src_strategy.ckpt", dp_strategy(2), None, None)
    for r in range(2):
        ws, bs, ss = shard_rows(2, r)
        mapped_folder(f"{d}/src/rank_{r}", {one: [ws], two: [bs, ss]}, index, [("w", one), ("b", two), ("global_step", two)])
    write(f"{d}/src/rank_1/old.safetensors", st_file(shard_rows(2, 1)), None, None)
    entry(d, "rank folders of two files with a map; rank_1 also holds old.safetensors, which the map does not name",
          "rank_1/old.safetensors, 'not named by'")

    d = f"{s}/remove_redundancy_slice_missing"
    # dev [2, 2]: w split 2 ways on dim 0 over the outer axis, replicated over the inner one
    # (groups rank_0/rank_1 and rank_2/rank_3); b replicated on all four.
    write(f"{d}/src_strategy.ckpt", strategy([("w", [2, 2], [1, -1]), ("b", [2, 2], [-1])]), None, None)
    rr = {"format": "ms", "remove_redundancy": "True"}
    # Rank 0 keeps w's first half and b; neither rank_2 nor rank_3 keeps w's second half.
    write(f"{d}/src/rank_0/model.safetensors", st_file(shard_rows(2, 0), rr), None, None)
    for r in (1, 2, 3):
        write(f"{d}/src/rank_{r}/model.safetensors", st_file([step], rr), None, None)
    entry(d, "saved with remove_redundancy: w's second half should be in rank_2 or rank_3 and is in neither",
          "'w', its box, 'no source rank holds', rank_2..rank_3")


def readme():
    lines = [
        "# Bad-input corpus",
        "",
        "Hostile and inconsistent inputs that reshard must refuse (issue 7): non-zero exit, one",
        "`reshard: error: ...` line naming the file (and rank, parameter, shapes where relevant), no",
        "panic, nothing under a final output name. Each entry is a row of a table in",
        "`crates/reshard-cli/tests/cli.rs` (or has a test named after it) that runs the real binary.",
        "",
        "Generated by `python3 tests/corpus/make_corpus.py` (standard library only, deterministic;",
        "it rewrites everything here but itself). The fuzz targets in `fuzz/` use these files as",
        "seeds too.",
        "",
        "How the tests use them: a file under `ckpt/` or `safetensors/` is copied to",
        "`SRC/rank_0/` and transformed as complete weights (`reshard transform --src_ckpt_dir SRC",
        "--dst_ckpt_dir OUT`), and `reshard inspect` is run on it; a file under `strategy/` is",
        "given to `transform` as `--dst_ckpt_strategy` (source `good/complete`) and as",
        "`--src_ckpt_strategy` (source `good/dp2/src`), and to `plan`; a folder under `sources/`",
        "is the `--src_ckpt_dir` (its `src/`) of `transform` and `plan`, with its",
        "`src_strategy.ckpt` / `dst_strategy.ckpt` when present. `good/` holds sound inputs for",
        "tests that need one.",
        "",
        "| entry | what it is | the message must name |",
        "|---|---|---|",
    ]
    for rel, what, names in ENTRIES:
        lines.append(f"| `{rel}` | {what} | {names} |")
    lines += [
        "",
        "Other refusals tested in `cli.rs` without a corpus file: output folder inside the source",
        "folder (also through `..` and a symlink), output folder not writable (a path under a",
        "regular file; `chmod 555`, as root run as `nobody` with setpriv), and the disk filling",
        "up during the write (`ulimit -f` on a generated 1 MiB source, and a 640 KiB tmpfs when",
        "mounting is permitted).",
        "",
        "Entries marked \"found by fuzzing\" came from the targets in `fuzz/`; they were bugs, now",
        "fixed, and their tests guard the fixes. A new finding goes in here with its test marked",
        "`#[ignore = \"reason\"]` until the core handles it.",
        "",
    ]
    with open(os.path.join(HERE, "README.md"), "w") as f:
        f.write("\n".join(lines))


def main():
    for sub in ("ckpt", "safetensors", "strategy", "sources", "good"):
        shutil.rmtree(os.path.join(HERE, sub), ignore_errors=True)
    make_ckpt_files()
    make_safetensors_files()
    make_strategy_files()
    make_source_folders()
    readme()
    total = 0
    for root, _, files in os.walk(HERE):
        for f in files:
            total += os.path.getsize(os.path.join(root, f))
    print(f"{len(ENTRIES)} corpus entries, {total} bytes under {HERE}")


if __name__ == "__main__":
    main()
