"""SimCLR (Chen et al. 2020, arXiv 2002.05709) as a method of the generic train step.

Heads: the projection head g (models.ProjectionHead, config.model.head_*); no extra state;
loss: NT-Xent over the global batch (losses.nt_xent, the paper's equation 1), multiplied by
config.loss.loss_scale (2.0 reproduces the reference code's objective); augmentation: the
config.augment recipe, the same for both views. The checkpoint tree is the plain TrainState's:
params {'encoder', 'head', 'probe'}, batch_stats, opt_state.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import ml_collections as mlc
import optax

from simclr_jax import losses, models, train_state

NAME = "simclr"
# SimCLR's own augment recipe is the config.augment section itself (configs/cifar10.py).
AUGMENT: dict[str, Any] = {}


def build_model(
    config: mlc.ConfigDict,
    *,
    num_classes: int,
    bn_axis_name: str | None = None,
    conv: models.ModuleDef = nn.Conv,
) -> nn.Module:
    """models.build_model(config.model, ...): encoder + projection head + online probe."""
    return models.build_model(
        config.model, num_classes=num_classes, bn_axis_name=bn_axis_name, conv=conv
    )


@dataclasses.dataclass(frozen=True)
class SimCLR:
    """SimCLR's part of the train step.

    Attributes:
      temperature: NT-Xent temperature.
      loss_scale: multiplies NT-Xent in the optimised objective (see losses.nt_xent).
    """

    temperature: float
    loss_scale: float = 1.0
    name: str = NAME
    # Gradient caching (steps._micro_batch_grads) is exact for a loss of z alone.
    supports_micro_batching: bool = True

    def create_state(
        self, model: nn.Module, tx: optax.GradientTransformation, rng: jax.Array, image_shape
    ) -> train_state.TrainState:
        """The plain TrainState (see methods.create_train_state)."""
        return train_state.create_train_state(model, tx, rng, image_shape)

    def targets(self, model, state, images, *, axis_name, freeze_bn):
        """No target network: (None, None)."""
        del model, state, images, axis_name, freeze_bn
        return None, None

    def embedding_loss(self, z1: jax.Array, z2: jax.Array, axis_name: str | None):
        """(loss_scale * NT-Xent, (NT-Xent, its diagnostics)) of the two views' z [n, d]."""
        loss, aux = losses.nt_xent(z1, z2, temperature=self.temperature, axis_name=axis_name)
        return self.loss_scale * loss, (loss, aux)

    def objective(self, outputs: dict, targets, *, n: int, axis_name: str | None):
        """(optimised objective, reported loss, {'contrastive_acc', 'entropy'}).

        outputs['z'] is [2n, d]: view 1's rows, then view 2's.
        """
        del targets
        z = outputs["z"]
        scaled, (loss, aux) = self.embedding_loss(z[:n], z[n:], axis_name)
        return scaled, loss, aux

    def after_step(self, new_state, *, step, target_batch_stats):
        """Nothing to update."""
        del step, target_batch_stats
        return new_state


def from_config(config: mlc.ConfigDict, *, total_steps: int) -> SimCLR:
    """SimCLR with config.loss.temperature and config.loss.loss_scale."""
    del total_steps
    return SimCLR(temperature=config.loss.temperature, loss_scale=config.loss.loss_scale)


def check_config(config: mlc.ConfigDict) -> None:
    """Nothing beyond config_checks.validate_pretrain_config."""
    del config
