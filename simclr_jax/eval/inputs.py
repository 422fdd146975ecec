"""An evaluation protocol's inputs, all opened and checked before its first step.

Every protocol (kNN, linear evaluation, fine-tuning) starts with `open_inputs`: the
checkpoint in config.init_from is restored, both splits it will read are opened (so
a mistyped split or folder fails in seconds, not after the train split's features
were extracted or the classifier trained), and every batch size it will use is
checked against the devices and processes. Errors name the field, the value and
the fix (config_checks.ConfigError).
"""

import dataclasses

import jax
import ml_collections as mlc

from simclr_jax import config_checks, sharding
from simclr_jax.data import pipeline, sources
from simclr_jax.eval import pretrained as pretrained_lib


@dataclasses.dataclass(frozen=True)
class Inputs:
    """What every protocol reads, opened and checked.

    Attributes:
      pretrained: the restored checkpoint of config.init_from.
      mesh: the 1-D mesh over config.eval.num_devices devices (0: all).
      class_names: the dataset's class names (label i is class_names[i]).
      num_classes: len(class_names).
      train_split: the opened data.train_split (its size, for the protocol's batch checks).
    """

    pretrained: pretrained_lib.Pretrained
    mesh: jax.sharding.Mesh
    class_names: tuple[str, ...]
    num_classes: int
    train_split: sources.base.DataSource


def open_inputs(config: mlc.ConfigDict, *, batch_fields: tuple[str, ...] = ()) -> Inputs:
    """Restores the checkpoint, opens both splits and checks every batch size, up front.

    Args:
      config: a protocol config (configs/knn.py, linear_eval.py, finetune.py).
      batch_fields: dotted config fields of the protocol's global batch sizes besides
        eval.batch_size (e.g. 'linear.batch_size'), each split over the devices.

    Returns:
      The Inputs.

    Raises:
      config_checks.ConfigError: a batch size that does not split over the devices and
        processes, a non-positive eval field, or a split that does not exist.
      config_checks.MissingPathError / ConfigError: from pretrained.load_pretrained
        (init_from missing, or not matching its config.json).
    """
    for field in ("eval.batch_size", "eval.knn_k", "eval.knn_temperature"):
        config_checks.require_positive(config, field)
    pipeline.configure_tensorflow()
    train, _ = sources.open_splits(config.data)
    pretrained = pretrained_lib.load_pretrained(config.init_from)
    devices = sharding.select_devices(config.eval.num_devices, "eval.num_devices")
    for field in ("eval.batch_size", *batch_fields):
        batch_size = config
        for part in field.split("."):
            batch_size = batch_size[part]
        config_checks.check_batch_split(batch_size, len(devices), jax.process_count(), field)
    return Inputs(
        pretrained=pretrained,
        mesh=sharding.create_mesh(devices),
        class_names=train.class_names,
        num_classes=train.num_classes,
        train_split=train,
    )
