"""BYOL (Grill et al. 2020, "Bootstrap your own latent", arXiv 2006.07733) on the train step.

Online network: encoder f -> projector g (Linear-BN-ReLU-Linear, 4096-256 in the paper) ->
predictor q (the same shape). Target network: an EMA of the online encoder and projector
(simclr_jax.methods.ema; tau_base config.method.tau_base), no gradient. Loss (paper eq. 2 and
its symmetrisation): L = byol_loss(q(z1), z'2) + byol_loss(q(z2), z'1), each term the mean over
the global batch of 2 - 2 cos. BatchNorm in every head uses the same axis as the encoder's
(global BN under config.model.global_bn). The online probe on stop_gradient(h) is SimCLR's.

Config fields read (config.method): name ('byol'), tau_base (0 <= tau_base <= 1),
projector_hidden_dim, projector_dim, predictor_hidden_dim (ints > 0).

Checkpoint tree: a TargetTrainState: params {'encoder', 'projector', 'predictor', 'probe'},
batch_stats {'encoder', 'projector', 'predictor'}, opt_state, target_params and
target_batch_stats {'encoder', 'projector'}.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections as mlc
import optax

from simclr_jax import config_checks, losses, models, train_state
from simclr_jax.methods import ema

NAME = "byol"
# The online submodules the target network averages.
TARGET_MODULES = ("encoder", "projector")
# BYOL's image augmentations (Grill et al. 2020, appendix B, table 6) for (view 1, view 2):
# colour jitter 0.4/0.4/0.2/0.1 at p 0.8, grayscale 0.2, blur p 1.0 / 0.1, solarisation
# p 0.0 / 0.2. The data pipeline applies one recipe to both views today, so configs set the
# shared fields that exist (configs/byol_cifar10.py); the per-view values wait for per-view
# augment fields.
AUGMENT: tuple[dict[str, Any], dict[str, Any]] = (
    {"jitter_prob": 0.8, "grayscale_prob": 0.2, "blur_prob": 1.0, "solarize_prob": 0.0},
    {"jitter_prob": 0.8, "grayscale_prob": 0.2, "blur_prob": 0.1, "solarize_prob": 0.2},
)
# Temperature of the diagnostics only (train/contrastive_acc, train/entropy): how well each
# prediction p(v1) picks its own image's target z'(v2) among the global batch's targets (the
# other predictions are not candidates); not optimised.
DIAGNOSTIC_TEMPERATURE = 0.1


class MLPHead(nn.Module):
    """The family's 2-layer MLP: Linear(hidden) -> BN -> ReLU -> Linear(out) [-> BN].

    BYOL's projector and predictor use the defaults; MoCo v3's (methods.mocov3) have no
    biases, and its projector ends with a BatchNorm without scale or bias.

    Attributes:
      hidden_dim: width of the hidden layer (4096 in the BYOL paper).
      out_dim: width of the output (256 in the BYOL paper).
      bn_axis_name: axis name for cross-device BatchNorm statistics; None = per-device.
      bn_momentum: BN running-average momentum.
      bn_epsilon: BN epsilon.
      dtype: computation dtype; parameters and BN statistics stay float32.
      use_bias: biases on the two Linear layers.
      last_bn: a BatchNorm without scale or bias on the output ('bn_1').
    """

    hidden_dim: int
    out_dim: int
    bn_axis_name: str | None = None
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    dtype: Any = jnp.float32
    use_bias: bool = True
    last_bn: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """[n, d] -> float32 [n, out_dim]."""
        kinds = dict(dtype=self.dtype, param_dtype=jnp.float32)
        bn = dict(
            use_running_average=not train,
            momentum=self.bn_momentum,
            epsilon=self.bn_epsilon,
            axis_name=self.bn_axis_name,
            use_fast_variance=False,
            **kinds,
        )
        x = nn.Dense(self.hidden_dim, use_bias=self.use_bias, name="dense_0", **kinds)(x)
        x = nn.relu(nn.BatchNorm(name="bn_0", **bn)(x))
        x = nn.Dense(self.out_dim, use_bias=self.use_bias, name="dense_1", **kinds)(x)
        if self.last_bn:
            x = nn.BatchNorm(use_scale=False, use_bias=False, name="bn_1", **bn)(x)
        return jnp.asarray(x, jnp.float32)


class BYOLModel(nn.Module):
    """Online network (encoder, projector, predictor) and online probe; `target_forward` is
    the target's path (encoder, projector), applied with the target's variables.

    Attributes:
      encoder: module (images, train) -> h [n, C].
      projector: MLPHead h -> z.
      predictor: MLPHead z -> p.
      probe: LinearHead on stop_gradient(h).
    """

    encoder: nn.Module
    projector: nn.Module
    predictor: nn.Module
    probe: nn.Module

    def __call__(self, images: jax.Array, train: bool) -> dict[str, jax.Array]:
        """{'h': [n, C], 'z': [n, proj], 'p': [n, proj], 'probe_logits': [n, classes]}, f32."""
        h = jnp.asarray(self.encoder(images, train=train), jnp.float32)
        z = self.projector(h, train=train)
        p = self.predictor(z, train=train)
        probe_logits = self.probe(jax.lax.stop_gradient(h))
        return {"h": h, "z": z, "p": p, "probe_logits": probe_logits}

    def target_forward(self, images: jax.Array, train: bool) -> jax.Array:
        """z = projector(encoder(images)) [n, proj] float32: needs only TARGET_MODULES."""
        h = self.encoder(images, train=train)
        return self.projector(jnp.asarray(h, jnp.float32), train=train)


def build_model(
    config: mlc.ConfigDict,
    *,
    num_classes: int,
    bn_axis_name: str | None = None,
    conv: models.ModuleDef = nn.Conv,
) -> BYOLModel:
    """The BYOL model: config.model's encoder, config.method's head widths, the probe."""
    model_cfg, method_cfg = config.model, config.method
    head = dict(
        bn_axis_name=bn_axis_name,
        bn_momentum=model_cfg.bn_momentum,
        bn_epsilon=model_cfg.bn_epsilon,
        dtype=models.get_dtype(model_cfg.dtype),
    )
    return BYOLModel(
        encoder=models.build_encoder(model_cfg, bn_axis_name=bn_axis_name, conv=conv),
        projector=MLPHead(method_cfg.projector_hidden_dim, method_cfg.projector_dim, **head),
        predictor=MLPHead(method_cfg.predictor_hidden_dim, method_cfg.projector_dim, **head),
        probe=models.LinearHead(num_classes=num_classes, dtype=jnp.float32),
    )


def byol_loss(p: jax.Array, z_target: jax.Array, axis_name: str | None) -> jax.Array:
    """BYOL's regression loss, mean over the global batch of 2 - 2 cos(p_i, z_target_i).

    Grill et al. 2020, eq. 2: ||p/|p| - z'/|z'|||^2 = 2 - 2 <p, z'> / (|p| |z'|).

    Args:
      p: this device's predictions [n, d] (any float dtype).
      z_target: the target projections of the other view [n, d]; the caller stops their
        gradient.
      axis_name: the device axis, or None on one device.

    Returns:
      A float32 scalar: the value is the mean over every device's rows (devices hold equal
      n); its gradient is this device's share (the gradient of the local mean), so the mean
      of the devices' gradients (the step's pmean) is the gradient of the global mean.
    """
    cos = jnp.sum(losses.l2_normalize(p) * losses.l2_normalize(z_target), axis=-1)
    local = jnp.mean(2.0 - 2.0 * cos)
    if axis_name is None:
        return local
    return local + jax.lax.stop_gradient(jax.lax.pmean(local, axis_name) - local)


def _select(tree: dict, names) -> dict:
    return {name: tree[name] for name in names if name in tree}


@dataclasses.dataclass(frozen=True)
class BYOL:
    """BYOL's part of the train step.

    Attributes:
      tau_base: the EMA rate at step 0 (ema.ema_rate).
      total_steps: K of the EMA schedule.
    """

    tau_base: float
    total_steps: int
    name: str = NAME
    supports_micro_batching: bool = False

    def create_state(
        self, model: nn.Module, tx: optax.GradientTransformation, rng: jax.Array, image_shape
    ) -> train_state.TargetTrainState:
        """The online state, and a target network equal to the online one (paper, sec. 3.1)."""
        base = train_state.create_train_state(model, tx, rng, image_shape)
        copy = lambda tree: jax.tree_util.tree_map(jnp.copy, _select(tree, TARGET_MODULES))  # noqa: E731
        return train_state.TargetTrainState(
            step=base.step,
            params=base.params,
            batch_stats=base.batch_stats,
            opt_state=base.opt_state,
            target_params=copy(base.params),
            target_batch_stats=copy(base.batch_stats),
        )

    def targets(self, model, state, images, *, axis_name, freeze_bn):
        """(stop_gradient(target z) [2n, d] float32, the target's new BN statistics)."""
        del axis_name  # the model's BatchNorm layers carry it
        variables = {"params": state.target_params, "batch_stats": state.target_batch_stats}
        forward = dict(method=BYOLModel.target_forward)
        if freeze_bn:
            z = model.apply(variables, images, train=False, **forward)
            stats = state.target_batch_stats
        else:
            z, new = model.apply(variables, images, train=True, mutable=["batch_stats"], **forward)
            stats = new["batch_stats"]
        return jax.lax.stop_gradient(z), stats

    def objective(self, outputs: dict, targets: jax.Array, *, n: int, axis_name: str | None):
        """(L, L, diagnostics): the symmetrised loss of both views' predictions.

        outputs['p'] and targets are [2n, d]: view 1's rows, then view 2's.
        """
        p = outputs["p"]
        loss = byol_loss(p[:n], targets[n:], axis_name) + byol_loss(p[n:], targets[:n], axis_name)
        _, aux = losses.nt_xent(
            jax.lax.stop_gradient(p[:n]),
            targets[n:],
            temperature=DIAGNOSTIC_TEMPERATURE,
            axis_name=axis_name,
        )
        return (
            loss,
            loss,
            {"contrastive_acc": aux["contrastive_acc_ab"], "entropy": aux["entropy_ab"]},
        )

    def embedding_loss(self, z1, z2, axis_name):
        raise NotImplementedError("BYOL does not support micro-batching (docs/methods.md).")

    def after_step(self, new_state, *, step, target_batch_stats):
        """The EMA of the post-step online encoder and projector, at rate tau_step."""
        tau = ema.ema_rate(step, self.total_steps, self.tau_base)
        online = _select(new_state.params, TARGET_MODULES)
        return new_state.replace(
            target_params=ema.ema_update(new_state.target_params, online, tau),
            target_batch_stats=(
                new_state.target_batch_stats if target_batch_stats is None else target_batch_stats
            ),
        )


def from_config(config: mlc.ConfigDict, *, total_steps: int) -> BYOL:
    """BYOL with config.method.tau_base and the run's total steps."""
    return BYOL(tau_base=config.method.tau_base, total_steps=total_steps)


def check_config(config: mlc.ConfigDict) -> None:
    """Raises ConfigError for a tau_base outside [0, 1] or a non-positive head width."""
    tau = config.method.tau_base
    if isinstance(tau, bool) or not isinstance(tau, int | float) or not 0.0 <= tau <= 1.0:
        config_checks.fail("method.tau_base", tau, "the EMA rate must lie in [0, 1].")
    for field in ("projector_hidden_dim", "projector_dim", "predictor_hidden_dim"):
        config_checks.require_positive(config, f"method.{field}")
