"""A memory bank: one unit vector per training example, replicated on every device (InstDisc),
and its momentum update at the global batch's example indices.

Layout: `bank` float32 [N, d], row i the stored embedding of example i of the training split
(the pipeline's batch['index'], its position in the split, fixed before any shuffling). After
each step the rows of the GLOBAL batch's examples become
normalise(m * old + (1 - m) * new) (Wu et al. 2018, section 3.2; lemniscate.pytorch's
LinearAverage with m = 0.5). The global batch's indices and embeddings are all_gathered in
global batch order and every device writes the same rows, so the bank does not depend on the
device or host count. Within a global batch the indices are distinct (each example is drawn
once per epoch and a batch never straddles two epochs), so the scatter has one writer per row.

Why replicated: every device's rows are scored against the whole bank (the softmax's
denominator). Memory per device: CIFAR-10, 50,000 x 128 x 4 B = 24 MiB; ImageNet,
1,281,167 x 128 x 4 B = 626 MiB, affordable on a 16 GiB accelerator, but InstDisc's exact
softmax has [2n, N] logits per device (both views: 2.4 GiB at n = 256, before the backward
pass), where the paper samples NCE noise instead.

Pure functions; train_state.MemoryBankTrainState holds the array.
"""

from collections.abc import Hashable

import jax
import jax.numpy as jnp

from simclr_jax.losses import l2_normalize
from simclr_jax.methods.queue import gather_global


def init(rng: jax.Array, num_examples: int, dim: int) -> jax.Array:
    """float32 [N, d] of random unit vectors (N(0, I) rows scaled to unit l2 norm).

    lemniscate.pytorch draws each coordinate uniformly in [-s, s], s = 1 / sqrt(d / 3),
    unnormalised; unit rows keep every logit in [-1/tau, 1/tau] from the first step.

    Raises:
      ValueError: num_examples or dim < 1.
    """
    if num_examples < 1 or dim < 1:
        raise ValueError(
            f"a memory bank needs >= 1 example and width >= 1; got {num_examples} x {dim}."
        )
    return l2_normalize(jax.random.normal(rng, (num_examples, dim), jnp.float32))


def update(
    bank: jax.Array,
    index: jax.Array,
    rows: jax.Array,
    momentum: float,
    axis_name: Hashable | None,
) -> jax.Array:
    """bank[index] <- normalise(m * bank[index] + (1 - m) * normalise(rows)), over the global batch.

    Args:
      bank: float32 [N, d], replicated.
      index: [n] int, this device's examples' rows in the bank (distinct across the global
        batch).
      rows: [n, d] this device's new embeddings of those examples (any float dtype; normalised
        here, no gradient).
      momentum: m in [0, 1] (0.5 in the paper): the weight of the stored row.
      axis_name: the device axis, or None. Indices and rows are all_gathered (tiled) over it.

    Returns:
      The new bank, float32 [N, d].

    Raises:
      ValueError: rows not [n, d] for the bank's d, or index not [n].
    """
    dim = bank.shape[1]
    if rows.ndim != 2 or rows.shape[1] != dim or index.shape != (rows.shape[0],):
        raise ValueError(
            f"rows must be [n, {dim}] and index [n] for a bank of shape {bank.shape}; got "
            f"rows {rows.shape}, index {index.shape}."
        )
    new = l2_normalize(gather_global(rows, axis_name).astype(jnp.float32))
    where = gather_global(jnp.asarray(index, jnp.int32), axis_name)
    mixed = l2_normalize(momentum * bank[where] + (1.0 - momentum) * new)
    return bank.at[where].set(mixed, unique_indices=True)
