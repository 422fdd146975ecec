"""SimCLR (Chen et al. 2020, arXiv 2002.05709) as a method of the generic train step.

Heads: the projection head g (models.ProjectionHead, config.model.head_*); no extra state;
loss: NT-Xent over the global batch (losses.nt_xent, the paper's equation 1), multiplied by
config.loss.loss_scale (2.0 reproduces the reference code's objective); augmentation: the
config.augment recipe, the same for both views. The checkpoint tree is the plain TrainState's:
params {'encoder', 'head', 'probe'}, batch_stats, opt_state.
"""

import dataclasses

import flax.linen as nn
import jax
import ml_collections as mlc

from simclr_jax import losses, models
from simclr_jax.methods import base

NAME = "simclr"
TITLE = "SimCLR"  # in progress lines and tables


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
class SimCLR(base.EmbeddingLossMethod):
    """SimCLR's part of the train step.

    Attributes:
      temperature: NT-Xent temperature.
      loss_scale: multiplies NT-Xent in the optimised objective (see losses.nt_xent).
    """

    temperature: float = 0.5
    loss_scale: float = 1.0
    name: str = NAME

    def embedding_loss(self, z1: jax.Array, z2: jax.Array, axis_name: str | None):
        """(loss_scale * NT-Xent, (NT-Xent, its diagnostics)) of the two views' z [n, d]."""
        loss, aux = losses.nt_xent(z1, z2, temperature=self.temperature, axis_name=axis_name)
        return self.loss_scale * loss, (loss, aux)


def from_config(config: mlc.ConfigDict, *, total_steps: int, num_examples: int = 0) -> SimCLR:
    """SimCLR with config.loss.temperature and config.loss.loss_scale."""
    del total_steps, num_examples  # num_examples: only a memory bank needs it
    return SimCLR(temperature=config.loss.temperature, loss_scale=config.loss.loss_scale)


def check_config(config: mlc.ConfigDict) -> None:
    """Nothing beyond config_checks.validate_pretrain_config."""
    del config
