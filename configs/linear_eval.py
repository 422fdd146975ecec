r"""Linear evaluation of a pretrained encoder (frozen; linear classifier on h).

  python main.py --config=configs/linear_eval.py \
      --config.init_from=workdirs/quickstart --workdir=workdirs/quickstart_linear

The architecture comes from the pretraining run's config.json; the data and
augmentation fields below must describe the dataset to evaluate on (defaults:
the embedded CIFAR-10 sample, as in the quickstart; for full CIFAR-10 add
--config.data.source=tfds --config.data.name=cifar10). 'cached' mode (default)
trains on features extracted once, in seconds; --config.linear.mode=reference
is the reference recipe: crop + flip every step, Nesterov momentum SGD, LR 0.1
(x batch/256), 100 epochs (about 91% top-1 on CIFAR-10 after the 1000-epoch
CIFAR-10 recipe). --config.eval.compare_random_init=True also evaluates a
randomly initialised encoder of the same architecture.
"""

import ml_collections as mlc

from configs import cifar10


def base_protocol_config(protocol: str) -> mlc.ConfigDict:
    """The fields every evaluation protocol shares (data, augment, eval, seed)."""
    pretrain = cifar10.get_config()
    config = mlc.ConfigDict()
    config.protocol = protocol
    config.init_from = ""  # a pretraining workdir or its checkpoints/<step> directory
    config.seed = 0
    config.data = pretrain.data
    config.data.source = "embedded"
    config.data.name = "cifar10_sample"
    config.augment = pretrain.augment
    config.eval = mlc.ConfigDict()
    config.eval.batch_size = 512
    config.eval.num_devices = 0  # 0: all
    config.eval.knn_k = 200
    config.eval.knn_temperature = 0.1
    config.eval.compare_random_init = False
    return config


def get_config(arg: str | None = None) -> mlc.ConfigDict:
    """Linear evaluation; arg='reference' selects the augmented reference recipe."""
    config = base_protocol_config("linear_eval")
    config.linear = mlc.ConfigDict()
    config.linear.mode = "cached"  # 'cached' | 'reference'
    config.linear.epochs = 100.0
    config.linear.batch_size = 512
    config.linear.base_lr = 0.1
    config.linear.lr_scaling = "linear"  # peak = base_lr * batch / 256
    config.linear.momentum = 0.9
    config.linear.nesterov = True
    config.linear.weight_decay = 0.0
    # Start from the pretraining online probe (its classes must match the data).
    config.linear.init_from_probe = False
    if arg == "reference":
        config.linear.mode = "reference"
    elif arg:
        raise ValueError(f"unknown config argument {arg!r}; the only one is 'reference'")
    return config
