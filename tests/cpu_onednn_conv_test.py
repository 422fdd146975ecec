"""Tests for oneDNN's convolutions (simclr_jax.cpu.kernels) and OneDnnConv.

The three directions (forward, input gradient, kernel gradient) are checked against float64
NumPy formulas of the convolution and its gradients, and against XLA's own; the model and
multi-device paths against nn.Conv. Where oneDNN is not installed (the `cpu` extra) the tests
that need it skip, except under SIMCLR_TESTS_REQUIRE_EXTRAS=1 (CI), where
cpu_onednn_build_test.py's `test_onednn_is_usable_where_required` fails instead. Finding and
building oneDNN and the fallback: cpu_onednn_build_test.py.
"""

import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from simclr_jax.cpu import conv_layers as convs
from simclr_jax.cpu import kernels
from simclr_jax.cpu.kernels import onednn
from simclr_jax.models import resnet

needs_onednn = pytest.mark.skipif(
    not kernels.available(), reason=f"oneDNN unavailable: {kernels.unavailable_reason()}"
)
TARGETS = (onednn.FORWARD_TARGET, onednn.BACKWARD_DATA_TARGET, onednn.BACKWARD_WEIGHTS_TARGET)


def _windows(xp_shape, kh, kw, ho, wo, strides):
    """(i, j, index) per kernel tap: index picks the padded input positions tap (i, j) reads."""
    sh, sw = strides
    for i in range(kh):
        for j in range(kw):
            yield (
                i,
                j,
                (
                    slice(None),
                    slice(i, i + (ho - 1) * sh + 1, sh),
                    slice(j, j + (wo - 1) * sw + 1, sw),
                ),
            )


def _np_conv(x, w, strides, pads):
    """y[n, ho, wo] = sum over i, j of x_padded[n, ho*sh + i, wo*sw + j] @ w[i, j]."""
    (ph0, ph1), (pw0, pw1) = pads
    xp = np.pad(np.asarray(x, np.float64), ((0, 0), (ph0, ph1), (pw0, pw1), (0, 0)))
    kh, kw = w.shape[:2]
    ho = (xp.shape[1] - kh) // strides[0] + 1
    wo = (xp.shape[2] - kw) // strides[1] + 1
    y = np.zeros((x.shape[0], ho, wo, w.shape[-1]))
    for i, j, idx in _windows(xp.shape, kh, kw, ho, wo, strides):
        y += xp[idx] @ np.asarray(w[i, j], np.float64)
    return y


def _np_input_grad(dy, w, x_shape, strides, pads):
    """dx = the transpose of _np_conv: each tap scatters dy @ w[i, j]^T back onto the padded
    input, and the padding is cropped."""
    (ph0, ph1), (pw0, pw1) = pads
    n, h, wd, _ = x_shape
    dxp = np.zeros((n, h + ph0 + ph1, wd + pw0 + pw1, x_shape[3]))
    dy = np.asarray(dy, np.float64)
    _, ho, wo, _ = dy.shape
    kh, kw = w.shape[:2]
    for i, j, idx in _windows(dxp.shape, kh, kw, ho, wo, strides):
        dxp[idx] += dy @ np.asarray(w[i, j], np.float64).T
    return dxp[:, ph0 : ph0 + h, pw0 : pw0 + wd]


def _np_kernel_grad(x, dy, kh, kw, strides, pads):
    """dw[i, j] = sum over n, ho, wo of x_padded[n, ho*sh + i, wo*sw + j] (x) dy[n, ho, wo]."""
    (ph0, ph1), (pw0, pw1) = pads
    xp = np.pad(np.asarray(x, np.float64), ((0, 0), (ph0, ph1), (pw0, pw1), (0, 0)))
    dy = np.asarray(dy, np.float64)
    _, ho, wo, _ = dy.shape
    dw = np.zeros((kh, kw, x.shape[-1], dy.shape[-1]))
    for i, j, idx in _windows(xp.shape, kh, kw, ho, wo, strides):
        dw[i, j] = np.einsum("nhwc,nhwd->cd", xp[idx], dy)
    return dw


def _xla_conv(x, w, strides, pads):
    return jax.lax.conv_general_dilated(
        x, w, strides, pads, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def _rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)


# (n, h, w, cin, cout, kh, kw, strides, pads): odd sizes and channel counts (1, 3, 5, 7, 13,
# 130; outputs 1 to 144, most not a multiple of any vector width), asymmetric, over-sized and
# zero padding, 1x1, 3x1, 5x5 and 7x7 kernels, strides 1-3 (different per dim), and inputs
# whose last rows/columns no output reads (stride 2 over an even padded size).
CASES = [
    (3, 9, 7, 5, 16, 3, 3, (1, 1), ((1, 1), (1, 1))),
    (2, 8, 8, 13, 80, 3, 3, (2, 2), ((0, 1), (0, 1))),
    (4, 6, 6, 7, 32, 1, 1, (2, 2), ((0, 0), (0, 0))),
    (2, 11, 11, 3, 16, 7, 7, (2, 2), ((3, 3), (3, 3))),
    (1, 5, 5, 4, 48, 3, 3, (1, 1), ((2, 2), (2, 2))),
    (5, 7, 10, 6, 144, 3, 1, (2, 1), ((1, 1), (0, 0))),
    (2, 9, 8, 1, 5, 5, 5, (3, 2), ((2, 0), (1, 2))),
    (3, 8, 8, 3, 1, 3, 3, (2, 2), ((1, 1), (1, 1))),
    (2, 5, 5, 130, 7, 3, 3, (1, 1), ((1, 1), (1, 1))),
    (33, 4, 4, 16, 24, 3, 3, (1, 1), ((0, 2), (2, 0))),
    # 16 -> 16 channels: the blocked-layout path of the forward pass and input gradient.
    (3, 9, 8, 16, 16, 3, 3, (2, 2), ((0, 1), (1, 0))),
    (2, 7, 7, 16, 16, 1, 1, (2, 2), ((0, 0), (0, 0))),
    (2, 8, 9, 16, 16, 3, 1, (1, 2), ((1, 1), (0, 0))),
    (2, 11, 10, 16, 16, 5, 5, (3, 3), ((2, 2), (2, 2))),
]


def _case(n, h, w, cin, cout, kh, kw, strides, pads, seed):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((n, h, w, cin)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((kh, kw, cin, cout)), jnp.float32)
    ho, wo = onednn.output_size(x.shape, (kh, kw), strides, pads)
    dy = jnp.asarray(rng.standard_normal((n, ho, wo, cout)), jnp.float32)
    return x, k, dy


@needs_onednn
@pytest.mark.parametrize("n,h,w,cin,cout,kh,kw,strides,pads", CASES)
def test_three_directions_match_numpy_and_xla(n, h, w, cin, cout, kh, kw, strides, pads):
    x, k, dy = _case(n, h, w, cin, cout, kh, kw, strides, pads, seed=n * 1000 + cin)
    y = jax.jit(lambda x, k: kernels.conv_forward(x, k, strides, pads))(x, k)
    dx = jax.jit(lambda dy, k: kernels.conv_backward_data(dy, k, x.shape, strides, pads))(dy, k)
    dw = jax.jit(lambda x, dy: kernels.conv_backward_weights(x, dy, (kh, kw), strides, pads))(x, dy)
    y_xla, vjp = jax.vjp(lambda x, k: _xla_conv(x, k, strides, pads), x, k)
    dx_xla, dw_xla = vjp(dy)
    for ours, ref, xla in [
        (y, _np_conv(x, k, strides, pads), y_xla),
        (dx, _np_input_grad(dy, k, x.shape, strides, pads), dx_xla),
        (dw, _np_kernel_grad(x, dy, kh, kw, strides, pads), dw_xla),
    ]:
        assert ours.shape == ref.shape and ours.dtype == jnp.float32
        # Measured worst 2.9e-7 (this CPU); float32 sums of up to 1,200 terms, 30x margin.
        assert _rel_err(ours, ref) < 1e-5
        assert _rel_err(ours, xla) < 1e-5


@needs_onednn
def test_calls_are_bitwise_reproducible():
    """oneDNN 3.2 has no deterministic attribute (3.4+); what holds is tested instead: repeated
    calls in one process, with its fixed OpenMP team, give bitwise equal results in all three
    directions, for a batch that spreads over every thread (37 images) and a kernel gradient
    that the threads reduce."""
    x, k, dy = _case(37, 12, 12, 16, 32, 3, 3, (1, 1), ((1, 1), (1, 1)), seed=7)
    pads = ((1, 1), (1, 1))
    fns = [
        jax.jit(lambda x, k: kernels.conv_forward(x, k, (1, 1), pads)),
        jax.jit(lambda dy, k: kernels.conv_backward_data(dy, k, x.shape, (1, 1), pads)),
        jax.jit(lambda x, dy: kernels.conv_backward_weights(x, dy, (3, 3), (1, 1), pads)),
    ]
    args = [(x, k), (dy, k), (x, dy)]
    first = [np.asarray(f(*a)) for f, a in zip(fns, args, strict=True)]
    for _ in range(5):
        for f, a, ref in zip(fns, args, first, strict=True):
            np.testing.assert_array_equal(f(*a), ref)


@needs_onednn
@pytest.mark.parametrize(
    "stride,pads,ksize",
    [
        (1, ((1, 1), (1, 1)), (3, 3)),
        (2, ((0, 1), (0, 1)), (3, 3)),
        # Asymmetric padding and a non-square kernel: swapped sides or dims would show.
        (1, ((0, 2), (1, 0)), (3, 1)),
        (2, ((0, 0), (0, 0)), (1, 1)),
    ],
)
def test_onednn_conv_value_and_gradients_match_xla(stride, pads, ksize):
    rng = np.random.default_rng(stride)
    x = jnp.asarray(rng.standard_normal((4, 8, 8, 12)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((*ksize, 12, 20)) * 0.1, jnp.float32)
    ct = jnp.asarray(rng.standard_normal(_xla_conv(x, w, (stride,) * 2, pads).shape), jnp.float32)

    def loss(conv):
        return lambda x, w: jnp.sum(conv(x, w, (stride, stride), pads) * ct)

    ours = jax.jit(jax.value_and_grad(loss(convs.onednn_conv), argnums=(0, 1)))
    ref = jax.jit(jax.value_and_grad(loss(_xla_conv), argnums=(0, 1)))
    (v, (dx, dw)), (v_ref, (dx_ref, dw_ref)) = ours(x, w), ref(x, w)
    np.testing.assert_allclose(v, v_ref, rtol=1e-5)
    assert _rel_err(dx, dx_ref) < 1e-5
    assert _rel_err(dw, dw_ref) < 1e-5
    hlo = ours.lower(x, w).as_text()
    assert all(t in hlo for t in TARGETS)
    assert not any(t in ref.lower(x, w).as_text() for t in TARGETS)


def test_other_dtypes_stay_on_xla():
    x = jnp.ones((2, 6, 6, 4), jnp.bfloat16)
    w = jnp.ones((3, 3, 4, 16), jnp.bfloat16)
    f = jax.jit(jax.grad(lambda w: jnp.sum(convs.onednn_conv(x, w, 1, "SAME"))))
    assert not any(t in f.lower(w).as_text() for t in TARGETS)
    assert onednn.onednn_flops(f.trace(w).jaxpr) == 0


@needs_onednn
def test_onednn_flops_counts_the_calls():
    """Forward, input gradient and kernel gradient each cost 2 * outputs * kh * kw * cin *
    cout. The count is of the traced calls: a gradient the program drops (here dx, or the
    stem's input gradient in a ResNet, which XLA then removes) is counted all the same."""
    x = jnp.ones((3, 8, 8, 5))
    w = jnp.ones((3, 3, 5, 32))
    per_call = 2 * 3 * 4 * 4 * 3 * 3 * 5 * 32  # stride 2: 4 x 4 outputs
    f = jax.jit(jax.grad(lambda w: jnp.sum(convs.onednn_conv(x, w, 2, ((0, 1), (0, 1))))))
    assert onednn.onednn_flops(f.trace(w).jaxpr) == 3 * per_call
    fwd = jax.jit(lambda x, w: convs.onednn_conv(x, w, 2, ((0, 1), (0, 1))))
    assert onednn.onednn_flops(fwd.trace(x, w).jaxpr) == per_call


def _onednn_calls(fn, *args) -> int:
    """oneDNN FFI calls in the compiled program of fn(*args)."""
    text = jax.jit(fn).lower(*args).compile().as_text()
    return sum(text.count(t) for t in TARGETS)


@pytest.mark.slow
@needs_onednn
def test_resnet_onednn_matches_xla():
    """Whole ResNet-18 (widths 16-128, projection shortcuts, CIFAR stem): same parameter tree,
    same outputs, gradients equal to float32 noise. Per device (shard_map on one device), as
    in the train step, so OneDnnConv takes oneDNN."""
    x = jax.random.uniform(jax.random.key(0), (4, 16, 16, 3))
    ref = resnet(18, cifar_stem=True, base_width=16, conv=nn.Conv)
    ours = resnet(18, cifar_stem=True, base_width=16, conv=convs.OneDnnConv)
    variables = ref.init(jax.random.key(1), x, train=False)
    ours_vars = ours.init(jax.random.key(1), x, train=False)
    assert jax.tree.structure(variables) == jax.tree.structure(ours_vars)
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(ours_vars), strict=True):
        np.testing.assert_array_equal(a, b)
    # Non-zero last-BN gammas, so every block's branch carries gradient.
    params = jax.tree.map(lambda p: p + 0.5 if p.ndim == 1 else p, variables["params"])

    def grads(model):
        def loss(p):
            h, _ = model.apply(
                {"params": p, "batch_stats": variables["batch_stats"]},
                x,
                train=True,
                mutable=["batch_stats"],
            )
            return jnp.sum(jnp.sin(h))

        mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
        return jax.shard_map(
            jax.value_and_grad(loss), mesh=mesh, in_specs=P(), out_specs=P(), check_vma=False
        )

    # Every convolution forward and both gradients, less the stem's input gradient (the image
    # needs none).
    convolutions = sum(1 for p in jax.tree.leaves(params) if p.ndim == 4)
    text = jax.jit(grads(ours)).lower(params).compile().as_text()
    calls = {t: text.count(f'custom_call_target="{t}"') for t in TARGETS}
    assert calls == {
        onednn.FORWARD_TARGET: convolutions,
        onednn.BACKWARD_DATA_TARGET: convolutions - 1,
        onednn.BACKWARD_WEIGHTS_TARGET: convolutions,
    }
    assert _onednn_calls(grads(ref), params) == 0
    (v_ref, g_ref), (v, g) = jax.jit(grads(ref))(params), jax.jit(grads(ours))(params)
    np.testing.assert_allclose(v, v_ref, rtol=1e-5)
    scale = max(float(np.max(np.abs(leaf))) for leaf in jax.tree.leaves(g_ref))
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(g_ref), jax.tree.leaves(g), strict=True
    ):
        err = float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) / scale
        assert err < 1e-5, (jax.tree_util.keystr(path), err)


@needs_onednn
@pytest.mark.parametrize("check_vma", [True, False])
def test_shard_map_gradients_match_one_device(check_vma):
    """4 devices, batch-sharded input, replicated kernel. check_vma=True: jax sums the
    replicated kernel's gradient itself (the bwd rule must do it for the FFI call);
    check_vma=False (as in simclr_jax.steps): per-device gradients, summed by hand."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((8, 8, 8, 16)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, 16, 16)) * 0.1, jnp.float32)

    def loss(w, x):
        return jnp.sum(jnp.sin(convs.onednn_conv(x, w, 1, "SAME")))

    mesh = Mesh(np.array(jax.devices()[:4]), ("data",))

    def per_device(w, x):
        dw, dx = jax.grad(loss, argnums=(0, 1))(w, x)
        return (dw if check_vma else jax.lax.psum(dw, "data")), dx

    sharded = jax.jit(
        jax.shard_map(
            per_device,
            mesh=mesh,
            in_specs=(P(), P("data")),
            out_specs=(P(), P("data")),
            check_vma=check_vma,
        )
    )
    assert _onednn_calls(sharded, w, x) == 3
    dw, dx = sharded(w, x)
    dw_ref, dx_ref = jax.jit(jax.grad(loss, argnums=(0, 1)))(w, x)
    assert _rel_err(dw, dw_ref) < 1e-5
    assert _rel_err(dx, dx_ref) < 1e-5


@needs_onednn
def test_bad_geometry_is_refused():
    """The Python wrappers name the problem; the C++ handlers check what reaches them anyway."""
    x, dy = jnp.ones((2, 4, 4, 8)), jnp.ones((2, 4, 4, 16))
    attrs = {k: np.int64(v) for k, v in dict(sh=0, sw=1, ph0=1, ph1=1, pw0=1, pw1=1).items()}
    out = jax.ShapeDtypeStruct((3, 3, 8, 16), jnp.float32)
    call = jax.ffi.ffi_call(onednn.BACKWARD_WEIGHTS_TARGET, out)
    with pytest.raises(Exception, match="do not describe one convolution"):
        jax.block_until_ready(call(x, dy, **attrs))
    attrs["sh"] = np.int64(1)
    wrong_cout = jax.ShapeDtypeStruct((3, 3, 8, 32), jnp.float32)
    with pytest.raises(Exception, match="do not describe one convolution"):
        jax.block_until_ready(
            jax.ffi.ffi_call(onednn.BACKWARD_WEIGHTS_TARGET, wrong_cout)(x, dy, **attrs)
        )
    # A 3x3 kernel over an unpadded 2x2 input has no output (C++ integer division would say 1).
    no_pad = {**attrs, "sh": np.int64(2), "sw": np.int64(2)}
    no_pad.update({k: np.int64(0) for k in ("ph0", "ph1", "pw0", "pw1")})
    small = jnp.ones((1, 2, 2, 8))
    with pytest.raises(Exception, match="do not describe one convolution"):
        out1 = jax.ShapeDtypeStruct((1, 1, 1, 16), jnp.float32)
        jax.block_until_ready(
            jax.ffi.ffi_call(onednn.FORWARD_TARGET, out1)(small, jnp.ones((3, 3, 8, 16)), **no_pad)
        )
    pads = ((1, 1), (1, 1))
    with pytest.raises(ValueError, match="strides"):
        kernels.conv_forward(x, jnp.ones((3, 3, 8, 16)), (0, 1), pads)
    with pytest.raises(ValueError, match="pads"):
        kernels.conv_forward(x, jnp.ones((3, 3, 8, 16)), (1, 1), ((-1, 1), (1, 1)))
    with pytest.raises(ValueError, match="input channels"):
        kernels.conv_forward(x, jnp.ones((3, 3, 4, 16)), (1, 1), pads)
    with pytest.raises(ValueError, match="do not fit an input"):
        kernels.conv_backward_data(dy, jnp.ones((3, 3, 8, 16)), (2, 5, 5, 8), (1, 1), pads)
    with pytest.raises(ValueError, match="is not the output"):
        kernels.conv_backward_weights(x, jnp.ones((2, 3, 4, 16)), (3, 3), (1, 1), pads)
    with pytest.raises(ValueError, match="float32 only"):
        kernels.conv_forward(x.astype(jnp.bfloat16), jnp.ones((3, 3, 8, 16)), (1, 1), pads)


_ISA_PROBE = """
import numpy as np, jax, jax.numpy as jnp
from simclr_jax.cpu import kernels
x = jnp.ones((4, 8, 8, 16)); w = jnp.ones((3, 3, 16, 16)) * 0.1; pads = ((1, 1), (1, 1))
y = kernels.conv_forward(x, w, (1, 1), pads)
dx = kernels.conv_backward_data(y, w, x.shape, (1, 1), pads)
dw = kernels.conv_backward_weights(x, y, (3, 3), (1, 1), pads)
print("sum", float(jnp.sum(y)), float(jnp.sum(dx)), float(jnp.sum(dw)))
"""


@pytest.mark.slow
@needs_onednn
@pytest.mark.parametrize("isa", ["AVX2", "ALL"])
def test_no_reference_kernels_whatever_the_instruction_set(isa):
    """16 -> 16 channels take the blocked layout only where a blocked kernel exists (AVX-512):
    with oneDNN capped at AVX2 (ONEDNN_MAX_CPU_ISA) none of the three directions may fall to
    oneDNN's reference kernel, hundreds of times slower (ONEDNN_VERBOSE names the kernel)."""
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA=isa, ONEDNN_VERBOSE="1", JAX_PLATFORMS="cpu")
    out = subprocess.run(
        [sys.executable, "-c", _ISA_PROBE], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    executed = [line for line in out.stdout.splitlines() if ",exec,cpu,convolution," in line]
    assert len(executed) == 3, out.stdout[-2000:]
    assert not [line for line in executed if ",ref:" in line], executed
    if isa == "AVX2":
        assert not [line for line in executed if "avx512" in line], executed


@needs_onednn
def test_onednn_conv_is_xla_under_jit_over_several_devices():
    """Under plain jit over arrays sharded on several devices (evaluation, fine-tuning) the
    FFI calls would gather the batch onto every device, so OneDnnConv is XLA's convolution
    there; per device (shard_map) it is oneDNN."""
    assert jax.device_count() > 1  # conftest's 8 CPU devices
    mesh = Mesh(np.array(jax.devices()), ("data",))
    x = jax.device_put(jnp.ones((8, 8, 8, 16)), jax.sharding.NamedSharding(mesh, P("data")))
    w = jnp.full((3, 3, 16, 16), 0.1)

    layer = convs.OneDnnConv(16, (3, 3), use_bias=False)

    def loss(w, x):
        return jnp.sum(layer.apply({"params": {"kernel": w}}, x))

    grad = jax.grad(loss)
    assert _onednn_calls(grad, w, x) == 0
    per_device = jax.shard_map(
        lambda w, x: jax.lax.psum(grad(w, x), "data"),
        mesh=mesh,
        in_specs=(P(), P("data")),
        out_specs=P(),
        check_vma=False,
    )
    assert _onednn_calls(per_device, w, x) > 0
    assert np.allclose(jax.jit(per_device)(w, x), jax.jit(grad)(w, x), rtol=1e-5)


class _OneDnnEncoder(nn.Module):
    """A one-conv encoder on OneDnnConv."""

    @nn.compact
    def __call__(self, x, train: bool):
        del train
        y = convs.OneDnnConv(16, (3, 3), use_bias=False, name="conv")(x)
        return jnp.mean(nn.relu(y), axis=(1, 2))


@needs_onednn
def test_train_step_runs_onednn_per_device_and_matches_one_device():
    """The real train step on 2 devices under shard_map and under pmap (both
    give the traced code one device's data, and both devices call oneDNN concurrently): oneDNN
    in the compiled step, and the new parameters equal those of the same step on 1 device."""
    import functools

    import optax

    from configs import cifar10
    from simclr_jax import models, sharding, steps

    cfg = cifar10.get_config("runlocal").model
    cfg.head_hidden_dim, cfg.head_dim = 16, 16
    model = models.build_model(cfg, num_classes=10, bn_axis_name=sharding.DATA_AXIS)
    model = model.clone(encoder=_OneDnnEncoder())
    tx = optax.sgd(0.1)
    rng = np.random.default_rng(0)
    batch = {
        "view1": rng.standard_normal((8, 8, 8, 16)).astype(np.float32),
        "view2": rng.standard_normal((8, 8, 8, 16)).astype(np.float32),
        "label": np.zeros((8,), np.int32),
    }
    results = {}
    for parallelism, ndev in [("shard_map", 1), ("shard_map", 2), ("pmap", 2)]:
        state = steps.create_train_state(model, tx, jax.random.key(0), (8, 8, 16))
        step = functools.partial(
            steps.train_step,
            model=model,
            tx=tx,
            learning_rate_fn=lambda s: jnp.float32(0.1),
            temperature=0.5,
            loss_scale=1.0,
            axis_name=sharding.DATA_AXIS,
            sync_batch_stats=True,
            micro_batch_per_device=None,
        )
        devices = jax.devices()[:ndev]
        mesh = sharding.create_mesh(devices)
        fn = steps.compile_train_step(step, parallelism=parallelism, mesh=mesh)
        if parallelism == "pmap":
            state = sharding.replicate_for_pmap(state, devices)
            placed = sharding.shard_for_pmap(batch, ndev)
        else:
            state = jax.device_put(state, sharding.replicated_sharding(mesh))
            placed = sharding.make_global_batch(batch, mesh)
        text = fn.lower(state, placed).compile().as_text()
        # The forward pass and the kernel gradient (the image needs no input gradient).
        assert onednn.FORWARD_TARGET in text, (parallelism, ndev)
        assert onednn.BACKWARD_WEIGHTS_TARGET in text, (parallelism, ndev)
        new_state, _ = fn(state, placed)
        params = new_state.params
        if parallelism == "pmap":
            params = jax.tree.map(lambda p: p[0], params)
        results[parallelism, ndev] = jax.tree.map(np.asarray, params)
    for key in [("shard_map", 2), ("pmap", 2)]:
        for a, b in zip(
            jax.tree.leaves(results[key]), jax.tree.leaves(results["shard_map", 1]), strict=True
        ):
            # Measured worst 1.1e-6 absolute (float32 sums in another order), 4.5x margin.
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=5e-6, err_msg=str(key))
