"""The training data order: which example goes at which global position, and the seeds.

Every host yields local batches of b = B / P examples (B the global batch, P
the process count); this module decides which example fills which row of every
global batch, and derives every seed of the data pipeline.

Global order. For indexable sources (embedded sample, image folders) and for
every cached source the order is global, the same for any process count:
- epoch e is one permutation of all N examples (or of subset_indices), seeded
  by (seed, e) only; global step s of the epoch takes its positions
  [s*B, (s+1)*B), and steps_per_epoch = N // B (the remainder is dropped, so no
  batch straddles two epochs);
- host p supplies `batch_rows` of every global batch, by default the block
  [p*b, (p+1)*b). That block is where make_array_from_process_local_data puts
  process p's rows when the mesh lists each process's devices together and in
  process order, as a mesh over jax.devices() does on CPU (tested with 2
  processes x 4 devices) and GPU clusters. For other meshes (TPU pods may
  interleave processes) pass batch_rows=distributed.process_batch_rows(mesh, B);
- the augmentation of the example at global position g of epoch e is seeded by
  (seed, purpose, e, g), split into different seeds for the two views.
So the hosts' local batches, laid out by row, are bit-identical to the batch one
process builds: a 2 x 4-device run trains on exactly the data of a 1 x 8 run.

Per-host order. Record streams (tfds, not cached: e.g. ImageNet) have no cheap
random access, so they keep a per-host order, as the reference code and
tfds.even_splits do: host p reads its contiguous range of the split, shuffles it
with a buffer (data.shuffle_buffer, default 50,000) seeded by (seed, p, e), and
every host takes min_host_examples // b batches per epoch. A 2-host run
therefore sees other batches than a 1-host run (same distribution). A good
shuffle relies on tfds having shuffled the examples when it wrote the files,
which it does. Augmentation seeds follow the global row position here too.

Every seed is a pure function of the config seed and a purpose, never of the TF
global seed or of time.
"""

import ml_collections as mlc
import numpy as np
import tensorflow as tf

from simclr_jax.config_checks import ConfigError

# Purposes folded into the seed so the permutation, shuffle and augmentation
# streams never coincide, and pretraining and fine-tuning draw different crops.
_PERMUTATION, _SHUFFLE, PRETRAIN_VIEWS, FINETUNE_VIEWS = 1, 2, 3, 4
SEED_ALG = "philox"


def global_stream(source, pool, subset, *, seed, global_batch_size, rows):
    """The process-count independent order: one permutation of `pool` per epoch.

    Args:
      source: the base.DataSource the pool indexes (named in errors).
      pool: the split indices of an epoch's examples.
      subset: the subset_indices the pool was made from, or None (named in errors).
      seed: the config seed.
      global_batch_size: B.
      rows: the rows of every global batch this host supplies (check_batch_rows).

    Returns:
      (steps_per_epoch, epoch -> dataset of this host's elements in order). An
      element is {'epoch', 'position': its global position in the epoch,
      'example': its index into `pool`}.
    """
    steps = len(pool) // global_batch_size
    if steps == 0:
        raise ConfigError(
            f"global_batch_size={global_batch_size} is larger than the data: {source.name!r} "
            f"({source.split}{', subset_indices' if subset is not None else ''}) holds only "
            f"{len(pool)} examples; lower the batch size"
        )
    # This host's positions in every epoch's permutation, step by step.
    positions = host_positions(steps, global_batch_size, rows)

    def epoch_stream(epoch):
        order = tf.random.experimental.stateless_shuffle(
            tf.range(len(pool), dtype=tf.int64),
            derive_seed(seed, _PERMUTATION, epoch),
            alg=SEED_ALG,
        )
        return tf.data.Dataset.from_tensor_slices(
            {
                "epoch": tf.fill([len(positions)], epoch),
                "position": tf.constant(positions),
                "example": tf.gather(order, positions),
            }
        )

    return steps, epoch_stream


def host_stream(
    source, subset, *, seed, global_batch_size, rows, process_index, process_count, shuffle_buffer
):
    """The per-host order of record streams: this host's range, buffer-shuffled per epoch.

    Args:
      source: a base.DataSource without random access.
      subset: the split indices in use (check_subset), or None for all.
      seed, global_batch_size, rows: as in global_stream.
      process_index: this host, in [0, process_count).
      process_count: number of hosts.
      shuffle_buffer: the largest shuffle buffer.

    Returns:
      (steps_per_epoch, epoch -> dataset of this host's undecoded records in
      order, each with its 'epoch' and global 'position' added).
    """
    batch = len(rows)
    hosts = [_stream_indices(source, q, process_count, subset) for q in range(process_count)]
    per_host = min(len(h) for h in hosts)
    steps = per_host // batch
    if steps == 0:
        raise ConfigError(
            f"global_batch_size={global_batch_size} needs {batch} examples per process, but "
            f"process {int(np.argmin([len(h) for h in hosts]))} of {process_count} holds "
            f"only {per_host} of the {sum(len(h) for h in hosts)} examples of {source.name!r} "
            f"({source.split}); lower the batch size"
        )
    records = filter_subset(source.records(process_index, process_count), subset)
    buffer = min(len(hosts[process_index]), shuffle_buffer)
    rows_t = tf.constant(rows)

    def epoch_stream(epoch):
        shuffle_seed = tf.random.stateless_uniform(
            [], derive_seed(seed, _SHUFFLE, process_index, epoch), 0, 2**62, tf.int64
        )
        shuffled = records.shuffle(buffer, seed=shuffle_seed).take(steps * batch).enumerate()
        # Local element i is row rows[i % b] of global step i // b.
        return shuffled.map(
            lambda i, r: {
                **r,
                "epoch": epoch,
                "position": i // batch * global_batch_size + tf.gather(rows_t, i % batch),
            }
        )

    return steps, epoch_stream


def derive_seed(seed: int, purpose: int, *data) -> tf.Tensor:
    """An int64 [2] stateless seed that is a pure function of its arguments."""
    key = tf.constant([seed, purpose], tf.int64)
    for value in data:
        key = tf.random.experimental.stateless_fold_in(key, tf.cast(value, tf.int64), alg=SEED_ALG)
    return key


def split_seed(data_cfg: mlc.ConfigDict) -> int:
    """The seed of a folder's val_fraction hold-out: data.split_seed, default 0."""
    return int(data_cfg.get("split_seed") or 0)


def local_batch_size(global_batch_size: int, process_count: int) -> int:
    """global_batch_size // process_count; raises unless it divides evenly."""
    if isinstance(global_batch_size, bool) or not isinstance(global_batch_size, int | np.integer):
        raise ValueError(f"global_batch_size={global_batch_size!r}: must be a positive int")
    if global_batch_size < 1:
        raise ValueError(f"global_batch_size={global_batch_size!r}: must be a positive int")
    if global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size={global_batch_size} is not divisible by "
            f"process_count={process_count}; every process needs the same local batch"
        )
    return int(global_batch_size) // process_count


def default_rows(process_index: int, local_batch: int) -> np.ndarray:
    """The block [p*b, (p+1)*b) of every global batch, host p's rows by default."""
    return np.arange(process_index * local_batch, (process_index + 1) * local_batch, dtype=np.int64)


def check_batch_rows(batch_rows, global_batch_size, process_index, local_batch) -> np.ndarray:
    """The rows this host supplies: batch_rows checked, or default_rows when None."""
    if batch_rows is None:
        return default_rows(process_index, local_batch)
    rows = np.asarray(batch_rows)
    if (
        rows.shape != (local_batch,)
        or not np.issubdtype(rows.dtype, np.integer)
        or len(np.unique(rows)) != local_batch
        or rows.min() < 0
        or rows.max() >= global_batch_size
    ):
        raise ValueError(
            f"batch_rows={batch_rows!r}: expected {local_batch} distinct ints in "
            f"[0, global_batch_size={global_batch_size})"
        )
    return rows.astype(np.int64)


def host_positions(num_steps: int, global_batch_size: int, rows: np.ndarray) -> np.ndarray:
    """Positions s * B + rows for s in [0, num_steps), step-major: a host's share of a pass."""
    return (np.arange(num_steps, dtype=np.int64)[:, None] * global_batch_size + rows).reshape(-1)


def check_subset(subset_indices, num_examples: int) -> np.ndarray | None:
    """subset_indices as sorted unique int64 indices into the split, or None."""
    if subset_indices is None:
        return None
    subset = np.asarray(subset_indices)
    if subset.ndim != 1 or not len(subset) or not np.issubdtype(subset.dtype, np.integer):
        raise ValueError(f"subset_indices: expected a non-empty 1-D int array, got {subset!r}")
    if subset.min() < 0 or subset.max() >= num_examples:
        raise ValueError(
            f"subset_indices range [{subset.min()}, {subset.max()}] is outside the split's "
            f"[0, {num_examples})"
        )
    unique = np.unique(subset)
    if len(unique) != len(subset):
        raise ValueError(f"subset_indices holds {len(subset) - len(unique)} duplicate(s)")
    return unique.astype(np.int64)


def filter_subset(records: tf.data.Dataset, subset: np.ndarray | None) -> tf.data.Dataset:
    """The records whose 'index' is in `subset` (all of them when subset is None)."""
    if subset is None:
        return records
    # member[i]: is index i in the subset; its last entry (False) stands for every index past
    # the subset's largest, so the gather never goes out of range (tf.logical_and would not
    # have short-circuited a bounds test).
    member = tf.constant(np.isin(np.arange(subset.max() + 2), subset))
    last = int(subset.max()) + 1
    return records.filter(lambda r: tf.gather(member, tf.minimum(r["index"], last)))


def _stream_indices(source, process_index, process_count, subset) -> np.ndarray:
    """Split indices a host's record stream yields: its range, reduced to the subset."""
    shard = source.shard_indices(process_index, process_count)
    return shard if subset is None else np.intersect1d(shard, subset)
