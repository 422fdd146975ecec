"""Tests for the native conv kernels (simclr_jax.cpu.kernels) and NativeConv.

The kernels are checked against float64 NumPy formulas of the convolution and of its kernel
gradient and against XLA's own; the model, multi-device and fallback paths against nn.Conv.
"""

import os
import stat

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from simclr_jax.cpu import conv_class, kernels
from simclr_jax.cpu import conv_layers as convs
from simclr_jax.cpu.kernels import native
from simclr_jax.models import resnet

needs_kernel = pytest.mark.skipif(
    not kernels.available(), reason=f"native kernel unavailable: {kernels.unavailable_reason()}"
)


def _np_kernel_grad(x, dy, kh, kw, strides, pads):
    """dw[i, j] = sum over n, ho, wo of x_padded[n, ho*sh + i, wo*sw + j] (x) dy[n, ho, wo]."""
    (ph0, ph1), (pw0, pw1) = pads
    xp = np.pad(np.asarray(x, np.float64), ((0, 0), (ph0, ph1), (pw0, pw1), (0, 0)))
    dy = np.asarray(dy, np.float64)
    _, ho, wo, _ = dy.shape
    sh, sw = strides
    dw = np.zeros((kh, kw, x.shape[-1], dy.shape[-1]))
    for i in range(kh):
        for j in range(kw):
            win = xp[:, i : i + (ho - 1) * sh + 1 : sh, j : j + (wo - 1) * sw + 1 : sw]
            dw[i, j] = np.einsum("nhwc,nhwd->cd", win, dy)
    return dw


def _np_conv(x, w, strides, pads):
    """y[n, ho, wo] = sum over i, j of x_padded[n, ho*sh + i, wo*sw + j] @ w[i, j]."""
    (ph0, ph1), (pw0, pw1) = pads
    xp = np.pad(np.asarray(x, np.float64), ((0, 0), (ph0, ph1), (pw0, pw1), (0, 0)))
    kh, kw = w.shape[:2]
    sh, sw = strides
    ho = (xp.shape[1] - kh) // sh + 1
    wo = (xp.shape[2] - kw) // sw + 1
    y = np.zeros((x.shape[0], ho, wo, w.shape[-1]))
    for i in range(kh):
        for j in range(kw):
            win = xp[:, i : i + (ho - 1) * sh + 1 : sh, j : j + (wo - 1) * sw + 1 : sw]
            y += win @ np.asarray(w[i, j], np.float64)
    return y


def _xla_conv(x, w, strides, pads):
    return jax.lax.conv_general_dilated(
        x, w, strides, pads, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def _rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)


# (n, h, w, cin, cout, kh, kw, strides, pads): odd sizes, cin not a multiple of the 6-channel
# register block, cout with a 16-lane tail after a 64-wide block (80), asymmetric and
# over-sized padding, 1x1 and 7x7 kernels, and batches that split into uneven image chunks.
KERNEL_CASES = [
    (3, 9, 7, 5, 16, 3, 3, (1, 1), ((1, 1), (1, 1))),
    (2, 8, 8, 13, 80, 3, 3, (2, 2), ((0, 1), (0, 1))),
    (4, 6, 6, 7, 32, 1, 1, (2, 2), ((0, 0), (0, 0))),
    (2, 11, 11, 3, 16, 7, 7, (2, 2), ((3, 3), (3, 3))),
    (1, 5, 5, 4, 48, 3, 3, (1, 1), ((2, 2), (2, 2))),
    (33, 4, 4, 16, 16, 3, 3, (1, 1), ((1, 1), (1, 1))),
    (5, 7, 10, 6, 144, 3, 1, (2, 1), ((1, 1), (0, 0))),
]


@needs_kernel
@pytest.mark.parametrize("n,h,w,cin,cout,kh,kw,strides,pads", KERNEL_CASES)
def test_kernel_grad_matches_numpy_and_xla(n, h, w, cin, cout, kh, kw, strides, pads):
    rng = np.random.default_rng(n * 1000 + cin)
    x = jnp.asarray(rng.standard_normal((n, h, w, cin)), jnp.float32)
    wshape = (kh, kw, cin, cout)
    ho = (h + sum(pads[0]) - kh) // strides[0] + 1
    wo = (w + sum(pads[1]) - kw) // strides[1] + 1
    dy = jnp.asarray(rng.standard_normal((n, ho, wo, cout)), jnp.float32)
    dw = jax.jit(
        lambda x, dy: kernels.conv_kernel_grad(x, dy, (kh, kw), strides, (pads[0][0], pads[1][0]))
    )(x, dy)
    assert dw.shape == wshape and dw.dtype == jnp.float32
    assert _rel_err(dw, _np_kernel_grad(x, dy, kh, kw, strides, pads)) < 1e-5
    _, vjp = jax.vjp(lambda k: _xla_conv(x, k, strides, pads), jnp.zeros(wshape))
    assert _rel_err(dw, vjp(dy)[0]) < 1e-5


# (n, h, w, cin, cout, kh, kw, strides, pads): besides the cases above, a 130-channel input
# (two 128-channel passes, the second of 2) and output pixels that are not a multiple of the
# 6-pixel register block.
FORWARD_CASES = KERNEL_CASES + [(2, 5, 5, 130, 32, 3, 3, (1, 1), ((1, 1), (1, 1)))]


@needs_kernel
@pytest.mark.parametrize("n,h,w,cin,cout,kh,kw,strides,pads", FORWARD_CASES)
def test_forward_matches_numpy_and_xla(n, h, w, cin, cout, kh, kw, strides, pads):
    rng = np.random.default_rng(n * 1000 + cin + 1)
    x = jnp.asarray(rng.standard_normal((n, h, w, cin)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((kh, kw, cin, cout)), jnp.float32)
    y = jax.jit(lambda x, k: kernels.conv_forward(x, k, strides, pads))(x, k)
    ref = _np_conv(x, k, strides, pads)
    assert y.shape == ref.shape and y.dtype == jnp.float32
    assert _rel_err(y, ref) < 1e-5
    assert _rel_err(y, _xla_conv(x, k, strides, pads)) < 1e-5


@needs_kernel
def test_kernels_are_reproducible():
    """The threads' partial kernel gradients are summed in a fixed order: repeated calls are
    bitwise equal (a batch of 37 spans several threads and image chunks)."""
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.standard_normal((37, 6, 6, 16)), jnp.float32)
    dy = jnp.asarray(rng.standard_normal((37, 6, 6, 32)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, 16, 32)), jnp.float32)
    grad = jax.jit(lambda x, dy: kernels.conv_kernel_grad(x, dy, (3, 3), (1, 1), (1, 1)))
    fwd = jax.jit(lambda x, w: kernels.conv_forward(x, w, (1, 1), ((1, 1), (1, 1))))
    first_grad, first_fwd = np.asarray(grad(x, dy)), np.asarray(fwd(x, w))
    for _ in range(5):
        np.testing.assert_array_equal(grad(x, dy), first_grad)
        np.testing.assert_array_equal(fwd(x, w), first_fwd)


@needs_kernel
@pytest.mark.parametrize(
    "stride,pads,ksize",
    [
        (1, ((1, 1), (1, 1)), (3, 3)),
        (2, ((0, 1), (0, 1)), (3, 3)),
        # Asymmetric padding and a non-square kernel: the input gradient's padding is
        # (k - 1 - low, k - 1 - high) per dim, so swapped sides or dims would show.
        (1, ((0, 2), (1, 0)), (3, 1)),
        (1, ((0, 0), (0, 0)), (1, 1)),
    ],
)
def test_native_conv_value_and_gradients_match_xla(stride, pads, ksize):
    rng = np.random.default_rng(stride)
    # 16 input channels: at stride 1 the forward pass and the input gradient are native too.
    x = jnp.asarray(rng.standard_normal((4, 8, 8, 16)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((*ksize, 16, 32)) * 0.1, jnp.float32)
    ct = jnp.asarray(rng.standard_normal(_xla_conv(x, w, (stride,) * 2, pads).shape), jnp.float32)

    def loss(conv):
        return lambda x, w: jnp.sum(conv(x, w, (stride, stride), pads) * ct)

    ours = jax.jit(jax.value_and_grad(loss(convs.native_conv), argnums=(0, 1)))
    ref = jax.jit(jax.value_and_grad(loss(_xla_conv), argnums=(0, 1)))
    (v, (dx, dw)), (v_ref, (dx_ref, dw_ref)) = ours(x, w), ref(x, w)
    np.testing.assert_allclose(v, v_ref, rtol=1e-5)
    assert _rel_err(dx, dx_ref) < 1e-5
    assert _rel_err(dw, dw_ref) < 1e-5
    hlo = ours.lower(x, w).as_text()
    assert native.GRAD_TARGET in hlo
    # Forward (and the input gradient, the same kernel) native at stride 1 only.
    assert (native.FORWARD_TARGET in hlo) == (stride == 1)
    assert native.GRAD_TARGET not in ref.lower(x, w).as_text()


def test_unsupported_convolutions_stay_on_xla():
    x = jnp.ones((2, 6, 6, 4))
    # cout not a multiple of 16; bfloat16.
    for dtype, cout in [(jnp.float32, 8), (jnp.bfloat16, 16)]:
        w = jnp.ones((3, 3, 4, cout), dtype)
        xd = x.astype(dtype)
        f = jax.grad(lambda w, xd=xd: jnp.sum(convs.native_conv(xd, w, 1, "SAME")))
        hlo = jax.jit(f).lower(w).as_text()
        assert native.GRAD_TARGET not in hlo and native.FORWARD_TARGET not in hlo
        assert native.native_flops(jax.jit(f).trace(w).jaxpr) == 0


@needs_kernel
def test_native_flops_counts_the_calls():
    # Stride 2: only the kernel gradient is native.
    x = jnp.ones((3, 8, 8, 5))
    w = jnp.ones((3, 3, 5, 32))
    f = jax.jit(jax.grad(lambda w: jnp.sum(convs.native_conv(x, w, 2, ((0, 1), (0, 1))))))
    assert native.native_flops(f.trace(w).jaxpr) == 2 * 3 * 4 * 4 * 3 * 3 * 5 * 32
    # Stride 1, 16 -> 32 channels: forward, input gradient and kernel gradient, the same count.
    x = jnp.ones((3, 8, 8, 16))
    w = jnp.ones((3, 3, 16, 32))
    g = jax.jit(jax.grad(lambda w: jnp.sum(convs.native_conv(x, w, 1, "SAME") ** 2)))
    assert native.native_flops(g.trace(w).jaxpr) == 3 * 2 * 3 * 8 * 8 * 3 * 3 * 16 * 32


@pytest.mark.slow
@needs_kernel
def test_resnet_native_matches_xla():
    """Whole ResNet-18 (widths 16-128, projection shortcuts, CIFAR stem): same parameter tree,
    same outputs, gradients equal to float32 noise. Per device (shard_map on one device), as
    in the train step, so NativeConv takes the native kernels."""
    x = jax.random.uniform(jax.random.key(0), (4, 16, 16, 3))
    ref = resnet(18, cifar_stem=True, base_width=16, conv=nn.Conv)
    ours = resnet(18, cifar_stem=True, base_width=16, conv=convs.NativeConv)
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

    assert _native_calls(grads(ours), params) > 0
    assert _native_calls(grads(ref), params) == 0
    (v_ref, g_ref), (v, g) = jax.jit(grads(ref))(params), jax.jit(grads(ours))(params)
    np.testing.assert_allclose(v, v_ref, rtol=1e-5)
    scale = max(float(np.max(np.abs(leaf))) for leaf in jax.tree.leaves(g_ref))
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(g_ref), jax.tree.leaves(g), strict=True
    ):
        err = float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) / scale
        assert err < 1e-5, (jax.tree_util.keystr(path), err)


@needs_kernel
@pytest.mark.parametrize("check_vma", [True, False])
def test_shard_map_gradients_match_one_device(check_vma):
    """4 devices, batch-sharded input, replicated kernel. check_vma=True: jax sums the
    replicated kernel's gradient itself (the bwd rule must do it for the native call);
    check_vma=False (as in simclr_jax.steps): per-device gradients, summed by hand."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((8, 8, 8, 16)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, 16, 16)) * 0.1, jnp.float32)

    def loss(w, x):
        return jnp.sum(jnp.sin(convs.native_conv(x, w, 1, "SAME")))

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
    dw, dx = sharded(w, x)
    dw_ref, dx_ref = jax.jit(jax.grad(loss, argnums=(0, 1)))(w, x)
    assert _rel_err(dw, dw_ref) < 1e-5
    assert _rel_err(dx, dx_ref) < 1e-5


def test_resolve_falls_back_with_a_reason(monkeypatch):
    monkeypatch.setattr(native, "_load", lambda: "no C++ compiler found (test)")
    assert not kernels.available()
    with pytest.raises(ValueError, match="no C.. compiler found"):
        conv_class.resolve_choice("native", backend="cpu")
    with pytest.raises(ValueError, match="CPU kernel"):
        conv_class.resolve_choice("native", backend="gpu")
    if conv_class.cpu_conv_is_native():
        with pytest.warns(UserWarning, match="no C.. compiler found"):
            assert conv_class.resolve_choice("auto", backend="cpu") == "xla"
        with pytest.warns(UserWarning, match="no C.. compiler found"):
            assert conv_class.conv_class("auto", backend="cpu").__mro__[1] is nn.Conv
    with pytest.raises(kernels.KernelUnavailableError, match="unavailable"):
        kernels.conv_kernel_grad(
            jnp.ones((1, 4, 4, 2)), jnp.ones((1, 4, 4, 16)), (3, 3), (1, 1), (1, 1)
        )
    with pytest.raises(kernels.KernelUnavailableError, match="unavailable"):
        kernels.conv_forward(jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2, 16)), (1, 1), ((1, 1),) * 2)


@needs_kernel
def test_handlers_reject_bad_geometry():
    """The C++ handlers check what reaches them past the Python wrappers."""
    x, dy = jnp.ones((2, 4, 4, 8)), jnp.ones((2, 4, 4, 16))
    attrs = dict(sh=np.int64(0), sw=np.int64(1), ph=np.int64(1), pw=np.int64(1))
    out = jax.ShapeDtypeStruct((3, 3, 8, 16), jnp.float32)
    with pytest.raises(Exception, match="strides must be >= 1"):
        jax.block_until_ready(jax.ffi.ffi_call(native.GRAD_TARGET, out)(x, dy, **attrs))
    attrs["sh"] = np.int64(1)
    wrong_cout = jax.ShapeDtypeStruct((3, 3, 8, 32), jnp.float32)
    with pytest.raises(Exception, match="inconsistent shapes"):
        jax.block_until_ready(jax.ffi.ffi_call(native.GRAD_TARGET, wrong_cout)(x, dy, **attrs))
    with pytest.raises(ValueError, match="strides"):
        kernels.conv_forward(x, jnp.ones((3, 3, 8, 16)), (0, 1), ((1, 1), (1, 1)))


def test_kernels_build_where_they_can():
    """On an AVX-512 Linux machine with a C++ compiler the real source must build and load
    (otherwise every other test here would silently skip)."""
    if native._cpu_has_avx512f() and native._compiler():
        assert kernels.unavailable_reason() is None


def _native_calls(fn, *args) -> int:
    """Native FFI calls in the compiled program of fn(*args)."""
    text = jax.jit(fn).lower(*args).compile().as_text()
    return text.count(native.FORWARD_TARGET) + text.count(native.GRAD_TARGET)


@needs_kernel
def test_native_conv_is_xla_under_jit_over_several_devices():
    """Under plain jit over arrays sharded on several devices (evaluation, fine-tuning) the
    FFI calls would gather the batch onto every device, so NativeConv is XLA's convolution
    there; per device (shard_map) it uses the native kernels."""
    assert jax.device_count() > 1  # conftest's 8 CPU devices
    mesh = Mesh(np.array(jax.devices()), ("data",))
    x = jax.device_put(jnp.ones((8, 8, 8, 16)), jax.sharding.NamedSharding(mesh, P("data")))
    w = jnp.full((3, 3, 16, 16), 0.1)

    layer = convs.NativeConv(16, (3, 3), use_bias=False)

    def loss(w, x):
        return jnp.sum(layer.apply({"params": {"kernel": w}}, x))

    grad = jax.grad(loss)
    assert _native_calls(grad, w, x) == 0
    per_device = jax.shard_map(
        lambda w, x: jax.lax.psum(grad(w, x), "data"),
        mesh=mesh,
        in_specs=(P(), P("data")),
        out_specs=P(),
        check_vma=False,
    )
    assert _native_calls(per_device, w, x) > 0
    assert np.allclose(jax.jit(per_device)(w, x), jax.jit(grad)(w, x), rtol=1e-5)


def test_build_reports_compiler_errors_and_caches(monkeypatch, tmp_path):
    """A failing compiler gives KernelUnavailableError with its output; a good build is cached
    under a key of source, flags, compiler version and jaxlib version, and reused."""
    fake = tmp_path / "fake-cxx"
    fake.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = "--version" ]; then echo fake-cxx 1.0; exit 0; fi\n'
        'echo "error: no such thing" >&2; exit 1\n'
    )
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("SIMCLR_JAX_KERNEL_CACHE", str(tmp_path / "cache"))
    with pytest.raises(native.KernelUnavailableError, match="no such thing"):
        native._build(str(fake))
    assert not [p for p in os.listdir(tmp_path / "cache") if p.endswith(".so")]

    # A compiler that writes its output file: built once, then found in the cache.
    calls = tmp_path / "calls"
    fake.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = "--version" ]; then echo fake-cxx 1.0; exit 0; fi\n'
        f'echo built >> "{calls}"\n'
        'while [ "$#" -gt 1 ]; do shift; done; echo lib > "$1"\n'
    )
    first = native._build(str(fake))
    assert os.path.dirname(first) == str(tmp_path / "cache") and os.path.exists(first)
    assert native._build(str(fake)) == first
    assert calls.read_text().count("built") == 1


class _NativeEncoder(nn.Module):
    """A one-conv encoder on NativeConv (16 output channels: the native kernels take it)."""

    @nn.compact
    def __call__(self, x, train: bool):
        del train
        y = convs.NativeConv(16, (3, 3), use_bias=False, name="conv")(x)
        return jnp.mean(nn.relu(y), axis=(1, 2))


@needs_kernel
@pytest.mark.parametrize("parallelism", ["shard_map", "pmap"])
def test_train_step_runs_native_kernels_per_device(parallelism):
    """The real train step, micro-batched, on 2 devices: NativeConv takes the native kernels
    under shard_map and under pmap (both give the traced code one device's data)."""
    import functools

    import optax

    from configs import cifar10
    from simclr_jax import models, sharding, steps

    cfg = cifar10.get_config("runlocal").model
    cfg.head_hidden_dim, cfg.head_dim = 16, 16
    model = models.build_model(cfg, num_classes=10, bn_axis_name=sharding.DATA_AXIS)
    model = model.clone(encoder=_NativeEncoder())
    tx = optax.sgd(0.1)
    state = steps.create_train_state(model, tx, jax.random.key(0), (8, 8, 16))
    step = functools.partial(
        steps.train_step,
        model=model,
        tx=tx,
        learning_rate_fn=lambda s: jnp.float32(0.1),
        temperature=0.5,
        loss_scale=1.0,
        axis_name=sharding.DATA_AXIS,
        sync_batch_stats=False,
        micro_batch_per_device=2,
    )
    devices = jax.devices()[:2]
    mesh = sharding.create_mesh(devices)
    fn = steps.compile_train_step(step, parallelism=parallelism, mesh=mesh)
    batch = {
        "view1": np.ones((8, 8, 8, 16), np.float32),
        "view2": np.ones((8, 8, 8, 16), np.float32),
        "label": np.zeros((8,), np.int32),
    }
    if parallelism == "pmap":
        state = sharding.replicate_for_pmap(state, devices)
        batch = sharding.shard_for_pmap(batch, 2)
    else:
        state = jax.device_put(state, sharding.replicated_sharding(mesh))
        batch = sharding.make_global_batch(batch, mesh)
    text = fn.lower(state, batch).compile().as_text()
    assert text.count(native.FORWARD_TARGET) + text.count(native.GRAD_TARGET) > 0
