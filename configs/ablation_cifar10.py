r"""Batch-size x epochs x LR-scaling ablation on CIFAR-10 (SimCLR paper, appendix B.9).

  python -m simclr_jax.sweep --config=configs/ablation_cifar10.py \
      --workdir=workdirs/ablation_cifar10
  # on a cluster: one pretraining and one linear-eval job per unfinished cell
  python -m simclr_jax.sweep --config=configs/ablation_cifar10.py \
      --workdir=/shared/ablation_cifar10 --print_commands=slurm
  # tables and plot from whatever has finished
  python -m simclr_jax.sweep --config=configs/ablation_cifar10.py \
      --workdir=workdirs/ablation_cifar10 --report_only

Grid: batch 256, 512, 1024, 2048, 4096 (appendix B.9's batch sizes) x 100,
200, 500, 1000 epochs (our choice within the range of B.9's study) x linear
and square-root LR scaling x temperature 0.5 = 40 cells, about 18,000 epochs
of CIFAR-10 pretraining in all. Base recipe: configs/cifar10.py (the reference
code's ResNet-18 recipe; the paper's B.9 grid used ResNet-50: add
--config.pretrain.model.depth=50). Base LR: 1.0 x B/256 with linear scaling
(the recipe's) and 0.2 x sqrt(B) with square-root scaling, the reference
authors' advice for small batches (REFERENCE.md); at B=512 that is a peak of
4.5 against linear's 2.0, so the two rules differ in level as well as in slope.
Linear evaluation: the reference recipe (configs/linear_eval.py:reference:
crop + flip, Nesterov momentum SGD, LR 0.1 x B/256, batch 512, 100 epochs).
Cells with a batch above 512 train in micro-batches of 512 (exact full-batch
NT-Xent negatives, BatchNorm statistics per micro-batch), so no cell needs more
accelerator memory than the base recipe; --config.micro_batch_size=0 turns it
off where the whole batch fits.

Expected: the reference figure for the base cell (B=512, 1000 epochs, linear) is
about 91% top-1; the paper reports 94.0% for ResNet-50 at B=1024. The paper's
per-cell CIFAR-10 values are not in our reference notes, so the report shows
only these two points beside ours.
"""

import ml_collections as mlc

from configs import cifar10, linear_eval


def build(pretrain_config: str, pretrain: mlc.ConfigDict, linear: mlc.ConfigDict) -> mlc.ConfigDict:
    """An ablation config around a base pretraining config and a linear-eval config.

    Args:
      pretrain_config: the config file `pretrain` comes from ('path[:arg]');
        each cell runs main.py with it plus --config.* overrides.
      pretrain: the base pretraining config (edited by the caller as needed).
      linear: a configs/linear_eval.py config; its data and augment sections are
        dropped because every cell evaluates on the pretraining data.

    Returns:
      The ablation config, grid axes still to be set by the caller.
    """
    config = mlc.ConfigDict()
    config.pretrain_config = pretrain_config
    config.pretrain = pretrain
    config.linear_eval_config = "configs/linear_eval.py"
    del linear["data"]
    del linear["augment"]
    config.linear_eval = linear

    config.grid = mlc.ConfigDict()
    config.grid.batch_sizes = (256,)
    config.grid.epochs = (100.0,)
    config.grid.lr_scalings = ("linear",)
    config.grid.temperatures = (0.5,)

    # Peak LR = base_lr.linear * B / 256 or base_lr.sqrt * sqrt(B).
    config.base_lr = mlc.ConfigDict()
    config.base_lr.linear = 1.0
    config.base_lr.sqrt = 0.2

    # Cells whose batch exceeds this train in micro-batches of this many
    # examples (global; needs train.micro_batch_size in the base config). 0: never.
    config.micro_batch_size = 0
    # Paper figures shown beside ours: 'imagenet' (Table B.1), 'cifar10' or 'none'.
    config.reference = "cifar10"
    return config


def get_config(arg: str | None = None) -> mlc.ConfigDict:
    """The CIFAR-10 ablation grid (no config argument)."""
    if arg:
        raise ValueError(
            f"unknown config argument {arg!r}; configs/ablation_tiny.py is the small grid"
        )
    config = build("configs/cifar10.py", cifar10.get_config(), linear_eval.get_config("reference"))
    config.linear_eval.linear.epochs = 100.0
    config.linear_eval.linear.batch_size = 512
    config.grid.batch_sizes = (256, 512, 1024, 2048, 4096)
    config.grid.epochs = (100.0, 200.0, 500.0, 1000.0)
    config.grid.lr_scalings = ("linear", "sqrt")
    config.grid.temperatures = (0.5,)
    config.base_lr.linear = 1.0
    config.base_lr.sqrt = 0.2
    config.micro_batch_size = 512
    config.reference = "cifar10"
    return config
