"""The SimCLR train step, written once per device, and its two parallel wrappers.

`train_step` sees one device's slice of the global batch. With `axis_name`
set it gathers NT-Xent negatives from every device, uses global batch norm
(when the model was built with the same axis name) and averages gradients
across devices. `compile_train_step` wraps it either with jax.shard_map under
jax.jit (state replicated, batch sharded, state donated) or with jax.pmap.
"""

from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from clu import metrics as clu_metrics
from jax.sharding import PartitionSpec as P

from simclr_jax import losses, sharding


@flax.struct.dataclass
class TrainState:
    """Everything a run needs to continue: the step and all trainable state."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any


NO_NONFINITE_STEP = 2**31 - 1


@flax.struct.dataclass
class FirstNonFiniteStep(clu_metrics.Metric):
    """The earliest step whose loss was not finite (NO_NONFINITE_STEP if none).

    Kept on device and merged with a minimum, so a NaN is traced to its exact
    step without a host synchronisation per step.
    """

    value: jax.Array

    @classmethod
    def from_model_output(cls, values: jax.Array, **_) -> "FirstNonFiniteStep":
        return cls(value=jnp.asarray(values, jnp.int32))

    def merge(self, other: "FirstNonFiniteStep") -> "FirstNonFiniteStep":
        return type(self)(value=jnp.minimum(self.value, other.value))

    def compute(self) -> jax.Array:
        return self.value


@flax.struct.dataclass
class TrainMetrics(clu_metrics.Collection):
    """Per-step training metrics; averaged over the steps of a logging interval."""

    loss: clu_metrics.Average.from_output("loss")
    contrastive_acc: clu_metrics.Average.from_output("contrastive_acc")
    entropy: clu_metrics.Average.from_output("entropy")
    probe_loss: clu_metrics.Average.from_output("probe_loss")
    probe_top1: clu_metrics.Average.from_output("probe_top1")
    learning_rate: clu_metrics.LastValue.from_output("learning_rate")
    param_norm: clu_metrics.LastValue.from_output("param_norm")
    grad_norm: clu_metrics.Average.from_output("grad_norm")
    first_nonfinite_step: FirstNonFiniteStep.from_output("first_nonfinite_step")


def create_train_state(
    model: nn.Module, tx: optax.GradientTransformation, rng: jax.Array, image_shape
) -> TrainState:
    """Initialises parameters, batch statistics and optimizer state.

    Args:
      model: the SimCLRModel.
      tx: the optimizer.
      rng: PRNG key for the parameters.
      image_shape: (height, width, channels) of one view.

    Returns:
      A TrainState at step 0.
    """
    dummy = jnp.zeros((2,) + tuple(image_shape), jnp.float32)
    variables = model.init(rng, dummy, train=False)
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(params),
    )


def _pmean(x, axis_name):
    return x if axis_name is None else jax.lax.pmean(x, axis_name)


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    model: nn.Module,
    tx: optax.GradientTransformation,
    learning_rate_fn: Callable[[jax.Array], jax.Array],
    temperature: float,
    loss_scale: float,
    axis_name: str | None,
    sync_batch_stats: bool,
) -> tuple[TrainState, TrainMetrics]:
    """One SimCLR step on this device's slice of the global batch.

    Args:
      state: the replicated train state.
      batch: {'view1', 'view2': [n, H, W, 3] float32, 'label': [n] int32}.
      model: the SimCLRModel (with bn_axis_name=axis_name for global BN).
      tx: the optimizer (LARS for pretraining).
      learning_rate_fn: the schedule, only for logging (tx holds its own).
      temperature: NT-Xent temperature.
      loss_scale: multiplies the paper's NT-Xent in the optimised objective; 2.0
        reproduces the reference implementation (see losses.nt_xent).
      axis_name: the device axis, or None on a single device.
      sync_batch_stats: average running BN statistics across devices after the
        step; needed when BN is per-device so the replicated state stays equal.

    Returns:
      The new state and this step's metrics (global averages).
    """
    n = batch["view1"].shape[0]
    images = jnp.concatenate([batch["view1"], batch["view2"]], axis=0)
    # The probe is trained on both views, as in the reference.
    labels = jnp.concatenate([batch["label"], batch["label"]], axis=0)

    def loss_fn(params):
        outputs, new_vars = model.apply(
            {"params": params, "batch_stats": state.batch_stats},
            images,
            train=True,
            mutable=["batch_stats"],
        )
        z = outputs["z"]
        contrastive, aux = losses.nt_xent(
            z[:n], z[n:], temperature=temperature, axis_name=axis_name
        )
        logits = outputs["probe_logits"]
        probe_loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        probe_top1 = (jnp.argmax(logits, -1) == labels).mean()
        total = loss_scale * contrastive + probe_loss
        return total, (new_vars["batch_stats"], contrastive, aux, probe_loss, probe_top1)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (_, (batch_stats, contrastive, aux, probe_loss, probe_top1)), grads = grad_fn(state.params)
    # nt_xent's gradient is this device's share, so the mean over devices is
    # exactly the gradient of the global loss; the probe's loss is a local mean.
    grads = _pmean(grads, axis_name)
    if sync_batch_stats:
        batch_stats = _pmean(batch_stats, axis_name)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)

    loss_value = contrastive  # already the global value
    finite = jnp.isfinite(loss_value)
    metrics = TrainMetrics.single_from_model_output(
        loss=loss_value,
        contrastive_acc=aux["contrastive_acc"],
        entropy=aux["entropy"],
        probe_loss=_pmean(probe_loss, axis_name),
        probe_top1=_pmean(probe_top1, axis_name),
        learning_rate=learning_rate_fn(state.step),
        param_norm=optax.global_norm(state.params),
        grad_norm=optax.global_norm(grads),
        first_nonfinite_step=jnp.where(finite, NO_NONFINITE_STEP, state.step).astype(jnp.int32),
    )
    new_state = state.replace(
        step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state
    )
    return new_state, metrics


def merge_metrics(acc: TrainMetrics | None, new: TrainMetrics) -> TrainMetrics:
    """Accumulates metrics on device, so logging intervals need no per-step sync."""
    return new if acc is None else acc.merge(new)


def compile_train_step(
    step_fn: Callable, *, parallelism: str, mesh=None
) -> Callable[[TrainState, dict], tuple[TrainState, TrainMetrics]]:
    """Wraps the per-device step for the chosen parallel mode.

    Args:
      step_fn: train_step with every keyword bound (functools.partial), and
        axis_name=sharding.DATA_AXIS.
      parallelism: 'shard_map' (jit over a mesh; global arrays) or 'pmap'.
      mesh: the device mesh (shard_map only).

    Returns:
      A function (state, batch) -> (state, metrics). The state argument is
      donated: do not reuse it after the call.
    """
    if parallelism == "shard_map":
        # State and metrics are replicated (P()), the batch is split on the data
        # axis. check_vma=False: the outputs are made device-invariant by the
        # pmeans inside the step, which the checker cannot prove through
        # all_gather.
        mapped = jax.shard_map(
            step_fn,
            mesh=mesh,
            in_specs=(P(), P(sharding.DATA_AXIS)),
            out_specs=(P(), P()),
            check_vma=False,
        )
        return jax.jit(mapped, donate_argnums=0)
    if parallelism == "pmap":
        return jax.pmap(step_fn, axis_name=sharding.DATA_AXIS, donate_argnums=0)
    raise ValueError(
        f"config.train.parallelism={parallelism!r} is not supported; "
        f"use one of {sharding.PARALLELISM_MODES}."
    )
