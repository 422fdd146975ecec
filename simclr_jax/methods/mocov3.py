"""MoCo v3, ResNet variant (Chen, Xie, He 2021, arXiv 2104.02057) on the train step.

Query side: encoder -> projector (Linear-BN-ReLU-Linear-BN, no biases, the output BN without
affine parameters; 2048-4096-256 in the paper) -> predictor (Linear-BN-ReLU-Linear, 4096-256).
Key side: the momentum encoder and projector, an EMA of the query ones by BYOL's machinery
(methods.byol: TargetTrainState, the cosine-raised rate of methods.ema). The EMA runs after each
optimizer step with the post-step parameters; the paper's code updates it at the start of the
next step before computing the keys, which is the same sequence of values.
Loss (the paper's Algorithm 1, method_losses.moco_v3_loss): ctr(q1, k2) + ctr(q2, k1) with
ctr(q, k) = 2 tau * CE(q k^T / tau) over the keys of the whole global batch (all_gather), the
positive of query i being its own image's key; q and k l2-normalised. Augmentations: BYOL's
(configs/augment_recipes.py) with crop area (0.2, 1) on ImageNet.

Config fields read (config.method): name ('mocov3'), tau_base, temperature,
projector_hidden_dim, projector_dim, predictor_hidden_dim.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections as mlc

from simclr_jax import config_checks, method_losses, models
from simclr_jax.methods import byol, diagnostics
from simclr_jax.methods.heads import MLPHead, head_options

NAME = "mocov3"
TITLE = "MoCo v3"  # in progress lines and tables


def build_model(
    config: mlc.ConfigDict,
    *,
    num_classes: int,
    bn_axis_name: str | None = None,
    conv: models.ModuleDef = nn.Conv,
) -> byol.BYOLModel:
    """Encoder, projector and predictor (BYOLModel's structure with MoCo v3's heads), probe."""
    model_cfg, method_cfg = config.model, config.method
    head = head_options(model_cfg, bn_axis_name)
    dim = method_cfg.projector_dim
    return byol.BYOLModel(
        encoder=models.build_encoder(model_cfg, bn_axis_name=bn_axis_name, conv=conv),
        projector=MLPHead(
            method_cfg.projector_hidden_dim,
            dim,
            use_bias=False,
            out_bias=False,
            last_bn=True,
            **head,
        ),
        predictor=MLPHead(
            method_cfg.predictor_hidden_dim, dim, use_bias=False, out_bias=False, **head
        ),
        probe=models.LinearHead(num_classes=num_classes, dtype=jnp.float32),
    )


@dataclasses.dataclass(frozen=True)
class MoCoV3(byol.BYOL):
    """MoCo v3's part of the train step: BYOL's target machinery, MoCo v3's loss.

    Attributes:
      temperature: tau of the loss.
    """

    temperature: float = 1.0
    name: str = NAME

    def objective(self, outputs: dict, targets: jax.Array, *, n: int, axis_name: str | None):
        """(loss, loss, diagnostics): method_losses.moco_v3_loss, ctr(q1, k2) + ctr(q2, k1).

        outputs['p'] (the queries) and targets (the keys) are [2n, d]: view 1's rows, then
        view 2's. The diagnostics are the loss's own: its top-1 over every device's keys, and
        the entropy of the softmax at the loss's temperature.
        """
        q = outputs["p"]
        loss, _ = method_losses.moco_v3_loss(
            q[:n], q[n:], targets[:n], targets[n:], self.temperature, axis_name
        )
        diag = diagnostics.view_retrieval(q[:n], targets[n:], axis_name, self.temperature)
        return loss, loss, diag


def from_config(config: mlc.ConfigDict, *, total_steps: int, num_examples: int = 0) -> MoCoV3:
    """MoCo v3 with config.method.tau_base and temperature."""
    del num_examples  # the training split's size: only a memory bank needs it
    return MoCoV3(
        tau_base=config.method.tau_base,
        total_steps=total_steps,
        temperature=config.method.temperature,
    )


def check_config(config: mlc.ConfigDict) -> None:
    """BYOL's checks, and a temperature > 0."""
    byol.check_config(config)
    config_checks.require_positive(config, "method.temperature")
