"""A fixed-size FIFO queue of vectors, replicated on every device (MoCo v2's keys; NNCLR's
support set), and its update from the whole global batch.

Layout: `queue` float32 [K, d], one vector per row, and `ptr` int32 [], the row the next batch
is written at. Each update writes the B rows of the GLOBAL batch at rows [ptr, ptr + B) and
advances ptr to (ptr + B) mod K; with K a multiple of B the slot never straddles the end, so
the oldest B rows are always the ones replaced (first in, first out).

Why replicated rather than sharded over the devices: a queue row must be readable by every
device's queries (MoCo v2's negatives, NNCLR's nearest neighbours), and the memory is
affordable on every accelerator: 65,536 x 128 x 4 B = 32 MiB per device for MoCo v2 on
ImageNet, 98,304 x 256 x 4 B = 96 MiB for NNCLR. Replication keeps the update a pure function
of the gathered global batch: every device writes the same rows (the keys all_gathered in
global batch order: device 0's rows, then device 1's, ...), so the queue's content is
independent of how many devices or hosts hold the batch (1 x 8 == 2 x 4 == 8 x 1), and the
checkpoint holds one logical copy.

Pure functions; the train state holds the arrays (train_state.QueueTrainState).
"""

from collections.abc import Hashable

import jax
import jax.numpy as jnp

from simclr_jax import config_checks
from simclr_jax.losses import l2_normalize


def check_size(queue_size, global_batch: int, field: str = "method.queue_size") -> None:
    """Raises ConfigError (naming `field`) unless queue_size is a positive multiple of the
    global batch (so each update fills one whole slot; a FIFO across the wrap would need a
    split write).

    Args:
      queue_size: K, the number of rows.
      global_batch: B, the rows one update writes (config.train.batch_size).
      field: the config field named in the message.
    """
    if isinstance(queue_size, bool) or not isinstance(queue_size, int) or queue_size <= 0:
        config_checks.fail(field, queue_size, "the queue size must be an integer > 0.")
    if queue_size % global_batch:
        config_checks.fail(
            field,
            queue_size,
            f"the queue size must be a multiple of the global batch train.batch_size="
            f"{global_batch} (e.g. {max(1, round(queue_size / global_batch)) * global_batch}).",
        )


def init(rng: jax.Array, size: int, dim: int) -> tuple[jax.Array, jax.Array]:
    """A queue of random unit vectors and a write position of 0 (MoCo's initial queue).

    Args:
      rng: PRNG key.
      size: K, the number of rows.
      dim: d, the vectors' width.

    Returns:
      (queue float32 [K, d], each row N(0, I) scaled to unit l2 norm; ptr int32 [] = 0).
    """
    queue = l2_normalize(jax.random.normal(rng, (size, dim), jnp.float32))
    return queue, jnp.zeros((), jnp.int32)


def gather_global(x: jax.Array, axis_name: Hashable | None) -> jax.Array:
    """[n, d] per device -> [D * n, d]: every device's rows in global batch order (device 0's
    rows first; identity for axis_name None). No gradient crosses devices."""
    x = jax.lax.stop_gradient(x)
    if axis_name is None:
        return x
    return jax.lax.all_gather(x, axis_name, axis=0, tiled=True)


def enqueue(
    queue: jax.Array, ptr: jax.Array, rows: jax.Array, axis_name: Hashable | None
) -> tuple[jax.Array, jax.Array]:
    """Writes the global batch's rows over the oldest ones: the FIFO update.

    Args:
      queue: float32 [K, d], replicated.
      ptr: int32 [], the first row to write (a multiple of B).
      rows: [n, d] this device's rows (any float dtype; stored as float32, no gradient).
      axis_name: the device axis, or None on one device. The rows are all_gathered (tiled)
        over it, so B = D * n rows are written in global batch order on every device.

    Returns:
      (new queue float32 [K, d], new ptr int32 [] = (ptr + B) mod K).

    Raises:
      ValueError: rows of another width than the queue's, or K not a multiple of B.
    """
    size, dim = queue.shape
    if rows.ndim != 2 or rows.shape[1] != dim:
        raise ValueError(
            f"rows must be [n, {dim}] for a queue of shape {queue.shape}; got {rows.shape}."
        )
    batch = gather_global(rows, axis_name).astype(jnp.float32)
    global_batch = batch.shape[0]
    if size % global_batch:
        raise ValueError(
            f"the queue's size {size} must be a multiple of the global batch {global_batch}."
        )
    ptr = jnp.asarray(ptr, jnp.int32)
    queue = jax.lax.dynamic_update_slice(queue, batch, (ptr, jnp.int32(0)))
    return queue, (ptr + global_batch) % size
