"""How the reference SimCLR TF2 model's variables map onto this package's SimCLRModel.

reference_checkpoint reads the variables; this module places them and reads the architecture
from their shapes:
- Inside a residual block or the stem, the reference (tf2/resnet.py) keeps its layers in lists
  (`conv2d_bn_layers/3`, `conv_relu_dropblock_layers/5`, ...) whose indices also count
  parameter-free layers (DropBlock, IdentityLayer, padding, pooling). Layers are therefore
  taken in list order and matched by kind: conv, BN, or selective-kernel conv.
- Stem: one 3x3 conv = CIFAR stem, one 7x7 conv = ImageNet stem, three 3x3 convs = SimCLRv2's
  ResNet-D stem. Blocks per stage and block kind give the depth, the first block's width the
  width multiplier, selective-kernel convs and their reduction widths the sk_ratio, a
  shortcut conv after list slot 0 (pooling before it) a ResNet-D shortcut. The projection
  head's layers and widths and the supervised head's classes come from their kernels.
- No transposes: TF conv kernels are HWIO and dense kernels [in, out], as in Flax. BN: gamma
  -> scale, beta -> bias, moving_mean / moving_variance -> batch_stats mean / var.
"""

import dataclasses
import re
from typing import Any

import numpy as np

from simclr_jax.config_checks import ConfigError
from simclr_jax.models.resnet import BASE_WIDTH, BLOCK_COUNTS, SK_MIN_DIM, SUPPORTED_DEPTHS
from simclr_jax.reference_checkpoint import ReferenceVariables

BN_VARIABLES = {
    "gamma": ("params", "scale"),
    "beta": ("params", "bias"),
    "moving_mean": ("batch_stats", "mean"),
    "moving_variance": ("batch_stats", "var"),
}
# A selective-kernel conv's sublayers (tf2/resnet.py SK_Conv2D) -> ours (SelectiveKernel).
SK_SUBLAYERS = {
    "conv2d_fixed_padding/conv2d": "conv",
    "batch_norm_relu/bn": "bn",
    "conv2d_0": "fc1",
    "batch_norm_relu_1/bn": "fc1_bn",
    "conv2d_1": "fc2",
}
# SimCLRv2's only published ratio; used when the shapes allow it (see _infer_sk_ratio).
DEFAULT_SK_RATIO = 0.0625

# Reference residual-branch layer kinds, in order -> (block kind, our layer names).
_RESIDUAL_LAYOUTS = {
    ("conv", "bn", "conv", "bn"): ("basic", ("conv1", "bn1", "conv2", "bn2")),
    ("conv", "bn", "conv", "bn", "conv", "bn"): (
        "bottleneck",
        ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3"),
    ),
    ("conv", "bn", "sk", "conv", "bn"): ("bottleneck", ("conv1", "bn1", "sk2", "conv3", "bn3")),
}
_SHORTCUT_LISTS = ("shortcut_layers", "projection_layers")
_HEAD_NAME = re.compile(r"^linear_layers/(\d+)/(dense/kernel|bn_relu/bn/(\w+))$")
_SUPERVISED_NAMES = {"linear_layer/dense/kernel": "kernel", "linear_layer/dense/bias": "bias"}


@dataclasses.dataclass
class Layer:
    """One reference layer that holds variables, in list order inside its block or stem.

    kind: 'conv', 'bn' or 'sk'; index: its position in the reference list; ref: its name
    prefix inside the part; variables: {name inside the layer: array}.
    """

    kind: str
    index: int
    ref: str
    variables: dict[str, np.ndarray]


def _layer_kind(names: set[str], ref: str) -> str:
    if names == {"conv2d/kernel"}:
        return "conv"
    if names and all(n.startswith("bn/") and n[3:] in BN_VARIABLES for n in names):
        return "bn"
    if names and all(n.rsplit("/", 1)[0] in SK_SUBLAYERS for n in names):
        return "sk"
    raise ConfigError(
        f"unexpected variables {sorted(names)} in reference layer {ref!r}: expected a conv "
        "(conv2d/kernel), a BN (bn/gamma, ...) or a selective-kernel conv"
    )


def group_layers(variables: dict[str, np.ndarray]) -> dict[tuple, list[Layer]]:
    """Groups the encoder's variables into units: 'stem', or (stage, block, list name).

    Returns:
      {unit: its Layers in list order}; unit is ('stem',) or (stage, block, list name).

    Raises:
      ConfigError: naming a variable that fits no unit or layer.
    """
    stem = re.compile(r"^initial_conv_relu_max_pool/(\d+)/(.+)$")
    block = re.compile(r"^block_groups/(\d+)/layers/(\d+)/([a-z_0-9]+_layers)/(\d+)/(.+)$")
    found: dict[tuple, dict[int, dict[str, np.ndarray]]] = {}
    refs: dict[tuple, str] = {}
    for name, value in variables.items():
        if match := stem.match(name):
            unit, index, rest = ("stem",), int(match[1]), match[2]
            refs[unit] = "initial_conv_relu_max_pool"
        elif match := block.match(name):
            unit = (int(match[1]), int(match[2]), match[3])
            index, rest = int(match[4]), match[5]
            refs[unit] = f"block_groups/{match[1]}/layers/{match[2]}/{match[3]}"
        else:
            raise ConfigError(
                f"unexpected encoder variable resnet_model/{name} in the reference checkpoint"
            )
        found.setdefault(unit, {}).setdefault(index, {})[rest] = value
    units = {}
    for unit, layers in found.items():
        units[unit] = []
        for index in sorted(layers):
            ref = f"{refs[unit]}/{index}"
            kind = _layer_kind(set(layers[index]), ref)
            units[unit].append(Layer(kind, index, ref, layers[index]))
    return units


class VariableTree:
    """Flax variables being assembled, remembering each leaf's reference variable."""

    def __init__(self, reference: ReferenceVariables):
        self.reference = reference
        self.variables: dict[str, dict] = {"params": {}, "batch_stats": {}}
        self.origin: dict[tuple[str, ...], str] = {}

    def put(self, path: tuple[str, ...], value: np.ndarray, part: str, ref: str) -> None:
        """Places `value` at path ('params' | 'batch_stats', module..., leaf); `ref` is its
        name inside reference part `part`."""
        node = self.variables[path[0]]
        for name in path[1:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = value
        self.origin[path] = self.reference.full_names[(part, ref)]

    def conv(self, module: tuple[str, ...], layer: Layer, part: str = "encoder") -> None:
        """Places a conv layer's kernel as module/kernel."""
        ((name, value),) = layer.variables.items()
        self.put(("params", *module, "kernel"), value, part, f"{layer.ref}/{name}")

    def bn(self, module: tuple[str, ...], variables: dict, ref: str, part: str = "encoder"):
        """Places BN variables ({'bn/gamma' or 'gamma': array, ...}) of reference layer `ref`."""
        for name, value in variables.items():
            collection, leaf = BN_VARIABLES[name.rsplit("/", 1)[-1]]
            self.put((collection, *module, leaf), value, part, f"{ref}/{name}")


def _stem(tree: VariableTree, layers: list[Layer]) -> dict[str, Any]:
    convs = [layer for layer in layers if layer.kind == "conv"]
    bns = [layer for layer in layers if layer.kind == "bn"]
    if len(convs) != len(bns) or len(convs) not in (1, 3) or len(layers) != 2 * len(convs):
        raise ConfigError(
            "the reference stem (resnet_model/initial_conv_relu_max_pool) has "
            f"{[layer.kind for layer in layers]}: expected conv, bn (CIFAR or ImageNet stem) or "
            "three conv, bn pairs (ResNet-D stem)"
        )
    suffixes = [""] if len(convs) == 1 else ["1", "2", "3"]
    for suffix, conv, bn in zip(suffixes, convs, bns, strict=True):
        tree.conv(("encoder", f"stem_conv{suffix}"), conv)
        tree.bn(("encoder", f"stem_bn{suffix}"), bn.variables, bn.ref)
    kernel_size = convs[0].variables["conv2d/kernel"].shape[0]
    return {"cifar_stem": len(convs) == 1 and kernel_size == 3, "resnet_d_stem": len(convs) == 3}


def _block(tree: VariableTree, units: dict, stage: int, index: int) -> dict[str, Any]:
    """Maps one residual block; returns what it tells about the architecture."""
    lists = {name: layers for (s, b, name), layers in units.items() if (s, b) == (stage, index)}
    shortcut = [lists.pop(name) for name in _SHORTCUT_LISTS if name in lists]
    where = f"resnet_model/block_groups/{stage}/layers/{index}"
    if len(lists) != 1 or len(shortcut) > 1:
        raise ConfigError(f"the reference block {where} has layer lists {sorted(lists)}")
    (residual,) = lists.values()
    kinds = tuple(layer.kind for layer in residual)
    if kinds not in _RESIDUAL_LAYOUTS:
        raise ConfigError(
            f"the reference block {where} has layers {list(kinds)}: not a ResNet block"
        )
    kind, names = _RESIDUAL_LAYOUTS[kinds]
    block = f"block{stage + 1}_{index}"
    info: dict[str, Any] = {"kind": kind, "resnet_d_shortcut": False, "sk": []}
    for name, layer in zip(names, residual, strict=True):
        if layer.kind == "conv":
            tree.conv(("encoder", block, name), layer)
        elif layer.kind == "bn":
            tree.bn(("encoder", block, name), layer.variables, layer.ref)
        else:
            for var, value in layer.variables.items():
                sub, leaf = var.rsplit("/", 1)
                ours = ("encoder", block, name, SK_SUBLAYERS[sub])
                if leaf == "kernel":
                    tree.put(("params", *ours, "kernel"), value, "encoder", f"{layer.ref}/{var}")
                else:
                    tree.bn(ours, {leaf: value}, f"{layer.ref}/{sub}")
            sk_features = layer.variables["conv2d_fixed_padding/conv2d/kernel"].shape[-1] // 2
            info["sk"].append((sk_features, layer.variables["conv2d_0/kernel"].shape[-1]))
    if shortcut:
        layers = shortcut[0]
        if [layer.kind for layer in layers] != ["conv", "bn"]:
            raise ConfigError(f"the reference block {where} has a shortcut that is not conv + BN")
        tree.conv(("encoder", block, "proj_conv"), layers[0])
        tree.bn(("encoder", block, "proj_bn"), layers[1].variables, layers[1].ref)
        # ResNet-D shortcuts pool (and pad) before the conv: those layers take list slots.
        info["resnet_d_shortcut"] = layers[0].index > 0
    info["width"] = residual[0].variables["conv2d/kernel"].shape[-1]
    return info


def _infer_sk_ratio(sk_shapes: list[tuple[int, int]]) -> float:
    """A ratio giving every SK reduction width max(int(features * ratio), 32) seen.

    Only those widths depend on the ratio, so any ratio that reproduces them all builds the
    same network; SimCLRv2's 0.0625 is preferred (at 1x every width is the minimum, 32).
    """
    candidates = [DEFAULT_SK_RATIO]
    candidates += sorted({mid / f for f, mid in sk_shapes if mid > SK_MIN_DIM})
    for ratio in candidates:
        if all(max(int(f * ratio), SK_MIN_DIM) == mid for f, mid in sk_shapes):
            return ratio
    raise ConfigError(
        f"the selective-kernel reduction widths (features, width) {sorted(set(sk_shapes))} "
        "follow no single sk_ratio"
    )


def map_encoder(tree: VariableTree, variables: dict) -> dict[str, Any]:
    """Places the encoder's variables and reads its architecture from their shapes.

    Args:
      tree: where to place them (under 'encoder').
      variables: ReferenceVariables.parts['encoder'].

    Returns:
      config.model fields: depth, width_multiplier, cifar_stem, sk_ratio.

    Raises:
      ConfigError: naming the variable, layer or block that fits no reference ResNet.
    """
    units = group_layers(variables)
    if ("stem",) not in units:
        raise ConfigError("the reference checkpoint has no stem (resnet_model/initial_conv_...)")
    stem = _stem(tree, units.pop(("stem",)))
    blocks = sorted({(s, b) for s, b, _ in units})
    stages = [sum(1 for s, _ in blocks if s == stage) for stage in range(4)]
    infos = [_block(tree, units, s, b) for s, b in blocks]
    kinds = {info["kind"] for info in infos}
    matches = [
        d
        for d, (k, counts) in BLOCK_COUNTS.items()
        if (k, tuple(stages)) in {(kind, counts) for kind in kinds}
    ]
    if (
        len(kinds) != 1
        or not matches
        or sorted(blocks) != [(s, b) for s in range(4) for b in range(stages[s])]
    ):
        raise ConfigError(
            f"the reference ResNet has {stages} {'/'.join(sorted(kinds))} blocks per stage: no "
            f"depth of {SUPPORTED_DEPTHS} has that"
        )
    width, remainder = divmod(infos[0]["width"], BASE_WIDTH)
    if remainder or width < 1:
        raise ConfigError(
            f"the reference ResNet's first block is {infos[0]['width']} wide: not "
            f"a multiple of {BASE_WIDTH}"
        )
    sk_shapes = [shape for info in infos for shape in info["sk"]]
    resnet_d = stem["resnet_d_stem"] or any(info["resnet_d_shortcut"] for info in infos)
    if sk_shapes:
        sk_ratio = _infer_sk_ratio(sk_shapes)
    else:  # Basic blocks have no SK convs; sk_ratio > 0 only switches ResNet-D on there.
        sk_ratio = DEFAULT_SK_RATIO if resnet_d else 0.0
    return {
        "depth": matches[0],
        "width_multiplier": width,
        "cifar_stem": stem["cifar_stem"],
        "sk_ratio": sk_ratio,
    }


def map_head(tree: VariableTree, variables: dict) -> dict[str, Any]:
    """Places the projection head's variables (under 'head').

    Args:
      tree: where to place them.
      variables: ReferenceVariables.parts['head'] (non-empty).

    Returns:
      config.model fields: head_layers, head_dim, head_hidden_dim.

    Raises:
      ConfigError: naming a variable that is not a head layer's.
    """
    layers: dict[int, dict[str, np.ndarray]] = {}
    for name, value in variables.items():
        match = _HEAD_NAME.match(name)
        if not match or (match[3] and match[3] not in BN_VARIABLES):
            raise ConfigError(f"unexpected projection-head variable _projection_head/{name}")
        layers.setdefault(int(match[1]), {})[match[2]] = value
        if match[2] == "dense/kernel":
            tree.put(("params", "head", f"dense_{match[1]}", "kernel"), value, "head", name)
        else:
            tree.bn(
                ("head", f"bn_{match[1]}"),
                {match[3]: value},
                f"linear_layers/{match[1]}/bn_relu/bn",
                part="head",
            )
    if sorted(layers) != list(range(len(layers))) or any(
        "dense/kernel" not in layer for layer in layers.values()
    ):
        raise ConfigError(
            f"the reference projection head has layers {sorted(layers)}, not all with a "
            "dense/kernel: expected linear_layers/0, 1, ..."
        )
    kernels = [layers[j]["dense/kernel"] for j in range(len(layers))]
    hidden = kernels[0].shape[1] if len(kernels) > 1 else 0
    return {
        "head_layers": len(kernels),
        "head_dim": int(kernels[-1].shape[1]),
        # 0 = as wide as h, which the reference's hidden layers always are.
        "head_hidden_dim": 0 if hidden == kernels[0].shape[0] else int(hidden),
    }


def map_supervised(tree: VariableTree, variables: dict) -> int:
    """Places the supervised head's dense layer as the probe's.

    Args:
      tree: where to place it (under 'probe').
      variables: ReferenceVariables.parts['supervised'] (non-empty).

    Returns:
      Its number of classes.

    Raises:
      ConfigError: naming a variable that is not the head's kernel or bias.
    """
    for name, value in variables.items():
        if name not in _SUPERVISED_NAMES:
            raise ConfigError(f"unexpected supervised-head variable supervised_head/{name}")
        tree.put(("params", "probe", "dense", _SUPERVISED_NAMES[name]), value, "supervised", name)
    if "linear_layer/dense/kernel" not in variables:
        raise ConfigError("the reference supervised head has no linear_layer/dense/kernel")
    return int(variables["linear_layer/dense/kernel"].shape[1])
