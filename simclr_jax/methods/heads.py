"""The family's MLP heads (projectors, predictors, expanders) and the encoder+projector model.

The heads of each method (papers' and official code's sizes; configs/<method>_cifar10.py set
the CIFAR recipes'):
- BYOL: projector and predictor of 2 layers, 4096-256, biases, BN+ReLU on the hidden layer.
- MoCo v3 (ResNet): projector of 2 layers 4096-256 (the official code's ResNet heads; its ViT
  projector has 3), no biases, a BN without affine parameters on the output; predictor of 2
  layers 4096-256, no biases.
- Barlow Twins: projector of 3 layers 8192-8192-8192, no biases, BN+ReLU on the hidden layers.
- VICReg: "expander" of 3 layers 8192-8192-8192, biases on the hidden layers, none on the
  output.
- MoCo v2: 2 layers 2048-128, biases, no BN (Linear-ReLU-Linear; hidden_bn=False).
- NNCLR: projector of 3 layers 2048-2048-256 with BN after every layer (an affine BN on the
  output) and ReLU after all but the last; predictor of 2 layers 4096-256, BYOL's shape.
- InstDisc: one Linear layer to 128 (num_layers=1).
SimCLR's projection head is models.ProjectionHead (the reference's variable names).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections as mlc

from simclr_jax import models


class MLPHead(nn.Module):
    """num_layers Dense layers; BN -> ReLU after each but the last (ReLU alone with
    hidden_bn=False); optionally BN on the output.

    Variables: dense_0 ... dense_{L-1}, bn_0 ... bn_{L-2} (and bn_{L-1} with last_bn), so a
    2-layer head is Linear(hidden) -> BN -> ReLU -> Linear(out), BYOL's projector.

    Attributes:
      hidden_dim: width of the hidden layers (4096 in the BYOL paper).
      out_dim: width of the output (256 in the BYOL paper).
      num_layers: Dense layers, >= 1 (1: a single Linear(out)).
      bn_axis_name: axis name for cross-device BatchNorm statistics; None = per-device.
      bn_momentum: BN running-average momentum.
      bn_epsilon: BN epsilon.
      dtype: computation dtype; parameters and BN statistics stay float32.
      use_bias: biases on the hidden Dense layers.
      out_bias: a bias on the last Dense layer.
      last_bn: a BatchNorm on the output, without scale or bias (MoCo v3's projector) unless
        last_bn_affine.
      last_bn_affine: the output BatchNorm has a scale and a bias (NNCLR's projector).
      hidden_bn: BatchNorm on the hidden layers; False gives Linear -> ReLU -> ... -> Linear
        without bn_* variables (MoCo v2's head).
    """

    hidden_dim: int
    out_dim: int
    num_layers: int = 2
    bn_axis_name: str | None = None
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    dtype: Any = jnp.float32
    use_bias: bool = True
    out_bias: bool = True
    last_bn: bool = False
    last_bn_affine: bool = False
    hidden_bn: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """[n, d] -> float32 [n, out_dim]."""
        if self.num_layers < 1:
            raise ValueError(f"num_layers must be >= 1; got {self.num_layers}.")
        kinds = dict(dtype=self.dtype, param_dtype=jnp.float32)
        bn = dict(
            use_running_average=not train,
            momentum=self.bn_momentum,
            epsilon=self.bn_epsilon,
            axis_name=self.bn_axis_name,
            use_fast_variance=False,
            **kinds,
        )
        last = self.num_layers - 1
        for i in range(last):
            x = nn.Dense(self.hidden_dim, use_bias=self.use_bias, name=f"dense_{i}", **kinds)(x)
            if self.hidden_bn:
                x = nn.BatchNorm(name=f"bn_{i}", **bn)(x)
            x = nn.relu(x)
        x = nn.Dense(self.out_dim, use_bias=self.out_bias, name=f"dense_{last}", **kinds)(x)
        if self.last_bn:
            affine = self.last_bn_affine
            x = nn.BatchNorm(use_scale=affine, use_bias=affine, name=f"bn_{last}", **bn)(x)
        return jnp.asarray(x, jnp.float32)


def head_options(model_cfg: mlc.ConfigDict, bn_axis_name: str | None) -> dict[str, Any]:
    """The MLPHead fields every method takes from config.model: the BN axis (global BN),
    momentum and epsilon, and the computation dtype."""
    return dict(
        bn_axis_name=bn_axis_name,
        bn_momentum=model_cfg.bn_momentum,
        bn_epsilon=model_cfg.bn_epsilon,
        dtype=models.get_dtype(model_cfg.dtype),
    )


class ProjectorModel(nn.Module):
    """Encoder -> projector, and the online probe on stop_gradient(h) (Barlow Twins, VICReg,
    MoCo v2, InstDisc); `target_forward` is the path an EMA copy runs (MoCo v2's key encoder).

    Attributes:
      encoder: module (images, train) -> h [n, C].
      projector: MLPHead h -> z.
      probe: models.LinearHead on stop_gradient(h).
    """

    encoder: nn.Module
    projector: nn.Module
    probe: nn.Module

    def __call__(self, images: jax.Array, train: bool) -> dict[str, jax.Array]:
        """{'h': [n, C], 'z': [n, out_dim], 'probe_logits': [n, classes]}, float32."""
        h = jnp.asarray(self.encoder(images, train=train), jnp.float32)
        z = self.projector(h, train=train)
        return {"h": h, "z": z, "probe_logits": self.probe(jax.lax.stop_gradient(h))}

    def target_forward(self, images: jax.Array, train: bool) -> jax.Array:
        """z = projector(encoder(images)) [n, out_dim] float32: needs only the encoder and the
        projector's variables (an EMA target's)."""
        h = self.encoder(images, train=train)
        return self.projector(jnp.asarray(h, jnp.float32), train=train)


def build_projector_model(
    config: mlc.ConfigDict,
    *,
    num_classes: int,
    bn_axis_name: str | None,
    conv: models.ModuleDef,
    num_layers: int,
    use_bias: bool = True,
    out_bias: bool = True,
    hidden_bn: bool = True,
) -> ProjectorModel:
    """config.model's encoder, an MLPHead of config.method's widths and the online probe.

    Args:
      config: a pretraining config (config.model: the encoder and BN settings; config.method:
        projector_dim, and projector_hidden_dim when num_layers > 1).
      num_classes: the probe's classes.
      bn_axis_name: the BatchNorm axis of the encoder and the projector (global BN), or None.
      conv: the encoder's convolution class.
      num_layers, use_bias, out_bias, hidden_bn: the projector's MLPHead fields.
    """
    model_cfg, method_cfg = config.model, config.method
    return ProjectorModel(
        encoder=models.build_encoder(model_cfg, bn_axis_name=bn_axis_name, conv=conv),
        projector=MLPHead(
            method_cfg.projector_hidden_dim if num_layers > 1 else method_cfg.projector_dim,
            method_cfg.projector_dim,
            num_layers=num_layers,
            use_bias=use_bias,
            out_bias=out_bias,
            hidden_bn=hidden_bn,
            **head_options(model_cfg, bn_axis_name),
        ),
        probe=models.LinearHead(num_classes=num_classes, dtype=jnp.float32),
    )
