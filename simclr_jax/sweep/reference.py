"""The reference figures a sweep's report shows beside ours (the ablation config's `reference`).

'imagenet': the SimCLR paper's Table B.1, one value per grid point;
'cifar10': two single reference points (no per-cell values); 'none': nothing.
The figures are data typed in from the sources cited beside them; nothing here
is measured. The report labels every number as ours or the paper's.
"""

import math

from simclr_jax.config_checks import ConfigError

# SimCLR paper (Chen et al. 2020, arXiv 2002.05709), appendix B.1, Table B.1
# (also plotted in its Figure 9): ImageNet linear-evaluation top-1 (%) of
# ResNet-50 for batch size x pretraining epochs, as (linear LR scaling,
# square-root LR scaling). The runs use the paper's default settings
# (temperature 0.1; the reference code's README gives these defaults), LARS
# with base LR 0.3 x B/256 (linear) or 0.075 x sqrt(B) (sqrt).
TABLE_B1 = {
    (256, 100): (57.5, 62.8),
    (256, 200): (61.9, 64.3),
    (256, 400): (64.7, 65.7),
    (256, 800): (66.6, 66.5),
    (512, 100): (60.7, 63.8),
    (512, 200): (64.0, 65.6),
    (512, 400): (66.2, 66.7),
    (512, 800): (67.8, 67.4),
    (1024, 100): (62.8, 64.3),
    (1024, 200): (65.3, 66.1),
    (1024, 400): (67.2, 67.2),
    (1024, 800): (68.5, 68.3),
    (2048, 100): (64.0, 64.7),
    (2048, 200): (66.1, 66.8),
    (2048, 400): (68.1, 67.9),
    (2048, 800): (68.9, 68.8),
    (4096, 100): (64.6, 64.5),
    (4096, 200): (66.5, 66.8),
    (4096, 400): (68.2, 68.0),
    (4096, 800): (68.9, 69.1),
    (8192, 100): (64.8, 64.8),
    (8192, 200): (66.6, 67.0),
    (8192, 400): (67.8, 68.3),
    (8192, 800): (69.0, 69.1),
}
TABLE_B1_TEMPERATURE = 0.1
_TABLE_B1_COLUMN = {"linear": 0, "sqrt": 1}

# CIFAR-10 reference figures: single points, not a grid. Our reference notes
# do not hold the per-cell values of the paper's CIFAR-10 batch-size x epochs
# study (appendix B.9), so none are invented here.
CIFAR10_REFERENCE_POINTS = (
    {
        "label": "ResNet-18 (CIFAR stem), B=512, 1000 ep: about 91% "
        "(google-research/simclr README, the configs/cifar10.py recipe)",
        "short": "ResNet-18, B=512, 1000 ep (about 91%)",
        "batch_size": 512,
        "epochs": 1000.0,
        "top1": 91.0,
    },
    {
        "label": "ResNet-50, B=1024: 94.0% (SimCLR paper, appendix B.9)",
        "short": "ResNet-50, B=1024 (94.0%)",
        "batch_size": 1024,
        "epochs": None,
        "top1": 94.0,
    },
)

REFERENCES = ("imagenet", "cifar10", "none")


def paper_top1(reference: str, batch_size: int, epochs: float, lr_scaling: str, temperature: float):
    """The paper's Table B.1 top-1 (%) for a cell, or None where the paper has none.

    Args:
      reference: 'imagenet' (Table B.1), 'cifar10' or 'none' (no per-cell values).
      batch_size, epochs, lr_scaling, temperature: the cell.

    Returns:
      The paper's value, or None (other dataset, temperature or grid point).
    """
    if reference not in REFERENCES:
        raise ConfigError(f"reference={reference!r}: use one of {REFERENCES}")
    if reference != "imagenet" or not math.isclose(temperature, TABLE_B1_TEMPERATURE):
        return None
    if float(epochs) != int(epochs) or lr_scaling not in _TABLE_B1_COLUMN:
        return None
    pair = TABLE_B1.get((int(batch_size), int(epochs)))
    return None if pair is None else pair[_TABLE_B1_COLUMN[lr_scaling]]
