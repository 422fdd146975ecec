"""Smoke tests of the benchmark scripts' own logic (their figures are measured, never tested)."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
from optional_deps import import_or_skip

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


def _model_conv_macs(module, size: int) -> int:
    """Forward multiply-accumulates per image of every conv in `module`, read from its own
    layers (output size x kernel size), independently of the benchmark's formula."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import traverse_util

    images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)

    def init(x):
        return module.init_with_output(
            jax.random.key(0),
            x,
            train=False,
            capture_intermediates=lambda mdl, _: isinstance(mdl, nn.Conv),
            mutable=["params", "batch_stats", "intermediates"],
        )

    _, variables = jax.eval_shape(init, images)
    kernels = traverse_util.flatten_dict(variables["params"])
    macs = 0
    for path, (out,) in traverse_util.flatten_dict(variables["intermediates"]).items():
        kernel = kernels[path[:-1] + ("kernel",)]  # path ends in '__call__'
        macs += int(np.prod(out.shape[1:3])) * int(np.prod(kernel.shape))
    return macs


@pytest.mark.parametrize(
    "depth,size,cifar_stem,expected_gmacs", [(18, 32, True, 0.5596), (50, 224, False, 4.0871)]
)
def test_analytic_macs_match_the_model_layers(depth, size, cifar_stem, expected_gmacs):
    from simclr_jax import models

    train_step = _load("train_step")
    head_layers, head_dim = 3, 128
    macs = train_step.analytic_encoder_macs(depth, 64, size, cifar_stem, head_layers, head_dim)
    dim = models.representation_dim(depth)
    head = dim * dim * (head_layers - 1) + dim * head_dim
    model = models.resnet(depth, cifar_stem=cifar_stem)
    assert macs == _model_conv_macs(model, size) + head
    # The encoder's published counts: ResNet-50 at 224 px 4.09 G; ResNet-18 CIFAR 0.5596 G
    # with the reference's first-stage projection shortcut (0.5554 G without it).
    assert (macs - head) / 1e9 == pytest.approx(expected_gmacs, abs=5e-5)


def test_peer_torch_model_has_the_same_encoder_parameters():
    import_or_skip("torch", "torch")
    import jax
    import jax.numpy as jnp
    import numpy as np

    from simclr_jax import models

    peer_torch = _load("peer_torch")
    # Encoder only (stem and blocks); BN running statistics are buffers, not parameters.
    peer = peer_torch.SimCLRNet(width=8)
    torch_shapes = sorted(
        tuple(p.shape) for part in (peer.stem, peer.blocks) for p in part.parameters()
    )
    module = models.resnet(18, cifar_stem=True, base_width=8)
    images = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    params = jax.eval_shape(lambda x: module.init(jax.random.key(0), x, train=False), images)
    # torch conv weights are [out, in, kh, kw]; flax kernels [kh, kw, in, out].
    ours = sorted(
        (x.shape[3], x.shape[2], x.shape[0], x.shape[1]) if x.ndim == 4 else tuple(x.shape)
        for x in jax.tree.leaves(params["params"])
    )
    assert torch_shapes == ours
    full = peer_torch.SimCLRNet()
    count = sum(
        int(np.prod(p.shape)) for part in (full.stem, full.blocks) for p in part.parameters()
    )
    assert count == 11_173_056


@pytest.mark.parametrize("width", [8, 64])
def test_peer_torch_hooked_macs_equal_the_analytic_count(width):
    """Both scripts' utilisation rests on the same FLOPs: torch's hooks vs our layer shapes."""
    import_or_skip("torch", "torch")
    peer_torch = _load("peer_torch")
    torch_macs = peer_torch.forward_macs(peer_torch.SimCLRNet(width), (2, 3, 32, 32), "cpu")
    # The 3-layer head is 8w-8w-8w-128 at base width w on both sides.
    assert torch_macs == _load("train_step").analytic_encoder_macs(18, width, 32, True, 3, 128)


def test_vendor_peaks_match_whole_device_names():
    train_step = _load("train_step")
    assert train_step.vendor_peak("NVIDIA H200", "bfloat16") == 989e12
    assert train_step.vendor_peak("NVIDIA H100 PCIe", "bfloat16") == 756e12
    assert train_step.vendor_peak("NVIDIA H100 80GB HBM3", "float32") == 67e12
    assert train_step.vendor_peak("NVIDIA L40S", "bfloat16") is None  # not L4's
    assert train_step.vendor_peak("TPU v4", "bfloat16") == 275e12
    import_or_skip("torch", "torch")
    assert _load("peer_torch").vendor_peak("NVIDIA H200", "float32") == 67e12


def test_peer_torch_runs_a_bfloat16_step_on_cpu(tmp_path):
    """The autocast path (used on GPUs) runs end to end and reports what it ran."""
    import_or_skip("torch", "torch")
    out = tmp_path / "peer.json"
    import torch

    args = ["--batch=4", "--width=4", "--steps=1", "--warmup=0", "--threads=1"]
    threads = torch.get_num_threads()
    try:
        result = _load("peer_torch").main([*args, "--dtype=bfloat16", f"--json={out}"])
    finally:
        torch.set_num_threads(threads)  # main sets the process-wide thread count
    assert json.loads(out.read_text()) == result
    assert result["dtype"] == "bfloat16" and result["device"] == "cpu"
    assert result["images_per_s"] > 0 and result["utilisation_vs_vendor_peak"] == "n/a"


@pytest.mark.slow
@pytest.mark.parametrize("config", ["configs/byol_cifar10.py:runlocal", "configs/quickstart.py"])
def test_train_step_benchmark_times_the_configs_method(config, tmp_path):
    """The device script runs end to end for an EMA method and for SimCLR (tiny shapes)."""
    out = tmp_path / "step.json"
    cmd = [sys.executable, f"{ROOT}/benchmarks/train_step.py", f"--config={ROOT}/{config}",
           "--batch=8", "--base_width=4", "--steps=1", "--warmup=1", f"--json={out}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["method"] == ("byol" if "byol" in config else "simclr")
    assert result["images_per_s"] > 0 and result["batch"] == 8
