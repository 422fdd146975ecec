r"""VICReg on ImageNet with a ResNet-50: the official code's recipe (Bardes, Ponce, LeCun 2022).

  python main.py --config=configs/vicreg_imagenet.py --workdir=gs://bucket/vicreg/r50 \
      --config.data.data_dir=gs://bucket/tensorflow_datasets

configs/imagenet.py's data, encoder (bfloat16) and evaluation with VICReg: batch 2048, LARS
(biases and BN excluded), base LR 0.2 x B/256, weight decay 1e-6, 10 warmup epochs then
cosine, 1000 epochs; expander 8192-8192-8192; coefficients 25 / 25 / 1; BYOL's augmentations
per view. The paper reports 73.2% linear-evaluation top-1. Not run here (no TPU); `:runlocal`
is a smoke test.
"""

import ml_collections as mlc

from configs import augment_recipes, imagenet


def get_config(arg: str | None = None) -> mlc.ConfigDict:
    """The VICReg ImageNet recipe; 'runlocal' shrinks it to a smoke test."""
    if arg not in (None, "runlocal"):
        raise ValueError(f"unknown config argument {arg!r}; the only one is 'runlocal'")
    config = imagenet.get_config()
    config.method = mlc.ConfigDict()
    config.method.name = "vicreg"
    config.method.sim_coeff = 25.0
    config.method.std_coeff = 25.0
    config.method.cov_coeff = 1.0
    config.method.projector_hidden_dim = 8192
    config.method.projector_dim = 8192
    augment_recipes.byol_views(config)
    config.train.batch_size = 2048
    config.train.epochs = 1000.0
    config.optim.base_lr = 0.2
    config.optim.weight_decay = 1e-6
    if arg == "runlocal":
        imagenet.apply_runlocal(config)
        config.method.projector_hidden_dim = 64
        config.method.projector_dim = 64
    return config
