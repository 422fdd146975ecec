r"""MoCo v3 (ResNet variant) on CIFAR-10 with a ResNet-18 (CIFAR stem).

  python main.py --config=configs/mocov3_cifar10.py --workdir=workdirs/mocov3_cifar10
  python main.py --config=configs/mocov3_cifar10.py:quickstart --workdir=workdirs/mocov3_quick

The recipe is solo-learn's MoCo v3 CIFAR recipe (scripts/pretrain/cifar/mocov3.yaml): batch
256, LARS, base_lr 0.3 at batch 256 (linear scaling), weight decay 1e-6, 10 warmup epochs, 1000
epochs, projector 4096-256 and predictor 4096-256, temperature 0.2 (the paper's ResNet-50 uses
1.0 on ImageNet), momentum 0.99 raised to 1 by the cosine schedule, and the augmentations of
configs/byol_cifar10.py (BYOL's per view, no blur on 32x32 images). The same differences from
solo-learn as BYOL's (LARS trust coefficient 0.001, float32). Reference figure: solo-learn's
online linear probe 93.10 (1000 epochs).
`:quickstart` is the BYOL quickstart's setting (peak LR 2.0, heads 256-64) with MoCo v3.
"""

import ml_collections as mlc

from configs import byol_cifar10


def get_config(arg: str | None = None) -> mlc.ConfigDict:
    """The MoCo v3 CIFAR-10 recipe; 'quickstart' or 'runlocal' as configs/byol_cifar10.py."""
    if arg not in (None, "quickstart", "runlocal"):
        raise ValueError(f"unknown config argument {arg!r}; use 'quickstart' or 'runlocal'")
    config = byol_cifar10.get_config(arg)
    config.method.name = "mocov3"
    config.method.temperature = 0.2
    if arg is None:
        config.optim.base_lr = 0.3
        config.optim.weight_decay = 1e-6
    return config
