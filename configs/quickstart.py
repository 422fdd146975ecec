r"""Quickstart: SimCLR on the embedded CIFAR-10 sample, a few minutes on 2 CPU cores.

  python main.py --config=configs/quickstart.py --workdir=workdirs/quickstart

No network and no dataset preparation: the 4,000 training / 1,000 test images
of CIFAR-10 shipped inside the package. A narrow ResNet-18 (CIFAR stem, base
width 8) is pretrained with the CIFAR-10 recipe's augmentations and loss, and
evaluated at the end with kNN (k=200) and the online linear probe on the 1,000
held-out images. Expect a progress line every few seconds and, at the end,
kNN and probe top-1 clearly above the same protocol on a randomly initialised
encoder (see README for the measured figures).
"""

import ml_collections as mlc

from configs import cifar10


def get_config(arg: str | None = None) -> mlc.ConfigDict:
    """The quickstart config; arg='runlocal' shortens it to a smoke test."""
    config = cifar10.get_config()
    config.data.source = "embedded"
    config.data.name = "cifar10_sample"

    config.model.base_width = 8
    config.model.head_layers = 2
    config.model.head_dim = 64

    # Small-batch advice of the reference authors: sqrt scaling, lower tau.
    config.train.batch_size = 128
    config.train.epochs = 5.0
    config.optim.base_lr = 0.2
    config.optim.lr_scaling = "sqrt"
    config.optim.warmup_epochs = 1.0
    config.loss.temperature = 0.2
    config.train.log_every_steps = 20

    config.checkpoint.every_steps = 200
    config.eval.batch_size = 512
    config.eval.compare_random_init = True

    if arg == "runlocal":
        cifar10.apply_runlocal(config)
    elif arg:
        raise ValueError(f"unknown config argument {arg!r}; the only one is 'runlocal'")
    return config
