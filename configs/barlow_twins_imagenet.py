r"""Barlow Twins on ImageNet with a ResNet-50: the paper's recipe (Zbontar et al. 2021).

  python main.py --config=configs/barlow_twins_imagenet.py --workdir=gs://bucket/bt/r50 \
      --config.data.data_dir=gs://bucket/tensorflow_datasets

configs/imagenet.py's data, encoder (bfloat16) and evaluation with Barlow Twins: batch 2048,
LARS, base LR 0.2 x B/256, weight decay 1.5e-6, 10 warmup epochs then cosine, 1000 epochs;
projector 8192-8192-8192 without biases; lambda 0.0051; BYOL's augmentations per view. The
official code gives biases and BN parameters a 0.0048 / 0.2 = 0.024 x smaller LR, and its first
release multiplied the loss by 0.024 instead (--scale-loss): this trainer has one LR, so the
recipe takes loss_scale 0.024 (LARS makes the kernels' steps independent of the scale; the
biases and BN parameters get the official code's step). The paper reports 73.2%
linear-evaluation top-1. Not run here (no TPU); `:runlocal` is a smoke test.
"""

import ml_collections as mlc

from configs import augment_recipes, imagenet


def get_config(arg: str | None = None) -> mlc.ConfigDict:
    """The Barlow Twins ImageNet recipe; 'runlocal' shrinks it to a smoke test."""
    if arg not in (None, "runlocal"):
        raise ValueError(f"unknown config argument {arg!r}; the only one is 'runlocal'")
    config = imagenet.get_config()
    config.method = mlc.ConfigDict()
    config.method.name = "barlow_twins"
    config.method.lambd = 0.0051
    config.method.loss_scale = 0.024
    config.method.projector_hidden_dim = 8192
    config.method.projector_dim = 8192
    augment_recipes.byol_views(config)
    config.train.batch_size = 2048
    config.train.epochs = 1000.0
    config.optim.base_lr = 0.2
    config.optim.weight_decay = 1.5e-6
    if arg == "runlocal":
        imagenet.apply_runlocal(config)
        config.method.projector_hidden_dim = 64
        config.method.projector_dim = 64
    return config
