"""kNN evaluation: weighted kNN classification and the kNN protocol.

kNN follows the protocol of solo-learn and lightly (from InstDisc, Wu et al.
2018): cosine similarity between l2-normalised features, the k most similar
training examples vote for their class with weight exp(similarity / T). The
same `knn_scores` serves the trainer (the kNN monitor and the evaluation at
the end of pretraining) and the standalone protocol (config.protocol='knn',
`run`), which evaluates a restored checkpoint.

Memory: the memory bank (train features and labels) is sharded over the mesh's
devices, and each device scans its shard in blocks with a running top-k, so a
device holds N / devices memory rows and O(block x (chunk + C)) temporaries,
never an N-wide similarity row or a one-hot of the memory's labels. At
ImageNet shapes (1.28M x 2048 float32, 512 queries a chunk) XLA plans 1.4 GiB
per device on 8 devices, where the single-device algorithm this replaced
needed 17 GiB (benchmarks/knn_memory.py, docs/performance.md). Only labelled
memory rows (simclr_jax.labels) enter the bank.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from simclr_jax import labels as labels_lib
from simclr_jax import models, sharding
from simclr_jax.config_checks import ConfigError
from simclr_jax.eval import features, reports
from simclr_jax.eval import inputs as inputs_lib
from simclr_jax.eval import pretrained as pretrained_lib
from simclr_jax.losses import l2_normalize

# Memory rows one device compares with a query chunk at a time: bounds the
# similarity block to chunk x block floats (512 x 16384 x 4 B = 32 MiB) and the
# normalised block to block x C (128 MiB at C = 2048); XLA plans 0.19 GiB of
# temporaries per device at ImageNet shapes.
DEFAULT_BLOCK_SIZE = 16384
_PAD_LABEL = -1  # labels of the padding rows; such rows never enter the top-k


def memory_layout(num_rows: int, num_devices: int, block_size: int) -> tuple[int, int]:
    """How a memory of `num_rows` rows is padded and blocked over `num_devices`.

    Each device holds rows_per_device = num_blocks x block rows; the blocks are
    as equal as possible, so padding is under num_blocks rows per device (plus
    the rounding of num_rows to a multiple of num_devices).

    Args:
      num_rows: N >= 1 labelled memory rows.
      num_devices: devices of the mesh.
      block_size: the largest block of rows a device compares at once.

    Returns:
      (rows_per_device, block): rows_per_device is a multiple of block and
      rows_per_device x num_devices >= num_rows.
    """
    per_device = -(-num_rows // num_devices)
    num_blocks = -(-per_device // block_size)
    block = -(-per_device // num_blocks)
    return num_blocks * block, block


def make_knn_step(mesh: jax.sharding.Mesh, *, k: int, num_classes: int, block: int):
    """The jitted kNN of one query chunk against the sharded memory.

    Args:
      mesh: 1-D mesh over sharding.DATA_AXIS.
      k: neighbours, 1 <= k <= the number of real (non-padding) memory rows.
      num_classes: classes of the scores.
      block: memory rows per scan step; must divide the per-device shard.

    Returns:
      step(memory, memory_labels, queries, temperature) -> [m, num_classes]
      float32 scores, replicated. memory: [D x R, C] float32 sharded
      P(DATA_AXIS) (any positive row scale: rows are l2-normalised here);
      memory_labels: [D x R] int32 sharded the same way, _PAD_LABEL (-1) on
      padding rows; queries: [m, C] float32 replicated (normalised here);
      temperature: float32 scalar.
    """
    return _make_knn_step(mesh, k, num_classes, block)


@functools.lru_cache(maxsize=16)
def _make_knn_step(mesh, k, num_classes, block):
    def local_top_k(memory, memory_labels, queries, temperature):
        # Per device: memory [R, C], memory_labels [R], queries [m, C] (replicated).
        queries = l2_normalize(queries)
        m = queries.shape[0]
        blocks = memory.reshape(-1, block, memory.shape[-1])
        block_labels = memory_labels.reshape(-1, block)

        def scan_block(carry, xs):
            best_sims, best_labels = carry  # [m, k] each
            feats, labels = xs  # [block, C], [block]
            sims = queries @ l2_normalize(feats).T  # [m, block]
            sims = jnp.where(labels[None, :] == _PAD_LABEL, -jnp.inf, sims)
            sims = jnp.concatenate([best_sims, sims], axis=1)
            cand = jnp.concatenate([best_labels, jnp.broadcast_to(labels, (m, block))], axis=1)
            best_sims, idx = jax.lax.top_k(sims, k)
            return (best_sims, jnp.take_along_axis(cand, idx, axis=1)), None

        init = (
            jnp.full((m, k), -jnp.inf, jnp.float32),
            jnp.full((m, k), _PAD_LABEL, jnp.int32),
        )
        (best_sims, best_labels), _ = jax.lax.scan(scan_block, init, (blocks, block_labels))
        # Every device's k candidates, then the global k among them.
        all_sims = jax.lax.all_gather(best_sims, sharding.DATA_AXIS, axis=1, tiled=True)
        all_labels = jax.lax.all_gather(best_labels, sharding.DATA_AXIS, axis=1, tiled=True)
        top_sims, idx = jax.lax.top_k(all_sims, k)  # [m, k]
        top_labels = jnp.take_along_axis(all_labels, idx, axis=1)
        # k <= real rows, so no padding row is among the k; the guard only keeps
        # a -1 label from wrapping to the last class.
        weights = jnp.where(top_labels >= 0, jnp.exp(top_sims / temperature), 0.0)
        rows = jnp.arange(m)[:, None]
        scores = jnp.zeros((m, num_classes), jnp.float32)
        return scores.at[rows, jnp.maximum(top_labels, 0)].add(weights)

    # check_vma=False: the scores are the same on every device (computed from
    # all_gathered candidates), which the checker cannot prove through all_gather.
    mapped = jax.shard_map(
        local_top_k,
        mesh=mesh,
        in_specs=(P(sharding.DATA_AXIS), P(sharding.DATA_AXIS), P(), P()),
        out_specs=P(),
        check_vma=False,
    )
    return jax.jit(mapped)


def _place_rows(rows: np.ndarray, padded_len: int, fill, sharding_: NamedSharding) -> jax.Array:
    """rows padded with `fill` to padded_len rows, placed by sharding_ from host data.

    Each process builds only its own devices' slices (every host holds the same
    NumPy `rows`), so no padded copy of the whole memory is made on the host.
    """
    shape = (padded_len,) + rows.shape[1:]

    def slice_for(index):
        start, stop, _ = index[0].indices(padded_len)
        part = rows[start : min(stop, len(rows))]
        pad = stop - start - len(part)
        if pad:
            part = np.concatenate([part, np.full((pad,) + rows.shape[1:], fill, rows.dtype)])
        return part[(slice(None),) + tuple(index[1:])]

    return jax.make_array_from_callback(shape, sharding_, slice_for)


def knn_scores(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    *,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    chunk_size: int = 512,
    mesh: jax.sharding.Mesh | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> np.ndarray:
    """Class scores of weighted kNN for every test example.

    score[i, c] = sum over the k memory rows j most similar to query i with
    label c of exp(cos(test_i, train_j) / temperature) (InstDisc, Wu et al.
    2018; solo-learn's weighted kNN). Both sides are l2-normalised, so a row's
    positive scale does not matter. Memory rows whose label is outside
    [0, num_classes) (e.g. TFDS's -1 for unlabelled) are dropped first: they
    never take a neighbour slot.

    Args:
      train_features: [N, C] float features of the memory set (NumPy; every
        process passes the same array).
      train_labels: [N] int labels; rows outside [0, num_classes) are dropped.
      test_features: [M, C] features to classify (every process the same).
      num_classes: number of classes.
      k: neighbours (clipped to the number of labelled memory rows).
      temperature: weight = exp(cosine / temperature).
      chunk_size: queries per device call (the similarity block is chunk x block).
      mesh: 1-D mesh over sharding.DATA_AXIS the memory is sharded over; None for
        this process's first device.
      block_size: memory rows a device compares with a chunk at once.

    Returns:
      [M, num_classes] float32 scores (the same on every process); argmax is the
      prediction.

    Raises:
      ValueError: k, temperature, chunk_size or block_size not positive; feature
        and label counts differ.
      ConfigError: no memory row has a label (the train split is unlabelled).
    """
    for name, value in (("k", k), ("chunk_size", chunk_size), ("block_size", block_size)):
        if value <= 0:
            raise ValueError(f"{name}={value} must be positive")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    if len(train_features) != len(train_labels):
        raise ValueError(f"{len(train_features)} train features but {len(train_labels)} labels")
    train_labels = np.asarray(train_labels)
    train_features = np.asarray(train_features, np.float32)
    if not labels_lib.is_labelled(train_labels, num_classes).all():
        train_labels, train_features = labels_lib.keep_labelled(
            train_labels, num_classes, train_features
        )
    if len(train_labels) == 0:
        raise ConfigError(
            f"the kNN memory (config.data.train_split) has no example labelled in "
            f"[0, {num_classes}): use a split with labels, such as 'train'"
        )
    test_features = np.asarray(test_features, np.float32)
    if len(test_features) == 0:
        return np.zeros((0, num_classes), np.float32)
    if mesh is None:
        mesh = sharding.create_mesh(jax.local_devices()[:1])
    k = min(k, len(train_labels))
    per_device, block = memory_layout(len(train_labels), mesh.size, block_size)
    padded = per_device * mesh.size
    rows = sharding.batch_sharding(mesh)
    memory = _place_rows(train_features, padded, 0.0, rows)
    memory_labels = _place_rows(train_labels.astype(np.int32), padded, _PAD_LABEL, rows)
    step = make_knn_step(mesh, k=k, num_classes=num_classes, block=block)
    replicated = sharding.replicated_sharding(mesh)
    temp = jax.make_array_from_callback(
        (), replicated, lambda _: np.asarray(temperature, np.float32)
    )
    # Every chunk has chunk rows (the last one padded with zero rows), so the
    # step compiles once.
    chunk = min(chunk_size, len(test_features))
    scores = []
    for start in range(0, len(test_features), chunk):
        queries = _place_rows(test_features[start : start + chunk], chunk, 0.0, replicated)
        scores.append(np.asarray(step(memory, memory_labels, queries, temp)))
    return np.concatenate(scores)[: len(test_features)]


def knn_logits(
    pretrained, config, mesh, num_classes, *, conv: models.ModuleDef = nn.Conv
) -> tuple[np.ndarray, np.ndarray]:
    """kNN class scores of the eval split's labelled rows, with the train split as memory.

    Returns:
      (scores [M, num_classes] float32, labels [M] int32) of the M eval rows
      labelled in [0, num_classes); unlabelled memory rows are left out of the
      memory (knn_scores).
    """
    train_h, train_y = features.extract_encoder_features(
        pretrained, config, config.data.train_split, mesh, conv=conv
    )
    eval_h, eval_y = features.extract_encoder_features(
        pretrained, config, config.data.eval_split, mesh, conv=conv
    )
    eval_y, eval_h = labels_lib.keep_labelled(eval_y, num_classes, eval_h)
    scores = knn_scores(
        train_h,
        train_y,
        eval_h,
        num_classes=num_classes,
        k=config.eval.knn_k,
        temperature=config.eval.knn_temperature,
        mesh=mesh,
    )
    return scores, eval_y


def run(config: mlc.ConfigDict, workdir: str, *, conv: models.ModuleDef = nn.Conv) -> dict:
    """kNN evaluation of config.init_from; writes workdir/results.json.

    Args:
      config: configs/knn.py.
      workdir: output directory.
      conv: the encoder's convolution class (flax.linen.Conv or a drop-in subclass with its
        parameters, e.g. simclr_jax.cpu.conv_class's choice).

    Returns:
      The results dict (provenance, 'summary', 'top1', 'top5', 'k',
      'temperature', and 'random_init' when compared).
    """
    inputs = inputs_lib.open_inputs(config)
    pretrained, mesh, class_names = inputs.pretrained, inputs.mesh, inputs.class_names
    num_classes = inputs.num_classes
    scores, labels = knn_logits(pretrained, config, mesh, num_classes, conv=conv)
    results = pretrained_lib.provenance("knn", config, pretrained)
    results.update(k=int(config.eval.knn_k), temperature=float(config.eval.knn_temperature))
    results["summary"] = reports.summarize(scores, labels, class_names)
    results["top1"], results["top5"] = results["summary"]["top1"], results["summary"]["top5"]
    if config.eval.compare_random_init:
        baseline = pretrained_lib.random_init_like(pretrained, config.seed)
        base_scores, _ = knn_logits(baseline, config, mesh, num_classes, conv=conv)
        results["random_init"] = {
            "top1": reports.topk_accuracy(base_scores, labels, 1),
            "top5": reports.topk_accuracy(base_scores, labels, 5),
        }
    reports.write_results(workdir, results, step=pretrained.step)
    print(f"kNN (k={config.eval.knn_k}): top-1 {results['top1']:.4f}; results in {workdir}")
    return results
