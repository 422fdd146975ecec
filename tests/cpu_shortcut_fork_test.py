"""simclr_jax.cpu.shortcut_fork: same values and gradients as a plain fan-out, without the conv
fusion; offered to the ResNet by a conv class (simclr_jax.cpu.conv_class)."""

import functools
import importlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simclr_jax.cpu import conv_class
from simclr_jax.cpu.shortcut_fork import shortcut_fork

# The module, not the `resnet` factory that simclr_jax.models re-exports under the same name.
resnet = importlib.import_module("simclr_jax.models.resnet")


def _conv(fork: bool):
    """XLA's convolution, with or without `fork_shortcut`."""
    return conv_class.conv_class("xla", shortcut_fork=fork)


def test_fork_backward_is_the_sum_of_the_cotangents_nan_and_inf_included():
    x = jnp.zeros((3, 4, 5, 6))
    _, vjp = jax.vjp(shortcut_fork, x)
    rng = np.random.default_rng(0)
    a = rng.normal(size=x.shape).astype(np.float32)
    b = rng.normal(size=x.shape).astype(np.float32)
    # Non-finite values where the zero term reads ([:, :1, :1, :1]) must stay where they are.
    a[0, 0, 0, 0] = np.nan
    a[1, 0, 0, 0] = np.inf
    b[2, 0, 0, 0] = -np.inf
    (got,) = vjp((jnp.asarray(a), jnp.asarray(b)))
    np.testing.assert_array_equal(np.asarray(got), a + b)
    assert np.isfinite(np.asarray(got)).sum() == a.size - 3


def test_conv_class_carries_the_fork_on_cpu_only():
    assert _conv(True).fork_shortcut is shortcut_fork
    assert getattr(_conv(False), "fork_shortcut", None) is None
    assert _conv(False) is nn.Conv
    assert conv_class.conv_class("xla", backend="cpu").fork_shortcut is shortcut_fork
    assert conv_class.conv_class("auto", backend="gpu") is nn.Conv
    assert conv_class.conv_class("auto", backend="tpu") is nn.Conv
    assert conv_class.conv_class("xla", shortcut_fork=True, backend="tpu") is _conv(True)
    assert conv_class.describe(_conv(True)) == "xla+fork"


def _nonzero_gammas(params):
    """Every BN scale + 0.5: the last BN of each block starts at gamma = 0, which would leave the
    residual branches without gradient."""
    return jax.tree_util.tree_map_with_path(
        lambda path, p: p + 0.5 if "scale" in jax.tree_util.keystr(path) else p, params
    )


@pytest.mark.slow
def test_model_gradients_identical_with_and_without_fork():
    kwargs = dict(cifar_stem=True, base_width=8)
    plain = resnet.resnet(18, conv=_conv(False), **kwargs)
    forked = resnet.resnet(18, conv=_conv(True), **kwargs)
    x = jax.random.normal(jax.random.key(0), (4, 16, 16, 3))
    variables = plain.init(jax.random.key(1), x, train=True)
    params = _nonzero_gammas(variables["params"])

    def loss(model, params):
        h, updates = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            x,
            train=True,
            mutable=["batch_stats"],
        )
        return jnp.sum(jnp.sin(h)), updates

    (l0, s0), g0 = jax.value_and_grad(lambda p: loss(plain, p), has_aux=True)(params)
    (l1, s1), g1 = jax.value_and_grad(lambda p: loss(forked, p), has_aux=True)(params)
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    for a, b in zip(jax.tree.leaves((g0, s0)), jax.tree.leaves((g1, s1)), strict=True):
        np.testing.assert_allclose(b, a, rtol=2e-5, atol=1e-6)


@pytest.mark.slow
def test_bottleneck_block_gradients_identical_with_and_without_fork():
    def block(fork):
        return resnet.BottleneckBlock(
            features=4,
            strides=1,
            conv=functools.partial(nn.Conv, use_bias=False),
            norm=functools.partial(nn.BatchNorm, use_running_average=False),
            fork=shortcut_fork if fork else None,
        )

    x = jax.random.normal(jax.random.key(0), (4, 6, 6, 16))
    variables = block(False).init(jax.random.key(1), x)
    params = _nonzero_gammas(variables["params"])

    def loss(fork, params, x):
        y, _ = block(fork).apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            x,
            mutable=["batch_stats"],
        )
        return jnp.sum(jnp.sin(y))

    g0 = jax.grad(functools.partial(loss, False), argnums=(0, 1))(params, x)
    g1 = jax.grad(functools.partial(loss, True), argnums=(0, 1))(params, x)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
        np.testing.assert_allclose(b, a, rtol=2e-5, atol=1e-6)


def _ynn_fusions_with_a_convolution(hlo: str) -> int:
    computations = {}
    for block in hlo.split("\n\n"):
        match = re.match(r"\s*%([\w.\-]+) ", block)
        if match:
            computations[match.group(1)] = block
    entry = hlo[hlo.index("ENTRY") :]
    count = 0
    for line in entry.splitlines():
        if "__ynn_fusion" in line:
            called = re.search(r"calls=%([\w.\-]+)", line).group(1)
            count += "convolution(" in computations.get(called, "")
    return count


def test_fork_keeps_the_input_gradient_convs_out_of_ynnpack_fusions():
    """On XLA:CPU (jaxlib 0.10 + simclr_jax.cpu.xla_flags, as conftest applies them), the input
    gradient conv of an identity block fuses with the residual add into a YNNPACK fusion; the
    fork keeps every convolution of the train gradient a plain XLA convolution."""
    if jax.default_backend() != "cpu":
        pytest.skip("XLA:CPU fusion behaviour")
    x = jax.ShapeDtypeStruct((8, 16, 16, 3), jnp.float32)

    def count(fork: bool) -> int:
        model = resnet.resnet(18, cifar_stem=True, base_width=16, conv=_conv(fork))
        variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=True), x)

        def loss(params, batch_stats, x):
            h, _ = model.apply(
                {"params": params, "batch_stats": batch_stats},
                x,
                train=True,
                mutable=["batch_stats"],
            )
            return jnp.sum(h * h)

        lowered = jax.jit(jax.grad(loss)).lower(variables["params"], variables["batch_stats"], x)
        return _ynn_fusions_with_a_convolution(lowered.compile().as_text())

    # Positive control: without the fork this jaxlib fuses convs into YNNPACK fusions. If a later
    # XLA stops doing so, there is nothing left for the fork to prevent.
    if count(fork=False) == 0:
        pytest.skip("this XLA:CPU does not fuse convolutions into YNNPACK fusions")
    assert count(fork=True) == 0
