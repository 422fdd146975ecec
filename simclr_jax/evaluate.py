"""Representation evaluation: feature extraction and weighted kNN classification.

kNN follows the protocol of solo-learn and lightly (from InstDisc, Wu et al.
2018): cosine similarity between l2-normalised features, the k most similar
training examples vote for their class with weight exp(similarity / T).
"""

from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from simclr_jax import sharding


def extract_features(
    embed_fn: Callable[[jax.Array], dict[str, jax.Array]],
    batches: Iterable[dict[str, np.ndarray]],
    mesh: jax.sharding.Mesh,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Runs `embed_fn` over every batch and keeps the unpadded rows.

    Args:
      embed_fn: function from a global image batch [B, H, W, 3] to a dict of
        per-example outputs (e.g. {'h': [B, C], 'probe_logits': [B, K]}).
      batches: this host's batches {'image', 'label', 'mask'} (padded, masked).
      mesh: the device mesh the global batch is sharded over.

    Returns:
      (outputs, labels): every output for the whole split as float32 NumPy
      arrays and the int32 labels, gathered from every process (all processes
      get the same arrays) with the padding removed.
    """
    outputs, labels, masks = [], [], []
    for batch in batches:
        images = sharding.make_global_batch({"image": batch["image"]}, mesh)["image"]
        out = embed_fn(images)
        if jax.process_count() > 1:
            # Labels and masks travel as global arrays like the images, so their
            # rows land where the outputs' rows do whatever the mesh's process
            # layout (gathering the host-local arrays in process order would not
            # match on meshes that interleave hosts).
            local = {"label": batch["label"], "mask": np.asarray(batch["mask"], np.int32)}
            global_ = sharding.make_global_batch(local, mesh)
            out, global_ = multihost_utils.process_allgather((out, global_), tiled=True)
            label, mask = global_["label"], global_["mask"]
        else:
            label, mask = batch["label"], batch["mask"]
        outputs.append(jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), out))
        labels.append(np.asarray(label))
        masks.append(np.asarray(mask, bool))
    if not outputs:
        raise ValueError("the evaluation split produced no batches")
    mask = np.concatenate(masks)
    merged = {k: np.concatenate([o[k] for o in outputs])[mask] for k in outputs[0]}
    return merged, np.concatenate(labels)[mask].astype(np.int32)


@jax.jit
def _knn_chunk_scores(train_feats, train_onehot, test_feats, temperature, k_arr):
    k = k_arr.shape[0]
    sims = test_feats @ train_feats.T  # [m, N]
    top_sims, top_idx = jax.lax.top_k(sims, k)
    weights = jnp.exp(top_sims / temperature)  # [m, k]
    votes = train_onehot[top_idx]  # [m, k, classes]
    return jnp.einsum("mk,mkc->mc", weights, votes)


def _l2_normalize(x: np.ndarray) -> jax.Array:
    x = jnp.asarray(x, jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def knn_scores(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    *,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    chunk_size: int = 512,
) -> np.ndarray:
    """Class scores of weighted kNN for every test example.

    Args:
      train_features: [N, C] features of the labelled (memory) set.
      train_labels: [N] int labels in [0, num_classes).
      test_features: [M, C] features to classify.
      num_classes: number of classes.
      k: neighbours (clipped to N).
      temperature: weight = exp(cosine / temperature).
      chunk_size: test rows per device call (bounds memory to chunk x N).

    Returns:
      [M, num_classes] float32 scores; argmax is the prediction.
    """
    if k <= 0:
        raise ValueError(f"k={k} must be a positive number of neighbours")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    if len(train_features) != len(train_labels):
        raise ValueError(f"{len(train_features)} train features but {len(train_labels)} labels")
    k = min(k, len(train_features))
    train = _l2_normalize(train_features)
    onehot = jax.nn.one_hot(jnp.asarray(train_labels), num_classes, dtype=jnp.float32)
    test = _l2_normalize(test_features)
    k_arr = jnp.zeros((k,))
    scores = []
    for start in range(0, test.shape[0], chunk_size):
        chunk = test[start : start + chunk_size]
        scores.append(
            np.asarray(_knn_chunk_scores(train, onehot, chunk, jnp.float32(temperature), k_arr))
        )
    return np.concatenate(scores) if scores else np.zeros((0, num_classes), np.float32)


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction of rows whose label is among the k highest scores."""
    if len(labels) == 0:
        return float("nan")
    k = min(k, scores.shape[1])
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return float(np.mean(np.any(top == labels[:, None], axis=1)))
