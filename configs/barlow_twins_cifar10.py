r"""Barlow Twins on CIFAR-10 with a ResNet-18 (CIFAR stem).

  python main.py --config=configs/barlow_twins_cifar10.py --workdir=workdirs/bt_cifar10
  python main.py --config=configs/barlow_twins_cifar10.py:quickstart --workdir=workdirs/bt_quick

The recipe is solo-learn's Barlow Twins CIFAR recipe (scripts/pretrain/cifar/barlow.yaml):
batch 256, LARS, base_lr 0.3 at batch 256 (linear scaling), weight decay 1e-4, 10 warmup
epochs then cosine, 1000 epochs; projector 3 layers 2048-2048-2048 without biases (the paper's
8192 on ImageNet), lambda 0.0051, loss scale 0.1; BYOL's augmentations per view
(configs/augment_recipes.byol_views: solarisation p 0.0 / 0.2) without blur on 32x32 images.
The same differences from solo-learn as configs/byol_cifar10.py's (LARS trust coefficient
0.001, float32). Reference figure: solo-learn's online linear probe 92.10 (1000 epochs).

`:quickstart` is configs/quickstart.py (the embedded sample, 155 steps at batch 128) with
Barlow Twins: projector 512-512-512, LARS at peak LR 0.5; the README lists its measured figures.
"""

import ml_collections as mlc

from configs import augment_recipes, cifar10, quickstart


def _set_barlow_twins(config: mlc.ConfigDict) -> None:
    config.method = mlc.ConfigDict()
    config.method.name = "barlow_twins"
    config.method.lambd = 0.0051
    config.method.loss_scale = 0.1
    config.method.projector_hidden_dim = 2048
    config.method.projector_dim = 2048
    augment_recipes.byol_views(config, blur=False)


def get_config(arg: str | None = None) -> mlc.ConfigDict:
    """The Barlow Twins CIFAR-10 recipe; 'quickstart' or 'runlocal' (a smoke test)."""
    if arg == "quickstart":
        config = quickstart.get_config()
        _set_barlow_twins(config)
        config.method.projector_hidden_dim = 512
        config.method.projector_dim = 512
        # Peak LR 0.5 (base 1.0, linear scaling): of the peaks 0.15, 0.5 and 2.0 measured in
        # 155 steps (docs/methods.md), 0.5 and 2.0 gave kNN within a point of each other.
        config.optim.base_lr = 1.0
        config.optim.lr_scaling = "linear"
        config.optim.weight_decay = 1e-4
        return config
    config = cifar10.get_config()
    _set_barlow_twins(config)
    config.train.batch_size = 256
    config.optim.base_lr = 0.3
    config.optim.weight_decay = 1e-4
    config.optim.warmup_epochs = 10.0
    if arg == "runlocal":
        cifar10.apply_runlocal(config)
        config.method.projector_hidden_dim = 64
        config.method.projector_dim = 64
    elif arg:
        raise ValueError(f"unknown config argument {arg!r}; use 'quickstart' or 'runlocal'")
    return config
