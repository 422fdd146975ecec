"""VICReg (Bardes, Ponce, LeCun 2022, arXiv 2105.04906) on the train step.

Model: encoder -> expander (heads.MLPHead, 3 layers, biases on the two hidden layers, BN+ReLU
after them, a plain Linear without bias last; 8192-8192-8192 in the paper) and the online
probe on stop_gradient(h). No target network, no predictor. Loss:
method_losses.vicreg_loss in the official code's form (the coefficients 25 / 25 / 1 were tuned
with it): invariance, variance and covariance with the variance and covariance over the GLOBAL
batch. Augmentations: BYOL's (configs/augment_recipes.py), as the paper.

Config fields read (config.method): name ('vicreg'), sim_coeff, std_coeff, cov_coeff (>= 0;
lambda, mu, nu of the paper), projector_hidden_dim, projector_dim (> 0).

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

NAME = "vicreg"
TITLE = "VICReg"  # in progress lines and tables
PROJECTOR_LAYERS = 3
COEFFICIENTS = ("sim_coeff", "std_coeff", "cov_coeff")


def build_model(
    config: mlc.ConfigDict,
    *,
    num_classes: int,
    bn_axis_name: str | None = None,
    conv: models.ModuleDef = nn.Conv,
) -> ProjectorModel:
    """Encoder, VICReg's 3-layer expander, and the probe."""
    return build_projector_model(
        config,
        num_classes=num_classes,
        bn_axis_name=bn_axis_name,
        conv=conv,
        num_layers=PROJECTOR_LAYERS,
        use_bias=True,
        out_bias=False,
    )


@dataclasses.dataclass(frozen=True)
class VICReg(base.EmbeddingLossMethod):
    """VICReg's part of the train step.

    Attributes:
      sim_coeff, std_coeff, cov_coeff: the weights of invariance, variance and covariance.
    """

    sim_coeff: float = 25.0
    std_coeff: float = 25.0
    cov_coeff: float = 1.0
    name: str = NAME

    def embedding_loss(self, z1: jax.Array, z2: jax.Array, axis_name: str | None):
        """(L, (L, diagnostics)) with L = method_losses.vicreg_loss."""
        loss, _ = method_losses.vicreg_loss(
            z1,
            z2,
            sim_coeff=self.sim_coeff,
            std_coeff=self.std_coeff,
            cov_coeff=self.cov_coeff,
            axis_name=axis_name,
        )
        return loss, (loss, diagnostics.view_retrieval(z1, z2, axis_name))


def from_config(config: mlc.ConfigDict, *, total_steps: int, num_examples: int = 0) -> VICReg:
    """VICReg with config.method's three coefficients."""
    del total_steps, num_examples  # num_examples: only a memory bank needs it
    return VICReg(**{name: config.method[name] for name in COEFFICIENTS})


def check_config(config: mlc.ConfigDict) -> None:
    """Raises ConfigError for a negative coefficient or a non-positive head width."""
    for name in COEFFICIENTS:
        config_checks.require_positive(config, f"method.{name}", allow_zero=True)
    for field in ("projector_hidden_dim", "projector_dim"):
        config_checks.require_positive(config, f"method.{field}")
