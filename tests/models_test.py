"""Tests for simclr_jax.models: ResNet encoders, heads, SimCLRModel and the factories.

Full-size networks are only traced (jax.eval_shape); numerics use tiny widths and are checked
against a float64 NumPy re-implementation written here, and global BatchNorm under
shard_map / pmap against single-device BatchNorm on the whole batch.
"""

import functools
import importlib
import json
import os
import tarfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import PartitionSpec as P

from simclr_jax import models
from simclr_jax.models import heads

# `simclr_jax.models.resnet` is the factory function (it shadows the submodule attribute).
resnet_module = importlib.import_module("simclr_jax.models.resnet")

EPS = 1e-5
MOMENTUM = 0.9


# ----------------------------------------------------------------------------- helpers


def _init_shapes(module, size=32):
    images = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
    return jax.eval_shape(
        lambda x: module.init_with_output(jax.random.key(0), x, train=False), images
    )


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _random_variables(module, *args, seed=0, **kwargs):
    """Test-side variables: shapes from eval_shape, values from NumPy (no XLA init compile).

    Kernels get fan-in scaled normals; BN scales/biases random (so zero-initialised residual
    branches take part); running statistics start at Flax's (0, 1).
    """
    shapes = jax.eval_shape(functools.partial(module.init, **kwargs), jax.random.key(0), *args)
    rng = np.random.default_rng(seed)
    out = {}
    for path, leaf in traverse_util.flatten_dict(shapes).items():
        if path[-1] == "kernel":
            value = rng.normal(0.0, 1.0 / np.sqrt(np.prod(leaf.shape[:-1])), leaf.shape)
        elif path[-1] == "scale":
            value = rng.uniform(0.5, 1.5, leaf.shape)
        elif path[-1] == "bias":
            value = rng.normal(0.0, 0.1, leaf.shape)
        elif path[-1] == "mean":
            value = np.zeros(leaf.shape)
        elif path[-1] == "var":
            value = np.ones(leaf.shape)
        else:
            raise AssertionError(f"unexpected variable {path}")
        out[path] = jnp.asarray(value, leaf.dtype)
    return traverse_util.unflatten_dict(out)


def _real_init(module, size):
    """Runs the module's own initialisers (rbg keys: threefry init compiles far slower on CPU)."""
    images = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
    key = jax.random.key(0, impl="unsafe_rbg")
    return jax.jit(lambda k: module.lazy_init(k, images, train=False))(key)


def _model_cfg(**overrides):
    cfg = mlc.ConfigDict(
        dict(
            depth=18,
            width_multiplier=1,
            base_width=8,
            cifar_stem=True,
            sk_ratio=0.0,
            dtype="float32",
            head_layers=3,
            head_dim=16,
            head_hidden_dim=0,
            bn_momentum=MOMENTUM,
            bn_epsilon=EPS,
        )
    )
    cfg.update(overrides)
    return cfg


# ------------------------------------------------------------ NumPy reference ResNet


def np_conv(x, w, stride):
    """Conv with the TF reference's fixed padding ((k-1)//2 before, rest after)."""
    k = w.shape[0]
    pb, pe = (k - 1) // 2, k - 1 - (k - 1) // 2
    xp = np.pad(x, ((0, 0), (pb, pe), (pb, pe), (0, 0)))
    ho = (xp.shape[1] - k) // stride + 1
    wo = (xp.shape[2] - k) // stride + 1
    out = np.zeros((x.shape[0], ho, wo, w.shape[-1]))
    for i in range(k):
        for j in range(k):
            patch = xp[:, i : i + stride * ho : stride, j : j + stride * wo : stride, :]
            out += patch @ w[i, j]
    return out


def np_bn(x, p, stats, path):
    """Train mode records batch stats in `stats`; eval mode reads `stats['running'][path]`."""
    if "running" in stats:
        mean, var = (np.asarray(a, np.float64) for a in stats["running"][path])
    else:
        axes = tuple(range(x.ndim - 1))
        mean, var = x.mean(axes), x.var(axes)
        stats[path] = (mean, var)
    y = (x - mean) / np.sqrt(var + EPS) * p["scale"]
    return y + p["bias"] if "bias" in p else y


def np_max_pool_same(x):
    """3x3 stride-2 max-pool with TF 'SAME' padding (extra pad at the end)."""
    h = x.shape[1]
    out = -(-h // 2)
    total = max((out - 1) * 2 + 3 - h, 0)
    xp = np.pad(
        x,
        ((0, 0), (total // 2, total - total // 2), (total // 2, total - total // 2), (0, 0)),
        constant_values=-np.inf,
    )
    return np.max(
        [xp[:, i : i + 2 * out : 2, j : j + 2 * out : 2] for i in range(3) for j in range(3)],
        axis=0,
    )


def np_avg_shortcut(x, stride):
    """ResNet-D pooling: TF 'SAME' 2x2 (valid pixels only) at stride 1, pad-then-VALID at 2."""
    if stride == 1:
        xp = np.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        ones = np.pad(np.ones_like(x[:1, :, :, :1]), ((0, 0), (0, 1), (0, 1), (0, 0)))
        h, w = x.shape[1:3]
        total = sum(xp[:, i : i + h, j : j + w] for i in range(2) for j in range(2))
        count = sum(ones[:, i : i + h, j : j + w] for i in range(2) for j in range(2))
        return total / count
    xp = np.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    ho = (xp.shape[1] - 2) // 2 + 1
    return (
        sum(xp[:, i : i + 2 * ho : 2, j : j + 2 * ho : 2] for i in range(2) for j in range(2)) / 4
    )


def np_sk(x, p, stride, stats, path):
    y = np.maximum(
        np_bn(np_conv(x, p["conv"]["kernel"], stride), p["bn"], stats, path + ("bn",)), 0
    )
    c = y.shape[-1] // 2
    a, b = y[..., :c], y[..., c:]
    g = (a + b).mean(axis=(1, 2), keepdims=True)
    g = np.maximum(
        np_bn(np_conv(g, p["fc1"]["kernel"], 1), p["fc1_bn"], stats, path + ("fc1_bn",)), 0
    )
    logits = np_conv(g, p["fc2"]["kernel"], 1)
    la, lb = logits[..., :c], logits[..., c:]
    wa = 1.0 / (1.0 + np.exp(lb - la))
    return a * wa + b * (1.0 - wa)


def np_block(x, bp, kind, stride, out_width, resnet_d, stats, name, projection):
    """One residual block (basic or bottleneck; SK convs when resnet_d) in NumPy.

    `projection`: the block has a projection shortcut (the first block of a stage), else an
    identity one.
    """
    assert ("proj_conv" in bp) == projection, (name, sorted(bp))

    def conv_bn(y, conv, bn, s):
        return np_bn(np_conv(y, bp[conv]["kernel"], s), bp[bn], stats, (name, bn))

    shortcut = x
    if projection:
        pooled = np_avg_shortcut(x, stride) if resnet_d else x
        shortcut = conv_bn(pooled, "proj_conv", "proj_bn", 1 if resnet_d else stride)
    if kind == "basic":
        y = np.maximum(conv_bn(x, "conv1", "bn1", stride), 0)
        y = conv_bn(y, "conv2", "bn2", 1)
    else:
        y = np.maximum(conv_bn(x, "conv1", "bn1", 1), 0)
        if resnet_d:
            y = np_sk(y, bp["sk2"], stride, stats, (name, "sk2"))
        else:
            y = np.maximum(conv_bn(y, "conv2", "bn2", stride), 0)
        y = conv_bn(y, "conv3", "bn3", 1)
    return np.maximum(y + shortcut, 0)


def np_resnet(params, x, depth, cifar_stem, sk_ratio, base_width, running=None):
    """Forward pass; returns (h, {bn path: (batch mean, batch var)}).

    Train mode (batch statistics) unless `running` maps bn paths to (mean, var).
    """
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    x = np.asarray(x, np.float64)
    stats = {} if running is None else {"running": running}
    resnet_d = sk_ratio > 0

    def stem(x, conv, bn, s):
        return np.maximum(np_bn(np_conv(x, p[conv]["kernel"], s), p[bn], stats, (bn,)), 0)

    if cifar_stem:
        x = stem(x, "stem_conv", "stem_bn", 1)
    else:
        if resnet_d:
            for i, s in ((1, 2), (2, 1), (3, 1)):
                x = stem(x, f"stem_conv{i}", f"stem_bn{i}", s)
        else:
            x = stem(x, "stem_conv", "stem_bn", 2)
        x = np_max_pool_same(x)
    kind, stages = models.BLOCK_COUNTS[depth]
    for stage, num_blocks in enumerate(stages):
        width = base_width * 2**stage
        out_width = width if kind == "basic" else 4 * width
        for index in range(num_blocks):
            name = f"block{stage + 1}_{index}"
            stride = 2 if stage > 0 and index == 0 else 1
            x = np_block(x, p[name], kind, stride, out_width, resnet_d, stats, name, index == 0)
    return x.mean(axis=(1, 2)), stats


# --------------------------------------------------------------------- parameter counts


def test_reference_parameter_counts():
    # The reference's counts (BN gamma/beta counted, moving statistics not), read from
    # checkpoints its TF2 code wrote. ResNet-18 includes the first stage's projection shortcut
    # (64 * 64 + 2 * 64 more than a shortcut only where the shape changes).
    r50 = _count(_init_shapes(models.resnet(50), 64)[1]["params"])
    r18 = _count(_init_shapes(models.resnet(18, cifar_stem=True))[1]["params"])
    print(f"\nResNet-50 1x params: {r50:,}; ResNet-18 CIFAR-stem params: {r18:,}")
    assert r50 == 23_508_032
    assert r18 == 11_173_056


def _encoder_layout(params, batch_stats):
    """{unit: sorted [(kind, shape)]}, units 'stem' or (stage, block) from 0, kinds 'kernel',
    'bn' (scale/bias) and 'stat' (running mean/var); and the set of blocks with a projection."""
    kinds = {"kernel": "kernel", "scale": "bn", "bias": "bn", "mean": "stat", "var": "stat"}
    layout, projected = {}, set()
    for tree in (params, batch_stats):
        for path, leaf in traverse_util.flatten_dict(tree).items():
            if path[0].startswith("stem"):
                unit = "stem"
            else:
                stage, index = path[0].removeprefix("block").split("_")
                unit = (int(stage) - 1, int(index))
                if "proj_conv" in path:
                    projected.add(unit)
            layout.setdefault(unit, []).append((kinds[path[-1]], tuple(leaf.shape)))
    return {unit: sorted(v) for unit, v in layout.items()}, projected


def _reference_layout(prefix):
    """_encoder_layout of the reference encoder in a TF2 checkpoint written by its code."""
    tf = pytest.importorskip("tensorflow")
    kinds = {"kernel": "kernel", "gamma": "bn", "beta": "bn"}
    kinds.update(moving_mean="stat", moving_variance="stat")
    layout, projected = {}, set()
    for name, shape in tf.train.load_checkpoint(prefix).get_variable_to_shape_map().items():
        # e.g. model/resnet_model/block_groups/0/layers/0/shortcut_layers/0/conv2d/kernel/
        # .ATTRIBUTES/VARIABLE_VALUE; the stem is model/resnet_model/initial_conv_relu_max_pool/.
        parts = name.split("/")
        if parts[:2] != ["model", "resnet_model"]:
            continue  # heads, optimizer slots, global step
        if parts[2] == "initial_conv_relu_max_pool":
            unit = "stem"
        else:
            assert parts[2] == "block_groups", name
            unit = (int(parts[3]), int(parts[5]))
            if parts[6] in ("shortcut_layers", "projection_layers"):
                projected.add(unit)
        layout.setdefault(unit, []).append((kinds[parts[-3]], tuple(shape)))
    return {unit: sorted(v) for unit, v in layout.items()}, projected


# Checkpoints written by the reference TF2 code, next to the repository (../shared/fixtures).
REFERENCE_FIXTURES = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    "shared",
    "fixtures",
    "simclr_tf2",
)


@pytest.mark.parametrize(
    "archive,expected_params",
    [("r18_cifar", 11_173_056), ("r50_sk1_64px", 35_215_584)],
)
def test_encoder_variables_match_a_reference_checkpoint(archive, expected_params, tmp_path):
    """Every conv kernel and BN variable of the reference encoder, block by block, has its
    counterpart of the same shape here (and no other), and the first block of every stage has
    a projection shortcut in both."""
    path = os.path.join(REFERENCE_FIXTURES, f"{archive}.tar.gz")
    if not os.path.exists(path):
        pytest.skip(f"the reference checkpoint fixture {path} is not available")
    with tarfile.open(path) as tar:
        tar.extractall(tmp_path, filter="data")
    with open(tmp_path / archive / "meta.json") as f:
        meta = json.load(f)
    ref_layout, ref_projected = _reference_layout(str(tmp_path / archive / "model_dir" / "ckpt-0"))
    module = models.resnet(
        meta["resnet_depth"], meta["width_multiplier"], meta["cifar_stem"], meta["sk_ratio"]
    )
    _, variables = _init_shapes(module, meta["image_size"])
    layout, projected = _encoder_layout(variables["params"], variables["batch_stats"])
    assert sorted(layout, key=str) == sorted(ref_layout, key=str)
    for unit, shapes in ref_layout.items():
        assert layout[unit] == shapes, unit
    assert projected == ref_projected == {(stage, 0) for stage in range(4)}
    ref_params = sum(
        int(np.prod(shape)) for v in ref_layout.values() for kind, shape in v if kind != "stat"
    )
    assert ref_params == _count(variables["params"]) == expected_params


@pytest.mark.parametrize("width,paper", [(2, 94e6), (4, 375e6)])
def test_wide_resnet50_parameter_counts(width, paper):
    _, variables = _init_shapes(models.resnet(50, width), 64)
    n = _count(variables["params"])
    print(f"\nResNet-50 {width}x params: {n:,} (paper: {paper / 1e6:.0f}M)")
    assert abs(n - paper) / paper < 0.02
    # Running statistics live in their own collection and are not parameters.
    assert set(variables) == {"params", "batch_stats"}


@pytest.mark.parametrize("depth", models.SUPPORTED_DEPTHS)
def test_output_width_every_depth(depth):
    expected = (512 if depth < 50 else 2048) * 2
    h, variables = _init_shapes(models.resnet(depth, 2), 64)
    assert h.shape == (2, expected) and h.dtype == jnp.float32
    assert models.representation_dim(depth, 2) == expected
    assert models.resnet(depth, 2).output_dim == expected
    stages = models.BLOCK_COUNTS[depth][1]
    assert sum(k.startswith("block") for k in variables["params"]) == sum(stages)
    # As the reference: a projection shortcut on the first block of every stage only.
    projected = {k for k, v in variables["params"].items() if "proj_conv" in v}
    assert projected == {f"block{stage}_0" for stage in range(1, 5)}


def test_selective_kernel_resnet50_builds():
    h, variables = _init_shapes(models.resnet(50, 1, sk_ratio=0.0625), 64)
    params = variables["params"]
    n = _count(params)
    print(f"\nResNet-50 1x SK(0.0625) params: {n:,} (SimCLRv2 paper: ~35M)")
    assert h.shape == (2, 2048)
    assert n == 35_215_584  # the reference's count (fixtures/simclr_tf2/r50_sk1_64px)
    # ResNet-D stem: 3x3 convs 32w, 32w, 64w.
    assert [params[f"stem_conv{i}"]["kernel"].shape for i in (1, 2, 3)] == [
        (3, 3, 3, 32),
        (3, 3, 32, 32),
        (3, 3, 32, 64),
    ]
    sk = params["block4_0"]["sk2"]
    assert sk["conv"]["kernel"].shape == (3, 3, 512, 1024)  # both branches in one conv
    assert sk["fc1"]["kernel"].shape == (1, 1, 512, 32)  # max(512 * 0.0625, 32)
    assert sk["fc2"]["kernel"].shape == (1, 1, 32, 1024)
    wide = _init_shapes(models.resnet(50, 4, sk_ratio=0.0625), 64)[1]["params"]
    assert wide["block4_0"]["sk2"]["fc1"]["kernel"].shape == (1, 1, 2048, 128)


# -------------------------------------------------------------- structure and numerics


def _assert_block_init(block, last_bn):
    """Last BN of the block: gamma 0; every other BN (shortcut, SK): gamma 1, beta 0."""
    flat = traverse_util.flatten_dict(block)
    scales = [path for path in flat if path[-1] == "scale"]
    assert (last_bn, "scale") in scales and len(scales) > 1
    for path in scales:
        np.testing.assert_array_equal(flat[path], 0.0 if path[:-1] == (last_bn,) else 1.0)
        np.testing.assert_array_equal(flat[path[:-1] + ("bias",)], 0.0)


def test_initialisation_zero_gamma_and_conv_init():
    params = _real_init(models.resnet(18, base_width=4), 32)["params"]
    blocks = [name for name in params if name.startswith("block")]
    assert len(blocks) == 8
    for name in blocks:
        _assert_block_init(params[name], "bn2")
    # VarianceScaling(1, fan_in, truncated normal): std sqrt(1 / fan_in), cut at 2 std of the
    # untruncated normal (whose std is rescaled by 1/0.8796 so the truncated one has std 1).
    kernel = np.asarray(params["block4_0"]["conv1"]["kernel"])
    std = 1.0 / np.sqrt(np.prod(kernel.shape[:-1]))
    assert abs(kernel.std() / std - 1.0) < 0.1
    assert np.abs(kernel).max() <= 2.0 * std / 0.87962566103423978 + 1e-6


@pytest.mark.parametrize("sk_ratio,stride", [(0.0, 2), (0.0625, 2), (0.0625, 1)])
def test_bottleneck_block_init_and_numpy_reference(sk_ratio, stride):
    # A single block: a whole ResNet-50's initialiser takes ~10 s to compile on CPU.
    conv = functools.partial(nn.Conv, use_bias=False, kernel_init=resnet_module.CONV_INIT)

    def make_block(train):
        norm = functools.partial(nn.BatchNorm, use_running_average=not train, epsilon=EPS)
        return resnet_module.BottleneckBlock(
            8, stride, conv, norm, sk_ratio > 0, sk_ratio, projection=True
        )

    x = jax.random.normal(jax.random.key(1), (6, 8, 8, 16))
    variables = jax.jit(make_block(False).init)(jax.random.key(0, impl="unsafe_rbg"), x)
    params = variables["params"]
    assert {"proj_conv", "proj_bn", "conv1", "bn1", "conv3", "bn3"} <= set(params)
    assert ("sk2" in params) == (sk_ratio > 0) and ("conv2" in params) == (sk_ratio == 0)
    _assert_block_init(params, "bn3")
    if sk_ratio > 0:
        # Reduction width max(8 * 0.0625, 32) = 32; both 3x3 branches in one conv.
        assert params["sk2"]["fc1"]["kernel"].shape == (1, 1, 8, 32)
        assert params["sk2"]["conv"]["kernel"].shape == (3, 3, 8, 16)
    # Fresh block in eval mode (running stats 0/1): the zero gamma leaves relu(shortcut).
    fresh = jax.jit(make_block(False).apply)(variables, x)
    np_params = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    xn = np.asarray(x, np.float64)
    pooled = np_avg_shortcut(xn, stride) if sk_ratio > 0 else xn
    shortcut = np_conv(pooled, np_params["proj_conv"]["kernel"], 1 if sk_ratio > 0 else stride)
    np.testing.assert_allclose(fresh, np.maximum(shortcut / np.sqrt(1 + EPS), 0), atol=1e-5)
    # Train mode with random BN parameters against the NumPy block.
    block = make_block(True)
    rand = _random_variables(block, x)
    y, _ = jax.jit(lambda v, x: block.apply(v, x, mutable=["batch_stats"]))(rand, x)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), rand["params"])
    y_ref = np_block(xn, p, "bottleneck", stride, 32, sk_ratio > 0, {}, "block", True)
    np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("block_cls,features", [("BasicBlock", 8), ("BottleneckBlock", 2)])
def test_a_block_without_projection_cannot_change_the_shape(block_cls, features):
    conv = functools.partial(nn.Conv, use_bias=False)
    norm = functools.partial(nn.BatchNorm, use_running_average=True)
    x = jax.ShapeDtypeStruct((2, 8, 8, 8), jnp.float32)
    for strides in (1, 2):
        block = getattr(resnet_module, block_cls)(features, strides, conv, norm)
        if strides == 1:  # same shape: an identity shortcut is fine
            assert "proj_conv" not in jax.eval_shape(block.init, jax.random.key(0), x)["params"]
        else:
            with pytest.raises(ValueError, match=r"changes the shape.*pass projection=True"):
                jax.eval_shape(block.init, jax.random.key(0), x)


@pytest.mark.parametrize("sk_ratio", [0.0, 0.0625])
@pytest.mark.parametrize("depth", [18, 50])
def test_no_conv_bias_anywhere(depth, sk_ratio):
    _, variables = _init_shapes(models.resnet(depth, sk_ratio=sk_ratio, base_width=4), 32)
    flat = traverse_util.flatten_dict(variables["params"])
    assert all(flat[p].ndim == 4 for p in flat if p[-1] == "kernel")
    # Every conv holds only a kernel; the encoder's only biases are BN betas.
    for path in flat:
        assert path[-1] in ("kernel", "scale", "bias"), path
        if path[-1] in ("scale", "bias"):
            assert "bn" in path[-2], path


@pytest.mark.parametrize(
    "depth,cifar_stem,sk_ratio,size",
    # CIFAR stem wins over the ResNet-D stem; basic blocks keep plain convs but get ResNet-D
    # shortcuts; ResNet-D stem; ImageNet stem with bottlenecks. SK convs are checked per block
    # (test_bottleneck_block_init_and_numpy_reference) to keep compile time down.
    [(18, True, 0.0625, 16), (18, False, 0.0625, 32), (50, False, 0.0, 64)],
)
def test_resnet_matches_numpy_reference(depth, cifar_stem, sk_ratio, size):
    # Computing in float64 (params stay float32) makes the comparison tight: in float32,
    # 50 layers of batch-6 BatchNorm amplify rounding to ~1e-3 and would hide small bugs.
    with jax.enable_x64(True):
        module = models.resnet(depth, 1, cifar_stem, sk_ratio, jnp.float64, base_width=4)
        x = jax.random.uniform(jax.random.key(3), (6, size, size, 3), jnp.float64)
        variables = _random_variables(module, x, train=False)

        @jax.jit
        def run(variables, x):
            # Train step, then eval with the updated running statistics: one compilation.
            h, state = module.apply(variables, x, train=True, mutable=["batch_stats"])
            h_eval = module.apply({"params": variables["params"], **state}, x, train=False)
            return h, state, h_eval

        h, state, h_eval = run(variables, x)
    h_ref, stats = np_resnet(variables["params"], x, depth, cifar_stem, sk_ratio, 4)
    assert h.dtype == jnp.float32
    np.testing.assert_allclose(h, h_ref, rtol=1e-5, atol=1e-6)
    new_stats = traverse_util.flatten_dict(state["batch_stats"])
    assert len(new_stats) == 2 * len(stats)
    running = {}
    for path, (mean, var) in stats.items():
        # Running stats start at (0, 1); one step of momentum 0.9 with the biased variance.
        mean_new, var_new = new_stats[path + ("mean",)], new_stats[path + ("var",)]
        np.testing.assert_allclose(mean_new, 0.1 * mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(var_new, 0.9 + 0.1 * var, rtol=1e-5, atol=1e-6)
        running[path] = (mean_new, var_new)
    # Eval mode normalises with the running statistics.
    h_eval_ref, _ = np_resnet(variables["params"], x, depth, cifar_stem, sk_ratio, 4, running)
    np.testing.assert_allclose(h_eval, h_eval_ref, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------- global BN


@pytest.fixture(scope="module")
def global_bn_case():
    """A tiny ResNet-18, 16 images, and single-device train-mode outputs on the whole batch."""
    module = models.resnet(18, cifar_stem=True, base_width=8, bn_axis_name="data")
    local = models.resnet(18, cifar_stem=True, base_width=8)
    x = jax.random.uniform(jax.random.key(7), (16, 16, 16, 3))
    variables = _random_variables(local, x, train=False)
    h_ref, state_ref = jax.jit(lambda v, x: local.apply(v, x, train=True, mutable=["batch_stats"]))(
        variables, x
    )
    return module, local, variables, x, h_ref, state_ref["batch_stats"]


def _per_device(module):
    def step(variables, x):
        h, state = module.apply(variables, x, train=True, mutable=["batch_stats"])
        # A leading device axis keeps every device's copy, so the test sees them all.
        return h, jax.tree.map(lambda s: s[None], state["batch_stats"])

    return step


def _assert_stats_match(stats, stats_ref, should_match):
    flat = traverse_util.flatten_dict(stats)
    flat_ref = traverse_util.flatten_dict(stats_ref)
    assert flat.keys() == flat_ref.keys()
    worst = 0.0
    for path, value in flat.items():
        value = np.asarray(value)
        assert value.shape[0] == 8
        ref = np.asarray(flat_ref[path])
        err = np.max(np.abs(value - ref[None]) / (np.abs(ref[None]) + 1e-3))
        worst = max(worst, float(err))
    if should_match:
        assert worst < 1e-4, worst
    else:
        assert worst > 1e-2, worst


def test_global_bn_shard_map_matches_single_device(global_bn_case):
    module, local, variables, x, h_ref, stats_ref = global_bn_case
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",))
    for mod, global_bn in ((module, True), (local, False)):
        fn = jax.jit(
            jax.shard_map(
                _per_device(mod),
                mesh=mesh,
                in_specs=(P(), P("data")),
                out_specs=(P("data"), P("data")),
            )
        )
        h, stats = fn(variables, x)
        _assert_stats_match(stats, stats_ref, should_match=global_bn)
        if global_bn:
            np.testing.assert_allclose(h, h_ref, rtol=1e-5, atol=1e-5)
        else:
            assert not np.allclose(h, h_ref, rtol=1e-3, atol=1e-3)


def test_global_bn_pmap_matches_single_device(global_bn_case):
    module, _, variables, x, h_ref, stats_ref = global_bn_case
    fn = jax.pmap(_per_device(module), axis_name="data", in_axes=(None, 0))
    h, stats = fn(variables, x.reshape(8, 2, *x.shape[1:]))
    _assert_stats_match(jax.tree.map(lambda s: s[:, 0], stats), stats_ref, should_match=True)
    np.testing.assert_allclose(np.asarray(h).reshape(h_ref.shape), h_ref, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------ bfloat16


@pytest.fixture(scope="module")
def f32_model_case():
    """A tiny float32 SimCLRModel, its inputs, outputs, and gradients of two losses."""
    cfg = _model_cfg(head_hidden_dim=None)
    model = models.build_model(cfg, num_classes=10)
    x = jax.random.uniform(jax.random.key(0), (8, 16, 16, 3))
    variables = _random_variables(model, x, train=False)

    def forward(params):
        out, _ = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            x,
            train=True,
            mutable=["batch_stats"],
        )
        return out

    def probe_loss(out):
        logp = jax.nn.log_softmax(out["probe_logits"])
        return -jnp.mean(jnp.take_along_axis(logp, (jnp.arange(8) % 10)[:, None], axis=1))

    def z_loss(out):
        return jnp.sum(out["z"] ** 2 * jnp.arange(16))

    @jax.jit
    def grads(params):
        # One forward, two pullbacks: keeps this to a single compilation.
        out, pullback = jax.vjp(forward, params)
        (probe_grads,) = pullback(jax.grad(probe_loss)(out))
        (z_grads,) = pullback(jax.grad(z_loss)(out))
        return out, probe_grads, z_grads

    out, probe_grads, z_grads = grads(variables["params"])
    return dict(x=x, variables=variables, out=out, probe_grads=probe_grads, z_grads=z_grads)


def test_bfloat16_model_params_and_stats_stay_float32(f32_model_case):
    x, variables = f32_model_case["x"], f32_model_case["variables"]
    m16 = models.build_model(_model_cfg(dtype="bfloat16", head_hidden_dim=None), num_classes=10)
    shapes = jax.eval_shape(functools.partial(m16.init, train=False), jax.random.key(1), x)
    for leaf in jax.tree.leaves(shapes):
        assert leaf.dtype == jnp.float32

    def loss_fn(params):
        out, state = m16.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            x,
            train=True,
            mutable=["batch_stats"],
        )
        return jnp.sum(out["z"] ** 2) + jnp.sum(out["probe_logits"]), (out, state)

    grads16, (out16, state16) = jax.jit(jax.grad(loss_fn, has_aux=True))(variables["params"])
    for leaf in jax.tree.leaves((grads16, state16)):
        assert leaf.dtype == jnp.float32 and np.all(np.isfinite(leaf))
    assert any(np.any(leaf != 0) for leaf in jax.tree.leaves(grads16["encoder"]))
    # bf16 keeps ~3 significant digits; BatchNorm over 8 images amplifies that per layer.
    out32 = f32_model_case["out"]
    for key, tol in (("h", 0.05), ("z", 0.15), ("probe_logits", 0.1)):
        assert out16[key].dtype == jnp.float32 and np.all(np.isfinite(out16[key]))
        rel = np.linalg.norm(out16[key] - out32[key]) / np.linalg.norm(out32[key])
        print(f"bf16 vs f32 relative error of {key}: {rel:.4f}")
        assert rel < tol, (key, rel)
    # Every conv, dense and BN layer must really compute in bf16 (else the above is vacuous).
    _, captured = jax.eval_shape(
        lambda v: m16.apply(
            v,
            x,
            train=False,
            capture_intermediates=lambda mdl, _: isinstance(mdl, nn.Conv | nn.Dense | nn.BatchNorm),
            mutable=["intermediates"],
        ),
        variables,
    )
    layers = traverse_util.flatten_dict(captured["intermediates"])
    assert len(layers) > 40
    for path, (value,) in layers.items():
        assert value.dtype == (jnp.float32 if "probe" in path else jnp.bfloat16), path


# ------------------------------------------------------------------------ heads


def _np_dense_bn(x, kernel, bn):
    y = x @ kernel
    mean, var = y.mean(0), y.var(0)
    y = (y - mean) / np.sqrt(var + EPS) * bn["scale"]
    return y + bn["bias"] if "bias" in bn else y


@pytest.mark.parametrize("num_layers,hidden_dim", [(3, None), (2, 24), (1, None)])
def test_projection_head_structure_and_numpy_reference(num_layers, hidden_dim):
    head = heads.ProjectionHead(num_layers=num_layers, out_dim=8, hidden_dim=hidden_dim)
    h = jax.random.normal(jax.random.key(0), (12, 20))
    variables = _random_variables(head, h, train=False)
    params = variables["params"]
    assert sorted(params) == sorted(
        [f"dense_{j}" for j in range(num_layers)] + [f"bn_{j}" for j in range(num_layers)]
    )
    width = hidden_dim or 20
    for j in range(num_layers):
        last = j == num_layers - 1
        assert set(params[f"dense_{j}"]) == {"kernel"}  # no dense bias
        assert params[f"dense_{j}"]["kernel"].shape[1] == (8 if last else width)
        assert set(params[f"bn_{j}"]) == ({"scale"} if last else {"scale", "bias"})
    (z, hiddens), _ = jax.jit(lambda v, h: head.apply(v, h, train=True, mutable=["batch_stats"]))(
        variables, h
    )
    assert len(hiddens) == num_layers + 1
    x = np.asarray(h, np.float64)
    expected = [x]
    for j in range(num_layers):
        p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
        x = _np_dense_bn(x, p[f"dense_{j}"]["kernel"], p[f"bn_{j}"])
        if j < num_layers - 1:
            x = np.maximum(x, 0)
        expected.append(x)
    for got, want in zip(hiddens, expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert z.shape == (12, 8) and z.dtype == jnp.float32
    np.testing.assert_array_equal(z, hiddens[-1])
    # The fine-tuning selector: 0 = h, k = k-th layer output, -1 = last.
    np.testing.assert_array_equal(heads.select_ft_features(hiddens, 0), h)
    np.testing.assert_array_equal(heads.select_ft_features(hiddens, -1), z)
    for k in range(1, num_layers + 1):
        np.testing.assert_allclose(
            heads.select_ft_features(hiddens, k), expected[k], rtol=1e-4, atol=1e-5
        )
    with pytest.raises(ValueError, match=r"ft_proj_selector.*got 5"):
        heads.select_ft_features(hiddens, num_layers + 2 if num_layers == 3 else 5)
    with pytest.raises(ValueError, match="ft_proj_selector"):
        heads.select_ft_features(hiddens, -(num_layers + 2))


def test_linear_head_has_bias_and_float32_logits():
    probe = heads.LinearHead(num_classes=5, dtype=jnp.bfloat16)
    x = jax.random.normal(jax.random.key(0), (4, 6))
    variables = jax.jit(probe.init)(jax.random.key(1), x)
    assert set(variables["params"]["dense"]) == {"kernel", "bias"}
    logits = jax.jit(probe.apply)(variables, x)
    assert logits.shape == (4, 5) and logits.dtype == jnp.float32
    ref = np.asarray(x) @ np.asarray(variables["params"]["dense"]["kernel"])
    np.testing.assert_allclose(logits, ref, rtol=3e-2, atol=3e-3)


# ------------------------------------------------------------------- SimCLRModel


def test_simclr_model_outputs_and_probe_stop_gradient(f32_model_case):
    variables, out = f32_model_case["variables"], f32_model_case["out"]
    assert set(variables["params"]) == {"encoder", "head", "probe"}
    assert set(variables["batch_stats"]) == {"encoder", "head"}
    assert out["h"].shape == (8, 64) and out["z"].shape == (8, 16)
    assert out["probe_logits"].shape == (8, 10)
    for leaf in jax.tree.leaves(out):
        assert leaf.dtype == jnp.float32
    # The probe's labels must not reach the encoder or the head.
    probe_grads = f32_model_case["probe_grads"]
    for part in ("encoder", "head"):
        for leaf in jax.tree.leaves(probe_grads[part]):
            np.testing.assert_array_equal(leaf, 0.0)
    assert all(np.any(leaf != 0) for leaf in jax.tree.leaves(probe_grads["probe"]))
    # ...while the projection output does train the encoder (so the zero above is meaningful).
    z_grads = f32_model_case["z_grads"]
    assert np.any(z_grads["encoder"]["stem_conv"]["kernel"] != 0)
    for leaf in jax.tree.leaves(z_grads["probe"]):
        np.testing.assert_array_equal(leaf, 0.0)


def test_build_encoder_and_hidden_dim_from_config():
    cfg = _model_cfg(head_hidden_dim=24, head_layers=2)
    encoder = models.build_encoder(cfg, bn_axis_name="data")
    assert isinstance(encoder, models.ResNet)
    assert (encoder.depth, encoder.base_width, encoder.bn_axis_name) == (18, 8, "data")
    model = models.build_model(cfg, num_classes=3, bn_axis_name="data")
    assert model.head.hidden_dim == 24 and model.head.num_layers == 2
    assert model.head.bn_axis_name == "data" and model.probe.num_classes == 3


# ------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        (dict(depth=20), r"depth must be one of \(18, 34, 50, 101, 152, 200\), got 20"),
        (dict(depth=50, width_multiplier=0), r"width_multiplier must be a positive int.*got 0"),
        (dict(depth=50, width_multiplier=1.5), r"width_multiplier.*got 1.5"),
        (dict(depth=50, sk_ratio=-0.1), r"sk_ratio must be a float >= 0.*got -0.1"),
        (dict(depth=18, base_width=0), r"base_width must be a positive int.*got 0"),
    ],
)
def test_resnet_bad_arguments(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        models.resnet(**kwargs)


def test_heads_and_factory_bad_arguments():
    with pytest.raises(ValueError, match=r"num_layers must be a positive int, got 0"):
        heads.ProjectionHead(num_layers=0)
    with pytest.raises(ValueError, match=r"out_dim must be a positive int, got -1"):
        heads.ProjectionHead(out_dim=-1)
    with pytest.raises(ValueError, match=r"num_classes must be a positive int, got 0"):
        heads.LinearHead(num_classes=0)
    with pytest.raises(
        ValueError, match=r"model.dtype must be one of \['bfloat16', 'float32'\], got 'float16'"
    ):
        models.build_model(_model_cfg(dtype="float16"), num_classes=10)
    with pytest.raises(ValueError, match=r"depth must be one of .* got 19"):
        models.build_encoder(_model_cfg(depth=19))
