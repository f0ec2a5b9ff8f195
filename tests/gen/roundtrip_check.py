#!/usr/bin/env python3
"""Check a checkpoint (e.g. one written by reshard) by loading it with real MindSpore.

Usage (with the MindSpore venv):
  /work/msvenv/bin/python tests/gen/roundtrip_check.py FILE EXPECTED [--crc] [--ordered]
  /work/msvenv/bin/python tests/gen/roundtrip_check.py OUT_DIR EXPECTED_DIR [--crc] [--ordered]

FILE      a .ckpt or .safetensors file; it is loaded with mindspore.load_checkpoint.
EXPECTED  either an expected.json as written by make_fixtures.py
          ({"tensors": [{"name", "dtype", "shape", "hex"}, ...]}) or another .ckpt/.safetensors that
          MindSpore loads as the reference (e.g. conformance/<case>/expected/rank_0/checkpoint_0.ckpt).
Directories: every checkpoint file under EXPECTED_DIR must exist at the same relative path under
OUT_DIR and match; checkpoint files under OUT_DIR that EXPECTED_DIR lacks are errors too.

Every tensor must match in name, dtype (MindSpore names: Float32, BFloat16, Int32, str, ...), shape
and raw content bytes; no tensor may be missing or extra.  --crc loads FILE with crc_check=True
(it is also used when the expected.json records a crc).  --ordered also requires the same order.
Exit status: 0 = equal, 1 = mismatch, 2 = MindSpore could not load a file.
"""
import json
import os
import sys

os.environ.setdefault("GLOG_v", "3")

import mindspore as ms  # noqa: E402

CKPT_EXTS = (".ckpt", ".safetensors")


def fmt_of(path):
    return "safetensors" if path.endswith(".safetensors") else "ckpt"


def load_entries(path, crc_check):
    """[(name, dtype, shape or None, bytes)] in the order MindSpore returns them."""
    loaded = ms.load_checkpoint(path, format=fmt_of(path), crc_check=crc_check)
    out = []
    for name, v in loaded.items():
        if isinstance(v, str):
            out.append((name, "str", None, v.encode("utf-32-le")))
        else:
            out.append((name, str(v.dtype), [int(d) for d in v.shape], bytes(v.get_bytes())))
    return out


def expected_entries(path, crc_flag):
    if path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            exp = json.load(f)
        ents = []
        for t in exp["tensors"]:
            shape = None if t["dtype"] == "str" else list(t["shape"])
            ents.append((t["name"], t["dtype"], shape, bytes.fromhex(t["hex"])))
        return ents, crc_flag or "crc" in exp
    return load_entries(path, crc_flag), crc_flag


def compare(file_path, exp_path, crc_flag, ordered):
    """Returns a list of error strings (empty = equal). Raises on load failure."""
    exp, crc_check = expected_entries(exp_path, crc_flag)
    got = load_entries(file_path, crc_check)
    errors = []
    got_map = {e[0]: e for e in got}
    exp_map = {e[0]: e for e in exp}
    for name in exp_map:
        if name not in got_map:
            errors.append("missing tensor %r" % name)
    for name in got_map:
        if name not in exp_map:
            errors.append("unexpected tensor %r" % name)
    for name, dtype, shape, data in exp:
        if name not in got_map:
            continue
        _, gdtype, gshape, gdata = got_map[name]
        if gdtype != dtype:
            errors.append("%s: dtype %s, expected %s" % (name, gdtype, dtype))
        if shape is not None and gshape != shape:
            errors.append("%s: shape %s, expected %s" % (name, gshape, shape))
        if gdata != data:
            diff = next((i for i, (a, b) in enumerate(zip(gdata, data)) if a != b), min(len(gdata), len(data)))
            errors.append("%s: content differs (%d vs %d bytes, first difference at byte %d)"
                          % (name, len(gdata), len(data), diff))
    if ordered and [e[0] for e in got] != [e[0] for e in exp]:
        errors.append("order differs: got %s, expected %s" % ([e[0] for e in got], [e[0] for e in exp]))
    return errors


def ckpt_files(root):
    out = set()
    for d, _, files in os.walk(root):
        for f in files:
            if f.endswith(CKPT_EXTS):
                out.add(os.path.relpath(os.path.join(d, f), root))
    return out


def main(argv):
    args = [a for a in argv if not a.startswith("--")]
    flags = {a for a in argv if a.startswith("--")}
    unknown = flags - {"--crc", "--ordered"}
    if len(args) != 2 or unknown:
        sys.stderr.write(__doc__)
        return 2
    target, expected = args
    crc_flag, ordered = "--crc" in flags, "--ordered" in flags
    if os.path.isdir(expected):
        if not os.path.isdir(target):
            print("FAIL: %s is not a directory" % target)
            return 1
        pairs = []
        exp_files, got_files = ckpt_files(expected), ckpt_files(target)
        status = 0
        for extra in sorted(got_files - exp_files):
            print("FAIL %s: not in %s" % (extra, expected))
            status = 1
        for rel in sorted(exp_files):
            if rel not in got_files:
                print("FAIL %s: missing" % rel)
                status = 1
                continue
            pairs.append((os.path.join(target, rel), os.path.join(expected, rel), rel))
    else:
        pairs, status = [(target, expected, target)], 0
    for file_path, exp_path, label in pairs:
        try:
            errors = compare(file_path, exp_path, crc_flag, ordered)
        except Exception as e:  # noqa: BLE001
            print("ERROR %s: MindSpore could not load it: %s" % (label, str(e).strip().splitlines()[0]))
            return 2
        if errors:
            status = 1
            print("FAIL %s" % label)
            for err in errors:
                print("  " + err)
        else:
            print("OK   %s" % label)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
