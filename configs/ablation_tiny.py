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

Other methods: `configs/ablation_tiny.py:<method>` (byol, mocov3, mocov2,
barlow_twins, vicreg, nnclr, instdisc; none or 'simclr' is the SimCLR grid above) builds the
same grid on configs/<method>_cifar10.py:quickstart, with the same edits (warmup, no kNN)
and each cell's batch, epochs and sqrt-scaled LR. The temperature axis sets
method.temperature for MoCo v3, MoCo v2, NNCLR and InstDisc and is a label only for BYOL,
Barlow Twins and VICReg (no temperature); only SimCLR, Barlow Twins and VICReg train in
micro-batches, the others' micro_batch_size is 0 (batch 256 is one batch). No reference figures
(the SimCLR paper's do not apply):

  python -m simclr_jax.sweep --config=configs/ablation_tiny.py:byol --workdir=/tmp/ablation_byol
"""

import ml_collections as mlc

from configs import (
    ablation_cifar10,
    barlow_twins_cifar10,
    byol_cifar10,
    instdisc_cifar10,
    linear_eval,
    mocov2_cifar10,
    mocov3_cifar10,
    nnclr_cifar10,
    quickstart,
    vicreg_cifar10,
)
from simclr_jax import config_checks

# config argument (the method's config.method.name) -> its config module, run with ':quickstart'.
METHOD_CONFIGS = {
    "byol": byol_cifar10,
    "mocov3": mocov3_cifar10,
    "mocov2": mocov2_cifar10,
    "barlow_twins": barlow_twins_cifar10,
    "vicreg": vicreg_cifar10,
    "nnclr": nnclr_cifar10,
    "instdisc": instdisc_cifar10,
}


def get_config(arg: str | None = None) -> mlc.ConfigDict:
    """The tiny grid: SimCLR (no argument, or 'simclr') or the method named by arg."""
    if arg and arg != "simclr" and arg not in METHOD_CONFIGS:
        raise ValueError(
            f"unknown config argument {arg!r}; use none (SimCLR) or one of {tuple(METHOD_CONFIGS)}"
        )
    if arg in METHOD_CONFIGS:
        module = METHOD_CONFIGS[arg]
        pretrain = module.get_config("quickstart")
        pretrain_config = f"configs/{module.__name__.rpartition('.')[2]}.py:quickstart"
    else:
        pretrain = quickstart.get_config()
        pretrain_config = "configs/quickstart.py"
    pretrain.optim.warmup_epochs = 0.2
    pretrain.eval.knn = False
    pretrain.eval.compare_random_init = False
    pretrain.train.log_every_steps = 10
    config = ablation_cifar10.build(pretrain_config, pretrain, linear_eval.get_config())
    config.grid.batch_sizes = (64, 128, 256)
    config.grid.epochs = (0.5, 1.0)
    config.grid.lr_scalings = ("sqrt",)
    # One temperature: the method's own (0.2 for SimCLR, whose NT-Xent reads loss.temperature).
    config.grid.temperatures = (pretrain.get("method", {}).get("temperature", 0.2),)
    config.base_lr.linear = 1.0
    config.base_lr.sqrt = 0.2
    method = config_checks.method_name(pretrain)
    config.micro_batch_size = 128 if method in config_checks.MICRO_BATCHING_METHODS else 0
    config.reference = "cifar10" if method == "simclr" else "none"
    return config
