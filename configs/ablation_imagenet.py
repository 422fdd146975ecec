r"""The paper's batch-size x epochs x LR-scaling ablation on ImageNet (SimCLR Table B.1).

  python -m simclr_jax.sweep --config=configs/ablation_imagenet.py \
      --workdir=gs://bucket/simclr/ablation --print_commands=tpu
  python -m simclr_jax.sweep --config=configs/ablation_imagenet.py \
      --workdir=gs://bucket/simclr/ablation --report_only

Grid (Table B.1): batch 256, 512, 1024, 2048, 4096, 8192 x 100, 200, 400, 800
epochs x linear (base LR 0.3 x B/256) and square-root (0.075 x sqrt(B)) LR
scaling, both equal to 4.8 at B=4096, x temperature 0.1 = 48 cells, about
18,000 ImageNet epochs of ResNet-50 pretraining in all (the paper: about 1.5 h
per 100 epochs on 128 TPU v3 cores). Base recipe: configs/imagenet.py. Linear
evaluation: the reference recipe (crop + flip, Nesterov momentum SGD, LR 0.1 x
B/256, batch 4096, weight decay 1e-6, 90 epochs). The 8192 cells train in two
micro-batches of 4096 (exact full-batch negatives, BatchNorm per micro-batch),
so every cell fits wherever the base recipe fits; --config.micro_batch_size=0
turns that off. Expected: the paper's Table B.1 values, which the report shows
beside ours (e.g. 64.6% / 64.5% at B=4096, 100 epochs; 57.5% / 62.8% at B=256).
"""

import ml_collections as mlc

from configs import ablation_cifar10, imagenet, linear_eval


def get_config(arg: str | None = None) -> mlc.ConfigDict:
    """The ImageNet ablation grid of Table B.1 (no config argument)."""
    if arg:
        raise ValueError(f"unknown config argument {arg!r}; this config takes none")
    config = ablation_cifar10.build(
        "configs/imagenet.py", imagenet.get_config(), linear_eval.get_config("reference")
    )
    config.linear_eval.linear.epochs = 90.0
    config.linear_eval.linear.batch_size = 4096
    config.linear_eval.linear.weight_decay = 1e-6
    config.linear_eval.eval.batch_size = 1024
    config.grid.batch_sizes = (256, 512, 1024, 2048, 4096, 8192)
    config.grid.epochs = (100.0, 200.0, 400.0, 800.0)
    config.grid.lr_scalings = ("linear", "sqrt")
    config.grid.temperatures = (0.1,)
    config.base_lr.linear = 0.3
    config.base_lr.sqrt = 0.075
    config.micro_batch_size = 4096
    config.reference = "imagenet"
    return config
