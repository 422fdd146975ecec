"""The losses of BYOL, MoCo v3, Barlow Twins, VICReg, single-device and across devices.

The losses against stored vectors (MoCo v2's queue, NNCLR's support set, InstDisc's memory
bank) are in memory_losses.py, with the same conventions.

Pure functions of the two views' per-device outputs; no modules, no config. Each is
written once for the per-device view of the batch, as `losses.nt_xent`: called plainly
(axis_name=None) it is the loss of the batch it is given; called with `axis_name` inside
`jax.shard_map` (under `jax.jit`) or `jax.pmap`, with the batch split along that axis,
every statistic and every set of candidates covers the GLOBAL batch.

Value and gradient convention (the same as `losses.nt_xent`, which the trainer relies on):
  * The returned loss VALUE is the global loss, the same on every device.
  * Its GRADIENT is that of this device's share of the loss, the shares' mean over the D
    devices being the global loss: the gradient w.r.t. this device's inputs is
    D x dL/d(inputs) of the global loss, and a pmean of the per-device parameter gradients
    (as steps.py does) is the exact global gradient.
  * Cross-device sums that carry a gradient go through `jax.lax.all_gather` only, whose
    transpose (a reduce-scatter of the cotangents of every device) is the same under
    jax.pmap and jax.shard_map with check_vma True or False; `jax.lax.psum`'s transpose is
    not (it sums under pmap and check_vma=False, and does not under check_vma=True), so
    psum and pmean only touch values without gradient (the reported value, the metrics).

Formulas, sources, and where the papers and their official code differ:
docs/method_losses.md.
"""

from collections.abc import Hashable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from simclr_jax.losses import l2_normalize

# The non-affine BatchNorm1d of the official Barlow Twins code: biased variance, this eps.
BARLOW_TWINS_BN_EPS = 1e-5
# VICReg's variance term: std = sqrt(Var + eps) (paper section 3.1 and official code).
VICREG_STD_EPS = 1e-4

Metrics = dict[str, jax.Array]


# ----------------------------------------------------------------------------
# Input checks and the cross-device plumbing shared by the four losses.
# ----------------------------------------------------------------------------


def _validate_2d(**arrays: Any) -> None:
    """Raises ValueError unless every array is 2-D [batch, dim] with one shape for all."""
    for name, x in arrays.items():
        if jnp.ndim(x) != 2:
            raise ValueError(
                f"{name} must be 2-D [batch, dim]; got shape {jnp.shape(x)} "
                f"(ndim {jnp.ndim(x)}). Flatten the outputs to [batch, dim]."
            )
    shapes = {name: tuple(jnp.shape(x)) for name, x in arrays.items()}
    names = ", ".join(f"{k} {v}" for k, v in shapes.items())
    if len({s[0] for s in shapes.values()}) > 1:
        raise ValueError(
            f"batch sizes differ: {names}. Row i of every input must come from image i "
            "of this device's batch."
        )
    if len({s[1] for s in shapes.values()}) > 1:
        raise ValueError(f"feature dimensions differ: {names}.")
    if next(iter(shapes.values()))[0] < 1:
        raise ValueError(f"the inputs must hold at least one row; got {names}.")


def _validate_scalar(name: str, value: Any, *, allow_zero: bool) -> None:
    """Raises ValueError unless `value` is a finite scalar > 0 (>= 0 with allow_zero).

    Traced values (a coefficient swept inside jit) cannot be checked and pass through.
    """
    if isinstance(value, jax.core.Tracer):
        return
    v = np.asarray(value)
    ok = v.ndim == 0 and np.isfinite(v) and (v >= 0 if allow_zero else v > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite scalar {bound}; got {value!r}.")


def _gather(x: jax.Array, axis_name: Hashable | None) -> jax.Array:
    """[n, d] -> [D * n, d]: every device's rows in axis_index order (identity for None).

    The gather is differentiable: its transpose sums the cotangents every device sends to
    these rows.
    """
    if axis_name is None:
        return x
    return jax.lax.all_gather(x, axis_name, axis=0, tiled=True)


def _device_index(axis_name: Hashable | None) -> jax.Array | int:
    return 0 if axis_name is None else jax.lax.axis_index(axis_name)


def _global_value(
    share: jax.Array, metrics: Metrics, axis_name: Hashable | None
) -> tuple[jax.Array, Metrics]:
    """The loss whose value is the mean of the devices' shares and whose gradient is `share`'s.

    Args:
      share: float32 scalar, this device's share; the shares' mean over devices is the loss.
      metrics: float32 scalars, each this device's share of a global metric (same rule).
      axis_name: the device axis, or None.

    Returns:
      (loss, metrics): metrics without gradient, pmean-ed (device-invariant), 'loss' added.
    """
    metrics = dict(metrics, loss=share)
    metrics = jax.tree.map(jax.lax.stop_gradient, metrics)
    if axis_name is None:
        return share, metrics
    metrics = jax.lax.pmean(metrics, axis_name)
    return share + jax.lax.stop_gradient(metrics["loss"] - share), metrics


def _feature_block(
    a: jax.Array, b: jax.Array, axis_name: Hashable | None, num_devices: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """This device's rows of the [d, d] matrix a^T b: its block of features, never all d rows.

    Device k owns the features [k * r, (k + 1) * r), r = ceil(d / D); the last blocks are
    zero-padded (their padded rows are zero and marked invalid). Across the D devices the
    blocks tile the whole matrix, so each device computes N d^2 / D products (as many as a
    local [d, d] matrix of its n rows would take) and holds [r, d], not [d, d].

    Args:
      a, b: float32 [N, d], the global batch (already gathered).
      axis_name: the device axis, or None (then D = 1 and the block is the whole matrix).
      num_devices: D.

    Returns:
      (block [r, d] = a[:, rows]^T b, the diagonal of the whole matrix at these rows [r]
      (0 on padded rows), valid [r] bool).
    """
    d = a.shape[1]
    rows = -(-d // num_devices)
    a = jnp.pad(a, ((0, 0), (0, rows * num_devices - d)))
    start = _device_index(axis_name) * rows
    a_rows = jax.lax.dynamic_slice_in_dim(a, start, rows, axis=1)
    block = a_rows.T @ b  # [r, d]
    feature = start + jnp.arange(rows)
    valid = feature < d
    diag = jnp.take_along_axis(block, jnp.minimum(feature, d - 1)[:, None], axis=1)[:, 0]
    return block, jnp.where(valid, diag, 0.0), valid


# ----------------------------------------------------------------------------
# The losses.
# ----------------------------------------------------------------------------


def byol_loss(
    p1: jax.Array,
    p2: jax.Array,
    z1_target: jax.Array,
    z2_target: jax.Array,
    axis_name: Hashable | None = None,
) -> tuple[jax.Array, Metrics]:
    """BYOL's symmetrised regression loss (Grill et al. 2020, arXiv 2006.07733).

    L = mean_i [(2 - 2 cos(p1_i, sg(z2'_i))) + (2 - 2 cos(p2_i, sg(z1'_i)))], the paper's
    eq. 2, ||q/|q| - z'/|z'|||^2 = 2 - 2 cos(q, z'), summed over the two orderings of the
    views (L_total = L + L~, section 3.1) and averaged over the global batch; the official
    code computes the same. Range [0, 8]. The targets are stop_gradient-ed here, so their
    gradient is exactly zero whatever the caller does.

    Args:
      p1, p2: [n, d] this device's online predictions of views 1 and 2 (any float dtype;
        computed in float32).
      z1_target, z2_target: [n, d] the EMA target network's projections of views 1 and 2.
      axis_name: the mapped device axis (e.g. sharding.DATA_AXIS under jax.shard_map), or
        None for one device. The loss is a mean of per-image terms, so the global batch
        needs no gather: this device's share is the mean over its n images.

    Returns:
      (loss, metrics): loss float32 scalar with the module's value/gradient convention;
      metrics (float32, global, no gradient): 'loss', 'cosine' (the mean of the 2N cosines).

    Raises:
      ValueError: inputs not 2-D, or of different shapes (batch sizes or dims).
    """
    _validate_2d(p1=p1, p2=p2, z1_target=z1_target, z2_target=z2_target)
    t1 = l2_normalize(jax.lax.stop_gradient(z1_target))
    t2 = l2_normalize(jax.lax.stop_gradient(z2_target))
    cos_12 = jnp.sum(l2_normalize(p1) * t2, axis=-1)  # [n]
    cos_21 = jnp.sum(l2_normalize(p2) * t1, axis=-1)
    share = jnp.mean((2.0 - 2.0 * cos_12) + (2.0 - 2.0 * cos_21))
    metrics = {"cosine": (jnp.mean(cos_12) + jnp.mean(cos_21)) / 2}
    return _global_value(share, metrics, axis_name)


def _infonce_rows(
    q: jax.Array, k_all: jax.Array, labels: jax.Array, temperature: Any
) -> tuple[jax.Array, jax.Array]:
    """Cross entropy of each query's positive key among all keys, and whether it won.

    Args:
      q: [n, d] normalised queries; k_all: [N, d] normalised keys of the global batch;
      labels: [n] column of each query's positive key; temperature: tau.

    Returns:
      ([n] float32 CE, [n] float32 1.0 where the positive has the largest logit).
    """
    logits = q @ k_all.T / temperature  # [n, N]
    positive = jnp.take_along_axis(logits, labels[:, None], axis=1)[:, 0]
    ce = jax.nn.logsumexp(logits, axis=1) - positive
    correct = jnp.argmax(jax.lax.stop_gradient(logits), axis=1) == labels
    return ce, correct.astype(jnp.float32)


def moco_v3_loss(
    q1: jax.Array,
    q2: jax.Array,
    k1: jax.Array,
    k2: jax.Array,
    temperature: float,
    axis_name: Hashable | None = None,
) -> tuple[jax.Array, Metrics]:
    """MoCo v3's symmetrised InfoNCE (Chen, Xie, He 2021, arXiv 2104.02057, Algorithm 1).

    ctr(q, k) = 2 tau * CE(q k^T / tau, labels) with q and k l2-normalised, the keys of the
    WHOLE global batch as candidates (N per query, no queue) and each query's positive its
    own image's key, at column (global row index); loss = ctr(q1, k2) + ctr(q2, k1), each CE
    averaged over the global batch. The official code (moco/builder.py) computes the same:
    its keys are all-gathered without gradient, its labels are N_local * rank + arange.

    Args:
      q1, q2: [n, d] this device's queries of views 1 and 2 (predictor outputs; any float
        dtype; normalised and compared in float32).
      k1, k2: [n, d] this device's keys of views 1 and 2 (momentum encoder outputs); they
        are stop_gradient-ed, so their gradient is exactly zero.
      temperature: tau > 0 (1.0 for ResNet-50 in the paper; 0.2 for ViT).
      axis_name: the mapped device axis, or None. The keys are all-gathered (after the
        stop_gradient: no cotangent crosses devices); this device builds its n rows of
        the logits, [n, N], never the [N, N] matrix.

    Returns:
      (loss, metrics): loss float32 scalar, the module's value/gradient convention;
      metrics (float32, global, no gradient): 'loss', 'contrastive_acc' (fraction of the
      2N queries whose positive key has the largest logit).

    Raises:
      ValueError: inputs not 2-D or of different shapes; temperature not finite > 0.
    """
    _validate_2d(q1=q1, q2=q2, k1=k1, k2=k2)
    _validate_scalar("temperature", temperature, allow_zero=False)
    n = q1.shape[0]
    # Gathered in the input dtype (bfloat16 keys cross devices at half the bytes).
    k1_all = l2_normalize(_gather(jax.lax.stop_gradient(k1), axis_name))
    k2_all = l2_normalize(_gather(jax.lax.stop_gradient(k2), axis_name))
    labels = _device_index(axis_name) * n + jnp.arange(n)
    ce_12, correct_12 = _infonce_rows(l2_normalize(q1), k2_all, labels, temperature)
    ce_21, correct_21 = _infonce_rows(l2_normalize(q2), k1_all, labels, temperature)
    share = 2.0 * temperature * (jnp.mean(ce_12) + jnp.mean(ce_21))
    metrics = {"contrastive_acc": (jnp.mean(correct_12) + jnp.mean(correct_21)) / 2}
    return _global_value(share, metrics, axis_name)


def barlow_twins_loss(
    z1: jax.Array,
    z2: jax.Array,
    lambd: float,
    axis_name: Hashable | None = None,
) -> tuple[jax.Array, Metrics]:
    """The Barlow Twins loss, as the official code computes it (Zbontar et al. 2021, eq. 1).

    Each feature is standardised over the global batch as the official code's non-affine
    BatchNorm1d (synchronised across GPUs) does in training: z_n = (z - mean) /
    sqrt(Var + 1e-5), Var the BIASED variance (divided by N). The cross-correlation
    C = z1_n^T z2_n / N ([d, d], N the global batch) and
        loss = sum_i (1 - C_ii)^2 + lambd * sum_{i != j} C_ij^2       (eq. 1).
    With eps = 0 this C is exactly the paper's eq. 2 (cosines of the batch-centred feature
    columns); the paper's Algorithm 1 standardises with the unbiased std and no eps. No
    loss scale: the first public code multiplied the loss by --scale-loss 0.024, the
    current code does not (it moved the factor into the learning rate of the biases and
    BN parameters). See docs/method_losses.md.

    Args:
      z1, z2: [n, d] this device's projector outputs of views 1 and 2 (any float dtype;
        computed in float32).
      lambd: the weight of the off-diagonal terms, finite >= 0 (official 0.0051).
      axis_name: the mapped device axis, or None. z1, z2 are all-gathered ([N, d]); the
        mean and variance are the global batch's; this device computes only its block of
        ceil(d / D) rows of C against all N rows (memory [N, d] + [d / D, d], never a
        [d, d] matrix per device).

    Returns:
      (loss, metrics): loss float32 scalar, the module's value/gradient convention;
      metrics (float32, global, no gradient): 'loss', 'on_diag' = sum_i (1 - C_ii)^2,
      'off_diag' = sum_{i != j} C_ij^2 (unweighted), 'mean_diag' = mean_i C_ii.

    Raises:
      ValueError: inputs not 2-D or of different shapes; lambd not finite >= 0.
    """
    _validate_2d(z1=z1, z2=z2)
    _validate_scalar("lambd", lambd, allow_zero=True)
    n, d = z1.shape
    a = _gather(z1, axis_name).astype(jnp.float32)
    b = _gather(z2, axis_name).astype(jnp.float32)
    num_global = a.shape[0]
    num_devices = num_global // n

    def standardise(z):
        centred = z - jnp.mean(z, axis=0)
        var = jnp.mean(centred * centred, axis=0)  # Biased, as BatchNorm's normalisation.
        return centred * jax.lax.rsqrt(var + BARLOW_TWINS_BN_EPS)

    block, diag, valid = _feature_block(standardise(a), standardise(b), axis_name, num_devices)
    block, diag = block / num_global, diag / num_global
    on_diag = jnp.sum(jnp.where(valid, (1.0 - diag) ** 2, 0.0))
    off_diag = jnp.sum(block * block) - jnp.sum(diag * diag)
    # This device's rows are one of D blocks: x D makes the shares' mean the global sum.
    share = num_devices * (on_diag + lambd * off_diag)
    metrics = {
        "on_diag": num_devices * on_diag,
        "off_diag": num_devices * off_diag,
        "mean_diag": num_devices * jnp.sum(diag) / d,
    }
    return _global_value(share, metrics, axis_name)


def vicreg_loss(
    z1: jax.Array,
    z2: jax.Array,
    sim_coeff: float = 25.0,
    std_coeff: float = 25.0,
    cov_coeff: float = 1.0,
    axis_name: Hashable | None = None,
) -> tuple[jax.Array, Metrics]:
    """The VICReg loss as the official code computes it (Bardes, Ponce, LeCun 2022).

    arXiv 2105.04906, section 3.1 (eqs. 1-6), in the form of facebookresearch/vicreg
    main_vicreg.py, with which the coefficients 25 / 25 / 1 were tuned:
      invariance s = mean over the N x d entries of (z1 - z2)^2;
      variance   v(Z) = mean_j relu(1 - sqrt(Var(Z_j) + 1e-4)), Var the UNBIASED variance
                 of feature j over the global batch; the loss uses [v(z1) + v(z2)] / 2;
      covariance c(Z) = sum_{i != j} Cov(Z)_ij^2 / d, Cov = Zc^T Zc / (N - 1) with Zc the
                 batch-centred Z; the loss uses c(z1) + c(z2);
      loss = sim_coeff * s + std_coeff * [v(z1) + v(z2)] / 2 + cov_coeff * [c(z1) + c(z2)].
    The paper's eq. 6 sums the invariance over the d features (d x the code's) and has no
    1/2 on the variance terms; see docs/method_losses.md.

    Args:
      z1, z2: [n, d] this device's expander outputs of views 1 and 2 (any float dtype;
        computed in float32).
      sim_coeff, std_coeff, cov_coeff: finite >= 0 (lambda, mu, nu of the paper).
      axis_name: the mapped device axis, or None. The invariance is a mean of per-image
        terms (this device's share: the mean over its rows, as the official code computes
        it before gathering); z1, z2 are all-gathered ([N, d], the official code's
        FullGatherLayer) for the variance and covariance, and this device computes only
        its block of ceil(d / D) rows of each covariance matrix.

    Returns:
      (loss, metrics): loss float32 scalar, the module's value/gradient convention;
      metrics (float32, global, no gradient): 'loss', 'invariance' (s), 'variance'
      ([v(z1) + v(z2)] / 2), 'covariance' (c(z1) + c(z2)), 'std' (mean over the features
      and the two views of sqrt(Var + 1e-4)).

    Raises:
      ValueError: inputs not 2-D or of different shapes; a global batch of one row (the
        unbiased variance needs two); a coefficient not finite >= 0.
    """
    _validate_2d(z1=z1, z2=z2)
    for name, value in (
        ("sim_coeff", sim_coeff),
        ("std_coeff", std_coeff),
        ("cov_coeff", cov_coeff),
    ):
        _validate_scalar(name, value, allow_zero=True)
    n, d = z1.shape
    x_local = jnp.asarray(z1, jnp.float32)
    y_local = jnp.asarray(z2, jnp.float32)
    invariance_share = jnp.mean((x_local - y_local) ** 2)

    x = _gather(z1, axis_name).astype(jnp.float32)
    y = _gather(z2, axis_name).astype(jnp.float32)
    num_global = x.shape[0]
    num_devices = num_global // n
    if num_global < 2:
        raise ValueError(
            f"VICReg needs a global batch of at least 2 rows (unbiased variance); got {num_global}."
        )

    def variance_and_covariance(z):
        zc = z - jnp.mean(z, axis=0)
        std = jnp.sqrt(jnp.sum(zc * zc, axis=0) / (num_global - 1) + VICREG_STD_EPS)
        v = jnp.mean(jax.nn.relu(1.0 - std))
        block, diag, _ = _feature_block(zc, zc, axis_name, num_devices)
        block, diag = block / (num_global - 1), diag / (num_global - 1)
        # This device's rows are one of D blocks: x D makes the shares' mean the whole sum.
        c_share = num_devices * (jnp.sum(block * block) - jnp.sum(diag * diag)) / d
        return v, c_share, jnp.mean(std)

    v_x, c_x, std_x = variance_and_covariance(x)
    v_y, c_y, std_y = variance_and_covariance(y)
    variance = (v_x + v_y) / 2
    covariance_share = c_x + c_y
    share = sim_coeff * invariance_share + std_coeff * variance + cov_coeff * covariance_share
    metrics = {
        "invariance": invariance_share,
        "variance": variance,
        "covariance": covariance_share,
        "std": (std_x + std_y) / 2,
    }
    return _global_value(share, metrics, axis_name)
