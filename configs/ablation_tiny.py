r"""A tiny batch-size ablation on the embedded CIFAR-10 sample: a smoke test of the tool.

  python -m simclr_jax.sweep --config=configs/ablation_tiny.py --workdir=/tmp/ablation_tiny

Base recipe: configs/quickstart.py (4,000 embedded training images, ResNet-18
CIFAR stem at base width 8, 2-layer head to 64-d, square-root LR scaling with
base LR 0.2, temperature 0.2). Grid: batch 64, 128, 256 x 0.5, 1 epochs x sqrt
scaling x temperature 0.2 = 6 cells; batch 256 trains in two micro-batches of
128 when the base config has train.micro_batch_size. Warmup 0.2 epochs; no
kNN at the end of pretraining (the linear eval is the measure and the kNN pass
would add most of a minute per cell). Linear evaluation in 'cached' mode (100
epochs on features extracted once), top-1 on the 1,000 held-out images.
About 10-15 minutes on 2 CPU cores (see docs/ablation_tiny/README.md). These
runs are far too short to reproduce anything: they show that the grid, the
resume logic and the report work.
"""

import ml_collections as mlc

from configs import ablation_cifar10, linear_eval, quickstart


def get_config(arg: str | None = None) -> mlc.ConfigDict:
    """The tiny grid (no config argument)."""
    if arg:
        raise ValueError(f"unknown config argument {arg!r}; this config takes none")
    pretrain = quickstart.get_config()
    pretrain.optim.warmup_epochs = 0.2
    pretrain.eval.knn = False
    pretrain.eval.compare_random_init = False
    pretrain.train.log_every_steps = 10
    config = ablation_cifar10.build("configs/quickstart.py", pretrain, linear_eval.get_config())
    config.grid.batch_sizes = (64, 128, 256)
    config.grid.epochs = (0.5, 1.0)
    config.grid.lr_scalings = ("sqrt",)
    config.grid.temperatures = (0.2,)
    config.base_lr.linear = 1.0
    config.base_lr.sqrt = 0.2
    config.micro_batch_size = 128
    config.reference = "cifar10"
    return config
