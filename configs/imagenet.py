r"""The reference SimCLR ImageNet recipe: ResNet-50, batch 4096, 100 epochs.

  python main.py --config=configs/imagenet.py --workdir=gs://bucket/simclr/r50 \
      --config.data.data_dir=gs://bucket/tensorflow_datasets

Data: tfds 'imagenet2012' prepared in data_dir (tfds needs the manually
downloaded archives; see README). LARS, base LR 0.3 with linear scaling (peak
4.8; `:sqrt` gives 0.075 * sqrt(B), the same peak at 4096), weight decay 1e-6,
temperature 0.1, colour jitter strength 1.0, blur p=0.5, 10 warmup epochs,
global BN. Expected (paper Table B.1): 64.6% linear-eval top-1 after 100
epochs (69.3% after 1000). Meant for a TPU pod slice (launch/tpu.sh);
`:runlocal` is a tiny smoke test on the embedded sample.
"""

import ml_collections as mlc

from configs import cifar10


def get_config(arg: str | None = None) -> mlc.ConfigDict:
    """ImageNet recipe; arg in {None, 'sqrt', 'runlocal'}."""
    config = cifar10.get_config()
    config.data.name = "imagenet2012"
    config.data.eval_split = "validation"
    config.data.cache = False

    config.augment.image_size = 224
    config.augment.jitter_strength = 1.0
    config.augment.blur_prob = 0.5

    config.model.depth = 50
    config.model.cifar_stem = False
    config.model.dtype = "bfloat16"

    config.loss.temperature = 0.1

    config.optim.base_lr = 0.3
    config.optim.lr_scaling = "linear"
    config.optim.weight_decay = 1e-6

    config.train.batch_size = 4096
    config.train.epochs = 100.0
    config.train.log_every_steps = 100

    config.checkpoint.every_steps = 2500
    config.eval.batch_size = 1024

    if arg == "sqrt":
        config.optim.base_lr = 0.075
        config.optim.lr_scaling = "sqrt"
    elif arg == "runlocal":
        apply_runlocal(config)
    elif arg:
        raise ValueError(f"unknown config argument {arg!r}; use 'sqrt' or 'runlocal'")
    return config


def apply_runlocal(config: mlc.ConfigDict) -> None:
    """Shrinks an ImageNet config to a smoke test on the embedded sample (float32)."""
    cifar10.apply_runlocal(config)
    config.model.dtype = "float32"
