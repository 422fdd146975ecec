"""The ablation grid: the ablation config's checks and its cells.

An ablation config (configs/ablation_*.py) holds the base pretraining config
(`pretrain`, and `pretrain_config`, the config file it came from), the grid
axes (`grid.batch_sizes`, `grid.epochs`, `grid.lr_scalings`,
`grid.temperatures`), the base LR of each scaling rule (`base_lr.linear`,
`base_lr.sqrt`), the linear-evaluation settings (`linear_eval`, from
`linear_eval_config`; its data and augmentation are the pretraining ones),
`micro_batch_size` (cells with a larger batch train in micro-batches of this
many examples; 0 = never) and `reference` ('imagenet' | 'cifar10' | 'none', the
paper figures shown beside ours).

The base config may be any method's (config.method.name). The temperature axis
sets the temperature that method reads (temperature_field); a method without one
takes a single value, a label in the cell names. Micro-batches are for the
methods in config_checks.MICRO_BATCHING_METHODS only. Both are decided from the
config's structure: this module imports no jax (nor simclr_jax.methods).

Every grid point is a Cell with its two configs: WORKDIR/<cell>/pretrain and
WORKDIR/<cell>/linear_eval are ordinary main.py runs of them. A cell that was
run keeps its record (cell.json); a rerun with another recipe is refused.
"""

import dataclasses
import itertools
import json
import math

import ml_collections as mlc

from simclr_jax import config_checks, files
from simclr_jax.sweep import commands, reference, results

SCALINGS = config_checks.LR_SCALINGS
# Fields a rerun may change without invalidating a finished cell: where data
# lives, logging and checkpoint cadence, device selection, and the linear
# eval's init_from, which moves with the sweep workdir.
_RUN_ONLY_FIELDS = (
    "data.data_dir",
    "data.download",
    "data.extract_dir",
    "train.log_every_steps",
    "train.stop_at_step",
    "train.num_devices",
    "eval.num_devices",
    "eval.every_epochs",
    "checkpoint.",
    "init_from",
)
# Fields older versions stored in the config and this one no longer has: execution choices
# that became main.py flags (the CPU convolution, --cpu_conv). Ignored when comparing, so
# sweeps started before the change still resume and report.
_REMOVED_FIELDS = ("model.conv_impl", "model.shortcut_fork")


@dataclasses.dataclass(frozen=True)
class Cell:
    """One grid point: its name, values and the two configs its runs use."""

    name: str
    batch_size: int
    epochs: float
    lr_scaling: str
    temperature: float
    base_lr: float
    micro_batch_size: int
    pretrain: mlc.ConfigDict
    linear_eval: mlc.ConfigDict

    def grid_values(self) -> dict:
        """The cell's scalar fields (what the manifest and the summary record)."""
        names = ("batch_size", "epochs", "lr_scaling", "temperature", "base_lr", "micro_batch_size")
        return {name: getattr(self, name) for name in names}


# ------------------------------------------------------------------- validation


def _check_axis(config, axis: str) -> tuple:
    values = config.grid.get(axis)
    if not isinstance(values, tuple | list) or not values:
        config_checks.fail(f"grid.{axis}", values, "list at least one value, e.g. (256, 512).")
    if len(set(values)) != len(values):
        config_checks.fail(f"grid.{axis}", values, "remove the repeated values.")
    return tuple(values)


def _is_number(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def validate_ablation_config(config: mlc.ConfigDict) -> None:
    """Checks an ablation config before anything runs.

    Args:
      config: an ablation config (see configs/ablation_cifar10.py).

    Raises:
      ValueError: naming the first bad field, its value and what is allowed.
    """
    for field in (
        "pretrain_config",
        "pretrain",
        "linear_eval_config",
        "linear_eval",
        "grid",
        "base_lr",
        "micro_batch_size",
        "reference",
    ):
        if field not in config:
            config_checks.fail(
                field, None, "the field is missing; start from configs/ablation_cifar10.py."
            )
    batches = _check_axis(config, "batch_sizes")
    for b in batches:
        if not isinstance(b, int) or isinstance(b, bool) or b <= 0:
            config_checks.fail("grid.batch_sizes", batches, f"{b!r} is not a positive integer.")
    epochs = _check_axis(config, "epochs")
    for e in epochs:
        if not _is_number(e) or e <= 0:
            config_checks.fail("grid.epochs", epochs, f"{e!r} is not a positive number of epochs.")
    scalings = _check_axis(config, "lr_scalings")
    for s in scalings:
        if s not in SCALINGS:
            config_checks.fail("grid.lr_scalings", scalings, f"{s!r} is not one of {SCALINGS}.")
        lr = config.base_lr.get(s)
        if not _is_number(lr) or lr <= 0:
            config_checks.fail(
                f"base_lr.{s}", lr, f"the base LR of {s} scaling must be a number > 0."
            )
    temps = _check_axis(config, "temperatures")
    for t in temps:
        if not _is_number(t) or t <= 0:
            config_checks.fail("grid.temperatures", temps, f"{t!r} is not a temperature > 0.")
    method = config_checks.method_name(config.pretrain)
    if len(temps) > 1 and temperature_field(config.pretrain) is None:
        config_checks.fail(
            "grid.temperatures",
            temps,
            f"the method {method!r} ({config.pretrain_config}) has no temperature, so the "
            "cells would differ only in name; list one value (it only labels the cells).",
        )
    micro = config.micro_batch_size
    if not isinstance(micro, int) or isinstance(micro, bool) or micro < 0:
        config_checks.fail("micro_batch_size", micro, "use an integer >= 0 (0: no micro-batches).")
    if micro and method not in config_checks.MICRO_BATCHING_METHODS:
        config_checks.fail(
            "micro_batch_size",
            micro,
            f"the method {method!r} ({config.pretrain_config}) cannot train in micro-batches: "
            "gradient caching needs a loss of the two views' projections alone "
            f"({', '.join(config_checks.MICRO_BATCHING_METHODS)}); set it to 0.",
        )
    for b in batches:
        if micro and b > micro and b % micro:
            config_checks.fail(
                "micro_batch_size",
                micro,
                f"it must divide every batch size larger than it, and batch {b} = "
                f"{b // micro} x {micro} + {b % micro}; pick a divisor of {b}.",
            )
    if config.reference not in reference.REFERENCES:
        config_checks.fail("reference", config.reference, f"use one of {reference.REFERENCES}.")
    if config.pretrain.train.steps:
        config_checks.fail(
            "pretrain.train.steps",
            config.pretrain.train.steps,
            "set it to 0: grid.epochs sets durations.",
        )
    warmup = config.pretrain.optim.warmup_epochs
    if warmup > min(epochs):
        config_checks.fail(
            "pretrain.optim.warmup_epochs",
            warmup,
            f"warmup is longer than the shortest budget in grid.epochs ({min(epochs):g}).",
        )
    for key in ("pretrain_config", "linear_eval_config"):
        commands.resolve_config_file(config[key], key)


# ------------------------------------------------------------------------ cells


def cell_name(batch_size: int, epochs: float, lr_scaling: str, temperature: float) -> str:
    """'b256_e100_linear_t0.5': the cell's directory name."""
    return f"b{batch_size}_e{epochs:g}_{lr_scaling}_t{temperature:g}"


def temperature_field(pretrain: mlc.ConfigDict) -> str | None:
    """The pretraining config field the temperature axis sets, or None.

    Args:
      pretrain: a base pretraining config.

    Returns:
      'method.temperature' where the method section has one (MoCo v3's InfoNCE);
      'loss.temperature' for SimCLR (its NT-Xent reads config.loss; also configs
      without a method section); None for methods without a temperature (BYOL,
      Barlow Twins, VICReg), whose cells take the temperature as a label only.
    """
    method = pretrain.get("method")
    if method and "temperature" in method:
        return "method.temperature"
    if config_checks.method_name(pretrain) == "simclr":
        return "loss.temperature"
    return None


def supports_micro_batches(config: mlc.ConfigDict) -> bool:
    """Whether the base pretraining config has train.micro_batch_size."""
    return "micro_batch_size" in config.pretrain.train


def build_cells(config: mlc.ConfigDict, workdir: str) -> list[Cell]:
    """Every grid cell, batch-major, with its pretraining and linear-eval configs.

    Args:
      config: a validated ablation config.
      workdir: the sweep's directory (sets the linear eval's init_from).

    Returns:
      The cells; each pretraining config is checked with
      config_checks.validate_pretrain_config.
    """
    cells = []
    micro = config.micro_batch_size
    grid = config.grid
    temperature = temperature_field(config.pretrain)
    for b, e, scaling, t in itertools.product(
        grid.batch_sizes, grid.epochs, grid.lr_scalings, grid.temperatures
    ):
        name = cell_name(b, e, scaling, t)
        pre = config.pretrain.copy_and_resolve_references()
        pre.train.batch_size = int(b)
        pre.train.epochs = float(e)
        pre.optim.lr_scaling = scaling
        pre.optim.base_lr = float(config.base_lr[scaling])
        if temperature:  # else one value, a label only (validate_ablation_config)
            section, field = temperature.split(".")
            pre[section][field] = float(t)
        cell_micro = micro if micro and b > micro else 0
        # Set only where the base config has the field (trees from before
        # micro-batching lack it), so the ablation runs on either.
        if supports_micro_batches(config):
            pre.train.micro_batch_size = cell_micro
        else:
            cell_micro = 0
        config_checks.validate_pretrain_config(pre)
        lin = config.linear_eval.copy_and_resolve_references()
        with lin.unlocked():
            # The linear eval reads the data the encoder was trained on.
            lin.data = pre.data.copy_and_resolve_references()
            lin.augment = pre.augment.copy_and_resolve_references()
        lin.init_from = files.join(workdir, name, "pretrain")
        values = (int(b), float(e), scaling, float(t), pre.optim.base_lr, cell_micro)
        cells.append(Cell(name, *values, pretrain=pre, linear_eval=lin))
    return cells


# ------------------------------------------------------------------ cell state


def _comparable(flat: dict) -> dict:
    ignored = _RUN_ONLY_FIELDS + _REMOVED_FIELDS
    return {
        k: v
        for k, v in flat.items()
        if not any(k == f or (f.endswith(".") and k.startswith(f)) for f in ignored)
    }


def cell_record(cell: Cell, args: dict) -> dict:
    """What cell.json holds: the grid values, both configs and both stages' main.py arguments."""
    return {
        "name": cell.name,
        "grid": cell.grid_values(),
        "pretrain": json.loads(cell.pretrain.to_json_best_effort()),
        "linear_eval": json.loads(cell.linear_eval.to_json_best_effort()),
        "main_py_args": {k: list(v) for k, v in args.items()},
    }


def check_cell_unchanged(cell: Cell, workdir: str) -> None:
    """Raises ValueError if the cell's directory was run with a different config.

    Resuming a checkpoint under another recipe would mix two runs in one cell;
    data locations, logging and checkpoint cadence may change.
    """
    path = files.join(workdir, cell.name, results.CELL_FILE)
    if not files.exists(path):
        return
    old = results.read_json(path)
    for kind in results.STAGES:
        new = _comparable(
            commands.flatten_config(json.loads(getattr(cell, kind).to_json_best_effort()))
        )
        before = _comparable(commands.flatten_config(old.get(kind, {})))
        diff = sorted(k for k in set(new) | set(before) if new.get(k) != before.get(k))
        if diff:
            shown = ", ".join(f"{k}: {before.get(k)!r} -> {new.get(k)!r}" for k in diff[:4])
            raise config_checks.ConfigError(
                f"cell {cell.name} in {workdir} was run with a different {kind} config ({shown}). "
                "Use a new --workdir for the new recipe, or delete that cell's directory."
            )


def prepare_cells(config: mlc.ConfigDict, workdir: str) -> tuple[list[Cell], dict]:
    """Validates the ablation config and builds its cells and their main.py arguments.

    Args:
      config: an ablation config.
      workdir: the sweep directory.

    Returns:
      (the cells, {cell name: stage_args(...)}).

    Raises:
      ValueError: a bad ablation config, a cell main.py cannot run as built, or
        a cell already run in workdir with another recipe.
    """
    validate_ablation_config(config)
    cells = build_cells(config, workdir)
    args = {cell.name: commands.stage_args(config, cell, workdir) for cell in cells}
    for cell in cells:
        check_cell_unchanged(cell, workdir)
    return cells, args
