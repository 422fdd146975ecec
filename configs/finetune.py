r"""Semi-supervised fine-tuning on a fraction of the labels (SimCLRv2 recipe).

  python main.py --config=configs/finetune.py \
      --config.init_from=workdirs/quickstart --config.finetune.label_fraction=0.1 \
      --workdir=workdirs/quickstart_ft10

The whole network is fine-tuned (finetune.from_block=k freezes the stem and
stages below k) with a new linear classifier on the head layer chosen by
finetune.ft_proj_selector (1: the first head layer, as SimCLRv2 does with its
3-layer head; 0: h). Subsets are class-balanced, seeded and nested (1% inside
10%); ImageNet (tfds imagenet2012) uses the published 1% / 10% subsets.
Optimiser as the SimCLRv2 reference: LARS, LR 0.16 x batch/256, no weight
decay, 60 epochs at 1% / 30 at 10% of labels. arg '1pct' / '10pct' / '100pct'
sets the fraction and the epochs.
"""

import ml_collections as mlc

from configs import linear_eval

FRACTIONS = {"1pct": (0.01, 60.0), "10pct": (0.1, 30.0), "100pct": (1.0, 30.0)}


def get_config(arg: str | None = None) -> mlc.ConfigDict:
    """Fine-tuning config; arg in FRACTIONS picks the label fraction."""
    config = linear_eval.base_protocol_config("finetune")
    ft = config.finetune = mlc.ConfigDict()
    ft.label_fraction, ft.epochs = FRACTIONS["10pct"]
    ft.subset_seed = 0
    ft.official_imagenet_subsets = True
    ft.ft_proj_selector = 1  # 0 = h, k = k-th head layer
    ft.from_block = 0  # 0: train everything; k: freeze stem + stages < k
    ft.batch_size = 128
    ft.optim = mlc.ConfigDict()
    ft.optim.name = "lars"
    ft.optim.base_lr = 0.16
    ft.optim.lr_scaling = "linear"
    ft.optim.weight_decay = 0.0
    ft.optim.momentum = 0.9
    ft.optim.trust_coefficient = 0.001  # name='lars'
    ft.optim.nesterov = False  # name='sgd' only
    ft.optim.probe_weight_decay = False  # the new classifier: no decay, no LARS adaptation
    ft.optim.warmup_epochs = 0.0
    if arg in FRACTIONS:
        ft.label_fraction, ft.epochs = FRACTIONS[arg]
    elif arg:
        raise ValueError(f"unknown config argument {arg!r}; use one of {sorted(FRACTIONS)}")
    return config
