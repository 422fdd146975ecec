"""Tests for simclr_jax.cpu.conv_layers: MatmulConv must equal flax.linen.Conv to float32 noise."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simclr_jax.cpu import conv_layers as convs
from simclr_jax.models import resnet


def _fixed(k):
    total = k - 1
    pad = (total // 2, total - total // 2)
    return (pad, pad)


def _rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)


def _np_conv(x, k, stride, pads):
    """Direct NumPy convolution (independent of XLA): NHWC x HWIO."""
    x = np.pad(np.asarray(x, np.float64), ((0, 0),) + tuple(pads) + ((0, 0),))
    kh, kw, _, cout = k.shape
    n, hp, wp, _ = x.shape
    ho, wo = (hp - kh) // stride + 1, (wp - kw) // stride + 1
    out = np.zeros((n, ho, wo, cout))
    for i in range(kh):
        for j in range(kw):
            win = x[
                :, i : i + (ho - 1) * stride + 1 : stride, j : j + (wo - 1) * stride + 1 : stride
            ]
            out += win @ np.asarray(k[i, j], np.float64)
    return out


CASES = [(3, 1, 8), (3, 2, 8), (1, 1, 8), (1, 2, 8), (7, 2, 9)]


@pytest.mark.parametrize("kernel,stride,size", CASES)
def test_matmul_conv_matches_nn_conv_and_numpy(kernel, stride, size):
    x = jax.random.normal(jax.random.key(0), (2, size, size, 5))
    kwargs = dict(
        features=6,
        kernel_size=(kernel, kernel),
        strides=(stride, stride),
        padding=_fixed(kernel),
        use_bias=False,
    )
    ref_mod, mm_mod = nn.Conv(**kwargs), convs.MatmulConv(**kwargs)
    params = ref_mod.init(jax.random.key(1), x)
    mm_params = mm_mod.init(jax.random.key(1), x)
    # Same tree, same shapes, and same init values (same initialiser and rng path).
    assert jax.tree.structure(params) == jax.tree.structure(mm_params)
    np.testing.assert_array_equal(params["params"]["kernel"], mm_params["params"]["kernel"])

    y_ref = ref_mod.apply(params, x)
    y_mm = mm_mod.apply(params, x)
    assert y_mm.shape == y_ref.shape
    assert _rel_err(y_mm, y_ref) < 1e-5
    numpy_y = _np_conv(x, np.asarray(params["params"]["kernel"]), stride, _fixed(kernel))
    assert _rel_err(y_mm, numpy_y) < 1e-5

    cot = jax.random.normal(jax.random.key(2), y_ref.shape)

    def loss(mod, p, inputs):
        return jnp.sum(mod.apply(p, inputs) * cot)

    g_ref = jax.jit(jax.grad(lambda p, i: loss(ref_mod, p, i), argnums=(0, 1)))(params, x)
    g_mm = jax.jit(jax.grad(lambda p, i: loss(mm_mod, p, i), argnums=(0, 1)))(params, x)
    assert _rel_err(g_mm[0]["params"]["kernel"], g_ref[0]["params"]["kernel"]) < 1e-5
    assert _rel_err(g_mm[1], g_ref[1]) < 1e-5


@pytest.mark.parametrize("padding", ["SAME", "VALID", 1])
def test_other_padding_specs_match_nn_conv(padding):
    x = jax.random.normal(jax.random.key(0), (1, 7, 8, 3))
    kwargs = dict(features=4, kernel_size=(3, 3), strides=2, padding=padding)
    params = nn.Conv(**kwargs).init(jax.random.key(1), x)
    y_ref = nn.Conv(**kwargs).apply(params, x)
    y_mm = convs.MatmulConv(**kwargs).apply(params, x)  # use_bias=True by default in both
    assert y_mm.shape == y_ref.shape
    assert _rel_err(y_mm, y_ref) < 1e-5


@pytest.mark.slow
def test_tiny_resnet18_same_outputs_and_gradients():
    x = jax.random.uniform(jax.random.key(0), (4, 16, 16, 3))
    ref = resnet(18, cifar_stem=True, base_width=8, conv=nn.Conv)
    mm = resnet(18, cifar_stem=True, base_width=8, conv=convs.MatmulConv)
    variables = ref.init(jax.random.key(1), x, train=False)
    mm_vars = mm.init(jax.random.key(1), x, train=False)
    # Checkpoints are interchangeable: identical trees and shapes, identical init.
    assert jax.tree.structure(variables) == jax.tree.structure(mm_vars)
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(mm_vars), strict=True):
        np.testing.assert_array_equal(a, b)

    def loss(model, params):
        h, _ = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            x,
            train=True,
            mutable=["batch_stats"],
        )
        # A loss that does not vanish with the zero-init last BN of each block.
        return jnp.sum(jnp.sin(h)), h

    (_, h_ref), g_ref = jax.jit(jax.value_and_grad(lambda p: loss(ref, p), has_aux=True))(
        variables["params"]
    )
    (_, h_mm), g_mm = jax.jit(jax.value_and_grad(lambda p: loss(mm, p), has_aux=True))(
        variables["params"]
    )
    assert _rel_err(h_mm, h_ref) < 1e-5
    flat_ref = jax.tree_util.tree_leaves_with_path(g_ref)
    flat_mm = jax.tree.leaves(g_mm)
    for (path, a), b in zip(flat_ref, flat_mm, strict=True):
        # Normalise by the largest gradient of the tree so tiny leaves are not over-weighted.
        scale = max(float(np.max(np.abs(leaf))) for leaf in jax.tree.leaves(g_ref))
        err = float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) / scale
        assert err < 1e-5, (jax.tree_util.keystr(path), err)


def test_bfloat16_runs_and_is_close():
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
    kwargs = dict(features=8, kernel_size=(3, 3), strides=2, padding=_fixed(3), use_bias=False)
    params = nn.Conv(**kwargs).init(jax.random.key(1), x)
    y32 = nn.Conv(**kwargs).apply(params, x)
    y16 = convs.MatmulConv(**kwargs, dtype=jnp.bfloat16).apply(params, x)
    assert y16.dtype == jnp.bfloat16
    assert params["params"]["kernel"].dtype == jnp.float32
    assert _rel_err(y16.astype(jnp.float32), y32) < 3e-2
    g = jax.grad(lambda p: jnp.sum(convs.MatmulConv(**kwargs, dtype=jnp.bfloat16).apply(p, x)))(
        params
    )
    assert np.all(np.isfinite(np.asarray(g["params"]["kernel"], np.float32)))


def test_matmul_conv_rejects_unsupported_padding():
    with pytest.raises(ValueError, match="padding"):
        convs.MatmulConv(4, (3, 3), padding="CIRCULAR").init(
            jax.random.key(0), jnp.zeros((1, 4, 4, 2))
        )


def test_is_an_nn_conv_and_rejects_unsupported_options():
    # isinstance(layer, nn.Conv) checks elsewhere (e.g. capture_intermediates filters) must
    # still see the convs when the matmul implementation is used.
    assert issubclass(convs.MatmulConv, nn.Conv)
    x = jnp.zeros((1, 6, 6, 2))
    with pytest.raises(ValueError, match="kernel_dilation"):
        convs.MatmulConv(4, (3, 3), kernel_dilation=2).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="feature_group_count"):
        convs.MatmulConv(4, (3, 3), feature_group_count=2).init(jax.random.key(0), x)
