r"""Our encoder's weights in torchvision's ResNet layout, written with torch.save or safetensors.

  python -m simclr_jax.export --workdir=workdirs/quickstart --format=torchvision --out=encoder.pt
  python -m simclr_jax.export --workdir=workdirs/quickstart --format=safetensors \
      --out=encoder.safetensors

torch and safetensors are the optional extra `pip install -e '.[torch]'`; this module imports
them only when a function needs them (the name mapping is NumPy only), and a missing one is a
one-line MissingDependencyError.

Layout: torchvision's ResNet state_dict names, in its order. stem_conv/stem_bn -> conv1/bn1;
block{s}_{i} -> layer{s}.{i} (conv1..3 and bn1..3 keep their names); the projection shortcut
proj_conv/proj_bn -> downsample.0/downsample.1. BatchNorm scale, bias, mean, var -> weight, bias,
running_mean, running_var, plus num_batches_tracked (int64, the checkpoint's step). Conv
kernels [kh, kw, in, out] -> [out, in, kh, kw]. Everything float32.

No fc: the export is the encoder, whose output h is what SimCLR transfers. The pretraining's
online probe (a linear layer trained on stop_gradient(h) as a training-time diagnostic) and the
projection head are left out; torchvision's resnet50() with `fc = torch.nn.Identity()` then
returns h, like simclr_jax.torch_resnet.ResNetEncoder.

Which models load strictly into torchvision (see loads_into_torchvision): ImageNet stem, depth
50/101/152, width_multiplier 1, sk_ratio 0, base_width 64 -> torchvision.models.resnet50/101/152
with fc = Identity (our v1.5 strides and symmetric fixed padding are torchvision's; BN epsilon
1e-5 is torch's default). For its outputs to equal ours, its max-pool must be TF 'SAME' pooling
(see torch_resnet): set `model.maxpool = simclr_jax.torch_resnet.SamePadMaxPool()` (no
parameters, so the state_dict is unchanged). Every other model (CIFAR stem, ResNet-18/34 with
their layer1.0.downsample, other widths, depth 200) loads into torch_resnet.ResNetEncoder, which
build_torch_encoder / load_torch_encoder make. Selective kernels (sk_ratio > 0) and their
ResNet-D stem have no torchvision layout: ConfigError.
"""

import io
import json
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from simclr_jax import files
from simclr_jax.config_checks import ConfigError, UserInputError

TORCH_FORMATS = ("torchvision", "safetensors")
# Accepted file name endings per format.
SUFFIXES = {"torchvision": (".pt", ".pth"), "safetensors": (".safetensors",)}
INSTALL_HINT = "pip install -e '.[torch]'"
# safetensors metadata keys (strings only).
MODEL_CONFIG_KEY = "model_config"
STEP_KEY = "step"
# Depths with a torchvision constructor of our layout (bottleneck; 18/34 lack layer1.0's
# projection shortcut there).
TORCHVISION_DEPTHS = (50, 101, 152)

# Our layer names inside a block -> torchvision's, in torchvision's registration order.
_BLOCK_LAYERS = {
    "conv1": "conv1",
    "bn1": "bn1",
    "conv2": "conv2",
    "bn2": "bn2",
    "conv3": "conv3",
    "bn3": "bn3",
    "proj_conv": "downsample.0",
    "proj_bn": "downsample.1",
}
_BLOCK_NAME = re.compile(r"^block(\d+)_(\d+)$")


class MissingDependencyError(UserInputError, ImportError):
    """An optional dependency (torch, safetensors) is not installed; the message says how."""


def import_optional(name: str):
    """Imports `name` (torch, safetensors.torch, ...) or raises MissingDependencyError."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise MissingDependencyError(
            f"exporting to PyTorch needs {name.split('.')[0]}, which is not installed ({e}); "
            f"install it with: {INSTALL_HINT}"
        ) from None


def _get(model_cfg: Any, field: str, default: Any) -> Any:
    value = model_cfg.get(field, default)
    return default if value is None else value


def check_exportable(model_cfg: Mapping) -> None:
    """Raises ConfigError if the model has no torchvision layout (selective kernels).

    Args:
      model_cfg: the pretraining run's config.model (ConfigDict or dict).
    """
    if _get(model_cfg, "sk_ratio", 0.0) > 0:
        raise ConfigError(
            f"model.sk_ratio={model_cfg['sk_ratio']}: selective kernels and the ResNet-D stem "
            "have no torchvision layout; export this model with --format=npz"
        )


def loads_into_torchvision(model_cfg: Mapping) -> bool:
    """Whether torchvision.models.resnet{depth}() (fc=Identity) takes the export as it is.

    Args:
      model_cfg: the pretraining run's config.model.

    Returns:
      True for the ImageNet stem, depth 50/101/152, width_multiplier 1, base_width 64,
      sk_ratio 0 and BN epsilon 1e-5 (torchvision's, which a state_dict does not carry): the
      state_dict loads strictly and, with the max-pool swapped (module docstring), the outputs
      are ours. False otherwise (use build_torch_encoder).
    """
    return (
        not model_cfg.get("cifar_stem", False)
        and model_cfg["depth"] in TORCHVISION_DEPTHS
        and _get(model_cfg, "width_multiplier", 1) == 1
        and _get(model_cfg, "base_width", 64) == 64
        and _get(model_cfg, "sk_ratio", 0.0) == 0
        and _get(model_cfg, "bn_epsilon", 1e-5) == 1e-5
    )


def _layer_tensors(ours: Mapping, stats: Mapping, name: str, step: int) -> dict:
    """One conv's or BatchNorm's torchvision tensors (NumPy), keyed by the parameter name."""
    if "kernel" in ours:  # conv [kh, kw, in, out] -> [out, in, kh, kw]
        return {"weight": np.ascontiguousarray(np.transpose(ours["kernel"], (3, 2, 0, 1)))}
    if "scale" in ours:
        return {
            "weight": np.asarray(ours["scale"]),
            "bias": np.asarray(ours["bias"]),
            "running_mean": np.asarray(stats["mean"]),
            "running_var": np.asarray(stats["var"]),
            "num_batches_tracked": np.array(step, np.int64),
        }
    raise ConfigError(f"encoder layer {name} is neither a conv nor a BatchNorm: no torch layout")


def torchvision_state_dict(
    params: Mapping, batch_stats: Mapping, *, step: int = 0
) -> dict[str, np.ndarray]:
    """Maps the encoder's Flax variables to torchvision's ResNet state_dict (NumPy arrays).

    Args:
      params: the encoder's parameters (the tree under params/encoder), NumPy or jax arrays.
      batch_stats: the encoder's BatchNorm statistics (batch_stats/encoder).
      step: stored as every BatchNorm's num_batches_tracked.

    Returns:
      {torchvision name: float32 array (int64 scalar for num_batches_tracked)} in torchvision's
      order; conv weights [out, in, kh, kw], BatchNorm vectors [C].

    Raises:
      ConfigError: for a layer with no torchvision counterpart (selective kernels, the
        ResNet-D stem).
    """
    unknown = sorted(
        set(params) - {"stem_conv", "stem_bn"} - set(filter(_BLOCK_NAME.match, params))
    )
    if unknown:
        raise ConfigError(
            f"encoder layers {unknown} have no torchvision layout (selective kernels / ResNet-D "
            "stem); export this model with --format=npz"
        )
    out = {}

    def add(ours_path: tuple[str, ...], torch_name: str) -> None:
        ours, stats = params, batch_stats
        for key in ours_path:
            ours, stats = ours[key], stats.get(key, {})
        for key, value in _layer_tensors(ours, stats, "/".join(ours_path), step).items():
            out[f"{torch_name}.{key}"] = value

    add(("stem_conv",), "conv1")
    add(("stem_bn",), "bn1")
    # Numeric order (block2_10 after block2_9), as torchvision registers them.
    for (stage, index), name in sorted(
        (tuple(map(int, m.groups())), m.group(0)) for m in map(_BLOCK_NAME.match, params) if m
    ):
        extra = set(params[name]) - set(_BLOCK_LAYERS)
        if extra:
            raise ConfigError(
                f"encoder layers {name}/{sorted(extra)} have no torchvision layout (selective "
                "kernels); export this model with --format=npz"
            )
        for ours, theirs in _BLOCK_LAYERS.items():
            if ours in params[name]:
                add((name, ours), f"layer{stage}.{index}.{theirs}")
    return out


def save_state_dict(
    state: Mapping[str, np.ndarray], path: str, fmt: str, metadata: Mapping[str, str]
) -> str:
    """Writes a torchvision-layout state_dict as a torch.save file or a .safetensors file.

    Args:
      state: from torchvision_state_dict.
      path: destination (local or remote); see SUFFIXES.
      fmt: 'torchvision' (torch.save of an OrderedDict of tensors, loadable with
        torch.load(path, weights_only=True)) or 'safetensors' (with `metadata`).
      metadata: strings stored in the .safetensors header (e.g. the model config as JSON);
        the torch.save file holds the plain state_dict only.

    Returns:
      path.

    Raises:
      MissingDependencyError: torch or safetensors is not installed.
    """
    if fmt == "safetensors":
        st_numpy = import_optional("safetensors.numpy")
        data = st_numpy.save(dict(state), metadata=dict(metadata))
    else:
        import collections

        torch = import_optional("torch")
        # torch wants writable arrays (jax hands out read-only ones); copy only those.
        tensors = collections.OrderedDict(
            (k, torch.from_numpy(v if v.flags.writeable else v.copy())) for k, v in state.items()
        )
        buffer = io.BytesIO()
        torch.save(tensors, buffer)
        data = buffer.getbuffer()
    files.write_bytes(path, data)
    return path


def load_state_dict(path: str) -> tuple[dict, dict[str, str]]:
    """Reads an export back as torch tensors.

    Args:
      path: a .safetensors file, or a torch.save file (.pt/.pth); local or remote.

    Returns:
      (state_dict {name: torch.Tensor}, metadata) where metadata is the .safetensors header's
      (model_config JSON, step) and {} for a torch.save file.
    """
    torch = import_optional("torch")
    if path.endswith(".safetensors"):
        if not files.is_remote(path):
            return _read_safetensors(path)
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:  # safe_open reads local files only
            local = f"{tmp}/export.safetensors"
            with open(local, "wb") as f:
                f.write(files.read_bytes(path))
            return _read_safetensors(local)
    return torch.load(io.BytesIO(files.read_bytes(path)), weights_only=True), {}


def _read_safetensors(local_path: str) -> tuple[dict, dict[str, str]]:
    safetensors = import_optional("safetensors")
    with safetensors.safe_open(local_path, framework="pt") as f:
        # safe_open objects are not iterable: keys() is their API.
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118


def architecture_from_config(model_cfg: Mapping) -> dict:
    """ResNetEncoder keyword arguments for a config.model."""
    from simclr_jax.models.resnet import BLOCK_COUNTS  # jax-side table; a config implies jax

    check_exportable(model_cfg)
    kind, stage_sizes = BLOCK_COUNTS[model_cfg["depth"]]
    return {
        "stage_sizes": stage_sizes,
        "bottleneck": kind == "bottleneck",
        "width": _get(model_cfg, "base_width", 64) * _get(model_cfg, "width_multiplier", 1),
        "cifar_stem": bool(model_cfg.get("cifar_stem", False)),
        "bn_epsilon": _get(model_cfg, "bn_epsilon", 1e-5),
        "bn_momentum": _get(model_cfg, "bn_momentum", 0.9),
    }


def architecture_from_state_dict(state: Mapping) -> dict:
    """ResNetEncoder keyword arguments read off a torchvision-layout state_dict's names/shapes.

    BatchNorm epsilon and momentum are not in a state_dict: ours (1e-5, 0.9) are assumed.
    """
    stage_sizes = []
    while any(k.startswith(f"layer{len(stage_sizes) + 1}.") for k in state):
        prefix = f"layer{len(stage_sizes) + 1}."
        stage_sizes.append(len({k.split(".")[1] for k in state if k.startswith(prefix)}))
    return {
        "stage_sizes": tuple(stage_sizes),
        "bottleneck": "layer1.0.conv3.weight" in state,
        "width": int(state["conv1.weight"].shape[0]),
        "cifar_stem": int(state["conv1.weight"].shape[-1]) == 3,
    }


def build_torch_encoder(model_cfg: Mapping | None = None, **architecture: Any):
    """Builds simclr_jax.torch_resnet.ResNetEncoder (plain torch), in eval mode, random weights.

    Args:
      model_cfg: the pretraining run's config.model; or None and ResNetEncoder's keyword
        arguments in `architecture` (stage_sizes, bottleneck, width, cifar_stem, ...).

    Returns:
      The torch module: images [n, 3, H, W] float32 in [0, 1] (our encoder's inputs, no
      mean/std normalisation) -> h [n, C] float32.

    Raises:
      ConfigError: sk_ratio > 0. MissingDependencyError: torch is not installed.
    """
    import_optional("torch")
    from simclr_jax import torch_resnet

    kwargs = architecture_from_config(model_cfg) if model_cfg is not None else architecture
    return torch_resnet.ResNetEncoder(**kwargs).eval()


def load_torch_encoder(path: str, model_cfg: Mapping | None = None):
    """An export (torchvision or safetensors format) loaded strictly into a ResNetEncoder.

    Args:
      path: the exported file.
      model_cfg: the architecture; None takes the .safetensors file's stored config, or reads
        the architecture off the state_dict (BN epsilon 1e-5 assumed).

    Returns:
      The torch module in eval mode (see build_torch_encoder).
    """
    state, metadata = load_state_dict(path)
    if model_cfg is None and MODEL_CONFIG_KEY in metadata:
        model_cfg = json.loads(metadata[MODEL_CONFIG_KEY])
    if model_cfg is not None:
        model = build_torch_encoder(model_cfg)
    else:
        model = build_torch_encoder(**architecture_from_state_dict(state))
    model.load_state_dict(state, strict=True)
    return model
