"""Smoke tests of the benchmark scripts' own logic (their figures are measured, never tested)."""

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", f"{ROOT}/benchmarks/{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_step_loads_configs_that_import_other_configs():
    train_step = _load("train_step")
    config = train_step.load_config(f"{ROOT}/configs/quickstart.py")
    assert config.model.base_width == 8
    assert train_step.load_config(f"{ROOT}/configs/cifar10.py:runlocal").model.depth == 18


def test_conv_layer_parts_times_each_convolution(tmp_path):
    conv_layer = _load("conv_layer")
    out = tmp_path / "parts.json"
    result = conv_layer.main(["--views=2", "--repeats=1", "--parts", f"--json={out}"])
    assert result["parts"] and out.exists()
    assert [row["shape"] for row in result["stages"]] == [
        "32x32x64",
        "16x16x128",
        "8x8x256",
        "4x4x512",
    ]
    for row in result["stages"]:
        for part in ("fwd", "dx", "dw"):
            assert row[f"{part}_ms"] > 0 and row[f"{part}_gflops"] > 0


def test_conv_layer_rejects_unknown_impl():
    with pytest.raises(SystemExit):
        _load("conv_layer").parse_args(["--impl=cudnn"])


def test_knn_memory_compiles_old_and_new_steps_at_small_shapes(tmp_path):
    knn_memory = _load("knn_memory")
    out = tmp_path / "knn.json"
    rows = knn_memory.main(
        ["--memory=301", "--dim=8", "--num_classes=5", "--k=50", "--chunk=4", "--block=16"]
        + ["--devices=1,8", f"--json={out}"]
    )
    assert [row["setting"] for row in rows] == ["old, 1 device", "new, 1 device", "new, 8 devices"]
    assert out.exists()
    # 301 rows over 8 devices: 38 per device, in 3 blocks of 13 (at most 16), so 39.
    assert (rows[2]["rows_per_device"], rows[2]["block"]) == (39, 13)
    for row in rows:
        assert row["argument_gib"] > 0 and row["total_gib"] >= row["argument_gib"]
    # The memory's share of a device's arguments shrinks with the device count.
    assert rows[2]["argument_gib"] < rows[1]["argument_gib"] < rows[0]["argument_gib"]
