"""tf.data pipelines: SimCLR pretraining views, fine-tuning views and evaluation.

Each host builds its own pipeline over its shard of the split (see
datasets.DataSource) and yields local batches of global_batch_size /
process_count examples; the trainer assembles them into global arrays.

Determinism and resume. Everything random is a pure function of the config
seed, never of the TF global seed or of time:
- the examples of epoch e are a fresh permutation of this host's shard, seeded
  by (seed, process_index, e), truncated to steps_per_epoch * local_batch
  examples so no batch straddles two epochs and every host runs the same
  number of steps;
- the augmentation of the example at position i of epoch e is seeded by
  (seed, process_index, e, i), split into different seeds for the two views.
So `start_step=k` rebuilds exactly the stream an uninterrupted run would be
at after k steps: whole epochs are skipped by arithmetic, then the remaining
k % steps_per_epoch batches are skipped as indices (or undecoded records)
before any image is decoded or augmented.

Where the examples come from (chosen per host):
- cached (data.cache, default: when the shard decodes to <= 4 GiB): the shard
  is decoded once into host memory and the permutation indexes it;
- indexable sources (embedded, folder) not cached: the permutation indexes
  the file list and each image is read and decoded when drawn;
- tfds not cached (e.g. ImageNet): the shard is read in file order and
  shuffled with a buffer (data.shuffle_buffer, default 50,000) seeded per
  epoch; a good shuffle relies on tfds having shuffled the examples when it
  wrote the files, which it does.
"""

import dataclasses
import logging
import math

import ml_collections as mlc
import numpy as np
import tensorflow as tf

from simclr_jax.data import augment, datasets

# Decoded shards up to this size are cached in host memory when data.cache is
# unset (None): CIFAR-10 is 150 MB, STL-10 'unlabelled' 2.8 GB.
CACHE_AUTO_MAX_BYTES = 4 * 2**30
DEFAULT_SHUFFLE_BUFFER = 50_000
# Purposes folded into the seed so the permutation, shuffle and augmentation
# streams never coincide, and pretraining and fine-tuning draw different crops.
_PERMUTATION, _SHUFFLE, _PRETRAIN_VIEWS, _FINETUNE_VIEWS = 1, 2, 3, 4
_SEED_ALG = "philox"

_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PipelineInfo:
    """What the trainer needs to know about a training pipeline.

    Attributes:
      steps_per_epoch: batches per epoch, the same on every host
        (examples_per_host // local_batch_size; the remainder is dropped).
      num_examples: examples in the split (or in subset_indices).
      num_classes: number of classes.
      class_names: label i is class_names[i].
      local_batch_size: this host's batch, global_batch_size // process_count.
      global_batch_size: the batch over all hosts.
      cached: whether decoded images are held in host memory.
    """

    steps_per_epoch: int
    num_examples: int
    num_classes: int
    class_names: tuple[str, ...]
    local_batch_size: int
    global_batch_size: int
    cached: bool


def configure_tensorflow(*, intra_op_threads: int = 2, inter_op_threads: int = 2) -> None:
    """Keeps TensorFlow off the accelerators and limits its op thread pools.

    Call once, before any TF op runs, in the process that also runs JAX: TF
    would otherwise reserve GPU memory and size its pools to all cores,
    competing with XLA. tf.data's own threads (parallel maps) are unaffected.

    Args:
      intra_op_threads: threads one TF op may use.
      inter_op_threads: TF ops that may run concurrently.
    """
    try:
        tf.config.set_visible_devices([], "GPU")
        tf.config.threading.set_intra_op_parallelism_threads(intra_op_threads)
        tf.config.threading.set_inter_op_parallelism_threads(inter_op_threads)
    except RuntimeError as e:  # TF already initialised; its settings stay as they are.
        _log.warning("configure_tensorflow: TensorFlow was already initialised (%s)", e)


def as_numpy_iterator(ds: tf.data.Dataset):
    """Iterates a dataset as nested dicts of NumPy arrays."""
    return ds.as_numpy_iterator()


def build_pretrain_dataset(
    data_cfg: mlc.ConfigDict,
    aug_cfg: mlc.ConfigDict,
    *,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    start_step: int = 0,
) -> tuple[tf.data.Dataset, PipelineInfo]:
    """Infinite SimCLR pretraining batches for this host.

    Args:
      data_cfg: data section of the config (see datasets.load_source), plus
        optional cache (None: automatic), shuffle_buffer and split_seed (seed
        of a folder's val_fraction hold-out, default 0).
      aug_cfg: augmentation config (see augment.default_augment_config).
      global_batch_size: batch over all hosts; divisible by process_count.
      seed: seed of the data order and of the augmentations.
      process_index: this host, in [0, process_count).
      process_count: number of hosts.
      start_step: global steps already taken; the stream starts at that step.

    Returns:
      (dataset, info): the dataset yields {'view1', 'view2': float32 [b, S, S, 3]
      in [0, 1], 'label': int32 [b]} with b = info.local_batch_size, S =
      aug_cfg.image_size.
    """

    def views(image, view_seed):
        s1, s2 = tf.unstack(tf.random.experimental.stateless_split(view_seed, 2, alg=_SEED_ALG))
        return {
            "view1": augment.pretrain_view(image, s1, aug_cfg),
            "view2": augment.pretrain_view(image, s2, aug_cfg),
        }

    return _build_train_dataset(
        data_cfg,
        aug_cfg,
        views,
        purpose=_PRETRAIN_VIEWS,
        global_batch_size=global_batch_size,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
        start_step=start_step,
        subset_indices=None,
    )


def build_finetune_dataset(
    data_cfg: mlc.ConfigDict,
    aug_cfg: mlc.ConfigDict,
    *,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    start_step: int = 0,
    subset_indices=None,
) -> tuple[tf.data.Dataset, PipelineInfo]:
    """Infinite labelled batches with the fine-tuning view (crop + flip).

    Args:
      data_cfg, aug_cfg, global_batch_size, seed, process_index, process_count,
        start_step: as in build_pretrain_dataset.
      subset_indices: optional indices into the train split's fixed order (e.g.
        a 1% / 10% labelled subset); only these examples are used. For
        indexable sources host p takes sorted(subset)[p::P]; for tfds, the
        subset members inside host p's range.

    Returns:
      (dataset, info): the dataset yields {'image': float32 [b, S, S, 3],
      'label': int32 [b]}.
    """

    def view(image, view_seed):
        return {"image": augment.finetune_view(image, view_seed, aug_cfg)}

    return _build_train_dataset(
        data_cfg,
        aug_cfg,
        view,
        purpose=_FINETUNE_VIEWS,
        global_batch_size=global_batch_size,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
        start_step=start_step,
        subset_indices=subset_indices,
    )


def build_eval_dataset(
    data_cfg: mlc.ConfigDict,
    aug_cfg: mlc.ConfigDict,
    *,
    split: str,
    global_batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
) -> tf.data.Dataset:
    """One pass over this host's shard of `split` with the eval view, padded.

    Every example of the shard appears exactly once, in the shard's fixed
    order. The last batch is filled with padding (zero image, label 0, mask
    False), and hosts with fewer examples add fully padded batches, so every
    host yields the same number of batches and collectives cannot hang.

    Args:
      data_cfg: data section of the config.
      aug_cfg: augmentation config (image_size, eval_crop_fraction are used).
      split: split to read.
      global_batch_size: batch over all hosts; divisible by process_count.
      process_index: this host, in [0, process_count).
      process_count: number of hosts.

    Returns:
      A finite dataset of {'image': float32 [b, S, S, 3], 'label': int32 [b],
      'mask': bool [b]}; its cardinality is the number of batches.
    """
    augment.validate_augment_config(aug_cfg)
    datasets.check_process(process_index, process_count)
    batch = _local_batch_size(global_batch_size, process_count)
    source = datasets.load_source(data_cfg, split, seed=_split_seed(data_cfg))
    sizes = [len(source.shard_indices(q, process_count)) for q in range(process_count)]
    num_batches = max(math.ceil(n / batch) for n in sizes)
    mine = sizes[process_index]
    ds = source.records(process_index, process_count).map(
        lambda r: {
            "image": augment.eval_view(source.decode(r), aug_cfg),
            "label": r["label"],
            "mask": tf.constant(True),
        },
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    if _resolve_cache(data_cfg, source, mine):
        ds = ds.cache()
    size = aug_cfg.image_size
    padding = {
        "image": tf.zeros([size, size, 3], tf.float32),
        "label": tf.constant(0, tf.int32),
        "mask": tf.constant(False),
    }
    ds = ds.concatenate(tf.data.Dataset.from_tensors(padding).repeat(num_batches * batch - mine))
    ds = ds.batch(batch, drop_remainder=True)
    ds = ds.apply(tf.data.experimental.assert_cardinality(num_batches))
    return _with_options(ds.prefetch(tf.data.AUTOTUNE))


# ----------------------------------------------------------------------------
# Shared machinery.


def _build_train_dataset(
    data_cfg,
    aug_cfg,
    make_views,
    *,
    purpose,
    global_batch_size,
    seed,
    process_index,
    process_count,
    start_step,
    subset_indices,
):
    augment.validate_augment_config(aug_cfg)
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or not 0 <= seed < 2**63:
        raise ValueError(f"seed={seed!r}: must be an int in [0, 2**63)")
    if isinstance(start_step, bool) or not isinstance(start_step, int | np.integer):
        raise ValueError(f"start_step={start_step!r}: must be an int >= 0")
    if start_step < 0:
        raise ValueError(f"start_step={start_step!r}: must be an int >= 0")
    datasets.check_process(process_index, process_count)
    batch = _local_batch_size(global_batch_size, process_count)
    train_split = data_cfg.get("train_split") or "train"
    source = datasets.load_source(data_cfg, train_split, seed=_split_seed(data_cfg))
    subset = _check_subset(subset_indices, source.num_examples)
    hosts = [_host_indices(source, q, process_count, subset) for q in range(process_count)]
    per_host = min(len(h) for h in hosts)
    steps = per_host // batch
    if steps == 0:
        raise ValueError(
            f"global_batch_size={global_batch_size} needs {batch} examples per process, but "
            f"process {int(np.argmin([len(h) for h in hosts]))} of {process_count} holds only "
            f"{per_host} of the {source.num_examples} examples of {source.name!r} "
            f"({source.split}); lower the batch size"
        )
    per_epoch = steps * batch
    start_epoch, offset = divmod(int(start_step), steps)
    mine = hosts[process_index]
    cached = _resolve_cache(data_cfg, source, len(mine))
    if cached or source.indexable:
        fetcher = _cached_fetcher if cached else _table_fetcher
        fetch = fetcher(source, mine, process_index, process_count, subset)

        def epoch_positions(epoch):
            perm_seed = _derive_seed(seed, _PERMUTATION, process_index, epoch)
            order = tf.random.experimental.stateless_shuffle(
                tf.range(len(mine), dtype=tf.int64), perm_seed, alg=_SEED_ALG
            )
            return tf.data.Dataset.from_tensor_slices(
                {
                    "epoch": tf.fill([per_epoch], epoch),
                    "position": tf.range(per_epoch, dtype=tf.int64),
                    "local": order[:per_epoch],
                }
            )

        stream = tf.data.Dataset.counter(start_epoch).flat_map(epoch_positions)
    else:
        records = _filter_subset(source.records(process_index, process_count), subset)
        buffer = min(len(mine), int(data_cfg.get("shuffle_buffer") or DEFAULT_SHUFFLE_BUFFER))

        def epoch_records(epoch):
            shuffle_seed = tf.random.stateless_uniform(
                [], _derive_seed(seed, _SHUFFLE, process_index, epoch), 0, 2**62, tf.int64
            )
            shuffled = records.shuffle(buffer, seed=shuffle_seed).take(per_epoch).enumerate()
            return shuffled.map(lambda i, r: {**r, "epoch": epoch, "position": i})

        stream = tf.data.Dataset.counter(start_epoch).flat_map(epoch_records)

        def fetch(r):
            return {"image": source.decode(r), "label": r["label"]}

    # Skipping happens on indices / undecoded records, so a resume costs no decoding.
    stream = stream.skip(offset * batch)

    def make_example(element):
        example = fetch(element if not (cached or source.indexable) else element["local"])
        image = tf.image.convert_image_dtype(example["image"], tf.float32)
        view_seed = _derive_seed(
            seed, purpose, process_index, element["epoch"], element["position"]
        )
        return {**make_views(image, view_seed), "label": example["label"]}

    ds = stream.map(make_example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    info = PipelineInfo(
        steps_per_epoch=steps,
        num_examples=source.num_examples if subset is None else len(subset),
        num_classes=source.num_classes,
        class_names=source.class_names,
        local_batch_size=batch,
        global_batch_size=global_batch_size,
        cached=cached,
    )
    return _with_options(ds), info


def _derive_seed(seed: int, purpose: int, *data) -> tf.Tensor:
    """An int64 [2] stateless seed that is a pure function of its arguments."""
    key = tf.constant([seed, purpose], tf.int64)
    for value in data:
        key = tf.random.experimental.stateless_fold_in(key, tf.cast(value, tf.int64), alg=_SEED_ALG)
    return key


def _local_batch_size(global_batch_size: int, process_count: int) -> int:
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


def _split_seed(data_cfg: mlc.ConfigDict) -> int:
    return int(data_cfg.get("split_seed") or 0)


def _resolve_cache(data_cfg: mlc.ConfigDict, source: datasets.DataSource, num_local: int) -> bool:
    cache = data_cfg.get("cache")
    if cache is None:
        if source.decoded_bytes is None or not source.num_examples:
            return False
        return source.decoded_bytes * num_local / source.num_examples <= CACHE_AUTO_MAX_BYTES
    if not isinstance(cache, bool):
        raise ValueError(f"data.cache={cache!r}: must be True, False or None (automatic)")
    return cache


def _check_subset(subset_indices, num_examples: int) -> np.ndarray | None:
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


def _host_indices(source, process_index, process_count, subset) -> np.ndarray:
    if subset is None:
        return source.shard_indices(process_index, process_count)
    if source.indexable:
        return subset[process_index::process_count]
    return np.intersect1d(source.shard_indices(process_index, process_count), subset)


def _filter_subset(records: tf.data.Dataset, subset: np.ndarray | None) -> tf.data.Dataset:
    if subset is None:
        return records
    member = tf.constant(np.isin(np.arange(subset.max() + 1), subset))
    return records.filter(
        lambda r: tf.logical_and(r["index"] <= subset.max(), tf.gather(member, r["index"]))
    )


def _table_fetcher(source, indices, process_index, process_count, subset):
    del process_index, process_count, subset
    columns = {k: tf.constant(v) for k, v in source.table_rows(indices).items()}

    def fetch(local):
        record = {k: tf.gather(v, local) for k, v in columns.items()}
        return {"image": source.decode(record), "label": record["label"]}

    return fetch


def _cached_fetcher(source, indices, process_index, process_count, subset):
    """Decodes the examples at `indices` once into host memory; returns a lookup."""
    if source.indexable:
        records = source.records_at(indices)
    else:  # tfds: this host's range, reduced to the subset when there is one.
        records = _filter_subset(source.records(process_index, process_count), subset)

    def flatten(record):
        image = source.decode(record)
        return {
            "pixels": tf.reshape(image, [-1]),
            "shape": tf.shape(image, out_type=tf.int64),
            "label": record["label"],
        }

    # Ragged batches move thousands of images per Python step (30x fewer steps
    # than element-wise iteration) and arrive as one flat buffer already.
    decoded = records.map(flatten, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    pixels, shapes, labels = [], [], []
    for chunk in decoded.ragged_batch(1024):
        chunk_pixels = chunk["pixels"]  # Dense when every image has the same static shape.
        if isinstance(chunk_pixels, tf.RaggedTensor):
            chunk_pixels = chunk_pixels.flat_values
        pixels.append(tf.reshape(chunk_pixels, [-1]).numpy())
        shapes.append(chunk["shape"].numpy())
        labels.append(chunk["label"].numpy())
    flat = np.concatenate(pixels)
    shapes = np.concatenate(shapes).reshape(-1, 3)
    labels = tf.constant(np.concatenate(labels).astype(np.int32))
    if len(shapes) != len(indices):
        raise ValueError(f"decoded {len(shapes)} examples, expected {len(indices)}")
    if (shapes == shapes[0]).all():
        stacked = tf.constant(flat.reshape(-1, *shapes[0]))

        def fetch(local):
            return {"image": tf.gather(stacked, local), "label": tf.gather(labels, local)}

        return fetch
    # Mixed sizes: the flat buffer plus offsets, so the cache holds no padding.
    offsets = tf.constant(np.concatenate([[0], np.cumsum(shapes.prod(axis=1))]))
    flat, shapes = tf.constant(flat), tf.constant(shapes)

    def fetch_varying(local):
        image = flat[offsets[local] : offsets[local + 1]]
        return {"image": tf.reshape(image, shapes[local]), "label": tf.gather(labels, local)}

    return fetch_varying


def _with_options(ds: tf.data.Dataset) -> tf.data.Dataset:
    options = tf.data.Options()
    options.deterministic = True
    # One thread per element op: parallelism comes from tf.data's parallel map.
    options.threading.max_intra_op_parallelism = 1
    return ds.with_options(options)
