"""SimCLR models: ResNet encoders, heads, and the factories that map a config to modules.

build_model / build_encoder are the only places that read a config; the modules themselves
take plain arguments. The convolution class is injected (`conv`, default flax.linen.Conv): the
model section of a config, and so a run's config.json, holds only the architecture.

Config fields read (config.model):
  depth (18|34|50|101|152|200), width_multiplier (int >= 1), cifar_stem (bool),
  sk_ratio (float >= 0), dtype ('float32'|'bfloat16'), head_layers (int >= 1),
  head_dim (int, 128), head_hidden_dim (int; 0 or None = width of h), bn_momentum,
  bn_epsilon, and optionally base_width (int, default 64; smaller only for tests).
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from simclr_jax import config_checks
from simclr_jax.models.heads import (
    LinearHead,
    ProjectionHead,
    SimCLRModel,
    select_ft_features,
)
from simclr_jax.models.resnet import (
    BASE_WIDTH,
    BLOCK_COUNTS,
    SUPPORTED_DEPTHS,
    ModuleDef,
    ResNet,
    representation_dim,
    resnet,
)

# config.model.dtype names (config_checks owns the list) -> jnp dtypes.
DTYPES: dict[str, Any] = dict(zip(config_checks.DTYPES, (jnp.float32, jnp.bfloat16), strict=True))

__all__ = [
    "BLOCK_COUNTS",
    "DTYPES",
    "SUPPORTED_DEPTHS",
    "LinearHead",
    "ModuleDef",
    "ProjectionHead",
    "ResNet",
    "SimCLRModel",
    "build_encoder",
    "build_model",
    "get_dtype",
    "representation_dim",
    "resnet",
    "select_ft_features",
]


def get_dtype(name: str) -> Any:
    """Maps a config dtype name to a jnp dtype.

    Args:
      name: 'float32' or 'bfloat16'.

    Returns:
      The jnp dtype.

    Raises:
      ValueError: for any other name.
    """
    if name not in DTYPES:
        raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, got {name!r}.")
    return DTYPES[name]


def build_encoder(
    model_cfg: Any, bn_axis_name: str | None = None, *, conv: ModuleDef = nn.Conv
) -> ResNet:
    """Builds the ResNet encoder described by model_cfg.

    Args:
      model_cfg: the config.model ConfigDict (fields in the module docstring).
      bn_axis_name: mapped axis name for global BatchNorm (e.g. the data axis under
        shard_map/pmap); None for per-device statistics.
      conv: the convolution class (flax.linen.Conv or a drop-in subclass with its
        parameters, e.g. from simclr_jax.cpu.conv_class).

    Returns:
      A ResNet module returning h [n, C] float32.

    Raises:
      ValueError: for invalid depth, width, sk_ratio, base_width or dtype.
    """
    return resnet(
        model_cfg.depth,
        model_cfg.width_multiplier,
        cifar_stem=model_cfg.cifar_stem,
        sk_ratio=model_cfg.sk_ratio,
        dtype=get_dtype(model_cfg.dtype),
        bn_axis_name=bn_axis_name,
        bn_momentum=model_cfg.bn_momentum,
        bn_epsilon=model_cfg.bn_epsilon,
        base_width=model_cfg.get("base_width", BASE_WIDTH),
        conv=conv,
    )


def build_model(
    model_cfg: Any,
    *,
    num_classes: int,
    bn_axis_name: str | None = None,
    conv: ModuleDef = nn.Conv,
) -> SimCLRModel:
    """Builds the SimCLR pretraining model (encoder + projection head + linear probe).

    Args:
      model_cfg: the config.model ConfigDict (fields in the module docstring).
      num_classes: number of classes of the online linear probe.
      bn_axis_name: mapped axis name for global BatchNorm in encoder and head; None for
        per-device statistics.
      conv: the convolution class of the encoder (see build_encoder).

    Returns:
      A SimCLRModel with submodules 'encoder', 'head' and 'probe'.

    Raises:
      ValueError: for invalid model fields or num_classes.
    """
    encoder = build_encoder(model_cfg, bn_axis_name=bn_axis_name, conv=conv)
    dtype = get_dtype(model_cfg.dtype)
    head = ProjectionHead(
        num_layers=model_cfg.head_layers,
        out_dim=model_cfg.head_dim,
        # 0 and None both mean "as wide as h" (ConfigDict fields cannot easily hold None
        # overrides from the command line, hence 0).
        hidden_dim=model_cfg.head_hidden_dim or None,
        bn_axis_name=bn_axis_name,
        bn_momentum=model_cfg.bn_momentum,
        bn_epsilon=model_cfg.bn_epsilon,
        dtype=dtype,
    )
    # The probe is a single small matmul on stop_gradient(h): keep it in float32.
    probe = LinearHead(num_classes=num_classes, dtype=jnp.float32)
    return SimCLRModel(encoder=encoder, head=head, probe=probe)
