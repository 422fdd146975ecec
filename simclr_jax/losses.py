"""The SimCLR contrastive loss (NT-Xent), single-device and across devices.

`nt_xent` is written once for the per-device view of the batch. Called plainly it
is the loss of the batch it is given; called with `axis_name` inside
`jax.shard_map` (under `jax.jit`) or `jax.pmap` it gathers the projections of
every device so that each anchor is contrasted against the negatives of the
whole global batch, while each device only builds the rows of the logits that
belong to its own examples (memory O(n * N), never O(N^2)).
"""

from collections.abc import Hashable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Added (negated) to the self-similarity logits. Finite, so that 0 * LARGE_NUM
# stays 0 in the softmax gradient and the entropy, and far below any real logit
# (|logit| <= 1 / tau) while still exactly representable in float32.
LARGE_NUM = 1e9

# Guards the l2 normalisation of an all-zero projection (as tf.math.l2_normalize).
_NORM_EPS_SQ = 1e-12


def l2_normalize(x: jax.Array) -> jax.Array:
    """Rows of `x` scaled to unit l2 norm, computed in float32 (tf.math.l2_normalize).

    The cosine similarity of NT-Xent (SimCLR, arXiv 2002.05709, eq. 1) and of the kNN
    evaluation (simclr_jax.eval.knn).

    Args:
      x: [..., d] array (any float dtype or a NumPy array).

    Returns:
      float32 [..., d]: x / max(||x||, 1e-6) along the last axis (all-zero rows stay zero).
    """
    x = jnp.asarray(x, jnp.float32)
    sq = jnp.sum(x * x, axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sq, _NORM_EPS_SQ))


def _validate(z1: Any, z2: Any, temperature: Any, loss_scale: Any) -> None:
    """Raises ValueError for inputs nt_xent cannot give a meaningful loss for."""
    for name, z in (("z1", z1), ("z2", z2)):
        if jnp.ndim(z) != 2:
            raise ValueError(
                f"{name} must be 2-D [batch, dim]; got shape {jnp.shape(z)} "
                f"(ndim {jnp.ndim(z)}). Flatten the projections to [batch, dim]."
            )
    if jnp.shape(z1) != jnp.shape(z2):
        raise ValueError(
            f"z1 and z2 must have the same shape (one row per image in each view); "
            f"got z1 {jnp.shape(z1)} and z2 {jnp.shape(z2)}."
        )
    if jnp.shape(z1)[0] < 1:
        raise ValueError(f"z1/z2 must hold at least one row; got shape {jnp.shape(z1)}.")
    # Traced values (e.g. a temperature swept inside jit) cannot be checked here.
    for name, value in (("temperature", temperature), ("loss_scale", loss_scale)):
        if isinstance(value, jax.core.Tracer):
            continue
        v = np.asarray(value)
        if v.ndim != 0 or not np.isfinite(v) or not v > 0:
            raise ValueError(f"{name} must be a finite scalar > 0; got {value!r}.")


def _softmax_entropy(logits: jax.Array) -> jax.Array:
    """Entropy (nats) of softmax(logits) per row; masked (-LARGE_NUM) entries add 0."""
    log_p = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)


def _one_view(
    anchors: jax.Array,
    other_view: jax.Array,
    same_view: jax.Array,
    labels: jax.Array,
    temperature: Any,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Per-anchor losses and metric sums for the anchors of one view.

    Args:
      anchors: [n, d] this device's normalised projections of one view.
      other_view: [N, d] the other view's normalised projections, global batch.
      same_view: [N, d] this view's normalised projections, global batch.
      labels: [n] column of each anchor's positive (and of itself) in the global batch.
      temperature: softmax temperature tau.

    Returns:
      ([n] losses, dict of [n] per-anchor metric values).
    """
    num_global = other_view.shape[0]
    logits_ab = anchors @ other_view.T / temperature  # [n, N], positive at `labels`.
    logits_aa = anchors @ same_view.T / temperature  # [n, N], self at `labels`.
    self_mask = labels[:, None] == jnp.arange(num_global)[None, :]
    logits_aa = jnp.where(self_mask, -LARGE_NUM, logits_aa)
    # Candidates in the reference's order: the other view first, then this view.
    logits = jnp.concatenate([logits_ab, logits_aa], axis=1)  # [n, 2N]
    positive = jnp.take_along_axis(logits_ab, labels[:, None], axis=1)[:, 0]
    losses = jax.nn.logsumexp(logits, axis=1) - positive

    logits_sg = jax.lax.stop_gradient(logits)
    logits_ab_sg = jax.lax.stop_gradient(logits_ab)
    per_anchor = {
        "contrastive_acc": (jnp.argmax(logits_sg, axis=1) == labels).astype(jnp.float32),
        "entropy": _softmax_entropy(logits_sg),
        "contrastive_acc_ab": (jnp.argmax(logits_ab_sg, axis=1) == labels).astype(jnp.float32),
        "entropy_ab": _softmax_entropy(logits_ab_sg),
    }
    return losses, per_anchor


def nt_xent(
    z1: jax.Array,
    z2: jax.Array,
    *,
    temperature: float,
    axis_name: Hashable | None = None,
    loss_scale: float = 1.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """NT-Xent loss of SimCLR (normalised temperature-scaled cross entropy).

    Each projection is l2-normalised and compared with every other projection of
    the global batch by cosine similarity / tau. For an anchor, the positive is
    the other view of the same image; the 2(N-1) views of the other images are
    the negatives; its own similarity is masked out with -LARGE_NUM. The loss of
    an anchor is the softmax cross entropy of the positive among these 2N-1
    candidates. Normalisation and logits are computed in float32 whatever the
    input dtype, which keeps tau = 0.05 and bfloat16 inputs stable.

    Scale. With loss_scale=1 the value is the paper's: the mean over all 2N
    anchors of the global batch. The reference code returns
    mean(loss_a + loss_b) over the N images, exactly 2x the paper's value; pass
    loss_scale=2.0 to get it. The reference learning rates and weight decays
    were tuned with that 2x loss, and the scale does change a LARS update: LARS
    adds wd * w to the gradient before taking the trust ratio, so the ratio
    normalises the gradient's magnitude only partly. To reproduce the reference
    exactly the trainer uses loss_scale=2.

    Cross-device (axis_name given; call inside jax.shard_map under jax.jit, or
    inside jax.pmap, with the batch split along `axis_name`). Both views'
    projections are all-gathered (tiled) from every device; this device builds
    only its own n rows against the N global columns ([n, N] logits per view
    and kind), its positives at columns axis_index * n + arange(n). Gradients
    reach the source devices through the gather, whose transpose sums the
    cotangents that every device's rows send to each projection.

    Value and gradient convention (important for the trainer):
      * The returned loss VALUE is the global loss (same on every device).
      * Its GRADIENT is that of this device's share, local = the mean over its
        2n anchors, implemented as local + stop_gradient(pmean(local) - local).
        The global loss is the mean of the D devices' shares, so:
      * The gradient w.r.t. this device's z1/z2 is D x dL/dz of the global loss
        (each device's share depends on every device's z through the gather).
      * Per-device parameter gradients (params used per device, as in jax.pmap
        or jax.shard_map with check_vma=False) must be combined with
        jax.lax.pmean: pmean equals the exact global gradient dL/dparams.
      * In jax.shard_map with check_vma=True and replicated params
        (in_specs P()), jax.grad already psums over the axis when it transposes
        the implicit broadcast of the params; that is D x the global gradient,
        so divide by D (do not pmean again).
    Without axis_name (D = 1) the value and gradient are those of the batch.

    Args:
      z1: [n, d] this device's projections of view 1 (any float dtype).
      z2: [n, d] this device's projections of view 2; row i pairs with z1[i].
      temperature: tau > 0 (a Python or NumPy scalar is validated eagerly).
      axis_name: mesh/pmap axis the batch is split along, or None for one device.
      loss_scale: multiplies the loss (and its gradient); 2.0 gives the
        reference code's convention, 1.0 the paper's.

    Returns:
      (loss, metrics). loss: float32 scalar as described above. metrics: dict of
      float32 scalars, averaged over both views and the global batch (pmean
      over axis_name), without gradient:
        'loss': the same global value as `loss` (invariant across devices, so
          it can leave a shard_map with out_specs P()).
        'contrastive_acc': fraction of anchors whose positive is the argmax over
          all their candidates, concat[logits_ab, logits_aa].
        'entropy': mean entropy (nats) of the softmax over those candidates.
        'contrastive_acc_ab', 'entropy_ab': the same over logits_ab only (the
          other view's N columns), the definition the reference code logs (it
          logs view 1 only; by symmetry both views share its expectation).

    Raises:
      ValueError: z1/z2 not 2-D, of different shapes or empty; temperature or
        loss_scale not a finite positive scalar.
    """
    _validate(z1, z2, temperature, loss_scale)
    n = z1.shape[0]
    h1 = l2_normalize(z1)
    h2 = l2_normalize(z2)

    if axis_name is None:
        h1_all, h2_all = h1, h2
        offset = 0
    else:
        h1_all = jax.lax.all_gather(h1, axis_name, axis=0, tiled=True)
        h2_all = jax.lax.all_gather(h2, axis_name, axis=0, tiled=True)
        # all_gather(tiled) lays devices out in axis_index order, n rows each.
        offset = jax.lax.axis_index(axis_name) * n
    labels = offset + jnp.arange(n)

    losses_a, per_anchor_a = _one_view(h1, h2_all, h1_all, labels, temperature)
    losses_b, per_anchor_b = _one_view(h2, h1_all, h2_all, labels, temperature)
    local = loss_scale * (jnp.sum(losses_a) + jnp.sum(losses_b)) / (2 * n)
    metrics = {k: (jnp.mean(per_anchor_a[k]) + jnp.mean(per_anchor_b[k])) / 2 for k in per_anchor_a}
    metrics["loss"] = jax.lax.stop_gradient(local)

    if axis_name is None:
        return local, metrics
    # Every device holds the same number of rows, so the global mean over 2N
    # anchors is the mean of the per-device means.
    metrics = jax.lax.pmean(metrics, axis_name)
    loss = local + jax.lax.stop_gradient(metrics["loss"] - local)
    return loss, metrics
