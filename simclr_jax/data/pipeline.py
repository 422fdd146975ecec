"""tf.data pipelines: SimCLR pretraining views, fine-tuning views and evaluation.

Every host builds its own pipeline and yields local batches of b = B / P
examples (B the global batch, P the process count); the trainer assembles them
into global arrays with jax.make_array_from_process_local_data.

Training data order (order.py has the details): for indexable sources
(embedded sample, image folders) and for every cached source the order is
global, the same for any process count: each epoch is one seeded permutation of
the split and host p supplies its rows of every global batch, so the hosts'
local batches, laid out by row, are bit-identical to the batch one process
builds. Record streams (tfds, not cached) keep a per-host, buffer-shuffled
order. Augmentation seeds follow the global row position either way.

What a global order costs: any host may need any example. Indexable sources
read each image by its index when it is drawn, which costs nothing extra. A
cache must hold the whole split (or subset) on every host, P times the memory a
per-host shard would take; so the automatic choice (data.cache None) caches
only when the whole decoded split fits CACHE_AUTO_MAX_BYTES, and
data.cache=True caches it regardless.

Determinism and resume. Everything random is a pure function of the config
seed, never of the TF global seed or of time, so `start_step=k` rebuilds exactly
the stream an uninterrupted run would be at after k steps: whole epochs are
skipped by arithmetic, then the remaining k % steps_per_epoch batches are
skipped as indices (or undecoded records) before any image is decoded.

Evaluation reads the split once in its fixed order, padded with masked
examples. For indexable sources global batch s holds positions [s*B, (s+1)*B)
and host p its block of it, the layout a single process has; tfds splits are
read as contiguous per-host ranges. Either way every example is evaluated
exactly once over all hosts and every host yields the same number of batches.
"""

import dataclasses
import logging
import math

import ml_collections as mlc
import numpy as np
import tensorflow as tf

from simclr_jax.config_checks import ConfigError
from simclr_jax.data import order, sources, views
from simclr_jax.data.sources import base

# Decoded splits up to this size are cached in host memory when data.cache is
# unset (None); a global order needs the whole split on every host. CIFAR-10 is
# 150 MB, STL-10 'unlabelled' 2.8 GB.
CACHE_AUTO_MAX_BYTES = 4 * 2**30
DEFAULT_SHUFFLE_BUFFER = 50_000

_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PipelineInfo:
    """What the trainer needs to know about a training pipeline.

    Attributes:
      steps_per_epoch: batches per epoch, the same on every host: N // B with a
        global order, else min examples per host // local_batch_size.
      num_examples: examples in the split (or in subset_indices).
      num_classes: number of classes.
      class_names: label i is class_names[i].
      local_batch_size: this host's batch, global_batch_size // process_count.
      global_batch_size: the batch over all hosts.
      cached: whether decoded images are held in host memory.
      global_order: whether the global batches are independent of the process
        count (indexable or cached sources; False for tfds record streams).
    """

    steps_per_epoch: int
    num_examples: int
    num_classes: int
    class_names: tuple[str, ...]
    local_batch_size: int
    global_batch_size: int
    cached: bool
    global_order: bool


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
    batch_rows=None,
) -> tuple[tf.data.Dataset, PipelineInfo]:
    """Infinite SimCLR pretraining batches for this host.

    Args:
      data_cfg: data section of the config (see sources.load_source), plus
        optional cache (None: automatic), shuffle_buffer and split_seed (seed
        of a folder's val_fraction hold-out, default 0).
      aug_cfg: augmentation config (see views.default_augment_config).
      global_batch_size: batch over all hosts; divisible by process_count.
      seed: seed of the data order and of the augmentations.
      process_index: this host, in [0, process_count).
      process_count: number of hosts.
      start_step: global steps already taken; the stream starts at that step.
      batch_rows: the rows of every global batch this host supplies, in the
        order of its local batch (distributed.process_batch_rows gives them for
        a mesh); None: the block [p*b, (p+1)*b) for p = process_index.

    Returns:
      (dataset, info): the dataset yields {'view1', 'view2': float32 [b, S, S, 3]
      in [0, 1], view k made with view k's recipe (views.view_recipe), 'label':
      int32 [b], 'index': int32 [b], each example's position in the training split, fixed
      before any shuffling (the same for every host count, resume and cache setting;
      InstDisc's memory bank row)} with b = info.local_batch_size, S = aug_cfg.image_size.
    """

    def two_views(image, view_seed):
        # Different seeds, and each view its own recipe (augment.view1 / view2).
        s1, s2 = tf.unstack(
            tf.random.experimental.stateless_split(view_seed, 2, alg=order.SEED_ALG)
        )
        return {
            "view1": views.pretrain_view(image, s1, aug_cfg, view=1),
            "view2": views.pretrain_view(image, s2, aug_cfg, view=2),
        }

    return _build_train_dataset(
        data_cfg,
        aug_cfg,
        two_views,
        purpose=order.PRETRAIN_VIEWS,
        global_batch_size=global_batch_size,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
        start_step=start_step,
        subset_indices=None,
        batch_rows=batch_rows,
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
    batch_rows=None,
) -> tuple[tf.data.Dataset, PipelineInfo]:
    """Infinite labelled batches with the fine-tuning view (crop + flip).

    Args:
      data_cfg, aug_cfg, global_batch_size, seed, process_index, process_count,
        start_step, batch_rows: as in build_pretrain_dataset.
      subset_indices: optional indices into the train split's fixed order (e.g.
        a 1% / 10% labelled subset); only these examples are used. With a
        global order each epoch permutes the whole subset; for tfds streams
        host p uses the subset members inside its range.

    Returns:
      (dataset, info): the dataset yields {'image': float32 [b, S, S, 3],
      'label': int32 [b], 'index': int32 [b] (the example's position in the split)}.
    """

    def view(image, view_seed):
        return {"image": views.finetune_view(image, view_seed, aug_cfg)}

    return _build_train_dataset(
        data_cfg,
        aug_cfg,
        view,
        purpose=order.FINETUNE_VIEWS,
        global_batch_size=global_batch_size,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
        start_step=start_step,
        subset_indices=subset_indices,
        batch_rows=batch_rows,
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
    """One pass over this host's part of `split` with the eval view, padded.

    Every example of the split appears exactly once over all hosts, in the
    split's fixed order. Indexable sources: host p's rows of global batch s are
    positions [s*B + p*b, s*B + (p+1)*b), so laid out by process the global
    batches are those of one process. tfds: host p reads its contiguous range
    (base.DataSource.shard_indices). Positions past the end are padding
    (zero image, label 0, mask False), and every host yields the same number of
    batches so collectives cannot hang.

    Args:
      data_cfg: data section of the config.
      aug_cfg: augmentation config (image_size, eval_crop_fraction are used).
      split: split to read.
      global_batch_size: batch over all hosts; divisible by process_count.
      process_index: this host, in [0, process_count).
      process_count: number of hosts.

    Returns:
      A finite dataset of {'image': float32 [b, S, S, 3], 'label': int32 [b],
      'mask': bool [b], 'index': int64 [b] (the example's position in the split's
      fixed order, DataSource 'index'; -1 for padding)}; its cardinality is the
      number of batches.
    """
    views.validate_augment_config(aug_cfg)
    base.check_process(process_index, process_count)
    batch = order.local_batch_size(global_batch_size, process_count)
    source = sources.load_source(data_cfg, split, seed=order.split_seed(data_cfg))
    if source.indexable:
        num_batches = math.ceil(source.num_examples / global_batch_size)
        rows = order.default_rows(process_index, batch)
        positions = order.host_positions(num_batches, global_batch_size, rows)
        # Positions grow along the pass, so the real ones are a prefix.
        indices = positions[positions < source.num_examples]
        # records_at needs at least one index; a host left with padding only takes none.
        records = source.records_at(indices if len(indices) else np.zeros(1, np.int64))
        records = records.take(len(indices))
        mine = len(indices)
    else:
        sizes = [len(source.shard_indices(q, process_count)) for q in range(process_count)]
        num_batches = max(math.ceil(n / batch) for n in sizes)
        mine = sizes[process_index]
        records = source.records(process_index, process_count)
    ds = records.map(
        lambda r: {
            "image": views.eval_view(source.decode(r), aug_cfg),
            "label": r["label"],
            "mask": tf.constant(True),
            "index": tf.cast(r["index"], tf.int64),
        },
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    # Each host caches only what it reads, so the per-host share is what counts.
    if _resolve_cache(data_cfg, source, mine):
        ds = ds.cache()
    size = aug_cfg.image_size
    padding = {
        "image": tf.zeros([size, size, 3], tf.float32),
        "label": tf.constant(0, tf.int32),
        "mask": tf.constant(False),
        "index": tf.constant(-1, tf.int64),
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
    batch_rows,
):
    views.validate_augment_config(aug_cfg)
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or not 0 <= seed < 2**63:
        raise ValueError(f"seed={seed!r}: must be an int in [0, 2**63)")
    if isinstance(start_step, bool) or not isinstance(start_step, int | np.integer):
        raise ValueError(f"start_step={start_step!r}: must be an int >= 0")
    if start_step < 0:
        raise ValueError(f"start_step={start_step!r}: must be an int >= 0")
    base.check_process(process_index, process_count)
    batch = order.local_batch_size(global_batch_size, process_count)
    rows = order.check_batch_rows(batch_rows, global_batch_size, process_index, batch)
    train_split = data_cfg.get("train_split") or "train"
    source = sources.load_source(data_cfg, train_split, seed=order.split_seed(data_cfg))
    subset = order.check_subset(subset_indices, source.num_examples)
    # The examples of an epoch, as split indices.
    pool = np.arange(source.num_examples, dtype=np.int64) if subset is None else subset
    cached = _resolve_cache(data_cfg, source, len(pool))
    global_order = cached or source.indexable
    if global_order:
        steps, epoch_stream = order.global_stream(
            source,
            pool,
            subset,
            seed=seed,
            global_batch_size=global_batch_size,
            rows=rows,
        )
        read = _cached_fetcher(source, pool, subset) if cached else _table_fetcher(source, pool)
        split_index = tf.constant(pool.astype(np.int32))

        def fetch(element):
            # element['example'] is a position in the pool; the bank index is the split's.
            return {**read(element["example"]), "index": tf.gather(split_index, element["example"])}

    else:
        steps, epoch_stream = order.host_stream(
            source,
            subset,
            seed=seed,
            global_batch_size=global_batch_size,
            rows=rows,
            process_index=process_index,
            process_count=process_count,
            shuffle_buffer=int(data_cfg.get("shuffle_buffer") or DEFAULT_SHUFFLE_BUFFER),
        )

        def fetch(record):
            return {
                "image": source.decode(record),
                "label": record["label"],
                "index": tf.cast(record["index"], tf.int32),
            }

    # Whole epochs are skipped by arithmetic, the rest on indices / undecoded
    # records, so a resume costs no decoding.
    start_epoch, offset = divmod(int(start_step), steps)
    stream = tf.data.Dataset.counter(start_epoch).flat_map(epoch_stream).skip(offset * batch)

    def make_example(element):
        example = fetch(element)
        image = tf.image.convert_image_dtype(example["image"], tf.float32)
        view_seed = order.derive_seed(seed, purpose, element["epoch"], element["position"])
        return {
            **make_views(image, view_seed),
            "label": example["label"],
            "index": example["index"],
        }

    ds = stream.map(make_example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    info = PipelineInfo(
        steps_per_epoch=steps,
        num_examples=len(pool),
        num_classes=source.num_classes,
        class_names=source.class_names,
        local_batch_size=batch,
        global_batch_size=global_batch_size,
        cached=cached,
        global_order=global_order,
    )
    return _with_options(ds), info


def _resolve_cache(data_cfg: mlc.ConfigDict, source: base.DataSource, num_held: int) -> bool:
    """Whether to cache `num_held` decoded examples of `source` in this host's memory."""
    cache = data_cfg.get("cache")
    if cache is None:
        if source.decoded_bytes is None or not source.num_examples:
            return False
        return source.decoded_bytes * num_held / source.num_examples <= CACHE_AUTO_MAX_BYTES
    if not isinstance(cache, bool):
        raise ConfigError(f"data.cache={cache!r}: must be True, False or None (automatic)")
    return cache


def _table_fetcher(source, pool):
    """Reads and decodes pool[k] when drawn (indexable sources)."""
    columns = {k: tf.constant(v) for k, v in source.table_rows(pool).items()}

    def fetch(k):
        record = {name: tf.gather(column, k) for name, column in columns.items()}
        return {"image": source.decode(record), "label": record["label"]}

    return fetch


def _cached_fetcher(source, pool, subset):
    """Decodes the examples of `pool` once into host memory; fetch(k) returns pool[k]."""
    if source.indexable:
        records = source.records_at(pool)
    else:  # tfds: the whole split in file order (= sorted index order), reduced to the subset.
        records = order.filter_subset(source.records(0, 1), subset)

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
    if len(shapes) != len(pool):
        raise ValueError(f"decoded {len(shapes)} examples, expected {len(pool)}")
    if (shapes == shapes[0]).all():
        stacked = tf.constant(flat.reshape(-1, *shapes[0]))

        def fetch(k):
            return {"image": tf.gather(stacked, k), "label": tf.gather(labels, k)}

        return fetch
    # Mixed sizes: the flat buffer plus offsets, so the cache holds no padding.
    offsets = tf.constant(np.concatenate([[0], np.cumsum(shapes.prod(axis=1))]))
    flat, shapes = tf.constant(flat), tf.constant(shapes)

    def fetch_varying(k):
        image = flat[offsets[k] : offsets[k + 1]]
        return {"image": tf.reshape(image, shapes[k]), "label": tf.gather(labels, k)}

    return fetch_varying


def _with_options(ds: tf.data.Dataset) -> tf.data.Dataset:
    options = tf.data.Options()
    options.deterministic = True
    # One thread per element op: parallelism comes from tf.data's parallel map.
    options.threading.max_intra_op_parallelism = 1
    return ds.with_options(options)
