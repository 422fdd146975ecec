r"""NNCLR on CIFAR-10 with a ResNet-18 (CIFAR stem).

  python main.py --config=configs/nnclr_cifar10.py --workdir=workdirs/nnclr_cifar10
  python main.py --config=configs/nnclr_cifar10.py:quickstart --workdir=workdirs/nnclr_quick

The paper's method (Dwibedi et al. 2021, arXiv 2104.14548; simclr_jax/methods/nnclr.py: the
support-set nearest neighbour of one view's projection as the anchor, the other view's
predictions as the candidates, symmetric) with the CIFAR settings of solo-learn's NNCLR recipe
(scripts/pretrain/cifar/nnclr.yaml, checked against its repository): batch 256, LARS with
linear LR scaling (base_lr 0.4 at batch 256), weight decay 1e-5 (biases and BN excluded),
10 warmup epochs then cosine, 1000 epochs; projector 2048-2048-256, predictor 4096-256;
support set of 65,536 projections (the paper's ImageNet size: 98,304); temperature 0.2 (the
paper's ImageNet value: 0.1); BYOL's asymmetric augmentations (configs/augment_recipes.byol_views)
without blur on 32x32 images. Differences from solo-learn: LARS's trust coefficient 0.001
rather than 0.02 with clipping; float32 rather than 16-bit mixed precision; one forward pass
over both views (BN statistics over 2n images; solo-learn's heads see each view apart).
Reference figure: solo-learn's online linear probe for NNCLR 91.88 (1000 epochs). No run of
this full recipe was made here.

`:quickstart` is configs/quickstart.py (the embedded 4,000-image sample, a ResNet-18 of base
width 8, 5 epochs = 155 steps at batch 128) with NNCLR: projector 256-256-64, predictor
256-64, a support set of 1,024 projections (8 batches), LARS at peak LR 2.0
(docs/methods.md lists the measured figures).
"""

import ml_collections as mlc

from configs import augment_recipes, cifar10, quickstart


def _set_nnclr(config: mlc.ConfigDict) -> None:
    config.method = mlc.ConfigDict()
    config.method.name = "nnclr"
    config.method.temperature = 0.2
    config.method.queue_size = 65536
    config.method.projector_hidden_dim = 2048
    config.method.projector_dim = 256
    config.method.predictor_hidden_dim = 4096
    augment_recipes.byol_views(config, blur=False)
    config.optim.lr_scaling = "linear"
    config.optim.weight_decay = 1e-5


def get_config(arg: str | None = None) -> mlc.ConfigDict:
    """The NNCLR CIFAR-10 recipe; 'quickstart' (minutes on a CPU) or 'runlocal' (a smoke test)."""
    if arg == "quickstart":
        config = quickstart.get_config()
        _set_nnclr(config)
        config.method.projector_hidden_dim = 256
        config.method.projector_dim = 64
        config.method.predictor_hidden_dim = 256
        config.method.queue_size = 1024
        config.optim.base_lr = 4.0
        return config
    config = cifar10.get_config()
    _set_nnclr(config)
    config.train.batch_size = 256
    config.optim.base_lr = 0.4
    config.optim.warmup_epochs = 10.0
    if arg == "runlocal":
        cifar10.apply_runlocal(config)
        config.method.projector_hidden_dim = 64
        config.method.projector_dim = 32
        config.method.predictor_hidden_dim = 64
        config.method.queue_size = 256
    elif arg:
        raise ValueError(f"unknown config argument {arg!r}; use 'quickstart' or 'runlocal'")
    return config
