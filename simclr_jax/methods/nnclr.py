"""NNCLR (Dwibedi, Aytar, Tompson, Sermanet, Zisserman 2021, "With a Little Help from My
Friends", arXiv 2104.14548) on the train step.

Model: encoder -> projector (3 layers 2048-2048-256, BN after every layer, ReLU after all but
the last) -> predictor (2 layers 4096-256, BN + ReLU on the hidden layer); byol.BYOLModel's
structure (encoder, projector, predictor, probe) with these heads. No target network.

Support set: a FIFO queue (methods.queue: [K, d] float32 and its write position, replicated)
of unit projections of view 1 of earlier global batches, K = 98,304 in the paper. After each
step view 1's projections of the WHOLE global batch (all_gathered in global batch order)
replace the oldest rows (solo-learn's nnclr.py enqueues view 1's too).

Loss: memory_losses.nnclr_loss, symmetric: the anchor of image i's view 1 is the support-set
nearest neighbour (cosine) of its projection z1_i, scored against the predictions of view 2 of
the whole global batch (InfoNCE, its own image's prediction the positive, tau 0.1 in the
paper), and the same with the views swapped. The gradient reaches the network through the
predictions only. BatchNorm in both heads uses the encoder's axis (global BN under
config.model.global_bn). The online probe on stop_gradient(h) is SimCLR's.

Config fields read (config.method): name ('nnclr'), temperature (> 0), queue_size (a multiple
of train.batch_size), projector_hidden_dim, projector_dim, predictor_hidden_dim (> 0).

Checkpoint tree: a SupportSetTrainState: params {'encoder', 'projector', 'predictor',
'probe'}, batch_stats {'encoder', 'projector', 'predictor'}, opt_state, queue
[K, projector_dim] and queue_ptr.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections as mlc
import optax

from simclr_jax import config_checks, memory_losses, models, train_state
from simclr_jax.losses import l2_normalize
from simclr_jax.methods import diagnostics
from simclr_jax.methods import queue as queue_lib
from simclr_jax.methods.byol import BYOLModel
from simclr_jax.methods.heads import MLPHead, head_options

NAME = "nnclr"
TITLE = "NNCLR"  # in progress lines and tables
# fold_in of the state's PRNG key that draws the initial support set (the parameters use the
# key itself, as every method's).
QUEUE_RNG_FOLD = 1


def build_model(
    config: mlc.ConfigDict,
    *,
    num_classes: int,
    bn_axis_name: str | None = None,
    conv: models.ModuleDef = nn.Conv,
) -> BYOLModel:
    """config.model's encoder, NNCLR's projector and predictor, the probe."""
    model_cfg, method_cfg = config.model, config.method
    head = head_options(model_cfg, bn_axis_name)
    dim = method_cfg.projector_dim
    return BYOLModel(
        encoder=models.build_encoder(model_cfg, bn_axis_name=bn_axis_name, conv=conv),
        projector=MLPHead(
            method_cfg.projector_hidden_dim,
            dim,
            num_layers=3,
            last_bn=True,
            last_bn_affine=True,
            **head,
        ),
        predictor=MLPHead(method_cfg.predictor_hidden_dim, dim, **head),
        probe=models.LinearHead(num_classes=num_classes, dtype=jnp.float32),
    )


@dataclasses.dataclass(frozen=True)
class NNCLR:
    """NNCLR's part of the train step.

    Attributes:
      temperature: tau of the InfoNCE.
      queue_size: K, the support set's rows (a multiple of the global batch).
    """

    temperature: float
    queue_size: int
    name: str = NAME
    supports_micro_batching: bool = False

    def create_state(
        self, model: nn.Module, tx: optax.GradientTransformation, rng: jax.Array, image_shape
    ) -> train_state.SupportSetTrainState:
        """The plain state and a support set of random unit vectors."""
        base = train_state.create_train_state(model, tx, rng, image_shape)
        queue, ptr = queue_lib.init(
            jax.random.fold_in(rng, QUEUE_RNG_FOLD), self.queue_size, model.projector.out_dim
        )
        return train_state.extend(
            base, train_state.SupportSetTrainState, queue=queue, queue_ptr=ptr
        )

    def targets(self, model, state, images, *, axis_name, freeze_bn, index=None):
        """({'support': the support set [K, d], no gradient}, None): no target network."""
        del model, images, axis_name, freeze_bn, index
        return {"support": jax.lax.stop_gradient(state.queue)}, None

    def objective(self, outputs: dict, targets: dict, *, n: int, axis_name: str | None):
        """(loss, loss, aux): memory_losses.nnclr_loss of outputs['z'] and outputs['p'].

        outputs['z'], outputs['p'] are [2n, d] (view 1's rows, then view 2's). aux holds the
        diagnostics (view 1's projections retrieving their own view 2's among the global
        batch's, at the loss's temperature) and, as 'step_outputs', view 1's unit
        projections [n, d] without gradient, which after_step enqueues.
        """
        z, p = outputs["z"], outputs["p"]
        loss, _ = memory_losses.nnclr_loss(
            z[:n], z[n:], p[:n], p[n:], targets["support"], self.temperature, axis_name
        )
        aux = diagnostics.view_retrieval(z[:n], z[n:], axis_name, self.temperature)
        aux["step_outputs"] = l2_normalize(jax.lax.stop_gradient(z[:n]))
        return loss, loss, aux

    def embedding_loss(self, z1, z2, axis_name):
        raise NotImplementedError("NNCLR does not support micro-batching (docs/methods.md).")

    def after_step(
        self, new_state, *, step, target_batch_stats, targets=None, outputs=None, axis_name=None
    ):
        """The global batch's view-1 unit projections (`outputs`) enqueued in the support set.

        Args:
          new_state: the SupportSetTrainState after the optimizer step.
          step, target_batch_stats, targets: unused (no target network).
          outputs: this device's [n, d] unit projections (objective's 'step_outputs').
          axis_name: the device axis they are gathered over, or None.
        """
        del step, target_batch_stats, targets
        queue, ptr = queue_lib.enqueue(new_state.queue, new_state.queue_ptr, outputs, axis_name)
        return new_state.replace(queue=queue, queue_ptr=ptr)


def from_config(config: mlc.ConfigDict, *, total_steps: int, num_examples: int = 0) -> NNCLR:
    """NNCLR with config.method.temperature and queue_size."""
    del total_steps, num_examples  # num_examples: only a memory bank needs it
    return NNCLR(temperature=config.method.temperature, queue_size=config.method.queue_size)


def check_config(config: mlc.ConfigDict) -> None:
    """Raises ConfigError for a temperature <= 0, a head width <= 0 or a queue size that is
    not a positive multiple of train.batch_size."""
    config_checks.require_positive(config, "method.temperature")
    for field in ("projector_hidden_dim", "projector_dim", "predictor_hidden_dim"):
        config_checks.require_positive(config, f"method.{field}")
    queue_lib.check_size(config.method.queue_size, config.train.batch_size)
