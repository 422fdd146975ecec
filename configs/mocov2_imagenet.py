r"""MoCo v2 on ImageNet with a ResNet-50: the paper's recipe (Chen, Fan, Girshick, He 2020).

  python main.py --config=configs/mocov2_imagenet.py --workdir=gs://bucket/mocov2/r50 \
      --config.data.data_dir=gs://bucket/tensorflow_datasets

configs/imagenet.py's data, encoder (bfloat16) and evaluation with MoCo v2 as its paper and
official code (facebookresearch/moco main_moco.py with --mlp --moco-t 0.2 --aug-plus --cos):
SGD with momentum 0.9, lr 0.03 x B/256 at batch 256, weight decay 1e-4 (this repository's
SGD exempts biases and BN; the official code decays every parameter), a cosine schedule
without warmup, 800 epochs (the paper's best, 71.1% linear-evaluation top-1; 200 epochs give
67.5%); head 2048-128 without BN; queue 65,536 keys; temperature 0.2; key-encoder momentum
0.999, constant; MoCo v2's augmentations with blur (configs/augment_recipes.mocov2_views).
Global BN in place of shuffle-BN (simclr_jax/methods/mocov2.py says why). Not run here (no
accelerator); `:runlocal` is a smoke test on the embedded sample.
"""

import ml_collections as mlc

from configs import augment_recipes, imagenet


def get_config(arg: str | None = None) -> mlc.ConfigDict:
    """The MoCo v2 ImageNet recipe; 'runlocal' shrinks it to a smoke test."""
    if arg not in (None, "runlocal"):
        raise ValueError(f"unknown config argument {arg!r}; the only one is 'runlocal'")
    config = imagenet.get_config()
    config.method = mlc.ConfigDict()
    config.method.name = "mocov2"
    config.method.momentum = 0.999
    config.method.temperature = 0.2
    config.method.queue_size = 65536
    config.method.projector_hidden_dim = 2048
    config.method.projector_dim = 128
    augment_recipes.mocov2_views(config)
    config.train.batch_size = 256
    config.train.epochs = 800.0
    config.optim.name = "sgd"
    config.optim.momentum = 0.9
    config.optim.lr_scaling = "linear"
    config.optim.base_lr = 0.03
    config.optim.weight_decay = 1e-4
    config.optim.warmup_epochs = 0.0
    if arg == "runlocal":
        imagenet.apply_runlocal(config)
        config.method.projector_hidden_dim = 64
        config.method.projector_dim = 32
        config.method.queue_size = 256
    return config
