"""The losses against stored vectors: MoCo v2's queue, NNCLR's support set, InstDisc's memory bank.

Pure functions with the conventions of method_losses.py (which holds the losses of the batch
alone: BYOL, MoCo v3, Barlow Twins, VICReg): each is written for one device's rows; called
with `axis_name` inside jax.shard_map / jax.pmap every set of candidates drawn from the batch
covers the GLOBAL batch; the returned VALUE is the global loss and its GRADIENT that of this
device's share (the shares' mean over devices is the loss). The stored vectors (queue, support
set, bank) are replicated on every device and carry no gradient.

Formulas, sources, and where the papers and their official code differ:
docs/method_losses.md.
"""

from collections.abc import Hashable

import jax
import jax.numpy as jnp

from simclr_jax.losses import l2_normalize

# The input checks and the cross-device plumbing are method_losses' (one owner).
from simclr_jax.method_losses import (
    Metrics,
    _device_index,
    _gather,
    _global_value,
    _validate_2d,
    _validate_scalar,
)


def _check_stored(name: str, stored: jax.Array, dim: int) -> None:
    """Raises ValueError unless `stored` is [K, dim] with K >= 1."""
    if jnp.ndim(stored) != 2 or jnp.shape(stored)[1] != dim or jnp.shape(stored)[0] < 1:
        raise ValueError(
            f"{name} must be [K, {dim}] (the inputs' width, K >= 1); got {jnp.shape(stored)}."
        )


def moco_v2_loss(
    q: jax.Array,
    k: jax.Array,
    queue: jax.Array,
    temperature: float,
    axis_name: Hashable | None = None,
) -> tuple[jax.Array, Metrics]:
    """MoCo v2's InfoNCE against a queue of negatives (He et al. 2020 Algorithm 1; Chen, Fan,
    Girshick, He 2020, arXiv 2003.04297), one direction as in the papers.

    For query i: logits [q_i . k_i, q_i . queue_1, ..., q_i . queue_K] / tau, cross entropy
    with the positive (column 0) as the label; q and k l2-normalised, the queue's rows used
    as stored (unit keys). Loss = the mean over the global batch. Each query needs only its
    own key and the queue, so nothing is gathered for the value: this device's share is the
    mean over its n queries, and the global value is the shares' mean (n is the same on every
    device).

    Args:
      q: [n, d] this device's queries (the query encoder's projections of view 1; any float
        dtype, computed in float32).
      k: [n, d] the matching keys (the key encoder's projections of view 2); stop_gradient-ed.
      queue: [K, d] the negatives (the keys of earlier steps), the same on every device;
        stop_gradient-ed, read in float32.
      temperature: tau > 0 (0.2 in MoCo v2).
      axis_name: the mapped device axis, or None; only the reported value and the metrics are
        averaged over it.

    Returns:
      (loss, metrics): loss float32 scalar, the module's value/gradient convention; metrics
      (float32, global, no gradient): 'loss', 'contrastive_acc' (fraction of the queries whose
      positive has the largest of the K + 1 logits).

    Raises:
      ValueError: q, k not 2-D or of different shapes; a queue not [K, d]; temperature not
        finite > 0.
    """
    _validate_2d(q=q, k=k)
    _validate_scalar("temperature", temperature, allow_zero=False)
    if jnp.ndim(queue) != 2 or jnp.shape(queue)[1] != jnp.shape(q)[1]:
        raise ValueError(
            f"queue must be [K, {jnp.shape(q)[1]}] (the keys' width); got {jnp.shape(queue)}."
        )
    qn = l2_normalize(q)
    kn = l2_normalize(jax.lax.stop_gradient(k))
    negatives = jnp.asarray(jax.lax.stop_gradient(queue), jnp.float32)
    positive = jnp.sum(qn * kn, axis=1, keepdims=True)  # [n, 1]
    logits = jnp.concatenate([positive, qn @ negatives.T], axis=1) / temperature  # [n, 1 + K]
    ce = jax.nn.logsumexp(logits, axis=1) - logits[:, 0]
    correct = jnp.argmax(jax.lax.stop_gradient(logits), axis=1) == 0
    metrics = {"contrastive_acc": jnp.mean(correct.astype(jnp.float32))}
    return _global_value(jnp.mean(ce), metrics, axis_name)


def nearest_neighbour(z: jax.Array, support: jax.Array) -> jax.Array:
    """Each row's nearest neighbour (cosine similarity) in the support set, without gradient.

    Args:
      z: [n, d] projections (any float dtype; normalised in float32).
      support: [K, d] the support set (unit rows, as stored), read in float32.

    Returns:
      float32 [n, d]: support[argmax_j cos(z_i, support_j)] (the first maximum on ties),
      stop_gradient-ed: NNCLR's anchor NN(z, Q) (Dwibedi et al. 2021, eq. 2).
    """
    stored = jnp.asarray(jax.lax.stop_gradient(support), jnp.float32)
    similarity = l2_normalize(jax.lax.stop_gradient(z)) @ stored.T  # [n, K]
    return stored[jnp.argmax(similarity, axis=1)]


def nnclr_loss(
    z1: jax.Array,
    z2: jax.Array,
    p1: jax.Array,
    p2: jax.Array,
    support: jax.Array,
    temperature: float,
    axis_name: Hashable | None = None,
) -> tuple[jax.Array, Metrics]:
    """NNCLR's symmetrised InfoNCE with nearest-neighbour anchors (Dwibedi et al. 2021,
    arXiv 2104.14548, eq. 2 with the prediction head of its section 4.3).

    For view 1: a_i = NN(z1_i, Q), the support-set row most similar to z1_i (no gradient);
    logits_i = a_i . normalise(p2)^T / tau over the predictions of view 2 of the WHOLE global
    batch, the positive being image i's own (column n * device + i); the same with the views
    swapped; L = (mean CE_12 + mean CE_21) / 2 over the global batch. solo-learn's nnclr.py
    computes the same (nnclr_loss_func(nn1, p2) / 2 + nnclr_loss_func(nn2, p1) / 2, the
    predictions gathered with gradient).

    The gradient reaches the model through the predictions only: the anchors come from the
    stored support set. The predictions are all_gathered WITH gradient (another device's
    anchors score this device's predictions), which the module's convention handles: this
    device's share is the mean over its n anchors.

    Args:
      z1, z2: [n, d] this device's projections of views 1 and 2 (they pick the anchors).
      p1, p2: [n, d] this device's predictions of views 1 and 2.
      support: [K, d] the support set (unit rows, replicated, no gradient).
      temperature: tau > 0 (0.1 in the paper).
      axis_name: the mapped device axis, or None.

    Returns:
      (loss, metrics): loss float32 scalar; metrics (float32, global, no gradient): 'loss',
      'contrastive_acc' (fraction of the 2N anchors whose own image's prediction has the
      largest logit).

    Raises:
      ValueError: inputs not 2-D or of different shapes; a support set not [K, d];
        temperature not finite > 0.
    """
    _validate_2d(z1=z1, z2=z2, p1=p1, p2=p2)
    _validate_scalar("temperature", temperature, allow_zero=False)
    _check_stored("support", support, jnp.shape(z1)[1])
    n = z1.shape[0]
    labels = _device_index(axis_name) * n + jnp.arange(n)

    def direction(z, p_other):
        anchors = nearest_neighbour(z, support)
        candidates = l2_normalize(_gather(p_other, axis_name))  # [N, d], with gradient
        logits = anchors @ candidates.T / temperature  # [n, N]
        positive = jnp.take_along_axis(logits, labels[:, None], axis=1)[:, 0]
        ce = jax.nn.logsumexp(logits, axis=1) - positive
        correct = jnp.argmax(jax.lax.stop_gradient(logits), axis=1) == labels
        return jnp.mean(ce), jnp.mean(correct.astype(jnp.float32))

    ce_12, acc_12 = direction(z1, p2)
    ce_21, acc_21 = direction(z2, p1)
    metrics = {"contrastive_acc": (acc_12 + acc_21) / 2}
    return _global_value((ce_12 + ce_21) / 2, metrics, axis_name)


def instdisc_loss(
    v: jax.Array,
    index: jax.Array,
    bank: jax.Array,
    temperature: float,
    axis_name: Hashable | None = None,
) -> tuple[jax.Array, Metrics]:
    """InstDisc's non-parametric softmax over the memory bank (Wu et al. 2018,
    arXiv 1805.01978, eq. 2), computed exactly over the whole bank.

    P(i | v) = exp(bank_i . v / tau) / sum_j exp(bank_j . v / tau), v = normalise(f(x)), the
    bank rows as stored (unit vectors of earlier steps, no gradient); L = the mean over the
    global batch's rows of -log P(index | v). The official code (lemniscate.pytorch) computes
    the same with LinearAverage (its `--nce-k 0`, the CIFAR command of its README); by default
    and on ImageNet it approximates the denominator by NCE with 4,096 sampled noise rows (not
    done here: the exact softmax costs n x N logits).

    Args:
      v: [n, d] this device's embeddings (rows of any view; any float dtype).
      index: [n] int, each row's example (its row in the bank).
      bank: [N, d] the memory bank (replicated, no gradient), read in float32.
      temperature: tau > 0 (0.07 in the paper on ImageNet, 0.1 in its CIFAR code).
      axis_name: the mapped device axis, or None (only the value and metrics are averaged).

    Returns:
      (loss, metrics): loss float32 scalar; metrics (float32, global, no gradient): 'loss',
      'contrastive_acc' (fraction of rows whose own bank row has the largest logit).

    Raises:
      ValueError: v not 2-D; index not [n]; a bank not [N, d]; temperature not finite > 0.
    """
    _validate_2d(v=v)
    _validate_scalar("temperature", temperature, allow_zero=False)
    _check_stored("bank", bank, jnp.shape(v)[1])
    if jnp.shape(index) != (jnp.shape(v)[0],):
        raise ValueError(
            f"index must be [{jnp.shape(v)[0]}] (one per row of v); got {jnp.shape(index)}."
        )
    stored = jnp.asarray(jax.lax.stop_gradient(bank), jnp.float32)
    logits = l2_normalize(v) @ stored.T / temperature  # [n, N]
    index = jnp.asarray(index, jnp.int32)
    positive = jnp.take_along_axis(logits, index[:, None], axis=1)[:, 0]
    ce = jax.nn.logsumexp(logits, axis=1) - positive
    correct = jnp.argmax(jax.lax.stop_gradient(logits), axis=1) == index
    metrics = {"contrastive_acc": jnp.mean(correct.astype(jnp.float32))}
    return _global_value(jnp.mean(ce), metrics, axis_name)
