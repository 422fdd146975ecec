"""Convolution layers for XLA:CPU: one matrix multiplication (im2col), or native kernels.

jaxlib 0.10's XLA:CPU sends convolutions to YNNPACK by default, which runs them, above all the
backward (input- and kernel-gradient) convolutions, far below the machine's matmul peak. With
`simclr_jax.cpu.xla_flags` applied before jax starts (main.py does), XLA's own convolution is
used instead. Without those flags `MatmulConv` is faster than the YNNPACK path
(benchmarks/conv_layer.py). `MatmulConv` rewrites a k x k convolution as: pad once, take the
kh * kw strided slices of the padded input, concatenate them on the channel axis to patches
[n, ho, wo, kh * kw * cin], and multiply by the kernel reshaped to [kh * kw * cin, cout].
Forward and both gradients then become large matmuls plus cheap slicing/padding. A 1x1
convolution is a plain dot (a stride is a strided slice).

The patches are kh * kw times larger than the input, so the im2col + dot is wrapped in
jax.checkpoint: the backward pass recomputes the slices from the input instead of keeping the
patches alive from forward to backward (keeps peak memory close to nn.Conv's).

`NativeConv` ('native', the CPU default when the kernels build) computes convolutions with the
native kernels of `simclr_jax.cpu.kernels` (XLA FFI calls) where they are faster than XLA's
own, and with XLA's elsewhere. XLA:CPU computes the kernel gradient as an Eigen convolution
with an image-sized window over the transposed input, at about half its forward rate in the
first ResNet stage; the native kernel ran it at 1.2-2.5x XLA's rate at the four ResNet-18
stages (benchmarks/conv_layer.py --parts --impl=native; at 4 x 4 x 512 the two were within
noise in other runs), so it always takes the kernel gradient. The native forward kernel
(also the input gradient of a stride-1 convolution) is faster for stride-1 convolutions up
to 256 output channels and is used there (`native_forward_supported`). Convolutions it cannot
take at all (not float32, output channels not a multiple of 16) stay on XLA, and NativeConv
uses XLA's convolution wherever it is traced under jit over arrays that may be spread across
several devices (`runs_per_device`): the FFI calls have no partitioning rule.

All modules are drop-in replacements for flax.linen.Conv as the ResNet uses it: same 'kernel'
parameter [kh, kw, cin, cout] (and optional 'bias'), same default initialiser, same padding
semantics ('SAME', 'VALID', an int, or explicit (low, high) pairs), same dtype promotion. So
parameter trees, and checkpoints, are interchangeable between the implementations.
"""

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype
from jax import lax

from simclr_jax.cpu import kernels

PaddingLike = str | int | Sequence[int | tuple[int, int]]


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    value = tuple(value)
    if len(value) != 2 or not all(isinstance(v, int) for v in value):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}.")
    return value


def resolve_padding(
    padding: PaddingLike,
    spatial_shape: tuple[int, int],
    kernel_size: tuple[int, int],
    strides: tuple[int, int],
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Turns a Flax-style padding spec into explicit (low, high) pairs per spatial dim.

    Args:
      padding: 'SAME', 'VALID', an int (same on both sides of both dims), or a sequence of two
        ints / (low, high) pairs.
      spatial_shape: (height, width) of the input.
      kernel_size: (kh, kw).
      strides: (sh, sw).

    Returns:
      ((low_h, high_h), (low_w, high_w)).

    Raises:
      ValueError: for an unsupported padding spec (e.g. 'CIRCULAR').
    """
    if isinstance(padding, str):
        mode = padding.upper()
        if mode not in ("SAME", "VALID"):
            raise ValueError(
                f"padding must be 'SAME', 'VALID', an int or (low, high) pairs, got {padding!r}."
            )
        pads = lax.padtype_to_pads(spatial_shape, kernel_size, strides, mode)
        return tuple((int(lo), int(hi)) for lo, hi in pads)
    if isinstance(padding, int):
        return ((padding, padding), (padding, padding))
    pads = tuple(padding)
    if len(pads) != 2:
        raise ValueError(f"padding needs one entry per spatial dim (2), got {padding!r}.")
    return tuple(_pair(p, "padding entry") for p in pads)


def _strides_and_pads(x: jax.Array, kernel: jax.Array, strides, padding):
    """(sh, sw) and explicit ((low, high), (low, high)) padding for x [n, h, w, c] and kernel
    [kh, kw, cin, cout]."""
    strides = _pair(strides, "strides")
    return strides, resolve_padding(padding, tuple(x.shape[1:3]), tuple(kernel.shape[:2]), strides)


def _im2col_dot(x: jax.Array, kernel: jax.Array, strides, pads) -> jax.Array:
    """Convolution of x [n, h, w, cin] with kernel [kh, kw, cin, cout] as patches @ kernel."""
    kh, kw, cin, cout = kernel.shape
    sh, sw = strides
    if any(lo or hi for lo, hi in pads):
        x = jnp.pad(x, ((0, 0),) + tuple(pads) + ((0, 0),))
    n, hp, wp, _ = x.shape
    ho = (hp - kh) // sh + 1
    wo = (wp - kw) // sw + 1
    if ho < 1 or wo < 1:
        raise ValueError(
            f"kernel_size {(kh, kw)} is larger than the padded input {(hp, wp)}; no output."
        )
    # Slices in (i, j) row-major order with channels innermost, matching the row order of
    # kernel.reshape(kh * kw * cin, cout).
    slices = [
        lax.slice(
            x,
            (0, i, j, 0),
            (n, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, cin),
            (1, sh, sw, 1),
        )
        for i in range(kh)
        for j in range(kw)
    ]
    patches = slices[0] if len(slices) == 1 else jnp.concatenate(slices, axis=-1)
    # One 2-D GEMM: XLA:CPU maps [m, k] x [k, n] straight onto its fast matmul kernel.
    out = jnp.dot(patches.reshape(n * ho * wo, kh * kw * cin), kernel.reshape(-1, cout))
    return out.reshape(n, ho, wo, cout)


# Recompute the patches in the backward pass rather than storing them (kh * kw x the input).
_im2col_dot_remat = jax.checkpoint(_im2col_dot, static_argnums=(2, 3))


def matmul_conv(
    x: jax.Array,
    kernel: jax.Array,
    strides: int | Sequence[int] = 1,
    padding: PaddingLike = "SAME",
) -> jax.Array:
    """2-D convolution (NHWC, HWIO kernel) computed with a single matrix multiplication.

    Args:
      x: input [n, h, w, cin].
      kernel: [kh, kw, cin, cout].
      strides: int or (sh, sw).
      padding: 'SAME', 'VALID', an int, or (low, high) pairs per spatial dim.

    Returns:
      [n, ho, wo, cout], equal to lax.conv_general_dilated with the same arguments.

    Raises:
      ValueError: for a non-4-D input, mismatched channels or an unsupported padding.
    """
    if x.ndim != 4:
        raise ValueError(f"x must be [n, h, w, c] (4-D), got shape {x.shape}.")
    if kernel.ndim != 4 or kernel.shape[2] != x.shape[-1]:
        raise ValueError(
            f"kernel must be [kh, kw, cin={x.shape[-1]}, cout], got shape {kernel.shape}."
        )
    strides, pads = _strides_and_pads(x, kernel, strides, padding)
    if kernel.shape[:2] == (1, 1) and pads == ((0, 0), (0, 0)):
        # 1x1: no patches to build, so no memory to save with remat.
        return _im2col_dot(x, kernel, strides, pads)
    return _im2col_dot_remat(x, kernel, strides, pads)


class MatmulConv(nn.Conv):
    """Drop-in replacement for flax.linen.Conv (2-D, NHWC) computed by `matmul_conv`.

    A subclass of nn.Conv, so it has exactly its fields and defaults (features, kernel_size,
    strides, padding, use_bias=True, dtype, param_dtype, kernel_init, bias_init, ...) and code
    that looks for conv layers with isinstance(module, nn.Conv) still finds it. Only what the
    ResNet needs is supported: no input/kernel dilation, no feature groups, no mask, and
    padding 'SAME', 'VALID', an int or explicit (low, high) pairs.
    """

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        """Applies the convolution.

        Args:
          inputs: [n, h, w, cin].

        Returns:
          [n, ho, wo, features] in the promoted computation dtype.

        Raises:
          ValueError: for an option nn.Conv has but MatmulConv does not support.
        """
        return _apply_plain_conv(self, inputs, matmul_conv)


def _apply_plain_conv(module: nn.Conv, inputs: jax.Array, conv_fn) -> jax.Array:
    """nn.Conv's parameters, dtype promotion and bias around conv_fn(x, kernel, strides, padding).

    For the nn.Conv subclasses below, which support only what the ResNet uses.

    Raises:
      ValueError: for dilation, feature groups or a mask.
    """
    name = type(module).__name__
    for field in ("input_dilation", "kernel_dilation"):
        value = getattr(module, field)
        if value not in (None, 1, (1, 1), [1, 1]):
            raise ValueError(f"{name} does not support {field}={value!r}; use nn.Conv.")
    if module.feature_group_count != 1 or module.mask is not None:
        raise ValueError(
            f"{name} supports feature_group_count=1 and mask=None only, got "
            f"feature_group_count={module.feature_group_count!r}; use nn.Conv."
        )
    if inputs.ndim != 4:
        raise ValueError(f"{name} takes [n, h, w, c] (4-D) inputs, got shape {inputs.shape}.")
    kh, kw = _pair(module.kernel_size, "kernel_size")
    cin = inputs.shape[-1]
    kernel = module.param(
        "kernel", module.kernel_init, (kh, kw, cin, module.features), module.param_dtype
    )
    bias = None
    if module.use_bias:
        bias = module.param("bias", module.bias_init, (module.features,), module.param_dtype)
    inputs, kernel, bias = promote_dtype(inputs, kernel, bias, dtype=module.dtype)
    y = conv_fn(inputs, kernel, module.strides or 1, module.padding)
    if bias is not None:
        y = y + bias
    return y


_NHWC = ("NHWC", "HWIO", "NHWC")


def _xla_conv(x: jax.Array, kernel: jax.Array, strides, pads) -> jax.Array:
    return lax.conv_general_dilated(x, kernel, strides, pads, dimension_numbers=_NHWC)


def native_forward_supported(x_shape, kernel_shape, strides) -> bool:
    """Whether `native_conv` runs a convolution's forward pass with the native kernel rather
    than XLA's.

    Where it measured faster here (benchmarks/conv_layer.py --parts and an interleaved
    micro-benchmark): stride 1, input and output channels multiples of 16, at most 256
    output channels (XLA's kernel was as fast or faster for the widest layers).
    """
    del x_shape
    cin, cout = kernel_shape[2], kernel_shape[3]
    return (
        tuple(strides) == (1, 1)
        and cin % kernels.native.LANES == 0
        and cout % kernels.native.LANES == 0
        and cout <= 256
    )


def native_input_grad_supported(x_shape, kernel_shape, strides) -> bool:
    """Whether `native_conv` computes the input gradient with the native forward kernel (a
    stride-1 convolution of the output cotangent whose outputs are the cin input channels:
    the same limits as `native_forward_supported` with cin and cout swapped)."""
    kh, kw, cin, cout = kernel_shape
    return native_forward_supported(x_shape, (kh, kw, cout, cin), strides)


def _forward(x, kernel, strides, pads):
    if native_forward_supported(x.shape, kernel.shape, strides):
        return kernels.conv_forward(x, kernel, strides, pads)
    return _xla_conv(x, kernel, strides, pads)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_native(x: jax.Array, kernel: jax.Array, strides, pads) -> jax.Array:
    return _forward(x, kernel, strides, pads)


def _conv_native_fwd(x, kernel, strides, pads):
    return _forward(x, kernel, strides, pads), (x, kernel)


def _conv_native_bwd(strides, pads, residuals, dy):
    x, kernel = residuals
    kh, kw = kernel.shape[:2]
    if native_input_grad_supported(x.shape, kernel.shape, strides):
        # Stride 1: dx[h] = sum_i dy[h - i + p] w[i] is a convolution of dy with the flipped,
        # transposed kernel and padding k - 1 - p on each side; its output is x's size.
        flipped = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)
        (ph0, ph1), (pw0, pw1) = pads
        dx = kernels.conv_forward(
            dy, flipped, (1, 1), ((kh - 1 - ph0, kh - 1 - ph1), (kw - 1 - pw0, kw - 1 - pw1))
        )
    else:
        # XLA's input gradient (the forward conv in this vjp is dead code and is removed).
        _, vjp_x = jax.vjp(lambda x_: _xla_conv(x_, kernel, strides, pads), x)
        (dx,) = vjp_x(dy)
    dw = kernels.conv_kernel_grad(x, dy, (kh, kw), strides, (pads[0][0], pads[1][0]))
    return _like_primal(dx, x), _like_primal(dw, kernel)


def _like_primal(cotangent: jax.Array, primal: jax.Array) -> jax.Array:
    """Under shard_map with check_vma, a cotangent of an operand that does not vary over a mesh
    axis is summed over it (what jax's own convolution transpose does; e.g. the kernel gradient
    of a replicated kernel from a batch-sharded input). A no-op elsewhere."""
    extra = jax.typeof(cotangent).manual_axis_type.varying
    extra = extra - jax.typeof(primal).manual_axis_type.varying
    return jax.lax.psum(cotangent, tuple(sorted(extra))) if extra else cotangent


_conv_native.defvjp(_conv_native_fwd, _conv_native_bwd)


def runs_per_device() -> bool:
    """Whether the code being traced sees one device's data only.

    True inside jax.shard_map / jax.pmap (the current abstract mesh has manual axes; jax 0.10
    runs pmap through shard_map) and when the run has a single device in all
    (jax.device_count(), every process's). False under jax.jit over arrays that may be spread
    across several devices (evaluation, fine-tuning): the native kernels are FFI calls without
    a partitioning rule, for which XLA would gather the whole batch onto every device. (Also
    False for jit on one device of a multi-device run: XLA's convolution, only slower.)
    """
    return jax.device_count() == 1 or bool(jax.sharding.get_abstract_mesh().manual_axes)


def native_supported(x_dtype, kernel_dtype, cout: int) -> bool:
    """Whether `native_conv` uses the native kernels at all (else it is XLA's convolution)."""
    return (
        x_dtype == jnp.float32 and kernel_dtype == jnp.float32 and cout % kernels.native.LANES == 0
    )


def native_conv(
    x: jax.Array,
    kernel: jax.Array,
    strides: int | Sequence[int] = 1,
    padding: PaddingLike = "SAME",
) -> jax.Array:
    """2-D convolution (NHWC, HWIO) with the native CPU kernels where they are faster.

    The kernel gradient always comes from the native kernel; the forward pass and the input
    gradient where `native_forward_supported` / `native_input_grad_supported` say so, else
    from XLA. Values and gradients equal lax.conv_general_dilated's up to float32 summation
    order. Convolutions that `native_supported` rejects (not float32, output channels not a
    multiple of 16) are XLA's entirely.

    Args:
      x: input [n, h, w, cin].
      kernel: [kh, kw, cin, cout].
      strides: int or (sh, sw).
      padding: 'SAME', 'VALID', an int, or (low, high) pairs per spatial dim.

    Returns:
      [n, ho, wo, cout].
    """
    strides, pads = _strides_and_pads(x, kernel, strides, padding)
    if not native_supported(x.dtype, kernel.dtype, kernel.shape[-1]):
        return _xla_conv(x, kernel, strides, pads)
    return _conv_native(x, kernel, strides, pads)


def _xla_conv_padded(x, kernel, strides, padding):
    return _xla_conv(x, kernel, *_strides_and_pads(x, kernel, strides, padding))


class NativeConv(nn.Conv):
    """flax.linen.Conv computed with the native CPU kernels where they are faster.

    Same fields and parameters as nn.Conv, same values up to float32 summation order (see
    `native_conv`); supports what the ResNet uses (no dilation, no feature groups, no mask).
    Where the traced code sees several devices' data (`runs_per_device` is False: jit over
    global arrays in a multi-device process), it is XLA's convolution.
    """

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        """Applies the convolution to inputs [n, h, w, cin]; returns [n, ho, wo, features]."""
        conv_fn = native_conv if runs_per_device() else _xla_conv_padded
        return _apply_plain_conv(self, inputs, conv_fn)
