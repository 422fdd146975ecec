"""An identity fan-out for residual blocks that keeps XLA:CPU's own kernel on their convolutions.

A conv class offers it to the ResNet as its `fork_shortcut` attribute (see
simclr_jax.models.resnet and simclr_jax.cpu.conv_class): identity blocks then split their input
into the residual branch and the shortcut with it instead of using it twice.
"""

import jax
import jax.numpy as jnp


@jax.custom_vjp
def shortcut_fork(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Returns (x, x): a block input for the residual branch and for the identity shortcut.

    The identity in the forward pass. Its backward pass adds the two cotangents like JAX's own
    fan-out rule, but keeps XLA:CPU from fusing the convolution that produced the branch
    cotangent (the input gradient of the block's first conv) into that add. XLA:CPU's library
    rewriter (jaxlib 0.10) grows a YNNPACK elementwise fusion from the add up into a producer
    whose only user it is, and then runs the convolution with YNNPACK's kernel, which is far
    slower here than XLA's own (benchmarks/conv_layer.py). A second, tiny user of the branch
    cotangent (a one-element-per-example slice, which YNNPACK fusions do not take) stops that.
    The term it adds is exactly zero, NaN and inf included: float(v != v) * 0 = 0.

    Args:
      x: a block input [n, h, w, c], any float dtype.

    Returns:
      (x, x).
    """
    return x, x


def _shortcut_fork_fwd(x: jax.Array) -> tuple[tuple[jax.Array, jax.Array], None]:
    return (x, x), None


def _shortcut_fork_bwd(_, cotangents: tuple[jax.Array, jax.Array]) -> tuple[jax.Array]:
    branch, shortcut = cotangents
    # One element per example ([n, 1, 1, 1]), so a batch-sharded cotangent needs no collective.
    probe = branch[(slice(None),) + (slice(0, 1),) * (branch.ndim - 1)]
    zero = (probe != probe).astype(branch.dtype) * jnp.zeros((), branch.dtype)
    return (branch + shortcut + zero,)


shortcut_fork.defvjp(_shortcut_fork_fwd, _shortcut_fork_bwd)
