"""MoCo v2 (Chen, Fan, Girshick, He 2020, arXiv 2003.04297) on the train step.

Query side: encoder -> projection head (MoCo v2's MLP head: Linear(2048) -> ReLU -> Linear(128),
biases, no BatchNorm; heads.MLPHead with hidden_bn=False). Key side: the key encoder and head,
an EMA of the query ones at a CONSTANT momentum m (0.999 in the paper; methods.ema.ema_update
after each optimizer step with the post-step parameters, the same sequence of values as MoCo's
update at the start of the next step), no gradient. A queue of the K most recent keys
(methods.queue: [K, d] float32 and its write position, replicated on every device) supplies
the negatives.

Loss (the paper's, one direction, not symmetrised): memory_losses.moco_v2_loss, the InfoNCE of
each query q (view 1) against its key k+ (view 2, stop_gradient) and the queue's K keys,
logits [q.k+, q.queue^T] / tau with q, k l2-normalised, tau 0.2. After the step the keys of
view 2 of the WHOLE global batch (all_gathered in global batch order) replace the oldest K
rows of the queue. (solo-learn's "MoCo V2+" symmetrises the loss with a queue per view; not
done here.)

BatchNorm: global BN (statistics over every device's images) in place of the paper's
shuffle-BN. Shuffle-BN exists to stop a query and its key from sharing per-GPU batch
statistics (an information leak that lets the model cheat); with statistics over the whole
global batch that leak is of one image among N, as in SimCLR and MoCo v3, which use global BN.
The key encoder runs on view 2 only (its BN statistics are over the N view-2 images, as
MoCo's key encoder's); the query encoder runs, as the trainer's one online forward pass, on
both views (BN over 2N images; the online probe trains on both), and the loss uses the view-1
rows only. The online probe on stop_gradient(h) is SimCLR's.

Config fields read (config.method): name ('mocov2'), momentum (in [0, 1]), temperature (> 0),
queue_size (a multiple of train.batch_size), projector_hidden_dim, projector_dim (> 0).

Checkpoint tree: a QueueTrainState: params {'encoder', 'projector', 'probe'}, batch_stats
{'encoder'}, opt_state, target_params {'encoder', 'projector'}, target_batch_stats {'encoder'},
queue [K, projector_dim] and queue_ptr.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections as mlc
import optax

from simclr_jax import config_checks, memory_losses, models, train_state
from simclr_jax.losses import l2_normalize
from simclr_jax.methods import diagnostics, ema
from simclr_jax.methods import queue as queue_lib
from simclr_jax.methods.heads import ProjectorModel, build_projector_model

NAME = "mocov2"
TITLE = "MoCo v2"  # in progress lines and tables
# The query submodules the key encoder averages.
TARGET_MODULES = ("encoder", "projector")
# fold_in of the state's PRNG key that draws the initial queue (the parameters use the key
# itself, so they are those of the other methods' models with the same seed).
QUEUE_RNG_FOLD = 1


def build_model(
    config: mlc.ConfigDict,
    *,
    num_classes: int,
    bn_axis_name: str | None = None,
    conv: models.ModuleDef = nn.Conv,
) -> ProjectorModel:
    """config.model's encoder, MoCo v2's 2-layer head without BN, the probe; the key path is
    ProjectorModel.target_forward."""
    return build_projector_model(
        config,
        num_classes=num_classes,
        bn_axis_name=bn_axis_name,
        conv=conv,
        num_layers=2,
        hidden_bn=False,
    )


@dataclasses.dataclass(frozen=True)
class MoCoV2:
    """MoCo v2's part of the train step.

    Attributes:
      momentum: m of the key encoder's EMA, constant over the run.
      temperature: tau of the InfoNCE.
      queue_size: K, the negatives (a multiple of the global batch).
    """

    momentum: float
    temperature: float
    queue_size: int
    name: str = NAME
    supports_micro_batching: bool = False

    def create_state(
        self, model: nn.Module, tx: optax.GradientTransformation, rng: jax.Array, image_shape
    ) -> train_state.QueueTrainState:
        """The query state, a key encoder equal to it, a queue of random unit keys."""
        base = train_state.create_train_state(model, tx, rng, image_shape)
        head = base.params["projector"]
        dim = head[f"dense_{len(head) - 1}"]["kernel"].shape[1]
        queue, ptr = queue_lib.init(jax.random.fold_in(rng, QUEUE_RNG_FOLD), self.queue_size, dim)
        target = ema.init_target(base, TARGET_MODULES)
        return train_state.extend(
            base, train_state.QueueTrainState, **target, queue=queue, queue_ptr=ptr
        )

    def targets(self, model, state, images, *, axis_name, freeze_bn, index=None):
        """({'keys': unit keys of view 2 [n, d], 'queue': state.queue}, the key encoder's new
        BN statistics); no gradient.

        images: [2n, ...], view 1's rows then view 2's; the key encoder sees view 2 only.
        """
        del axis_name, index  # the model's BatchNorm layers carry the axis
        view2 = images[images.shape[0] // 2 :]
        variables = {"params": state.target_params, "batch_stats": state.target_batch_stats}
        forward = dict(method=ProjectorModel.target_forward)
        if freeze_bn:
            k = model.apply(variables, view2, train=False, **forward)
            stats = state.target_batch_stats
        else:
            k, new = model.apply(variables, view2, train=True, mutable=["batch_stats"], **forward)
            stats = new["batch_stats"]
        keys = l2_normalize(jax.lax.stop_gradient(k))
        return {"keys": keys, "queue": jax.lax.stop_gradient(state.queue)}, stats

    def objective(self, outputs: dict, targets: dict, *, n: int, axis_name: str | None):
        """(loss, loss, diagnostics): memory_losses.moco_v2_loss of the view-1 queries.

        outputs['z'] is [2n, d] (view 1's rows, then view 2's); targets as `targets` returns.
        The diagnostics compare the queries with the global batch's keys at the loss's
        temperature (diagnostics.view_retrieval, as MoCo v3's).
        """
        q = outputs["z"][:n]
        keys = targets["keys"]
        loss, _ = memory_losses.moco_v2_loss(q, keys, targets["queue"], self.temperature, axis_name)
        return loss, loss, diagnostics.view_retrieval(q, keys, axis_name, self.temperature)

    def embedding_loss(self, z1, z2, axis_name):
        raise NotImplementedError("MoCo v2 does not support micro-batching (docs/methods.md).")

    def after_step(
        self, new_state, *, step, target_batch_stats, targets=None, outputs=None, axis_name=None
    ):
        """The key encoder's EMA of the post-step query encoder and head at the constant
        momentum, and the global batch's keys enqueued.

        Args:
          new_state: the QueueTrainState after the optimizer step.
          step: unused (the momentum is constant).
          target_batch_stats: the key encoder's BN statistics from `targets` (None: kept).
          targets: what `targets` returned for this step (its 'keys' are enqueued).
          outputs: unused (the keys come from the key encoder, in `targets`).
          axis_name: the device axis the keys are gathered over, or None.
        """
        del step, outputs
        tau = jnp.float32(self.momentum)
        queue, ptr = queue_lib.enqueue(
            new_state.queue, new_state.queue_ptr, targets["keys"], axis_name
        )
        return new_state.replace(
            **ema.target_after_step(new_state, TARGET_MODULES, tau, target_batch_stats),
            queue=queue,
            queue_ptr=ptr,
        )


def from_config(config: mlc.ConfigDict, *, total_steps: int, num_examples: int = 0) -> MoCoV2:
    """MoCo v2 with config.method.momentum, temperature and queue_size."""
    del total_steps, num_examples  # num_examples: only a memory bank needs it
    return MoCoV2(
        momentum=config.method.momentum,
        temperature=config.method.temperature,
        queue_size=config.method.queue_size,
    )


def check_config(config: mlc.ConfigDict) -> None:
    """Raises ConfigError for a momentum outside [0, 1], a temperature <= 0, a head width <= 0
    or a queue size that is not a positive multiple of train.batch_size."""
    m = config.method.momentum
    if isinstance(m, bool) or not isinstance(m, int | float) or not 0.0 <= m <= 1.0:
        config_checks.fail("method.momentum", m, "the key encoder's momentum must lie in [0, 1].")
    config_checks.require_positive(config, "method.temperature")
    for field in ("projector_hidden_dim", "projector_dim"):
        config_checks.require_positive(config, f"method.{field}")
    queue_lib.check_size(config.method.queue_size, config.train.batch_size)
