r"""MoCo v3 on ImageNet with a ResNet-50: the official 1000-epoch ResNet-50 recipe.

  python main.py --config=configs/mocov3_imagenet.py --workdir=gs://bucket/mocov3/r50 \
      --config.data.data_dir=gs://bucket/tensorflow_datasets

configs/imagenet.py's data, encoder (bfloat16) and evaluation with MoCo v3 as the official
code's CONFIG.md runs it for 1000 epochs (Chen, Xie, He 2021): LARS, base LR 0.3 x B/256,
weight decay 1.5e-6, batch 4096, 10 warmup epochs then cosine; momentum 0.996 raised to 1 by
the cosine schedule; temperature 1.0; projector 4096-256 (BN without affine parameters on the
output) and predictor 4096-256; BYOL's augmentations per view with crop area (0.2, 1). The
paper reports 74.6% linear-evaluation top-1. Not run here (no TPU); `:runlocal` is a smoke test.
"""

import ml_collections as mlc

from configs import byol_imagenet


def get_config(arg: str | None = None) -> mlc.ConfigDict:
    """The MoCo v3 ImageNet recipe; 'runlocal' shrinks it to a smoke test."""
    config = byol_imagenet.get_config(arg)
    config.method.name = "mocov3"
    config.method.temperature = 1.0
    config.augment.crop_area_range = (0.2, 1.0)
    config.optim.base_lr = 0.3
    return config
