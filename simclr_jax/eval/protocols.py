"""The evaluation protocols: a registry and the dispatcher main.py calls.

`run(protocol, config, workdir)` runs the protocol named by `config.protocol`
(anything but 'pretrain') on the checkpoint in `config.init_from`
(simclr_jax.eval.pretrained) and writes workdir/results.json. Each protocol is
a function (config, workdir, *, conv) -> results dict in a module of its own; add one by
adding it to PROTOCOLS.
"""

from collections.abc import Callable

import flax.linen as nn
import ml_collections as mlc

from simclr_jax import models
from simclr_jax.config_checks import ConfigError
from simclr_jax.eval import finetune, knn, linear

# Each: (config, workdir, *, conv) -> results dict.
PROTOCOLS: dict[str, Callable[..., dict]] = {
    "linear_eval": linear.run,  # configs/linear_eval.py
    "knn": knn.run,  # configs/knn.py
    "finetune": finetune.run,  # configs/finetune.py
}


def run(
    protocol: str, config: mlc.ConfigDict, workdir: str, *, conv: models.ModuleDef = nn.Conv
) -> dict:
    """Runs one evaluation protocol and writes workdir/results.json.

    Args:
      protocol: a key of PROTOCOLS.
      config: the protocol's config (configs/linear_eval.py, knn.py, finetune.py).
      workdir: output directory (results.json, metrics, confusion matrix).
      conv: the encoder's convolution class (flax.linen.Conv or a drop-in subclass with its
        parameters, e.g. simclr_jax.cpu.conv_class's choice).

    Returns:
      The results dict.

    Raises:
      ConfigError (a ValueError): for an unknown protocol, naming the choices.
    """
    if protocol not in PROTOCOLS:
        raise ConfigError(
            f"config.protocol={protocol!r} is not a protocol; use 'pretrain' or one of "
            f"{tuple(PROTOCOLS)}"
        )
    return PROTOCOLS[protocol](config, workdir, conv=conv)
