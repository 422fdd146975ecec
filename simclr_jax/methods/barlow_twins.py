"""Barlow Twins (Zbontar et al. 2021, arXiv 2103.03230) on the train step.

Model: encoder -> projector (heads.MLPHead, 3 layers, no biases, BN+ReLU on the two hidden
layers; 8192-8192-8192 in the paper) and the online probe on stop_gradient(h). No target
network, no predictor. Loss: method_losses.barlow_twins_loss, the paper's eq. 1 on the
cross-correlation of the two views' projections standardised per feature over the GLOBAL batch
(the official code's synchronised non-affine BatchNorm1d), times config.method.loss_scale.
Augmentations: BYOL's (configs/augment_recipes.py), as the paper.

Config fields read (config.method): name ('barlow_twins'), lambd (the off-diagonal weight,
>= 0; the paper's 0.0051), loss_scale (> 0; 1.0 as the official code, 0.1 in solo-learn's
CIFAR recipe), projector_hidden_dim, projector_dim (> 0).

Checkpoint tree: the plain TrainState's: params {'encoder', 'projector', 'probe'},
batch_stats {'encoder', 'projector'}, opt_state.
"""

import dataclasses

import flax.linen as nn
import jax
import ml_collections as mlc

from simclr_jax import config_checks, method_losses, models
from simclr_jax.methods import base, diagnostics
from simclr_jax.methods.heads import ProjectorModel, build_projector_model

NAME = "barlow_twins"
TITLE = "Barlow Twins"  # in progress lines and tables
PROJECTOR_LAYERS = 3


def build_model(
    config: mlc.ConfigDict,
    *,
    num_classes: int,
    bn_axis_name: str | None = None,
    conv: models.ModuleDef = nn.Conv,
) -> ProjectorModel:
    """Encoder, Barlow Twins' 3-layer projector without biases, and the probe."""
    return build_projector_model(
        config,
        num_classes=num_classes,
        bn_axis_name=bn_axis_name,
        conv=conv,
        num_layers=PROJECTOR_LAYERS,
        use_bias=False,
        out_bias=False,
    )


@dataclasses.dataclass(frozen=True)
class BarlowTwins(base.EmbeddingLossMethod):
    """Barlow Twins' part of the train step.

    Attributes:
      lambd: weight of the off-diagonal terms.
      loss_scale: multiplies the loss in the optimised objective (not the reported loss).
    """

    lambd: float = 0.0051
    loss_scale: float = 1.0
    name: str = NAME

    def embedding_loss(self, z1: jax.Array, z2: jax.Array, axis_name: str | None):
        """(loss_scale * L, (L, diagnostics)) with L = method_losses.barlow_twins_loss."""
        loss, _ = method_losses.barlow_twins_loss(z1, z2, self.lambd, axis_name)
        return self.loss_scale * loss, (loss, diagnostics.view_retrieval(z1, z2, axis_name))


def from_config(config: mlc.ConfigDict, *, total_steps: int, num_examples: int = 0) -> BarlowTwins:
    """BarlowTwins with config.method.lambd and loss_scale."""
    del total_steps, num_examples  # num_examples: only a memory bank needs it
    return BarlowTwins(lambd=config.method.lambd, loss_scale=config.method.loss_scale)


def check_config(config: mlc.ConfigDict) -> None:
    """Raises ConfigError for a negative lambd, a non-positive loss_scale or head width."""
    config_checks.require_positive(config, "method.lambd", allow_zero=True)
    for field in ("loss_scale", "projector_hidden_dim", "projector_dim"):
        config_checks.require_positive(config, f"method.{field}")
