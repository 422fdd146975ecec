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
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
from absl import app, flags, logging

from simclr_jax import checkpoint, cli, files, models, reference_layout, steps
from simclr_jax import reference_checkpoint as ref_lib
from simclr_jax.config_checks import ConfigError
from simclr_jax.models.resnet import BASE_WIDTH, representation_dim

# The reference's BN settings (tf2/resnet.py BATCH_NORM_EPSILON; run.py --batch_norm_decay).
REFERENCE_BN_EPSILON = 1e-5
REFERENCE_BN_MOMENTUM = 0.9
# SimCLRv1's projection head, given to checkpoints without one.
V1_HEAD_LAYERS = 2
V1_HEAD_DIM = 128
INIT_SEED = 0


def _flat_shapes(tree: Any) -> dict[tuple[str, ...], tuple[int, ...]]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {tuple(str(k.key) for k in path): tuple(np.shape(x)) for path, x in leaves}


def _check_against_model(
    tree: reference_layout.VariableTree, model: Any, parts: tuple[str, ...]
) -> None:
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
            hint = ""
            if path[1] == "probe":
                hint = (
                    ": the supervised head reads another layer than h; pass the reference "
                    "run's --ft_proj_selector"
                )
            raise ConfigError(
                f"{tree.origin[path]} has shape {got[path]} but the architecture read from the "
                f"checkpoint's shapes needs {expected[path]} for {ours}{hint}"
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
    tree = reference_layout.VariableTree(reference)
    model_config = {
        **reference_layout.map_encoder(tree, reference.parts["encoder"]),
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
        model_config.update(reference_layout.map_head(tree, reference.parts["head"]))
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
        num_classes = reference_layout.map_supervised(tree, supervised)
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
      ConfigError: a variable does not fit, or out already holds a workdir (a checkpoint or
        a config.json).
    """
    if checkpoint.latest_step(out) is not None or files.exists(files.join(out, "config.json")):
        raise ConfigError(f"--out={out!r} already holds a workdir: choose a new directory")
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


def _define_flags() -> None:
    # Defined only when run as a program, not at import: the other command-line modules
    # (simclr_jax.export, simclr_jax.embed) have an --out of their own.
    flags.DEFINE_string(
        "from", None, "Reference checkpoint prefix (model_dir/ckpt-N), model_dir, or SavedModel."
    )
    flags.DEFINE_string("out", None, "Workdir to create (use it as --config.init_from).")
    flags.DEFINE_integer(
        "ft_proj_selector", 0, "The reference run's --ft_proj_selector (0: supervised head on h)."
    )
    flags.DEFINE_integer(
        "num_classes", 1000, "Classes of a new probe when the checkpoint has no usable one."
    )
    flags.mark_flags_as_required(["from", "out"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save step at INFO.
    f = flags.FLAGS
    out = f.out
    summary = convert(
        f["from"].value, out, ft_proj_selector=f.ft_proj_selector, num_classes=f.num_classes
    )
    model = summary["model"]
    print(
        f"wrote {out}: ResNet-{model['depth']} {model['width_multiplier']}x "
        f"sk_ratio {model['sk_ratio']} cifar_stem {model['cifar_stem']}, step {summary['step']}; "
        f"imported {', '.join(summary['imported'])}"
        + (f"; initialised {', '.join(summary['initialised'])}" if summary["initialised"] else "")
    )


if __name__ == "__main__":
    # Quiet TensorFlow's start-up logs, as main.py does (set TF_CPP_MIN_LOG_LEVEL=0 to see them).
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    _define_flags()
    cli.run(main)
