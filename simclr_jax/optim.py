"""Optimisers and learning-rate schedules: LARS (pretraining), SGD and AdamW (evaluation).

LARS follows the SimCLR reference implementation ("classic momentum" variant):

    g <- g + wd * w                           (where weight decay applies)
    g <- g * eta * |w| / |g|                  (where trust ratio applies; 1 if a norm is 0)
    v <- m * v + lr * g
    w <- w - v

The learning rate sits inside the momentum buffer, as in the reference, which
differs from optax.sgd (v <- m * v + g; w <- w - lr * v) whenever lr changes.

Which parameters get weight decay and trust-ratio adaptation is decided from the
shape and place of each parameter (`lars_exclusion_mask`, `weight_decay_mask`),
not from name patterns, so the rule holds for every model with the
encoder / head / probe layout.
"""

import math
import numbers
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mlc
import optax

from simclr_jax import config_checks

# Top-level submodule holding the online linear probe (trained on stop_gradient(h)).
PROBE_SUBTREE = "probe"
# Flax variables are sometimes passed with their collection key still on top.
_COLLECTION_KEY = "params"

Schedule = Callable[[jax.typing.ArrayLike], jax.Array]


def _key_names(path: tuple[Any, ...]) -> list[str]:
    """Plain names of a pytree path's entries (dict keys, attribute names, indices)."""
    names = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                names.append(str(getattr(entry, attr)))
                break
        else:
            names.append(str(entry))
    return names


def _is_probe(path: tuple[Any, ...]) -> bool:
    """Whether a parameter lives under the top-level probe subtree."""
    names = _key_names(path)
    if names and names[0] == _COLLECTION_KEY:
        names = names[1:]
    return bool(names) and names[0] == PROBE_SUBTREE


def weight_decay_mask(params: Any) -> Any:
    """Which parameters weight decay applies to: every parameter with ndim >= 2.

    Kernels (conv [h, w, in, out], dense [in, out]) are decayed; 1-D parameters
    (BatchNorm scale/bias, the probe's bias) and scalars are not. The probe's
    kernel IS decayed, as in the reference, which adds wd * l2(probe kernel) to
    the loss when pretraining with LARS. Used by SGD and AdamW, and by LARS for
    weight decay (see `create_optimizer`).

    Args:
      params: parameter pytree (arrays or jax.ShapeDtypeStruct leaves).

    Returns:
      A pytree of Python bools with the structure of `params`.
    """
    return jax.tree.map(lambda p: len(p.shape) >= 2, params)


def lars_exclusion_mask(params: Any) -> Any:
    """Which parameters GET LARS weight decay and trust-ratio adaptation (True).

    The rule: a parameter is adapted iff it has ndim >= 2 (a kernel) and is not
    under the top-level 'probe' subtree (a leading 'params' collection key is
    skipped). So BatchNorm scale/bias and all biases are excluded (they are the
    only 1-D parameters: convs and the projection head's dense layers have no
    bias), and so is the online linear probe, which the reference trains with
    plain momentum (its optimizer excludes 'head_supervised').

    Args:
      params: parameter pytree whose top-level submodules are 'encoder', 'head',
        'probe' (arrays or jax.ShapeDtypeStruct leaves).

    Returns:
      A pytree of Python bools with the structure of `params`.
    """
    return jax.tree_util.tree_map_with_path(
        lambda path, p: len(p.shape) >= 2 and not _is_probe(path), params
    )


def lars(
    learning_rate: float | Schedule,
    *,
    weight_decay: float,
    momentum: float = 0.9,
    trust_coefficient: float = 0.001,
    weight_decay_mask: Any = None,
    trust_ratio_mask: Any = None,
) -> optax.GradientTransformation:
    """LARS with the SimCLR reference's update (see the module docstring).

    Built from optax pieces: add_decayed_weights -> masked scale_by_trust_ratio
    -> scale_by_learning_rate -> trace. Scaling by -lr before the momentum trace
    keeps lr inside the buffer (v = m * v + lr * g), as the reference does.

    Args:
      learning_rate: a float or a schedule step -> lr (step counts from 0).
      weight_decay: wd >= 0, added to the gradient as wd * w where masked in.
      momentum: m in [0, 1).
      trust_coefficient: eta > 0 in the trust ratio eta * |w| / |g|.
      weight_decay_mask: pytree of bools (or a callable params -> pytree), True
        where weight decay applies; None applies it everywhere.
      trust_ratio_mask: the same for the trust ratio; None uses
        weight_decay_mask, as the reference does.

    Returns:
      An optax.GradientTransformation; its update needs `params`.

    Raises:
      ValueError: for a negative weight_decay, momentum outside [0, 1) or a
        non-positive trust_coefficient.
    """
    _check_range("weight_decay", weight_decay, low=0.0)
    _check_range("momentum", momentum, low=0.0, high=1.0, high_inclusive=False)
    _check_range("trust_coefficient", trust_coefficient, low=0.0, low_inclusive=False)
    if trust_ratio_mask is None:
        trust_ratio_mask = weight_decay_mask
    trust_ratio = optax.scale_by_trust_ratio(trust_coefficient=trust_coefficient)
    if trust_ratio_mask is not None:
        trust_ratio = optax.masked(trust_ratio, trust_ratio_mask)
    return optax.chain(
        optax.add_decayed_weights(weight_decay, weight_decay_mask),
        trust_ratio,
        optax.scale_by_learning_rate(learning_rate),
        optax.trace(decay=momentum, nesterov=False),
    )


def peak_learning_rate(base_lr: float, batch_size: int, scaling: str) -> float:
    """The peak learning rate for a global batch size, as in the SimCLR paper.

    Args:
      base_lr: base learning rate (>= 0).
      batch_size: global batch size B (> 0).
      scaling: 'linear' -> base_lr * B / 256; 'sqrt' -> base_lr * sqrt(B).

    Returns:
      The peak learning rate as a Python float.

    Raises:
      ValueError: unknown scaling, negative base_lr or non-positive batch_size.
    """
    _check_range("base_lr", base_lr, low=0.0)
    if not _is_int(batch_size) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int; got {batch_size!r}.")
    if scaling == "linear":
        return base_lr * batch_size / 256.0
    if scaling == "sqrt":
        return base_lr * math.sqrt(batch_size)
    raise ValueError(
        f"scaling (config.optim.lr_scaling) must be one of {config_checks.LR_SCALINGS}; "
        f"got {scaling!r}."
    )


def warmup_cosine_schedule(peak_lr: float, warmup_steps: int, total_steps: int) -> Schedule:
    """Linear warmup from 0 to peak_lr, then cosine decay to 0 at total_steps.

    lr(s) = peak * s / warmup                                   for s < warmup
    lr(s) = peak * 0.5 * (1 + cos(pi * (s - warmup) / (total - warmup)))  for s < total
    lr(s) = 0                                                   for s >= total,
    as the reference's WarmUpAndCosineDecay (the cosine reaches 0 at s = total;
    the last line only matters when warmup_steps == total_steps).

    Args:
      peak_lr: learning rate at the end of warmup (>= 0).
      warmup_steps: number of warmup steps, 0 <= warmup_steps <= total_steps.
      total_steps: total number of optimisation steps (> 0).

    Returns:
      A jit-friendly callable step -> float32 learning rate.

    Raises:
      ValueError: negative values, total_steps == 0 or warmup_steps > total_steps.
    """
    _check_range("peak_lr", peak_lr, low=0.0)
    for name, value in (("warmup_steps", warmup_steps), ("total_steps", total_steps)):
        if not _is_int(value) or value < 0:
            raise ValueError(f"{name} must be a non-negative int; got {value!r}.")
    if total_steps == 0:
        raise ValueError("total_steps must be > 0; got 0.")
    if warmup_steps > total_steps:
        raise ValueError(
            f"warmup_steps ({warmup_steps}) must be <= total_steps ({total_steps}); "
            "shorten the warmup or train longer."
        )
    decay_steps = total_steps - warmup_steps

    def schedule(step: jax.typing.ArrayLike) -> jax.Array:
        step = jnp.asarray(step, jnp.float32)
        warmup_lr = peak_lr * step / max(warmup_steps, 1)
        progress = jnp.clip((step - warmup_steps) / max(decay_steps, 1), 0.0, 1.0)
        cosine_lr = peak_lr * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        lr = jnp.where(step < warmup_steps, warmup_lr, cosine_lr)
        return jnp.where(step < total_steps, lr, 0.0)

    return schedule


def create_optimizer(
    optim_cfg: mlc.ConfigDict,
    *,
    batch_size: int,
    total_steps: int,
    warmup_steps: int,
) -> tuple[optax.GradientTransformation, Schedule]:
    """The optimizer and its learning-rate schedule from a config section.

    Fields of optim_cfg (optional ones in brackets, with defaults):
      name: 'lars' (pretraining), 'sgd' (momentum SGD) or 'adamw' (evaluation).
      base_lr: base learning rate, scaled by `lr_scaling` to the peak.
      lr_scaling: 'linear' (base_lr * B / 256) or 'sqrt' (base_lr * sqrt(B)).
      weight_decay: >= 0.
      [momentum = 0.9]: lars and sgd.
      [trust_coefficient = 0.001]: lars.
      [nesterov = False]: sgd only.
      [b1 = 0.9, b2 = 0.999]: adamw.
      [probe_weight_decay = False]: lars; the online probe is excluded from
        both weight decay and the trust ratio (it is an evaluation device, not
        part of the representation). True decays the probe's kernel (plain L2,
        no trust ratio), which is what the reference TF2 code does through an
        L2 term in its loss.

    Masks. LARS: trust ratio on `lars_exclusion_mask` (kernels outside the
    probe); weight decay on the same set plus, with probe_weight_decay, the
    probe's kernel. The trainer therefore must not add an L2 term for the probe
    itself. SGD / AdamW: weight decay (coupled L2 for sgd, decoupled for adamw)
    on `weight_decay_mask` (every kernel, the probe's included), never on 1-D
    parameters.

    Args:
      optim_cfg: the config.optim ConfigDict.
      batch_size: global batch size, for the peak learning rate.
      total_steps: total optimisation steps of the run.
      warmup_steps: linear warmup steps.

    Returns:
      (tx, schedule): the optax transformation and the step -> lr schedule it uses.

    Raises:
      ValueError: naming the field for an unknown name or scaling, a negative
        weight_decay, an out-of-range momentum/b1/b2/trust_coefficient, or a
        field set for an optimizer that does not use it.
    """
    name = optim_cfg.get("name")
    if name not in config_checks.OPTIMIZERS:
        raise config_checks.ConfigError(
            f"config.optim.name must be one of {config_checks.OPTIMIZERS}; got {name!r}."
        )
    base_lr = _cfg_float(optim_cfg, "base_lr")
    _check_range("config.optim.base_lr", base_lr, low=0.0)
    peak = peak_learning_rate(base_lr, batch_size, optim_cfg.get("lr_scaling"))
    schedule = warmup_cosine_schedule(peak, warmup_steps, total_steps)
    weight_decay = _cfg_float(optim_cfg, "weight_decay")
    _check_range("config.optim.weight_decay", weight_decay, low=0.0)
    nesterov = optim_cfg.get("nesterov", False)
    if not isinstance(nesterov, bool):
        raise config_checks.ConfigError(f"config.optim.nesterov must be a bool; got {nesterov!r}.")
    if nesterov and name != "sgd":
        raise config_checks.ConfigError(
            f"config.optim.nesterov=True is only supported for name='sgd'; got name={name!r}."
        )

    if name == "lars":
        momentum = _cfg_float(optim_cfg, "momentum", 0.9)
        _check_range("config.optim.momentum", momentum, 0.0, 1.0, high_inclusive=False)
        trust_coefficient = _cfg_float(optim_cfg, "trust_coefficient", 0.001)
        _check_range("config.optim.trust_coefficient", trust_coefficient, 0.0, None, False)
        probe_wd = optim_cfg.get("probe_weight_decay", False)
        if not isinstance(probe_wd, bool):
            raise config_checks.ConfigError(
                f"config.optim.probe_weight_decay must be a bool; got {probe_wd!r}."
            )
        tx = lars(
            schedule,
            weight_decay=weight_decay,
            momentum=momentum,
            trust_coefficient=trust_coefficient,
            weight_decay_mask=weight_decay_mask if probe_wd else lars_exclusion_mask,
            trust_ratio_mask=lars_exclusion_mask,
        )
    elif name == "sgd":
        momentum = _cfg_float(optim_cfg, "momentum", 0.9)
        _check_range("config.optim.momentum", momentum, 0.0, 1.0, high_inclusive=False)
        tx = optax.chain(
            optax.add_decayed_weights(weight_decay, weight_decay_mask),
            optax.sgd(schedule, momentum=momentum, nesterov=nesterov),
        )
    else:
        b1 = _cfg_float(optim_cfg, "b1", 0.9)
        b2 = _cfg_float(optim_cfg, "b2", 0.999)
        _check_range("config.optim.b1", b1, 0.0, 1.0, high_inclusive=False)
        _check_range("config.optim.b2", b2, 0.0, 1.0, high_inclusive=False)
        tx = optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay, mask=weight_decay_mask)
    return tx, schedule


def _cfg_float(cfg: mlc.ConfigDict, field: str, default: float | None = None) -> float:
    """A numeric config field as a float, with an error naming the field."""
    value = cfg.get(field, default)
    if not _is_real(value):
        raise config_checks.ConfigError(f"config.optim.{field} must be a number; got {value!r}.")
    return float(value)


def _is_int(value: Any) -> bool:
    """Whether value is an integer (Python or NumPy), bools excluded."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    """Whether value is a real number (Python or NumPy), bools excluded."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_range(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> None:
    """Raises ValueError naming `name` if value is not a finite number in range."""
    ok = _is_real(value) and math.isfinite(value)
    if ok and low is not None:
        ok = value >= low if low_inclusive else value > low
    if ok and high is not None:
        ok = value <= high if high_inclusive else value < high
    if not ok:
        lo = "-inf" if low is None else f"{low}"
        hi = "inf" if high is None else f"{high}"
        interval = f"{'[' if low_inclusive else '('}{lo}, {hi}{']' if high_inclusive else ')'}"
        raise config_checks.ConfigError(
            f"{name} must be a finite number in {interval}; got {value!r}."
        )
