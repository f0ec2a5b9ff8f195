"""The Python module (ctypes over libreshard) with s3:// URLs, against the SeaweedFS server that
tests/s3/run.sh starts (RESHARD_S3_TEST_ENDPOINT). The store is checked with curl, not reshard."""

import os
import subprocess
import sys
import uuid

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, os.pardir))
sys.path.insert(0, os.path.join(ROOT, "bindings", "python"))
import reshard  # noqa: E402

ENDPOINT = os.environ["RESHARD_S3_TEST_ENDPOINT"]
KEY, SECRET = "reshardtestkey", "reshardtestsecret"
CASE = os.path.join(ROOT, "tests", "fixtures", "conformance", "dp1mp4_to_dp4mp2")


def curl(*args, path):
    out = subprocess.run(
        ["curl", "-s", "-w", "\n%{http_code}", "--aws-sigv4", "aws:amz:us-east-1:s3", "--user", f"{KEY}:{SECRET}",
         *args, f"{ENDPOINT}/{path}"],
        check=True, capture_output=True,
    ).stdout
    body, _, code = out.rpartition(b"\n")
    return int(code), body


@pytest.fixture()
def bucket(monkeypatch):
    for k, v in {"AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_ENDPOINT_URL": ENDPOINT,
                 "AWS_ALLOW_HTTP": "true", "AWS_REGION": "us-east-1", "RESHARD_S3_RETRIES": "1"}.items():
        monkeypatch.setenv(k, v)
    name = f"py-{uuid.uuid4().hex[:12]}"
    assert curl("-X", "PUT", path=name)[0] == 200
    for r in range(4):
        f = f"rank_{r}/checkpoint_{r}.ckpt"
        assert curl("-T", os.path.join(CASE, "src", f), path=f"{name}/src/{f}")[0] == 200
    assert curl("-T", os.path.join(CASE, "src_strategy.ckpt"), path=f"{name}/src_strategy.ckpt")[0] == 200
    return name


def test_transform_checkpoints_from_and_to_s3(bucket):
    reshard.transform_checkpoints(
        f"s3://{bucket}/src", f"s3://{bucket}/out", "checkpoint_",
        src_strategy_file=f"s3://{bucket}/src_strategy.ckpt",
        dst_strategy_file=os.path.join(CASE, "dst_strategy.ckpt"),
    )
    for r in range(8):
        f = f"rank_{r}/checkpoint_{r}.ckpt"
        code, body = curl(path=f"{bucket}/out/{f}")
        assert code == 200, f
        with open(os.path.join(CASE, "expected", f), "rb") as want:
            assert body == want.read(), f
    with reshard.Plan(f"s3://{bucket}/src", f"s3://{bucket}/src_strategy.ckpt",
                      os.path.join(CASE, "dst_strategy.ckpt")) as plan:
        assert plan.dst_rank_count == 8
        assert sorted(plan.src_ranks(0)) == [0, 1]


def test_wrong_keys_raise_naming_the_url_and_the_code(bucket, monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    # A bucket this process has not used yet: clients are made once per bucket.
    other = f"py-{uuid.uuid4().hex[:12]}"
    with pytest.raises(reshard.ReshardError) as e:
        reshard.transform_checkpoints(f"s3://{other}/src", str(tmp_path / "out"), "checkpoint_")
    assert f"s3://{other}/src" in str(e.value) and "store error code" in str(e.value), str(e.value)
    assert not (tmp_path / "out").exists()


def test_unified_safetensors_from_s3_to_s3(bucket, tmp_path):
    st = os.path.join(ROOT, "tests", "fixtures", "st_era", "dp2mp2")
    for r in range(4):
        f = f"rank_{r}/checkpoint_{r}.safetensors"
        assert curl("-T", os.path.join(st, "full", f), path=f"{bucket}/st/{f}")[0] == 200
    assert curl("-T", os.path.join(st, "src_strategy.ckpt"), path=f"{bucket}/st_strategy.ckpt")[0] == 200
    reshard.unified_safetensors(f"s3://{bucket}/st", f"s3://{bucket}/st_strategy.ckpt", f"s3://{bucket}/unified")
    for f in ["part0.safetensors", "hyper_param.safetensors", "param_name_map.json"]:
        code, body = curl(path=f"{bucket}/unified/{f}")
        assert code == 200, f
        with open(os.path.join(st, "unified_full", f), "rb") as want:
            assert body == want.read(), f
