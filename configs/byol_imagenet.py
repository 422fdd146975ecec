r"""BYOL on ImageNet with a ResNet-50: the paper's recipe (Grill et al. 2020, appendix C).

  python main.py --config=configs/byol_imagenet.py --workdir=gs://bucket/byol/r50 \
      --config.data.data_dir=gs://bucket/tensorflow_datasets

configs/imagenet.py's data, encoder (bfloat16) and evaluation with BYOL: LARS (trust
coefficient 1e-3, biases and BN excluded), base LR 0.2 x B/256, weight decay 1.5e-6, batch
4096, 10 warmup epochs then cosine, 1000 epochs; projector and predictor 4096-256; tau_base
0.996 raised to 1 by the cosine schedule; BYOL's augmentations per view
(configs/augment_recipes.byol_views: blur p 1.0 / 0.1, solarisation p 0.0 / 0.2). The paper
reports 74.3% linear-evaluation top-1 after 1000 epochs. Not run here (no TPU); `:runlocal` is
a smoke test on the embedded sample.
"""

import ml_collections as mlc

from configs import augment_recipes, imagenet


def get_config(arg: str | None = None) -> mlc.ConfigDict:
    """The BYOL ImageNet recipe; 'runlocal' shrinks it to a smoke test."""
    if arg not in (None, "runlocal"):
        raise ValueError(f"unknown config argument {arg!r}; the only one is 'runlocal'")
    config = imagenet.get_config()
    config.method = mlc.ConfigDict()
    config.method.name = "byol"
    config.method.tau_base = 0.996
    config.method.projector_hidden_dim = 4096
    config.method.projector_dim = 256
    config.method.predictor_hidden_dim = 4096
    augment_recipes.byol_views(config)
    config.optim.base_lr = 0.2
    config.optim.weight_decay = 1.5e-6
    config.train.epochs = 1000.0
    if arg == "runlocal":
        imagenet.apply_runlocal(config)
        config.method.projector_hidden_dim = 64
        config.method.projector_dim = 32
        config.method.predictor_hidden_dim = 64
    return config
