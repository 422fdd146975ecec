r"""MoCo v2 on CIFAR-10 with a ResNet-18 (CIFAR stem).

  python main.py --config=configs/mocov2_cifar10.py --workdir=workdirs/mocov2_cifar10
  python main.py --config=configs/mocov2_cifar10.py:quickstart --workdir=workdirs/mocov2_quick

The paper's method (Chen, Fan, Girshick, He 2020, arXiv 2003.04297; simclr_jax/methods/mocov2.py:
one-direction InfoNCE against a queue, key encoder by a constant-momentum EMA) with the CIFAR
settings of solo-learn's MoCo V2+ recipe (scripts/pretrain/cifar/mocov2plus.yaml, checked
against its repository): SGD with momentum 0.9, lr 0.3 at batch 256 (solo-learn scales it
linearly with the batch), weight decay 1e-4, warmup then cosine, 1000 epochs, batch 256,
projection head 2048-256 (the paper's ImageNet head is 2048-128), queue 32,768 keys (the
paper's ImageNet queue: 65,536), temperature 0.2, momentum 0.99 (solo-learn's base_tau; it
raises the momentum to 0.999 over the run by a cosine schedule, the paper keeps it constant,
as here). Augmentations: MoCo v2's (configs/augment_recipes.mocov2_views: crop area (0.2, 1),
jitter 0.4/0.4/0.4/0.1 at p 0.8, grayscale 0.2) without blur on 32x32 images.
Differences from solo-learn: its MoCo V2+ symmetrises the loss (two queues, one per view; here
the paper's single direction and one queue), crops from area 0.08 and blurs with p 0.5
(symmetric_weak.yaml); its SGD decays every parameter, this repository's SGD no 1-D parameter
(biases, BN); float32 rather than 16-bit mixed precision; global BN in both (solo-learn's
sync_batchnorm). Reference figure: solo-learn's online linear probe for MoCo V2+ 92.94 (1000
epochs). No run of this full recipe was made here.

`:quickstart` is configs/quickstart.py (the embedded 4,000-image sample, a ResNet-18 of base
width 8, 5 epochs = 155 steps at batch 128) with MoCo v2: head 256-64, a queue of 1,024 keys
(8 batches), SGD (docs/methods.md lists the measured figures).
"""

import ml_collections as mlc

from configs import augment_recipes, cifar10, quickstart


def _set_mocov2(config: mlc.ConfigDict) -> None:
    config.method = mlc.ConfigDict()
    config.method.name = "mocov2"
    config.method.momentum = 0.99
    config.method.temperature = 0.2
    config.method.queue_size = 32768
    config.method.projector_hidden_dim = 2048
    config.method.projector_dim = 256
    augment_recipes.mocov2_views(config, blur=False)
    config.optim.name = "sgd"
    config.optim.momentum = 0.9
    config.optim.lr_scaling = "linear"
    config.optim.weight_decay = 1e-4


def get_config(arg: str | None = None) -> mlc.ConfigDict:
    """The MoCo v2 CIFAR-10 recipe; 'quickstart' (minutes on a CPU) or 'runlocal' (a smoke test)."""
    if arg == "quickstart":
        config = quickstart.get_config()
        _set_mocov2(config)
        config.method.projector_hidden_dim = 256
        config.method.projector_dim = 64
        config.method.queue_size = 1024
        config.optim.base_lr = 0.3
        return config
    config = cifar10.get_config()
    _set_mocov2(config)
    config.train.batch_size = 256
    config.optim.base_lr = 0.3
    config.optim.warmup_epochs = 10.0
    if arg == "runlocal":
        cifar10.apply_runlocal(config)
        config.method.projector_hidden_dim = 64
        config.method.projector_dim = 32
        config.method.queue_size = 256
    elif arg:
        raise ValueError(f"unknown config argument {arg!r}; use 'quickstart' or 'runlocal'")
    return config
