r"""BYOL on CIFAR-10 with a ResNet-18 (CIFAR stem).

  python main.py --config=configs/byol_cifar10.py --workdir=workdirs/byol_cifar10
  python main.py --config=configs/byol_cifar10.py:quickstart --workdir=workdirs/byol_quick

The recipe is solo-learn's BYOL CIFAR recipe (scripts/pretrain/cifar/byol.yaml and
augmentations/asymmetric.yaml) on this trainer: batch 256, LARS with linear LR scaling
(base_lr 1.0 at batch 256), weight decay 1e-5 (biases and BN excluded, as everywhere here),
10 warmup epochs then cosine, 1000 epochs; projector and predictor 4096-256 (Grill et al.
2020's sizes); EMA rate tau_base 0.99 raised to 1 by BYOL's cosine schedule (solo-learn's CIFAR
value; the paper's 0.996 is for ImageNet's longer runs); BYOL's augmentations per view
(configs/augment_recipes.byol_views: jitter 0.4/0.4/0.2/0.1 at p 0.8, grayscale 0.2,
solarisation p 0.0 / 0.2) without blur on 32x32 images. Differences from solo-learn: LARS's
trust coefficient is this repository's 0.001 (the BYOL paper's) rather than solo-learn's 0.02
with clipping, and float32 rather than 16-bit mixed precision.
Reference figures, CIFAR-10 ResNet-18: lightly's benchmark BYOL kNN 86.8 (200 epochs, batch
512); solo-learn's online linear probe 92.58 (1000 epochs).

`:quickstart` is configs/quickstart.py (the embedded 4,000-image sample, a ResNet-18 of base
width 8, 5 epochs = 155 steps at batch 128) with BYOL: heads 256-64, LARS at peak LR 2.0 and
tau_base 0.99 (0.996 would average over ~250 steps, longer than the whole run). The README
lists its measured figures.
"""

import ml_collections as mlc

from configs import augment_recipes, cifar10, quickstart


def _set_byol(config: mlc.ConfigDict) -> None:
    config.method = mlc.ConfigDict()
    config.method.name = "byol"
    config.method.tau_base = 0.99
    config.method.projector_hidden_dim = 4096
    config.method.projector_dim = 256
    config.method.predictor_hidden_dim = 4096
    augment_recipes.byol_views(config, blur=False)


def get_config(arg: str | None = None) -> mlc.ConfigDict:
    """The BYOL CIFAR-10 recipe; 'quickstart' (minutes on a CPU) or 'runlocal' (a smoke test)."""
    if arg == "quickstart":
        config = quickstart.get_config()
        _set_byol(config)
        config.method.projector_hidden_dim = 256
        config.method.projector_dim = 64
        config.method.predictor_hidden_dim = 256
        # Peak LR 2.0 (base 4.0, linear scaling; the SimCLR quickstart peaks at 2.26): of the
        # peaks 0.5, 2.0 and 11.3 measured (docs/methods.md), 2.0 gave the best kNN in 155 steps.
        config.optim.base_lr = 4.0
        config.optim.lr_scaling = "linear"
        config.optim.weight_decay = 1e-5
        return config
    config = cifar10.get_config()
    _set_byol(config)
    config.train.batch_size = 256
    config.optim.base_lr = 1.0
    config.optim.weight_decay = 1e-5
    config.optim.warmup_epochs = 10.0
    if arg == "runlocal":
        cifar10.apply_runlocal(config)
        config.method.projector_hidden_dim = 64
        config.method.projector_dim = 32
        config.method.predictor_hidden_dim = 64
    elif arg:
        raise ValueError(f"unknown config argument {arg!r}; use 'quickstart' or 'runlocal'")
    return config
