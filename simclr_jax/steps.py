"""The pretraining train step, written once per device for every method, and its two wrappers.

`train_step` sees one device's slice of the global batch. The method (simclr_jax.methods:
SimCLR, BYOL, ...) supplies the loss over the two views' outputs, any target network's
outputs, and the update of its extra state after the optimizer step; the step itself does the
rest, the same for every method. With `axis_name` set the loss gathers statistics or negatives
from every device, batch norm is global (when the model was built with the same axis name)
and gradients are averaged across devices. `compile_train_step` wraps it either with
jax.shard_map under jax.jit (state replicated, batch sharded, state donated) or with jax.pmap.
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

from simclr_jax import config_checks, sharding
from simclr_jax.labels import is_labelled, labelled_cross_entropy
from simclr_jax.methods import simclr as simclr_method
from simclr_jax.train_state import TargetTrainState, TrainState, create_train_state

__all__ = [
    "TargetTrainState",
    "TrainMetrics",
    "TrainState",
    "check_finite",
    "compile_train_step",
    "create_train_state",
    "merge_metrics",
    "train_step",
]

NO_NONFINITE_STEP = 2**31 - 1


class NonFiniteLossError(config_checks.UserInputError, FloatingPointError):
    """The loss, or the state an update produced, held a NaN or an infinity (check_finite).

    A user error (main.py prints it as one line, exit status 2): the fix is a lower learning
    rate, a higher temperature or float32, then a rerun from the last checkpoint.
    """


@flax.struct.dataclass
class FirstNonFiniteStep(clu_metrics.Metric):
    """The earliest step (as logged and checkpointed: 1 = the first) at which a value was not
    finite (NO_NONFINITE_STEP if none).

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
class LabelledMean(clu_metrics.Average):
    """A mean over the labelled examples of the steps merged: each step contributes the model
    output (sum over its labelled examples, their count); NaN when none was labelled."""

    @classmethod
    def from_model_output(cls, values: jax.Array, **_) -> "LabelledMean":
        return cls(total=values[0], count=values[1].astype(jnp.int32))


@flax.struct.dataclass
class TrainMetrics(clu_metrics.Collection):
    """Per-step training metrics; averaged over the steps of a logging interval."""

    loss: clu_metrics.Average.from_output("loss")
    contrastive_acc: clu_metrics.Average.from_output("contrastive_acc")
    entropy: clu_metrics.Average.from_output("entropy")
    probe_loss: LabelledMean.from_output("probe_loss")  # (sum, count) per step
    probe_top1: LabelledMean.from_output("probe_top1")
    learning_rate: clu_metrics.LastValue.from_output("learning_rate")
    param_norm: clu_metrics.LastValue.from_output("param_norm")
    grad_norm: clu_metrics.Average.from_output("grad_norm")
    # The contrastive loss computed before the update, and the state the update produced.
    first_nonfinite_step: FirstNonFiniteStep.from_output("first_nonfinite_step")
    first_nonfinite_state_step: FirstNonFiniteStep.from_output("first_nonfinite_state_step")


def _pmean(x, axis_name):
    return x if axis_name is None else jax.lax.pmean(x, axis_name)


def _psum(x, axis_name):
    return x if axis_name is None else jax.lax.psum(x, axis_name)


def all_finite(tree) -> jax.Array:
    """True when every floating-point leaf of `tree` is finite (a bool scalar, on device)."""
    leaves = [x for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else True


def _apply(model, params, batch_stats, images, freeze_bn: bool):
    """Runs the model in training mode; returns (outputs, updated batch_stats).

    With freeze_bn, BatchNorm normalises with its running statistics (inference
    mode) and the statistics are returned unchanged.
    """
    variables = {"params": params, "batch_stats": batch_stats}
    if freeze_bn:
        return model.apply(variables, images, train=False), batch_stats
    outputs, new_vars = model.apply(variables, images, train=True, mutable=["batch_stats"])
    return outputs, new_vars["batch_stats"]


def _probe_sums(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The online probe's summed cross-entropy and correct top-1 over the labelled rows.

    Rows whose label is outside [0, classes) (tfds's -1 for unlabelled examples) add
    nothing to either sum and get no gradient; they are not counted (see _probe_count).
    """
    ce, labelled = labelled_cross_entropy(logits, labels)
    correct = labelled & (jnp.argmax(logits, -1) == labels)
    return jnp.sum(ce), jnp.sum(correct).astype(jnp.float32)


def _probe_count(labels: jax.Array, num_classes: int, axis_name) -> jax.Array:
    """Labelled rows on every device (the probe's mean is over these); float32."""
    return _psum(jnp.sum(is_labelled(labels, num_classes)).astype(jnp.float32), axis_name)


def _probe_loss_share(ce_sum, count, axis_name):
    """This device's term of the probe loss: after the gradients' pmean over the D devices,
    D * ce_sum / count sums to the mean cross-entropy over every device's labelled rows
    (0, with no gradient, when no row is labelled)."""
    devices = 1 if axis_name is None else jax.lax.psum(1, axis_name)
    return ce_sum * devices / jnp.maximum(count, 1.0)


def _full_batch_grads(params, batch_stats, batch, *, model, method, axis_name, freeze_bn, targets):
    """Gradients of the whole local batch in one forward/backward pass.

    `targets` (the method's target-network outputs of the same images, or None) enter the
    method's objective as constants.
    """
    n = batch["view1"].shape[0]
    images = jnp.concatenate([batch["view1"], batch["view2"]], axis=0)
    # The probe is trained on both views, as in the reference.
    labels = jnp.concatenate([batch["label"], batch["label"]], axis=0)
    count = _probe_count(labels, model.probe.num_classes, axis_name)

    def loss_fn(p):
        outputs, new_stats = _apply(model, p, batch_stats, images, freeze_bn)
        objective, loss, aux = method.objective(outputs, targets, n=n, axis_name=axis_name)
        ce_sum, correct = _probe_sums(outputs["probe_logits"], labels)
        total = objective + _probe_loss_share(ce_sum, count, axis_name)
        return total, (new_stats, loss, aux, (ce_sum, correct, count))

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (_, aux), grads = grad_fn(params)
    return grads, aux


def _split(x: jax.Array, k: int) -> jax.Array:
    """[n, ...] -> [k, n // k, ...]: k consecutive micro-batches."""
    return x.reshape((k, x.shape[0] // k) + x.shape[1:])


def _micro_batch_grads(
    params,
    batch_stats,
    batch,
    *,
    model,
    method,
    axis_name,
    freeze_bn,
    micro_per_device,
):
    """Exact large-batch gradients with micro-batches (gradient caching).

    1. Embed every micro-batch without keeping activations (a scan with no
       autodiff): z for the whole local batch.
    2. NT-Xent on the whole global batch (negatives gathered from every device)
       and its gradient g = dLoss/dz for every local embedding.
    3. For each micro-batch, recompute its forward pass and back-propagate the
       surrogate sum(z_i * stop_gradient(g_i)) (+ its share of the probe loss);
       sum the parameter gradients.
    Peak activation memory is that of one micro-batch; compute is about 4/3 of
    a plain step (one extra forward pass).

    BatchNorm: each micro-batch is normalised with its own statistics (over all
    devices with global BN, i.e. over micro_batch_size examples), in both the
    embedding and the recomputation, so the gradient is the exact gradient of
    that objective. The running statistics become the mean of the k
    micro-batch updates, i.e. momentum * old + (1 - momentum) * the mean of the
    micro-batch statistics. With freeze_bn the step equals the full-batch step.
    """
    n = batch["view1"].shape[0]
    k = n // micro_per_device
    views1, views2 = _split(batch["view1"], k), _split(batch["view2"], k)
    labels = _split(batch["label"], k)

    def embed(xs):
        v1, v2 = xs
        outputs, new_stats = _apply(
            model, params, batch_stats, jnp.concatenate([v1, v2]), freeze_bn
        )
        return outputs["z"], new_stats

    z, stats = jax.lax.map(embed, (views1, views2))  # z: [k, 2m, d]
    z = jax.lax.stop_gradient(z)
    z1 = z[:, :micro_per_device].reshape(n, -1)
    z2 = z[:, micro_per_device:].reshape(n, -1)

    (_, (contrastive, aux)), (g1, g2) = jax.value_and_grad(
        lambda a, b: method.embedding_loss(a, b, axis_name), argnums=(0, 1), has_aux=True
    )(z1, z2)
    g = jnp.concatenate([_split(g1, k), _split(g2, k)], axis=1)  # [k, 2m, d]

    # The probe's mean is over the labelled rows of the whole batch (both views).
    count = _probe_count(
        jnp.concatenate([batch["label"], batch["label"]]), model.probe.num_classes, axis_name
    )

    def accumulate(total, xs):
        v1, v2, label, g_i = xs
        images = jnp.concatenate([v1, v2])
        both_labels = jnp.concatenate([label, label])

        def surrogate(p):
            outputs, _ = _apply(model, p, batch_stats, images, freeze_bn)
            ce_sum, correct = _probe_sums(outputs["probe_logits"], both_labels)
            probe = _probe_loss_share(ce_sum, count, axis_name)
            return jnp.sum(outputs["z"] * g_i) + probe, (ce_sum, correct)

        grads, probe = jax.grad(surrogate, has_aux=True)(params)
        return jax.tree_util.tree_map(jnp.add, total, grads), probe

    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    grads, (ce_sums, corrects) = jax.lax.scan(accumulate, zeros, (views1, views2, labels, g))
    new_stats = jax.tree_util.tree_map(lambda s: jnp.mean(s, axis=0), stats)
    return grads, (new_stats, contrastive, aux, (ce_sums.sum(), corrects.sum(), count))


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    model: nn.Module,
    tx: optax.GradientTransformation,
    learning_rate_fn: Callable[[jax.Array], jax.Array],
    axis_name: str | None,
    sync_batch_stats: bool,
    temperature: float | None = None,
    loss_scale: float = 1.0,
    method: Any = None,
    micro_batch_per_device: int | None = None,
    freeze_bn: bool = False,
) -> tuple[TrainState, TrainMetrics]:
    """One pretraining step of any method on this device's slice of the global batch.

    The same code for every method: the method's target outputs (computed without gradient
    from the state's target network, if any), the forward pass of the online model on both
    views, the method's objective plus the online probe's loss, the gradient's mean over
    devices, the optimizer update, then the method's update of its extra state with the
    post-step online parameters and the step's targets (e.g. BYOL's EMA target, MoCo v2's
    queue).

    Args:
      state: the replicated train state.
      batch: {'view1', 'view2': [n, H, W, 3] float32, 'label': [n] int32 (outside
        [0, classes): no label), and optionally 'index': [n] int32, each example's position
        in the training split (the pipeline supplies it; InstDisc's memory bank needs it)}.
      model: the method's model (methods.build_model; with bn_axis_name=axis_name for global
        BN): outputs {'z', 'probe_logits', ...} for [2n] images.
      tx: the optimizer (LARS for pretraining).
      learning_rate_fn: the schedule, only for logging (tx holds its own).
      axis_name: the device axis, or None on a single device.
      sync_batch_stats: average running BN statistics across devices after the
        step; needed when BN is per-device so the replicated state stays equal.
      temperature: NT-Xent temperature, when `method` is None (SimCLR).
      loss_scale: multiplies the paper's NT-Xent in the optimised objective, when `method`
        is None; 2.0 reproduces the reference implementation (see losses.nt_xent).
      method: the method's step object (methods.from_config); None means
        SimCLR(temperature, loss_scale).
      micro_batch_per_device: None (or n) for one pass over the local batch;
        otherwise a divisor of n: the step embeds and back-propagates
        n / micro_batch_per_device micro-batches one at a time, with the exact
        gradient of the full-batch NT-Xent (see _micro_batch_grads).
      freeze_bn: normalise with the running BN statistics (inference-mode BN)
        and leave them unchanged.

    Returns:
      The new state and this step's metrics (global averages). The online probe's loss and
      top-1 are means over the labelled rows of the global batch (labels outside
      [0, classes), e.g. tfds's -1 for unlabelled examples, are masked; NaN over a logging
      interval without any labelled row). first_nonfinite_step / first_nonfinite_state_step:
      this step's number (1-based, as logged and checkpointed) when its loss / the state it
      produced holds a NaN or an infinity, else NO_NONFINITE_STEP.
    """
    if method is None:
        method = simclr_method.SimCLR(temperature=temperature, loss_scale=loss_scale)
    n = batch["view1"].shape[0]
    common = dict(model=model, method=method, axis_name=axis_name, freeze_bn=freeze_bn)
    if micro_batch_per_device is None or micro_batch_per_device == n:
        images = jnp.concatenate([batch["view1"], batch["view2"]], axis=0)
        targets, target_stats = method.targets(
            model,
            state,
            images,
            axis_name=axis_name,
            freeze_bn=freeze_bn,
            index=batch.get("index"),
        )
        grads, aux = _full_batch_grads(
            state.params, state.batch_stats, batch, targets=targets, **common
        )
    else:
        if not method.supports_micro_batching:
            raise ValueError(f"{method.name} does not support micro-batching (docs/methods.md).")
        targets, target_stats = None, None
        if micro_batch_per_device <= 0 or n % micro_batch_per_device:
            raise ValueError(
                f"micro_batch_per_device={micro_batch_per_device} must divide this device's "
                f"batch of {n} examples."
            )
        grads, aux = _micro_batch_grads(
            state.params,
            state.batch_stats,
            batch,
            micro_per_device=micro_batch_per_device,
            **common,
        )
    batch_stats, contrastive, aux, (ce_sum, correct, count) = aux
    # What the method's after_step needs from the online forward pass (NNCLR's projections,
    # InstDisc's embeddings), no gradient; the rest of aux is logged.
    aux = dict(aux)
    step_outputs = aux.pop("step_outputs", None)
    # nt_xent's gradient is this device's share, and so is the probe's (_probe_loss_share),
    # so the mean over devices is exactly the gradient of the global loss.
    grads = _pmean(grads, axis_name)
    if sync_batch_stats and not freeze_bn:
        batch_stats = _pmean(batch_stats, axis_name)
        if target_stats is not None:
            target_stats = _pmean(target_stats, axis_name)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(
        step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state
    )
    # After the optimizer step: an EMA target averages in the post-step online parameters; a
    # queue takes the step's keys (targets) or projections (step_outputs) from every device
    # (axis_name); a memory bank takes the embeddings at the batch's example indices.
    new_state = method.after_step(
        new_state,
        step=state.step,
        target_batch_stats=target_stats,
        targets=targets,
        outputs=step_outputs,
        axis_name=axis_name,
    )

    loss_value = contrastive  # already the global value
    # What a checkpoint of new_state would hold is checked here, on device: the host reads the
    # result at its next sync, which comes before any save (train.py), so nothing non-finite
    # is saved even when the loss before the update was finite.
    step_number = new_state.step.astype(jnp.int32)
    metrics = TrainMetrics.single_from_model_output(
        loss=loss_value,
        contrastive_acc=aux["contrastive_acc"],
        entropy=aux["entropy"],
        probe_loss=jnp.stack([_psum(ce_sum, axis_name), count]),
        probe_top1=jnp.stack([_psum(correct, axis_name), count]),
        learning_rate=learning_rate_fn(state.step),
        param_norm=optax.tree.norm(state.params),
        grad_norm=optax.tree.norm(grads),
        first_nonfinite_step=jnp.where(jnp.isfinite(loss_value), NO_NONFINITE_STEP, step_number),
        first_nonfinite_state_step=jnp.where(all_finite(new_state), NO_NONFINITE_STEP, step_number),
    )
    return new_state, metrics


def check_finite(first_bad_loss: int, first_bad_state: int = NO_NONFINITE_STEP) -> None:
    """Raises NonFiniteLossError naming the earliest step that went non-finite, if any.

    Args:
      first_bad_loss: the first step (1-based) whose loss was NaN/inf.
      first_bad_state: the first step whose update made the train state NaN/inf.
    """
    if min(first_bad_loss, first_bad_state) == NO_NONFINITE_STEP:
        return
    if first_bad_loss <= first_bad_state:
        what = f"the loss became non-finite at step {first_bad_loss}"
    else:
        what = (
            f"the update of step {first_bad_state} made the parameters or optimizer state "
            "non-finite (its loss was finite)"
        )
    raise NonFiniteLossError(
        f"{what}; stopping without saving it or any later step. The last checkpoint in the "
        "workdir is from before it: rerun the same command with a lower learning rate "
        "(config.optim.base_lr), a higher config.loss.temperature or float32 to continue from it."
    )


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
        f"use one of {config_checks.PARALLELISM_MODES}."
    )
