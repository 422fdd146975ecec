"""Convolution layers for XLA:CPU: oneDNN's convolutions, or one matrix multiplication (im2col).

`OneDnnConv` ('onednn', the CPU default where oneDNN is installed: the `cpu` extra) runs the
forward convolution, its input gradient and its kernel gradient with oneDNN, the library
PyTorch's CPU convolutions come from, through the FFI calls of `simclr_jax.cpu.kernels`. They
are FFI calls without a partitioning rule, so OneDnnConv is XLA's convolution wherever it is
traced under jit over arrays that may be spread across several devices (`runs_per_device`);
per device (shard_map, pmap, a single device) it is oneDNN. Other dtypes than float32 stay on
XLA.

jaxlib 0.10's XLA:CPU sends convolutions to YNNPACK by default, which runs them, above all the
backward (input- and kernel-gradient) convolutions, far below the machine's matmul peak. With
`simclr_jax.cpu.xla_flags` applied before jax starts (main.py does), XLA's own convolution is
used instead. Without those flags `MatmulConv` is faster than the YNNPACK path
(benchmarks/conv_layer.py). `MatmulConv` rewrites a k x k convolution as: pad once, take the
kh * kw strided slices of the padded input, concatenate them on the channel axis to patches
[n, ho, wo, kh * kw * cin], and multiply by the kernel reshaped to [kh * kw * cin, cout].
Forward and both gradients then become large matmuls plus cheap slicing/padding. A 1x1
convolution is a plain dot (a stride is a strided slice). The patches are kh * kw times larger
than the input, so the im2col + dot is wrapped in jax.checkpoint: the backward pass recomputes
the slices from the input instead of keeping the patches alive from forward to backward.

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


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_onednn(x: jax.Array, kernel: jax.Array, strides, pads) -> jax.Array:
    return kernels.conv_forward(x, kernel, strides, pads)


def _conv_onednn_fwd(x, kernel, strides, pads):
    return kernels.conv_forward(x, kernel, strides, pads), (x, kernel)


def _conv_onednn_bwd(strides, pads, residuals, dy):
    x, kernel = residuals
    dx = kernels.conv_backward_data(dy, kernel, x.shape, strides, pads)
    dw = kernels.conv_backward_weights(x, dy, kernel.shape[:2], strides, pads)
    return _like_primal(dx, x), _like_primal(dw, kernel)


def _like_primal(cotangent: jax.Array, primal: jax.Array) -> jax.Array:
    """Under shard_map with check_vma, a cotangent of an operand that does not vary over a mesh
    axis is summed over it (what jax's own convolution transpose does; e.g. the kernel gradient
    of a replicated kernel from a batch-sharded input). A no-op elsewhere."""
    extra = jax.typeof(cotangent).manual_axis_type.varying
    extra = extra - jax.typeof(primal).manual_axis_type.varying
    return jax.lax.psum(cotangent, tuple(sorted(extra))) if extra else cotangent


_conv_onednn.defvjp(_conv_onednn_fwd, _conv_onednn_bwd)


def runs_per_device() -> bool:
    """Whether the code being traced sees one device's data only.

    True inside jax.shard_map / jax.pmap (the current abstract mesh has manual axes; jax 0.10
    runs pmap through shard_map) and when the run has a single device in all
    (jax.device_count(), every process's). False under jax.jit over arrays that may be spread
    across several devices (evaluation, fine-tuning): the oneDNN calls are FFI calls without a
    partitioning rule, for which XLA would gather the whole batch onto every device. (Also
    False for jit on one device of a multi-device run: XLA's convolution, only slower.)
    """
    return jax.device_count() == 1 or bool(jax.sharding.get_abstract_mesh().manual_axes)


def onednn_conv(
    x: jax.Array,
    kernel: jax.Array,
    strides: int | Sequence[int] = 1,
    padding: PaddingLike = "SAME",
) -> jax.Array:
    """2-D convolution (NHWC, HWIO) whose forward pass and both gradients are oneDNN's.

    float32 only: any other dtype (e.g. model.dtype=bfloat16) is XLA's convolution. Values and
    gradients equal lax.conv_general_dilated's up to float32 summation order.

    Args:
      x: input [n, h, w, cin].
      kernel: [kh, kw, cin, cout].
      strides: int or (sh, sw).
      padding: 'SAME', 'VALID', an int, or (low, high) pairs per spatial dim.

    Returns:
      [n, ho, wo, cout].

    Raises:
      KernelUnavailableError: for float32 operands where oneDNN cannot be used here.
    """
    strides, pads = _strides_and_pads(x, kernel, strides, padding)
    if x.dtype != jnp.float32 or kernel.dtype != jnp.float32:
        return _xla_conv(x, kernel, strides, pads)
    return _conv_onednn(x, kernel, strides, pads)


def _xla_conv_padded(x, kernel, strides, padding):
    return _xla_conv(x, kernel, *_strides_and_pads(x, kernel, strides, padding))


class OneDnnConv(nn.Conv):
    """flax.linen.Conv computed with oneDNN's CPU convolutions (forward and both gradients).

    Same fields and parameters as nn.Conv, same values up to float32 summation order (see
    `onednn_conv`); supports what the ResNet uses (no dilation, no feature groups, no mask).
    Where the traced code sees several devices' data (`runs_per_device` is False: jit over
    global arrays in a multi-device process), it is XLA's convolution.
    """

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        """Applies the convolution to inputs [n, h, w, cin]; returns [n, ho, wo, features]."""
        conv_fn = onednn_conv if runs_per_device() else _xla_conv_padded
        return _apply_plain_conv(self, inputs, conv_fn)
