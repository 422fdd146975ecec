"""Self-supervised methods on the generic train step: the registry of config.method.name.

A method module (simclr.py, byol.py, mocov3.py, barlow_twins.py, vicreg.py) supplies:
- NAME, its config.method.name, and TITLE, its name in print;
- build_model(config, *, num_classes, bn_axis_name, conv): its Flax model (encoder, heads,
  online probe), returning {'h', 'z', 'probe_logits', ...} for [2n] images;
- from_config(config, *, total_steps): the step object the train step calls: create_state,
  targets (a target network's outputs, no gradient), objective (the loss over both views'
  outputs with axis_name for cross-device statistics), embedding_loss (micro-batching),
  after_step (extra state after the optimizer step: the EMA target), supports_micro_batching;
- check_config(config): ConfigErrors for the method's own fields.
Its augmentation recipe per view is a config's (configs/augment_recipes.py, applied by
configs/<method>_cifar10.py); the shared pieces are heads.py (MLP heads), base.py (the step
object of methods without a target network), ema.py and diagnostics.py.
See docs/methods.md for the interface and how to add a method.
"""

import typing
from types import ModuleType

import flax.linen as nn
import ml_collections as mlc

from simclr_jax import config_checks
from simclr_jax.methods import barlow_twins, byol, mocov3, simclr, vicreg

# config.method.name -> module; the only list of method names.
METHODS: dict[str, ModuleType] = {
    module.NAME: module for module in (simclr, byol, mocov3, barlow_twins, vicreg)
}
DEFAULT_METHOD = simclr.NAME


def method_name(config: mlc.ConfigDict) -> str:
    """config.method.name; 'simclr' for configs (and old runs' config.json) without a method."""
    method = config.get("method") if hasattr(config, "get") else None
    return method.get("name", DEFAULT_METHOD) if method else DEFAULT_METHOD


def get_method(config: mlc.ConfigDict) -> ModuleType:
    """The module of config.method.name.

    Raises:
      ConfigError: naming config.method.name and the registered methods.
    """
    name = method_name(config)
    if name not in METHODS:
        config_checks.fail("method.name", name, f"use one of {tuple(METHODS)}.")
    return METHODS[name]


def check_config(config: mlc.ConfigDict) -> None:
    """The method's config checks, and micro-batching only where its loss allows it.

    Raises:
      ConfigError: naming the field.
    """
    module = get_method(config)
    module.check_config(config)
    step_object = module.from_config(config, total_steps=1)
    if config.train.get("micro_batch_size", 0) and not step_object.supports_micro_batching:
        config_checks.fail(
            "train.micro_batch_size",
            config.train.micro_batch_size,
            f"micro-batching (gradient caching) needs a loss of the two views' projections "
            f"alone ({', '.join(_micro_batching_methods())}); {module.NAME} needs 0 "
            "(docs/methods.md says why).",
        )


def _micro_batching_methods() -> list[str]:
    return [
        name
        for name, module in METHODS.items()
        if typing.get_type_hints(module.from_config)["return"].supports_micro_batching
    ]


def build_model(
    config: mlc.ConfigDict,
    *,
    num_classes: int,
    bn_axis_name: str | None = None,
    conv=nn.Conv,
) -> nn.Module:
    """The pretraining model of config.method.name (config.model gives the encoder)."""
    return get_method(config).build_model(
        config, num_classes=num_classes, bn_axis_name=bn_axis_name, conv=conv
    )


def from_config(config: mlc.ConfigDict, *, total_steps: int):
    """The train step's method object for config.method.name."""
    return get_method(config).from_config(config, total_steps=total_steps)


__all__ = [
    "DEFAULT_METHOD",
    "METHODS",
    "barlow_twins",
    "build_model",
    "byol",
    "check_config",
    "from_config",
    "get_method",
    "method_name",
    "mocov3",
    "simclr",
    "vicreg",
]
