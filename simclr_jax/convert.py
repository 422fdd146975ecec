r"""Import a checkpoint of the reference SimCLR TF2 code as a pretraining workdir.

  python -m simclr_jax.convert --from=model_dir/ckpt-0 --out=workdirs/imported

--from is a checkpoint written by google-research/simclr tf2/ (a model_dir/ckpt-N prefix or
the model_dir itself) or a released SavedModel (its directory or its
saved_model/variables/variables prefix). --out becomes a workdir that every evaluation
protocol accepts as --config.init_from: config.json (the architecture, read from the
variables' shapes, and a 'convert' section saying what was imported) and one orbax checkpoint
(checkpoints/<global_step>/) written by simclr_jax.checkpoint as training writes it.

Imported: the encoder with its BN running statistics; the projection head where the
checkpoint has one; the supervised (linear-eval) head as the online probe `probe` when it
reads h, i.e. the reference ran with --ft_proj_selector=0 (the default; shapes cannot tell,
hence the flag). What the checkpoint lacks is freshly initialised (seed 0) and listed in
config.json's convert.initialised:
- no projection head (the released SimCLRv1 models): a 2-layer head (SimCLRv1's: hidden as
  wide as h, 128 out). h, and so kNN, linear eval and fine-tuning from h, are unaffected;
  z is meaningless.
- no supervised head, or one that reads a projection-head layer (--ft_proj_selector != 0,
  dropped with a warning): a probe with --num_classes classes; do not run linear eval with
  init_from_probe=True from it.

Errors (a variable that fits nowhere, a missing one, a wrong shape, an existing checkpoint in
--out) print one `error: ...` line naming the variable and exit with status 2.
"""

import json
import re
import sys
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
from absl import app, flags

from simclr_jax import checkpoint, cli, files, models, steps
from simclr_jax import reference_checkpoint as ref_lib
from simclr_jax.config_checks import ConfigError
from simclr_jax.models.resnet import (
    BASE_WIDTH,
    BLOCK_COUNTS,
    SK_MIN_DIM,
    SUPPORTED_DEPTHS,
    representation_dim,
)

# The reference's BN settings (tf2/resnet.py BATCH_NORM_EPSILON; run.py --batch_norm_decay).
REFERENCE_BN_EPSILON = 1e-5
REFERENCE_BN_MOMENTUM = 0.9
# SimCLRv1's projection head, given to checkpoints without one.
V1_HEAD_LAYERS = 2
V1_HEAD_DIM = 128
INIT_SEED = 0

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


class _Tree:
    """Flax variables being assembled, remembering each leaf's reference variable."""

    def __init__(self, reference: ref_lib.ReferenceVariables):
        self.reference = reference
        self.variables: dict[str, dict] = {"params": {}, "batch_stats": {}}
        self.origin: dict[tuple[str, ...], str] = {}

    def put(self, path: tuple[str, ...], value: np.ndarray, part: str, ref: str) -> None:
        node = self.variables[path[0]]
        for name in path[1:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = value
        self.origin[path] = self.reference.full_names[(part, ref)]

    def conv(self, module: tuple[str, ...], layer: ref_lib.Layer, part: str = "encoder") -> None:
        ((name, value),) = layer.variables.items()
        self.put(("params", *module, "kernel"), value, part, f"{layer.ref}/{name}")

    def bn(self, module: tuple[str, ...], variables: dict, ref: str, part: str = "encoder"):
        for name, value in variables.items():
            collection, leaf = ref_lib._BN_VARIABLES[name.rsplit("/", 1)[-1]]
            self.put((collection, *module, leaf), value, part, f"{ref}/{name}")


def _stem(tree: _Tree, layers: list[ref_lib.Layer]) -> dict[str, Any]:
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


def _block(tree: _Tree, units: dict, stage: int, index: int) -> dict[str, Any]:
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
                ours = ("encoder", block, name, ref_lib._SK_SUBLAYERS[sub])
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
    candidates = [ref_lib.DEFAULT_SK_RATIO]
    candidates += sorted({mid / f for f, mid in sk_shapes if mid > SK_MIN_DIM})
    for ratio in candidates:
        if all(max(int(f * ratio), SK_MIN_DIM) == mid for f, mid in sk_shapes):
            return ratio
    raise ConfigError(
        f"the selective-kernel reduction widths (features, width) {sorted(set(sk_shapes))} "
        "follow no single sk_ratio"
    )


def _encoder(tree: _Tree, variables: dict) -> dict[str, Any]:
    """Maps the encoder; returns the architecture fields of config.model it determines."""
    units = ref_lib.group_layers(variables)
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
        sk_ratio = ref_lib.DEFAULT_SK_RATIO if resnet_d else 0.0
    return {
        "depth": matches[0],
        "width_multiplier": width,
        "cifar_stem": stem["cifar_stem"],
        "sk_ratio": sk_ratio,
    }


def _head(tree: _Tree, variables: dict) -> dict[str, Any]:
    """Maps the projection head; returns its config.model fields."""
    layers: dict[int, dict[str, np.ndarray]] = {}
    for name, value in variables.items():
        match = _HEAD_NAME.match(name)
        if not match or (match[3] and match[3] not in ref_lib._BN_VARIABLES):
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


def _supervised(tree: _Tree, variables: dict) -> int:
    """Maps the supervised head onto the probe; returns its number of classes."""
    for name, value in variables.items():
        if name not in _SUPERVISED_NAMES:
            raise ConfigError(f"unexpected supervised-head variable supervised_head/{name}")
        tree.put(("params", "probe", "dense", _SUPERVISED_NAMES[name]), value, "supervised", name)
    if "linear_layer/dense/kernel" not in variables:
        raise ConfigError("the reference supervised head has no linear_layer/dense/kernel")
    return int(variables["linear_layer/dense/kernel"].shape[1])


def _flat_shapes(tree: Any) -> dict[tuple[str, ...], tuple[int, ...]]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {tuple(str(k.key) for k in path): tuple(np.shape(x)) for path, x in leaves}


def _check_against_model(tree: _Tree, model: Any, parts: tuple[str, ...]) -> None:
    """Every imported leaf exists with the model's shape, and every model leaf of `parts` is
    imported; otherwise a ConfigError naming the reference variable."""
    abstract = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
    )
    expected = {
        (collection, *path): shape
        for collection in ("params", "batch_stats")
        for path, shape in _flat_shapes(abstract[collection]).items()
        if path[0] in parts
    }
    got = {path: tuple(np.shape(x)) for path, x in _flat_leaves(tree.variables).items()}
    for path in sorted(set(expected) | set(got)):
        ours = "/".join(path)
        if path not in got:
            owner = max((p for p in tree.origin if p[1:-1] == path[1:-1]), default=None, key=len)
            near = f" (beside {tree.origin[owner]})" if owner else ""
            raise ConfigError(
                f"the reference checkpoint lacks the variable for {ours}, shape "
                f"{expected[path]}{near}"
            )
        if path not in expected:
            raise ConfigError(
                f"unexpected variable {tree.origin[path]} in the reference checkpoint: the "
                f"architecture read from its shapes has no {ours}"
            )
        if expected[path] != got[path]:
            raise ConfigError(
                f"{tree.origin[path]} has shape {got[path]} but the architecture read from the "
                f"checkpoint's shapes needs {expected[path]} for {ours}"
            )


def _flat_leaves(variables: dict) -> dict[tuple[str, ...], np.ndarray]:
    flat = {}

    def walk(node, prefix):
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, (*prefix, key))
            else:
                flat[(*prefix, key)] = value

    walk(variables, ())
    return flat


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def convert_variables(
    reference: ref_lib.ReferenceVariables, *, ft_proj_selector: int = 0, num_classes: int = 1000
) -> tuple[dict, dict, dict]:
    """Maps reference variables onto this package's SimCLRModel.

    Args:
      reference: from reference_checkpoint.read_reference.
      ft_proj_selector: the reference run's --ft_proj_selector (0: the supervised head reads
        h and becomes the probe; otherwise it is dropped with a warning).
      num_classes: classes of a freshly initialised probe (no usable supervised head).

    Returns:
      (model_config, variables, report): config.model fields; {'params', 'batch_stats'}
      (float32 NumPy) for 'encoder', 'head', 'probe'; report = {'imported': [...],
      'initialised': [...]} part names.

    Raises:
      ConfigError: naming the reference variable that does not fit.
    """
    if isinstance(ft_proj_selector, bool) or not isinstance(ft_proj_selector, int):
        raise ConfigError(f"--ft_proj_selector must be an int, got {ft_proj_selector!r}")
    tree = _Tree(reference)
    model_config = {
        **_encoder(tree, reference.parts["encoder"]),
        "base_width": BASE_WIDTH,
        "dtype": "float32",
        "head_layers": V1_HEAD_LAYERS,
        "head_dim": V1_HEAD_DIM,
        "head_hidden_dim": 0,
        "bn_momentum": REFERENCE_BN_MOMENTUM,
        "bn_epsilon": REFERENCE_BN_EPSILON,
        "global_bn": True,
    }
    imported = ["encoder"]
    if reference.parts["head"]:
        model_config.update(_head(tree, reference.parts["head"]))
        imported.append("head")
    num_layers = model_config["head_layers"]
    if not -(num_layers + 1) <= ft_proj_selector <= num_layers:
        raise ConfigError(
            f"--ft_proj_selector={ft_proj_selector} is out of range for a projection head of "
            f"{num_layers} layers: use 0 (h) to {num_layers}, or -1 for the last layer"
        )
    supervised = reference.parts["supervised"]
    if supervised and ft_proj_selector not in (0, -(num_layers + 1)):
        _warn(
            f"the supervised head reads projection-head layer {ft_proj_selector}, but the probe "
            "reads h: it is not imported (a new probe is initialised)"
        )
        supervised = {}
    if supervised:
        num_classes = _supervised(tree, supervised)
        imported.append("probe")
    model = models.build_model(mlc.ConfigDict(model_config), num_classes=num_classes)
    _check_against_model(tree, model, tuple(imported))
    initialised = [part for part in ("head", "probe") if part not in imported]
    h_dim = representation_dim(model_config["depth"], model_config["width_multiplier"])
    key_head, key_probe = jax.random.split(jax.random.key(INIT_SEED))
    if "head" in initialised:
        fresh = model.head.init(key_head, jnp.zeros((2, h_dim)), train=False)
        tree.variables["params"]["head"] = fresh["params"]
        tree.variables["batch_stats"]["head"] = fresh["batch_stats"]
    if "probe" in initialised:
        tree.variables["params"]["probe"] = model.probe.init(key_probe, jnp.zeros((1, h_dim)))[
            "params"
        ]
    variables = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), tree.variables)
    return model_config, variables, {"imported": imported, "initialised": initialised}


def convert(source: str, out: str, *, ft_proj_selector: int = 0, num_classes: int = 1000) -> dict:
    """Writes the workdir `out` from the reference checkpoint `source`.

    Args:
      source: see reference_checkpoint.resolve_prefix.
      out: the workdir to create (local or gs://); must not hold a checkpoint yet.
      ft_proj_selector: see convert_variables.
      num_classes: see convert_variables.

    Returns:
      The 'convert' section written to config.json (source, step, imported, initialised,
      model).

    Raises:
      MissingPathError: source is not a TF checkpoint.
      ConfigError: a variable does not fit, or out already holds a checkpoint.
    """
    if checkpoint.latest_step(out) is not None:
        raise ConfigError(f"--out={out!r} already holds a checkpoint: choose a new directory")
    reference = ref_lib.read_reference(source)
    model_config, variables, report = convert_variables(
        reference, ft_proj_selector=ft_proj_selector, num_classes=num_classes
    )
    for part in report["initialised"]:
        _warn(f"the checkpoint has no usable {part}: it is freshly initialised (seed {INIT_SEED})")
    summary = {
        "source": reference.prefix,
        "step": reference.step,
        "ft_proj_selector": ft_proj_selector,
        **report,
    }
    files.makedirs(out)
    files.write_text(
        files.join(out, files.CONFIG_FILE),
        json.dumps({"model": model_config, "convert": summary}, indent=2, sort_keys=True),
    )
    # No optimizer state: the workdir is a starting point for evaluation, not for resuming.
    state = steps.TrainState(
        step=np.asarray(reference.step, np.int32),
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        opt_state={},
    )
    manager = checkpoint.create_manager(out, max_to_keep=1, asynchronous=False)
    checkpoint.save(manager, reference.step, state)
    manager.wait_until_finished()
    manager.close()
    return {**summary, "model": model_config}


_FROM = flags.DEFINE_string(
    "from", None, "Reference checkpoint prefix (model_dir/ckpt-N), model_dir, or SavedModel."
)
_OUT = flags.DEFINE_string("out", None, "Workdir to create (use it as --config.init_from).")
_FT_PROJ_SELECTOR = flags.DEFINE_integer(
    "ft_proj_selector", 0, "The reference run's --ft_proj_selector (0: supervised head on h)."
)
_NUM_CLASSES = flags.DEFINE_integer(
    "num_classes", 1000, "Classes of a new probe when the checkpoint has no usable one."
)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    summary = convert(
        _FROM.value,
        _OUT.value,
        ft_proj_selector=_FT_PROJ_SELECTOR.value,
        num_classes=_NUM_CLASSES.value,
    )
    model = summary["model"]
    print(
        f"wrote {_OUT.value}: ResNet-{model['depth']} {model['width_multiplier']}x "
        f"sk_ratio {model['sk_ratio']} cifar_stem {model['cifar_stem']}, step {summary['step']}; "
        f"imported {', '.join(summary['imported'])}"
        + (f"; initialised {', '.join(summary['initialised'])}" if summary["initialised"] else "")
    )


if __name__ == "__main__":
    flags.mark_flags_as_required(["from", "out"])
    cli.run(main)
