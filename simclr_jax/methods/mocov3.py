"""MoCo v3, ResNet variant (Chen, Xie, He 2021, arXiv 2104.02057) on the train step.

Query side: encoder -> projector (Linear-BN-ReLU-Linear-BN, no biases, the output BN without
affine parameters; 2048-4096-256 in the paper) -> predictor (Linear-BN-ReLU-Linear, 4096-256).
Key side: the momentum encoder and projector, an EMA of the query ones by BYOL's machinery
(methods.byol: TargetTrainState, the cosine-raised rate of methods.ema). The EMA runs after each
optimizer step with the post-step parameters; the paper's code updates it at the start of the
next step before computing the keys, which is the same sequence of values.
Loss (the paper's Algorithm 1): ctr(q1, k2) + ctr(q2, k1) with
ctr(q, k) = 2 tau * CE(q k^T / tau) over the keys of the whole global batch (all_gather), the
positive of query i being its own image's key; q and k l2-normalised.

Config fields read (config.method): name ('mocov3'), tau_base, temperature,
projector_hidden_dim, projector_dim, predictor_hidden_dim.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections as mlc
import optax

from simclr_jax import config_checks, losses, models
from simclr_jax.methods import byol

NAME = "mocov3"
# MoCo v3 uses BYOL's augmentations (asymmetric blur and solarisation).
AUGMENT = byol.AUGMENT


def build_model(
    config: mlc.ConfigDict,
    *,
    num_classes: int,
    bn_axis_name: str | None = None,
    conv: models.ModuleDef = nn.Conv,
) -> byol.BYOLModel:
    """Encoder, projector and predictor (BYOLModel's structure with MoCo v3's heads), probe."""
    model_cfg, method_cfg = config.model, config.method
    head = dict(
        bn_axis_name=bn_axis_name,
        bn_momentum=model_cfg.bn_momentum,
        bn_epsilon=model_cfg.bn_epsilon,
        dtype=models.get_dtype(model_cfg.dtype),
    )
    dim = method_cfg.projector_dim
    return byol.BYOLModel(
        encoder=models.build_encoder(model_cfg, bn_axis_name=bn_axis_name, conv=conv),
        projector=byol.MLPHead(
            method_cfg.projector_hidden_dim, dim, use_bias=False, last_bn=True, **head
        ),
        predictor=byol.MLPHead(method_cfg.predictor_hidden_dim, dim, use_bias=False, **head),
        probe=models.LinearHead(num_classes=num_classes, dtype=jnp.float32),
    )


def mocov3_loss(q: jax.Array, k: jax.Array, temperature: float, axis_name: str | None):
    """2 tau * CE(q k^T / tau) with every device's keys as candidates (MoCo v3, Algorithm 1).

    Args:
      q: this device's queries [n, d]; k: this device's keys [n, d] (gradient stopped by the
        caller); devices hold equal n.
      temperature: tau.
      axis_name: the device axis, or None on one device.

    Returns:
      A float32 scalar: the mean over the global batch's queries; its gradient is this
      device's share (as byol.byol_loss), so the step's pmean gives the global gradient.
    """
    q, k = losses.l2_normalize(q), losses.l2_normalize(k)
    n = q.shape[0]
    offset = 0
    if axis_name is not None:
        k = jax.lax.all_gather(k, axis_name, axis=0, tiled=True)
        offset = jax.lax.axis_index(axis_name) * n
    logits = q @ k.T / temperature
    labels = offset + jnp.arange(n)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    local = 2.0 * temperature * jnp.mean(ce)
    if axis_name is None:
        return local
    return local + jax.lax.stop_gradient(jax.lax.pmean(local, axis_name) - local)


@dataclasses.dataclass(frozen=True)
class MoCoV3(byol.BYOL):
    """MoCo v3's part of the train step: BYOL's target machinery, MoCo v3's loss.

    Attributes:
      temperature: tau of the loss.
    """

    temperature: float = 1.0
    name: str = NAME

    def objective(self, outputs: dict, targets: jax.Array, *, n: int, axis_name: str | None):
        """(loss, loss, diagnostics): ctr(q1, k2) + ctr(q2, k1); q = outputs['p']."""
        q = outputs["p"]
        loss = mocov3_loss(q[:n], targets[n:], self.temperature, axis_name) + mocov3_loss(
            q[n:], targets[:n], self.temperature, axis_name
        )
        _, aux = losses.nt_xent(
            jax.lax.stop_gradient(q[:n]),
            targets[n:],
            temperature=self.temperature,
            axis_name=axis_name,
        )
        return (
            loss,
            loss,
            {"contrastive_acc": aux["contrastive_acc_ab"], "entropy": aux["entropy_ab"]},
        )


def from_config(config: mlc.ConfigDict, *, total_steps: int) -> MoCoV3:
    """MoCo v3 with config.method.tau_base and temperature."""
    return MoCoV3(
        tau_base=config.method.tau_base,
        total_steps=total_steps,
        temperature=config.method.temperature,
    )


def check_config(config: mlc.ConfigDict) -> None:
    """BYOL's checks, and a temperature > 0."""
    byol.check_config(config)
    config_checks.require_positive(config, "method.temperature")
