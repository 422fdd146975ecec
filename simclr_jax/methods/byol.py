"""BYOL (Grill et al. 2020, "Bootstrap your own latent", arXiv 2006.07733) on the train step.

Online network: encoder f -> projector g (Linear-BN-ReLU-Linear, 4096-256 in the paper) ->
predictor q (the same shape; heads.MLPHead). Target network: an EMA of the online encoder and
projector (simclr_jax.methods.ema; tau_base config.method.tau_base), no gradient. Loss (paper
eq. 2, symmetrised): method_losses.byol_loss, the mean over the global batch of
(2 - 2 cos(q(z1), z'2)) + (2 - 2 cos(q(z2), z'1)). BatchNorm in every head uses the same axis
as the encoder's (global BN under config.model.global_bn). The online probe on
stop_gradient(h) is SimCLR's. Augmentations: configs/augment_recipes.py (per view).

Config fields read (config.method): name ('byol'), tau_base (0 <= tau_base <= 1),
projector_hidden_dim, projector_dim, predictor_hidden_dim (ints > 0).

Checkpoint tree: a TargetTrainState: params {'encoder', 'projector', 'predictor', 'probe'},
batch_stats {'encoder', 'projector', 'predictor'}, opt_state, target_params and
target_batch_stats {'encoder', 'projector'}.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections as mlc
import optax

from simclr_jax import config_checks, method_losses, models, train_state
from simclr_jax.methods import diagnostics, ema
from simclr_jax.methods.heads import MLPHead, ProjectorModel, head_options

NAME = "byol"
TITLE = "BYOL"  # in progress lines and tables
# The online submodules the target network averages.
TARGET_MODULES = ("encoder", "projector")


class BYOLModel(ProjectorModel):
    """Online network (encoder, projector, predictor) and online probe; `target_forward`
    (ProjectorModel's) is the target's path (encoder, projector), applied with the target's
    variables.

    Attributes:
      encoder: module (images, train) -> h [n, C].
      projector: MLPHead h -> z.
      predictor: MLPHead z -> p.
      probe: LinearHead on stop_gradient(h).
    """

    predictor: nn.Module

    def __call__(self, images: jax.Array, train: bool) -> dict[str, jax.Array]:
        """{'h': [n, C], 'z': [n, proj], 'p': [n, proj], 'probe_logits': [n, classes]}, f32."""
        h = jnp.asarray(self.encoder(images, train=train), jnp.float32)
        z = self.projector(h, train=train)
        p = self.predictor(z, train=train)
        probe_logits = self.probe(jax.lax.stop_gradient(h))
        return {"h": h, "z": z, "p": p, "probe_logits": probe_logits}


def build_model(
    config: mlc.ConfigDict,
    *,
    num_classes: int,
    bn_axis_name: str | None = None,
    conv: models.ModuleDef = nn.Conv,
) -> BYOLModel:
    """The BYOL model: config.model's encoder, config.method's head widths, the probe."""
    model_cfg, method_cfg = config.model, config.method
    head = head_options(model_cfg, bn_axis_name)
    return BYOLModel(
        encoder=models.build_encoder(model_cfg, bn_axis_name=bn_axis_name, conv=conv),
        projector=MLPHead(method_cfg.projector_hidden_dim, method_cfg.projector_dim, **head),
        predictor=MLPHead(method_cfg.predictor_hidden_dim, method_cfg.projector_dim, **head),
        probe=models.LinearHead(num_classes=num_classes, dtype=jnp.float32),
    )


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
        target = ema.init_target(base, TARGET_MODULES)
        return train_state.extend(base, train_state.TargetTrainState, **target)

    def targets(self, model, state, images, *, axis_name, freeze_bn, index=None):
        """(stop_gradient(target z) [2n, d] float32, the target's new BN statistics)."""
        del axis_name, index  # the model's BatchNorm layers carry the axis
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
        """(L, L, diagnostics): method_losses.byol_loss of both views' predictions.

        outputs['p'] and targets are [2n, d]: view 1's rows, then view 2's.
        """
        p = outputs["p"]
        loss, _ = method_losses.byol_loss(p[:n], p[n:], targets[:n], targets[n:], axis_name)
        return loss, loss, diagnostics.view_retrieval(p[:n], targets[n:], axis_name)

    def embedding_loss(self, z1, z2, axis_name):
        raise NotImplementedError("BYOL does not support micro-batching (docs/methods.md).")

    def after_step(
        self, new_state, *, step, target_batch_stats, targets=None, outputs=None, axis_name=None
    ):
        """The EMA of the post-step online encoder and projector, at rate tau_step.

        targets, outputs and axis_name (for methods with a queue or a memory bank) are not
        used.
        """
        del targets, outputs, axis_name
        tau = ema.ema_rate(step, self.total_steps, self.tau_base)
        return new_state.replace(
            **ema.target_after_step(new_state, TARGET_MODULES, tau, target_batch_stats)
        )


def from_config(config: mlc.ConfigDict, *, total_steps: int, num_examples: int = 0) -> BYOL:
    """BYOL with config.method.tau_base and the run's total steps."""
    del num_examples  # the training split's size: only a memory bank needs it
    return BYOL(tau_base=config.method.tau_base, total_steps=total_steps)


def check_config(config: mlc.ConfigDict) -> None:
    """Raises ConfigError for a tau_base outside [0, 1] or a non-positive head width."""
    tau = config.method.tau_base
    if isinstance(tau, bool) or not isinstance(tau, int | float) or not 0.0 <= tau <= 1.0:
        config_checks.fail("method.tau_base", tau, "the EMA rate must lie in [0, 1].")
    for field in ("projector_hidden_dim", "projector_dim", "predictor_hidden_dim"):
        config_checks.require_positive(config, f"method.{field}")
