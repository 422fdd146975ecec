"""Self-supervised methods on the generic train step: the registry of config.method.name.

A method module (simclr.py, byol.py, mocov2.py, mocov3.py, barlow_twins.py, vicreg.py, nnclr.py,
instdisc.py) supplies:
- NAME, its config.method.name, and TITLE, its name in print;
- build_model(config, *, num_classes, bn_axis_name, conv): its Flax model (encoder, heads,
  online probe), returning {'h', 'z', 'probe_logits', ...} for [2n] images;
- from_config(config, *, total_steps, num_examples): the step object the train step calls:
  create_state, targets (a target network's outputs or stored vectors, no gradient; it is
  given the batch's example indices), objective (the loss over both views' outputs with
  axis_name for cross-device statistics; its aux may carry 'step_outputs' for after_step),
  embedding_loss (micro-batching), after_step (extra state after the optimizer step: the EMA
  target, a queue, a memory bank; it is given the step's targets, step_outputs and the device
  axis), supports_micro_batching;
- check_config(config): ConfigErrors for the method's own fields.
Its augmentation recipe per view is a config's (configs/augment_recipes.py, applied by
configs/<method>_cifar10.py); the shared pieces are heads.py (MLP heads), base.py (the step
object of methods without a target network), ema.py, queue.py (the replicated FIFO queue),
memory_bank.py (one vector per training example) and diagnostics.py.
See docs/methods.md for the interface and how to add a method.
"""

import typing
from types import ModuleType

import flax.linen as nn
import ml_collections as mlc

from simclr_jax import config_checks
from simclr_jax.methods import (
    barlow_twins,
    byol,
    instdisc,
    mocov2,
    mocov3,
    nnclr,
    simclr,
    vicreg,
)

# config.method.name -> module; the registry of method names (config_checks keeps the default
# and the micro-batching subset for jax-free code, checked against this below).
METHODS: dict[str, ModuleType] = {
    module.NAME: module
    for module in (simclr, byol, mocov2, mocov3, barlow_twins, vicreg, nnclr, instdisc)
}
# The default and the names that micro-batch are also known to jax-free code (the ablation tool)
# through config_checks; _check_config_checks_lists() keeps them in step with this registry.
DEFAULT_METHOD = config_checks.DEFAULT_METHOD
method_name = config_checks.method_name


def supports_micro_batching(module: ModuleType) -> bool:
    """Whether a method module's step object trains in micro-batches (its class's flag)."""
    return typing.get_type_hints(module.from_config)["return"].supports_micro_batching


def _check_config_checks_lists() -> None:
    """config_checks' copies of the registry's facts must match it (checked at import)."""
    supported = tuple(name for name, module in METHODS.items() if supports_micro_batching(module))
    if set(supported) != set(config_checks.MICRO_BATCHING_METHODS):
        raise RuntimeError(
            f"config_checks.MICRO_BATCHING_METHODS={config_checks.MICRO_BATCHING_METHODS} but "
            f"the methods whose step objects support micro-batching are {supported}: update "
            "simclr_jax/config_checks.py."
        )
    if DEFAULT_METHOD not in METHODS:
        raise RuntimeError(
            f"config_checks.DEFAULT_METHOD={DEFAULT_METHOD!r} is not a registered method "
            f"{tuple(METHODS)}."
        )


_check_config_checks_lists()


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
            f"alone ({', '.join(config_checks.MICRO_BATCHING_METHODS)}); {module.NAME} needs 0 "
            "(docs/methods.md says why).",
        )


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


def from_config(config: mlc.ConfigDict, *, total_steps: int, num_examples: int = 0):
    """The train step's method object for config.method.name.

    Args:
      config: the pretraining config.
      total_steps: the run's length (schedules such as BYOL's EMA rate).
      num_examples: the training split's size (InstDisc's memory bank has one row per example;
        the other methods ignore it).
    """
    return get_method(config).from_config(
        config, total_steps=total_steps, num_examples=num_examples
    )


__all__ = [
    "DEFAULT_METHOD",
    "METHODS",
    "barlow_twins",
    "build_model",
    "byol",
    "check_config",
    "from_config",
    "get_method",
    "instdisc",
    "method_name",
    "mocov2",
    "mocov3",
    "nnclr",
    "simclr",
    "supports_micro_batching",
    "vicreg",
]
