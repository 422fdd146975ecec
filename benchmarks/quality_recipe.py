"""The setting of quality_vs_lightly.py: its methods, their recipes, and the resolved recipe.

Shared by the driver (benchmarks/quality_vs_lightly.py, under our interpreter) and the lightly
side (benchmarks/lightly_side.py, under --lightly_python): this module imports neither jax
nor torch at import time. `write_recipe` (the driver's --role=recipe) imports our package.
"""

import argparse
import dataclasses
import json
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INSTALL_HINT = (
    "install them apart from the project, e.g. python3.11 -m venv VENV && VENV/bin/pip install "
    "torch==2.14.1 torchvision==0.29.1 lightly, then pass --lightly_python=VENV/bin/python"
)
# SimCLR's setting (issue's recipe), on both sides; --width, --batch and --epochs vary.
BASE_LR = 1.0  # x batch / 256
WEIGHT_DECAY = 1e-4
MOMENTUM = 0.9
TRUST_COEFFICIENT = 0.001
TEMPERATURE = 0.5
LOSS_SCALE = 2.0
HEAD_LAYERS = 3
HEAD_DIM = 128
JITTER_STRENGTH = 0.5
# Every method's budget and evaluation.
WARMUP_EPOCHS = 0.5
KNN_K = 200
KNN_TEMPERATURE = 0.1
EVAL_BATCH = 512
# What the lightly side can reproduce of a recipe (check_lightly_recipe).
LIGHTLY_OPTIMIZERS = ("lars", "sgd")
# lightly's view transforms crop with area (min_scale, 1) and torchvision's aspect range only.
TORCHVISION_ASPECT_RANGE = (3 / 4, 4 / 3)


class HarnessError(Exception):
    """A problem the user can fix; printed as one line, exit status 2."""


@dataclasses.dataclass(frozen=True)
class Method:
    """One method: our config file, its lightly counterpart, and overrides of our config."""

    our_config: str
    # The builder of its lightly counterpart: a function of benchmarks/lightly_methods.py.
    lightly_counterpart: str
    our_overrides: tuple[str, ...] = ()


# The SimCLR setting; the other methods run their own CIFAR recipe (configs/) with the
# harness's budget (recipe_overrides), so a method's side-by-side is the recipe users run.
SIMCLR_OVERRIDES = (
    f"--config.model.head_layers={HEAD_LAYERS}",
    f"--config.model.head_dim={HEAD_DIM}",
    "--config.optim.name=lars",
    f"--config.optim.base_lr={BASE_LR}",
    "--config.optim.lr_scaling=linear",
    f"--config.optim.weight_decay={WEIGHT_DECAY}",
    f"--config.optim.momentum={MOMENTUM}",
    f"--config.optim.trust_coefficient={TRUST_COEFFICIENT}",
    f"--config.loss.temperature={TEMPERATURE}",
    f"--config.loss.loss_scale={LOSS_SCALE}",
    f"--config.augment.jitter_strength={JITTER_STRENGTH}",
    "--config.augment.blur_prob=0.0",
)
METHODS = {
    "simclr": Method("configs/cifar10.py", "simclr", SIMCLR_OVERRIDES),
    "byol": Method("configs/byol_cifar10.py", "byol"),
    "mocov2": Method("configs/mocov2_cifar10.py", "mocov2"),
    "barlow_twins": Method("configs/barlow_twins_cifar10.py", "barlow_twins"),
    "vicreg": Method("configs/vicreg_cifar10.py", "vicreg"),
    "nnclr": Method("configs/nnclr_cifar10.py", "nnclr"),
}
# Methods of ours without a lightly counterpart, and why (printed when asked for).
NO_COUNTERPART = {
    "mocov3": "lightly has MoCo v3's heads but not its loss (2 tau CE(q k^T / tau) over the "
    "keys of the batch)",
    "instdisc": "lightly has no InstDisc (a memory bank of one vector per image, the "
    "non-parametric softmax)",
}


def recipe_overrides(args: argparse.Namespace) -> list[str]:
    """Our config's overrides for the harness's setting: budget, encoder, kNN, the method's.

    Every method gets the setting's width, batch and epochs and the 0.5-epoch warmup (the
    CIFAR recipes' 10 warmup epochs are for 1000-epoch runs); the rest is its config's.
    """
    return [
        f"--config.model.base_width={args.width}",
        "--config.model.cifar_stem=True",
        f"--config.train.batch_size={args.batch}",
        f"--config.train.epochs={args.epochs}",
        f"--config.optim.warmup_epochs={WARMUP_EPOCHS}",
        f"--config.eval.knn_k={KNN_K}",
        f"--config.eval.knn_temperature={KNN_TEMPERATURE}",
        "--config.eval.compare_random_init=False",
        *METHODS[args.method].our_overrides,
    ]


def schedule(
    num_train: int, args: argparse.Namespace, warmup_epochs: float = WARMUP_EPOCHS
) -> tuple[int, int, int]:
    """(steps per epoch, total steps, warmup steps), as simclr_jax.train derives them."""
    steps_per_epoch = num_train // args.batch
    if steps_per_epoch == 0:
        raise HarnessError(f"--batch={args.batch} exceeds the {num_train} pretraining images")
    total = int(math.ceil(args.epochs * steps_per_epoch))
    return steps_per_epoch, total, int(round(warmup_epochs * steps_per_epoch))


def check_lightly_recipe(recipe: dict) -> None:
    """Raises HarnessError for a resolved recipe the lightly side cannot reproduce.

    Standard library only, so the driver checks before any run (not after our side's first
    seed). Refused: an optimiser other than LARS or SGD, optim.probe_weight_decay under
    LARS (L2 on the probe's kernel outside the trust ratio; lightly's LARS applies the trust
    ratio wherever it decays), a budget in train.steps (the harness's budget is --epochs),
    and a view whose crop lightly's transforms cannot express (upper area below 1, another
    aspect range). An unknown LR scaling never gets here: our config checks refuse it when
    the recipe is written, and the recipe carries our peak LR.
    """
    optim = recipe["optim"]
    if optim["name"] not in LIGHTLY_OPTIMIZERS:
        raise HarnessError(
            f"optim.name={optim['name']!r}: the lightly side has {', '.join(LIGHTLY_OPTIMIZERS)}"
        )
    if optim["name"] == "lars" and optim.get("probe_weight_decay", False):
        raise HarnessError(
            "optim.probe_weight_decay=True (L2 on the probe's kernel outside LARS's trust "
            "ratio): lightly's LARS applies the trust ratio wherever it decays"
        )
    if recipe["train"].get("steps", 0):
        raise HarnessError(
            f"train.steps={recipe['train']['steps']}: the harness's budget is --epochs; set "
            "train.steps to 0 in the config"
        )
    for index, view in enumerate(recipe["views"], 1):
        area, aspect = tuple(view["crop_area_range"]), tuple(view["crop_aspect_range"])
        if area[1] != 1.0 or not all(
            math.isclose(a, b) for a, b in zip(aspect, TORCHVISION_ASPECT_RANGE, strict=True)
        ):
            raise HarnessError(
                f"view {index}: crop area {area} / aspect {aspect}: lightly's view transforms "
                f"crop with area (min_scale, 1.0) and aspect {TORCHVISION_ASPECT_RANGE} only"
            )


def write_recipe(args: argparse.Namespace) -> dict:
    """--role=recipe (under our interpreter): our config with recipe_overrides, resolved.

    Loads the method's config file with the same overrides as main.py would (ml_collections'
    config flags), checks it as main.py does before training (simclr_jax.config_checks and
    the method's own checks, e.g. a queue that is a multiple of the batch), adds each view's
    resolved augmentations (simclr_jax.data.views.view_recipe) under 'views' and the peak
    learning rate (simclr_jax.optim.peak_learning_rate) under 'peak_lr', writes it to
    args.out as JSON and returns it. The lightly side reads every value it configures from
    this file.

    Raises:
      HarnessError: the config names another method, or main.py would reject it.
    """
    if ROOT not in sys.path:  # the config files import `configs` and our package
        sys.path.insert(0, ROOT)
    from absl import flags
    from ml_collections import config_flags

    from simclr_jax import config_checks, methods, optim
    from simclr_jax.data import views

    path = os.path.join(ROOT, METHODS[args.method].our_config)
    argv = ["recipe", f"--config={path}", *recipe_overrides(args)]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", flag_values=values, sys_argv=argv)
    values(argv)
    config = values.config
    name = config_checks.method_name(config)
    if name != args.method:
        raise HarnessError(f"{path} configures the method {name!r}, not {args.method!r}")
    try:
        config_checks.validate_pretrain_config(config)
        methods.check_config(config)
        resolved_views = [views.view_recipe(config.augment, view) for view in (1, 2)]
        peak_lr = optim.peak_learning_rate(
            config.optim.base_lr, config.train.batch_size, config.optim.lr_scaling
        )
    except config_checks.ConfigError as e:
        raise HarnessError(f"our {args.method} config with the harness's setting: {e}") from None
    recipe = json.loads(config.to_json_best_effort())
    recipe["views"] = resolved_views
    recipe["peak_lr"] = peak_lr
    with open(args.out, "w") as f:
        json.dump(recipe, f, indent=2, sort_keys=True)
    return recipe
