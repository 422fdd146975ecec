"""Up-front validation of a pretraining config: fail before any compilation.

Every message names the field, the value and the fix, so a typo on a pod
fails in seconds instead of after minutes of compilation.
"""

import math

import ml_collections as mlc

# The choices of config fields, defined here and nowhere else: the models, the data sources, the
# optimizer, the step and the mesh code check against these names (this module imports no jax,
# so the ablation tool's parent process validates configs too). The model's own tables
# (models.resnet.BLOCK_COUNTS, models.DTYPES) hold one entry per depth / dtype listed here.
DATA_SOURCES = ("embedded", "tfds", "folder")
MODEL_DEPTHS = (18, 34, 50, 101, 152, 200)
DTYPES = ("float32", "bfloat16")
OPTIMIZERS = ("lars", "sgd", "adamw")
LR_SCALINGS = ("linear", "sqrt")
PARALLELISM_MODES = ("shard_map", "pmap")
MICRO_BATCH_BN_MODES = ("micro", "frozen")
# The self-supervised methods (config.method.name) that can train in micro-batches (gradient
# caching): those whose loss is a function of the two views' projections alone. The method names
# and the truth (each step object's supports_micro_batching) belong to simclr_jax.methods, which
# checks at import that this tuple agrees; it lives here so that jax-free code (the ablation
# tool's parent process) can refuse micro_batch_size for BYOL and MoCo v3 up front.
MICRO_BATCHING_METHODS = ("simclr", "barlow_twins", "vicreg")
# config.method.name of configs (and old runs' config.json) without a method section.
DEFAULT_METHOD = "simclr"


class UserInputError(Exception):
    """An error the user fixes by changing an input: a config field, a flag, a path, a dataset.

    The programs (main.py, simclr_jax.export, simclr_jax.sweep) print its message as one line
    and exit with status 2 instead of showing a traceback (simclr_jax/cli.py). Raise it only
    where the cause is the user's input; a library bug keeps its own type and its traceback.
    """


class ConfigError(UserInputError, ValueError):
    """A config field (or flag) holds a value the run cannot use; still a ValueError."""


class MissingPathError(UserInputError, FileNotFoundError):
    """A path the user named (config.init_from, an image folder, a tfds dataset) is missing.

    Construct it with the message alone (one argument); it is still a FileNotFoundError.
    """


def fail(field: str, value, fix: str):
    """Raises ConfigError: 'config.<field>=<value> is invalid: <fix>'."""
    raise ConfigError(f"config.{field}={value!r} is invalid: {fix}")


def require_positive(config: mlc.ConfigDict, field: str, *, allow_zero: bool = False) -> None:
    """Raises ConfigError unless config.<field> (dotted, e.g. 'eval.batch_size') is a finite
    number > 0 (>= 0 with allow_zero)."""
    value = config
    for part in field.split("."):
        value = value[part]
    bad_type = value is None or isinstance(value, bool) or not isinstance(value, int | float)
    if bad_type or not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        fail(field, value, f"it must be a finite number {bound}.")


def method_name(config: mlc.ConfigDict) -> str:
    """config.method.name; DEFAULT_METHOD for configs (and old runs' config.json) without one."""
    method = config.get("method") if hasattr(config, "get") else None
    return method.get("name", DEFAULT_METHOD) if method else DEFAULT_METHOD


def validate_pretrain_config(config: mlc.ConfigDict) -> None:
    """Checks the fields that do not depend on the devices or the dataset.

    Args:
      config: a pretraining config (see configs/cifar10.py for the fields).

    Raises:
      ConfigError: naming the first bad field, its value and the fix.
    """
    if config.data.source not in DATA_SOURCES:
        fail("data.source", config.data.source, f"use one of {DATA_SOURCES}.")
    if not config.data.name:
        fail("data.name", config.data.name, "name the tfds dataset or the image folder.")
    if config.model.depth not in MODEL_DEPTHS:
        fail("model.depth", config.model.depth, f"ResNet depths are {MODEL_DEPTHS}.")
    require_positive(config, "model.width_multiplier")
    require_positive(config, "model.base_width")
    require_positive(config, "model.head_layers")
    require_positive(config, "model.head_dim")
    require_positive(config, "model.sk_ratio", allow_zero=True)
    if config.model.dtype not in DTYPES:
        fail("model.dtype", config.model.dtype, f"use one of {DTYPES}.")
    if not config.loss.temperature or config.loss.temperature <= 0:
        fail(
            "loss.temperature",
            config.loss.temperature,
            "the NT-Xent temperature must be > 0 (the paper uses 0.1-0.5).",
        )
    require_positive(config, "loss.loss_scale")
    if config.optim.name not in OPTIMIZERS:
        fail("optim.name", config.optim.name, f"use one of {OPTIMIZERS}.")
    if config.optim.lr_scaling not in LR_SCALINGS:
        fail("optim.lr_scaling", config.optim.lr_scaling, f"use one of {LR_SCALINGS}.")
    require_positive(config, "optim.base_lr")
    require_positive(config, "optim.weight_decay", allow_zero=True)
    require_positive(config, "optim.warmup_epochs", allow_zero=True)
    require_positive(config, "train.batch_size")
    require_positive(config, "train.epochs", allow_zero=True)
    require_positive(config, "train.steps", allow_zero=True)
    if not config.train.epochs and not config.train.steps:
        fail("train.epochs", config.train.epochs, "set train.epochs or train.steps > 0.")
    if config.train.parallelism not in PARALLELISM_MODES:
        fail("train.parallelism", config.train.parallelism, f"use one of {PARALLELISM_MODES}.")
    require_positive(config, "train.num_devices", allow_zero=True)
    micro = config.train.get("micro_batch_size", 0)
    if micro is None or micro < 0:
        fail("train.micro_batch_size", micro, "it must be >= 0 (0 turns micro-batching off).")
    if micro and config.train.batch_size % micro:
        fail(
            "train.micro_batch_size",
            micro,
            f"it must divide train.batch_size={config.train.batch_size} "
            "(0 turns micro-batching off).",
        )
    bn_mode = config.train.get("micro_batch_bn", "micro")
    if bn_mode not in MICRO_BATCH_BN_MODES:
        fail("train.micro_batch_bn", bn_mode, f"use one of {MICRO_BATCH_BN_MODES}.")
    require_positive(config, "train.log_every_steps")
    require_positive(config, "train.stop_at_step", allow_zero=True)
    require_positive(config, "checkpoint.every_steps")
    require_positive(config, "checkpoint.keep")
    require_positive(config, "eval.knn_k")
    require_positive(config, "eval.knn_temperature")
    require_positive(config, "eval.batch_size")
    require_positive(config, "eval.every_epochs", allow_zero=True)


def check_batch_split(batch_size: int, num_devices: int, process_count: int, field: str) -> None:
    """The global batch must split evenly over hosts and devices."""
    if batch_size % num_devices:
        lower = batch_size - batch_size % num_devices
        fail(
            field,
            batch_size,
            f"it must be divisible by the {num_devices} devices in use; "
            f"try {lower or num_devices} or {lower + num_devices}.",
        )
    if batch_size % process_count:
        fail(field, batch_size, f"it must be divisible by the {process_count} processes.")


def check_batch_fits(batch_size: int, split, field: str, examples: int | None = None) -> None:
    """A global batch must not exceed the examples it is drawn from (one step per epoch at least).

    Args:
      batch_size: the global batch size.
      split: the data source it is drawn from (named in the message).
      field: the config field of the batch size.
      examples: how many of the split's examples are drawn (a label subset); None: all.
    """
    examples = split.num_examples if examples is None else examples
    if batch_size > examples:
        fail(
            field,
            batch_size,
            f"it is larger than the {examples} examples it is drawn from ({split.name!r}, "
            f"split {split.split!r}); lower it.",
        )


def micro_batch_per_device(micro_batch_size: int, batch_size: int, num_devices: int) -> int | None:
    """Per-device micro-batch size for the train step, or None when not micro-batching.

    Args:
      micro_batch_size: config.train.micro_batch_size (global; 0 = off).
      batch_size: config.train.batch_size (global).
      num_devices: devices of the run, over all processes.

    Returns:
      None for 0 or a micro-batch as large as the batch; otherwise the examples
      of one micro-batch on one device.

    Raises:
      ConfigError: when the micro-batch cannot be split evenly over the devices.
    """
    if not micro_batch_size or micro_batch_size == batch_size:
        return None
    if micro_batch_size % num_devices:
        fail(
            "train.micro_batch_size",
            micro_batch_size,
            f"each micro-batch is split over the {num_devices} devices: use a multiple of "
            f"{num_devices}.",
        )
    return micro_batch_size // num_devices


def check_schedule(warmup_steps: int, total_steps: int, warmup_epochs: float) -> None:
    """Warmup must end before training does."""
    if total_steps <= 0:
        fail("train.steps", total_steps, "the run has no steps; raise train.epochs/steps.")
    if warmup_steps > total_steps:
        fail(
            "optim.warmup_epochs",
            warmup_epochs,
            f"warmup ({warmup_steps} steps) is longer than training ({total_steps} steps); "
            "lower optim.warmup_epochs or train longer.",
        )
