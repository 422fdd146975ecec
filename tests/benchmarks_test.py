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
