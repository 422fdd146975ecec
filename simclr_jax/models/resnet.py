"""ResNet v1 (v1.5 strides) encoders for SimCLR, with optional SimCLRv2 selective kernels.

The encoder maps images [n, H, W, 3] to the pooled representation h [n, C] (float32), with
C = 512 * width for depths 18/34 and 2048 * width for depths 50 and deeper.

Structure, following the SimCLR reference code (google-research/simclr, tf2/resnet.py):
- Convolutions have no bias and use VarianceScaling(1.0, fan_in, truncated normal), which is
  Keras' default VarianceScaling and also Flax's lecun_normal.
- "Fixed" padding: a k x k conv pads (k - 1) // 2 before and the rest after, so strided
  convolutions see the same pixels as in the TF code (XLA 'SAME' pads less before the image
  for strided convs on even sizes, e.g. (0, 1) for a 3x3 stride-2 conv).
- BatchNorm momentum 0.9, epsilon 1e-5, the last BN of every residual block starts with
  gamma = 0 so each block starts as relu(shortcut).
- The first block of every stage has a projection shortcut (1x1 conv + BN), also where its
  input and output shapes match (ResNet-18/34's first stage); the other blocks have identity
  shortcuts. This is the reference's BlockGroup (use_projection=True on its first block) and
  gives its parameter counts: ResNet-18 CIFAR = 11,173,056, ResNet-50 = 23,508,032.
- sk_ratio > 0 (SimCLRv2): bottleneck 3x3 convs become selective-kernel convs, the ImageNet stem
  becomes the ResNet-D stem (three 3x3 convs) and projection shortcuts average-pool before
  their 1x1 conv (ResNet-D). Basic blocks (18/34) keep plain 3x3 convs, as in the reference.
  The CIFAR stem takes precedence over the ResNet-D stem, as in the reference.

The conv layer is injected (`conv`, a flax.linen.Conv-like class, as in Flax's
examples/imagenet) and passed to blocks as a functools.partial, like the norm layer; the model
never knows which machine it runs on. A conv class may carry `fork_shortcut`, a function
x -> (x, x) that identity blocks then use to split their input between the residual branch
and the shortcut (simclr_jax.cpu's classes use it to shape XLA:CPU's backward pass).
Every BatchNorm's name contains 'bn', so optimisers can find BN parameters by path.
"""

import functools
import numbers
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from simclr_jax import config_checks

ModuleDef = Any

# (block kind, blocks per stage) for each supported depth.
BLOCK_COUNTS: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
    200: ("bottleneck", (3, 24, 36, 3)),
}
# The depths a config may ask for (config_checks owns the list); the table covers each.
SUPPORTED_DEPTHS: tuple[int, ...] = config_checks.MODEL_DEPTHS
assert sorted(BLOCK_COUNTS) == sorted(SUPPORTED_DEPTHS), (BLOCK_COUNTS, SUPPORTED_DEPTHS)
BASE_WIDTH = 64
# Smallest width of the selective-kernel reduction layer (reference: min_dim=32).
SK_MIN_DIM = 32
BOTTLENECK_EXPANSION = 4

# Keras' VarianceScaling() default: scale 1, fan_in, truncated normal (std corrected for the
# truncation in both libraries).
CONV_INIT = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_resnet_args(
    depth: Any, width_multiplier: Any, sk_ratio: Any, base_width: Any = BASE_WIDTH
) -> None:
    """Validates ResNet hyper-parameters.

    Args:
      depth: network depth; one of SUPPORTED_DEPTHS.
      width_multiplier: positive int channel multiplier.
      sk_ratio: selective-kernel reduction ratio, >= 0 (0 disables SK).
      base_width: positive int width of the first stage before the multiplier.

    Raises:
      ValueError: naming the argument, its value and what is allowed.
    """
    if not _is_int(depth) or depth not in BLOCK_COUNTS:
        raise ValueError(f"depth must be one of {SUPPORTED_DEPTHS}, got {depth!r}.")
    if not _is_int(width_multiplier) or width_multiplier < 1:
        raise ValueError(
            f"width_multiplier must be a positive int (1, 2, 4, ...), got {width_multiplier!r}."
        )
    if isinstance(sk_ratio, bool) or not isinstance(sk_ratio, numbers.Real) or sk_ratio < 0:
        raise ValueError(
            f"sk_ratio must be a float >= 0 (0 disables selective kernels, SimCLRv2 uses "
            f"0.0625), got {sk_ratio!r}."
        )
    if not _is_int(base_width) or base_width < 1:
        raise ValueError(f"base_width must be a positive int (default 64), got {base_width!r}.")


def representation_dim(depth: int, width_multiplier: int = 1, base_width: int = BASE_WIDTH) -> int:
    """Returns the width C of the pooled representation h.

    Args:
      depth: network depth; one of SUPPORTED_DEPTHS.
      width_multiplier: channel multiplier.
      base_width: width of the first stage before the multiplier (64 for standard ResNets).

    Returns:
      8 * base_width * width_multiplier for basic-block ResNets, 4x that for bottleneck ones.
    """
    check_resnet_args(depth, width_multiplier, 0.0, base_width)
    kind, _ = BLOCK_COUNTS[depth]
    expansion = 1 if kind == "basic" else BOTTLENECK_EXPANSION
    return 8 * base_width * width_multiplier * expansion


def _fixed_padding(kernel_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """TF reference padding: (k - 1) // 2 before, the rest after, in both spatial dims."""
    total = kernel_size - 1
    pad = (total // 2, total - total // 2)
    return (pad, pad)


def _conv(conv: ModuleDef, features: int, kernel_size: int, strides: int, name: str) -> nn.Module:
    return conv(
        features,
        (kernel_size, kernel_size),
        strides=(strides, strides),
        padding=_fixed_padding(kernel_size),
        name=name,
    )


def _projection_shortcut(
    x: jax.Array, features: int, strides: int, conv: ModuleDef, norm: ModuleDef, resnet_d: bool
) -> jax.Array:
    """1x1 conv + BN shortcut ('proj_conv', 'proj_bn' in the calling block).

    Must be called inside a block's compact __call__ so the layers register there. With
    resnet_d, a 2x2 average pool does the striding and the conv is stride 1.
    """
    if resnet_d:
        dtype = x.dtype
        if strides > 1:
            # Reference: pad 0 before / 1 after, then VALID pooling (padding counted).
            x = nn.avg_pool(
                x,
                (2, 2),
                strides=(strides, strides),
                padding=((0, 1), (0, 1)),
                count_include_pad=True,
            )
        else:
            # Reference: TF 'SAME' 2x2 pooling at stride 1, averaging valid pixels only. It
            # smooths the input; kept so the architecture matches SimCLRv2.
            x = nn.avg_pool(x, (2, 2), strides=(1, 1), padding="SAME", count_include_pad=False)
        x = _conv(conv, features, 1, 1, "proj_conv")(x.astype(dtype))
    else:
        x = _conv(conv, features, 1, strides, "proj_conv")(x)
    return norm(name="proj_bn")(x)


class SelectiveKernel(nn.Module):
    """Selective-kernel 3x3 conv (arXiv 1903.06586) as in SimCLRv2, including its BN + ReLU.

    One conv produces both branches (2 * features channels); a global descriptor of their sum
    goes through a reduction 1x1 conv (max(features * sk_ratio, 32) wide) + BN + ReLU and a 1x1
    conv back to 2 * features channels, whose softmax over the two branches mixes them.
    """

    features: int
    strides: int
    sk_ratio: float
    conv: ModuleDef
    norm: ModuleDef

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = _conv(self.conv, 2 * self.features, 3, self.strides, "conv")(x)
        x = nn.relu(self.norm(name="bn")(x))
        # Channel halves are the two branches: [..., 2C] -> [..., 2, C].
        branches = x.reshape(x.shape[:-1] + (2, self.features))
        pooled = jnp.mean(jnp.sum(branches, axis=-2), axis=(1, 2), keepdims=True)
        mid_dim = max(int(self.features * self.sk_ratio), SK_MIN_DIM)
        g = _conv(self.conv, mid_dim, 1, 1, "fc1")(pooled)
        g = nn.relu(self.norm(name="fc1_bn")(g))
        logits = _conv(self.conv, 2 * self.features, 1, 1, "fc2")(g)
        logits = logits.reshape(logits.shape[:-1] + (2, self.features))
        # Softmax in at least float32: it is tiny ([n, 1, 1, 2, C]) and bf16 exp is coarse.
        softmax_dtype = jnp.promote_types(logits.dtype, jnp.float32)
        mixing = jax.nn.softmax(logits.astype(softmax_dtype), axis=-2).astype(x.dtype)
        return jnp.sum(branches * mixing, axis=-2)


def _shortcut(block: nn.Module, x: jax.Array, out_features: int) -> tuple[jax.Array, jax.Array]:
    """(residual branch input, shortcut) of a block; called inside its compact __call__.

    With block.projection (the first block of a stage), a projection shortcut whatever the
    shapes, as the reference. Otherwise an identity shortcut, split off with block.fork when the
    conv class offers one; an identity cannot change the shape, so that is an error.
    """
    if block.projection:
        shortcut = _projection_shortcut(
            x, out_features, block.strides, block.conv, block.norm, block.resnet_d
        )
        return x, shortcut
    if block.strides != 1 or x.shape[-1] != out_features:
        raise ValueError(
            f"{type(block).__name__} {block.name or '(unnamed)'} changes the shape (strides "
            f"{block.strides}, {x.shape[-1]} -> {out_features} channels) but has an identity "
            "shortcut: pass projection=True (the first block of every stage has one)."
        )
    if block.fork is not None:
        return block.fork(x)
    return x, x


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34); the stride sits on the first conv.

    `projection` gives the block a projection shortcut (the first block of a stage), else it
    has an identity one.
    """

    features: int
    strides: int
    conv: ModuleDef
    norm: ModuleDef
    resnet_d: bool = False
    sk_ratio: float = 0.0  # Unused: the reference has no SK in basic blocks.
    fork: Callable | None = None
    projection: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x, shortcut = _shortcut(self, x, self.features)
        y = _conv(self.conv, self.features, 3, self.strides, "conv1")(x)
        y = nn.relu(self.norm(name="bn1")(y))
        y = _conv(self.conv, self.features, 3, 1, "conv2")(y)
        y = self.norm(name="bn2", scale_init=nn.initializers.zeros)(y)
        return nn.relu(y + shortcut)


class BottleneckBlock(nn.Module):
    """1x1 -> 3x3 (strided, v1.5) -> 1x1 (4x wide) bottleneck; SK replaces the 3x3 if enabled.

    `projection` as in BasicBlock.
    """

    features: int
    strides: int
    conv: ModuleDef
    norm: ModuleDef
    resnet_d: bool = False
    sk_ratio: float = 0.0
    fork: Callable | None = None
    projection: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        out_features = BOTTLENECK_EXPANSION * self.features
        x, shortcut = _shortcut(self, x, out_features)
        y = _conv(self.conv, self.features, 1, 1, "conv1")(x)
        y = nn.relu(self.norm(name="bn1")(y))
        if self.sk_ratio > 0:
            y = SelectiveKernel(
                self.features, self.strides, self.sk_ratio, self.conv, self.norm, name="sk2"
            )(y)
        else:
            y = _conv(self.conv, self.features, 3, self.strides, "conv2")(y)
            y = nn.relu(self.norm(name="bn2")(y))
        y = _conv(self.conv, out_features, 1, 1, "conv3")(y)
        y = self.norm(name="bn3", scale_init=nn.initializers.zeros)(y)
        return nn.relu(y + shortcut)


class ResNet(nn.Module):
    """ResNet v1.5 encoder returning the globally average-pooled representation h.

    Attributes:
      depth: one of SUPPORTED_DEPTHS.
      width_multiplier: channel multiplier (1x, 2x, 4x, ...).
      cifar_stem: 3x3 stride-1 stem conv without max-pool (for 32x32 images).
      sk_ratio: > 0 enables SimCLRv2 selective kernels and the ResNet-D stem/shortcuts.
      dtype: computation dtype (e.g. jnp.bfloat16); parameters and BN statistics stay float32.
      bn_axis_name: mapped axis name over which BatchNorm averages batch statistics (global BN
        under shard_map / pmap); None for per-device statistics.
      bn_momentum: running-average decay of the BN statistics.
      bn_epsilon: BN variance epsilon.
      base_width: width of the first stage before the multiplier. 64 for real ResNets; smaller
        values exist only to make tests fast.
      conv: the convolution class (flax.linen.Conv or a drop-in subclass with the same
        parameters). If it has a `fork_shortcut` attribute (x -> (x, x)), identity blocks
        split their input with it.
    """

    depth: int
    width_multiplier: int = 1
    cifar_stem: bool = False
    sk_ratio: float = 0.0
    dtype: Any = jnp.float32
    bn_axis_name: str | None = None
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    base_width: int = BASE_WIDTH
    conv: ModuleDef = nn.Conv

    def __post_init__(self) -> None:
        # Fail at construction rather than at the first trace.
        check_resnet_args(self.depth, self.width_multiplier, self.sk_ratio, self.base_width)
        super().__post_init__()

    @property
    def output_dim(self) -> int:
        """Width C of the representation h."""
        return representation_dim(self.depth, self.width_multiplier, self.base_width)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """Encodes images.

        Args:
          x: images [n, H, W, 3].
          train: use batch statistics (and update the running ones; apply with
            mutable=['batch_stats']) if True, running statistics if False.

        Returns:
          h: float32 [n, C] pooled representation.
        """
        conv = functools.partial(
            self.conv,
            use_bias=False,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=CONV_INIT,
        )
        norm = functools.partial(
            nn.BatchNorm,
            use_running_average=not train,
            momentum=self.bn_momentum,
            epsilon=self.bn_epsilon,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            axis_name=self.bn_axis_name,
            use_fast_variance=False,
        )
        kind, stage_sizes = BLOCK_COUNTS[self.depth]
        block_cls = BasicBlock if kind == "basic" else BottleneckBlock
        width = self.base_width * self.width_multiplier
        resnet_d = self.sk_ratio > 0

        x = jnp.asarray(x, self.dtype)
        if self.cifar_stem:
            x = _conv(conv, width, 3, 1, "stem_conv")(x)
            x = nn.relu(norm(name="stem_bn")(x))
        else:
            if resnet_d:
                x = _conv(conv, width // 2, 3, 2, "stem_conv1")(x)
                x = nn.relu(norm(name="stem_bn1")(x))
                x = _conv(conv, width // 2, 3, 1, "stem_conv2")(x)
                x = nn.relu(norm(name="stem_bn2")(x))
                x = _conv(conv, width, 3, 1, "stem_conv3")(x)
                x = nn.relu(norm(name="stem_bn3")(x))
            else:
                x = _conv(conv, width, 7, 2, "stem_conv")(x)
                x = nn.relu(norm(name="stem_bn")(x))
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")

        for stage, num_blocks in enumerate(stage_sizes):
            for index in range(num_blocks):
                x = block_cls(
                    features=width * 2**stage,
                    strides=2 if stage > 0 and index == 0 else 1,
                    conv=conv,
                    norm=norm,
                    resnet_d=resnet_d,
                    sk_ratio=self.sk_ratio,
                    fork=getattr(self.conv, "fork_shortcut", None),
                    projection=index == 0,
                    name=f"block{stage + 1}_{index}",
                )(x)
        # Pool in float32 so the bf16 path loses nothing in the final reduction.
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


def resnet(
    depth: int,
    width_multiplier: int = 1,
    cifar_stem: bool = False,
    sk_ratio: float = 0.0,
    dtype: Any = jnp.float32,
    *,
    bn_axis_name: str | None = None,
    bn_momentum: float = 0.9,
    bn_epsilon: float = 1e-5,
    base_width: int = BASE_WIDTH,
    conv: ModuleDef = nn.Conv,
) -> ResNet:
    """Builds a ResNet encoder module.

    Args:
      depth: 18 or 34 (basic blocks), 50, 101, 152 or 200 (bottleneck blocks).
      width_multiplier: positive int channel multiplier.
      cifar_stem: use the 3x3 stride-1 stem without max-pool (images <= 32 px).
      sk_ratio: selective-kernel ratio; 0 disables, SimCLRv2 uses 0.0625.
      dtype: computation dtype; parameters and BN statistics are float32 regardless.
      bn_axis_name: axis name for cross-device (global) BatchNorm; None = per-device.
      bn_momentum: BN running-average momentum.
      bn_epsilon: BN epsilon.
      base_width: first-stage width before the multiplier (64; smaller only for tests).
      conv: the convolution class (nn.Conv; simclr_jax.cpu.conv_class gives faster ones on
        CPU, with identical parameters).

    Returns:
      A ResNet module; `apply(variables, images, train=...)` returns h [n, C] float32.

    Raises:
      ValueError: for an unsupported depth, non-positive width or negative sk_ratio.
    """
    return ResNet(
        depth=depth,
        width_multiplier=width_multiplier,
        cifar_stem=cifar_stem,
        sk_ratio=sk_ratio,
        dtype=dtype,
        bn_axis_name=bn_axis_name,
        bn_momentum=bn_momentum,
        bn_epsilon=bn_epsilon,
        base_width=base_width,
        conv=conv,
    )
