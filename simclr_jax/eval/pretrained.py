"""A restored pretraining checkpoint, the starting point of every evaluation protocol.

Every protocol (simclr_jax.eval.protocols) starts from `config.init_from`,
which is either a pretraining workdir (its latest checkpoint is used) or one
checkpoint step directory (workdir/checkpoints/<step>). The architecture is
never taken from the protocol's config: it is rebuilt from the pretraining
run's config.json, so an evaluation cannot silently load weights into a
different network; the checkpoint's shapes are checked against it.
init_from may be local or on cloud storage (gs://...).
"""

import dataclasses
import json
from typing import Any

import jax
import ml_collections as mlc
import numpy as np

from simclr_jax import checkpoint, files, methods
from simclr_jax.config_checks import ConfigError, MissingPathError


@dataclasses.dataclass(frozen=True)
class Pretrained:
    """A restored pretraining checkpoint.

    Attributes:
      path: absolute path of the checkpoint step directory.
      step: its training step.
      model_config: the pretraining run's config.model (rebuilds the network).
      params: every online parameter (NumPy): {'encoder', 'head', 'probe'} for SimCLR,
        {'encoder', 'projector', 'predictor', 'probe'} for BYOL.
      batch_stats: BatchNorm running statistics (NumPy): {'encoder', 'head'} for SimCLR.
      probe_classes: number of classes of the pretraining online probe.
      method_config: the run's config.method ({'name': 'simclr'} for runs without one).
    """

    path: str
    step: int
    model_config: mlc.ConfigDict
    params: Any
    batch_stats: Any
    probe_classes: int
    method_config: mlc.ConfigDict = dataclasses.field(
        default_factory=lambda: mlc.ConfigDict({"name": methods.DEFAULT_METHOD})
    )

    @property
    def method(self) -> str:
        """The pretraining method's name (config.method.name)."""
        return self.method_config.name

    def build_model(self, **kwargs):
        """The pretraining run's model (methods.build_model), e.g. to initialise a twin."""
        run = mlc.ConfigDict({"model": self.model_config, "method": self.method_config})
        return methods.build_model(run, num_classes=self.probe_classes, **kwargs)

    def variables(self, *names: str) -> dict:
        """{'params', 'batch_stats'} restricted to the named submodules."""
        return {
            "params": {n: self.params[n] for n in names},
            "batch_stats": {n: self.batch_stats[n] for n in names if n in self.batch_stats},
        }


def _resolve_checkpoint(init_from: str, field: str = "config.init_from") -> tuple[str, int, str]:
    """(checkpoints directory, step, config.json path) for a workdir or a step dir."""
    if not init_from:
        raise ConfigError(
            f"{field} is empty: set it to a pretraining workdir or to one of its "
            f"checkpoint step directories, e.g. --{field}=workdirs/quickstart"
        )
    path = files.abspath(init_from)
    if not files.exists(path):
        raise MissingPathError(f"{field}={init_from!r} does not exist ({path})")
    name = files.basename(path)
    if name.isdigit() and files.isdir(path):
        ckpt_dir = files.dirname(path)
        return ckpt_dir, int(name), files.join(files.dirname(ckpt_dir), files.CONFIG_FILE)
    step = checkpoint.latest_step(path)
    if step is None:
        raise MissingPathError(
            f"{field}={init_from!r} holds no checkpoint: expected a pretraining workdir "
            f"with {checkpoint.CHECKPOINT_SUBDIR}/<step>/ inside, or a step directory itself"
        )
    return checkpoint.checkpoint_dir(path), step, files.join(path, files.CONFIG_FILE)


def _read_run_config(config_path: str, init_from: str, field: str) -> dict:
    if not files.exists(config_path) or files.isdir(config_path):
        raise MissingPathError(
            f"{config_path} is missing: the architecture of the checkpoint in "
            f"{field}={init_from!r} is read from its pretraining run's config.json"
        )
    return json.loads(files.read_text(config_path))


def load_run_config(init_from: str, *, field: str = "config.init_from") -> mlc.ConfigDict:
    """The whole config.json of the pretraining run that wrote init_from's checkpoint.

    Args:
      init_from: a pretraining workdir or a checkpoint step dir.
      field: the flag or config field init_from came from (named in errors).

    Returns:
      The run's config (data, augment, model, ...) as an unlocked ConfigDict.

    Raises:
      ConfigError / MissingPathError: as load_pretrained.
    """
    _, _, config_path = _resolve_checkpoint(init_from, field)
    return mlc.ConfigDict(_read_run_config(config_path, init_from, field))


def _check_shapes(expected: Any, restored: Any, where: str) -> None:
    mismatch = checkpoint.shape_mismatch(expected, restored)
    if mismatch:
        raise ConfigError(
            f"the checkpoint at {where} does not match the architecture in its config.json: "
            f"{mismatch}. Point config.init_from at the workdir the checkpoint was trained in, "
            f"whose config.json describes it{checkpoint.old_architecture_hint(mismatch)}."
        )


def load_pretrained(init_from: str, *, field: str = "config.init_from") -> Pretrained:
    """Restores a pretraining checkpoint and the model config it was trained with.

    Args:
      init_from: a pretraining workdir (latest step) or a checkpoint step dir.
      field: the flag or config field init_from came from (named in errors).

    Returns:
      The Pretrained checkpoint (arrays on the host).

    Raises:
      ConfigError (a ValueError): init_from is empty, or the checkpoint's shapes
        differ from the architecture of its config.json.
      MissingPathError (a FileNotFoundError): the path, a checkpoint or config.json
        is missing.
    """
    ckpt_dir, step, config_path = _resolve_checkpoint(init_from, field)
    run_config = _read_run_config(config_path, init_from, field)
    model_config = mlc.ConfigDict(run_config["model"])
    # Runs from before config.method existed are SimCLR runs.
    method_config = mlc.ConfigDict(run_config.get("method") or {"name": methods.DEFAULT_METHOD})
    methods.get_method(mlc.ConfigDict({"method": method_config}))  # a known name
    restored = checkpoint.restore_to_host(ckpt_dir, step)
    params = dict(restored["params"])
    batch_stats = dict(restored["batch_stats"])
    probe_classes = int(np.shape(params["probe"]["dense"]["kernel"])[-1])
    pretrained = Pretrained(
        path=files.join(ckpt_dir, str(step)),
        step=step,
        model_config=model_config,
        params=params,
        batch_stats=batch_stats,
        probe_classes=probe_classes,
        method_config=method_config,
    )
    model = pretrained.build_model()
    shape = (2, 32, 32, 3)
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros(shape), train=False))
    _check_shapes(
        abstract["params"], params, files.join(ckpt_dir, str(step))
    )  # input size does not change any parameter shape
    return pretrained


def random_init_like(pretrained: Pretrained, seed: int) -> Pretrained:
    """A randomly initialised network of the same architecture (a baseline).

    Args:
      pretrained: the checkpoint whose architecture to copy.
      seed: initialisation seed.

    Returns:
      A Pretrained with fresh parameters and BN statistics, step 0.
    """
    model = pretrained.build_model()
    variables = model.init(jax.random.key(seed), np.zeros((2, 32, 32, 3), np.float32), train=False)
    variables = jax.tree_util.tree_map(np.asarray, variables)
    return dataclasses.replace(
        pretrained,
        path="random_init",
        step=0,
        params=dict(variables["params"]),
        batch_stats=dict(variables["batch_stats"]),
    )


def check_num_classes(head_classes: int, data_classes: int, *, head: str, fix: str) -> None:
    """Raises a ConfigError naming both class counts when a loaded head does not fit the data."""
    if head_classes != data_classes:
        raise ConfigError(
            f"the {head} has {head_classes} classes but the dataset has {data_classes}: {fix}"
        )


def provenance(protocol: str, config: mlc.ConfigDict, pretrained: Pretrained) -> dict:
    """What results.json records about where the numbers come from."""
    return {
        "protocol": protocol,
        "checkpoint": {"path": pretrained.path, "step": pretrained.step},
        "dataset": f"{config.data.source}:{config.data.name}",
        "train_split": config.data.train_split,
        "eval_split": config.data.eval_split,
        "num_devices": jax.device_count(),
        "num_processes": jax.process_count(),
    }
